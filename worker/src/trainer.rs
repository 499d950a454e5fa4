//! The training loop of one rank, as a value the session (or a benchmark) drives one step at a time.
//!
//! One optimizer step: this rank's share of the global batch (DESIGN §3: the plan decides which windows; shares
//! differ by at most one sequence) runs as micro-batches whose gradients accumulate into one flat buffer in
//! canonical parameter order, with the loss already divided by the global batch's target-token count. One
//! all-reduce sums the buffer (and the loss) over ranks; then global-norm clipping and AdamW, identically on every
//! rank, so every rank holds bitwise-identical parameters.
//!
//! A trainer starts a run at step 0 ([`Trainer::new`]: random init, or the weights `model.init_from` names) or
//! continues one from its checkpoint ([`Trainer::resume`]), on any world size. Each step's micro-batches are
//! assembled ahead of time by a [`Loader`] thread started at the trainer's current step.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lockstep_common::RunSpec;
use lockstep_common::data::corpus::Split;
use lockstep_common::data::plan::{mix, rank_share};
use lockstep_common::data::{Corpus, DataPlan, Tokenizer};
use lockstep_common::spec::{ComputeDtype, InitFrom};
use tracing::info;

use crate::checkpoint::{self, TrainerState};
use crate::collective::Collective;
use crate::device_grads::{DeviceGrads, FlatGrads};
use crate::error::{Error, Result};
use crate::loader::{Loader, Share, StepBatch};
use crate::model::{DropoutRng, Gpt, GptConfig, cross_entropy_sum, init_varmap};
use crate::optim::{AdamW, AdamWConfig, clip_scale, global_norm, lr_at};
use crate::params::Params;
use crate::sft_eval::{self, GenStats, HeldOut};

/// Slots after the gradients in the host buffer: the loss, then the stop vote.
const EXTRA_SLOTS: usize = 2;

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
    /// Some rank asked to stop after this step ([`Trainer::set_stop_flag`]); every rank sees the same answer.
    pub stop: bool,
}

pub struct Trainer {
    spec: RunSpec,
    corpus: Arc<Corpus>,
    plan: DataPlan,
    /// Assembles the coming steps' batches; started on the first step (and again if the step moved under it).
    loader: Option<Loader>,
    model: Gpt,
    // Owns the parameters the model and `params` refer to.
    _varmap: VarMap,
    params: Params,
    opt: AdamW,
    collective: Box<dyn Collective>,
    device: Device,
    /// Gradients in canonical order, then one slot for the loss and one for the stop vote: one all-reduce per step
    /// carries all three (host path).
    flat: Vec<f32>,
    /// Set (by another thread) to vote for stopping after the current step; see [`StepOutcome::stop`].
    stop_vote: Arc<AtomicBool>,
    /// Sum, reduce and clip gradients on the device ([`FlatGrads`] and the fused optimizer where it runs, else
    /// [`DeviceGrads`]) instead of in `flat`: on for accelerators.
    device_resident: bool,
    /// The fused path's persistent gradient buffer, made at its first step (and dropped when the path is left).
    flat_grads: Option<FlatGrads>,
    /// Updates taken so far.
    step: u64,
    /// `sft.eval_data`, read at the first evaluation that needs it.
    held_out: Option<HeldOut>,
}

/// Where one step's gradients add up ([`Trainer::train_step`]).
enum Accumulator {
    /// `Trainer::flat`, on the host.
    Host,
    /// Per-parameter sums on the device, for the composed optimizer.
    Device(DeviceGrads),
    /// The persistent flat device buffer, for the fused optimizer.
    Flat(FlatGrads),
}

/// The same, all-reduced.
enum Reduced {
    /// In `Trainer::flat`.
    Host,
    Device(crate::device_grads::Reduced),
    /// The reduced flat buffer [gradients | loss | votes], still on the device.
    Flat(Tensor),
}

impl Trainer {
    /// Step 0 of a run: the model starts from `model.init_from` (a Hugging Face GPT-2 directory or a Lockstep
    /// checkpoint's weights, whose shape must be the run's) or, when that is empty, from a random initialisation
    /// seeded by the run seed. The optimizer starts fresh either way.
    pub fn new(spec: RunSpec, collective: Box<dyn Collective>, device: Device) -> Result<Self> {
        let corpus = Corpus::load(&spec)?;
        let cfg = model_config(&spec, &corpus)?;
        let varmap = match spec.model.init_source()? {
            InitFrom::Random => init_varmap(&cfg, spec.run.seed, &device)?,
            InitFrom::HuggingFace(dir) => {
                let (theirs, varmap) = checkpoint::load_hf(&dir, &device)?;
                checkpoint::check_init_shape(&cfg, &theirs, &dir)?;
                info!(init_from = %dir.display(), "starting from Hugging Face weights");
                grow(&varmap, &cfg, &dir)?;
                varmap
            }
            InitFrom::Lockstep(dir) => {
                checkpoint::check_is_checkpoint(&dir)?;
                let loaded = checkpoint::load(&dir, &device)?;
                checkpoint::check_init_shape(&cfg, &loaded.cfg, &dir)?;
                check_tokenizer(&loaded.tokenizer, &corpus.tokenizer, &dir)?;
                info!(init_from = %dir.display(), step = loaded.state.step, "starting from a checkpoint's weights");
                grow(&loaded.varmap, &cfg, &dir)?;
                loaded.varmap
            }
        };
        Self::assemble(spec, corpus, cfg, varmap, collective, device)
    }

    /// Continues a run from its checkpoint `dir` (a `step-*` directory): model weights, optimizer moments and step
    /// count, and the step / data cursor, so that training on is bitwise the same as never having stopped (on the
    /// same world size; on another one it is the same math, DESIGN §3). The checkpoint must have been written by a
    /// run with the same training fields (`RunSpec::training_hash`); the world size may differ.
    pub fn resume(spec: RunSpec, collective: Box<dyn Collective>, device: Device, dir: &Path) -> Result<Self> {
        checkpoint::check_is_checkpoint(dir)?;
        let loaded = checkpoint::load(dir, &device)?;
        let ours = spec.training_hash();
        if loaded.state.spec_hash != ours {
            let diff = RunSpec::from_json(&loaded.spec_json)
                .map(|theirs| spec.training_diff(&theirs))
                .unwrap_or_default();
            let detail = if diff.is_empty() {
                String::new()
            } else {
                format!(" (this run vs the checkpoint: {})", diff.join(", "))
            };
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                message: format!(
                    "written by a run with other training settings: spec hash {} is not this run's {ours}{detail}; \
                     resume it with the spec it was written with, or start a new run from its weights with \
                     model.init_from = \"lockstep:{}\"",
                    loaded.state.spec_hash,
                    dir.display()
                ),
            });
        }
        let corpus = Corpus::load(&spec)?;
        let cfg = model_config(&spec, &corpus)?;
        checkpoint::check_shape(&cfg, &loaded.cfg, dir)?;
        check_tokenizer(&loaded.tokenizer, &corpus.tokenizer, dir)?;
        let state = loaded.state;
        if state.data_cursor != state.step * spec.train.global_batch as u64 {
            return Err(Error::Checkpoint {
                path: dir.join(checkpoint::TRAINER_FILE),
                message: format!(
                    "data cursor {} is not step {} × train.global_batch {}; the file is inconsistent, use another \
                     checkpoint",
                    state.data_cursor, state.step, spec.train.global_batch
                ),
            });
        }
        let mut trainer = Self::assemble(spec, corpus, cfg, loaded.varmap, collective, device)?;
        checkpoint::restore_optimizer(dir, &trainer.params, &mut trainer.opt)?;
        trainer.step = state.step;
        info!(
            checkpoint = %dir.display(),
            step = state.step,
            saved_world_size = state.world_size,
            world_size = trainer.world_size(),
            "resumed"
        );
        Ok(trainer)
    }

    /// The trainer over `varmap` (whose shape is `cfg`'s) at step 0 with a fresh optimizer.
    fn assemble(
        spec: RunSpec,
        corpus: Corpus,
        cfg: GptConfig,
        varmap: VarMap,
        collective: Box<dyn Collective>,
        device: Device,
    ) -> Result<Self> {
        if let Some(warning) = corpus.sft.as_ref().and_then(|s| s.warning(spec.train.seq_len)) {
            tracing::warn!("{warning}");
        }
        let plan = DataPlan::new(
            spec.run.seed,
            corpus.num_windows(Split::Train),
            spec.train.global_batch as u64,
        )?;
        let compute = match spec.train.compute_dtype {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        };
        // The parameters stay f32 whatever the compute dtype: the optimizer updates master weights.
        let model = Gpt::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &cfg)?.with_compute_dtype(compute);
        let params = Params::from_varmap(&varmap)?;
        let opt = AdamW::for_params(&params, AdamWConfig::from_spec(&spec.train))?;
        let device_resident = !device.is_cpu();
        let flat = if device_resident {
            Vec::new()
        } else {
            vec![0f32; params.num_elements() + EXTRA_SLOTS]
        };
        Ok(Self {
            spec,
            corpus: Arc::new(corpus),
            plan,
            loader: None,
            model,
            _varmap: varmap,
            params,
            opt,
            collective,
            device,
            flat,
            stop_vote: Arc::new(AtomicBool::new(false)),
            device_resident,
            flat_grads: None,
            step: 0,
            held_out: None,
        })
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Setting `flag` (from any thread) votes to stop after the step in progress. The vote travels in the step's
    /// all-reduce, so every rank learns in the same step that some rank wants to stop ([`StepOutcome::stop`]) — a
    /// pause all ranks agree on, without another round trip.
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop_vote = flag;
    }

    /// Whether gradients are summed, reduced and clipped on the device (the default on accelerators: [`FlatGrads`]
    /// and the fused AdamW on CUDA, [`DeviceGrads`] and the composed AdamW elsewhere) or in a flat host buffer (the
    /// default on the CPU; the composed AdamW). All give the same math; switching lets the device path be tested and
    /// measured on a CPU, and the fused one be compared with the host path on a GPU.
    pub fn set_device_resident(&mut self, on: bool) {
        self.device_resident = on;
        self.flat_grads = None;
        let len = if on {
            0
        } else {
            self.params.num_elements() + EXTRA_SLOTS
        };
        self.flat = vec![0f32; len];
    }

    /// Sequences of the data plan consumed so far (DESIGN §3: the cursor is step × global batch).
    pub fn data_cursor(&self) -> u64 {
        self.step * self.spec.train.global_batch as u64
    }

    /// The global sequence indices (data plan positions, DESIGN §3) this rank trains on in the next step.
    pub fn next_sequences(&self) -> std::ops::Range<u64> {
        let g = self.spec.train.global_batch as u64;
        let mine = rank_share(g, self.world_size(), self.rank());
        self.step * g + mine.start..self.step * g + mine.end
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

    /// Counted target tokens in the global batch of `step`: the loss denominator (DESIGN §3), the same for every
    /// world size. Every target counts in pretraining data (`seq_len` per window); fine-tuning data masks all but
    /// the assistant's words, so every rank counts the whole batch's (from the plan, without a collective).
    fn global_tokens(&self, step: u64) -> f64 {
        let counted: u64 = self
            .plan
            .rank_windows(step, 0, 1)
            .into_iter()
            .map(|w| self.corpus.counted(Split::Train, w))
            .sum();
        // Every fine-tuning window holds a counted target (the corpus drops the others), so this is never 0.
        counted.max(1) as f64
    }

    /// Inputs and targets `[b, seq_len]` for these windows of `split`.
    fn batch(&self, split: Split, windows: &[u64]) -> Result<(Tensor, Tensor)> {
        let t = self.spec.train.seq_len;
        let (mut xs, mut ys) = (
            Vec::with_capacity(windows.len() * t),
            Vec::with_capacity(windows.len() * t),
        );
        for &w in windows {
            self.corpus.extend_window(split, w, &mut xs, &mut ys)?;
        }
        self.tensors(xs, ys)
    }

    /// `[b, seq_len]` tensors of row-major inputs and targets.
    fn tensors(&self, xs: Vec<u32>, ys: Vec<u32>) -> Result<(Tensor, Tensor)> {
        let t = self.spec.train.seq_len;
        let b = xs.len() / t;
        Ok((
            Tensor::from_vec(xs, (b, t), &self.device)?,
            Tensor::from_vec(ys, (b, t), &self.device)?,
        ))
    }

    /// This rank's micro-batches of the coming step, from the loader thread (started here at the current step when
    /// there is none, or when the step moved since it started).
    fn next_batch(&mut self) -> Result<StepBatch> {
        let step = self.step;
        let loader = match &mut self.loader {
            Some(loader) if loader.next_step() == step => loader,
            slot => {
                let share = Share {
                    rank: self.collective.rank(),
                    world_size: self.collective.world_size(),
                    global_batch: self.spec.train.global_batch,
                    micro_batch: self.spec.train.micro_batch,
                };
                // Replacing an old loader drops it, which stops and joins its thread.
                slot.insert(Loader::start(self.corpus.clone(), self.plan, share, step)?)
            }
        };
        loader.take(step)
    }

    /// Runs optimizer step number `self.step() + 1`.
    pub fn train_step(&mut self) -> Result<StepOutcome> {
        let started = Instant::now();
        let batch = self.next_batch()?;
        let train = &self.spec.train;
        let lr = lr_at(self.step, train);
        let scale = 1.0 / self.global_tokens(self.step);
        let n = self.params.num_elements();
        self.flat.fill(0.0);
        let mut out = StepOutcome {
            step: self.step + 1,
            lr,
            ..Default::default()
        };

        // On an accelerator the gradients stay on it; on the CPU the flat host buffer is the same memory, and
        // measured faster. Where the fused optimizer runs (CUDA) the step has no host synchronisation until its end:
        // the gradients accumulate into a persistent device buffer, and the norm, the clipping and AdamW are queued
        // behind the all-reduce before the loss, the votes and the norm come back in one read. Elsewhere on a device,
        // the loss and the norm are read back after the all-reduce, then the composed AdamW runs.
        let mut acc = match (self.device_resident, self.opt.runs_fused()) {
            (false, _) => Accumulator::Host,
            (true, true) => Accumulator::Flat(match self.flat_grads.take() {
                Some(flat) => flat,
                None => FlatGrads::new(&self.params)?,
            }),
            (true, false) => Accumulator::Device(DeviceGrads::new(&self.params)),
        };
        // One compute-dtype cast of each weight for all the micro-batches; gone before the optimizer moves them.
        let casts = self.model.weight_cast_scope();
        for micro in batch.micro {
            let t0 = Instant::now();
            let sequences = micro.windows.len();
            let (x, y) = self.tensors(micro.inputs, micro.targets)?;
            // Dropout masks are seeded by where the micro-batch sits in the global batch, not by rank.
            let mut rng = DropoutRng::new(mix(self.spec.run.seed, micro.first));
            let dropout = (self.spec.model.dropout > 0.0).then_some(&mut rng);
            let logits = self.model.forward_logits(&x, dropout)?;
            let loss_sum = cross_entropy_sum(&logits, &y)?;
            let loss = (&loss_sum * scale)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            match &mut acc {
                Accumulator::Host => {
                    self.params.accumulate_grads(&grads, &mut self.flat[..n])?;
                    self.flat[n] += loss.to_scalar::<f32>()?;
                }
                Accumulator::Device(acc) => acc.add(&self.params, &grads, &loss)?,
                Accumulator::Flat(acc) => acc.add(&self.params, &grads, &loss)?,
            }
            out.tokens += (sequences * train.seq_len) as u64;
            out.forward_ms += ms(t1 - t0);
            out.backward_ms += ms(t1.elapsed());
        }
        drop(casts);

        let t2 = Instant::now();
        // Read as late as possible, so a request that arrived during the step still stops after it.
        let vote = if self.stop_vote.load(Ordering::SeqCst) {
            1.0
        } else {
            0.0
        };
        let reduced = match acc {
            Accumulator::Host => {
                self.flat[n + 1] = vote;
                self.collective.all_reduce_sum(&mut self.flat)?;
                Reduced::Host
            }
            Accumulator::Device(acc) => Reduced::Device(acc.reduce(&self.params, self.collective.as_mut(), vote)?),
            Accumulator::Flat(mut acc) => {
                let reduced = acc.reduce(self.collective.as_mut(), vote);
                self.flat_grads = Some(acc);
                Reduced::Flat(reduced?)
            }
        };
        out.allreduce_ms = ms(t2.elapsed());

        // Every rank sees the same reduced values, so every rank skips together. On the fused path the host waits
        // for the device only here (the one read-back), so optimizer_ms includes whatever GPU work was still queued.
        let t3 = Instant::now();
        match reduced {
            Reduced::Flat(flat) => {
                let stats = self.opt.fused_step(&self.params, &flat, lr, train.grad_clip)?;
                (out.loss, out.grad_norm, out.stop, out.skipped) =
                    (stats.loss, stats.grad_norm, stats.stop_votes > 0.5, stats.skipped);
            }
            Reduced::Device(r) => {
                (out.loss, out.grad_norm, out.stop) = (r.loss, r.grad_norm, r.stop_votes > 0.5);
                out.skipped = !out.loss.is_finite() || !out.grad_norm.is_finite();
                if !out.skipped {
                    let grads = r.grads(&self.params, clip_scale(out.grad_norm, train.grad_clip))?;
                    self.opt.step(&self.params, &grads, lr)?;
                }
            }
            Reduced::Host => {
                (out.loss, out.grad_norm, out.stop) = (
                    f64::from(self.flat[n]),
                    global_norm(&self.flat[..n]),
                    self.flat[n + 1] > 0.5,
                );
                out.skipped = !out.loss.is_finite() || !out.grad_norm.is_finite();
                if !out.skipped {
                    let clip = clip_scale(out.grad_norm, train.grad_clip) as f32;
                    if clip != 1.0 {
                        self.flat[..n].iter_mut().for_each(|g| *g *= clip);
                    }
                    let grads = self.params.unflatten(&self.flat[..n])?;
                    self.opt.step(&self.params, &grads, lr)?;
                }
            }
        }
        self.step += 1;
        out.optimizer_ms = ms(t3.elapsed());
        out.step_ms = ms(started.elapsed());
        Ok(out)
    }

    /// Mean loss per counted target token over the fixed validation set (the first `train.eval_sequences` validation
    /// windows), split across ranks and reduced.
    pub fn evaluate(&mut self) -> Result<f64> {
        let total = (self.spec.train.eval_sequences as u64)
            .min(self.corpus.num_windows(Split::Val))
            .max(1);
        let share: Vec<u64> = rank_share(total, self.world_size(), self.rank()).collect();
        let mut sums = [0f32; 2];
        for chunk in share.chunks(self.spec.train.micro_batch) {
            let (x, y) = self.batch(Split::Val, chunk)?;
            let logits = self.model.forward_logits(&x, None)?;
            sums[0] += cross_entropy_sum(&logits, &y)?.to_scalar::<f32>()?;
            sums[1] += chunk.iter().map(|&w| self.corpus.counted(Split::Val, w)).sum::<u64>() as f32;
        }
        self.collective.all_reduce_sum(&mut sums)?;
        Ok(f64::from(sums[0]) / f64::from(sums[1]))
    }

    /// Generation metrics on `sft.eval_data` (see [`crate::sft_eval`]), or `None` when it is not set: each rank
    /// answers its share of the items greedily and the metrics' statistics are summed over the ranks, so every rank
    /// returns the same figures whatever the world size.
    pub fn evaluate_generation(&mut self) -> Result<Option<BTreeMap<String, f64>>> {
        let sft = &self.spec.sft;
        let (Some(path), Some(info)) = (&sft.eval_data, &self.corpus.sft) else {
            return Ok(None);
        };
        let (world, rank) = (self.world_size(), self.rank());
        let held_out = match &mut self.held_out {
            Some(held_out) => held_out,
            slot => slot.insert(HeldOut::read(path, sft.eval_items)?),
        };
        let (histories, references) = (&held_out.histories, &held_out.references);
        let mine = rank_share(histories.len() as u64, world, rank);
        let mine = mine.start as usize..mine.end as usize;
        let answers = sft_eval::answer(
            &self.model,
            &self.corpus.tokenizer,
            &info.template,
            &histories[mine.clone()],
            sft.max_new_tokens,
            self.spec.train.micro_batch,
            &self.device,
        )?;
        let mut stats = GenStats::default();
        for (hyp, reference) in answers.iter().zip(&references[mine]) {
            stats.add(hyp, reference);
        }
        let mut flat = stats.to_f32s();
        self.collective.all_reduce_sum(&mut flat)?;
        Ok(Some(GenStats::from_f32s(&flat)?.metrics()))
    }

    pub fn checksum(&self) -> Result<String> {
        self.params.checksum()
    }

    /// Writes a checkpoint of the current step under `checkpoint.dir`; returns its directory. Older ones stay until
    /// the coordinator commits this one ([`checkpoint::prune_committed`]).
    pub fn save_checkpoint(&self) -> Result<std::path::PathBuf> {
        let state = TrainerState {
            step: self.step,
            data_cursor: self.data_cursor(),
            world_size: self.world_size(),
            spec_hash: self.spec.training_hash(),
            seed: self.spec.run.seed,
        };
        let root = checkpoint::Retention::of(&self.spec).root;
        std::fs::create_dir_all(&root).map_err(|source| Error::Io {
            context: format!("create checkpoint.dir {}", root.display()),
            source,
        })?;
        checkpoint::save(
            &root,
            &state,
            &self.params,
            self.model.config(),
            &self.opt,
            &self.corpus.tokenizer,
            &self.spec.to_json(),
        )
    }

    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }
}

/// The model's configuration for this run: the spec's shape over the tokenizer's vocabulary (which must fit).
fn model_config(spec: &RunSpec, corpus: &Corpus) -> Result<GptConfig> {
    Ok(GptConfig::from_spec(
        &spec.model,
        spec.vocab_size(corpus.vocab_needed())?,
    ))
}

/// Grows the embedding of weights a run starts from to the run's vocabulary, saying so.
fn grow(varmap: &VarMap, cfg: &GptConfig, dir: &Path) -> Result<()> {
    let had = checkpoint::grow_embedding(varmap, cfg.vocab_size)?;
    if had < cfg.vocab_size {
        info!(
            init_from = %dir.display(),
            from = had,
            to = cfg.vocab_size,
            "grew the token embedding; the new rows start at the mean of the old ones"
        );
    }
    Ok(())
}

/// Weights trained with another tokenizer would read this run's token ids as other text.
fn check_tokenizer(theirs: &Tokenizer, ours: &Tokenizer, dir: &Path) -> Result<()> {
    if theirs == ours {
        return Ok(());
    }
    Err(Error::Checkpoint {
        path: dir.join(checkpoint::TOKENIZER_FILE),
        message: format!(
            "its tokenizer ({} tokens) differs from this run's ({} tokens, from the data.* settings): token ids \
             would mean other text; train on data that gives the same tokenizer",
            theirs.vocab_size(),
            ours.vocab_size()
        ),
    })
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Whether a step-count `interval` falls due at `step` (1-based), always at the run's last step.
pub fn due(step: u64, interval: u64, last: u64) -> bool {
    step == last || (interval > 0 && step.is_multiple_of(interval))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::collective::{Local, Ring, RingConfig, RingListener};

    /// A small model on the built-in addition data: 2 layers, 32 dims, 8 sequences of 40 tokens per step in
    /// micro-batches of 4.
    fn spec(checkpoints: &Path, total_steps: u64, dropout: f64) -> RunSpec {
        let mut spec = RunSpec::default();
        spec.model.n_layer = 2;
        spec.model.n_head = 4;
        spec.model.n_embd = 32;
        spec.model.dropout = dropout;
        spec.train.seq_len = 40;
        spec.train.global_batch = 8;
        spec.train.micro_batch = 4;
        spec.train.total_steps = total_steps;
        spec.train.warmup_steps = 2;
        spec.checkpoint.dir = checkpoints.to_path_buf();
        spec.checkpoint.keep = 0;
        spec.validate().unwrap();
        spec
    }

    fn local(spec: &RunSpec) -> Trainer {
        Trainer::new(spec.clone(), Box::new(Local), Device::Cpu).unwrap()
    }

    fn train(t: &mut Trainer, steps: u64) -> Vec<f64> {
        (0..steps).map(|_| t.train_step().unwrap().loss).collect()
    }

    fn values(params: &Params) -> Vec<f32> {
        params
            .vars()
            .iter()
            .flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    /// The device-resident gradient path (used on GPUs) does the host path's math: same losses and parameters after
    /// several steps with accumulation, clipping and dropout, up to float summation order.
    #[test]
    fn device_resident_gradients_match_the_host_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path(), 6, 0.1);
        spec.train.grad_clip = 0.5;
        spec.validate().unwrap();
        let mut host = local(&spec);
        let mut device = local(&spec);
        device.set_device_resident(true);
        for step in 0..6 {
            let (a, b) = (host.train_step().unwrap(), device.train_step().unwrap());
            assert!(
                (a.loss - b.loss).abs() <= 1e-5 * a.loss.abs(),
                "step {step}: {} vs {}",
                a.loss,
                b.loss
            );
            assert!((a.grad_norm - b.grad_norm).abs() <= 1e-4 * a.grad_norm, "step {step}");
            assert!(a.grad_norm > 0.5, "clipping is exercised");
        }
        let (p, q) = (values(host.params()), values(device.params()));
        let diff = p.iter().zip(&q).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "largest parameter difference {diff}");
        assert_ne!(values(local(&spec).params()), q, "training moved the parameters");
    }

    #[test]
    fn resume_is_bitwise_identical_to_not_stopping() {
        for dropout in [0.0, 0.1] {
            let root = tempfile::tempdir().unwrap();
            let spec = spec(root.path(), 6, dropout);
            let mut straight = local(&spec);
            let straight_losses = train(&mut straight, 6);

            let mut first = local(&spec);
            let mut losses = train(&mut first, 3);
            let dir = first.save_checkpoint().unwrap();
            drop(first);
            let mut resumed = Trainer::resume(spec.clone(), Box::new(Local), Device::Cpu, &dir).unwrap();
            assert_eq!((resumed.step(), resumed.data_cursor()), (3, 24));
            losses.extend(train(&mut resumed, 3));

            assert_eq!(losses, straight_losses, "dropout {dropout}");
            assert_eq!(
                resumed.checksum().unwrap(),
                straight.checksum().unwrap(),
                "dropout {dropout}"
            );
            assert_eq!(values(resumed.params()), values(straight.params()));
        }
    }

    /// The control for the test above: the same weights with a fresh optimizer (`init_from = "lockstep:DIR"`, a
    /// fine-tuning start) do not continue the run, so the optimizer state really is what resume restores.
    #[test]
    fn init_from_lockstep_takes_the_weights_with_a_fresh_optimizer() {
        let root = tempfile::tempdir().unwrap();
        let spec = spec(root.path(), 6, 0.0);
        let mut first = local(&spec);
        train(&mut first, 3);
        let dir = first.save_checkpoint().unwrap();

        let mut tuned_spec = spec.clone();
        tuned_spec.model.init_from = format!("lockstep:{}", dir.display());
        // The checkpoint's config.json holds the resolved vocabulary (the tokenizer's 13), not "0 = the
        // tokenizer's"; loading a spec from a file fills it in, a spec built in code must say it.
        tuned_spec.model.vocab_size = first.model().config().vocab_size;
        tuned_spec.validate().unwrap();
        tuned_spec.check_init_from().unwrap();
        let mut tuned = local(&tuned_spec);
        assert_eq!(tuned.step(), 0);
        assert_eq!(tuned.checksum().unwrap(), first.checksum().unwrap());
        let mut resumed = Trainer::resume(spec, Box::new(Local), Device::Cpu, &dir).unwrap();
        train(&mut tuned, 3);
        train(&mut resumed, 3);
        assert_ne!(tuned.checksum().unwrap(), resumed.checksum().unwrap());

        // Naming the checkpoint directory instead of a step directory is explained.
        tuned_spec.model.init_from = format!("lockstep:{}", root.path().display());
        let err = Trainer::new(tuned_spec, Box::new(Local), Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("step-00000003"), "{err}");
    }

    #[test]
    fn resume_on_two_ranks_matches_one_rank() {
        let root = tempfile::tempdir().unwrap();
        let spec = spec(root.path(), 6, 0.1);
        let mut straight = local(&spec);
        train(&mut straight, 6);
        let want = values(straight.params());

        let mut first = local(&spec);
        train(&mut first, 3);
        let dir = first.save_checkpoint().unwrap();

        let listeners: Vec<RingListener> = (0..2).map(|_| RingListener::bind("127.0.0.1:0").unwrap()).collect();
        let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
        let token = lockstep_common::auth::RunToken::generate();
        let results: Vec<(Vec<f32>, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (spec, peers, dir, token) = (spec.clone(), peers.clone(), dir.clone(), token.clone());
                    s.spawn(move || {
                        let ring = Ring::connect(
                            &listener,
                            RingConfig {
                                rank: rank as u32,
                                world_size: 2,
                                peers,
                                timeout: std::time::Duration::from_secs(60),
                                session: "resume-test".into(),
                                token,
                                cancel: None,
                            },
                        )
                        .unwrap();
                        let mut t = Trainer::resume(spec, Box::new(ring), Device::Cpu, &dir).unwrap();
                        assert_eq!(t.step(), 3);
                        train(&mut t, 3);
                        (values(t.params()), t.checksum().unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results[0].1, results[1].1, "the two ranks disagree");
        let got = &results[0].0;
        let diff: f64 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum::<f64>().sqrt();
        assert!(diff / norm < 1e-5, "relative L2 difference {}", diff / norm);
    }

    /// Two ranks on a real ring train two steps, rank 1 voting to stop before step 2 (`device_resident` picks the
    /// gradient path on both). Per rank: what steps 1 and 2 said about stopping, and the parameters afterwards.
    fn stop_vote_on_two_ranks(spec: &RunSpec, device_resident: bool) -> Vec<([bool; 2], Vec<f32>)> {
        let listeners: Vec<RingListener> = (0..2).map(|_| RingListener::bind("127.0.0.1:0").unwrap()).collect();
        let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
        let token = lockstep_common::auth::RunToken::generate();
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (spec, peers, token) = (spec.clone(), peers.clone(), token.clone());
                    s.spawn(move || {
                        let cfg = RingConfig {
                            rank: rank as u32,
                            world_size: 2,
                            peers,
                            timeout: std::time::Duration::from_secs(60),
                            session: "stop-vote-test".into(),
                            token,
                            cancel: None,
                        };
                        let ring = Ring::connect(&listener, cfg).unwrap();
                        let mut t = Trainer::new(spec, Box::new(ring), Device::Cpu).unwrap();
                        t.set_device_resident(device_resident);
                        let flag = Arc::new(AtomicBool::new(false));
                        t.set_stop_flag(flag.clone());
                        let first = t.train_step().unwrap().stop;
                        if rank == 1 {
                            flag.store(true, Ordering::SeqCst);
                        }
                        let second = t.train_step().unwrap().stop;
                        ([first, second], values(t.params()))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// One rank's vote reaches every rank in the same step, on the host and the device gradient paths alike, and
    /// the step it stops after is still taken everywhere.
    #[test]
    fn a_stop_vote_on_one_rank_stops_every_rank_after_the_same_step() {
        let root = tempfile::tempdir().unwrap();
        let spec = spec(root.path(), 6, 0.0);
        for device_resident in [false, true] {
            let ranks = stop_vote_on_two_ranks(&spec, device_resident);
            for (rank, (stops, _)) in ranks.iter().enumerate() {
                assert_eq!(*stops, [false, true], "rank {rank}, device resident {device_resident}");
            }
            assert!(
                ranks[0].1 == ranks[1].1,
                "the ranks' parameters differ (device resident {device_resident})"
            );
        }
    }

    #[test]
    fn resume_refuses_another_spec_and_names_the_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let spec = spec(root.path(), 6, 0.0);
        let mut first = local(&spec);
        train(&mut first, 2);
        let dir = first.save_checkpoint().unwrap();

        let mut other = spec.clone();
        other.train.lr = 5e-4;
        let err = Trainer::resume(other, Box::new(Local), Device::Cpu, &dir)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&dir.display().to_string()), "{err}");
        assert!(err.contains("train.lr: 0.0005 vs 0.001"), "{err}");

        let err = Trainer::resume(spec, Box::new(Local), Device::Cpu, root.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("step-00000002"), "{err}");
    }

    /// A directory of llm.c shards, built by hand from the format (256 little-endian `i32`: magic 20240520,
    /// version 1, count; then little-endian `u16` tokens), trains with `data.tokenizer` naming their tokenizer.
    #[test]
    fn trains_and_evaluates_on_llmc_shards() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("fineweb");
        std::fs::create_dir(&data).unwrap();
        let shard = |name: &str, n: u32, seed: u32| {
            let mut bytes: Vec<u8> = [20240520i32, 1, n as i32]
                .into_iter()
                .chain(std::iter::repeat_n(0, 253))
                .flat_map(i32::to_le_bytes)
                .collect();
            bytes.extend((0..n).flat_map(|i| (((i * 7 + seed) % 97) as u16).to_le_bytes()));
            std::fs::write(data.join(name), bytes).unwrap();
        };
        shard("fineweb_val_000000.bin", 400, 3);
        shard("fineweb_train_000001.bin", 3000, 0);
        shard("fineweb_train_000002.bin", 2000, 1);
        let mut spec = spec(root.path(), 4, 0.0);
        spec.data.source = lockstep_common::spec::DataSource::Prepared;
        spec.data.path = Some(data);
        spec.data.tokenizer = Some(lockstep_common::spec::TokenizerSpec::Byte);
        spec.validate().unwrap();
        let mut t = local(&spec);
        assert_eq!(t.model().config().vocab_size, 256);
        assert_eq!(t.corpus().num_windows(Split::Train), 74 + 49);
        let losses = train(&mut t, 4);
        assert!(losses.iter().all(|l| l.is_finite()));
        let val = t.evaluate().unwrap();
        assert!(val.is_finite() && val > 0.0);
        // The same run again is bitwise the same (the loader thread changes nothing).
        let mut again = local(&spec);
        assert_eq!(train(&mut again, 4), losses);
        assert_eq!(again.checksum().unwrap(), t.checksum().unwrap());
    }

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny")
    }

    #[test]
    fn init_from_hf_starts_from_the_fixture_weights() {
        let root = tempfile::tempdir().unwrap();
        // The shape comes from the fixture's config.json (2 layers, 4 heads, 48 dims, 32 positions, vocab 97).
        let env = [
            ("LOCKSTEP_MODEL__INIT_FROM", format!("hf:{}", fixture_dir().display())),
            ("LOCKSTEP_TRAIN__SEQ_LEN", "30".into()),
            ("LOCKSTEP_TRAIN__GLOBAL_BATCH", "4".into()),
            ("LOCKSTEP_CHECKPOINT__DIR", root.path().display().to_string()),
        ];
        let spec = RunSpec::load_with_env(None, env.map(|(k, v)| (k.to_string(), v))).unwrap();
        assert_eq!((spec.model.n_embd, spec.model.vocab_size), (48, 97));
        let mut t = local(&spec);
        let want = candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu).unwrap();
        for (name, var) in t.params().names().iter().zip(t.params().vars()) {
            let a: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = want[name].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{name}");
        }
        assert!(t.train_step().unwrap().loss.is_finite());

        // A run whose shape disagrees (built in code, so the spec's own check is bypassed) fails in the worker,
        // naming each differing field with both values.
        let mut wrong = spec.clone();
        wrong.model.n_layer = 3;
        wrong.model.block_size = 40;
        let err = Trainer::new(wrong, Box::new(Local), Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("config.json"), "{err}");
        assert!(err.contains("model.n_layer = 3 vs n_layer = 2"), "{err}");
        assert!(err.contains("model.block_size = 40 vs n_positions = 32"), "{err}");
    }

    /// Writes a trained checkpoint and the logits Lockstep computes for two validation sequences, for
    /// `scripts/hf_interop.py` to compare with `transformers`:
    ///
    /// ```sh
    /// LOCKSTEP_INTEROP_DIR=/tmp/interop cargo test -p lockstep-worker --lib export_for_hf_interop -- --ignored
    /// python scripts/hf_interop.py /tmp/interop/checkpoints/step-00000030 /tmp/interop/reference.safetensors
    /// ```
    #[test]
    #[ignore = "writes files for scripts/hf_interop.py; run by hand"]
    fn export_for_hf_interop() {
        let out = std::env::var_os("LOCKSTEP_INTEROP_DIR")
            .map_or_else(|| std::env::temp_dir().join("lockstep-hf-interop"), PathBuf::from);
        let mut spec = spec(&out.join("checkpoints"), 30, 0.1);
        spec.model.n_embd = 64;
        let mut t = local(&spec);
        train(&mut t, 30);
        let dir = t.save_checkpoint().unwrap();
        let (x, _) = t.batch(Split::Val, &[0, 1]).unwrap();
        let logits = t.model().forward(&x, None).unwrap();
        let reference = out.join("reference.safetensors");
        let tensors = std::collections::HashMap::from([
            ("input_ids".to_string(), x.to_dtype(DType::I64).unwrap()),
            ("logits".to_string(), logits),
        ]);
        candle_core::safetensors::save(&tensors, &reference).unwrap();
        println!(
            "checkpoint {}\nreference {}\nrun: python scripts/hf_interop.py {} {}",
            dir.display(),
            reference.display(),
            dir.display(),
            reference.display()
        );
    }

    /// bf16 compute with f32 master weights trains on the CPU: the loss falls, and the parameters and the optimizer
    /// stay f32.
    #[test]
    fn a_bf16_run_trains_with_f32_master_weights() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path(), 30, 0.0);
        spec.train.lr = 1e-2;
        spec.train.compute_dtype = ComputeDtype::Bf16;
        let mut t = local(&spec);
        assert_eq!(t.model().compute_dtype(), DType::BF16);
        let losses = train(&mut t, 30);
        assert!(losses.iter().all(|l| l.is_finite()));
        let (first, last) = (
            losses[..3].iter().sum::<f64>() / 3.0,
            losses[27..].iter().sum::<f64>() / 3.0,
        );
        assert!(last < 0.8 * first, "bf16 loss did not fall: {first:.4} -> {last:.4}");
        assert!(t.params().vars().iter().all(|v| v.dtype() == DType::F32));
        // The same run in f32 starts from the same loss (bf16 rounding aside) and ends elsewhere.
        spec.train.compute_dtype = ComputeDtype::F32;
        let f32_losses = train(&mut local(&spec), 30);
        assert!(
            (f32_losses[0] - losses[0]).abs() < 0.05 * f32_losses[0],
            "{} vs {}",
            f32_losses[0],
            losses[0]
        );
        assert_ne!(f32_losses, losses);
    }
}
