//! Committing checkpoints: the writer hears that one is committed only after it is persisted, and only then may it
//! prune older ones. Synthetic clock, no sockets, no sleeps.
mod common;

use common::*;
use lockstep_common::proto::{self, coordinator_message::Msg as Down};
use lockstep_coordinator::record::{Member, Record};
use lockstep_coordinator::{Action, ConnId, Phase};

/// The confirmation of the checkpoint of `step` at [`ck_path`], in generation `generation`.
fn committed(generation: u64, step: u64) -> Down {
    Down::Committed(proto::CheckpointCommitted {
        generation,
        step,
        path: ck_path(step),
    })
}

/// Where in `actions` the checkpoint of `step` is persisted and where its confirmation goes out to `conn`.
fn persist_and_confirm_at(actions: &[Action], conn: u64, step: u64) -> (usize, usize) {
    let persist = actions
        .iter()
        .position(|a| matches!(a, Action::Persist(Record::Checkpoint { step: s, .. }) if *s == step))
        .unwrap_or_else(|| panic!("checkpoint {step} not persisted: {actions:?}"));
    let confirm = actions
        .iter()
        .position(|a| {
            matches!(a, Action::Send { conn: c, msg } if *c == ConnId(conn)
                && matches!(&msg.msg, Some(Down::Committed(x)) if x.step == step))
        })
        .unwrap_or_else(|| panic!("checkpoint {step} not confirmed to conn {conn}: {actions:?}"));
    (persist, confirm)
}

#[test]
fn a_checkpoint_is_persisted_then_confirmed_to_its_writer_only() {
    let mut h = Harness::formed(10);
    h.steps(0, &[(1, 0), (2, 1)], 1..=3);
    let actions = h.msg(1, checkpoint(0, 0, 3));
    assert_eq!(
        persisted(&actions),
        [Record::Checkpoint {
            step: 3,
            path: ck_path(3)
        }]
    );
    let (persist, confirm) = persist_and_confirm_at(&actions, 1, 3);
    assert!(persist < confirm, "{actions:?}");
    assert_eq!(sent_to(&actions, 1), [committed(0, 3)]);
    assert!(sent_to(&actions, 2).is_empty(), "{actions:?}");
    assert_eq!(h.status().last_checkpoint, ck_path(3));
}

/// The keep = 1 interleaving: rank 1 is lost while rank 0 writes the next checkpoint, and the abort is handled
/// first. The report is ignored, so rank 0 is never told to prune: the only committed checkpoint stays.
#[test]
fn a_checkpoint_reported_after_the_generation_ended_is_not_confirmed() {
    let mut h = Harness::formed(10);
    h.steps(0, &[(1, 0), (2, 1)], 1..=2);
    persist_and_confirm_at(&h.msg(1, checkpoint(0, 0, 2)), 1, 2);
    h.steps(0, &[(1, 0), (2, 1)], 3..=4);
    h.disconnect(2, "stream closed");
    assert_eq!(h.machine.phase(), Phase::Reforming);
    let actions = h.msg(1, checkpoint(0, 0, 4));
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(h.status().last_checkpoint, ck_path(2));
}

/// A coordinator restarted after a checkpoint at step 10 while its workers trained on: a checkpoint they wrote
/// meanwhile, reported once the writer is back, is confirmed like any other.
#[test]
fn a_checkpoint_written_while_the_coordinator_was_away_is_confirmed_when_reported() {
    let spec = spec(2, 100);
    let members = ["w0", "w1"]
        .iter()
        .zip(0..)
        .map(|(id, rank)| Member {
            worker_id: id.to_string(),
            host: format!("host-{id}"),
            rank,
        })
        .collect();
    let saved = fold([
        run_record(&spec),
        Record::Generation {
            generation: 3,
            start_step: 0,
            resume_from: String::new(),
            members,
        },
        Record::Checkpoint {
            step: 10,
            path: ck_path(10),
        },
    ]);
    let (mut h, _) = Harness::restored(spec, saved);
    h.join(
        1,
        proto::Join {
            training: true,
            training_generation: 3,
            training_rank: 0,
            training_step: 16,
            ..join("w0")
        },
    );
    let actions = h.msg(1, checkpoint(3, 0, 15));
    let (persist, confirm) = persist_and_confirm_at(&actions, 1, 15);
    assert!(persist < confirm, "{actions:?}");
    assert_eq!(sent_to(&actions, 1), [committed(3, 15)]);
}
