//! A restarted coordinator taking over the generation its workers kept training while it was away.
mod common;

use common::*;
use lockstep_common::RunSpec;
use lockstep_common::proto::{self, coordinator_message::Msg as Down};
use lockstep_coordinator::Phase;
use lockstep_coordinator::record::{Member, Record};

/// The state of a 2-worker run interrupted in generation 3 after a checkpoint at step 10.
fn interrupted(spec: &RunSpec) -> Vec<Record> {
    vec![
        run_record(spec),
        Record::Generation {
            generation: 3,
            start_step: 0,
            resume_from: String::new(),
            members: vec![
                Member {
                    worker_id: "w0".into(),
                    host: "host-w0".into(),
                    rank: 0,
                },
                Member {
                    worker_id: "w1".into(),
                    host: "host-w1".into(),
                    rank: 1,
                },
            ],
        },
        Record::Checkpoint {
            step: 10,
            path: ck_path(10),
        },
    ]
}

fn still_training(id: &str, generation: u64, rank: u32, step: u64) -> proto::Join {
    proto::Join {
        training: true,
        training_generation: generation,
        training_rank: rank,
        training_step: step,
        ..join(id)
    }
}

#[test]
fn every_member_back_still_training_is_taken_over_without_a_new_assignment() {
    let spec = spec(2, 100);
    let (mut h, _) = Harness::restored(spec.clone(), fold(interrupted(&spec)));
    let first = h.join(1, still_training("w0", 3, 0, 14));
    assert!(all_assignments(&first).is_empty(), "{first:?}");
    assert_eq!(h.machine.phase(), Phase::Waiting);
    // A checkpoint written while the coordinator was away, reported before the other member is back, is committed.
    h.msg(1, checkpoint(3, 0, 15));
    let second = h.join(2, still_training("w1", 3, 1, 15));
    assert!(all_assignments(&second).is_empty(), "{second:?}");
    assert!(
        second.iter().all(
            |a| !matches!(a, lockstep_coordinator::Action::Send { msg, .. } if matches!(msg.msg, Some(Down::Abort(_))))
        ),
        "{second:?}"
    );
    let status = h.status();
    assert_eq!(h.machine.phase(), Phase::Running);
    assert_eq!(status.generation, 3);
    assert_eq!(status.world_size, 2);
    assert_eq!(status.last_checkpoint, ck_path(15));
    // Reports of the adopted generation count as usual from here on.
    h.steps(3, &[(1, 0), (2, 1)], 15..=16);
    assert_eq!(h.status().step, 16);
}

#[test]
fn a_member_missing_past_the_heartbeat_limit_turns_the_takeover_into_a_re_form() {
    let spec = spec(2, 100);
    let (mut h, _) = Harness::restored(spec.clone(), fold(interrupted(&spec)));
    h.join(1, still_training("w0", 3, 0, 14));
    h.advance(11.0);
    // The other member never comes back; a fresh worker does.
    h.join(2, join("w9"));
    h.msg(1, heartbeat());
    h.msg(2, heartbeat());
    let actions = h.tick();
    assert_eq!(the_abort(&actions, 1).0, 3);
    assert!(all_assignments(&actions).is_empty());
    let formed = h.msg(1, idle(3));
    let assigned = assignments(&formed, &[1, 2]);
    assert_eq!(assigned.len(), 2, "{formed:?}");
    assert!(
        assigned
            .iter()
            .all(|a| a.generation == 4 && a.start_step == 10 && a.resume_from == ck_path(10))
    );
}

#[test]
fn a_worker_rejoining_with_an_old_generation_is_told_to_stop_it() {
    let mut h = Harness::new(elastic_spec(2, 3, 100));
    h.join(1, join("w0"));
    h.join(2, join("w1"));
    assert_eq!(h.machine.phase(), Phase::Running);
    let actions = h.join(3, still_training("w7", 0, 1, 3));
    let sent = sent_to(&actions, 3);
    assert!(matches!(sent.first(), Some(Down::Welcome(_))), "{sent:?}");
    match sent.get(1) {
        Some(Down::Abort(a)) => {
            assert_eq!(a.generation, 0);
            assert!(a.reason.contains("over"), "{}", a.reason);
        }
        other => panic!("expected an Abort after the Welcome, got {other:?}"),
    }
    // Once it is idle it waits to be admitted like any newcomer.
    h.msg(3, idle(0));
    let status = h.status();
    assert!(
        status.workers.iter().any(|w| w.worker_id == "w7" && w.rank == -1),
        "{status:?}"
    );
}

fn aborts_to(actions: &[lockstep_coordinator::Action], conn: u64) -> usize {
    sent_to(actions, conn)
        .iter()
        .filter(|m| matches!(m, Down::Abort(_)))
        .count()
}

/// The coordinator before this one was stopping the run and died before the members' Paused reached it: they paused
/// at the agreed step and rank 0 checkpointed it while it was away. They rejoin still "training" (their threads'
/// ends not yet seen), and their queued Checkpoint and Paused follow. Nothing is left to take over; the run must
/// re-form from that checkpoint rather than wait forever for members that stopped.
#[test]
fn members_that_paused_while_the_coordinator_was_away_re_form_from_their_checkpoint() {
    let spec = spec(2, 100);
    let (mut h, _) = Harness::restored(spec.clone(), fold(interrupted(&spec)));
    h.join(1, still_training("w0", 3, 0, 20));
    h.msg(1, checkpoint(3, 0, 20));
    let first = h.msg(1, paused(3, 0, 20, false));
    assert!(all_assignments(&first).is_empty(), "{first:?}");
    assert_eq!(h.machine.phase(), Phase::Waiting);
    // The other member comes back after the adoption was given up: told to stop that generation.
    let second = h.join(2, still_training("w1", 3, 1, 20));
    assert_eq!(aborts_to(&second, 2), 1, "{second:?}");
    // Its own Paused (queued) is of a generation nobody runs now; its answer to the abort frees it.
    assert!(all_assignments(&h.msg(2, paused(3, 1, 20, false))).is_empty());
    let formed = h.msg(2, idle(3));
    let assigned = assignments(&formed, &[1, 2]);
    assert_eq!(assigned.len(), 2, "{formed:?}");
    assert!(
        assigned
            .iter()
            .all(|a| a.generation == 4 && a.start_step == 20 && a.resume_from == ck_path(20)),
        "{assigned:?}"
    );
    assert_eq!(h.machine.phase(), Phase::Running);
}

/// Both members back before either Paused is read: the first Paused gives the adoption up and tells the other
/// member to stop; it answers Idle (after its own Paused), and the run re-forms.
#[test]
fn a_pause_read_after_every_member_rejoined_still_re_forms() {
    let spec = spec(2, 100);
    let (mut h, _) = Harness::restored(spec.clone(), fold(interrupted(&spec)));
    h.join(1, still_training("w0", 3, 0, 20));
    // A member that paused does not count as training, so the takeover waits for the second.
    h.msg(1, checkpoint(3, 0, 20));
    let paused_first = h.msg(1, paused(3, 0, 20, false));
    assert_eq!(
        aborts_to(&paused_first, 1),
        0,
        "a paused member is not told to stop: {paused_first:?}"
    );
    let back = h.join(2, still_training("w1", 3, 1, 20));
    assert_eq!(aborts_to(&back, 2), 1);
    h.msg(2, paused(3, 1, 20, false));
    let formed = h.msg(2, idle(3));
    assert_eq!(assignments(&formed, &[1, 2]).len(), 2, "{formed:?}");
}

/// A collective failure of the generation being taken over, reported while the coordinator waits for the members:
/// the takeover is given up at once rather than left to the adoption deadline.
#[test]
fn a_collective_failure_while_waiting_to_take_over_re_forms() {
    let spec = spec(2, 100);
    let (mut h, _) = Harness::restored(spec.clone(), fold(interrupted(&spec)));
    h.join(1, still_training("w0", 3, 0, 14));
    let failed = h.msg(
        1,
        worker_error(proto::FailureKind::Peer, 3, "ring peer closed the connection", ""),
    );
    assert_eq!(aborts_to(&failed, 1), 1, "{failed:?}");
    let back = h.join(2, still_training("w1", 3, 1, 14));
    assert_eq!(aborts_to(&back, 2), 1, "{back:?}");
    h.msg(1, idle(3));
    let formed = h.msg(2, idle(3));
    let assigned = assignments(&formed, &[1, 2]);
    assert!(
        assigned.len() == 2 && assigned.iter().all(|a| a.generation == 4 && a.start_step == 10),
        "{formed:?}"
    );
}

/// Members lost on an elastic run: while the run re-forms, one of them rejoins still training the aborted
/// generation. It is told to stop, and must not be forgotten when the survivors form the next generation before its
/// Idle arrives: that Idle makes it a worker waiting to be admitted.
#[test]
fn a_worker_winding_down_an_old_generation_is_kept_for_the_next_one() {
    let mut h = Harness::new(elastic_spec(1, 3, 100));
    h.join(1, join("w0"));
    assert_eq!(h.machine.phase(), Phase::Running);
    h.join(2, join("w1"));
    // w1 waits for the checkpoint at which it is admitted: generation 1 of two members.
    let admitted = without_confirmations(&h.msg(1, checkpoint(0, 0, 5)));
    assert_eq!(the_abort(&admitted, 1).0, 0);
    let formed = h.msg(1, idle(0));
    assert_eq!(assignments(&formed, &[1, 2]).len(), 2, "{formed:?}");
    // w1's connection drops; the generation is aborted and w0 answers.
    h.disconnect(2, "stream closed");
    // w1 comes back still training generation 1 before w0's Idle re-forms the run without it.
    let back = h.join(3, still_training("w1", 1, 1, 6));
    assert_eq!(aborts_to(&back, 3), 1, "{back:?}");
    let reformed = h.msg(1, idle(1));
    assert_eq!(assignments(&reformed, &[1]).len(), 1, "{reformed:?}");
    // Its Idle arrives after the new generation formed: it is kept, waiting to be admitted.
    h.msg(3, idle(1));
    let status = h.status();
    assert!(
        status.workers.iter().any(|w| w.worker_id == "w1" && w.rank == -1),
        "{status:?}"
    );
    // The next checkpoint admits it.
    let generation = h.status().generation;
    let admitted = without_confirmations(&h.msg(1, checkpoint(generation, 0, 10)));
    assert_eq!(the_abort(&admitted, 1).0, generation);
    let formed = h.msg(1, idle(generation));
    assert_eq!(assignments(&formed, &[1, 3]).len(), 2, "{formed:?}");
}
