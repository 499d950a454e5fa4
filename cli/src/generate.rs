//! `lockstep generate`: continue a prompt with a trained checkpoint, streaming the text to stdout as it is sampled
//! (KV-cached decoding, `lockstep_worker::generate`).
//!
//! ```text
//! lockstep generate --checkpoint runs/addition-2digit/checkpoints --prompt "12+34=" --temperature 0
//! lockstep generate --checkpoint ckpts/step-00005000 --prompt "ROMEO:" --top-k 40 --seed 7
//! ```
//!
//! stdout carries only the text: the prompt, the continuation, a newline. A one-line summary goes to stderr.
//! Without `--seed` the seed comes from the clock and the summary prints it, so any run can be repeated.
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::Device;
use lockstep_common::data::Tokenizer;
pub use lockstep_common::data::tokenizer::TextStream;
use lockstep_worker::checkpoint;
use lockstep_worker::generate::{Generator, generate};
use lockstep_worker::sampling::Sampler;

use crate::error::{Error, Result};
use crate::sampling_args::{SamplingArgs, SamplingDefaults};

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// A checkpoint directory (step-NNNNNNNN), or a directory of them such as the run's checkpoint.dir (the newest
    /// complete one is used).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The text to continue; printed first.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate. Past the model's block size, generation goes on over the last block_size tokens.
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs<GenerateDefaults>,
    /// Seed of the sampling stream (default: from the clock; the summary on stderr prints it).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `lockstep generate` samples at --temperature 0.8: varied text that still follows the prompt.
#[derive(Debug, Clone, Copy)]
pub struct GenerateDefaults;

impl SamplingDefaults for GenerateDefaults {
    const TEMPERATURE: &'static str = "0.8";
}

/// What a generation did, for the summary line.
#[derive(Debug, Clone)]
pub struct Summary {
    pub checkpoint: PathBuf,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// From the first forward (the prompt's) to the last token.
    pub secs: f64,
    pub seed: u64,
}

impl Summary {
    pub fn line(&self) -> String {
        format!(
            "{} tokens in {:.2} s ({:.1} tokens/s; prompt {} tokens, seed {}, {})",
            self.new_tokens,
            self.secs,
            self.new_tokens as f64 / self.secs.max(1e-9),
            self.prompt_tokens,
            self.seed,
            self.checkpoint.display()
        )
    }
}

/// `lockstep generate`: streams to stdout, prints the summary to stderr.
pub fn command(args: &GenerateArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let summary = run(args, &mut stdout.lock())?;
    eprintln!("{}", summary.line());
    Ok(())
}

/// Generates as `args` say, writing the prompt and then each piece of text to `out` as soon as it is known (and
/// flushing it). A closed `out` (e.g. `| head`) ends the generation quietly.
pub fn run(args: &GenerateArgs, out: &mut impl Write) -> Result<Summary> {
    let sampling = args.sampling.config()?;
    let seed = args.seed.unwrap_or_else(clock_seed);
    let dir = resolve_checkpoint(&args.checkpoint)?;
    let device = Device::Cpu;
    let loaded = checkpoint::load(&dir, &device)?;
    let prompt = encode_prompt(&loaded.tokenizer, &args.prompt)?;
    let model = loaded.model()?;
    let mut sink = Sink {
        out,
        closed: false,
        what: "the generated text",
    };
    sink.write(&args.prompt)?;

    let started = Instant::now();
    let mut generator = Generator::new(&model, std::slice::from_ref(&prompt), &device)?;
    let mut sampler = Sampler::new(sampling, seed)?;
    let mut text = TextStream::new(&loaded.tokenizer);
    let new = generate(&mut generator, &mut sampler, args.max_new_tokens, |token| {
        sink.write(&text.push(token))?;
        Ok(if sink.closed {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    })?;
    let secs = started.elapsed().as_secs_f64();
    sink.write(&(text.finish() + "\n"))?;
    Ok(Summary {
        checkpoint: dir,
        prompt_tokens: prompt.len(),
        new_tokens: new.len(),
        secs,
        seed,
    })
}

/// `out`, flushed after every write; remembers a closed pipe (e.g. `| head`) instead of failing on it. `what` names
/// the text in an error ("the generated text").
pub(crate) struct Sink<'a, W: Write> {
    pub out: &'a mut W,
    pub closed: bool,
    pub what: &'static str,
}

impl<W: Write> Sink<'_, W> {
    pub fn write(&mut self, text: &str) -> lockstep_worker::error::Result<()> {
        if self.closed || text.is_empty() {
            return Ok(());
        }
        match self.out.write_all(text.as_bytes()).and_then(|()| self.out.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            Err(source) => Err(lockstep_worker::Error::Io {
                context: format!("write {} to stdout", self.what),
                source,
            }),
        }
    }
}

/// A sampling seed from the clock, for runs without `--seed` (which print it, so they can be repeated).
pub(crate) fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `path` itself if it is a checkpoint (has a manifest), else the newest complete checkpoint inside it.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Err(Error::Usage(format!(
            "--checkpoint {}: no such directory",
            path.display()
        )));
    }
    if path.join(checkpoint::MANIFEST_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    checkpoint::newest(path)?.ok_or_else(|| {
        Error::Usage(format!(
            "--checkpoint {}: neither a checkpoint (no {}) nor a directory holding a complete step-* checkpoint",
            path.display(),
            checkpoint::MANIFEST_FILE
        ))
    })
}

/// The prompt's token ids; the error names the first character the checkpoint's vocabulary lacks (a char tokenizer
/// knows only the characters of its training corpus).
pub fn encode_prompt(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Usage("--prompt is empty: give at least one character".into()));
    }
    tokenizer
        .encode(prompt)
        .map_err(|e| Error::Usage(format!("--prompt: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling_args::test_cli;
    use lockstep_common::spec::TokenizerSpec;

    #[test]
    fn unknown_prompt_character_is_named_with_the_vocabulary() {
        let tok = Tokenizer::for_text(&TokenizerSpec::Char, "0123456789+=\n").unwrap();
        assert_eq!(encode_prompt(&tok, "12+3=").unwrap(), tok.encode("12+3=").unwrap());
        let err = encode_prompt(&tok, "12-3").unwrap_err().to_string();
        assert!(err.starts_with("--prompt") && err.contains("'-'"), "{err}");
        assert!(err.contains("13 characters") && err.contains("corpus"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(encode_prompt(&tok, "").unwrap_err().to_string().contains("--prompt"));
        let byte = Tokenizer::for_text(&TokenizerSpec::Byte, "").unwrap();
        assert_eq!(encode_prompt(&byte, "é").unwrap(), [0xc3, 0xa9]);
    }

    #[test]
    fn temperature_defaults_to_0_8_and_help_says_so() {
        let args = test_cli::parse::<GenerateArgs>(&["--checkpoint", "x", "--prompt", "a"]).unwrap();
        assert_eq!(args.sampling.temperature, 0.8);
        assert!(!args.sampling.config().unwrap().is_greedy());
        let args = test_cli::parse::<GenerateArgs>(&["--checkpoint", "x", "--prompt", "a", "--top-k", "0"]).unwrap();
        let err = args.sampling.config().unwrap_err().to_string();
        assert!(err.starts_with("--top-k"), "{err}");
        let help = test_cli::help::<GenerateArgs>();
        let temperature = test_cli::help_of(&help, "--temperature");
        assert!(temperature.contains("[default: 0.8]"), "{help}");
        assert!(temperature.contains("0 = greedy (argmax)"), "{help}");
    }

    #[test]
    fn checkpoint_path_must_be_a_checkpoint_or_hold_one() {
        let root = tempfile::tempdir().unwrap();
        let err = resolve_checkpoint(&root.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("--checkpoint") && err.contains("nope"), "{err}");
        let err = resolve_checkpoint(root.path()).unwrap_err().to_string();
        assert!(err.contains("step-*"), "{err}");
        // A step directory without a manifest is not complete, so it is not picked.
        std::fs::create_dir(root.path().join("step-00000001")).unwrap();
        assert!(resolve_checkpoint(root.path()).is_err());
        std::fs::write(root.path().join("step-00000001/manifest.json"), "{}").unwrap();
        assert_eq!(
            resolve_checkpoint(root.path()).unwrap(),
            root.path().join("step-00000001")
        );
        let step = root.path().join("step-00000001");
        assert_eq!(resolve_checkpoint(&step).unwrap(), step);
    }
}
