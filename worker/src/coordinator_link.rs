//! How a worker reaches its coordinator: the address, the route other workers use to reach this host, and the
//! gRPC channel (retried with backoff while the coordinator starts).
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// Connects to the coordinator, retrying until `timeout` (it may not be listening yet).
pub async fn connect(url: &str, timeout: Duration) -> Result<Channel> {
    let bad = |message: String| Error::Coordinator {
        addr: url.to_string(),
        message,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(format!("not a valid --coordinator URL ({e}); use http://HOST:PORT")))?
        .connect_timeout(Duration::from_secs(2).min(timeout.max(Duration::from_millis(100))));
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if Instant::now() + backoff >= deadline => {
                return Err(bad(format!(
                    "unreachable after {:.0?} ({}); is lockstep-coordinator running and listening there?",
                    timeout,
                    error_chain(&e)
                )));
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
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
