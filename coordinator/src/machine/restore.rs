//! A coordinator started again on the run's saved state: it picks the run up where the state says it was.
use std::time::Instant;

use lockstep_common::{RunSpec, proto};
use tracing::info;

use super::{Phase, RunMachine};
use crate::error::{Error, Result};
use crate::record::{OUTCOME_FAILED, OUTCOME_FINISHED, Record, Saved};

impl RunMachine {
    /// The run `spec` as `saved` left it, plus the records to append before anything else (the run's identity
    /// for a fresh state, `Resumed` for a stopped run picked up again). `state` names the state file in messages.
    ///
    /// - Fresh state: a new run.
    /// - Another run's state, or this run with another training spec: refused (resuming would mix two runs).
    /// - Finished or failed: the machine is in that final phase (status still answers; nothing is trained).
    /// - Otherwise (interrupted, stopped on request, or failed for want of workers — "stalled"): WAITING for
    ///   workers; the next generation resumes from the newest committed checkpoint, with the restart count, lost
    ///   workers and metric history kept.
    pub fn restore(spec: RunSpec, saved: Saved, state: &str, now: Instant) -> Result<(Self, Vec<Record>)> {
        let mut machine = RunMachine::new(spec, now);
        let Some((name, hash, json)) = saved.run.clone() else {
            let identity = Record::Run {
                name: machine.spec.run.name.clone(),
                spec_hash: machine.spec_hash.clone(),
                spec_json: machine.spec_json.clone(),
            };
            return Ok((machine, vec![identity]));
        };
        if hash != machine.spec_hash {
            let diff = RunSpec::from_json(&json)
                .map(|theirs| theirs.training_diff(&machine.spec).join("; "))
                .unwrap_or_else(|e| format!("its saved spec cannot be read: {e}"));
            // A run that never committed a checkpoint has nothing to resume: say that starting afresh loses
            // nothing (the usual case: a typo fixed after the first start).
            let advice = if saved.checkpoints.is_empty() {
                format!(
                    "it has committed no checkpoint, so nothing is lost by starting afresh: delete {state} (or set \
                     cluster.state_dir to a new directory)"
                )
            } else {
                "resume it with its own config, or set cluster.state_dir to a new directory to start another run"
                    .to_string()
            };
            return Err(Error::StateConflict(format!(
                "{state} holds run {name:?} with another training spec (saved vs this config: {diff}); {advice}"
            )));
        }
        machine.next_generation = saved.generations.last().map_or(0, |g| g.0 + 1);
        machine.generation = saved.generations.last().map_or(0, |g| g.0);
        machine.checkpoints = saved.checkpoints.clone();
        machine.keep_newest_checkpoints();
        machine.restarts = saved.restarts;
        machine.skipped_steps = saved.steps.iter().filter(|s| s.skipped).count() as u64;
        machine.lost = saved.lost.iter().map(proto::LostWorker::from).collect();
        machine.val_loss = saved.evals.last().copied();
        machine.eval_metrics = saved.eval_metrics.clone();
        // Training resumes at the newest checkpoint; the history beyond it will be repeated.
        let (resume_step, _) = machine.resume_point();
        machine.step = resume_step;
        machine.last_loss_lr = saved
            .steps
            .iter()
            .rev()
            .find(|s| s.step <= resume_step)
            .map(|s| (s.loss, s.lr));
        let mut records = Vec::new();
        match saved.ended {
            Some((outcome, message)) if outcome == OUTCOME_FINISHED => {
                machine.phase = Phase::Finished;
                machine.step = saved.steps.last().map_or(resume_step, |s| s.step);
                machine.ended = Some(now);
                machine.error = message;
            }
            Some((outcome, message)) if outcome == OUTCOME_FAILED => {
                machine.phase = Phase::Failed;
                machine.ended = Some(now);
                machine.error = message;
            }
            Some(_) => records.push(Record::Resumed),
            None => {
                // Interrupted, not stopped: the last generation's members may still be training it.
                if let Some((generation, _, _, members)) = saved.generations.last() {
                    machine.adopt_later(
                        *generation,
                        members.iter().map(|m| (m.worker_id.clone(), m.rank)).collect(),
                    );
                }
            }
        }
        info!(
            run = %name,
            state,
            phase = ?machine.phase,
            generations = saved.generations.len(),
            resume_step,
            restarts = machine.restarts,
            "run state restored"
        );
        Ok((machine, records))
    }
}
