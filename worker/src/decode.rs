//! Decoding many prompts at once, for evaluation (`lockstep eval`, generation metrics while fine-tuning): prompts of
//! equal token length share a batch (the KV-cached [`Generator`] needs equal lengths; no padding, so no attention
//! mask is needed), each item samples from its own seeded stream, and an item stops at its first stop token while
//! the rest of its batch goes on. The output never depends on the batch size.
use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Device;

use crate::error::Result;
use crate::generate::Generator;
use crate::model::Gpt;
use crate::sampling::{Sampler, SamplingConfig};

#[derive(Debug, Clone)]
pub struct DecodeOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Item `i` samples with seed `seed + i`.
    pub seed: u64,
    pub batch_size: usize,
}

#[derive(Debug, Clone)]
pub struct Decoded {
    /// One per prompt, in order: the new tokens, ending with the stop token if one was met.
    pub outputs: Vec<Vec<u32>>,
    /// Tokens generated, stop tokens included.
    pub new_tokens: usize,
    /// Decoding time (prompt forwards included).
    pub secs: f64,
}

/// Decodes every prompt (non-empty token ids) until `is_stop` says a token ends it or `max_new_tokens` were made,
/// calling `on_done(n)` after each batch of `n` items.
pub fn decode_all(
    model: &Gpt,
    prompts: &[Vec<u32>],
    opts: &DecodeOptions,
    device: &Device,
    is_stop: impl Fn(u32) -> bool,
    mut on_done: impl FnMut(u64),
) -> Result<Decoded> {
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate() {
        by_len.entry(p.len()).or_default().push(i);
    }
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let started = Instant::now();
    for group in by_len.values() {
        for batch in group.chunks(opts.batch_size.max(1)) {
            let new = decode_batch(model, prompts, batch, opts, device, &is_stop)?;
            for (&i, out) in batch.iter().zip(new) {
                outputs[i] = out;
            }
            on_done(batch.len() as u64);
        }
    }
    Ok(Decoded {
        new_tokens: outputs.iter().map(Vec::len).sum(),
        outputs,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// The new tokens of the prompts `batch` (indices into `prompts`, all of one length), each ending with its stop
/// token if it met one.
fn decode_batch(
    model: &Gpt,
    prompts: &[Vec<u32>],
    batch: &[usize],
    opts: &DecodeOptions,
    device: &Device,
    is_stop: &impl Fn(u32) -> bool,
) -> Result<Vec<Vec<u32>>> {
    let seqs: Vec<Vec<u32>> = batch.iter().map(|&i| prompts[i].clone()).collect();
    let mut generator = Generator::new(model, &seqs, device)?;
    let mut samplers = batch
        .iter()
        .map(|&i| Sampler::new(opts.sampling, opts.seed.wrapping_add(i as u64)))
        .collect::<Result<Vec<_>>>()?;
    let mut outs: Vec<Vec<u32>> = vec![Vec::new(); batch.len()];
    let mut done = vec![false; batch.len()];
    for _ in 0..opts.max_new_tokens {
        if done.iter().all(|&d| d) {
            break;
        }
        let logits = generator.next_logits()?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(batch.len());
        for (r, row) in logits.iter().enumerate() {
            if done[r] {
                // A finished row still needs a token to keep the batch rectangular; rows never see each other.
                next.push(0);
                continue;
            }
            let t = samplers[r].sample(row)?;
            outs[r].push(t);
            done[r] = is_stop(t);
            next.push(t);
        }
        generator.push(&next)?;
    }
    Ok(outs)
}
