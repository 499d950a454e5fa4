//! `lockstep run`: a whole run on this host — a coordinator and N worker processes on 127.0.0.1 — with a progress
//! bar fed by the coordinator's `WatchStatus` stream. Ctrl-C (or SIGTERM) stops every child. The run gets a fresh
//! token, handed to the children in their environment; nothing else on the host can join or steer the run.
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use lockstep_common::RunSpec;
use lockstep_common::auth::RunToken;
use lockstep_common::proto::{RunState, RunStatus, WatchStatusRequest};
use lockstep_common::transport::{self, ClientSecurity};
use tokio::process::Child;

use crate::error::{Error, Result};
use crate::procs::{self, CoordinatorProcess};
use crate::status_view;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub spec: RunSpec,
    pub workers: u32,
    /// Run directory: `run.toml`, `logs/`, and (unless the spec says otherwise) `checkpoints/`.
    pub out: PathBuf,
    pub threads_per_worker: usize,
    pub progress: bool,
}

/// How the run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub status: RunStatus,
    pub out: PathBuf,
    pub interrupted: bool,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// Writes the resolved spec to `<out>/run.toml`, starts the daemons, follows the run to its end.
pub async fn run_local(opts: RunOptions, interrupt: impl std::future::Future<Output = ()>) -> Result<RunSummary> {
    let logs = opts.out.join("logs");
    std::fs::create_dir_all(&logs).map_err(io(format!("create {}", logs.display())))?;
    let config = opts.out.join("run.toml");
    let text =
        toml::to_string(&opts.spec).map_err(|e| Error::Usage(format!("cannot write the run spec as TOML: {e}")))?;
    std::fs::write(&config, text).map_err(io(format!("write {}", config.display())))?;

    let coordinator_log = logs.join("coordinator.log");
    let token = RunToken::generate();
    let mut coordinator =
        procs::spawn_coordinator(&config, &coordinator_log, &[], Duration::from_secs(120), &token).await?;
    let url = coordinator.url();
    let mut workers: Vec<Child> = Vec::new();
    for i in 0..opts.workers {
        let args = vec![
            "--threads".to_string(),
            opts.threads_per_worker.to_string(),
            "--worker-id".to_string(),
            format!("worker-{i}"),
        ];
        workers.push(procs::spawn_worker(
            &url,
            &logs.join(format!("worker-{i}.log")),
            &args,
            &token,
        )?);
    }

    tokio::pin!(interrupt);
    let follow = follow(&url, &token, opts.spec.train.total_steps, opts.progress);
    let outcome = tokio::select! {
        status = follow => Some(status),
        () = &mut interrupt => None,
    };
    match outcome {
        None => {
            for child in workers.iter_mut() {
                procs::terminate(child, Duration::from_secs(10)).await;
            }
            procs::terminate(&mut coordinator.child, Duration::from_secs(10)).await;
            Ok(RunSummary {
                status: RunStatus::default(),
                out: opts.out,
                interrupted: true,
            })
        }
        Some(status) => {
            let status = match status {
                Ok(s) => s,
                Err(e) => {
                    // A coordinator that ended by itself (e.g. its saved state says the run is over) said why last.
                    let exited = tokio::time::timeout(Duration::from_secs(2), coordinator.child.wait()).await;
                    let e = match exited {
                        Ok(Ok(_)) => Error::Process {
                            process: "lockstep-coordinator".into(),
                            message: format!("exited: {}", procs::last_line(&coordinator_log)),
                        },
                        _ => e,
                    };
                    stop_all(&mut workers, &mut coordinator).await;
                    return Err(with_logs(e, &logs));
                }
            };
            // After the final status the workers get Stop/Abort and exit by themselves; then the coordinator.
            for child in workers.iter_mut() {
                if tokio::time::timeout(Duration::from_secs(30), child.wait())
                    .await
                    .is_err()
                {
                    procs::terminate(child, Duration::from_secs(5)).await;
                }
            }
            if tokio::time::timeout(Duration::from_secs(30), coordinator.child.wait())
                .await
                .is_err()
            {
                procs::terminate(&mut coordinator.child, Duration::from_secs(5)).await;
            }
            Ok(RunSummary {
                status,
                out: opts.out,
                interrupted: false,
            })
        }
    }
}

async fn stop_all(workers: &mut [Child], coordinator: &mut CoordinatorProcess) {
    for child in workers.iter_mut() {
        procs::terminate(child, Duration::from_secs(5)).await;
    }
    procs::terminate(&mut coordinator.child, Duration::from_secs(5)).await;
}

fn with_logs(e: Error, logs: &Path) -> Error {
    Error::Process {
        process: "lockstep run".into(),
        message: format!("{e}; logs are in {}", logs.display()),
    }
}

/// Follows `WatchStatus` until the run finishes or fails, drawing a progress bar; returns the last status.
async fn follow(url: &str, token: &RunToken, total_steps: u64, progress: bool) -> Result<RunStatus> {
    let unreachable = |message: String| Error::Coordinator {
        addr: url.to_string(),
        message,
    };
    let mut client = transport::connect(url, &ClientSecurity::new(token.clone()), Duration::from_secs(10)).await?;
    let mut stream = client
        .watch_status(WatchStatusRequest {})
        .await
        .map_err(|e| unreachable(e.message().to_string()))?
        .into_inner();
    let bar = if progress {
        ProgressBar::new(total_steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("waiting for workers");
    let mut last = RunStatus::default();
    loop {
        match stream.message().await {
            Ok(Some(status)) => {
                bar.set_position(status.step);
                if status.state == RunState::Running as i32 || status.step > 0 {
                    let mut msg = format!("loss {}", status.last_loss.map_or("-".into(), |l| format!("{l:.4}")));
                    if status.val_loss.is_some() {
                        msg.push_str(&format!("  val {}", status_view::val(status.val_loss)));
                    }
                    msg.push_str(&format!("  {}", status_view::rate(status.tokens_per_sec)));
                    bar.set_message(msg);
                }
                let done = status_view::is_terminal(&status);
                last = status;
                if done {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => return Err(unreachable(format!("status stream failed: {}", e.message()))),
        }
    }
    bar.finish_and_clear();
    if !status_view::is_terminal(&last) {
        return Err(unreachable("the coordinator went away before the run ended".into()));
    }
    Ok(last)
}
