//! The forward and backward of every op the GPT's training forward runs, each alone at the model's shapes, built the
//! way `lockstep_worker::model` builds it (same `ops` functions, same dtypes, same casts). Inputs are fresh random
//! tensors, leaves of the autograd graph as the ops' real inputs are (so the backward computes every input
//! gradient the step computes). Values do not change the cost of these ops.
use candle_core::{DType, Device, Tensor, Var};
use lockstep_common::spec::Positions;
use lockstep_worker::model::{GptConfig, cross_entropy_sum};
use lockstep_worker::ops;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::timer::{FwdBwd, Timer};
use super::{Category, Part};
use crate::error::Result;

/// One micro-batch's shapes.
pub struct Shapes<'a> {
    pub cfg: &'a GptConfig,
    /// The compute dtype (the parameters are f32 and cast at use).
    pub dt: DType,
    /// Sequences per micro-batch, tokens per sequence.
    pub b: usize,
    pub t: usize,
    /// Forward/backward passes per optimizer step (this rank's micro-batches).
    pub micro_batches: f64,
    pub device: &'a Device,
}

impl Shapes<'_> {
    fn randn(&self, dims: &[usize], dtype: DType) -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1f32, dims, self.device)?.to_dtype(dtype)?)
    }

    /// A leaf that gets a gradient, as a parameter or an activation upstream of one does.
    fn leaf(&self, dims: &[usize], dtype: DType) -> Result<Var> {
        Ok(Var::from_tensor(&self.randn(dims, dtype)?)?)
    }

    fn ids(&self, n: usize, seed: u64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v = self.cfg.vocab_size as u32;
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..v)).collect();
        Ok(Tensor::from_vec(ids, n, self.device)?)
    }

    fn dt_name(&self) -> &'static str {
        dtype_name(self.dt)
    }
}

pub fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        _ => "other",
    }
}

/// [T, T] of 0 on and below the diagonal and −∞ above, f32: the model's causal mask.
pub fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    Ok(lockstep_worker::model::causal_mask(t, DType::F32, device)?)
}

pub fn measure(s: &Shapes, timer: &Timer) -> Result<Vec<Part>> {
    let mut parts = Vec::new();
    parts.extend(matmuls(s, timer)?);
    parts.extend(attention(s, timer)?);
    parts.extend(elementwise(s, timer)?);
    parts.extend(casts(s, timer)?);
    parts.extend(dropout(s, timer)?);
    parts.extend(head_copies(s, timer)?);
    Ok(parts)
}

/// The four `Conv1D`s of a block (x·W + b, W stored [in, out]) and the tied LM head (x·wteᵀ).
fn matmuls(s: &Shapes, timer: &Timer) -> Result<Vec<Part>> {
    let (c, l, bt, v) = (s.cfg.n_embd, s.cfg.n_layer as f64, s.b * s.t, s.cfg.vocab_size);
    let per_layer = l * s.micro_batches;
    // `with_bias`: the bias add too; mlp.c_fc's is fused with the GELU after it, timed in `elementwise`.
    let linear = |name: &str, k: usize, n: usize, with_bias: bool| -> Result<Part> {
        let (x, w, b) = (s.leaf(&[bt, k], s.dt)?, s.leaf(&[k, n], s.dt)?, s.leaf(&[n], s.dt)?);
        let t = if with_bias {
            timer.fwd_bwd(|| Ok(ops::bias_add(&x.matmul(&w)?, &b)?))?
        } else {
            timer.fwd_bwd(|| Ok(x.matmul(&w)?))?
        };
        Ok(Part::differentiated(
            Category::Matmul,
            format!("{name} x·W{}", if with_bias { " + b" } else { "" }),
            format!("[{bt}×{k}]·[{k}×{n}]"),
            per_layer,
            t,
        )
        .with_matmul_flops(matmul_flops(bt, k, n)))
    };
    let mut parts = vec![
        Part::labelled("attn.c_attn", linear("attn.c_attn", c, 3 * c, true))?,
        Part::labelled("attn.c_proj", linear("attn.c_proj", c, c, true))?,
        Part::labelled("mlp.c_fc", linear("mlp.c_fc", c, 4 * c, false))?,
        Part::labelled("mlp.c_proj", linear("mlp.c_proj", 4 * c, c, true))?,
    ];
    let head = || -> Result<Part> {
        let (x, wte) = (s.leaf(&[bt, c], s.dt)?, s.leaf(&[v, c], s.dt)?);
        let t = timer.fwd_bwd(|| Ok(x.matmul(&wte.t()?)?))?;
        Ok(Part::differentiated(
            Category::Matmul,
            "lm_head x·wteᵀ",
            format!("[{bt}×{c}]·[{c}×{v}]"),
            s.micro_batches,
            t,
        )
        .with_matmul_flops(matmul_flops(bt, c, v)))
    };
    parts.push(Part::labelled("lm_head", head())?);
    Ok(parts)
}

/// Forward flops of an [m, k]·[k, n] product (a multiply and an add each).
pub fn matmul_flops(m: usize, k: usize, n: usize) -> f64 {
    2.0 * m as f64 * k as f64 * n as f64
}

/// The attention core as the model computes it in training: `ops::causal_self_attention` from c_attn's output
/// `[B, T, 3C]` to c_proj's input `[B, T, C]` (flash-style, no T×T probabilities; on a GPU the heads are read and
/// written in place, elsewhere sliced, split and merged inside it), or with dropout on, the composition that keeps
/// the probabilities for it: QKᵀ, the scaled masked softmax in f32, ·V (the head copies are then `head_copies`).
/// Flops count the full T×T products, as `lockstep_worker::flops` and nanoGPT do (a causal kernel that skips the
/// masked half does less).
fn attention(s: &Shapes, timer: &Timer) -> Result<Vec<Part>> {
    let (nh, t, c) = (s.cfg.n_head, s.t, s.cfg.n_embd);
    let hd = c / nh;
    let heads = [s.b, nh, t, hd];
    let scores = [s.b, nh, t, t];
    let count = s.cfg.n_layer as f64 * s.micro_batches;
    let scale = 1.0 / (hd as f64).sqrt();
    // Batched over B·nh heads, each a [T, hd]·[hd, T] or [T, T]·[T, hd] product.
    let flops = s.b as f64 * nh as f64 * matmul_flops(t, hd, t);
    if s.cfg.dropout <= 0.0 {
        let fused = || -> Result<Part> {
            let qkv = s.leaf(&[s.b, t, 3 * c], s.dt)?;
            let tm = timer.fwd_bwd(|| Ok(ops::causal_self_attention(&qkv, nh, scale)?))?;
            Ok(Part::differentiated(
                Category::Attention,
                "ops::causal_self_attention softmax(QKᵀ·s + mask)·V",
                format!("qkv {} in {nh} heads", dims(&[s.b, t, 3 * c])),
                count,
                tm,
            )
            .with_matmul_flops(2.0 * flops))
        };
        return Ok(vec![Part::labelled("causal_self_attention", fused())?]);
    }
    let qk = || -> Result<Part> {
        let (q, k) = (s.leaf(&heads, s.dt)?, s.leaf(&heads, s.dt)?);
        let tm = timer.fwd_bwd(|| Ok(q.matmul(&k.t()?)?))?;
        Ok(Part::differentiated(Category::Attention, "QKᵀ", dims(&heads) + "·ᵀ", count, tm).with_matmul_flops(flops))
    };
    let softmax = || -> Result<Part> {
        let (x, mask) = (s.leaf(&scores, DType::F32)?, causal_mask(t, s.device)?);
        let tm = timer.fwd_bwd(|| Ok(ops::masked_softmax_last_dim(&x, &mask, scale)?))?;
        Ok(Part::differentiated(
            Category::Attention,
            "masked softmax (f32, scale and mask fused)",
            dims(&scores),
            count,
            tm,
        ))
    };
    let av = || -> Result<Part> {
        let (a, v) = (s.leaf(&scores, s.dt)?, s.leaf(&heads, s.dt)?);
        let tm = timer.fwd_bwd(|| Ok(a.matmul(&v)?))?;
        Ok(Part::differentiated(
            Category::Attention,
            "·V",
            format!("{}·{}", dims(&scores), dims(&heads)),
            count,
            tm,
        )
        .with_matmul_flops(flops))
    };
    Ok(vec![
        Part::labelled("attention QKᵀ", qk())?,
        Part::labelled("attention softmax", softmax())?,
        Part::labelled("attention ·V", av())?,
    ])
}

/// LayerNorm, GELU, the residual adds, the embedding and the loss.
fn elementwise(s: &Shapes, timer: &Timer) -> Result<Vec<Part>> {
    let (c, l, b, t, v) = (s.cfg.n_embd, s.cfg.n_layer as f64, s.b, s.t, s.cfg.vocab_size);
    let mb = s.micro_batches;
    let stream = [b, t, c];
    let layer_norm = || -> Result<Part> {
        // The residual stream in the compute dtype, the parameters f32, as the model calls it: on a GPU the kernel
        // reads and writes bf16 itself; elsewhere the casts into and out of f32 are part of the op.
        let (x, w, bias) = (
            s.leaf(&stream, s.dt)?,
            s.leaf(&[c], DType::F32)?,
            s.leaf(&[c], DType::F32)?,
        );
        let eps = s.cfg.layer_norm_eps;
        let tm = timer.fwd_bwd(|| Ok(ops::layer_norm(&x, &w, &bias, eps)?))?;
        let count = (2.0 * l + 1.0) * mb;
        Ok(Part::differentiated(
            Category::Normalisation,
            "LayerNorm (f32 inside) ×(2L+1)",
            dims(&stream),
            count,
            tm,
        ))
    };
    let gelu = || -> Result<Part> {
        // As the model's c_fc: its bias and the GELU in one op.
        let (x, bias) = (s.leaf(&[b, t, 4 * c], s.dt)?, s.leaf(&[4 * c], s.dt)?);
        let tm = timer.fwd_bwd(|| Ok(ops::bias_gelu(&x, &bias)?))?;
        Ok(Part::differentiated(
            Category::Activation,
            "mlp.c_fc bias + GELU (tanh), one op",
            dims(&[b, t, 4 * c]),
            l * mb,
            tm,
        ))
    };
    let residual = || -> Result<Part> {
        let (x, y) = (s.leaf(&stream, s.dt)?, s.leaf(&stream, s.dt)?);
        let tm = timer.fwd_bwd(|| Ok((x.as_tensor() + y.as_tensor())?))?;
        Ok(Part::differentiated(
            Category::Residual,
            "x + branch ×2L",
            dims(&stream),
            2.0 * l * mb,
            tm,
        ))
    };
    let embedding = || -> Result<Part> {
        let wte = s.leaf(&[v, c], DType::F32)?;
        let wpe = match s.cfg.positions {
            Positions::Learned => s.leaf(&[s.cfg.block_size, c], DType::F32)?.as_tensor().clone(),
            Positions::Sinusoidal => s.randn(&[s.cfg.block_size, c], DType::F32)?,
        };
        let idx = s.ids(b * t, 1)?;
        let tm = timer.fwd_bwd(|| {
            let tok = ops::embedding(&wte, &idx)?.reshape((b, t, c))?; // as Gpt::embed: the fused op on a GPU
            Ok(tok.broadcast_add(&wpe.narrow(0, 0, t)?)?)
        })?;
        Ok(Part::differentiated(
            Category::Embedding,
            "wte lookup + positions",
            format!("[{v}×{c}] at {b}×{t} ids"),
            mb,
            tm,
        ))
    };
    let loss = || -> Result<Part> {
        // The logits in the compute dtype, as the trainer hands them over (`Gpt::forward_logits`): read as they are
        // on a GPU, cast to f32 inside the op elsewhere.
        let logits = s.leaf(&[b, t, v], s.dt)?;
        let targets = s.ids(b * t, 2)?.reshape((b, t))?;
        let tm = timer.fwd_bwd(|| Ok(cross_entropy_sum(&logits, &targets)?))?;
        Ok(Part::differentiated(
            Category::Loss,
            "cross-entropy (f32 inside)",
            dims(&[b * t, v]),
            mb,
            tm,
        ))
    };
    Ok(vec![
        Part::labelled("layer_norm", layer_norm())?,
        Part::labelled("gelu", gelu())?,
        Part::labelled("residual", residual())?,
        Part::labelled("embedding", embedding())?,
        Part::labelled("loss", loss())?,
    ])
}

/// The casts a bf16 step makes outside the fused ops: each f32 master weight at its use (its backward casts the
/// gradient back), the embedding into the compute dtype, and the attention scores around the composed softmax. The
/// casts into and out of LayerNorm and the loss (CPU only) are timed with those ops. In f32 every cast is a no-op.
fn casts(s: &Shapes, timer: &Timer) -> Result<Vec<Part>> {
    let (c, l, b, t, v, nh) = (
        s.cfg.n_embd,
        s.cfg.n_layer as f64,
        s.b,
        s.t,
        s.cfg.vocab_size,
        s.cfg.n_head,
    );
    let (dt, mb) = (s.dt, s.micro_batches);
    let to = s.dt_name();
    let cast = |dims: &[usize], from: DType, to: DType| -> Result<FwdBwd> {
        let x = s.leaf(dims, from)?;
        timer.fwd_bwd(|| Ok(x.to_dtype(to)?))
    };
    // There and back: the model casts into the f32 island and its result out again.
    let round_trip = |dims: &[usize]| -> Result<FwdBwd> {
        let x = s.leaf(dims, dt)?;
        timer.fwd_bwd(|| Ok(x.to_dtype(DType::F32)?.to_dtype(dt)?))
    };
    let layer_weights = || -> Result<Part> {
        let mut sum = FwdBwd::default();
        for (k, n) in [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)] {
            sum = sum + cast(&[k, n], DType::F32, dt)? + cast(&[n], DType::F32, dt)?;
        }
        Ok(Part::differentiated(
            Category::Casts,
            format!("block weights + biases f32→{to} (8 per layer)"),
            format!("{} f32 values", 12 * c * c + 9 * c),
            l * mb,
            sum,
        ))
    };
    let wte = || -> Result<Part> {
        let tm = cast(&[v, c], DType::F32, dt)?;
        Ok(Part::differentiated(
            Category::Casts,
            format!("wte f32→{to} (LM head)"),
            dims(&[v, c]),
            mb,
            tm,
        ))
    };
    let scores = || -> Result<Part> {
        let tm = round_trip(&[b, nh, t, t])?;
        Ok(Part::differentiated(
            Category::Casts,
            format!("attention scores {to}→f32, probabilities f32→{to}"),
            dims(&[b, nh, t, t]),
            l * mb,
            tm,
        ))
    };
    let embedding = || -> Result<Part> {
        let tm = cast(&[b, t, c], DType::F32, dt)?;
        Ok(Part::differentiated(
            Category::Casts,
            format!("embedding f32→{to}"),
            dims(&[b, t, c]),
            mb,
            tm,
        ))
    };
    let mut parts = vec![
        Part::labelled("cast block weights", layer_weights())?,
        Part::labelled("cast wte", wte())?,
    ];
    // Only the composed attention (dropout on) has probabilities to cast; the fused op takes q, k, v as they are.
    if s.cfg.dropout > 0.0 {
        parts.push(Part::labelled("cast attention", scores())?);
    }
    parts.push(Part::labelled("cast embedding", embedding())?);
    if dt == DType::F32 {
        parts.iter_mut().for_each(|p| p.name += " (no-op in f32)");
    }
    Ok(parts)
}

/// Dropout through `model::DropoutRng::apply`: a mask drawn on the host from ChaCha8, copied to the device, one
/// multiply. Nothing when the model's dropout is 0 (the model skips it).
fn dropout(s: &Shapes, timer: &Timer) -> Result<Vec<Part>> {
    let p = s.cfg.dropout;
    if p <= 0.0 {
        return Ok(Vec::new());
    }
    let (c, l, b, t, nh) = (s.cfg.n_embd, s.cfg.n_layer as f64, s.b, s.t, s.cfg.n_head);
    let mut rng = lockstep_worker::model::DropoutRng::new(5);
    let mut one = |dims: &[usize]| -> Result<FwdBwd> {
        let x = s.leaf(dims, s.dt)?;
        timer.fwd_bwd(|| Ok(rng.apply(&x, p)?))
    };
    let stream = one(&[b, t, c])?;
    let probs = one(&[b, nh, t, t])?;
    Ok(vec![
        Part::differentiated(
            Category::Dropout,
            format!("embedding, attention and MLP outputs (p = {p})"),
            dims(&[b, t, c]),
            (1.0 + 2.0 * l) * s.micro_batches,
            stream,
        ),
        Part::differentiated(
            Category::Dropout,
            format!("attention probabilities (p = {p})"),
            dims(&[b, nh, t, t]),
            l * s.micro_batches,
            probs,
        ),
    ])
}

/// The layout copies around attention with dropout on (without, `ops::causal_self_attention` has none on a GPU and
/// makes them inside itself elsewhere): q, k, v cut out of c_attn's output into heads (a slice, then
/// `ops::split_heads`), and the heads put back side by side (`ops::merge_heads`), as the model makes them: a
/// permutation kernel on a GPU, candle's strided copies elsewhere.
fn head_copies(s: &Shapes, timer: &Timer) -> Result<Vec<Part>> {
    if s.cfg.dropout <= 0.0 {
        return Ok(Vec::new());
    }
    let (c, nh, b, t) = (s.cfg.n_embd, s.cfg.n_head, s.b, s.t);
    let hd = c / nh;
    let count = s.cfg.n_layer as f64 * s.micro_batches;
    let split = || -> Result<Part> {
        let qkv = s.leaf(&[b, t, 3 * c], s.dt)?;
        let mut sum = FwdBwd::default();
        for i in 0..3 {
            sum = sum + timer.fwd_bwd(|| Ok(ops::split_heads(&qkv.narrow(2, i * c, c)?, nh)?))?;
        }
        Ok(Part::differentiated(
            Category::Copies,
            "q, k, v into heads",
            dims(&[b, t, 3 * c]),
            count,
            sum,
        ))
    };
    let merge = || -> Result<Part> {
        let y = s.leaf(&[b, nh, t, hd], s.dt)?;
        let tm = timer.fwd_bwd(|| Ok(ops::merge_heads(&y)?))?;
        Ok(Part::differentiated(
            Category::Copies,
            "heads back side by side",
            dims(&[b, nh, t, hd]),
            count,
            tm,
        ))
    };
    Ok(vec![
        Part::labelled("head split", split())?,
        Part::labelled("head merge", merge())?,
    ])
}

pub fn dims(d: &[usize]) -> String {
    let inner: Vec<String> = d.iter().map(usize::to_string).collect();
    format!("[{}]", inner.join("×"))
}
