//! Timing one op alone: the device is synchronised before and after the timed region (a CUDA launch returns before
//! the kernel runs), a few unmeasured calls come first (allocator, cuBLAS heuristics, caches), and the median of the
//! measured calls is reported (one slow call, a page fault or a context switch, does not move it).
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::error::Result;

pub struct Timer<'a> {
    device: &'a Device,
    warmup: usize,
    reps: usize,
}

/// Median milliseconds of one call of a differentiated op.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FwdBwd {
    pub forward: f64,
    pub backward: f64,
}

impl std::ops::Add for FwdBwd {
    type Output = FwdBwd;
    fn add(self, o: FwdBwd) -> FwdBwd {
        FwdBwd {
            forward: self.forward + o.forward,
            backward: self.backward + o.backward,
        }
    }
}

impl<'a> Timer<'a> {
    /// `reps` is at least 1 (the caller checks the flag).
    pub fn new(device: &'a Device, warmup: usize, reps: usize) -> Self {
        Self {
            device,
            warmup,
            reps: reps.max(1),
        }
    }

    fn sync(&self) -> Result<()> {
        Ok(self.device.synchronize()?)
    }

    /// Median ms of `f`, each call after an untimed `setup` whose value it consumes. What `f` returns is dropped
    /// outside the timed region (freeing is not the op's cost).
    pub fn op<S, T>(&self, mut setup: impl FnMut() -> Result<S>, mut f: impl FnMut(S) -> Result<T>) -> Result<f64> {
        let mut times = Vec::with_capacity(self.reps);
        for i in 0..self.warmup + self.reps {
            let input = setup()?;
            self.sync()?;
            let start = Instant::now();
            let out = f(input)?;
            self.sync()?;
            let ms = ms_since(start);
            drop(out);
            if i >= self.warmup {
                times.push(ms);
            }
        }
        Ok(median(times))
    }

    /// Median ms of the forward `f` and of `backward()` from its output. candle seeds a backward pass with a tensor
    /// of ones shaped like the root; a step seeds it once for the whole graph, so that seed is timed on its own and
    /// taken off each backward (for an elementwise op it would otherwise be a third of it).
    pub fn fwd_bwd(&self, mut f: impl FnMut() -> Result<Tensor>) -> Result<FwdBwd> {
        let (mut forward, mut backward) = (Vec::with_capacity(self.reps), Vec::with_capacity(self.reps));
        for i in 0..self.warmup + self.reps {
            self.sync()?;
            let start = Instant::now();
            let y = f()?;
            self.sync()?;
            let fwd = ms_since(start);

            let start = Instant::now();
            let seed = y.ones_like()?.contiguous()?;
            self.sync()?;
            let seed_ms = ms_since(start);
            drop(seed);

            self.sync()?;
            let start = Instant::now();
            let grads = y.backward()?;
            self.sync()?;
            let bwd = ms_since(start);
            drop((grads, y));
            if i >= self.warmup {
                forward.push(fwd);
                backward.push((bwd - seed_ms).max(0.0));
            }
        }
        Ok(FwdBwd {
            forward: median(forward),
            backward: median(backward),
        })
    }
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    if xs.len().is_multiple_of(2) {
        (xs[mid - 1] + xs[mid]) / 2.0
    } else {
        xs[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn every_call_is_made_and_times_are_non_negative() {
        let timer = Timer::new(&Device::Cpu, 2, 3);
        let mut calls = 0;
        let ms = timer
            .op(
                || Ok(()),
                |()| {
                    calls += 1;
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(calls, 5);
        assert!(ms >= 0.0);
        let x = Var::from_slice(&[1f32, 2.0, 3.0], 3, &Device::Cpu).unwrap();
        let t = timer.fwd_bwd(|| Ok(x.as_tensor().sqr()?)).unwrap();
        assert!(t.forward >= 0.0 && t.backward >= 0.0);
    }
}
