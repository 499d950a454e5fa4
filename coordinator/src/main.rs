//! `lockstep-coordinator --config run.toml [--listen 0.0.0.0:7070]` — serves one training run.
//!
//! Prints exactly one line to stdout, `listening on <addr>`, once the port is bound (port 0 picks a free one);
//! everything else goes to stderr. Exit status: 0 the run finished, 1 it failed (or the server broke), 2 bad input
//! (flags, config, data, listen address), 130 stopped by SIGINT/SIGTERM before the run ended.
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use lockstep_common::RunSpec;
use lockstep_common::data::corpus::Split;
use lockstep_common::data::{Corpus, DataPlan};
use lockstep_common::telemetry::{self, LogFormat};
use lockstep_coordinator::{RunOutcome, ServeOptions};
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "lockstep-coordinator",
    version,
    about = "Serves one Lockstep training run to its workers"
)]
struct Cli {
    /// The run spec (TOML). `LOCKSTEP_<SECTION>__<KEY>` variables override its keys.
    #[arg(long, env = "LOCKSTEP_CONFIG", value_name = "PATH")]
    config: PathBuf,
    /// gRPC listen address; overrides `cluster.listen`. Port 0 picks a free port.
    #[arg(long, env = "LOCKSTEP_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    #[arg(long, env = "LOCKSTEP_LOG_FORMAT", value_name = "text|json", default_value = "text")]
    log_format: LogFormat,
    /// Keep answering status after the run ended, until SIGINT/SIGTERM.
    #[arg(long)]
    serve_after_finish: bool,
}

const EXIT_FAILED: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;
const EXIT_INTERRUPTED: u8 = 130;

/// Prints an error as the one line other programs and people read.
fn report(message: &str) {
    let line = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("error: {line}");
}

/// The error and its causes on one line.
fn chain(e: &anyhow::Error) -> String {
    lockstep_common::error::one_line(e.as_ref())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first paragraph is the error; the usage after it would break the one-line contract.
            let rendered = e.to_string();
            let first = rendered.split("\n\n").next().unwrap_or_default();
            let first = first.trim_start_matches("error: ");
            report(&format!("{first} (see lockstep-coordinator --help)"));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    if let Err(e) = telemetry::init(cli.log_format) {
        report(&e.to_string());
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    let (spec, opts) = match prepare(&cli) {
        Ok(prepared) => prepared,
        Err(e) => {
            report(&chain(&e));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            report(&format!("cannot start the async runtime: {e}"));
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(serve(spec, opts)) {
        Ok(RunOutcome::Finished) => ExitCode::SUCCESS,
        Ok(RunOutcome::Failed(message)) => {
            report(&format!("run failed: {message}"));
            ExitCode::from(EXIT_FAILED)
        }
        Ok(RunOutcome::Interrupted) => {
            info!("stopped before the run ended");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err((code, e)) => {
            report(&chain(&e));
            ExitCode::from(code)
        }
    }
}

/// Loads and checks everything that can be wrong with the input before a port is taken.
fn prepare(cli: &Cli) -> anyhow::Result<(RunSpec, ServeOptions)> {
    let mut spec = RunSpec::load(Some(&cli.config))?;
    if let Some(listen) = cli.listen {
        spec.cluster.listen = listen.to_string();
    }
    // Workers load the same data; failing here names the file (and byte offset) before anyone joins. Workers
    // check only sizes and headers; the full pass over a prepared directory (`data.verify`) happens once, here.
    let checking = Instant::now();
    let corpus = Corpus::load_checked(&spec, spec.data.verify).context("checking the run's data")?;
    let windows = corpus.num_windows(Split::Train);
    let plan =
        DataPlan::new(spec.run.seed, windows, spec.train.global_batch as u64).context("checking the run's data")?;
    info!(
        data = %corpus.origin.display(),
        layout = ?corpus.layout,
        verify = ?spec.data.verify,
        tokenizer = %corpus.tokenizer.describe(),
        train_shards = corpus.train.num_shards(),
        train_tokens = corpus.train.tokens(),
        val_shards = corpus.val.num_shards(),
        val_tokens = corpus.val.tokens(),
        val_windows = corpus.num_windows(Split::Val),
        eval_sequences = (spec.train.eval_sequences as u64).min(corpus.num_windows(Split::Val)),
        secs = checking.elapsed().as_secs_f64(),
        "data checked"
    );
    info!(
        train_windows = windows,
        seq_len = spec.train.seq_len,
        global_batch = spec.train.global_batch,
        steps_per_epoch = plan.steps_per_epoch(),
        dropped_per_epoch = plan.dropped_per_epoch(),
        epochs = plan.epochs_in(spec.train.total_steps),
        "data plan"
    );
    info!(
        run = %spec.run.name,
        spec_hash = %spec.training_hash(),
        spec = %spec.to_json(),
        "resolved run spec"
    );
    let opts = ServeOptions {
        serve_after_finish: cli.serve_after_finish,
        data_fingerprint: corpus.fingerprint.clone(),
        ..ServeOptions::default()
    };
    Ok((spec, opts))
}

async fn serve(spec: RunSpec, opts: ServeOptions) -> Result<RunOutcome, (u8, anyhow::Error)> {
    let listen = spec.cluster.listen.clone();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (cluster.listen / --listen)"))
        .map_err(|e| (EXIT_BAD_INPUT, e))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("cannot read the bound address of {listen}"))
        .map_err(|e| (EXIT_FAILED, e))?;
    announce(addr);
    lockstep_coordinator::run(spec, listener, opts, shutdown_signal())
        .await
        .map_err(|e| (EXIT_FAILED, anyhow::Error::new(e)))
}

/// The one stdout line launchers wait for.
fn announce(addr: SocketAddr) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "listening on {addr}").and_then(|()| stdout.flush()) {
        // Nobody is reading stdout; the server is still useful.
        warn!(error = %e, "cannot write the listening line to stdout");
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => info!(signal = "SIGINT", "shutting down"),
        () = terminate => info!(signal = "SIGTERM", "shutting down"),
    }
}
