//! The fused GPU kernels other than attention (worker/kernels/{layer_norm,elementwise,cross_entropy,adamw,embedding,
//! heads}.cu, through the public `ops` functions and the optimizer, which take them on a CUDA device) against the
//! composed candle versions on the same GPU: outputs and every input gradient, in f32 and bf16, over shapes that are
//! not multiples of the kernels' block sizes. Tolerances are stated beside each check. Only in a `cuda` build, which cannot start
//! without the NVIDIA driver, so never part of the default suite: scripts/gpu-check.sh runs it
//! (`cargo test --release --features cuda -p lockstep-worker --test kernels_gpu`). Without a GPU the same kernels are
//! checked under the emulator (worker/tests/kernels_emulated.rs).
#![cfg(feature = "cuda")]

mod adamw;
mod cross_entropy;
mod elementwise;
mod embedding;
mod heads;
mod layer_norm;

#[path = "../gpu_util/mod.rs"]
mod gpu_util;

pub use gpu_util::{assert_close, gpu, randn};
