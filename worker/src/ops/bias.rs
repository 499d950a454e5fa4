//! y = x + b with b broadcast over the rows of x [.., C]. Backward: dx = dy (the same tensor, no copy) and
//! db = Σ_rows dy, summed a row at a time. candle's `broadcast_add` gets the same forward, but its backward
//! reduces over the leading dimension element by element, with two integer divisions per element. On a GPU (f32 or
//! bf16) the forward and db are kernels of worker/kernels/elementwise.cu (`elementwise_cuda`), db summed in f32 in
//! a fixed order.
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::math::simd_kernel;
use super::{cpu_f32, rows_and_len, storage_f32};

simd_kernel! {
    /// y = x + b for each row of x (rows of b.len() values).
    fn add_rows(x: &[f32], b: &[f32], y: &mut [f32]) {
        for (x, y) in x.chunks_exact(b.len()).zip(y.chunks_exact_mut(b.len())) {
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                *y = x + b;
            }
        }
    }
}

simd_kernel! {
    /// db += Σ over the rows of dy (rows of db.len() values). Also the fused bias+GELU's bias gradient.
    pub(super) fn sum_rows(dy: &[f32], db: &mut [f32]) {
        let c = db.len();
        for row in dy.chunks_exact(c) {
            for (d, &g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
    }
}

pub(super) struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, b) = (cpu_f32(s1, l1, self.name())?, cpu_f32(s2, l2, self.name())?);
        let (_rows, c) = rows_and_len(l1.dims(), self.name())?;
        if b.len() != c {
            candle_core::bail!("bias-add: input {:?}, bias {:?}", l1.dims(), l2.dims());
        }
        let mut y = vec![0f32; x.len()];
        add_rows(x, b, &mut y);
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
        let y = super::elementwise_cuda::bias_add_forward((s1, l1), (s2, l2))?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if grad.device().is_cuda() {
            let db = super::elementwise_cuda::bias_grad(grad, b)?;
            return Ok((Some(grad.clone()), Some(db)));
        }
        let gt = grad.contiguous()?;
        let (gs, gl) = gt.storage_and_layout();
        let dy = storage_f32(&gs, gl, self.name())?;
        let (_rows, c) = rows_and_len(gl.dims(), self.name())?;
        if b.dims() != [c] {
            candle_core::bail!("bias-add backward: gradient {:?}, bias {:?}", gl.dims(), b.dims());
        }
        let mut db = vec![0f32; c];
        sum_rows(dy, &mut db);
        Ok((Some(grad.clone()), Some(Tensor::from_vec(db, c, b.device())?)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, Var};

    use crate::ops::bias_add;
    use crate::ops::testing::{assert_close, randn};

    #[test]
    fn bias_add_forward_and_gradients_match_broadcast_add() {
        for dims in [vec![1, 1], vec![7, 13], vec![2, 5, 24]] {
            let c = dims[dims.len() - 1];
            let (x, b, up) = (randn(100, &dims, 1.0), randn(101, &[c], 1.0), randn(102, &dims, 1.0));
            let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
                let (xv, bv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&b).unwrap());
                let y = f(xv.as_tensor(), bv.as_tensor());
                let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                (y, grad(&xv), grad(&bv))
            };
            let fused = run(&|x, b| bias_add(x, b).unwrap());
            let reference = run(&|x, b| x.broadcast_add(b).unwrap());
            assert_close("bias-add y", &fused.0, &reference.0, 0.0, 0.0);
            assert_close("bias-add dx", &fused.1, &reference.1, 0.0, 0.0);
            assert_close("bias-add db", &fused.2, &reference.2, 1e-6, 1e-5);
        }
    }
}
