//! The softmax cross-entropy kernels (worker/kernels/cross_entropy.cu) against the composed candle version on the
//! same GPU: `ops::cross_entropy_sum` (f32 or bf16 logits read as they are) vs `ops::composed::cross_entropy_sum` on
//! f32 logits (for bf16, the same bf16-rounded values widened), the summed loss and dlogits for an upstream
//! gradient of 0.7 (loss·0.7), with ignored rows, over vocabularies that are not multiples of the kernels' block or
//! vector width, and with the logits a view at an odd offset (misaligned rows for the vector loads).
//!
//! Tolerances, on every element, relative to the largest magnitude in the reference (at least 1): the loss 1e-5 in
//! both dtypes (f32 arithmetic on the same values; only summation orders differ); dlogits 1e-5 in f32 and 1e-2 in
//! bf16 (the fused gradient is rounded to bf16, ~4e-3 of an element).
use candle_core::{DType, Device, Tensor, Var};
use lockstep_common::data::IGNORE;
use lockstep_worker::ops::{composed, cross_entropy_sum};

use super::{assert_close, gpu, randn};

const UPSTREAM: f64 = 0.7;

/// Targets for `n` rows of `vocab`: scattered ids, every fifth row from the third on ignored.
fn targets(n: usize, vocab: usize, device: &Device) -> Tensor {
    let t: Vec<u32> = (0..n)
        .map(|i| {
            if i % 5 == 2 {
                IGNORE
            } else {
                ((i * 7919 + 13) % vocab) as u32
            }
        })
        .collect();
    Tensor::from_vec(t, n, device).unwrap()
}

/// Logits `[n, vocab]` in `dtype` on the GPU, at element `offset` of their buffer (a contiguous view), and the Var
/// that owns them (flat, f32 or the dtype).
fn logits(seed: u64, n: usize, vocab: usize, dtype: DType, offset: usize) -> (Var, Tensor) {
    let flat = randn(seed, &[n * vocab + offset], 3.0, &gpu()).to_dtype(dtype).unwrap();
    let var = Var::from_tensor(&flat).unwrap();
    let x = var.narrow(0, offset, n * vocab).unwrap().reshape((n, vocab)).unwrap();
    (var, x)
}

type Ce = fn(&Tensor, &Tensor) -> lockstep_worker::error::Result<Tensor>;

/// The loss and the gradient of loss·UPSTREAM with respect to the Var behind `x`, both f32 on the CPU.
fn loss_and_grad(f: Ce, var: &Var, x: &Tensor, t: &Tensor) -> (Tensor, Tensor) {
    let loss = f(x, t).unwrap();
    assert_eq!(loss.dims(), [0usize; 0]);
    assert_eq!(loss.dtype(), DType::F32);
    let grads = (&loss * UPSTREAM).unwrap().backward().unwrap();
    let grad = grads.get(var.as_tensor()).expect("a gradient for the logits").clone();
    assert_eq!(grad.dtype(), var.dtype());
    let cpu = |t: Tensor| t.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
    (cpu(loss), cpu(grad))
}

fn check(n: usize, vocab: usize, dtype: DType, offset: usize) {
    let what = format!("cross-entropy {dtype:?} [{n}, {vocab}] offset {offset}");
    let t = targets(n, vocab, &gpu());
    let (var, x) = logits(n as u64 * 31 + vocab as u64, n, vocab, dtype, offset);
    let (loss, grad) = loss_and_grad(cross_entropy_sum, &var, &x, &t);
    // The reference on f32 copies of the same values.
    let (ref_var, ref_x) = {
        let v = Var::from_tensor(&var.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        let x = v.narrow(0, offset, n * vocab).unwrap().reshape((n, vocab)).unwrap();
        (v, x)
    };
    let (ref_loss, ref_grad) = loss_and_grad(composed::cross_entropy_sum, &ref_var, &ref_x, &t);
    assert_close(&format!("{what} loss"), &loss, &ref_loss, 1e-5);
    let tol = if dtype == DType::BF16 { 1e-2 } else { 1e-5 };
    assert_close(&format!("{what} dlogits"), &grad, &ref_grad, tol);
    // Ignored rows: exactly zero.
    let targets = t.to_vec1::<u32>().unwrap();
    let rows = grad.narrow(0, offset, n * vocab).unwrap().reshape((n, vocab)).unwrap();
    let rows = rows.to_vec2::<f32>().unwrap();
    for (r, row) in rows.iter().enumerate().filter(|(r, _)| targets[*r] == IGNORE) {
        assert!(row.iter().all(|&g| g == 0.0), "{what}: ignored row {r} has a gradient");
    }
}

#[test]
fn cross_entropy_f32_matches_composed() {
    for (n, vocab) in [(37, 50304), (5, 19), (1, 1), (300, 1000)] {
        check(n, vocab, DType::F32, 0);
    }
    for (n, vocab) in [(5, 19), (300, 1000), (3, 50304)] {
        check(n, vocab, DType::F32, 1);
    }
}

#[test]
fn cross_entropy_bf16_matches_composed() {
    for (n, vocab) in [(37, 50304), (5, 19), (1, 1), (300, 1000)] {
        check(n, vocab, DType::BF16, 0);
    }
    for (n, vocab) in [(5, 19), (300, 1000), (3, 50304)] {
        check(n, vocab, DType::BF16, 1);
    }
}

/// Fixed reduction orders, no atomics: the loss and the gradient are bitwise the same run to run.
#[test]
fn cross_entropy_is_deterministic() {
    for dtype in [DType::F32, DType::BF16] {
        let (n, vocab) = (64, 50304);
        let t = targets(n, vocab, &gpu());
        let (var, x) = logits(7, n, vocab, dtype, 0);
        let (loss, grad) = loss_and_grad(cross_entropy_sum, &var, &x, &t);
        for _ in 0..3 {
            let (again, grad_again) = loss_and_grad(cross_entropy_sum, &var, &x, &t);
            assert_eq!(
                loss.to_scalar::<f32>().unwrap().to_bits(),
                again.to_scalar::<f32>().unwrap().to_bits(),
                "{dtype:?}: the loss differs between runs"
            );
            let (a, b) = (grad.to_vec1::<f32>().unwrap(), grad_again.to_vec1::<f32>().unwrap());
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{dtype:?}: the gradient differs between runs"
            );
        }
    }
}

/// Only ignored rows: a loss of exactly 0 and a zero gradient. A target out of range (refused by the CPU op, which
/// has the targets on the host) makes the loss NaN on the GPU rather than reading out of bounds.
#[test]
fn cross_entropy_edge_cases() {
    let device = gpu();
    for dtype in [DType::F32, DType::BF16] {
        let (var, x) = logits(3, 4, 65, dtype, 0);
        let none = Tensor::new(&[IGNORE; 4], &device).unwrap();
        let (loss, grad) = loss_and_grad(cross_entropy_sum, &var, &x, &none);
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0, "{dtype:?}: all rows ignored");
        assert!(grad.to_vec1::<f32>().unwrap().iter().all(|&g| g == 0.0));

        let bad = Tensor::new(&[1u32, 65, 2, 70000], &device).unwrap();
        let loss = cross_entropy_sum(&x, &bad).unwrap().to_scalar::<f32>().unwrap();
        assert!(loss.is_nan(), "{dtype:?}: a target out of range gives {loss}, not NaN");
    }
}
