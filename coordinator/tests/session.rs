//! The gRPC adapter and server in-process, with fake workers speaking the session protocol over 127.0.0.1.
use std::time::Duration;

use futures::StreamExt;
use lockstep_common::auth::RunToken;
use lockstep_common::proto::{
    self, CoordinatorMessage, RunState, WatchStatusRequest, WorkerMessage, coordinator_message::Msg as Down,
    worker_message::Msg as Up,
};
use lockstep_common::transport::{self, AuthInterceptor, ClientSecurity};
use lockstep_common::{PROTOCOL_VERSION, RunSpec};
use lockstep_coordinator::{RunOutcome, ServeOptions, ServerSecurity};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

const PATIENCE: Duration = Duration::from_secs(20);

struct Coordinator {
    endpoint: String,
    run: JoinHandle<lockstep_coordinator::Result<RunOutcome>>,
    shutdown: Option<oneshot::Sender<()>>,
}

async fn start(workers: u32, total_steps: u64) -> Coordinator {
    start_with(workers, total_steps, None).await
}

/// [`start`], keeping the run's state in `state_dir` (and then answering RPCs after the run ended, until shutdown).
async fn start_with(workers: u32, total_steps: u64, state_dir: Option<std::path::PathBuf>) -> Coordinator {
    let mut spec = RunSpec::default();
    spec.cluster.min_workers = workers;
    spec.cluster.max_workers = workers;
    spec.train.total_steps = total_steps;
    spec.train.warmup_steps = 0;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (shutdown, signal) = oneshot::channel::<()>();
    let opts = ServeOptions {
        session_grace: Duration::from_secs(5),
        serve_after_finish: state_dir.is_some(),
        state_dir,
        ..ServeOptions::new(ServerSecurity::new(token()))
    };
    let run = tokio::spawn(lockstep_coordinator::run(spec, listener, opts, async move {
        let _ = signal.await;
    }));
    Coordinator {
        endpoint,
        run,
        shutdown: Some(shutdown),
    }
}

impl Coordinator {
    async fn outcome(self) -> RunOutcome {
        tokio::time::timeout(PATIENCE, self.run)
            .await
            .expect("run did not return")
            .unwrap()
            .unwrap()
    }
}

/// Every server here runs with this token, and every client sends it.
fn token() -> RunToken {
    RunToken::parse("session-tests-token-0123456789", "test").unwrap()
}

async fn client(endpoint: &str) -> transport::CoordinatorClient {
    transport::connect(endpoint, &ClientSecurity::new(token()), PATIENCE)
        .await
        .unwrap()
}

struct FakeWorker {
    up: mpsc::Sender<WorkerMessage>,
    down: Streaming<CoordinatorMessage>,
}

fn join(id: &str) -> proto::Join {
    proto::Join {
        protocol_version: PROTOCOL_VERSION,
        worker_id: id.into(),
        host: "localhost".into(),
        device: "cpu".into(),
        ring_addr: format!("127.0.0.1:1{id}"),
        spec_json: String::new(),
        nccl_unique_id: Vec::new(),
        ..Default::default()
    }
}

impl FakeWorker {
    async fn open(endpoint: &str, first: Up) -> Result<Self, tonic::Status> {
        let mut client = client(endpoint).await;
        let (up, rx) = mpsc::channel(16);
        up.send(WorkerMessage { msg: Some(first) }).await.unwrap();
        let down = client.session(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self { up, down })
    }

    async fn join(endpoint: &str, id: &str) -> Self {
        Self::open(endpoint, Up::Join(join(id))).await.unwrap()
    }

    async fn send(&self, msg: Up) {
        self.up.send(WorkerMessage { msg: Some(msg) }).await.unwrap();
    }

    /// The next command, or `None` when the coordinator ended the stream.
    async fn next(&mut self) -> Option<Down> {
        let next = tokio::time::timeout(PATIENCE, self.down.message())
            .await
            .expect("no message in time");
        next.unwrap().map(|m| m.msg.unwrap())
    }
}

#[tokio::test]
async fn two_workers_train_to_the_end_and_the_server_returns() {
    let coordinator = start(2, 2).await;
    let mut client = client(&coordinator.endpoint).await;
    let mut watch = client.watch_status(WatchStatusRequest {}).await.unwrap().into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.state, RunState::Waiting as i32);

    let mut w0 = FakeWorker::join(&coordinator.endpoint, "0").await;
    assert!(matches!(w0.next().await, Some(Down::Welcome(w)) if w.waiting == 1 && w.min_workers == 2));
    let mut w1 = FakeWorker::join(&coordinator.endpoint, "1").await;
    assert!(matches!(w1.next().await, Some(Down::Welcome(w)) if w.waiting == 2));
    let mut workers = [w0, w1];
    for (rank, w) in (0u32..).zip(workers.iter_mut()) {
        match w.next().await {
            Some(Down::Assignment(a)) => {
                assert_eq!((a.rank, a.world_size, a.end_step), (rank, 2, 2));
                assert_eq!(a.peers, vec!["127.0.0.1:10".to_string(), "127.0.0.1:11".to_string()]);
            }
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
    for step in 1..=2 {
        for (rank, w) in (0u32..).zip(workers.iter()) {
            w.send(Up::Step(proto::StepReport {
                rank,
                step,
                loss: 1.0,
                tokens: 100,
                param_checksum: format!("{step:016x}"),
                ..Default::default()
            }))
            .await;
        }
    }
    for (rank, w) in (0u32..).zip(workers.iter()) {
        w.send(Up::Finished(proto::Finished {
            generation: 0,
            rank,
            step: 2,
        }))
        .await;
    }
    for w in workers.iter_mut() {
        assert!(matches!(w.next().await, Some(Down::Stop(s)) if s.reason == "run finished"));
    }

    // The watch ends with the final status.
    let mut last = first;
    while let Some(status) = tokio::time::timeout(PATIENCE, watch.next()).await.unwrap() {
        last = status.unwrap();
    }
    assert_eq!(last.state, RunState::Finished as i32);
    assert_eq!((last.step, last.world_size), (2, 2));

    // Workers exit after Stop; then the server returns.
    drop(workers);
    assert_eq!(coordinator.outcome().await, RunOutcome::Finished);
}

/// Every step point GetHistory streams after `after_step`: (step, loss, skipped), and the evaluations.
async fn history(endpoint: &str, after_step: u64) -> (String, Vec<(u64, f64, bool)>, Vec<(u64, f64)>) {
    let mut stream = client(endpoint)
        .await
        .get_history(proto::GetHistoryRequest { after_step })
        .await
        .unwrap()
        .into_inner();
    let (mut name, mut steps, mut evals) = (String::new(), Vec::new(), Vec::new());
    while let Some(m) = stream.message().await.unwrap() {
        name = m.run_name;
        steps.extend(m.steps.iter().map(|s| (s.step, s.loss, s.skipped)));
        evals.extend(m.evals.iter().map(|e| (e.step, e.val_loss)));
    }
    (name, steps, evals)
}

#[tokio::test]
async fn the_history_of_a_run_is_its_loss_curve_from_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_with(1, 3, Some(dir.path().to_path_buf())).await;
    let mut w = FakeWorker::join(&coordinator.endpoint, "0").await;
    assert!(matches!(w.next().await, Some(Down::Welcome(_))));
    assert!(matches!(w.next().await, Some(Down::Assignment(_))));
    for (step, loss) in [(1, 3.0), (2, 2.0), (3, 1.0)] {
        w.send(Up::Step(proto::StepReport {
            rank: 0,
            step,
            loss,
            tokens: 100,
            param_checksum: format!("{step:016x}"),
            ..Default::default()
        }))
        .await;
    }
    w.send(Up::Finished(proto::Finished {
        generation: 0,
        rank: 0,
        step: 3,
    }))
    .await;
    assert!(matches!(w.next().await, Some(Down::Stop(_))));
    // Finished means every step was recorded; the coordinator still answers (serve_after_finish).
    let mut watch = client(&coordinator.endpoint)
        .await
        .watch_status(WatchStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    while let Some(status) = tokio::time::timeout(PATIENCE, watch.next()).await.unwrap() {
        if status.unwrap().state == RunState::Finished as i32 {
            break;
        }
    }
    let (name, steps, evals) = history(&coordinator.endpoint, 0).await;
    assert_eq!(name, RunSpec::default().run.name);
    assert_eq!(steps, vec![(1, 3.0, false), (2, 2.0, false), (3, 1.0, false)]);
    assert!(evals.is_empty());
    let (_, newer, _) = history(&coordinator.endpoint, 2).await;
    assert_eq!(newer, vec![(3, 1.0, false)]);
}

#[tokio::test]
async fn a_coordinator_without_a_state_dir_says_it_has_no_history() {
    let coordinator = start(1, 3).await;
    let refused = client(&coordinator.endpoint)
        .await
        .get_history(proto::GetHistoryRequest { after_step: 0 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("no history"), "{}", refused.message());
}

#[tokio::test]
async fn a_lost_worker_aborts_the_survivor_and_the_next_generation_forms_with_a_newcomer() {
    let coordinator = start(2, 100).await;
    let mut w0 = FakeWorker::join(&coordinator.endpoint, "0").await;
    let mut w1 = FakeWorker::join(&coordinator.endpoint, "1").await;
    assert!(matches!(w0.next().await, Some(Down::Welcome(_))));
    assert!(matches!(w0.next().await, Some(Down::Assignment(_))));
    assert!(matches!(w1.next().await, Some(Down::Welcome(_))));
    assert!(matches!(w1.next().await, Some(Down::Assignment(_))));
    drop(w1);
    match w0.next().await {
        Some(Down::Abort(a)) => assert!(
            a.reason.starts_with("worker 1 (rank 1, host localhost) lost at step 0"),
            "{}",
            a.reason
        ),
        other => panic!("expected Abort, got {other:?}"),
    }
    w0.send(Up::Idle(proto::Idle {
        generation: 0,
        nccl_unique_id: Vec::new(),
    }))
    .await;
    let status = client(&coordinator.endpoint)
        .await
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, RunState::Reforming as i32);
    assert_eq!(status.lost.len(), 1);
    assert_eq!(status.lost[0].worker_id, "1");
    // One survivor is below min_workers = 2: the run waits for a newcomer and forms generation 1 with it.
    let mut w2 = FakeWorker::join(&coordinator.endpoint, "2").await;
    assert!(matches!(w2.next().await, Some(Down::Welcome(_))));
    for (w, rank) in [(&mut w0, 0), (&mut w2, 1)] {
        match w.next().await {
            Some(Down::Assignment(a)) => {
                assert_eq!((a.generation, a.rank, a.world_size, a.start_step), (1, rank, 2, 0));
            }
            other => panic!("expected the generation 1 assignment, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_rejected_worker_hears_why_and_its_stream_ends() {
    let mut coordinator = start(2, 10).await;
    let bad = proto::Join {
        protocol_version: 99,
        ..join("0")
    };
    let mut w = FakeWorker::open(&coordinator.endpoint, Up::Join(bad)).await.unwrap();
    match w.next().await {
        Some(Down::Reject(r)) => assert!(r.reason.contains("protocol version 99"), "{}", r.reason),
        other => panic!("expected Reject, got {other:?}"),
    }
    assert!(w.next().await.is_none(), "the stream must end after a Reject");

    let heartbeat_first = FakeWorker::open(&coordinator.endpoint, Up::Heartbeat(proto::Heartbeat { step: 0 })).await;
    let status = heartbeat_first.err().expect("a session must start with Join");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("Join"), "{}", status.message());

    // Shutdown while a worker waits: the server returns, the waiting worker's stream ends.
    let mut waiting = FakeWorker::join(&coordinator.endpoint, "1").await;
    assert!(matches!(waiting.next().await, Some(Down::Welcome(_))));
    coordinator.shutdown.take().unwrap().send(()).unwrap();
    assert_eq!(coordinator.outcome().await, RunOutcome::Interrupted);
    let end = tokio::time::timeout(PATIENCE, waiting.down.message()).await.unwrap();
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let coordinator = start(1, 10).await;
    let channel = tonic::transport::Endpoint::from_shared(coordinator.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::with_interceptor(channel, AuthInterceptor::new(&token()).unwrap());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("{reply:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"lockstep.v1.Coordinator".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
}
