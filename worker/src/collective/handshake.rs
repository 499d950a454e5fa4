//! The handshake both ends of a ring link run before any gradient flows: who they are, then proof that both hold
//! the run token (DESIGN §6).
//!
//! Ring listeners outlive generations and listen on the network, so a connection may come from a worker of an
//! older generation, another run, or something that is not a worker at all. Both ends send a hello (magic, protocol
//! version, rank, world size, session, a fresh random nonce) and check the other's. If the identity fits, each sends
//! HMAC-SHA256 of the run token over the OTHER end's nonce, bound to the session, both ranks and which end dialled
//! ([`RunToken::ring_proof`]): the token itself never crosses the wire, a proof cannot be replayed on another
//! connection (fresh nonces), and one end's proof cannot be relayed back as the other's (the role is signed). Each
//! step ends in a verdict, so each side learns why a link was refused instead of seeing a bare disconnect.
//!
//! Wire format, little-endian:
//! 1. hello: `b"LKSTRING"`, version u32, rank u32, world size u32, session length u32, session bytes, nonce (32);
//! 2. identity verdict: reason length u32 (0 = accepted), reason bytes; if accepted, the proof (32 bytes);
//! 3. proof verdict: reason length u32 (0 = accepted), reason bytes.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use lockstep_common::auth::{RING_NONCE_LEN, RING_PROOF_LEN, RingProofContext, RingRole, RunToken, ring_nonce};

const MAGIC: [u8; 8] = *b"LKSTRING";
/// 2: hellos carry a nonce and both ends prove they hold the run token.
pub(super) const PROTOCOL_VERSION: u32 = 2;
pub(super) const MAX_SESSION_LEN: usize = 1024;
const MAX_REASON_LEN: usize = 4096;
/// How long a refusing end waits for the peer's own verdict before hanging up.
const VERDICT_GRACE: Duration = Duration::from_secs(2);

/// What one end says about itself.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hello<'a> {
    pub rank: u32,
    pub world_size: u32,
    pub session: &'a str,
}

#[derive(Debug)]
struct PeerHello {
    rank: u32,
    world_size: u32,
    session: String,
    nonce: [u8; RING_NONCE_LEN],
}

#[derive(Debug)]
pub(super) enum HandshakeError {
    /// One end found the other unfit for this link (identity or token): retrying the same peer cannot help.
    Refused(String),
    /// The connection broke or stayed silent: the peer may simply not be ready yet.
    Io(io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused(why) => f.write_str(why),
            Self::Io(e) => write!(f, "handshake failed: {e}"),
        }
    }
}

impl Hello<'_> {
    pub(super) fn encode(&self, nonce: &[u8; RING_NONCE_LEN]) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.session.len() + RING_NONCE_LEN);
        out.extend_from_slice(&MAGIC);
        for word in [PROTOCOL_VERSION, self.rank, self.world_size, self.session.len() as u32] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(self.session.as_bytes());
        out.extend_from_slice(nonce);
        out
    }
}

/// This end of a link: who it is, the token it proves, and whether it dialled or listened.
#[derive(Debug, Clone, Copy)]
pub(super) struct Local<'a> {
    pub hello: Hello<'a>,
    pub token: &'a RunToken,
    pub role: RingRole,
}

impl Local<'_> {
    fn peer_role(&self) -> RingRole {
        match self.role {
            RingRole::Connector => RingRole::Acceptor,
            RingRole::Acceptor => RingRole::Connector,
        }
    }
}

/// Runs the handshake on a fresh connection, expecting the other end to be `expected_rank`.
pub(super) fn handshake(
    stream: &TcpStream,
    ours: &Local<'_>,
    expected_rank: u32,
    deadline: Instant,
) -> Result<(), HandshakeError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed").into());
    }
    stream.set_read_timeout(Some(remaining))?;
    stream.set_write_timeout(Some(remaining))?;
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "(unknown address)".to_string(), |a| a.to_string());
    let mut s = stream;
    let nonce = ring_nonce();
    s.write_all(&ours.hello.encode(&nonce))?;

    // Who the peer says it is.
    let theirs = match read_hello(&mut s)? {
        Ok(theirs) => theirs,
        Err(why) => return Err(refuse(stream, deadline, why)?),
    };
    if let Err(why) = check(&ours.hello, expected_rank, &theirs) {
        return Err(refuse(stream, deadline, why)?);
    }
    let proof = ours.token.ring_proof(
        &RingProofContext {
            session: ours.hello.session,
            prover_rank: ours.hello.rank,
            prover_role: ours.role,
            verifier_rank: theirs.rank,
        },
        &theirs.nonce,
    );
    let mut accepted = verdict(None);
    accepted.extend_from_slice(&proof);
    s.write_all(&accepted)?;
    if let Some(reason) = read_verdict(&mut s)? {
        return Err(HandshakeError::Refused(format!("refused by the peer: {reason}")));
    }

    // Whether the peer holds the token.
    let mut their_proof = [0u8; RING_PROOF_LEN];
    s.read_exact(&mut their_proof)?;
    let expected = RingProofContext {
        session: ours.hello.session,
        prover_rank: theirs.rank,
        prover_role: ours.peer_role(),
        verifier_rank: ours.hello.rank,
    };
    if !ours.token.verify_ring_proof(&expected, &nonce, &their_proof) {
        let why = format!(
            "ring peer {peer} failed authentication: it does not have this run's token (give every worker the \
             same --token-file or LOCKSTEP_TOKEN)"
        );
        return Err(refuse(stream, deadline, why)?);
    }
    s.write_all(&verdict(None))?;
    match read_verdict(&mut s)? {
        None => Ok(()),
        Some(reason) => Err(HandshakeError::Refused(format!("refused by the peer: {reason}"))),
    }
}

/// Tells the peer why it is refused and returns the refusal. Hanging up with the peer's verdict unread would reset
/// the connection, and the reset can discard the refusal before the peer reads it: the peer's verdict is awaited
/// briefly first.
fn refuse(stream: &TcpStream, deadline: Instant, why: String) -> io::Result<HandshakeError> {
    let mut s = stream;
    s.write_all(&verdict(Some(&why)))?;
    let grace = deadline.saturating_duration_since(Instant::now()).min(VERDICT_GRACE);
    if !grace.is_zero() && stream.set_read_timeout(Some(grace)).is_ok() {
        let _ = read_verdict(&mut s);
    }
    Ok(HandshakeError::Refused(why))
}

/// Outer error: the connection failed. Inner error: the bytes are not a hello we can accept.
fn read_hello(s: &mut impl Read) -> io::Result<Result<PeerHello, String>> {
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic)?;
    if magic != MAGIC {
        return Ok(Err(format!(
            "not a lockstep ring peer (it sent {magic:02x?} instead of the ring magic)"
        )));
    }
    let version = read_u32(s)?;
    if version != PROTOCOL_VERSION {
        return Ok(Err(format!(
            "ring protocol version mismatch: the peer speaks {version}, this worker \
             {PROTOCOL_VERSION} (run the same lockstep version on every worker)"
        )));
    }
    let (rank, world_size, len) = (read_u32(s)?, read_u32(s)?, read_u32(s)? as usize);
    if len > MAX_SESSION_LEN {
        return Ok(Err(format!(
            "session name of {len} bytes (at most {MAX_SESSION_LEN} allowed)"
        )));
    }
    let mut session = vec![0u8; len];
    s.read_exact(&mut session)?;
    let session = String::from_utf8_lossy(&session).into_owned();
    let mut nonce = [0u8; RING_NONCE_LEN];
    s.read_exact(&mut nonce)?;
    Ok(Ok(PeerHello {
        rank,
        world_size,
        session,
        nonce,
    }))
}

fn check(ours: &Hello<'_>, expected_rank: u32, theirs: &PeerHello) -> Result<(), String> {
    if theirs.session != ours.session {
        return Err(format!(
            "session mismatch: rank {} is in {:?} but rank {} is in {:?} \
             (a worker from another run or generation?)",
            ours.rank, ours.session, theirs.rank, theirs.session
        ));
    }
    if theirs.world_size != ours.world_size {
        return Err(format!(
            "world size mismatch: rank {} has {} ranks but rank {} has {}",
            ours.rank, ours.world_size, theirs.rank, theirs.world_size
        ));
    }
    if theirs.rank != expected_rank {
        return Err(format!(
            "rank mismatch: rank {} expected rank {expected_rank} on this link but found rank {} \
             (is the peer list out of date?)",
            ours.rank, theirs.rank
        ));
    }
    Ok(())
}

/// A verdict on the wire: `None` accepts.
pub(super) fn verdict(refusal: Option<&str>) -> Vec<u8> {
    let reason = refusal.map_or(&b""[..], |r| &r.as_bytes()[..r.len().min(MAX_REASON_LEN)]);
    let mut out = (reason.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(reason);
    out
}

/// `None` means accepted.
fn read_verdict(s: &mut impl Read) -> io::Result<Option<String>> {
    let len = read_u32(s)? as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > MAX_REASON_LEN {
        return Ok(Some(format!("(an unreadable refusal of {len} bytes)")));
    }
    let mut reason = vec![0u8; len];
    s.read_exact(&mut reason)?;
    Ok(Some(String::from_utf8_lossy(&reason).into_owned()))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}
