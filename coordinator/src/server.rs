//! Serves one run: the Coordinator service, gRPC health and reflection, and the heartbeat tick, until the run has
//! ended and its workers have left — or until shutdown.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lockstep_common::RunSpec;
use lockstep_common::proto::{self, coordinator_server::CoordinatorServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::machine::{Event, RunMachine, RunOutcome};
use crate::service::{CoordinatorService, Shared};

/// How often heartbeats are checked. Far below any sensible heartbeat interval (≥ 1 s × 5 misses).
pub const TICK: Duration = Duration::from_secs(1);

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
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            serve_after_finish: false,
            session_grace: Duration::from_secs(10),
            data_fingerprint: String::new(),
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
    let addr = listener.local_addr().map_err(Error::Listener)?;
    let shared = Shared::new(
        RunMachine::new(spec, std::time::Instant::now()).with_data_fingerprint(opts.data_fingerprint.clone()),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let ticker = tokio::spawn(tick(shared.clone()));
    let stop_signal = {
        let shared = shared.clone();
        async move { shared.stopped().await }
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(CoordinatorServer::new(CoordinatorService::new(shared.clone())))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop_signal);
    tokio::pin!(server);
    info!(%addr, "coordinator serving");

    let outcome = tokio::select! {
        outcome = lifecycle(&shared, &opts) => outcome,
        () = shutdown => {
            let outcome = shared.outcome().unwrap_or(RunOutcome::Interrupted);
            info!(?outcome, "shutdown requested");
            outcome
        }
        served = &mut server => {
            ticker.abort();
            return Err(match served {
                Ok(()) => Error::ServerStopped { addr },
                Err(source) => Error::Serve { addr, source },
            });
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
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        shared.handle(Event::Tick);
    }
}
