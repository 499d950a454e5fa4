//! The gRPC adapter: turns sessions into [`Event`]s for the [`RunMachine`] and carries out its [`Action`]s.
//!
//! The machine sits behind a plain `std::sync::Mutex`: `handle` is synchronous and short, and outbound messages go
//! into unbounded channels (a run sends a handful per worker, never one per step), so the lock is never held across
//! an `.await`. After every event the status is republished on a `watch` channel that `WatchStatus` follows.
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::Stream;
use lockstep_common::proto::{
    self, CoordinatorMessage, GetHistoryRequest, GetStatusRequest, RunHistory, RunStatus, WatchStatusRequest,
    WorkerMessage, coordinator_server::Coordinator, worker_message::Msg as Up,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::error::Error;
use crate::machine::{Action, ConnId, Event, Phase, RunMachine, RunOutcome};
use crate::record::Record;
use crate::store::Store;

/// How long a new session may take to send its `Join`.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

type Outbound = mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>;

struct Session {
    outbound: Outbound,
    /// Dropping this tells the session's reader to stop.
    _close: oneshot::Sender<()>,
}

struct Inner {
    machine: RunMachine,
    sessions: HashMap<ConnId, Session>,
    /// The run's durable state; `None` keeps it in memory only (tests of the service alone). Shared with
    /// `GetHistory`, which reads it outside this lock (redb readers do not block the writer).
    store: Option<Arc<Store>>,
}

/// The run machine plus the open sessions, shared by every RPC and by the server's tasks.
pub struct Shared {
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
    status: watch::Sender<RunStatus>,
    outcome: watch::Sender<Option<RunOutcome>>,
    open_sessions: watch::Sender<usize>,
    stopping: watch::Sender<bool>,
    /// A routine report changed the status since it was last published.
    stale: AtomicBool,
}

impl Shared {
    pub fn new(machine: RunMachine, store: Option<Store>) -> Arc<Self> {
        let status = machine.status(Instant::now());
        let outcome = machine.outcome();
        Arc::new(Self {
            inner: Mutex::new(Inner {
                machine,
                sessions: HashMap::new(),
                store: store.map(Arc::new),
            }),
            next_conn: AtomicU64::new(1),
            status: watch::Sender::new(status),
            outcome: watch::Sender::new(outcome),
            open_sessions: watch::Sender::new(0),
            stopping: watch::Sender::new(false),
            stale: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing under this lock is meant to panic; if something did, keep answering status and sessions
        // rather than turn one bug into a panic in every RPC.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Feeds one event to the machine, carries out its actions and republishes the status. What the machine asks to
    /// persist is written before any message goes out, so nobody acts on a decision a restart would forget.
    pub fn handle(&self, event: Event) {
        let now = Instant::now();
        // Reports and heartbeats arrive once per worker per step or second; rebuilding the status (which lists every
        // worker) for each would cost O(workers²) per step. They only mark it stale, and `publish_if_stale` (the
        // server calls it every `PUBLISH_EVERY`) sends it; everything else is published at once.
        let routine = matches!(&event, Event::Message { msg, .. } if !matches!(msg, Up::Join(_) | Up::Error(_)));
        let heartbeat = matches!(
            &event,
            Event::Message {
                msg: Up::Heartbeat(_),
                ..
            }
        );
        let mut inner = self.lock();
        let before = (inner.machine.phase(), inner.machine.generation());
        let mut actions = inner.machine.handle(event, now);
        let records: Vec<Record> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Persist(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        if let (Some(store), false) = (inner.store.as_ref(), records.is_empty())
            && let Err(e) = store.append(&records)
        {
            error!(error = %e, "cannot persist the run state; failing the run");
            // A commit that was not recorded must not be confirmed: its writer would prune the checkpoint that a
            // coordinator started again on this state resumes from.
            actions.retain(|a| !confirms_commit(a));
            let message = e.to_string();
            actions.extend(inner.machine.handle(Event::StoreFailed { message }, now));
            // Its own Ended record cannot be written either; the state keeps the run resumable.
        }
        for action in actions {
            match action {
                Action::Persist(_) => {}
                Action::Send { conn, msg } => match inner.sessions.get(&conn) {
                    // A send fails only when the response stream is already gone; its reader reports that.
                    Some(session) => {
                        let _ = session.outbound.send(Ok(msg));
                    }
                    None => debug!(%conn, "message for a closed session dropped"),
                },
                Action::Close { conn } => {
                    inner.sessions.remove(&conn);
                }
                Action::RunEnded { outcome } => {
                    self.outcome.send_replace(Some(outcome));
                }
            }
        }
        let after = (inner.machine.phase(), inner.machine.generation());
        if routine && before == after {
            if !heartbeat {
                self.stale.store(true, Ordering::Release);
            }
            return;
        }
        self.publish(&inner, now);
    }

    /// Republishes the status if a routine report changed it since the last time.
    pub fn publish_if_stale(&self) {
        if self.stale.load(Ordering::Acquire) {
            let inner = self.lock();
            self.publish(&inner, Instant::now());
        }
    }

    fn publish(&self, inner: &Inner, now: Instant) {
        self.stale.store(false, Ordering::Release);
        // Published under the lock: two events handled back to back must not publish their statuses in the
        // opposite order, or watchers could be left looking at a stale one.
        let status = inner.machine.status(now);
        self.status.send_if_modified(|old| {
            // Elapsed time alone is not a change worth a message to every watcher.
            let mut compare = status.clone();
            compare.elapsed_secs = old.elapsed_secs;
            let changed = compare != *old;
            *old = status;
            changed
        });
    }

    /// Asks the run to stop cleanly; `Err` with the reason when it has already ended.
    pub fn request_stop(&self, reason: String) -> Result<(), String> {
        let phase = self.lock().machine.phase();
        if phase.is_final() {
            return Err(format!("the run already ended ({})", phase_name(phase)));
        }
        self.handle(Event::StopRequested { reason });
        Ok(())
    }

    pub fn status_now(&self) -> RunStatus {
        self.lock().machine.status(Instant::now())
    }

    pub fn outcome(&self) -> Option<RunOutcome> {
        self.outcome.borrow().clone()
    }

    /// Resolves when the run has ended.
    pub async fn ended(&self) -> RunOutcome {
        let mut rx = self.outcome.subscribe();
        // The sender lives in `self`, so waiting cannot fail while `self` is borrowed.
        if let Ok(outcome) = rx.wait_for(Option::is_some).await
            && let Some(outcome) = outcome.clone()
        {
            return outcome;
        }
        std::future::pending().await
    }

    /// Resolves when no session is open.
    pub async fn sessions_closed(&self) {
        let mut rx = self.open_sessions.subscribe();
        let _ = rx.wait_for(|&n| n == 0).await;
    }

    /// Resolves once [`Shared::stop`] was called.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|&s| s).await;
    }

    /// Ends every session and status stream, so the gRPC server can shut down gracefully.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
        self.lock().sessions.clear();
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    fn open(&self, conn: ConnId, outbound: Outbound, close: oneshot::Sender<()>) -> Result<(), Error> {
        let mut inner = self.lock();
        // Checked under the lock, so `stop` cannot miss a session registered concurrently.
        if self.is_stopping() {
            return Err(Error::ShuttingDown);
        }
        inner.sessions.insert(
            conn,
            Session {
                outbound,
                _close: close,
            },
        );
        self.open_sessions.send_modify(|n| *n += 1);
        Ok(())
    }

    fn session_ended(&self, conn: ConnId, reason: String) {
        self.lock().sessions.remove(&conn);
        // On shutdown every stream closes at once; that is not news about the workers.
        if !self.is_stopping() {
            self.handle(Event::Disconnected { conn, reason });
        }
        self.open_sessions.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The `lockstep.v1.Coordinator` service.
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
    /// The encoded size a `GetHistory` message may reach (see [`crate::history::message_budget`]).
    history_message_bytes: usize,
}

impl CoordinatorService {
    /// A service whose messages stay under `max_message_bytes` (the server's `security.max_message_bytes`).
    pub fn new(shared: Arc<Shared>, max_message_bytes: usize) -> Self {
        Self {
            shared,
            history_message_bytes: crate::history::message_budget(max_message_bytes),
        }
    }
}

/// A `CheckpointCommitted`, which lets its writer delete older checkpoints.
fn confirms_commit(action: &Action) -> bool {
    matches!(
        action,
        Action::Send {
            msg: CoordinatorMessage {
                msg: Some(proto::coordinator_message::Msg::Committed(_))
            },
            ..
        }
    )
}

fn kind(msg: &Up) -> &'static str {
    match msg {
        Up::Join(_) => "join",
        Up::Heartbeat(_) => "heartbeat",
        Up::Step(_) => "step",
        Up::Eval(_) => "eval",
        Up::Checkpoint(_) => "checkpoint",
        Up::Finished(_) => "finished",
        Up::Error(_) => "error",
        Up::Idle(_) => "idle",
        Up::Paused(_) => "paused",
    }
}

async fn first_join(inbound: &mut Streaming<WorkerMessage>) -> Result<proto::Join, Error> {
    let first = tokio::time::timeout(JOIN_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Error::JoinTimeout {
            secs: JOIN_TIMEOUT.as_secs(),
        })?;
    match first {
        Ok(Some(WorkerMessage {
            msg: Some(Up::Join(join)),
        })) => Ok(join),
        Ok(Some(WorkerMessage { msg: Some(other) })) => Err(Error::Protocol(format!(
            "the first message must be Join, got {}",
            kind(&other)
        ))),
        Ok(Some(WorkerMessage { msg: None })) => Err(Error::Protocol(
            "the first message must be Join, got an empty message".into(),
        )),
        Ok(None) => Err(Error::Protocol("the stream ended before Join".into())),
        Err(status) => Err(Error::Protocol(format!(
            "the stream failed before Join: {}",
            status.message()
        ))),
    }
}

/// Forwards a session's messages to the machine until the stream ends or the coordinator closes it.
async fn read_session(
    shared: Arc<Shared>,
    conn: ConnId,
    mut inbound: Streaming<WorkerMessage>,
    mut close: oneshot::Receiver<()>,
) {
    let reason = loop {
        tokio::select! {
            _ = &mut close => break "closed by the coordinator".to_string(),
            next = inbound.message() => match next {
                Ok(Some(WorkerMessage { msg: Some(msg) })) => shared.handle(Event::Message { conn, msg }),
                Ok(Some(WorkerMessage { msg: None })) => debug!("empty message ignored"),
                Ok(None) => break "stream closed".to_string(),
                Err(status) => break format!("stream error: {}", status.message()),
            },
        }
    };
    info!(%reason, "session ended");
    shared.session_ended(conn, reason);
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Waiting => "waiting",
        Phase::Running => "running",
        Phase::Reforming => "re-forming",
        Phase::Finished => "finished",
        Phase::Failed => "failed",
        Phase::Stopped => "stopped",
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<RunStatus, Status>> + Send>>;
type HistoryStream = Pin<Box<dyn Stream<Item = Result<RunHistory, Status>> + Send>>;

fn is_final(status: &RunStatus) -> bool {
    matches!(
        proto::RunState::try_from(status.state),
        Ok(proto::RunState::Finished | proto::RunState::Failed | proto::RunState::Stopped)
    )
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type SessionStream = UnboundedReceiverStream<Result<CoordinatorMessage, Status>>;
    type WatchStatusStream = StatusStream;
    type GetHistoryStream = HistoryStream;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let conn = ConnId(self.shared.next_conn.fetch_add(1, Ordering::Relaxed));
        let remote = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let span = info_span!("session", %conn, %remote, worker = tracing::field::Empty);
        let shared = self.shared.clone();
        async move {
            let mut inbound = request.into_inner();
            let join = first_join(&mut inbound)
                .await
                .inspect_err(|e| warn!(error = %e, "session refused"))?;
            tracing::Span::current().record("worker", join.worker_id.as_str());
            let (outbound, rx) = mpsc::unbounded_channel();
            let (close_tx, close_rx) = oneshot::channel();
            shared.open(conn, outbound, close_tx)?;
            shared.handle(Event::Joined { conn, join });
            tokio::spawn(read_session(shared, conn, inbound, close_rx).in_current_span());
            Ok(Response::new(UnboundedReceiverStream::new(rx)))
        }
        .instrument(span)
        .await
    }

    async fn stop_run(
        &self,
        request: Request<proto::StopRunRequest>,
    ) -> Result<Response<proto::StopRunResponse>, Status> {
        let remote = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let _span = info_span!("stop_run", %remote).entered();
        let mut reason = request.into_inner().reason;
        if reason.trim().is_empty() {
            reason = format!("stop requested over gRPC from {remote}");
        }
        info!(%reason, "stop requested");
        let response = match self.shared.request_stop(reason) {
            Ok(()) => proto::StopRunResponse {
                accepted: true,
                message: "stopping: the workers checkpoint at an agreed step, then the run stops (resumable)".into(),
            },
            Err(message) => proto::StopRunResponse {
                accepted: false,
                message,
            },
        };
        Ok(Response::new(response))
    }

    async fn get_status(&self, _request: Request<GetStatusRequest>) -> Result<Response<RunStatus>, Status> {
        let _span = info_span!("get_status").entered();
        Ok(Response::new(self.shared.status_now()))
    }

    async fn get_history(
        &self,
        request: Request<GetHistoryRequest>,
    ) -> Result<Response<Self::GetHistoryStream>, Status> {
        let after_step = request.into_inner().after_step;
        let store = self.shared.lock().store.clone().ok_or(Error::NoHistory)?;
        let max_bytes = self.history_message_bytes;
        // Folding every record takes a while on a long run: off the async threads, and outside the machine's lock.
        let read = tokio::task::spawn_blocking(move || {
            store
                .load()
                .map(|saved| crate::history::messages(&saved, after_step, max_bytes))
        });
        let messages = read
            .instrument(info_span!("get_history", after_step))
            .await
            .map_err(|e| Status::internal(format!("reading the run history failed: {e}")))??;
        Ok(Response::new(Box::pin(futures::stream::iter(
            messages.into_iter().map(Ok),
        ))))
    }

    async fn watch_status(
        &self,
        _request: Request<WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let _span = info_span!("watch_status").entered();
        let shared = self.shared.clone();
        let rx = self.shared.status.subscribe();
        // The current snapshot first, then one per change; the final status is the last item. When the server stops,
        // a status published but not yet sent (the final one, typically) still goes out before the stream ends.
        let updates = futures::stream::unfold((rx, true, false), move |(mut rx, first, done)| {
            let shared = shared.clone();
            async move {
                if done {
                    return None;
                }
                if !first {
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() {
                            return None;
                        },
                        () = shared.stopped() => if !rx.has_changed().unwrap_or(false) {
                            return None;
                        },
                    }
                }
                let status = rx.borrow_and_update().clone();
                let done = is_final(&status) || shared.is_stopping();
                Some((Ok(status), (rx, false, done)))
            }
        });
        Ok(Response::new(Box::pin(updates)))
    }
}
