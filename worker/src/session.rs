//! The worker's life with its coordinator (DESIGN §2, §6): join, train each assignment on a dedicated thread while
//! forwarding reports and heartbeats up the stream, and obey abort / drain / stop — across generations and across
//! coordinator restarts.
//!
//! - An `Abort` ends the current generation: training stops (a hung collective is interrupted), the worker answers
//!   `Idle` and waits for its next assignment.
//! - A collective that breaks (a peer died) is reported as a peer failure; the worker stays for the next generation.
//!   Its own failure (bad data, out of memory) is reported and ends the worker.
//! - A lost coordinator (stream closed or broken) does not stop training; the worker reconnects with backoff (jittered,
//!   doubling to a few seconds) for up to `reconnect_timeout` and joins again — a restarted coordinator takes the
//!   generation over, or resumes the run from its newest checkpoint.
//! - Every attempt to join waits a bounded time for the coordinator's answer, and a signal ends the wait. Before its
//!   first welcome, a worker whose coordinator address turns out to be something else (HTTP/1, not gRPC, no
//!   Coordinator service) says so and ends, instead of retrying what waiting cannot fix.
//! - The first SIGTERM/SIGINT votes to stop after the current step: all ranks pause at that step, rank 0 checkpoints
//!   it, this worker leaves and the others re-form. A second signal stops at once.
mod train;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::Device;
use lockstep_common::RunSpec;
use lockstep_common::proto::{
    CheckpointCommitted, CoordinatorMessage, FailureKind, Heartbeat, Idle, Join, WorkerError, WorkerMessage,
    coordinator_message, worker_message,
};
use lockstep_common::transport::{self, ClientSecurity, not_a_coordinator};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{Instrument, debug, info, info_span, warn};

use self::train::{Controls, Failure, Job, TrainEnd};
use crate::checkpoint::{self, Retention};
use crate::collective::{RingListener, offered_nccl_id};
pub use crate::coordinator_link::default_worker_id;
use crate::coordinator_link::{Backoff, advertised_ring_addr, hostname, local_ip_towards, resolve};
use crate::error::{Error, Result};

/// How long a worker whose training failed waits for the coordinator to acknowledge its error report.
const REPORT_GRACE: Duration = Duration::from_secs(10);
/// Heartbeat interval until the coordinator's welcome says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);
/// The longest one attempt to join waits for the coordinator's answer to the Join (less when less of the time to
/// reach it is left, but never under `JOIN_ANSWER_MIN`). A coordinator answers at once; a port that accepts and
/// stays silent is not one, or a hung one.
const JOIN_ANSWER: Duration = Duration::from_secs(10);
const JOIN_ANSWER_MIN: Duration = Duration::from_secs(1);
/// The wait between attempts to join starts here and doubles up to `RETRY_CAP`.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_CAP: Duration = Duration::from_secs(5);
/// A session that held this long resets that wait; one that broke sooner counts as a failed attempt, so that a
/// coordinator that welcomes and drops a worker at once is not retried in a tight loop.
const STEADY_SESSION: Duration = Duration::from_secs(10);

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
    // A URL without a scheme, or TLS flags that do not fit it, fail now rather than after the connect timeout.
    transport::endpoint(&opts.coordinator, &opts.security)?;
    let coordinator_addr: SocketAddr = resolve(&opts.coordinator)?;
    let route = local_ip_towards(coordinator_addr);
    let listen = match (&opts.ring_listen, route) {
        (Some(addr), _) => addr.clone(),
        (None, Some(ip)) => SocketAddr::new(ip, 0).to_string(),
        // Without a route there is no address to give the other workers; say so in terms of what was asked.
        (None, None) => {
            return Err(Error::Usage(format!(
                "--coordinator {}: this host has no route to {coordinator_addr} (is the network up?), so it has no \
                 address to give the other workers; or give --ring-listen this host's IP address",
                opts.coordinator
            )));
        }
    };
    let listener = RingListener::bind(&listen)?;
    let ring_addr = advertised_ring_addr(listener.local_addr(), route)?;
    let me = Identity {
        worker_id: opts.worker_id.clone().unwrap_or_else(default_worker_id),
        host: hostname(),
        ring_addr: ring_addr.to_string(),
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
        welcomed: false,
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
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_CAP);
    let mut patience = Patience::new(opts.connect_timeout);
    loop {
        let attempt = tokio::select! {
            attempt = join(opts, me, state, patience.left()) => attempt,
            _ = signals.changed() => return interrupted(state).await,
        };
        let (failed, lost_session) = match attempt {
            Ok(joined) => {
                state.welcomed |= joined.welcomed();
                let began = Instant::now();
                match session(opts, me, joined, signals, state).await {
                    Ok(exit) => return Ok(exit),
                    Err(SessionEnd::Fatal(e)) => return fail(state, e).await,
                    Err(SessionEnd::Lost(e)) => {
                        if began.elapsed() >= STEADY_SESSION {
                            backoff.reset();
                        }
                        patience = Patience::new(opts.reconnect_timeout);
                        (e, true)
                    }
                }
            }
            Err(SessionEnd::Fatal(e)) => return fail(state, e).await,
            Err(SessionEnd::Lost(e)) => (e, false),
        };
        if *signals.borrow() > 0 {
            return fail(state, failed).await;
        }
        let delay = backoff.next_delay();
        if patience.runs_out_within(delay) {
            let e = patience.gave_up(opts, state.welcomed, &failed);
            return fail(state, e).await;
        }
        if lost_session {
            // Training goes on: the coordinator is not on the data path, and a restarted one adopts the generation
            // when every member is back. Reports wait in `events` meanwhile.
            warn!(
                error = %failed,
                secs = opts.reconnect_timeout.as_secs(),
                training = state.training.is_some(),
                retry_in = ?delay,
                "lost the coordinator; reconnecting"
            );
        } else {
            warn!(error = %failed, retry_in = ?delay, "could not join the coordinator; retrying");
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = signals.changed() => return interrupted(state).await,
        }
    }
}

/// A signal while not joined: nobody can agree on a checkpoint; stop now.
async fn interrupted(state: &mut State) -> Result<Exit> {
    fail(
        state,
        Error::Aborted("interrupted by a signal while the coordinator was unreachable".into()),
    )
    .await
}

async fn fail(state: &mut State, e: Error) -> Result<Exit> {
    stop(&mut state.training).await;
    Err(e)
}

/// How long the worker keeps trying to join: from its start (`--connect-timeout-secs`), then from each loss of the
/// coordinator (`--reconnect-timeout-secs`). Failed attempts in between do not restart it.
struct Patience {
    window: Duration,
    /// `None`: a window too long to end.
    until: Option<Instant>,
}

impl Patience {
    fn new(window: Duration) -> Self {
        Self {
            window,
            until: Instant::now().checked_add(window),
        }
    }

    fn left(&self) -> Duration {
        self.until
            .map_or(Duration::MAX, |until| until.saturating_duration_since(Instant::now()))
    }

    fn runs_out_within(&self, wait: Duration) -> bool {
        self.left() <= wait
    }

    /// The error a worker ends with when no attempt worked; `last` says why the last one did not.
    fn gave_up(&self, opts: &WorkerOptions, welcomed: bool, last: &Error) -> Error {
        let why = match last {
            Error::Coordinator { message, .. } => message.clone(),
            other => other.to_string(),
        };
        Error::Coordinator {
            addr: opts.coordinator.clone(),
            message: format!(
                "could not {} within {:.0?}: {why}",
                if welcomed { "rejoin" } else { "join" },
                self.window
            ),
        }
    }
}

/// A session the coordinator answered: the stream both ways and its first message (a Welcome, or a Reject).
struct Joined {
    up: Uplink,
    inbound: tonic::Streaming<CoordinatorMessage>,
    first: coordinator_message::Msg,
}

impl Joined {
    fn welcomed(&self) -> bool {
        matches!(self.first, coordinator_message::Msg::Welcome(_))
    }
}

/// One attempt to join: connect, send the Join, and wait — a bounded time — for the coordinator's first answer. A
/// port that accepts connections but never answers must not hold the worker forever.
async fn join(opts: &WorkerOptions, me: &Identity, state: &State, left: Duration) -> Result<Joined, SessionEnd> {
    let client = transport::connect(&opts.coordinator, &opts.security, left)
        .await
        .map_err(|e| SessionEnd::Fatal(e.into()))?;
    let wait = left.clamp(JOIN_ANSWER_MIN, JOIN_ANSWER);
    match tokio::time::timeout(wait, open(opts, me, state, client)).await {
        Ok(joined) => joined,
        Err(_) => Err(SessionEnd::Lost(Error::Coordinator {
            addr: opts.coordinator.clone(),
            message: format!(
                "no answer to this worker's Join within {wait:.0?}; is this the --listen address of a \
                 lockstep-coordinator?"
            ),
        })),
    }
}

/// Opens the session with this worker's Join and reads the coordinator's first answer.
async fn open(
    opts: &WorkerOptions,
    me: &Identity,
    state: &State,
    mut client: transport::CoordinatorClient,
) -> Result<Joined, SessionEnd> {
    let (up, up_rx) = mpsc::unbounded_channel();
    let training = &state.training;
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
            training_step: state.progress.load(Ordering::Relaxed),
        }),
    );
    let failed = |what: &str, status: tonic::Status| join_failed(opts, state.welcomed, what, &status);
    let mut inbound = client
        .session(UnboundedReceiverStream::new(up_rx))
        .await
        .map_err(|status| failed("session refused", status))?
        .into_inner();
    loop {
        match inbound.message().await {
            Ok(Some(CoordinatorMessage { msg: Some(first) })) => return Ok(Joined { up, inbound, first }),
            Ok(Some(CoordinatorMessage { msg: None })) => {}
            Ok(None) => {
                return Err(SessionEnd::Lost(Error::Coordinator {
                    addr: opts.coordinator.clone(),
                    message: "closed the session before answering the Join".into(),
                }));
            }
            Err(status) => return Err(failed("session failed", status)),
        }
    }
}

/// How a session that could not start ends: for good where joining again cannot help.
fn join_failed(opts: &WorkerOptions, welcomed: bool, what: &str, status: &tonic::Status) -> SessionEnd {
    let error = |message: String| Error::Coordinator {
        addr: opts.coordinator.clone(),
        message,
    };
    let detail = status_detail(status);
    match status.code() {
        // Joining again cannot fix these: a wrong token, a protocol mismatch, a server being told to stop.
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
            SessionEnd::Fatal(error(format!("{what}: {detail}")))
        }
        // Only before the first welcome: a worker that has trained with this coordinator keeps trying while its
        // training goes on, whatever answers at that address meanwhile.
        _ if !welcomed && not_a_coordinator(status) => SessionEnd::Fatal(error(format!(
            "does not speak the lockstep protocol ({detail}); is it a lockstep-coordinator's --listen address?"
        ))),
        _ => SessionEnd::Lost(error(format!("{what}: {detail}"))),
    }
}

/// A failed call's message with its first cause, which tonic's message often leaves out ("transport error").
fn status_detail(status: &tonic::Status) -> String {
    let mut detail = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    };
    let mut root = std::error::Error::source(status);
    while let Some(cause) = root.and_then(std::error::Error::source) {
        root = Some(cause);
    }
    if let Some(root) = root.map(ToString::to_string)
        && !detail.contains(&root)
    {
        detail = format!("{detail}: {root}");
    }
    detail
}

/// The first message, read when the session opened, then the stream's.
async fn next_message(
    first: &mut Option<coordinator_message::Msg>,
    inbound: &mut tonic::Streaming<CoordinatorMessage>,
) -> Result<Option<CoordinatorMessage>, tonic::Status> {
    match first.take() {
        Some(msg) => Ok(Some(CoordinatorMessage { msg: Some(msg) })),
        None => inbound.message().await,
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
    /// The coordinator has welcomed this worker at least once: it is a coordinator, whatever fails later.
    welcomed: bool,
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

/// One session, from the coordinator's first answer until it ends.
async fn session(
    opts: &WorkerOptions,
    me: &Identity,
    joined: Joined,
    signals: &mut Signals,
    state: &mut State,
) -> Result<Exit, SessionEnd> {
    let Joined { up, mut inbound, first } = joined;
    let mut first = Some(first);
    let training = &mut state.training;
    let progress = state.progress.clone();
    let lost = |message: String| {
        SessionEnd::Lost(Error::Coordinator {
            addr: opts.coordinator.clone(),
            message,
        })
    };
    info!(ring_addr = %me.ring_addr, coordinator = %opts.coordinator, "joined; waiting for an assignment");

    let mut heartbeat = tokio::time::interval(DEFAULT_HEARTBEAT);
    if *signals.borrow() > 0 && training.is_none() {
        return Ok(Exit::Left);
    }

    loop {
        tokio::select! {
            msg = next_message(&mut first, &mut inbound) => {
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
