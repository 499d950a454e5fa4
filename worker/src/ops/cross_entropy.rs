//! Softmax cross-entropy summed over rows: loss = Σ_r (lse_r − x[r, t_r]), lse_r = log Σ_j exp x[r, j].
//! Backward: dx[r, j] = g·(exp(x[r, j] − lse_r) − [j = t_r]) for the scalar upstream gradient g. The forward keeps
//! each row's lse (N floats) for the backward, which then needs one pass over the logits instead of three.
//! A row whose target is [`IGNORE`] is skipped: it adds nothing to the loss and its gradient row is exactly zero.
//! On a CUDA device the same op runs worker/kernels/cross_entropy.cu (cross_entropy_cuda.rs) on f32 or bf16 logits,
//! where a target out of range makes the loss NaN instead of an error (refusing it would be a host sync).
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use lockstep_common::data::IGNORE;

use super::math::{exp, max, simd_kernel};
use super::{cpu_f32, rows_and_len, storage_f32};

#[derive(Default)]
pub(super) struct CrossEntropySum {
    lse: OnceLock<Saved>,
}

/// The forward's row log-sum-exps, `[N]` f32, where the forward ran.
enum Saved {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<f32>),
}

/// log Σ exp(row), stable: max + log Σ exp(row − max).
#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    let m = max(row);
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - m)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp(v - m);
        }
    }
    m + (acc.iter().sum::<f32>() + tail).ln()
}

simd_kernel! {
    /// lse[r] = log Σ exp(row r), rows of x.len() / lse.len() values.
    fn row_lse(x: &[f32], lse: &mut [f32]) {
        let vocab = x.len() / lse.len().max(1);
        for (l, row) in lse.iter_mut().zip(x.chunks_exact(vocab.max(1))) {
            *l = log_sum_exp(row);
        }
    }
}

simd_kernel! {
    /// dx = g·softmax(x), row by row, from each row's lse.
    fn softmax_grad(x: &[f32], lse: &[f32], g: f32, dx: &mut [f32]) {
        let vocab = x.len() / lse.len().max(1);
        for ((x, dx), &lse) in x.chunks_exact(vocab.max(1)).zip(dx.chunks_exact_mut(vocab.max(1))).zip(lse) {
            for (dx, &x) in dx.iter_mut().zip(x) {
                *dx = g * exp(x - lse);
            }
        }
    }
}

fn targets<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("cross-entropy: targets are not contiguous".into()))?;
    Ok(&s.as_slice::<u32>()?[start..end])
}

impl CustomOp2 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "cross-entropy-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, self.name())?;
        let t = targets(s2, l2)?;
        let (rows, vocab) = rows_and_len(l1.dims(), self.name())?;
        if t.len() != rows {
            candle_core::bail!("cross-entropy: logits {:?}, targets {:?}", l1.dims(), l2.dims());
        }
        if let Some(&bad) = t.iter().find(|&&t| t != IGNORE && t as usize >= vocab) {
            candle_core::bail!("cross-entropy: target {bad} is out of range for a vocabulary of {vocab}");
        }
        let mut lse = vec![0f32; rows];
        row_lse(x, &mut lse);
        let loss: f64 = x
            .chunks_exact(vocab)
            .zip(t)
            .zip(&lse)
            .filter(|((_, t), _)| **t != IGNORE)
            .map(|((row, &t), &l)| f64::from(l - row[t as usize]))
            .sum();
        // A second forward through the same op value (not done by candle) would keep the first lse: recomputed
        // in the backward if absent, so only the cache is lost, never correctness.
        let _ = self.lse.set(Saved::Cpu(lse));
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    /// f32 or bf16 logits as they are; a target out of range makes the loss NaN instead of an error (see
    /// cross_entropy_cuda.rs: refusing it would need the targets on the host).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (loss, lse) = super::cross_entropy_cuda::forward((s1, l1), (s2, l2))?;
        let _ = self.lse.set(Saved::Cuda(lse));
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            let lse = match self.lse.get() {
                Some(Saved::Cuda(lse)) => Some(lse),
                _ => None,
            };
            let dx = super::cross_entropy_cuda::backward(logits, targets_t, lse, grad)?;
            return Ok((Some(dx), None));
        }
        let name = self.name();
        let g = grad.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        let (xt, tt) = (logits.contiguous()?, targets_t.to_dtype(DType::U32)?.contiguous()?);
        let (xs, xl) = xt.storage_and_layout();
        let (ts, tl) = tt.storage_and_layout();
        let x = storage_f32(&xs, xl, name)?;
        let t: Vec<u32> = match &*ts {
            candle_core::Storage::Cpu(s) => targets(s, tl)?.to_vec(),
            _ => candle_core::bail!("{name}: the fused kernel runs on the CPU only"),
        };
        let (rows, vocab) = rows_and_len(xl.dims(), name)?;
        if t.len() != rows {
            candle_core::bail!(
                "cross-entropy backward: logits {:?}, targets {:?}",
                xl.dims(),
                tl.dims()
            );
        }
        let lse = match self.lse.get() {
            Some(Saved::Cpu(lse)) if lse.len() == rows => std::borrow::Cow::Borrowed(lse.as_slice()),
            _ => {
                let mut lse = vec![0f32; rows];
                row_lse(x, &mut lse);
                std::borrow::Cow::Owned(lse)
            }
        };
        let mut dx = vec![0f32; x.len()];
        softmax_grad(x, &lse, g, &mut dx);
        for (dx, &t) in dx.chunks_exact_mut(vocab).zip(&t) {
            if t == IGNORE {
                dx.fill(0.0);
            } else if let Some(d) = dx.get_mut(t as usize) {
                *d -= g;
            }
        }
        Ok((Some(Tensor::from_vec(dx, xt.shape(), xt.device())?), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::ops::testing::{assert_close, finite_diff, grad_of, randn};
    use crate::ops::{composed, cross_entropy_sum};

    fn targets(n: usize, vocab: usize, seed: usize) -> Tensor {
        let t: Vec<u32> = (0..n).map(|i| ((i * 7 + seed * 3) % vocab) as u32).collect();
        Tensor::from_vec(t, n, &Device::Cpu).unwrap()
    }

    #[test]
    fn cross_entropy_forward_and_gradient_match_composed_and_finite_differences() {
        for (n, vocab) in [(1, 1), (1, 5), (7, 13), (12, 65), (3, 300)] {
            let x = randn(80, &[n, vocab], 3.0);
            let t = targets(n, vocab, 1);
            let loss = cross_entropy_sum(&x, &t).unwrap();
            let reference = composed::cross_entropy_sum(&x, &t).unwrap();
            assert_eq!(loss.dims(), [0usize; 0]);
            assert_close(&format!("cross-entropy {n}x{vocab}"), &loss, &reference, 1e-5, 1e-6);
            // A non-trivial upstream gradient: loss·1.7.
            let w = Tensor::new(1.7f32, &Device::Cpu).unwrap();
            let fused = grad_of(&|x| cross_entropy_sum(x, &t).unwrap(), &x, &w);
            let reference = grad_of(&|x| composed::cross_entropy_sum(x, &t).unwrap(), &x, &w);
            assert_close(
                &format!("cross-entropy grad {n}x{vocab}"),
                &fused,
                &reference,
                1e-6,
                1e-4,
            );
            let fd = finite_diff(&|x| composed::cross_entropy_sum(x, &t).unwrap(), &x, &w, 1e-5);
            assert_close(
                &format!("cross-entropy grad {n}x{vocab} vs fd"),
                &fused,
                &fd,
                1e-6,
                1e-4,
            );
        }
    }

    #[test]
    fn cross_entropy_takes_other_integer_targets_and_rejects_bad_ones() {
        let x = randn(90, &[4, 6], 1.0);
        let t = targets(4, 6, 2);
        let want = cross_entropy_sum(&x, &t).unwrap().to_scalar::<f32>().unwrap();
        let t64 = t.to_dtype(DType::I64).unwrap();
        assert_eq!(cross_entropy_sum(&x, &t64).unwrap().to_scalar::<f32>().unwrap(), want);
        let bad = Tensor::new(&[0u32, 1, 6, 2], &Device::Cpu).unwrap();
        let err = cross_entropy_sum(&x, &bad).unwrap_err().to_string();
        assert!(err.contains("out of range") && err.contains('6'), "{err}");
        assert!(cross_entropy_sum(&x, &targets(3, 6, 0)).is_err());
    }

    /// Ignored rows add exactly nothing: the loss and gradient equal those of the other rows alone, and the ignored
    /// rows' gradient is exactly zero, in the fused kernel and the composed version alike.
    #[test]
    fn ignored_targets_contribute_exactly_zero() {
        use lockstep_common::data::IGNORE;
        let (n, vocab) = (6, 11);
        let x = randn(91, &[n, vocab], 2.0);
        let t = [3u32, IGNORE, 7, IGNORE, IGNORE, 0];
        let kept = [0usize, 2, 5];
        let targets = Tensor::new(&t, &Device::Cpu).unwrap();
        let x_kept = Tensor::cat(&kept.map(|r| x.narrow(0, r, 1).unwrap()), 0).unwrap();
        let t_kept = Tensor::new(&kept.map(|r| t[r]), &Device::Cpu).unwrap();
        let w = Tensor::new(0.37f32, &Device::Cpu).unwrap();
        for (name, f) in [
            (
                "fused",
                cross_entropy_sum as fn(&Tensor, &Tensor) -> crate::error::Result<Tensor>,
            ),
            ("composed", composed::cross_entropy_sum),
        ] {
            let loss = f(&x, &targets).unwrap().to_scalar::<f32>().unwrap();
            let alone = f(&x_kept, &t_kept).unwrap().to_scalar::<f32>().unwrap();
            assert!((loss - alone).abs() <= 1e-6 * alone.abs(), "{name}: {loss} vs {alone}");
            let grad = grad_of(&|x| f(x, &targets).unwrap(), &x, &w).to_vec2::<f32>().unwrap();
            let grad_alone = grad_of(&|x| f(x, &t_kept).unwrap(), &x_kept, &w)
                .to_vec2::<f32>()
                .unwrap();
            for (r, row) in grad.iter().enumerate() {
                match kept.iter().position(|&k| k == r) {
                    Some(i) => assert_eq!(row, &grad_alone[i], "{name}: row {r}"),
                    None => assert!(
                        row.iter().all(|&g| g == 0.0),
                        "{name}: ignored row {r} has gradient {row:?}"
                    ),
                }
            }
        }
        // Only ignored rows: a loss of exactly zero.
        let none = Tensor::new(&[IGNORE; 6], &Device::Cpu).unwrap();
        assert_eq!(cross_entropy_sum(&x, &none).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(
            composed::cross_entropy_sum(&x, &none)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn cross_entropy_loss_is_nan_for_nan_logits() {
        let x = Tensor::new(&[[0f32, f32::NAN, 1.0], [0.0, 1.0, 2.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        assert!(cross_entropy_sum(&x, &t).unwrap().to_scalar::<f32>().unwrap().is_nan());
    }
}
