//! GELU after a linear layer's bias, as one op: y = gelu(x + b), b `[C]` broadcast over the rows of x `[.., C]` (the
//! MLP's c_fc). Backward: dx = dy·gelu'(x + b), db = Σ_rows dx.
//!
//! Apart, the bias add writes h = x + b, GELU reads it back and keeps it for its backward, while the bias add's node
//! keeps x: two `[B·T, 4C]` activations per layer alive until the backward, and a write and a read of h each way.
//! Fused, h is never stored: the op keeps x and b and recomputes h (one add) in its backward. The results are
//! bitwise those of `ops::bias_add` then `ops::gelu`: the same per-element functions (`gelu::gelu_one`,
//! `gelu_grad_one`; on a GPU, elementwise.cu's, with h rounded to the dtype as the bias add stores it) and the same
//! bias gradient sum (`bias::sum_rows`; on a GPU, `elementwise_cuda::bias_grad`).
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::bias::sum_rows;
use super::gelu::{gelu_grad_one, gelu_one};
use super::math::simd_kernel;
use super::{cpu_f32, rows_and_len, storage_f32};

simd_kernel! {
    /// y = gelu(x + b) for each row of x (rows of b.len() values).
    fn forward(x: &[f32], b: &[f32], y: &mut [f32]) {
        for (x, y) in x.chunks_exact(b.len()).zip(y.chunks_exact_mut(b.len())) {
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                *y = gelu_one(x + b);
            }
        }
    }
}

simd_kernel! {
    /// dx = g·gelu'(x + b) for each row of x.
    fn backward(x: &[f32], b: &[f32], g: &[f32], dx: &mut [f32]) {
        let c = b.len();
        for ((x, g), dx) in x.chunks_exact(c).zip(g.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            for (((dx, &x), &g), &b) in dx.iter_mut().zip(x).zip(g).zip(b) {
                *dx = gelu_grad_one(x + b, g);
            }
        }
    }
}

pub(super) struct BiasGelu;

/// The bias's length C, checked against x's last dimension.
fn columns(x: &[usize], b: &[usize], op: &str) -> candle_core::Result<usize> {
    let (_rows, c) = rows_and_len(x, op)?;
    if b != [c] {
        candle_core::bail!("{op}: input {x:?}, bias {b:?} (needs [{c}])");
    }
    Ok(c)
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        columns(l1.dims(), l2.dims(), self.name())?;
        let (x, b) = (cpu_f32(s1, l1, self.name())?, cpu_f32(s2, l2, self.name())?);
        let mut y = vec![0f32; x.len()];
        forward(x, b, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = super::elementwise_cuda::bias_gelu_forward((s1, l1), (s2, l2))?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if grad.device().is_cuda() {
            let dx = super::elementwise_cuda::bias_gelu_backward(x, b, grad)?;
            let db = super::elementwise_cuda::bias_grad(&dx, b)?;
            return Ok((Some(dx), Some(db)));
        }
        let name = self.name();
        let c = columns(x.dims(), b.dims(), name)?;
        if grad.dims() != x.dims() {
            candle_core::bail!("{name} backward: input {:?}, gradient {:?}", x.dims(), grad.dims());
        }
        let (x, b, grad) = (x.contiguous()?, b.contiguous()?, grad.contiguous()?);
        let guards = [&x, &b, &grad].map(|t| t.storage_and_layout());
        let slices = guards
            .iter()
            .map(|(s, l)| storage_f32(s, l, name))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut dx = vec![0f32; slices[0].len()];
        backward(slices[0], slices[1], slices[2], &mut dx);
        let mut db = vec![0f32; c];
        sum_rows(&dx, &mut db);
        drop(guards);
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(db, c, b.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, Var};

    use crate::ops::testing::{assert_close, finite_diff, randn};
    use crate::ops::{bias_add, bias_gelu, composed, gelu};

    /// y and the gradients of x and b of Σ f(x, b)·up.
    fn run(f: &dyn Fn(&Tensor, &Tensor) -> Tensor, x: &Tensor, b: &Tensor, up: &Tensor) -> [Tensor; 3] {
        let (xv, bv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(b).unwrap());
        let y = f(xv.as_tensor(), bv.as_tensor());
        let g = (&y * up).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
        [y, grad(&xv), grad(&bv)]
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn the_op_is_bias_add_then_gelu_bitwise() {
        for dims in [vec![1, 1], vec![7, 13], vec![2, 5, 24], vec![3, 64, 512]] {
            let c = dims[dims.len() - 1];
            let (x, b, up) = (randn(10, &dims, 2.0), randn(11, &[c], 1.0), randn(12, &dims, 1.0));
            let fused = run(&|x, b| bias_gelu(x, b).unwrap(), &x, &b, &up);
            let apart = run(&|x, b| gelu(&bias_add(x, b).unwrap()).unwrap(), &x, &b, &up);
            for ((name, f), a) in ["y", "dx", "db"].iter().zip(&fused).zip(&apart) {
                assert_eq!(bits(f), bits(a), "{dims:?} {name}");
            }
        }
    }

    #[test]
    fn the_gradients_match_finite_differences_of_the_composed_version() {
        let (x, b, w) = (randn(20, &[4, 9], 1.5), randn(21, &[9], 1.0), randn(22, &[4, 9], 1.0));
        let [_, dx, db] = run(&|x, b| bias_gelu(x, b).unwrap(), &x, &b, &w);
        let f64 = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        let (x64, b64) = (f64(&x), f64(&b));
        let composed_of = |x: &Tensor, b: &Tensor| composed::gelu(&x.broadcast_add(b).unwrap()).unwrap();
        let fd_x = finite_diff(&|x| composed_of(x, &b64), &x64, &w, 1e-5);
        let fd_b = finite_diff(&|b| composed_of(&x64, b), &b64, &w, 1e-5);
        assert_close("bias-gelu dx vs finite differences", &dx, &fd_x, 1e-5, 1e-4);
        assert_close("bias-gelu db vs finite differences", &db, &fd_b, 1e-5, 1e-4);
    }

    #[test]
    fn other_dtypes_and_shapes_take_the_unfused_path_or_are_refused() {
        let x = randn(30, &[3, 8], 1.0).to_dtype(candle_core::DType::F64).unwrap();
        let b = randn(31, &[8], 1.0).to_dtype(candle_core::DType::F64).unwrap();
        assert_eq!(bias_gelu(&x, &b).unwrap().dtype(), candle_core::DType::F64);
        let err = bias_gelu(&randn(32, &[3, 8], 1.0), &randn(33, &[7], 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("input [3, 8], bias [7]") && err.contains("[8]"), "{err}");
    }
}
