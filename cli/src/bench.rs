//! `lockstep bench`: throughput figures for docs/BENCHMARKS.md, measured in-process (no coordinator), so the
//! numbers are the training step and the collective themselves.
use std::time::Instant;

use candle_core::Device;
use lockstep_common::RunSpec;
use lockstep_worker::collective::{Collective, Local};
use lockstep_worker::collective::{Ring, RingConfig, RingListener};
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
