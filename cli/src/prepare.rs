//! `lockstep prepare`: flags → [`lockstep_common::data::prepare`], with a progress bar on a terminal.
//!
//! ```text
//! lockstep prepare --input corpus/ --tokenizer gpt2 --out data/corpus-gpt2
//! lockstep prepare --input a.jsonl b.jsonl --format jsonl --field text --tokenizer bpe:8192 --out data/ab
//! ```
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lockstep_common::data::prepare::{
    DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, InputFormat, InvalidUtf8, Phase, PrepareOptions, PrepareSummary,
    Progress, prepare,
};
use lockstep_common::data::tokenizer::TokenizerSpec;

use crate::error::{Error, Result};

/// Tokenise text or JSONL files into llm.c token shards, with the tokenizer and a manifest, for training.
#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// Text or JSONL files, or directories of them (walked recursively in path order; hidden entries skipped).
    /// Give several after one --input, or repeat it.
    #[arg(long = "input", value_name = "PATH", required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// char (learned from the input), byte, gpt2 (built in), hf:PATH/tokenizer.json, or bpe:VOCAB_SIZE (a
    /// byte-level BPE trained on the input).
    #[arg(long, value_name = "SPEC")]
    pub tokenizer: TokenizerSpec,
    /// The directory to create; it must not exist (see --force). Written as <DIR>.partial-<pid> and renamed when
    /// complete.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// text: each file is one document; jsonl: one JSON object per line, whose --field is a document.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// The JSON field that holds a record's text (--format jsonl) [default: text]. Records without it, or with
    /// an empty one, are skipped and counted.
    #[arg(long, value_name = "NAME")]
    pub field: Option<String>,
    /// Share of the input bytes, from the end, that becomes the validation split; in (0, 1).
    #[arg(long, value_name = "F", default_value_t = DEFAULT_VAL_FRACTION, value_parser = fraction)]
    pub val_fraction: f64,
    /// Most tokens per shard file (llm.c's 100M).
    #[arg(
        long,
        value_name = "N",
        default_value_t = DEFAULT_SHARD_TOKENS,
        value_parser = clap::value_parser!(u64).range(1..=i32::MAX as u64)
    )]
    pub shard_tokens: u64,
    /// Tokenising threads [default: the number of cores]. The output is the same for any number.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub threads: Option<u64>,
    /// fail: stop at the first byte that is not UTF-8, naming the file and byte offset; skip: leave out its line
    /// (text) or record (jsonl) and count it.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = Utf8Mode::Fail)]
    pub invalid_utf8: Utf8Mode,
    /// Replace an existing --out directory, once the new one is complete.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Jsonl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Utf8Mode {
    Fail,
    Skip,
}

/// Runs `lockstep prepare`; the caller prints [`PrepareSummary::line`].
pub fn command(args: &PrepareArgs) -> Result<PrepareSummary> {
    let opts = options(args)?;
    let bar = progress_bar();
    let learning = AtomicBool::new(false);
    let on_progress = |p: &Progress| {
        if bar.length() != Some(p.total_bytes) {
            bar.set_length(p.total_bytes);
        }
        match p.phase {
            Phase::Learn => {
                if !learning.swap(true, Ordering::Relaxed) {
                    bar.set_message("learning the vocabulary");
                }
            }
            Phase::Tokenize => {
                if learning.swap(false, Ordering::Relaxed) {
                    // Second pass over the same bytes.
                    bar.reset();
                }
                let secs = bar.elapsed().as_secs_f64().max(1e-3);
                bar.set_message(format!(
                    "{:.1}M tokens, {:.2}M/s",
                    p.tokens as f64 / 1e6,
                    p.tokens as f64 / 1e6 / secs
                ));
            }
        }
        bar.set_position(p.bytes);
    };
    let summary = prepare(&opts, &on_progress);
    bar.finish_and_clear();
    Ok(summary?)
}

/// The library's options from the flags.
pub fn options(args: &PrepareArgs) -> Result<PrepareOptions> {
    let mut opts = PrepareOptions::new(args.inputs.clone(), args.tokenizer.clone(), args.out.clone());
    opts.format = match args.format {
        Format::Text => InputFormat::Text,
        Format::Jsonl => InputFormat::Jsonl,
    };
    match (&args.field, args.format) {
        (Some(_), Format::Text) => {
            return Err(Error::Usage(
                "--field names the text of a JSON record: use it with --format jsonl".into(),
            ));
        }
        (Some(field), Format::Jsonl) => opts.field = field.clone(),
        (None, _) => {}
    }
    opts.val_fraction = args.val_fraction;
    opts.shard_tokens = args.shard_tokens;
    if let Some(threads) = args.threads {
        // Bounded by the flag's range.
        opts.threads = threads as usize;
    }
    opts.invalid_utf8 = match args.invalid_utf8 {
        Utf8Mode::Fail => InvalidUtf8::Fail,
        Utf8Mode::Skip => InvalidUtf8::Skip,
    };
    opts.force = args.force;
    Ok(opts)
}

/// Bytes read of the total, MB/s and tokens, on stderr when it is a terminal; nothing otherwise.
fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed:>4} {wide_bar} {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("reading");
    bar
}

fn fraction(s: &str) -> std::result::Result<f64, String> {
    let f: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if f > 0.0 && f < 1.0 {
        Ok(f)
    } else {
        Err(format!(
            "{f} is not between 0 and 1 (exclusive): both the training and the validation split need tokens"
        ))
    }
}
