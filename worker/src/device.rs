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
