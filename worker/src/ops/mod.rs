//! Fused tensor ops with hand-written forward AND backward passes, for the ops whose composed candle versions
//! dominated a training step: the tanh GELU, LayerNorm, the (masked, scaled) softmax of attention, causal attention,
//! softmax cross-entropy, and a linear layer's bias add. Composed, each is a chain of broadcasts and reductions whose
//! backward allocates a tensor per node (and, on a GPU, launches a kernel per node); fused, it is one pass forward
//! and one back.
//!
//! Every public function dispatches on the device and dtype: f32 on the CPU and f32/bf16 on a GPU (a `cuda` build)
//! take the fused kernels (a candle `CustomOp` whose `bwd` is itself a fused kernel, so no second-order gradients);
//! anything else takes the composed version in [`composed`], which has candle's autograd and runs on every device.
//! The two agree to float rounding: the tests beside each CPU kernel check the outputs and the gradients against the
//! composed version, and the gradients against central finite differences in f64; the GPU kernels are checked
//! against the composed version on a GPU host (worker/tests/kernels_gpu/, attention_gpu.rs) and, without one,
//! under the emulator in worker/kernels/emulate/ (worker/tests/kernels_emulated.rs).
//!
//! The CPU kernels are plain loops over contiguous rows that LLVM vectorises (no libm call per element:
//! `math::exp` is branch-free), compiled for the baseline x86-64 and for AVX2 with a run-time pick
//! (`math::simd_kernel!`, bitwise the same results), and single-threaded: they are a few percent of a step. The GPU
//! kernels are CUDA C in worker/kernels/, compiled to PTX by worker/build.rs; they read bf16 or f32 and accumulate
//! in f32. `LOCKSTEP_GPU_COMPOSED` (gpu_kernels.rs) turns GPU kernels off by name, sending their ops to the composed
//! versions without a rebuild.
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};

use crate::error::{Error, Result};
use gpu_kernels::Kernel;

mod attention;
#[cfg(feature = "cuda")]
mod attention_cuda;
mod attention_packed;
mod bias;
mod bias_gelu;
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cross_entropy_cuda;
#[cfg(feature = "cuda")]
mod elementwise_cuda;
mod embedding;
#[cfg(feature = "cuda")]
mod embedding_cuda;
mod gelu;
pub mod gpu_kernels;
mod heads;
#[cfg(feature = "cuda")]
mod heads_cuda;
mod layer_norm;
#[cfg(feature = "cuda")]
mod layer_norm_cuda;
pub(crate) mod math;
mod softmax;

/// Whether `t` takes the fused CPU kernels.
fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Whether `t` takes the fused GPU kernels (worker/kernels/*.cu): f32 or bf16 on a CUDA device. Not when empty: the
/// kernels' launches would allocate empty outputs, which the driver refuses; candle's ops handle that case.
fn fused_gpu(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::BF16)
        && t.elem_count() > 0
}

/// [`fused_gpu`], for the kernels that count elements in 32-bit ints (elementwise.cu, heads.cu): tensors of more than
/// 2³¹ − 1 elements take candle's ops instead of an error (attention, LayerNorm and the loss count rows instead).
fn fused_gpu_small(t: &Tensor) -> bool {
    fused_gpu(t) && t.elem_count() <= i32::MAX as usize
}

/// `on_gpu` (one of the checks above), and `kernel` not turned off by `LOCKSTEP_GPU_COMPOSED`. The variable is only
/// read for GPU tensors, so the CPU never fails on it.
fn gpu_kernel(on_gpu: bool, kernel: Kernel) -> Result<bool> {
    Ok(on_gpu && gpu_kernels::enabled(kernel)?)
}

/// GPT-2's GELU, the tanh approximation (Hugging Face "gelu_new"):
/// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused(x) || gpu_kernel(fused_gpu_small(x), Kernel::Gelu)? {
        Ok(x.contiguous()?.apply_op1(gelu::GeluTanh)?)
    } else {
        composed::gelu(x)
    }
}

/// The rows of `weight` `[V, C]` named by `ids` `[N]`: `[N, C]` in the weight's dtype (the token embedding). On a GPU
/// (f32 or bf16 weight, u32 ids on the same device) the fused op of ops/embedding.rs: a gather forward and a backward
/// that sums each row's gradient in position order, in parallel and without atomics, instead of candle's
/// `index_add` (one block looping over every id). Anywhere else candle's `index_select`, so the CPU numerics are
/// candle's. An id ≥ V is an error on the CPU, a NaN row on a GPU (refusing it there would need a host sync).
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let gpu = fused_gpu(weight)
        && weight.rank() == 2
        && ids.rank() == 1
        && ids.dtype() == DType::U32
        && ids.elem_count() > 0
        && ids.device().same_device(weight.device());
    if gpu_kernel(gpu, Kernel::Embedding)? {
        return Ok(weight
            .contiguous()?
            .apply_op2(&ids.contiguous()?, embedding::Embedding)?);
    }
    Ok(weight.index_select(ids, 0)?)
}

/// Queries, keys or values `x` `[B, T, C]` split into `n_head` heads: `[B, nh, T, hd]` (hd = C / nh), contiguous.
/// On a GPU (f32 or bf16) the op of ops/heads.rs, a kernel that moves whole 16-byte pieces of head rows, forward and
/// back; anywhere else candle's `reshape · transpose · contiguous`, so the CPU is unchanged. Exact either way.
pub fn split_heads(x: &Tensor, n_head: usize) -> Result<Tensor> {
    // The op's own shape check, whichever path runs, so both refuse alike.
    heads::dims(heads::Direction::Split, n_head, x.dims())?;
    if gpu_kernel(fused_gpu_small(x), Kernel::Heads)? {
        let op = heads::Heads {
            n_head,
            dir: heads::Direction::Split,
        };
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    composed::split_heads(x, n_head)
}

/// The inverse of [`split_heads`]: heads `y` `[B, nh, T, hd]` side by side again, `[B, T, nh·hd]`, contiguous. The
/// op of ops/heads.rs on a GPU (f32 or bf16), candle's `transpose · reshape` anywhere else.
pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let nh = y.dims().get(1).copied().unwrap_or(0);
    heads::dims(heads::Direction::Merge, nh, y.dims())?;
    if gpu_kernel(fused_gpu_small(y), Kernel::Heads)? {
        let op = heads::Heads {
            n_head: nh,
            dir: heads::Direction::Merge,
        };
        return Ok(y.contiguous()?.apply_op1(op)?);
    }
    composed::merge_heads(y)
}

/// LayerNorm over the last dimension (biased variance, as torch): (x − mean) / √(var + eps) · weight + bias, with
/// `weight` and `bias` of the last dimension's size. Computed in f32 (at least) whatever x's dtype, returned in x's
/// dtype; on a GPU the kernel reads and writes x's dtype itself, so a bf16 x costs no f32 copy.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(candle_core::D::Minus1)?;
    let f32_params = weight.dtype() == DType::F32 && bias.dtype() == DType::F32;
    let shapes = weight.dims() == [c] && bias.dims() == [c];
    let same_device = weight.device().same_device(x.device()) && bias.device().same_device(x.device());
    if gpu_kernel(fused_gpu(x) && f32_params && shapes && same_device, Kernel::LayerNorm)? {
        let op = layer_norm::LayerNorm::new(eps as f32);
        return Ok(x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?);
    }
    let dtype = x.dtype();
    let x = match dtype {
        DType::F64 => x.clone(),
        _ => x.to_dtype(DType::F32)?,
    };
    let y = if fused(&x) && fused(weight) && fused(bias) && shapes {
        let op = layer_norm::LayerNorm::new(eps as f32);
        x.contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?
    } else {
        composed::layer_norm(&x, &weight.to_dtype(x.dtype())?, &bias.to_dtype(x.dtype())?, eps)?
    };
    Ok(y.to_dtype(dtype)?)
}

/// x + bias, the bias `[C]` broadcast over the rows of x `[.., C]` (a linear layer's bias).
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let c = x.dim(candle_core::D::Minus1)?;
    let gpu = fused_gpu_small(x) && bias.dtype() == x.dtype() && bias.device().same_device(x.device());
    let pair = (fused(x) && fused(bias)) || gpu_kernel(gpu, Kernel::BiasAdd)?;
    if pair && bias.dims() == [c] {
        Ok(x.contiguous()?.apply_op2(&bias.contiguous()?, bias::BiasAdd)?)
    } else {
        Ok(x.broadcast_add(bias)?)
    }
}

/// gelu(x + bias), the bias `[C]` broadcast over the rows of x `[.., C]`: a linear layer's bias and GPT-2's GELU as one
/// op (ops/bias_gelu.rs), which never stores x + bias, bitwise [`bias_add`] then [`gelu`]. Fused where `bias_add` is
/// (f32 on the CPU, f32/bf16 on a GPU with a bias of x's dtype); anywhere else those two.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let c = x.dim(candle_core::D::Minus1)?;
    if bias.dims() != [c] {
        return Err(Error::Model(format!(
            "bias-gelu: input {:?}, bias {:?}: the bias must be [{c}]",
            x.dims(),
            bias.dims()
        )));
    }
    let gpu = fused_gpu_small(x) && bias.dtype() == x.dtype() && bias.device().same_device(x.device());
    if (fused(x) && fused(bias)) || gpu_kernel(gpu, Kernel::BiasGelu)? {
        return Ok(x.contiguous()?.apply_op2(&bias.contiguous()?, bias_gelu::BiasGelu)?);
    }
    gelu(&bias_add(x, bias)?)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        Ok(x.contiguous()?.apply_op1(softmax::Softmax { scale: 1.0 })?)
    } else {
        composed::softmax_last_dim(x)
    }
}

/// softmax(scale·x + mask) over the last dimension, for attention scores `x` [.., T_q, T_k] and an additive
/// `mask` [T_q, T_k] (0 where a query may attend, −∞ where it may not) shared by the leading dimensions. The mask
/// gets no gradient. Fully masked rows give NaN, as the composed version does.
pub fn masked_softmax_last_dim(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let rank = x.rank();
    if fused(x) && fused(mask) && rank >= 2 && mask.dims() == &x.dims()[rank - 2..] {
        let op = softmax::MaskedSoftmax { scale: scale as f32 };
        Ok(x.contiguous()?.apply_op2(&mask.contiguous()?, op)?)
    } else {
        composed::masked_softmax_last_dim(x, mask, scale)
    }
}

/// Causal self-attention, softmax(scale·QKᵀ + causal mask)·V, for `q`, `k`, `v` `[B, H, T, D]` of one dtype; the
/// output has q's dtype. On a GPU (a `cuda` build, head sizes and dtypes its kernels cover) it is [`flash_attention`]:
/// the T×T probabilities never exist. On the CPU it is the composed matmul-softmax-matmul
/// ([`composed::causal_attention`]), which candle's multithreaded matmuls make faster there than the fused kernel
/// (measured in docs/BENCHMARKS.md), at the cost of B·H·T² floats per layer.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gpu_kernel(
        q.device().is_cuda() && attention_cuda::supports(q.dim(candle_core::D::Minus1)?, q.dtype()),
        Kernel::Attention,
    )? {
        return flash_attention(q, k, v, scale);
    }
    composed::causal_attention(q, k, v, scale)
}

/// [`causal_attention`] as one fused op with its own backward (see [`attention`]): an online softmax over key blocks
/// forward, the probabilities recomputed from the saved row log-sum-exp backward. f32 on the CPU; on a GPU, what the
/// kernels cover (`attention_cuda::supports`). Errors on anything else.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() || q.rank() != 4 {
        return Err(Error::Model(format!(
            "flash attention: q {:?} {:?}, k {:?}, v {:?}: needs three [B, H, T, D] tensors of one dtype",
            q.dims(),
            q.dtype(),
            k.dtype(),
            v.dtype()
        )));
    }
    #[cfg(feature = "cuda")]
    let gpu = q.device().is_cuda() && attention_cuda::supports(q.dim(candle_core::D::Minus1)?, q.dtype());
    #[cfg(not(feature = "cuda"))]
    let gpu = false;
    if !(gpu || fused(q)) {
        return Err(Error::Model(format!(
            "flash attention runs on f32 CPU tensors{}, not {:?} on {:?}",
            if cfg!(feature = "cuda") {
                " and the GPU kernels' head sizes and dtypes"
            } else {
                ""
            },
            q.dtype(),
            q.device().location()
        )));
    }
    let op = attention::FlashAttention::new(scale as f32);
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// Causal self-attention from the c_attn product: q, k and v are the column thirds of `qkv` `[B, T, 3C]`, each cut
/// into `n_head` heads of C / n_head columns; the result is `[B, T, C]`, the heads' outputs side by side (c_proj's
/// input). On a GPU (a `cuda` build, head sizes and dtypes its kernels cover) it is [`flash_self_attention`], which
/// reads and writes the heads where they lie: no copies split them out or merge them back, and the backward writes
/// one dQKV instead of a zero-padded `[B, T, 3C]` gradient per third. Anywhere else it is
/// [`composed::causal_self_attention`]: slice, [`split_heads`], [`causal_attention`], [`merge_heads`], so the CPU
/// numerics are those of that chain.
pub fn causal_self_attention(qkv: &Tensor, n_head: usize, scale: f64) -> Result<Tensor> {
    let (_, _, _, _hd) = attention_packed::dims(qkv.dims(), n_head)?;
    #[cfg(feature = "cuda")]
    if gpu_kernel(
        fused_gpu(qkv) && attention_cuda::supports(_hd, qkv.dtype()),
        Kernel::Attention,
    )? {
        return flash_self_attention(qkv, n_head, scale);
    }
    composed::causal_self_attention(qkv, n_head, scale)
}

/// [`causal_self_attention`] as one fused op with its own backward (ops/attention_packed.rs). f32 on the CPU (each
/// head gathered for the CPU kernel of [`flash_attention`], bitwise the same results); on a GPU, what the kernels
/// cover. Errors on anything else.
pub fn flash_self_attention(qkv: &Tensor, n_head: usize, scale: f64) -> Result<Tensor> {
    let (_, _, _, _hd) = attention_packed::dims(qkv.dims(), n_head)?;
    #[cfg(feature = "cuda")]
    let gpu = fused_gpu(qkv) && attention_cuda::supports(_hd, qkv.dtype());
    #[cfg(not(feature = "cuda"))]
    let gpu = false;
    if !(gpu || fused(qkv)) {
        return Err(Error::Model(format!(
            "flash self-attention runs on f32 CPU tensors{}, not {:?} {:?} on {:?}",
            if cfg!(feature = "cuda") {
                " and the GPU kernels' head sizes and dtypes"
            } else {
                ""
            },
            qkv.dims(),
            qkv.dtype(),
            qkv.device().location()
        )));
    }
    let op = attention_packed::PackedAttention::new(n_head, scale as f32);
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

/// The sum over rows of the cross-entropy of `logits` `[N, vocab]` against `targets` `[N]` (integer ids), as a scalar
/// f32 tensor. The targets get no gradient.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _vocab) = logits.dims2()?;
    if targets.dims() != [n] {
        return Err(Error::Model(format!(
            "cross-entropy: logits {:?} do not match targets {:?}",
            logits.dims(),
            targets.dims()
        )));
    }
    // On a GPU the kernel reads bf16 logits as they are: a [B·T, 50k] f32 copy would be the step's largest tensor.
    let gpu = gpu_kernel(
        fused_gpu(logits) && targets.device().same_device(logits.device()),
        Kernel::CrossEntropy,
    )?;
    let logits = if gpu {
        logits.clone()
    } else {
        logits.to_dtype(DType::F32)?
    };
    if gpu || fused(&logits) {
        let targets = targets.to_dtype(DType::U32)?.contiguous()?;
        Ok(logits
            .contiguous()?
            .apply_op2(&targets, cross_entropy::CrossEntropySum::default())?)
    } else {
        composed::cross_entropy_sum(&logits, targets)
    }
}

/// The same functions from candle's differentiable primitives: the fallback for other devices and dtypes, and
/// the reference the fused kernels are tested against.
pub mod composed {
    use candle_core::{D, DType, Tensor};

    use crate::error::Result;

    /// candle's `gelu` is the tanh approximation.
    pub fn gelu(x: &Tensor) -> Result<Tensor> {
        Ok(x.gelu()?)
    }

    /// `[B, T, C]` → `[B, nh, T, hd]`, contiguous (shapes checked by [`super::split_heads`]).
    pub fn split_heads(x: &Tensor, n_head: usize) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        Ok(x.reshape((b, t, n_head, c / n_head))?.transpose(1, 2)?.contiguous()?)
    }

    /// `[B, nh, T, hd]` → `[B, T, nh·hd]`, contiguous.
    pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
        let (b, nh, t, hd) = y.dims4()?;
        Ok(y.transpose(1, 2)?.reshape((b, t, nh * hd))?)
    }

    pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?; // [.., 1]
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        Ok(xhat.broadcast_mul(weight)?.broadcast_add(bias)?)
    }

    /// exp(x − max) / sum, with the max detached: it only guards against overflow and cancels out mathematically,
    /// so it needs no gradient.
    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
    }

    pub fn masked_softmax_last_dim(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
        softmax_last_dim(&(x * scale)?.broadcast_add(mask)?)
    }

    /// softmax(scale·QKᵀ + causal mask)·V with the scores materialised: `[B, H, T, T]` in f32 at least (the
    /// softmax's sums need the precision; f64 inputs stay f64), the mask a constant (no gradient).
    pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let t = q.dim(D::Minus2)?;
        let acc = if q.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), q.device())?.to_dtype(acc)?;
        let scores = q.matmul(&k.t()?)?.to_dtype(acc)?;
        let att = super::masked_softmax_last_dim(&scores, &mask, scale)?.to_dtype(q.dtype())?;
        Ok(att.matmul(&v.contiguous()?)?)
    }

    /// [`super::causal_self_attention`] unfused: q, k, v sliced from `qkv` `[B, T, 3C]` and split into heads, attended
    /// to by [`super::causal_attention`], merged back into `[B, T, C]` (shapes checked by the caller).
    pub fn causal_self_attention(qkv: &Tensor, n_head: usize, scale: f64) -> Result<Tensor> {
        let c = qkv.dim(D::Minus1)? / 3;
        let heads = |i: usize| super::split_heads(&qkv.narrow(D::Minus1, i * c, c)?, n_head);
        let y = super::causal_attention(&heads(0)?, &heads(1)?, &heads(2)?, scale)?;
        super::merge_heads(&y)
    }

    /// log-sum-exp minus the target's logit, summed over the rows whose target is not `IGNORE`; `logits`
    /// `[N, vocab]`, `targets` `[N]`. An ignored row is multiplied by an exact 0 (its gather reads id 0 instead).
    pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let n = targets.elem_count();
        let targets = targets.to_dtype(DType::U32)?.reshape((n, 1))?;
        let keep = targets.ne(f64::from(lockstep_common::data::IGNORE))?; // [N, 1]
        let safe = keep.where_cond(&targets, &targets.zeros_like()?)?;
        let max = logits.max_keepdim(1)?.detach(); // [N, 1]; cancels out, so no gradient needed
        let shifted = logits.broadcast_sub(&max)?;
        let log_sum_exp = shifted.exp()?.sum_keepdim(1)?.log()?; // [N, 1]
        let target_logit = shifted.gather(&safe, 1)?; // [N, 1]
        Ok(((log_sum_exp - target_logit)? * keep.to_dtype(logits.dtype())?)?.sum_all()?)
    }
}

/// The f32 elements of a contiguous CPU layout (the kernels' inputs are made contiguous before they are applied).
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input is not contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// [`cpu_f32`] for a storage behind a tensor (in a `bwd`, which is handed tensors).
fn storage_f32<'a>(s: &'a Storage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        Storage::Cpu(s) => cpu_f32(s, l, op),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: the fused kernel runs on the CPU only"
        ))),
    }
}

/// A non-empty last dimension, and the number of rows before it.
fn rows_and_len(dims: &[usize], op: &str) -> candle_core::Result<(usize, usize)> {
    match dims.split_last() {
        Some((&len, rest)) if len > 0 => Ok((rest.iter().product(), len)),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: needs a non-empty last dimension, got shape {dims:?}"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Shared helpers for the kernels' tests: seeded inputs, comparisons, and central finite differences of the
    //! composed version in f64.
    use candle_core::{DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    pub fn randn(seed: u64, dims: &[usize], std: f32) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = dims.iter().product();
        // A sum of uniforms: roughly normal, no tails, plenty for tests.
        let v: Vec<f32> = (0..n)
            .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * std * 1.7)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    pub fn to_vec(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    /// max |a − b| / (atol + rtol·|b|) ≤ 1, elementwise; panics naming the worst element.
    pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let (a, b) = (to_vec(a), to_vec(b));
        let mut worst = (0.0, 0);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            if x == y {
                continue;
            }
            let r = (x - y).abs() / (atol + rtol * y.abs());
            assert!(!r.is_nan(), "{what}: NaN at {i}: {x} vs {y}");
            if r > worst.0 {
                worst = (r, i);
            }
        }
        let i = worst.1;
        assert!(
            worst.0 <= 1.0,
            "{what}: element {i}: {} vs {} (atol {atol}, rtol {rtol})",
            a[i],
            b[i]
        );
    }

    /// d/dx of Σ f(x)·w by central differences, in f64, for each element of `x`.
    pub fn finite_diff(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let x64 = to_vec(x);
        let w = w.to_dtype(DType::F64).unwrap();
        let loss = |v: &[f64]| -> f64 {
            let t = Tensor::from_slice(v, x.dims(), &Device::Cpu).unwrap();
            (f(&t) * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let mut v = x64.clone();
        let grads: Vec<f64> = (0..x64.len())
            .map(|i| {
                v[i] = x64[i] + eps;
                let up = loss(&v);
                v[i] = x64[i] - eps;
                let down = loss(&v);
                v[i] = x64[i];
                (up - down) / (2.0 * eps)
            })
            .collect();
        Tensor::from_vec(grads, x.dims(), &Device::Cpu).unwrap()
    }

    /// The gradient of Σ f(x)·w with respect to `x`, by candle's backward.
    pub fn grad_of(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, w: &Tensor) -> Tensor {
        let x = Var::from_tensor(x).unwrap();
        let loss = (f(x.as_tensor()) * w).unwrap().sum_all().unwrap();
        loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::math::BASELINE_ONLY;
    use super::testing::randn;
    use super::*;

    /// Every fused op's output and input gradients, for one set of odd-shaped inputs.
    fn run_all() -> Vec<Vec<f32>> {
        let (x, w, b) = (randn(1, &[3, 5, 19], 2.0), randn(2, &[19], 1.0), randn(3, &[19], 1.0));
        let mask = Tensor::from_vec(
            (0..5 * 5)
                .map(|i| if i % 5 <= i / 5 { 0.0 } else { f32::NEG_INFINITY })
                .collect::<Vec<f32>>(),
            (5, 5),
            &Device::Cpu,
        )
        .unwrap();
        let scores = randn(4, &[3, 5, 5], 2.0);
        let targets = Tensor::from_vec((0..15u32).map(|i| i % 19).collect::<Vec<_>>(), 15, &Device::Cpu).unwrap();
        let vars = [&x, &w, &b, &scores].map(|t| Var::from_tensor(t).unwrap());
        let [x, w, b, scores] = vars.each_ref().map(|v| v.as_tensor());
        let outs = [
            gelu(x).unwrap(),
            layer_norm(x, w, b, 1e-5).unwrap(),
            bias_add(x, b).unwrap(),
            bias_gelu(x, b).unwrap(),
            softmax_last_dim(x).unwrap(),
            masked_softmax_last_dim(scores, &mask, 0.3).unwrap(),
            cross_entropy_sum(&x.reshape((15, 19)).unwrap(), &targets).unwrap(),
        ];
        let mut got = Vec::new();
        for (i, y) in outs.iter().enumerate() {
            let up = randn(10 + i as u64, y.dims(), 1.0);
            let grads = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            got.push(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            for v in &vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    got.push(g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
            }
        }
        got
    }

    #[test]
    fn kernels_give_bitwise_the_same_results_on_both_paths() {
        let wide = run_all();
        BASELINE_ONLY.with(|b| b.set(true));
        let baseline = run_all();
        BASELINE_ONLY.with(|b| b.set(false));
        assert_eq!(wide.len(), baseline.len());
        for (i, (a, b)) in wide.iter().zip(&baseline).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same && a.len() == b.len(),
                "output {i} differs between the AVX2 and the baseline path"
            );
        }
    }
}
