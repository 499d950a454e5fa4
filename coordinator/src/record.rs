//! What the coordinator remembers across its own restart: the [`Record`]s the run machine emits, and [`Saved`], their
//! fold.
//!
//! Records are facts appended in order and never rewritten; everything a restarted coordinator needs is recovered by
//! folding them from the first ([`Saved::apply`]). The fold is where "the history of the surviving timeline" is
//! decided: after a restart from an older checkpoint the run repeats steps, and the repeated step replaces what was
//! recorded from it on.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `Ended::outcome` of a run whose every member finished its last step.
pub const OUTCOME_FINISHED: &str = "finished";
/// `Ended::outcome` of a run that failed for good.
pub const OUTCOME_FAILED: &str = "failed";
/// `Ended::outcome` of a run the coordinator stopped on purpose; a later coordinator may resume it.
pub const OUTCOME_STOPPED: &str = "stopped";
/// `Ended::outcome` of a run that failed for want of workers (`cluster.reform_timeout_secs`): it failed, but nothing
/// is wrong with its state, so a later coordinator may resume it once workers are back.
pub const OUTCOME_STALLED: &str = "stalled";

/// One fact the coordinator must remember across its own restart. The machine emits them (`Action::Persist`), the
/// store appends them in order; `Store::load` folds them back into a `Saved`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// The first record of a state directory: which run it belongs to.
    Run {
        name: String,
        spec_hash: String,
        spec_json: String,
    },
    /// A generation was formed.
    Generation {
        generation: u64,
        start_step: u64,
        resume_from: String,
        members: Vec<Member>,
    },
    /// A checkpoint was committed (its writer reported it complete).
    Checkpoint {
        step: u64,
        path: String,
    },
    /// A committed checkpoint failed verification when a worker loaded it; never resume from it again.
    CheckpointDamaged {
        step: u64,
        path: String,
        reason: String,
    },
    /// A step every rank completed (rank-reduced values).
    Step(StepRecord),
    Eval {
        step: u64,
        #[serde(with = "any_f64")]
        val_loss: f64,
        /// Generation metrics (fine-tuning with sft.eval_data); absent in records of runs without them.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        metrics: BTreeMap<String, f64>,
    },
    Lost(LostRecord),
    /// The run re-formed after a loss (counts against cluster.max_restarts).
    Restart {
        generation: u64,
        reason: String,
    },
    /// The run ended. `outcome` is "finished", "failed", "stopped" or "stalled" (the last two are resumable).
    Ended {
        outcome: String,
        message: String,
    },
    /// A stopped run was resumed by a new coordinator process (clears a previous "stopped" Ended).
    Resumed,
}

impl Record {
    /// Metric history only: losing the newest of these in a crash costs a few points of a loss curve, never a
    /// decision, so the store may commit them without waiting for the disk.
    pub fn is_metric(&self) -> bool {
        matches!(self, Record::Step(_) | Record::Eval { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub worker_id: String,
    pub host: String,
    pub rank: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    /// NaN or infinite when the step was skipped for a non-finite loss; stored as such.
    #[serde(with = "any_f64")]
    pub loss: f64,
    #[serde(with = "any_f64")]
    pub lr: f64,
    #[serde(with = "any_f64")]
    pub grad_norm: f64,
    pub tokens: u64,
    pub skipped: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LostRecord {
    pub worker_id: String,
    pub host: String,
    pub rank: Option<u32>,
    pub generation: u64,
    pub last_step: u64,
    pub reason: String,
    pub unix_ms: u64,
}

impl From<&LostRecord> for lockstep_common::proto::LostWorker {
    /// The status row of a lost worker; rank -1 when it had none.
    fn from(l: &LostRecord) -> Self {
        Self {
            worker_id: l.worker_id.clone(),
            host: l.host.clone(),
            rank: l.rank.map_or(-1, |r| i32::try_from(r).unwrap_or(i32::MAX)),
            generation: l.generation,
            last_step: l.last_step,
            reason: l.reason.clone(),
            unix_ms: l.unix_ms,
        }
    }
}

/// Everything `load` recovers. Default = a fresh state directory.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Saved {
    /// name, spec_hash, spec_json
    pub run: Option<(String, String, String)>,
    /// generation, start_step, resume_from, members
    pub generations: Vec<(u64, u64, String, Vec<Member>)>,
    /// (step, path) committed, ordered by step, damaged ones removed
    pub checkpoints: Vec<(u64, String)>,
    /// (step, path, reason), in the order they were found
    pub damaged: Vec<(u64, String, String)>,
    /// oldest first, one per step, of the surviving timeline only
    pub steps: Vec<StepRecord>,
    /// (step, val_loss), oldest first, of the surviving timeline only
    pub evals: Vec<(u64, f64)>,
    /// The newest generation metrics and their step, of the surviving timeline only
    pub eval_metrics: Option<(u64, BTreeMap<String, f64>)>,
    pub lost: Vec<LostRecord>,
    pub restarts: u32,
    /// outcome, message (None after Resumed)
    pub ended: Option<(String, String)>,
}

impl Saved {
    /// Folds one record in. Total: any sequence of records gives some `Saved`, so a file written by a buggy or older
    /// coordinator still loads.
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Run {
                name,
                spec_hash,
                spec_json,
            } => self.run = Some((name, spec_hash, spec_json)),
            Record::Generation {
                generation,
                start_step,
                resume_from,
                members,
            } => {
                // A generation trains on from its resume point: whatever was recorded past it belonged to a timeline
                // that ended before its next checkpoint.
                self.keep_before(start_step.saturating_add(1));
                self.generations.push((generation, start_step, resume_from, members));
            }
            Record::Checkpoint { step, path } => {
                // A step re-run after a restart writes the same step again; the newer commit is the one on disk.
                self.checkpoints.retain(|(s, p)| *s != step && *p != path);
                let at = self.checkpoints.partition_point(|(s, _)| *s < step);
                self.checkpoints.insert(at, (step, path));
            }
            Record::CheckpointDamaged { step, path, reason } => {
                self.checkpoints.retain(|(s, p)| !(*s == step && *p == path));
                self.damaged.push((step, path, reason));
            }
            Record::Step(step) => {
                // Steps arrive in order; only a restart makes one go back (its Generation record has cut the
                // timeline already; this covers files without one). An evaluation AT a step that goes forward is
                // not stale: rank 0 reports it while the slowest rank's report of that step may still be on its way,
                // so the Eval record can come first.
                if self.steps.last().is_some_and(|last| last.step >= step.step) {
                    self.keep_before(step.step);
                }
                self.steps.push(step);
            }
            Record::Eval {
                step,
                val_loss,
                metrics,
            } => {
                if self.evals.last().is_some_and(|(s, _)| *s >= step) {
                    self.evals.retain(|(s, _)| *s < step);
                }
                self.evals.push((step, val_loss));
                if !metrics.is_empty() {
                    self.eval_metrics = Some((step, metrics));
                }
            }
            Record::Lost(lost) => self.lost.push(lost),
            Record::Restart { .. } => self.restarts = self.restarts.saturating_add(1),
            Record::Ended { outcome, message } => self.ended = Some((outcome, message)),
            Record::Resumed => {
                // Only a stopped or stalled run is resumable; a finished or failed one stays ended whatever a caller
                // appends.
                if self
                    .ended
                    .as_ref()
                    .is_some_and(|(outcome, _)| outcome == OUTCOME_STOPPED || outcome == OUTCOME_STALLED)
                {
                    self.ended = None;
                }
            }
        }
    }

    /// Keeps only the steps and evaluations before `limit`: the timeline the others belonged to was abandoned.
    fn keep_before(&mut self, limit: u64) {
        if self.steps.last().is_some_and(|last| last.step >= limit) {
            self.steps.retain(|s| s.step < limit);
        }
        if self.evals.last().is_some_and(|(s, _)| *s >= limit) {
            self.evals.retain(|(s, _)| *s < limit);
        }
        if self.eval_metrics.as_ref().is_some_and(|(s, _)| *s >= limit) {
            self.eval_metrics = None;
        }
    }

    /// The newest committed checkpoint that was not found damaged: where a restarted run resumes.
    pub fn latest_checkpoint(&self) -> Option<&(u64, String)> {
        self.checkpoints.last()
    }
}

/// serde for an `f64` that may be NaN or infinite (a skipped step's loss). JSON has no such numbers and serde_json
/// writes them as `null`, which it then refuses to read back as `f64`; they are written as the strings "NaN", "inf"
/// and "-inf" instead, finite values stay plain numbers.
mod any_f64 {
    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::Serializer;

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_nan() {
            serializer.serialize_str("NaN")
        } else if value.is_infinite() {
            serializer.serialize_str(if *value > 0.0 { "inf" } else { "-inf" })
        } else {
            serializer.serialize_f64(*value)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        deserializer.deserialize_any(AnyF64)
    }

    struct AnyF64;

    impl Visitor<'_> for AnyF64 {
        type Value = f64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number, \"NaN\", \"inf\" or \"-inf\"")
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }

        // Lossy above 2^53 by nature; a metric that large is already meaningless at that precision.
        #[allow(clippy::cast_precision_loss)]
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }

        #[allow(clippy::cast_precision_loss)]
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            match v {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, loss: f64) -> Record {
        Record::Step(StepRecord {
            step,
            loss,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens: 1024,
            skipped: false,
        })
    }

    fn fold(records: impl IntoIterator<Item = Record>) -> Saved {
        let mut saved = Saved::default();
        for r in records {
            saved.apply(r);
        }
        saved
    }

    fn step_numbers(saved: &Saved) -> Vec<u64> {
        saved.steps.iter().map(|s| s.step).collect()
    }

    #[test]
    fn fresh_directory_folds_to_default() {
        assert_eq!(fold([]), Saved::default());
    }

    #[test]
    fn run_generations_lost_and_restarts_accumulate() {
        let member = Member {
            worker_id: "w0".into(),
            host: "h0".into(),
            rank: 0,
        };
        let lost = LostRecord {
            worker_id: "w1".into(),
            host: "h1".into(),
            rank: Some(1),
            generation: 0,
            last_step: 7,
            reason: "heartbeat timeout".into(),
            unix_ms: 1_700_000_000_000,
        };
        let saved = fold([
            Record::Run {
                name: "r".into(),
                spec_hash: "abc".into(),
                spec_json: "{}".into(),
            },
            Record::Generation {
                generation: 0,
                start_step: 0,
                resume_from: String::new(),
                members: vec![],
            },
            Record::Lost(lost.clone()),
            Record::Restart {
                generation: 1,
                reason: "lost w1".into(),
            },
            Record::Generation {
                generation: 1,
                start_step: 5,
                resume_from: "ck/step-5".into(),
                members: vec![member.clone()],
            },
        ]);
        assert_eq!(saved.run, Some(("r".into(), "abc".into(), "{}".into())));
        assert_eq!(saved.generations.len(), 2);
        assert_eq!(saved.generations[1], (1, 5, "ck/step-5".into(), vec![member]));
        assert_eq!(saved.lost, vec![lost]);
        assert_eq!(saved.restarts, 1);
        assert_eq!(saved.ended, None);
    }

    #[test]
    fn a_repeated_step_replaces_the_abandoned_timeline() {
        let mut records: Vec<Record> = (1..=10).map(|s| step(s, 5.0)).collect();
        records.push(Record::Eval {
            step: 4,
            val_loss: 4.5,
            metrics: BTreeMap::new(),
        });
        records.push(Record::Eval {
            step: 8,
            val_loss: 4.0,
            metrics: BTreeMap::new(),
        });
        // Restart from the checkpoint at step 5: step 6 runs again.
        records.push(step(6, 3.0));
        records.push(step(7, 3.0));
        let saved = fold(records);
        assert_eq!(step_numbers(&saved), vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            saved.steps[5].loss, 3.0,
            "step 6 is the re-run's, not the abandoned one's"
        );
        assert_eq!(
            saved.evals,
            vec![(4, 4.5)],
            "the eval at step 8 belonged to the abandoned timeline"
        );
    }

    /// Rank 0's evaluation report can overtake the slowest rank's report of the same step; the step record that
    /// completes it afterwards must not take the evaluation for a stale one.
    #[test]
    fn an_evaluation_recorded_before_its_step_is_kept() {
        let eval = |step, val_loss| Record::Eval {
            step,
            val_loss,
            metrics: [("bleu".to_string(), 7.0)].into(),
        };
        let saved = fold([step(1, 5.0), eval(2, 4.5), step(2, 4.0), step(3, 3.5)]);
        assert_eq!(step_numbers(&saved), vec![1, 2, 3]);
        assert_eq!(saved.evals, vec![(2, 4.5)]);
        assert_eq!(saved.eval_metrics, Some((2, [("bleu".to_string(), 7.0)].into())));
    }

    /// A new generation resumes from its checkpoint: what was recorded after it goes, even before any step is re-run
    /// (a history read between the restart and the next step report shows the surviving timeline only).
    #[test]
    fn a_generation_cuts_the_timeline_back_to_its_resume_point() {
        let generation = |generation, start_step| Record::Generation {
            generation,
            start_step,
            resume_from: format!("ck/step-{start_step}"),
            members: vec![],
        };
        let eval = |step, val_loss| Record::Eval {
            step,
            val_loss,
            metrics: [("bleu".to_string(), val_loss)].into(),
        };
        let saved = fold([
            generation(0, 0),
            step(1, 5.0),
            step(2, 4.0),
            eval(2, 4.2),
            step(3, 3.0),
            step(4, 2.0),
            eval(4, 2.2),
            generation(1, 2),
        ]);
        assert_eq!(step_numbers(&saved), vec![1, 2]);
        assert_eq!(
            saved.evals,
            vec![(2, 4.2)],
            "the evaluation at the checkpoint's own step stays"
        );
        // Only the newest metrics are kept, and they were step 4's: none remain until the next evaluation.
        assert_eq!(saved.eval_metrics, None);
        let from_scratch = fold([generation(0, 0), step(1, 5.0), eval(1, 5.1), generation(1, 0)]);
        assert!(from_scratch.steps.is_empty() && from_scratch.evals.is_empty());
        assert_eq!(from_scratch.eval_metrics, None);
    }

    #[test]
    fn a_step_repeated_exactly_replaces_itself_and_evals_at_it() {
        let saved = fold([
            step(1, 5.0),
            Record::Eval {
                step: 1,
                val_loss: 9.0,
                metrics: BTreeMap::new(),
            },
            step(1, 4.0),
        ]);
        assert_eq!(step_numbers(&saved), vec![1]);
        assert_eq!(saved.steps[0].loss, 4.0);
        assert!(saved.evals.is_empty());
    }

    /// Generation metrics survive a restart (the newest set), and go with the timeline they belong to.
    #[test]
    fn the_newest_generation_metrics_are_kept_and_rolled_back_with_their_timeline() {
        let eval = |step, bleu: f64| Record::Eval {
            step,
            val_loss: 1.0,
            metrics: [("bleu".to_string(), bleu)].into(),
        };
        let plain = Record::Eval {
            step: 3,
            val_loss: 1.0,
            metrics: BTreeMap::new(),
        };
        let saved = fold([
            step(1, 5.0),
            eval(1, 10.0),
            step(2, 4.0),
            eval(2, 20.0),
            step(3, 3.0),
            plain.clone(),
        ]);
        assert_eq!(saved.eval_metrics, Some((2, [("bleu".to_string(), 20.0)].into())));
        // A re-run of step 2 abandons its metrics; only the newest set is kept, so none remain until the next
        // evaluation.
        let saved = fold([step(1, 5.0), eval(1, 10.0), step(2, 4.0), eval(2, 20.0), step(2, 4.5)]);
        assert_eq!(saved.eval_metrics, None);
        // Records written before metrics existed still parse.
        let old: Record = serde_json::from_str(r#"{"Eval":{"step":1,"val_loss":2.0}}"#).unwrap();
        assert_eq!(
            old,
            Record::Eval {
                step: 1,
                val_loss: 2.0,
                metrics: BTreeMap::new()
            }
        );
    }

    #[test]
    fn a_repeated_eval_replaces_the_older_one() {
        let saved = fold([
            Record::Eval {
                step: 2,
                val_loss: 3.0,
                metrics: BTreeMap::new(),
            },
            Record::Eval {
                step: 4,
                val_loss: 2.0,
                metrics: BTreeMap::new(),
            },
            Record::Eval {
                step: 4,
                val_loss: 1.0,
                metrics: BTreeMap::new(),
            },
        ]);
        assert_eq!(saved.evals, vec![(2, 3.0), (4, 1.0)]);
    }

    #[test]
    fn damaged_checkpoints_are_never_resumed_from() {
        let saved = fold([
            Record::Checkpoint {
                step: 100,
                path: "ck/step-100".into(),
            },
            Record::Checkpoint {
                step: 200,
                path: "ck/step-200".into(),
            },
            Record::CheckpointDamaged {
                step: 200,
                path: "ck/step-200".into(),
                reason: "sha256 mismatch".into(),
            },
        ]);
        assert_eq!(saved.checkpoints, vec![(100, "ck/step-100".into())]);
        assert_eq!(saved.latest_checkpoint(), Some(&(100, "ck/step-100".into())));
        assert_eq!(
            saved.damaged,
            vec![(200, "ck/step-200".into(), "sha256 mismatch".into())]
        );
    }

    #[test]
    fn a_recommitted_step_replaces_its_checkpoint_and_order_follows_steps() {
        let saved = fold([
            Record::Checkpoint {
                step: 100,
                path: "ck/step-100".into(),
            },
            Record::Checkpoint {
                step: 200,
                path: "ck/step-200".into(),
            },
            Record::CheckpointDamaged {
                step: 200,
                path: "ck/step-200".into(),
                reason: "truncated".into(),
            },
            Record::Checkpoint {
                step: 200,
                path: "ck/step-200".into(),
            },
            Record::Checkpoint {
                step: 150,
                path: "ck/step-150".into(),
            },
        ]);
        assert_eq!(
            saved.checkpoints,
            vec![
                (100, "ck/step-100".into()),
                (150, "ck/step-150".into()),
                (200, "ck/step-200".into())
            ]
        );
        assert_eq!(saved.damaged.len(), 1, "the history of the damage stays");
    }

    #[test]
    fn a_damage_report_for_another_path_keeps_the_checkpoint() {
        let saved = fold([
            Record::Checkpoint {
                step: 100,
                path: "ck/step-100".into(),
            },
            Record::CheckpointDamaged {
                step: 100,
                path: "elsewhere/step-100".into(),
                reason: "x".into(),
            },
        ]);
        assert_eq!(saved.checkpoints, vec![(100, "ck/step-100".into())]);
    }

    #[test]
    fn resumed_clears_a_stopped_end_only() {
        let stopped = fold([
            Record::Ended {
                outcome: OUTCOME_STOPPED.into(),
                message: "SIGTERM".into(),
            },
            Record::Resumed,
        ]);
        assert_eq!(stopped.ended, None);
        let failed = fold([
            Record::Ended {
                outcome: OUTCOME_FAILED.into(),
                message: "max_restarts reached".into(),
            },
            Record::Resumed,
        ]);
        assert_eq!(
            failed.ended,
            Some((OUTCOME_FAILED.into(), "max_restarts reached".into()))
        );
        let finished = fold([Record::Ended {
            outcome: OUTCOME_FINISHED.into(),
            message: String::new(),
        }]);
        assert_eq!(finished.ended, Some((OUTCOME_FINISHED.into(), String::new())));
    }

    #[test]
    fn non_finite_metrics_survive_json() {
        for loss in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 2.5, -0.0] {
            let record = Record::Step(StepRecord {
                step: 3,
                loss,
                lr: 0.0,
                grad_norm: 1.0,
                tokens: 0,
                skipped: true,
            });
            let json = serde_json::to_vec(&record).expect("a record always serialises");
            let back: Record = serde_json::from_slice(&json).expect("what was written reads back");
            let Record::Step(back) = back else {
                panic!("wrong variant: {back:?}")
            };
            assert_eq!(
                back.loss.to_bits(),
                loss.to_bits(),
                "{}",
                String::from_utf8_lossy(&json)
            );
        }
        let eval: Record = serde_json::from_str(r#"{"Eval":{"step":1,"val_loss":"inf"}}"#).expect("valid");
        assert_eq!(
            eval,
            Record::Eval {
                step: 1,
                val_loss: f64::INFINITY,
                metrics: BTreeMap::new(),
            }
        );
        let err = serde_json::from_str::<Record>(r#"{"Eval":{"step":1,"val_loss":"big"}}"#).unwrap_err();
        assert!(err.to_string().contains("big"), "{err}");
    }

    #[test]
    fn is_metric_marks_step_and_eval_only() {
        assert!(step(1, 1.0).is_metric());
        assert!(
            Record::Eval {
                step: 1,
                val_loss: 1.0,
                metrics: BTreeMap::new()
            }
            .is_metric()
        );
        assert!(
            !Record::Checkpoint {
                step: 1,
                path: "p".into()
            }
            .is_metric()
        );
        assert!(!Record::Resumed.is_metric());
    }
}
