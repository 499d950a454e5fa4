//! Real coordinator and worker processes on 127.0.0.1 (DESIGN §8, tier 3).
use lockstep_cli::procs;
use lockstep_common::data::dataset::write_prepared;
use lockstep_common::data::tokenizer::{Tokenizer, TokenizerSpec};
use lockstep_common::proto::RunState;
use lockstep_common::spec::DataSource;
use lockstep_tests::{Cluster, load_tensors, relative_l2, small_spec};

/// Follows the run to its end; checks that it finished and that every process exited cleanly.
async fn finished(cluster: &mut Cluster) -> lockstep_common::proto::RunStatus {
    let status = cluster.final_status().await;
    let (workers, coordinator) = cluster.wait().await;
    assert_eq!(status.state, RunState::Finished as i32, "run failed: {}", status.error);
    assert!(workers.iter().all(|s| s.success()), "worker exits: {workers:?}");
    assert!(coordinator.success(), "coordinator exit: {coordinator:?}");
    status
}

/// Per-step (loss, checksum) from a worker's JSON log.
fn steps(cluster: &Cluster, i: usize) -> Vec<(u64, f64, String)> {
    cluster
        .worker_events(i, "step done")
        .iter()
        .map(|e| {
            (
                e["step"].as_u64().unwrap(),
                e["loss"].as_f64().unwrap(),
                e["checksum"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_loss_falls_and_parameters_stay_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = small_spec(dir.path(), 2, 24);
    // Checkpoints at 5, 10, 15, 20 and 24, pruned each time the coordinator commits one.
    spec.checkpoint.interval = 5;
    spec.checkpoint.keep = 2;
    let mut cluster = Cluster::start(&spec, 2, dir.path()).await;
    let status = finished(&mut cluster).await;
    assert_eq!(status.step, 24);

    let (a, b) = (steps(&cluster, 0), steps(&cluster, 1));
    assert_eq!(a.len(), 24);
    assert_eq!(b.len(), 24);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        assert!(!x.2.is_empty(), "step {} has no checksum", x.0);
        assert_eq!(x.2, y.2, "parameters differ between ranks after step {}", x.0);
        assert_eq!(x.1, y.1, "ranks report different global losses at step {}", x.0);
    }
    let first: f64 = a[..3].iter().map(|s| s.1).sum::<f64>() / 3.0;
    let last: f64 = a[21..].iter().map(|s| s.1).sum::<f64>() / 3.0;
    assert!(
        last < first * 0.8,
        "loss did not fall: first steps {first:.4}, last steps {last:.4}"
    );
    assert!(status.val_loss.is_some());
    let ckpt = std::path::Path::new(&status.last_checkpoint);
    for file in [
        "model.safetensors",
        "config.json",
        "optimizer.safetensors",
        "trainer.json",
        "manifest.json",
    ] {
        assert!(ckpt.join(file).is_file(), "{} missing in {}", file, ckpt.display());
    }
    let mut kept: Vec<String> = std::fs::read_dir(&spec.checkpoint.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with("step-"))
        .collect();
    kept.sort();
    assert_eq!(kept, ["step-00000020", "step-00000024"]);
}

/// Runs `spec` with `workers` workers to the end; returns per-step losses and the final model tensors.
async fn train(
    spec: &lockstep_common::RunSpec,
    workers: u32,
    dir: &std::path::Path,
) -> (Vec<f64>, std::collections::BTreeMap<String, Vec<f32>>, String) {
    let mut cluster = Cluster::start(spec, workers, dir).await;
    let status = cluster.final_status().await;
    cluster.wait().await;
    assert_eq!(status.state, RunState::Finished as i32, "run failed: {}", status.error);
    let losses = steps(&cluster, 0).iter().map(|s| s.1).collect();
    let tensors = load_tensors(&std::path::Path::new(&status.last_checkpoint).join("model.safetensors"));
    let checksum = status.workers[0].param_checksum.clone();
    (losses, tensors, checksum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_of_micro_b_equal_one_worker_of_micro_2b() {
    let dir = tempfile::tempdir().unwrap();
    let (d2, d1) = (dir.path().join("two"), dir.path().join("one"));
    let mut two = small_spec(&d2, 2, 10);
    two.train.global_batch = 16;
    two.train.micro_batch = 4;
    let mut one = small_spec(&d1, 1, 10);
    one.train.global_batch = 16;
    one.train.micro_batch = 8;
    let (l2, p2, _) = train(&two, 2, &d2).await;
    let (l1, p1, _) = train(&one, 1, &d1).await;
    assert_eq!(l1.len(), 10);
    for (step, (a, b)) in l2.iter().zip(&l1).enumerate() {
        assert!(
            ((a - b) / b).abs() < 1e-5,
            "step {}: loss {a} (2 workers) vs {b} (1 worker)",
            step + 1
        );
    }
    let dist = relative_l2(&p2, &p1);
    assert!(dist < 1e-5, "final parameters differ: relative L2 {dist:e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_run_twice_gives_the_same_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let mut a = small_spec(&da, 2, 8);
    a.model.dropout = 0.1;
    let mut b = small_spec(&db, 2, 8);
    b.model.dropout = 0.1;
    let (_, _, ca) = train(&a, 2, &da).await;
    let (_, _, cb) = train(&b, 2, &db).await;
    assert!(!ca.is_empty());
    assert_eq!(ca, cb, "two identical runs ended with different parameters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_a_live_run() {
    use lockstep_common::proto::WatchStatusRequest;
    let dir = tempfile::tempdir().unwrap();
    let spec = small_spec(dir.path(), 1, 100_000);
    let mut cluster = Cluster::start(&spec, 1, dir.path()).await;
    // Ready when the coordinator has seen two steps.
    let mut client = cluster.client().await;
    let mut stream = client.watch_status(WatchStatusRequest {}).await.unwrap().into_inner();
    while let Some(s) = stream.message().await.unwrap() {
        if s.step >= 2 && s.last_loss.is_some() {
            break;
        }
    }
    let lockstep = lockstep_cli::procs::sibling_binary("lockstep").unwrap();
    let out = tokio::process::Command::new(lockstep)
        .env("LOCKSTEP_TOKEN", cluster.token().expose())
        .args(["status", "--json", "--coordinator", &cluster.url()])
        .output()
        .await
        .unwrap();
    cluster.stop().await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "running");
    assert!(v["step"].as_u64().unwrap() >= 2);
    assert_eq!(v["total_steps"], 100_000);
    assert!(v["last_loss"].as_f64().unwrap() > 0.0);
    assert!(v["val_loss"].is_null() || v["val_loss"].as_f64().is_some());
    assert!(v["tokens_per_sec"].as_f64().unwrap() > 0.0);
    assert!(v["eta_secs"].as_f64().unwrap() > 0.0);
    let w = &v["workers"][0];
    assert_eq!(w["rank"], 0);
    assert_eq!(w["device"], "cpu");
    assert_eq!(w["state"], "training");
    assert!(!w["host"].as_str().unwrap().is_empty());
    assert!(w["last_step_ms"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_conflicting_spec_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_spec(dir.path(), 2, 10);
    let mut cluster = Cluster::start(&spec, 0, dir.path()).await;
    let mut theirs = spec.clone();
    theirs.train.global_batch = 32;
    let other = dir.path().join("other.toml");
    std::fs::write(&other, toml::to_string(&theirs).unwrap()).unwrap();
    let log = dir.path().join("conflicting.log");
    let args = vec!["--config".to_string(), other.display().to_string()];
    let mut worker = lockstep_cli::procs::spawn_worker(&cluster.url(), &log, &args, cluster.token()).unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), worker.wait())
        .await
        .unwrap()
        .unwrap();
    cluster.stop().await;
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    assert!(errors[0].contains("train.global_batch: 32 vs 16"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

/// Two workers train on a prepared directory (shards + manifest + tokenizer.json, written here by hand): the
/// coordinator checks it fully at start-up and logs the data plan, and the validation loss is reported with its
/// perplexity in the workers' logs and in the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_on_a_prepared_directory_and_report_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data, 0);
    let mut spec = small_spec(dir.path(), 2, 6);
    spec.data.source = DataSource::Prepared;
    spec.data.path = Some(data);
    spec.train.eval_interval = 3;
    let mut cluster = Cluster::start(&spec, 2, dir.path()).await;
    let status = finished(&mut cluster).await;
    assert_eq!(status.step, 6);

    let (a, b) = (steps(&cluster, 0), steps(&cluster, 1));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "the two ranks disagree");
    for i in 0..2 {
        let evals = cluster.worker_events(i, "evaluated");
        assert_eq!(
            evals.iter().map(|e| e["step"].as_u64().unwrap()).collect::<Vec<_>>(),
            vec![3, 6]
        );
        for e in &evals {
            let (loss, ppl) = (e["val_loss"].as_f64().unwrap(), e["val_perplexity"].as_f64().unwrap());
            assert!(loss > 0.0 && loss.is_finite(), "{e}");
            assert!((ppl - loss.exp()).abs() < 1e-9 * ppl, "{e}");
        }
    }
    let val = status.val_loss.expect("a validation loss in the status");
    assert_eq!(Some(val), cluster.worker_events(0, "evaluated")[1]["val_loss"].as_f64());
    let json = lockstep_cli::status_view::to_json(&status);
    assert!((json["val_perplexity"].as_f64().unwrap() - val.exp()).abs() < 1e-9 * val.exp());
    assert!(lockstep_cli::status_view::render_table(&status).contains("(ppl "));

    let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    assert!(log.contains("data checked") && log.contains("verify=Full"), "{log}");
    // (3000 − 1) / 40 + (2000 − 1) / 40 = 74 + 49 windows; 16 per step.
    assert!(
        log.contains("train_windows=123") && log.contains("steps_per_epoch=7") && log.contains("dropped_per_epoch=11"),
        "{log}"
    );
}

/// A prepared directory of byte tokens at `data`: two training shards and one validation shard of English-like
/// words; `seed` changes the words.
fn write_data(data: &std::path::Path, seed: usize) {
    let text = |n: usize, shard: usize| {
        let words = [
            "the ", "quick ", "brown ", "fox ", "jumps ", "over ", "a ", "lazy ", "dog. ",
        ];
        (0..n)
            .map(|i| words[(i * i + shard + seed) % words.len()])
            .collect::<String>()
            .bytes()
            .take(n)
            .map(u32::from)
            .collect::<Vec<u32>>()
    };
    std::fs::create_dir_all(data).unwrap();
    let tokenizer = Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty::<String>()).unwrap();
    write_prepared(
        data,
        &tokenizer,
        &TokenizerSpec::Byte,
        &[text(3000, 0), text(2000, 1)],
        &[text(600, 2)],
    )
    .unwrap();
}

/// A worker whose copy of the data differs from the coordinator's refuses to train and says so; the sum of
/// gradients would otherwise hide it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_other_data_than_the_coordinator_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data, 0);
    let mut spec = small_spec(dir.path(), 1, 4);
    spec.data.source = DataSource::Prepared;
    spec.data.path = Some(data.clone());
    // The refused worker leaves; with no other worker to re-form with, the run fails after this wait.
    spec.cluster.reform_timeout_secs = 2;
    let config = dir.path().join("run.toml");
    std::fs::write(&config, toml::to_string(&spec).unwrap()).unwrap();
    let token = lockstep_common::auth::RunToken::generate();
    let mut coordinator = procs::spawn_coordinator(
        &config,
        &dir.path().join("coordinator.log"),
        &[],
        std::time::Duration::from_secs(60),
        &token,
    )
    .await
    .unwrap();
    // The coordinator has read the data (it does before it listens); the worker's host has another copy.
    std::fs::remove_dir_all(&data).unwrap();
    write_data(&data, 1);
    let args: Vec<String> = ["--threads", "1", "--log-format", "json"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut worker = procs::spawn_worker(&coordinator.url(), &dir.path().join("worker-0.log"), &args, &token).unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(120), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success(), "the worker trained on other data");
    let c = tokio::time::timeout(std::time::Duration::from_secs(120), coordinator.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!c.success(), "the run should fail");
    let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    assert!(log.contains("is not the coordinator's (data fingerprint"), "{log}");
}
