//! `lockstep prepare`: text or JSONL files → a prepared directory: llm.c token shards (`train_000000.bin`, …,
//! `val_000000.bin`, …; [`crate::data::shard`]), the tokenizer (`tokenizer.json`) and `manifest.json`
//! ([`crate::data::manifest`]).
//!
//! - **Streaming, bounded memory.** A reader thread cuts the files, in order, into units of about
//!   [`ChunkLimits::target`] bytes: chunks of a text file (`chunk.rs` says where they are cut, so that GPT-2-style
//!   BPE gives the ids of the whole file) or runs of whole JSONL records. `threads` workers decode and tokenise
//!   units; the writer puts them back in order and streams them into shards. Memory does not grow with the files
//!   or the shards (only a JSONL record is held whole), and the output is byte-identical whatever the thread count.
//! - **Documents.** A text file is one document; a JSONL record's `field` string is one. The tokenizer's
//!   end-of-text id goes before every document.
//! - **Split.** Validation is the tail of the input: units starting at or after byte ⌈(1 − val_fraction) ·
//!   input bytes⌉ of the files end to end (a text chunk is cut there, or at the first cut point after it).
//! - **A tokenizer that learns its vocabulary** (`char`, `bpe:N`) gets a first pass over the same text.
//! - **Commit.** Everything is written to `<out>.partial-<pid>` and renamed to `<out>` when complete, manifest last;
//!   on an error nothing is left (`output.rs`).
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::data::manifest::{FORMAT, Manifest, SourceEntry, TOKENIZER_FILE, TokenizerEntry};
use crate::data::shard::{TokenWidth, sha256_file, thousands};
use crate::data::tokenizer::TokenizerSpec;
use crate::error::{Error, Result};

mod chunk;
mod decode;
mod inputs;
mod learn;
mod output;
mod pipeline;
mod read;
mod sink;
#[cfg(test)]
mod tests;

/// Default share of the input bytes (the tail) that becomes the validation split.
pub const DEFAULT_VAL_FRACTION: f64 = 0.01;
/// Default most tokens per shard: llm.c's.
pub const DEFAULT_SHARD_TOKENS: u64 = 100_000_000;

/// What to prepare, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareOptions {
    /// Files, and directories walked recursively (sorted by path; hidden entries skipped).
    pub inputs: Vec<PathBuf>,
    pub tokenizer: TokenizerSpec,
    /// The directory to create.
    pub out: PathBuf,
    pub format: InputFormat,
    /// The JSON field holding a document's text (`jsonl`).
    pub field: String,
    /// Share of the input bytes, in (0, 1), that becomes the validation split.
    pub val_fraction: f64,
    /// Most tokens per shard, 1 to `i32::MAX`.
    pub shard_tokens: u64,
    /// Tokenising workers (at least 1).
    pub threads: usize,
    pub invalid_utf8: InvalidUtf8,
    /// Replace an existing `out` (once the new one is complete).
    pub force: bool,
    pub chunk: ChunkLimits,
}

impl PrepareOptions {
    /// The defaults: text files, field `text`, [`DEFAULT_VAL_FRACTION`], [`DEFAULT_SHARD_TOKENS`], one worker per
    /// core, invalid UTF-8 is an error, an existing `out` is refused.
    pub fn new(inputs: Vec<PathBuf>, tokenizer: TokenizerSpec, out: PathBuf) -> Self {
        PrepareOptions {
            inputs,
            tokenizer,
            out,
            format: InputFormat::Text,
            field: "text".into(),
            val_fraction: DEFAULT_VAL_FRACTION,
            shard_tokens: DEFAULT_SHARD_TOKENS,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            invalid_utf8: InvalidUtf8::Fail,
            force: false,
            chunk: ChunkLimits::default(),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, value: String, reason: &str| {
            Err(Error::Invalid {
                field,
                value,
                reason: reason.into(),
            })
        };
        if self.inputs.is_empty() {
            return bad(
                "prepare.inputs",
                "[]".into(),
                "give at least one file or directory (--input)",
            );
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return bad(
                "prepare.val_fraction",
                self.val_fraction.to_string(),
                "must be in (0, 1): both splits need tokens",
            );
        }
        if !(1..=i32::MAX as u64).contains(&self.shard_tokens) {
            return bad(
                "prepare.shard_tokens",
                self.shard_tokens.to_string(),
                "must be between 1 and 2,147,483,647 (a shard header's count is an i32)",
            );
        }
        if self.threads == 0 {
            return bad("prepare.threads", "0".into(), "must be at least 1");
        }
        if self.format == InputFormat::Jsonl && self.field.is_empty() {
            return bad(
                "prepare.field",
                String::new(),
                "name the JSON field that holds the text",
            );
        }
        if self.chunk.target == 0 || self.chunk.max <= self.chunk.target {
            return bad("prepare.chunk", format!("{:?}", self.chunk), "needs 0 < target < max");
        }
        Ok(())
    }
}

/// How the input files are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// Each file is one document.
    Text,
    /// One JSON object per line; each record's field is one document.
    Jsonl,
}

impl InputFormat {
    pub fn name(self) -> &'static str {
        match self {
            InputFormat::Text => "text",
            InputFormat::Jsonl => "jsonl",
        }
    }
}

/// What to do with input that is not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidUtf8 {
    /// Stop with an error naming the file and byte offset.
    Fail,
    /// Leave out the line (text) or record (JSONL), and count it. A text line that a chunk boundary cuts (only one
    /// longer than [`ChunkLimits::max`], or at the split) is left out only in the chunk that holds the bad byte.
    Skip,
}

/// Units of work. A text chunk ends at the first cut point at or after `target` bytes; kinds of cut point other
/// than a line start are used only if no line start comes within `max` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    pub target: usize,
    pub max: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            target: 1 << 20,
            max: 8 << 20,
        }
    }
}

/// Where a run is, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    /// Input bytes done in this phase.
    pub bytes: u64,
    pub total_bytes: u64,
    /// Tokens written so far.
    pub tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The first pass of a tokenizer that learns its vocabulary from the corpus.
    Learn,
    /// Tokenising and writing shards.
    Tokenize,
}

/// What [`prepare`] made.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareSummary {
    /// The complete directory.
    pub out: PathBuf,
    pub manifest: Manifest,
    /// `Tokenizer::describe`.
    pub tokenizer: String,
    pub elapsed: Duration,
}

impl PrepareSummary {
    /// One line: documents, tokens and shards per split, skipped input, throughput.
    pub fn line(&self) -> String {
        let m = &self.manifest;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let split = |name: &str, s: &crate::data::manifest::SplitEntry| {
            format!(
                "{name} {} in {}",
                count(s.tokens, "token"),
                count(s.shards.len() as u64, "shard")
            )
        };
        let (bad, empty) = if m.source.format == "jsonl" {
            (("record", " not UTF-8"), ("record", " without text"))
        } else {
            (("line", " not UTF-8"), ("empty file", ""))
        };
        let skipped: Vec<String> = [(m.source.skipped_invalid_utf8, bad), (m.source.skipped_empty, empty)]
            .into_iter()
            .filter(|&(n, _)| n > 0)
            .map(|(n, (what, why))| format!("{}{why}", count(n, what)))
            .collect();
        let skipped = if skipped.is_empty() {
            String::new()
        } else {
            format!("; skipped {}", skipped.join(", "))
        };
        format!(
            "prepared {} in {secs:.1} s: {} from {} ({:.1} MB), {}; {}, {}{skipped}; {:.1} MB/s, {} tokens/s",
            self.out.display(),
            count(m.train.documents + m.val.documents, "document"),
            count(m.source.files, "file"),
            m.source.bytes as f64 / 1e6,
            self.tokenizer,
            split("train", &m.train),
            split("val", &m.val),
            m.source.bytes as f64 / 1e6 / secs,
            thousands(((m.train.tokens + m.val.tokens) as f64 / secs) as u64),
        )
    }
}

/// `3 files`, `1 file`, `1,000 tokens`.
fn count(n: u64, what: &str) -> String {
    format!("{} {what}{}", thousands(n), if n == 1 { "" } else { "s" })
}

/// Prepares `opts.inputs` into `opts.out`, calling `progress` as input is read (from the calling thread or the
/// reader's). On an error nothing is left at `opts.out` (an existing one is untouched).
pub fn prepare(opts: &PrepareOptions, progress: &(dyn Fn(&Progress) + Sync)) -> Result<PrepareSummary> {
    let started = Instant::now();
    opts.validate()?;
    let files = inputs::resolve(&opts.inputs)?;
    let staging = output::Staging::create(&opts.out, opts.force)?;
    let total_bytes: u64 = files.iter().map(|f| f.bytes).sum();
    let split_at = ((1.0 - opts.val_fraction) * total_bytes as f64).ceil() as u64;
    let reader = read::Reader {
        files: &files,
        opts,
        split_at,
    };

    let tokenizer = learn::train(&opts.tokenizer, &reader, total_bytes, progress)?;
    let encoder = learn::TokenizerEncoder::new(&tokenizer, &opts.tokenizer)?;
    let tokenizer_path = staging.dir().join(TOKENIZER_FILE);
    tokenizer.save(&tokenizer_path)?;
    let plan = pipeline::ShardPlan {
        dir: staging.dir(),
        width: TokenWidth::for_vocab(tokenizer.vocab_size()),
        shard_tokens: opts.shard_tokens,
    };
    let written = pipeline::tokenize(&reader, &encoder, opts.threads, &plan, total_bytes, progress)?;
    check_splits(opts, &written, split_at)?;

    let manifest = Manifest {
        format: FORMAT.into(),
        tokenizer: TokenizerEntry {
            spec: opts.tokenizer.to_string(),
            file: TOKENIZER_FILE.into(),
            sha256: sha256_file(&tokenizer_path)?,
            vocab_size: tokenizer.vocab_size(),
            eot: pipeline::Encoder::eot(&encoder),
        },
        train: written.train,
        val: written.val,
        source: SourceEntry {
            inputs: opts.inputs.iter().map(|p| p.display().to_string()).collect(),
            files: files.len() as u64,
            format: opts.format.name().into(),
            field: (opts.format == InputFormat::Jsonl).then(|| opts.field.clone()),
            bytes: written.bytes,
            val_fraction: opts.val_fraction,
            skipped_invalid_utf8: written.skipped_invalid_utf8,
            skipped_empty: written.skipped_empty,
        },
    };
    manifest.save(staging.dir())?;
    staging.commit()?;
    Ok(PrepareSummary {
        out: opts.out.clone(),
        manifest,
        tokenizer: tokenizer.describe(),
        elapsed: started.elapsed(),
    })
}

/// Both splits need tokens; says what to change when one has none.
fn check_splits(opts: &PrepareOptions, w: &pipeline::Written, split_at: u64) -> Result<()> {
    let err = |message: String| {
        Err(Error::Data {
            path: inputs::label(&opts.inputs),
            message,
        })
    };
    let skipped = match (w.skipped_empty, w.skipped_invalid_utf8) {
        (0, 0) => String::new(),
        (e, u) => format!(" ({e} empty and {u} not UTF-8 left out)"),
    };
    if w.train.documents + w.val.documents == 0 {
        return err(format!(
            "no documents in {} bytes of input{skipped}; give files with text{}",
            thousands(w.bytes),
            if opts.format == InputFormat::Jsonl {
                format!(", and records whose {:?} field holds it (--field)", opts.field)
            } else {
                String::new()
            }
        ));
    }
    if w.train.tokens == 0 {
        return err(format!(
            "the training split is empty: every document is in the validation split; lower --val-fraction (now {})",
            opts.val_fraction
        ));
    }
    if w.val.tokens == 0 {
        let why = match opts.format {
            InputFormat::Jsonl => "no record starts after it (records are never split)",
            InputFormat::Text => "the input after it holds no text",
        };
        return err(format!(
            "the validation split is empty: it starts at byte {} of {} and {why}; raise --val-fraction (now {}) or \
             add input",
            thousands(split_at),
            thousands(w.bytes),
            opts.val_fraction
        ));
    }
    Ok(())
}
