//! The `--device` flag: which candle device a worker computes on.
use candle_core::Device;

use crate::error::{Error, Result};

/// `cpu` → the CPU. `cuda:N` (or `cuda`, meaning `cuda:0`) → GPU N, in a build with the `cuda` feature. Every
/// failure is one line naming the flag and what to do: a build without CUDA, no usable driver or GPU, N out of range.
pub fn parse(flag: &str) -> Result<(Device, String)> {
    match flag {
        "cpu" => Ok((Device::Cpu, "cpu".into())),
        f if f.starts_with("cuda") => {
            let n = ordinal(f)?;
            Ok((open_cuda(&format!("--device {f}"), n)?, format!("cuda:{n}")))
        }
        f => Err(Error::Usage(format!("--device {f}: unknown device; use cpu or cuda:N"))),
    }
}

/// The hardware's own name, for the table of device peaks ([`crate::hardware::peak_flops`]): the CUDA driver's
/// name of a GPU (e.g. `NVIDIA H200`), `cpu` otherwise (also when the driver does not answer).
pub fn hardware_name(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device
        && let Ok(name) = d.cuda_stream().context().name()
    {
        return name;
    }
    let _ = device;
    "cpu".into()
}

/// The N of `cuda:N`.
fn ordinal(flag: &str) -> Result<usize> {
    let n = match flag.strip_prefix("cuda") {
        Some("") => Some(0),
        Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse().ok()),
        None => None,
    };
    n.ok_or_else(|| {
        Error::Usage(format!(
            "--device {flag}: not a CUDA device; write cuda:N with N the GPU's index (cuda:0 is the first)"
        ))
    })
}

/// `--gpus all` or `--gpus 0,1,3`: one CUDA device per listed GPU, in the order given, each with its name.
pub fn parse_gpus(list: &str) -> Result<Vec<(Device, String)>> {
    let flag = format!("--gpus {list}");
    let ordinals: Vec<usize> = if list.trim() == "all" {
        (0..cuda_device_count(&flag)?).collect()
    } else {
        list.split(',')
            .map(|n| n.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::Usage(format!("{flag}: write `all` or GPU indices like 0,1,3")))?
    };
    if ordinals.is_empty() {
        return Err(Error::Usage(format!(
            "{flag}: no GPU listed; write `all` or GPU indices like 0,1,3"
        )));
    }
    if let Some((_, n)) = ordinals.iter().enumerate().find(|&(i, n)| ordinals[..i].contains(n)) {
        return Err(Error::Usage(format!(
            "{flag}: GPU {n} is listed twice; NCCL refuses two ranks on one GPU"
        )));
    }
    ordinals
        .into_iter()
        .map(|n| Ok((open_cuda(&flag, n)?, format!("cuda:{n}"))))
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(flag: &str, _n: usize) -> Result<Device> {
    Err(Error::Usage(format!(
        "{flag}: this build has no CUDA support (it was built without the `cuda` feature); use --device cpu"
    )))
}

/// Opens GPU `n` after checking `LOCKSTEP_GPU_COMPOSED`, that a driver answers and that GPU `n` exists, so each
/// failure names its cause. `flag` is the flag as given, e.g. `--device cuda:1`.
#[cfg(feature = "cuda")]
fn open_cuda(flag: &str, n: usize) -> Result<Device> {
    // A misspelt LOCKSTEP_GPU_COMPOSED is refused here, before any work, rather than at the first op.
    let kernels = crate::ops::gpu_kernels::check()?;
    if kernels != "all" {
        tracing::info!("{flag}: fused GPU kernels: {kernels}");
    }
    let count = cuda_device_count(flag)?;
    if count == 0 {
        return Err(Error::Usage(format!(
            "{flag}: the CUDA driver sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES); or use --device cpu"
        )));
    }
    if n >= count {
        return Err(Error::Usage(format!(
            "{flag}: GPU {n} does not exist; this host has {count} visible GPU(s), cuda:0 to cuda:{}: pick one of those",
            count - 1
        )));
    }
    let device = Device::new_cuda(n).map_err(|e| {
        let detail = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        Error::Usage(format!(
            "{flag}: cannot open GPU {n} ({detail}); check nvidia-smi, or use --device cpu"
        ))
    })?;
    if let Device::Cuda(d) = &device {
        keep_freed_gpu_memory(d, flag);
    }
    Ok(device)
}

/// [`keep_freed_memory`] for the GPU: makes its stream-ordered memory pool (where candle's `cuMemAllocAsync`
/// allocations come from) keep what is freed instead of returning it to the driver at every synchronisation. With
/// the driver's default threshold of 0 each step's host read-back would hand the step's activations back and the
/// next step map them again: allocation churn that a caching allocator (PyTorch's) does not have. Peak memory is unchanged; memory a step frees is reused
/// by the next. A GPU without memory pools (cudarc then uses plain cuMemAlloc) is left as it is.
#[cfg(feature = "cuda")]
fn keep_freed_gpu_memory(device: &candle_core::CudaDevice, flag: &str) {
    use cudarc::driver::{result, sys};
    let dev = device.cuda_stream().context().cu_device();
    let mut threshold = u64::MAX;
    // SAFETY: `dev` is a device handle of an open context; the release threshold attribute is a u64.
    let set = unsafe {
        result::device::get_mem_pool(dev).and_then(|pool| {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        })
    };
    if let Err(e) = set {
        tracing::debug!("{flag}: the memory pool keeps its default release threshold ({e})");
    }
}

/// GPUs the CUDA driver sees (CUDA_VISIBLE_DEVICES applied); an error line names `flag`.
#[cfg(feature = "cuda")]
pub fn cuda_device_count(flag: &str) -> Result<usize> {
    let count = cudarc::driver::CudaContext::device_count().map_err(|e| cuda_error(flag, &e))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// GPUs the CUDA driver sees: this build has no CUDA support.
#[cfg(not(feature = "cuda"))]
pub fn cuda_device_count(flag: &str) -> Result<usize> {
    Err(Error::Usage(format!(
        "{flag}: this build has no CUDA support (it was built without the `cuda` feature); use --device cpu"
    )))
}

/// What a failed driver call means for the user of `flag` (e.g. `--device cuda:0`).
#[cfg(feature = "cuda")]
fn cuda_error(flag: &str, e: &cudarc::driver::DriverError) -> Error {
    use cudarc::driver::sys::CUresult as R;
    let what = match e.0 {
        R::CUDA_ERROR_STUB_LIBRARY => "the libcuda.so.1 loaded is a link-time stub, not the NVIDIA driver: put the \
                                       driver's folder first on LD_LIBRARY_PATH (. scripts/cuda/cuda-libs.sh)"
            .to_string(),
        R::CUDA_ERROR_NO_DEVICE => "the CUDA driver sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)".into(),
        R::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH | R::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => {
            "the NVIDIA driver does not match this CUDA 13.0 build (it needs driver 580 or newer; see nvidia-smi)"
                .into()
        }
        code => format!("the CUDA driver cannot be initialised ({code:?}; does nvidia-smi work?)"),
    };
    Error::Usage(format!("{flag}: {what}; or use --device cpu"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(flag: &str) -> String {
        match parse(flag) {
            Err(Error::Usage(m)) => m,
            other => panic!("{flag}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn cpu_parses() {
        let (device, name) = parse("cpu").unwrap();
        assert!(device.is_cpu());
        assert_eq!(name, "cpu");
    }

    #[test]
    fn malformed_cuda_flags_name_the_flag_and_the_form() {
        for flag in ["cuda:x", "cuda0", "cuda:-1", "cudaa"] {
            let m = usage(flag);
            assert!(m.starts_with(&format!("--device {flag}:")), "{m}");
            assert!(m.contains("cuda:N"), "{m}");
        }
    }

    #[test]
    fn unknown_devices_are_refused() {
        let m = usage("tpu");
        assert!(m.contains("--device tpu") && m.contains("use cpu or cuda:N"), "{m}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_so_in_one_line() {
        for flag in ["cuda:0", "cuda", "cuda:3"] {
            let m = usage(flag);
            assert!(
                m.contains("without the `cuda` feature") && m.contains("--device cpu"),
                "{m}"
            );
            assert!(!m.contains('\n'), "{m}");
        }
        for list in ["all", "0,1"] {
            let m = parse_gpus(list).unwrap_err().to_string();
            assert!(
                m.starts_with(&format!("--gpus {list}: this build has no CUDA support")),
                "{m}"
            );
        }
    }

    #[test]
    fn malformed_gpu_lists_are_refused_before_any_driver_call() {
        for (list, want) in [
            ("0,x", "indices like 0,1,3"),
            ("", "indices like 0,1,3"),
            ("1,0,1", "GPU 1 is listed twice"),
        ] {
            let m = parse_gpus(list).unwrap_err().to_string();
            assert!(m.starts_with(&format!("--gpus {list}:")) && m.contains(want), "{m}");
        }
    }
}
