//! `lockstep-worker --coordinator http://HOST:PORT [--device cpu|cuda:N | --gpus all|0,1,..]`: one training rank
//! (or, with `--gpus`, one rank per listed GPU, each its own session with the coordinator). Joins the coordinator,
//! trains what it is assigned, all-reduces gradients with its peers, and exits 0 when the coordinator ends the run.
//!
//! It needs the run's token (`LOCKSTEP_TOKEN`, or `--token-file`): for every call to the coordinator and to prove
//! itself to its ring neighbours. `--tls-ca` (with an https:// URL) and `--tls-cert`/`--tls-key` (mutual TLS) match
//! the coordinator's `[security]`.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use candle_core::Device;
use clap::Parser;
use futures::FutureExt;
use lockstep_common::RunSpec;
use lockstep_common::telemetry::{self, LogFormat};
use lockstep_worker::coordinator_link::SecurityArgs;
use lockstep_worker::device;
use lockstep_worker::session::{self, WorkerOptions};

#[derive(Debug, Parser)]
#[command(name = "lockstep-worker", version, about = "Lockstep training worker (one rank)")]
struct Args {
    /// The coordinator's gRPC address.
    #[arg(long, env = "LOCKSTEP_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// Compute device: `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, env = "LOCKSTEP_DEVICE", default_value = "cpu")]
    device: String,
    /// One rank per GPU instead of --device: `all`, or indices like `0,1,3`. Each rank is a session of its own, named
    /// WORKER_ID/cuda:N; with a fixed --ring-listen port, the rank on the i-th listed GPU listens on port + i.
    #[arg(long, env = "LOCKSTEP_GPUS")]
    gpus: Option<String>,
    /// CPU threads for tensor math (default: all cores). With several workers on one host, divide the cores.
    #[arg(long, env = "LOCKSTEP_THREADS")]
    threads: Option<usize>,
    /// Address for the gradient ring listener (default: this host's address towards the coordinator, any port). One
    /// on every interface (0.0.0.0:PORT, [::]:PORT) is announced to the other workers at the address towards the
    /// coordinator, since they could not dial 0.0.0.0.
    #[arg(long, env = "LOCKSTEP_RING_LISTEN")]
    ring_listen: Option<String>,
    /// Name shown in status and logs (default: HOST:PID).
    #[arg(long, env = "LOCKSTEP_WORKER_ID")]
    worker_id: Option<String>,
    /// The run spec this worker expects; the coordinator refuses the worker if its own spec differs.
    #[arg(long, env = "LOCKSTEP_CONFIG")]
    config: Option<PathBuf>,
    /// Keep retrying the coordinator this many seconds before giving up.
    #[arg(long, env = "LOCKSTEP_CONNECT_TIMEOUT_SECS", default_value_t = 30)]
    connect_timeout_secs: u64,
    /// After losing the coordinator (it restarted, or dropped this worker), keep trying to rejoin this many seconds.
    #[arg(long, env = "LOCKSTEP_RECONNECT_TIMEOUT_SECS", default_value_t = 600)]
    reconnect_timeout_secs: u64,
    /// `text` or `json`.
    #[arg(long, env = "LOCKSTEP_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    security: SecurityArgs,
}

fn main() -> ExitCode {
    lockstep_worker::device::keep_freed_memory();
    let args = Args::parse();
    if let Some(n) = args.threads {
        // candle sizes its CPU thread pool from this variable; set before any thread exists.
        // SAFETY: single-threaded here — the async runtime is built below.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string()) };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", lockstep_common::error::one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    telemetry::init(args.log_format)?;
    let devices: Vec<(Device, String)> = match &args.gpus {
        None => vec![device::parse(&args.device)?],
        Some(list) => device::parse_gpus(list)?,
    };
    let spec = args.config.as_deref().map(|p| RunSpec::load(Some(p))).transpose()?;
    let mut security = args.security.client_security()?;
    if let Some(spec) = &spec {
        security.max_message_bytes = spec.security.max_message_bytes;
    }
    let several = args.gpus.is_some();
    let base_id = args.worker_id.clone().unwrap_or_else(session::default_worker_id);
    let mut ranks = Vec::with_capacity(devices.len());
    for (i, (device, device_name)) in devices.into_iter().enumerate() {
        let (worker_id, ring_listen) = if several {
            let listen = args.ring_listen.as_deref().map(|a| offset_port(a, i)).transpose()?;
            (Some(format!("{base_id}/{device_name}")), listen)
        } else {
            (args.worker_id.clone(), args.ring_listen.clone())
        };
        ranks.push(WorkerOptions {
            coordinator: args.coordinator.clone(),
            device,
            device_name,
            ring_listen,
            worker_id,
            spec: spec.clone(),
            connect_timeout: Duration::from_secs(args.connect_timeout_secs),
            reconnect_timeout: Duration::from_secs(args.reconnect_timeout_secs),
            security: security.clone(),
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let signals = count_signals();
        let sessions = ranks.into_iter().map(|opts| {
            let name = opts.device_name.clone();
            session::run(opts, signals.clone()).map(move |r| (name, r))
        });
        let mut failure: Option<(String, lockstep_worker::error::Error)> = None;
        for (name, result) in futures::future::join_all(sessions).await {
            match result {
                Ok(exit) => tracing::info!(device = %name, ?exit, "worker done"),
                // The first error that is not just the coordinator's abort of everyone is the telling one.
                Err(e) => match &failure {
                    Some((_, lockstep_worker::error::Error::Aborted(_))) | None => failure = Some((name, e)),
                    Some(_) => {}
                },
            }
        }
        match failure {
            None => Ok(()),
            Some((_, e)) if !several => Err(e.into()),
            Some((name, e)) => Err(anyhow::Error::new(e).context(format!("the rank on {name}"))),
        }
    })
}

/// `HOST:PORT` with the port moved up by `i`; port 0 (any free port) stays 0.
fn offset_port(addr: &str, i: usize) -> anyhow::Result<String> {
    let bad = || anyhow::anyhow!("--ring-listen {addr}: write HOST:PORT (port 0 = any free port)");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Ok(addr.to_string());
    }
    let port = u16::try_from(usize::from(port) + i).map_err(|_| {
        anyhow::anyhow!("--ring-listen {addr}: one port per GPU from {port} on passes 65535; pick a lower one")
    })?;
    Ok(format!("{host}:{port}"))
}

/// Counts SIGINT/SIGTERM: the first asks every rank to leave after the current step (checkpointed with the other
/// workers), the second stops at once.
fn count_signals() -> session::Signals {
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    let interrupts = tx.clone();
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            interrupts.send_modify(|n| *n += 1);
        }
    });
    #[cfg(unix)]
    tokio::spawn(async move {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            while term.recv().await.is_some() {
                tx.send_modify(|n| *n += 1);
            }
        }
        // Keep the sender alive: a closed channel would read as "stop at once".
        std::future::pending::<()>().await;
    });
    rx
}
