//! Per-step progress of one generation: which ranks reported which step, whether their parameter checksums agree,
//! and the run's pace.
//!
//! A step is *complete* when every rank has reported it. Throughput and ETA come from the arrival times of complete
//! steps (coordinator clock, not the workers' own timings), so they include everything a step really costs: data,
//! compute, all-reduce, reporting. The window is the last [`WINDOW`] complete steps; before the first one, the
//! generation's start is the reference point, so the first step's figure includes start-up.
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

/// Complete steps the throughput and ETA are averaged over.
pub const WINDOW: usize = 20;

/// Two ranks reported different parameter checksums for one step: data parallelism is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub step: u64,
    pub first: (u32, String),
    pub second: (u32, String),
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ranks diverged at step {}: rank {} {} vs rank {} {}",
            self.step, self.first.0, self.first.1, self.second.0, self.second.1
        )
    }
}

/// One rank's report of one step, as far as progress is concerned.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub rank: u32,
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// The update was skipped (non-finite loss or gradient norm); the same on every rank.
    pub skipped: bool,
    pub checksum: &'a str,
}

/// A step every rank has now reported, with its rank-reduced values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completed {
    pub step: u64,
    /// Target tokens of all ranks together.
    pub tokens: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub skipped: bool,
}

#[derive(Debug, Default)]
struct StepAgg {
    reported: Vec<bool>,
    count: usize,
    tokens: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    skipped: bool,
    /// The first non-empty checksum reported for this step; every other must equal it.
    checksum: Option<(u32, String)>,
}

#[derive(Debug, Clone, Copy)]
struct Point {
    step: u64,
    at: Instant,
    /// Tokens of all complete steps since the generation started.
    tokens: u64,
}

#[derive(Debug)]
pub struct Progress {
    world_size: usize,
    pending: BTreeMap<u64, StepAgg>,
    window: VecDeque<Point>,
    /// Newest complete step and its (globally reduced) loss and learning rate.
    complete: Option<(u64, f64, f64)>,
}

impl Progress {
    /// Progress of a generation of `world_size` ranks that starts after `start_step` updates, at `now`.
    pub fn new(world_size: usize, start_step: u64, now: Instant) -> Self {
        let mut window = VecDeque::with_capacity(WINDOW + 1);
        window.push_back(Point {
            step: start_step,
            at: now,
            tokens: 0,
        });
        Self {
            world_size,
            pending: BTreeMap::new(),
            window,
            complete: None,
        }
    }

    /// Records one report; returns the step when this report completed it. `floor` is the lowest step every rank
    /// has now reported; aggregates at or below it can never change again and are dropped, which keeps memory
    /// bounded by how far ranks drift apart.
    pub fn record(&mut self, report: &Report<'_>, floor: u64, now: Instant) -> Result<Option<Completed>, Divergence> {
        let rank = report.rank as usize;
        let newest_complete = self.complete.map_or(0, |c| c.0);
        if rank >= self.world_size || report.step <= newest_complete {
            // A repeat of a step already complete, or a rank outside the generation: nothing to learn.
            return Ok(None);
        }
        let agg = self.pending.entry(report.step).or_insert_with(|| StepAgg {
            reported: vec![false; self.world_size],
            loss: report.loss,
            lr: report.lr,
            grad_norm: report.grad_norm,
            skipped: report.skipped,
            ..StepAgg::default()
        });
        if !report.checksum.is_empty() {
            match &agg.checksum {
                Some((first_rank, first)) if first != report.checksum => {
                    return Err(Divergence {
                        step: report.step,
                        first: (*first_rank, first.clone()),
                        second: (report.rank, report.checksum.to_string()),
                    });
                }
                Some(_) => {}
                None => agg.checksum = Some((report.rank, report.checksum.to_string())),
            }
        }
        if !agg.reported[rank] {
            agg.reported[rank] = true;
            agg.count += 1;
            agg.tokens += report.tokens;
        }
        let mut completed = None;
        if agg.count == self.world_size {
            let (tokens, loss, lr) = (agg.tokens, agg.loss, agg.lr);
            completed = Some(Completed {
                step: report.step,
                tokens,
                loss,
                lr,
                grad_norm: agg.grad_norm,
                skipped: agg.skipped,
            });
            self.pending.remove(&report.step);
            let total = self.window.back().map_or(0, |p| p.tokens) + tokens;
            self.window.push_back(Point {
                step: report.step,
                at: now,
                tokens: total,
            });
            if self.window.len() > WINDOW + 1 {
                self.window.pop_front();
            }
            self.complete = Some((report.step, loss, lr));
        }
        self.pending.retain(|&step, _| step > floor);
        Ok(completed)
    }

    /// Loss and learning rate of the newest complete step.
    pub fn last_loss_lr(&self) -> Option<(f64, f64)> {
        self.complete.map(|(_, loss, lr)| (loss, lr))
    }

    /// Tokens per second of all ranks together over the window; 0 before the first complete step.
    pub fn tokens_per_sec(&self) -> f64 {
        match (self.window.front(), self.window.back()) {
            (Some(a), Some(b)) if b.at > a.at => (b.tokens - a.tokens) as f64 / (b.at - a.at).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// Seconds per complete step over the window; `None` before the first complete step.
    pub fn secs_per_step(&self) -> Option<f64> {
        match (self.window.front(), self.window.back()) {
            (Some(a), Some(b)) if b.step > a.step => Some((b.at - a.at).as_secs_f64() / (b.step - a.step) as f64),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn report(rank: u32, step: u64, checksum: &str) -> Report<'_> {
        Report {
            rank,
            step,
            tokens: 100,
            loss: 2.0 / step as f64,
            lr: 0.1,
            grad_norm: 1.0,
            skipped: false,
            checksum,
        }
    }

    #[test]
    fn a_step_completes_when_every_rank_reported_it() {
        let t0 = Instant::now();
        let mut p = Progress::new(2, 0, t0);
        assert_eq!(
            p.record(&report(0, 1, ""), 0, t0 + Duration::from_secs(1)).unwrap(),
            None
        );
        assert_eq!(p.last_loss_lr(), None);
        assert_eq!(p.tokens_per_sec(), 0.0);
        let done = p
            .record(&report(1, 1, ""), 1, t0 + Duration::from_secs(2))
            .unwrap()
            .unwrap();
        assert_eq!((done.step, done.tokens, done.loss), (1, 200, 2.0));
        assert_eq!(p.last_loss_lr(), Some((2.0, 0.1)));
        // 200 tokens over the 2 s since the generation started.
        assert_eq!(p.tokens_per_sec(), 100.0);
        assert_eq!(p.secs_per_step(), Some(2.0));
    }

    #[test]
    fn a_repeated_report_is_counted_once() {
        let t0 = Instant::now();
        let mut p = Progress::new(2, 0, t0);
        p.record(&report(0, 1, ""), 0, t0).unwrap();
        p.record(&report(0, 1, ""), 0, t0).unwrap();
        assert_eq!(p.last_loss_lr(), None);
    }

    #[test]
    fn different_checksums_for_one_step_are_a_divergence() {
        let t0 = Instant::now();
        let mut p = Progress::new(3, 0, t0);
        p.record(&report(0, 5, "aaaa"), 0, t0).unwrap();
        p.record(&report(1, 5, ""), 0, t0).unwrap();
        let err = p.record(&report(2, 5, "bbbb"), 0, t0).unwrap_err();
        assert_eq!(err.to_string(), "ranks diverged at step 5: rank 0 aaaa vs rank 2 bbbb");
    }

    #[test]
    fn the_window_slides() {
        let t0 = Instant::now();
        let mut p = Progress::new(1, 0, t0);
        // Start-up took 100 s, then one step per second.
        for step in 1..=(WINDOW as u64 + 5) {
            p.record(&report(0, step, ""), step, t0 + Duration::from_secs(99 + step))
                .unwrap();
        }
        assert_eq!(p.secs_per_step(), Some(1.0));
        assert_eq!(p.tokens_per_sec(), 100.0);
    }
}
