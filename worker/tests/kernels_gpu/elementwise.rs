//! The GELU, bias-add and fused bias+GELU kernels (worker/kernels/elementwise.cu) against the composed candle
//! versions on the same GPU: `ops::gelu` vs `ops::composed::gelu` (candle's tanh GELU), `ops::bias_add` vs
//! `broadcast_add`, and `ops::bias_gelu` vs both (and bitwise vs `ops::bias_add` then `ops::gelu`), outputs and
//! every input gradient.
//!
//! Tolerances, as a fraction of the reference's largest magnitude (at least 1; see `assert_close`): f32 1e-5 (the
//! two differ by float rounding and candle's 6-digit constants in its GELU backward); bf16 1e-2, the reference
//! computed in f32 from the same bf16-rounded inputs and upstream gradients (the fused path rounds each result to
//! bf16 once: 2^-9 of the element). The bias's dx is the upstream gradient itself, so it must match exactly.
use candle_core::{DType, Tensor, Var};
use lockstep_worker::ops;

use super::{assert_close, gpu, randn};

const SHAPES: [&[usize]; 4] = [&[2, 37, 3072], &[3, 5, 33], &[1], &[16, 9, 768]];

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::BF16 { 1e-2 } else { 1e-5 }
}

/// f(x) and d/dx of Σ f(x)·w, on the tensors given (their dtype).
fn gelu_and_grad(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, w: &Tensor) -> (Tensor, Tensor) {
    let x = Var::from_tensor(x).unwrap();
    let y = f(x.as_tensor());
    let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(x.as_tensor()).unwrap().clone();
    (y, dx)
}

fn fused_gelu(x: &Tensor) -> Tensor {
    ops::gelu(x).unwrap()
}

fn composed_gelu(x: &Tensor) -> Tensor {
    ops::composed::gelu(x).unwrap()
}

#[test]
fn fused_gelu_matches_the_composed_gelu_forward_and_backward() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        for (i, dims) in SHAPES.iter().enumerate() {
            let seed = 10 * i as u64;
            // Wide inputs reach both tails; the bf16 reference sees exactly the bf16 values.
            let x = randn(seed, dims, 3.0, &dev).to_dtype(dtype).unwrap();
            let w = randn(seed + 1, dims, 1.0, &dev).to_dtype(dtype).unwrap();
            let (y, dx) = gelu_and_grad(&fused_gelu, &x, &w);
            assert_eq!((y.dtype(), dx.dtype()), (dtype, dtype));
            let (x32, w32) = (x.to_dtype(DType::F32).unwrap(), w.to_dtype(DType::F32).unwrap());
            let (y_ref, dx_ref) = gelu_and_grad(&composed_gelu, &x32, &w32);
            let what = format!("gelu {dtype:?} {dims:?}");
            assert_close(&format!("{what} y"), &y, &y_ref, tolerance(dtype));
            assert_close(&format!("{what} dx"), &dx, &dx_ref, tolerance(dtype));
        }
    }
}

#[test]
fn fused_gelu_handles_inputs_that_start_off_a_16_byte_boundary() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        // One element in (narrowed after the Var, which copies): the kernels' scalar path.
        let x = randn(50, &[4100], 3.0, &dev).to_dtype(dtype).unwrap();
        let w = randn(51, &[4099], 1.0, &dev).to_dtype(dtype).unwrap();
        let (y, dx) = gelu_and_grad(&|x| fused_gelu(&x.narrow(0, 1, 4099).unwrap()), &x, &w);
        let (x32, w32) = (x.to_dtype(DType::F32).unwrap(), w.to_dtype(DType::F32).unwrap());
        let (y_ref, dx_ref) = gelu_and_grad(&|x| composed_gelu(&x.narrow(0, 1, 4099).unwrap()), &x32, &w32);
        assert_close(&format!("gelu {dtype:?} offset y"), &y, &y_ref, tolerance(dtype));
        assert_close(&format!("gelu {dtype:?} offset dx"), &dx, &dx_ref, tolerance(dtype));
    }
}

/// x + bias and the gradients of Σ (x + bias)·w with respect to x and bias.
fn bias_and_grads(
    f: &dyn Fn(&Tensor, &Tensor) -> Tensor,
    x: &Tensor,
    b: &Tensor,
    w: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let (xv, bv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(b).unwrap());
    let y = f(xv.as_tensor(), bv.as_tensor());
    let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
    (y, grad(&xv), grad(&bv))
}

/// `view` picks the op's input from the variable x (a narrowed view survives; `Var::from_tensor` copies).
fn check_bias_add(x: &Tensor, b: &Tensor, w: &Tensor, view: &dyn Fn(&Tensor) -> Tensor, what: &str) {
    let dtype = x.dtype();
    let (y, dx, db) = bias_and_grads(&|x, b| ops::bias_add(&view(x), b).unwrap(), x, b, w);
    assert_eq!((y.dtype(), dx.dtype(), db.dtype()), (dtype, dtype, dtype));
    let [x32, b32, w32] = [x, b, w].map(|t| t.to_dtype(DType::F32).unwrap());
    let (y_ref, dx_ref, db_ref) = bias_and_grads(&|x, b| view(x).broadcast_add(b).unwrap(), &x32, &b32, &w32);
    assert_close(&format!("{what} y"), &y, &y_ref, tolerance(dtype));
    assert_close(&format!("{what} dx"), &dx, &dx_ref, 0.0);
    assert_close(&format!("{what} db"), &db, &db_ref, tolerance(dtype));
}

#[test]
fn fused_bias_add_matches_broadcast_add_forward_and_backward() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        // The test shapes, and GPT-2's: 16x1024 rows of 768 (many row chunks in the bias gradient).
        for (i, dims) in SHAPES.iter().chain([&[16usize, 1024, 768][..]].iter()).enumerate() {
            let seed = 100 + 10 * i as u64;
            let c = dims[dims.len() - 1];
            let x = randn(seed, dims, 1.0, &dev).to_dtype(dtype).unwrap();
            let b = randn(seed + 1, &[c], 1.0, &dev).to_dtype(dtype).unwrap();
            let w = randn(seed + 2, dims, 1.0, &dev).to_dtype(dtype).unwrap();
            check_bias_add(&x, &b, &w, &|x| x.clone(), &format!("bias-add {dtype:?} {dims:?}"));
        }
        // An input one element off a 16-byte boundary: the forward's scalar path.
        let (rows, c) = (37, 768);
        let x = randn(200, &[rows * c + 1], 1.0, &dev).to_dtype(dtype).unwrap();
        let b = randn(201, &[c], 1.0, &dev).to_dtype(dtype).unwrap();
        let w = randn(202, &[rows, c], 1.0, &dev).to_dtype(dtype).unwrap();
        let view = |x: &Tensor| x.narrow(0, 1, rows * c).unwrap().reshape((rows, c)).unwrap();
        check_bias_add(&x, &b, &w, &view, &format!("bias-add {dtype:?} offset [{rows}, {c}]"));
    }
}

#[test]
fn the_bias_gradient_is_bitwise_reproducible() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        let x = randn(300, &[16, 1024, 768], 1.0, &dev).to_dtype(dtype).unwrap();
        let b = randn(301, &[768], 1.0, &dev).to_dtype(dtype).unwrap();
        let w = randn(302, &[16, 1024, 768], 1.0, &dev).to_dtype(dtype).unwrap();
        let run = || {
            let (_, _, db) = bias_and_grads(&|x, b| ops::bias_add(x, b).unwrap(), &x, &b, &w);
            db.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
        };
        let first = run();
        for _ in 0..3 {
            let again = run();
            assert!(
                first.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()),
                "bias-add {dtype:?}: db differs between runs"
            );
        }
    }
}

/// The fused bias+GELU (`ops::bias_gelu`) against `ops::bias_add` then `ops::gelu` on the same GPU, which it must
/// equal bitwise (the same per-element functions and bias-gradient sum), and against the composed candle versions in
/// f32 (the tolerances above); `view` as in `check_bias_add`.
fn check_bias_gelu(x: &Tensor, b: &Tensor, w: &Tensor, view: &dyn Fn(&Tensor) -> Tensor, what: &str) {
    let dtype = x.dtype();
    let fused = bias_and_grads(&|x, b| ops::bias_gelu(&view(x), b).unwrap(), x, b, w);
    let apart = bias_and_grads(
        &|x, b| ops::gelu(&ops::bias_add(&view(x), b).unwrap()).unwrap(),
        x,
        b,
        w,
    );
    let [x32, b32, w32] = [x, b, w].map(|t| t.to_dtype(DType::F32).unwrap());
    let composed = |x: &Tensor, b: &Tensor| composed_gelu(&view(x).broadcast_add(b).unwrap());
    let reference = bias_and_grads(&composed, &x32, &b32, &w32);
    let parts = |t: &(Tensor, Tensor, Tensor)| [t.0.clone(), t.1.clone(), t.2.clone()];
    for (((name, f), a), r) in ["y", "dx", "db"]
        .iter()
        .zip(parts(&fused))
        .zip(parts(&apart))
        .zip(parts(&reference))
    {
        assert_eq!(f.dtype(), dtype, "{what} {name}");
        assert_close(&format!("{what} {name} vs bias-add then GELU"), &f, &a, 0.0);
        assert_close(&format!("{what} {name} vs composed"), &f, &r, tolerance(dtype));
    }
}

#[test]
fn fused_bias_gelu_is_bias_add_then_gelu_bitwise_and_matches_the_composed_version() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        // The test shapes, and GPT-2's c_fc output: 16x1024 rows of 3072.
        for (i, dims) in SHAPES.iter().chain([&[16usize, 1024, 3072][..]].iter()).enumerate() {
            let seed = 400 + 10 * i as u64;
            let c = dims[dims.len() - 1];
            let x = randn(seed, dims, 2.0, &dev).to_dtype(dtype).unwrap();
            let b = randn(seed + 1, &[c], 1.0, &dev).to_dtype(dtype).unwrap();
            let w = randn(seed + 2, dims, 1.0, &dev).to_dtype(dtype).unwrap();
            check_bias_gelu(&x, &b, &w, &|x| x.clone(), &format!("bias-gelu {dtype:?} {dims:?}"));
        }
        // One element off a 16-byte boundary: the kernels' scalar path.
        let (rows, c) = (37, 768);
        let x = randn(500, &[rows * c + 1], 2.0, &dev).to_dtype(dtype).unwrap();
        let b = randn(501, &[c], 1.0, &dev).to_dtype(dtype).unwrap();
        let w = randn(502, &[rows, c], 1.0, &dev).to_dtype(dtype).unwrap();
        let view = |x: &Tensor| x.narrow(0, 1, rows * c).unwrap().reshape((rows, c)).unwrap();
        check_bias_gelu(&x, &b, &w, &view, &format!("bias-gelu {dtype:?} offset [{rows}, {c}]"));
    }
}
