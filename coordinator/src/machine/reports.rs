//! What members report: steps, evaluations, checkpoints, the end of their share, pauses, idleness and errors.
use std::collections::BTreeMap;
use std::time::Instant;

use lockstep_common::proto::{self, worker_message::Msg as Up};
use tracing::{debug, error, info, warn};

use super::{Action, ConnId, Phase, RunMachine};
use crate::progress::{Divergence, Report};
use crate::record::{Record, StepRecord};

impl RunMachine {
    pub(super) fn on_message(&mut self, conn: ConnId, msg: Up, now: Instant, out: &mut Vec<Action>) {
        let Some(idx) = self.index_of(conn) else {
            debug!(%conn, "message from a session that is not in the run ignored");
            return;
        };
        self.workers[idx].last_seen = now;
        match msg {
            Up::Join(_) => {
                warn!(worker = %self.workers[idx].id, "second Join on one session ignored")
            }
            Up::Heartbeat(_) => {}
            Up::Error(e) => self.on_worker_error(idx, e, now, out),
            Up::Idle(r) => {
                if !r.nccl_unique_id.is_empty() {
                    self.workers[idx].nccl_unique_id = r.nccl_unique_id;
                }
                self.on_idle(idx, r.generation, now, out);
            }
            report => {
                if self.on_report_while_adopting(idx, &report, now, out) {
                    return;
                }
                let w = &self.workers[idx];
                let Some(rank) = w.rank.filter(|_| self.phase == Phase::Running) else {
                    debug!(worker = %w.id, phase = ?self.phase, "report outside a running generation ignored");
                    return;
                };
                let (generation, claimed) = match &report {
                    Up::Step(r) => (r.generation, r.rank),
                    Up::Eval(r) => (r.generation, r.rank),
                    Up::Checkpoint(r) => (r.generation, r.rank),
                    Up::Finished(r) => (r.generation, r.rank),
                    Up::Paused(r) => (r.generation, r.rank),
                    Up::Join(_) | Up::Heartbeat(_) | Up::Error(_) | Up::Idle(_) => return,
                };
                if generation != self.generation {
                    warn!(worker = %w.id, generation, current = self.generation, "report for another generation ignored");
                    return;
                }
                if claimed != rank {
                    // The session knows who the worker is; a wrong rank field is a worker bug, not a reason to
                    // misattribute its report.
                    warn!(worker = %w.id, rank, claimed, "report names another rank; using the session's rank");
                }
                match report {
                    Up::Step(r) => self.on_step(idx, rank, &r, now, out),
                    Up::Eval(r) => self.on_eval(idx, &r, out),
                    Up::Checkpoint(r) => self.on_checkpoint(idx, r, now, out),
                    Up::Finished(r) => self.on_finished(idx, &r, now, out),
                    Up::Paused(r) => self.on_paused(idx, &r, now, out),
                    Up::Join(_) | Up::Heartbeat(_) | Up::Error(_) | Up::Idle(_) => {}
                }
            }
        }
    }

    fn on_step(&mut self, idx: usize, rank: u32, r: &proto::StepReport, now: Instant, out: &mut Vec<Action>) {
        let w = &mut self.workers[idx];
        w.last_step = w.last_step.max(r.step);
        w.last_step_ms = r.step_ms;
        w.tokens_per_sec = if r.step_ms > 0.0 {
            r.tokens as f64 * 1000.0 / r.step_ms
        } else {
            0.0
        };
        if !r.param_checksum.is_empty() {
            w.param_checksum = r.param_checksum.clone();
        }
        debug!(worker = %w.id, rank, step = r.step, loss = r.loss, tokens = r.tokens, step_ms = r.step_ms, "step");
        let floor = self.min_member_step();
        let report = Report {
            rank,
            step: r.step,
            tokens: r.tokens,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            skipped: r.skipped,
            checksum: &r.param_checksum,
        };
        let recorded = match self.progress.as_mut() {
            Some(progress) => progress.record(&report, floor, now),
            None => Ok(None),
        };
        let done = match recorded {
            Ok(Some(done)) => done,
            Ok(None) => return,
            Err(divergence) => {
                let Divergence { step, .. } = divergence;
                error!(step, %divergence, "parameters diverged between ranks");
                self.fail(divergence.to_string(), now, out);
                return;
            }
        };
        self.step = self.step.max(done.step);
        self.last_loss_lr = Some((done.loss, done.lr));
        out.push(Action::Persist(Record::Step(StepRecord {
            step: done.step,
            loss: done.loss,
            lr: done.lr,
            grad_norm: done.grad_norm,
            tokens: done.tokens,
            skipped: done.skipped,
        })));
        if !done.skipped {
            self.nonfinite_streak = 0;
            return;
        }
        self.skipped_steps += 1;
        self.nonfinite_streak += 1;
        warn!(
            step = done.step,
            loss = done.loss,
            grad_norm = done.grad_norm,
            in_a_row = self.nonfinite_streak,
            "step skipped on every rank: loss or gradient norm not finite"
        );
        let limit = self.spec.cluster.max_nonfinite_steps;
        if self.nonfinite_streak >= limit {
            let keep = self
                .checkpoints
                .last()
                .map_or_else(|| "none was committed".to_string(), |(_, p)| format!("it is {p}"));
            self.fail(
                format!(
                    "{limit} steps in a row (up to step {}) had a non-finite loss or gradient norm \
                     (cluster.max_nonfinite_steps); the run diverged — lower train.lr or raise train.warmup_steps; \
                     the last good checkpoint is kept ({keep})",
                    done.step
                ),
                now,
                out,
            );
        }
    }

    fn on_eval(&mut self, idx: usize, r: &proto::EvalReport, out: &mut Vec<Action>) {
        // Sorted, so the record and the logs list the metrics in one order.
        let metrics: BTreeMap<String, f64> = r.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect();
        if self.val_loss.is_none_or(|(step, _)| r.step >= step) {
            self.val_loss = Some((r.step, r.val_loss));
            if !metrics.is_empty() {
                self.eval_metrics = Some((r.step, metrics.clone()));
            }
        }
        // Every rank reports the same reduced values; record them once.
        if self.members.first() == Some(&idx) {
            info!(
                worker = %self.workers[idx].id,
                step = r.step,
                val_loss = r.val_loss,
                val_perplexity = r.val_loss.exp(),
                ?metrics,
                "evaluation"
            );
            out.push(Action::Persist(Record::Eval {
                step: r.step,
                val_loss: r.val_loss,
                metrics,
            }));
        }
    }

    /// The writer reported a complete checkpoint: it is committed, and workers waiting to join are admitted from it.
    fn on_checkpoint(&mut self, idx: usize, r: proto::CheckpointReport, now: Instant, out: &mut Vec<Action>) {
        let step = r.step;
        self.commit_checkpoint(idx, r, out);
        // Workers that joined meanwhile are admitted here, from this checkpoint.
        let waiting: Vec<&str> = self
            .workers
            .iter()
            .filter(|w| w.connected && w.ready && w.rank.is_none())
            .map(|w| w.id.as_str())
            .collect();
        if !waiting.is_empty() && self.draining.is_none() && step < self.spec.train.total_steps {
            let reason = format!("admitting {} new worker(s): {}", waiting.len(), waiting.join(", "));
            self.abort_generation(reason, false, now, out);
        }
    }

    /// Records a checkpoint its writer reported complete: a resume point from now on.
    pub(super) fn commit_checkpoint(&mut self, idx: usize, r: proto::CheckpointReport, out: &mut Vec<Action>) {
        info!(worker = %self.workers[idx].id, step = r.step, path = %r.path, "checkpoint committed");
        self.checkpoints
            .retain(|(step, path)| *step != r.step && *path != r.path);
        let at = self.checkpoints.partition_point(|(step, _)| *step < r.step);
        self.checkpoints.insert(at, (r.step, r.path.clone()));
        self.keep_newest_checkpoints();
        out.push(Action::Persist(Record::Checkpoint {
            step: r.step,
            path: r.path.clone(),
        }));
        // Only now may the writer prune older checkpoints: until this commit is durable, one of them is the
        // resume point. The Persist above is written before this goes out (service.rs).
        out.push(super::send(
            self.workers[idx].conn,
            proto::coordinator_message::Msg::Committed(proto::CheckpointCommitted {
                generation: r.generation,
                step: r.step,
                path: r.path,
            }),
        ));
    }

    fn on_finished(&mut self, idx: usize, r: &proto::Finished, now: Instant, out: &mut Vec<Action>) {
        let end_step = self.spec.train.total_steps;
        let w = &mut self.workers[idx];
        if w.state != proto::WorkerState::Training {
            return;
        }
        w.state = proto::WorkerState::Finished;
        w.last_step = w.last_step.max(r.step);
        if r.step != end_step {
            warn!(worker = %w.id, step = r.step, end_step, "worker finished at another step than assigned");
        }
        info!(worker = %w.id, step = r.step, "worker finished");
        let all_done = self
            .members
            .iter()
            .all(|&i| self.workers[i].state == proto::WorkerState::Finished);
        if all_done {
            self.step = self.step.max(r.step);
            self.end_finished(now, out);
        }
    }

    /// A member stopped at the step the ranks agreed on (a requested stop, or someone leaving).
    fn on_paused(&mut self, idx: usize, r: &proto::Paused, now: Instant, out: &mut Vec<Action>) {
        if self.workers[idx].state != proto::WorkerState::Training {
            return;
        }
        self.pause_member(idx, r);
        let all_paused = self.members.iter().all(|&i| {
            let m = &self.workers[i];
            !m.connected || matches!(m.state, proto::WorkerState::Joined | proto::WorkerState::Left)
        });
        if !all_paused {
            return;
        }
        self.step = self.step.max(r.step);
        self.progress = None;
        if let Some(reason) = self.draining.clone() {
            self.end_stopped(reason, now, out);
            return;
        }
        let leaving: Vec<String> = self
            .members
            .iter()
            .map(|&i| &self.workers[i])
            .filter(|m| m.state == proto::WorkerState::Left)
            .map(|m| m.id.clone())
            .collect();
        let reason = if leaving.is_empty() {
            "the ranks paused".to_string()
        } else {
            format!("worker(s) {} left", leaving.join(", "))
        };
        if self.ready_workers().is_empty() {
            // Ending the run stops every connected worker, the leavers too: one Stop each.
            self.end_stopped(format!("{reason} and no worker remains"), now, out);
            return;
        }
        for &i in &self.members {
            let m = &self.workers[i];
            if m.connected && m.state == proto::WorkerState::Left {
                out.push(super::send(
                    m.conn,
                    proto::coordinator_message::Msg::Stop(proto::Stop {
                        reason: "left the run as asked, after a checkpoint".into(),
                        failed: false,
                    }),
                ));
            }
        }
        info!(%reason, "re-forming without the workers that left");
        self.phase = Phase::Reforming;
        self.reforming = Some((now, reason));
        self.try_form(now, out);
    }

    /// The member at `idx` stopped after the step its ranks agreed on: free for the next generation, or gone if it
    /// was leaving.
    pub(super) fn pause_member(&mut self, idx: usize, r: &proto::Paused) {
        let w = &mut self.workers[idx];
        w.last_step = w.last_step.max(r.step);
        if !r.nccl_unique_id.is_empty() {
            w.nccl_unique_id = r.nccl_unique_id.clone();
        }
        if r.leaving {
            w.state = proto::WorkerState::Left;
            info!(worker = %w.id, step = r.step, "worker leaves after the agreed step");
        } else {
            w.state = proto::WorkerState::Joined;
            w.ready = true;
            info!(worker = %w.id, step = r.step, "worker paused");
        }
    }

    /// The worker's training stopped; it can be given the next assignment.
    fn on_idle(&mut self, idx: usize, generation: u64, now: Instant, out: &mut Vec<Action>) {
        let w = &mut self.workers[idx];
        if w.state == proto::WorkerState::Lost || w.state == proto::WorkerState::Left {
            return;
        }
        if self.phase == Phase::Running && w.is_training() && generation == self.generation {
            // It stopped without being told to: the generation cannot go on without it.
            let reason = format!("worker {} stopped training generation {generation} on its own", w.id);
            w.state = proto::WorkerState::Joined;
            w.ready = true;
            self.abort_generation(reason, true, now, out);
            return;
        }
        if w.is_training() && generation < self.generation {
            debug!(worker = %w.id, generation, current = self.generation, "idle report of an older generation ignored");
            return;
        }
        debug!(worker = %w.id, generation, "worker idle");
        w.state = proto::WorkerState::Joined;
        w.ready = true;
        self.try_form(now, out);
    }

    fn on_worker_error(&mut self, idx: usize, e: proto::WorkerError, now: Instant, out: &mut Vec<Action>) {
        let kind = proto::FailureKind::try_from(e.kind).unwrap_or(proto::FailureKind::Own);
        let w = &self.workers[idx];
        let current = self.phase == Phase::Running && e.generation == self.generation && w.rank.is_some();
        match kind {
            proto::FailureKind::Checkpoint => {
                self.drop_damaged_checkpoint(&e.checkpoint, &e.message, out);
                if current {
                    let reason = format!("checkpoint {} is damaged", e.checkpoint);
                    self.abort_generation(reason, false, now, out);
                }
            }
            proto::FailureKind::Peer if current => {
                let reason = format!(
                    "the collective of worker {} (rank {}) failed: {}",
                    w.id,
                    w.rank_text(),
                    e.message
                );
                self.abort_generation(reason, true, now, out);
            }
            proto::FailureKind::Peer if self.adopting.as_ref().is_some_and(|a| a.generation == e.generation) => {
                // The generation a restarted coordinator waits to take over failed while it was away: nothing is
                // left to take over.
                let reason = format!(
                    "the collective of worker {} failed while the coordinator was away",
                    w.id
                );
                self.abandon_adoption(&reason, out);
                self.try_form(now, out);
            }
            proto::FailureKind::Peer => {
                debug!(worker = %w.id, generation = e.generation, error = %e.message, "collective failure of an old generation");
            }
            proto::FailureKind::Own if w.is_training() && !self.phase.is_final() => {
                self.lose(idx, "failed", &format!("it reported: {}", e.message), now, out);
            }
            proto::FailureKind::Own => {
                warn!(worker = %w.id, error = %e.message, "worker reported an error outside a generation; dropped");
                let conn = w.conn;
                self.workers[idx].connected = false;
                self.workers[idx].ready = false;
                out.push(Action::Close { conn });
                self.try_form(now, out);
            }
        }
    }

    /// A committed checkpoint failed verification: never resume from it again.
    fn drop_damaged_checkpoint(&mut self, path: &str, message: &str, out: &mut Vec<Action>) {
        let Some(pos) = self.checkpoints.iter().position(|(_, p)| p == path) else {
            return;
        };
        let (step, path) = self.checkpoints.remove(pos);
        let previous = self.checkpoints.last().map_or_else(
            || "a fresh start (no older committed checkpoint)".to_string(),
            |(_, p)| p.clone(),
        );
        warn!(%path, step, error = %message, "checkpoint damaged; resuming from {previous} instead");
        out.push(Action::Persist(Record::CheckpointDamaged {
            step,
            path,
            reason: message.to_string(),
        }));
    }

    /// The newest step every member has reported; the generation's start before any report.
    pub(super) fn min_member_step(&self) -> u64 {
        self.members
            .iter()
            .map(|&i| self.workers[i].last_step)
            .min()
            .unwrap_or(self.step)
    }
}
