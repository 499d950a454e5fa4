//! A restarted coordinator takes over the generation its predecessor was running, when every member rejoins still
//! training it: the workers never stopped (the coordinator is not on the data path), so no step is lost. Anything
//! less — a member missing after the heartbeat limit, a worker training some other generation — is aborted, and the
//! run re-forms from the newest committed checkpoint as after any other failure.
use std::time::Instant;

use lockstep_common::proto::{self, coordinator_message::Msg as Down, worker_message::Msg as Up};
use tracing::{info, warn};

use super::{Action, Adoption, Phase, RunMachine, send};
use crate::progress::Progress;

impl RunMachine {
    /// Restoring: `members` (worker id, rank) were training `generation` when the state was last written.
    pub(super) fn adopt_later(&mut self, generation: u64, members: Vec<(String, u32)>) {
        self.adopting = Some(Adoption {
            generation,
            members,
            deadline: None,
        });
    }

    /// The worker at `idx` joined saying it is still training `generation` as `rank`, `step` steps done.
    pub(super) fn on_rejoin_training(&mut self, idx: usize, join: &proto::Join, now: Instant, out: &mut Vec<Action>) {
        let (generation, rank) = (join.training_generation, join.training_rank);
        let id = self.workers[idx].id.clone();
        let rank_taken = self
            .workers
            .iter()
            .any(|w| w.connected && w.id != id && w.rank == Some(rank));
        let adoptable = self.phase == Phase::Waiting
            && !rank_taken
            && self
                .adopting
                .as_ref()
                .is_some_and(|a| a.generation == generation && a.members.iter().any(|(m, r)| *m == id && *r == rank));
        let timeout = self.heartbeat_timeout();
        let w = &mut self.workers[idx];
        w.ready = false;
        if !adoptable {
            // It trains a generation nobody runs any more: stop it; it answers Idle and is then free. Until then it
            // is winding down (Training, no rank): not waited for, but not forgotten when a generation forms.
            w.state = proto::WorkerState::Training;
            info!(worker = %w.id, generation, "rejoined still training an old generation; stopping it");
            out.push(send(
                w.conn,
                Down::Abort(proto::Abort {
                    generation,
                    reason: "that generation is over; wait for the next assignment".into(),
                }),
            ));
            return;
        }
        w.rank = Some(rank);
        w.state = proto::WorkerState::Training;
        w.last_step = join.training_step;
        info!(worker = %w.id, generation, rank, step = join.training_step, "member rejoined, still training");
        if let Some(adoption) = self.adopting.as_mut() {
            adoption.deadline.get_or_insert(now + timeout);
        }
        self.try_adopt(now, out);
    }

    /// Takes the generation over once every member is back.
    fn try_adopt(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(adoption) = self.adopting.as_ref() else {
            return;
        };
        let mut members = Vec::with_capacity(adoption.members.len());
        for rank in 0..adoption.members.len() as u32 {
            let found = self.workers.iter().position(|w| {
                w.connected
                    && w.rank == Some(rank)
                    && matches!(w.state, proto::WorkerState::Training | proto::WorkerState::Finished)
            });
            match found {
                Some(idx) => members.push(idx),
                None => return,
            }
        }
        let generation = adoption.generation;
        self.adopting = None;
        self.generation = generation;
        self.phase = Phase::Running;
        self.reforming = None;
        let start = members.iter().map(|&i| self.workers[i].last_step).min().unwrap_or(0);
        self.step = self.step.max(start);
        self.progress = Some(Progress::new(members.len(), start, now));
        self.members = members;
        info!(
            generation,
            step = start,
            "generation adopted: every member kept training while the coordinator was away"
        );
        let all_done = self
            .members
            .iter()
            .all(|&i| self.workers[i].state == proto::WorkerState::Finished);
        if all_done {
            self.end_finished(now, out);
        }
    }

    /// A report from a rejoined member before the generation is adopted. Checkpoints are committed (rank 0 wrote
    /// them after a step every rank completed) and the end of a member's share is remembered; step metrics are not
    /// kept. Returns false when the report is not for the generation being adopted.
    pub(super) fn on_report_while_adopting(
        &mut self,
        idx: usize,
        report: &Up,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(adoption) = self.adopting.as_ref() else {
            return false;
        };
        let generation = match report {
            Up::Step(r) => r.generation,
            Up::Checkpoint(r) => r.generation,
            Up::Finished(r) => r.generation,
            Up::Eval(r) => r.generation,
            Up::Paused(r) => r.generation,
            _ => return false,
        };
        if self.phase != Phase::Waiting || generation != adoption.generation || self.workers[idx].rank.is_none() {
            return false;
        }
        let w = &mut self.workers[idx];
        match report {
            Up::Step(r) => w.last_step = w.last_step.max(r.step),
            Up::Checkpoint(r) => self.commit_checkpoint(idx, r.clone(), out),
            Up::Finished(r) => {
                w.last_step = w.last_step.max(r.step);
                w.state = proto::WorkerState::Finished;
                self.try_adopt(now, out);
            }
            Up::Paused(r) => {
                // The generation ended while the coordinator was away: the one before was stopping the run, its
                // members paused at the step they agreed on, and rank 0 checkpointed it (reported just before).
                // Nothing is left to take over; the run re-forms from that checkpoint once the others are idle.
                self.pause_member(idx, r);
                self.abandon_adoption("its members paused while the coordinator was away", out);
                self.try_form(now, out);
            }
            _ => {}
        }
        true
    }

    /// Gives up taking the generation over: the members back so far are told to stop it (they answer `Idle`, which
    /// frees them for the next generation).
    pub(super) fn abandon_adoption(&mut self, reason: &str, out: &mut Vec<Action>) {
        let Some(adoption) = self.adopting.take() else {
            return;
        };
        warn!(generation = adoption.generation, %reason, "not taking the generation over; re-forming from the newest checkpoint");
        for w in self.workers.iter().filter(|w| w.is_busy()) {
            out.push(send(
                w.conn,
                Down::Abort(proto::Abort {
                    generation: adoption.generation,
                    reason: format!("the coordinator restarted and cannot take the generation over: {reason}"),
                }),
            ));
        }
    }

    /// The members did not all come back in time: abort the ones that did; the run re-forms from the newest
    /// committed checkpoint once they are idle.
    pub(super) fn check_adoption_deadline(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(adoption) = self.adopting.as_ref() else {
            return;
        };
        if adoption.deadline.is_none_or(|d| now < d) {
            return;
        }
        let back = self.workers.iter().filter(|w| w.connected && w.rank.is_some()).count();
        let reason = format!(
            "only {back} of its {} members came back in time",
            adoption.members.len()
        );
        self.abandon_adoption(&reason, out);
    }
}
