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
