//! Harness for the end-to-end tests: start a real `lockstep-coordinator` and real `lockstep-worker` processes on
//! 127.0.0.1 for a run spec, wait on printed lines and exits (never on sleeps), and read what the workers logged
//! (JSON lines) and what the coordinator reports. Every cluster has a fresh run token, handed to its processes in
//! their environment; clients of its coordinator send it.
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use lockstep_cli::procs::{self, CoordinatorProcess};
use lockstep_common::RunSpec;
use lockstep_common::auth::RunToken;
use lockstep_common::proto::{RunStatus, WatchStatusRequest};
use lockstep_common::transport::CoordinatorClient;
use serde_json::Value;
use tokio::process::Child;

/// A small, fast run of the addition task: `workers` ranks, `steps` steps, checksums every step.
pub fn small_spec(dir: &Path, workers: u32, steps: u64) -> RunSpec {
    let mut spec = RunSpec::default();
    spec.run.name = "e2e".into();
    spec.cluster.listen = "127.0.0.1:0".into();
    spec.cluster.min_workers = workers;
    spec.cluster.max_workers = workers;
    spec.cluster.collective_timeout_secs = 30;
    spec.model.n_layer = 2;
    spec.model.n_head = 2;
    spec.model.n_embd = 32;
    spec.model.block_size = 40;
    spec.train.seq_len = 40;
    spec.train.global_batch = 16;
    spec.train.micro_batch = 4;
    spec.train.total_steps = steps;
    spec.train.warmup_steps = 2;
    spec.train.lr = 1e-2;
    spec.train.min_lr = 1e-3;
    spec.train.eval_interval = 5;
    spec.train.eval_sequences = 16;
    spec.train.checksum_interval = 1;
    spec.checkpoint.dir = dir.join("checkpoints");
    spec.checkpoint.interval = 0;
    spec.cluster.state_dir = dir.join("state");
    spec
}

/// How long a test waits for a status it expects; far above any healthy run of these small specs.
pub const STATUS_DEADLINE: Duration = Duration::from_secs(180);

pub struct Cluster {
    pub coordinator: CoordinatorProcess,
    pub workers: Vec<Child>,
    pub dir: PathBuf,
}

impl Cluster {
    /// Writes `spec` to `<dir>/run.toml`, starts the coordinator (waiting for its `listening on` line) and
    /// `workers` workers with one CPU thread each and JSON logs in `<dir>/worker-<i>.log`.
    pub async fn start(spec: &RunSpec, workers: u32, dir: &Path) -> Cluster {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("run.toml");
        std::fs::write(&config, toml::to_string(spec).unwrap()).unwrap();
        let token = RunToken::generate();
        let log = dir.join("coordinator.log");
        let coordinator = procs::spawn_coordinator(&config, &log, &[], Duration::from_secs(60), &token)
            .await
            .unwrap();
        let url = coordinator.url();
        let workers = (0..workers)
            .map(|i| {
                let args: Vec<String> = ["--threads", "1", "--log-format", "json", "--worker-id"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain([format!("w{i}")])
                    .collect();
                procs::spawn_worker(&url, &dir.join(format!("worker-{i}.log")), &args, &token).unwrap()
            })
            .collect();
        Cluster {
            coordinator,
            workers,
            dir: dir.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        self.coordinator.url()
    }

    /// The run token its processes were given.
    pub fn token(&self) -> &RunToken {
        &self.coordinator.token
    }

    /// A gRPC client of the coordinator (sending the run token).
    pub async fn client(&self) -> CoordinatorClient {
        self.coordinator.client().await.unwrap()
    }

    /// Follows WatchStatus until `ready` holds and returns that status; panics if the run ends first (unless the
    /// final status satisfies it) or after `STATUS_DEADLINE`.
    pub async fn wait_until(&self, what: &str, ready: impl Fn(&RunStatus) -> bool) -> RunStatus {
        let mut client = self.client().await;
        let mut stream = client.watch_status(WatchStatusRequest {}).await.unwrap().into_inner();
        let watch = async {
            let mut last = RunStatus::default();
            while let Ok(Some(s)) = stream.message().await {
                if ready(&s) {
                    return s;
                }
                last = s;
            }
            panic!("the run ended before {what}: {last:?}");
        };
        match tokio::time::timeout(STATUS_DEADLINE, watch).await {
            Ok(status) => status,
            Err(_) => panic!("no status with {what} within {STATUS_DEADLINE:?}"),
        }
    }

    /// Opens a WatchStatus stream now: one stream followed through a whole test never misses the end of a run
    /// (a coordinator exits soon after it, refusing new connections).
    pub async fn watch(&self) -> Watch {
        let mut client = self.client().await;
        Watch {
            stream: client.watch_status(WatchStatusRequest {}).await.unwrap().into_inner(),
            last: None,
        }
    }

    /// Follows WatchStatus to the end of the run and returns the final status.
    pub async fn final_status(&self) -> RunStatus {
        let mut client = self.client().await;
        let mut stream = client.watch_status(WatchStatusRequest {}).await.unwrap().into_inner();
        let mut last = RunStatus::default();
        while let Ok(Some(s)) = stream.message().await {
            last = s;
        }
        last
    }

    /// Waits for every process to exit; returns the workers' and then the coordinator's exit statuses.
    pub async fn wait(&mut self) -> (Vec<ExitStatus>, ExitStatus) {
        let mut statuses = Vec::new();
        for w in &mut self.workers {
            statuses.push(
                tokio::time::timeout(Duration::from_secs(120), w.wait())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        let c = tokio::time::timeout(Duration::from_secs(120), self.coordinator.child.wait())
            .await
            .unwrap()
            .unwrap();
        (statuses, c)
    }

    /// The JSON log lines of worker `i` whose message is `message`.
    pub fn worker_events(&self, i: usize, message: &str) -> Vec<Value> {
        read_events(&self.dir.join(format!("worker-{i}.log")), message)
    }

    pub async fn stop(&mut self) {
        for w in &mut self.workers {
            procs::terminate(w, Duration::from_secs(10)).await;
        }
        procs::terminate(&mut self.coordinator.child, Duration::from_secs(10)).await;
    }
}

/// A WatchStatus stream being followed.
pub struct Watch {
    stream: tonic::Streaming<RunStatus>,
    /// The newest status received; `None` before the first.
    last: Option<RunStatus>,
}

impl Watch {
    /// The first status from now on for which `ready` holds (the newest seen, if it already does); panics if the
    /// run ends first or after [`STATUS_DEADLINE`].
    pub async fn until(&mut self, what: &str, ready: impl Fn(&RunStatus) -> bool) -> RunStatus {
        if let Some(last) = self.last.as_ref().filter(|s| ready(s)) {
            return last.clone();
        }
        let follow = async {
            while let Some(s) = self
                .stream
                .message()
                .await
                .unwrap_or_else(|e| panic!("the status stream failed waiting for {what}: {e:?}"))
            {
                let done = ready(&s);
                self.last = Some(s);
                if done {
                    return self.last.clone().unwrap_or_default();
                }
            }
            panic!("the run ended before {what}: {:?}", self.last);
        };
        match tokio::time::timeout(STATUS_DEADLINE, follow).await {
            Ok(status) => status,
            Err(_) => panic!("no status with {what} within {STATUS_DEADLINE:?}"),
        }
    }

    /// The run's final status (the stream ends with it).
    pub async fn last(mut self) -> RunStatus {
        let follow = async {
            loop {
                match self.stream.message().await {
                    Ok(Some(s)) => self.last = Some(s),
                    Ok(None) => return,
                    Err(e) => panic!("the status stream failed: {e:?}; last status {:?}", self.last),
                }
            }
        };
        if tokio::time::timeout(STATUS_DEADLINE, follow).await.is_err() {
            panic!("the run did not end within {STATUS_DEADLINE:?}: {:?}", self.last);
        }
        self.last.unwrap_or_default()
    }
}

pub fn read_events(path: &Path, message: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

/// Loads every tensor of a safetensors file as flat f32 vectors, by name.
pub fn load_tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// ‖a − b‖ / ‖b‖ over all tensors together.
pub fn relative_l2(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let (mut diff, mut norm) = (0f64, 0f64);
    for (k, va) in a {
        for (x, y) in va.iter().zip(&b[k]) {
            diff += (f64::from(*x) - f64::from(*y)).powi(2);
            norm += f64::from(*y).powi(2);
        }
    }
    (diff / norm).sqrt()
}
