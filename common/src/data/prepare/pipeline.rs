//! The tokenising pipeline: the reader thread cuts the input into units, `threads` workers decode and tokenise
//! them, and the calling thread puts the results back in the reader's order and writes the shards — so the output
//! does not depend on the thread count. Units in flight (read but not yet written) are capped by tickets the
//! writer hands back, so memory stays bounded even when one worker lags.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::bounded;

use super::decode::decode;
use super::read::{Reader, Unit};
use super::sink::SplitSink;
use super::{Phase, Progress};
use crate::data::corpus::Split;
use crate::data::manifest::SplitEntry;
use crate::data::shard::TokenWidth;
use crate::error::{Error, Result};

/// What the pipeline needs of a tokenizer (a trait so that tests can use stand-ins).
pub(super) trait Encoder: Sync {
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Put before every document.
    fn eot(&self) -> u32;
    /// Every id must be below it.
    fn vocab_size(&self) -> usize;
}

/// Where and how to write shards.
pub(super) struct ShardPlan<'a> {
    pub dir: &'a Path,
    pub width: TokenWidth,
    pub shard_tokens: u64,
}

/// What went into the shards.
#[derive(Debug)]
pub(super) struct Written {
    pub train: SplitEntry,
    pub val: SplitEntry,
    pub bytes: u64,
    pub skipped_invalid_utf8: u64,
    pub skipped_empty: u64,
}

/// One tokenised unit.
struct Encoded {
    split: Split,
    bytes: u64,
    /// `(starts a document, ids)` per piece of text.
    pieces: Vec<(bool, Vec<u32>)>,
    skipped_invalid_utf8: u64,
    skipped_empty: u64,
}

/// Tokenises everything `reader` yields on `threads` workers into the shards of `plan`.
pub(super) fn tokenize(
    reader: &Reader<'_>,
    encoder: &dyn Encoder,
    threads: usize,
    plan: &ShardPlan<'_>,
    total_bytes: u64,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Written> {
    let threads = threads.max(1);
    let in_flight = 2 * threads + 2;
    let (unit_tx, unit_rx) = bounded::<Unit>(threads);
    let (done_tx, done_rx) = bounded::<(u64, Result<Encoded>)>(threads);
    let (ticket_tx, ticket_rx) = bounded::<()>(in_flight);
    for _ in 0..in_flight {
        // The channel holds exactly `in_flight` tickets and its receiver is alive.
        let _ = ticket_tx.send(());
    }
    let stop = AtomicBool::new(false);
    let mut out = Output {
        train: SplitSink::new(plan.dir.to_path_buf(), "train", plan.width, plan.shard_tokens),
        val: SplitSink::new(plan.dir.to_path_buf(), "val", plan.width, plan.shard_tokens),
        eot: encoder.eot(),
        doc_pending: false,
        bytes: 0,
        skipped_invalid_utf8: 0,
        skipped_empty: 0,
    };

    let (written, read) = std::thread::scope(|s| {
        let reader_thread = s.spawn(|| {
            let unit_tx = unit_tx;
            let ticket_rx = ticket_rx;
            reader.run(&stop, &mut |unit| {
                ticket_rx.recv().is_ok() && unit_tx.send(unit).is_ok()
            })
        });
        for _ in 0..threads {
            let (unit_rx, done_tx) = (unit_rx.clone(), done_tx.clone());
            s.spawn(move || {
                for unit in unit_rx {
                    let seq = unit.seq;
                    if done_tx.send((seq, encode_unit(unit, reader, encoder))).is_err() {
                        break;
                    }
                }
            });
        }
        drop((unit_rx, done_tx));

        // The writer: results in the reader's order.
        let mut waiting = BTreeMap::new();
        let mut next = 0u64;
        let written = (|| -> Result<()> {
            for (seq, result) in &done_rx {
                waiting.insert(seq, result);
                while let Some(result) = waiting.remove(&next) {
                    next += 1;
                    out.write(result?)?;
                    // Back to the reader: one more unit may be in flight.
                    let _ = ticket_tx.send(());
                    progress(&Progress {
                        phase: Phase::Tokenize,
                        bytes: out.bytes,
                        total_bytes,
                        tokens: out.train.tokens() + out.val.tokens(),
                    });
                }
            }
            Ok(())
        })();
        if written.is_err() {
            // Unblock and stop the reader and the workers.
            stop.store(true, Ordering::Relaxed);
        }
        drop((done_rx, ticket_tx, waiting));
        let read = reader_thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (written, read)
    });
    // A result error comes from a unit read before anything the reader failed on.
    written?;
    read?;
    out.finish()
}

/// Decodes and tokenises one unit.
fn encode_unit(unit: Unit, reader: &Reader<'_>, encoder: &dyn Encoder) -> Result<Encoded> {
    let path = &reader.files[unit.file].path;
    let (split, bytes, offset) = (unit.split, unit.bytes.len() as u64, unit.offset);
    let decoded = decode(unit, path, reader.opts)?;
    let vocab = encoder.vocab_size();
    let pieces = decoded
        .pieces
        .into_iter()
        .map(|piece| {
            let at = |message: String| Error::Data {
                path: path.clone(),
                message: format!("the text from byte offset {offset}: {message}"),
            };
            let ids = encoder.encode(&piece.text).map_err(|e| at(e.to_string()))?;
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(at(format!(
                    "the tokenizer produced id {bad}, outside its vocabulary of {vocab} ids; the tokenizer is \
                     inconsistent — use another one"
                )));
            }
            Ok((piece.starts_doc, ids))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Encoded {
        split,
        bytes,
        pieces,
        skipped_invalid_utf8: decoded.skipped_invalid_utf8,
        skipped_empty: decoded.skipped_empty,
    })
}

/// The writer's state.
struct Output {
    train: SplitSink,
    val: SplitSink,
    eot: u32,
    /// A document has started but none of its text has been written yet (its end-of-text id goes before the first
    /// token it has; a document whose every line was left out has none).
    doc_pending: bool,
    bytes: u64,
    skipped_invalid_utf8: u64,
    skipped_empty: u64,
}

impl Output {
    fn write(&mut self, unit: Encoded) -> Result<()> {
        self.bytes += unit.bytes;
        self.skipped_invalid_utf8 += unit.skipped_invalid_utf8;
        self.skipped_empty += unit.skipped_empty;
        let sink = match unit.split {
            Split::Train => &mut self.train,
            Split::Val => &mut self.val,
        };
        for (starts_doc, ids) in unit.pieces {
            self.doc_pending |= starts_doc;
            if ids.is_empty() {
                continue;
            }
            if self.doc_pending {
                sink.push(&[self.eot])?;
                sink.count_document();
                self.doc_pending = false;
            }
            sink.push(&ids)?;
        }
        Ok(())
    }

    fn finish(self) -> Result<Written> {
        Ok(Written {
            train: self.train.finish()?,
            val: self.val.finish()?,
            bytes: self.bytes,
            skipped_invalid_utf8: self.skipped_invalid_utf8,
            skipped_empty: self.skipped_empty,
        })
    }
}
