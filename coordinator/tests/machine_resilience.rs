//! The run state machine when things go wrong or change: members lost, re-forming, agreed pauses for a stop or a
//! worker leaving, damaged checkpoints, non-finite steps, and a coordinator restored from its saved state.
//! Synthetic clock, no sockets, no sleeps.
mod common;

use common::*;
use lockstep_common::RunSpec;
use lockstep_common::proto::{self, FailureKind, coordinator_message::Msg as Down, worker_message::Msg as Up};
use lockstep_coordinator::record::{LostRecord, Member, Record, StepRecord};
use lockstep_coordinator::{Action, ConnId, Phase, RunMachine, RunOutcome};

/// Generation 1's members as (conn, rank), see [`three_at_step_6`].
const THREE: [(u64, u32); 3] = [(1, 0), (2, 1), (3, 2)];

/// Generation 1 of w0 (conn 1, rank 0), w1 (conn 2, rank 1) and w2 (conn 3, rank 2) — w2 was admitted at the
/// checkpoint of step 2, since a run of min_workers 2 forms with two — with the checkpoint of step 4 committed and
/// every rank at step 6.
fn three_at_step_6() -> Harness {
    let mut h = Harness::new(elastic_spec(2, 3, 100));
    h.join(1, join("w0"));
    h.join(2, join("w1"));
    h.steps(0, &[(1, 0), (2, 1)], 1..=2);
    h.join(3, join("w2"));
    h.msg(1, checkpoint(0, 0, 2));
    h.msg(1, idle(0));
    assignments(&h.msg(2, idle(0)), &[1, 2, 3]);
    h.steps(1, &THREE, 3..=4);
    assert_eq!(persisted(&h.msg(1, checkpoint(1, 0, 4))).len(), 1);
    h.steps(1, &THREE, 5..=6);
    assert_eq!(h.status().restarts, 0);
    h
}

fn global_batch(h: &Harness) -> u64 {
    h.machine.spec().train.global_batch as u64
}

/// w1 was just lost from [`three_at_step_6`] (`actions` is what that caused): it is recorded and listed, the
/// survivors are aborted, and nobody is assigned yet.
fn assert_w1_lost(h: &Harness, actions: &[Action], why: &str) {
    let records = persisted(actions);
    let lost: Vec<&LostRecord> = records
        .iter()
        .filter_map(|r| if let Record::Lost(l) = r { Some(l) } else { None })
        .collect();
    match lost.as_slice() {
        [l] => {
            assert_eq!(
                (l.worker_id.as_str(), l.host.as_str(), l.rank, l.generation, l.last_step),
                ("w1", "host-w1", Some(1), 1, 6)
            );
            assert!(l.reason.contains(why), "{l:?}");
        }
        other => panic!("expected one Lost record, got {other:?}"),
    }
    assert_eq!(
        records
            .iter()
            .filter(|r| matches!(r, Record::Restart { generation: 1, .. }))
            .count(),
        1,
        "{records:?}"
    );
    for conn in [1, 3] {
        let (generation, reason) = the_abort(actions, conn);
        assert_eq!(generation, 1);
        assert!(
            reason.starts_with("worker w1 (rank 1, host host-w1)") && reason.contains("at step 6"),
            "{reason}"
        );
        assert!(reason.contains(why), "{reason}");
    }
    assert!(
        !sent_to(actions, 2).iter().any(|m| matches!(m, Down::Abort(_))),
        "the lost worker is not aborted: {actions:?}"
    );
    assert!(all_assignments(actions).is_empty());
    assert!(outcome(actions).is_none());
    let status = h.status();
    assert_eq!(status.state, proto::RunState::Reforming as i32);
    assert_eq!(status.restarts, 1);
    match status.lost.as_slice() {
        [l] => {
            assert_eq!(
                (l.worker_id.as_str(), l.rank, l.generation, l.last_step),
                ("w1", 1, 1, 6)
            );
            assert!(l.reason.contains(why), "{l:?}");
        }
        other => panic!("expected w1 in status.lost, got {other:?}"),
    }
}

/// The survivors w0 (conn 1) and w2 (conn 3) answer the abort; only when both have does generation 2 form, with
/// dense ranks, from the checkpoint of step 4.
fn assert_survivors_reform(h: &mut Harness) {
    let actions = h.msg(1, idle(1));
    assert!(
        all_assignments(&actions).is_empty(),
        "w2 has not stopped yet: {actions:?}"
    );
    let actions = h.msg(3, idle(1));
    let batch = assignments(&actions, &[1, 3]);
    assert_eq!(all_assignments(&actions).len(), 2, "{actions:?}");
    for (rank, a) in (0u32..).zip(&batch) {
        assert_eq!(a.rank, rank);
        assert_eq!((a.generation, a.world_size), (2, 2));
        assert_eq!((a.start_step, a.data_cursor), (4, 4 * global_batch(h)));
        assert_eq!(a.resume_from, ck_path(4));
        assert_eq!(a.peers, vec!["w0.local:9000", "w2.local:9000"]);
    }
    let expected = Record::Generation {
        generation: 2,
        start_step: 4,
        resume_from: ck_path(4),
        members: vec![
            Member {
                worker_id: "w0".into(),
                host: "host-w0".into(),
                rank: 0,
            },
            Member {
                worker_id: "w2".into(),
                host: "host-w2".into(),
                rank: 1,
            },
        ],
    };
    assert!(persisted(&actions).contains(&expected), "{actions:?}");
    let status = h.status();
    assert_eq!(status.state, proto::RunState::Running as i32);
    assert_eq!((status.generation, status.world_size, status.step), (2, 2, 4));
    assert_eq!(status.restarts, 1);
    assert_eq!(status.lost.len(), 1, "the history of losses stays");
    assert_eq!(ranked(&status), vec![(0, "w0".into()), (1, "w2".into())]);
    assert!(status.workers.iter().all(|w| w.worker_id != "w1"), "{status:?}");
}

#[test]
fn a_member_whose_stream_closes_is_lost_and_the_survivors_reform_from_the_checkpoint() {
    let mut h = three_at_step_6();
    let actions = h.disconnect(2, "stream closed");
    assert_w1_lost(&h, &actions, "stream closed");
    let w1 = h
        .status()
        .workers
        .into_iter()
        .find(|w| w.worker_id == "w1")
        .expect("listed until re-formed");
    assert_eq!((w1.rank, w1.state), (1, proto::WorkerState::Lost as i32));
    assert_survivors_reform(&mut h);
}

#[test]
fn a_silent_member_is_lost_on_tick_and_its_session_closed() {
    let mut h = three_at_step_6();
    // The limit is 5 × 2 s. w0 and w2 keep talking; w1 is silent since its step 6.
    for _ in 0..5 {
        h.advance(2.0);
        h.msg(1, heartbeat());
        h.msg(3, heartbeat());
        assert!(h.tick().is_empty(), "too early");
    }
    h.advance(0.5);
    let actions = h.tick();
    assert!(actions.contains(&Action::Close { conn: ConnId(2) }), "{actions:?}");
    assert_w1_lost(&h, &actions, "no message for 10.5 s");
    // The closed session's own disconnect is not news.
    assert!(h.disconnect(2, "closed by the coordinator").is_empty());
    assert_survivors_reform(&mut h);
    assert_eq!(h.status().elapsed_secs, (h.now - h.t0).as_secs_f64());
}

#[test]
fn a_member_that_reports_its_own_failure_is_stopped_and_the_rest_reform() {
    let mut h = three_at_step_6();
    let actions = h.msg(2, worker_error(FailureKind::Own, 1, "out of memory on cpu", ""));
    // The culprit waits for an answer before it exits, so its report is not lost with its stream.
    let (reason, failed) = the_stop(&actions, 2);
    assert!(failed && reason.contains("out of memory on cpu"), "{reason}");
    assert_w1_lost(&h, &actions, "out of memory on cpu");
    assert!(h.status().lost[0].reason.starts_with("failed"), "{:?}", h.status().lost);
    // Its stream ending afterwards is expected; no second loss, no second restart.
    let after = h.disconnect(2, "stream closed");
    assert!(after.is_empty(), "{after:?}");
    assert_eq!((h.status().restarts, h.status().lost.len()), (1, 1));
    assert_survivors_reform(&mut h);
}

#[test]
fn a_peer_failure_aborts_without_blame_and_counts_one_restart() {
    let mut h = three_at_step_6();
    let actions = h.msg(
        1,
        worker_error(FailureKind::Peer, 1, "ring receive from rank 1: connection reset", ""),
    );
    let records = persisted(&actions);
    assert!(
        !records.iter().any(|r| matches!(r, Record::Lost(_))),
        "nobody is blamed: {records:?}"
    );
    assert_eq!(
        records,
        vec![Record::Restart {
            generation: 1,
            reason: "the collective of worker w0 (rank 0) failed: ring receive from rank 1: connection reset".into()
        }]
    );
    // Every member stops, the reporter too: it waits for that abort to answer Idle.
    for conn in [1, 2, 3] {
        assert_eq!(the_abort(&actions, conn).0, 1);
    }
    let status = h.status();
    assert_eq!((status.state, status.restarts), (proto::RunState::Reforming as i32, 1));
    assert!(status.lost.is_empty());

    // w0 stops; the dead one's stream then closes: it is recorded, but the restart was already counted.
    assert!(all_assignments(&h.msg(1, idle(1))).is_empty());
    let actions = h.disconnect(2, "stream closed");
    let records = persisted(&actions);
    assert!(
        matches!(records.as_slice(), [Record::Lost(l)] if l.worker_id == "w1" && l.last_step == 6),
        "{records:?}"
    );
    assert!(
        sent_to(&actions, 1).is_empty() && sent_to(&actions, 3).is_empty(),
        "{actions:?}"
    );
    assert_eq!((h.status().restarts, h.status().lost.len()), (1, 1));

    let actions = h.msg(3, idle(1));
    let batch = assignments(&actions, &[1, 3]);
    assert_eq!(
        batch
            .iter()
            .map(|a| (a.rank, a.world_size, a.start_step))
            .collect::<Vec<_>>(),
        vec![(0, 2, 4), (1, 2, 4)]
    );
    assert_eq!(h.status().restarts, 1);
}

#[test]
fn without_a_checkpoint_the_next_generation_starts_fresh() {
    let mut h = Harness::new(elastic_spec(2, 3, 100));
    h.join(1, join("w0"));
    h.join(2, join("w1"));
    h.join(3, join("w2"));
    h.steps(0, &[(1, 0), (2, 1)], 1..=3);
    let actions = h.disconnect(2, "stream closed");
    assert_eq!(the_abort(&actions, 1).0, 0);
    // The worker waiting to be admitted takes the lost one's place.
    let actions = h.msg(1, idle(0));
    for (rank, a) in (0u32..).zip(assignments(&actions, &[1, 3])) {
        assert_eq!((a.rank, a.generation, a.world_size), (rank, 1, 2));
        assert_eq!((a.start_step, a.data_cursor, a.resume_from.as_str()), (0, 0, ""));
    }
    assert_eq!((h.status().step, h.status().restarts), (0, 1));
}

#[test]
fn losses_beyond_max_restarts_fail_the_run() {
    let mut spec = elastic_spec(2, 4, 100);
    spec.cluster.max_restarts = 1;
    let mut h = Harness::new(spec);
    for (conn, id) in [(1, "w0"), (2, "w1"), (3, "w2"), (4, "w3")] {
        h.join(conn, join(id));
    }
    h.steps(0, &[(1, 0), (2, 1)], 1..=2);
    h.disconnect(2, "stream closed");
    let actions = h.msg(1, idle(0));
    assert_eq!(assignments(&actions, &[1, 3, 4]).len(), 3);
    assert_eq!(h.status().restarts, 1);

    h.steps(1, &[(1, 0), (3, 1), (4, 2)], 1..=1);
    let actions = h.disconnect(3, "stream closed");
    let Some(RunOutcome::Failed(message)) = outcome(&actions) else {
        panic!("{actions:?}")
    };
    assert!(message.contains("cluster.max_restarts = 1"), "{message}");
    assert!(
        message.contains("worker w2 (rank 1, host host-w2) lost at step 1"),
        "{message}"
    );
    for conn in [1, 4] {
        let (reason, failed) = the_stop(&actions, conn);
        assert!(failed && reason.contains("cluster.max_restarts = 1"), "{reason}");
    }
    let records = persisted(&actions);
    assert!(
        !records.iter().any(|r| matches!(r, Record::Restart { .. })),
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| matches!(r, Record::Lost(l) if l.worker_id == "w2"))
    );
    assert_eq!(
        records.last(),
        Some(&Record::Ended {
            outcome: "failed".into(),
            message: message.clone()
        })
    );
    assert_eq!(h.status().state, proto::RunState::Failed as i32);
}

/// Two of two workers formed, w1 lost at step 3, w0 answered the abort: the run waits for a second worker.
fn short_of_one(reform_timeout_secs: u64) -> Harness {
    let mut spec = spec(2, 100);
    spec.cluster.reform_timeout_secs = reform_timeout_secs;
    let mut h = Harness::new(spec);
    h.join(1, join("w0"));
    h.join(2, join("w1"));
    h.steps(0, &[(1, 0), (2, 1)], 1..=3);
    h.disconnect(2, "stream closed");
    assert!(all_assignments(&h.msg(1, idle(0))).is_empty());
    assert_eq!(h.status().state, proto::RunState::Reforming as i32);
    h
}

#[test]
fn a_run_short_of_workers_reforms_when_a_new_one_joins() {
    let mut h = short_of_one(30);
    h.advance(20.0);
    h.msg(1, heartbeat());
    assert!(h.tick().is_empty());
    let actions = h.join(3, join("w2"));
    assert!(
        matches!(sent_to(&actions, 3).first(), Some(Down::Welcome(_))),
        "{actions:?}"
    );
    let batch = assignments(&actions, &[1, 3]);
    assert_eq!(
        batch
            .iter()
            .map(|a| (a.rank, a.generation, a.world_size))
            .collect::<Vec<_>>(),
        vec![(0, 1, 2), (1, 1, 2)]
    );
    assert_eq!(h.machine.phase(), Phase::Running);
}

#[test]
fn reforming_gives_up_after_reform_timeout_secs() {
    let mut h = short_of_one(30);
    for _ in 0..15 {
        h.advance(2.0);
        h.msg(1, heartbeat());
        assert!(h.tick().is_empty(), "not later than cluster.reform_timeout_secs");
    }
    h.advance(1.0);
    h.msg(1, heartbeat());
    let actions = h.tick();
    let Some(RunOutcome::Failed(message)) = outcome(&actions) else {
        panic!("{actions:?}")
    };
    assert!(message.contains("cluster.reform_timeout_secs"), "{message}");
    assert!(message.contains("1 of cluster.min_workers = 2"), "{message}");
    assert!(the_stop(&actions, 1).1);
    assert_eq!(h.status().state, proto::RunState::Failed as i32);
}

#[test]
fn a_requested_stop_drains_pauses_and_stops_everyone() {
    let mut h = Harness::formed(100);
    h.steps(0, &[(1, 0), (2, 1)], 1..=3);
    let actions = h.stop("lockstep stop");
    for conn in [1, 2] {
        match sent_to(&actions, conn).as_slice() {
            [Down::Drain(d)] => assert_eq!((d.generation, d.reason.as_str()), (0, "lockstep stop")),
            other => panic!("expected Drain to conn {conn}, got {other:?}"),
        }
    }
    assert!(outcome(&actions).is_none());
    assert_eq!(h.machine.phase(), Phase::Running);
    // Asking again while the members pause changes nothing.
    assert!(h.stop("again").is_empty());

    // The ranks agreed on step 4; rank 0 checkpoints it, then everyone pauses.
    h.steps(0, &[(1, 0), (2, 1)], 4..=4);
    let actions = without_confirmations(&h.msg(1, checkpoint(0, 0, 4)));
    assert!(
        sent_to(&actions, 1).is_empty(),
        "no admission or abort while stopping: {actions:?}"
    );
    assert!(h.msg(1, paused(0, 0, 4, false)).is_empty());
    let actions = h.msg(2, paused(0, 1, 4, false));
    for conn in [1, 2] {
        assert_eq!(
            the_stop(&actions, conn),
            ("run stopped: lockstep stop".to_string(), false)
        );
    }
    assert_eq!(outcome(&actions), Some(RunOutcome::Stopped("lockstep stop".into())));
    assert!(persisted(&actions).contains(&Record::Ended {
        outcome: "stopped".into(),
        message: "lockstep stop".into()
    }));
    let status = h.status();
    assert_eq!((status.state, status.step), (proto::RunState::Stopped as i32, 4));
    assert_eq!(status.last_checkpoint, ck_path(4));

    // After the end a stop request is no news, and a joiner hears how to resume.
    assert!(h.stop("once more").is_empty());
    let reason = rejection(&h.join(3, join("w2")), 3);
    assert!(
        reason.contains("stopped") && reason.contains("start the coordinator again"),
        "{reason}"
    );
}

#[test]
fn a_stop_while_waiting_or_reforming_ends_at_once() {
    let mut h = Harness::new(spec(2, 10));
    h.join(1, join("w0"));
    let actions = h.stop("SIGTERM");
    assert_eq!(the_stop(&actions, 1), ("run stopped: SIGTERM".to_string(), false));
    assert_eq!(outcome(&actions), Some(RunOutcome::Stopped("SIGTERM".into())));
    assert_eq!(h.machine.phase(), Phase::Stopped);

    let mut h = short_of_one(300);
    let actions = h.stop("SIGTERM");
    assert_eq!(the_stop(&actions, 1), ("run stopped: SIGTERM".to_string(), false));
    assert_eq!(outcome(&actions), Some(RunOutcome::Stopped("SIGTERM".into())));
}

#[test]
fn a_leaving_worker_is_stopped_and_the_others_reform_from_its_checkpoint() {
    let mut h = three_at_step_6();
    // w1 got SIGTERM: the ranks agree to pause after step 6 and rank 0 checkpoints it.
    h.msg(1, checkpoint(1, 0, 6));
    assert!(h.msg(2, paused(1, 1, 6, true)).is_empty());
    let w1 = h
        .status()
        .workers
        .into_iter()
        .find(|w| w.worker_id == "w1")
        .expect("listed");
    assert_eq!(w1.state, proto::WorkerState::Left as i32);
    assert!(h.msg(1, paused(1, 0, 6, false)).is_empty());
    let actions = h.msg(3, paused(1, 2, 6, false));
    assert!(!the_stop(&actions, 2).1);
    for (rank, a) in (0u32..).zip(assignments(&actions, &[1, 3])) {
        assert_eq!((a.rank, a.generation, a.world_size), (rank, 2, 2));
        assert_eq!((a.start_step, a.resume_from.clone()), (6, ck_path(6)));
    }
    let records = persisted(&actions);
    assert!(
        !records
            .iter()
            .any(|r| matches!(r, Record::Lost(_) | Record::Restart { .. })),
        "leaving is neither a loss nor a restart: {records:?}"
    );
    let status = h.status();
    assert_eq!((status.restarts, status.lost.len(), status.step), (0, 0, 6));
    assert_eq!(ranked(&status), vec![(0, "w0".into()), (1, "w2".into())]);
}

#[test]
fn when_every_worker_leaves_the_run_stops() {
    let mut h = Harness::formed(100);
    h.steps(0, &[(1, 0), (2, 1)], 1..=2);
    h.msg(1, checkpoint(0, 0, 2));
    h.msg(1, paused(0, 0, 2, true));
    let actions = h.msg(2, paused(0, 1, 2, true));
    let Some(RunOutcome::Stopped(message)) = outcome(&actions) else {
        panic!("{actions:?}")
    };
    assert!(message.contains("no worker remains"), "{message}");
    for conn in [1, 2] {
        // One answer each: the worker exits on the first.
        assert!(!the_stop(&actions, conn).1);
    }
    assert_eq!(h.status().last_checkpoint, ck_path(2));
}

#[test]
fn a_damaged_checkpoint_is_dropped_and_the_one_before_resumed() {
    let mut h = Harness::formed(100);
    let members = [(1, 0), (2, 1)];
    h.steps(0, &members, 1..=4);
    h.msg(1, checkpoint(0, 0, 4));
    h.steps(0, &members, 5..=8);
    h.msg(1, checkpoint(0, 0, 8));
    h.steps(0, &members, 9..=9);
    h.msg(2, worker_error(FailureKind::Peer, 0, "ring timed out", ""));
    h.msg(1, idle(0));
    let actions = h.msg(2, idle(0));
    assert!(
        assignments(&actions, &[1, 2])
            .iter()
            .all(|a| a.resume_from == ck_path(8))
    );

    let actions = h.msg(
        2,
        worker_error(
            FailureKind::Checkpoint,
            1,
            "sha256 mismatch in model.safetensors",
            &ck_path(8),
        ),
    );
    let records = persisted(&actions);
    assert_eq!(
        records,
        vec![Record::CheckpointDamaged {
            step: 8,
            path: ck_path(8),
            reason: "sha256 mismatch in model.safetensors".into()
        }],
        "a damaged checkpoint is not a restart"
    );
    for conn in [1, 2] {
        let (generation, reason) = the_abort(&actions, conn);
        assert_eq!(generation, 1);
        assert!(reason.contains(&ck_path(8)), "{reason}");
    }
    let status = h.status();
    assert_eq!(
        (status.restarts, status.last_checkpoint.as_str()),
        (1, ck_path(4).as_str())
    );
    // Every rank loads the same checkpoint; the second report of the same damage is no news.
    assert!(
        h.msg(
            1,
            worker_error(
                FailureKind::Checkpoint,
                1,
                "sha256 mismatch in model.safetensors",
                &ck_path(8)
            )
        )
        .is_empty()
    );

    h.msg(1, idle(1));
    let actions = h.msg(2, idle(1));
    for a in assignments(&actions, &[1, 2]) {
        assert_eq!((a.generation, a.start_step), (2, 4));
        assert_eq!(
            (a.resume_from.as_str(), a.data_cursor),
            (ck_path(4).as_str(), 4 * global_batch(&h))
        );
    }
    assert_eq!(h.status().restarts, 1);
}

#[test]
fn non_finite_steps_in_a_row_fail_the_run() {
    let mut spec = spec(2, 100);
    spec.cluster.max_nonfinite_steps = 3;
    let mut h = Harness::new(spec);
    h.join(1, join("w0"));
    h.join(2, join("w1"));
    let members = [(1, 0), (2, 1)];
    let skip = |h: &mut Harness, s: u64| {
        let mut actions = h.msg(1, skipped_step(0, 0, s));
        actions.extend(h.msg(2, skipped_step(0, 1, s)));
        actions
    };
    h.steps(0, &members, 1..=1);
    for s in 2..=3 {
        let actions = skip(&mut h, s);
        assert!(
            matches!(
                persisted(&actions).as_slice(),
                [Record::Step(StepRecord { skipped: true, .. })]
            ),
            "{actions:?}"
        );
        assert!(outcome(&actions).is_none());
    }
    // A finite step in between starts the count again.
    h.steps(0, &members, 4..=4);
    for s in 5..=6 {
        assert!(outcome(&skip(&mut h, s)).is_none());
    }
    // Only a step every rank has reported counts.
    assert!(outcome(&h.msg(1, skipped_step(0, 0, 7))).is_none());
    assert_eq!(h.status().skipped_steps, 4);
    let actions = h.msg(2, skipped_step(0, 1, 7));
    let Some(RunOutcome::Failed(message)) = outcome(&actions) else {
        panic!("{actions:?}")
    };
    assert!(message.contains("cluster.max_nonfinite_steps"), "{message}");
    assert!(message.contains("3 steps in a row (up to step 7)"), "{message}");
    for conn in [1, 2] {
        assert!(the_stop(&actions, conn).1);
    }
    assert_eq!(h.status().skipped_steps, 5);
}

#[test]
fn several_workers_falling_silent_on_one_tick_are_all_handled() {
    // w0 alone forms generation 0; w1 is admitted at the checkpoint of step 2 (generation 1); w2 waits.
    let mut h = Harness::new(elastic_spec(1, 3, 100));
    h.join(1, join("w0"));
    h.join(2, join("w1"));
    h.steps(0, &[(1, 0)], 1..=2);
    h.msg(1, checkpoint(0, 0, 2));
    assignments(&h.msg(1, idle(0)), &[1, 2]);
    h.join(3, join("w2"));
    h.steps(1, &[(1, 0), (2, 1)], 3..=3);
    // w0's collective fails; it answers the abort, w1 never does, and w2 never speaks either.
    h.msg(1, worker_error(FailureKind::Peer, 1, "ring timed out", ""));
    assert!(all_assignments(&h.msg(1, idle(1))).is_empty());
    for _ in 0..5 {
        h.advance(2.0);
        h.msg(1, heartbeat());
        assert!(h.tick().is_empty());
    }
    h.advance(1.0);
    h.msg(1, heartbeat());
    let actions = h.tick();
    for conn in [2, 3] {
        assert!(actions.contains(&Action::Close { conn: ConnId(conn) }), "{actions:?}");
        assert!(
            sent_to(&actions, conn).is_empty(),
            "a silent worker is given nothing: {actions:?}"
        );
    }
    let lost: Vec<String> = h.status().lost.iter().map(|l| l.worker_id.clone()).collect();
    assert_eq!(lost, vec!["w1"]);
    // w0 is enough (min_workers 1) and goes on alone from the checkpoint.
    match all_assignments(&actions).as_slice() {
        [(1, a)] => assert_eq!((a.generation, a.world_size, a.start_step), (2, 1, 2)),
        other => panic!("expected one assignment to w0, got {other:?}"),
    }
    assert_eq!(h.status().restarts, 1);
}

// ---------------------------------------------------------------- restore

fn generation(generation: u64, start_step: u64) -> Record {
    Record::Generation {
        generation,
        start_step,
        resume_from: if start_step == 0 {
            String::new()
        } else {
            ck_path(start_step)
        },
        members: vec![],
    }
}

fn step_record(step: u64) -> Record {
    Record::Step(StepRecord {
        step,
        loss: 3.0,
        lr: 0.001,
        grad_norm: 1.0,
        tokens: 1280,
        skipped: false,
    })
}

/// A run of `spec` that trained generation 0 to step 6 (checkpoint at 4), lost w1, and trained generation 1 from 4
/// to 9 (checkpoint at 8); then the coordinator went away.
fn interrupted(spec: &RunSpec) -> Vec<Record> {
    let mut records = vec![run_record(spec), generation(0, 0)];
    records.extend((1..=6).map(step_record));
    records.insert(
        6,
        Record::Checkpoint {
            step: 4,
            path: ck_path(4),
        },
    );
    records.push(Record::Lost(LostRecord {
        worker_id: "w1".into(),
        host: "host-w1".into(),
        rank: Some(1),
        generation: 0,
        last_step: 6,
        reason: "lost: stream closed".into(),
        unix_ms: 1_700_000_000_000,
    }));
    records.push(Record::Restart {
        generation: 0,
        reason: "worker w1 lost".into(),
    });
    records.push(generation(1, 4));
    records.extend((5..=9).map(step_record));
    records.push(Record::Checkpoint {
        step: 8,
        path: ck_path(8),
    });
    records
}

#[test]
fn a_fresh_state_starts_a_new_run_and_records_its_identity() {
    let spec = spec(2, 10);
    let (h, records) = Harness::restored(spec.clone(), Default::default());
    assert_eq!(records, vec![run_record(&spec)]);
    assert_eq!(h.machine.phase(), Phase::Waiting);
    assert_eq!((h.status().generation, h.status().step), (0, 0));
}

#[test]
fn an_interrupted_run_resumes_from_its_newest_checkpoint_in_a_new_generation() {
    let spec = spec(2, 100);
    let (mut h, records) = Harness::restored(spec.clone(), fold(interrupted(&spec)));
    assert!(records.is_empty(), "{records:?}");
    assert_eq!(h.machine.phase(), Phase::Waiting);
    let status = h.status();
    assert_eq!((status.restarts, status.lost.len(), status.step), (1, 1, 8));
    assert_eq!(status.last_checkpoint, ck_path(8));
    assert_eq!(status.last_loss, Some(3.0));

    h.join(1, join("w0"));
    let actions = h.join(2, join("w5"));
    for (rank, a) in (0u32..).zip(assignments(&actions, &[1, 2])) {
        assert_eq!((a.rank, a.generation, a.world_size), (rank, 2, 2));
        assert_eq!((a.start_step, a.data_cursor), (8, 8 * global_batch(&h)));
        assert_eq!(a.resume_from, ck_path(8));
    }
    assert!(
        persisted(&actions).iter().any(|r| matches!(
            r,
            Record::Generation {
                generation: 2,
                start_step: 8,
                ..
            }
        )),
        "{actions:?}"
    );
}

#[test]
fn a_state_of_another_spec_is_refused_naming_the_field() {
    let ours = spec(2, 100);
    let mut theirs = ours.clone();
    theirs.train.lr = 0.5;
    let saved = fold(interrupted(&theirs));
    match RunMachine::restore(ours, saved, "state/run.redb", std::time::Instant::now()) {
        Ok(_) => panic!("a state of another spec was accepted"),
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("train.lr"), "{message}");
            assert!(message.contains("state/run.redb"), "{message}");
            assert!(message.contains("resume it with its own config"), "{message}");
        }
    }
    // A run that committed no checkpoint (a typo fixed after the first start): the advice is to start afresh.
    let fresh = fold([run_record(&theirs), generation(0, 0), step_record(1)]);
    let Err(e) = RunMachine::restore(spec(2, 100), fresh, "state/run.redb", std::time::Instant::now()) else {
        panic!("a state of another spec was accepted")
    };
    let message = e.to_string();
    assert!(
        message.contains("committed no checkpoint") && message.contains("delete state/run.redb"),
        "{message}"
    );
}

#[test]
fn a_finished_or_failed_run_stays_ended() {
    let spec = spec(2, 100);
    let mut records = interrupted(&spec);
    records.push(Record::Ended {
        outcome: "finished".into(),
        message: String::new(),
    });
    let (mut h, appended) = Harness::restored(spec.clone(), fold(records));
    assert!(appended.is_empty());
    assert_eq!(h.machine.phase(), Phase::Finished);
    assert_eq!(h.machine.outcome(), Some(RunOutcome::Finished));
    let reason = rejection(&h.join(1, join("w0")), 1);
    assert!(reason.contains("already finished"), "{reason}");

    let mut records = interrupted(&spec);
    records.push(Record::Ended {
        outcome: "failed".into(),
        message: "ranks diverged at step 9".into(),
    });
    let (h, _) = Harness::restored(spec, fold(records));
    assert_eq!(
        h.machine.outcome(),
        Some(RunOutcome::Failed("ranks diverged at step 9".into()))
    );
}

#[test]
fn a_stopped_run_is_resumed_and_says_so() {
    let spec = spec(2, 100);
    let mut records = interrupted(&spec);
    records.push(Record::Ended {
        outcome: "stopped".into(),
        message: "SIGTERM".into(),
    });
    let (mut h, appended) = Harness::restored(spec, fold(records));
    assert_eq!(appended, vec![Record::Resumed]);
    assert_eq!(h.machine.phase(), Phase::Waiting);
    assert_eq!(h.machine.outcome(), None);
    h.join(1, join("w0"));
    let actions = h.join(2, join("w1"));
    assert!(assignments(&actions, &[1, 2]).iter().all(|a| a.start_step == 8));
}

#[test]
fn a_committed_final_checkpoint_finishes_the_run_when_it_forms() {
    let spec = spec(2, 10);
    let records = vec![
        run_record(&spec),
        generation(0, 0),
        Record::Checkpoint {
            step: 10,
            path: ck_path(10),
        },
    ];
    let (mut h, _) = Harness::restored(spec, fold(records));
    // Nothing is left to train, so the first worker to come ends the run: no need to wait for min_workers.
    let actions = h.join(1, join("w0"));
    assert!(all_assignments(&actions).is_empty(), "{actions:?}");
    assert_eq!(outcome(&actions), Some(RunOutcome::Finished));
    assert!(
        matches!(sent_to(&actions, 1).as_slice(), [Down::Welcome(_), Down::Stop(s)] if s.reason == "run finished"),
        "{actions:?}"
    );
    assert!(rejection(&h.join(2, join("w1")), 2).contains("already finished"));
    assert_eq!(
        (h.status().state, h.status().step),
        (proto::RunState::Finished as i32, 10)
    );
}

/// A re-form that times out fails the run (exit status 1, status FAILED), but for want of workers only: it is
/// recorded as stalled, and a coordinator started again on the state resumes it, as the message says.
#[test]
fn a_run_that_timed_out_short_of_workers_can_be_resumed() {
    let mut h = short_of_one(30);
    h.advance(31.0);
    h.msg(1, heartbeat());
    let actions = h.tick();
    let Some(RunOutcome::Failed(message)) = outcome(&actions) else {
        panic!("{actions:?}")
    };
    assert!(
        message.contains("resume by starting the coordinator again"),
        "{message}"
    );
    let ended = persisted(&actions);
    assert!(
        ended.contains(&Record::Ended {
            outcome: "stalled".into(),
            message: message.clone()
        }),
        "{ended:?}"
    );
    let spec = spec(2, 100);
    let mut records = interrupted(&spec);
    records.extend(ended);
    let (mut h, appended) = Harness::restored(spec, fold(records));
    assert_eq!(appended, vec![Record::Resumed]);
    assert_eq!(h.machine.phase(), Phase::Waiting);
    h.join(1, join("w0"));
    let actions = h.join(2, join("w1"));
    assert!(
        assignments(&actions, &[1, 2]).iter().all(|a| a.start_step == 8),
        "{actions:?}"
    );
}

/// A stop was requested and the members were pausing when one of them reported a collective failure (no member
/// lost): the run stops on the newest committed checkpoint at once, rather than re-form only to wait out
/// cluster.reform_timeout_secs and fail.
#[test]
fn a_failure_during_a_stop_ends_the_run_stopped() {
    let mut h = Harness::formed(100);
    h.steps(0, &[(1, 0), (2, 1)], 1..=3);
    h.msg(1, checkpoint(0, 0, 2));
    h.stop("lockstep stop");
    let actions = h.msg(2, worker_error(FailureKind::Peer, 0, "ring timed out", ""));
    let Some(RunOutcome::Stopped(reason)) = outcome(&actions) else {
        panic!("{actions:?}")
    };
    assert!(
        reason.starts_with("lockstep stop (during the stop,") && reason.contains("ring timed out"),
        "{reason}"
    );
    assert!(!the_stop(&actions, 1).1 && !the_stop(&actions, 2).1);
    assert_eq!(h.status().last_checkpoint, ck_path(2));
    assert!(
        !persisted(&actions).iter().any(|r| matches!(r, Record::Restart { .. })),
        "a stop is not a restart: {actions:?}"
    );
}

/// Rank 0 committed the final checkpoint; rank 1 fails before it says it finished. The training is complete: the
/// run finishes instead of re-forming to train nothing (and failing when no spare worker comes).
#[test]
fn a_member_failing_after_the_final_checkpoint_finishes_the_run() {
    let mut h = Harness::formed(5);
    h.steps(0, &[(1, 0), (2, 1)], 1..=5);
    h.msg(1, checkpoint(0, 0, 5));
    h.msg(1, finished(0, 5));
    let actions = h.disconnect(2, "stream closed");
    assert_eq!(outcome(&actions), Some(RunOutcome::Finished), "{actions:?}");
    assert_eq!(the_stop(&actions, 1), ("run finished".to_string(), false));
    assert_eq!(h.status().state, proto::RunState::Finished as i32);
}

/// The status's validation loss goes back with the timeline: an evaluation of a step the new generation will run
/// again is not shown as the run's current one.
#[test]
fn a_re_form_forgets_evaluations_after_its_resume_point() {
    let eval = |step: u64, val_loss: f64| {
        Up::Eval(proto::EvalReport {
            generation: 0,
            rank: 0,
            step,
            val_loss,
            metrics: [("bleu".to_string(), 12.5)].into(),
        })
    };
    let mut h = Harness::formed(100);
    h.steps(0, &[(1, 0), (2, 1)], 1..=2);
    h.msg(1, eval(2, 3.5));
    h.msg(1, checkpoint(0, 0, 2));
    h.steps(0, &[(1, 0), (2, 1)], 3..=4);
    h.msg(1, eval(4, 2.0));
    assert_eq!(h.status().val_loss, Some(2.0));
    h.disconnect(2, "stream closed");
    h.msg(1, idle(0));
    let formed = h.join(3, join("w2"));
    assert!(
        assignments(&formed, &[1, 3]).iter().all(|a| a.start_step == 2),
        "{formed:?}"
    );
    let status = h.status();
    assert_eq!(
        status.val_loss, None,
        "step 4's evaluation belongs to the abandoned timeline"
    );
    assert!(status.eval_metrics.is_empty(), "{status:?}");
}
