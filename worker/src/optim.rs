//! Our own AdamW, the learning-rate schedule and global-norm clipping. `candle_nn::AdamW` keeps its moments
//! private (so they cannot be checkpointed) and decays every tensor; this one exposes its state and decays only
//! tensors with two or more dimensions, like nanoGPT's parameter groups.
use std::collections::HashMap;

use candle_core::{DType, Tensor};
use lockstep_common::spec::TrainSpec;

use crate::error::{Error, Result};
use crate::params::Params;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn from_spec(t: &TrainSpec) -> Self {
        Self {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        }
    }
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// First and second moments, one per parameter in canonical order, f32 on the parameter's device.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    pub fn new(params: &Params, cfg: AdamWConfig) -> Result<Self> {
        let zeros = || -> Result<Vec<Tensor>> {
            params
                .vars()
                .iter()
                .map(|p| Ok(Tensor::zeros(p.shape(), DType::F32, p.device())?))
                .collect()
        };
        Ok(Self {
            cfg,
            m: zeros()?,
            v: zeros()?,
            step: 0,
        })
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update from `grads` (already all-reduced and clipped; canonical order), exactly as
    /// `torch.optim.AdamW`: p ← p·(1 − lr·wd); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
    /// p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε).
    pub fn step(&mut self, params: &Params, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != params.len() || self.m.len() != params.len() {
            return Err(Error::Model(format!(
                "optimizer step: {} gradients and {} moment tensors for {} parameters",
                grads.len(),
                self.m.len(),
                params.len()
            )));
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let t = self.step + 1;
        let bias1 = 1.0 - beta1.powf(t as f64);
        let bias2_sqrt = (1.0 - beta2.powf(t as f64)).sqrt();
        let step_size = lr / bias1;
        for (i, (name, var)) in params.names().iter().zip(params.vars()).enumerate() {
            let g = &grads[i];
            if g.shape() != var.shape() {
                return Err(Error::Model(format!(
                    "optimizer step: gradient for {name} has shape {:?}, the parameter {:?}",
                    g.dims(),
                    var.dims()
                )));
            }
            let g = g.to_dtype(DType::F32)?;
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let decay = if var.rank() >= 2 { 1.0 - lr * weight_decay } else { 1.0 };
            let p = var.as_tensor().to_dtype(DType::F32)?.affine(decay, 0.0)?;
            let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, eps)?;
            let update = (m.div(&denom)? * step_size)?;
            var.set(&(p - update)?.to_dtype(var.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        self.step = t;
        Ok(())
    }

    /// The moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`, torch's names) for the checkpoint.
    pub fn state(&self, params: &Params) -> Vec<(String, Tensor)> {
        params
            .names()
            .iter()
            .zip(self.m.iter().zip(&self.v))
            .flat_map(|(name, (m, v))| {
                [
                    (format!("{name}.exp_avg"), m.clone()),
                    (format!("{name}.exp_avg_sq"), v.clone()),
                ]
            })
            .collect()
    }

    /// The reverse of [`AdamW::state`]: every moment must be present with its parameter's shape. Nothing is
    /// changed unless all of them are.
    pub fn load_state(&mut self, params: &Params, tensors: &HashMap<String, Tensor>, steps_taken: u64) -> Result<()> {
        let fetch = |name: &str, var: &candle_core::Var, suffix: &str| -> Result<Tensor> {
            let key = format!("{name}.{suffix}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::Model(format!("optimizer state is missing the tensor {key}")))?;
            if t.shape() != var.shape() {
                return Err(Error::Model(format!(
                    "optimizer state tensor {key} has shape {:?}, the parameter {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?.to_device(var.device())?)
        };
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for (name, var) in params.names().iter().zip(params.vars()) {
            m.push(fetch(name, var, "exp_avg")?);
            v.push(fetch(name, var, "exp_avg_sq")?);
        }
        (self.m, self.v, self.step) = (m, v, steps_taken);
        Ok(())
    }
}

/// nanoGPT's `get_lr`: linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`
/// (and `min_lr` after). `step` is 0-based, the step about to be taken. Warmup uses (step+1)/(warmup+1) so the first
/// step already moves (a zero learning rate would waste it) and step `warmup_steps` reaches exactly `lr`.
pub fn lr_at(step: u64, t: &TrainSpec) -> f64 {
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / (t.warmup_steps + 1) as f64;
    }
    if step >= t.total_steps {
        return t.min_lr;
    }
    // warmup_steps <= step < total_steps, so the span is positive.
    let ratio = (step - t.warmup_steps) as f64 / (t.total_steps - t.warmup_steps) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    t.min_lr + coeff * (t.lr - t.min_lr)
}

/// The L2 norm of a whole flat gradient buffer, accumulated in f64 so it does not depend on summation luck.
pub fn global_norm(flat: &[f32]) -> f64 {
    flat.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt()
}

/// The factor to multiply gradients by: min(1, clip / (norm + 1e-6)), torch's `clip_grad_norm_`; 1 when `clip`
/// is 0 (clipping off).
pub fn clip_scale(norm: f64, clip: f64) -> f64 {
    if clip <= 0.0 {
        1.0
    } else {
        (clip / (norm + 1e-6)).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    fn spec() -> TrainSpec {
        TrainSpec {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            total_steps: 100,
            ..TrainSpec::default()
        }
    }

    #[test]
    fn lr_warmup_endpoints_cosine_floor_and_monotone_decay() {
        let t = spec();
        assert!((lr_at(0, &t) - 1e-3 / 11.0).abs() < 1e-15);
        assert!(lr_at(0, &t) > 0.0);
        for s in 1..10 {
            assert!(lr_at(s, &t) > lr_at(s - 1, &t));
        }
        assert!((lr_at(10, &t) - 1e-3).abs() < 1e-15);
        assert!((lr_at(100, &t) - 1e-4).abs() < 1e-15);
        assert_eq!(lr_at(1000, &t), 1e-4);
        for s in 11..=100 {
            assert!(lr_at(s, &t) <= lr_at(s - 1, &t), "step {s}");
        }
        assert!((lr_at(55, &t) - (1e-4 + 0.5 * 9e-4)).abs() < 1e-15); // half way: the cosine's midpoint
        let no_warmup = TrainSpec { warmup_steps: 0, ..t };
        assert_eq!(lr_at(0, &no_warmup), 1e-3);
    }

    #[test]
    fn norm_and_clip() {
        assert_eq!(global_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(clip_scale(5.0, 0.0), 1.0);
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert!((clip_scale(5.0, 1.0) - 1.0 / (5.0 + 1e-6)).abs() < 1e-15);
    }

    fn params() -> Params {
        let vm = VarMap::new();
        {
            let mut d = vm.data().lock().unwrap();
            d.insert(
                "w".into(),
                Var::from_tensor(&Tensor::new(&[[1f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap()).unwrap(),
            );
            d.insert(
                "b".into(),
                Var::from_tensor(&Tensor::new(&[1f32, -1.0], &Device::Cpu).unwrap()).unwrap(),
            );
        }
        Params::from_varmap(&vm).unwrap()
    }

    /// A scalar reference implementation of torch's AdamW, in f64.
    fn reference(p: f64, grads: &[f64], lr: f64, wd: f64, cfg: AdamWConfig) -> f64 {
        let (mut p, mut m, mut v) = (p, 0.0, 0.0);
        for (t, &g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            p *= 1.0 - lr * wd;
            m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
            v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
            let denom = v.sqrt() / (1.0 - cfg.beta2.powi(t)).sqrt() + cfg.eps;
            p -= lr / (1.0 - cfg.beta1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn matches_reference_and_decays_only_matrices() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let p = params();
        let mut opt = AdamW::new(&p, cfg).unwrap();
        let g1 = [vec![0.1f32, -0.2], vec![0.3f32, 0.0, -0.5, 1.0]];
        let g2 = [vec![-0.1f32, 0.4], vec![0.2f32, 0.1, 0.5, -1.0]];
        for g in [&g1, &g2] {
            let flat: Vec<f32> = g.iter().flatten().copied().collect();
            opt.step(&p, &p.unflatten(&flat).unwrap(), 0.01).unwrap();
        }
        assert_eq!(opt.steps_taken(), 2);
        let b = p.vars()[0].as_tensor().to_vec1::<f32>().unwrap();
        let w: Vec<f32> = p.vars()[1].as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b0 = [1.0, -1.0];
        for i in 0..2 {
            let want = reference(b0[i], &[g1[0][i] as f64, g2[0][i] as f64], 0.01, 0.0, cfg);
            assert!((b[i] as f64 - want).abs() < 1e-6, "b[{i}] {} vs {want}", b[i]);
        }
        let w0 = [1.0, -2.0, 0.5, 3.0];
        for i in 0..4 {
            let want = reference(w0[i], &[g1[1][i] as f64, g2[1][i] as f64], 0.01, 0.1, cfg);
            assert!((w[i] as f64 - want).abs() < 1e-6, "w[{i}] {} vs {want}", w[i]);
        }
    }

    #[test]
    fn state_round_trips_and_checks_names_and_shapes() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let p = params();
        let mut opt = AdamW::new(&p, cfg).unwrap();
        opt.step(&p, &p.unflatten(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).unwrap(), 0.01)
            .unwrap();
        let state: HashMap<String, Tensor> = opt.state(&p).into_iter().collect();
        assert_eq!(state.len(), 4);
        let mut other = AdamW::new(&p, cfg).unwrap();
        other.load_state(&p, &state, opt.steps_taken()).unwrap();
        assert_eq!(other.steps_taken(), 1);
        for ((n1, t1), (n2, t2)) in opt.state(&p).iter().zip(other.state(&p).iter()) {
            assert_eq!(n1, n2);
            assert_eq!(
                t1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                t2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let mut missing = state.clone();
        missing.remove("w.exp_avg_sq");
        assert!(
            other
                .load_state(&p, &missing, 1)
                .unwrap_err()
                .to_string()
                .contains("w.exp_avg_sq")
        );
        let mut bad = state;
        bad.insert("b.exp_avg".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        assert!(
            other
                .load_state(&p, &bad, 1)
                .unwrap_err()
                .to_string()
                .contains("b.exp_avg")
        );
    }
}
