//! Chaos on loopback (issue 6): real coordinator and worker processes, killed, stopped and restarted mid-run. Each
//! test synchronises on the coordinator's status stream, never on sleeps; the times they print (`--nocapture`) are
//! the figures recorded in docs/BENCHMARKS.md.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use lockstep_cli::procs;
use lockstep_common::RunSpec;
use lockstep_common::proto::{RunState, RunStatus, StopRunRequest, WorkerState};
use lockstep_tests::{Cluster, Watch, read_events, small_spec};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Child;

/// A run that re-forms: `workers` start, `min_workers` suffice, checkpoints every 5 steps (all kept), losses
/// detected within 5 s (1 s heartbeats).
fn elastic_spec(dir: &Path, workers: u32, min_workers: u32, steps: u64) -> RunSpec {
    let mut spec = small_spec(dir, workers, steps);
    spec.cluster.min_workers = min_workers;
    spec.cluster.max_workers = workers;
    spec.cluster.heartbeat_interval_secs = 1;
    spec.checkpoint.interval = 5;
    spec.checkpoint.keep = 0;
    spec.train.eval_interval = 0;
    spec
}

fn signal(child: &Child, sig: Signal) {
    let pid = child.id().expect("the process is running");
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

/// Waits until every one of the cluster's workers is a member of the running generation (the first generation forms
/// with `min_workers`; the others are admitted at the first checkpoint).
async fn all_training(cluster: &Cluster, watch: &mut Watch) -> RunStatus {
    let n = cluster.workers.len() as u32;
    watch
        .until("every worker training", |s| {
            s.state == RunState::Running as i32 && s.world_size == n
        })
        .await
}

/// A run too long to finish during a test, its 3 workers all training (2 suffice), a few steps in.
async fn three_workers_training(dir: &Path) -> (Cluster, Watch, RunStatus) {
    let spec = elastic_spec(dir, 3, 2, 100_000);
    let cluster = Cluster::start(&spec, 3, dir).await;
    let mut watch = cluster.watch().await;
    let all = all_training(&cluster, &mut watch).await;
    watch.until("a few steps", |s| s.step >= all.step + 3).await;
    (cluster, watch, all)
}

/// Every worker log of the cluster's directory (workers started later log to files of their own).
fn worker_logs(cluster: &Cluster) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<_> = std::fs::read_dir(&cluster.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("worker-") && n.ends_with(".log"))
        })
        .collect();
    logs.sort();
    logs
}

/// Per step, the global sequence ranges of the generation whose result survived (the newest generation that
/// started the step: a generation that started a step and did not complete it is always followed by one that
/// trains it again), from every worker's `step start` log lines.
fn surviving_sequences(cluster: &Cluster) -> BTreeMap<u64, Vec<(u64, u64)>> {
    // step -> generation -> ranges
    let mut by_step: BTreeMap<u64, BTreeMap<u64, Vec<(u64, u64)>>> = BTreeMap::new();
    for log in worker_logs(cluster) {
        for e in read_events(&log, "step start") {
            let step = e["step"].as_u64().unwrap();
            let generation = e["generation"].as_u64().unwrap();
            let ranges = by_step.entry(step).or_default().entry(generation).or_default();
            for r in e["sequences"].as_str().unwrap().split(',') {
                let (a, b) = r.split_once("..").unwrap();
                ranges.push((a.parse().unwrap(), b.parse().unwrap()));
            }
        }
    }
    by_step
        .into_iter()
        .map(|(step, gens)| {
            let (_, mut ranges) = gens.into_iter().next_back().unwrap();
            ranges.sort_unstable();
            (step, ranges)
        })
        .collect()
}

/// Every sequence index of every step was consumed exactly once, end to end.
fn assert_no_duplicate_no_gap(cluster: &Cluster, spec: &RunSpec) {
    let g = spec.train.global_batch as u64;
    let steps = surviving_sequences(cluster);
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        (1..=spec.train.total_steps).collect::<Vec<_>>()
    );
    let mut next = 0;
    for (step, ranges) in steps {
        for (a, b) in ranges {
            assert_eq!(
                a, next,
                "step {step}: sequences {a}..{b} leave a gap or repeat after {next}"
            );
            next = b;
        }
        assert_eq!(next, step * g, "step {step} did not consume exactly its {g} sequences");
    }
}

fn final_loss(cluster: &Cluster) -> f64 {
    let steps = surviving_sequences(cluster).len() as u64;
    (0..cluster.workers.len())
        .flat_map(|i| cluster.worker_events(i, "step done"))
        .filter(|e| e["step"].as_u64() == Some(steps))
        .filter_map(|e| e["loss"].as_f64())
        .next_back()
        .unwrap()
}

async fn finishes(watch: Watch) -> RunStatus {
    let status = watch.last().await;
    assert_eq!(
        status.state,
        RunState::Finished as i32,
        "run did not finish: {}",
        status.error
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_mid_run_loses_no_data_and_matches_an_uninterrupted_run() {
    let steps = 30;
    let base_dir = tempfile::tempdir().unwrap();
    let base_spec = elastic_spec(base_dir.path(), 3, 2, steps);
    let mut base = Cluster::start(&base_spec, 3, base_dir.path()).await;
    finishes(base.watch().await).await;
    base.wait().await;
    let base_loss = final_loss(&base);

    for seed in [1u64, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let spec = elastic_spec(dir.path(), 3, 2, steps);
        let mut cluster = Cluster::start(&spec, 3, dir.path()).await;
        let mut watch = cluster.watch().await;
        // A random step past the first checkpoint, and a random victim, from the seed.
        let kill_at = 6 + (seed * 7919) % 15;
        let victim = (seed % 3) as usize;
        all_training(&cluster, &mut watch).await;
        watch.until("the kill step", |s| s.step >= kill_at).await;
        let killed = Instant::now();
        cluster.workers[victim].start_kill().unwrap();
        let lost = watch.until("the lost worker", |s| !s.lost.is_empty()).await;
        let detected = killed.elapsed();
        let lost_in = lost.lost[0].generation;
        let resumed = watch
            .until("training resumed", |s| {
                s.state == RunState::Running as i32 && s.generation > lost_in
            })
            .await;
        let to_resume = killed.elapsed();
        let resumed_at = last_start_step(&dir.path().join("coordinator.log"));
        let status = finishes(watch).await;
        let (exits, coordinator) = cluster.wait().await;

        let record = &status.lost[0];
        assert_eq!(record.worker_id, format!("w{victim}"));
        assert!(record.reason.contains("lost"), "{record:?}");
        assert!(status.restarts >= 1);
        assert_eq!(status.step, steps);
        for (i, exit) in exits.iter().enumerate() {
            assert!(i == victim || exit.success(), "worker {i} exit {exit:?}");
        }
        assert!(coordinator.success());
        assert_no_duplicate_no_gap(&cluster, &spec);
        let loss = final_loss(&cluster);
        let rel = (loss - base_loss).abs() / base_loss;
        assert!(
            rel < 1e-2,
            "final loss {loss} vs uninterrupted {base_loss} (rel {rel:.2e})"
        );
        // Steps trained twice: from the checkpoint resumed from up to where the old generation had got.
        let redone = record.last_step.saturating_sub(resumed_at.min(record.last_step));
        eprintln!(
            "chaos kill-9 worker seed {seed}: killed w{victim} at step >= {kill_at}; detected {:.1} ms, training resumed \
             {:.1} ms after the kill (generation {}, from step {}); steps lost {redone}; final loss {loss:.5} vs {base_loss:.5}",
            detected.as_secs_f64() * 1e3,
            to_resume.as_secs_f64() * 1e3,
            resumed.generation,
            resumed_at
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_is_detected_and_rejoins_after_sigcont() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, mut watch, _) = three_workers_training(dir.path()).await;
    let stopped = Instant::now();
    signal(&cluster.workers[2], Signal::SIGSTOP);
    let lost = watch.until("the stopped worker lost", |s| !s.lost.is_empty()).await;
    let detected = stopped.elapsed();
    assert_eq!(lost.lost[0].worker_id, "w2");
    assert!(lost.lost[0].reason.contains("no message for"), "{:?}", lost.lost[0]);
    let reformed = watch
        .until("a generation without it", |s| {
            s.state == RunState::Running as i32 && s.generation > lost.lost[0].generation && s.world_size == 2
        })
        .await;
    let going = watch
        .until("progress after re-forming", |s| s.step > reformed.step)
        .await;
    eprintln!(
        "chaos SIGSTOP worker: detected {:.2} s after SIGSTOP (heartbeat 1 s × 5); training again from step {} \
         ({:.2} s after SIGSTOP)",
        detected.as_secs_f64(),
        reformed.step,
        stopped.elapsed().as_secs_f64()
    );
    assert!(going.step > reformed.step);

    signal(&cluster.workers[2], Signal::SIGCONT);
    let back = watch
        .until("the worker back in a later generation", |s| {
            s.state == RunState::Running as i32
                && s.world_size == 3
                && s.workers.iter().any(|w| w.worker_id == "w2" && w.rank >= 0)
        })
        .await;
    assert!(back.generation > reformed.generation);

    let mut client = cluster.client().await;
    let reply = client
        .stop_run(StopRunRequest {
            reason: "test over".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.accepted, "{}", reply.message);
    let status = watch.last().await;
    assert_eq!(status.state, RunState::Stopped as i32, "{}", status.error);
    let (exits, coordinator) = cluster.wait().await;
    assert!(exits.iter().all(|e| e.success()), "{exits:?}");
    assert!(coordinator.success());
    // The stop checkpointed the step the ranks agreed on.
    let ckpt = Path::new(&status.last_checkpoint);
    assert!(ckpt.join("manifest.json").is_file(), "{}", ckpt.display());
    assert!(status.last_checkpoint.ends_with(&format!("step-{:08}", status.step)));
}

/// Starts the coordinator again on the same config and port. It keeps serving status after the run (the run may end
/// before a client connects): [`finished_and_stopped`] reads the final status, then stops it.
async fn restart_coordinator(cluster: &mut Cluster, log: &str) {
    let addr = cluster.coordinator.addr.to_string();
    let config = cluster.dir.join("run.toml");
    cluster.coordinator = procs::spawn_coordinator(
        &config,
        &cluster.dir.join(log),
        &["--listen", &addr, "--serve-after-finish"],
        Duration::from_secs(60),
        &cluster.token().clone(),
    )
    .await
    .unwrap();
}

/// The final status of a run whose coordinator serves after the end; then SIGTERM stops it (exit 0).
async fn finished_and_stopped(cluster: &mut Cluster) -> RunStatus {
    let mut watch = cluster.watch().await;
    let status = watch
        .until("the end of the run", |s| {
            s.state != RunState::Running as i32
                && s.state != RunState::Reforming as i32
                && s.state != RunState::Waiting as i32
        })
        .await;
    assert_eq!(
        status.state,
        RunState::Finished as i32,
        "run did not finish: {}",
        status.error
    );
    signal(&cluster.coordinator.child, Signal::SIGTERM);
    status
}

/// The step of the newest committed checkpoint in `status` (0 = none).
fn checkpoint_step(status: &RunStatus) -> u64 {
    status
        .last_checkpoint
        .rsplit("step-")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Seconds of the day of a text log line (`2026-11-28T22:04:23.252356Z  INFO ...`).
fn log_secs(line: &str) -> f64 {
    let time = &line[line.find('T').unwrap() + 1..line.find('Z').unwrap()];
    let mut parts = time.split(':').map(|p| p.parse::<f64>().unwrap());
    let (h, m, s) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    h * 3600.0 + m * 60.0 + s
}

/// `start_step` of the newest `generation formed` line of a coordinator log.
fn last_start_step(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text.lines().rev().find(|l| l.contains("generation formed")).unwrap();
    let rest = &line[line.find("start_step=").unwrap() + "start_step=".len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// Steps that some generation started again after another had (retrained after a restart from a checkpoint).
fn retrained_steps(cluster: &Cluster) -> Vec<u64> {
    let mut generations: BTreeMap<u64, std::collections::BTreeSet<u64>> = BTreeMap::new();
    for log in worker_logs(cluster) {
        for e in read_events(&log, "step start") {
            generations
                .entry(e["step"].as_u64().unwrap())
                .or_default()
                .insert(e["generation"].as_u64().unwrap());
        }
    }
    generations
        .into_iter()
        .filter(|(_, g)| g.len() > 1)
        .map(|(step, _)| step)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_coordinator_then_a_restart_finishes_the_run_without_losing_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let spec = elastic_spec(dir.path(), 2, 2, 300);
    let mut cluster = Cluster::start(&spec, 2, dir.path()).await;
    let mut watch = cluster.watch().await;
    let before = watch
        .until("a committed checkpoint past step 10", |s| {
            s.step >= 12 && checkpoint_step(s) >= 10
        })
        .await;
    let killed = Instant::now();
    cluster.coordinator.child.start_kill().unwrap();
    cluster.coordinator.child.wait().await.unwrap();
    restart_coordinator(&mut cluster, "coordinator-2.log").await;
    let mut watch = cluster.watch().await;
    let adopted = watch
        .until("the generation taken over", |s| s.state != RunState::Waiting as i32)
        .await;
    let back = killed.elapsed();
    let log = std::fs::read_to_string(dir.path().join("coordinator-2.log")).unwrap();
    assert!(log.contains("generation adopted"), "{log}");
    assert!(
        !log.contains("generation formed"),
        "the workers were re-formed instead of taken over:\n{log}"
    );
    let status = finished_and_stopped(&mut cluster).await;
    let (exits, coordinator) = cluster.wait().await;
    assert!(exits.iter().all(|e| e.success()), "{exits:?}");
    assert!(coordinator.success());
    assert_eq!(status.step, 300);
    assert_eq!(status.generation, before.generation);
    assert_no_duplicate_no_gap(&cluster, &spec);
    // The workers trained on while the coordinator was away: no step was trained twice.
    assert_eq!(retrained_steps(&cluster), Vec::<u64>::new());
    eprintln!(
        "chaos kill-9 coordinator: killed at step {}; the restarted coordinator took the generation over {:.1} ms \
         after the kill, at step {}; steps lost 0",
        before.step,
        back.as_secs_f64() * 1e3,
        adopted.step
    );
}

/// Flips bytes in the middle of the file, as a bad disk would.
fn corrupt(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(file, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let spec = elastic_spec(dir.path(), 2, 2, 40);
    let mut cluster = Cluster::start(&spec, 2, dir.path()).await;
    let mut watch = cluster.watch().await;
    watch
        .until("two committed checkpoints", |s| {
            s.step >= 12 && checkpoint_step(s) >= 10
        })
        .await;
    // The whole cluster goes down (a power cut): nobody is left training, so the run must resume from disk.
    cluster.coordinator.child.start_kill().unwrap();
    cluster.coordinator.child.wait().await.unwrap();
    for w in &mut cluster.workers {
        w.start_kill().unwrap();
        w.wait().await.unwrap();
    }
    // Damage every checkpoint from step 10 on (one may have been written after the status was read).
    let root = spec.checkpoint.dir.clone();
    let mut damaged = Vec::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok())
            && step >= 10
        {
            corrupt(&path.join("model.safetensors"));
            damaged.push(step);
        }
    }
    assert!(!damaged.is_empty());
    restart_coordinator(&mut cluster, "coordinator-2.log").await;
    let (url, token) = (cluster.url(), cluster.token().clone());
    cluster.workers = (0..2)
        .map(|i| {
            let args: Vec<String> = [
                "--threads",
                "1",
                "--log-format",
                "json",
                "--worker-id",
                &format!("w{i}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            procs::spawn_worker(&url, &dir.path().join(format!("worker-{i}-again.log")), &args, &token).unwrap()
        })
        .collect();
    let status = finished_and_stopped(&mut cluster).await;
    cluster.wait().await;
    assert_eq!(status.step, 40);
    let log = std::fs::read_to_string(dir.path().join("coordinator-2.log")).unwrap();
    let said = log
        .lines()
        .find(|l| l.contains("checkpoint damaged"))
        .unwrap_or_else(|| panic!("the coordinator did not say it fell back:\n{log}"));
    assert!(said.contains("resuming from"), "{said}");
    // Every damaged one skipped: the run went on from the newest intact checkpoint.
    assert_eq!(last_start_step(&dir.path().join("coordinator-2.log")), 5, "{log}");
    let formed = log.lines().rev().find(|l| l.contains("generation formed")).unwrap();
    let started = log.lines().next().unwrap();
    eprintln!(
        "chaos damaged checkpoint: damaged steps {damaged:?}; the restarted coordinator resumed from step 5 {:.1} ms \
         after its first log line (one failed resume per damaged checkpoint); steps lost {}",
        (log_secs(formed) - log_secs(started)) * 1e3,
        damaged.iter().max().unwrap() - 5
    );
    assert_no_duplicate_no_gap(&cluster, &spec);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_worker_checkpoints_and_the_rest_go_on_then_sigterm_to_the_coordinator_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, mut watch, all) = three_workers_training(dir.path()).await;
    let signalled = Instant::now();
    signal(&cluster.workers[1], Signal::SIGTERM);
    let exit = tokio::time::timeout(Duration::from_secs(60), cluster.workers[1].wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "the leaving worker exits 0: {exit:?}");
    let reformed = watch
        .until("two workers going on", |s| {
            s.state == RunState::Running as i32 && s.world_size == 2 && s.generation > all.generation
        })
        .await;
    eprintln!(
        "chaos SIGTERM worker: it left after checkpointing step {}; the others trained on {:.1} ms after the signal \
         (steps lost 0)",
        reformed.step,
        signalled.elapsed().as_secs_f64() * 1e3
    );
    assert!(reformed.lost.is_empty(), "leaving is not a loss: {:?}", reformed.lost);
    assert_eq!(reformed.restarts, 0);
    // It left after a checkpoint of the step the ranks agreed on: the new generation starts there.
    assert!(
        reformed
            .last_checkpoint
            .ends_with(&format!("step-{:08}", reformed.step))
    );
    watch.until("progress", |s| s.step > reformed.step).await;

    signal(&cluster.coordinator.child, Signal::SIGTERM);
    let status = watch.last().await;
    assert_eq!(status.state, RunState::Stopped as i32, "{}", status.error);
    assert!(status.last_checkpoint.ends_with(&format!("step-{:08}", status.step)));
    let coordinator = tokio::time::timeout(Duration::from_secs(60), cluster.coordinator.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(coordinator.success(), "{coordinator:?}");
    for i in [0, 2] {
        let exit = tokio::time::timeout(Duration::from_secs(60), cluster.workers[i].wait())
            .await
            .unwrap()
            .unwrap();
        assert!(exit.success(), "worker {i}: {exit:?}");
    }
    assert!(status.workers.iter().all(|w| w.state != WorkerState::Lost as i32));
}
