//! The head split and merge kernels (worker/kernels/heads.cu) on the GPU: `ops::split_heads` / `ops::merge_heads`
//! against the candle expressions the model used before them (`reshape · transpose · contiguous` and
//! `transpose · reshape`) on the same GPU, for GPT-2's shape ([16, 1024, 768], 12 heads of 64: the 16-byte pack path)
//! and an odd one (C = 60, 4 heads of 15: the element path), in f32 and bf16, and for views that start one element
//! into their storage (misaligned: the element path with a pack-sized head).
//!
//! Tolerances: none. Both directions are permutations, so the outputs and the input gradients (the upstream gradient
//! permuted back by the other kernel) must equal candle's bit for bit.
use candle_core::{DType, Tensor, Var};
use lockstep_worker::ops;

use super::{gpu, randn};

/// (B, T, nh, hd).
const SHAPES: [(usize, usize, usize, usize); 2] = [(16, 1024, 12, 64), (3, 37, 4, 15)];

fn bits(t: &Tensor) -> Vec<u32> {
    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    t.to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

fn split_candle(x: &Tensor, n_head: usize) -> Tensor {
    ops::composed::split_heads(x, n_head).unwrap()
}

fn merge_candle(y: &Tensor) -> Tensor {
    ops::composed::merge_heads(y).unwrap()
}

/// f of the last `dims` elements of a flat leaf of `offset` more (a view `offset` elements in), and the gradient of
/// Σ f·up with respect to those elements.
fn forward_and_grad(
    f: &dyn Fn(&Tensor) -> Tensor,
    flat: &Tensor,
    offset: usize,
    dims: &[usize],
    up: &Tensor,
) -> (Tensor, Tensor) {
    let leaf = Var::from_tensor(flat).unwrap();
    let n: usize = dims.iter().product();
    let x = leaf.narrow(0, offset, n).unwrap().reshape(dims).unwrap();
    let y = f(&x);
    let grads = (&y * up).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(leaf.as_tensor()).unwrap().narrow(0, offset, n).unwrap();
    (y, g.reshape(dims).unwrap())
}

#[test]
fn split_and_merge_heads_equal_candles_copies_bitwise_forward_and_backward() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        for (i, &(b, t, nh, hd)) in SHAPES.iter().enumerate() {
            for offset in [0, 1] {
                let c = nh * hd;
                let n = b * t * c;
                let what = format!("{dtype:?} B={b} T={t} nh={nh} hd={hd} offset {offset}");
                let seed = 10 * i as u64 + offset as u64;
                let flat = randn(seed, &[n + offset], 1.0, &dev).to_dtype(dtype).unwrap();
                let up = randn(seed + 100, &[b, nh, t, hd], 1.0, &dev).to_dtype(dtype).unwrap();
                let token = [b, t, c];
                let (y, dx) = forward_and_grad(&|x| ops::split_heads(x, nh).unwrap(), &flat, offset, &token, &up);
                let (y_ref, dx_ref) = forward_and_grad(&|x| split_candle(x, nh), &flat, offset, &token, &up);
                assert_eq!(
                    (y.dims(), y.dtype()),
                    (&[b, nh, t, hd][..], dtype),
                    "{what}: split shape"
                );
                assert!(bits(&y) == bits(&y_ref), "{what}: split forward differs from candle's");
                assert!(
                    bits(&dx) == bits(&dx_ref),
                    "{what}: split gradient differs from candle's"
                );

                let up = randn(seed + 200, &token, 1.0, &dev).to_dtype(dtype).unwrap();
                let head = [b, nh, t, hd];
                let (z, dy) = forward_and_grad(&|y| ops::merge_heads(y).unwrap(), &flat, offset, &head, &up);
                let (z_ref, dy_ref) = forward_and_grad(&merge_candle, &flat, offset, &head, &up);
                assert_eq!((z.dims(), z.dtype()), (&token[..], dtype), "{what}: merge shape");
                assert!(bits(&z) == bits(&z_ref), "{what}: merge forward differs from candle's");
                assert!(
                    bits(&dy) == bits(&dy_ref),
                    "{what}: merge gradient differs from candle's"
                );
                let x = flat.narrow(0, offset, n).unwrap();
                let round = ops::merge_heads(&y).unwrap().flatten_all().unwrap();
                assert!(bits(&round) == bits(&x), "{what}: merge of split is not the input");
            }
        }
    }
}
