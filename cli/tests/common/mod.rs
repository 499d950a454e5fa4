//! What several CLI tests share: a tiny random-weight checkpoint written by `checkpoint::save` (no training).
use std::path::{Path, PathBuf};

use candle_core::Device;
use lockstep_common::data::Tokenizer;
use lockstep_common::spec::Positions;
use lockstep_worker::checkpoint::{self, TrainerState};
use lockstep_worker::model::{GptConfig, init_varmap};
use lockstep_worker::optim::{AdamW, AdamWConfig};
use lockstep_worker::params::Params;

/// A 2-layer, 16-dim model over `tok`'s vocabulary with block size 8, saved as step 7 under `root`.
pub fn tiny_checkpoint(root: &Path, tok: &Tokenizer) -> PathBuf {
    let cfg = GptConfig {
        vocab_size: tok.vocab_size(),
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        block_size: 8,
        dropout: 0.0,
        positions: Positions::Learned,
        init_std: 0.5, // large weights: a varied continuation
        layer_norm_eps: 1e-5,
    };
    let vm = init_varmap(&cfg, 3, &Device::Cpu).unwrap();
    let params = Params::from_varmap(&vm).unwrap();
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let opt = AdamW::new(&params, adamw).unwrap();
    let state = TrainerState {
        step: 7,
        data_cursor: 0,
        world_size: 1,
        spec_hash: "test".into(),
        seed: 3,
    };
    checkpoint::save(root, &state, &params, &cfg, &opt, tok, "{}", 0).unwrap()
}
