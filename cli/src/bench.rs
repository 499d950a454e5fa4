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
use lockstep_common::spec::DataSource;
use lockstep_worker::collective::{Collective, Local};
use lockstep_worker::collective::{Ring, RingConfig, RingListener};
use lockstep_worker::loader::{Loader, Share};
use lockstep_worker::trainer::{StepOutcome, Trainer};

use crate::error::{Error, Result};

/// nanoGPT's CPU Shakespeare shape: 4 layers, 4 heads, 128 dims, context 64, batch 12 per worker, vocab 65.
pub fn nanogpt_cpu_spec(workers: u32) -> RunSpec {
    let mut spec = RunSpec::default();
    spec.model.n_layer = 4;
    spec.model.n_head = 4;
    spec.model.n_embd = 128;
    spec.model.block_size = 64;
    spec.model.vocab_size = 65;
    spec.train.seq_len = 64;
    spec.train.micro_batch = 12;
    spec.train.global_batch = 12 * workers as usize;
    spec.train.warmup_steps = 0;
    spec.cluster.min_workers = workers;
    spec.cluster.max_workers = workers;
    spec
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
}

/// Trains `spec` with `workers` ranks (threads in this process, joined by a loopback ring), `warmup` unmeasured
/// steps then `steps` measured ones. Rank 0's timing split is reported.
pub fn train(spec: &RunSpec, workers: u32, warmup: u64, steps: u64) -> Result<TrainBench> {
    let mut spec = spec.clone();
    spec.train.total_steps = spec.train.total_steps.max(warmup + steps);
    spec.validate()?;
    let listeners = (0..workers)
        .map(|_| RingListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
    let timeout = std::time::Duration::from_secs(spec.cluster.collective_timeout_secs);
    let results: Vec<Result<(Vec<StepOutcome>, f64, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (spec, peers) = (spec.clone(), peers.clone());
                s.spawn(move || -> Result<(Vec<StepOutcome>, f64, usize)> {
                    let collective: Box<dyn Collective> = if workers == 1 {
                        Box::new(Local)
                    } else {
                        let cfg = RingConfig {
                            rank: rank as u32,
                            world_size: workers,
                            peers,
                            timeout,
                            session: "bench".into(),
                        };
                        Box::new(Ring::connect(&listener, cfg)?)
                    };
                    let mut trainer = Trainer::new(spec, collective, Device::Cpu)?;
                    for _ in 0..warmup {
                        trainer.train_step()?;
                    }
                    let start = Instant::now();
                    let outs = (0..steps)
                        .map(|_| trainer.train_step())
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((outs, start.elapsed().as_secs_f64(), trainer.params().num_elements()))
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
        let (outs, secs, params) = result?;
        let tokens: u64 = outs.iter().map(|o| o.tokens).sum();
        bench.tokens_per_sec += tokens as f64 / secs;
        if rank == 0 {
            let n = outs.len().max(1) as f64;
            bench.params = params;
            bench.step_ms = outs.iter().map(|o| o.step_ms).sum::<f64>() / n;
            bench.forward_ms = outs.iter().map(|o| o.forward_ms).sum::<f64>() / n;
            bench.backward_ms = outs.iter().map(|o| o.backward_ms).sum::<f64>() / n;
            bench.allreduce_ms = outs.iter().map(|o| o.allreduce_ms).sum::<f64>() / n;
            bench.optimizer_ms = outs.iter().map(|o| o.optimizer_ms).sum::<f64>() / n;
        }
    }
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
            let g = GeneratedDir::write()?;
            (g.0.clone(), Some(g))
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

/// A prepared directory of pseudo-random byte tokens under the system's temporary directory, deleted on drop.
struct GeneratedDir(PathBuf);

impl GeneratedDir {
    fn write() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lockstep-bench-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            context: format!("create {}", dir.display()),
            source,
        })?;
        let generated = GeneratedDir(dir);
        let tokenizer = Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty::<String>())?;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut shard = || {
            (0..GENERATED_SHARD_TOKENS)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 256) as u32
                })
                .collect::<Vec<u32>>()
        };
        let train: Vec<Vec<u32>> = (0..GENERATED_SHARDS).map(|_| shard()).collect();
        let val = vec![shard()[..1 << 16].to_vec()];
        write_prepared(&generated.0, &tokenizer, &TokenizerSpec::Byte, &train, &val)?;
        Ok(generated)
    }
}

impl Drop for GeneratedDir {
    fn drop(&mut self) {
        // Best effort: a leftover directory in the temporary directory is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
