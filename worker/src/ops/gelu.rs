//! The tanh GELU. With u = √(2/π)·(x + 0.044715·x³) and s = σ(2u) = (1 + tanh u)/2:
//! gelu(x) = x·s, and gelu'(x) = s + 2·x·s·(1 − s)·u'(x), u'(x) = √(2/π)·(1 + 3·0.044715·x²)
//! (as 1 − tanh²u = 4·s·(1 − s)). One `exp` per element each way, where candle's composed backward takes two
//! `powf`s and a `tanh` and a dozen temporaries. On a GPU (f32 or bf16) both passes are kernels of
//! worker/kernels/elementwise.cu, the same formulas in f32 (`elementwise_cuda`).
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::math::{exp, simd_kernel};
use super::{cpu_f32, storage_f32};

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEF: f32 = 0.044_715;

/// σ(2u) = 1 / (1 + e^(−2u)), with the exponent capped at 80 so that s stays a normal number for very negative x
/// (subnormals are slow); a NaN passes through.
#[inline(always)]
fn sigmoid_2u(u: f32) -> f32 {
    let a = -2.0 * u;
    1.0 / (1.0 + exp(if a > 80.0 { 80.0 } else { a }))
}

/// gelu(x); shared with the fused bias+GELU (ops/bias_gelu.rs), which must give bitwise the same.
#[inline(always)]
pub(super) fn gelu_one(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
    x * sigmoid_2u(u)
}

/// g·gelu'(x), shared as [`gelu_one`].
#[inline(always)]
pub(super) fn gelu_grad_one(x: f32, g: f32) -> f32 {
    let x2 = x * x;
    let u = SQRT_2_OVER_PI * (x + COEF * x2 * x);
    let s = sigmoid_2u(u);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * x2);
    g * (s + 2.0 * x * s * (1.0 - s) * du)
}

simd_kernel! {
    fn forward(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = gelu_one(x);
        }
    }
}

simd_kernel! {
    fn backward(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            *dx = gelu_grad_one(x, g);
        }
    }
}

pub(super) struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        forward(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::elementwise_cuda::gelu_forward(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if arg.device().is_cuda() {
            return Ok(Some(super::elementwise_cuda::gelu_backward(arg, grad)?));
        }
        let (arg, grad) = (arg.contiguous()?, grad.contiguous()?);
        let (xs, xl) = arg.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (x, g) = (storage_f32(&xs, xl, self.name())?, storage_f32(&gs, gl, self.name())?);
        if x.len() != g.len() {
            candle_core::bail!("gelu-tanh backward: {} inputs, {} gradients", x.len(), g.len());
        }
        let mut dx = vec![0f32; x.len()];
        backward(x, g, &mut dx);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use crate::ops::testing::{assert_close, finite_diff, grad_of, randn};
    use crate::ops::{composed, gelu};

    #[test]
    fn gelu_forward_matches_composed() {
        for dims in [vec![1], vec![7], vec![3, 13], vec![2, 5, 33]] {
            let x = randn(1, &dims, 3.0);
            assert_close("gelu", &gelu(&x).unwrap(), &composed::gelu(&x).unwrap(), 1e-6, 1e-5);
        }
        // The tails: large negative inputs go to 0, large positive ones to x.
        let x = Tensor::new(&[-30f32, -12.0, -6.0, 6.0, 12.0, 30.0, 0.0], &candle_core::Device::Cpu).unwrap();
        assert_close(
            "gelu tails",
            &gelu(&x).unwrap(),
            &composed::gelu(&x).unwrap(),
            1e-6,
            1e-5,
        );
    }

    #[test]
    fn gelu_gradient_matches_composed_and_finite_differences() {
        for dims in [vec![1], vec![7], vec![3, 13], vec![2, 5, 9]] {
            let x = randn(2, &dims, 2.5);
            let w = randn(3, &dims, 1.0);
            let fused = grad_of(&|x| gelu(x).unwrap(), &x, &w);
            // candle's composed backward rounds its constants to 6 digits, hence the looser tolerance.
            let reference = grad_of(&|x| composed::gelu(x).unwrap(), &x, &w);
            assert_close("gelu grad vs composed", &fused, &reference, 1e-5, 1e-4);
            let fd = finite_diff(&|x| composed::gelu(x).unwrap(), &x, &w, 1e-5);
            assert_close("gelu grad vs finite differences", &fused, &fd, 1e-6, 1e-5);
        }
        let x = randn(4, &[4, 3], 1.0).to_dtype(DType::F64).unwrap();
        assert_eq!(gelu(&x).unwrap().dtype(), DType::F64, "f64 takes the composed path");
    }
}
