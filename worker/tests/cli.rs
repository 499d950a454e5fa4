//! The worker binary's answers to bad input: a non-zero exit and one `error:` line naming the problem.
use std::process::Command;

mod stderr_util;
use stderr_util::one_error_line;

/// The worker with `args` and a run token in its environment.
fn run(args: &[&str]) -> (bool, String) {
    run_with_token(args, Some("worker-cli-tests-token-0123"))
}

fn run_with_token(args: &[&str], token: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockstep-worker"));
    cmd.env_remove("LOCKSTEP_TOKEN").env_remove("LOCKSTEP_TOKEN_FILE");
    if let Some(token) = token {
        cmd.env("LOCKSTEP_TOKEN", token);
    }
    let out = cmd.args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn unreachable_coordinator_is_named() {
    // Port 1 on loopback: nothing listens there.
    let (ok, stderr) = run(&["--coordinator", "http://127.0.0.1:1", "--connect-timeout-secs", "1"]);
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(line.contains("127.0.0.1:1") && line.contains("unreachable"), "{line}");
}

#[test]
fn a_malformed_coordinator_address_is_named() {
    let (ok, stderr) = run(&["--coordinator", "not a url", "--connect-timeout-secs", "1"]);
    assert!(!ok);
    assert!(one_error_line(&stderr).contains("not a url"), "{stderr}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_says_so() {
    let (ok, stderr) = run(&["--device", "cuda:0"]);
    assert!(!ok);
    assert!(one_error_line(&stderr).contains("--device cuda:0"), "{stderr}");
    let (ok, stderr) = run(&["--gpus", "all"]);
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(line.contains("--gpus all") && line.contains("`cuda` feature"), "{line}");
}

/// Checked before the driver is asked anything, so it holds on a build box (`scripts/cuda/build.sh --check`, the
/// driver stub loaded) as on a GPU host.
#[cfg(feature = "cuda")]
#[test]
fn a_misspelt_gpu_composed_kernel_is_refused_before_the_gpu_opens() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockstep-worker"));
    cmd.env("LOCKSTEP_TOKEN", "worker-cli-tests-token-0123");
    cmd.env("LOCKSTEP_GPU_COMPOSED", "gelu,layernorm");
    let out = cmd.args(["--device", "cuda:0"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = one_error_line(&stderr);
    assert!(
        line.contains("LOCKSTEP_GPU_COMPOSED=gelu,layernorm")
            && line.contains("`layernorm`")
            && line.contains("layer_norm"),
        "{line}"
    );
}

#[test]
fn a_malformed_gpu_list_is_named() {
    let (ok, stderr) = run(&["--gpus", "0,zero"]);
    assert!(!ok);
    assert!(one_error_line(&stderr).contains("--gpus 0,zero"), "{stderr}");
}

#[test]
fn a_bad_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.toml");
    std::fs::write(&path, "[train]\nbogus_key = 1\n").unwrap();
    let (ok, stderr) = run(&["--config", path.to_str().unwrap(), "--connect-timeout-secs", "1"]);
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(line.contains("bogus_key") && line.contains("w.toml"), "{line}");
}

#[test]
fn no_run_token_says_where_to_put_one() {
    let (ok, stderr) = run_with_token(
        &["--coordinator", "http://127.0.0.1:1", "--connect-timeout-secs", "1"],
        None,
    );
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(
        line.contains("--token-file") && line.contains("LOCKSTEP_TOKEN"),
        "{line}"
    );

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("token");
    std::fs::write(&empty, "\n").unwrap();
    let args = ["--token-file", empty.to_str().unwrap(), "--connect-timeout-secs", "1"];
    let (ok, stderr) = run_with_token(&args, None);
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(
        line.contains(empty.to_str().unwrap()) && line.contains("empty"),
        "{line}"
    );
}

#[test]
fn tls_flags_and_the_url_scheme_must_agree() {
    let (ok, stderr) = run(&["--coordinator", "http://127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem"]);
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(line.contains("--tls-ca") && line.contains("https://"), "{line}");
    let (ok, stderr) = run(&["--coordinator", "https://127.0.0.1:1"]);
    assert!(!ok);
    assert!(one_error_line(&stderr).contains("needs --tls-ca"), "{stderr}");
    let (ok, stderr) = run(&[
        "--coordinator",
        "https://127.0.0.1:1",
        "--tls-ca",
        "/nonexistent/ca.pem",
    ]);
    assert!(!ok);
    assert!(one_error_line(&stderr).contains("/nonexistent/ca.pem"), "{stderr}");
    let (ok, stderr) = run(&["--tls-ca", "/ca.pem", "--tls-cert", "/c.pem"]);
    assert!(!ok);
    assert!(
        one_error_line(&stderr).contains("--tls-cert needs --tls-key"),
        "{stderr}"
    );
}
