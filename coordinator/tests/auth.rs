//! Who gets in: every RPC of every service needs the run token except health; TLS and mutual TLS from `[security]`;
//! the message size limit; and the token file a coordinator started without one writes.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lockstep_common::auth::RunToken;
use lockstep_common::proto::{
    GetStatusRequest, Join, RunState, StopRunRequest, WatchStatusRequest, WorkerMessage,
    coordinator_client::CoordinatorClient, worker_message::Msg as Up,
};
use lockstep_common::spec::SecuritySpec;
use lockstep_common::transport::{self, AuthInterceptor, ClientSecurity, ClientTls};
use lockstep_common::{PROTOCOL_VERSION, RunSpec};
use lockstep_coordinator::{RunOutcome, ServeOptions, ServerSecurity};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_reflection::pb::{v1, v1alpha};

const PATIENCE: Duration = Duration::from_secs(20);

struct Server {
    endpoint: String,
    _shutdown: oneshot::Sender<()>,
    _run: JoinHandle<lockstep_coordinator::Result<RunOutcome>>,
}

/// An in-process coordinator waiting for 2 workers, served with `security` over `scheme` (http or https).
async fn serve(security: ServerSecurity, scheme: &str) -> Server {
    let mut spec = RunSpec::default();
    spec.cluster.min_workers = 2;
    spec.cluster.max_workers = 2;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("{scheme}://{}", listener.local_addr().unwrap());
    let (shutdown, signal) = oneshot::channel::<()>();
    let run = tokio::spawn(lockstep_coordinator::run(
        spec,
        listener,
        ServeOptions::new(security),
        async move {
            let _ = signal.await;
        },
    ));
    Server {
        endpoint,
        _shutdown: shutdown,
        _run: run,
    }
}

async fn channel(endpoint: &str) -> Channel {
    Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn no_token(request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    Ok(request)
}

/// Calls every RPC of every service but health through `interceptor`; returns each call's name and outcome.
/// StopRun goes last: accepted, it ends the run.
async fn call_everything<F>(endpoint: &str, interceptor: F) -> Vec<(&'static str, Result<(), tonic::Status>)>
where
    F: Interceptor + Clone,
{
    let channel = channel(endpoint).await;
    let mut coordinator = CoordinatorClient::with_interceptor(channel.clone(), interceptor.clone());
    let join = WorkerMessage {
        msg: Some(Up::Join(Join {
            protocol_version: PROTOCOL_VERSION,
            worker_id: "auth-test".into(),
            ..Default::default()
        })),
    };
    let mut out = vec![
        (
            "Session",
            coordinator.session(futures::stream::iter([join])).await.map(drop),
        ),
        ("GetStatus", coordinator.get_status(GetStatusRequest {}).await.map(drop)),
        (
            "WatchStatus",
            coordinator.watch_status(WatchStatusRequest {}).await.map(drop),
        ),
    ];
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut reflection =
        v1::server_reflection_client::ServerReflectionClient::with_interceptor(channel.clone(), interceptor.clone());
    out.push((
        "reflection v1",
        reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .map(drop),
    ));
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut reflection = v1alpha::server_reflection_client::ServerReflectionClient::with_interceptor(
        channel.clone(),
        interceptor.clone(),
    );
    out.push((
        "reflection v1alpha",
        reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .map(drop),
    ));
    out.push((
        "StopRun",
        coordinator
            .stop_run(StopRunRequest {
                reason: "auth test".into(),
            })
            .await
            .map(drop),
    ));
    out
}

#[tokio::test]
async fn without_the_right_token_every_rpc_is_refused() {
    let token = RunToken::generate();
    let server = serve(ServerSecurity::new(token.clone()), "http").await;
    let wrong = AuthInterceptor::new(&RunToken::generate()).unwrap();
    for (who, results) in [
        ("no token", call_everything(&server.endpoint, no_token).await),
        ("wrong token", call_everything(&server.endpoint, wrong).await),
    ] {
        assert_eq!(results.len(), 6);
        for (rpc, result) in results {
            let status = result.expect_err(&format!("{rpc} with {who} was let in"));
            assert_eq!(status.code(), Code::Unauthenticated, "{rpc} with {who}: {status:?}");
            assert!(
                status.message().contains("--token-file PATH or LOCKSTEP_TOKEN"),
                "{rpc} with {who}: {}",
                status.message()
            );
        }
    }
    // The right token gets through to every service (StopRun's answer is the run's business, not ours).
    let right = AuthInterceptor::new(&token).unwrap();
    for (rpc, result) in call_everything(&server.endpoint, right).await {
        if let Err(status) = result {
            assert_ne!(status.code(), Code::Unauthenticated, "{rpc}: {status:?}");
        }
    }
}

#[tokio::test]
async fn health_needs_no_token() {
    let server = serve(ServerSecurity::new(RunToken::generate()), "http").await;
    let mut health = HealthClient::new(channel(&server.endpoint).await);
    for service in ["", "lockstep.v1.Coordinator"] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32, "service {service:?}");
    }
}

#[tokio::test]
async fn messages_over_the_limit_are_refused_by_server_and_client() {
    let token = RunToken::generate();
    let mut security = ServerSecurity::new(token.clone());
    security.max_message_bytes = 64 << 10;
    let server = serve(security, "http").await;
    let big = StopRunRequest {
        reason: "x".repeat(100 << 10),
    };
    let too_big = [Code::ResourceExhausted, Code::OutOfRange];

    // A client allowing more than the server: the server refuses to decode it.
    let mut generous = ClientSecurity::new(token.clone());
    generous.max_message_bytes = 1 << 20;
    let mut client = transport::connect(&server.endpoint, &generous, PATIENCE).await.unwrap();
    let status = client.stop_run(big.clone()).await.unwrap_err();
    assert!(too_big.contains(&status.code()), "{status:?}");
    // Small messages still pass.
    let status = client.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.state, RunState::Waiting as i32);

    // A client with the same limit does not even send it: its encoder fails, which tonic reports as a stream it
    // reset itself (Internal) rather than as the encoder's status.
    let mut strict = ClientSecurity::new(token);
    strict.max_message_bytes = 64 << 10;
    let mut client = transport::connect(&server.endpoint, &strict, PATIENCE).await.unwrap();
    let status = client.stop_run(big).await.unwrap_err();
    assert!(
        too_big.contains(&status.code()) || status.code() == Code::Internal,
        "{status:?}"
    );
    let status = client.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        status.state,
        RunState::Waiting as i32,
        "the run must not have been stopped"
    );
}

/// Test certificates: a CA, a server certificate for localhost and 127.0.0.1, a client certificate it signed, and
/// a client certificate from another CA.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    stranger: (PathBuf, PathBuf),
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    dir: &Path,
    name: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &CertifiedIssuer<'static, KeyPair>,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (ca("lockstep test CA"), ca("some other CA"));
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ours.pem()).unwrap();
    let server = leaf(
        dir.path(),
        "coordinator",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
        &ours,
    );
    let client = leaf(
        dir.path(),
        "worker",
        &["worker-0"],
        ExtendedKeyUsagePurpose::ClientAuth,
        &ours,
    );
    let stranger = leaf(
        dir.path(),
        "stranger",
        &["stranger"],
        ExtendedKeyUsagePurpose::ClientAuth,
        &theirs,
    );
    Pki {
        _dir: dir,
        ca,
        server,
        client,
        stranger,
    }
}

async fn serve_tls(pki: &Pki, token: &RunToken, mutual: bool) -> Server {
    let spec = SecuritySpec {
        tls_cert: Some(pki.server.0.clone()),
        tls_key: Some(pki.server.1.clone()),
        tls_client_ca: mutual.then(|| pki.ca.clone()),
        ..SecuritySpec::default()
    };
    serve(ServerSecurity::from_spec(&spec, token.clone()).unwrap(), "https").await
}

fn tls_client(pki: &Pki, token: &RunToken, cert_key: Option<&(PathBuf, PathBuf)>) -> ClientSecurity {
    ClientSecurity {
        tls: Some(ClientTls {
            ca: pki.ca.clone(),
            cert_key: cert_key.cloned(),
            domain: None,
        }),
        ..ClientSecurity::new(token.clone())
    }
}

/// Connects and asks for the status; `Err` if either fails.
async fn status_over(endpoint: &str, security: &ClientSecurity) -> Result<RunState, String> {
    let mut client = transport::connect(endpoint, security, Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())?;
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .map_err(|s| format!("{s:?}"))?;
    Ok(RunState::try_from(status.into_inner().state).unwrap_or_default())
}

#[tokio::test]
async fn a_client_trusting_the_ca_gets_status_over_tls() {
    let (pki, token) = (pki(), RunToken::generate());
    let server = serve_tls(&pki, &token, false).await;
    assert_eq!(
        status_over(&server.endpoint, &tls_client(&pki, &token, None)).await,
        Ok(RunState::Waiting)
    );
    // By name too, with --tls-domain.
    let mut by_name = tls_client(&pki, &token, None);
    if let Some(tls) = &mut by_name.tls {
        tls.domain = Some("localhost".into());
    }
    assert_eq!(status_over(&server.endpoint, &by_name).await, Ok(RunState::Waiting));
    // TLS does not replace the token.
    let err = status_over(&server.endpoint, &tls_client(&pki, &RunToken::generate(), None))
        .await
        .unwrap_err();
    assert!(err.contains("Unauthenticated"), "{err}");
    // A client that trusts another CA refuses the server.
    let mut doubting = tls_client(&pki, &token, None);
    if let Some(tls) = &mut doubting.tls {
        tls.ca = pki.stranger.0.clone();
    }
    let err = status_over(&server.endpoint, &doubting).await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() {
    let (pki, token) = (pki(), RunToken::generate());
    let server = serve_tls(&pki, &token, true).await;
    assert_eq!(
        status_over(&server.endpoint, &tls_client(&pki, &token, Some(&pki.client))).await,
        Ok(RunState::Waiting)
    );
    let without = status_over(&server.endpoint, &tls_client(&pki, &token, None)).await;
    assert!(without.is_err(), "a client without a certificate got in: {without:?}");
    let stranger = status_over(&server.endpoint, &tls_client(&pki, &token, Some(&pki.stranger))).await;
    assert!(
        stranger.is_err(),
        "a client with another CA's certificate got in: {stranger:?}"
    );
    // TLS is not optional once configured.
    let plain = status_over(
        &server.endpoint.replace("https://", "http://"),
        &ClientSecurity::new(token),
    )
    .await;
    assert!(plain.is_err(), "plain HTTP/2 reached a TLS coordinator: {plain:?}");
}

/// A coordinator given no token makes one in its state directory (owner-only), keeps it across restarts, and
/// clients need it.
#[tokio::test]
async fn a_coordinator_without_a_token_writes_one_to_its_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nlisten = \"127.0.0.1:0\"\nmin_workers = 2\nmax_workers = 2\nstate_dir = \"{}\"\n",
            state.display()
        ),
    )
    .unwrap();
    let start = || {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep-coordinator"));
        for (key, _) in std::env::vars() {
            if key.starts_with("LOCKSTEP") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn().unwrap()
    };
    let mut child = start();
    let endpoint = listening(&mut child).await;
    let path = state.join("token");
    let token = RunToken::from_file(&path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let mut client = transport::connect(&endpoint, &ClientSecurity::new(token.clone()), PATIENCE)
        .await
        .unwrap();
    client.get_status(GetStatusRequest {}).await.unwrap();
    let mut anonymous = CoordinatorClient::new(channel(&endpoint).await);
    let status = anonymous.get_status(GetStatusRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    child.kill().await.unwrap();
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut err, &mut stderr)
            .await
            .unwrap();
    }
    assert!(
        stderr.contains(&format!("--token-file {}", path.display())) && stderr.contains("LOCKSTEP_TOKEN"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(token.expose()),
        "the token itself must not be logged: {stderr}"
    );

    // Restarted, it keeps the token its clients hold.
    let mut child = start();
    let endpoint = listening(&mut child).await;
    let mut client = transport::connect(&endpoint, &ClientSecurity::new(token), PATIENCE)
        .await
        .unwrap();
    client.get_status(GetStatusRequest {}).await.unwrap();
    child.kill().await.unwrap();
}

async fn listening(child: &mut tokio::process::Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(60), BufReader::new(stdout).read_line(&mut line))
        .await
        .expect("no `listening on` line in time")
        .unwrap();
    let addr = line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"));
    format!("http://{addr}")
}
