//! With the `cuda` feature only: compiles the CUDA C kernels in `kernels/*.cu` to PTX with nvcc, into
//! `$OUT_DIR/<name>.ptx`, which `src/ops/attention_cuda.rs` embeds and the driver JIT-compiles at the first launch
//! (as candle's own kernels). The default CPU build does nothing here and needs no CUDA toolkit.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH (scripts/cuda/setup-cuda-build.sh sets the
//! first two); the GPU generation is `$CUDA_COMPUTE_CAP` (default 90, H100/H200), as for candle's kernels.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &str = "kernels";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The folder too: a new kernel file must rebuild the PTX (a listed file only reports its own changes).
    println!("cargo:rerun-if-changed={KERNELS}");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(message) = build_ptx() {
        eprintln!("error: building the CUDA kernels in worker/{KERNELS}: {message}");
        std::process::exit(1);
    }
}

fn build_ptx() -> Result<(), String> {
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let digits: String = cap.chars().take_while(char::is_ascii_digit).collect();
    let major_minor: u32 = digits.parse().map_err(|_| {
        format!("CUDA_COMPUTE_CAP={cap}: expected a compute capability such as 80, 90 or 90a (see docs/CUDA.md)")
    })?;
    // The Rust side picks the tensor-core kernels only where they were compiled in (sm_80+).
    println!("cargo:rustc-env=LOCKSTEP_CUDA_COMPUTE_CAP={major_minor}");

    let mut sources = Vec::new();
    let entries = std::fs::read_dir(KERNELS).map_err(|e| format!("reading the folder: {e}"))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("reading the folder: {e}"))?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => {
                println!("cargo:rerun-if-changed={}", path.display());
                sources.push(path);
            }
            Some("cuh") => println!("cargo:rerun-if-changed={}", path.display()),
            _ => {}
        }
    }
    sources.sort();

    let nvcc = nvcc();
    for source in &sources {
        let stem = source
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{}: not a UTF-8 file name", source.display()))?;
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                &format!("-arch=sm_{cap}"),
                "-O3",
                "-std=c++17",
                "-I",
                KERNELS,
                "-o",
            ])
            .arg(&ptx)
            .arg(source)
            .status()
            .map_err(|e| {
                format!(
                    "running {}: {e}; the `cuda` feature needs the CUDA toolkit's nvcc: set NVCC or CUDA_HOME, or \
                     run scripts/cuda/setup-cuda-build.sh and eval its exports (docs/CUDA.md)",
                    nvcc.display()
                )
            })?;
        if !status.success() {
            return Err(format!("{} {} failed ({status})", nvcc.display(), source.display()));
        }
    }
    Ok(())
}

fn nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let nvcc = Path::new(&home).join("bin").join("nvcc");
        if nvcc.exists() {
            return nvcc;
        }
    }
    PathBuf::from("nvcc")
}
