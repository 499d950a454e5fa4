//! The worker's one long-lived session with the coordinator (DESIGN §2): join, wait for an assignment, train it on
//! a dedicated thread while forwarding step reports and heartbeats up the stream, and obey abort/stop commands.
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use lockstep_common::RunSpec;
use lockstep_common::proto::coordinator_client::CoordinatorClient;
use lockstep_common::proto::{
    Assignment, CheckpointReport, CoordinatorMessage, EvalReport, Finished, Heartbeat, Join, StepReport, WorkerError,
    WorkerMessage, coordinator_message, worker_message,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{info, info_span, warn};

use crate::collective::{Abort, Collective, Local, Ring, RingConfig, RingListener, offered_nccl_id};
pub use crate::coordinator_link::default_worker_id;
use crate::coordinator_link::{connect, hostname, local_ip_towards, resolve};
use crate::error::{Error, Result};
use crate::trainer::{Trainer, due};

/// How long a worker whose training failed waits for the coordinator to acknowledge its error report.
const REPORT_GRACE: Duration = Duration::from_secs(10);
/// How a worker is started (the binary's flags).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `http://host:port` of the coordinator.
    pub coordinator: String,
    pub device: Device,
    pub device_name: String,
    /// Where the ring listener binds; `None` = the address this host uses to reach the coordinator, port 0.
    pub ring_listen: Option<String>,
    pub worker_id: Option<String>,
    /// The run spec this worker was started with, if any; the coordinator rejects a conflicting one.
    pub spec: Option<RunSpec>,
    /// Keep retrying the first connection this long (the coordinator may still be starting).
    pub connect_timeout: Duration,
}

/// How a session ended without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The coordinator said the run is over.
    Stopped(String),
}

/// Messages up the stream; the training thread holds a clone.
type Uplink = mpsc::UnboundedSender<WorkerMessage>;

fn send(up: &Uplink, msg: worker_message::Msg) {
    // The receiver lives as long as the session; if it is gone the session is ending anyway.
    let _ = up.send(WorkerMessage { msg: Some(msg) });
}

/// Runs one session to its end: `Ok` after the coordinator's stop, `Err` on reject, abort, a lost coordinator,
/// a training failure, or `shutdown`.
pub async fn run(opts: WorkerOptions, shutdown: impl Future<Output = ()>) -> Result<Exit> {
    let coordinator_addr = resolve(&opts.coordinator)?;
    let listen = match &opts.ring_listen {
        Some(addr) => addr.clone(),
        None => format!("{}:0", local_ip_towards(coordinator_addr)),
    };
    let listener = RingListener::bind(&listen)?;
    let ring_addr = listener.local_addr().to_string();
    let host = hostname();
    let worker_id = opts.worker_id.clone().unwrap_or_else(default_worker_id);
    let span = info_span!("worker", worker = %worker_id);
    let _guard = span.enter();

    let nccl_unique_id = offered_nccl_id(&opts.device);
    let channel = connect(&opts.coordinator, opts.connect_timeout).await?;
    let mut client = CoordinatorClient::new(channel);
    let (up, up_rx) = mpsc::unbounded_channel();
    send(
        &up,
        worker_message::Msg::Join(Join {
            protocol_version: lockstep_common::PROTOCOL_VERSION,
            worker_id: worker_id.clone(),
            host,
            device: opts.device_name.clone(),
            ring_addr: ring_addr.clone(),
            spec_json: opts.spec.as_ref().map(RunSpec::to_json).unwrap_or_default(),
            nccl_unique_id,
        }),
    );
    let lost = |e: tonic::Status| Error::Coordinator {
        addr: opts.coordinator.clone(),
        message: format!("session failed: {}", e.message()),
    };
    let mut inbound = client
        .session(UnboundedReceiverStream::new(up_rx))
        .await
        .map_err(lost)?
        .into_inner();
    info!(%ring_addr, coordinator = %opts.coordinator, "joined; waiting for an assignment");

    let abort = Arc::new(AtomicBool::new(false));
    let collective_abort: AbortSlot = Arc::new(Mutex::new(None));
    let progress = Arc::new(AtomicU64::new(0));
    let mut listener = Some(listener);
    let mut training: Option<oneshot::Receiver<Result<()>>> = None;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
    tokio::pin!(shutdown);

    let stop_training = || {
        abort.store(true, Ordering::SeqCst);
        if let Ok(slot) = collective_abort.lock()
            && let Some(handle) = slot.as_ref()
        {
            handle.abort();
        }
    };

    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(CoordinatorMessage { msg: Some(m) })) => m,
                    Ok(Some(CoordinatorMessage { msg: None })) => continue,
                    Ok(None) => {
                        stop_training();
                        return Err(Error::Coordinator { addr: opts.coordinator.clone(), message: "closed the session".into() });
                    }
                    Err(status) => {
                        stop_training();
                        return Err(lost(status));
                    }
                };
                match msg {
                    coordinator_message::Msg::Welcome(w) => info!(run = %w.run_name, waiting = w.waiting, min_workers = w.min_workers, "welcomed"),
                    coordinator_message::Msg::Reject(r) => return Err(Error::Rejected(r.reason)),
                    coordinator_message::Msg::Assignment(a) => {
                        let Some(listener) = listener.take() else {
                            warn!(generation = a.generation, "a second assignment is not supported yet; ignoring it");
                            continue;
                        };
                        heartbeat = tokio::time::interval(Duration::from_secs(RunSpec::from_json(&a.spec_json)?.cluster.heartbeat_interval_secs));
                        let (done_tx, done_rx) = oneshot::channel();
                        let job = Job {
                            assignment: a,
                            listener,
                            device: opts.device.clone(),
                            up: up.clone(),
                            abort: abort.clone(),
                            collective_abort: collective_abort.clone(),
                            progress: progress.clone(),
                        };
                        let span = span.clone();
                        std::thread::Builder::new()
                            .name("train".into())
                            .spawn(move || {
                                let _g = span.enter();
                                let _ = done_tx.send(train(job));
                            })
                            .map_err(|source| Error::Io { context: "start the training thread".into(), source })?;
                        training = Some(done_rx);
                    }
                    coordinator_message::Msg::Abort(a) => {
                        stop_training();
                        if let Some(done) = training.take() {
                            let _ = done.await;
                        }
                        return Err(Error::Aborted(format!("the coordinator aborted generation {}: {}", a.generation, a.reason)));
                    }
                    coordinator_message::Msg::Drain(d) => warn!(generation = d.generation, "drain not handled yet"),
                    coordinator_message::Msg::Stop(s) => {
                        stop_training();
                        if let Some(done) = training.take() {
                            let _ = done.await;
                        }
                        info!(reason = %s.reason, "stopped by the coordinator");
                        return Ok(Exit::Stopped(s.reason));
                    }
                }
            }
            result = async {
                match training.as_mut() {
                    Some(done) => done.await,
                    None => std::future::pending().await,
                }
            }, if training.is_some() => {
                training = None;
                match result {
                    Ok(Ok(())) => info!("assignment complete; waiting for the coordinator to stop the run"),
                    Ok(Err(e)) => {
                        send(&up, worker_message::Msg::Error(WorkerError { message: e.to_string(), ..Default::default() }));
                        // Exiting now could drop the report with the stream; the coordinator answers it (Abort), so
                        // wait for that — or for the session to end — a bounded time.
                        let answered = async {
                            while let Ok(Some(m)) = inbound.message().await {
                                if matches!(m.msg, Some(coordinator_message::Msg::Abort(_) | coordinator_message::Msg::Stop(_))) {
                                    break;
                                }
                            }
                        };
                        if tokio::time::timeout(REPORT_GRACE, answered).await.is_err() {
                            warn!(secs = REPORT_GRACE.as_secs(), "the coordinator did not answer the error report");
                        }
                        return Err(e);
                    }
                    Err(_) => return Err(Error::Model("the training thread ended without a result".into())),
                }
            }
            _ = heartbeat.tick() => send(&up, worker_message::Msg::Heartbeat(Heartbeat { step: progress.load(Ordering::Relaxed) })),
            () = &mut shutdown => {
                stop_training();
                if let Some(done) = training.take() {
                    let _ = done.await;
                }
                return Err(Error::Aborted("interrupted by a signal".into()));
            }
        }
    }
}

/// Where the training thread leaves its collective's abort handle for the session to use.
type AbortSlot = Arc<Mutex<Option<Box<dyn Abort>>>>;

/// Everything the training thread needs.
struct Job {
    assignment: Assignment,
    listener: RingListener,
    device: Device,
    up: Uplink,
    abort: Arc<AtomicBool>,
    collective_abort: AbortSlot,
    progress: Arc<AtomicU64>,
}

impl Job {
    /// Makes `handle` the one the session's abort uses; fires it at once if the abort came first. (The session sets
    /// its flag before it looks in the slot, and the flag is read here with the slot locked: one of the two sees the
    /// other.)
    fn set_abort(&self, handle: Box<dyn Abort>) {
        if let Ok(mut slot) = self.collective_abort.lock() {
            let handle = slot.insert(handle);
            if self.abort.load(Ordering::SeqCst) {
                handle.abort();
            }
        }
    }
}

/// Trains the assigned step range and reports each step; runs on its own thread (tensor math blocks).
fn train(job: Job) -> Result<()> {
    let a = &job.assignment;
    let spec = RunSpec::from_json(&a.spec_json)?;
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
            },
        )?;
        job.set_abort(Box::new(ring.abort_handle()));
        Box::new(ring)
    };
    let mut trainer = if a.resume_from.is_empty() {
        Trainer::new(spec.clone(), collective, job.device.clone())?
    } else {
        Trainer::resume(
            spec.clone(),
            collective,
            job.device.clone(),
            std::path::Path::new(&a.resume_from),
        )?
    };
    let ours = &trainer.corpus().fingerprint;
    if !a.data_fingerprint.is_empty() && *ours != a.data_fingerprint {
        return Err(Error::Common(lockstep_common::Error::Data {
            path: trainer.corpus().origin.clone(),
            message: format!(
                "this worker's copy of the training data is not the coordinator's (data fingerprint {} vs {}); give \
                 every host the same copy of data.path (the same lockstep prepare output, or the same file)",
                short(ours),
                short(&a.data_fingerprint)
            ),
        }));
    }
    if trainer.step() != a.start_step || trainer.data_cursor() != a.data_cursor {
        let from = if a.resume_from.is_empty() {
            "a new run".to_string()
        } else {
            format!("checkpoint {}", a.resume_from)
        };
        return Err(Error::Model(format!(
            "the assignment starts at step {} (data cursor {}) but {from} is at step {} (data cursor {})",
            a.start_step,
            a.data_cursor,
            trainer.step(),
            trainer.data_cursor()
        )));
    }
    info!(
        params = trainer.params().num_elements(),
        steps = a.end_step - a.start_step,
        "training"
    );
    let started = Instant::now();
    let last = a.end_step;
    while trainer.step() < last {
        if job.abort.load(Ordering::SeqCst) {
            return Err(Error::Aborted("training stopped".into()));
        }
        let out = trainer.train_step()?;
        job.progress.store(out.step, Ordering::Relaxed);
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
        info!(step = out.step, loss = out.loss, checksum = %param_checksum, ms = out.step_ms, "step done");
        send(
            &job.up,
            worker_message::Msg::Step(StepReport {
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
            send(
                &job.up,
                worker_message::Msg::Eval(EvalReport {
                    generation,
                    rank,
                    step: out.step,
                    val_loss,
                }),
            );
        }
        if rank == 0 && due(out.step, spec.checkpoint.interval, last) {
            let path = trainer.save_checkpoint()?;
            info!(step = out.step, path = %path.display(), "checkpoint written");
            send(
                &job.up,
                worker_message::Msg::Checkpoint(CheckpointReport {
                    generation,
                    rank,
                    step: out.step,
                    path: path.display().to_string(),
                }),
            );
        }
    }
    info!(
        steps = last - a.start_step,
        secs = started.elapsed().as_secs_f64(),
        "assignment done"
    );
    send(
        &job.up,
        worker_message::Msg::Finished(Finished {
            generation,
            rank,
            step: trainer.step(),
        }),
    );
    Ok(())
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
    job.set_abort(Box::new(abort.clone()));
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
