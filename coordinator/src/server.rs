//! Serves one run: the Coordinator service, gRPC health and reflection, and the heartbeat tick, until the run has
//! ended and its workers have left — or until shutdown.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};

use lockstep_common::RunSpec;
use lockstep_common::proto::{self, coordinator_server::CoordinatorServer};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::auth::{AuthLayer, ServerSecurity};
use crate::error::{Error, Result};
use crate::machine::{Event, RunMachine, RunOutcome};
use crate::service::{CoordinatorService, Shared};
use crate::store::Store;

/// How often heartbeats are checked. Far below any sensible heartbeat interval (≥ 1 s × 5 misses).
pub const TICK: Duration = Duration::from_secs(1);

/// How stale a status from routine reports (steps, evaluations) may get before watchers see it.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// How long the gRPC server may take to drain once told to stop, before its connections are dropped.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Keep answering status after the run ended, until shutdown.
    pub serve_after_finish: bool,
    /// After the run ended, how long to wait for workers to close their sessions (they exit on Stop/Abort).
    pub session_grace: Duration,
    /// The coordinator's `Corpus::fingerprint`, sent in every assignment; empty = workers do not check it.
    pub data_fingerprint: String,
    /// Keep the run's state here (`cluster.state_dir`) and resume from it; `None` = in memory only.
    pub state_dir: Option<std::path::PathBuf>,
    /// The run token, TLS and message limit. No default: a coordinator without a token does not exist.
    pub security: ServerSecurity,
}

impl ServeOptions {
    /// The defaults for everything but `security`.
    pub fn new(security: ServerSecurity) -> Self {
        Self {
            security,
            serve_after_finish: false,
            session_grace: Duration::from_secs(10),
            data_fingerprint: String::new(),
            state_dir: None,
        }
    }
}

/// Runs the coordinator for `spec` on `listener` (mini-redis style: the caller binds, so port 0 works and the
/// caller can print the real address first). Returns the run's outcome, or [`RunOutcome::Interrupted`] when
/// `shutdown` resolved before the run ended.
pub async fn run(
    spec: RunSpec,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<RunOutcome> {
    run_with_signals(spec, listener, opts, futures::stream::pending(), shutdown).await
}

/// As [`run`], and every item of `signals` (SIGTERM, SIGINT, ...) asks for a clean stop: the first one makes the
/// workers checkpoint at an agreed step and the run stop; the second one stops at once, as `shutdown` does.
pub async fn run_with_signals(
    spec: RunSpec,
    listener: TcpListener,
    opts: ServeOptions,
    signals: impl Stream<Item = String>,
    shutdown: impl Future<Output = ()>,
) -> Result<RunOutcome> {
    let state = open_state(spec, &opts)?;
    serve_state(state, listener, opts, signals, shutdown).await
}

/// The run machine and its store, as `cluster.state_dir` left them: what [`serve_state`] serves.
pub struct RunState {
    machine: RunMachine,
    store: Option<Store>,
}

/// Opens the run's state (`opts.state_dir`) and restores the run from it: a fresh run, one to resume, or one that
/// already ended. Everything that can be wrong with the state directory — another run's, another spec's, held by
/// another coordinator, damaged — is found here, so a caller can refuse it before it binds a port.
pub fn open_state(spec: RunSpec, opts: &ServeOptions) -> Result<RunState> {
    let now = std::time::Instant::now();
    let Some(dir) = &opts.state_dir else {
        return Ok(RunState {
            machine: RunMachine::new(spec, now),
            store: None,
        });
    };
    let store = Store::open(dir)?;
    let saved = store.load()?;
    let state = store.path().display().to_string();
    let (machine, records) = RunMachine::restore(spec, saved, &state, now)?;
    store.append(&records)?;
    Ok(RunState {
        machine,
        store: Some(store),
    })
}

/// As [`run_with_signals`], for a state [`open_state`] opened.
pub async fn serve_state(
    state: RunState,
    listener: TcpListener,
    opts: ServeOptions,
    signals: impl Stream<Item = String>,
    shutdown: impl Future<Output = ()>,
) -> Result<RunOutcome> {
    let addr = listener.local_addr().map_err(Error::Listener)?;
    let RunState { machine, store } = state;
    let ended_already = machine.outcome();
    let shared = Shared::new(machine.with_data_fingerprint(opts.data_fingerprint.clone()), store);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // Every request but health's needs the run token (see crate::auth); TLS when `[security]` asks for it.
    // Small messages both ways: without TCP_NODELAY a reply can wait ~40 ms for the client's delayed ACK. Keepalive
    // lets the kernel notice a worker host that vanished without closing its connection.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opts.security.tls {
        builder = builder.tls_config(tls.clone()).map_err(|source| Error::TlsConfig {
            files: "[security]".into(),
            source,
        })?;
    }
    let limit = opts.security.max_message_bytes;
    let coordinator = CoordinatorServer::new(CoordinatorService::new(shared.clone(), limit))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);

    let ticker = tokio::spawn(tick(shared.clone()));
    let stop_signal = {
        let shared = shared.clone();
        async move { shared.stopped().await }
    };
    let server = builder
        .layer(AuthLayer::new(opts.security.token.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(coordinator)
        .serve_with_incoming_shutdown(incoming, stop_signal);
    tokio::pin!(server);
    info!(%addr, "coordinator serving");
    if let Some(outcome) = ended_already {
        // Said after "serving", so that it is the last line a launcher shows when the coordinator then exits.
        let state = opts
            .state_dir
            .as_ref()
            .map_or_else(String::new, |d| d.display().to_string());
        warn!(
            ?outcome,
            state,
            "the saved state says this run already ended: nothing to train; to train again, point \
             cluster.state_dir at a new directory (or delete this one)"
        );
    }

    let signals = signals.fuse();
    tokio::pin!(signals, shutdown);
    let mut stop_requested = false;
    let lifecycle = lifecycle(&shared, &opts);
    tokio::pin!(lifecycle);
    let outcome = loop {
        tokio::select! {
            outcome = &mut lifecycle => break outcome,
            Some(signal) = signals.next() => {
                let ended = shared.outcome().is_some();
                if stop_requested || ended {
                    let outcome = shared.outcome().unwrap_or(RunOutcome::Interrupted);
                    info!(%signal, ?outcome, "stopping now");
                    break outcome;
                }
                stop_requested = true;
                info!(%signal, "stopping the run cleanly (checkpoint at an agreed step); send it again to stop at once");
                if let Err(why) = shared.request_stop(format!("{signal} to the coordinator")) {
                    info!(%why, "nothing to stop");
                }
            }
            () = &mut shutdown => {
                let outcome = shared.outcome().unwrap_or(RunOutcome::Interrupted);
                info!(?outcome, "shutdown requested");
                break outcome;
            }
            served = &mut server => {
                ticker.abort();
                return Err(match served {
                    Ok(()) => Error::ServerStopped { addr },
                    Err(source) => Error::Serve { addr, source },
                });
            }
        }
    };

    shared.stop();
    health.set_not_serving::<CoordinatorServer<CoordinatorService>>().await;
    match tokio::time::timeout(STOP_GRACE, &mut server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "gRPC server failed while stopping"),
        Err(_) => warn!(
            secs = STOP_GRACE.as_secs(),
            "gRPC server did not drain in time; dropping its connections"
        ),
    }
    ticker.abort();
    Ok(outcome)
}

/// Waits for the run to end, then for its workers to leave (bounded by the grace period).
async fn lifecycle(shared: &Shared, opts: &ServeOptions) -> RunOutcome {
    let outcome = shared.ended().await;
    if opts.serve_after_finish {
        info!(?outcome, "run ended; serving status until shutdown");
        // Only the shutdown branch ends the server now.
        std::future::pending::<()>().await;
    }
    if tokio::time::timeout(opts.session_grace, shared.sessions_closed())
        .await
        .is_err()
    {
        warn!(
            secs = opts.session_grace.as_secs(),
            "some workers did not close their sessions; closing them"
        );
    }
    outcome
}

async fn tick(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(PUBLISH_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = tokio::time::Instant::now();
    loop {
        interval.tick().await;
        shared.publish_if_stale();
        if last_tick.elapsed() >= TICK {
            last_tick = tokio::time::Instant::now();
            shared.handle(Event::Tick);
        }
    }
}
