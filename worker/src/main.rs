//! `lockstep-worker --coordinator http://HOST:PORT [--device cpu]`: one training rank. Joins the coordinator, trains
//! what it is assigned, all-reduces gradients with its peers, and exits 0 when the coordinator ends the run.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use lockstep_common::RunSpec;
use lockstep_common::telemetry::{self, LogFormat};
use lockstep_worker::device;
use lockstep_worker::session::{self, WorkerOptions};

#[derive(Debug, Parser)]
#[command(name = "lockstep-worker", version, about = "Lockstep training worker (one rank)")]
struct Args {
    /// The coordinator's gRPC address.
    #[arg(long, env = "LOCKSTEP_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// Compute device: `cpu` (CUDA arrives with the `cuda` feature).
    #[arg(long, env = "LOCKSTEP_DEVICE", default_value = "cpu")]
    device: String,
    /// CPU threads for tensor math (default: all cores). With several workers on one host, divide the cores.
    #[arg(long, env = "LOCKSTEP_THREADS")]
    threads: Option<usize>,
    /// Address for the gradient ring listener (default: this host's address towards the coordinator, any port).
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
    /// `text` or `json`.
    #[arg(long, env = "LOCKSTEP_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
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
    let (device, device_name) = device::parse(&args.device)?;
    let spec = args.config.as_deref().map(|p| RunSpec::load(Some(p))).transpose()?;
    let opts = WorkerOptions {
        coordinator: args.coordinator,
        device,
        device_name,
        ring_listen: args.ring_listen,
        worker_id: args.worker_id,
        spec,
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let exit = session::run(opts, shutdown_signal()).await?;
        tracing::info!(?exit, "worker done");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
