//! How much arithmetic a training step is, and what share of a device's peak it reached (MFU), as nanoGPT estimates
//! them (PaLM, appendix B): a forward and backward pass cost 6 flops per parameter per token, plus the attention
//! scores and their weighted sum, 12·L·H·Q·T per token (L layers, H heads, Q = head size, T = sequence length).
//! Position embeddings are not counted among the parameters (they are a lookup, not a matmul).
use crate::model::GptConfig;
use lockstep_common::spec::Positions;

/// Parameters that take part in matmuls: all of them except learned position embeddings.
pub fn matmul_params(cfg: &GptConfig, params: usize) -> usize {
    match cfg.positions {
        Positions::Learned => params.saturating_sub(cfg.block_size * cfg.n_embd),
        Positions::Sinusoidal => params,
    }
}

/// Flops of one forward + backward pass per trained token, for sequences of `seq_len` tokens.
pub fn flops_per_token(cfg: &GptConfig, params: usize, seq_len: usize) -> f64 {
    let n = matmul_params(cfg, params) as f64;
    let (l, h, t) = (cfg.n_layer as f64, cfg.n_head as f64, seq_len as f64);
    let q = (cfg.n_embd / cfg.n_head.max(1)) as f64;
    6.0 * n + 12.0 * l * h * q * t
}

/// Model flops utilisation: achieved flops per second over the device's dense peak, in [0, 1] for sane inputs.
pub fn mfu(flops_per_token: f64, tokens_per_sec: f64, peak_flops: f64) -> f64 {
    flops_per_token * tokens_per_sec / peak_flops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2() -> GptConfig {
        GptConfig {
            vocab_size: 50257,
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            block_size: 1024,
            dropout: 0.0,
            positions: Positions::Learned,
            init_std: 0.02,
            layer_norm_eps: 1e-5,
        }
    }

    /// nanoGPT's numbers for GPT-2 small: 124,439,808 parameters with the tied head, 123.65M without position
    /// embeddings, and its README's "flops per token ≈ 6N + 12LHQT".
    #[test]
    fn gpt2_small_matches_nanogpts_estimate() {
        let cfg = gpt2();
        let params = 124_439_808;
        assert_eq!(matmul_params(&cfg, params), 123_653_376);
        let f = flops_per_token(&cfg, params, 1024);
        assert_eq!(f, 6.0 * 123_653_376.0 + 12.0 * 12.0 * 12.0 * 64.0 * 1024.0);
        // nanoGPT's estimate_mfu at ~30% on an A100 (312 TFLOP/s bf16): about 108k tokens/s.
        let m = mfu(f, 108_000.0, 312e12);
        assert!((m - 0.3).abs() < 0.01, "{m}");
    }

    #[test]
    fn sinusoidal_positions_have_no_parameters_to_leave_out() {
        let cfg = GptConfig {
            positions: Positions::Sinusoidal,
            ..gpt2()
        };
        assert_eq!(matmul_params(&cfg, 1000), 1000);
    }
}
