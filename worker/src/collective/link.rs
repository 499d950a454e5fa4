//! Setting up the two TCP links of a ring member: the listener its predecessor connects to, and
//! the connection to its successor. Both wait for peers that start late, both give up at the
//! deadline, and both stop early once [`Halt`] says so (the other direction already failed, or the caller
//! cancelled): every wait polls it, so a cancelled setup returns within [`HALT_POLL`] or so.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use super::handshake::{self, HandshakeError, Local};
use crate::error::{Error, Result};

/// How often a pending accept looks again; std has no accept with a timeout.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// How often a dial, a handshake or a backoff in progress looks at [`Halt`]: short next to a person's patience,
/// long next to a poll's cost.
pub(super) const HALT_POLL: Duration = Duration::from_millis(20);

/// Why ring setup may give up before its deadline.
#[derive(Debug, Clone, Copy)]
pub(super) struct Halt<'a> {
    /// The other direction of this ring member failed: this one cannot help any more.
    pub other_failed: &'a AtomicBool,
    /// The caller gave up ([`super::RingConfig::cancel`], e.g. the coordinator aborted the generation).
    pub cancel: Option<&'a AtomicBool>,
}

impl Halt<'_> {
    pub(super) fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::SeqCst))
    }

    fn is_set(&self) -> bool {
        self.cancelled() || self.other_failed.load(Ordering::SeqCst)
    }

    /// Sleeps for `d`, waking early once halted.
    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.is_set() {
                return;
            }
            thread::sleep(left.min(HALT_POLL));
        }
    }

    /// What a thread of this setup sends on `rx`; `None` once halted first (or if the sender is gone).
    fn wait<T>(&self, rx: &mpsc::Receiver<T>) -> Option<T> {
        loop {
            match rx.recv_timeout(HALT_POLL) {
                Ok(v) => return Some(v),
                Err(RecvTimeoutError::Timeout) if !self.is_set() => {}
                Err(_) => return None,
            }
        }
    }
}

/// The socket a worker's ring predecessor connects to.
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl RingListener {
    /// Bound BEFORE the worker joins, so its actual address (port 0 → real port) can be told to
    /// the coordinator.
    pub fn bind(addr: &str) -> Result<Self> {
        let io = |source| Error::Io {
            context: format!("ring listener on {addr}"),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(io)?;
        // Non-blocking so that accepting can give up at the deadline.
        listener.set_nonblocking(true).map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        Ok(Self { listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// `rank N at ADDR`: how errors name a ring peer.
pub(super) fn peer_name(rank: u32, addr: &str) -> String {
    format!("rank {rank} at {addr}")
}

/// A failed ring operation. `telling` marks an error that names the cause (a refusal, a protocol
/// mismatch) rather than a symptom (a timeout, a hang-up); when both directions of a ring member
/// fail, a telling error is the one worth reporting.
#[derive(Debug)]
pub(super) struct Failure {
    pub error: Error,
    pub telling: bool,
}

impl Failure {
    pub(super) fn new(error: Error, telling: bool) -> Self {
        Self { error, telling }
    }
}

/// Connects to the successor `rank` at `addr`, retrying refused or broken connections until the
/// deadline. An explicit refusal in the handshake is final.
pub(super) fn connect_next(
    addr: &str,
    rank: u32,
    ours: &Local<'_>,
    deadline: Instant,
    halt: Halt<'_>,
) -> Result<TcpStream, Failure> {
    let fail = |message, telling| {
        let peer = peer_name(rank, addr);
        Failure::new(Error::Ring { peer, message }, telling)
    };
    let mut last = String::from("no attempt finished");
    let mut backoff = FIRST_BACKOFF;
    loop {
        if halt.is_set() {
            // Cancelled, or the other direction failed and has the story.
            return Err(Failure::new(Error::Aborted("ring setup cancelled".into()), false));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            let message = format!(
                "could not connect before the deadline ({last}): is that worker running, and is its ring address \
                 reachable from here?"
            );
            return Err(fail(message, false));
        }
        match dial(addr, remaining, halt) {
            Some(Ok(stream)) => match handshake_unless_halted(stream, ours, rank, deadline, halt) {
                Some(Ok(stream)) => return Ok(stream),
                Some(Err(HandshakeError::Refused(why))) => return Err(fail(why, true)),
                Some(Err(e)) => last = e.to_string(),
                None => continue,
            },
            Some(Err(e)) => last = e,
            None if halt.is_set() => continue,
            None => last = "the dial thread ended without an answer".into(),
        }
        halt.sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One dial, on a thread of its own: a dial to a host that is down (its SYNs unanswered) lasts until `timeout`, and
/// std cannot cut a connect short, so once halted the caller stops waiting instead and the thread ends by itself.
/// `None`: halted (or the thread ended without an answer).
fn dial(addr: &str, timeout: Duration, halt: Halt<'_>) -> Option<std::result::Result<TcpStream, String>> {
    let (tx, rx) = mpsc::channel();
    let owned = addr.to_string();
    let spawned = thread::Builder::new().name("ring-dial".into()).spawn(move || {
        // The caller may have stopped listening: the stream, if any, is then simply dropped.
        let _ = tx.send(try_connect(&owned, timeout));
    });
    if let Err(e) = spawned {
        return Some(Err(format!("cannot start a thread to dial {addr}: {e}")));
    }
    halt.wait(&rx)
}

/// The handshake on a dialled connection, on a thread of its own so that it can be cut short: once halted, the
/// connection is shut down, which ends the handshake's blocked read or write at once. `None`: halted.
fn handshake_unless_halted(
    stream: TcpStream,
    ours: &Local<'_>,
    rank: u32,
    deadline: Instant,
    halt: Halt<'_>,
) -> Option<Result<TcpStream, HandshakeError>> {
    let cutter = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => return Some(Err(e.into())),
    };
    thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name(format!("ring-dial-handshake-{}", ours.hello.rank))
            .spawn_scoped(s, move || {
                let _ = tx.send(handshake::handshake(&stream, ours, rank, deadline).map(|()| stream));
            });
        if let Err(e) = spawned {
            return Some(Err(e.into()));
        }
        let outcome = halt.wait(&rx);
        if outcome.is_none() {
            // Ends the handshake thread, which the scope then joins.
            let _ = cutter.shutdown(Shutdown::Both);
        }
        outcome
    })
}

fn try_connect(addr: &str, timeout: Duration) -> std::result::Result<TcpStream, String> {
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?;
    let mut last = format!("{addr} resolves to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) => last = format!("connect to {a}: {e}"),
        }
    }
    Err(last)
}

/// Most handshakes the listener runs at once; further connections wait in the backlog until one finishes.
const MAX_PENDING_HANDSHAKES: usize = 16;

/// Accepts the predecessor `rank` (ring address `addr`) until the deadline. Every accepted connection runs its
/// handshake on a thread of its own, so a stray connection that never says anything (or cannot prove the token)
/// cannot keep the real predecessor out: it is refused or left behind, and accepting goes on.
pub(super) fn accept_prev(
    listener: &RingListener,
    rank: u32,
    addr: &str,
    ours: &Local<'_>,
    deadline: Instant,
    halt: Halt<'_>,
) -> Result<TcpStream, Failure> {
    let (done_tx, done_rx) = mpsc::channel::<(u64, SocketAddr, Result<TcpStream, HandshakeError>)>();
    // Clones of the connections still in their handshake, to cut them short once this call returns.
    let mut pending: HashMap<u64, TcpStream> = HashMap::new();
    let mut next_id = 0u64;
    let mut last_problem: Option<String> = None;
    let mut saw_mismatch = false;
    thread::scope(|s| {
        let result = loop {
            while let Ok((id, from, outcome)) = done_rx.try_recv() {
                pending.remove(&id);
                match outcome {
                    Ok(stream) => return finish(Ok(stream), &mut pending),
                    Err(e) => {
                        saw_mismatch |= matches!(e, HandshakeError::Refused(_));
                        tracing::warn!(rank = ours.hello.rank, %from, error = %e, "refused ring connection");
                        last_problem = Some(format!("refused a connection from {from}: {e}"));
                    }
                }
            }
            // Stopped early, a refusal seen here may still be the best explanation of the failure.
            if halt.is_set() || Instant::now() >= deadline {
                let last = last_problem.take().map(|p| format!(" (last: {p})")).unwrap_or_default();
                let message = format!(
                    "made no valid connection to this rank at {} in time{last}: is that worker \
                     running, and does it have this rank's address?",
                    listener.addr
                );
                let peer = peer_name(rank, addr);
                break Err(Failure::new(Error::Ring { peer, message }, saw_mismatch));
            }
            if pending.len() >= MAX_PENDING_HANDSHAKES {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            match listener.listener.accept() {
                Ok((stream, from)) => {
                    // The accepted socket must block: all later timeouts rely on it.
                    let ready = stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.set_nodelay(true))
                        .and_then(|()| stream.try_clone());
                    let clone = match ready {
                        Ok(clone) => clone,
                        Err(e) => {
                            last_problem = Some(format!("cannot use a connection from {from}: {e}"));
                            continue;
                        }
                    };
                    let (id, done_tx) = (next_id, done_tx.clone());
                    next_id += 1;
                    let spawned = thread::Builder::new()
                        .name(format!("ring-handshake-{}", ours.hello.rank))
                        .spawn_scoped(s, move || {
                            let outcome = handshake::handshake(&stream, ours, rank, deadline).map(|()| stream);
                            let _ = done_tx.send((id, from, outcome));
                        });
                    match spawned {
                        Ok(_) => {
                            pending.insert(id, clone);
                        }
                        Err(e) => last_problem = Some(format!("cannot handle a connection from {from}: {e}")),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
                Err(e) => {
                    // E.g. out of file descriptors, which may pass: keep trying until the deadline.
                    last_problem = Some(format!("accept failed: {e}"));
                    thread::sleep(ACCEPT_POLL);
                }
            }
        };
        finish(result, &mut pending)
    })
}

/// Ends the handshakes still running (strays, or connections too late to matter), so that their threads return.
fn finish(result: Result<TcpStream, Failure>, pending: &mut HashMap<u64, TcpStream>) -> Result<TcpStream, Failure> {
    for (_, stream) in pending.drain() {
        let _ = stream.shutdown(Shutdown::Both);
    }
    result
}
