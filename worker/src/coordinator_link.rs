//! How a worker reaches its coordinator: the address, the route other workers use to reach this host, and the
//! flags for the run token and TLS. The connection itself (TLS, the token on every call, retrying while the
//! coordinator starts) is `lockstep_common::transport`, shared with the CLI.
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;

use lockstep_common::auth::{self, RunToken};
use lockstep_common::transport::ClientSecurity;

use crate::error::{Error, Result};

/// The flags every client of the coordinator shares: `lockstep-worker`, `lockstep status`, `lockstep stop`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// A file holding the run token (a coordinator given none writes one to <cluster.state_dir>/token). The
    /// LOCKSTEP_TOKEN variable, when set, wins.
    #[arg(long, env = "LOCKSTEP_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The CA that signed the coordinator's TLS certificate (PEM); for an https:// coordinator URL.
    #[arg(long, env = "LOCKSTEP_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), for a coordinator that requires mutual TLS; with --tls-key.
    #[arg(long, env = "LOCKSTEP_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "LOCKSTEP_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// The name the coordinator's certificate carries, when it is not the URL's host.
    #[arg(long, env = "LOCKSTEP_TLS_DOMAIN", value_name = "NAME")]
    pub tls_domain: Option<String>,
}

impl SecurityArgs {
    /// The token (`LOCKSTEP_TOKEN`, else `--token-file`) and TLS settings these flags describe.
    pub fn client_security(&self) -> Result<ClientSecurity> {
        let token = RunToken::for_client(auth::env_token()?, self.token_file.as_deref())?;
        Ok(ClientSecurity::new(token).with_tls_flags(
            self.tls_ca.clone(),
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_domain.clone(),
        )?)
    }
}

/// The coordinator's socket address from its URL, for choosing the ring interface.
pub fn resolve(url: &str) -> Result<SocketAddr> {
    let bad = |message: String| Error::Coordinator {
        addr: url.to_string(),
        message,
    };
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .to_socket_addrs()
        .map_err(|e| {
            bad(format!(
                "cannot resolve the --coordinator address ({e}); use http://HOST:PORT"
            ))
        })?
        .next()
        .ok_or_else(|| bad("the --coordinator address resolves to nothing; use http://HOST:PORT".into()))
}

/// The local address this host would use to reach `peer`: the interface other workers can reach us on too.
/// (Connecting a UDP socket sends nothing; it only asks the kernel for the route.)
pub fn local_ip_towards(peer: SocketAddr) -> std::net::IpAddr {
    let any: SocketAddr = if peer.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap_or(peer);
    UdpSocket::bind(any)
        .and_then(|s| s.connect(peer).and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .unwrap_or(any.ip())
}

/// The name a worker gets without `--worker-id`: `HOST:PID`.
pub fn default_worker_id() -> String {
    format!("{}:{}", hostname(), std::process::id())
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
