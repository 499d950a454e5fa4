//! The run state machine driven by scripted and randomized event sequences: no sockets, no sleeps, synthetic time.
//! Forming, admission, progress and the end of a run here; losses, re-forming, pauses and restore in
//! `machine_resilience.rs`.
mod common;

use std::collections::BTreeMap;

use common::*;
use lockstep_common::proto::{self, coordinator_message::Msg as Down, worker_message::Msg as Up};
use lockstep_common::{PROTOCOL_VERSION, RunSpec};
use lockstep_coordinator::record::Record;
use lockstep_coordinator::{Action, ConnId, Event, Phase, RunOutcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
        let assignment = assignments(&second, &[conn]).remove(0);
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
    // The generation is recorded, so a restarted coordinator knows who trained what.
    match persisted(&second).as_slice() {
        [
            Record::Generation {
                generation: 0,
                start_step: 0,
                resume_from,
                members,
            },
        ] => {
            assert_eq!(resume_from, "");
            let named: Vec<(&str, &str, u32)> = members
                .iter()
                .map(|m| (m.worker_id.as_str(), m.host.as_str(), m.rank))
                .collect();
            assert_eq!(named, vec![("w0", "host-w0", 0), ("w1", "host-w1", 1)]);
        }
        other => panic!("expected one Generation record, got {other:?}"),
    }
    let status = h.status();
    assert_eq!(status.state, proto::RunState::Running as i32);
    assert_eq!(status.world_size, 2);
    let ranks: Vec<i32> = status.workers.iter().map(|w| w.rank).collect();
    assert_eq!(ranks, vec![0, 1]);
    assert_eq!((status.restarts, status.skipped_steps), (0, 0));
    assert!(status.lost.is_empty());
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
    assert!(persisted(&h.msg(1, step(0, 1, "aaaa"))).is_empty());
    // Only rank 0 reported: the run is not at step 1 yet.
    assert_eq!(h.status().step, 0);
    assert_eq!(h.status().last_loss, None);
    let actions = h.msg(2, step(1, 1, "aaaa"));
    assert!(
        matches!(persisted(&actions).as_slice(), [Record::Step(s)] if s.step == 1 && s.tokens == 1280 && !s.skipped),
        "{actions:?}"
    );
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
    let actions = h.msg(
        1,
        Up::Eval(proto::EvalReport {
            generation: 0,
            rank: 0,
            step: 3,
            val_loss: 1.5,
            metrics: [("bleu".to_string(), 42.0)].into(),
        }),
    );
    assert_eq!(
        persisted(&actions),
        vec![Record::Eval {
            step: 3,
            val_loss: 1.5,
            metrics: [("bleu".to_string(), 42.0)].into(),
        }]
    );
    let status = h.status();
    assert_eq!(
        (status.eval_metrics.get("bleu"), status.eval_metrics_step),
        (Some(&42.0), Some(3))
    );
    let actions = h.msg(1, checkpoint(0, 0, 3));
    // Nobody waits to be admitted: the checkpoint is recorded, confirmed to its writer, and nothing else happens.
    assert_eq!(
        actions,
        vec![
            Action::Persist(Record::Checkpoint {
                step: 3,
                path: ck_path(3)
            }),
            Action::Send {
                conn: ConnId(1),
                msg: proto::CoordinatorMessage {
                    msg: Some(Down::Committed(proto::CheckpointCommitted {
                        generation: 0,
                        step: 3,
                        path: ck_path(3)
                    }))
                }
            }
        ]
    );
    let status = h.status();
    assert_eq!((status.step, status.val_loss), (3, Some(1.5)));
    assert_eq!(status.last_checkpoint, ck_path(3));
    assert_eq!(status.eta_secs, Some(0.0));

    assert!(h.msg(1, finished(0, 3)).is_empty());
    assert_eq!(h.machine.phase(), Phase::Running);
    let actions = h.msg(2, finished(1, 3));
    for conn in [1, 2] {
        assert_eq!(the_stop(&actions, conn), ("run finished".to_string(), false));
    }
    assert_eq!(outcome(&actions), Some(RunOutcome::Finished));
    assert!(persisted(&actions).contains(&Record::Ended {
        outcome: "finished".into(),
        message: String::new()
    }));
    assert_eq!(h.status().state, proto::RunState::Finished as i32);
    assert_eq!(h.machine.outcome(), Some(RunOutcome::Finished));
    // Leaving after Finished is fine, and nothing is sent to anyone.
    let after = h.disconnect(1, "stream closed");
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
    // Another process (its own ring address) given the same --worker-id.
    let twin = proto::Join {
        ring_addr: "elsewhere.local:9000".into(),
        ..join("w0")
    };
    let reason = rejection(&h.join(2, twin), 2);
    assert!(reason.contains("w0") && reason.contains("unique"), "{reason}");
    // Once the first one has gone, the id is free again.
    h.disconnect(1, "stream closed");
    assert!(h.status().workers.is_empty());
    assert!(matches!(sent_to(&h.join(3, join("w0")), 3).as_slice(), [Down::Welcome(w)] if w.waiting == 1));
}

/// The worker saw its session break before the coordinator did and joins again (same id, same ring address): the
/// old session is ended as a lost one, not kept while the worker is refused as its own duplicate.
#[test]
fn a_worker_joining_again_before_its_old_session_is_seen_broken_replaces_it() {
    let mut h = Harness::formed(100);
    h.steps(0, &[(1, 0), (2, 1)], 1..=3);
    let actions = h.join(3, join("w1"));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Close { conn } if *conn == ConnId(2))),
        "{actions:?}"
    );
    assert!(
        matches!(sent_to(&actions, 3).first(), Some(Down::Welcome(_))),
        "{actions:?}"
    );
    assert_eq!(
        the_abort(&actions, 1).0,
        0,
        "the old session's member was lost: {actions:?}"
    );
    let formed = h.msg(1, idle(0));
    let assigned = assignments(&formed, &[1, 3]);
    assert_eq!(assigned.len(), 2, "{formed:?}");
    assert!(assigned.iter().all(|a| a.generation == 1));
}

#[test]
fn a_worker_joining_mid_run_waits_and_is_admitted_at_the_next_checkpoint() {
    let mut h = Harness::new(elastic_spec(2, 3, 100));
    h.join(1, join("w0"));
    h.join(2, join("w1"));
    h.steps(0, &[(1, 0), (2, 1)], 1..=3);

    let actions = h.join(3, join("w2"));
    // Welcomed, not rejected; it is the only free worker, and nobody else hears of it yet.
    assert!(
        matches!(sent_to(&actions, 3).as_slice(), [Down::Welcome(w)] if w.waiting == 1),
        "{actions:?}"
    );
    assert!(
        sent_to(&actions, 1).is_empty() && sent_to(&actions, 2).is_empty(),
        "{actions:?}"
    );
    let status = h.status();
    assert_eq!((status.state, status.world_size), (proto::RunState::Running as i32, 2));
    let w2 = status
        .workers
        .iter()
        .find(|w| w.worker_id == "w2")
        .expect("w2 is listed");
    assert_eq!((w2.rank, w2.state), (-1, proto::WorkerState::Joined as i32));

    // The generation goes on without it until the next committed checkpoint.
    h.steps(0, &[(1, 0), (2, 1)], 4..=4);
    let actions = h.msg(1, checkpoint(0, 0, 4));
    let records = persisted(&actions);
    assert_eq!(
        records.first(),
        Some(&Record::Checkpoint {
            step: 4,
            path: ck_path(4)
        })
    );
    assert!(
        !records
            .iter()
            .any(|r| matches!(r, Record::Restart { .. } | Record::Lost(_))),
        "an admission is not a restart: {records:?}"
    );
    for conn in [1, 2] {
        let (generation, reason) = the_abort(&without_confirmations(&actions), conn);
        assert_eq!(generation, 0);
        assert!(reason.contains("admitting 1 new worker(s): w2"), "{reason}");
    }
    assert!(sent_to(&actions, 3).is_empty());
    assert_eq!(h.machine.phase(), Phase::Reforming);
    assert_eq!(h.status().state, proto::RunState::Reforming as i32);

    // Not before every member stopped.
    assert!(all_assignments(&h.msg(1, idle(0))).is_empty());
    let actions = h.msg(2, idle(0));
    let batch = assignments(&actions, &[1, 2, 3]);
    let global_batch = h.machine.spec().train.global_batch as u64;
    for (rank, a) in (0u32..).zip(&batch) {
        assert_eq!(a.rank, rank);
        assert_eq!((a.generation, a.world_size), (1, 3));
        assert_eq!((a.start_step, a.data_cursor), (4, 4 * global_batch));
        assert_eq!(a.resume_from, ck_path(4));
        assert_eq!(a.peers, vec!["w0.local:9000", "w1.local:9000", "w2.local:9000"]);
    }
    let status = h.status();
    assert_eq!((status.generation, status.world_size, status.step), (1, 3, 4));
    assert_eq!(status.restarts, 0);
    assert_eq!(
        ranked(&status),
        vec![(0, "w0".into()), (1, "w1".into()), (2, "w2".into())]
    );

    // cluster.max_workers still holds.
    let reason = rejection(&h.join(4, join("w3")), 4);
    assert!(reason.contains("cluster.max_workers = 3"), "{reason}");
    assert_eq!(h.status().workers.len(), 3);
}

#[test]
fn the_final_checkpoint_admits_no_one() {
    let mut h = Harness::new(elastic_spec(1, 2, 2));
    h.join(1, join("w0"));
    h.steps(0, &[(1, 0)], 1..=2);
    h.join(2, join("w1"));
    let actions = without_confirmations(&h.msg(1, checkpoint(0, 0, 2)));
    assert!(
        sent_to(&actions, 1).is_empty(),
        "nothing left to train together: {actions:?}"
    );
    assert_eq!(h.machine.phase(), Phase::Running);
    let actions = h.msg(1, finished(0, 2));
    assert_eq!(outcome(&actions), Some(RunOutcome::Finished));
    assert_eq!(the_stop(&actions, 2), ("run finished".to_string(), false));
}

#[test]
fn waiting_worker_that_leaves_is_forgotten() {
    let mut h = Harness::new(spec(2, 10));
    h.join(1, join("w0"));
    let actions = h.disconnect(1, "stream closed");
    assert!(actions.is_empty());
    assert_eq!(h.machine.phase(), Phase::Waiting);
    h.join(2, join("w1"));
    assert_eq!(h.machine.phase(), Phase::Waiting);
    let actions = h.join(3, join("w2"));
    let assigned: Vec<(u64, u32)> = all_assignments(&actions).iter().map(|(c, a)| (*c, a.rank)).collect();
    assert_eq!(assigned, vec![(2, 0), (3, 1)]);
    assert!(sent_to(&actions, 1).is_empty());
}

#[test]
fn long_wait_before_formation_does_not_count_as_silence() {
    let mut h = Harness::new(spec(2, 10));
    h.join(1, join("w0"));
    h.advance(3600.0);
    h.join(2, join("w1"));
    h.advance(1.0);
    assert!(h.tick().is_empty());
    assert_eq!(h.machine.phase(), Phase::Running);
}

#[test]
fn a_finished_member_that_goes_quiet_is_not_lost() {
    let mut h = Harness::formed(1);
    h.msg(1, step(0, 1, ""));
    h.msg(2, step(1, 1, ""));
    h.msg(1, finished(0, 1));
    h.advance(60.0);
    h.msg(2, heartbeat());
    let actions = h.tick();
    // Its share is done: at most its session is ended; no loss, no abort, no restart.
    assert!(actions.iter().all(|a| matches!(a, Action::Close { .. })), "{actions:?}");
    let status = h.status();
    assert!(status.lost.is_empty());
    assert_eq!((status.state, status.restarts), (proto::RunState::Running as i32, 0));
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
        assert_eq!(the_stop(&actions, conn), (format!("run failed: {expected}"), true));
    }
    assert_eq!(
        persisted(&actions),
        vec![Record::Ended {
            outcome: "failed".into(),
            message: expected.into()
        }]
    );
    assert_eq!(h.status().error, expected);
    assert_eq!(h.status().eta_secs, None);
}

#[test]
fn a_state_that_cannot_be_written_fails_the_run() {
    let mut h = Harness::formed(10);
    let actions = h.event(Event::StoreFailed {
        message: "state/run.redb: No space left on device".into(),
    });
    let Some(RunOutcome::Failed(message)) = outcome(&actions) else {
        panic!("{actions:?}")
    };
    assert!(message.contains("No space left on device"), "{message}");
    for conn in [1, 2] {
        assert!(the_stop(&actions, conn).1);
    }
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

/// What the test believes about one session, from what it sent and was sent; independent of the machine.
#[derive(Default)]
struct Session {
    welcomed: bool,
    /// Its newest assignment: (generation, rank).
    assigned: Option<(u64, u32)>,
    next_step: u64,
    /// Free for an assignment: welcomed and not training (never assigned, or it said Idle or Paused since).
    ready: bool,
    /// Told to stop: it never trains again.
    stopped: bool,
}

#[derive(Default)]
struct World {
    open: BTreeMap<u64, Session>,
    next_conn: u64,
    /// Checkpoint paths reported so far; damage reports name one of them.
    checkpoints: Vec<String>,
}

fn random_event(rng: &mut StdRng, world: &mut World, spec: &RunSpec) -> Event {
    let total_steps = spec.train.total_steps;
    let open: Vec<u64> = world.open.keys().copied().collect();
    let assigned: Vec<u64> = world
        .open
        .iter()
        .filter(|(_, s)| s.assigned.is_some())
        .map(|(&c, _)| c)
        .collect();
    let roll = rng.random_range(0..1000);
    if roll < 140 {
        world.next_conn += 1;
        let conn = world.next_conn;
        world.open.insert(conn, Session::default());
        // Mostly good joins; sometimes a reused id, a wrong protocol or a conflicting spec.
        let mut j = join(&format!("w{}", rng.random_range(0..8)));
        match rng.random_range(0..12) {
            0 => j.protocol_version += 1,
            1 => {
                let mut theirs = spec.clone();
                theirs.train.lr = 0.5;
                j.spec_json = theirs.to_json();
            }
            _ => {}
        }
        return Event::Joined {
            conn: ConnId(conn),
            join: j,
        };
    }
    if open.is_empty() {
        return Event::Tick;
    }
    let any = open[rng.random_range(0..open.len())];
    // Reports come from sessions that were given an assignment (else a heartbeat stands in).
    let reporter = if assigned.is_empty() {
        None
    } else {
        Some(assigned[rng.random_range(0..assigned.len())])
    };
    let generation_of = |world: &World, conn: u64| world.open[&conn].assigned.map_or(0, |(g, _)| g);
    match (roll, reporter) {
        (140..=199, _) => {
            world.open.remove(&any);
            Event::Disconnected {
                conn: ConnId(any),
                reason: "stream closed".into(),
            }
        }
        (200..=279, _) => Event::Tick,
        (280..=349, _) => Event::Message {
            conn: ConnId(any),
            msg: heartbeat(),
        },
        (350..=384, _) => {
            let kind = match rng.random_range(0..3) {
                0 => proto::FailureKind::Own,
                1 => proto::FailureKind::Peer,
                _ => proto::FailureKind::Checkpoint,
            };
            let path = if world.checkpoints.is_empty() || rng.random_range(0..5) == 0 {
                "/ck/unknown".to_string()
            } else {
                world.checkpoints[rng.random_range(0..world.checkpoints.len())].clone()
            };
            Event::Message {
                conn: ConnId(any),
                msg: worker_error(kind, generation_of(world, any), "random failure", &path),
            }
        }
        (385..=459, _) => {
            // A worker answers an abort (or stops on its own) with the generation it trained.
            let session = world.open.get_mut(&any).expect("picked from open");
            if !session.stopped {
                session.ready = true;
            }
            Event::Message {
                conn: ConnId(any),
                msg: idle(generation_of(world, any)),
            }
        }
        (460..=469, _) => Event::StopRequested {
            reason: "random stop".into(),
        },
        (470..=471, _) => Event::StoreFailed {
            message: "random disk failure".into(),
        },
        (_, None) => Event::Message {
            conn: ConnId(any),
            msg: heartbeat(),
        },
        (472..=509, Some(conn)) => {
            let session = &world.open[&conn];
            let (generation, rank) = session.assigned.expect("a reporter has an assignment");
            let at = session.next_step.saturating_sub(1);
            if at == 0 {
                // Nothing trained yet: no worker writes a checkpoint of step 0.
                return Event::Message {
                    conn: ConnId(conn),
                    msg: heartbeat(),
                };
            }
            let path = ck_path(at);
            world.checkpoints.push(path.clone());
            Event::Message {
                conn: ConnId(conn),
                msg: Up::Checkpoint(proto::CheckpointReport {
                    generation,
                    rank,
                    step: at,
                    path,
                }),
            }
        }
        (510..=529, Some(conn)) => {
            let leaving = rng.random_range(0..4) == 0;
            let session = world.open.get_mut(&conn).expect("picked from open");
            let (generation, rank) = session.assigned.expect("a reporter has an assignment");
            if !leaving && !session.stopped {
                session.ready = true;
            }
            Event::Message {
                conn: ConnId(conn),
                msg: paused(generation, rank, session.next_step.saturating_sub(1), leaving),
            }
        }
        (530..=549, Some(conn)) => {
            let session = &world.open[&conn];
            let (generation, rank) = session.assigned.expect("a reporter has an assignment");
            Event::Message {
                conn: ConnId(conn),
                msg: Up::Eval(proto::EvalReport {
                    generation,
                    rank,
                    step: session.next_step.saturating_sub(1),
                    val_loss: 2.0,
                    metrics: Default::default(),
                }),
            }
        }
        (_, Some(conn)) => {
            let session = world.open.get_mut(&conn).expect("picked from open");
            let (generation, rank) = session.assigned.expect("a reporter has an assignment");
            let s = session.next_step;
            if s > total_steps {
                return Event::Message {
                    conn: ConnId(conn),
                    msg: finished_of(generation, rank, total_steps),
                };
            }
            session.next_step += 1;
            let msg = match rng.random_range(0..200) {
                // Occasionally a rank's checksum disagrees, or a step is not finite.
                0 => step_of(generation, rank, s, &format!("bad{rank}")),
                1..=12 => skipped_step(generation, rank, s),
                _ => step_of(generation, rank, s, &format!("ok{s}")),
            };
            Event::Message {
                conn: ConnId(conn),
                msg,
            }
        }
    }
}

fn random_spec(rng: &mut StdRng) -> RunSpec {
    let min = rng.random_range(1..=3);
    let mut spec = elastic_spec(min, min + rng.random_range(0..=2), rng.random_range(1..=8));
    spec.cluster.max_restarts = rng.random_range(0..=4);
    spec.cluster.max_nonfinite_steps = rng.random_range(1..=4);
    spec.cluster.reform_timeout_secs = rng.random_range(5..=60);
    spec.checkpoint.keep = rng.random_range(0..=3);
    spec
}

/// Endings and paths the generator reached, over all seeds.
#[derive(Default, Debug)]
struct Tally {
    finished: u32,
    failed: u32,
    stopped: u32,
    reformed: u32,
}

#[test]
fn random_event_orders_keep_the_invariants() {
    let mut tally = Tally::default();
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let spec = random_spec(&mut rng);
        let (min, max) = (spec.cluster.min_workers, spec.cluster.max_workers);
        let mut h = Harness::new(spec.clone());
        let mut world = World::default();
        let mut ended = 0;
        let mut left_waiting = false;
        let mut final_phase: Option<Phase> = None;
        let mut last_generation: Option<u64> = None;
        for i in 0..400 {
            let event = random_event(&mut rng, &mut world, &spec);
            // Now and then a long pause, so that several workers fall silent at once.
            let pause = if rng.random_range(0..25) == 0 {
                4.0..12.0
            } else {
                0.0..3.0
            };
            h.advance(rng.random_range(pause));
            let described = format!("{event:?}");
            let joined = match &event {
                Event::Joined { conn, .. } => Some(conn.0),
                _ => None,
            };
            let at = format!("seed {seed} event {i} ({described})");
            let actions = h.event(event);
            if final_phase.is_some() {
                assert!(
                    actions.iter().all(|a| matches!(
                        a,
                        // A damaged checkpoint is still worth remembering: a stopped run resumes later.
                        Action::Close { .. }
                            | Action::Persist(Record::CheckpointDamaged { .. })
                            | Action::Send {
                                msg: proto::CoordinatorMessage {
                                    msg: Some(Down::Reject(_))
                                },
                                ..
                            }
                    )),
                    "{at}: acted after the run ended: {actions:?}"
                );
            }
            let mut batch: Vec<(u64, proto::Assignment)> = Vec::new();
            for action in &actions {
                match action {
                    Action::Send { conn, msg } => {
                        let session = world
                            .open
                            .get_mut(&conn.0)
                            .unwrap_or_else(|| panic!("{at}: send to a closed session {conn}: {msg:?}"));
                        match &msg.msg {
                            Some(Down::Welcome(_)) => {
                                assert_eq!(joined, Some(conn.0), "{at}: welcome to a session that did not join");
                                session.welcomed = true;
                                session.ready = true;
                            }
                            Some(Down::Assignment(a)) => {
                                assert!(
                                    session.welcomed && session.ready && !session.stopped,
                                    "{at}: {conn} was assigned while not free: {a:?}"
                                );
                                session.assigned = Some((a.generation, a.rank));
                                session.next_step = a.start_step + 1;
                                session.ready = false;
                                batch.push((conn.0, a.clone()));
                            }
                            Some(Down::Stop(_)) => {
                                session.stopped = true;
                                session.ready = false;
                            }
                            Some(Down::Abort(proto::Abort { generation, .. }))
                            | Some(Down::Drain(proto::Drain { generation, .. })) => {
                                assert_eq!(
                                    session.assigned.map(|(g, _)| g),
                                    Some(*generation),
                                    "{at}: {conn} is not a member of the generation it is told to end"
                                );
                            }
                            _ => {}
                        }
                    }
                    Action::Close { conn } => {
                        assert!(world.open.remove(&conn.0).is_some(), "{at}: close of a closed {conn}");
                    }
                    Action::Persist(_) => {}
                    Action::RunEnded { .. } => ended += 1,
                }
            }
            if !batch.is_empty() {
                let n = u32::try_from(batch.len()).expect("few workers");
                assert!((min..=max).contains(&n), "{at}: generation of {n} workers");
                let generation = batch[0].1.generation;
                assert_eq!(
                    generation,
                    last_generation.map_or(0, |g| g + 1),
                    "{at}: generation numbers"
                );
                last_generation = Some(generation);
                let mut ranks: Vec<u32> = batch.iter().map(|(_, a)| a.rank).collect();
                ranks.sort_unstable();
                assert_eq!(ranks, (0..n).collect::<Vec<_>>(), "{at}: ranks not dense");
                for (_, a) in &batch {
                    assert_eq!((a.generation, a.world_size), (generation, n), "{at}");
                    assert_eq!(a.peers.len(), n as usize, "{at}");
                    assert!(
                        a.start_step < spec.train.total_steps,
                        "{at}: nothing left to train: {a:?}"
                    );
                    assert_eq!(a.resume_from.is_empty(), a.start_step == 0, "{at}: {a:?}");
                }
                tally.reformed += u32::from(generation > 0);
            }
            let status = h.status();
            let phase = h.machine.phase();
            if let Some(was) = final_phase {
                assert_eq!(phase, was, "{at}: left a final phase");
            }
            if phase.is_final() {
                final_phase = Some(phase);
            }
            if phase != Phase::Waiting {
                left_waiting = true;
            }
            assert!(!(left_waiting && phase == Phase::Waiting), "{at}: back to waiting");
            assert!(ended <= 1, "{at}: the run ended twice");
            assert_eq!(ended == 1, phase.is_final(), "{at}: RunEnded and the phase disagree");
            assert_eq!(h.machine.outcome().is_some(), phase.is_final(), "{at}");
            assert!(
                status.restarts <= spec.cluster.max_restarts || phase == Phase::Failed,
                "{at}: more restarts than cluster.max_restarts"
            );
            if phase == Phase::Running {
                let ranks: Vec<i32> = ranked(&status).iter().map(|(r, _)| *r).collect();
                let expected: Vec<i32> = (0..status.world_size as i32).collect();
                assert_eq!(ranks, expected, "{at}: status ranks not dense");
            }
        }
        match final_phase {
            Some(Phase::Finished) => tally.finished += 1,
            Some(Phase::Failed) => tally.failed += 1,
            Some(Phase::Stopped) => tally.stopped += 1,
            _ => {}
        }
    }
    // The generator must reach every ending and re-form runs, or the test proves little.
    assert!(
        tally.finished > 0 && tally.failed > 0 && tally.stopped > 0 && tally.reformed > 0,
        "{tally:?}"
    );
}

/// The status says how long ago each worker was last heard from, so a hung one shows before it is declared lost.
#[test]
fn status_says_how_long_each_worker_has_been_silent() {
    let mut h = Harness::formed(100);
    h.advance(3.0);
    h.msg(1, heartbeat());
    let status = h.status();
    let silent = |id: &str| status.workers.iter().find(|w| w.worker_id == id).map(|w| w.silent_secs);
    assert_eq!(silent("w0"), Some(0.0), "{status:?}");
    assert_eq!(silent("w1"), Some(3.0), "{status:?}");
}
