//! The worker binary's answers to bad input: a non-zero exit and one `error:` line naming the problem.
use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep-worker"))
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn one_error_line(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    errors[0]
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
