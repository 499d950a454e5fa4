//! The `lockstep-coordinator` binary as users and launchers see it: exit codes, the one stderr line on bad input,
//! the one stdout line once listening, and the gRPC services behind it.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lockstep_common::auth::RunToken;
use lockstep_common::proto::{GetStatusRequest, RunState};
use lockstep_common::transport::{self, ClientSecurity};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep-coordinator");

/// Generous: the default addition corpus is generated at start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const TOKEN: &str = "coordinator-cli-tests-token";

/// The binary with a clean environment (no inherited `LOCKSTEP_*` variable may change what it reads) but for the
/// run token.
fn coordinator(config: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("LOCKSTEP") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.env("LOCKSTEP_TOKEN", TOKEN);
    // The default cluster.state_dir is relative: keep each test's run state in its own directory.
    if let Some(dir) = config.parent() {
        cmd.current_dir(dir);
    }
    cmd.arg("--config").arg(config).stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

async fn fails_with_one_line(config_text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), config_text);
    let out = tokio::time::timeout(START_TIMEOUT, coordinator(&config).output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        out.stdout.is_empty(),
        "stdout must stay empty on bad input: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "exactly one stderr line expected, got:\n{stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    (out.status.code().unwrap(), stderr)
}

#[tokio::test]
async fn unknown_config_key_is_named_in_one_line() {
    let (code, stderr) = fails_with_one_line("[train]\ntotal_stepz = 5\n").await;
    assert_eq!(code, 2);
    assert!(stderr.contains("total_stepz"), "{stderr}");
}

#[tokio::test]
async fn missing_text_data_file_is_named_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-corpus.txt");
    let config = format!("[data]\nsource = \"text\"\npath = \"{}\"\n", missing.display());
    let (code, stderr) = fails_with_one_line(&config).await;
    assert_eq!(code, 2);
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}

#[tokio::test]
async fn a_missing_tls_certificate_is_named_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("no-such-cert.pem");
    let config = format!(
        "[security]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        dir.path().join("key.pem").display()
    );
    let (code, stderr) = fails_with_one_line(&config).await;
    assert_eq!(code, 2);
    assert!(
        stderr.contains("security.tls_cert") && stderr.contains(&cert.display().to_string()),
        "{stderr}"
    );
}

#[tokio::test]
async fn bad_flag_is_one_line() {
    let out = Command::new(BIN).arg("--bogus").output().await.unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--bogus"), "{stderr}");
}

/// Waits for the `listening on` line and returns the address in it.
async fn listening_addr(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(START_TIMEOUT, BufReader::new(stdout).read_line(&mut line))
        .await
        .expect("no `listening on` line in time")
        .unwrap();
    let addr = line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");
    addr.to_string()
}

#[tokio::test]
async fn serves_health_and_status_while_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[run]\nname = \"cli-test\"\n[cluster]\nlisten = \"127.0.0.1:0\"\nmin_workers = 2\nmax_workers = 2\n",
    );
    let mut child = coordinator(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child).await;
    let endpoint = format!("http://{addr}");

    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "lockstep.v1.Coordinator"] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32, "service {service:?}");
    }

    let security = ClientSecurity::new(RunToken::parse(TOKEN, "test").unwrap());
    let mut client = transport::connect(&endpoint, &security, START_TIMEOUT).await.unwrap();
    let status = client.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.state, RunState::Waiting as i32);
    assert_eq!(status.run_name, "cli-test");
    assert_eq!(status.world_size, 0);
    assert!(status.workers.is_empty());

    child.kill().await.unwrap();
}

#[tokio::test]
async fn listen_flag_overrides_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[cluster]\nlisten = \"127.0.0.1:1\"\n");
    let mut child = coordinator(&config)
        .env("LOCKSTEP_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    listening_addr(&mut child).await;
    child.kill().await.unwrap();
}

/// A state directory that cannot be used is bad input like a bad config: exit 2, one error line naming what
/// differs, and no `listening on` line first.
#[tokio::test]
async fn a_state_dir_of_another_spec_is_refused_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        |lr: &str| format!("[run]\nname = \"state-test\"\n[cluster]\nlisten = \"127.0.0.1:0\"\n[train]\nlr = {lr}\n");
    let config = write_config(dir.path(), &text("0.01"));
    let mut first = coordinator(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Listening means the state is written: the run and its spec are recorded before the port is bound.
    listening_addr(&mut first).await;
    first.kill().await.unwrap();
    first.wait().await.unwrap();
    let config = write_config(dir.path(), &text("0.001"));
    let out = tokio::time::timeout(START_TIMEOUT, coordinator(&config).output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.stdout.is_empty(), "{:?}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // The data check's log lines come first; the error is the one line a script reads.
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_eq!(stderr.lines().last(), errors.first().copied(), "{stderr}");
    assert!(
        errors[0].starts_with("error: cluster.state_dir: ") && errors[0].contains("train.lr: 0.01 vs 0.001"),
        "{stderr}"
    );
}
