//! The GPT decoder (nanoGPT / GPT-2 architecture), read top to bottom like nanoGPT's `model.py`:
//! config → LayerNorm → attention → MLP → block → GPT, then the loss and the seeded initialisation.
//!
//! Tensor names and layouts are Hugging Face GPT-2's (`transformer.h.0.attn.c_attn.weight`, `Conv1D` weights stored
//! `[in, out]`), so checkpoints move both ways. Every op used here has a backward pass: candle 0.11's fused
//! `layer_norm`/`softmax_last_dim` kernels do not (DESIGN "candle traps"), so LayerNorm, softmax, GELU and the loss
//! are our own ops with hand-written backward passes (`crate::ops`; composed candle ops on other devices).
//!
//! Precision: parameters are f32 ("master weights"). With a bf16 compute dtype ([`Gpt::with_compute_dtype`]) the
//! residual stream, matmuls and activations are bf16 and each weight is cast where it is used, once per step inside
//! [`Gpt::weight_cast_scope`] (the cast's backward returns f32 gradients); LayerNorm, the attention softmax and the
//! loss compute in f32 inside their ops, and [`Gpt::forward`] returns f32 logits.
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lockstep_common::data::plan::mix;
use lockstep_common::spec::{ModelSpec, Positions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::weight_casts::{CastScope, WeightCasts};

#[derive(Debug, Clone, PartialEq)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub dropout: f64,
    pub positions: Positions,
    pub init_std: f64,
    pub layer_norm_eps: f64,
}

impl GptConfig {
    pub fn from_spec(spec: &ModelSpec, vocab_size: usize) -> Self {
        Self {
            vocab_size,
            n_layer: spec.n_layer,
            n_head: spec.n_head,
            n_embd: spec.n_embd,
            block_size: spec.block_size,
            dropout: spec.dropout,
            positions: spec.positions,
            init_std: spec.init_std,
            layer_norm_eps: 1e-5,
        }
    }

    /// Hugging Face's `GPT2Config` schema, plus a `lockstep` object for what GPT-2 cannot express (sinusoidal
    /// positions; `transformers` ignores unknown keys).
    pub fn to_hf_config(&self) -> Value {
        json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": null,
            "activation_function": "gelu_new",
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "layer_norm_epsilon": self.layer_norm_eps,
            "initializer_range": self.init_std,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "tie_word_embeddings": true,
            "use_cache": true,
            "bos_token_id": null,
            "eos_token_id": null,
            "dtype": "float32",
            "lockstep": { "positions": positions_name(self.positions) },
        })
    }

    /// Reads a `GPT2Config` JSON. Architecture fields are required; fields that only matter for training default
    /// to GPT-2's values. Variants this model does not implement are rejected by name rather than mis-loaded.
    pub fn from_hf_config(v: &Value) -> Result<Self> {
        let usize_field = |names: &[&str]| -> Result<usize> {
            for name in names {
                if let Some(x) = v.get(name).filter(|x| !x.is_null()) {
                    return x.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| {
                        Error::Model(format!("config field {name} = {x} is not a non-negative integer"))
                    });
                }
            }
            Err(Error::Model(format!(
                "config is missing the field {}",
                names.join(" / ")
            )))
        };
        let f64_field = |name: &str, default: f64| -> Result<f64> {
            match v.get(name).filter(|x| !x.is_null()) {
                None => Ok(default),
                Some(x) => x
                    .as_f64()
                    .ok_or_else(|| Error::Model(format!("config field {name} = {x} is not a number"))),
            }
        };
        if !v.is_object() {
            return Err(Error::Model("config is not a JSON object".into()));
        }
        if let Some(act) = v.get("activation_function").and_then(Value::as_str)
            && !matches!(act, "gelu_new" | "gelu_pytorch_tanh")
        {
            return Err(Error::Model(format!(
                "config field activation_function = {act:?} is not supported (only the tanh GELU, \"gelu_new\")"
            )));
        }
        if v.get("tie_word_embeddings").and_then(Value::as_bool) == Some(false) {
            return Err(Error::Model(
                "config field tie_word_embeddings = false is not supported (the LM head is tied)".into(),
            ));
        }
        if v.get("scale_attn_by_inverse_layer_idx").and_then(Value::as_bool) == Some(true) {
            return Err(Error::Model(
                "config field scale_attn_by_inverse_layer_idx = true is not supported".into(),
            ));
        }
        let positions = match v.pointer("/lockstep/positions") {
            None => Positions::Learned,
            Some(p) => match p.as_str() {
                Some("learned") => Positions::Learned,
                Some("sinusoidal") => Positions::Sinusoidal,
                _ => {
                    return Err(Error::Model(format!(
                        "config field lockstep.positions = {p} is not \"learned\" or \"sinusoidal\""
                    )));
                }
            },
        };
        let cfg = Self {
            vocab_size: usize_field(&["vocab_size"])?,
            n_layer: usize_field(&["n_layer"])?,
            n_head: usize_field(&["n_head"])?,
            n_embd: usize_field(&["n_embd"])?,
            block_size: usize_field(&["n_positions", "n_ctx"])?,
            dropout: f64_field("resid_pdrop", 0.1)?,
            positions,
            init_std: f64_field("initializer_range", 0.02)?,
            layer_norm_eps: f64_field("layer_norm_epsilon", 1e-5)?,
        };
        if let Some(inner) = v.get("n_inner").and_then(Value::as_u64)
            && inner as usize != 4 * cfg.n_embd
        {
            return Err(Error::Model(format!(
                "config field n_inner = {inner} is not supported (the MLP is 4 * n_embd = {})",
                4 * cfg.n_embd
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.vocab_size == 0 || self.n_layer == 0 || self.block_size == 0 {
            return Err(Error::Model(format!(
                "vocab_size ({}), n_layer ({}) and block_size ({}) must all be at least 1",
                self.vocab_size, self.n_layer, self.block_size
            )));
        }
        if self.n_head == 0 || self.n_embd == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::Model(format!(
                "n_embd ({}) must be a positive multiple of n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        if self.positions == Positions::Sinusoidal && !self.n_embd.is_multiple_of(2) {
            return Err(Error::Model(format!(
                "sinusoidal positions need an even n_embd, not {}",
                self.n_embd
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Model(format!("dropout {} is not in [0, 1)", self.dropout)));
        }
        Ok(())
    }
}

fn positions_name(p: Positions) -> &'static str {
    match p {
        Positions::Learned => "learned",
        Positions::Sinusoidal => "sinusoidal",
    }
}

/// How a parameter is initialised (GPT-2 / nanoGPT `_init_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamInit {
    Normal(f64),
    Zeros,
    Ones,
}

/// Every parameter of a model with this config: HF name, shape and initialisation, in HF's order. The single
/// source of truth for `Gpt::new`, `init_varmap` and the checkpoint loader's checks.
pub fn param_specs(cfg: &GptConfig) -> Vec<(String, Vec<usize>, ParamInit)> {
    let (c, std) = (cfg.n_embd, cfg.init_std);
    // GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance does not
    // grow with depth.
    let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
    let mut out = vec![(
        "transformer.wte.weight".to_string(),
        vec![cfg.vocab_size, c],
        ParamInit::Normal(std),
    )];
    if cfg.positions == Positions::Learned {
        out.push((
            "transformer.wpe.weight".to_string(),
            vec![cfg.block_size, c],
            ParamInit::Normal(std),
        ));
    }
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("transformer.h.{i}.{s}");
        out.extend([
            (p("ln_1.weight"), vec![c], ParamInit::Ones),
            (p("ln_1.bias"), vec![c], ParamInit::Zeros),
            (p("attn.c_attn.weight"), vec![c, 3 * c], ParamInit::Normal(std)),
            (p("attn.c_attn.bias"), vec![3 * c], ParamInit::Zeros),
            (p("attn.c_proj.weight"), vec![c, c], ParamInit::Normal(proj_std)),
            (p("attn.c_proj.bias"), vec![c], ParamInit::Zeros),
            (p("ln_2.weight"), vec![c], ParamInit::Ones),
            (p("ln_2.bias"), vec![c], ParamInit::Zeros),
            (p("mlp.c_fc.weight"), vec![c, 4 * c], ParamInit::Normal(std)),
            (p("mlp.c_fc.bias"), vec![4 * c], ParamInit::Zeros),
            (p("mlp.c_proj.weight"), vec![4 * c, c], ParamInit::Normal(proj_std)),
            (p("mlp.c_proj.bias"), vec![c], ParamInit::Zeros),
        ]);
    }
    out.push(("transformer.ln_f.weight".to_string(), vec![c], ParamInit::Ones));
    out.push(("transformer.ln_f.bias".to_string(), vec![c], ParamInit::Zeros));
    out
}

/// Fetches a parameter, refusing to let a `VarMap`-backed builder silently invent a missing one.
fn param(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    if !vb.contains_tensor(name) {
        let full = if vb.prefix().is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", vb.prefix())
        };
        return Err(Error::Model(format!("missing parameter {full} (shape {shape:?})")));
    }
    Ok(vb.get(shape, name)?)
}

/// Seeded dropout masks. candle's CPU RNG cannot be seeded, so masks are drawn on the host from ChaCha8 and
/// copied to the activation's device: the same seed gives bitwise the same run.
pub struct DropoutRng {
    rng: ChaCha8Rng,
}

impl DropoutRng {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Inverted dropout: zero with probability `p`, scale survivors by 1/(1-p) so eval needs no rescaling.
    pub fn apply(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        let n = x.elem_count();
        let scale = (1.0 / (1.0 - p)) as f32;
        let p = p as f32;
        let mask: Vec<f32> = (0..n)
            .map(|_| if self.rng.random::<f32>() < p { 0.0 } else { scale })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }
}

fn dropout(x: Tensor, p: f64, rng: &mut Option<&mut DropoutRng>) -> Result<Tensor> {
    match rng {
        Some(rng) if p > 0.0 => rng.apply(&x, p),
        _ => Ok(x),
    }
}

/// LayerNorm (biased variance, as torch), computed in f32 and returned in the input's dtype.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(vb: VarBuilder, cfg: &GptConfig) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            weight: param(&vb, &[c], "weight")?,
            bias: param(&vb, &[c], "bias")?,
            eps: cfg.layer_norm_eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Fused with its own backward on the CPU and the GPU (f32 inside whatever x's dtype), composed elsewhere.
        crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// GPT-2's `Conv1D`: a linear layer whose weight is stored `[in, out]`, so y = x·W + b with no transpose.
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
    casts: Arc<WeightCasts>,
}

impl Conv1D {
    fn new(vb: VarBuilder, n_in: usize, n_out: usize, casts: &Arc<WeightCasts>) -> Result<Self> {
        Ok(Self {
            weight: param(&vb, &[n_in, n_out], "weight")?,
            bias: param(&vb, &[n_out], "bias")?,
            casts: Arc::clone(casts),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, crate::ops::bias_add)
    }

    /// gelu(x·W + b), the bias and the activation one op (`ops::bias_gelu`): the MLP's c_fc.
    fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, crate::ops::bias_gelu)
    }

    /// `with_bias`(x·W, b) for x [B, T, in]: [B, T, out].
    fn forward_then(&self, x: &Tensor, with_bias: fn(&Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (b, t, n_in) = x.dims3()?;
        // A no-op in f32; in bf16 the f32 master weights' casts, made once per step (see `weight_casts`).
        let (w, bias) = (
            self.casts.get(&self.weight, x.dtype())?,
            self.casts.get(&self.bias, x.dtype())?,
        );
        let y = with_bias(&x.reshape((b * t, n_in))?.matmul(&w)?, &bias)?; // [B*T, out]
        Ok(y.reshape((b, t, ()))?)
    }
}

/// softmax(x) = exp(x - max) / sum over the last dimension (fused with its backward on the CPU, see `ops`),
/// computed in f32 and returned in the input's dtype.
fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(crate::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?)
}

struct CausalSelfAttention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: usize,
    dropout: f64,
}

impl CausalSelfAttention {
    fn new(vb: VarBuilder, cfg: &GptConfig, casts: &Arc<WeightCasts>) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            c_attn: Conv1D::new(vb.pp("c_attn"), c, 3 * c, casts)?,
            c_proj: Conv1D::new(vb.pp("c_proj"), c, c, casts)?,
            n_head: cfg.n_head,
            dropout: cfg.dropout,
        })
    }

    /// Queries, keys and values of `x` [B, T, C], each split into heads: [B, nh, T, hd]: one product with all of
    /// c_attn, sliced. For decoding and attention dropout, which need the heads as tensors; training without dropout
    /// hands the whole product to `ops::causal_self_attention` instead. (Three products with a third of c_attn's
    /// columns each trained the demo measurably worse: docs/BENCHMARKS.md.)
    fn qkv_heads(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (_, _, c) = x.dims3()?;
        let qkv = self.c_attn.forward(x)?; // [B, T, 3C]
        let heads = |i: usize| crate::ops::split_heads(&qkv.narrow(2, i * c, c)?, self.n_head);
        Ok((heads(0)?, heads(1)?, heads(2)?))
    }

    /// `mask`: [T, T], 0 on and below the diagonal, -inf above; needed only with attention dropout in training
    /// (else the fused attention masks itself).
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, rng: &mut Option<&mut DropoutRng>) -> Result<Tensor> {
        let (_, _, c) = x.dims3()?;
        let hd = c / self.n_head;
        let scale = 1.0 / (hd as f64).sqrt();
        let y = if let (true, Some(mask)) = (self.dropout > 0.0 && rng.is_some(), mask) {
            // Dropout on the attention probabilities needs them in memory: softmax(QKᵀ/√hd + mask), the scale and
            // mask fused into the softmax, [B, nh, T, T], in f32 whatever the compute dtype (`mask` is f32 and the
            // softmax's sums need the precision).
            let (q, k, v) = self.qkv_heads(x)?;
            let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
            let att = crate::ops::masked_softmax_last_dim(&scores, mask, scale)?.to_dtype(q.dtype())?;
            let y = dropout(att, self.dropout, rng)?.matmul(&v)?; // [B, nh, T, hd]
            crate::ops::merge_heads(&y)? // re-assemble all head outputs side by side: [B, T, C]
        } else {
            // Flash-style: the T×T probabilities never exist, and on a GPU the heads are read from the c_attn
            // product and written side by side where they lie (ops::causal_self_attention).
            crate::ops::causal_self_attention(&self.c_attn.forward(x)?, self.n_head, scale)? // [B, T, C]
        };
        dropout(self.c_proj.forward(&y)?, self.dropout, rng)
    }

    /// Inference over `x` [B, T_new, C], the positions after those whose keys and values are in `past`
    /// ([B, nh, T_past, hd] each). Returns the output and the keys and values of all T_past + T_new positions.
    /// `mask`: [T_new, T_past + T_new] (see `causal_mask_after`); `None` for a single new position, which may see
    /// everything.
    fn forward_cached(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (_, _, c) = x.dims3()?;
        let hd = c / self.n_head;
        let (q, k, v) = self.qkv_heads(x)?; // [B, nh, T_new, hd] each
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?), // [B, nh, T_all, hd]
            None => (k, v),
        };
        let att = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * (1.0 / (hd as f64).sqrt()))?; // [B, nh, T_new, T_all]
        let att = match mask {
            Some(mask) => att.broadcast_add(mask)?,
            None => att,
        };
        let y = softmax_last_dim(&att)?.to_dtype(v.dtype())?.matmul(&v)?; // [B, nh, T_new, hd]
        let y = crate::ops::merge_heads(&y)?; // [B, T_new, C]
        Ok((self.c_proj.forward(&y)?, (k, v)))
    }
}

struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
    dropout: f64,
}

impl Mlp {
    fn new(vb: VarBuilder, cfg: &GptConfig, casts: &Arc<WeightCasts>) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            c_fc: Conv1D::new(vb.pp("c_fc"), c, 4 * c, casts)?,
            c_proj: Conv1D::new(vb.pp("c_proj"), 4 * c, c, casts)?,
            dropout: cfg.dropout,
        })
    }

    fn forward(&self, x: &Tensor, rng: &mut Option<&mut DropoutRng>) -> Result<Tensor> {
        // The tanh approximation, i.e. HF's "gelu_new", fused with c_fc's bias.
        let h = self.c_fc.forward_gelu(x)?; // [B, T, 4C]
        dropout(self.c_proj.forward(&h)?, self.dropout, rng)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &GptConfig, casts: &Arc<WeightCasts>) -> Result<Self> {
        Ok(Self {
            ln_1: LayerNorm::new(vb.pp("ln_1"), cfg)?,
            attn: CausalSelfAttention::new(vb.pp("attn"), cfg, casts)?,
            ln_2: LayerNorm::new(vb.pp("ln_2"), cfg)?,
            mlp: Mlp::new(vb.pp("mlp"), cfg, casts)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, rng: &mut Option<&mut DropoutRng>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, mask, rng)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?, rng)?)?)
    }

    /// `forward` in eval mode for new positions only, given the cached keys and values of the earlier ones; also
    /// returns this layer's keys and values of all positions.
    fn forward_cached(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (a, kv) = self.attn.forward_cached(&self.ln_1.forward(x)?, mask, past)?;
        let x = (x + a)?;
        let x = (&x + self.mlp.forward(&self.ln_2.forward(&x)?, &mut None)?)?;
        Ok((x, kv))
    }
}

enum PositionEmbedding {
    /// `transformer.wpe.weight`, [block_size, C].
    Learned(Tensor),
    /// The fixed table, [block_size, C]; a plain tensor, so autograd never tracks it.
    Sinusoidal(Tensor),
}

/// PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(pos / 10000^(2i/C)) ("Attention Is All You Need").
fn sinusoidal_table(block_size: usize, n_embd: usize, device: &Device) -> Result<Tensor> {
    let mut table = vec![0f32; block_size * n_embd];
    for pos in 0..block_size {
        for i in 0..n_embd / 2 {
            let angle = pos as f64 / 10000f64.powf(2.0 * i as f64 / n_embd as f64);
            table[pos * n_embd + 2 * i] = angle.sin() as f32;
            table[pos * n_embd + 2 * i + 1] = angle.cos() as f32;
        }
    }
    Ok(Tensor::from_vec(table, (block_size, n_embd), device)?)
}

/// The keys and values of every layer for the positions fed so far ([B, nh, T, hd] each), so that decoding a new
/// token costs one position's work instead of the whole context's (`Gpt::forward_cached`).
///
/// Positions are absolute (learned or sinusoidal), so a cache cannot slide: it holds at most `block_size`
/// positions, and a caller whose context grows past that must `clear` it and re-feed the last `block_size` tokens.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with this config.
    pub fn new(cfg: &GptConfig) -> Self {
        Self {
            layers: vec![None; cfg.n_layer],
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|kv| *kv = None);
        self.len = 0;
    }

    /// Rows (sequences) held, or `None` while empty.
    fn batch(&self) -> Result<Option<usize>> {
        match self.layers.first().and_then(Option::as_ref) {
            Some((k, _)) => Ok(Some(k.dim(0)?)),
            None => Ok(None),
        }
    }
}

pub struct Gpt {
    wte: Tensor,
    wpe: PositionEmbedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
    cfg: GptConfig,
    /// The dtype of the residual stream and the matmuls; the parameters stay f32.
    compute_dtype: DType,
    /// The weights' compute-dtype casts, shared by the layers (one per weight and step; `weight_casts`).
    casts: Arc<WeightCasts>,
}

impl Gpt {
    pub fn new(vb: VarBuilder, cfg: &GptConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = vb.pp("transformer");
        let casts = Arc::new(WeightCasts::default());
        let wte = param(&vb.pp("wte"), &[cfg.vocab_size, cfg.n_embd], "weight")?;
        let wpe = match cfg.positions {
            Positions::Learned => {
                PositionEmbedding::Learned(param(&vb.pp("wpe"), &[cfg.block_size, cfg.n_embd], "weight")?)
            }
            Positions::Sinusoidal => PositionEmbedding::Sinusoidal(
                sinusoidal_table(cfg.block_size, cfg.n_embd, vb.device())?.to_dtype(vb.dtype())?,
            ),
        };
        let h = (0..cfg.n_layer)
            .map(|i| Block::new(vb.pp(format!("h.{i}")), cfg, &casts))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(vb.pp("ln_f"), cfg)?;
        Ok(Self {
            wte,
            wpe,
            h,
            ln_f,
            cfg: cfg.clone(),
            compute_dtype: DType::F32,
            casts,
        })
    }

    /// Until the scope is dropped, each weight is cast to the compute dtype once and shared by every forward: the
    /// trainer holds one over a step's micro-batches (the weights change only in the optimizer step after it).
    pub fn weight_cast_scope(&self) -> CastScope {
        self.casts.scope()
    }

    /// The same model computing in `dtype` (f32 or bf16); gradients still reach the f32 parameters.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Token + position embeddings [B, T, C] of `idx` [B, T] at positions `start..start+T`, in the compute dtype.
    fn embed(&self, idx: &Tensor, start: usize) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let tok_emb = crate::ops::embedding(&self.wte, &idx.flatten_all()?)?; // [B·T, C]
        let tok_emb = tok_emb.reshape((b, t, self.cfg.n_embd))?; // [B, T, C]
        let pos_emb = match &self.wpe {
            PositionEmbedding::Learned(w) | PositionEmbedding::Sinusoidal(w) => w.narrow(0, start, t)?, // [T, C]
        };
        Ok(tok_emb.broadcast_add(&pos_emb)?.to_dtype(self.compute_dtype)?)
    }

    /// The LM head, tied to the token embedding: logits = h · wteᵀ, in the compute dtype.
    fn lm_head(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.casts.get(&self.wte, x.dtype())?;
        Ok(x.matmul(&w.t()?)?)
    }

    /// Logits [B, T, vocab] in f32 for token ids `idx` [B, T] (any integer dtype), for sampling and scoring.
    /// `dropout`: `None` = eval mode; `Some(rng)` = training, with masks drawn from `rng` (skipped anyway when the
    /// config's dropout is 0).
    pub fn forward(&self, idx: &Tensor, dropout_rng: Option<&mut DropoutRng>) -> Result<Tensor> {
        Ok(self.forward_logits(idx, dropout_rng)?.to_dtype(DType::F32)?)
    }

    /// [`Gpt::forward`] with the logits left in the compute dtype, for the loss: the fused cross-entropy reads bf16
    /// logits on a GPU, where an f32 copy of [B·T, vocab] would be the largest tensor of the step.
    pub fn forward_logits(&self, idx: &Tensor, mut dropout_rng: Option<&mut DropoutRng>) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        if t > self.cfg.block_size {
            return Err(Error::Model(format!(
                "cannot forward a sequence of length {t}: the block size is only {}",
                self.cfg.block_size
            )));
        }
        let c = self.cfg.n_embd;
        let mut x = dropout(self.embed(idx, 0)?, self.cfg.dropout, &mut dropout_rng)?; // [B, T, C]
        // Only attention dropout materialises the probabilities and needs the mask (a T×T upload per forward).
        let mask = match (self.cfg.dropout > 0.0, &dropout_rng) {
            (true, Some(_)) => Some(causal_mask(t, DType::F32, x.device())?),
            _ => None,
        };
        for block in &self.h {
            x = block.forward(&x, mask.as_ref(), &mut dropout_rng)?;
        }
        let x = self.ln_f.forward(&x)?;
        let logits = self.lm_head(&x.reshape((b * t, c))?)?; // [B*T, vocab]
        Ok(logits.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Logits [B, T_new, vocab] (f32) for `idx_new` [B, T_new], the tokens that follow the `cache.len()` positions already
    /// in `cache`, which then holds them too. Eval mode (no dropout). Feeding a sequence in chunks gives the logits
    /// `forward` gives for the whole of it (within float rounding). Fails, leaving `cache` unchanged, if the cache
    /// would exceed `block_size` positions: the caller then clears it and re-feeds the last `block_size` tokens.
    pub fn forward_cached(&self, idx_new: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = idx_new.dims2()?;
        let x = self.ln_f.forward(&self.cached_hidden(idx_new, cache)?)?; // [B, T_new, C]
        let logits = self.lm_head(&x.reshape((b * t, self.cfg.n_embd))?)?; // [B*T_new, vocab]
        Ok(logits.reshape((b, t, self.cfg.vocab_size))?.to_dtype(DType::F32)?)
    }

    /// `forward_cached`, but only the last new position's logits [B, vocab] (f32): what decoding needs, without the LM
    /// head's work for the rest of a multi-token chunk.
    pub fn forward_cached_last(&self, idx_new: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = idx_new.dims2()?;
        let x = self.cached_hidden(idx_new, cache)?; // [B, T_new, C]
        let x = self.ln_f.forward(&x.narrow(1, t - 1, 1)?)?; // [B, 1, C]
        Ok(self.lm_head(&x.reshape((b, self.cfg.n_embd))?)?.to_dtype(DType::F32)?) // [B, vocab]
    }

    /// The residual stream [B, T_new, C] after the last block for the new positions; appends their keys and values
    /// to `cache` once every layer has succeeded.
    fn cached_hidden(&self, idx_new: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = idx_new.dims2()?;
        let past = cache.len();
        if t == 0 {
            return Err(Error::Model("forward_cached needs at least one new token".into()));
        }
        if past + t > self.cfg.block_size {
            return Err(Error::Model(format!(
                "cannot feed {t} more token(s) to a cache of {past}: the block size is only {}",
                self.cfg.block_size
            )));
        }
        if cache.layers.len() != self.h.len() {
            return Err(Error::Model(format!(
                "the KV cache has {} layers, the model {}",
                cache.layers.len(),
                self.h.len()
            )));
        }
        if let Some(rows) = cache.batch()?
            && rows != b
        {
            return Err(Error::Model(format!(
                "the KV cache holds {rows} sequence(s), not the {b} given"
            )));
        }
        let mut x = self.embed(idx_new, past)?; // [B, T_new, C]
        // A single new position may attend to everything before it: only a chunk needs a mask (f32, as the scores).
        let mask = match t {
            1 => None,
            _ => Some(causal_mask_after(past, t, DType::F32, x.device())?),
        };
        let mut kvs = Vec::with_capacity(self.h.len());
        for (block, kv) in self.h.iter().zip(&cache.layers) {
            let (y, kv) = block.forward_cached(&x, mask.as_ref(), kv.as_ref())?;
            x = y;
            kvs.push(Some(kv));
        }
        cache.layers = kvs;
        cache.len = past + t;
        Ok(x)
    }
}

/// [T, T]: 0 where a position may attend (itself and earlier), -inf where it may not; added before the softmax.
pub fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)?)
}

/// [T_new, T_past + T_new]: the causal mask of `t` new positions that follow `past` cached ones (which every new
/// position may see). `causal_mask(t)` is `causal_mask_after(0, t)`.
fn causal_mask_after(past: usize, t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..past + t).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, past + t), device)?.to_dtype(dtype)?)
}

/// The sum (not the mean) of the token cross-entropies of `logits` [.., vocab] against `targets` [..] (integer
/// ids), as a scalar f32 tensor. The trainer divides by the global batch's target count (DESIGN §3), so the loss
/// is the same whatever the world size.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    let n = targets.elem_count();
    if logits.elem_count() != n * vocab {
        return Err(Error::Model(format!(
            "cross-entropy: logits {:?} do not match targets {:?}",
            logits.dims(),
            targets.dims()
        )));
    }
    // Softmax and the target pick fused with their backward on the CPU (f32) and the GPU (f32 or bf16 logits as they
    // are); composed elsewhere. The loss is f32 either way.
    crate::ops::cross_entropy_sum(&logits.reshape((n, vocab))?, &targets.reshape(n)?)
}

/// A fresh parameter set, deterministic from `seed`. Each tensor draws from its own ChaCha8 stream keyed by
/// (seed, name), so adding, removing or reordering parameters never changes the others' values.
pub fn init_varmap(cfg: &GptConfig, seed: u64, device: &Device) -> Result<VarMap> {
    cfg.validate()?;
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Model("variable map lock poisoned".into()))?;
        for (name, shape, init) in param_specs(cfg) {
            let n: usize = shape.iter().product();
            let values = match init {
                ParamInit::Zeros => vec![0f32; n],
                ParamInit::Ones => vec![1f32; n],
                ParamInit::Normal(std) => normal_values(mix(seed, name_hash(&name)), n, std),
            };
            let var = Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?;
            data.insert(name, var);
        }
    }
    Ok(varmap)
}

/// FNV-1a: a stable (platform- and release-independent) hash of a parameter name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// N(0, std) samples by Box–Muller (in f64, rounded once to f32).
fn normal_values(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 - u lies in (0, 1], so the log is finite.
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Params;

    fn tiny(positions: Positions, dropout: f64) -> GptConfig {
        GptConfig {
            vocab_size: 11,
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            block_size: 6,
            dropout,
            positions,
            init_std: 0.02,
            layer_norm_eps: 1e-5,
        }
    }

    fn model(cfg: &GptConfig, seed: u64) -> (VarMap, Gpt) {
        let vm = init_varmap(cfg, seed, &Device::Cpu).unwrap();
        let gpt = Gpt::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), cfg).unwrap();
        (vm, gpt)
    }

    fn batch() -> (Tensor, Tensor) {
        let idx = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &Device::Cpu).unwrap();
        let tgt = Tensor::new(&[[2u32, 3, 4, 5, 6], [7, 8, 9, 10, 0]], &Device::Cpu).unwrap();
        (idx, tgt)
    }

    #[test]
    fn every_parameter_gets_a_nonzero_gradient() {
        for positions in [Positions::Learned, Positions::Sinusoidal] {
            for p in [0.0, 0.1] {
                let cfg = tiny(positions, p);
                let (vm, gpt) = model(&cfg, 7);
                let params = Params::from_varmap(&vm).unwrap();
                assert_eq!(params.len(), param_specs(&cfg).len());
                let (idx, tgt) = batch();
                let mut rng = DropoutRng::new(3);
                let logits = gpt.forward(&idx, Some(&mut rng)).unwrap();
                let grads = cross_entropy_sum(&logits, &tgt).unwrap().backward().unwrap();
                for (name, var) in params.names().iter().zip(params.vars()) {
                    let g = grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{name}: no gradient ({positions:?}, p={p})"));
                    let max = g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(
                        max > 0.0 && max.is_finite(),
                        "{name}: gradient max |g| = {max} ({positions:?}, p={p})"
                    );
                }
            }
        }
    }

    #[test]
    fn dropout_is_seeded_and_eval_is_deterministic() {
        let cfg = tiny(Positions::Learned, 0.2);
        let (_vm, gpt) = model(&cfg, 1);
        let (idx, _) = batch();
        let run = |seed| {
            gpt.forward(&idx, Some(&mut DropoutRng::new(seed)))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        let eval = |m: &Gpt| {
            m.forward(&idx, None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(eval(&gpt), eval(&gpt));
        assert_ne!(eval(&gpt), run(5));
    }

    #[test]
    fn causal_future_tokens_do_not_change_past_logits() {
        let cfg = tiny(Positions::Sinusoidal, 0.0);
        let (_vm, gpt) = model(&cfg, 2);
        let a = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1u32, 2, 9, 9]], &Device::Cpu).unwrap();
        let first2 = |x: &Tensor| {
            gpt.forward(x, None)
                .unwrap()
                .narrow(1, 0, 2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(first2(&a), first2(&b));
    }

    #[test]
    fn too_long_input_names_both_lengths() {
        let cfg = tiny(Positions::Learned, 0.0);
        let (_vm, gpt) = model(&cfg, 2);
        let idx = Tensor::zeros((1, 7), DType::U32, &Device::Cpu).unwrap();
        let err = gpt.forward(&idx, None).err().unwrap().to_string();
        assert!(err.contains('7') && err.contains('6'), "{err}");
    }

    #[test]
    fn seeded_init_is_deterministic_and_order_independent() {
        let cfg = tiny(Positions::Learned, 0.0);
        let sum = |seed| {
            Params::from_varmap(&init_varmap(&cfg, seed, &Device::Cpu).unwrap())
                .unwrap()
                .checksum()
                .unwrap()
        };
        assert_eq!(sum(42), sum(42));
        assert_ne!(sum(42), sum(43));
        // A tensor's values depend only on (seed, name): the same name in a different model (other layer count,
        // so a different creation order and set) gets the same values.
        let deeper = GptConfig {
            n_layer: 3,
            ..cfg.clone()
        };
        let a = init_varmap(&cfg, 42, &Device::Cpu).unwrap();
        let b = init_varmap(&deeper, 42, &Device::Cpu).unwrap();
        let get = |vm: &VarMap, n: &str| {
            vm.data().lock().unwrap()[n]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        for name in ["transformer.wte.weight", "transformer.h.1.attn.c_attn.weight"] {
            assert_eq!(get(&a, name), get(&b, name), "{name}");
        }
    }

    #[test]
    fn init_has_gpt2_statistics() {
        let cfg = GptConfig {
            vocab_size: 500,
            n_embd: 64,
            n_head: 4,
            ..tiny(Positions::Learned, 0.0)
        };
        let vm = init_varmap(&cfg, 9, &Device::Cpu).unwrap();
        let data = vm.data().lock().unwrap();
        let std = |n: &str| {
            let v = data[n].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        assert!((std("transformer.wte.weight") - 0.02).abs() < 0.001);
        assert!((std("transformer.h.0.mlp.c_proj.weight") - 0.01).abs() < 0.0005); // 0.02 / sqrt(2 * 2)
        assert_eq!(std("transformer.h.0.ln_1.weight"), 0.0);
        let ones = data["transformer.ln_f.weight"].as_tensor().to_vec1::<f32>().unwrap();
        assert!(ones.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn hf_config_round_trip_and_missing_field() {
        for positions in [Positions::Learned, Positions::Sinusoidal] {
            let cfg = tiny(positions, 0.1);
            assert_eq!(GptConfig::from_hf_config(&cfg.to_hf_config()).unwrap(), cfg);
        }
        let mut v = tiny(Positions::Learned, 0.0).to_hf_config();
        v.as_object_mut().unwrap().remove("n_embd");
        let err = GptConfig::from_hf_config(&v).unwrap_err().to_string();
        assert!(err.contains("n_embd"), "{err}");
        let mut v = tiny(Positions::Learned, 0.0).to_hf_config();
        v["activation_function"] = json!("relu");
        assert!(
            GptConfig::from_hf_config(&v)
                .unwrap_err()
                .to_string()
                .contains("activation_function")
        );
    }

    #[test]
    fn missing_parameter_is_named() {
        let cfg = tiny(Positions::Learned, 0.0);
        let vm = init_varmap(&cfg, 1, &Device::Cpu).unwrap();
        vm.data().lock().unwrap().remove("transformer.h.1.mlp.c_fc.bias");
        let err = Gpt::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("transformer.h.1.mlp.c_fc.bias"), "{err}");
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let logits = Tensor::new(&[[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0]]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[2u32, 1]], &Device::Cpu).unwrap();
        let got = cross_entropy_sum(&logits, &targets)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let want = (lse - 3.0) + 3f64.ln();
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn forward_cached_in_chunks_matches_forward() {
        for positions in [Positions::Learned, Positions::Sinusoidal] {
            let cfg = GptConfig {
                init_std: 0.5,
                ..tiny(positions, 0.1) // dropout is ignored: both paths below run in eval mode
            };
            let (_vm, gpt) = model(&cfg, 4);
            let idx = Tensor::new(&[[1u32, 2, 3, 4, 5, 6], [6, 7, 8, 9, 10, 0]], &Device::Cpu).unwrap();
            let full = gpt.forward(&idx, None).unwrap(); // [2, 6, 11]
            // Chunks of 1 (a one-token prompt), 3 (a prompt after a cached prefix: needs the offset mask), 1, 1.
            let mut cache = KvCache::new(&cfg);
            let mut start = 0;
            for len in [1, 3, 1, 1] {
                let got = gpt
                    .forward_cached(&idx.narrow(1, start, len).unwrap(), &mut cache)
                    .unwrap();
                let want = full.narrow(1, start, len).unwrap();
                assert!(max_diff(&got, &want) <= 1e-5, "{positions:?} chunk at {start}");
                start += len;
                assert_eq!(cache.len(), start);
            }
            // The last-position variant, from an empty cache with the whole sequence as one chunk.
            cache.clear();
            assert!(cache.is_empty());
            let last = gpt.forward_cached_last(&idx, &mut cache).unwrap(); // [2, 11]
            let want = full.narrow(1, 5, 1).unwrap().squeeze(1).unwrap();
            assert!(max_diff(&last, &want) <= 1e-5, "{positions:?}");
            // Each prefix's last position, decoding one token at a time.
            cache.clear();
            for i in 0..6 {
                let step = gpt
                    .forward_cached_last(&idx.narrow(1, i, 1).unwrap(), &mut cache)
                    .unwrap();
                let want = gpt.forward(&idx.narrow(1, 0, i + 1).unwrap(), None).unwrap();
                let want = want.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
                assert!(max_diff(&step, &want) <= 1e-5, "{positions:?} step {i}");
            }
        }
    }

    #[test]
    fn forward_cached_refuses_overflow_and_mismatches_leaving_the_cache_intact() {
        let cfg = tiny(Positions::Learned, 0.0);
        let (_vm, gpt) = model(&cfg, 2);
        let mut cache = KvCache::new(&cfg);
        gpt.forward_cached(&Tensor::zeros((1, 5), DType::U32, &Device::Cpu).unwrap(), &mut cache)
            .unwrap();
        let two = Tensor::zeros((1, 2), DType::U32, &Device::Cpu).unwrap();
        let err = gpt.forward_cached(&two, &mut cache).err().unwrap().to_string();
        assert!(
            err.contains("block size") && err.contains('6') && err.contains('5'),
            "{err}"
        );
        assert_eq!(cache.len(), 5);
        let batch2 = Tensor::zeros((2, 1), DType::U32, &Device::Cpu).unwrap();
        let err = gpt.forward_cached(&batch2, &mut cache).err().unwrap().to_string();
        assert!(err.contains("1 sequence") && err.contains("2 given"), "{err}");
        // The cache still works: the sixth position fits.
        let one = Tensor::zeros((1, 1), DType::U32, &Device::Cpu).unwrap();
        assert_eq!(gpt.forward_cached(&one, &mut cache).unwrap().dims(), [1, 1, 11]);
        assert_eq!(cache.len(), 6);
        let deeper = GptConfig {
            n_layer: 3,
            ..cfg.clone()
        };
        let err = gpt
            .forward_cached(&one, &mut KvCache::new(&deeper))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("3 layers"), "{err}");
    }
}
