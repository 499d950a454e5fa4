//! The training thread of one assignment: builds the collective, loads or initialises the model, trains the
//! assigned steps and reports each one up the session's stream.
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use lockstep_common::RunSpec;
use lockstep_common::proto::{
    Assignment, CheckpointReport, EvalReport, Finished, Paused, StepReport, worker_message::Msg,
};
use tracing::{info, info_span, warn};

use super::{Uplink, send};
use crate::collective::{Abort, Collective, Local, Ring, RingConfig, RingListener, offered_nccl_id};
use crate::error::{Error, Result};
use crate::trainer::{Trainer, due};

/// Where the training thread leaves its collective's abort handle for the session to use.
pub(super) type AbortSlot = Arc<Mutex<Option<Box<dyn Abort>>>>;

/// How an assignment ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TrainEnd {
    /// Trained to the assignment's last step and sent `Finished`.
    Finished,
    /// The ranks agreed to stop after a step; sent `Paused` (and rank 0 checkpointed it).
    Paused,
}

/// Why an assignment failed, as far as the coordinator's next decision goes.
#[derive(Debug)]
pub(super) enum Failure {
    /// This worker cannot go on (bad data, out of memory, a bug): it leaves the run.
    Own(Error),
    /// The collective broke — another rank went away or failed; this worker can serve the next generation.
    Peer(Error),
    /// The checkpoint to resume from did not load (damaged, missing, inconsistent).
    Checkpoint { path: String, error: Error },
    /// Stopped because the session asked (an abort from the coordinator, a lost coordinator, a second signal).
    Stopped,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match e {
            Error::Ring { .. } | Error::Nccl { .. } => Failure::Peer(e),
            // Only the session aborts (the flag in `Controls`): a stop on request, not a failure.
            Error::Aborted(_) => Failure::Stopped,
            other => Failure::Own(other),
        }
    }
}

/// Flags the session and the training thread share.
#[derive(Clone, Default)]
pub(super) struct Controls {
    /// Stop before the next step and return [`Failure::Stopped`] (with the collective aborted, so nothing hangs).
    pub abort: Arc<AtomicBool>,
    /// Vote to stop after the current step (a Drain, or this worker leaving); all ranks pause at the same step.
    pub pause: Arc<AtomicBool>,
    /// This worker leaves after the pause (SIGTERM); told to the coordinator in `Paused`.
    pub leaving: Arc<AtomicBool>,
    pub collective_abort: AbortSlot,
    /// The newest step done, for heartbeats.
    pub progress: Arc<AtomicU64>,
}

impl Controls {
    /// Stops the training as soon as possible: the flag for the loop, the abort handle for a hung collective.
    pub fn abort_now(&self) {
        self.abort.store(true, Ordering::SeqCst);
        if let Ok(slot) = self.collective_abort.lock()
            && let Some(handle) = slot.as_ref()
        {
            handle.abort();
        }
    }

    /// Makes `handle` the one [`Controls::abort_now`] uses; fires it at once if the abort came first. (The session
    /// sets its flag before it looks in the slot, and the flag is read here with the slot locked: one of the two
    /// sees the other.)
    fn set_abort(&self, handle: Box<dyn Abort>) {
        if let Ok(mut slot) = self.collective_abort.lock() {
            let handle = slot.insert(handle);
            if self.abort.load(Ordering::SeqCst) {
                handle.abort();
            }
        }
    }
}

/// Everything the training thread needs.
pub(super) struct Job {
    pub assignment: Assignment,
    pub listener: Arc<RingListener>,
    pub device: Device,
    pub up: Uplink,
    pub controls: Controls,
    pub token: lockstep_common::auth::RunToken,
}

/// Trains the assigned step range and reports each step; runs on its own thread (tensor math blocks).
pub(super) fn train(job: Job) -> Result<TrainEnd, Failure> {
    let a = &job.assignment;
    let spec = RunSpec::from_json(&a.spec_json).map_err(|e| Failure::Own(e.into()))?;
    let (rank, world, generation) = (a.rank, a.world_size, a.generation);
    let span = info_span!("train", run = %a.run_name, generation, rank);
    let _g = span.enter();

    let timeout = Duration::from_secs(spec.cluster.collective_timeout_secs);
    let collective: Box<dyn Collective> = if world <= 1 {
        Box::new(Local)
    } else if let Some(nccl) = nccl_collective(&job, timeout)? {
        nccl
    } else {
        let ring = Ring::connect(
            &job.listener,
            RingConfig {
                rank,
                world_size: world,
                peers: a.peers.clone(),
                timeout,
                session: format!("{}/gen-{generation}", a.run_name),
                token: job.token.clone(),
                cancel: Some(job.controls.abort.clone()),
            },
        )?;
        job.controls.set_abort(Box::new(ring.abort_handle()));
        Box::new(ring)
    };
    if !a.resume_from.is_empty() && !Path::new(&a.resume_from).is_dir() {
        // Not damaged but absent here: this host does not see the shared checkpoint directory. Reporting it as
        // damaged would make the coordinator discard a good checkpoint that the other workers can read.
        return Err(Failure::Own(Error::Checkpoint {
            path: a.resume_from.clone().into(),
            message: "the coordinator committed this checkpoint but it does not exist on this host; every worker \
                      must see the same checkpoint.dir (a shared filesystem)"
                .into(),
        }));
    }
    let mut trainer = if a.resume_from.is_empty() {
        Trainer::new(spec.clone(), collective, job.device.clone())?
    } else {
        Trainer::resume(spec.clone(), collective, job.device.clone(), Path::new(&a.resume_from)).map_err(|error| {
            match error {
                Error::Checkpoint { .. } | Error::Io { .. } => Failure::Checkpoint {
                    path: a.resume_from.clone(),
                    error,
                },
                other => Failure::from(other),
            }
        })?
    };
    trainer.set_stop_flag(job.controls.pause.clone());
    let ours = &trainer.corpus().fingerprint;
    if !a.data_fingerprint.is_empty() && *ours != a.data_fingerprint {
        return Err(Failure::Own(Error::Common(lockstep_common::Error::Data {
            path: trainer.corpus().origin.clone(),
            message: format!(
                "this worker's copy of the training data is not the coordinator's (data fingerprint {} vs {}); give \
                 every host the same copy of data.path (the same lockstep prepare output, or the same file)",
                short(ours),
                short(&a.data_fingerprint)
            ),
        })));
    }
    if trainer.step() != a.start_step || trainer.data_cursor() != a.data_cursor {
        let from = if a.resume_from.is_empty() {
            "a new run".to_string()
        } else {
            format!("checkpoint {}", a.resume_from)
        };
        return Err(Failure::Own(Error::Model(format!(
            "the assignment starts at step {} (data cursor {}) but {from} is at step {} (data cursor {})",
            a.start_step,
            a.data_cursor,
            trainer.step(),
            trainer.data_cursor()
        ))));
    }
    info!(
        params = trainer.params().num_elements(),
        from = a.start_step,
        steps = a.end_step - a.start_step,
        "training"
    );
    let started = Instant::now();
    let last = a.end_step;
    while trainer.step() < last {
        if job.controls.abort.load(Ordering::SeqCst) {
            return Err(Failure::Stopped);
        }
        // Logged before the step: what each rank consumes (the chaos tests check that no sequence is lost or seen
        // twice across restarts).
        let sequences = trainer.next_sequences();
        info!(
            generation,
            rank,
            step = trainer.step() + 1,
            sequences = %format!("{}..{}", sequences.start, sequences.end),
            "step start"
        );
        let out = match trainer.train_step() {
            Ok(out) => out,
            // A collective interrupted on purpose is not a failure to report.
            Err(_) if job.controls.abort.load(Ordering::SeqCst) => return Err(Failure::Stopped),
            Err(e) => return Err(e.into()),
        };
        job.controls.progress.store(out.step, Ordering::Relaxed);
        let param_checksum = if due(out.step, spec.train.checksum_interval, last) {
            trainer.checksum()?
        } else {
            String::new()
        };
        if out.skipped {
            warn!(
                step = out.step,
                loss = out.loss,
                grad_norm = out.grad_norm,
                "non-finite loss or gradient; update skipped"
            );
        }
        info!(
            generation,
            rank,
            step = out.step,
            loss = out.loss,
            checksum = %param_checksum,
            ms = out.step_ms,
            "step done"
        );
        send(
            &job.up,
            Msg::Step(StepReport {
                generation,
                rank,
                step: out.step,
                loss: out.loss,
                tokens: out.tokens,
                lr: out.lr,
                grad_norm: out.grad_norm,
                step_ms: out.step_ms,
                forward_ms: out.forward_ms,
                backward_ms: out.backward_ms,
                allreduce_ms: out.allreduce_ms,
                optimizer_ms: out.optimizer_ms,
                param_checksum,
                skipped: out.skipped,
            }),
        );
        if due(out.step, spec.train.eval_interval, last) {
            let val_loss = trainer.evaluate()?;
            info!(step = out.step, val_loss, val_perplexity = val_loss.exp(), "evaluated");
            let metrics = trainer.evaluate_generation()?.unwrap_or_default();
            if !metrics.is_empty() {
                info!(step = out.step, ?metrics, "generation metrics");
            }
            send(
                &job.up,
                Msg::Eval(EvalReport {
                    generation,
                    rank,
                    step: out.step,
                    val_loss,
                    metrics: metrics.into_iter().collect(),
                }),
            );
        }
        // The last step always finishes: a pause there would only repeat it.
        let pause = out.stop && out.step < last;
        if rank == 0 && (pause || due(out.step, spec.checkpoint.interval, last)) {
            let path = trainer.save_checkpoint()?;
            info!(step = out.step, path = %path.display(), "checkpoint written");
            send(
                &job.up,
                Msg::Checkpoint(CheckpointReport {
                    generation,
                    rank,
                    step: out.step,
                    path: path.display().to_string(),
                }),
            );
        }
        if pause {
            let leaving = job.controls.leaving.load(Ordering::SeqCst);
            info!(step = out.step, leaving, "the ranks agreed to pause after this step");
            send(
                &job.up,
                Msg::Paused(Paused {
                    generation,
                    rank,
                    step: out.step,
                    leaving,
                    nccl_unique_id: if leaving {
                        Vec::new()
                    } else {
                        offered_nccl_id(&job.device)
                    },
                }),
            );
            return Ok(TrainEnd::Paused);
        }
    }
    info!(
        steps = last - a.start_step,
        secs = started.elapsed().as_secs_f64(),
        "assignment done"
    );
    send(
        &job.up,
        Msg::Finished(Finished {
            generation,
            rank,
            step: trainer.step(),
        }),
    );
    Ok(TrainEnd::Finished)
}

/// NCCL when this worker computes on a GPU and the assignment carries rank 0's unique id (the coordinator relays one
/// only when every member is a CUDA worker); `None` = use the ring.
#[cfg(feature = "cuda")]
fn nccl_collective(job: &Job, timeout: Duration) -> Result<Option<Box<dyn Collective>>> {
    use crate::collective::{Nccl, NcclAbort, NcclConfig};
    let a = &job.assignment;
    if a.nccl_unique_id.is_empty() || !job.device.is_cuda() {
        return Ok(None);
    }
    let abort = NcclAbort::new();
    job.controls.set_abort(Box::new(abort.clone()));
    let cfg = NcclConfig {
        rank: a.rank,
        world_size: a.world_size,
        unique_id: a.nccl_unique_id.clone(),
        timeout,
    };
    let nccl = Nccl::connect(&job.device, cfg, abort)?;
    info!(world_size = a.world_size, "gradients all-reduce over NCCL");
    Ok(Some(Box::new(nccl)))
}

/// Without the `cuda` feature every worker is on the CPU and uses the ring.
#[cfg(not(feature = "cuda"))]
fn nccl_collective(_job: &Job, _timeout: Duration) -> Result<Option<Box<dyn Collective>>> {
    Ok(None)
}

/// The first 12 hex digits of a SHA-256, enough to tell two apart in a message.
fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}
