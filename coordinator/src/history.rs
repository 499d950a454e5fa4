//! The run's loss curve, as `GetHistory` sends it and `lockstep history --state-dir` reads it: the step and
//! evaluation records of the surviving timeline ([`Saved`]), cut into messages small enough for any gRPC client.
use lockstep_common::proto::{EvalPoint, RunHistory, StepPoint};
use prost::Message;

use crate::record::Saved;

/// Largest encoded message `GetHistory` sends, unless the coordinator's `security.max_message_bytes` asks for less:
/// ~20k steps, well under the 4 MiB that gRPC clients receive by default.
pub const MESSAGE_BYTES: usize = 1 << 20;

/// The encoded size a message may reach when the coordinator's limit is `max_message_bytes`: half of it (the rest is
/// headroom for framing), at most [`MESSAGE_BYTES`].
pub fn message_budget(max_message_bytes: usize) -> usize {
    (max_message_bytes / 2).min(MESSAGE_BYTES)
}

/// The points of `saved`'s surviving timeline, oldest first: the steps after `after_step`, and the evaluations at
/// `after_step` or later (an evaluation is recorded a moment after its step, so a client that fetched up to step N
/// may not have N's yet). Each evaluation travels with its step; a message stops growing before it encodes to more
/// than `max_bytes` (one point always fits). There is at least one message, so a run without steps yet still says
/// its name and generation.
pub fn messages(saved: &Saved, after_step: u64, max_bytes: usize) -> Vec<RunHistory> {
    let (generation, resumed_from_step) = saved.generations.last().map_or((0, 0), |(g, start, _, _)| (*g, *start));
    let empty = RunHistory {
        run_name: saved.run.as_ref().map(|(name, _, _)| name.clone()).unwrap_or_default(),
        generation,
        resumed_from_step,
        ..RunHistory::default()
    };
    let header = empty.encoded_len();
    let mut out = Vec::new();
    let mut current = empty.clone();
    let mut size = header;
    let mut push = |point: Point| {
        // Field tag and length prefix, as a repeated message field encodes each element.
        let len = match &point {
            Point::Step(p) => prost::encoding::message::encoded_len(2, p),
            Point::Eval(e) => prost::encoding::message::encoded_len(3, e),
        };
        if size + len > max_bytes && size > header {
            out.push(std::mem::replace(&mut current, empty.clone()));
            size = header;
        }
        size += len;
        match point {
            Point::Step(p) => current.steps.push(p),
            Point::Eval(e) => current.evals.push(e),
        }
    };
    let mut evals = saved.evals.iter().filter(|(step, _)| *step >= after_step).peekable();
    for s in saved.steps.iter().filter(|s| s.step > after_step) {
        while let Some(&&(step, val_loss)) = evals.peek().filter(|(step, _)| *step < s.step) {
            push(Point::Eval(EvalPoint { step, val_loss }));
            evals.next();
        }
        push(Point::Step(StepPoint {
            step: s.step,
            loss: s.loss,
            lr: s.lr,
            grad_norm: s.grad_norm,
            tokens: s.tokens,
            skipped: s.skipped,
        }));
        while let Some(&&(step, val_loss)) = evals.peek().filter(|(step, _)| *step == s.step) {
            push(Point::Eval(EvalPoint { step, val_loss }));
            evals.next();
        }
    }
    for &(step, val_loss) in evals {
        push(Point::Eval(EvalPoint { step, val_loss }));
    }
    out.push(current);
    out
}

enum Point {
    Step(StepPoint),
    Eval(EvalPoint),
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

    fn steps_of(messages: &[RunHistory]) -> Vec<(u64, f64)> {
        messages
            .iter()
            .flat_map(|m| m.steps.iter().map(|s| (s.step, s.loss)))
            .collect()
    }

    fn evals_of(messages: &[RunHistory]) -> Vec<(u64, f64)> {
        messages
            .iter()
            .flat_map(|m| m.evals.iter().map(|e| (e.step, e.val_loss)))
            .collect()
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
            Record::Generation {
                generation: 1,
                start_step: 2,
                resume_from: "ck/step-2".into(),
                members: vec![],
            },
            step(3, 2.5),
            step(4, 2.0),
        ]);
        // Room for the header and about two points per message.
        let budget = messages(&saved, 0, usize::MAX)[0].encoded_len() / 2;
        let all = messages(&saved, 0, budget);
        assert!(all.len() > 1, "{budget} bytes must not hold the whole history");
        assert!(all.iter().all(|m| m.encoded_len() <= budget));
        assert!(all.iter().all(|m| m.run_name == "curve"));
        assert!(all.iter().all(|m| (m.generation, m.resumed_from_step) == (1, 2)));
        assert_eq!(steps_of(&all), vec![(1, 4.0), (2, 3.0), (3, 2.5), (4, 2.0)]);
        // The abandoned timeline's evaluation at step 4 is gone with it.
        assert_eq!(evals_of(&all), vec![(2, 3.5)]);
    }

    #[test]
    fn after_step_keeps_the_newer_points_and_the_evaluation_at_it() {
        let saved = fold(vec![step(1, 4.0), eval(1, 4.1), step(2, f64::INFINITY), eval(2, 3.9)]);
        let newer = messages(&saved, 1, MESSAGE_BYTES);
        assert_eq!(newer.len(), 1);
        assert_eq!(steps_of(&newer).len(), 1);
        assert_eq!(newer[0].steps[0].step, 2);
        assert!(newer[0].steps[0].skipped && newer[0].steps[0].loss.is_infinite());
        // A client that fetched step 1 before its evaluation was recorded still gets that evaluation.
        assert_eq!(evals_of(&newer), vec![(1, 4.1), (2, 3.9)]);
        let last = messages(&saved, 2, MESSAGE_BYTES);
        assert_eq!(last.len(), 1);
        assert!(last[0].steps.is_empty());
        assert_eq!(evals_of(&last), vec![(2, 3.9)]);
        let none = messages(&saved, 3, MESSAGE_BYTES);
        assert_eq!(none.len(), 1);
        assert_eq!(none[0].run_name, "curve");
        assert!(none[0].steps.is_empty() && none[0].evals.is_empty());
        assert_eq!((none[0].generation, none[0].resumed_from_step), (0, 0));
    }

    /// A long run under the smallest `security.max_message_bytes`, evaluated every step: every message fits, and
    /// nothing is lost or repeated.
    #[test]
    fn every_message_fits_the_smallest_limit() {
        let n = 20_000u64;
        let mut records = Vec::new();
        for s in 1..=n {
            records.push(step(s, 1.0 / s as f64));
            records.push(eval(s, 2.0 / s as f64));
        }
        let saved = fold(records);
        let budget = message_budget(lockstep_common::spec::MIN_MAX_MESSAGE_BYTES);
        let all = messages(&saved, 0, budget);
        assert!(all.len() > 10);
        assert!(all.iter().all(|m| m.encoded_len() <= budget && !m.steps.is_empty()));
        let steps: Vec<u64> = steps_of(&all).iter().map(|p| p.0).collect();
        assert_eq!(steps, (1..=n).collect::<Vec<_>>());
        let evals: Vec<u64> = evals_of(&all).iter().map(|p| p.0).collect();
        assert_eq!(evals, (1..=n).collect::<Vec<_>>());
        assert_eq!(message_budget(usize::MAX), MESSAGE_BYTES);
    }
}
