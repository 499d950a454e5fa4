//! Autoregressive decoding with a KV cache: the prompt is fed once, then each new token costs one position's work
//! (`Gpt::forward_cached`). The result is the same as recomputing the whole context for every token, which
//! [`Generator::recomputing`] still does, as the reference the tests compare against.
//!
//! Past the block size the cache cannot slide, because positions are absolute (learned or sinusoidal): a token's
//! keys and values depend on its position, and once the context is cropped to the last `block_size` tokens every
//! token's position shifts by one per step. So from then on each token recomputes the last `block_size` tokens,
//! exactly what decoding without a cache does, and costs as much.
use std::ops::ControlFlow;

use candle_core::{D, DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{Gpt, KvCache};
use crate::sampling::Sampler;

/// Decoding state for a batch of equal-length sequences: their tokens so far and, unless recomputing, the KV cache.
pub struct Generator<'m> {
    model: &'m Gpt,
    device: Device,
    seqs: Vec<Vec<u32>>,
    /// `None`: recompute the whole (cropped) context for every token.
    cache: Option<KvCache>,
    /// The logits [N, vocab] for the current ends of `seqs`, once computed.
    last: Option<Tensor>,
}

impl<'m> Generator<'m> {
    /// Decoding with a KV cache. `prompts`: at least one, all of the same non-zero length.
    pub fn new(model: &'m Gpt, prompts: &[Vec<u32>], device: &Device) -> Result<Self> {
        Self::with_cache(model, prompts, device, Some(KvCache::new(model.config())))
    }

    /// Decoding by full recomputation of the last `block_size` tokens for every new token: slow, obviously right.
    pub fn recomputing(model: &'m Gpt, prompts: &[Vec<u32>], device: &Device) -> Result<Self> {
        Self::with_cache(model, prompts, device, None)
    }

    fn with_cache(model: &'m Gpt, prompts: &[Vec<u32>], device: &Device, cache: Option<KvCache>) -> Result<Self> {
        let Some(first) = prompts.first() else {
            return Err(Error::Model("decoding needs at least one prompt".into()));
        };
        if first.is_empty() {
            return Err(Error::Model("decoding needs prompts of at least one token".into()));
        }
        if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() != first.len()) {
            return Err(Error::Model(format!(
                "batched decoding needs prompts of equal length: prompt 0 has {} tokens, prompt {i} has {}",
                first.len(),
                p.len()
            )));
        }
        let vocab = model.config().vocab_size;
        if let Some(t) = prompts.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(Error::Model(format!(
                "prompt token {t} is outside the model's vocabulary of {vocab}"
            )));
        }
        Ok(Self {
            model,
            device: device.clone(),
            seqs: prompts.to_vec(),
            cache,
            last: None,
        })
    }

    /// The sequences so far, prompts included.
    pub fn sequences(&self) -> &[Vec<u32>] {
        &self.seqs
    }

    /// Logits [N, vocab] (f32) for the token after each sequence.
    pub fn next_logits(&mut self) -> Result<Tensor> {
        if let Some(logits) = &self.last {
            return Ok(logits.clone());
        }
        let len = self.seqs[0].len();
        let block = self.model.config().block_size;
        let logits = match &mut self.cache {
            None => {
                let t = len.min(block);
                let idx = Self::tokens_tensor(&self.seqs, len - t, len, &self.device)?;
                let logits = self.model.forward(&idx, None)?; // [N, t, vocab]
                logits.narrow(1, t - 1, 1)?.squeeze(1)?
            }
            Some(cache) => {
                // Feed what the cache lacks; past the block size, start over on the last `block` tokens.
                let start = if len > block {
                    cache.clear();
                    len - block
                } else {
                    cache.len()
                };
                let idx = Self::tokens_tensor(&self.seqs, start, len, &self.device)?;
                self.model.forward_cached_last(&idx, cache)?
            }
        };
        let logits = logits.to_dtype(DType::F32)?;
        self.last = Some(logits.clone());
        Ok(logits)
    }

    /// Appends one token to each sequence.
    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.len() != self.seqs.len() {
            return Err(Error::Model(format!(
                "{} tokens given for {} sequences",
                tokens.len(),
                self.seqs.len()
            )));
        }
        for (seq, &t) in self.seqs.iter_mut().zip(tokens) {
            seq.push(t);
        }
        self.last = None;
        Ok(())
    }

    /// Positions `start..end` of every sequence as a [N, end - start] tensor.
    fn tokens_tensor(seqs: &[Vec<u32>], start: usize, end: usize, device: &Device) -> Result<Tensor> {
        let flat: Vec<u32> = seqs.iter().flat_map(|s| s[start..end].iter().copied()).collect();
        Ok(Tensor::from_vec(flat, (seqs.len(), end - start), device)?)
    }
}

/// Appends up to `max_new` tokens chosen by `sampler` to the single sequence of `generator`, handing each to
/// `on_token` as soon as it is chosen (to stream it); `on_token` may stop early with `ControlFlow::Break`. Returns
/// the new tokens.
pub fn generate(
    generator: &mut Generator,
    sampler: &mut Sampler,
    max_new: usize,
    mut on_token: impl FnMut(u32) -> Result<ControlFlow<()>>,
) -> Result<Vec<u32>> {
    if generator.sequences().len() != 1 {
        return Err(Error::Model(format!(
            "sampling decodes one sequence at a time, not {}",
            generator.sequences().len()
        )));
    }
    let mut out = Vec::with_capacity(max_new);
    while out.len() < max_new {
        let logits = generator.next_logits()?.squeeze(0)?.to_vec1::<f32>()?;
        let next = sampler.sample(&logits)?;
        generator.push(&[next])?;
        out.push(next);
        if on_token(next)?.is_break() {
            break;
        }
    }
    Ok(out)
}

/// Appends up to `max_new` greedy tokens to `prompt` (with the KV cache; past the block size, see the module doc),
/// and stops after emitting `stop` (which is included) if given. Returns only the new tokens.
pub fn greedy(model: &Gpt, prompt: &[u32], max_new: usize, stop: Option<u32>, device: &Device) -> Result<Vec<u32>> {
    let mut generator = Generator::new(model, &[prompt.to_vec()], device)?;
    let mut out = Vec::with_capacity(max_new);
    while out.len() < max_new {
        let next = greedy_step(&mut generator)?[0];
        out.push(next);
        if Some(next) == stop {
            break;
        }
    }
    Ok(out)
}

/// Greedy decoding of many prompts of equal length at once (one forward per new token for the whole batch).
/// Returns exactly `max_new` new tokens per prompt.
pub fn greedy_batch(model: &Gpt, prompts: &[Vec<u32>], max_new: usize, device: &Device) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let mut generator = Generator::new(model, prompts, device)?;
    for _ in 0..max_new {
        greedy_step(&mut generator)?;
    }
    let prompt_len = prompts[0].len();
    Ok(generator.sequences().iter().map(|s| s[prompt_len..].to_vec()).collect())
}

/// Appends each sequence's argmax token (on the device: only N ids come back) and returns them.
fn greedy_step(generator: &mut Generator) -> Result<Vec<u32>> {
    let next = generator.next_logits()?.argmax(D::Minus1)?.to_vec1::<u32>()?;
    generator.push(&next)?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::load_hf;
    use crate::model::{GptConfig, init_varmap};
    use crate::sampling::SamplingConfig;
    use candle_nn::VarBuilder;
    use lockstep_common::spec::Positions;

    fn cfg(positions: Positions, block_size: usize) -> GptConfig {
        GptConfig {
            vocab_size: 7,
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            block_size,
            dropout: 0.0,
            positions,
            init_std: 0.5, // large weights so the argmax varies between positions
            layer_norm_eps: 1e-5,
        }
    }

    fn random_model(c: &GptConfig, seed: u64) -> Gpt {
        let vm = init_varmap(c, seed, &Device::Cpu).unwrap();
        Gpt::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), c).unwrap()
    }

    fn model(seed: u64) -> Gpt {
        random_model(&cfg(Positions::Learned, 4), seed)
    }

    fn hf_model() -> Gpt {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny");
        let (c, vm) = load_hf(&dir, &Device::Cpu).unwrap();
        Gpt::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &c).unwrap()
    }

    /// The tokens (and every step's logits) of cached decoding and of full recomputation.
    fn decode(m: &Gpt, prompt: &[u32], max_new: usize, sampling: SamplingConfig, seed: u64, cached: bool) -> Vec<u32> {
        let prompts = [prompt.to_vec()];
        let mut g = if cached {
            Generator::new(m, &prompts, &Device::Cpu).unwrap()
        } else {
            Generator::recomputing(m, &prompts, &Device::Cpu).unwrap()
        };
        let mut s = Sampler::new(sampling, seed).unwrap();
        generate(&mut g, &mut s, max_new, |_| Ok(ControlFlow::Continue(()))).unwrap()
    }

    /// Cached and recomputed decoding agree token for token, and their logits agree at every step.
    fn assert_cache_matches_recompute(m: &Gpt, prompt: &[u32], max_new: usize) {
        for (sampling, seed) in [
            (SamplingConfig::GREEDY, 0),
            (SamplingConfig::default(), 1),
            (SamplingConfig::default(), 2),
            (
                SamplingConfig {
                    temperature: 0.8,
                    top_k: Some(5),
                    top_p: Some(0.9),
                },
                3,
            ),
        ] {
            let want = decode(m, prompt, max_new, sampling, seed, false);
            let got = decode(m, prompt, max_new, sampling, seed, true);
            assert_eq!(got, want, "prompt {prompt:?}, {sampling:?}, seed {seed}");
            assert_eq!(got.len(), max_new);
            // Step by step, on the same sequence, the logits agree too.
            let prompts = [prompt.iter().chain(&want).copied().collect::<Vec<_>>()];
            let mut full = Generator::recomputing(m, &[prompt.to_vec()], &Device::Cpu).unwrap();
            let mut fast = Generator::new(m, &[prompt.to_vec()], &Device::Cpu).unwrap();
            for &t in &prompts[0][prompt.len()..] {
                let a = full
                    .next_logits()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let b = fast
                    .next_logits()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(diff <= 1e-5, "logits differ by {diff}");
                full.push(&[t]).unwrap();
                fast.push(&[t]).unwrap();
            }
        }
    }

    #[test]
    fn cached_decoding_equals_recomputation_on_random_models() {
        for positions in [Positions::Learned, Positions::Sinusoidal] {
            let c = cfg(positions, 8);
            for seed in [1, 2] {
                let m = random_model(&c, seed);
                assert_cache_matches_recompute(&m, &[3], 6); // a prompt of one token, within the block
                assert_cache_matches_recompute(&m, &[1, 2, 3, 4, 5], 3); // fills the block exactly
                assert_cache_matches_recompute(&m, &[6, 0, 2], 20); // crosses the block size: fallback
                assert_cache_matches_recompute(&m, &[1, 2, 3, 4, 5, 6, 0, 1, 2, 3], 4); // prompt longer than it
            }
        }
    }

    #[test]
    fn cached_decoding_equals_recomputation_on_the_hf_fixture() {
        let m = hf_model();
        assert_eq!(m.config().block_size, 32);
        assert_cache_matches_recompute(&m, &[42], 10);
        assert_cache_matches_recompute(&m, &[3, 14, 15, 92, 65, 35, 89, 79], 12);
        assert_cache_matches_recompute(&m, &[3, 14, 15, 92], 40); // 44 tokens > 32: crosses the block size
    }

    #[test]
    fn greedy_equals_recomputed_greedy_on_the_hf_fixture() {
        let m = hf_model();
        let prompt = [3, 14, 15, 92];
        let want = decode(&m, &prompt, 40, SamplingConfig::GREEDY, 0, false);
        assert_eq!(greedy(&m, &prompt, 40, None, &Device::Cpu).unwrap(), want);
        let batch = greedy_batch(&m, &[prompt.to_vec(), vec![1, 2, 3, 4]], 40, &Device::Cpu).unwrap();
        assert_eq!(batch[0], want);
        assert_eq!(
            batch[1],
            decode(&m, &[1, 2, 3, 4], 40, SamplingConfig::GREEDY, 0, false)
        );
    }

    #[test]
    fn respects_max_new_and_crops_past_the_block_size() {
        let m = model(1);
        let out = greedy(&m, &[1, 2, 3], 10, None, &Device::Cpu).unwrap();
        assert_eq!(out.len(), 10); // 13 tokens > block_size 4: the context was cropped
        assert!(out.iter().all(|&t| t < 7));
        assert!(greedy(&m, &[1], 0, None, &Device::Cpu).unwrap().is_empty());
    }

    #[test]
    fn stops_after_the_stop_token() {
        let m = model(1);
        let free = greedy(&m, &[1, 2, 3], 10, None, &Device::Cpu).unwrap();
        let stop = free[2];
        let first = free.iter().position(|&t| t == stop).unwrap();
        let out = greedy(&m, &[1, 2, 3], 10, Some(stop), &Device::Cpu).unwrap();
        assert_eq!(out, free[..=first]);
        assert_eq!(*out.last().unwrap(), stop);
    }

    #[test]
    fn batch_matches_single_and_checks_lengths() {
        let m = model(2);
        let prompts = vec![vec![1, 2], vec![3, 4], vec![5, 6]];
        let batch = greedy_batch(&m, &prompts, 5, &Device::Cpu).unwrap();
        for (p, got) in prompts.iter().zip(&batch) {
            assert_eq!(got, &greedy(&m, p, 5, None, &Device::Cpu).unwrap());
            assert_eq!(got, &decode(&m, p, 5, SamplingConfig::GREEDY, 0, false));
        }
        let err = greedy_batch(&m, &[vec![1, 2], vec![3]], 2, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prompt 1"), "{err}");
        assert!(greedy(&m, &[], 2, None, &Device::Cpu).is_err());
        let err = greedy(&m, &[1, 70], 2, None, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("70"), "{err}");
    }

    #[test]
    fn on_token_streams_each_token_and_can_stop() {
        let m = model(3);
        let mut g = Generator::new(&m, &[vec![1, 2]], &Device::Cpu).unwrap();
        let mut s = Sampler::new(SamplingConfig::default(), 5).unwrap();
        let mut seen = Vec::new();
        let out = generate(&mut g, &mut s, 10, |t| {
            seen.push(t);
            Ok(if seen.len() == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })
        .unwrap();
        assert_eq!(out, seen);
        assert_eq!(out.len(), 3);
        assert_eq!(g.sequences()[0].len(), 5);
    }
}
