//! How clients (workers, `lockstep status` and `lockstep stop`, tests) reach the coordinator: the URL, TLS or mutual
//! TLS when asked for, the run token on every request, message size limits, and retrying while the coordinator
//! starts.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::{Interceptor, interceptor::InterceptedService};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::auth::{AUTHORIZATION, RunToken};
use crate::error::{Error, Result};
use crate::proto;
use crate::spec::DEFAULT_MAX_MESSAGE_BYTES;

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

/// A Coordinator client that sends the run token with every call.
pub type CoordinatorClient = proto::coordinator_client::CoordinatorClient<InterceptedService<Channel, AuthInterceptor>>;

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
    let https = url.starts_with("https://");
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

/// A client over `channel` that sends `security`'s token and applies its message limit.
pub fn client(channel: Channel, security: &ClientSecurity) -> Result<CoordinatorClient> {
    let limit = security.max_message_bytes;
    Ok(
        proto::coordinator_client::CoordinatorClient::with_interceptor(channel, AuthInterceptor::new(&security.token)?)
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
    let deadline = Instant::now() + timeout;
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
                if Instant::now() + backoff >= deadline {
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
}
