//! One all-reduce message on a ring link: a 32-byte header, then the chunk as f32 little-endian.
//!
//! The header repeats what the receiver already expects (which all-reduce, which step, how long
//! the whole buffer and this chunk are) so that ranks that fell out of step, or disagree on the
//! gradient layout, are reported instead of silently summing the wrong numbers.

use std::io::{self, Read, Write};
use std::net::TcpStream;

const MAGIC: u32 = u32::from_le_bytes(*b"LSAR");
const HEADER_LEN: usize = 32;
/// Bytes per write/read: large enough that syscalls cost nothing next to the copy, small enough
/// that adding the received piece overlaps with the network.
const PIECE_BYTES: usize = 1 << 20;
const PIECE_FLOATS: usize = PIECE_BYTES / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// Which all-reduce on this ring, counting from 1.
    pub op: u64,
    /// Reduce-scatter steps are `0..n-1`, all-gather steps follow.
    pub step: u32,
    pub buf_len: u64,
    pub chunk_len: u64,
}

/// What the receiver does with the incoming chunk.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mode {
    Add,
    Overwrite,
}

#[derive(Debug)]
pub(super) enum FrameError {
    Io(io::Error),
    /// The peer is connected but not where this rank is in the protocol.
    OutOfStep(String),
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.step.to_le_bytes());
        b[8..16].copy_from_slice(&self.op.to_le_bytes());
        b[16..24].copy_from_slice(&self.buf_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.chunk_len.to_le_bytes());
        b
    }

    /// `None` when the bytes are not a frame header at all.
    fn decode(b: &[u8; HEADER_LEN]) -> Option<Self> {
        let (words, _) = b.as_chunks::<4>();
        let (longs, _) = b[8..].as_chunks::<8>();
        if u32::from_le_bytes(words[0]) != MAGIC {
            return None;
        }
        Some(Self {
            step: u32::from_le_bytes(words[1]),
            op: u64::from_le_bytes(longs[0]),
            buf_len: u64::from_le_bytes(longs[1]),
            chunk_len: u64::from_le_bytes(longs[2]),
        })
    }

    /// Why `self` (received) is not `expected`, in words the operator can act on.
    fn mismatch(&self, expected: &Self) -> String {
        if self.op != expected.op {
            format!(
                "is at all-reduce #{} but this rank is at #{}: the ranks called all_reduce a \
                 different number of times",
                self.op, expected.op
            )
        } else if self.buf_len != expected.buf_len {
            format!(
                "reduces a buffer of {} floats but this rank one of {}: the ranks disagree on the \
                 gradient layout (same model and config everywhere?)",
                self.buf_len, expected.buf_len
            )
        } else if self.step != expected.step {
            format!("is at ring step {} but this rank is at {}", self.step, expected.step)
        } else {
            format!(
                "sent a chunk of {} floats, expected {}",
                self.chunk_len, expected.chunk_len
            )
        }
    }
}

/// Sends `header` and `values`, reusing `scratch` for the byte encoding.
pub(super) fn send(mut stream: &TcpStream, header: &Header, values: &[f32], scratch: &mut Vec<u8>) -> io::Result<()> {
    scratch.clear();
    scratch.extend_from_slice(&header.encode());
    for piece in values.chunks(PIECE_FLOATS) {
        let start = scratch.len();
        scratch.resize(start + 4 * piece.len(), 0);
        let (bytes, _) = scratch[start..].as_chunks_mut::<4>();
        for (b, v) in bytes.iter_mut().zip(piece) {
            *b = v.to_le_bytes();
        }
        stream.write_all(scratch)?;
        scratch.clear();
    }
    if !scratch.is_empty() {
        // An empty chunk still sends its header, so every step stays checked.
        stream.write_all(scratch)?;
    }
    Ok(())
}

/// Receives the frame `expected` describes and adds it into, or copies it over, `dest`.
pub(super) fn recv(
    mut stream: &TcpStream,
    expected: &Header,
    dest: &mut [f32],
    mode: Mode,
    scratch: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let mut raw = [0u8; HEADER_LEN];
    stream.read_exact(&mut raw)?;
    let Some(header) = Header::decode(&raw) else {
        return Err(FrameError::OutOfStep(format!(
            "sent {raw:02x?} where an all-reduce frame header was due: the stream is out of sync"
        )));
    };
    if header != *expected {
        return Err(FrameError::OutOfStep(header.mismatch(expected)));
    }
    for piece in dest.chunks_mut(PIECE_FLOATS) {
        scratch.resize(4 * piece.len(), 0);
        stream.read_exact(scratch)?;
        let (values, _) = scratch.as_chunks::<4>();
        match mode {
            Mode::Add => {
                for (d, b) in piece.iter_mut().zip(values) {
                    *d += f32::from_le_bytes(*b);
                }
            }
            Mode::Overwrite => {
                for (d, b) in piece.iter_mut().zip(values) {
                    *d = f32::from_le_bytes(*b);
                }
            }
        }
    }
    Ok(())
}
