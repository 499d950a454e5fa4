//! Bandwidth-optimal ring all-reduce over TCP: reduce-scatter, then all-gather.
//!
//! Rank r sends only to rank r+1 and receives only from rank r-1, each over its own connection.
//! Each chunk is summed in one fixed order as it travels round the ring and the finished chunk is
//! then copied, never re-summed, so every rank ends bitwise identical. Every socket operation has
//! the configured deadline, and [`AbortHandle::abort`] shuts the sockets down from any thread, so
//! a dead or stuck peer turns into an error rather than a hang.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::frame::{self, FrameError, Header, Mode};
use lockstep_common::auth::{RingRole, RunToken};

use super::handshake::{Hello, Local, MAX_SESSION_LEN};
use super::link::{self, Failure, Halt, RingListener, peer_name};
use super::{Collective, chunk_range};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct RingConfig {
    pub rank: u32,
    pub world_size: u32,
    /// Ring addresses indexed by rank.
    pub peers: Vec<String>,
    /// Deadline of every connect, send and receive.
    pub timeout: Duration,
    /// E.g. `"<run name>/gen-3"`: both ends of a link must agree, so a stale peer from another
    /// generation or run is refused.
    pub session: String,
    /// Both ends of every link prove they hold it (an HMAC over the other end's nonce); a peer that cannot is
    /// refused.
    pub token: RunToken,
    /// Setting it (from any thread) makes a [`Ring::connect`] in progress give up within a fraction of a second with
    /// [`Error::Aborted`] instead of waiting out `timeout` for a neighbour that is gone (the coordinator aborted the
    /// generation). Only connecting looks at it: a connected ring is interrupted through [`Ring::abort_handle`].
    pub cancel: Option<Arc<AtomicBool>>,
}

impl RingConfig {
    fn validate(&self) -> Result<()> {
        let problem = if self.world_size == 0 || self.rank >= self.world_size {
            format!("rank {} is not below world size {}", self.rank, self.world_size)
        } else if self.peers.len() != self.world_size as usize {
            format!("{} peer addresses for world size {}", self.peers.len(), self.world_size)
        } else if self.timeout.is_zero() {
            "the timeout is zero".into()
        } else if self.session.len() > MAX_SESSION_LEN {
            format!("session name longer than {MAX_SESSION_LEN} bytes")
        } else {
            return Ok(());
        };
        Err(Error::RingConfig(problem))
    }
}

/// Interrupts a ring from another thread (the coordinator's abort).
#[derive(Debug, Clone)]
pub struct AbortHandle {
    inner: Arc<AbortInner>,
}

#[derive(Debug)]
struct AbortInner {
    aborted: AtomicBool,
    /// Clones of the ring's sockets: shutting one down wakes whoever is blocked on it.
    streams: Vec<TcpStream>,
}

impl AbortHandle {
    /// Makes the current and every later all-reduce on the ring fail promptly.
    pub fn abort(&self) {
        self.inner.aborted.store(true, Ordering::SeqCst);
        for s in &self.inner.streams {
            // NotConnected just means the peer got there first.
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn is_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Link {
    stream: TcpStream,
    /// `rank N at ADDR`, for errors.
    peer: String,
}

#[derive(Debug)]
struct Links {
    next: Link,
    prev: Link,
}

impl Links {
    fn shutdown(&self) {
        let _ = self.next.stream.shutdown(Shutdown::Both);
        let _ = self.prev.stream.shutdown(Shutdown::Both);
    }
}

#[derive(Debug)]
pub struct Ring {
    rank: u32,
    world_size: u32,
    timeout: Duration,
    /// `None` for a world of one.
    links: Option<Links>,
    abort: AbortHandle,
    /// All-reduces started so far; travels in every frame header.
    ops: u64,
    /// Set by the first failure: the streams are then in an unknown state.
    broken: Option<String>,
    send_scratch: Vec<u8>,
    recv_scratch: Vec<u8>,
}

impl Ring {
    /// Rank r connects to rank (r+1)%n (retrying until the deadline, since peers start at
    /// different times) and accepts from (r-1)%n on its listener; a handshake (magic, protocol
    /// version, session string, sender rank, world size, then proof of the run token both ways)
    /// is checked on both links; a mismatch or a failed proof is an error naming the peer. Accepted
    /// connections that fail the handshake are dropped and accepting continues until the deadline.
    /// Once [`RingConfig::cancel`] is set, fails promptly with [`Error::Aborted`].
    pub fn connect(listener: &RingListener, cfg: RingConfig) -> Result<Ring> {
        cfg.validate()?;
        let links = if cfg.world_size == 1 {
            None
        } else {
            Some(connect_links(listener, &cfg)?)
        };
        let streams = match &links {
            Some(l) => [&l.next.stream, &l.prev.stream]
                .into_iter()
                .map(TcpStream::try_clone)
                .collect::<io::Result<Vec<_>>>()
                .map_err(|source| Error::Io {
                    context: "clone ring socket".into(),
                    source,
                })?,
            None => Vec::new(),
        };
        let aborted = AtomicBool::new(false);
        Ok(Ring {
            rank: cfg.rank,
            world_size: cfg.world_size,
            timeout: cfg.timeout,
            links,
            abort: AbortHandle {
                inner: Arc::new(AbortInner { aborted, streams }),
            },
            ops: 0,
            broken: None,
            send_scratch: Vec::new(),
            recv_scratch: Vec::new(),
        })
    }

    /// A handle that another thread can use to interrupt a hung all-reduce (shuts both sockets
    /// down, so the blocked call returns an error promptly).
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    /// Blocks until the predecessor has sent something, without consuming it.
    #[cfg(test)]
    pub(super) fn wait_for_prev(&self) -> io::Result<()> {
        match &self.links {
            Some(l) => l.prev.stream.peek(&mut [0u8; 1]).map(drop),
            None => Ok(()),
        }
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        let (n, r) = (self.world_size as usize, self.rank as usize);
        for s in 0..n - 1 {
            // Afterwards this rank holds chunk r-s-1 summed over ranks r-s-1 ..= r.
            let (out, inc) = ((r + n - s) % n, (r + 2 * n - s - 1) % n);
            self.exchange(buf, s, out, inc, Mode::Add)?;
        }
        // Now this rank holds the finished chunk r+1; pass the finished chunks round.
        for s in 0..n - 1 {
            let (out, inc) = ((r + 1 + n - s) % n, (r + n - s) % n);
            self.exchange(buf, n - 1 + s, out, inc, Mode::Overwrite)?;
        }
        Ok(())
    }

    /// One ring step: send chunk `out` to the successor while receiving chunk `inc` from the
    /// predecessor.
    fn exchange(&mut self, buf: &mut [f32], step: usize, out: usize, inc: usize, mode: Mode) -> Result<()> {
        let Some(links) = &self.links else { return Ok(()) };
        let (n, len) = (self.world_size as usize, buf.len());
        let (outgoing, incoming) = split_pair(buf, chunk_range(len, n, out), chunk_range(len, n, inc));
        let header = |chunk: &[f32]| Header {
            op: self.ops,
            step: step as u32,
            buf_len: len as u64,
            chunk_len: chunk.len() as u64,
        };
        let (out_header, in_header) = (header(outgoing), header(incoming));
        let (send_scratch, recv_scratch) = (&mut self.send_scratch, &mut self.recv_scratch);
        let what = format!("all-reduce #{} step {step}", self.ops);
        let error = |link: &Link, e: FrameError| {
            if self.abort.is_aborted() {
                return Error::Aborted(format!("{what} interrupted (ring with {})", link.peer));
            }
            Error::Ring {
                peer: link.peer.clone(),
                message: describe(e, &what, self.timeout),
            }
        };
        let send = || {
            frame::send(&links.next.stream, &out_header, outgoing, send_scratch)
                .map_err(|e| Failure::new(error(&links.next, e.into()), false))
        };
        let receive = || {
            frame::recv(&links.prev.stream, &in_header, incoming, mode, recv_scratch).map_err(|e| {
                // A peer out of step explains whatever else broke.
                let telling = matches!(e, FrameError::OutOfStep(_));
                Failure::new(error(&links.prev, e), telling)
            })
        };
        both(format!("ring-send-{}", self.rank), send, receive, || links.shutdown()).map(drop)
    }
}

impl Collective for Ring {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.abort.is_aborted() {
            return Err(Error::Aborted(format!("ring of rank {} was aborted", self.rank)));
        }
        if let Some(why) = &self.broken {
            return Err(Error::Aborted(format!(
                "ring of rank {} is unusable after an earlier failure ({why}): re-form the generation",
                self.rank
            )));
        }
        if self.links.is_none() {
            return Ok(());
        }
        self.ops += 1;
        let result = self.all_reduce(buf);
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
            // Peers blocked on this rank learn at once instead of at their deadline.
            if let Some(l) = &self.links {
                l.shutdown();
            }
        }
        result
    }
}

impl Drop for Ring {
    /// Explicit, because the abort handle's socket clones would otherwise keep the links open.
    fn drop(&mut self) {
        if let Some(l) = &self.links {
            l.shutdown();
        }
    }
}

/// Connects to the successor and accepts the predecessor at the same time: connecting first and
/// accepting afterwards would deadlock, every rank waiting for its successor's handshake.
fn connect_links(listener: &RingListener, cfg: &RingConfig) -> Result<Links> {
    let (rank, n) = (cfg.rank, cfg.world_size);
    let deadline = Instant::now() + cfg.timeout;
    let hello = Hello {
        rank,
        world_size: n,
        session: &cfg.session,
    };
    let (acceptor, connector) = (
        Local {
            hello,
            token: &cfg.token,
            role: RingRole::Acceptor,
        },
        Local {
            hello,
            token: &cfg.token,
            role: RingRole::Connector,
        },
    );
    let (next_rank, prev_rank) = ((rank + 1) % n, (rank + n - 1) % n);
    let (next_addr, prev_addr) = (&cfg.peers[next_rank as usize], &cfg.peers[prev_rank as usize]);
    let other_failed = AtomicBool::new(false);
    let halt = Halt {
        other_failed: &other_failed,
        cancel: cfg.cancel.as_deref(),
    };
    let (prev, next) = both(
        format!("ring-accept-{rank}"),
        || link::accept_prev(listener, prev_rank, prev_addr, &acceptor, deadline, halt),
        || link::connect_next(next_addr, next_rank, &connector, deadline, halt),
        || other_failed.store(true, Ordering::SeqCst),
    )
    .map_err(|e| {
        if !halt.cancelled() {
            return e;
        }
        // Whatever else failed, the generation is gone: the caller must see an abort, not a peer to blame.
        tracing::debug!(rank, error = %e, "ring setup cancelled");
        Error::Aborted(format!(
            "ring setup of rank {rank} in {:?} cancelled before both links were up",
            cfg.session
        ))
    })?;
    let link = |stream: TcpStream, r: u32, addr: &str| {
        let peer = peer_name(r, addr);
        let timeouts = stream
            .set_read_timeout(Some(cfg.timeout))
            .and_then(|()| stream.set_write_timeout(Some(cfg.timeout)));
        match timeouts {
            Ok(()) => Ok(Link { stream, peer }),
            Err(e) => Err(Error::Ring {
                peer,
                message: format!("cannot set socket timeouts: {e}"),
            }),
        }
    };
    tracing::debug!(rank, world_size = n, next = %next_addr, prev = %prev_addr, "ring connected");
    Ok(Links {
        next: link(next, next_rank, next_addr)?,
        prev: link(prev, prev_rank, prev_addr)?,
    })
}

/// Runs `background` on a scoped thread while `foreground` runs here. The first to fail calls
/// `cut_short`, so that the other stops promptly. If both fail, the telling error wins, else the
/// first one: the other failure is then only a consequence.
fn both<A: Send, B>(
    thread_name: String,
    background: impl FnOnce() -> Result<A, Failure> + Send,
    foreground: impl FnOnce() -> Result<B, Failure>,
    cut_short: impl Fn() + Sync,
) -> Result<(A, B)> {
    const BACKGROUND: u8 = 1;
    let first = AtomicU8::new(0);
    let failed = |who: u8| {
        if first
            .compare_exchange(0, who, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            cut_short();
        }
    };
    let (a, b) = thread::scope(|s| {
        let handle = thread::Builder::new()
            .name(thread_name)
            .spawn_scoped(s, || background().inspect_err(|_| failed(BACKGROUND)))
            .map_err(|source| Error::Io {
                context: "spawn a ring thread".into(),
                source,
            })?;
        let b = foreground().inspect_err(|_| failed(2));
        let a = handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        Ok::<_, Error>((a, b))
    })?;
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(a), Err(b)) if a.telling != b.telling => Err(if a.telling { a } else { b }.error),
        (Err(a), Err(_)) if first.load(Ordering::SeqCst) == BACKGROUND => Err(a.error),
        (_, Err(e)) | (Err(e), Ok(_)) => Err(e.error),
    }
}

/// What went wrong on a link, with what to check.
fn describe(e: FrameError, what: &str, timeout: Duration) -> String {
    use io::ErrorKind::*;
    match e {
        FrameError::OutOfStep(m) => format!("{m} ({what})"),
        FrameError::Io(e) => match e.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
                format!("closed the connection during {what}: is that worker alive?")
            }
            WouldBlock | TimedOut => format!(
                "made no progress within the {timeout:?} deadline during {what}: is that worker \
                 alive, or slower than the deadline allows?"
            ),
            _ => format!("{e} during {what}"),
        },
    }
}

/// Two disjoint chunks of `buf`, one to read and one to write.
fn split_pair(buf: &mut [f32], out: Range<usize>, inc: Range<usize>) -> (&[f32], &mut [f32]) {
    if out.end <= inc.start {
        let (lo, hi) = buf.split_at_mut(inc.start);
        (&lo[out], &mut hi[..inc.len()])
    } else {
        let (lo, hi) = buf.split_at_mut(out.start);
        (&hi[..out.len()], &mut lo[inc])
    }
}
