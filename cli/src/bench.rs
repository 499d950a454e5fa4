//! `lockstep bench`: throughput figures for docs/BENCHMARKS.md, measured in-process (no coordinator), so the
//! numbers are the training step, the collective and the data loader themselves.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use lockstep_common::RunSpec;
use lockstep_common::data::corpus::Split;
use lockstep_common::data::dataset::write_prepared;
use lockstep_common::data::tokenizer::TokenizerSpec;
use lockstep_common::data::{Corpus, DataPlan, Tokenizer};
use lockstep_common::spec::{ComputeDtype, DataSource};
use lockstep_worker::collective::{Collective, Local};
use lockstep_worker::collective::{Ring, RingConfig, RingListener};
use lockstep_worker::compute_pool;
use lockstep_worker::flops::{self, flops_per_token};
use lockstep_worker::hardware::{device_peak_bytes, peak_rss_bytes, reset_device_peak};
use lockstep_worker::loader::{Loader, Share};
use lockstep_worker::trainer::{StepOutcome, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// What `lockstep bench train` trains when no `--config` is given: a preset on random tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomTokens {
    /// A `model.preset` name.
    pub preset: String,
    /// Tokens per sequence; default the preset's context length.
    pub seq_len: Option<usize>,
    /// Sequences per forward/backward on each rank (the global batch is this × ranks: no accumulation).
    pub micro_batch: usize,
    /// The model's vocabulary; default the preset's, or 65 (nanoGPT's Shakespeare characters) when it has none.
    pub vocab_size: Option<usize>,
    pub dtype: ComputeDtype,
}

/// Random ids are drawn from a character vocabulary of CJK ideographs up to this many ids, else from GPT-2's.
const MAX_CHAR_VOCAB: usize = 20_000;

/// The spec for `r` on `workers` ranks, and the generated directory of random tokens it reads (deleted when the
/// guard drops). The tokenizer is a character one of exactly the vocabulary's size, or GPT-2's for vocabularies of
/// 50,257 ids or more (a larger `vocab_size` pads the embedding, as llm.c's 50,304 does).
pub fn random_tokens_spec(r: &RandomTokens, workers: u32) -> Result<(RunSpec, GeneratedDir)> {
    if r.micro_batch == 0 || workers == 0 {
        return Err(Error::Usage("--micro-batch and --workers must be at least 1".into()));
    }
    let shape = RunSpec::from_toml_str(&format!("[model]\npreset = {:?}\n", r.preset))?;
    let vocab = r.vocab_size.unwrap_or(match shape.model.vocab_size {
        0 => 65,
        v => v,
    });
    let seq_len = r.seq_len.unwrap_or(shape.model.block_size);
    let (tokenizer, tokenizer_spec) = if vocab >= 50_257 {
        (
            Tokenizer::train(&TokenizerSpec::Gpt2, std::iter::empty())?,
            TokenizerSpec::Gpt2,
        )
    } else if (2..=MAX_CHAR_VOCAB).contains(&vocab) {
        // vocab − 1 characters + end-of-text = exactly `vocab` ids.
        let chars: String = (0..vocab as u32 - 1)
            .filter_map(|i| char::from_u32(0x4E00 + i))
            .collect();
        (
            Tokenizer::train(&TokenizerSpec::Char, std::iter::once(chars))?,
            TokenizerSpec::Char,
        )
    } else {
        return Err(Error::Usage(format!(
            "--vocab-size {vocab}: random tokens come from a character vocabulary of 2 to {MAX_CHAR_VOCAB} ids or from \
             GPT-2's (50,257 or more)"
        )));
    };
    let global = r.micro_batch * workers as usize;
    // Two epochs' worth of windows is plenty: the data's content does not change the step's cost.
    let windows = (2 * global).max(8);
    let ids = tokenizer.vocab_size() as u32;
    let generated = GeneratedDir::random(
        "train",
        &tokenizer,
        &tokenizer_spec,
        &[windows * seq_len + 1],
        seq_len + 1,
        ids,
    )?;
    let dtype = match r.dtype {
        ComputeDtype::F32 => "f32",
        ComputeDtype::Bf16 => "bf16",
    };
    let toml = format!(
        "[cluster]\nmin_workers = {workers}\nmax_workers = {workers}\n\
         [model]\npreset = {preset:?}\nvocab_size = {vocab}\nblock_size = {block}\n\
         [data]\nsource = \"prepared\"\npath = {path:?}\nverify = \"sizes\"\n\
         [train]\nseq_len = {seq_len}\nglobal_batch = {global}\nmicro_batch = {micro}\nwarmup_steps = 0\n\
         eval_interval = 0\nchecksum_interval = 0\ncompute_dtype = \"{dtype}\"\n",
        preset = r.preset,
        block = shape.model.block_size.max(seq_len),
        path = generated.path().display().to_string(),
        micro = r.micro_batch,
    );
    Ok((RunSpec::from_toml_str(&toml)?, generated))
}

/// Mean per-step figures over the measured steps, summed over ranks for tokens/s.
#[derive(Debug, Clone, Default)]
pub struct TrainBench {
    pub workers: u32,
    pub steps: u64,
    pub params: usize,
    pub tokens_per_sec: f64,
    pub step_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub allreduce_ms: f64,
    pub optimizer_ms: f64,
    /// Forward + backward flops per trained token (nanoGPT's 6N + 12·L·H·Q·T; [`flops_per_token`]).
    pub flops_per_token: f64,
    /// The process's peak resident memory (every rank is a thread of it), if known.
    pub peak_rss_bytes: Option<u64>,
    /// The most GPU memory the measured steps held at once (all ranks on the device), if on a GPU.
    pub peak_device_bytes: Option<u64>,
}

impl TrainBench {
    /// Model flops utilisation against `peak_flops` (the device's dense peak for the run's dtype).
    pub fn mfu(&self, peak_flops: f64) -> f64 {
        flops::mfu(self.flops_per_token, self.tokens_per_sec, peak_flops)
    }
}

/// What one rank of [`train`] measured.
struct RankRun {
    outs: Vec<StepOutcome>,
    /// Wall time of the measured steps.
    secs: f64,
    params: usize,
    flops: f64,
}

/// Trains `spec` with `workers` ranks (threads in this process, joined by a loopback ring), `warmup` unmeasured
/// steps then `steps` measured ones. Rank 0's timing split is reported.
pub fn train(spec: &RunSpec, device: &Device, workers: u32, warmup: u64, steps: u64) -> Result<TrainBench> {
    let mut spec = spec.clone();
    spec.train.total_steps = spec.train.total_steps.max(warmup + steps);
    spec.validate()?;
    let listeners = (0..workers)
        .map(|_| RingListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
    let timeout = std::time::Duration::from_secs(spec.cluster.collective_timeout_secs);
    // The ranks are threads of this process: a fresh token is as good as any.
    let token = lockstep_common::auth::RunToken::generate();
    let results: Vec<Result<RankRun>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (spec, peers, token) = (spec.clone(), peers.clone(), token.clone());
                s.spawn(move || -> Result<RankRun> {
                    let collective: Box<dyn Collective> = if workers == 1 {
                        Box::new(Local)
                    } else {
                        let cfg = RingConfig {
                            rank: rank as u32,
                            world_size: workers,
                            peers,
                            timeout,
                            session: "bench".into(),
                            token: token.clone(),
                            cancel: None,
                        };
                        Box::new(Ring::connect(&listener, cfg)?)
                    };
                    let seq_len = spec.train.seq_len;
                    // As a worker trains: on the CPU from a thread of its own compute pool.
                    compute_pool::run(device, move || -> Result<RankRun> {
                        let mut trainer = Trainer::new(spec, collective, device.clone())?;
                        for _ in 0..warmup {
                            trainer.train_step()?;
                        }
                        // The measured steps' peak, not the first steps' (which also fill allocator caches).
                        if rank == 0 {
                            reset_device_peak(device);
                        }
                        let start = Instant::now();
                        let outs = (0..steps)
                            .map(|_| trainer.train_step())
                            .collect::<Result<Vec<_>, _>>()?;
                        let params = trainer.params().num_elements();
                        let flops = flops_per_token(trainer.model().config(), params, seq_len);
                        Ok(RankRun {
                            outs,
                            secs: start.elapsed().as_secs_f64(),
                            params,
                            flops,
                        })
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Usage("a benchmark rank panicked".into())))
            })
            .collect()
    });
    let mut bench = TrainBench {
        workers,
        steps,
        ..Default::default()
    };
    for (rank, result) in results.into_iter().enumerate() {
        let RankRun {
            outs,
            secs,
            params,
            flops,
        } = result?;
        let tokens: u64 = outs.iter().map(|o| o.tokens).sum();
        bench.tokens_per_sec += tokens as f64 / secs;
        if rank == 0 {
            let n = outs.len().max(1) as f64;
            bench.params = params;
            bench.flops_per_token = flops;
            bench.step_ms = outs.iter().map(|o| o.step_ms).sum::<f64>() / n;
            bench.forward_ms = outs.iter().map(|o| o.forward_ms).sum::<f64>() / n;
            bench.backward_ms = outs.iter().map(|o| o.backward_ms).sum::<f64>() / n;
            bench.allreduce_ms = outs.iter().map(|o| o.allreduce_ms).sum::<f64>() / n;
            bench.optimizer_ms = outs.iter().map(|o| o.optimizer_ms).sum::<f64>() / n;
        }
    }
    bench.peak_rss_bytes = peak_rss_bytes();
    bench.peak_device_bytes = device_peak_bytes(device);
    Ok(bench)
}

/// What `lockstep bench data` measured: one worker's loader assembling batches as fast as they are taken.
#[derive(Debug, Clone)]
pub struct DataBench {
    /// The directory read (a generated one is deleted afterwards).
    pub data: PathBuf,
    pub generated: bool,
    pub steps: u64,
    pub batch: usize,
    pub seq_len: usize,
    pub secs: f64,
    /// Input tokens assembled per second (each with its target).
    pub tokens_per_sec: f64,
}

/// Tokens of the directory generated when none is given: 4 shards of 8 Mi tokens (64 MiB of `u16`).
const GENERATED_SHARDS: usize = 4;
const GENERATED_SHARD_TOKENS: usize = 8 << 20;

/// Times `steps` steps of `batch` sequences of `seq_len` tokens from the loader of a single worker (rank 0 of 1,
/// one micro-batch per step) on the prepared directory `data` (or llm.c shards of `tokenizer`), or on a generated
/// one when `None`. The first step (thread start-up) is not timed.
pub fn data(
    data: Option<&Path>,
    tokenizer: Option<&TokenizerSpec>,
    seq_len: usize,
    batch: usize,
    steps: u64,
) -> Result<DataBench> {
    if seq_len == 0 || batch == 0 || steps == 0 {
        return Err(Error::Usage("--seq-len, --batch and --steps must be at least 1".into()));
    }
    let (dir, generated) = match data {
        Some(dir) => (dir.to_path_buf(), None),
        None => {
            let tokenizer = Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty::<String>())?;
            let shards = [GENERATED_SHARD_TOKENS; GENERATED_SHARDS];
            let g = GeneratedDir::random("data", &tokenizer, &TokenizerSpec::Byte, &shards, 1 << 16, 256)?;
            (g.path().to_path_buf(), Some(g))
        }
    };
    let mut spec = RunSpec::default();
    spec.data.source = DataSource::Prepared;
    spec.data.path = Some(dir.clone());
    spec.data.tokenizer = tokenizer.cloned();
    spec.model.block_size = spec.model.block_size.max(seq_len);
    spec.train.seq_len = seq_len;
    spec.train.global_batch = batch;
    spec.train.micro_batch = batch;
    spec.validate()?;
    let corpus = Arc::new(Corpus::load(&spec)?);
    let plan = DataPlan::new(spec.run.seed, corpus.num_windows(Split::Train), batch as u64)?;
    let share = Share {
        rank: 0,
        world_size: 1,
        global_batch: batch,
        micro_batch: batch,
    };
    let mut loader = Loader::start(corpus, plan, share, 0)?;
    loader.take(0)?;
    let start = Instant::now();
    let mut tokens = 0u64;
    for step in 1..=steps {
        tokens += loader.take(step)?.tokens();
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(DataBench {
        data: dir,
        generated: generated.is_some(),
        steps,
        batch,
        seq_len,
        secs,
        tokens_per_sec: tokens as f64 / secs,
    })
}

/// A prepared directory of random tokens: a fresh directory under the system's temporary directory (unique even
/// within one process), deleted on drop.
#[derive(Debug)]
pub struct GeneratedDir(tempfile::TempDir);

impl GeneratedDir {
    /// Training shards of `train` tokens each and one validation shard of `val` tokens, ids uniform in `0..ids`
    /// (seeded: the same every time), with `tokenizer`.
    fn random(
        tag: &str,
        tokenizer: &Tokenizer,
        spec: &TokenizerSpec,
        train: &[usize],
        val: usize,
        ids: u32,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("lockstep-bench-{tag}-"))
            .tempdir()
            .map_err(|source| Error::Io {
                context: format!("create a directory under {}", std::env::temp_dir().display()),
                source,
            })?;
        let generated = GeneratedDir(dir);
        let mut rng = ChaCha8Rng::seed_from_u64(0x9E37_79B9_7F4A_7C15);
        let mut shard = |n: usize| (0..n).map(|_| rng.random_range(0..ids)).collect::<Vec<u32>>();
        let train: Vec<Vec<u32>> = train.iter().map(|&n| shard(n)).collect();
        let val = vec![shard(val)];
        write_prepared(generated.path(), tokenizer, spec, &train, &val)?;
        Ok(generated)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(preset: &str, vocab_size: Option<usize>) -> RandomTokens {
        RandomTokens {
            preset: preset.into(),
            seq_len: Some(16),
            micro_batch: 2,
            vocab_size,
            dtype: ComputeDtype::F32,
        }
    }

    #[test]
    fn a_preset_trains_on_random_tokens_and_reports_flops_and_memory() {
        let (spec, dir) = random_tokens_spec(&random("tiny", None), 2).unwrap();
        assert!(dir.path().join("manifest.json").exists());
        assert_eq!(
            (spec.model.n_layer, spec.model.vocab_size, spec.train.global_batch),
            (2, 65, 4)
        );
        let b = train(&spec, &Device::Cpu, 2, 1, 2).unwrap();
        assert_eq!((b.workers, b.steps), (2, 2));
        assert!(b.tokens_per_sec > 0.0 && b.step_ms > 0.0);
        // 6N + 12·L·H·Q·T with N = parameters less the 64 × 64 learned position embeddings.
        let n = (b.params - 64 * 64) as f64;
        assert_eq!(b.flops_per_token, 6.0 * n + 12.0 * 2.0 * 4.0 * 16.0 * 16.0);
        assert!(b.mfu(1e12) > 0.0);
        if cfg!(target_os = "linux") {
            assert!(b.peak_rss_bytes.unwrap() > 0);
        }
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists(), "the generated directory is removed");
    }

    #[test]
    fn gpt2_vocabularies_use_gpt2_ids_and_others_are_explained() {
        let (spec, _dir) = random_tokens_spec(&random("gpt2", Some(50304)), 1).unwrap();
        assert_eq!((spec.model.n_layer, spec.model.vocab_size), (12, 50304));
        let err = random_tokens_spec(&random("tiny", Some(30_000)), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--vocab-size 30000"), "{err}");
        let err = random_tokens_spec(&random("huge", None), 1).unwrap_err().to_string();
        assert!(err.contains("unknown preset"), "{err}");
    }

    #[test]
    fn data_bench_reads_a_prepared_directory() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty::<String>()).unwrap();
        let ids: Vec<u32> = (0..5000).map(|i| i % 256).collect();
        let shards = [ids];
        write_prepared(dir.path(), &tokenizer, &TokenizerSpec::Byte, &shards, &shards).unwrap();
        let b = data(Some(dir.path()), None, 16, 4, 50).unwrap();
        assert!(!b.generated && b.data == dir.path());
        assert!(b.tokens_per_sec > 0.0 && b.secs > 0.0);
        let err = data(Some(&dir.path().join("nope")), None, 16, 4, 5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope") && err.contains("not a directory"), "{err}");
        assert!(data(Some(dir.path()), None, 16, 0, 5).is_err());
    }
}
