//! The `--device` flag: which candle device a worker computes on.
use candle_core::Device;

use crate::error::{Error, Result};

/// `cpu` → the CPU. `cuda:N` needs a build with the `cuda` feature (not in this build).
pub fn parse(flag: &str) -> Result<(Device, String)> {
    match flag {
        "cpu" => Ok((Device::Cpu, "cpu".into())),
        f if f.starts_with("cuda") => Err(Error::Usage(format!(
            "--device {f}: this build has no CUDA support (it was built without the `cuda` feature); use --device cpu"
        ))),
        f => Err(Error::Usage(format!("--device {f}: unknown device; use cpu"))),
    }
}

/// Keeps freed heap memory in the process instead of returning it to the kernel. By default glibc unmaps a freed
/// block of 128 KiB–32 MiB, or trims the heap once that much sits free at its top; a training step frees its
/// activations at the end of every backward pass and allocates them again in the next forward, so each step
/// page-faults them in afresh (a fifth of a nanoGPT-shape CPU step). Blocks up to 32 MiB (glibc's maximum) now
/// come from the heap, which is never trimmed. Call once at the start of `main`; elsewhere than Linux/glibc a
/// no-op.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only sets glibc's tuning parameters; called first thing in `main`.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_TOP_PAD, 64 << 20);
        }
    }
}
