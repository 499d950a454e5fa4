//! The tokenizer for a run: built from its spec, after a first pass over the input for one that learns its
//! vocabulary (`char`, `bpe:N`), which sees the same text as the tokenising pass (the same units, the same UTF-8
//! skipping).
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use crossbeam_channel::{Receiver, bounded};

use super::decode::decode;
use super::pipeline::Encoder;
use super::read::{Reader, Unit};
use super::{Phase, Progress};
use crate::data::tokenizer::{Tokenizer, TokenizerSpec};
use crate::error::{Error, Result};

/// Builds the tokenizer `spec` names, streaming the input through it if it learns from the corpus.
pub(super) fn train(
    spec: &TokenizerSpec,
    reader: &Reader<'_>,
    total_bytes: u64,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Tokenizer> {
    if !spec.is_trained() {
        return Tokenizer::train(spec, std::iter::empty());
    }
    let failed = Mutex::new(None);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (tx, rx) = bounded::<Unit>(2);
        let reader_thread = s.spawn(|| {
            let tx = tx;
            reader.run(&stop, &mut |unit| tx.send(unit).is_ok())
        });
        let texts = Texts {
            units: rx,
            reader,
            queue: VecDeque::new(),
            failed: &failed,
            bytes: 0,
            total_bytes,
            progress,
        };
        // `texts` is dropped when training returns, which stops the reader if it has not finished.
        let trained = Tokenizer::train(spec, texts);
        let read = reader_thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        if let Some(e) = failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        read?;
        trained
    })
}

/// The documents' text, unit by unit; stops at the first error, which it leaves in `failed`.
struct Texts<'a> {
    units: Receiver<Unit>,
    reader: &'a Reader<'a>,
    queue: VecDeque<String>,
    failed: &'a Mutex<Option<Error>>,
    bytes: u64,
    total_bytes: u64,
    progress: &'a (dyn Fn(&Progress) + Sync),
}

impl Iterator for Texts<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(text) = self.queue.pop_front() {
                return Some(text);
            }
            let unit = self.units.recv().ok()?;
            self.bytes += unit.bytes.len() as u64;
            let path = &self.reader.files[unit.file].path;
            match decode(unit, path, self.reader.opts) {
                Ok(decoded) => self.queue.extend(decoded.pieces.into_iter().map(|p| p.text)),
                Err(e) => {
                    *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    return None;
                }
            }
            (self.progress)(&Progress {
                phase: Phase::Learn,
                bytes: self.bytes,
                total_bytes: self.total_bytes,
                tokens: 0,
            });
        }
    }
}

/// A [`Tokenizer`] for the pipeline, with its end-of-text id checked.
pub(super) struct TokenizerEncoder<'t> {
    tokenizer: &'t Tokenizer,
    eot: u32,
}

impl<'t> TokenizerEncoder<'t> {
    pub fn new(tokenizer: &'t Tokenizer, spec: &TokenizerSpec) -> Result<Self> {
        let eot = tokenizer.eot().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{spec}: {} has no end-of-text token to put between documents",
                tokenizer.describe()
            ))
        })?;
        if eot as usize >= tokenizer.vocab_size() {
            return Err(Error::Tokenizer(format!(
                "{spec}: end-of-text id {eot} is outside the vocabulary of {} ids",
                tokenizer.vocab_size()
            )));
        }
        Ok(TokenizerEncoder { tokenizer, eot })
    }
}

impl Encoder for TokenizerEncoder<'_> {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text)
    }

    fn eot(&self) -> u32 {
        self.eot
    }

    fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }
}
