//! The LayerNorm kernels (worker/kernels/layer_norm.cu) against the composed candle version on the same GPU:
//! `ops::layer_norm` vs `ops::composed::layer_norm`, the output and the gradients of x, weight and bias, over shapes
//! that cover every kernel family: C = 1, C not a multiple of 32, the register kernels up to C = 1024 (768 is
//! GPT-2's), the loop backward (C = 1600, GPT-2 XL) and the loop forward (C = 2100), and enough rows for many
//! backward blocks whose dw and db partial sums the reduction kernel adds.
//!
//! Tolerances, as a fraction of the reference's largest magnitude (at least 1; see `assert_close`):
//! * f32: 1e-4 for everything (float rounding in different summation orders; dw and db sum over all rows).
//! * bf16 x: the reference is the composed version in f32 on the bf16-rounded x with the bf16-rounded upstream
//!   gradient. y and dx are rounded to bf16 once at the end (2^-9 of the element): 2e-2. dw and db are f32 sums of
//!   the same bf16 values on both sides: 1e-4.
use candle_core::{DType, Tensor, Var};
use lockstep_worker::ops;

use super::{assert_close, gpu, randn};

const EPS: f64 = 1e-5;

const SHAPES: [&[usize]; 7] = [
    &[2, 37, 768],
    &[3, 5, 33],
    &[1, 1, 1],
    &[4, 9, 1600],
    &[2, 3, 2100],
    &[5, 7, 1024],
    &[40, 1000, 64],
];

/// y and the gradients of Σ y·up with respect to x, weight and bias.
fn forward_and_grads(
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    (x, w, b): (&Tensor, &Tensor, &Tensor),
    up: &Tensor,
) -> [Tensor; 4] {
    let (xv, wv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
    let grads = (y.to_dtype(DType::F32).unwrap() * up.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let [dx, dw, db] = [&xv, &wv, &bv].map(|v| grads.get(v.as_tensor()).unwrap().clone());
    [y, dx, dw, db]
}

fn fused(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    ops::layer_norm(x, w, b, EPS).unwrap()
}

fn composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    ops::composed::layer_norm(x, w, b, EPS).unwrap()
}

/// x (with a non-zero mean, as a residual stream has), weight, bias, upstream gradient; x and the upstream gradient
/// in `dtype`.
fn inputs(seed: u64, dims: &[usize], dtype: DType) -> (Tensor, Tensor, Tensor, Tensor) {
    let dev = gpu();
    let c = dims[dims.len() - 1];
    let x = (randn(seed, dims, 1.5, &dev) + 0.3).unwrap().to_dtype(dtype).unwrap();
    let w = (randn(seed + 1, &[c], 0.3, &dev) + 1.0).unwrap();
    let b = randn(seed + 2, &[c], 0.2, &dev);
    let up = randn(seed + 3, dims, 1.0, &dev).to_dtype(dtype).unwrap();
    (x, w, b, up)
}

#[test]
fn fused_layer_norm_matches_the_composed_version_forward_and_backward() {
    for dtype in [DType::F32, DType::BF16] {
        for (i, dims) in SHAPES.iter().enumerate() {
            let (x, w, b, up) = inputs(100 * i as u64, dims, dtype);
            let got = forward_and_grads(&fused, (&x, &w, &b), &up);
            let dtypes = got.each_ref().map(|t| t.dtype());
            assert_eq!(
                dtypes,
                [dtype, dtype, DType::F32, DType::F32],
                "{dims:?}: output dtypes"
            );
            let x32 = x.to_dtype(DType::F32).unwrap();
            let want = forward_and_grads(&composed, (&x32, &w, &b), &up);
            let rounded = if dtype == DType::BF16 { 2e-2 } else { 1e-4 };
            for ((name, tol), (g, r)) in [("y", rounded), ("dx", rounded), ("dw", 1e-4), ("db", 1e-4)]
                .iter()
                .zip(got.iter().zip(&want))
            {
                assert_close(&format!("layer norm {dtype:?} {dims:?} {name}"), g, r, *tol);
            }
        }
    }
}

/// No atomics and shape-only launch choices: two runs agree to the bit.
#[test]
fn fused_layer_norm_is_bitwise_reproducible() {
    for dtype in [DType::F32, DType::BF16] {
        for dims in [&[2, 37, 768][..], &[4, 9, 1600], &[40, 1000, 64]] {
            let (x, w, b, up) = inputs(7, dims, dtype);
            let bits = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            let first = forward_and_grads(&fused, (&x, &w, &b), &up).map(|t| bits(&t));
            let second = forward_and_grads(&fused, (&x, &w, &b), &up).map(|t| bits(&t));
            for (name, (a, b)) in ["y", "dx", "dw", "db"].iter().zip(first.iter().zip(&second)) {
                assert!(a == b, "layer norm {dtype:?} {dims:?}: {name} differs between two runs");
            }
        }
    }
}
