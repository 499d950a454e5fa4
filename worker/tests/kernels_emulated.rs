//! The CUDA kernels (`worker/kernels/*.cu`) run on the CPU through the emulator in `worker/kernels/emulate/`: the
//! same sources, with warps, shared memory, `cp.async`, `ldmatrix` and `mma.sync` emulated (emu.h), each compared by
//! its `*_emu.cpp` program against a float64 reference (the embedding: bitwise against sequential f32 sums) over
//! awkward shapes, in f32 and bf16. This checks the kernels' indexing, tiling, masking, reductions and pipelining
//! where there is no GPU; the GPU host runs them for real (`worker/tests/kernels_gpu.rs`, `attention_gpu.rs`,
//! `scripts/gpu-check.sh`). Needs a C++20 compiler (`$CXX`, default `g++`); `.ci/run` installs one when it is
//! missing.
use std::path::Path;
use std::process::Command;

/// Compiles `emulate/<name>_emu.cpp` and runs it with `--quick`; it must print "all comparisons passed".
fn emulate(name: &str) {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}_emu"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-I"])
        .arg(&kernels)
        .arg(kernels.join(format!("emulate/{name}_emu.cpp")))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?} ({e}): install g++ (Debian: g++) or set CXX"));
    assert!(
        built.status.success(),
        "{cxx} failed on the {name} emulator:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe)
        .arg("--quick")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("all comparisons passed"),
        "the emulated {name} kernels disagree with the reference:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn the_attention_kernels_agree_with_the_reference_under_emulation() {
    emulate("attention");
}

#[test]
fn the_layer_norm_kernels_agree_with_the_reference_under_emulation() {
    emulate("layer_norm");
}

#[test]
fn the_gelu_and_bias_kernels_agree_with_the_reference_under_emulation() {
    emulate("elementwise");
}

#[test]
fn the_cross_entropy_kernels_agree_with_the_reference_under_emulation() {
    emulate("cross_entropy");
}

#[test]
fn the_adamw_and_norm_kernels_agree_with_the_reference_under_emulation() {
    emulate("adamw");
}

#[test]
fn the_embedding_kernels_agree_with_the_sequential_reference_under_emulation() {
    emulate("embedding");
}

#[test]
fn the_head_split_and_merge_kernels_are_the_exact_permutations_under_emulation() {
    emulate("heads");
}
