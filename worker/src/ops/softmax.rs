//! Softmax over the last dimension of scale·x (+ an additive mask): y = exp(z − max z) / Σ exp(z − max z).
//! Backward from the output alone: dx = scale·y·(dy − Σ dy·y); the mask gets no gradient. Masked entries (−∞)
//! come out exactly 0, so they pass no gradient either.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::math::{dot, exp, max, simd_kernel, sum};
use super::{cpu_f32, rows_and_len, storage_f32};

/// softmax(scale·x) over the last dimension.
pub(super) struct Softmax {
    pub scale: f32,
}

/// softmax(scale·x + mask) over the last dimension; x [.., T_q, T_k], mask [T_q, T_k].
pub(super) struct MaskedSoftmax {
    pub scale: f32,
}

/// Turns a row of logits z (already scaled and masked) into probabilities, in place.
#[inline(always)]
fn softmax_in_place(z: &mut [f32]) {
    let m = max(z);
    for v in z.iter_mut() {
        *v = exp(*v - m);
    }
    let inv = 1.0 / sum(z);
    for v in z.iter_mut() {
        *v *= inv;
    }
}

simd_kernel! {
    fn plain_rows(x: &[f32], scale: f32, c: usize, y: &mut [f32]) {
        for (x, y) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = scale * x;
            }
            softmax_in_place(y);
        }
    }
}

simd_kernel! {
    /// Row r of x is query r mod T_q, whose mask row is mask[(r mod T_q)·T_k..]; `c` = T_k.
    fn masked_rows(x: &[f32], mask: &[f32], scale: f32, c: usize, y: &mut [f32]) {
        for (xs, ys) in x.chunks_exact(mask.len()).zip(y.chunks_exact_mut(mask.len())) {
            for ((x, y), m) in xs.chunks_exact(c).zip(ys.chunks_exact_mut(c)).zip(mask.chunks_exact(c)) {
                for ((y, &x), &m) in y.iter_mut().zip(x).zip(m) {
                    *y = scale * x + m;
                }
                softmax_in_place(y);
            }
        }
    }
}

simd_kernel! {
    fn backward_rows(y: &[f32], dy: &[f32], scale: f32, c: usize, dx: &mut [f32]) {
        for ((y, dy), dx) in y.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            let s = dot(y, dy);
            for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                *dx = scale * y * (dy - s);
            }
        }
    }
}

fn forward(x: &[f32], dims: &[usize], mask: Option<&[f32]>, scale: f32, name: &str) -> candle_core::Result<Vec<f32>> {
    let (_rows, c) = rows_and_len(dims, name)?;
    let mut y = vec![0f32; x.len()];
    match mask {
        None => plain_rows(x, scale, c, &mut y),
        Some(mask) => {
            if mask.is_empty() || !mask.len().is_multiple_of(c) || !x.len().is_multiple_of(mask.len()) {
                candle_core::bail!("{name}: a mask of {} values does not fit scores {dims:?}", mask.len());
            }
            masked_rows(x, mask, scale, c, &mut y);
        }
    }
    Ok(y)
}

fn backward(res: &Tensor, grad: &Tensor, scale: f32, name: &str) -> candle_core::Result<Tensor> {
    let (rt, gt) = (res.contiguous()?, grad.contiguous()?);
    let (ys, yl) = rt.storage_and_layout();
    let (gs, gl) = gt.storage_and_layout();
    let (y, dy) = (storage_f32(&ys, yl, name)?, storage_f32(&gs, gl, name)?);
    let (_rows, c) = rows_and_len(yl.dims(), name)?;
    if y.len() != dy.len() {
        candle_core::bail!("{name} backward: output {:?}, gradient {:?}", yl.dims(), gl.dims());
    }
    let mut dx = vec![0f32; y.len()];
    backward_rows(y, dy, scale, c, &mut dx);
    Tensor::from_vec(dx, rt.shape(), rt.device())
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = forward(cpu_f32(s, l, self.name())?, l.dims(), None, self.scale, self.name())?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(backward(res, grad, self.scale, self.name())?))
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        if dims.len() < 2 || l2.dims() != &dims[dims.len() - 2..] {
            candle_core::bail!("masked-softmax: scores {dims:?}, mask {:?}", l2.dims());
        }
        let mask = cpu_f32(s2, l2, self.name())?;
        let y = forward(cpu_f32(s1, l1, self.name())?, dims, Some(mask), self.scale, self.name())?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(backward(res, grad, self.scale, self.name())?), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::ops::testing::{assert_close, finite_diff, grad_of, randn, to_vec};
    use crate::ops::{composed, masked_softmax_last_dim, softmax_last_dim};

    /// The causal mask of `t` queries after `past` earlier keys: [t, past + t].
    fn causal(past: usize, t: usize) -> Tensor {
        let m: Vec<f32> = (0..t)
            .flat_map(|i| (0..past + t).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        Tensor::from_vec(m, (t, past + t), &Device::Cpu).unwrap()
    }

    #[test]
    fn softmax_forward_and_gradient_match_composed_and_finite_differences() {
        for dims in [vec![1, 1], vec![3, 7], vec![2, 3, 13], vec![5, 65]] {
            let x = randn(50, &dims, 4.0);
            let w = randn(51, &dims, 1.0);
            let y = softmax_last_dim(&x).unwrap();
            assert_close("softmax", &y, &composed::softmax_last_dim(&x).unwrap(), 1e-7, 1e-5);
            let fused = grad_of(&|x| softmax_last_dim(x).unwrap(), &x, &w);
            let reference = grad_of(&|x| composed::softmax_last_dim(x).unwrap(), &x, &w);
            assert_close("softmax grad vs composed", &fused, &reference, 1e-6, 1e-4);
            let fd = finite_diff(&|x| composed::softmax_last_dim(x).unwrap(), &x, &w, 1e-5);
            assert_close("softmax grad vs finite differences", &fused, &fd, 1e-6, 1e-4);
        }
    }

    #[test]
    fn masked_softmax_forward_and_gradient_match_composed_and_finite_differences() {
        let scale = 1.0 / 8f64.sqrt();
        // (batch dims, T_q, past): T = 1, T = 7, a chunk after a cached prefix.
        for (lead, t, past) in [
            (vec![2, 3], 1, 0),
            (vec![2, 3], 7, 0),
            (vec![1, 2], 3, 2),
            (vec![5], 9, 0),
        ] {
            let mask = causal(past, t);
            let mut dims = lead.clone();
            dims.extend([t, past + t]);
            let x = randn(60, &dims, 3.0);
            let w = randn(61, &dims, 1.0);
            let y = masked_softmax_last_dim(&x, &mask, scale).unwrap();
            let reference = composed::masked_softmax_last_dim(&x, &mask, scale).unwrap();
            assert_close(&format!("masked softmax {dims:?}"), &y, &reference, 1e-7, 1e-5);
            // Masked entries are exactly 0, so no future position leaks in, even by rounding.
            let (yv, mv) = (to_vec(&y), to_vec(&mask.broadcast_as(y.shape()).unwrap()));
            assert!(yv.iter().zip(&mv).all(|(y, m)| *m == 0.0 || *y == 0.0));
            let f = |x: &Tensor| masked_softmax_last_dim(x, &mask, scale).unwrap();
            let fused = grad_of(&f, &x, &w);
            let composed_f = |x: &Tensor| composed::masked_softmax_last_dim(x, &mask, scale).unwrap();
            let reference = grad_of(&composed_f, &x, &w);
            assert_close(&format!("masked softmax grad {dims:?}"), &fused, &reference, 1e-6, 1e-4);
            let mask64 = mask.to_dtype(DType::F64).unwrap();
            let fd = finite_diff(
                &|x| composed::masked_softmax_last_dim(x, &mask64, scale).unwrap(),
                &x,
                &w,
                1e-5,
            );
            assert_close(&format!("masked softmax grad {dims:?} vs fd"), &fused, &fd, 1e-6, 1e-4);
        }
    }

    #[test]
    fn masked_softmax_with_a_mismatched_mask_falls_back_or_fails() {
        let x = randn(70, &[2, 4, 4], 1.0);
        // A [T_k] mask broadcasts in the composed version.
        let row = Tensor::new(&[0f32, 0.0, f32::NEG_INFINITY, 0.0], &Device::Cpu).unwrap();
        let y = masked_softmax_last_dim(&x, &row, 1.0).unwrap();
        assert_close(
            "row mask",
            &y,
            &composed::masked_softmax_last_dim(&x, &row, 1.0).unwrap(),
            1e-7,
            1e-6,
        );
        assert!(masked_softmax_last_dim(&x, &causal(0, 3), 1.0).is_err());
    }
}
