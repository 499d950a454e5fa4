//! What a device can do at best, for MFU (the one table of dense peaks), and how much memory a run took.

use lockstep_common::spec::ComputeDtype;

/// Dense (no sparsity) peak throughput of one accelerator, in flop/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// As vendors name the part.
    pub name: &'static str,
    /// Substrings of the device name the driver reports (e.g. "NVIDIA H100 80GB HBM3") that identify it; the first
    /// entry of [`PEAKS`] that matches wins, so more specific parts come first.
    pub matches: &'static [&'static str],
    /// bfloat16 tensor-core matmuls with f32 accumulation.
    pub bf16: f64,
    /// Plain f32 (no TF32).
    pub f32: f64,
}

const T: f64 = 1e12;

/// Vendor datasheet figures, dense.
pub const PEAKS: &[Peak] = &[
    Peak {
        name: "H100 PCIe",
        matches: &["H100 PCIe"],
        bf16: 756.0 * T,
        f32: 51.2 * T,
    },
    Peak {
        name: "H100 / H200 SXM",
        matches: &["H200", "H100"],
        bf16: 989.4 * T,
        f32: 66.9 * T,
    },
    Peak {
        name: "A100",
        matches: &["A100"],
        bf16: 312.0 * T,
        f32: 19.5 * T,
    },
    Peak {
        name: "L40S",
        matches: &["L40S"],
        bf16: 362.1 * T,
        f32: 91.6 * T,
    },
    Peak {
        name: "A10 / A10G",
        matches: &["A10G", "A10"],
        bf16: 125.0 * T,
        f32: 31.2 * T,
    },
    Peak {
        name: "GeForce RTX 4090",
        matches: &["RTX 4090"],
        bf16: 165.2 * T,
        f32: 82.6 * T,
    },
];

/// The table's entry for a device named `device_name`, if any.
pub fn peak_for(device_name: &str) -> Option<&'static Peak> {
    PEAKS.iter().find(|p| p.matches.iter().any(|m| device_name.contains(m)))
}

/// The dense peak for `dtype` on a device named `device_name`; `None` for CPUs and parts not in [`PEAKS`].
pub fn peak_flops(device_name: &str, dtype: ComputeDtype) -> Option<f64> {
    peak_for(device_name).map(|p| match dtype {
        ComputeDtype::Bf16 => p.bf16,
        ComputeDtype::F32 => p.f32,
    })
}

/// The most resident memory this process has held (Linux `VmHWM`), in bytes; `None` where that is not known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The most GPU memory this process's tensors have held at once since [`reset_device_peak`] (the high-water mark
/// of the GPU's stream-ordered memory pool, where candle allocates: PyTorch's `max_memory_allocated`, less the
/// cuBLAS workspace, which cuBLAS allocates itself), in bytes. `None` on a CPU or where the driver does not say.
pub fn device_peak_bytes(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        use cudarc::driver::{result, sys};
        let dev = d.cuda_stream().context().cu_device();
        let mut high = 0u64;
        // SAFETY: `dev` is a device of an open context; the used-memory high watermark attribute is a u64.
        let got = unsafe {
            result::device::get_mem_pool(dev).and_then(|pool| {
                result::mem_pool::get_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut high as *mut u64).cast(),
                )
            })
        };
        return got.ok().map(|()| high);
    }
    let _ = device;
    None
}

/// Starts [`device_peak_bytes`] afresh from what is in use now (e.g. after a benchmark's warm-up steps).
pub fn reset_device_peak(device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        use cudarc::driver::{result, sys};
        let dev = d.cuda_stream().context().cu_device();
        let mut zero = 0u64;
        // SAFETY: as above; the driver accepts only 0 for this attribute, meaning "reset to the current use".
        let _ = unsafe {
            result::device::get_mem_pool(dev).and_then(|pool| {
                result::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast(),
                )
            })
        };
    }
    let _ = device;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_find_their_part() {
        assert_eq!(peak_flops("NVIDIA H200", ComputeDtype::Bf16), Some(989.4 * T));
        assert_eq!(
            peak_for("NVIDIA H100 80GB HBM3").map(|p| p.name),
            Some("H100 / H200 SXM")
        );
        assert_eq!(peak_for("NVIDIA H100 PCIe").map(|p| p.name), Some("H100 PCIe"));
        assert_eq!(peak_flops("NVIDIA A100-SXM4-80GB", ComputeDtype::F32), Some(19.5 * T));
        assert_eq!(peak_for("NVIDIA A10G").map(|p| p.name), Some("A10 / A10G"));
        assert_eq!(peak_flops("cpu", ComputeDtype::F32), None);
    }

    #[test]
    fn a_cpu_has_no_device_peak() {
        reset_device_peak(&candle_core::Device::Cpu);
        assert_eq!(device_peak_bytes(&candle_core::Device::Cpu), None);
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let bytes = peak_rss_bytes().unwrap();
            assert!(bytes > 1 << 20, "{bytes}");
        }
    }
}
