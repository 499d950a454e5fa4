//! `lockstep eval --task lm`: the mean cross-entropy per target token over fixed, non-overlapping windows of the
//! model's block size (as training cuts them, `Windows`), and its exponential, the perplexity.
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use lockstep_common::data::dataset::{Dataset, Layout, Windows};
use lockstep_common::spec::{DataVerify, TokenizerSpec};
use lockstep_worker::checkpoint;
use lockstep_worker::model::cross_entropy_sum;
use serde::Serialize;

use super::{EvalArgs, progress_bar};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct LmReport {
    pub task: &'static str,
    pub checkpoint: PathBuf,
    pub data: PathBuf,
    /// "val", or "train" when the data has no validation split.
    pub split: &'static str,
    pub windows: u64,
    /// Target tokens scored.
    pub tokens: u64,
    /// Mean cross-entropy per target token, in nats.
    pub loss: f64,
    pub perplexity: f64,
    pub secs: f64,
}

impl LmReport {
    pub fn render(&self) -> String {
        format!(
            "loss {:.4}  perplexity {:.3}  ({} windows, {} tokens of the {} split of {}, {:.2} s; {})\n",
            self.loss,
            self.perplexity,
            self.windows,
            self.tokens,
            self.split,
            self.data.display(),
            self.secs,
            self.checkpoint.display()
        )
    }
}

pub fn run(args: &EvalArgs) -> Result<LmReport> {
    let dir = crate::generate::resolve_checkpoint(&args.checkpoint)?;
    let device = Device::Cpu;
    let loaded = checkpoint::load(&dir, &device)?;
    // llm.c shards do not name their tokenizer; Lockstep reads them as GPT-2's (the tokenizer check below then
    // refuses any other checkpoint).
    let llmc = !args.data.join(lockstep_common::data::manifest::MANIFEST_FILE).exists();
    let spec = llmc.then_some(TokenizerSpec::Gpt2);
    let data = Dataset::open(&args.data, spec.as_ref(), DataVerify::Sizes)?;
    if data.tokenizer != loaded.tokenizer {
        return Err(Error::Usage(format!(
            "--data {} was tokenised with {}{}, but the checkpoint {} uses {}: evaluate on data prepared with the \
             checkpoint's tokenizer",
            args.data.display(),
            data.tokenizer.describe(),
            if data.layout == Layout::LlmC {
                " (llm.c shards are read as GPT-2's)"
            } else {
                ""
            },
            dir.display(),
            loaded.tokenizer.describe()
        )));
    }
    let (split, shards) = if data.val.iter().any(|s| !s.is_empty()) {
        ("val", data.val)
    } else {
        ("train", data.train)
    };
    let model = loaded.model()?;
    let block = model.config().block_size;
    let vocab = model.config().vocab_size;
    let windows = Windows::new(shards, block, &args.data);
    let count = args.limit.map_or(windows.len(), |l| windows.len().min(l as u64));
    if count == 0 {
        return Err(Error::Usage(format!(
            "--data {}: its {split} split has {} tokens, fewer than one window of {} (the model's block size + 1)",
            args.data.display(),
            windows.tokens(),
            block + 1
        )));
    }
    let bar = progress_bar(count);
    let started = std::time::Instant::now();
    let (mut sum, mut tokens) = (0f64, 0u64);
    let mut start = 0u64;
    while start < count {
        let n = (count - start).min(args.batch_size.max(1) as u64);
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for w in start..start + n {
            windows.extend_window(w, &mut inputs, &mut targets)?;
        }
        if let Some(&bad) = inputs.iter().chain(&targets).find(|&&t| t as usize >= vocab) {
            return Err(Error::Usage(format!(
                "--data {}: token id {bad} is outside the model's vocabulary of {vocab}; prepare the data again",
                args.data.display()
            )));
        }
        let idx = Tensor::from_vec(inputs, (n as usize, block), &device)?;
        let tgt = Tensor::from_vec(targets, (n as usize, block), &device)?;
        let logits = model.forward(&idx, None)?;
        sum += f64::from(cross_entropy_sum(&logits, &tgt)?.to_scalar::<f32>()?);
        tokens += n * block as u64;
        start += n;
        bar.inc(n);
    }
    bar.finish_and_clear();
    let loss = sum / tokens as f64;
    Ok(LmReport {
        task: "lm",
        checkpoint: dir,
        data: args.data.clone(),
        split,
        windows: count,
        tokens,
        loss,
        perplexity: loss.exp(),
        secs: started.elapsed().as_secs_f64(),
    })
}
