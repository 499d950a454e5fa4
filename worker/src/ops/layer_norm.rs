//! LayerNorm over the last dimension. Per row of C values: x̂ = (x − μ)·r with r = 1/√(σ² + eps), y = x̂·w + b.
//! Backward, with g = dy·w: dx = r·(g − mean(g) − x̂·mean(g·x̂)), dw = Σ_rows dy·x̂, db = Σ_rows dy. μ and r are
//! recomputed in the backward (two passes over C values) rather than saved on the CPU; the GPU kernels
//! (`layer_norm_cuda`, built from `worker/kernels/layer_norm.cu` with the `cuda` feature) save them in the op value
//! instead, as f32 per row, for a backward that reads x and dy once each.
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::math::{dot, simd_kernel, sum};
use super::{cpu_f32, rows_and_len, storage_f32};

simd_kernel! {
    /// y = x̂·w + b, row by row (rows of w.len() values).
    fn forward(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
        let c = w.len();
        for (x, y) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            let r = center(x, y, eps);
            for ((y, &w), &b) in y.iter_mut().zip(w).zip(b) {
                *y = *y * r * w + b;
            }
        }
    }
}

simd_kernel! {
    /// dx (overwritten) and dw, db (accumulated into) for the upstream gradient dy.
    fn backward(x: &[f32], w: &[f32], dy: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32], db: &mut [f32]) {
        let c = w.len();
        let cf = c as f32;
        let mut g = vec![0f32; c];
        for ((x, dy), dx) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            // dx holds x̂ until the last loop overwrites it.
            let r = center(x, dx, eps);
            for xh in dx.iter_mut() {
                *xh *= r;
            }
            for ((((g, db), dw), &dy), (&w, &xh)) in
                g.iter_mut().zip(db.iter_mut()).zip(dw.iter_mut()).zip(dy).zip(w.iter().zip(dx.iter()))
            {
                *g = dy * w;
                *db += dy;
                *dw += dy * xh;
            }
            let mean_g = sum(&g) / cf;
            let mean_gx = dot(&g, dx) / cf;
            for (dx, &g) in dx.iter_mut().zip(&g) {
                *dx = r * (g - mean_g - *dx * mean_gx);
            }
        }
    }
}

pub(super) struct LayerNorm {
    pub eps: f32,
    /// The GPU forward's per-row mean and 1/std, for its backward.
    #[cfg(feature = "cuda")]
    stats: std::sync::OnceLock<super::layer_norm_cuda::Stats>,
}

impl LayerNorm {
    pub fn new(eps: f32) -> Self {
        Self {
            eps,
            #[cfg(feature = "cuda")]
            stats: std::sync::OnceLock::new(),
        }
    }
}

/// Writes x − μ into `out` and returns r = 1/√(σ² + eps).
#[inline(always)]
fn center(x: &[f32], out: &mut [f32], eps: f32) -> f32 {
    let c = x.len() as f32;
    let mean = sum(x) / c;
    for (o, &x) in out.iter_mut().zip(x) {
        *o = x - mean;
    }
    let var = dot(out, out) / c;
    1.0 / (var + eps).sqrt()
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            cpu_f32(s1, l1, self.name())?,
            cpu_f32(s2, l2, self.name())?,
            cpu_f32(s3, l3, self.name())?,
        );
        let (_rows, c) = rows_and_len(l1.dims(), self.name())?;
        if w.len() != c || b.len() != c {
            candle_core::bail!(
                "layer-norm: input {:?}, weight {:?}, bias {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut y = vec![0f32; x.len()];
        forward(x, w, b, self.eps, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (y, stats) = super::layer_norm_cuda::forward((s1, l1), (s2, l2), (s3, l3), self.eps)?;
        // A second forward through one op value would pair the first forward's statistics with the second's
        // backward: refuse it (ops::layer_norm makes a new op per call, and candle runs a forward once).
        if self.stats.set(stats).is_err() {
            candle_core::bail!("layer-norm (CUDA): this op value already ran a forward; make a new LayerNorm per call");
        }
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let Some(stats) = self.stats.get() else {
                candle_core::bail!(
                    "layer-norm (CUDA): backward for input {:?} without the forward's saved statistics",
                    x.dims()
                )
            };
            let (dx, dw, db) = super::layer_norm_cuda::backward(x, w, grad, stats)?;
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        let name = self.name();
        let (xt, wt, gt) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let (xs, xl) = xt.storage_and_layout();
        let (ws, wl) = wt.storage_and_layout();
        let (gs, gl) = gt.storage_and_layout();
        let (x, w, dy) = (
            storage_f32(&xs, xl, name)?,
            storage_f32(&ws, wl, name)?,
            storage_f32(&gs, gl, name)?,
        );
        let (_rows, c) = rows_and_len(xl.dims(), name)?;
        if w.len() != c || dy.len() != x.len() {
            candle_core::bail!(
                "layer-norm backward: input {:?}, weight {:?}, gradient {:?}",
                xl.dims(),
                wl.dims(),
                gl.dims()
            );
        }
        let (mut dx, mut dw, mut db) = (vec![0f32; x.len()], vec![0f32; c], vec![0f32; c]);
        backward(x, w, dy, self.eps, &mut dx, &mut dw, &mut db);
        let dev = xt.device();
        Ok((
            Some(Tensor::from_vec(dx, xt.shape(), dev)?),
            Some(Tensor::from_vec(dw, wt.shape(), dev)?),
            Some(Tensor::from_vec(db, wt.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor, Var};

    use crate::ops::testing::{assert_close, finite_diff, randn, to_vec};
    use crate::ops::{composed, layer_norm};

    const EPS: f64 = 1e-5;

    fn inputs(dims: &[usize], seed: u64) -> (Tensor, Tensor, Tensor) {
        let c = dims[dims.len() - 1];
        let x = (randn(seed, dims, 1.5) + 0.3).unwrap(); // a non-zero mean, as a residual stream has
        let w = (randn(seed + 1, &[c], 0.3) + 1.0).unwrap();
        let b = randn(seed + 2, &[c], 0.2);
        (x, w, b)
    }

    #[test]
    fn layer_norm_forward_matches_composed() {
        for dims in [vec![1, 1, 8], vec![1, 7, 13], vec![3, 5, 128], vec![2, 1, 33]] {
            let (x, w, b) = inputs(&dims, 10);
            let fused = layer_norm(&x, &w, &b, EPS).unwrap();
            let reference = composed::layer_norm(&x, &w, &b, EPS).unwrap();
            assert_close(&format!("layer norm {dims:?}"), &fused, &reference, 1e-5, 1e-5);
        }
    }

    #[test]
    fn layer_norm_gradients_match_composed_and_finite_differences() {
        for dims in [vec![1, 1, 8], vec![1, 7, 13], vec![3, 5, 24]] {
            let (x, w, b) = inputs(&dims, 20);
            let up = randn(30, &dims, 1.0); // the upstream gradient: loss = Σ y·up
            let grads = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
                let (xv, wv, bv) = (
                    Var::from_tensor(&x).unwrap(),
                    Var::from_tensor(&w).unwrap(),
                    Var::from_tensor(&b).unwrap(),
                );
                let loss = (f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor()) * &up)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let g = loss.backward().unwrap();
                [&xv, &wv, &bv].map(|v| g.get(v.as_tensor()).unwrap().clone())
            };
            let fused = grads(&|x, w, b| layer_norm(x, w, b, EPS).unwrap());
            let reference = grads(&|x, w, b| composed::layer_norm(x, w, b, EPS).unwrap());
            for (name, (f, r)) in ["dx", "dw", "db"].iter().zip(fused.iter().zip(&reference)) {
                assert_close(&format!("layer norm {name} {dims:?}"), f, r, 1e-5, 1e-4);
            }
            // Central differences of the composed version in f64, for each of the three inputs.
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&b));
            let fd_x = finite_diff(&|x| composed::layer_norm(x, &w64, &b64, EPS).unwrap(), &x, &up, 1e-5);
            let fd_w = finite_diff(&|w| composed::layer_norm(&x64, w, &b64, EPS).unwrap(), &w, &up, 1e-5);
            let fd_b = finite_diff(&|b| composed::layer_norm(&x64, &w64, b, EPS).unwrap(), &b, &up, 1e-5);
            for (name, (f, r)) in ["dx", "dw", "db"]
                .iter()
                .zip(fused.iter().zip([fd_x, fd_w, fd_b].iter()))
            {
                assert_close(
                    &format!("layer norm {name} {dims:?} vs finite differences"),
                    f,
                    r,
                    1e-4,
                    1e-4,
                );
            }
        }
    }

    #[test]
    fn layer_norm_rejects_a_mismatched_weight() {
        let (x, _, b) = inputs(&[2, 3, 8], 40);
        let w = Tensor::ones(8, DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(layer_norm(&x, &w, &b, EPS).is_ok());
        let w7 = Tensor::ones(7, DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(layer_norm(&x, &w7, &b, EPS).is_err());
        assert!(
            to_vec(&layer_norm(&x, &w, &b, EPS).unwrap())
                .iter()
                .all(|v| v.is_finite())
        );
    }
}
