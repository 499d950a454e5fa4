//! The run state machine driven by scripted and randomized event sequences: no sockets, no sleeps, synthetic time.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lockstep_common::proto::{self, CoordinatorMessage, coordinator_message::Msg as Down, worker_message::Msg as Up};
use lockstep_common::{PROTOCOL_VERSION, RunSpec};
use lockstep_coordinator::{Action, ConnId, Event, Phase, RunMachine, RunOutcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn spec(workers: u32, total_steps: u64) -> RunSpec {
    let mut spec = RunSpec::default();
    spec.run.name = "test-run".into();
    spec.cluster.min_workers = workers;
    spec.cluster.max_workers = workers;
    spec.cluster.heartbeat_interval_secs = 2;
    spec.train.total_steps = total_steps;
    spec.train.warmup_steps = 0;
    spec.validate().unwrap();
    spec
}

fn join(id: &str) -> proto::Join {
    proto::Join {
        protocol_version: PROTOCOL_VERSION,
        worker_id: id.into(),
        host: format!("host-{id}"),
        device: "cpu".into(),
        ring_addr: format!("{id}.local:9000"),
        spec_json: String::new(),
        nccl_unique_id: Vec::new(),
    }
}

fn step(rank: u32, step: u64, checksum: &str) -> Up {
    Up::Step(proto::StepReport {
        generation: 0,
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

fn finished(rank: u32, step: u64) -> Up {
    Up::Finished(proto::Finished {
        generation: 0,
        rank,
        step,
    })
}

/// A machine with a synthetic clock.
struct Harness {
    machine: RunMachine,
    t0: Instant,
    now: Instant,
}

impl Harness {
    fn new(spec: RunSpec) -> Self {
        let t0 = Instant::now();
        Self {
            machine: RunMachine::new(spec, t0),
            t0,
            now: t0,
        }
    }

    fn advance(&mut self, secs: f64) {
        self.now += Duration::from_secs_f64(secs);
    }

    fn event(&mut self, event: Event) -> Vec<Action> {
        self.machine.handle(event, self.now)
    }

    fn join(&mut self, conn: u64, join: proto::Join) -> Vec<Action> {
        self.event(Event::Joined {
            conn: ConnId(conn),
            join,
        })
    }

    fn msg(&mut self, conn: u64, msg: Up) -> Vec<Action> {
        self.event(Event::Message {
            conn: ConnId(conn),
            msg,
        })
    }

    fn status(&self) -> proto::RunStatus {
        self.machine.status(self.now)
    }

    /// Two workers joined and assigned; conn 1 is rank 0, conn 2 rank 1.
    fn formed(total_steps: u64) -> Self {
        let mut h = Self::new(spec(2, total_steps));
        h.join(1, join("w0"));
        h.join(2, join("w1"));
        assert_eq!(h.machine.phase(), Phase::Running);
        h
    }
}

/// The messages sent to `conn`, in order.
fn sent_to(actions: &[Action], conn: u64) -> Vec<Down> {
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

fn outcome(actions: &[Action]) -> Option<RunOutcome> {
    actions.iter().find_map(|a| match a {
        Action::RunEnded { outcome } => Some(outcome.clone()),
        _ => None,
    })
}

fn rejection(actions: &[Action], conn: u64) -> String {
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

#[test]
fn two_workers_join_and_get_dense_ranks_and_peers() {
    let mut h = Harness::new(spec(2, 10));
    let first = h.join(1, join("w0"));
    match sent_to(&first, 1).as_slice() {
        [Down::Welcome(w)] => {
            assert_eq!((w.run_name.as_str(), w.min_workers, w.waiting), ("test-run", 2, 1));
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    assert_eq!(h.status().state, proto::RunState::Waiting as i32);
    assert_eq!(h.status().workers[0].rank, -1);

    let second = h.join(2, join("w1"));
    assert_eq!(h.machine.phase(), Phase::Running);
    let expected = RunSpec::from_json(&h.machine.spec().to_json()).unwrap();
    for (conn, rank) in [(1, 0), (2, 1)] {
        let msgs = sent_to(&second, conn);
        let assignment = msgs
            .iter()
            .find_map(|m| if let Down::Assignment(a) = m { Some(a) } else { None })
            .unwrap_or_else(|| panic!("no assignment for conn {conn}: {second:?}"));
        assert_eq!(assignment.rank, rank);
        assert_eq!(assignment.world_size, 2);
        assert_eq!(assignment.generation, 0);
        assert_eq!(
            assignment.peers,
            vec!["w0.local:9000".to_string(), "w1.local:9000".to_string()]
        );
        assert_eq!(
            (assignment.start_step, assignment.end_step, assignment.data_cursor),
            (0, 10, 0)
        );
        assert_eq!(assignment.resume_from, "");
        assert_eq!(RunSpec::from_json(&assignment.spec_json).unwrap(), expected);
        assert_eq!(assignment.spec_hash, expected.training_hash());
        assert_eq!(assignment.run_name, "test-run");
    }
    // The second worker hears Welcome before its Assignment.
    assert!(matches!(sent_to(&second, 2).as_slice(), [Down::Welcome(w), Down::Assignment(_)] if w.waiting == 2));
    let status = h.status();
    assert_eq!(status.state, proto::RunState::Running as i32);
    assert_eq!(status.world_size, 2);
    let ranks: Vec<i32> = status.workers.iter().map(|w| w.rank).collect();
    assert_eq!(ranks, vec![0, 1]);
}

fn assignments(actions: &[Action], conns: &[u64]) -> Vec<proto::Assignment> {
    conns
        .iter()
        .map(|&conn| {
            sent_to(actions, conn)
                .into_iter()
                .find_map(|m| if let Down::Assignment(a) = m { Some(a) } else { None })
                .unwrap_or_else(|| panic!("no assignment for conn {conn}"))
        })
        .collect()
}

fn cuda_join(id: &str, nccl_id: u8) -> proto::Join {
    proto::Join {
        device: "cuda:0".into(),
        nccl_unique_id: vec![nccl_id; 128],
        ..join(id)
    }
}

#[test]
fn rank_zeros_nccl_id_is_relayed_to_every_rank_when_all_are_cuda() {
    let mut h = Harness::new(spec(3, 10));
    h.join(1, cuda_join("w0", 7));
    h.join(2, cuda_join("w1", 8));
    let actions = h.join(3, cuda_join("w2", 9));
    for a in assignments(&actions, &[1, 2, 3]) {
        assert_eq!(a.nccl_unique_id, vec![7u8; 128], "rank {}", a.rank);
    }
}

#[test]
fn one_cpu_worker_puts_the_generation_on_the_ring() {
    let mut h = Harness::new(spec(2, 10));
    h.join(1, cuda_join("w0", 7));
    let actions = h.join(2, join("w1"));
    for a in assignments(&actions, &[1, 2]) {
        assert!(a.nccl_unique_id.is_empty(), "rank {} got an NCCL id", a.rank);
        assert_eq!(a.peers.len(), 2);
    }
}

#[test]
fn steps_progress_and_finish_stops_everyone() {
    let mut h = Harness::formed(3);
    h.advance(1.0);
    h.msg(1, step(0, 1, "aaaa"));
    // Only rank 0 reported: the run is not at step 1 yet.
    assert_eq!(h.status().step, 0);
    assert_eq!(h.status().last_loss, None);
    h.msg(2, step(1, 1, "aaaa"));
    let status = h.status();
    assert_eq!(status.step, 1);
    assert_eq!(status.last_loss, Some(4.0));
    assert_eq!(status.lr, 0.001);
    // 1280 tokens over the 1 s since the generation formed.
    assert_eq!(status.tokens_per_sec, 1280.0);
    assert_eq!(status.eta_secs, Some(2.0));
    assert_eq!(status.workers[0].last_step, 1);
    assert_eq!(status.workers[0].tokens_per_sec, 6400.0);
    assert_eq!(status.workers[1].param_checksum, "aaaa");

    for s in 2..=3 {
        h.advance(0.5);
        h.msg(1, step(0, s, ""));
        h.msg(2, step(1, s, ""));
    }
    h.msg(
        1,
        Up::Eval(proto::EvalReport {
            generation: 0,
            rank: 0,
            step: 3,
            val_loss: 1.5,
        }),
    );
    h.msg(
        1,
        Up::Checkpoint(proto::CheckpointReport {
            generation: 0,
            rank: 0,
            step: 3,
            path: "/ck/step-00000003".into(),
        }),
    );
    let status = h.status();
    assert_eq!((status.step, status.val_loss), (3, Some(1.5)));
    assert_eq!(status.last_checkpoint, "/ck/step-00000003");
    assert_eq!(status.eta_secs, Some(0.0));

    assert!(h.msg(1, finished(0, 3)).is_empty());
    assert_eq!(h.machine.phase(), Phase::Running);
    let actions = h.msg(2, finished(1, 3));
    for conn in [1, 2] {
        assert!(matches!(sent_to(&actions, conn).as_slice(), [Down::Stop(s)] if s.reason == "run finished"));
    }
    assert_eq!(outcome(&actions), Some(RunOutcome::Finished));
    assert_eq!(h.status().state, proto::RunState::Finished as i32);
    // Leaving after Finished is fine, and nothing is sent to anyone.
    let after = h.event(Event::Disconnected {
        conn: ConnId(1),
        reason: "stream closed".into(),
    });
    assert!(after.is_empty(), "{after:?}");
    assert_eq!(h.machine.phase(), Phase::Finished);
}

#[test]
fn conflicting_spec_is_rejected_naming_every_field() {
    let mut h = Harness::new(spec(2, 10));
    let mut theirs = h.machine.spec().clone();
    theirs.train.global_batch = 64;
    theirs.model.n_layer = 3;
    theirs.cluster.listen = "10.0.0.1:1".into(); // not training math: must not count
    let actions = h.join(
        1,
        proto::Join {
            spec_json: theirs.to_json(),
            ..join("w2")
        },
    );
    let reason = rejection(&actions, 1);
    assert!(reason.contains("worker w2 (host-w2)"), "{reason}");
    assert!(reason.contains("train.global_batch: 64 vs 32"), "{reason}");
    assert!(reason.contains("model.n_layer: 3 vs 2"), "{reason}");
    assert!(!reason.contains("cluster"), "{reason}");
    assert!(h.status().workers.is_empty());

    // The same spec, or one differing only in cluster settings, is welcome.
    let actions = h.join(
        2,
        proto::Join {
            spec_json: h.machine.spec().to_json(),
            ..join("w3")
        },
    );
    assert!(matches!(sent_to(&actions, 2).as_slice(), [Down::Welcome(_)]));
}

#[test]
fn unreadable_spec_is_rejected() {
    let mut h = Harness::new(spec(2, 10));
    let reason = rejection(
        &h.join(
            1,
            proto::Join {
                spec_json: "{not json".into(),
                ..join("w0")
            },
        ),
        1,
    );
    assert!(
        reason.contains("worker w0") && reason.contains("cannot be read"),
        "{reason}"
    );
}

#[test]
fn protocol_mismatch_is_rejected() {
    let mut h = Harness::new(spec(2, 10));
    let actions = h.join(
        1,
        proto::Join {
            protocol_version: PROTOCOL_VERSION + 1,
            ..join("w0")
        },
    );
    let reason = rejection(&actions, 1);
    assert!(reason.contains("worker w0"), "{reason}");
    assert!(
        reason.contains(&format!("protocol version {}", PROTOCOL_VERSION + 1)),
        "{reason}"
    );
    assert_eq!(h.machine.phase(), Phase::Waiting);
}

#[test]
fn duplicate_worker_id_is_rejected_while_connected() {
    let mut h = Harness::new(spec(3, 10));
    h.join(1, join("w0"));
    let reason = rejection(&h.join(2, join("w0")), 2);
    assert!(reason.contains("w0") && reason.contains("unique"), "{reason}");
    // Once the first one has gone, the id is free again.
    h.event(Event::Disconnected {
        conn: ConnId(1),
        reason: "stream closed".into(),
    });
    assert!(h.status().workers.is_empty());
    assert!(matches!(sent_to(&h.join(3, join("w0")), 3).as_slice(), [Down::Welcome(w)] if w.waiting == 1));
}

#[test]
fn join_after_formation_is_rejected() {
    let mut h = Harness::formed(10);
    let reason = rejection(&h.join(3, join("w9")), 3);
    assert!(
        reason
            .contains("run already formed generation 0 with 2 workers; admitting workers mid-run is not supported yet"),
        "{reason}"
    );
    assert_eq!(h.status().workers.len(), 2);
}

#[test]
fn lost_worker_aborts_the_survivor_and_fails_the_run() {
    let mut h = Harness::formed(100);
    for s in 1..=12 {
        h.msg(1, step(0, s, ""));
        h.msg(2, step(1, s, ""));
    }
    let actions = h.event(Event::Disconnected {
        conn: ConnId(2),
        reason: "stream closed".into(),
    });
    let expected =
        "worker w1 (rank 1, host host-w1) lost at step 12: stream closed; restarting without it is not supported yet";
    match sent_to(&actions, 1).as_slice() {
        [Down::Abort(a)] => {
            assert_eq!(a.generation, 0);
            assert_eq!(a.reason, expected);
        }
        other => panic!("expected Abort to the survivor, got {other:?}"),
    }
    assert!(sent_to(&actions, 2).is_empty());
    assert_eq!(outcome(&actions), Some(RunOutcome::Failed(expected.into())));
    let status = h.status();
    assert_eq!(status.state, proto::RunState::Failed as i32);
    assert_eq!(status.error, expected);
    assert_eq!(status.workers[1].state, proto::WorkerState::Lost as i32);
    assert_eq!(status.eta_secs, None);
    // The survivor leaving afterwards changes nothing; a late joiner hears why.
    assert!(
        h.event(Event::Disconnected {
            conn: ConnId(1),
            reason: "stream closed".into()
        })
        .is_empty()
    );
    let reason = rejection(&h.join(3, join("w3")), 3);
    assert!(reason.contains("already failed") && reason.contains("w1"), "{reason}");
}

#[test]
fn worker_error_fails_the_run_with_its_message() {
    let mut h = Harness::formed(10);
    let actions = h.msg(
        1,
        Up::Error(proto::WorkerError {
            message: "out of memory on cpu".into(),
            ..Default::default()
        }),
    );
    let Some(RunOutcome::Failed(message)) = outcome(&actions) else {
        panic!("{actions:?}")
    };
    assert!(
        message.starts_with("worker w0 (rank 0, host host-w0) failed at step 0"),
        "{message}"
    );
    assert!(message.contains("out of memory on cpu"), "{message}");
    assert!(matches!(sent_to(&actions, 2).as_slice(), [Down::Abort(_)]));
    // The reporter is answered too: it waits for that before exiting, so its report is not lost with its stream.
    assert!(matches!(sent_to(&actions, 1).as_slice(), [Down::Abort(_)]));
}

#[test]
fn waiting_worker_that_leaves_is_forgotten() {
    let mut h = Harness::new(spec(2, 10));
    h.join(1, join("w0"));
    let actions = h.event(Event::Disconnected {
        conn: ConnId(1),
        reason: "stream closed".into(),
    });
    assert!(actions.is_empty());
    assert_eq!(h.machine.phase(), Phase::Waiting);
    h.join(2, join("w1"));
    assert_eq!(h.machine.phase(), Phase::Waiting);
    let actions = h.join(3, join("w2"));
    let assigned: Vec<u32> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                msg: CoordinatorMessage {
                    msg: Some(Down::Assignment(x)),
                },
                ..
            } => Some(x.rank),
            _ => None,
        })
        .collect();
    assert_eq!(assigned, vec![0, 1]);
    assert!(sent_to(&actions, 1).is_empty());
}

#[test]
fn heartbeat_timeout_is_detected_on_tick() {
    let mut h = Harness::formed(100);
    // The limit is 5 × 2 s. Rank 0 keeps talking, rank 1 goes silent after its first step.
    h.advance(1.0);
    h.msg(1, step(0, 1, ""));
    h.msg(2, step(1, 1, ""));
    for _ in 0..5 {
        h.advance(2.0);
        h.msg(1, Up::Heartbeat(proto::Heartbeat { step: 1 }));
        assert!(h.event(Event::Tick).is_empty(), "too early");
    }
    h.advance(0.5);
    let actions = h.event(Event::Tick);
    let Some(RunOutcome::Failed(message)) = outcome(&actions) else {
        panic!("{actions:?}")
    };
    assert!(
        message.starts_with("worker w1 (rank 1, host host-w1) lost at step 1: no message for 10.5 s"),
        "{message}"
    );
    assert!(matches!(sent_to(&actions, 1).as_slice(), [Down::Abort(a)] if a.reason == message));
    assert!(actions.contains(&Action::Close { conn: ConnId(2) }));
    // The closed session's own disconnect is not news.
    assert!(
        h.event(Event::Disconnected {
            conn: ConnId(2),
            reason: "closed by the coordinator".into()
        })
        .is_empty()
    );
    assert_eq!(h.status().elapsed_secs, (h.now - h.t0).as_secs_f64());
}

#[test]
fn long_wait_before_formation_does_not_count_as_silence() {
    let mut h = Harness::new(spec(2, 10));
    h.join(1, join("w0"));
    h.advance(3600.0);
    h.join(2, join("w1"));
    h.advance(1.0);
    assert!(h.event(Event::Tick).is_empty());
    assert_eq!(h.machine.phase(), Phase::Running);
}

#[test]
fn finished_workers_may_go_quiet() {
    let mut h = Harness::formed(1);
    h.msg(1, step(0, 1, ""));
    h.msg(2, step(1, 1, ""));
    h.msg(1, finished(0, 1));
    h.advance(60.0);
    h.msg(2, Up::Heartbeat(proto::Heartbeat { step: 1 }));
    assert!(h.event(Event::Tick).is_empty());
    assert_eq!(outcome(&h.msg(2, finished(1, 1))), Some(RunOutcome::Finished));
}

#[test]
fn diverging_checksums_fail_the_run() {
    let mut h = Harness::formed(100);
    for s in 1..12 {
        h.msg(1, step(0, s, "same"));
        h.msg(2, step(1, s, "same"));
    }
    h.msg(1, step(0, 12, "a1b2c3d4e5f60718"));
    let actions = h.msg(2, step(1, 12, "c3d4e5f607182930"));
    let expected = "ranks diverged at step 12: rank 0 a1b2c3d4e5f60718 vs rank 1 c3d4e5f607182930";
    assert_eq!(outcome(&actions), Some(RunOutcome::Failed(expected.into())));
    for conn in [1, 2] {
        assert!(matches!(sent_to(&actions, conn).as_slice(), [Down::Abort(a)] if a.reason == expected));
    }
    assert_eq!(h.status().error, expected);
}

#[test]
fn reports_from_unknown_sessions_and_other_generations_are_ignored() {
    let mut h = Harness::formed(10);
    assert!(h.msg(99, step(0, 1, "x")).is_empty());
    let stale = Up::Step(proto::StepReport {
        generation: 7,
        rank: 0,
        step: 1,
        param_checksum: "zz".into(),
        ..Default::default()
    });
    assert!(h.msg(1, stale).is_empty());
    assert_eq!(h.status().workers[0].last_step, 0);
}

// ---------------------------------------------------------------- randomized

/// What the test believes about each connection, independent of the machine.
#[derive(Default)]
struct World {
    open: BTreeSet<u64>,
    rank_of: BTreeMap<u64, u32>,
    next_step: BTreeMap<u64, u64>,
    next_conn: u64,
}

fn phase_rank(state: i32) -> i32 {
    // FINISHED and FAILED are both final; neither may follow the other.
    match proto::RunState::try_from(state).unwrap() {
        proto::RunState::Unspecified => panic!("unspecified state"),
        proto::RunState::Waiting => 0,
        proto::RunState::Running => 1,
        proto::RunState::Finished => 2,
        proto::RunState::Failed => 3,
        proto::RunState::Reforming | proto::RunState::Stopped => panic!("not yet reachable"),
    }
}

fn random_event(rng: &mut StdRng, world: &mut World, total_steps: u64) -> Event {
    let open: Vec<u64> = world.open.iter().copied().collect();
    let pick = |rng: &mut StdRng| open[rng.random_range(0..open.len())];
    match rng.random_range(0..100) {
        0..=19 => {
            world.next_conn += 1;
            let conn = world.next_conn;
            world.open.insert(conn);
            // Mostly good joins; sometimes a reused id, a wrong protocol or a conflicting spec.
            let mut j = join(&format!("w{}", rng.random_range(0..6)));
            match rng.random_range(0..10) {
                0 => j.protocol_version += 1,
                1 => {
                    let mut s = spec(2, total_steps);
                    s.train.lr = 0.5;
                    j.spec_json = s.to_json();
                }
                _ => {}
            }
            Event::Joined {
                conn: ConnId(conn),
                join: j,
            }
        }
        _ if open.is_empty() => Event::Tick,
        20..=27 => {
            let conn = pick(rng);
            world.open.remove(&conn);
            Event::Disconnected {
                conn: ConnId(conn),
                reason: "stream closed".into(),
            }
        }
        28..=35 => Event::Tick,
        36..=40 => Event::Message {
            conn: ConnId(pick(rng)),
            msg: Up::Heartbeat(proto::Heartbeat { step: 0 }),
        },
        41..=43 => Event::Message {
            conn: ConnId(pick(rng)),
            msg: Up::Error(proto::WorkerError {
                message: "random failure".into(),
                ..Default::default()
            }),
        },
        _ => {
            let conn = pick(rng);
            let rank = world.rank_of.get(&conn).copied().unwrap_or(0);
            let next = world.next_step.entry(conn).or_insert(1);
            if *next > total_steps {
                Event::Message {
                    conn: ConnId(conn),
                    msg: finished(rank, total_steps),
                }
            } else {
                let s = *next;
                *next += 1;
                // Occasionally a rank's checksum disagrees.
                let checksum = if rng.random_range(0..200) == 0 {
                    format!("bad{rank}")
                } else {
                    format!("ok{s}")
                };
                Event::Message {
                    conn: ConnId(conn),
                    msg: step(rank, s, &checksum),
                }
            }
        }
    }
}

#[test]
fn random_event_orders_keep_the_invariants() {
    let mut finished_runs = 0;
    let mut failed_runs = 0;
    for seed in 0..200u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let workers = rng.random_range(1..=4);
        let total_steps = rng.random_range(1..=6);
        let mut h = Harness::new(spec(workers, total_steps));
        let mut world = World::default();
        let mut last_phase = 0;
        let mut ended = 0;
        for i in 0..300 {
            let event = random_event(&mut rng, &mut world, total_steps);
            h.advance(rng.random_range(0.0..3.0));
            let described = format!("{event:?}");
            let actions = h.event(event);
            for action in &actions {
                match action {
                    Action::Send { conn, msg } => {
                        assert!(
                            world.open.contains(&conn.0),
                            "seed {seed} event {i}: send to unknown {conn}: {msg:?}"
                        );
                        if let Some(Down::Assignment(a)) = &msg.msg {
                            world.rank_of.insert(conn.0, a.rank);
                            assert_eq!(a.world_size, workers, "seed {seed}");
                        }
                    }
                    Action::Close { conn } => {
                        assert!(
                            world.open.remove(&conn.0),
                            "seed {seed} event {i}: close of unknown {conn}"
                        );
                    }
                    Action::RunEnded { .. } => ended += 1,
                }
            }
            let status = h.status();
            let phase = phase_rank(status.state);
            assert!(
                phase >= last_phase,
                "seed {seed} event {i} ({described}): state went back"
            );
            assert!(
                !(last_phase >= 2 && phase != last_phase),
                "seed {seed}: left a final state"
            );
            last_phase = phase;
            let mut ranks: Vec<i32> = status.workers.iter().map(|w| w.rank).filter(|&r| r >= 0).collect();
            ranks.sort_unstable();
            let expected: Vec<i32> = if phase == 0 {
                vec![]
            } else {
                (0..workers as i32).collect()
            };
            assert_eq!(ranks, expected, "seed {seed} event {i}: ranks not unique and dense");
            assert!(
                status.workers.len() <= workers as usize,
                "seed {seed}: more than max_workers"
            );
            let ids: BTreeSet<&str> = status.workers.iter().map(|w| w.worker_id.as_str()).collect();
            if phase == 0 {
                assert_eq!(
                    ids.len(),
                    status.workers.len(),
                    "seed {seed}: duplicate ids while waiting"
                );
            }
            assert!(ended <= 1, "seed {seed}: the run ended twice");
            assert_eq!(ended == 1, phase >= 2, "seed {seed}: RunEnded and the state disagree");
        }
        match last_phase {
            2 => finished_runs += 1,
            3 => failed_runs += 1,
            _ => {}
        }
    }
    // The generator must exercise both endings, or the test proves little.
    assert!(
        finished_runs > 0 && failed_runs > 0,
        "finished {finished_runs}, failed {failed_runs}"
    );
}
