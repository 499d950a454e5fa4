//! Greedy decoding. Every token recomputes the whole (cropped) context: simple and obviously right; a KV cache can
//! replace it later without changing the results.
use candle_core::{D, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::Gpt;

/// The argmax of the last position's logits for each row of `context` [N, T].
fn next_tokens(model: &Gpt, context: &Tensor) -> Result<Vec<u32>> {
    let logits = model.forward(context, None)?; // [N, T, vocab]
    let t = logits.dim(1)?;
    Ok(logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?)
}

/// The last `block_size` tokens of each sequence, as a [N, T] tensor.
fn context_tensor(seqs: &[Vec<u32>], block_size: usize, device: &Device) -> Result<Tensor> {
    let len = seqs.first().map_or(0, Vec::len);
    let start = len.saturating_sub(block_size);
    let flat: Vec<u32> = seqs.iter().flat_map(|s| s[start..].iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (seqs.len(), len - start), device)?)
}

/// Appends up to `max_new` greedy tokens to `prompt`, cropping the context to the model's block size, and stops
/// after emitting `stop` (which is included) if given. Returns only the new tokens.
pub fn greedy(model: &Gpt, prompt: &[u32], max_new: usize, stop: Option<u32>, device: &Device) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Model(
            "greedy decoding needs a prompt of at least one token".into(),
        ));
    }
    let mut seq = vec![prompt.to_vec()];
    let mut out = Vec::with_capacity(max_new);
    while out.len() < max_new {
        let ctx = context_tensor(&seq, model.config().block_size, device)?;
        let next = next_tokens(model, &ctx)?[0];
        seq[0].push(next);
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
    let Some(first) = prompts.first() else {
        return Ok(Vec::new());
    };
    if first.is_empty() {
        return Err(Error::Model(
            "greedy decoding needs prompts of at least one token".into(),
        ));
    }
    if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() != first.len()) {
        return Err(Error::Model(format!(
            "batched greedy decoding needs prompts of equal length: prompt 0 has {} tokens, prompt {i} has {}",
            first.len(),
            p.len()
        )));
    }
    let mut seqs = prompts.to_vec();
    for _ in 0..max_new {
        let ctx = context_tensor(&seqs, model.config().block_size, device)?;
        for (seq, next) in seqs.iter_mut().zip(next_tokens(model, &ctx)?) {
            seq.push(next);
        }
    }
    Ok(seqs.into_iter().map(|s| s[first.len()..].to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GptConfig, init_varmap};
    use candle_core::DType;
    use candle_nn::VarBuilder;
    use lockstep_common::spec::Positions;

    fn model(seed: u64) -> Gpt {
        let cfg = GptConfig {
            vocab_size: 7,
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            block_size: 4,
            dropout: 0.0,
            positions: Positions::Learned,
            init_std: 0.5, // large weights so the argmax varies between positions
            layer_norm_eps: 1e-5,
        };
        let vm = init_varmap(&cfg, seed, &Device::Cpu).unwrap();
        Gpt::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap()
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
        }
        let err = greedy_batch(&m, &[vec![1, 2], vec![3]], 2, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prompt 1"), "{err}");
    }
}
