//! The fused causal attention on a GPU (worker/kernels/attention.cu, through `ops::flash_attention`, which errors
//! rather than fall back) against the composed matmul-softmax-matmul attention: the output and the gradients of q, k and v, in f32 and bf16, for head sizes 16 to 128 and sequence
//! lengths that are not multiples of the kernels' 64- and 32-row tiles. Only in a `cuda` build, which cannot start
//! without the NVIDIA driver, so never part of the default suite: scripts/gpu-check.sh runs it, once with the
//! default kernels (tensor cores for bf16) and once with LOCKSTEP_ATTENTION_KERNELS=simt.
//!
//! Tolerances, on every element, relative to the largest magnitude in the reference tensor (at least 1):
//! f32 1e-4 (both sides f32; they differ in summation order); bf16 2e-2 (the reference runs in f32 on the same
//! bf16-rounded inputs and upstream gradient; the fused op rounds its output and gradients to bf16, ~4e-3, and
//! feeds the probabilities to the tensor cores as bf16).
//!
//! The packed form the model uses (`flash_self_attention`: q, k, v read as the column thirds of the c_attn product
//! [B, T, 3C], the output written as [B, T, C]) runs the same kernels with other strides: it must give bitwise what
//! splitting the heads, the [B, H, T, D] op and merging them give, and match the composed attention as above.
//!
//! `cargo test --release --features cuda -p lockstep-worker --test attention_gpu -- --ignored --nocapture` also
//! prints the fwd+bwd time of the GPT-2 shape (B=16, H=12, T=1024, D=64, bf16), both forms; scripts/torch_attention.py
//! gives PyTorch's flash-attention time for the same.
#![cfg(feature = "cuda")]

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use lockstep_worker::ops::{composed, flash_attention, flash_self_attention, merge_heads, split_heads};

mod gpu_util;
use gpu_util::{assert_close, gpu, randn};

type AttentionFn = fn(&Tensor, &Tensor, &Tensor, f64) -> lockstep_worker::error::Result<Tensor>;

/// The output and the gradients of q, k, v of Σ attention(q, k, v)·w, all as f32 on the CPU.
fn forward_backward(f: AttentionFn, q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor, scale: f64) -> [Tensor; 4] {
    let vars = [q, k, v].map(|t| Var::from_tensor(t).unwrap());
    let out = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), scale).unwrap();
    assert_eq!(out.dims(), q.dims());
    assert_eq!(out.dtype(), q.dtype());
    let loss = (out.to_dtype(DType::F32).unwrap() * w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grad = |v: &Var| grads.get(v.as_tensor()).expect("a gradient for each input").clone();
    [out, grad(&vars[0]), grad(&vars[1]), grad(&vars[2])]
        .map(|t| t.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap())
}

/// The fused op against the composed one for `[B, H, T, D]` = `dims`, inputs of standard deviation `std`.
fn check(dims: [usize; 4], dtype: DType, std: f32, seed: u64) {
    let device = gpu();
    let scale = 1.0 / (dims[3] as f64).sqrt();
    let round = |t: Tensor| t.to_dtype(dtype).unwrap();
    let [q, k, v] = [0, 1, 2].map(|i| round(randn(seed + i, &dims, std, &device)));
    // The upstream gradient, the same for both sides: through the f32 loss it reaches the fused op as bf16.
    let w = round(randn(seed + 3, &dims, 1.0, &device))
        .to_dtype(DType::F32)
        .unwrap();
    let (tol, reference_inputs) = match dtype {
        DType::F32 => (1e-4, [q.clone(), k.clone(), v.clone()]),
        _ => (2e-2, [&q, &k, &v].map(|t| t.to_dtype(DType::F32).unwrap())),
    };
    println!("{dims:?} {dtype:?} std {std}");
    let fused = forward_backward(flash_attention, &q, &k, &v, &w, scale);
    let [rq, rk, rv] = &reference_inputs;
    let reference = forward_backward(composed::causal_attention, rq, rk, rv, &w, scale);
    for ((name, got), want) in ["output", "dq", "dk", "dv"].iter().zip(&fused).zip(&reference) {
        assert_close(&format!("{dims:?} {dtype:?} {name}"), got, want, tol);
    }
}

const SHAPES: [[usize; 4]; 6] = [
    [2, 3, 1, 64],
    [2, 3, 37, 64],
    [1, 2, 130, 32],
    [2, 4, 257, 16],
    [1, 2, 64, 128],
    [1, 1, 200, 128],
];

#[test]
fn f32_matches_the_composed_attention() {
    for (i, dims) in SHAPES.into_iter().enumerate() {
        check(dims, DType::F32, 1.0, 10 * i as u64);
    }
}

#[test]
fn bf16_matches_the_composed_attention() {
    for (i, dims) in SHAPES.into_iter().enumerate() {
        check(dims, DType::BF16, 1.0, 100 + 10 * i as u64);
    }
}

/// Scores spread over tens of units: the running maximum changes between key tiles and the rescaling matters.
#[test]
fn large_scores_match_the_composed_attention() {
    check([2, 2, 300, 64], DType::F32, 3.0, 200);
    check([2, 2, 300, 64], DType::BF16, 3.0, 210);
}

#[test]
fn gpt2_shape_matches_the_composed_attention() {
    check([16, 12, 1024, 64], DType::F32, 1.0, 300);
    check([16, 12, 1024, 64], DType::BF16, 1.0, 310);
}

/// The output and the gradients of Σ f(buffers)·w with respect to each buffer, as f32 on the CPU: `f` takes the
/// variables themselves, so views it makes of them (at an odd offset) reach the op as views (`Var::from_tensor`
/// copies what it is given to a fresh buffer, so a view made before it would arrive aligned).
fn views_forward_backward(f: &dyn Fn(&[&Tensor]) -> Tensor, buffers: &[Tensor], w: &Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = buffers.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let inputs: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let out = f(&inputs);
    let loss = (out.to_dtype(DType::F32).unwrap() * w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut all = vec![out];
    all.extend(
        vars.iter()
            .map(|v| grads.get(v.as_tensor()).expect("a gradient for each input").clone()),
    );
    all.into_iter()
        .map(|t| t.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap())
        .collect()
}

/// Elements `at..` of a flat buffer as `dims`: a view starting there, or (`aligned`) a fresh copy at offset 0.
fn view_at(buffer: &Tensor, at: usize, dims: &[usize], aligned: bool) -> Tensor {
    let n: usize = dims.iter().product();
    let view = buffer.narrow(0, at, n).unwrap().reshape(dims).unwrap();
    if aligned {
        view.affine(1.0, 0.0).unwrap() // exact, into new storage
    } else {
        view
    }
}

/// Contiguous inputs that start at an odd element of their buffers (views of larger ones): the tensor-core
/// kernels' 16-byte copies need them moved first; the results must be those of aligned copies, bitwise.
#[test]
fn inputs_at_an_odd_offset_match() {
    let device = gpu();
    let dims = [2, 2, 70, 64];
    let n: usize = dims.iter().product();
    let buffers = [400, 401, 402].map(|seed| randn(seed, &[n + 3], 1.0, &device).to_dtype(DType::BF16).unwrap());
    let w = randn(403, &dims, 1.0, &device)
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let run = |aligned: bool| {
        let f = |b: &[&Tensor]| {
            let [q, k, v] = [0, 1, 2].map(|i| view_at(b[i], 3, &dims, aligned));
            flash_attention(&q, &k, &v, 0.125).unwrap()
        };
        views_forward_backward(&f, &buffers, &w)
    };
    let (shifted, aligned) = (run(false), run(true));
    for ((name, a), b) in ["output", "d(q buffer)", "d(k buffer)", "d(v buffer)"]
        .iter()
        .zip(&shifted)
        .zip(&aligned)
    {
        assert_close(&format!("odd offset {name}"), a, b, 0.0);
    }
}

/// DESIGN.md §3: a run is bitwise reproducible, so the kernels may not depend on timing (no atomics).
#[test]
fn results_are_bitwise_reproducible() {
    let device = gpu();
    for dtype in [DType::F32, DType::BF16] {
        let dims = [2, 3, 333, 64];
        let [q, k, v] = [500, 501, 502].map(|s| randn(s, &dims, 1.0, &device).to_dtype(dtype).unwrap());
        let w = randn(503, &dims, 1.0, &device);
        let bits = |ts: [Tensor; 4]| ts.map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let first = bits(forward_backward(flash_attention, &q, &k, &v, &w, 0.125));
        let second = bits(forward_backward(flash_attention, &q, &k, &v, &w, 0.125));
        for (i, (a, b)) in first.iter().zip(&second).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "{dtype:?}: result {i} (output, dq, dk, dv) differs between two identical runs"
            );
        }
    }
}

/// What the packed op replaces: the column thirds of `qkv` split into heads, the [B, H, T, D] op, the heads merged.
fn split_flash_merge(qkv: &Tensor, n_head: usize, scale: f64) -> lockstep_worker::error::Result<Tensor> {
    let c = qkv.dim(2)? / 3;
    let heads = |i: usize| split_heads(&qkv.narrow(2, i * c, c)?, n_head);
    merge_heads(&flash_attention(&heads(0)?, &heads(1)?, &heads(2)?, scale)?)
}

type PackedFn = fn(&Tensor, usize, f64) -> lockstep_worker::error::Result<Tensor>;

/// y and dQKV of Σ f(qkv)·w, as f32 on the CPU.
fn packed_forward_backward(f: PackedFn, qkv: &Tensor, n_head: usize, w: &Tensor, scale: f64) -> [Tensor; 2] {
    let var = Var::from_tensor(qkv).unwrap();
    let y = f(var.as_tensor(), n_head, scale).unwrap();
    assert_eq!(y.dtype(), qkv.dtype());
    let loss = (y.to_dtype(DType::F32).unwrap() * w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let dqkv = grads.get(var.as_tensor()).expect("a gradient for qkv").clone();
    [y, dqkv].map(|t| t.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap())
}

/// [B, T, H, D] shapes of the packed tests: several sequences and heads, T around and off the 32/64-row tiles.
const PACKED: [[usize; 4]; 5] = [
    [2, 1, 3, 64],
    [2, 37, 3, 64],
    [3, 130, 2, 32],
    [2, 257, 4, 16],
    [2, 70, 2, 128],
];

/// The packed op against the split one (bitwise: the same kernels and arithmetic, other addresses) and against the
/// composed attention (the tolerances of `check`).
fn check_packed([b, t, h, d]: [usize; 4], dtype: DType, seed: u64) {
    let device = gpu();
    let c = h * d;
    let scale = 1.0 / (d as f64).sqrt();
    let qkv = randn(seed, &[b, t, 3 * c], 1.0, &device).to_dtype(dtype).unwrap();
    let w = randn(seed + 1, &[b, t, c], 1.0, &device)
        .to_dtype(dtype)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let what = format!("packed B={b} T={t} H={h} D={d} {dtype:?}");
    println!("{what}");
    let packed = packed_forward_backward(flash_self_attention, &qkv, h, &w, scale);
    let split = packed_forward_backward(split_flash_merge, &qkv, h, &w, scale);
    for ((name, a), b) in ["y", "dqkv"].iter().zip(&packed).zip(&split) {
        assert_close(&format!("{what} {name} vs split heads"), a, b, 0.0);
    }
    let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    let reference_qkv = qkv.to_dtype(DType::F32).unwrap();
    let composed = packed_forward_backward(composed::causal_self_attention, &reference_qkv, h, &w, scale);
    for ((name, a), b) in ["y", "dqkv"].iter().zip(&packed).zip(&composed) {
        assert_close(&format!("{what} {name} vs composed"), a, b, tol);
    }
}

#[test]
fn packed_f32_matches_the_split_heads_bitwise_and_the_composed_attention() {
    for (i, dims) in PACKED.into_iter().enumerate() {
        check_packed(dims, DType::F32, 700 + 10 * i as u64);
    }
}

#[test]
fn packed_bf16_matches_the_split_heads_bitwise_and_the_composed_attention() {
    for (i, dims) in PACKED.into_iter().enumerate() {
        check_packed(dims, DType::BF16, 800 + 10 * i as u64);
    }
    check_packed([16, 1024, 12, 64], DType::BF16, 900);
}

/// A qkv that starts at an odd element of its buffer: moved to an aligned copy first, bitwise the same results.
#[test]
fn packed_input_at_an_odd_offset_matches() {
    let device = gpu();
    let dims = [2, 70, 3 * 128];
    let n: usize = dims.iter().product();
    let buffer = randn(950, &[n + 5], 1.0, &device).to_dtype(DType::BF16).unwrap();
    let w = randn(951, &[2, 70, 128], 1.0, &device);
    let run = |aligned: bool| {
        let f = |b: &[&Tensor]| flash_self_attention(&view_at(b[0], 5, &dims, aligned), 2, 0.125).unwrap();
        views_forward_backward(&f, std::slice::from_ref(&buffer), &w)
    };
    let (shifted, aligned) = (run(false), run(true));
    for ((name, a), b) in ["y", "d(buffer)"].iter().zip(&shifted).zip(&aligned) {
        assert_close(&format!("packed odd offset {name}"), a, b, 0.0);
    }
}

/// Milliseconds per call of `f` (median of 10 after 3 warm-up calls), the device synchronised around each.
fn time_ms(device: &Device, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut ms: Vec<f64> = (0..10)
        .map(|_| {
            device.synchronize().unwrap();
            let start = Instant::now();
            f();
            device.synchronize().unwrap();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

/// Issue 8's speed bar: fwd+bwd of B=16, H=12, T=1024, D=64 in bf16 within 2x of PyTorch's flash attention
/// (scripts/torch_attention.py prints that); and the packed form the model runs against splitting and merging the
/// heads around the [B, H, T, D] op. Prints, asserts nothing about time.
#[test]
#[ignore = "a timing for the GPU check's report, not a test"]
fn time_gpt2_shape_bf16() {
    let device = gpu();
    let dims = [16, 12, 1024, 64];
    let [q, k, v] = [600, 601, 602].map(|s| randn(s, &dims, 1.0, &device).to_dtype(DType::BF16).unwrap());
    let w = randn(603, &dims, 1.0, &device).to_dtype(DType::BF16).unwrap();
    let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
    let [qv, kv, vv] = vars.each_ref().map(|v| v.as_tensor());
    for (name, f) in [
        ("fused", flash_attention as AttentionFn),
        ("composed", composed::causal_attention),
    ] {
        let fwd = time_ms(&device, || {
            f(qv, kv, vv, 0.125).unwrap();
        });
        let fwd_bwd = time_ms(&device, || {
            let out = f(qv, kv, vv, 0.125).unwrap();
            (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        });
        println!("attention {name} {dims:?} bf16: forward {fwd:.3} ms, forward+backward {fwd_bwd:.3} ms");
    }
    let qkv = randn(604, &[16, 1024, 3 * 768], 1.0, &device)
        .to_dtype(DType::BF16)
        .unwrap();
    let qkv = Var::from_tensor(&qkv).unwrap();
    let w = randn(605, &[16, 1024, 768], 1.0, &device)
        .to_dtype(DType::BF16)
        .unwrap();
    for (name, f) in [
        ("packed qkv -> y", flash_self_attention as PackedFn),
        ("split heads, fused, merge", split_flash_merge),
    ] {
        let fwd = time_ms(&device, || {
            f(qkv.as_tensor(), 12, 0.125).unwrap();
        });
        let fwd_bwd = time_ms(&device, || {
            let out = f(qkv.as_tensor(), 12, 0.125).unwrap();
            (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        });
        println!("self-attention {name} [16, 1024, 2304] bf16: forward {fwd:.3} ms, forward+backward {fwd_bwd:.3} ms");
    }
}
