//! The CUDA attention kernels (`worker/kernels/attention.cu`) run on the CPU through the emulator in
//! `worker/kernels/emulate/`: the same source, with warps, shared memory, `cp.async`, `ldmatrix` and `mma.sync`
//! emulated, compared against a float64 reference for every kernel family, head size and dtype over tail-heavy
//! shapes. This checks the kernels' indexing, tiling, masking and pipelining where there is no GPU; the GPU host
//! runs them for real (`worker/tests/attention_gpu.rs`, `scripts/gpu-check.sh`). Needs a C++20 compiler (`$CXX`,
//! default `g++`); `.ci/run` installs one when it is missing.
use std::path::Path;
use std::process::Command;

#[test]
fn the_cuda_attention_kernels_agree_with_the_reference_under_emulation() {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("attention_emu");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-I"])
        .arg(&kernels)
        .arg(kernels.join("emulate/attention_emu.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?} ({e}): install g++ (Debian: g++) or set CXX"));
    assert!(
        built.status.success(),
        "{cxx} failed on the emulator:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe).arg("--quick").output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("all comparisons passed"),
        "the emulated kernels disagree with the reference:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
