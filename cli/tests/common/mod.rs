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
    save_tiny(root, tok, tok.vocab_size(), 8, "{}")
}

/// A chat model: like [`tiny_checkpoint`] but with room for the chat template's special tokens, a 64-token context
/// window and a fine-tuning spec (`data.source = "sft"`), saved as step 7 under `root`.
#[allow(dead_code)] // only the chat and eval tests use it
pub fn tiny_chat_checkpoint(root: &Path, tok: &Tokenizer) -> PathBuf {
    use lockstep_common::RunSpec;
    use lockstep_common::data::chat::ChatTemplate;
    use lockstep_common::spec::DataSource;

    let mut spec = RunSpec::default();
    spec.data.source = DataSource::Sft;
    spec.data.path = Some("conversations.jsonl".into());
    let spec_json = spec.to_json();
    RunSpec::from_json(&spec_json).unwrap();
    save_tiny(root, tok, ChatTemplate::new(tok).vocab_size(), 64, &spec_json)
}

/// Random weights (seed 3, large enough for a varied continuation) of a 2-layer, 2-head, 16-dim model, saved with a
/// fresh optimizer as step 7 of `spec_json`'s run.
fn save_tiny(root: &Path, tok: &Tokenizer, vocab_size: usize, block_size: usize, spec_json: &str) -> PathBuf {
    let cfg = GptConfig {
        vocab_size,
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        block_size,
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
    checkpoint::save(root, &state, &params, &cfg, &opt, tok, spec_json).unwrap()
}
