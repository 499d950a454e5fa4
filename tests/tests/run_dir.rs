//! `lockstep run` and its run directory (`--out`): everything a run leaves — run.toml, logs/, the run state and the
//! checkpoints — is under it, with or without --config; a config run resumes from it, a finished one is refused
//! before any process starts, and the built-in demo starts afresh without an earlier run's checkpoints.
use std::path::Path;
use std::process::Output;

use lockstep_common::RunSpec;
use lockstep_common::proto::{RunState, StopRunRequest};
use lockstep_tests::{Cluster, small_spec};

/// Runs `lockstep ARGS` in `cwd` (one worker with one thread, no progress bar) to its end.
fn lockstep_run(cwd: &Path, args: &[&str]) -> Output {
    let bin = lockstep_cli::procs::sibling_binary("lockstep").unwrap();
    std::process::Command::new(bin)
        .current_dir(cwd)
        .env_remove("LOCKSTEP_TOKEN")
        .env_remove("LOCKSTEP_TOKEN_FILE")
        .arg("run")
        .args(["--workers", "1", "--threads-per-worker", "1", "--no-progress"])
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A tiny config named `name`, whose own state and checkpoint directories are the defaults, relative to the working
/// directory: what several configs run from one directory used to share.
fn write_config(path: &Path, name: &str, lr: f64, steps: u64) {
    let mut spec = small_spec(Path::new("."), 1, steps);
    spec.run.name = name.into();
    spec.train.lr = lr;
    spec.checkpoint.dir = RunSpec::default().checkpoint.dir;
    spec.cluster.state_dir = RunSpec::default().cluster.state_dir;
    std::fs::write(path, toml::to_string(&spec).unwrap()).unwrap();
}

/// The `step-*` directories under `dir`, sorted.
fn checkpoints(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    names
}

#[test]
fn two_configs_run_from_one_directory_each_keep_their_state_and_checkpoints_under_their_out() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    write_config(&cwd.join("a.toml"), "run-a", 1e-2, 4);
    write_config(&cwd.join("b.toml"), "run-b", 2e-2, 3);
    for (config, out, steps) in [("a.toml", "out-a", 4), ("b.toml", "out-b", 3)] {
        let run = lockstep_run(cwd, &["--config", config, "--out", out]);
        assert!(run.status.success(), "{}", text(&run));
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(stdout.contains(&format!("finished {steps} steps in")), "{}", text(&run));
        let last = format!("{out}/checkpoints/step-{steps:08}");
        assert!(stdout.contains(&format!("checkpoint: {last}")), "{}", text(&run));
        assert!(cwd.join(out).join("state").join("run.redb").is_file());
        assert_eq!(
            checkpoints(&cwd.join(out).join("checkpoints")),
            [format!("step-{steps:08}")]
        );
    }
    // Nothing landed in the configs' own (shared) directories.
    assert!(!cwd.join("lockstep-state").exists());
    assert!(!cwd.join("checkpoints").exists());
}

#[test]
fn a_finished_config_run_is_refused_in_its_out_without_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    write_config(&cwd.join("a.toml"), "run-a", 1e-2, 3);
    let args = ["--config", "a.toml", "--out", "out"];
    let first = lockstep_run(cwd, &args);
    assert!(first.status.success(), "{}", text(&first));

    // What a started run writes first: without them afterwards, nothing was started.
    std::fs::remove_dir_all(cwd.join("out/logs")).unwrap();
    std::fs::remove_file(cwd.join("out/run.toml")).unwrap();
    let longer = [&args[..], &["--steps", "6"][..]].concat();
    for again in [&args[..], &longer[..]] {
        let refused = lockstep_run(cwd, again);
        assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
        assert!(refused.stdout.is_empty(), "{}", text(&refused));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(
            stderr.trim_end(),
            "error: out/state: run run-a already finished (3 steps; checkpoint out/checkpoints/step-00000003): use \
             another --out, or delete out to train again",
            "{}",
            text(&refused)
        );
        assert!(!cwd.join("out/logs").exists() && !cwd.join("out/run.toml").exists());
    }
    assert_eq!(checkpoints(&cwd.join("out/checkpoints")), ["step-00000003"]);
}

#[test]
fn the_demo_run_again_with_fewer_steps_leaves_only_its_own_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    for steps in ["4", "2"] {
        let run = lockstep_run(cwd, &["--steps", steps, "--out", "demo"]);
        assert!(run.status.success(), "{}", text(&run));
        assert!(
            String::from_utf8_lossy(&run.stdout).contains(&format!("finished {steps} steps in")),
            "{}",
            text(&run)
        );
    }
    assert_eq!(checkpoints(&cwd.join("demo/checkpoints")), ["step-00000002"]);
}

/// The demo clears its run directory, but never one a --config run keeps (which the same command would resume):
/// the demo's default --out is a config run's whenever both are named `addition-demo`.
#[test]
fn the_demo_refuses_to_clear_a_config_runs_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    write_config(&cwd.join("a.toml"), "run-a", 1e-2, 3);
    let first = lockstep_run(cwd, &["--config", "a.toml", "--out", "out"]);
    assert!(first.status.success(), "{}", text(&first));
    let demo = lockstep_run(cwd, &["--steps", "2", "--out", "out"]);
    assert_eq!(demo.status.code(), Some(2), "{}", text(&demo));
    assert!(
        String::from_utf8_lossy(&demo.stderr).contains("holds a run started with --config"),
        "{}",
        text(&demo)
    );
    assert_eq!(checkpoints(&cwd.join("out/checkpoints")), ["step-00000003"]);
    assert!(cwd.join("out/state/run.redb").is_file());
}

/// A config run stopped after a checkpoint (its coordinator told to stop, as Ctrl-C does) is resumed by the same
/// `lockstep run` command, from that checkpoint, to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_config_run_resumes_from_its_checkpoint_in_the_same_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // The spec `lockstep run --config run.toml --out OUT` runs: its state and checkpoints under OUT.
    let mut spec = small_spec(&out, 1, 200);
    spec.checkpoint.interval = 2;
    spec.checkpoint.keep = 0;
    let config = dir.path().join("run.toml");
    std::fs::write(&config, toml::to_string(&spec).unwrap()).unwrap();

    let mut cluster = Cluster::start(&spec, 1, &dir.path().join("first")).await;
    let watch = cluster.watch().await;
    cluster
        .wait_until("a checkpoint", |s| !s.last_checkpoint.is_empty())
        .await;
    let reply = cluster
        .client()
        .await
        .stop_run(StopRunRequest {
            reason: "test: stop".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.accepted, "{}", reply.message);
    let stopped = watch.last().await;
    assert_eq!(stopped.state, RunState::Stopped as i32, "{}", stopped.error);
    cluster.wait().await;

    let (cwd, out) = (dir.path().to_path_buf(), out.display().to_string());
    let run = tokio::task::spawn_blocking(move || lockstep_run(&cwd, &["--config", "run.toml", "--out", &out]))
        .await
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains(&format!(
            "resuming run e2e from {} (step {})",
            stopped.last_checkpoint, stopped.step
        )),
        "{}",
        text(&run)
    );
    assert!(
        stdout.contains(&format!(
            "finished 200 steps ({} of them now, resumed at step {})",
            200 - stopped.step,
            stopped.step
        )),
        "{}",
        text(&run)
    );
}
