//! Causal self-attention straight from the c_attn product: `qkv` `[B, T, 3C]` in, `y` `[B, T, C]` out, where q, k and
//! v are qkv's column thirds, each cut into `n_head` heads of C / n_head columns, and y has the heads side by side
//! (what c_proj takes). The same algorithm as [`super::attention`] — an online softmax forward, the probabilities
//! recomputed from the saved row log-sum-exp backward — but the heads are read and written where they lie.
//!
//! It exists for the GPU. There, the unfused chain is `narrow` (a strided copy per third) → split heads → attention
//! → merge heads forward, and backward the merge's split, three splits' merges, and for each `narrow` a zero-padded
//! `[B, T, 3C]` gradient plus the adds that sum the three: about 1.3 GB of memory traffic per GPT-2 layer in bf16
//! (16 × 1024 tokens), none of it arithmetic. Here the kernels take row strides (attention_cuda.rs's
//! `Geometry::packed`) and the backward writes dQ, dK and dV into their thirds of one dQKV.
//!
//! On the CPU the op gathers each head's rows into a contiguous copy and runs the CPU kernel of `attention.rs`, so
//! it can be tested without a GPU, bitwise against that kernel; `ops::causal_self_attention` does not use it there
//! (the composed path is faster on a CPU, as for `ops::causal_attention`).
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::attention::{head_backward, head_forward};
use super::{cpu_f32, storage_f32};

/// The op, holding what its forward saved for its backward: each row's log-sum-exp.
pub(super) struct PackedAttention {
    pub n_head: usize,
    pub scale: f32,
    lse: OnceLock<Saved>,
}

/// The forward's row log-sum-exps, `[B·H·T]` f32 (head-major: head b·H + h, then t), where the forward ran.
enum Saved {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<f32>),
}

impl PackedAttention {
    pub fn new(n_head: usize, scale: f32) -> Self {
        Self {
            n_head,
            scale,
            lse: OnceLock::new(),
        }
    }
}

/// (B, T, C, hd) of `qkv` `[B, T, 3C]` in `n_head` heads; the error names the shape.
pub(super) fn dims(qkv: &[usize], n_head: usize) -> candle_core::Result<(usize, usize, usize, usize)> {
    match qkv {
        &[b, t, c3] if t > 0 && c3 > 0 && c3 % 3 == 0 && n_head > 0 && (c3 / 3) % n_head == 0 => {
            Ok((b, t, c3 / 3, c3 / 3 / n_head))
        }
        _ => candle_core::bail!(
            "causal self-attention: qkv must be [B, T, 3C] with T ≥ 1 and C a positive multiple of the {n_head} \
             heads, got {qkv:?}"
        ),
    }
}

/// Columns `at..at + hd` of sequence `b`'s T rows (each `width` wide), as a contiguous [T, hd]: one head's q, k or v
/// (rows of qkv, 3C wide) or output (rows of y, C wide).
fn gather(x: &[f32], width: usize, at: usize, (t, hd): (usize, usize), b: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * hd);
    for row in x[b * t * width..(b + 1) * t * width].chunks_exact(width) {
        out.extend_from_slice(&row[at..at + hd]);
    }
    out
}

/// The inverse of [`gather`]: contiguous [T, hd] rows into columns `at..at + hd` of sequence `b`'s rows.
fn scatter(dst: &mut [f32], width: usize, at: usize, (t, hd): (usize, usize), b: usize, src: &[f32]) {
    for (row, head_row) in dst[b * t * width..(b + 1) * t * width]
        .chunks_exact_mut(width)
        .zip(src.chunks_exact(hd))
    {
        row[at..at + hd].copy_from_slice(head_row);
    }
}

impl PackedAttention {
    /// q, k, v of every head, gathered: three `[T, hd]` copies per head, head b·H + h at index b·H + h.
    fn heads(&self, qkv: &[f32], (b, t, c, hd): (usize, usize, usize, usize)) -> Vec<[Vec<f32>; 3]> {
        (0..b * self.n_head)
            .into_par_iter()
            .map(|i| {
                let (bi, h) = (i / self.n_head, i % self.n_head);
                [0, 1, 2].map(|third| gather(qkv, 3 * c, third * c + h * hd, (t, hd), bi))
            })
            .collect()
    }

    /// The forward of every head: (o `[T, hd]`, lse `[T]`) per head.
    fn forward_heads(&self, heads: &[[Vec<f32>; 3]], (t, hd): (usize, usize)) -> Vec<(Vec<f32>, Vec<f32>)> {
        heads
            .par_iter()
            .map(|[q, k, v]| {
                let (mut o, mut lse) = (vec![0f32; t * hd], vec![0f32; t]);
                head_forward(q, k, v, hd, self.scale, &mut o, &mut lse);
                (o, lse)
            })
            .collect()
    }
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "causal-self-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = dims(l.dims(), self.n_head)?;
        let (b, t, c, hd) = shape;
        let qkv = cpu_f32(s, l, self.name())?;
        let outputs = self.forward_heads(&self.heads(qkv, shape), (t, hd));
        let mut y = vec![0f32; b * t * c];
        let mut lse = Vec::with_capacity(b * self.n_head * t);
        for (i, (o, l)) in outputs.iter().enumerate() {
            let (bi, h) = (i / self.n_head, i % self.n_head);
            scatter(&mut y, c, h * hd, (t, hd), bi, o);
            lse.extend_from_slice(l);
        }
        // Set once: a second forward through the same op value would keep the first L, which the backward would
        // then use. candle never does that (`apply_op*` takes the op by value) and every call here builds its own
        // op. Not set (the `let _`), the backward recomputes L.
        let _ = self.lse.set(Saved::Cpu(lse));
        Ok((CpuStorage::F32(y), Shape::from((b, t, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        dims(l.dims(), self.n_head)?;
        let (y, shape, lse) = super::attention_cuda::forward_packed((s, l), self.n_head, self.scale)?;
        let _ = self.lse.set(Saved::Cuda(lse));
        Ok((y, shape))
    }

    fn bwd(&self, qkv: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(Saved::Cuda(lse)) = self.lse.get() {
            let dqkv = super::attention_cuda::backward_packed(qkv, y, grad, self.n_head, lse, self.scale)?;
            return Ok(Some(dqkv));
        }
        let name = self.name();
        let shape = dims(qkv.dims(), self.n_head)?;
        let (b, t, c, hd) = shape;
        if y.dims() != [b, t, c] || grad.dims() != [b, t, c] {
            candle_core::bail!(
                "{name}: backward: y {:?} and its gradient {:?} must be [B, T, C] = {:?}",
                y.dims(),
                grad.dims(),
                [b, t, c]
            );
        }
        let (qkv, y) = (qkv.contiguous()?, y.contiguous()?);
        let dy = grad.to_dtype(DType::F32)?.contiguous()?;
        let guards = [&qkv, &y, &dy].map(|x| x.storage_and_layout());
        let slices = guards
            .iter()
            .map(|(s, l)| storage_f32(s, l, name))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let [qkv_s, y_s, dy_s] = [0, 1, 2].map(|i| slices[i]);
        let heads = self.heads(qkv_s, shape);
        let recomputed;
        let lse: Vec<&[f32]> = match self.lse.get() {
            Some(Saved::Cpu(lse)) if lse.len() == heads.len() * t => lse.chunks_exact(t).collect(),
            _ => {
                // Not saved (see cpu_fwd): the forward again, for its L.
                recomputed = self.forward_heads(&heads, (t, hd));
                recomputed.iter().map(|(_, l)| l.as_slice()).collect()
            }
        };
        let grads: Vec<[Vec<f32>; 3]> = heads
            .par_iter()
            .zip(&lse)
            .enumerate()
            .map(|(i, ([q, k, v], lse))| {
                let (bi, h) = (i / self.n_head, i % self.n_head);
                let o = gather(y_s, c, h * hd, (t, hd), bi);
                let d_o = gather(dy_s, c, h * hd, (t, hd), bi);
                let [mut dq, mut dk, mut dv] = [0, 1, 2].map(|_| vec![0f32; t * hd]);
                head_backward((q, k, v), (&o, lse, &d_o), hd, self.scale, &mut dq, &mut dk, &mut dv);
                [dq, dk, dv]
            })
            .collect();
        drop(guards);
        let mut dqkv = vec![0f32; b * t * 3 * c];
        for (i, g) in grads.iter().enumerate() {
            let (bi, h) = (i / self.n_head, i % self.n_head);
            for (third, g) in g.iter().enumerate() {
                scatter(&mut dqkv, 3 * c, third * c + h * hd, (t, hd), bi, g);
            }
        }
        Ok(Some(Tensor::from_vec(dqkv, (b, t, 3 * c), qkv.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, Var};

    use crate::ops::testing::{assert_close, randn};
    use crate::ops::{composed, flash_attention, flash_self_attention};

    /// y and the gradient of Σ f(qkv)·w with respect to qkv.
    fn forward_and_grad(f: &dyn Fn(&Tensor) -> Tensor, qkv: &Tensor, w: &Tensor) -> (Tensor, Tensor) {
        let var = Var::from_tensor(qkv).unwrap();
        let y = f(var.as_tensor());
        let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        (y, grads.get(var.as_tensor()).unwrap().clone())
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// What the op replaces: slice the thirds, split them into heads, attend with the fused kernel, merge.
    fn split_then_flash(qkv: &Tensor, n_head: usize, scale: f64) -> Tensor {
        let c = qkv.dim(2).unwrap() / 3;
        let heads = |i: usize| crate::ops::split_heads(&qkv.narrow(2, i * c, c).unwrap(), n_head).unwrap();
        let y = flash_attention(&heads(0), &heads(1), &heads(2), scale).unwrap();
        crate::ops::merge_heads(&y).unwrap()
    }

    #[test]
    fn the_op_is_the_split_attention_bitwise_forward_and_backward() {
        // Sequences and heads > 1 (each head must find its own columns and rows), T around the key block (64).
        for (i, &(b, t, n_head, hd)) in [(1, 1, 1, 4), (2, 5, 3, 16), (2, 67, 2, 32), (1, 130, 2, 64)]
            .iter()
            .enumerate()
        {
            let seed = 300 + 10 * i as u64;
            let c = n_head * hd;
            let qkv = randn(seed, &[b, t, 3 * c], 1.0);
            let w = randn(seed + 1, &[b, t, c], 1.0);
            let scale = 1.0 / (hd as f64).sqrt();
            let (y, dqkv) = forward_and_grad(&|x| flash_self_attention(x, n_head, scale).unwrap(), &qkv, &w);
            let (y_ref, dqkv_ref) = forward_and_grad(&|x| split_then_flash(x, n_head, scale), &qkv, &w);
            let what = format!("B={b} T={t} H={n_head} hd={hd}");
            assert_eq!(y.dims(), [b, t, c], "{what}");
            assert_eq!(dqkv.dims(), [b, t, 3 * c], "{what}");
            assert_eq!(bits(&y), bits(&y_ref), "{what}: y");
            assert_eq!(bits(&dqkv), bits(&dqkv_ref), "{what}: dqkv");
        }
    }

    #[test]
    fn the_op_matches_the_composed_attention_forward_and_backward() {
        let (b, t, n_head, hd) = (2, 70, 3, 8);
        let c = n_head * hd;
        let qkv = randn(41, &[b, t, 3 * c], 1.0);
        let w = randn(42, &[b, t, c], 1.0);
        let scale = 1.0 / (hd as f64).sqrt();
        let (y, dqkv) = forward_and_grad(&|x| flash_self_attention(x, n_head, scale).unwrap(), &qkv, &w);
        let composed = |x: &Tensor| composed::causal_self_attention(x, n_head, scale).unwrap();
        let (y_ref, dqkv_ref) = forward_and_grad(&composed, &qkv, &w);
        assert_close("y", &y, &y_ref, 1e-5, 1e-4);
        assert_close("dqkv", &dqkv, &dqkv_ref, 1e-5, 1e-3);
    }

    #[test]
    fn shapes_the_op_cannot_take_are_refused_naming_them() {
        let qkv = randn(1, &[1, 4, 12], 1.0);
        for (n_head, x) in [
            (5, qkv.clone()),
            (2, randn(1, &[1, 4, 10], 1.0)),
            (2, randn(1, &[4, 12], 1.0)),
        ] {
            let err = flash_self_attention(&x, n_head, 0.5).unwrap_err().to_string();
            assert!(err.contains(&format!("{:?}", x.dims())), "{err}");
        }
    }
}
