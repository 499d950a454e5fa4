//! The fused optimizer step (worker/kernels/adamw.cu through `AdamW::fused_step` and `FlatGrads`) against the
//! composed `AdamW::step` on the same GPU, on a small GPT-like set of parameters (matrices and vectors, one scalar,
//! tensors spanning several of the kernel's 4096-element chunks with a partial last one), over several steps with
//! clipping active, off and inactive, and with skipped steps (a NaN loss, a NaN gradient) in between; then the
//! trainer's fused path against its host path.
//!
//! Tolerances (everything is f32 on both sides; the two differ only in rounding: FMA contraction, and the clipping
//! factor, from an f32 norm on the device and an f64 one on the host):
//! * parameters: 2e-6 of max(max|p|, 1) after every step;
//! * moments: 2e-6 of their own largest magnitude (no floor: exp_avg_sq is ~1e-3);
//! * the gradient norm: 1e-5 relative; the loss and the votes: exact (copied, not computed);
//! * skipped steps: parameters, moments and the step count bitwise unchanged;
//! * the trainer, fused vs host path: losses 1e-5 relative, gradient norms 1e-4 relative, parameters 1e-4 absolute
//!   after 6 steps (as the CPU test `device_resident_gradients_match_the_host_path`).
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use lockstep_common::RunSpec;
use lockstep_worker::collective::{Collective, Local};
use lockstep_worker::device_grads::FlatGrads;
use lockstep_worker::optim::{AdamW, AdamWConfig, clip_scale, global_norm};
use lockstep_worker::params::Params;
use lockstep_worker::trainer::Trainer;

use super::{assert_close, gpu, randn};

const CFG: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
};

const SHAPES: [(&str, &[usize]); 9] = [
    ("big.weight", &[300, 70]),
    ("h.0.attn.c_attn.bias", &[144]),
    ("h.0.attn.c_attn.weight", &[48, 144]),
    ("h.0.ln_1.weight", &[48]),
    ("h.0.mlp.c_fc.weight", &[48, 192]),
    ("ln_f.bias", &[48]),
    ("scalar", &[1]),
    ("wpe.weight", &[32, 48]),
    ("wte.weight", &[97, 48]),
];

/// The parameters, the same values every call (fresh storage each time).
fn gpt_params(device: &Device) -> Params {
    let vm = VarMap::new();
    for (i, (name, dims)) in SHAPES.iter().enumerate() {
        let var = Var::from_tensor(&randn(100 + i as u64, dims, 0.5, device)).unwrap();
        vm.data().lock().unwrap().insert(name.to_string(), var);
    }
    Params::from_varmap(&vm).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn values(params: &Params) -> Vec<Vec<f32>> {
    params.vars().iter().map(|v| host(v.as_tensor())).collect()
}

fn moments(opt: &AdamW, params: &Params) -> Vec<(String, Vec<f32>)> {
    opt.state(params).into_iter().map(|(n, t)| (n, host(&t))).collect()
}

/// |got − want| ≤ tol·max|want| on every element.
fn assert_rel(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
        .fold(0f64, f64::max);
    println!("  {what}: max error {worst:.2e} of scale {scale:.2e} (tolerance {tol:.0e})");
    assert!(got.iter().all(|x| x.is_finite()), "{what}: not finite");
    assert!(worst <= tol * scale, "{what}: {worst:.3e} > {tol:.0e} x {scale:.3e}");
}

#[derive(Clone, Copy, Debug)]
enum Case {
    Clip(f64),
    NanLoss,
    NanGrad,
}

/// The flat buffer a step hands the optimizer: gradients, loss, votes.
fn reduced(seed: u64, n: usize, case: Case) -> Vec<f32> {
    let mut flat = host(&randn(seed, &[n], 0.1, &Device::Cpu));
    flat.push(if matches!(case, Case::NanLoss) { f32::NAN } else { 3.25 });
    flat.push(1.0);
    if matches!(case, Case::NanGrad) {
        flat[n / 3] = f32::NAN;
    }
    flat
}

#[test]
fn fused_adamw_matches_the_composed_step_and_skips_non_finite_steps() {
    let dev = gpu();
    let (fused_params, composed_params) = (gpt_params(&dev), gpt_params(&dev));
    let mut fused = AdamW::flat(&fused_params, CFG).unwrap();
    let mut composed = AdamW::new(&composed_params, CFG).unwrap();
    assert!(fused.runs_fused());
    let n = fused_params.num_elements();
    let cases = [
        Case::Clip(1.0),
        Case::Clip(0.0),
        Case::NanLoss,
        Case::Clip(1e6),
        Case::NanGrad,
        Case::Clip(0.5),
    ];
    for (step, case) in cases.into_iter().enumerate() {
        let lr = 1e-2 / (1 + step) as f64;
        println!("step {step}: {case:?}");
        let flat = reduced(step as u64, n, case);
        let before = (
            values(&fused_params),
            moments(&fused, &fused_params),
            fused.steps_taken(),
        );
        let stats = fused
            .fused_step(
                &fused_params,
                &Tensor::from_slice(&flat, n + 2, &dev).unwrap(),
                lr,
                match case {
                    Case::Clip(c) => c,
                    _ => 1.0,
                },
            )
            .unwrap();
        assert_eq!(stats.stop_votes, 1.0);
        if let Case::Clip(max_norm) = case {
            assert!(!stats.skipped);
            assert_eq!(stats.loss, 3.25);
            let norm = global_norm(&flat[..n]);
            assert!(
                (stats.grad_norm - norm).abs() <= 1e-5 * norm,
                "{} vs {norm}",
                stats.grad_norm
            );
            let clip = clip_scale(norm, max_norm) as f32;
            let clipped: Vec<f32> = flat[..n]
                .iter()
                .map(|g| if clip != 1.0 { g * clip } else { *g })
                .collect();
            composed
                .step(&composed_params, &composed_params.unflatten(&clipped).unwrap(), lr)
                .unwrap();
        } else {
            assert!(stats.skipped, "{case:?} must skip");
            let after = (
                values(&fused_params),
                moments(&fused, &fused_params),
                fused.steps_taken(),
            );
            assert!(
                after == before,
                "a skipped step changed the parameters, moments or step count"
            );
        }
        assert_eq!(fused.steps_taken(), composed.steps_taken());
        for ((name, f), c) in fused_params
            .names()
            .iter()
            .zip(fused_params.vars())
            .zip(composed_params.vars())
        {
            assert_close(name, f.as_tensor(), c.as_tensor(), 2e-6);
        }
        for ((name, f), (_, c)) in moments(&fused, &fused_params)
            .iter()
            .zip(moments(&composed, &composed_params))
        {
            assert_rel(name, f, &c, 2e-6);
        }
    }
    assert_eq!(fused.steps_taken(), 4);
}

/// Bitwise the same parameters and moments from the same gradients (fixed reduction orders, no atomics); and the
/// composed step on the flat moments (the trainer's host path on a GPU) does the per-tensor optimizer's math.
#[test]
fn fused_adamw_is_deterministic_and_the_flat_layout_takes_the_composed_step() {
    let dev = gpu();
    let run = || {
        let params = gpt_params(&dev);
        let mut opt = AdamW::flat(&params, CFG).unwrap();
        let n = params.num_elements();
        for step in 0..3 {
            let flat = Tensor::from_vec(reduced(step, n, Case::Clip(1.0)), n + 2, &dev).unwrap();
            opt.fused_step(&params, &flat, 1e-2, 1.0).unwrap();
        }
        (values(&params), moments(&opt, &params))
    };
    assert!(run() == run(), "two runs differ");

    let (flat_params, tensor_params) = (gpt_params(&dev), gpt_params(&dev));
    let mut flat = AdamW::flat(&flat_params, CFG).unwrap();
    let mut per_tensor = AdamW::new(&tensor_params, CFG).unwrap();
    let n = flat_params.num_elements();
    for step in 0..2 {
        let g = reduced(step, n, Case::Clip(0.0));
        flat.step(&flat_params, &flat_params.unflatten(&g[..n]).unwrap(), 1e-2)
            .unwrap();
        per_tensor
            .step(&tensor_params, &tensor_params.unflatten(&g[..n]).unwrap(), 1e-2)
            .unwrap();
    }
    assert!(values(&flat_params) == values(&tensor_params));
    assert!(moments(&flat, &flat_params) == moments(&per_tensor, &tensor_params));
    // The checkpoint's state loads back into flat moments.
    let state: HashMap<String, Tensor> = flat.state(&flat_params).into_iter().collect();
    let mut loaded = AdamW::flat(&flat_params, CFG).unwrap();
    loaded.load_state(&flat_params, &state, 2).unwrap();
    assert!(moments(&loaded, &flat_params) == moments(&flat, &flat_params));
}

/// The persistent buffer on the GPU: micro-batches (one using a weight transposed, so its gradient is strided)
/// add up to the host path's sums, the second step starts afresh, the vote lands in its slot.
#[test]
fn flat_gradients_add_up_like_the_host_path() {
    let dev = gpu();
    let params = gpt_params(&dev);
    let n = params.num_elements();
    let mut acc = FlatGrads::new(&params).unwrap();
    let mut collective: Box<dyn Collective> = Box::new(Local);
    for step in 0..2u64 {
        let mut want = vec![0f32; n];
        let mut loss_sum = 0f32;
        for micro in 0..3 {
            // A loss that reaches every parameter: Σ_p c_p · Σ (p ⊙ r_p), matrices used transposed.
            let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
            for (i, var) in params.vars().iter().enumerate() {
                let t = var.as_tensor();
                let t = if t.rank() == 2 { t.t().unwrap() } else { t.clone() };
                let r = randn(1000 * step + 10 * micro + i as u64, t.dims(), 1.0, &dev);
                loss = (loss + (t * r).unwrap().sqr().unwrap().sum_all().unwrap()).unwrap();
            }
            let loss = (loss * 1e-3).unwrap();
            let grads = loss.backward().unwrap();
            params.accumulate_grads(&grads, &mut want).unwrap();
            loss_sum += loss.to_scalar::<f32>().unwrap();
            acc.add(&params, &grads, &loss).unwrap();
        }
        let vote = step as f32;
        let got = host(&acc.reduce(collective.as_mut(), vote).unwrap());
        want.extend([loss_sum, vote]);
        assert_rel(&format!("step {step}: flat buffer"), &got, &want, 1e-6);
        assert_eq!(got[n + 1], vote);
    }
}

/// The small model of the trainer's CPU tests, on the GPU.
fn spec(checkpoints: &std::path::Path) -> RunSpec {
    let mut spec = RunSpec::default();
    spec.model.n_layer = 2;
    spec.model.n_head = 4;
    spec.model.n_embd = 32;
    spec.train.seq_len = 40;
    spec.train.global_batch = 8;
    spec.train.micro_batch = 4;
    spec.train.total_steps = 6;
    spec.train.warmup_steps = 2;
    spec.train.grad_clip = 0.5;
    spec.checkpoint.dir = checkpoints.to_path_buf();
    spec.checkpoint.keep = 0;
    spec.validate().unwrap();
    spec
}

/// The trainer on the GPU: the fused path (the default there) against the host path with the composed step, a stop
/// vote through the fused path, and a resume from a checkpoint of flat moments.
#[test]
fn the_trainer_fused_path_matches_the_host_path() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let mut fused = Trainer::new(spec.clone(), Box::new(Local), gpu()).unwrap();
    let mut host_path = Trainer::new(spec.clone(), Box::new(Local), gpu()).unwrap();
    host_path.set_device_resident(false);
    let flag = Arc::new(AtomicBool::new(false));
    fused.set_stop_flag(flag.clone());
    let mut checkpoint = None;
    for step in 0..6 {
        if step == 5 {
            flag.store(true, Ordering::SeqCst);
        }
        let (a, b) = (fused.train_step().unwrap(), host_path.train_step().unwrap());
        println!(
            "step {step}: loss {} vs {}, norm {} vs {}",
            a.loss, b.loss, a.grad_norm, b.grad_norm
        );
        assert!((a.loss - b.loss).abs() <= 1e-5 * b.loss.abs(), "step {step}");
        assert!((a.grad_norm - b.grad_norm).abs() <= 1e-4 * b.grad_norm, "step {step}");
        assert!(!a.skipped && a.grad_norm > 0.5, "clipping is exercised");
        assert_eq!(a.stop, step == 5);
        if step == 2 {
            checkpoint = Some(fused.save_checkpoint().unwrap());
        }
    }
    for ((name, a), b) in fused
        .params()
        .names()
        .iter()
        .zip(fused.params().vars())
        .zip(host_path.params().vars())
    {
        let diff = host(a.as_tensor())
            .iter()
            .zip(host(b.as_tensor()))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{name}: largest difference {diff}");
    }

    let checkpoint = checkpoint.unwrap();
    let mut resumed = Trainer::resume(spec, Box::new(Local), gpu(), &checkpoint).unwrap();
    assert_eq!(resumed.step(), 3);
    for _ in 0..3 {
        resumed.train_step().unwrap();
    }
    for ((name, a), b) in resumed
        .params()
        .names()
        .iter()
        .zip(resumed.params().vars())
        .zip(fused.params().vars())
    {
        assert_close(name, a.as_tensor(), b.as_tensor(), 1e-5);
    }
}
