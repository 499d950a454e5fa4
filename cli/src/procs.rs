//! Starting the daemons as child processes on this host: finding their binaries, handing them the run token
//! (`LOCKSTEP_TOKEN` in their environment, never on a command line other users can read), waiting for the
//! coordinator's `listening on ADDR` line (readiness is a printed line, never a sleep), and stopping them with
//! SIGTERM.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lockstep_common::auth::{RunToken, TOKEN_ENV};
use lockstep_common::transport::{self, ClientSecurity};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::error::{Error, Result};

/// The path of binary `name` next to the running executable (or one level up, for test executables in
/// `target/*/deps/`), else on `PATH`.
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        context: "locate the running executable".into(),
        source,
    })?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let candidates = [Some(dir.join(name)), dir.parent().map(|d| d.join(name))];
    if let Some(found) = candidates.into_iter().flatten().find(|p| p.is_file()) {
        return Ok(found);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .ok_or(Error::MissingBinary {
            name: name.into(),
            beside: dir,
        })
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).map_err(|source| Error::Io {
        context: format!("create log file {}", path.display()),
        source,
    })
}

/// A running coordinator, the address it printed, and the token it was given.
pub struct CoordinatorProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub token: RunToken,
}

impl CoordinatorProcess {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A gRPC client of this coordinator that sends its token.
    pub async fn client(&self) -> Result<transport::CoordinatorClient> {
        let security = ClientSecurity::new(self.token.clone());
        Ok(transport::connect(&self.url(), &security, Duration::from_secs(10)).await?)
    }
}

/// Starts `lockstep-coordinator --config CONFIG` with `token`, logging to `log`, and waits (up to `timeout`) for its
/// `listening on ADDR` line.
pub async fn spawn_coordinator(
    config: &Path,
    log: &Path,
    extra: &[&str],
    timeout: Duration,
    token: &RunToken,
) -> Result<CoordinatorProcess> {
    let bin = sibling_binary("lockstep-coordinator")?;
    let mut child = Command::new(&bin)
        .env(TOKEN_ENV, token.expose())
        .arg("--config")
        .arg(config)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(log)?)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Io {
            context: format!("start {}", bin.display()),
            source,
        })?;
    let failed = |message: String| Error::Process {
        process: "lockstep-coordinator".into(),
        message,
    };
    let stdout = child.stdout.take().ok_or_else(|| failed("no stdout pipe".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(timeout, lines.next_line())
        .await
        .map_err(|_| {
            failed(format!(
                "printed no `listening on` line within {timeout:?}; see {}",
                log.display()
            ))
        })?
        .map_err(|source| Error::Io {
            context: "read the coordinator's output".into(),
            source,
        })?;
    let Some(line) = line else {
        let status = child.wait().await.ok().and_then(|s| s.code());
        return Err(failed(format!(
            "exited (code {status:?}) before listening: {}",
            last_line(log)
        )));
    };
    let addr = line
        .strip_prefix("listening on ")
        .and_then(|a| a.trim().parse().ok())
        .ok_or_else(|| failed(format!("unexpected first line {line:?}")))?;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(CoordinatorProcess {
        child,
        addr,
        token: token.clone(),
    })
}

/// Starts `lockstep-worker --coordinator URL` with `token` and its output in `log`.
pub fn spawn_worker(url: &str, log: &Path, args: &[String], token: &RunToken) -> Result<Child> {
    let bin = sibling_binary("lockstep-worker")?;
    let out = log_file(log)?;
    let err = out.try_clone().map_err(|source| Error::Io {
        context: format!("open {}", log.display()),
        source,
    })?;
    Command::new(&bin)
        .env(TOKEN_ENV, token.expose())
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Io {
            context: format!("start {}", bin.display()),
            source,
        })
}

/// Asks a child to stop (SIGTERM), waits up to `grace`, then kills it.
pub async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// The last non-empty line of a log file, for error messages.
pub fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string))
        .unwrap_or_else(|| format!("(nothing in {})", path.display()))
}
