//! `lockstep eval`: perplexity of a checkpoint on prepared token data (`--task lm`), or BLEU/chrF/ROUGE/METEOR of
//! what it generates for a JSONL of sources (`--task summarize|translate|chat`), scored by [`crate::score`].
//!
//! ```text
//! lockstep eval --checkpoint runs/shakespeare/checkpoints --data data/shakespeare-char
//! lockstep eval --checkpoint runs/addition-demo/checkpoints --data sums.jsonl --task translate --batch-size 8
//! ```
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use lockstep_common::data::chat::{Message, Role};
use lockstep_worker::decode::{DecodeOptions, decode_all};

use crate::error::{Error, Result};
use crate::sampling_args::{SamplingArgs, SamplingDefaults};
use crate::score::{self, Metric, Options, Report};

pub mod generate;
pub mod lm;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Perplexity on prepared token data.
    Lm,
    /// JSONL of {"source", "reference"}: the checkpoint continues each source.
    Summarize,
    /// JSONL of {"source", "reference"}: the checkpoint continues each source.
    Translate,
    /// JSONL of {"prompt", "reference"}: the prompt is the user's message to a chat model.
    Chat,
}

impl Task {
    /// The JSONL field holding the text the model continues.
    pub fn input_field(self) -> &'static str {
        match self {
            Task::Chat => "prompt",
            _ => "source",
        }
    }
}

/// Evaluate a checkpoint: perplexity on token data, or generation scored against references.
///
/// Generation tasks decode greedily unless --temperature > 0. A chat model (fine-tuned with `data.source = "sft"`)
/// gets each source/prompt as a user message through the chat template and answers until `<|end|>`; any other
/// model continues the source/prompt exactly as written and stops at the end-of-text token or the first token
/// containing a newline (the newline and what follows are dropped: one segment per line). Either way at most
/// --max-new-tokens.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A checkpoint directory (step-NNNNNNNN), or a directory of them (the newest complete one is used).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// lm: a `lockstep prepare` directory (its val split, else train) or llm.c GPT-2 shards; other tasks: a JSONL
    /// file, one {"source"|"prompt": TEXT, "reference": TEXT or [TEXT, ...]} object per line (blank lines are
    /// skipped; several references are scored as `lockstep score` scores several --ref files).
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// What to evaluate. Generation tasks decode greedily unless --temperature > 0. A chat model answers each
    /// source or prompt as a user message (through the chat template) until <|end|>; other models continue it as
    /// written until end-of-text or a newline. At most --max-new-tokens either way.
    #[arg(long, value_enum, default_value_t = Task::Lm)]
    pub task: Task,
    /// Print JSON (with every hypothesis for generation tasks) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Most tokens generated per item.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs<EvalDefaults>,
    /// Seed of sampling; item i samples from its own stream (seed + i), so the batch size never changes the output.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Items decoded together (those with prompts of equal token length share a batch), or lm windows per forward.
    #[arg(long, value_name = "B", default_value_t = 8)]
    pub batch_size: usize,
    /// At most N items (generation) or windows (lm), from the start.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// A WordNet 3.0 dict directory for METEOR's synonym stage [default: /usr/share/wordnet if it exists].
    #[arg(long, value_name = "DIR", env = "LOCKSTEP_WORDNET_DIR")]
    pub wordnet: Option<PathBuf>,
    /// METEOR without WordNet (exact and Porter-stem stages only).
    #[arg(long)]
    pub no_wordnet: bool,
}

/// `lockstep eval` decodes greedily (--temperature 0) unless told otherwise, so the same checkpoint always gets
/// the same scores.
#[derive(Debug, Clone, Copy)]
pub struct EvalDefaults;

impl SamplingDefaults for EvalDefaults {
    const TEMPERATURE: &'static str = "0";
}

/// One line of a generation task's JSONL.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub input: String,
    /// One or more; every metric scores against all of them (see `lockstep score`).
    pub references: Vec<String>,
}

/// What `--json` prints for a generation task.
#[derive(Debug, Serialize)]
pub struct GenerationReport {
    pub task: Task,
    pub checkpoint: PathBuf,
    pub data: PathBuf,
    pub items: usize,
    pub new_tokens: usize,
    pub secs: f64,
    pub tokens_per_sec: f64,
    pub batch_size: usize,
    pub scores: Report,
    pub hypotheses: Vec<String>,
}

/// `lockstep eval`: runs the task and prints its table or JSON to stdout.
pub fn command(args: &EvalArgs) -> Result<()> {
    if args.batch_size == 0 {
        return Err(Error::Usage("--batch-size 0: must be at least 1".into()));
    }
    if args.limit == Some(0) {
        return Err(Error::Usage("--limit 0: must be at least 1".into()));
    }
    let text = match args.task {
        Task::Lm => {
            let r = lm::run(args)?;
            if args.json { to_json(&r)? } else { r.render() }
        }
        _ => {
            let r = run_generation(args)?;
            if args.json {
                to_json(&r)?
            } else {
                format!(
                    "{}{} items, {} new tokens in {:.2} s: {:.1} tokens/s (batch size {}, {})\n",
                    score::render_table(&r.scores),
                    r.items,
                    r.new_tokens,
                    r.secs,
                    r.tokens_per_sec,
                    r.batch_size,
                    r.checkpoint.display()
                )
            }
        }
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(source) => Err(Error::Io {
            context: "cannot write the evaluation to stdout".into(),
            source,
        }),
        Ok(()) => Ok(()),
    }
}

fn to_json(value: &impl Serialize) -> Result<String> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Usage(format!("cannot write JSON: {e}")))?;
    text.push('\n');
    Ok(text)
}

/// Decodes every item of the JSONL and scores the hypotheses with all four metrics.
pub fn run_generation(args: &EvalArgs) -> Result<GenerationReport> {
    let sampling = args.sampling.config()?;
    let mut items = read_jsonl(&args.data, args.task.input_field())?;
    if let Some(limit) = args.limit {
        items.truncate(limit);
    }
    let wordnet = if args.no_wordnet {
        None
    } else {
        score::open_wordnet(args.wordnet.as_deref())?
    };
    let dir = crate::generate::resolve_checkpoint(&args.checkpoint)?;
    let device = candle_core::Device::Cpu;
    let loaded = lockstep_worker::checkpoint::load(&dir, &device)?;
    let field = args.task.input_field();
    // A chat model (fine-tuned through the chat template) is asked as a user and answers until <|end|>; any other
    // model continues the text as written.
    let template = loaded.chat_template();
    let prompts = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |message: String| Error::Jsonl {
                path: args.data.clone(),
                line: i + 1,
                field: field.into(),
                message,
            };
            if item.input.is_empty() && template.is_none() {
                return Err(at("is empty; the model needs at least one token to continue".into()));
            }
            match &template {
                Some(t) => t.prompt(&loaded.tokenizer, &[Message::new(Role::User, item.input.clone())]),
                None => loaded.tokenizer.encode(&item.input),
            }
            .map_err(|e| at(lockstep_common::error::one_line(&e)))
        })
        .collect::<Result<Vec<_>>>()?;
    let model = loaded.model()?;
    let bar = progress_bar(items.len() as u64);
    let opts = DecodeOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        seed: args.seed,
        batch_size: args.batch_size,
    };
    let tok = &loaded.tokenizer;
    let decoded = match &template {
        Some(t) => {
            let stop = |id: u32| t.is_special(id) || Some(id) == tok.eot();
            decode_all(&model, &prompts, &opts, &device, stop, |n| bar.inc(n))?
        }
        None => decode_all(
            &model,
            &prompts,
            &opts,
            &device,
            |id| generate::is_stop(tok, id),
            |n| bar.inc(n),
        )?,
    };
    bar.finish_and_clear();
    let hypotheses: Vec<String> = decoded
        .outputs
        .iter()
        .map(|out| match &template {
            Some(t) => lockstep_worker::sft_eval::reply(t, tok, out),
            None => generate::hypothesis(tok, out),
        })
        .collect();
    let segments: Vec<score::Segment> = hypotheses
        .iter()
        .zip(&items)
        .map(|(hyp, item)| score::Segment {
            hyp: hyp.clone(),
            refs: item.references.clone(),
        })
        .collect();
    let scores = score::score(
        &segments,
        &Options {
            metrics: vec![Metric::Bleu, Metric::Chrf, Metric::Rouge, Metric::Meteor],
            rouge_stem: false,
            wordnet,
        },
    );
    Ok(GenerationReport {
        task: args.task,
        checkpoint: dir,
        data: args.data.clone(),
        items: items.len(),
        new_tokens: decoded.new_tokens,
        secs: decoded.secs,
        tokens_per_sec: decoded.new_tokens as f64 / decoded.secs.max(1e-9),
        batch_size: args.batch_size,
        scores,
        hypotheses,
    })
}

/// The items of a JSONL file: `input_field` (a string) and `reference` (a string, or a non-empty list of them) on every
/// non-blank line. Errors name the
/// file, the 1-based line and the field.
pub fn read_jsonl(path: &Path, input_field: &str) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!(
            "cannot read --data {} (a JSONL file for generation tasks)",
            path.display()
        ),
        source,
    })?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |field: &str, message: String| Error::Jsonl {
            path: path.to_path_buf(),
            line: i + 1,
            field: field.into(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at("the line", format!("is not JSON: {e}")))?;
        let get = |field: &str| -> Result<String> {
            match value.get(field) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(at(field, "must be a string".into())),
                None => Err(at(field, "is missing; every line needs it".into())),
            }
        };
        if !value.is_object() {
            return Err(at("the line", "is not a JSON object".into()));
        }
        items.push(Item {
            input: get(input_field)?,
            references: match value.get("reference") {
                Some(serde_json::Value::Array(list)) if !list.is_empty() => list
                    .iter()
                    .map(|r| r.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| at("reference", "must be a string or a list of strings".into()))?,
                Some(serde_json::Value::Array(_)) => {
                    return Err(at("reference", "is an empty list; give at least one reference".into()));
                }
                _ => vec![get("reference")?],
            },
        });
    }
    if items.is_empty() {
        return Err(Error::Usage(format!(
            "--data {}: no items; give one JSON object per line",
            path.display()
        )));
    }
    Ok(items)
}

/// Items done of the total on stderr when it is a terminal; nothing otherwise.
pub fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_bar} {pos}/{len} {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling_args::test_cli;

    #[test]
    fn decoding_is_greedy_by_default_and_help_says_so() {
        let args = test_cli::parse::<EvalArgs>(&["--checkpoint", "x", "--data", "d.jsonl"]).unwrap();
        assert_eq!(args.sampling.temperature, 0.0);
        assert!(args.sampling.config().unwrap().is_greedy());
        let args = test_cli::parse::<EvalArgs>(&["--checkpoint", "x", "--data", "d", "--top-p", "2"]).unwrap();
        let err = args.sampling.config().unwrap_err().to_string();
        assert!(err.starts_with("--top-p"), "{err}");
        let help = test_cli::help::<EvalArgs>();
        let temperature = test_cli::help_of(&help, "--temperature");
        assert!(temperature.contains("[default: 0]"), "{help}");
        assert!(temperature.contains("0 = greedy (argmax)"), "{help}");
    }

    #[test]
    fn jsonl_errors_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"source\": \"a\", \"reference\": \"b\"}\n\n{\"source\": \"c\"}\n",
        )
        .unwrap();
        let err = read_jsonl(&path, "source").unwrap_err().to_string();
        assert!(
            err.contains("d.jsonl") && err.contains("line 3") && err.contains("reference"),
            "{err}"
        );
        std::fs::write(&path, "{\"source\": 1, \"reference\": \"b\"}\n").unwrap();
        let err = read_jsonl(&path, "source").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("source"), "{err}");
        std::fs::write(&path, "{\"source\": \"a\", \"reference\": []}\n").unwrap();
        let err = read_jsonl(&path, "source").unwrap_err().to_string();
        assert!(err.contains("empty list"), "{err}");
        std::fs::write(&path, "{\"source\": \"a\", \"reference\": [\"b\", 2]}\n").unwrap();
        let err = read_jsonl(&path, "source").unwrap_err().to_string();
        assert!(err.contains("list of strings"), "{err}");
        std::fs::write(&path, "{\"source\": \"a\", \"reference\": [\"b\", \"c\"]}\n").unwrap();
        assert_eq!(read_jsonl(&path, "source").unwrap()[0].references, ["b", "c"]);
        std::fs::write(&path, "{\"prompt\": \"a\", \"reference\": \"b\"}\n").unwrap();
        let items = read_jsonl(&path, "prompt").unwrap();
        assert_eq!(
            items,
            [Item {
                input: "a".into(),
                references: vec!["b".into()]
            }]
        );
    }
}
