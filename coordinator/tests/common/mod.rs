//! Shared by the run machine's test files: a machine on a synthetic clock, worker messages, and readers of actions.
// Each test crate includes this module and uses a different part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use lockstep_common::proto::{self, CoordinatorMessage, coordinator_message::Msg as Down, worker_message::Msg as Up};
use lockstep_common::{PROTOCOL_VERSION, RunSpec};
use lockstep_coordinator::record::{Record, Saved};
use lockstep_coordinator::{Action, ConnId, Event, Phase, RunMachine, RunOutcome};

/// A run of exactly `workers` workers.
pub fn spec(workers: u32, total_steps: u64) -> RunSpec {
    elastic_spec(workers, workers, total_steps)
}

/// A run that forms with `min` workers and admits up to `max`.
pub fn elastic_spec(min: u32, max: u32, total_steps: u64) -> RunSpec {
    let mut spec = RunSpec::default();
    spec.run.name = "test-run".into();
    spec.cluster.min_workers = min;
    spec.cluster.max_workers = max;
    spec.cluster.heartbeat_interval_secs = 2;
    spec.train.total_steps = total_steps;
    spec.train.warmup_steps = 0;
    spec.validate().expect("the test spec is valid");
    spec
}

pub fn join(id: &str) -> proto::Join {
    proto::Join {
        protocol_version: PROTOCOL_VERSION,
        worker_id: id.into(),
        host: format!("host-{id}"),
        device: "cpu".into(),
        ring_addr: format!("{id}.local:9000"),
        spec_json: String::new(),
        nccl_unique_id: Vec::new(),
        ..Default::default()
    }
}

pub fn cuda_join(id: &str, nccl_id: u8) -> proto::Join {
    proto::Join {
        device: "cuda:0".into(),
        nccl_unique_id: vec![nccl_id; 128],
        ..join(id)
    }
}

/// A step report of generation 0.
pub fn step(rank: u32, step: u64, checksum: &str) -> Up {
    step_of(0, rank, step, checksum)
}

pub fn step_of(generation: u64, rank: u32, step: u64, checksum: &str) -> Up {
    Up::Step(proto::StepReport {
        generation,
        rank,
        step,
        loss: 4.0 / step as f64,
        tokens: 640,
        lr: 0.001,
        step_ms: 100.0,
        param_checksum: checksum.into(),
        ..Default::default()
    })
}

/// A step whose loss was not finite, so every rank skipped its update.
pub fn skipped_step(generation: u64, rank: u32, step: u64) -> Up {
    Up::Step(proto::StepReport {
        generation,
        rank,
        step,
        loss: f64::NAN,
        tokens: 640,
        lr: 0.001,
        grad_norm: f64::INFINITY,
        step_ms: 100.0,
        skipped: true,
        ..Default::default()
    })
}

/// Finished of generation 0.
pub fn finished(rank: u32, step: u64) -> Up {
    finished_of(0, rank, step)
}

pub fn finished_of(generation: u64, rank: u32, step: u64) -> Up {
    Up::Finished(proto::Finished { generation, rank, step })
}

pub fn ck_path(step: u64) -> String {
    format!("/ck/step-{step:08}")
}

/// Rank `rank` committed the checkpoint of `step` at [`ck_path`].
pub fn checkpoint(generation: u64, rank: u32, step: u64) -> Up {
    Up::Checkpoint(proto::CheckpointReport {
        generation,
        rank,
        step,
        path: ck_path(step),
    })
}

pub fn idle(generation: u64) -> Up {
    Up::Idle(proto::Idle {
        generation,
        nccl_unique_id: Vec::new(),
    })
}

pub fn paused(generation: u64, rank: u32, step: u64, leaving: bool) -> Up {
    Up::Paused(proto::Paused {
        generation,
        rank,
        step,
        leaving,
        nccl_unique_id: Vec::new(),
    })
}

pub fn worker_error(kind: proto::FailureKind, generation: u64, message: &str, checkpoint: &str) -> Up {
    Up::Error(proto::WorkerError {
        message: message.into(),
        generation,
        kind: kind as i32,
        checkpoint: checkpoint.into(),
    })
}

pub fn heartbeat() -> Up {
    Up::Heartbeat(proto::Heartbeat { step: 0 })
}

/// A machine with a synthetic clock.
pub struct Harness {
    pub machine: RunMachine,
    pub t0: Instant,
    pub now: Instant,
}

impl Harness {
    pub fn new(spec: RunSpec) -> Self {
        let t0 = Instant::now();
        Self {
            machine: RunMachine::new(spec, t0),
            t0,
            now: t0,
        }
    }

    /// A coordinator started again on `saved`; also returns the records it asks to append first.
    pub fn restored(spec: RunSpec, saved: Saved) -> (Self, Vec<Record>) {
        let t0 = Instant::now();
        let (machine, records) = RunMachine::restore(spec, saved, "state", t0).expect("the saved state fits the spec");
        (Self { machine, t0, now: t0 }, records)
    }

    pub fn advance(&mut self, secs: f64) {
        self.now += Duration::from_secs_f64(secs);
    }

    pub fn event(&mut self, event: Event) -> Vec<Action> {
        self.machine.handle(event, self.now)
    }

    pub fn join(&mut self, conn: u64, join: proto::Join) -> Vec<Action> {
        self.event(Event::Joined {
            conn: ConnId(conn),
            join,
        })
    }

    pub fn msg(&mut self, conn: u64, msg: Up) -> Vec<Action> {
        self.event(Event::Message {
            conn: ConnId(conn),
            msg,
        })
    }

    pub fn disconnect(&mut self, conn: u64, reason: &str) -> Vec<Action> {
        self.event(Event::Disconnected {
            conn: ConnId(conn),
            reason: reason.into(),
        })
    }

    pub fn tick(&mut self) -> Vec<Action> {
        self.event(Event::Tick)
    }

    pub fn stop(&mut self, reason: &str) -> Vec<Action> {
        self.event(Event::StopRequested { reason: reason.into() })
    }

    pub fn status(&self) -> proto::RunStatus {
        self.machine.status(self.now)
    }

    /// Every `(conn, rank)` reports each step of `steps` in generation `generation`, rank by rank.
    pub fn steps(&mut self, generation: u64, members: &[(u64, u32)], steps: std::ops::RangeInclusive<u64>) {
        for s in steps {
            for &(conn, rank) in members {
                let actions = self.msg(conn, step_of(generation, rank, s, ""));
                assert!(
                    actions.iter().all(|a| matches!(a, Action::Persist(_))),
                    "step {s} of rank {rank}: {actions:?}"
                );
            }
        }
    }

    /// Two workers joined and assigned generation 0; conn 1 is rank 0, conn 2 rank 1.
    pub fn formed(total_steps: u64) -> Self {
        let mut h = Self::new(spec(2, total_steps));
        h.join(1, join("w0"));
        h.join(2, join("w1"));
        assert_eq!(h.machine.phase(), Phase::Running);
        h
    }
}

/// The messages sent to `conn`, in order.
pub fn sent_to(actions: &[Action], conn: u64) -> Vec<Down> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                conn: c,
                msg: CoordinatorMessage { msg: Some(m) },
            } if c.0 == conn => Some(m.clone()),
            _ => None,
        })
        .collect()
}

pub fn outcome(actions: &[Action]) -> Option<RunOutcome> {
    actions.iter().find_map(|a| match a {
        Action::RunEnded { outcome } => Some(outcome.clone()),
        _ => None,
    })
}

/// The records to persist, in order.
pub fn persisted(actions: &[Action]) -> Vec<Record> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Persist(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// Every assignment in `actions` with the session it went to, in order.
pub fn all_assignments(actions: &[Action]) -> Vec<(u64, proto::Assignment)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                conn,
                msg: CoordinatorMessage {
                    msg: Some(Down::Assignment(x)),
                },
            } => Some((conn.0, x.clone())),
            _ => None,
        })
        .collect()
}

/// The assignment of each of `conns`, which must each have exactly one.
pub fn assignments(actions: &[Action], conns: &[u64]) -> Vec<proto::Assignment> {
    conns
        .iter()
        .map(|&conn| {
            let mut found: Vec<proto::Assignment> = sent_to(actions, conn)
                .into_iter()
                .filter_map(|m| if let Down::Assignment(a) = m { Some(a) } else { None })
                .collect();
            assert_eq!(found.len(), 1, "assignments for conn {conn}: {actions:?}");
            found.remove(0)
        })
        .collect()
}

pub fn rejection(actions: &[Action], conn: u64) -> String {
    match sent_to(actions, conn).as_slice() {
        [Down::Reject(r)] => {
            assert!(
                actions.contains(&Action::Close { conn: ConnId(conn) }),
                "a reject must close: {actions:?}"
            );
            r.reason.clone()
        }
        other => panic!("expected one Reject to conn {conn}, got {other:?}"),
    }
}

/// The one `Stop` sent to `conn`: (reason, failed).
pub fn the_stop(actions: &[Action], conn: u64) -> (String, bool) {
    match sent_to(actions, conn).as_slice() {
        [Down::Stop(s)] => (s.reason.clone(), s.failed),
        other => panic!("expected one Stop to conn {conn}, got {other:?}"),
    }
}

/// The one `Abort` sent to `conn`: (generation, reason).
pub fn the_abort(actions: &[Action], conn: u64) -> (u64, String) {
    match sent_to(actions, conn).as_slice() {
        [Down::Abort(a)] => (a.generation, a.reason.clone()),
        other => panic!("expected one Abort to conn {conn}, got {other:?}"),
    }
}

/// The run's durable state as a new coordinator would load it.
pub fn fold(records: impl IntoIterator<Item = Record>) -> Saved {
    let mut saved = Saved::default();
    for r in records {
        saved.apply(r);
    }
    saved
}

/// The `Run` record of `spec`: the first record of its state.
pub fn run_record(spec: &RunSpec) -> Record {
    Record::Run {
        name: spec.run.name.clone(),
        spec_hash: spec.training_hash(),
        spec_json: spec.to_json(),
    }
}

/// The ranks and ids of the status' workers that have a rank, by rank.
pub fn ranked(status: &proto::RunStatus) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = status
        .workers
        .iter()
        .filter(|w| w.rank >= 0)
        .map(|w| (w.rank, w.worker_id.clone()))
        .collect();
    out.sort();
    out
}

/// `actions` less the `CheckpointCommitted` confirmations, for tests about what else a checkpoint report causes.
pub fn without_confirmations(actions: &[Action]) -> Vec<Action> {
    actions
        .iter()
        .filter(|a| {
            !matches!(
                a,
                Action::Send {
                    msg: CoordinatorMessage {
                        msg: Some(Down::Committed(_))
                    },
                    ..
                }
            )
        })
        .cloned()
        .collect()
}
