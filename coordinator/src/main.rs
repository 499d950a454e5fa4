//! `lockstep-coordinator --config run.toml [--listen 0.0.0.0:7070]` — serves one training run.
//!
//! Prints exactly one line to stdout, `listening on <addr>`, once the port is bound (port 0 picks a free one);
//! everything else goes to stderr. Exit status: 0 the run finished, or stopped cleanly (the first SIGINT/SIGTERM:
//! the workers checkpoint at an agreed step; starting again with the same config resumes); 1 it failed (or the server
//! broke); 2 bad input (flags, config, data, a state directory it cannot use, listen address); 130 stopped at once by
//! a second signal.
//!
//! The run's state lives in `cluster.state_dir`: a coordinator killed outright and started again with the same
//! config picks the run up from its newest committed checkpoint.
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use lockstep_common::RunSpec;
use lockstep_common::auth::{self, RunToken, TokenOrigin};
use lockstep_common::data::corpus::Split;
use lockstep_common::data::{Corpus, DataPlan};
use lockstep_common::telemetry::{self, LogFormat};
use lockstep_coordinator::{RunOutcome, ServeOptions, ServerSecurity};
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
        Ok(RunOutcome::Stopped(reason)) => {
            info!(%reason, "run stopped; start the coordinator again with the same config to resume it");
            ExitCode::SUCCESS
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
    // The token and the TLS files before the (possibly long) data check; logged after it, so that bad input still
    // gets its one stderr line.
    let (security, security_origin) = server_security(&spec)?;
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
    if let Some(sft) = &corpus.sft {
        info!(
            train_conversations = sft.examples.0,
            val_conversations = sft.examples.1,
            answer_tokens = corpus.train.tokens(),
            vocab_with_template = sft.template.vocab_size(),
            "fine-tuning data"
        );
        if let Some(warning) = sft.warning(spec.train.seq_len) {
            warn!("{warning}");
        }
    }
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
    security_origin.log();
    info!(
        tls = security.tls.is_some(),
        mutual_tls = spec.security.tls_client_ca.is_some(),
        max_message_bytes = security.max_message_bytes,
        "security"
    );
    let opts = ServeOptions {
        serve_after_finish: cli.serve_after_finish,
        data_fingerprint: corpus.fingerprint.clone(),
        state_dir: Some(spec.cluster.state_dir.clone()),
        ..ServeOptions::new(security)
    };
    Ok((spec, opts))
}

/// The run token (`LOCKSTEP_TOKEN`, else `security.token_file`, else `<cluster.state_dir>/token`, generated on first
/// start) and the TLS files of `[security]`.
fn server_security(spec: &RunSpec) -> anyhow::Result<(ServerSecurity, TokenOrigin)> {
    let (token, origin) = RunToken::for_coordinator(
        auth::env_token()?,
        spec.security.token_file.as_deref(),
        &spec.cluster.state_dir,
    )?;
    Ok((ServerSecurity::from_spec(&spec.security, token)?, origin))
}

async fn serve(spec: RunSpec, opts: ServeOptions) -> Result<RunOutcome, (u8, anyhow::Error)> {
    let listen = spec.cluster.listen.clone();
    // Before the port: a state directory that cannot be used (another run's or spec's, held by another coordinator,
    // damaged) is bad input, refused before anything says it is listening.
    let state = lockstep_coordinator::open_state(spec, &opts)
        .context("cluster.state_dir")
        .map_err(|e| (EXIT_BAD_INPUT, e))?;
    let listener = bind(&listen)
        .with_context(|| format!("cannot listen on {listen} (cluster.listen / --listen)"))
        .map_err(|e| (EXIT_BAD_INPUT, e))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("cannot read the bound address of {listen}"))
        .map_err(|e| (EXIT_FAILED, e))?;
    announce(addr);
    lockstep_coordinator::serve_state(state, listener, opts, signals(), std::future::pending())
        .await
        .map_err(|e| (EXIT_FAILED, anyhow::Error::new(e)))
}

/// Listens on `addr` with room for many workers connecting at once (the standard library's backlog of 128 overflows
/// when hundreds of workers start together, or reconnect after a coordinator restart).
fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    const BACKLOG: u32 = 4096;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("not IP:port ({e})")))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted coordinator must get its port back while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The one stdout line launchers wait for.
fn announce(addr: SocketAddr) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "listening on {addr}").and_then(|()| stdout.flush()) {
        // Nobody is reading stdout; the server is still useful.
        warn!(error = %e, "cannot write the listening line to stdout");
    }
}

/// One item per SIGINT or SIGTERM: the first asks the run to stop cleanly, the second stops at once.
fn signals() -> impl futures::Stream<Item = String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let interrupt = tx.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = tokio::signal::ctrl_c().await {
                warn!(error = %e, "cannot listen for SIGINT");
                return;
            }
            if interrupt.send("SIGINT".into()).is_err() {
                return;
            }
        }
    });
    #[cfg(unix)]
    tokio::spawn(async move {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                while signal.recv().await.is_some() {
                    if tx.send("SIGTERM".into()).is_err() {
                        return;
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot listen for SIGTERM"),
        }
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
}
