//! The `lockstep` binary's answers to bad input, and its benchmarks' plumbing.
use std::process::Command;

/// `lockstep` with a run token in its environment.
fn lockstep(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .env_remove("LOCKSTEP_TOKEN_FILE")
        .env("LOCKSTEP_TOKEN", "cli-tests-token-0123456789")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn status_of_an_unreachable_coordinator_is_one_line() {
    let out = lockstep(&["status", "--coordinator", "http://127.0.0.1:1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error:") && stderr.contains("127.0.0.1:1"),
        "{stderr}"
    );
}

#[test]
fn status_and_stop_without_a_token_say_where_to_put_one() {
    for command in ["status", "stop"] {
        let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .env_remove("LOCKSTEP_TOKEN")
            .env_remove("LOCKSTEP_TOKEN_FILE")
            .args([command, "--coordinator", "http://127.0.0.1:1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("--token-file") && stderr.contains("LOCKSTEP_TOKEN"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn run_with_a_missing_config_names_it() {
    let out = lockstep(&["run", "--config", "/nonexistent/run.toml", "--no-progress"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/run.toml"), "{stderr}");
}

#[test]
fn bench_train_reports_the_step_split() {
    let out = lockstep(&["bench", "train", "--steps", "2", "--warmup", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for part in ["tokens/s", "forward", "backward", "all-reduce", "optimizer"] {
        assert!(stdout.contains(part), "{stdout}");
    }
}
