//! How a worker reaches its coordinator: the address, the route other workers use to reach this host, the flags for
//! the run token and TLS, how long to wait between attempts to join, and which failures say the address is not a
//! coordinator at all. The connection itself (TLS, the token on every call, retrying while the coordinator starts)
//! is `lockstep_common::transport`, shared with the CLI.
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;

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

/// The local address this host would use to reach `peer`: the interface other workers can reach us on too; `None`
/// when there is no route. (Connecting a UDP socket sends nothing; it only asks the kernel for the route.)
pub fn local_ip_towards(peer: SocketAddr) -> Option<IpAddr> {
    let any = SocketAddr::new(unspecified_like(peer.ip()), 0);
    UdpSocket::bind(any)
        .and_then(|s| s.connect(peer).and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified())
}

/// 0.0.0.0 or [::], in `ip`'s family.
fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// The address other workers dial for a ring listener bound at `bound`. A listener on every interface (0.0.0.0,
/// [::]) cannot be advertised as such, since a peer on another host would dial itself: it is advertised at `route`,
/// the address this host uses towards the coordinator, which is on the network the workers share.
pub fn advertised_ring_addr(bound: SocketAddr, route: Option<IpAddr>) -> Result<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    let usage = |why: &str| {
        Error::Usage(format!(
            "--ring-listen {bound}: {why}; give --ring-listen this host's IP address (with the port, 0 = any free \
             one), the one other workers reach it at"
        ))
    };
    match route {
        // A [::] listener also accepts IPv4 (Linux's default), so either family of route will do.
        Some(ip) if ip.is_ipv4() || bound.is_ipv6() => Ok(SocketAddr::new(ip, bound.port())),
        Some(ip) => Err(usage(&format!(
            "it listens on IPv4 only, but this host reaches the coordinator over IPv6 (from {ip})"
        ))),
        None => Err(usage(
            "it listens on every interface, and this host has no route to the coordinator to tell which one other \
             workers reach it at",
        )),
    }
}

/// Waits between attempts to join: doubling from `first` up to `cap`, and each a random draw from the upper half of
/// that, so that the workers of a coordinator that went away do not all come back at the same instant.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            cap,
            next: first,
        }
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.cap);
        base.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Back to `first`, after a session that held.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_listener_on_every_interface_is_advertised_at_the_route_to_the_coordinator() {
        let route = Some("10.1.2.3".parse().unwrap());
        assert_eq!(
            advertised_ring_addr(addr("0.0.0.0:44019"), route).unwrap(),
            addr("10.1.2.3:44019")
        );
        assert_eq!(
            advertised_ring_addr(addr("[::]:44019"), route).unwrap(),
            addr("10.1.2.3:44019")
        );
        let v6 = Some("fd00::7".parse().unwrap());
        assert_eq!(advertised_ring_addr(addr("[::]:9"), v6).unwrap(), addr("[fd00::7]:9"));
        // A listener on one address is advertised as it is, whatever the route.
        assert_eq!(
            advertised_ring_addr(addr("192.168.0.5:9"), route).unwrap(),
            addr("192.168.0.5:9")
        );
        assert_eq!(
            advertised_ring_addr(addr("127.0.0.1:9"), None).unwrap(),
            addr("127.0.0.1:9")
        );
    }

    #[test]
    fn an_every_interface_listener_that_cannot_be_advertised_names_the_flag() {
        let e = advertised_ring_addr(addr("0.0.0.0:9"), None).unwrap_err().to_string();
        assert!(e.contains("--ring-listen 0.0.0.0:9") && e.contains("no route"), "{e}");
        let e = advertised_ring_addr(addr("0.0.0.0:9"), Some("fd00::7".parse().unwrap()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("IPv4 only") && e.contains("IPv6"), "{e}");
    }

    #[test]
    fn the_route_to_loopback_is_loopback() {
        assert_eq!(
            local_ip_towards(addr("127.0.0.1:7070")),
            Some("127.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap_and_resets() {
        let (first, cap) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut backoff = Backoff::new(first, cap);
        let mut base = first;
        for _ in 0..12 {
            let delay = backoff.next_delay();
            assert!(delay >= base / 2 && delay <= base, "{delay:?} for {base:?}");
            base = (base * 2).min(cap);
        }
        assert_eq!(base, cap);
        backoff.reset();
        assert!(backoff.next_delay() <= first);
    }
}
