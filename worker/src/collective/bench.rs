//! All-reduce throughput of the TCP ring, measured with every rank as a thread on 127.0.0.1.
//!
//! On one host this measures the protocol and the copies, not a network; the ranks also share
//! the host's cores, so more ranks than cores understate what separate hosts would reach.

use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use lockstep_common::auth::RunToken;

use super::{Collective, Ring, RingConfig, RingListener};
use crate::error::{Error, Result};

/// Generous, because a bench on a loaded machine is slow rather than broken.
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Values repeat with this period so that every sum stays an exactly representable integer.
const PATTERN: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct AllReduceBench {
    pub ranks: u32,
    /// Buffer size actually reduced (rounded down to whole f32s).
    pub bytes: usize,
    pub iters: u32,
    /// Median over `iters` timed operations, after one warm-up; each operation is timed from a
    /// common start to the slowest rank's finish.
    pub secs_per_op: f64,
    /// `2(n-1)/n * bytes / secs_per_op`, in GB/s (1e9): what each rank's link carried.
    pub bus_gbps: f64,
}

/// Starts `ranks` ring members as threads in this process on 127.0.0.1 (port 0 listeners),
/// all-reduces an f32 buffer of `bytes` bytes `iters` times after a warm-up, checks the result is
/// correct, and returns the timing.
pub fn bench_allreduce(ranks: u32, bytes: usize, iters: u32) -> Result<AllReduceBench> {
    if ranks == 0 || iters == 0 {
        return Err(Error::RingConfig(format!(
            "bench needs at least one rank and one iteration, got {ranks} and {iters}"
        )));
    }
    let len = bytes / 4;
    let listeners = (0..ranks)
        .map(|_| RingListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>>>()?;
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
    let barrier = Barrier::new(ranks as usize);
    // The ranks are threads of this process: a fresh token is as good as any.
    let token = RunToken::generate();
    let per_rank = thread::scope(|s| {
        let handles = listeners
            .iter()
            .enumerate()
            .map(|(rank, listener)| {
                let cfg = RingConfig {
                    rank: rank as u32,
                    world_size: ranks,
                    peers: peers.clone(),
                    timeout: BENCH_TIMEOUT,
                    session: "bench".into(),
                    token: token.clone(),
                    cancel: None,
                };
                let barrier = &barrier;
                thread::Builder::new()
                    .name(format!("bench-rank-{rank}"))
                    .spawn_scoped(s, move || run_rank(listener, cfg, len, iters, barrier))
                    .map_err(|source| Error::Io {
                        context: "spawn bench rank".into(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<_>>>()
    })?;
    // An operation ends when its slowest rank does.
    let mut times: Vec<f64> = (0..iters as usize)
        .map(|i| per_rank.iter().map(|t| t[i].as_secs_f64()).fold(0.0, f64::max))
        .collect();
    times.sort_by(f64::total_cmp);
    let secs_per_op = times[times.len() / 2];
    let n = f64::from(ranks);
    let moved = 2.0 * (n - 1.0) / n * (len * 4) as f64;
    let bus_gbps = if secs_per_op > 0.0 {
        moved / secs_per_op / 1e9
    } else {
        0.0
    };
    Ok(AllReduceBench {
        ranks,
        bytes: len * 4,
        iters,
        secs_per_op,
        bus_gbps,
    })
}

/// One rank: warm up, then time `iters` all-reduces, checking each result.
fn run_rank(
    listener: &RingListener,
    cfg: RingConfig,
    len: usize,
    iters: u32,
    barrier: &Barrier,
) -> Result<Vec<Duration>> {
    let rank = cfg.rank;
    let n = cfg.world_size as usize;
    let mut ring = Ring::connect(listener, cfg)?;
    let mut buf = vec![0f32; len];
    let mut times = Vec::with_capacity(iters as usize);
    for i in 0..=iters {
        fill(&mut buf, rank);
        barrier.wait();
        let start = Instant::now();
        ring.all_reduce_sum(&mut buf)?;
        if i > 0 {
            times.push(start.elapsed());
        }
        check(&buf, n, rank)?;
    }
    Ok(times)
}

fn fill(buf: &mut [f32], rank: u32) {
    for (i, v) in buf.iter_mut().enumerate() {
        *v = ((i % PATTERN) as u32 + rank) as f32;
    }
}

fn check(buf: &[f32], n: usize, rank: u32) -> Result<()> {
    let offset = n * (n - 1) / 2;
    match buf
        .iter()
        .enumerate()
        .find(|&(i, &v)| v != (n * (i % PATTERN) + offset) as f32)
    {
        None => Ok(()),
        Some((i, v)) => Err(Error::Ring {
            peer: format!("rank {rank} (bench)"),
            message: format!(
                "wrong all-reduce result at element {i}: {v}, expected {}",
                n * (i % PATTERN) + offset
            ),
        }),
    }
}
