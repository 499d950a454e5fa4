//! Who may talk to the coordinator: the run token on every RPC, TLS or mutual TLS from `[security]`, and the
//! message size limit.
//!
//! The token check is a tower layer around the whole server rather than an interceptor per service, so that a
//! service added later is covered without anyone remembering to. The one exemption is `grpc.health.v1.Health`:
//! load balancers, Kubernetes probes and `grpc_health_probe` carry no token, and health reveals only whether the
//! coordinator is serving.
use std::path::Path;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use lockstep_common::auth::{AUTHORIZATION, RunToken, UNAUTHENTICATED_HINT};
use lockstep_common::spec::{DEFAULT_MAX_MESSAGE_BYTES, SecuritySpec};
use lockstep_common::transport::read_pem;
use tonic::codegen::{Service, http};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::error::{Error, Result};

/// Requests under this path need no token (see the module doc).
pub const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// How the server admits clients. There is deliberately no `Default`: a server without a token does not exist.
#[derive(Debug, Clone)]
pub struct ServerSecurity {
    pub token: RunToken,
    /// `None` = plain HTTP/2.
    pub tls: Option<ServerTlsConfig>,
    /// Largest message the Coordinator service decodes or encodes.
    pub max_message_bytes: usize,
}

impl ServerSecurity {
    /// `token` over plain HTTP/2 with the default message limit (tests, and the base of [`Self::from_spec`]).
    pub fn new(token: RunToken) -> Self {
        Self {
            token,
            tls: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// `token` plus the spec's `[security]`: TLS files are read and checked here, so a bad one is reported at
    /// start-up, naming its key and file.
    pub fn from_spec(spec: &SecuritySpec, token: RunToken) -> Result<Self> {
        let mut security = Self::new(token);
        security.max_message_bytes = spec.max_message_bytes;
        let (Some(cert), Some(key)) = (&spec.tls_cert, &spec.tls_key) else {
            return Ok(security);
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
            read_file("security.tls_cert", cert)?,
            read_file("security.tls_key", key)?,
        ));
        let mut files = format!(
            "security.tls_cert = {}, security.tls_key = {}",
            cert.display(),
            key.display()
        );
        if let Some(ca) = &spec.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read_file("security.tls_client_ca", ca)?));
            files.push_str(&format!(", security.tls_client_ca = {}", ca.display()));
        }
        // Building the acceptor parses every certificate and the key: fail now, not at the first connection.
        tonic::transport::Server::builder()
            .tls_config(tls.clone())
            .map_err(|source| Error::TlsConfig { files, source })?;
        security.tls = Some(tls);
        Ok(security)
    }
}

fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>> {
    read_pem(field, path).map_err(|message| Error::TlsFile {
        field,
        path: path.to_path_buf(),
        message,
    })
}

/// Whether a request for `path` with these headers may proceed.
pub fn check(token: &RunToken, path: &str, headers: &http::HeaderMap) -> Result<(), tonic::Status> {
    if path.starts_with(HEALTH_PREFIX) {
        return Ok(());
    }
    match headers.get(AUTHORIZATION) {
        Some(value) if token.matches_bearer(value.as_bytes()) => Ok(()),
        Some(_) => Err(tonic::Status::unauthenticated(format!(
            "wrong run token (this coordinator's is another); {UNAUTHENTICATED_HINT}"
        ))),
        None => Err(tonic::Status::unauthenticated(format!(
            "no run token in the request; {UNAUTHENTICATED_HINT}"
        ))),
    }
}

/// The tower layer that puts [`Authenticated`] around the server's routes.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    token: RunToken,
}

impl AuthLayer {
    pub fn new(token: RunToken) -> Self {
        Self { token }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            token: self.token.clone(),
        }
    }
}

/// Answers `Unauthenticated` itself, without reaching any service, unless the request carries the token.
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    token: RunToken,
}

impl<S, B> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match check(&self.token, request.uri().path(), request.headers()) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(status) => {
                tracing::debug!(path = request.uri().path(), "request without the run token refused");
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(v) = value {
            h.insert(AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn every_path_but_health_needs_the_token() {
        let token = RunToken::generate();
        let right = token.bearer();
        let wrong = RunToken::generate().bearer();
        for path in [
            "/lockstep.v1.Coordinator/GetStatus",
            "/lockstep.v1.Coordinator/GetHistory",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/anything/else",
        ] {
            assert!(check(&token, path, &headers(Some(&right))).is_ok(), "{path}");
            let none = check(&token, path, &headers(None)).unwrap_err();
            assert_eq!(none.code(), tonic::Code::Unauthenticated);
            assert!(
                none.message().contains("--token-file PATH or LOCKSTEP_TOKEN"),
                "{}",
                none.message()
            );
            let bad = check(&token, path, &headers(Some(&wrong))).unwrap_err();
            assert_eq!(bad.code(), tonic::Code::Unauthenticated);
            assert!(bad.message().contains("wrong run token"), "{}", bad.message());
        }
        assert!(check(&token, "/grpc.health.v1.Health/Check", &headers(None)).is_ok());
        // The exemption is the Health service exactly, not a prefix of another name.
        assert!(check(&token, "/grpc.health.v1.HealthX/Check", &headers(None)).is_err());
    }

    #[test]
    fn tls_files_are_named_when_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let spec = SecuritySpec {
            tls_cert: Some(cert.clone()),
            tls_key: Some(key.clone()),
            ..SecuritySpec::default()
        };
        let err = ServerSecurity::from_spec(&spec, RunToken::generate())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("security.tls_cert") && err.contains(&cert.display().to_string()),
            "{err}"
        );
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let err = ServerSecurity::from_spec(&spec, RunToken::generate())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&cert.display().to_string()) && err.contains(&key.display().to_string()),
            "{err}"
        );
        let plain = ServerSecurity::from_spec(&SecuritySpec::default(), RunToken::generate()).unwrap();
        assert!(plain.tls.is_none());
        assert_eq!(plain.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    }
}
