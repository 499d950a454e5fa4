//! The run's decisions as a synchronous state machine: `handle(event, now) -> actions`.
//!
//! No sockets, no tasks, no clocks: the caller says what happened and when, and carries out the actions. The gRPC
//! adapter (`service.rs`) feeds it real sessions; tests feed it scripted and random event sequences.
//!
//! The run moves forward only: WAITING → RUNNING → FINISHED or FAILED.
//! - WAITING: workers join (or are rejected); one that leaves is forgotten. When `cluster.min_workers` have joined,
//!   generation 0 is formed with ranks in join order and every member gets its `Assignment`.
//! - RUNNING: members report steps, evaluations, checkpoints and `Finished`. Joining is closed (no elastic
//!   admission yet). A member lost before it finished — stream closed, `WorkerError`, or silent for
//!   `5 × cluster.heartbeat_interval_secs` — fails the run, as do two ranks reporting different parameter
//!   checksums for one step; the other members get `Abort`.
//! - FINISHED when every member sent `Finished`: all get `Stop`. The server waits for their sessions to close.
//!
//! Status semantics: `step` is the newest step *every* rank has reported (the slowest rank's last step), so it never
//! runs ahead of the run's real state; `last_loss` and `lr` belong to that step. `tokens_per_sec` and `eta_secs` come
//! from the arrival times of complete steps over a sliding window (see `progress.rs`).
use std::time::{Duration, Instant};

use lockstep_common::RunSpec;
use lockstep_common::proto::{self, coordinator_message::Msg as Down, worker_message::Msg as Up};
use tracing::{debug, error, info, warn};

use crate::admission::{self, RunView};
use crate::progress::{Divergence, Progress, Report};

/// A member is lost when it has been silent for this many heartbeat intervals.
pub const HEARTBEAT_MISSES: u32 = 5;

/// Identifies one session (one `Session` RPC). A worker that reconnects gets a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "conn-{}", self.0)
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    /// A session opened and sent its `Join`.
    Joined { conn: ConnId, join: proto::Join },
    /// Any later message on a session.
    Message { conn: ConnId, msg: Up },
    /// The session's inbound stream ended or failed.
    Disconnected { conn: ConnId, reason: String },
    /// Time passed; checks heartbeats.
    Tick,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send {
        conn: ConnId,
        msg: proto::CoordinatorMessage,
    },
    /// End the session from our side (after a `Reject`, or a member that went silent). No further event for this
    /// connection matters; its `Disconnected` is ignored.
    Close { conn: ConnId },
    /// The run reached FINISHED or FAILED. Emitted exactly once.
    RunEnded { outcome: RunOutcome },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every member finished its last step.
    Finished,
    /// The run failed; the message names the worker or step at fault.
    Failed(String),
    /// The coordinator was shut down before the run ended. Only the server produces this.
    Interrupted,
}

/// Ordered: the run's phase only ever increases (FINISHED and FAILED are both final).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Waiting,
    Running,
    Finished,
    Failed,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Finished | Phase::Failed)
    }
}

#[derive(Debug, Clone)]
struct Worker {
    conn: ConnId,
    id: String,
    host: String,
    device: String,
    ring_addr: String,
    /// The NCCL unique id it made at join; empty for a CPU worker.
    nccl_unique_id: Vec<u8>,
    rank: Option<u32>,
    state: proto::WorkerState,
    connected: bool,
    last_seen: Instant,
    last_step: u64,
    last_step_ms: f64,
    tokens_per_sec: f64,
    param_checksum: String,
}

impl Worker {
    fn status(&self) -> proto::WorkerStatus {
        proto::WorkerStatus {
            worker_id: self.id.clone(),
            rank: self.rank.map_or(-1, |r| i32::try_from(r).unwrap_or(i32::MAX)),
            host: self.host.clone(),
            device: self.device.clone(),
            state: self.state as i32,
            last_step: self.last_step,
            last_step_ms: self.last_step_ms,
            tokens_per_sec: self.tokens_per_sec,
            param_checksum: self.param_checksum.clone(),
        }
    }

    fn is_training(&self) -> bool {
        self.rank.is_some() && self.state == proto::WorkerState::Training
    }
}

#[derive(Debug)]
pub struct RunMachine {
    spec: RunSpec,
    spec_json: String,
    spec_hash: String,
    /// The data as the coordinator read it ([`RunMachine::with_data_fingerprint`]); empty = not checked.
    data_fingerprint: String,
    phase: Phase,
    started: Instant,
    ended: Option<Instant>,
    generation: u64,
    /// Everyone admitted, in join order. Waiting workers that leave are removed; members stay (for status).
    workers: Vec<Worker>,
    /// Index into `workers` by rank, once the generation is formed.
    members: Vec<usize>,
    progress: Option<Progress>,
    val_loss: Option<(u64, f64)>,
    last_checkpoint: Option<(u64, String)>,
    error: String,
}

fn send(conn: ConnId, msg: Down) -> Action {
    Action::Send {
        conn,
        msg: proto::CoordinatorMessage { msg: Some(msg) },
    }
}

impl RunMachine {
    /// A run in WAITING for `spec`, which must already be validated.
    pub fn new(spec: RunSpec, now: Instant) -> Self {
        Self {
            spec_json: spec.to_json(),
            spec_hash: spec.training_hash(),
            data_fingerprint: String::new(),
            spec,
            phase: Phase::Waiting,
            started: now,
            ended: None,
            generation: 0,
            workers: Vec::new(),
            members: Vec::new(),
            progress: None,
            val_loss: None,
            last_checkpoint: None,
            error: String::new(),
        }
    }

    /// Hands every worker `fingerprint` (the coordinator's `Corpus::fingerprint`) in its assignment, so a worker
    /// reading another copy of the data refuses to train.
    pub fn with_data_fingerprint(mut self, fingerprint: String) -> Self {
        self.data_fingerprint = fingerprint;
        self
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// The silence after which a member counts as lost.
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs(
            self.spec
                .cluster
                .heartbeat_interval_secs
                .saturating_mul(u64::from(HEARTBEAT_MISSES)),
        )
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Joined { conn, join } => self.on_join(conn, join, now, &mut out),
            Event::Message { conn, msg } => self.on_message(conn, msg, now, &mut out),
            Event::Disconnected { conn, reason } => self.on_disconnect(conn, &reason, now, &mut out),
            Event::Tick => self.on_tick(now, &mut out),
        }
        out
    }

    fn index_of(&self, conn: ConnId) -> Option<usize> {
        self.workers.iter().position(|w| w.conn == conn && w.connected)
    }

    fn on_join(&mut self, conn: ConnId, join: proto::Join, now: Instant, out: &mut Vec<Action>) {
        let id = admission::worker_name(&join, conn);
        if self.workers.iter().any(|w| w.conn == conn && w.connected) {
            warn!(worker = %id, %conn, "second Join on one session ignored");
            return;
        }
        let closed = match self.phase {
            Phase::Waiting => None,
            Phase::Running => Some(format!(
                "run already formed generation {} with {} workers; admitting workers mid-run is not supported yet",
                self.generation,
                self.members.len()
            )),
            Phase::Finished => Some(format!(
                "run {} already finished; nothing left to train",
                self.spec.run.name
            )),
            Phase::Failed => Some(format!("run {} already failed: {}", self.spec.run.name, self.error)),
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
            host: join.host,
            device: join.device,
            ring_addr: join.ring_addr,
            nccl_unique_id: join.nccl_unique_id,
            rank: None,
            state: proto::WorkerState::Joined,
            connected: true,
            last_seen: now,
            last_step: 0,
            last_step_ms: 0.0,
            tokens_per_sec: 0.0,
            param_checksum: String::new(),
        });
        let waiting = self.workers.len();
        let min_workers = self.spec.cluster.min_workers;
        info!(worker = %id, %conn, waiting, min_workers, "worker joined");
        out.push(send(
            conn,
            Down::Welcome(proto::Welcome {
                run_name: self.spec.run.name.clone(),
                min_workers,
                waiting: u32::try_from(waiting).unwrap_or(u32::MAX),
            }),
        ));
        if waiting >= min_workers as usize {
            self.form_generation(now, out);
        }
    }

    fn form_generation(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.phase = Phase::Running;
        self.members = (0..self.workers.len()).collect();
        let world_size = u32::try_from(self.members.len()).unwrap_or(u32::MAX);
        let peers: Vec<String> = self.workers.iter().map(|w| w.ring_addr.clone()).collect();
        // NCCL only when every member can take part; one CPU worker puts the whole generation on the ring.
        let nccl_unique_id = if self.workers.iter().all(|w| !w.nccl_unique_id.is_empty()) {
            self.workers
                .first()
                .map(|w| w.nccl_unique_id.clone())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        self.progress = Some(Progress::new(self.members.len(), 0, now));
        info!(
            generation = self.generation,
            world_size,
            nccl = !nccl_unique_id.is_empty(),
            "generation formed"
        );
        for (rank, w) in (0u32..).zip(self.workers.iter_mut()) {
            w.rank = Some(rank);
            w.state = proto::WorkerState::Training;
            // The liveness clock starts with the assignment: a worker may have waited long without heartbeats.
            w.last_seen = now;
            info!(worker = %w.id, rank, host = %w.host, "assigned");
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
                    start_step: 0,
                    end_step: self.spec.train.total_steps,
                    data_cursor: 0,
                    resume_from: String::new(),
                    data_fingerprint: self.data_fingerprint.clone(),
                    nccl_unique_id: nccl_unique_id.clone(),
                }),
            ));
        }
    }

    fn on_message(&mut self, conn: ConnId, msg: Up, now: Instant, out: &mut Vec<Action>) {
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
            Up::Error(e) => self.on_worker_error(idx, e.message, now, out),
            report => {
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
                    Up::Join(_) | Up::Heartbeat(_) | Up::Error(_) | Up::Idle(_) | Up::Paused(_) => return,
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
                    Up::Eval(r) => self.on_eval(idx, &r),
                    Up::Checkpoint(r) => self.on_checkpoint(idx, r),
                    Up::Finished(r) => self.on_finished(idx, &r, now, out),
                    Up::Join(_) | Up::Heartbeat(_) | Up::Error(_) | Up::Idle(_) | Up::Paused(_) => {}
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
        if r.skipped {
            warn!(worker = %w.id, rank, step = r.step, loss = r.loss, "step skipped: loss or gradient not finite");
        }
        debug!(worker = %w.id, rank, step = r.step, loss = r.loss, tokens = r.tokens, step_ms = r.step_ms, "step");
        let floor = self.min_member_step();
        let report = Report {
            rank,
            step: r.step,
            tokens: r.tokens,
            loss: r.loss,
            lr: r.lr,
            checksum: &r.param_checksum,
        };
        let recorded = match self.progress.as_mut() {
            Some(progress) => progress.record(&report, floor, now),
            None => Ok(()),
        };
        if let Err(divergence) = recorded {
            let Divergence { step, .. } = divergence;
            error!(step, %divergence, "parameters diverged between ranks");
            self.fail(divergence.to_string(), now, out);
        }
    }

    fn on_eval(&mut self, idx: usize, r: &proto::EvalReport) {
        if self.val_loss.is_none_or(|(step, _)| r.step >= step) {
            self.val_loss = Some((r.step, r.val_loss));
        }
        info!(
            worker = %self.workers[idx].id,
            step = r.step,
            val_loss = r.val_loss,
            val_perplexity = r.val_loss.exp(),
            "evaluation"
        );
    }

    fn on_checkpoint(&mut self, idx: usize, r: proto::CheckpointReport) {
        info!(worker = %self.workers[idx].id, step = r.step, path = %r.path, "checkpoint committed");
        if self.last_checkpoint.as_ref().is_none_or(|(step, _)| r.step >= *step) {
            self.last_checkpoint = Some((r.step, r.path));
        }
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
        if !all_done {
            return;
        }
        self.phase = Phase::Finished;
        self.ended = Some(now);
        info!(run = %self.spec.run.name, step = self.min_member_step(), "run finished");
        for &i in &self.members {
            let w = &self.workers[i];
            if w.connected {
                out.push(send(
                    w.conn,
                    Down::Stop(proto::Stop {
                        reason: "run finished".into(),
                    }),
                ));
            }
        }
        out.push(Action::RunEnded {
            outcome: RunOutcome::Finished,
        });
    }

    fn on_worker_error(&mut self, idx: usize, message: String, now: Instant, out: &mut Vec<Action>) {
        let w = &self.workers[idx];
        match self.phase {
            Phase::Waiting => {
                warn!(worker = %w.id, error = %message, "worker reported an error while waiting; removed");
                out.push(Action::Close { conn: w.conn });
                self.workers.remove(idx);
            }
            Phase::Running if w.is_training() => {
                self.lose(idx, "failed", &format!("it reported: {message}"), now, out);
            }
            _ => {
                warn!(worker = %w.id, error = %message, "worker reported an error after its work ended")
            }
        }
    }

    fn on_disconnect(&mut self, conn: ConnId, reason: &str, now: Instant, out: &mut Vec<Action>) {
        let Some(idx) = self.index_of(conn) else {
            return;
        };
        match self.phase {
            Phase::Waiting => {
                info!(worker = %self.workers[idx].id, %reason, "worker left while waiting");
                self.workers.remove(idx);
            }
            Phase::Running if self.workers[idx].is_training() => {
                self.workers[idx].connected = false;
                self.lose(idx, "lost", reason, now, out);
            }
            _ => {
                debug!(worker = %self.workers[idx].id, %reason, "session closed");
                self.workers[idx].connected = false;
            }
        }
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.phase != Phase::Running {
            return;
        }
        let limit = self.heartbeat_timeout();
        let silent = self.members.iter().copied().find(|&i| {
            let w = &self.workers[i];
            w.connected && w.is_training() && now.saturating_duration_since(w.last_seen) > limit
        });
        if let Some(idx) = silent {
            let quiet = now.saturating_duration_since(self.workers[idx].last_seen).as_secs_f64();
            let reason = format!(
                "no message for {quiet:.1} s (limit {HEARTBEAT_MISSES} × cluster.heartbeat_interval_secs = {} s)",
                limit.as_secs()
            );
            self.lose(idx, "lost", &reason, now, out);
            // It may be hung rather than gone: end its session so it cannot linger.
            let w = &mut self.workers[idx];
            if w.connected {
                w.connected = false;
                out.push(Action::Close { conn: w.conn });
            }
        }
    }

    /// A member stopped before it finished: the generation cannot continue without it.
    fn lose(&mut self, idx: usize, verb: &str, reason: &str, now: Instant, out: &mut Vec<Action>) {
        let w = &mut self.workers[idx];
        w.state = proto::WorkerState::Lost;
        let message = format!(
            "worker {} (rank {}, host {}) {verb} at step {}: {reason}; restarting without it is not supported yet",
            w.id,
            w.rank.map_or_else(|| "-".to_string(), |r| r.to_string()),
            w.host,
            w.last_step
        );
        error!(worker = %w.id, rank = w.rank, host = %w.host, step = w.last_step, verb, %reason, "member stopped before finishing");
        self.fail(message, now, out);
    }

    /// Ends the run as FAILED and aborts every connected member — the one at fault too, when it is still connected:
    /// a worker that reported an error waits for that answer before it exits, so its report is not lost with its
    /// connection.
    fn fail(&mut self, message: String, now: Instant, out: &mut Vec<Action>) {
        if self.phase.is_final() {
            return;
        }
        self.phase = Phase::Failed;
        self.ended = Some(now);
        self.error = message.clone();
        for &i in &self.members {
            let w = &self.workers[i];
            if w.connected {
                out.push(send(
                    w.conn,
                    Down::Abort(proto::Abort {
                        generation: self.generation,
                        reason: message.clone(),
                    }),
                ));
            }
        }
        out.push(Action::RunEnded {
            outcome: RunOutcome::Failed(message),
        });
    }

    /// The newest step every member has reported; 0 before the generation forms.
    fn min_member_step(&self) -> u64 {
        self.members
            .iter()
            .map(|&i| self.workers[i].last_step)
            .min()
            .unwrap_or(0)
    }

    pub fn status(&self, now: Instant) -> proto::RunStatus {
        let state = match self.phase {
            Phase::Waiting => proto::RunState::Waiting,
            Phase::Running => proto::RunState::Running,
            Phase::Finished => proto::RunState::Finished,
            Phase::Failed => proto::RunState::Failed,
        };
        let step = self.min_member_step();
        let total_steps = self.spec.train.total_steps;
        let (last_loss, lr) = match self.progress.as_ref().and_then(Progress::last_loss_lr) {
            Some((loss, lr)) => (Some(loss), lr),
            None => (None, 0.0),
        };
        let eta_secs = match self.phase {
            Phase::Finished => Some(0.0),
            Phase::Running => self
                .progress
                .as_ref()
                .and_then(Progress::secs_per_step)
                .map(|per_step| per_step * total_steps.saturating_sub(step) as f64),
            Phase::Waiting | Phase::Failed => None,
        };
        proto::RunStatus {
            run_name: self.spec.run.name.clone(),
            state: state as i32,
            generation: self.generation,
            step,
            total_steps,
            last_loss,
            val_loss: self.val_loss.map(|(_, loss)| loss),
            tokens_per_sec: self.progress.as_ref().map_or(0.0, Progress::tokens_per_sec),
            eta_secs,
            world_size: u32::try_from(self.members.len()).unwrap_or(u32::MAX),
            workers: self.workers.iter().map(Worker::status).collect(),
            last_checkpoint: self
                .last_checkpoint
                .as_ref()
                .map(|(_, path)| path.clone())
                .unwrap_or_default(),
            error: self.error.clone(),
            elapsed_secs: self
                .ended
                .unwrap_or(now)
                .saturating_duration_since(self.started)
                .as_secs_f64(),
            lr,
            ..Default::default()
        }
    }
}
