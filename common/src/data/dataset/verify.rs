//! The full check of a directory's shards: one pass over every byte computes each shard's SHA-256 and finds the
//! first token id outside the vocabulary. Shards are checked on parallel threads; the error reported is the one of
//! the first bad shard in directory order, whatever thread found it.
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

use crate::data::dataset::tokens::MappedShard;
use crate::data::shard::{HEADER_BYTES, TokenWidth};
use crate::error::{Error, Result};

/// Bytes hashed and scanned at a time: small enough to stay in cache between the two.
const CHUNK: usize = 1 << 20;

/// One shard to check: the shard, and the SHA-256 (hex) the manifest gives for it, if any.
pub struct Check<'a> {
    pub shard: &'a MappedShard,
    pub sha256: Option<&'a str>,
}

/// Checks every shard: its SHA-256 against the expected one, and every token id below `vocab_size`.
pub fn verify_all(checks: &[Check<'_>], vocab_size: usize) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(checks.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, Result<()>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(c) = checks.get(i) else { break };
                        done.push((i, verify_shard(c.shard, c.sha256, vocab_size)));
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            // A panic here is a bug, not bad input: pass it on.
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().try_for_each(|(_, r)| r)
}

/// One shard: SHA-256 of the whole file and the first token id ≥ `vocab_size`. A checksum mismatch is reported
/// first (the file is not the one prepared); a bad id in a file whose checksum matches means the directory was
/// prepared with another tokenizer.
pub fn verify_shard(shard: &MappedShard, sha256: Option<&str>, vocab_size: usize) -> Result<()> {
    let bytes = shard.bytes();
    let width = shard.header().width;
    let w = width.bytes() as usize;
    let limit = u32::try_from(vocab_size).unwrap_or(u32::MAX);
    let mut hasher = Sha256::new();
    let mut first_bad: Option<(usize, u32)> = None;
    hasher.update(&bytes[..HEADER_BYTES.min(bytes.len())]);
    let body = bytes.get(HEADER_BYTES..).unwrap_or_default();
    for (c, chunk) in body.chunks(CHUNK).enumerate() {
        if sha256.is_some() {
            hasher.update(chunk);
        }
        if first_bad.is_none()
            && let Some(found) = first_at_or_above(chunk, width, limit)
        {
            first_bad = Some((HEADER_BYTES + c * CHUNK + found.0 * w, found.1));
        }
        if first_bad.is_some() && sha256.is_none() {
            break;
        }
    }
    let data_err = |message: String| Error::Data {
        path: shard.path().to_path_buf(),
        message,
    };
    if let Some(want) = sha256 {
        let got = hex::encode(hasher.finalize());
        if !got.eq_ignore_ascii_case(want) {
            let also = first_bad.map_or(String::new(), |(offset, id)| {
                format!(" (and token id {id} at byte offset {offset} is outside the vocabulary)")
            });
            return Err(data_err(format!(
                "checksum mismatch: SHA-256 {got}, manifest.json says {want}{also}; the shard was modified or \
                 damaged — re-run lockstep prepare"
            )));
        }
    }
    if let Some((offset, id)) = first_bad {
        return Err(data_err(format!(
            "token id {id} at byte offset {offset} is not below the tokenizer's vocabulary of {vocab_size}; the \
             shard was written with another tokenizer — prepare it again with this one, or name the right one in \
             data.tokenizer"
        )));
    }
    Ok(())
}

/// The index and value of the first token id ≥ `limit` in `chunk` (whole tokens: chunks start on a token boundary).
fn first_at_or_above(chunk: &[u8], width: TokenWidth, limit: u32) -> Option<(usize, u32)> {
    match width {
        TokenWidth::U16 => chunk
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .enumerate()
            .find(|&(_, id)| id >= limit),
        TokenWidth::U32 => chunk
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .enumerate()
            .find(|&(_, id)| id >= limit),
    }
}
