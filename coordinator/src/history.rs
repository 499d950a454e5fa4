//! The run's loss curve, as `GetHistory` sends it and `lockstep history --state-dir` reads it: the step and
//! evaluation records of the surviving timeline ([`Saved`]), cut into messages small enough for any gRPC client.
use lockstep_common::proto::{EvalPoint, RunHistory, StepPoint};

use crate::record::Saved;

/// Steps per message: about 700 KB encoded, well under tonic's default 4 MiB limit on a message received.
pub const STEPS_PER_MESSAGE: usize = 16384;

/// The points of `saved` after `after_step`, oldest first, in messages of at most `per_message` steps (at least one
/// message, so a run without steps yet still says its name). The evaluations come with the first message.
pub fn messages(saved: &Saved, after_step: u64, per_message: usize) -> Vec<RunHistory> {
    let run_name = saved.run.as_ref().map(|(name, _, _)| name.clone()).unwrap_or_default();
    let steps: Vec<StepPoint> = saved
        .steps
        .iter()
        .filter(|s| s.step > after_step)
        .map(|s| StepPoint {
            step: s.step,
            loss: s.loss,
            lr: s.lr,
            grad_norm: s.grad_norm,
            tokens: s.tokens,
            skipped: s.skipped,
        })
        .collect();
    let mut evals: Vec<EvalPoint> = saved
        .evals
        .iter()
        .filter(|(step, _)| *step > after_step)
        .map(|&(step, val_loss)| EvalPoint { step, val_loss })
        .collect();
    let mut out: Vec<RunHistory> = steps
        .chunks(per_message.max(1))
        .map(|chunk| RunHistory {
            run_name: run_name.clone(),
            steps: chunk.to_vec(),
            evals: Vec::new(),
        })
        .collect();
    match out.first_mut() {
        Some(first) => first.evals = std::mem::take(&mut evals),
        None => out.push(RunHistory {
            run_name,
            steps: Vec::new(),
            evals,
        }),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Record, StepRecord};

    fn step(step: u64, loss: f64) -> Record {
        Record::Step(StepRecord {
            step,
            loss,
            lr: 0.1,
            grad_norm: 1.0,
            tokens: 64,
            skipped: !loss.is_finite(),
        })
    }

    fn eval(step: u64, val_loss: f64) -> Record {
        Record::Eval {
            step,
            val_loss,
            metrics: Default::default(),
        }
    }

    fn fold(records: Vec<Record>) -> Saved {
        let mut saved = Saved::default();
        saved.apply(Record::Run {
            name: "curve".into(),
            spec_hash: "h".into(),
            spec_json: "{}".into(),
        });
        for r in records {
            saved.apply(r);
        }
        saved
    }

    #[test]
    fn the_surviving_timeline_comes_in_order_cut_into_messages() {
        // Steps 1-4, then a restart from step 2: steps 3 and 4 are run again and replace the first attempt.
        let saved = fold(vec![
            step(1, 4.0),
            step(2, 3.0),
            eval(2, 3.5),
            step(3, 2.9),
            step(4, f64::NAN),
            eval(4, 9.9),
            step(3, 2.5),
            step(4, 2.0),
        ]);
        let all = messages(&saved, 0, 3);
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|m| m.run_name == "curve"));
        let steps: Vec<(u64, f64)> = all
            .iter()
            .flat_map(|m| m.steps.iter().map(|s| (s.step, s.loss)))
            .collect();
        assert_eq!(steps, vec![(1, 4.0), (2, 3.0), (3, 2.5), (4, 2.0)]);
        assert_eq!(all[0].steps.len(), 3);
        // The abandoned timeline's evaluation at step 4 is gone with it.
        let evals: Vec<(u64, f64)> = all[0].evals.iter().map(|e| (e.step, e.val_loss)).collect();
        assert_eq!(evals, vec![(2, 3.5)]);
        assert!(all[1].evals.is_empty());
    }

    #[test]
    fn after_step_keeps_the_newer_points_and_an_empty_history_still_names_the_run() {
        let saved = fold(vec![step(1, 4.0), eval(1, 4.1), step(2, f64::INFINITY), eval(2, 3.9)]);
        let newer = messages(&saved, 1, STEPS_PER_MESSAGE);
        assert_eq!(newer.len(), 1);
        assert_eq!(newer[0].steps.len(), 1);
        assert_eq!(newer[0].steps[0].step, 2);
        assert!(newer[0].steps[0].skipped && newer[0].steps[0].loss.is_infinite());
        assert_eq!(newer[0].evals.len(), 1);
        let none = messages(&saved, 2, STEPS_PER_MESSAGE);
        assert_eq!(none.len(), 1);
        assert_eq!(none[0].run_name, "curve");
        assert!(none[0].steps.is_empty() && none[0].evals.is_empty());
    }
}
