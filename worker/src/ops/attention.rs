//! Causal self-attention as one op: O = softmax(scale·QKᵀ + causal mask)·V for Q, K, V `[B, H, T, D]`, computed
//! the flash-attention way — an online softmax over blocks of keys, so the T×T score matrix never exists in memory
//! — with a hand-written backward that recomputes the probabilities from the row log-sum-exp L the forward saved:
//!
//! ```text
//! forward, per query row i:   s_j = scale·q_i·k_j (j ≤ i),  L_i = log Σ_j exp s_j,  o_i = Σ_j exp(s_j − L_i)·v_j
//! backward:                   D_i = dO_i·o_i,  p_ij = exp(s_ij − L_i),  dS_ij = p_ij·(dO_i·v_j − D_i)
//!                             dQ_i = scale·Σ_j dS_ij·k_j,  dK_j = scale·Σ_i dS_ij·q_i,  dV_j = Σ_i p_ij·dO_i
//! ```
//!
//! Memory is O(B·H·T·D) instead of the composed path's O(B·H·T²) probabilities (and as much again for their
//! gradient). The CPU kernel here runs each (batch, head) on its own rayon task; it is the executable statement of
//! the algorithm and what the op does on a CPU, but the model takes the composed path there, which is faster on a
//! CPU (see [`super::causal_attention`]). The CUDA kernels (`attention_cuda`, built from `worker/kernels/attention.cu`
//! with the `cuda` feature) implement the same algorithm in tiles. Both are tested against
//! [`super::composed::causal_attention`], the matmul-softmax-matmul reference.
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::math::{dot, exp};
use super::{cpu_f32, storage_f32};

/// Keys handled between two rescalings of a row's running sum and output.
const KEY_BLOCK: usize = 64;

/// The op, holding what its forward saved for its backward: each row's log-sum-exp.
pub(super) struct FlashAttention {
    pub scale: f32,
    lse: OnceLock<Saved>,
}

/// The forward's row log-sum-exps, `[B·H·T]` f32, where the forward ran.
enum Saved {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<f32>),
}

impl FlashAttention {
    pub fn new(scale: f32) -> Self {
        Self {
            scale,
            lse: OnceLock::new(),
        }
    }
}

/// `[B, H, T, D]` of a rank-4 layout, as (B·H, T, D).
fn heads(dims: &[usize], what: &str) -> candle_core::Result<(usize, usize, usize)> {
    match dims {
        &[b, h, t, d] if t > 0 && d > 0 => Ok((b * h, t, d)),
        _ => candle_core::bail!("causal attention: {what} must be [B, H, T, D] with T, D ≥ 1, got {dims:?}"),
    }
}

/// Forward of one head: `o` and `lse` for `q`, `k`, `v` (`[T, D]` each, row-major).
pub(super) fn head_forward(q: &[f32], k: &[f32], v: &[f32], d: usize, scale: f32, o: &mut [f32], lse: &mut [f32]) {
    let mut s = [0f32; KEY_BLOCK];
    for (i, ((qi, oi), li)) in q
        .chunks_exact(d)
        .zip(o.chunks_exact_mut(d))
        .zip(lse.iter_mut())
        .enumerate()
    {
        let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
        oi.fill(0.0);
        // Keys 0..=i in blocks: the block's scores, then one rescaling of the running sum and output.
        for start in (0..=i).step_by(KEY_BLOCK) {
            let end = (start + KEY_BLOCK).min(i + 1);
            let s = &mut s[..end - start];
            for (sj, kj) in s.iter_mut().zip(k[start * d..end * d].chunks_exact(d)) {
                *sj = scale * dot(qi, kj);
            }
            let block_max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let m_new = m.max(block_max);
            let rescale = exp(m - m_new);
            l *= rescale;
            oi.iter_mut().for_each(|x| *x *= rescale);
            for (&sj, vj) in s.iter().zip(v[start * d..end * d].chunks_exact(d)) {
                let p = exp(sj - m_new);
                l += p;
                oi.iter_mut().zip(vj).for_each(|(x, &y)| *x += p * y);
            }
            m = m_new;
        }
        let inv = 1.0 / l;
        oi.iter_mut().for_each(|x| *x *= inv);
        *li = m + l.ln();
    }
}

/// Backward of one head: `dq`, `dk`, `dv` (zeroed by the caller) from the forward's `o` and `lse`.
#[allow(clippy::too_many_arguments)] // one head's tensors, each a plain slice
pub(super) fn head_backward(
    (q, k, v): (&[f32], &[f32], &[f32]),
    (o, lse, d_o): (&[f32], &[f32], &[f32]),
    d: usize,
    scale: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let t = lse.len();
    for i in 0..t {
        let (qi, doi) = (&q[i * d..(i + 1) * d], &d_o[i * d..(i + 1) * d]);
        let di = dot(doi, &o[i * d..(i + 1) * d]);
        let dqi = &mut dq[i * d..(i + 1) * d];
        for j in 0..=i {
            let (kj, vj) = (&k[j * d..(j + 1) * d], &v[j * d..(j + 1) * d]);
            let p = exp(scale * dot(qi, kj) - lse[i]);
            let ds = p * (dot(doi, vj) - di) * scale;
            dv[j * d..(j + 1) * d]
                .iter_mut()
                .zip(doi)
                .for_each(|(x, &g)| *x += p * g);
            dk[j * d..(j + 1) * d]
                .iter_mut()
                .zip(qi)
                .for_each(|(x, &y)| *x += ds * y);
            dqi.iter_mut().zip(kj).for_each(|(x, &y)| *x += ds * y);
        }
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
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
        let name = self.name();
        let (q, k, v) = (cpu_f32(s1, l1, name)?, cpu_f32(s2, l2, name)?, cpu_f32(s3, l3, name)?);
        let (n, t, d) = heads(l1.dims(), "q")?;
        if l2.dims() != l1.dims() || l3.dims() != l1.dims() {
            candle_core::bail!(
                "causal attention: q {:?}, k {:?}, v {:?} differ",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut o = vec![0f32; n * t * d];
        let mut lse = vec![0f32; n * t];
        o.par_chunks_mut(t * d)
            .zip(lse.par_chunks_mut(t))
            .enumerate()
            .for_each(|(h, (o, lse))| {
                let span = h * t * d..(h + 1) * t * d;
                head_forward(&q[span.clone()], &k[span.clone()], &v[span], d, self.scale, o, lse);
            });
        // Set once: a second forward through the same op value would keep the first L, which the backward would
        // then use. candle never does that (`apply_op*` takes the op by value) and every call here builds its own
        // op. Not set (the `let _`), the backward recomputes L.
        let _ = self.lse.set(Saved::Cpu(lse));
        Ok((CpuStorage::F32(o), l1.shape().clone()))
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
        let (o, lse) = super::attention_cuda::forward((s1, l1), (s2, l2), (s3, l3), self.scale)?;
        let _ = self.lse.set(Saved::Cuda(lse));
        Ok((o, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if let Some(Saved::Cuda(lse)) = self.lse.get() {
            let (dq, dk, dv) = super::attention_cuda::backward(q, k, v, o, &grad.contiguous()?, lse, self.scale)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let name = self.name();
        let (n, t, d) = heads(q.dims(), "q")?;
        let (q, k, v, o) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, o.contiguous()?);
        let d_o = grad.to_dtype(DType::F32)?.contiguous()?;
        let guards = [&q, &k, &v, &o, &d_o].map(|x| x.storage_and_layout());
        let slices = guards
            .iter()
            .map(|(s, l)| storage_f32(s, l, name))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let [q_s, k_s, v_s, o_s, do_s] = [0, 1, 2, 3, 4].map(|i| slices[i]);
        let lse = match self.lse.get() {
            Some(Saved::Cpu(lse)) if lse.len() == n * t => std::borrow::Cow::Borrowed(lse.as_slice()),
            _ => {
                // Not saved (see cpu_fwd): the forward again, for its L.
                let (mut o2, mut lse) = (vec![0f32; n * t * d], vec![0f32; n * t]);
                for h in 0..n {
                    let span = h * t * d..(h + 1) * t * d;
                    let (o2, lse) = (&mut o2[span.clone()], &mut lse[h * t..(h + 1) * t]);
                    head_forward(
                        &q_s[span.clone()],
                        &k_s[span.clone()],
                        &v_s[span],
                        d,
                        self.scale,
                        o2,
                        lse,
                    );
                }
                std::borrow::Cow::Owned(lse)
            }
        };
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * t * d], vec![0f32; n * t * d], vec![0f32; n * t * d]);
        dq.par_chunks_mut(t * d)
            .zip(dk.par_chunks_mut(t * d))
            .zip(dv.par_chunks_mut(t * d))
            .enumerate()
            .for_each(|(h, ((dq, dk), dv))| {
                let span = h * t * d..(h + 1) * t * d;
                let inputs = (&q_s[span.clone()], &k_s[span.clone()], &v_s[span.clone()]);
                let saved = (&o_s[span.clone()], &lse[h * t..(h + 1) * t], &do_s[span]);
                head_backward(inputs, saved, d, self.scale, dq, dk, dv);
            });
        drop(guards);
        let shape = q.shape().clone();
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, shape.clone(), device)?),
            Some(Tensor::from_vec(dk, shape.clone(), device)?),
            Some(Tensor::from_vec(dv, shape, device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, Var};

    use crate::ops::testing::{assert_close, finite_diff, randn};
    use crate::ops::{composed, flash_attention as causal_attention};

    /// Gradients of Σ attention(q, k, v)·w with respect to q, k and v.
    fn grads(
        f: fn(&Tensor, &Tensor, &Tensor, f64) -> crate::error::Result<Tensor>,
        x: [&Tensor; 3],
        w: &Tensor,
        scale: f64,
    ) -> Vec<Tensor> {
        let vars = x.map(|t| Var::from_tensor(t).unwrap());
        let y = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), scale).unwrap();
        let g = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect()
    }

    #[test]
    fn fused_attention_matches_the_composed_path_forward_and_backward() {
        // T below, at and above the key block (64), and not a multiple of it; head sizes of the presets.
        for (i, &(b, h, t, d)) in [
            (1, 1, 1, 4),
            (2, 3, 5, 16),
            (1, 2, 64, 16),
            (2, 2, 67, 32),
            (1, 2, 130, 64),
        ]
        .iter()
        .enumerate()
        {
            let seed = 100 + 10 * i as u64;
            let (q, k, v) = (
                randn(seed, &[b, h, t, d], 1.0),
                randn(seed + 1, &[b, h, t, d], 1.0),
                randn(seed + 2, &[b, h, t, d], 1.0),
            );
            let scale = 1.0 / (d as f64).sqrt();
            let fused = causal_attention(&q, &k, &v, scale).unwrap();
            let reference = composed::causal_attention(&q, &k, &v, scale).unwrap();
            let what = format!("attention {b}x{h}x{t}x{d}");
            assert_close(&what, &fused, &reference, 1e-5, 1e-4);
            let w = randn(seed + 3, &[b, h, t, d], 1.0);
            let got = grads(causal_attention, [&q, &k, &v], &w, scale);
            let want = grads(composed::causal_attention, [&q, &k, &v], &w, scale);
            for (name, (g, r)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                assert_close(&format!("{what} {name}"), g, r, 1e-5, 1e-3);
            }
        }
    }

    #[test]
    fn fused_attention_gradients_match_finite_differences() {
        let (q, k, v) = (
            randn(7, &[1, 2, 9, 4], 1.0),
            randn(8, &[1, 2, 9, 4], 1.0),
            randn(9, &[1, 2, 9, 4], 1.0),
        );
        let w = randn(10, &[1, 2, 9, 4], 1.0);
        let got = grads(causal_attention, [&q, &k, &v], &w, 0.7);
        let [q, k, v] = [&q, &k, &v].map(|x| x.to_dtype(candle_core::DType::F64).unwrap());
        let fd = [
            finite_diff(&|x| composed::causal_attention(x, &k, &v, 0.7).unwrap(), &q, &w, 1e-5),
            finite_diff(&|x| composed::causal_attention(&q, x, &v, 0.7).unwrap(), &k, &w, 1e-5),
            finite_diff(&|x| composed::causal_attention(&q, &k, x, 0.7).unwrap(), &v, &w, 1e-5),
        ];
        for (name, (g, r)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&fd)) {
            assert_close(&format!("attention {name} vs finite differences"), g, r, 1e-5, 1e-3);
        }
    }

    #[test]
    fn a_query_sees_only_itself_and_earlier_keys() {
        let (q, k, v) = (
            randn(1, &[1, 1, 6, 8], 1.0),
            randn(2, &[1, 1, 6, 8], 1.0),
            randn(3, &[1, 1, 6, 8], 1.0),
        );
        let before = causal_attention(&q, &k, &v, 0.5).unwrap();
        // Changing the last key and value changes only the last output row.
        let k2 = k
            .slice_assign(&[0..1, 0..1, 5..6, 0..8], &randn(4, &[1, 1, 1, 8], 3.0))
            .unwrap();
        let v2 = v
            .slice_assign(&[0..1, 0..1, 5..6, 0..8], &randn(5, &[1, 1, 1, 8], 3.0))
            .unwrap();
        let after = causal_attention(&q, &k2, &v2, 0.5).unwrap();
        let rows = |t: &Tensor| {
            t.narrow(2, 0, 5)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(rows(&before), rows(&after));
        assert!(causal_attention(&q, &k, &v.narrow(2, 0, 5).unwrap(), 0.5).is_err());
    }
}
