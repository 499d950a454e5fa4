//! The training loop of one rank, as a value the session (or a benchmark) drives one step at a time.
//!
//! One optimizer step: this rank's share of the global batch (DESIGN §3: the plan decides which windows; shares
//! differ by at most one sequence) runs as micro-batches whose gradients accumulate into one flat buffer in
//! canonical parameter order, with the loss already divided by the global batch's target-token count. One
//! all-reduce sums the buffer (and the loss) over ranks; then global-norm clipping and AdamW, identically on every
//! rank, so every rank holds bitwise-identical parameters.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lockstep_common::RunSpec;
use lockstep_common::data::corpus::Split;
use lockstep_common::data::plan::{mix, rank_share};
use lockstep_common::data::{Corpus, DataPlan};

use crate::checkpoint::{self, TrainerState};
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::model::{DropoutRng, Gpt, GptConfig, cross_entropy_sum, init_varmap};
use crate::optim::{AdamW, AdamWConfig, clip_scale, global_norm, lr_at};
use crate::params::Params;

/// What one optimizer step did, for the step report.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    /// 1-based: the number of updates the model has taken after this step.
    pub step: u64,
    pub loss: f64,
    pub tokens: u64,
    pub lr: f64,
    pub grad_norm: f64,
    pub skipped: bool,
    pub step_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub allreduce_ms: f64,
    pub optimizer_ms: f64,
}

pub struct Trainer {
    spec: RunSpec,
    corpus: Corpus,
    plan: DataPlan,
    model: Gpt,
    // Owns the parameters the model and `params` refer to.
    _varmap: VarMap,
    params: Params,
    opt: AdamW,
    collective: Box<dyn Collective>,
    device: Device,
    /// Gradients in canonical order, then one slot for the loss: one all-reduce per step carries both.
    flat: Vec<f32>,
    /// Updates taken so far.
    step: u64,
}

impl Trainer {
    /// A freshly initialised model (seeded by the run seed) at step 0.
    pub fn new(spec: RunSpec, collective: Box<dyn Collective>, device: Device) -> Result<Self> {
        let corpus = Corpus::load(&spec)?;
        let plan = DataPlan::new(
            spec.run.seed,
            corpus.num_windows(Split::Train),
            spec.train.global_batch as u64,
        )?;
        let cfg = GptConfig::from_spec(&spec.model, spec.vocab_size(corpus.tokenizer.vocab_size())?);
        let varmap = init_varmap(&cfg, spec.run.seed, &device)?;
        let model = Gpt::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &cfg)?;
        let params = Params::from_varmap(&varmap)?;
        let opt = AdamW::new(&params, AdamWConfig::from_spec(&spec.train))?;
        let flat = vec![0f32; params.num_elements() + 1];
        Ok(Self {
            spec,
            corpus,
            plan,
            model,
            _varmap: varmap,
            params,
            opt,
            collective,
            device,
            flat,
            step: 0,
        })
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn rank(&self) -> u32 {
        self.collective.rank()
    }

    pub fn world_size(&self) -> u32 {
        self.collective.world_size()
    }

    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    pub fn model(&self) -> &Gpt {
        &self.model
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Target tokens in one global batch: the loss denominator, the same for every world size.
    fn global_tokens(&self) -> f64 {
        (self.spec.train.global_batch * self.spec.train.seq_len) as f64
    }

    /// Inputs and targets `[b, seq_len]` for these windows of `split`.
    fn batch(&self, split: Split, windows: &[u64]) -> Result<(Tensor, Tensor)> {
        let t = self.spec.train.seq_len;
        let (mut xs, mut ys) = (
            Vec::with_capacity(windows.len() * t),
            Vec::with_capacity(windows.len() * t),
        );
        for &w in windows {
            let (x, y) = self.corpus.window(split, w);
            xs.extend_from_slice(x);
            ys.extend_from_slice(y);
        }
        let b = windows.len();
        Ok((
            Tensor::from_vec(xs, (b, t), &self.device)?,
            Tensor::from_vec(ys, (b, t), &self.device)?,
        ))
    }

    /// Runs optimizer step number `self.step() + 1`.
    pub fn train_step(&mut self) -> Result<StepOutcome> {
        let started = Instant::now();
        let (rank, world) = (self.rank(), self.world_size());
        let train = &self.spec.train;
        let lr = lr_at(self.step, train);
        let share = rank_share(train.global_batch as u64, world, rank);
        let windows = self.plan.rank_windows(self.step, rank, world);
        let scale = 1.0 / self.global_tokens();
        let n = self.params.num_elements();
        self.flat.fill(0.0);
        let mut out = StepOutcome {
            step: self.step + 1,
            lr,
            ..Default::default()
        };

        for (i, chunk) in windows.chunks(train.micro_batch).enumerate() {
            let t0 = Instant::now();
            let (x, y) = self.batch(Split::Train, chunk)?;
            // Dropout masks are seeded by where the micro-batch sits in the global batch, not by rank.
            let first = self.step * train.global_batch as u64 + share.start + (i * train.micro_batch) as u64;
            let mut rng = DropoutRng::new(mix(self.spec.run.seed, first));
            let dropout = (self.spec.model.dropout > 0.0).then_some(&mut rng);
            let logits = self.model.forward(&x, dropout)?;
            let loss_sum = cross_entropy_sum(&logits, &y)?;
            let loss = (&loss_sum * scale)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            self.params.accumulate_grads(&grads, &mut self.flat[..n])?;
            self.flat[n] += loss.to_scalar::<f32>()?;
            out.tokens += (chunk.len() * train.seq_len) as u64;
            out.forward_ms += ms(t1 - t0);
            out.backward_ms += ms(t1.elapsed());
        }

        let t2 = Instant::now();
        self.collective.all_reduce_sum(&mut self.flat)?;
        out.allreduce_ms = ms(t2.elapsed());

        let t3 = Instant::now();
        out.loss = f64::from(self.flat[n]);
        out.grad_norm = global_norm(&self.flat[..n]);
        // Every rank sees the same reduced values, so every rank skips together.
        out.skipped = !out.loss.is_finite() || !out.grad_norm.is_finite();
        if !out.skipped {
            let clip = clip_scale(out.grad_norm, train.grad_clip) as f32;
            if clip != 1.0 {
                self.flat[..n].iter_mut().for_each(|g| *g *= clip);
            }
            let grads = self.params.unflatten(&self.flat[..n])?;
            self.opt.step(&self.params, &grads, lr)?;
        }
        self.step += 1;
        out.optimizer_ms = ms(t3.elapsed());
        out.step_ms = ms(started.elapsed());
        Ok(out)
    }

    /// Mean loss per target token over the fixed validation set (the first `train.eval_sequences` validation
    /// windows), split across ranks and reduced.
    pub fn evaluate(&mut self) -> Result<f64> {
        let total = (self.spec.train.eval_sequences as u64)
            .min(self.corpus.num_windows(Split::Val))
            .max(1);
        let share: Vec<u64> = rank_share(total, self.world_size(), self.rank()).collect();
        let mut sums = [0f32; 2];
        for chunk in share.chunks(self.spec.train.micro_batch) {
            let (x, y) = self.batch(Split::Val, chunk)?;
            let logits = self.model.forward(&x, None)?;
            sums[0] += cross_entropy_sum(&logits, &y)?.to_scalar::<f32>()?;
            sums[1] += (chunk.len() * self.spec.train.seq_len) as f32;
        }
        self.collective.all_reduce_sum(&mut sums)?;
        Ok(f64::from(sums[0]) / f64::from(sums[1]))
    }

    pub fn checksum(&self) -> Result<String> {
        self.params.checksum()
    }

    /// Writes a checkpoint of the current step under `checkpoint.dir`; returns its directory.
    pub fn save_checkpoint(&self) -> Result<std::path::PathBuf> {
        let state = TrainerState {
            step: self.step,
            data_cursor: self.step * self.spec.train.global_batch as u64,
            world_size: self.world_size(),
            spec_hash: self.spec.training_hash(),
            seed: self.spec.run.seed,
        };
        let c = &self.spec.checkpoint;
        std::fs::create_dir_all(&c.dir).map_err(|source| Error::Io {
            context: format!("create checkpoint.dir {}", c.dir.display()),
            source,
        })?;
        checkpoint::save(
            &c.dir,
            &state,
            &self.params,
            self.model.config(),
            &self.opt,
            &self.corpus.tokenizer,
            &self.spec.to_json(),
            c.keep,
        )
    }

    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Whether a step-count `interval` falls due at `step` (1-based), always at the run's last step.
pub fn due(step: u64, interval: u64, last: u64) -> bool {
    step == last || (interval > 0 && step.is_multiple_of(interval))
}
