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
    moments: Moments,
    step: u64,
}

/// Where the first and second moments live (f32, on the parameters' device).
enum Moments {
    /// One tensor per parameter in canonical order, replaced at every step: the composed step's layout.
    PerTensor { m: Vec<Tensor>, v: Vec<Tensor> },
    /// Every parameter's moments in one buffer, updated in place: the fused kernel's layout.
    Flat(Box<Flat>),
}

struct Flat {
    /// [2, n]: row 0 exp_avg, row 1 exp_avg_sq, each the parameters' moments flattened in canonical order.
    mv: Tensor,
    /// Each parameter's offset in a row.
    offsets: Vec<usize>,
    /// Per parameter, views of `mv` shaped like it (exp_avg, exp_avg_sq): they share its storage, so they always
    /// show the current values ([`AdamW::state`] hands them out).
    views: Vec<(Tensor, Tensor)>,
    /// The fused step's device state (optim_cuda.rs), made at the first [`AdamW::fused_step`].
    #[cfg(feature = "cuda")]
    kernels: Option<crate::optim_cuda::FusedAdamW>,
}

/// What a fused step found in the reduced gradients, read back once after the update was queued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The loss summed over micro-batches and ranks.
    pub loss: f64,
    /// The ranks' stop votes, summed.
    pub stop_votes: f64,
    /// The global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// The loss or the norm was not finite: nothing was changed and the step count did not advance.
    pub skipped: bool,
}

impl AdamW {
    /// Per-tensor moments and the composed step ([`AdamW::step`]), on any device.
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
            moments: Moments::PerTensor {
                m: zeros()?,
                v: zeros()?,
            },
            step: 0,
        })
    }

    /// Both moments of every parameter in one flat [2, n] buffer on the parameters' device, the layout of the fused
    /// step ([`AdamW::fused_step`], CUDA in a `cuda` build); [`AdamW::step`] works on it too (the same composed math,
    /// written back into the buffer). Checkpoints are the same either way.
    pub fn flat(params: &Params, cfg: AdamWConfig) -> Result<Self> {
        let device = params
            .vars()
            .first()
            .map(|v| v.device().clone())
            .ok_or_else(|| Error::Model("an optimizer for no parameters".into()))?;
        let n = params.num_elements();
        let mv = Tensor::zeros((2, n), DType::F32, &device)?;
        let (m_row, v_row) = (mv.get(0)?, mv.get(1)?);
        let mut offsets = Vec::with_capacity(params.len());
        let mut views = Vec::with_capacity(params.len());
        let mut off = 0;
        for var in params.vars() {
            let len = var.elem_count();
            offsets.push(off);
            views.push((
                m_row.narrow(0, off, len)?.reshape(var.shape())?,
                v_row.narrow(0, off, len)?.reshape(var.shape())?,
            ));
            off += len;
        }
        Ok(Self {
            cfg,
            moments: Moments::Flat(Box::new(Flat {
                mv,
                offsets,
                views,
                #[cfg(feature = "cuda")]
                kernels: None,
            })),
            step: 0,
        })
    }

    /// The optimizer a trainer uses for `params`: [`AdamW::flat`] where the fused kernels run (a `cuda` build, the
    /// parameters on a CUDA device) unless `LOCKSTEP_GPU_COMPOSED` names `adamw` (ops/gpu_kernels.rs), which asks
    /// for the composed step there too (a fallback, and a second implementation to compare against); [`AdamW::new`]
    /// everywhere else.
    pub fn for_params(params: &Params, cfg: AdamWConfig) -> Result<Self> {
        let on_cuda = params.vars().first().is_some_and(|v| v.device().is_cuda());
        if cfg!(feature = "cuda")
            && on_cuda
            && crate::ops::gpu_kernels::enabled(crate::ops::gpu_kernels::Kernel::AdamW)?
        {
            Self::flat(params, cfg)
        } else {
            Self::new(params, cfg)
        }
    }

    /// Whether [`AdamW::fused_step`] can run: flat moments on a CUDA device, in a `cuda` build.
    pub fn runs_fused(&self) -> bool {
        match &self.moments {
            Moments::Flat(f) => cfg!(feature = "cuda") && f.mv.device().is_cuda(),
            Moments::PerTensor { .. } => false,
        }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update from `grads` (already all-reduced and clipped; canonical order), exactly as
    /// `torch.optim.AdamW`: p ← p·(1 − lr·wd); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
    /// p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε).
    pub fn step(&mut self, params: &Params, grads: &[Tensor], lr: f64) -> Result<()> {
        let moments = match &self.moments {
            Moments::PerTensor { m, .. } => m.len(),
            Moments::Flat(f) => f.offsets.len(),
        };
        if grads.len() != params.len() || moments != params.len() {
            return Err(Error::Model(format!(
                "optimizer step: {} gradients and {} moment tensors for {} parameters",
                grads.len(),
                moments,
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
            let (m_old, v_old) = match &self.moments {
                Moments::PerTensor { m, v } => (m[i].clone(), v[i].clone()),
                Moments::Flat(f) => f.views[i].clone(),
            };
            let g = g.to_dtype(DType::F32)?;
            let m = ((&m_old * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&v_old * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let decay = if var.rank() >= 2 { 1.0 - lr * weight_decay } else { 1.0 };
            let p = var.as_tensor().to_dtype(DType::F32)?.affine(decay, 0.0)?;
            let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, eps)?;
            let update = (m.div(&denom)? * step_size)?;
            var.set(&(p - update)?.to_dtype(var.dtype())?)?;
            match &mut self.moments {
                Moments::PerTensor { m: ms, v: vs } => (ms[i], vs[i]) = (m, v),
                Moments::Flat(f) => {
                    let both = Tensor::stack(&[m.flatten_all()?, v.flatten_all()?], 0)?;
                    f.mv.slice_set(&both, 1, f.offsets[i])?;
                }
            }
        }
        self.step = t;
        Ok(())
    }

    /// The step after the all-reduce, fused (CUDA, [`AdamW::flat`] moments): the global gradient norm, clipping to
    /// `max_norm` (0: off; [`clip_scale`]) and the AdamW update of [`AdamW::step`], in three kernel launches, then
    /// ONE read of [loss, votes, norm²] back to the host. `reduced` is the all-reduced flat f32 buffer as
    /// [`crate::device_grads::FlatGrads::reduce`] returns it: every parameter's gradient in canonical order, then
    /// the summed loss and the summed stop votes ([`crate::device_grads::EXTRA_SLOTS`]). A non-finite loss or norm
    /// skips the step on the device (nothing changes) and does not advance the step count, as the composed path.
    pub fn fused_step(&mut self, params: &Params, reduced: &Tensor, lr: f64, max_norm: f64) -> Result<StepStats> {
        #[cfg(feature = "cuda")]
        if let Moments::Flat(f) = &mut self.moments {
            let kernels = match &mut f.kernels {
                Some(k) => k,
                slot => slot.insert(crate::optim_cuda::FusedAdamW::new(params)?),
            };
            let hyper = crate::optim_cuda::Hyper {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: self.cfg.weight_decay,
                max_norm,
                t: self.step + 1,
            };
            let [loss, votes, norm2] = kernels.step(params, &f.mv, reduced, &hyper)?;
            // The kernel made the same decision from the same f32 values.
            let skipped = !loss.is_finite() || !norm2.is_finite();
            if !skipped {
                self.step += 1;
            }
            return Ok(StepStats {
                loss: f64::from(loss),
                stop_votes: f64::from(votes),
                grad_norm: f64::from(norm2).sqrt(),
                skipped,
            });
        }
        let _ = (params, reduced, lr, max_norm);
        Err(Error::Model(
            "the fused AdamW step needs flat moments (AdamW::flat) on a CUDA device, in a build with the `cuda` \
             feature"
                .into(),
        ))
    }

    /// The moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`, torch's names) for the checkpoint.
    pub fn state(&self, params: &Params) -> Vec<(String, Tensor)> {
        let pairs: Vec<(&Tensor, &Tensor)> = match &self.moments {
            Moments::PerTensor { m, v } => m.iter().zip(v).collect(),
            Moments::Flat(f) => f.views.iter().map(|(m, v)| (m, v)).collect(),
        };
        params
            .names()
            .iter()
            .zip(pairs)
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
        match &mut self.moments {
            Moments::PerTensor { m: ms, v: vs } => (*ms, *vs) = (m, v),
            Moments::Flat(f) => {
                if params.len() != f.offsets.len() || params.num_elements() != f.mv.dim(1)? {
                    return Err(Error::Model(format!(
                        "optimizer state for {} parameters of {} elements, the optimizer has {} of {}",
                        params.len(),
                        params.num_elements(),
                        f.offsets.len(),
                        f.mv.dim(1)?
                    )));
                }
                let row = |ts: Vec<Tensor>| -> Result<Tensor> {
                    let flat = ts
                        .iter()
                        .map(|t| t.flatten_all())
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Ok(Tensor::cat(&flat, 0)?)
                };
                let both = Tensor::stack(&[row(m)?, row(v)?], 0)?;
                f.mv.slice_set(&both, 1, 0)?;
            }
        }
        self.step = steps_taken;
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
    /// The flat layout (the fused kernel's) under the composed step: bitwise the per-tensor optimizer's parameters
    /// and moments, the same checkpoint names and values, and a state round trip either way.
    #[test]
    fn flat_moments_match_per_tensor_moments() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (p, q) = (params(), params());
        let mut per_tensor = AdamW::new(&p, cfg).unwrap();
        let mut flat = AdamW::flat(&q, cfg).unwrap();
        assert!(!flat.runs_fused() && !per_tensor.runs_fused());
        for g in [[0.1f32, -0.2, 0.3, 0.0, -0.5, 1.0], [-0.1, 0.4, 0.2, 0.1, 0.5, -1.0]] {
            per_tensor.step(&p, &p.unflatten(&g).unwrap(), 0.01).unwrap();
            flat.step(&q, &q.unflatten(&g).unwrap(), 0.01).unwrap();
        }
        let values = |ps: &Params| -> Vec<f32> {
            ps.vars()
                .iter()
                .flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        assert_eq!(values(&p), values(&q));
        assert_eq!(flat.steps_taken(), 2);
        let state = |opt: &AdamW, ps: &Params| -> Vec<(String, Vec<usize>, Vec<f32>)> {
            opt.state(ps)
                .into_iter()
                .map(|(n, t)| (n, t.dims().to_vec(), t.flatten_all().unwrap().to_vec1().unwrap()))
                .collect()
        };
        let want = state(&per_tensor, &p);
        assert_eq!(state(&flat, &q), want);
        assert!(want.iter().all(|(_, _, v)| v.iter().any(|x| *x != 0.0)));

        let saved: HashMap<String, Tensor> = per_tensor.state(&p).into_iter().collect();
        let mut loaded = AdamW::flat(&q, cfg).unwrap();
        loaded.load_state(&q, &saved, 2).unwrap();
        assert_eq!((state(&loaded, &q), loaded.steps_taken()), (want.clone(), 2));
        let mut missing = saved;
        missing.remove("b.exp_avg");
        assert!(loaded.load_state(&q, &missing, 5).is_err());
        assert_eq!(
            (state(&loaded, &q), loaded.steps_taken()),
            (want, 2),
            "a failed load changed nothing"
        );

        // The fused step needs a CUDA device.
        let reduced = Tensor::zeros(q.num_elements() + 2, DType::F32, &Device::Cpu).unwrap();
        assert!(flat.fused_step(&q, &reduced, 0.01, 1.0).is_err());
        assert!(!AdamW::for_params(&p, cfg).unwrap().runs_fused());
    }
}
