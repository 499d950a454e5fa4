//! The demo's sizes (full and `--quick`) and the two run specs built from them: pretraining on the prepared
//! monolingual text, then fine-tuning the pretrained model on the instruction set.
use std::path::Path;

use lockstep_common::RunSpec;
use lockstep_common::spec::DataSource;

use super::world::Sizes;

/// How big each phase is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub world: Sizes,
    /// Ids of the byte-level BPE trained on the pretraining text (the chat template adds 4).
    pub bpe_vocab: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub pretrain: Phase,
    pub finetune: Phase,
    /// Held-out items answered at every fine-tuning evaluation (`sft.eval_items`), split across the workers.
    pub eval_items: usize,
    /// Most tokens of one answer; every reference is shorter.
    pub max_new_tokens: usize,
}

/// The instruction files of fine-tuning (JSONL of `{"prompt", "response"}`).
#[derive(Debug, Clone, Copy)]
pub struct SftFiles<'a> {
    pub train: &'a Path,
    pub heldout: &'a Path,
}

/// One training run's length and learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub steps: u64,
    pub seq_len: usize,
    pub global_batch: usize,
    pub micro_batch: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    /// Validation loss (and, fine-tuning, generation metrics) every this many steps and at the end.
    pub eval_interval: u64,
}

impl Plan {
    /// The whole demo: about two and a half minutes on two cores.
    pub fn full() -> Self {
        Plan {
            world: Sizes {
                train_per_task: 3000,
                heldout_per_task: 64,
                documents: 6000,
            },
            // Nearly one id per word of both languages (the generated text has room for about 870-900).
            bpe_vocab: 800,
            n_layer: 3,
            n_head: 4,
            n_embd: 128,
            pretrain: Phase {
                steps: 400,
                seq_len: 64,
                global_batch: 16,
                micro_batch: 8,
                lr: 3e-3,
                warmup_steps: 20,
                eval_interval: 200,
            },
            finetune: Phase {
                steps: 1000,
                seq_len: 80,
                global_batch: 16,
                micro_batch: 8,
                lr: 3e-3,
                warmup_steps: 20,
                eval_interval: 250,
            },
            eval_items: 32,
            max_new_tokens: 32,
        }
    }

    /// `--quick` (the CI test): a smaller model, less data and fewer steps (about a minute), still a clear
    /// improvement.
    pub fn quick() -> Self {
        let full = Plan::full();
        Plan {
            world: Sizes {
                train_per_task: 1500,
                heldout_per_task: 32,
                documents: 3000,
            },
            n_layer: 2,
            pretrain: Phase {
                steps: 300,
                eval_interval: 0,
                ..full.pretrain
            },
            finetune: Phase {
                steps: 500,
                lr: 4e-3,
                eval_interval: 0,
                ..full.finetune
            },
            eval_items: 16,
            ..full
        }
    }

    /// Pretraining on the prepared directory `data`; the run's files go under `dir`.
    pub fn pretrain_spec(&self, seed: u64, workers: u32, data: &Path, dir: &Path) -> RunSpec {
        let mut spec = self.base_spec(seed, workers, &self.pretrain, dir);
        spec.run.name = "sft-demo-pretrain".into();
        spec.data.source = DataSource::Prepared;
        spec.data.path = Some(data.to_path_buf());
        spec
    }

    /// Fine-tuning the pretrained step directory `init` (tokenizer of `tokenizer_vocab` ids) on `data`, with
    /// generation metrics on its held-out file while it trains; the run's files go under `dir`.
    pub fn finetune_spec(
        &self,
        seed: u64,
        workers: u32,
        init: &Path,
        tokenizer_vocab: usize,
        data: SftFiles<'_>,
        dir: &Path,
    ) -> RunSpec {
        let mut spec = self.base_spec(seed, workers, &self.finetune, dir);
        spec.run.name = "sft-demo-finetune".into();
        spec.model.init_from = format!("lockstep:{}", init.display());
        spec.model.vocab_size = finetune_vocab(tokenizer_vocab);
        spec.data.source = DataSource::Sft;
        spec.data.path = Some(data.train.to_path_buf());
        spec.data.val_fraction = 0.05;
        spec.sft.eval_data = Some(data.heldout.to_path_buf());
        spec.sft.eval_items = self.eval_items;
        spec.sft.max_new_tokens = self.max_new_tokens;
        spec
    }

    fn base_spec(&self, seed: u64, workers: u32, phase: &Phase, dir: &Path) -> RunSpec {
        let mut spec = RunSpec::default();
        spec.run.seed = seed;
        spec.cluster.listen = "127.0.0.1:0".into();
        spec.cluster.min_workers = workers;
        spec.cluster.max_workers = workers;
        spec.cluster.state_dir = dir.join("state");
        spec.model.n_layer = self.n_layer;
        spec.model.n_head = self.n_head;
        spec.model.n_embd = self.n_embd;
        spec.model.block_size = self.pretrain.seq_len.max(self.finetune.seq_len);
        spec.model.vocab_size = 0;
        spec.model.dropout = 0.0;
        let t = &mut spec.train;
        t.seq_len = phase.seq_len;
        t.global_batch = phase.global_batch;
        t.micro_batch = phase.micro_batch;
        t.total_steps = phase.steps;
        t.lr = phase.lr;
        t.min_lr = phase.lr / 10.0;
        t.warmup_steps = phase.warmup_steps;
        t.eval_interval = phase.eval_interval;
        t.eval_sequences = 32;
        // A parameter checksum is for reproducibility tests; here it would only cost time.
        t.checksum_interval = 0;
        spec.checkpoint.dir = dir.join("checkpoints");
        spec.checkpoint.interval = 0;
        spec.checkpoint.keep = 1;
        spec
    }
}

/// The fine-tuned model's vocabulary: the tokenizer's and the chat template's 4 special tokens.
pub fn finetune_vocab(tokenizer_vocab: usize) -> usize {
    tokenizer_vocab + lockstep_common::data::chat::SPECIAL_TOKENS.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_plans_give_valid_specs() {
        for plan in [Plan::full(), Plan::quick()] {
            let dir = Path::new("/tmp/x");
            let pre = plan.pretrain_spec(1, 2, dir, dir);
            pre.validate().unwrap();
            let files = SftFiles {
                train: dir,
                heldout: dir,
            };
            let ft = plan.finetune_spec(1, 2, Path::new(""), plan.bpe_vocab, files, dir);
            assert_eq!(ft.model.vocab_size, plan.bpe_vocab + 4);
            assert!(ft.train.seq_len <= ft.model.block_size);
            assert!(plan.eval_items <= plan.world.heldout_per_task * 2);
        }
    }
}
