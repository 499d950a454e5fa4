//! The worker's life with its coordinator (DESIGN §2, §6): join, train each assignment on a dedicated thread while
//! forwarding reports and heartbeats up the stream, and obey abort / drain / stop — across generations and across
//! coordinator restarts.
//!
//! - An `Abort` ends the current generation: training stops (a hung collective is interrupted), the worker answers
//!   `Idle` and waits for its next assignment.
//! - A collective that breaks (a peer died) is reported as a peer failure; the worker stays for the next generation.
//!   Its own failure (bad data, out of memory) is reported and ends the worker.
//! - A lost coordinator (stream closed or broken) stops training; the worker reconnects with backoff for up to
//!   `reconnect_timeout` and joins again — the restarted coordinator resumes the run from its newest checkpoint.
//! - The first SIGTERM/SIGINT votes to stop after the current step: all ranks pause at that step, rank 0 checkpoints
//!   it, this worker leaves and the others re-form. A second signal stops at once.
mod train;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use candle_core::Device;
use lockstep_common::RunSpec;
use lockstep_common::proto::{
    CheckpointCommitted, CoordinatorMessage, FailureKind, Heartbeat, Idle, Join, WorkerError, WorkerMessage,
    coordinator_message, worker_message,
};
use lockstep_common::transport::{self, ClientSecurity};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{Instrument, debug, info, info_span, warn};

use self::train::{Controls, Failure, Job, TrainEnd};
use crate::checkpoint::{self, Retention};
use crate::collective::{RingListener, offered_nccl_id};
pub use crate::coordinator_link::default_worker_id;
use crate::coordinator_link::{hostname, local_ip_towards, resolve};
use crate::error::{Error, Result};

/// How long a worker whose training failed waits for the coordinator to acknowledge its error report.
const REPORT_GRACE: Duration = Duration::from_secs(10);
/// Heartbeat interval until the coordinator's welcome says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);

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
    /// After losing the coordinator, keep trying to reach it again this long.
    pub reconnect_timeout: Duration,
    /// The run token and TLS settings for the coordinator.
    pub security: ClientSecurity,
}

/// How a worker ended without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The coordinator said the run is over.
    Stopped(String),
    /// It left after a signal (having checkpointed with the others when it was training).
    Left,
}

/// Messages up the stream; the training thread holds a clone.
type Uplink = mpsc::UnboundedSender<WorkerMessage>;

fn send(up: &Uplink, msg: worker_message::Msg) {
    // The receiver lives as long as the session; if it is gone the session is ending anyway.
    let _ = up.send(WorkerMessage { msg: Some(msg) });
}

/// Signals received so far (SIGTERM/SIGINT): 1 = leave after the current step, 2 = stop at once.
pub type Signals = watch::Receiver<u32>;

/// How one session with the coordinator ended, when the worker is not done.
enum SessionEnd {
    /// The worker must stop (rejected, failed, interrupted).
    Fatal(Error),
    /// The coordinator went away or dropped this worker; joining again may work.
    Lost(Error),
}

/// Who this worker is, for every session it opens.
struct Identity {
    worker_id: String,
    host: String,
    ring_addr: String,
    listener: Arc<RingListener>,
}

/// Runs the worker to its end: `Ok` after the coordinator's stop or a graceful leave, `Err` on reject, its own
/// failure, a second signal, or a coordinator unreachable for longer than `reconnect_timeout`.
pub async fn run(opts: WorkerOptions, mut signals: Signals) -> Result<Exit> {
    let coordinator_addr: SocketAddr = resolve(&opts.coordinator)?;
    let listen = match &opts.ring_listen {
        Some(addr) => addr.clone(),
        None => format!("{}:0", local_ip_towards(coordinator_addr)),
    };
    let listener = RingListener::bind(&listen)?;
    let me = Identity {
        worker_id: opts.worker_id.clone().unwrap_or_else(default_worker_id),
        host: hostname(),
        ring_addr: listener.local_addr().to_string(),
        listener: Arc::new(listener),
    };
    let span = info_span!("worker", worker = %me.worker_id);
    let (events, events_rx) = mpsc::unbounded_channel();
    let mut state = State {
        training: None,
        events,
        events_rx,
        progress: Arc::default(),
        retention: None,
        pruning: None,
    };
    async move {
        let exit = serve(&opts, &me, &mut signals, &mut state).await;
        // The prune after the final checkpoint comes just before the Stop: exiting without it would leave one
        // checkpoint more than `checkpoint.keep` on disk.
        if let Some(pruning) = state.pruning.take() {
            let _ = pruning.await;
        }
        exit
    }
    .instrument(span)
    .await
}

/// Sessions with the coordinator, one after another, until the worker's end.
async fn serve(opts: &WorkerOptions, me: &Identity, signals: &mut Signals, state: &mut State) -> Result<Exit> {
    let mut timeout = opts.connect_timeout;
    loop {
        let connected = tokio::select! {
            connected = transport::connect(&opts.coordinator, &opts.security, timeout) => connected,
            // A signal while the coordinator is unreachable: nobody can agree on a checkpoint; stop now.
            _ = signals.changed() => {
                stop(&mut state.training).await;
                return Err(Error::Aborted("interrupted by a signal while the coordinator was unreachable".into()));
            }
        };
        let client = match connected {
            Ok(client) => client,
            Err(e) => {
                stop(&mut state.training).await;
                return Err(e.into());
            }
        };
        let ended = session(opts, me, client, signals, state).await;
        match ended {
            Ok(exit) => return Ok(exit),
            Err(SessionEnd::Fatal(e)) => {
                stop(&mut state.training).await;
                return Err(e);
            }
            Err(SessionEnd::Lost(e)) if *signals.borrow() > 0 => {
                stop(&mut state.training).await;
                return Err(e);
            }
            Err(SessionEnd::Lost(e)) => {
                // Training goes on: the coordinator is not on the data path, and a restarted one adopts the
                // generation when every member is back. Reports wait in `events` meanwhile.
                warn!(
                    error = %e,
                    secs = opts.reconnect_timeout.as_secs(),
                    training = state.training.is_some(),
                    "lost the coordinator; reconnecting"
                );
                timeout = opts.reconnect_timeout;
            }
        }
    }
}

/// What outlives one session: the training in progress and the reports it has not been able to send yet.
struct State {
    training: Option<Training>,
    /// The training threads' reports; forwarded to whichever session is open, kept while none is.
    events: Uplink,
    events_rx: mpsc::UnboundedReceiver<WorkerMessage>,
    /// The newest step done, for heartbeats and rejoining.
    progress: Arc<std::sync::atomic::AtomicU64>,
    /// Where the latest assignment's checkpoints go and how many to keep; `None` before the first assignment.
    /// Kept past the training, since the coordinator may confirm its checkpoints after it ended.
    retention: Option<Retention>,
    /// The prune in progress: the next one waits for it, and the worker does before it exits.
    pruning: Option<JoinHandle<()>>,
}

/// The training in progress, if any.
struct Training {
    generation: u64,
    rank: u32,
    controls: Controls,
    done: oneshot::Receiver<Result<TrainEnd, Failure>>,
    /// The coordinator aborted this generation; answer `Idle` once the thread has stopped.
    aborted: bool,
}

impl Training {
    /// Interrupts the training and waits for its thread to end.
    async fn stop(self) {
        self.controls.abort_now();
        let _ = self.done.await;
    }
}

/// One session: join, then serve the coordinator until it ends.
async fn session(
    opts: &WorkerOptions,
    me: &Identity,
    mut client: transport::CoordinatorClient,
    signals: &mut Signals,
    state: &mut State,
) -> Result<Exit, SessionEnd> {
    let (up, up_rx) = mpsc::unbounded_channel();
    let training = &mut state.training;
    let progress = state.progress.clone();
    send(
        &up,
        worker_message::Msg::Join(Join {
            protocol_version: lockstep_common::PROTOCOL_VERSION,
            worker_id: me.worker_id.clone(),
            host: me.host.clone(),
            device: opts.device_name.clone(),
            ring_addr: me.ring_addr.clone(),
            spec_json: opts.spec.as_ref().map(RunSpec::to_json).unwrap_or_default(),
            nccl_unique_id: offered_nccl_id(&opts.device),
            training: training.is_some(),
            training_generation: training.as_ref().map_or(0, |t| t.generation),
            training_rank: training.as_ref().map_or(0, |t| t.rank),
            training_step: progress.load(Ordering::Relaxed),
        }),
    );
    let lost = |message: String| {
        SessionEnd::Lost(Error::Coordinator {
            addr: opts.coordinator.clone(),
            message,
        })
    };
    let mut inbound = client
        .session(UnboundedReceiverStream::new(up_rx))
        .await
        .map_err(|e| {
            let message = format!("session refused: {}", e.message());
            match e.code() {
                // Joining again cannot fix these: a wrong token, a protocol mismatch, a server being told to stop.
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                    SessionEnd::Fatal(Error::Coordinator {
                        addr: opts.coordinator.clone(),
                        message,
                    })
                }
                _ => lost(message),
            }
        })?
        .into_inner();
    info!(ring_addr = %me.ring_addr, coordinator = %opts.coordinator, "joined; waiting for an assignment");

    let mut heartbeat = tokio::time::interval(DEFAULT_HEARTBEAT);
    if *signals.borrow() > 0 && training.is_none() {
        return Ok(Exit::Left);
    }

    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(CoordinatorMessage { msg: Some(m) })) => m,
                    Ok(Some(CoordinatorMessage { msg: None })) => continue,
                    Ok(None) => return Err(lost("closed the session".into())),
                    Err(status) => return Err(lost(format!("session failed: {}", status.message()))),
                };
                match msg {
                    coordinator_message::Msg::Welcome(w) => {
                        info!(run = %w.run_name, waiting = w.waiting, min_workers = w.min_workers, "welcomed");
                        if w.heartbeat_interval_secs > 0 {
                            heartbeat = tokio::time::interval(Duration::from_secs(w.heartbeat_interval_secs));
                        }
                    }
                    coordinator_message::Msg::Reject(r) => {
                        stop(training).await;
                        return Err(SessionEnd::Fatal(Error::Rejected(r.reason)));
                    }
                    coordinator_message::Msg::Assignment(a) => {
                        if training.is_some() {
                            warn!(generation = a.generation, "a new assignment while training; stopping the old one first");
                            stop(training).await;
                        }
                        // An unreadable spec fails the training thread, which says why; nothing is pruned meanwhile.
                        state.retention = RunSpec::from_json(&a.spec_json).ok().map(|spec| Retention::of(&spec));
                        let controls = Controls { progress: progress.clone(), ..Controls::default() };
                        let (generation, rank) = (a.generation, a.rank);
                        let job = Job {
                            assignment: a,
                            listener: me.listener.clone(),
                            device: opts.device.clone(),
                            up: state.events.clone(),
                            controls: controls.clone(),
                            token: opts.security.token.clone(),
                        };
                        let (done_tx, done_rx) = oneshot::channel();
                        let span = tracing::Span::current();
                        std::thread::Builder::new()
                            .name("train".into())
                            .spawn(move || {
                                // On the CPU the loop runs on a compute pool thread (`compute_pool`): the span goes
                                // with it, since spans are entered per thread.
                                let device = job.device.clone();
                                let outcome = crate::compute_pool::run(&device, move || {
                                    let _g = span.enter();
                                    train::train(job)
                                });
                                let _ = done_tx.send(outcome);
                            })
                            .map_err(|source| SessionEnd::Fatal(Error::Io { context: "start the training thread".into(), source }))?;
                        *training = Some(Training { generation, rank, controls, done: done_rx, aborted: false });
                    }
                    coordinator_message::Msg::Abort(a) => {
                        info!(generation = a.generation, reason = %a.reason, "generation aborted");
                        if *signals.borrow() > 0 {
                            stop(training).await;
                            info!("leaving: asked to by a signal");
                            return Ok(Exit::Left);
                        }
                        match training.as_mut() {
                            // Not awaited here: the loop must keep sending heartbeats while a long step winds down.
                            Some(t) => {
                                t.aborted = true;
                                t.controls.abort_now();
                            }
                            None => send(&up, worker_message::Msg::Idle(Idle { generation: a.generation, nccl_unique_id: offered_nccl_id(&opts.device) })),
                        }
                    }
                    coordinator_message::Msg::Drain(d) => {
                        info!(generation = d.generation, reason = %d.reason, "pausing at the next step all ranks agree on");
                        if let Some(t) = &training {
                            t.controls.pause.store(true, Ordering::SeqCst);
                        }
                    }
                    coordinator_message::Msg::Committed(c) => {
                        prune_for(&mut state.pruning, state.retention.as_ref(), &c);
                    }
                    coordinator_message::Msg::Stop(s) => {
                        stop(training).await;
                        if s.failed {
                            return Err(SessionEnd::Fatal(Error::Aborted(s.reason)));
                        }
                        info!(reason = %s.reason, "stopped by the coordinator");
                        return Ok(Exit::Stopped(s.reason));
                    }
                }
            }
            result = async {
                match training.as_mut() {
                    Some(t) => (&mut t.done).await,
                    None => std::future::pending().await,
                }
            }, if training.is_some() => {
                let Some(t) = training.take() else { continue };
                // Everything the thread reported goes out before what its end leads to (Paused before leaving, the
                // last steps before an error).
                while let Ok(event) = state.events_rx.try_recv() {
                    let _ = up.send(event);
                }
                let generation = t.generation;
                if t.aborted {
                    debug!(generation, "training stopped after the abort");
                    send(&up, worker_message::Msg::Idle(Idle { generation, nccl_unique_id: offered_nccl_id(&opts.device) }));
                    continue;
                }
                match result {
                    Ok(Ok(TrainEnd::Finished)) => info!("assignment complete; waiting for the coordinator to stop the run"),
                    Ok(Ok(TrainEnd::Paused)) if t.controls.leaving.load(Ordering::SeqCst) => {
                        await_answer(&mut inbound).await;
                        info!("left the run after the agreed step");
                        return Ok(Exit::Left);
                    }
                    Ok(Ok(TrainEnd::Paused)) => info!(generation, "paused; waiting for the next assignment"),
                    Ok(Err(Failure::Stopped)) => {}
                    Ok(Err(Failure::Peer(e))) => {
                        warn!(error = %e, "the collective failed; waiting for the coordinator to re-form");
                        send(&up, worker_message::Msg::Error(WorkerError {
                            message: e.to_string(),
                            generation,
                            kind: FailureKind::Peer as i32,
                            checkpoint: String::new(),
                        }));
                    }
                    Ok(Err(Failure::Checkpoint { path, error })) => {
                        warn!(%path, error = %error, "the checkpoint to resume from is damaged");
                        send(&up, worker_message::Msg::Error(WorkerError {
                            message: error.to_string(),
                            generation,
                            kind: FailureKind::Checkpoint as i32,
                            checkpoint: path,
                        }));
                    }
                    Ok(Err(Failure::Own(e))) => {
                        send(&up, worker_message::Msg::Error(WorkerError {
                            message: e.to_string(),
                            generation,
                            kind: FailureKind::Own as i32,
                            checkpoint: String::new(),
                        }));
                        // Exiting now could drop the report with the stream; the coordinator answers it, so wait
                        // for that — or for the session to end — a bounded time.
                        await_answer(&mut inbound).await;
                        return Err(SessionEnd::Fatal(e));
                    }
                    Err(_) => {
                        return Err(SessionEnd::Fatal(Error::Model("the training thread ended without a result".into())));
                    }
                }
            }
            Some(event) = state.events_rx.recv() => {
                // Sent in order after the Join; anything older than this session was kept for it.
                let _ = up.send(event);
            }
            _ = heartbeat.tick() => send(&up, worker_message::Msg::Heartbeat(Heartbeat { step: progress.load(Ordering::Relaxed) })),
            changed = signals.changed() => {
                let count = if changed.is_ok() { *signals.borrow() } else { 2 };
                if count >= 2 {
                    stop(training).await;
                    return Err(SessionEnd::Fatal(Error::Aborted("interrupted by a second signal".into())));
                }
                match &training {
                    Some(t) => {
                        info!("leaving after the current step; the other workers go on without this one");
                        t.controls.leaving.store(true, Ordering::SeqCst);
                        t.controls.pause.store(true, Ordering::SeqCst);
                    }
                    // Not training: nothing to save; closing the stream tells the coordinator.
                    None => return Ok(Exit::Left),
                }
            }
        }
    }
}

/// Prunes for a checkpoint the coordinator committed. Deleting the checkpoints of a large model takes a while, so it
/// runs off the session loop, which must keep sending heartbeats; and after any prune still running, so that two
/// never delete the same directories at once.
fn prune_for(pruning: &mut Option<JoinHandle<()>>, retention: Option<&Retention>, c: &CheckpointCommitted) {
    let Some(Retention { root, keep }) = retention.cloned() else {
        debug!(step = c.step, path = %c.path, "a checkpoint committed before any assignment; nothing to prune");
        return;
    };
    debug!(step = c.step, path = %c.path, "checkpoint committed; pruning older ones");
    let (before, step) = (pruning.take(), c.step);
    let prune = async move {
        if let Some(before) = before {
            let _ = before.await;
        }
        let dir = root.clone();
        match tokio::task::spawn_blocking(move || checkpoint::prune_committed(&root, keep, step)).await {
            Ok(Ok(())) => {}
            // The checkpoints stay; the run does not depend on deleting them.
            Ok(Err(e)) => warn!(dir = %dir.display(), error = %e, "cannot prune old checkpoints"),
            Err(e) => warn!(dir = %dir.display(), error = %e, "pruning old checkpoints failed"),
        }
    };
    *pruning = Some(tokio::spawn(prune.in_current_span()));
}

async fn stop(training: &mut Option<Training>) {
    if let Some(t) = training.take() {
        t.stop().await;
    }
}

/// Waits (a bounded time) for the coordinator to answer a report this worker sends before it exits.
async fn await_answer(inbound: &mut tonic::Streaming<CoordinatorMessage>) {
    let answered = async {
        while let Ok(Some(m)) = inbound.message().await {
            if matches!(
                m.msg,
                Some(coordinator_message::Msg::Abort(_) | coordinator_message::Msg::Stop(_))
            ) {
                break;
            }
        }
    };
    if tokio::time::timeout(REPORT_GRACE, answered).await.is_err() {
        warn!(secs = REPORT_GRACE.as_secs(), "the coordinator did not answer in time");
    }
}
