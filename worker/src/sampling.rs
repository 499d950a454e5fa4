//! Choosing the next token from one position's logits: temperature, top-k, top-p (nucleus), or greedy.
//!
//! The filters apply in the order Hugging Face's `generate` applies them: logits / temperature → softmax → keep the
//! k most likely → keep the smallest most-likely-first prefix whose probability (renormalised over the top k)
//! reaches p → renormalise → draw. Temperature 0 or top-k 1 is greedy (the first maximal logit, as candle's
//! `argmax`). Draws come from a seeded ChaCha8 stream on the host, one draw per sampled token, so the same seed
//! and the same logits give the same tokens on every platform.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// Divides the logits: < 1 sharpens, > 1 flattens, 0 = greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (`None` = all).
    pub top_k: Option<usize>,
    /// Keep only the most likely tokens whose probabilities add up to at least p (`None` = all).
    pub top_p: Option<f64>,
}

impl Default for SamplingConfig {
    /// Plain sampling from the model's distribution.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }
}

impl SamplingConfig {
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };

    /// The error names the field and its value.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Usage(format!(
                "temperature {} must be a finite number >= 0 (0 = greedy)",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Usage("top-k 0 must be at least 1".into()));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::Usage(format!("top-p {p} must be in (0, 1]")));
        }
        Ok(())
    }

    /// Whether this always picks the most likely token (no randomness).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }
}

/// The index of the first maximal logit. Errors on NaN or +inf (a broken model), and on an empty slice.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    check_logits(logits)?;
    let best = (1..logits.len()).fold(0, |best, i| if logits[i] > logits[best] { i } else { best });
    Ok(best as u32)
}

fn check_logits(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(Error::Model("cannot sample from an empty vocabulary".into()));
    }
    if let Some(i) = logits.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(Error::Model(format!(
            "the model produced a non-finite logit ({}) for token {i}",
            logits[i]
        )));
    }
    if logits.iter().all(|x| *x == f32::NEG_INFINITY) {
        return Err(Error::Model("every logit is -inf: no token can be sampled".into()));
    }
    Ok(())
}

/// The distribution a token is drawn from: (token, probability) pairs with probabilities > 0 that sum to 1. Most
/// likely first (ties: lower id first) when top-k or top-p filtered it, otherwise in id order. Greedy configs give
/// the argmax alone.
pub fn distribution(logits: &[f32], cfg: &SamplingConfig) -> Result<Vec<(u32, f64)>> {
    cfg.validate()?;
    if cfg.is_greedy() {
        return Ok(vec![(argmax(logits)?, 1.0)]);
    }
    check_logits(logits)?;
    // Softmax in f64, shifted by the max so the largest term is exp(0) = 1.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut dist: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / cfg.temperature).exp()))
        .filter(|&(_, p)| p > 0.0)
        .collect();
    if cfg.top_k.is_some() || cfg.top_p.is_some() {
        let by_prob = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if let Some(k) = cfg.top_k
            && k < dist.len()
        {
            dist.select_nth_unstable_by(k - 1, by_prob);
            dist.truncate(k);
        }
        dist.sort_by(by_prob);
        if let Some(p) = cfg.top_p {
            let total: f64 = dist.iter().map(|x| x.1).sum();
            let mut mass = 0.0;
            // The smallest prefix whose mass reaches p (always at least one token).
            let keep = dist
                .iter()
                .position(|x| {
                    mass += x.1 / total;
                    mass >= p
                })
                .map_or(dist.len(), |i| i + 1);
            dist.truncate(keep);
        }
    }
    let total: f64 = dist.iter().map(|x| x.1).sum();
    dist.iter_mut().for_each(|x| x.1 /= total);
    Ok(dist)
}

/// A sampling config with its seeded random stream.
pub struct Sampler {
    cfg: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.cfg
    }

    /// The next token for one position's logits [vocab].
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if self.cfg.is_greedy() {
            return argmax(logits);
        }
        let dist = distribution(logits, &self.cfg)?;
        let u: f64 = self.rng.random(); // [0, 1)
        let mut mass = 0.0;
        for &(token, p) in &dist {
            mass += p;
            if u < mass {
                return Ok(token);
            }
        }
        // Rounding left the total a hair below u: the last token owns the remainder.
        Ok(dist.last().map_or(0, |x| x.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random logits with a wide spread, from a seed.
    fn logits(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 8.0 - 4.0).collect()
    }

    fn cfg(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> SamplingConfig {
        SamplingConfig {
            temperature,
            top_k,
            top_p,
        }
    }

    #[test]
    fn greedy_configs_pick_the_first_maximum() {
        let l = [0.5f32, 3.0, -1.0, 3.0, 2.9];
        assert_eq!(argmax(&l).unwrap(), 1);
        for c in [
            SamplingConfig::GREEDY,
            cfg(0.0, Some(5), Some(0.5)),
            cfg(1.0, Some(1), None),
            cfg(2.5, Some(1), Some(1.0)),
        ] {
            let mut s = Sampler::new(c, 7).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&l).unwrap(), 1, "{c:?}");
            }
        }
    }

    #[test]
    fn top_k_1_and_temperature_0_equal_greedy_on_many_logits() {
        for seed in 0..200 {
            let l = logits(seed, 50);
            let want = argmax(&l).unwrap();
            // Agrees with candle's argmax too (the greedy decoder uses it).
            let t = candle_core::Tensor::new(l.as_slice(), &candle_core::Device::Cpu).unwrap();
            assert_eq!(t.argmax(0).unwrap().to_scalar::<u32>().unwrap(), want);
            let mut k1 = Sampler::new(cfg(1.0, Some(1), None), seed).unwrap();
            let mut t0 = Sampler::new(cfg(0.0, None, None), seed).unwrap();
            assert_eq!(k1.sample(&l).unwrap(), want);
            assert_eq!(t0.sample(&l).unwrap(), want);
        }
    }

    #[test]
    fn a_tiny_top_p_picks_the_argmax() {
        for seed in 0..100 {
            let l = logits(seed, 40);
            let mut s = Sampler::new(cfg(1.0, None, Some(1e-9)), seed).unwrap();
            assert_eq!(s.sample(&l).unwrap(), argmax(&l).unwrap());
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let c = cfg(0.9, Some(20), Some(0.95));
        let draw = |seed| {
            let mut s = Sampler::new(c, seed).unwrap();
            (0..200).map(|i| s.sample(&logits(i, 64)).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    /// The nucleus and top-k sets computed naively (full sort), to check `distribution` against.
    fn allowed(l: &[f32], c: &SamplingConfig) -> Vec<u32> {
        let mut order: Vec<u32> = (0..l.len() as u32).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        order.truncate(c.top_k.unwrap_or(l.len()));
        if let Some(p) = c.top_p {
            let w: Vec<f64> = order
                .iter()
                .map(|&i| ((l[i as usize] - l[order[0] as usize]) as f64 / c.temperature).exp())
                .collect();
            let total: f64 = w.iter().sum();
            let mut mass = 0.0;
            let mut n = 0;
            for x in &w {
                n += 1;
                mass += x / total;
                if mass >= p {
                    break;
                }
            }
            order.truncate(n);
        }
        order
    }

    #[test]
    fn sampled_ids_stay_within_the_top_k_and_nucleus_sets() {
        let configs = [
            cfg(1.0, Some(5), None),
            cfg(1.0, None, Some(0.5)),
            cfg(0.7, Some(10), Some(0.8)),
            cfg(2.0, Some(3), Some(0.99)),
            cfg(1.0, Some(1000), None), // k larger than the vocabulary
        ];
        for (ci, c) in configs.iter().enumerate() {
            let mut s = Sampler::new(*c, ci as u64).unwrap();
            for draw in 0..500u64 {
                let l = logits(draw * 31 + ci as u64, 30);
                let set = allowed(&l, c);
                let dist = distribution(&l, c).unwrap();
                let mut got: Vec<u32> = dist.iter().map(|x| x.0).collect();
                got.sort_unstable();
                let mut want = set.clone();
                want.sort_unstable();
                assert_eq!(got, want, "{c:?} draw {draw}");
                assert!((dist.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
                let t = s.sample(&l).unwrap();
                assert!(set.contains(&t), "{c:?} draw {draw}: {t} not in {set:?}");
            }
        }
    }

    #[test]
    fn plain_sampling_follows_the_softmax() {
        let l = [0.0f32, 1.0, 2.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        let mut s = Sampler::new(SamplingConfig::default(), 11).unwrap();
        let n = 20_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&l).unwrap() as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let want = (l[i] as f64).exp() / z;
            let got = c as f64 / n as f64;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn temperature_scales_the_distribution() {
        let l = [0.0f32, 1.0];
        let p1 = |t: f64| distribution(&l, &cfg(t, None, None)).unwrap()[1].1;
        assert!((p1(1.0) - 1.0 / (1.0 + (-1f64).exp())).abs() < 1e-12);
        assert!((p1(0.5) - 1.0 / (1.0 + (-2f64).exp())).abs() < 1e-12);
        assert!(p1(100.0) < 0.51);
    }

    #[test]
    fn bad_configs_and_logits_are_named() {
        for (c, word) in [
            (cfg(-1.0, None, None), "temperature"),
            (cfg(f64::NAN, None, None), "temperature"),
            (cfg(1.0, Some(0), None), "top-k"),
            (cfg(1.0, None, Some(0.0)), "top-p"),
            (cfg(1.0, None, Some(1.5)), "top-p"),
        ] {
            let err = Sampler::new(c, 0).err().unwrap().to_string();
            assert!(err.contains(word), "{err}");
        }
        let mut s = Sampler::new(SamplingConfig::default(), 0).unwrap();
        assert!(s.sample(&[0.0, f32::NAN]).unwrap_err().to_string().contains("token 1"));
        assert!(s.sample(&[]).is_err());
        // -inf logits are fine (probability 0) as long as one token is possible.
        for _ in 0..50 {
            assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]).unwrap(), 1);
        }
    }
}
