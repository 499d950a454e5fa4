//! How a run ends: finished, failed, or stopped on request (after an agreed pause and checkpoint).
use std::time::Instant;

use lockstep_common::proto::{self, coordinator_message::Msg as Down};
use tracing::{error, info, warn};

use super::{Action, Phase, RunMachine, RunOutcome, send};
use crate::record::{OUTCOME_FAILED, OUTCOME_FINISHED, OUTCOME_STALLED, OUTCOME_STOPPED, Record};

impl RunMachine {
    /// Stop cleanly: while a generation runs, its members agree on a step, rank 0 checkpoints it, and they pause;
    /// otherwise nothing is in flight and the run stops at once.
    pub(super) fn on_stop_requested(&mut self, reason: String, now: Instant, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Finished | Phase::Failed | Phase::Stopped => {}
            Phase::Waiting | Phase::Reforming => self.end_stopped(reason, now, out),
            Phase::Running if self.draining.is_some() => {}
            Phase::Running => {
                info!(generation = self.generation, %reason, "stopping: members checkpoint at an agreed step");
                for &i in &self.members {
                    let w = &self.workers[i];
                    if w.connected && w.is_training() {
                        out.push(send(
                            w.conn,
                            Down::Drain(proto::Drain {
                                generation: self.generation,
                                reason: reason.clone(),
                            }),
                        ));
                    }
                }
                self.draining = Some(reason);
            }
        }
    }

    pub(super) fn end_finished(&mut self, now: Instant, out: &mut Vec<Action>) {
        info!(run = %self.spec.run.name, step = self.step, "run finished");
        self.end(Phase::Finished, String::new(), now, out);
    }

    /// Stopped on request; a coordinator started again on the same state resumes from the newest checkpoint.
    pub(super) fn end_stopped(&mut self, reason: String, now: Instant, out: &mut Vec<Action>) {
        let resume = self
            .checkpoints
            .last()
            .map_or_else(|| "the start (no checkpoint)".to_string(), |(_, p)| p.clone());
        info!(run = %self.spec.run.name, %reason, resume_from = %resume, "run stopped; start the coordinator again to resume");
        self.end(Phase::Stopped, reason, now, out);
    }

    /// Ends the run as FAILED and stops every connected worker — the one at fault too, when it is still connected:
    /// a worker that reported an error waits for that answer before it exits, so its report is not lost with its
    /// connection.
    pub(super) fn fail(&mut self, message: String, now: Instant, out: &mut Vec<Action>) {
        if self.phase.is_final() {
            return;
        }
        error!(run = %self.spec.run.name, %message, "run failed");
        self.end(Phase::Failed, message, now, out);
    }

    /// Fails the run for want of workers: FAILED now, as `fail`, but recorded as stalled, so a coordinator started
    /// again on the same state resumes it from the newest checkpoint instead of refusing it.
    pub(super) fn fail_resumable(&mut self, message: String, now: Instant, out: &mut Vec<Action>) {
        if self.phase.is_final() {
            return;
        }
        error!(run = %self.spec.run.name, %message, "run failed; it can be resumed");
        self.end_as(Phase::Failed, OUTCOME_STALLED, message, now, out);
    }

    fn end(&mut self, phase: Phase, message: String, now: Instant, out: &mut Vec<Action>) {
        let recorded = match phase {
            Phase::Finished => OUTCOME_FINISHED,
            Phase::Failed => OUTCOME_FAILED,
            _ => OUTCOME_STOPPED,
        };
        self.end_as(phase, recorded, message, now, out);
    }

    /// Ends the run in `phase`, recording `recorded` as its outcome.
    fn end_as(&mut self, phase: Phase, recorded: &str, message: String, now: Instant, out: &mut Vec<Action>) {
        if self.phase.is_final() {
            warn!(?phase, current = ?self.phase, "the run already ended");
            return;
        }
        self.phase = phase;
        self.ended = Some(now);
        self.error = message.clone();
        // `progress` stays: the final status keeps the run's recent throughput.
        self.draining = None;
        self.reforming = None;
        let (outcome, reason, failed) = match phase {
            Phase::Finished => (RunOutcome::Finished, "run finished".to_string(), false),
            Phase::Failed => (
                RunOutcome::Failed(message.clone()),
                format!("run failed: {message}"),
                true,
            ),
            _ => (
                RunOutcome::Stopped(message.clone()),
                format!("run stopped: {message}"),
                false,
            ),
        };
        for w in self.workers.iter().filter(|w| w.connected) {
            out.push(send(
                w.conn,
                Down::Stop(proto::Stop {
                    reason: reason.clone(),
                    failed,
                }),
            ));
        }
        out.push(Action::Persist(Record::Ended {
            outcome: recorded.to_string(),
            message,
        }));
        out.push(Action::RunEnded { outcome });
    }
}
