//! Background batch assembly: a thread that reads this rank's windows for the coming steps out of the corpus
//! (memory-mapped shards or in-memory tokens) while the current step computes, so the step never waits on data.
//!
//! The thread walks the data plan from a start step on, [`DEPTH`] steps ahead at most (a bounded channel), and
//! hands over each step's micro-batches as ready-to-wrap `u32` buffers. What it assembles is exactly what
//! [`assemble`] returns for that step, so the training math does not depend on the thread. Dropping the [`Loader`]
//! stops the thread (its next hand-over fails) and joins it; an error in the thread is handed over in place of the
//! batch it was assembling and ends the thread.
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use lockstep_common::data::corpus::Split;
use lockstep_common::data::plan::rank_share;
use lockstep_common::data::{Corpus, DataPlan};

use crate::error::{Error, Result};

/// Steps assembled ahead of the one training.
pub const DEPTH: usize = 2;

/// Which part of each global batch this loader assembles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub rank: u32,
    pub world_size: u32,
    /// Sequences per optimizer step over all ranks (`train.global_batch`).
    pub global_batch: usize,
    /// Most sequences per forward/backward (`train.micro_batch`).
    pub micro_batch: usize,
}

/// One micro-batch: `windows.len()` sequences of `seq_len` tokens, row-major `[b, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    /// Global sequence index of its first sequence (seeds its dropout masks).
    pub first: u64,
    /// The training windows it holds, in order.
    pub windows: Vec<u64>,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

/// This rank's micro-batches of one optimizer step (0-based `step`: the one that makes `step + 1` updates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepBatch {
    pub step: u64,
    pub micro: Vec<MicroBatch>,
}

impl StepBatch {
    /// Target tokens in this batch.
    pub fn tokens(&self) -> u64 {
        self.micro.iter().map(|m| m.targets.len() as u64).sum()
    }
}

/// Assembles `share`'s micro-batches of `step` (DESIGN §3: the plan decides the windows, [`rank_share`] the rank's
/// contiguous part of the step's global indices, cut into micro-batches in order).
pub fn assemble(corpus: &Corpus, plan: &DataPlan, share: &Share, step: u64) -> Result<StepBatch> {
    let g = share.global_batch as u64;
    let mine = rank_share(g, share.world_size, share.rank);
    let windows = plan.rank_windows(step, share.rank, share.world_size);
    let t = corpus.seq_len;
    let micro = windows
        .chunks(share.micro_batch.max(1))
        .enumerate()
        .map(|(i, chunk)| {
            let (mut inputs, mut targets) = (Vec::with_capacity(chunk.len() * t), Vec::with_capacity(chunk.len() * t));
            for &w in chunk {
                corpus.extend_window(Split::Train, w, &mut inputs, &mut targets)?;
            }
            Ok(MicroBatch {
                first: step * g + mine.start + (i * share.micro_batch) as u64,
                windows: chunk.to_vec(),
                inputs,
                targets,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StepBatch { step, micro })
}

/// The background assembler of one rank's batches, from a start step on.
pub struct Loader {
    rx: Option<Receiver<Result<StepBatch>>>,
    thread: Option<JoinHandle<()>>,
    next_step: u64,
}

impl Loader {
    /// Starts the thread at `start_step` (the trainer's current step, e.g. after a resume).
    pub fn start(corpus: Arc<Corpus>, plan: DataPlan, share: Share, start_step: u64) -> Result<Self> {
        let (tx, rx) = sync_channel(DEPTH);
        let thread = std::thread::Builder::new()
            .name(format!("loader-{}", share.rank))
            .spawn(move || run(&corpus, &plan, &share, start_step, &tx))
            .map_err(|source| Error::Io {
                context: "start the data loader thread".into(),
                source,
            })?;
        Ok(Self {
            rx: Some(rx),
            thread: Some(thread),
            next_step: start_step,
        })
    }

    /// The step the next [`Loader::take`] hands over.
    pub fn next_step(&self) -> u64 {
        self.next_step
    }

    /// The batch of `step`, which must be the next one; waits while it is being assembled.
    pub fn take(&mut self, step: u64) -> Result<StepBatch> {
        if step != self.next_step {
            return Err(Error::Loader(format!(
                "step {step} asked for, but the loader is at step {}",
                self.next_step
            )));
        }
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| Error::Loader("the loader was stopped".into()))?;
        let batch = rx.recv().map_err(|_| {
            Error::Loader(format!(
                "the loader thread ended before step {step} (see the error before this)"
            ))
        })??;
        if batch.step != step {
            return Err(Error::Loader(format!(
                "the loader handed over step {} for step {step}",
                batch.step
            )));
        }
        self.next_step += 1;
        Ok(batch)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel makes the thread's next hand-over fail, which ends it.
        drop(self.rx.take());
        if let Some(thread) = self.thread.take() {
            // The thread has no panicking paths; if it did panic, its batch never arrives and `take` said so.
            let _ = thread.join();
        }
    }
}

/// The thread: assemble and hand over steps until the receiver is gone or an error was handed over.
fn run(corpus: &Corpus, plan: &DataPlan, share: &Share, start_step: u64, tx: &SyncSender<Result<StepBatch>>) {
    for step in start_step.. {
        let batch = assemble(corpus, plan, share, step);
        let failed = batch.is_err();
        if tx.send(batch).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
