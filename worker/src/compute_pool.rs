//! Where a CPU rank's tensor math runs: on a rayon pool of its own, with the training loop itself on one of the
//! pool's threads.
//!
//! candle's CPU kernels (and ours in `ops`) split their work through rayon at every op. Called from a thread outside
//! the pool, each split hands the whole op to the pool and puts the caller to sleep until a pool thread wakes it;
//! called from a pool thread, the caller works on its share and only the other threads are woken. At two threads
//! and nanoGPT's small shapes those hand-offs cost more than the second thread gained (docs/BENCHMARKS.md): the
//! step was no faster than on one thread; inside the pool it is 11-12% shorter.
//!
//! Only for the CPU: on a GPU the trainer's work must stay on the thread that owns the device's stream.
use candle_core::Device;

/// Runs `f` on a thread of a fresh rayon pool when `device` is the CPU (rayon's default size: `RAYON_NUM_THREADS`,
/// which the worker's and `bench train`'s `--threads` set, else one thread per core), directly otherwise. Should the
/// pool not start, `f` runs here, as before, after a warning.
pub fn run<T: Send>(device: &Device, f: impl FnOnce() -> T + Send) -> T {
    if !device.is_cpu() {
        return f();
    }
    match rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("compute-{i}"))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a compute thread pool; the tensor math runs from this thread");
            f()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_work_runs_on_a_pool_thread_and_returns_its_value() {
        let (on_pool, threads, value) = run(&Device::Cpu, || {
            (
                rayon::current_thread_index().is_some(),
                rayon::current_num_threads(),
                41 + 1,
            )
        });
        assert!(on_pool, "the closure ran outside the pool");
        assert!(threads >= 1);
        assert_eq!(value, 42);
        // Nested parallel work stays inside that pool (no deadlock with the caller holding a pool thread).
        let sum: u64 = run(&Device::Cpu, || {
            use rayon::prelude::*;
            (0..1000u64).into_par_iter().sum()
        });
        assert_eq!(sum, 499_500);
    }
}
