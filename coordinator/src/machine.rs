//! The run's decisions as a synchronous state machine: `handle(event, now) -> actions`.
//!
//! No sockets, no tasks, no clocks, no disk: the caller says what happened and when, and carries out the actions
//! (sending, closing sessions, persisting [`Record`]s). The gRPC adapter (`service.rs`) feeds it real sessions;
//! tests feed it scripted and random event sequences.
//!
//! Phases: WAITING → RUNNING ⇄ REFORMING → FINISHED, FAILED or STOPPED (all three final).
//! - WAITING: workers join (or are rejected). When `cluster.min_workers` are ready, a generation is formed: ranks in
//!   join order, everyone resumes from the newest committed checkpoint (none: a fresh start), and every member gets
//!   its `Assignment`.
//! - RUNNING: members report steps, evaluations, checkpoints and `Finished`. A member that is lost — stream closed,
//!   an error of its own, silent for `5 × cluster.heartbeat_interval_secs` — or a collective that failed aborts the
//!   generation: survivors get `Abort`, stop, and answer `Idle`. That is a restart (at most `cluster.max_restarts`).
//!   Workers that join meanwhile wait; the next committed checkpoint aborts the generation to admit them (not a
//!   restart). Members that leave on SIGTERM, and a requested stop, go through an agreed pause instead: the ranks
//!   agree on a step, rank 0 checkpoints it, everyone sends `Paused`.
//! - REFORMING: once every member of the old generation is idle or gone and `min_workers` are ready, the next
//!   generation is formed from the newest committed checkpoint. Too few for `cluster.reform_timeout_secs` fails the
//!   run. A checkpoint a worker finds damaged is dropped and the one before it is used.
//! - A coordinator restored from its state ([`RunMachine::restore`]) first tries to take over the generation that
//!   was running: if every member rejoins still training it, nothing is re-formed and no step is lost (`adopt.rs`).
//! - FINISHED when every member sent `Finished`; FAILED on divergence, too many restarts or non-finite steps, or no
//!   workers to re-form with; STOPPED after a requested stop (resumable by a new coordinator on the same state).
//!
//! Status semantics: `step` is the newest step *every* rank has reported (the slowest rank's last step), so it never
//! runs ahead of the run's real state; after a restart it goes back to the checkpoint resumed from. `tokens_per_sec`
//! and `eta_secs` come from the arrival times of complete steps over a sliding window (see `progress.rs`).
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lockstep_common::RunSpec;
use lockstep_common::proto::{self, coordinator_message::Msg as Down, worker_message::Msg as Up};

use crate::progress::Progress;
use crate::record::Record;

mod adopt;
mod ending;
mod membership;
mod reports;
mod restore;

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
    /// Time passed; checks heartbeats and the re-forming deadline.
    Tick,
    /// Stop the run cleanly (SIGTERM to the coordinator, `lockstep stop`): checkpoint, then stop every worker.
    StopRequested { reason: String },
    /// The run state could not be written to disk; going on would risk a restart that forgets committed work.
    StoreFailed { message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send {
        conn: ConnId,
        msg: proto::CoordinatorMessage,
    },
    /// End the session from our side (after a `Reject`, or a worker that went silent). No further event for this
    /// connection matters; its `Disconnected` is ignored.
    Close { conn: ConnId },
    /// Append to the run's durable state, in order, before anything that depends on it is visible.
    Persist(Record),
    /// The run reached FINISHED, FAILED or STOPPED. Emitted exactly once.
    RunEnded { outcome: RunOutcome },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every member finished its last step.
    Finished,
    /// The run failed; the message names the worker or step at fault.
    Failed(String),
    /// Stopped on request after a checkpoint; a coordinator started again on the same state resumes it.
    Stopped(String),
    /// The coordinator was shut down before the run ended. Only the server produces this.
    Interrupted,
}

/// Ordered: the run's phase only moves forward, except RUNNING ⇄ REFORMING.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Waiting,
    Running,
    Reforming,
    Finished,
    Failed,
    Stopped,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Finished | Phase::Failed | Phase::Stopped)
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
    /// Its rank in the current (or just aborted) generation; `None` while it waits to be admitted.
    rank: Option<u32>,
    state: proto::WorkerState,
    /// Free for the next generation: joined and not training (it answered an abort or paused).
    ready: bool,
    connected: bool,
    last_seen: Instant,
    last_step: u64,
    last_step_ms: f64,
    tokens_per_sec: f64,
    param_checksum: String,
}

impl Worker {
    fn status(&self, now: Instant) -> proto::WorkerStatus {
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
            silent_secs: now.saturating_duration_since(self.last_seen).as_secs_f64(),
        }
    }

    /// A member of the generation that may still be running its share: it has not answered an abort or paused.
    fn is_busy(&self) -> bool {
        self.connected
            && self.rank.is_some()
            && !self.ready
            && matches!(self.state, proto::WorkerState::Training | proto::WorkerState::Finished)
    }

    fn is_training(&self) -> bool {
        self.rank.is_some() && self.state == proto::WorkerState::Training
    }

    fn rank_text(&self) -> String {
        self.rank.map_or_else(|| "-".to_string(), |r| r.to_string())
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
    /// The current (or last) generation; meaningful once one was formed.
    generation: u64,
    /// The number the next generation gets.
    next_generation: u64,
    /// Everyone admitted, in join order. Entries are only removed when a generation is formed (so `members`
    /// indices stay valid during one).
    workers: Vec<Worker>,
    /// Index into `workers` by rank, for the current (or just aborted) generation.
    members: Vec<usize>,
    progress: Option<Progress>,
    /// Newest step every rank reported, of the surviving timeline.
    step: u64,
    last_loss_lr: Option<(f64, f64)>,
    val_loss: Option<(u64, f64)>,
    /// The newest generation metrics (fine-tuning with sft.eval_data) and their step.
    eval_metrics: Option<(u64, BTreeMap<String, f64>)>,
    /// Committed checkpoints (step, path), oldest first; damaged ones removed.
    checkpoints: Vec<(u64, String)>,
    restarts: u32,
    lost: Vec<proto::LostWorker>,
    skipped_steps: u64,
    /// Non-finite steps in a row, up to the newest complete one.
    nonfinite_streak: u32,
    /// Since when the run has been re-forming, and why.
    reforming: Option<(Instant, String)>,
    /// A stop was requested while running; the members were told to pause.
    draining: Option<String>,
    /// Restored from state: the generation that was running when the previous coordinator went away, which its
    /// members may still be training.
    adopting: Option<Adoption>,
    error: String,
}

/// A generation a restarted coordinator takes over as it is, if every member rejoins still training it.
#[derive(Debug, Clone)]
struct Adoption {
    generation: u64,
    /// (worker id, rank) of every member.
    members: Vec<(String, u32)>,
    /// Once the first member is back, the others have this long (the heartbeat limit) before the generation is
    /// aborted and re-formed from the newest checkpoint instead.
    deadline: Option<Instant>,
}

fn send(conn: ConnId, msg: Down) -> Action {
    Action::Send {
        conn,
        msg: proto::CoordinatorMessage { msg: Some(msg) },
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl RunMachine {
    /// A fresh run in WAITING for `spec`, which must already be validated.
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
            next_generation: 0,
            workers: Vec::new(),
            members: Vec::new(),
            progress: None,
            step: 0,
            last_loss_lr: None,
            val_loss: None,
            eval_metrics: None,
            checkpoints: Vec::new(),
            restarts: 0,
            lost: Vec::new(),
            skipped_steps: 0,
            nonfinite_streak: 0,
            reforming: None,
            draining: None,
            adopting: None,
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

    /// The current (or last) generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// How the run ended, once it has.
    pub fn outcome(&self) -> Option<RunOutcome> {
        match self.phase {
            Phase::Finished => Some(RunOutcome::Finished),
            Phase::Failed => Some(RunOutcome::Failed(self.error.clone())),
            Phase::Stopped => Some(RunOutcome::Stopped(self.error.clone())),
            Phase::Waiting | Phase::Running | Phase::Reforming => None,
        }
    }

    /// The silence after which a worker counts as lost.
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
            Event::StopRequested { reason } => self.on_stop_requested(reason, now, &mut out),
            Event::StoreFailed { message } => self.fail(
                format!("cannot record the run's state: {message}; fix the disk and start the coordinator again"),
                now,
                &mut out,
            ),
        }
        out
    }

    fn index_of(&self, conn: ConnId) -> Option<usize> {
        self.workers.iter().position(|w| w.conn == conn && w.connected)
    }

    /// Forgets all but the newest `checkpoint.keep` committed checkpoints: the writer keeps only those on disk, so
    /// older entries would name deleted directories.
    fn keep_newest_checkpoints(&mut self) {
        let keep = self.spec.checkpoint.keep;
        if keep > 0 && self.checkpoints.len() > keep {
            let excess = self.checkpoints.len() - keep;
            self.checkpoints.drain(..excess);
        }
    }

    /// The newest committed checkpoint: where the next generation starts.
    fn resume_point(&self) -> (u64, String) {
        self.checkpoints.last().cloned().unwrap_or((0, String::new()))
    }

    pub fn status(&self, now: Instant) -> proto::RunStatus {
        let state = match self.phase {
            Phase::Waiting => proto::RunState::Waiting,
            Phase::Running => proto::RunState::Running,
            Phase::Reforming => proto::RunState::Reforming,
            Phase::Finished => proto::RunState::Finished,
            Phase::Failed => proto::RunState::Failed,
            Phase::Stopped => proto::RunState::Stopped,
        };
        let total_steps = self.spec.train.total_steps;
        let (last_loss, lr) = match self.last_loss_lr {
            Some((loss, lr)) => (Some(loss), lr),
            None => (None, 0.0),
        };
        let eta_secs = match self.phase {
            Phase::Finished => Some(0.0),
            Phase::Running => self
                .progress
                .as_ref()
                .and_then(Progress::secs_per_step)
                .map(|per_step| per_step * total_steps.saturating_sub(self.step) as f64),
            _ => None,
        };
        // Between generations nobody trains; after the end, the last generation's size.
        let world_size = match self.phase {
            Phase::Waiting | Phase::Reforming => 0,
            _ => self.members.len(),
        };
        proto::RunStatus {
            run_name: self.spec.run.name.clone(),
            state: state as i32,
            generation: self.generation,
            step: self.step,
            total_steps,
            last_loss,
            val_loss: self.val_loss.map(|(_, loss)| loss),
            eval_metrics: self
                .eval_metrics
                .as_ref()
                .map(|(_, m)| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
                .unwrap_or_default(),
            eval_metrics_step: self.eval_metrics.as_ref().map(|(step, _)| *step),
            tokens_per_sec: self.progress.as_ref().map_or(0.0, Progress::tokens_per_sec),
            eta_secs,
            world_size: u32::try_from(world_size).unwrap_or(u32::MAX),
            // Members (also lost ones, until the next generation) and connected workers waiting to join.
            workers: self
                .workers
                .iter()
                .filter(|w| w.connected || w.rank.is_some())
                .map(|w| w.status(now))
                .collect(),
            last_checkpoint: self
                .checkpoints
                .last()
                .map(|(_, path)| path.clone())
                .unwrap_or_default(),
            error: self.error.clone(),
            elapsed_secs: self
                .ended
                .unwrap_or(now)
                .saturating_duration_since(self.started)
                .as_secs_f64(),
            lr,
            restarts: self.restarts,
            lost: self.lost.clone(),
            skipped_steps: self.skipped_steps,
        }
    }
}
