//! Who is in the run: joining, leaving, going silent, losing a member, and forming the next generation.
use std::time::{Duration, Instant};

use lockstep_common::proto::{self, coordinator_message::Msg as Down};
use tracing::{debug, error, info, warn};

use super::{Action, ConnId, Phase, RunMachine, Worker, send, unix_ms};
use crate::admission::{self, RunView};
use crate::progress::Progress;
use crate::record::{LostRecord, Member, Record};

impl RunMachine {
    pub(super) fn on_join(&mut self, conn: ConnId, join: proto::Join, now: Instant, out: &mut Vec<Action>) {
        let id = admission::worker_name(&join, conn);
        if self.workers.iter().any(|w| w.conn == conn && w.connected) {
            warn!(worker = %id, %conn, "second Join on one session ignored");
            return;
        }
        // The same worker process (same id and ring address: its listener's, unique to the process) joining while
        // its old session still looks connected: the worker saw that session break before the coordinator did (a
        // half-open connection). End the old one as if its break had been seen first, rather than refuse the worker
        // as a duplicate, which would make it give up.
        let stale = self
            .workers
            .iter()
            .find(|w| w.connected && w.id == id && !join.ring_addr.is_empty() && w.ring_addr == join.ring_addr)
            .map(|w| w.conn);
        if let Some(old) = stale {
            info!(worker = %id, %old, %conn, "the worker joined again; its old session is gone");
            out.push(Action::Close { conn: old });
            self.on_disconnect(old, "replaced by a new session of the same worker", now, out);
        }
        let closed = match self.phase {
            Phase::Waiting | Phase::Running | Phase::Reforming => None,
            Phase::Finished => Some(format!(
                "run {} already finished; nothing left to train",
                self.spec.run.name
            )),
            Phase::Failed => Some(format!("run {} already failed: {}", self.spec.run.name, self.error)),
            Phase::Stopped => Some(format!(
                "run {} was stopped ({}); start the coordinator again to resume it",
                self.spec.run.name, self.error
            )),
        };
        let view = RunView {
            spec: &self.spec,
            closed,
            workers: self.workers.iter().filter(|w| w.connected).count(),
            connected: self
                .workers
                .iter()
                .filter(|w| w.connected)
                .map(|w| (w.id.as_str(), w.host.as_str()))
                .collect(),
        };
        if let Some(reason) = admission::refusal(&join, &id, &view) {
            warn!(worker = %id, host = %join.host, %conn, %reason, "join rejected");
            out.push(send(conn, Down::Reject(proto::Reject { reason })));
            out.push(Action::Close { conn });
            return;
        }
        self.workers.push(Worker {
            conn,
            id: id.clone(),
            host: join.host.clone(),
            device: join.device.clone(),
            ring_addr: join.ring_addr.clone(),
            nccl_unique_id: join.nccl_unique_id.clone(),
            rank: None,
            state: proto::WorkerState::Joined,
            ready: true,
            connected: true,
            last_seen: now,
            last_step: 0,
            last_step_ms: 0.0,
            tokens_per_sec: 0.0,
            param_checksum: String::new(),
        });
        let waiting = self.workers.iter().filter(|w| w.connected && w.ready).count();
        let min_workers = self.spec.cluster.min_workers;
        info!(worker = %id, %conn, waiting, min_workers, phase = ?self.phase, "worker joined");
        out.push(send(
            conn,
            Down::Welcome(proto::Welcome {
                run_name: self.spec.run.name.clone(),
                min_workers,
                waiting: u32::try_from(waiting).unwrap_or(u32::MAX),
                heartbeat_interval_secs: self.spec.cluster.heartbeat_interval_secs,
            }),
        ));
        if join.training {
            let idx = self.workers.len() - 1;
            self.on_rejoin_training(idx, &join, now, out);
            return;
        }
        if self.phase == Phase::Running {
            info!(
                worker = %id,
                generation = self.generation,
                "admitted at the next checkpoint (checkpoint.interval = {})",
                self.spec.checkpoint.interval
            );
        }
        self.try_form(now, out);
    }

    pub(super) fn on_disconnect(&mut self, conn: ConnId, reason: &str, now: Instant, out: &mut Vec<Action>) {
        let Some(idx) = self.index_of(conn) else {
            return;
        };
        let w = &mut self.workers[idx];
        w.connected = false;
        if self.phase.is_final() {
            debug!(worker = %w.id, %reason, "session closed");
        } else if w.is_busy_member() {
            self.lose(idx, "lost", reason, now, out);
        } else {
            info!(worker = %w.id, %reason, "worker left");
            self.try_form(now, out);
        }
    }

    pub(super) fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.phase.is_final() {
            return;
        }
        let limit = self.heartbeat_timeout();
        // By session, not index: losing a member may form the next generation, which forgets departed workers and
        // moves the others. Those not running a share go first, so such a generation never takes a silent one.
        let mut silent: Vec<(bool, ConnId)> = self
            .workers
            .iter()
            .filter(|w| w.connected && now.saturating_duration_since(w.last_seen) > limit)
            .map(|w| (w.is_busy_member(), w.conn))
            .collect();
        silent.sort_by_key(|&(member, _)| member);
        for (_, conn) in silent {
            let Some(idx) = self.index_of(conn) else {
                continue;
            };
            let quiet = now.saturating_duration_since(self.workers[idx].last_seen).as_secs_f64();
            let reason = format!(
                "no message for {quiet:.1} s (limit {} × cluster.heartbeat_interval_secs = {} s)",
                super::HEARTBEAT_MISSES,
                limit.as_secs()
            );
            // It may be hung rather than gone: end its session so it cannot linger; it reconnects if it can.
            let w = &mut self.workers[idx];
            w.connected = false;
            out.push(Action::Close { conn: w.conn });
            if w.is_busy_member() {
                self.lose(idx, "lost", &reason, now, out);
            } else {
                warn!(worker = %w.id, %reason, "waiting worker went silent; dropped");
            }
            if self.phase.is_final() {
                return;
            }
        }
        self.check_adoption_deadline(now, out);
        if let Some((since, why)) = &self.reforming {
            let timeout = Duration::from_secs(self.spec.cluster.reform_timeout_secs);
            if self.phase == Phase::Reforming && now.saturating_duration_since(*since) > timeout {
                let ready = self.ready_workers().len();
                let message = format!(
                    "could not re-form after {why}: {ready} of cluster.min_workers = {} workers available after {} s \
                     (cluster.reform_timeout_secs); start more workers and resume by starting the coordinator again",
                    self.spec.cluster.min_workers,
                    timeout.as_secs()
                );
                self.fail_resumable(message, now, out);
                return;
            }
        }
        self.try_form(now, out);
    }

    /// A member stopped before it finished: record it and abort its generation (a restart).
    pub(super) fn lose(&mut self, idx: usize, verb: &str, reason: &str, now: Instant, out: &mut Vec<Action>) {
        let generation = self.generation;
        let w = &mut self.workers[idx];
        w.state = proto::WorkerState::Lost;
        w.ready = false;
        let message = format!(
            "worker {} (rank {}, host {}) {verb} at step {}: {reason}",
            w.id,
            w.rank_text(),
            w.host,
            w.last_step
        );
        error!(worker = %w.id, rank = w.rank, host = %w.host, step = w.last_step, verb, %reason, "member lost");
        if w.connected {
            // A worker that failed on its own waits for this answer before it exits.
            out.push(send(
                w.conn,
                Down::Stop(proto::Stop {
                    reason: format!("removed from the run: {reason}"),
                    failed: true,
                }),
            ));
        }
        let record = LostRecord {
            worker_id: w.id.clone(),
            host: w.host.clone(),
            rank: w.rank,
            generation,
            last_step: w.last_step,
            reason: format!("{verb}: {reason}"),
            unix_ms: unix_ms(),
        };
        self.lost.push(proto::LostWorker::from(&record));
        out.push(Action::Persist(Record::Lost(record)));
        if let Some(stop) = self.draining.clone() {
            // The agreed pause needs every member; stop on the newest committed checkpoint instead.
            self.end_stopped(format!("{stop} (during the stop, {message})"), now, out);
        } else if self.phase == Phase::Running {
            self.abort_generation(message, true, now, out);
        } else {
            self.try_form(now, out);
        }
    }

    /// Ends the current generation: members still training get `Abort` and answer `Idle`; the next generation forms
    /// from the newest committed checkpoint once they have. `restart`: it was a failure (counts against
    /// `cluster.max_restarts`), not an admission or a damaged checkpoint.
    pub(super) fn abort_generation(&mut self, reason: String, restart: bool, now: Instant, out: &mut Vec<Action>) {
        if self.phase != Phase::Running {
            return;
        }
        if self.resume_point().0 >= self.spec.train.total_steps {
            // The final checkpoint is committed: whatever went wrong after it, the training is complete.
            info!(%reason, "a member failed after the final checkpoint was committed; the run is complete");
            self.end_finished(now, out);
            return;
        }
        if let Some(stop) = self.draining.clone() {
            // A stop was requested: the agreed pause cannot happen now; stop on the newest committed checkpoint
            // rather than re-form a generation only to stop it.
            self.end_stopped(format!("{stop} (during the stop, {reason})"), now, out);
            return;
        }
        if restart {
            self.restarts += 1;
            let max = self.spec.cluster.max_restarts;
            if self.restarts > max {
                self.fail(
                    format!("gave up after cluster.max_restarts = {max} restarts; the last: {reason}"),
                    now,
                    out,
                );
                return;
            }
            out.push(Action::Persist(Record::Restart {
                generation: self.generation,
                reason: reason.clone(),
            }));
        }
        warn!(generation = self.generation, restart, restarts = self.restarts, %reason, "generation aborted");
        for &i in &self.members {
            let w = &self.workers[i];
            if w.is_busy() {
                out.push(send(
                    w.conn,
                    Down::Abort(proto::Abort {
                        generation: self.generation,
                        reason: reason.clone(),
                    }),
                ));
            }
        }
        self.phase = Phase::Reforming;
        self.progress = None;
        self.reforming = Some((now, reason));
        self.try_form(now, out);
    }

    /// Connected workers free for the next generation, in join order, at most `cluster.max_workers`.
    pub(super) fn ready_workers(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|&i| self.workers[i].connected && self.workers[i].ready)
            .take(self.spec.cluster.max_workers as usize)
            .collect()
    }

    /// Forms the next generation if nothing of the old one is still running and enough workers are ready.
    pub(super) fn try_form(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Waiting | Phase::Reforming) || self.draining.is_some() {
            return;
        }
        if self.workers.iter().any(Worker::is_busy) {
            return;
        }
        if self.resume_point().0 >= self.spec.train.total_steps {
            // The final checkpoint is committed (the members went away before they said they finished): nothing is
            // left to train, whoever is here.
            self.form_generation(&[], now, out);
            return;
        }
        if self.ready_workers().len() < self.spec.cluster.min_workers as usize {
            return;
        }
        // Forget everyone who is gone; `members` is rebuilt below, so indices may move now. A worker still winding
        // down a generation it rejoined with (Training, no rank) stays: its Idle frees it for a later one.
        self.workers
            .retain(|w| w.connected && (w.ready || w.state == proto::WorkerState::Training));
        let picked = self.ready_workers();
        self.form_generation(&picked, now, out);
    }

    fn form_generation(&mut self, picked: &[usize], now: Instant, out: &mut Vec<Action>) {
        let (start_step, resume_from) = self.resume_point();
        let total_steps = self.spec.train.total_steps;
        if start_step >= total_steps {
            // The final checkpoint is committed: the run is complete (the coordinator went away before the workers
            // said so).
            info!(
                step = start_step,
                "the final checkpoint is committed; nothing left to train"
            );
            self.step = start_step;
            self.end_finished(now, out);
            return;
        }
        self.generation = self.next_generation;
        self.next_generation += 1;
        self.adopting = None;
        self.phase = Phase::Running;
        self.reforming = None;
        self.members = picked.to_vec();
        self.step = start_step;
        // Evaluations after the resume point belonged to the abandoned timeline; the status must not show them
        // until this one evaluates those steps again.
        if self.val_loss.is_some_and(|(step, _)| step > start_step) {
            self.val_loss = None;
        }
        if self.eval_metrics.as_ref().is_some_and(|(step, _)| *step > start_step) {
            self.eval_metrics = None;
        }
        let world_size = u32::try_from(picked.len()).unwrap_or(u32::MAX);
        let peers: Vec<String> = picked.iter().map(|&i| self.workers[i].ring_addr.clone()).collect();
        // NCCL only when every member can take part; one CPU worker puts the whole generation on the ring.
        let nccl_unique_id = if picked.iter().all(|&i| !self.workers[i].nccl_unique_id.is_empty()) {
            picked
                .first()
                .map(|&i| self.workers[i].nccl_unique_id.clone())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        self.progress = Some(Progress::new(picked.len(), start_step, now));
        let data_cursor = start_step.saturating_mul(self.spec.train.global_batch as u64);
        info!(
            generation = self.generation,
            world_size,
            start_step,
            resume_from = %resume_from,
            nccl = !nccl_unique_id.is_empty(),
            "generation formed"
        );
        let mut members = Vec::with_capacity(picked.len());
        for (rank, &i) in (0u32..).zip(picked) {
            let w = &mut self.workers[i];
            w.rank = Some(rank);
            w.state = proto::WorkerState::Training;
            w.ready = false;
            w.last_step = start_step;
            w.param_checksum.clear();
            // The liveness clock starts with the assignment: loading a checkpoint may take a while.
            w.last_seen = now;
            info!(worker = %w.id, rank, host = %w.host, "assigned");
            members.push(Member {
                worker_id: w.id.clone(),
                host: w.host.clone(),
                rank,
            });
            out.push(send(
                w.conn,
                Down::Assignment(proto::Assignment {
                    run_name: self.spec.run.name.clone(),
                    generation: self.generation,
                    rank,
                    world_size,
                    peers: peers.clone(),
                    spec_json: self.spec_json.clone(),
                    spec_hash: self.spec_hash.clone(),
                    start_step,
                    end_step: total_steps,
                    data_cursor,
                    resume_from: resume_from.clone(),
                    data_fingerprint: self.data_fingerprint.clone(),
                    nccl_unique_id: nccl_unique_id.clone(),
                }),
            ));
        }
        out.push(Action::Persist(Record::Generation {
            generation: self.generation,
            start_step,
            resume_from,
            members,
        }));
    }
}

impl Worker {
    /// A member whose loss would break the running generation (it has not finished, paused or answered an abort).
    fn is_busy_member(&self) -> bool {
        self.rank.is_some() && !self.ready && self.state == proto::WorkerState::Training
    }
}
