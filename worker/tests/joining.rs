//! Joining a coordinator that does not answer as one should: a port that never answers, a server that is not a
//! coordinator, a signal while the worker waits; and the ring address a worker listening on every interface
//! advertises. A fake coordinator (the real gRPC service, scripted answers) stands in where the protocol matters.
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

mod stderr_util;
use stderr_util::one_error_line;

use candle_core::Device;
use futures::Stream;
use lockstep_common::auth::RunToken;
use lockstep_common::proto::coordinator_server::{Coordinator, CoordinatorServer};
use lockstep_common::proto::{
    CoordinatorMessage, GetHistoryRequest, GetStatusRequest, Join, Reject, RunHistory, RunStatus, StopRunRequest,
    StopRunResponse, WatchStatusRequest, Welcome, WorkerMessage, coordinator_message, worker_message,
};
use lockstep_common::transport::ClientSecurity;
use lockstep_worker::error::Error;
use lockstep_worker::session::{self, Exit, WorkerOptions};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

/// Not a timing check: only what turns a hang (the bugs these tests guard against) into a failure.
const HANG: Duration = Duration::from_secs(120);

/// How the fake coordinator answers one session, after reading its Join.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Reject,
    /// A Welcome, then the stream ends (the coordinator went away).
    WelcomeThenClose,
    /// What a gRPC server without the Coordinator service answers.
    Unimplemented,
    /// Never answers: no response headers.
    Never,
    /// Opens the stream and sends nothing.
    Mute,
}

type Replies<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct Fake {
    answers: Mutex<VecDeque<Answer>>,
    joins: mpsc::UnboundedSender<Join>,
}

#[tonic::async_trait]
impl Coordinator for Fake {
    type SessionStream = Replies<CoordinatorMessage>;
    type WatchStatusStream = Replies<RunStatus>;
    type GetHistoryStream = Replies<RunHistory>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let join = match request.into_inner().message().await? {
            Some(WorkerMessage {
                msg: Some(worker_message::Msg::Join(join)),
            }) => join,
            other => return Err(Status::invalid_argument(format!("expected a Join, got {other:?}"))),
        };
        let answer = self.answers.lock().unwrap().pop_front().unwrap_or(Answer::Reject);
        let _ = self.joins.send(join);
        let reply = |msg| Ok(CoordinatorMessage { msg: Some(msg) });
        let replies: Self::SessionStream = match answer {
            Answer::Reject => Box::pin(futures::stream::iter([reply(coordinator_message::Msg::Reject(
                Reject {
                    reason: "the fake coordinator is done".into(),
                },
            ))])),
            Answer::WelcomeThenClose => Box::pin(futures::stream::iter([reply(coordinator_message::Msg::Welcome(
                Welcome::default(),
            ))])),
            Answer::Unimplemented => return Err(Status::unimplemented("")),
            Answer::Never => std::future::pending().await,
            Answer::Mute => Box::pin(futures::stream::pending()),
        };
        Ok(Response::new(replies))
    }

    async fn get_status(&self, _: Request<GetStatusRequest>) -> Result<Response<RunStatus>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn watch_status(&self, _: Request<WatchStatusRequest>) -> Result<Response<Self::WatchStatusStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn stop_run(&self, _: Request<StopRunRequest>) -> Result<Response<StopRunResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_history(&self, _: Request<GetHistoryRequest>) -> Result<Response<Self::GetHistoryStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// A fake coordinator answering sessions as `answers` says (then with rejects); its URL and the Joins it read.
async fn fake(answers: &[Answer]) -> (String, mpsc::UnboundedReceiver<Join>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (joins, joins_rx) = mpsc::unbounded_channel();
    let service = Fake {
        answers: Mutex::new(answers.iter().copied().collect()),
        joins,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (url, joins_rx)
}

fn options(coordinator: &str, ring_listen: &str) -> WorkerOptions {
    WorkerOptions {
        coordinator: coordinator.to_string(),
        device: Device::Cpu,
        device_name: "cpu".into(),
        ring_listen: Some(ring_listen.into()),
        worker_id: Some("joining-test".into()),
        spec: None,
        connect_timeout: Duration::from_secs(600),
        reconnect_timeout: Duration::from_secs(600),
        security: ClientSecurity::new(RunToken::generate()),
    }
}

/// The worker, run in this process to its end, with `signals` as its signal count.
async fn worker(opts: WorkerOptions, signals: watch::Receiver<u32>) -> Result<Exit, Error> {
    tokio::time::timeout(HANG, session::run(opts, signals))
        .await
        .expect("the worker must end on its own")
}

#[tokio::test]
async fn a_ring_listener_on_every_interface_is_advertised_at_the_address_towards_the_coordinator() {
    let (url, mut joins) = fake(&[Answer::Reject]).await;
    let (_signals, rx) = watch::channel(0);
    let end = worker(options(&url, "0.0.0.0:0"), rx).await;
    assert!(matches!(end, Err(Error::Rejected(_))), "{end:?}");
    let advertised: SocketAddr = joins.recv().await.unwrap().ring_addr.parse().unwrap();
    assert_eq!(advertised.ip().to_string(), "127.0.0.1", "{advertised}");
    assert_ne!(advertised.port(), 0);
}

#[tokio::test]
async fn a_signal_ends_a_worker_whose_join_is_not_answered() {
    for answer in [Answer::Never, Answer::Mute] {
        let (url, mut joins) = fake(&[answer]).await;
        let (signals, rx) = watch::channel(0);
        let running = tokio::spawn(worker(options(&url, "127.0.0.1:0"), rx));
        joins.recv().await.unwrap();
        signals.send_replace(1);
        let end = running.await.unwrap();
        match end {
            Err(Error::Aborted(why)) => assert!(why.contains("interrupted by a signal"), "{answer:?}: {why}"),
            other => panic!("{answer:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_grpc_server_without_the_coordinator_service_ends_a_worker_that_never_joined() {
    let (url, _joins) = fake(&[Answer::Unimplemented]).await;
    let (_signals, rx) = watch::channel(0);
    let e = worker(options(&url, "127.0.0.1:0"), rx).await.unwrap_err().to_string();
    assert!(
        e.contains(&url) && e.contains("does not speak the lockstep protocol") && e.contains("--listen"),
        "{e}"
    );
}

/// A worker that was welcomed knows it has a coordinator there: whatever answers while it is away, the worker keeps
/// trying (its training goes on meanwhile) until the coordinator is back.
#[tokio::test]
async fn a_welcomed_worker_keeps_rejoining_through_answers_that_end_a_new_one() {
    let (url, mut joins) = fake(&[Answer::WelcomeThenClose, Answer::Unimplemented, Answer::Reject]).await;
    let (_signals, rx) = watch::channel(0);
    let end = worker(options(&url, "127.0.0.1:0"), rx).await;
    assert!(matches!(end, Err(Error::Rejected(_))), "{end:?}");
    let mut seen = 0;
    while joins.try_recv().is_ok() {
        seen += 1;
    }
    assert_eq!(seen, 3);
}

/// The worker binary with a run token and `args`; its exit status and stderr, once it ends.
async fn binary(args: &[&str], after_start: impl AsyncFnOnce(u32)) -> (bool, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep-worker"))
        .env_remove("LOCKSTEP_TOKEN_FILE")
        .env("LOCKSTEP_TOKEN", "worker-joining-tests-token-0123")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    after_start(child.id().unwrap()).await;
    let out = tokio::time::timeout(HANG, child.wait_with_output())
        .await
        .expect("the worker must end on its own")
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_or_sigint_ends_the_binary_while_its_join_is_not_answered() {
    for signal in ["-TERM", "-INT"] {
        let (url, mut joins) = fake(&[Answer::Never]).await;
        let args = ["--coordinator", &url, "--connect-timeout-secs", "600"];
        let (ok, stderr) = binary(&args, async |pid| {
            joins.recv().await.unwrap();
            let killed = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
            assert!(killed.unwrap().success());
        })
        .await;
        assert!(!ok, "{signal}: {stderr}");
        assert!(
            one_error_line(&stderr).contains("interrupted by a signal"),
            "{signal}: {stderr}"
        );
    }
}

/// A port whose connections are accepted and then, after `answer` (if any) is written to each, held open in silence.
fn listener_that(answer: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut conn in listener.incoming().flatten() {
            if !answer.is_empty() {
                // As a web server would: the request (here, HTTP/2's preface) first, then the answer.
                let _ = conn.read(&mut [0u8; 1024]);
                let _ = conn.write_all(answer);
            }
            held.push(conn);
        }
    });
    url
}

#[tokio::test]
async fn a_port_that_accepts_but_never_answers_ends_the_worker_at_its_connect_timeout() {
    let url = listener_that(b"");
    let (ok, stderr) = binary(&["--coordinator", &url, "--connect-timeout-secs", "1"], async |_| {}).await;
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(
        line.contains(&url) && line.contains("no answer") && line.contains("--listen"),
        "{line}"
    );
}

#[tokio::test]
async fn an_http1_server_is_named_as_not_a_coordinator() {
    let url = listener_that(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    let args = [
        "--coordinator",
        &url,
        "--connect-timeout-secs",
        "600",
        "--reconnect-timeout-secs",
        "600",
    ];
    let (ok, stderr) = binary(&args, async |_| {}).await;
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(
        line.contains(&url) && line.contains("does not speak the lockstep protocol") && line.contains("--listen"),
        "{line}"
    );
}

#[tokio::test]
async fn a_coordinator_url_without_a_scheme_is_refused_at_once() {
    let (ok, stderr) = binary(
        &["--coordinator", "127.0.0.1:1", "--connect-timeout-secs", "600"],
        async |_| {},
    )
    .await;
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(
        line.contains("no scheme") && line.contains("use http://127.0.0.1:1"),
        "{line}"
    );
}
