//! The embedding kernels (worker/kernels/embedding.cu) on the GPU: `ops::embedding` against candle's `index_select`
//! on the same GPU, and the gradient against its specification, for GPT-2's table and micro-batch (V = 50304,
//! C = 768, N = 16384: the ids skewed towards small ids, most of the vocabulary absent, and every 8th position one
//! of ids 0, 1 and 2, some 680 positions each, as a frequent token's long run through the 16-byte path) and a small
//! odd shape (C not a multiple of a 16-byte pack: the scalar paths, and V odd).
//!
//! Tolerances:
//! * forward: exact (a copy), in f32 and bf16.
//! * gradient: bitwise the sequential f32 sum of the upstream rows in increasing position order, rounded once to the
//!   weight's dtype (computed on the host). Against candle's `index_select` gradient (which also sums in position
//!   order, but in the weight's dtype: bf16 rounds at every add): f32 to 1e-6 of the largest magnitude; bf16 against
//!   the f32 gradient to 2^-8 (one bf16 rounding of the result).
//! * two backward runs: bitwise equal.
use candle_core::{DType, Device, Tensor, Var};
use lockstep_worker::ops;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{assert_close, gpu, randn};

const SHAPES: [(usize, usize, usize); 2] = [(50304, 768, 16384), (37, 13, 301)];

/// `n` ids below `v`, skewed towards small ids (the min of two uniforms) as a tokenizer's frequent tokens are.
fn ids(seed: u64, n: usize, v: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.random_range(0..v).min(rng.random_range(0..v)) as u32)
        .collect()
}

/// The output and the gradient of Σ f(weight)·up with respect to the weight.
fn forward_and_grad(f: &dyn Fn(&Tensor) -> Tensor, weight: &Tensor, up: &Tensor) -> (Tensor, Tensor) {
    let w = Var::from_tensor(weight).unwrap();
    let y = f(w.as_tensor());
    let grads = (&y * up).unwrap().sum_all().unwrap().backward().unwrap();
    let dw = grads.get(w.as_tensor()).unwrap().clone();
    (y, dw)
}

fn bits(t: &Tensor) -> Vec<u32> {
    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    t.to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// The specification: per row, 0 + g_p0 + g_p1 + ... in f32 over its positions in increasing order (ids ≥ V left
/// out), then rounded to `dtype`.
fn sequential(up: &Tensor, ids: &[u32], v: usize, c: usize, dtype: DType) -> Tensor {
    let g = up
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut dw = vec![0f32; v * c];
    for (p, &id) in ids.iter().enumerate() {
        if (id as usize) < v {
            let row = id as usize * c;
            for (d, &x) in dw[row..row + c].iter_mut().zip(&g[p * c..(p + 1) * c]) {
                *d += x;
            }
        }
    }
    Tensor::from_vec(dw, (v, c), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn fused_embedding_matches_index_select_and_sums_in_position_order() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        for (i, &(v, c, n)) in SHAPES.iter().enumerate() {
            let what = format!("embedding {dtype:?} V={v} C={c} N={n}");
            let mut id_list = ids(i as u64, n, v);
            if i == 0 {
                for p in (0..n).step_by(8) {
                    id_list[p] = (p / 8 % 3) as u32;
                }
            }
            let idt = Tensor::from_vec(id_list.clone(), n, &dev).unwrap();
            let weight = randn(10 + i as u64, &[v, c], 0.02, &dev).to_dtype(dtype).unwrap();
            let up = randn(20 + i as u64, &[n, c], 1.0, &dev).to_dtype(dtype).unwrap();

            let (y, dw) = forward_and_grad(&|w| ops::embedding(w, &idt).unwrap(), &weight, &up);
            let y_ref = weight.index_select(&idt, 0).unwrap();
            assert_eq!((y.dtype(), dw.dtype()), (dtype, dtype), "{what}: dtypes");
            assert!(bits(&y) == bits(&y_ref), "{what}: forward differs from index_select");
            let want = sequential(&up, &id_list, v, c, dtype);
            assert!(
                bits(&dw) == bits(&want),
                "{what}: gradient differs from the sequential sum"
            );
            if dtype == DType::F32 {
                let (_, dw_ref) = forward_and_grad(&|w| w.index_select(&idt, 0).unwrap(), &weight, &up);
                assert_close(&format!("{what} gradient vs index_select"), &dw, &dw_ref, 1e-6);
            } else {
                let w32 = weight.to_dtype(DType::F32).unwrap();
                let up32 = up.to_dtype(DType::F32).unwrap();
                let (_, dw32) = forward_and_grad(&|w| w.index_select(&idt, 0).unwrap(), &w32, &up32);
                assert_close(&format!("{what} gradient vs f32 index_select"), &dw, &dw32, 1.0 / 256.0);
            }
        }
    }
}

/// No atomics and shape-only launches: two backward runs agree to the bit.
#[test]
fn fused_embedding_backward_is_bitwise_reproducible() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        let (v, c, n) = SHAPES[0];
        let idt = Tensor::from_vec(ids(3, n, v), n, &dev).unwrap();
        let weight = randn(4, &[v, c], 0.02, &dev).to_dtype(dtype).unwrap();
        let up = randn(5, &[n, c], 1.0, &dev).to_dtype(dtype).unwrap();
        let run = || bits(&forward_and_grad(&|w| ops::embedding(w, &idt).unwrap(), &weight, &up).1);
        assert!(
            run() == run(),
            "embedding {dtype:?}: the gradient differs between two runs"
        );
    }
}

/// An id ≥ V: its forward row is NaN (the GPU does not refuse it: that would need a host sync), every other row is
/// exact, and the gradient leaves it out.
#[test]
fn fused_embedding_makes_out_of_range_rows_nan_and_leaves_them_out_of_the_gradient() {
    let dev = gpu();
    let (v, c, n) = (37, 16, 50);
    let mut id_list = ids(6, n, v);
    id_list[7] = v as u32;
    id_list[31] = u32::MAX;
    let idt = Tensor::from_vec(id_list.clone(), n, &dev).unwrap();
    let weight = randn(7, &[v, c], 1.0, &dev);
    let up = randn(8, &[n, c], 1.0, &dev);
    let (y, dw) = forward_and_grad(&|w| ops::embedding(w, &idt).unwrap(), &weight, &up);
    let rows = y.to_vec2::<f32>().unwrap();
    let table = weight.to_vec2::<f32>().unwrap();
    for (p, (row, &id)) in rows.iter().zip(&id_list).enumerate() {
        match table.get(id as usize) {
            Some(want) => assert_eq!(row, want, "row {p} (id {id})"),
            None => assert!(row.iter().all(|x| x.is_nan()), "row {p} (id {id} ≥ {v}): {row:?}"),
        }
    }
    assert!(bits(&dw) == bits(&sequential(&up, &id_list, v, c, DType::F32)));
}
