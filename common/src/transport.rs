//! How clients (workers, `lockstep status` and `lockstep stop`, tests) reach the coordinator: the URL, TLS or mutual
//! TLS when asked for, the run token on every request, message size limits, a deadline on every call that answers
//! once, and retrying while the coordinator starts.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::{Interceptor, interceptor::InterceptedService};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::auth::{AUTHORIZATION, RunToken};
use crate::error::{Error, Result};
use crate::proto;
use crate::spec::DEFAULT_MAX_MESSAGE_BYTES;

/// How long a call that answers once (`GetStatus`, `StopRun`, the start of `GetHistory`) may wait for its answer. A
/// port that accepts connections but is not a coordinator (or a hung one) would otherwise keep a person waiting
/// forever. A coordinator answers these at once; reading a long run's history takes seconds, not this.
pub const CALL_DEADLINE: Duration = Duration::from_secs(20);

/// Calls that stay open for the life of a worker or a `--watch`: no deadline.
const LONG_LIVED_CALLS: [&str; 2] = ["Session", "WatchStatus"];

/// The header a call's deadline travels in (tonic's `Request::set_timeout`).
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// TLS towards the coordinator (an `https://` URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA that signed the coordinator's certificate (`--tls-ca`).
    pub ca: PathBuf,
    /// This client's certificate and key, for a coordinator that requires mutual TLS (`--tls-cert`, `--tls-key`).
    pub cert_key: Option<(PathBuf, PathBuf)>,
    /// The name the coordinator's certificate must carry, when it is not the URL's host (`--tls-domain`).
    pub domain: Option<String>,
}

/// Everything a client needs to be let in.
#[derive(Debug, Clone)]
pub struct ClientSecurity {
    pub token: RunToken,
    pub tls: Option<ClientTls>,
    /// Largest message this client encodes or decodes (the coordinator's `security.max_message_bytes`).
    pub max_message_bytes: usize,
}

impl ClientSecurity {
    /// Plain HTTP/2 with `token`, and the default message limit.
    pub fn new(token: RunToken) -> Self {
        Self {
            token,
            tls: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// From the flags every client shares: `--tls-ca`, `--tls-cert`, `--tls-key`, `--tls-domain`. Flags that do
    /// not fit together are an error naming them.
    pub fn with_tls_flags(
        mut self,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        domain: Option<String>,
    ) -> Result<Self> {
        let usage = |message: &str| Error::Connect {
            addr: "(any)".into(),
            message: message.to_string(),
        };
        let cert_key = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err(usage("--tls-cert needs --tls-key (the certificate's private key)")),
            (None, Some(_)) => return Err(usage("--tls-key needs --tls-cert (the certificate it belongs to)")),
        };
        self.tls = match ca {
            Some(ca) => Some(ClientTls { ca, cert_key, domain }),
            None if cert_key.is_some() => {
                return Err(usage(
                    "--tls-cert and --tls-key need --tls-ca (the CA that signed the coordinator's certificate)",
                ));
            }
            None if domain.is_some() => {
                return Err(usage(
                    "--tls-domain needs --tls-ca (the CA that signed the coordinator's certificate)",
                ));
            }
            None => None,
        };
        Ok(self)
    }
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct AuthInterceptor {
    value: MetadataValue<Ascii>,
}

impl std::fmt::Debug for AuthInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthInterceptor(..)")
    }
}

impl AuthInterceptor {
    pub fn new(token: &RunToken) -> Result<Self> {
        let mut value: MetadataValue<Ascii> = token.bearer().parse().map_err(|_| Error::Token {
            origin: "the given token".into(),
            message: "it cannot travel in a gRPC header; use printable ASCII".into(),
        })?;
        value.set_sensitive(true);
        Ok(Self { value })
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(AUTHORIZATION, self.value.clone());
        Ok(request)
    }
}

/// The run token on every call, and a deadline on every call that answers once (the caller's own deadline wins).
#[derive(Debug, Clone)]
pub struct CallInterceptor {
    auth: AuthInterceptor,
    deadline: Duration,
}

impl Interceptor for CallInterceptor {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut request = self.auth.call(request)?;
        let answers_once = request
            .extensions()
            .get::<tonic::GrpcMethod>()
            .is_some_and(|m| !LONG_LIVED_CALLS.contains(&m.method()));
        if answers_once && request.metadata().get(GRPC_TIMEOUT).is_none() {
            request.set_timeout(self.deadline);
        }
        Ok(request)
    }
}

/// A Coordinator client that sends the run token with every call and gives up on calls that answer once after
/// [`CALL_DEADLINE`].
pub type CoordinatorClient = proto::coordinator_client::CoordinatorClient<InterceptedService<Channel, CallInterceptor>>;

/// `url` as an endpoint with `security`'s TLS. The scheme and the TLS flags must agree: `https://` needs
/// `--tls-ca`, and `http://` takes no TLS flag.
pub fn endpoint(url: &str, security: &ClientSecurity) -> Result<Endpoint> {
    let bad = |message: String| Error::Connect {
        addr: url.to_string(),
        message,
    };
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| {
        bad(format!(
            "not a valid --coordinator URL ({e}); use http://HOST:PORT or https://HOST:PORT"
        ))
    })?;
    // Without this check a URL like HOST:PORT parses, and every connection attempt fails until the timeout.
    let https = match endpoint.uri().scheme_str() {
        Some("https") => true,
        Some("http") => false,
        None => {
            return Err(bad(format!(
                "no scheme in this --coordinator URL; use http://{url} (or https://{url} with TLS)"
            )));
        }
        Some(other) => {
            return Err(bad(format!(
                "--coordinator URL scheme {other}:// is not one a coordinator speaks; use http://HOST:PORT or \
                 https://HOST:PORT"
            )));
        }
    };
    match (&security.tls, https) {
        (None, false) => Ok(endpoint),
        (None, true) => Err(bad(
            "an https:// URL needs --tls-ca (the CA that signed the coordinator's certificate)".into(),
        )),
        (Some(_), false) => Err(bad(
            "--tls-ca (and --tls-cert, --tls-key, --tls-domain) need an https:// URL; use https://HOST:PORT for a \
             coordinator with TLS, or drop the TLS flags"
                .into(),
        )),
        (Some(tls), true) => {
            let config = client_tls_config(tls).map_err(bad)?;
            endpoint.tls_config(config).map_err(|e| {
                bad(format!(
                    "TLS setup from --tls-ca {}{} failed: {}; check that the files are PEM",
                    tls.ca.display(),
                    tls.cert_key
                        .as_ref()
                        .map(|(c, k)| format!(", --tls-cert {}, --tls-key {}", c.display(), k.display()))
                        .unwrap_or_default(),
                    crate::error::one_line(&e)
                ))
            })
        }
    }
}

fn client_tls_config(tls: &ClientTls) -> std::result::Result<ClientTlsConfig, String> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("--tls-ca", &tls.ca)?));
    if let Some((cert, key)) = &tls.cert_key {
        config = config.identity(Identity::from_pem(
            read_pem("--tls-cert", cert)?,
            read_pem("--tls-key", key)?,
        ));
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    Ok(config)
}

/// The file's bytes, or an error naming the flag and the file.
pub fn read_pem(flag: &str, path: &Path) -> std::result::Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {}: cannot read it: {e}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!(
            "{flag} {}: not a PEM file (no -----BEGIN line)",
            path.display()
        ));
    }
    Ok(bytes)
}

/// A client over `channel` that sends `security`'s token, applies its message limit, and gives up on calls that
/// answer once after [`CALL_DEADLINE`].
pub fn client(channel: Channel, security: &ClientSecurity) -> Result<CoordinatorClient> {
    client_with_deadline(channel, security, CALL_DEADLINE)
}

/// [`client`], with `deadline` instead of [`CALL_DEADLINE`].
pub fn client_with_deadline(
    channel: Channel,
    security: &ClientSecurity,
    deadline: Duration,
) -> Result<CoordinatorClient> {
    let limit = security.max_message_bytes;
    let interceptor = CallInterceptor {
        auth: AuthInterceptor::new(&security.token)?,
        deadline,
    };
    Ok(
        proto::coordinator_client::CoordinatorClient::with_interceptor(channel, interceptor)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
}

/// Connects to the coordinator at `url`, retrying with backoff until `timeout` (it may not be listening yet). A
/// certificate the client rejects is not retried: it will not change by waiting.
pub async fn connect(url: &str, security: &ClientSecurity, timeout: Duration) -> Result<CoordinatorClient> {
    let bad = |message: String| Error::Connect {
        addr: url.to_string(),
        message,
    };
    let endpoint =
        endpoint(url, security)?.connect_timeout(Duration::from_secs(2).min(timeout.max(Duration::from_millis(100))));
    // `None`: a timeout too long to end (a huge --connect-timeout-secs).
    let deadline = Instant::now().checked_add(timeout);
    let mut backoff = Duration::from_millis(100);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return client(channel, security),
            Err(e) => {
                let why = crate::error::one_line(&e);
                if why.to_lowercase().contains("certificate") {
                    return Err(bad(format!(
                        "TLS handshake failed ({why}); check --tls-ca, --tls-domain and the coordinator's \
                         security.tls_cert"
                    )));
                }
                if deadline.is_some_and(|deadline| Instant::now() + backoff >= deadline) {
                    return Err(bad(format!(
                        "unreachable after {timeout:.0?} ({why}); is lockstep-coordinator running and listening there?"
                    )));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Whether `status` says the address is served by something that is not a lockstep
/// coordinator: HTTP/1 or not HTTP at all (tonic reports an HTTP/2 protocol error), an HTTP/2 server that is not
/// gRPC (no gRPC status, a body that is not gRPC messages), or a gRPC server without the Coordinator service.
/// Waiting will not change that; a coordinator that is down or restarting fails differently (refused, reset). Used
/// by workers joining and by the CLI's calls.
pub fn not_a_coordinator(status: &tonic::Status) -> bool {
    let message = status.message();
    // Not Unavailable: a proxy in front of a restarting coordinator answers 502 or 503, mapped to that.
    let malformed = matches!(status.code(), tonic::Code::Internal | tonic::Code::Unknown)
        && (message.starts_with("protocol error") || message.starts_with("grpc-status header missing"));
    // Unknown with this message is an I/O error (a reset) on the way, not the peer's answer. Internal is also what a
    // coordinator's graceful shutdown gives a stream it cuts (GOAWAY with NO_ERROR, h2's "not a result of an
    // error"): that one a restarted coordinator answers, so it is not taken for a foreign server.
    let not_http2 = status.code() == tonic::Code::Internal
        && message.starts_with("h2 protocol error")
        && !error_chain(status).contains("not a result of an error");
    status.code() == tonic::Code::Unimplemented || malformed || not_http2
}

/// `status`'s message and those of the errors under it, in one string.
fn error_chain(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn security() -> ClientSecurity {
        ClientSecurity::new(RunToken::generate())
    }

    #[test]
    fn the_interceptor_adds_the_bearer_token() {
        let token = RunToken::generate();
        let mut interceptor = AuthInterceptor::new(&token).unwrap();
        let request = interceptor.call(tonic::Request::new(())).unwrap();
        let value = request.metadata().get(AUTHORIZATION).unwrap();
        assert!(token.matches_bearer(value.as_bytes()));
        assert_eq!(format!("{interceptor:?}"), "AuthInterceptor(..)");
    }

    #[test]
    fn tls_flags_must_fit_together() {
        let p = |s: &str| Some(PathBuf::from(s));
        let err = |r: Result<ClientSecurity>| r.unwrap_err().to_string();
        let e = err(security().with_tls_flags(p("ca"), p("cert"), None, None));
        assert!(e.contains("--tls-cert needs --tls-key"), "{e}");
        let e = err(security().with_tls_flags(p("ca"), None, p("key"), None));
        assert!(e.contains("--tls-key needs --tls-cert"), "{e}");
        let e = err(security().with_tls_flags(None, p("c"), p("k"), None));
        assert!(e.contains("need --tls-ca"), "{e}");
        let e = err(security().with_tls_flags(None, None, None, Some("x".into())));
        assert!(e.contains("--tls-domain needs --tls-ca"), "{e}");
        let s = security()
            .with_tls_flags(p("ca"), p("c"), p("k"), Some("x".into()))
            .unwrap();
        assert_eq!(
            s.tls,
            Some(ClientTls {
                ca: "ca".into(),
                cert_key: Some(("c".into(), "k".into())),
                domain: Some("x".into())
            })
        );
        assert!(security().with_tls_flags(None, None, None, None).unwrap().tls.is_none());
    }

    #[test]
    fn the_scheme_and_the_tls_flags_must_agree() {
        let e = endpoint("https://127.0.0.1:1", &security()).unwrap_err().to_string();
        assert!(e.contains("needs --tls-ca") && e.contains("127.0.0.1:1"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let with_tls = security().with_tls_flags(Some(ca.clone()), None, None, None).unwrap();
        let e = endpoint("http://127.0.0.1:1", &with_tls).unwrap_err().to_string();
        assert!(e.contains("--tls-ca") && e.contains("https://"), "{e}");
        // A missing or non-PEM CA file is named with its flag.
        let e = endpoint("https://127.0.0.1:1", &with_tls).unwrap_err().to_string();
        assert!(e.contains("--tls-ca") && e.contains(&ca.display().to_string()), "{e}");
        std::fs::write(&ca, "not pem").unwrap();
        let e = endpoint("https://127.0.0.1:1", &with_tls).unwrap_err().to_string();
        assert!(e.contains("not a PEM file"), "{e}");
        let e = endpoint("not a url", &security()).unwrap_err().to_string();
        assert!(e.contains("not a url") && e.contains("http://HOST:PORT"), "{e}");
    }

    #[tokio::test]
    async fn a_url_without_a_scheme_is_refused_at_once() {
        for url in ["127.0.0.1:7171", "localhost:7171"] {
            let e = connect(url, &security(), Duration::from_secs(30))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("no scheme") && e.contains(&format!("use http://{url}")),
                "{e}"
            );
        }
        let e = endpoint("ftp://127.0.0.1:7171", &security()).unwrap_err().to_string();
        assert!(e.contains("ftp://") && e.contains("http://HOST:PORT"), "{e}");
        assert!(endpoint("http://127.0.0.1:7171", &security()).is_ok());
    }

    fn intercepted(method: &'static str, timeout: Option<Duration>) -> tonic::Request<()> {
        let mut interceptor = CallInterceptor {
            auth: AuthInterceptor::new(&RunToken::generate()).unwrap(),
            deadline: Duration::from_secs(7),
        };
        let mut request = tonic::Request::new(());
        request
            .extensions_mut()
            .insert(tonic::GrpcMethod::new("lockstep.v1.Coordinator", method));
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        interceptor.call(request).unwrap()
    }

    #[test]
    fn calls_that_answer_once_get_a_deadline_and_long_lived_streams_none() {
        let deadline = |r: &tonic::Request<()>| r.metadata().get(GRPC_TIMEOUT).map(|v| v.to_str().unwrap().to_string());
        for method in ["GetStatus", "StopRun", "GetHistory"] {
            assert_eq!(
                deadline(&intercepted(method, None)).as_deref(),
                Some("7000000u"),
                "{method}"
            );
        }
        for method in ["Session", "WatchStatus"] {
            assert_eq!(deadline(&intercepted(method, None)), None, "{method}");
        }
        // A caller's own deadline stays.
        let own = intercepted("GetStatus", Some(Duration::from_secs(1)));
        assert_eq!(deadline(&own).as_deref(), Some("1000000u"));
        assert!(own.metadata().get(AUTHORIZATION).is_some());
    }

    /// A port that accepts connections and never answers: a call that answers once gives up at its deadline instead
    /// of waiting forever.
    #[tokio::test]
    async fn a_status_call_to_a_port_that_never_answers_ends_at_its_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let channel = endpoint(&url, &security()).unwrap().connect().await.unwrap();
        let mut client = client_with_deadline(channel, &security(), Duration::from_millis(200)).unwrap();
        // Not a timing check: only a guard that turns a hang (the bug) into a failure.
        let answer = tokio::time::timeout(Duration::from_secs(120), client.get_status(proto::GetStatusRequest {}))
            .await
            .expect("GetStatus to a silent port must end at its deadline");
        let status = answer.unwrap_err();
        assert!(status.message().contains("Timeout expired"), "{status:?}");
    }

    #[test]
    fn only_failures_that_waiting_cannot_fix_say_not_a_coordinator() {
        use tonic::{Code, Status};
        let foreign = [
            Status::new(Code::Internal, "h2 protocol error: http2 error"),
            Status::new(Code::Unimplemented, ""),
            Status::new(
                Code::Unimplemented,
                "grpc-status header missing, mapped from HTTP status code 404",
            ),
            Status::new(
                Code::Unknown,
                "grpc-status header missing, mapped from HTTP status code 500",
            ),
            Status::new(
                Code::Internal,
                "grpc-status header missing, mapped from HTTP status code 400",
            ),
            Status::new(
                Code::Internal,
                "protocol error: received message with invalid compression flag: 60",
            ),
            Status::new(Code::Unknown, "protocol error: missing grpc-status trailer"),
        ];
        for status in foreign {
            assert!(not_a_coordinator(&status), "{status:?}");
        }
        let transient = [
            Status::new(Code::Unavailable, "tcp connect error"),
            Status::new(Code::Unknown, "h2 protocol error: connection reset"),
            Status::new(Code::Unavailable, "the coordinator is shutting down"),
            Status::new(
                Code::Unavailable,
                "grpc-status header missing, mapped from HTTP status code 503",
            ),
            Status::new(Code::Cancelled, "Timeout expired"),
            Status::new(
                Code::Internal,
                "h2 protocol error: connection error received: not a result of an error",
            ),
            Status::new(Code::Internal, "cannot write the run state"),
        ];
        for status in transient {
            assert!(!not_a_coordinator(&status), "{status:?}");
        }
    }
}
