//! The run token end to end: `lockstep status` and `lockstep stop` against a real coordinator, and `lockstep run`
//! handing a fresh token to its coordinator and workers (whose ring links prove it to each other).
use std::path::Path;
use std::process::Output;

use lockstep_tests::{Cluster, small_spec};

fn lockstep(args: &[&str], token: Option<&str>) -> Output {
    let bin = lockstep_cli::procs::sibling_binary("lockstep").unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.env_remove("LOCKSTEP_TOKEN").env_remove("LOCKSTEP_TOKEN_FILE");
    if let Some(token) = token {
        cmd.env("LOCKSTEP_TOKEN", token);
    }
    cmd.args(args).output().unwrap()
}

fn one_error_line(out: &Output) -> String {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_stop_need_the_run_token() {
    let dir = tempfile::tempdir().unwrap();
    // Waits for two workers that never come.
    let spec = small_spec(dir.path(), 2, 10);
    let mut cluster = Cluster::start(&spec, 0, dir.path()).await;
    let url = cluster.url();
    let token = cluster.token().expose().to_string();

    let none = one_error_line(&lockstep(&["status", "--coordinator", &url], None));
    assert!(
        none.contains("--token-file") && none.contains("LOCKSTEP_TOKEN"),
        "{none}"
    );
    let wrong = one_error_line(&lockstep(
        &["status", "--coordinator", &url],
        Some("not-this-runs-token-at-all"),
    ));
    assert!(
        wrong.contains("wrong run token") && wrong.contains("Unauthenticated"),
        "{wrong}"
    );
    let refused = one_error_line(&lockstep(
        &["stop", "--coordinator", &url],
        Some("not-this-runs-token-at-all"),
    ));
    assert!(refused.contains("Unauthenticated"), "{refused}");

    // The token from a file works as well as from the environment.
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let out = lockstep(
        &[
            "status",
            "--json",
            "--coordinator",
            &url,
            "--token-file",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "waiting");

    // The history: refused without the token, the CSV header alone before any step with it. The state directory
    // itself is the running coordinator's, which says who to ask instead.
    let none = one_error_line(&lockstep(&["history", "--coordinator", &url], None));
    assert!(none.contains("--token-file"), "{none}");
    let out = lockstep(&["history", "--coordinator", &url], Some(&token));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "step,loss,lr,grad_norm,tokens,skipped,val_loss\n"
    );
    let state = spec.cluster.state_dir.to_str().unwrap().to_string();
    let locked = one_error_line(&lockstep(&["history", "--state-dir", &state], None));
    assert!(
        locked.contains("a coordinator is running") && locked.contains("--coordinator"),
        "{locked}"
    );

    // Stop: accepted, so exit 0 with the coordinator's answer; the coordinator then ends the run cleanly.
    let out = lockstep(
        &["stop", "--coordinator", &url, "--reason", "security test"],
        Some(&token),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let (_, coordinator) = cluster.wait().await;
    assert!(coordinator.success(), "{coordinator:?}");
    let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    assert!(log.contains("security test"), "{log}");
    assert!(!log.contains(&token), "the token must never be logged");
}

/// `lockstep run` makes a token, hands it to its children, and two workers' ring links authenticate with it.
#[test]
fn lockstep_run_trains_with_a_token_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let out = lockstep(
        &[
            "run",
            "--steps",
            "3",
            "--workers",
            "2",
            "--threads-per-worker",
            "1",
            "--no-progress",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        None,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("finished 3 steps"), "{stdout}");
    // Its loss curve, from the state directory the finished run left: one row per step, ending at the loss it printed.
    let state = out_dir.join("state");
    let history = lockstep(&["history", "--state-dir", state.to_str().unwrap()], None);
    assert!(history.status.success(), "{}", String::from_utf8_lossy(&history.stderr));
    let csv = String::from_utf8_lossy(&history.stdout).into_owned();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.iter().map(|r| r[0]).collect::<Vec<_>>(), ["1", "2", "3"], "{csv}");
    let last: f64 = rows[2][1].parse().unwrap();
    assert!(stdout.contains(&format!("loss {last:.4}")), "{stdout}\n{csv}");
    for log in ["worker-0.log", "worker-1.log"] {
        let text = std::fs::read_to_string(Path::new(&out_dir).join("logs").join(log)).unwrap();
        assert!(!text.contains("failed authentication"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_wrong_token_exits_at_once_instead_of_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_spec(dir.path(), 1, 10);
    let mut cluster = Cluster::start(&spec, 0, dir.path()).await;
    let bin = lockstep_cli::procs::sibling_binary("lockstep-worker").unwrap();
    let out = std::process::Command::new(bin)
        .env_remove("LOCKSTEP_TOKEN_FILE")
        .env("LOCKSTEP_TOKEN", "not-this-runs-token-at-all")
        .args(["--coordinator", &cluster.url(), "--threads", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:") && last.contains("session refused") && last.contains("wrong run token"),
        "{stderr}"
    );
    cluster.stop().await;
}
