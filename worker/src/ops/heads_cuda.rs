//! The CUDA side of [`super::heads`]: launches of worker/kernels/heads.cu, whose PTX `worker/build.rs` compiles and
//! candle loads once per device. The input is f32 or bf16 and contiguous (any start offset: the kernel falls back to
//! single elements where a pointer is not 16-byte aligned); the output is a fresh contiguous tensor the kernel writes
//! whole. The launch shape mirrors heads.cu's `grid_x` / `grid_y`.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Shape, bail};
use cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

use super::heads::{Direction, dims, out_shape};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/heads.ptx"));
const MODULE: &str = "lockstep_heads";
const OP: &str = "attention heads (CUDA)";
/// heads.cu's THREADS, MAX_BLOCKS and MAX_GRID_Y.
const THREADS: usize = 256;
const MAX_BLOCKS: usize = 8192;
const MAX_GRID_Y: usize = 65535;

/// heads.cu's `grid_x` and `grid_y` for B batch elements of `units` packs (or elements) each: y over the batch, x
/// over a batch element, at most `MAX_BLOCKS` blocks in all unless one column of blocks is more.
fn grid(units: usize, b: usize) -> (u32, u32) {
    let y = b.clamp(1, MAX_GRID_Y);
    let x = units.div_ceil(THREADS).clamp(1, (MAX_BLOCKS / y).max(1));
    (x as u32, y as u32)
}

/// (B, T, nh, hd) of the input, within the kernel's 32-bit indices: B·T·C below 2^31, and not empty (ops::split_heads
/// and merge_heads take candle's copies for that).
fn checked_dims(dir: Direction, n_head: usize, input: &[usize]) -> candle_core::Result<[usize; 4]> {
    let d = dims(dir, n_head, input)?;
    let n: usize = d.iter().product();
    if n == 0 {
        bail!("{OP}: the input {input:?} is empty (ops::split_heads and merge_heads copy with candle for that)");
    }
    if n > i32::MAX as usize {
        bail!("{OP}: the input {input:?} has {n} elements, more than the kernel indexes (2^31 - 1)");
    }
    Ok(d)
}

/// The op's forward: the split or merge of a contiguous f32 or bf16 input, into a new contiguous tensor.
pub(super) fn forward(
    s: &CudaStorage,
    l: &Layout,
    n_head: usize,
    dir: Direction,
) -> candle_core::Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(
        x: CudaView<T>,
        dir: Direction,
        [b, t, nh, hd]: [usize; 4],
        dev: &CudaDevice,
        dtype: &str,
    ) -> candle_core::Result<CudaStorage> {
        let name = match dir {
            Direction::Split => format!("lockstep_heads_split_{dtype}"),
            Direction::Merge => format!("lockstep_heads_merge_{dtype}"),
        };
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?.into_cuda_function();
        let n = x.len();
        // SAFETY: the kernel writes every element of `out` (a permutation of the input's).
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        // The pack path's units when hd is whole packs; with a misaligned pointer the kernel moves elements with
        // this grid, its loops taking the extra turns.
        let vec = 16 / std::mem::size_of::<T>();
        let per_batch = t * nh * hd;
        let units = if hd % vec == 0 { per_batch / vec } else { per_batch };
        let (gx, gy) = grid(units, b);
        let config = LaunchConfig {
            grid_dim: (gx, gy, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b32, t32, nh32, hd32) = (b as i32, t as i32, nh as i32, hd as i32);
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&x).arg(&mut out).arg(&b32).arg(&t32).arg(&nh32).arg(&hd32);
        // SAFETY: the arguments match lockstep_heads_{split,merge}_* (heads.cu); the grid is its documented one.
        unsafe { builder.launch(config) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let d = checked_dims(dir, n_head, l.dims())?;
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{OP}: the input {:?} is not contiguous", l.dims())
    };
    let dev = s.device();
    let out = match &s.slice {
        CudaStorageSlice::F32(x) => run(x.slice(start..end), dir, d, dev, "f32")?,
        CudaStorageSlice::BF16(x) => run(x.slice(start..end), dir, d, dev, "bf16")?,
        _ => bail!(
            "{OP}: no kernel for a {:?} input {:?} (f32 and bf16 only)",
            s.dtype(),
            l.dims()
        ),
    };
    Ok((out, out_shape(dir, d)))
}

// Built only with the `cuda` feature, whose test binaries need the NVIDIA driver to start: these run on a GPU host
// (`cargo test --release --features cuda -p lockstep-worker --lib -- _cuda::`), not in gpu-check.sh. On every
// `cargo test` the emulator program launches the kernels with the kernel source's twins of these helpers.
#[cfg(test)]
mod tests {
    use super::*;

    /// As heads_emu.cpp checks heads.cu's: y within the hardware's bound, at most MAX_BLOCKS blocks (or one column),
    /// a thread per unit below that cap; GPT-2's bf16 split is a thread per pack.
    #[test]
    fn the_grid_covers_the_units_within_the_caps() {
        for b in [1, 3, 16, 65535, 65536, 1 << 20] {
            for units in [1, 255, 256, 257, 98304, 1 << 24] {
                let (x, y) = grid(units, b);
                let (x, y) = (x as usize, y as usize);
                assert!((1..=MAX_GRID_Y.min(b)).contains(&y), "B={b} units={units}");
                assert!(x * y <= MAX_BLOCKS || x == 1, "B={b} units={units}");
                assert!(
                    x * THREADS >= units || x == (MAX_BLOCKS / y).max(1),
                    "B={b} units={units}"
                );
            }
        }
        assert_eq!(grid(1024 * 96, 16), (384, 16));
    }

    #[test]
    fn the_kernels_bounds_are_checked_with_the_shapes_named() {
        assert!(checked_dims(Direction::Split, 12, &[16, 1024, 768]).is_ok());
        let err = checked_dims(Direction::Split, 1, &[1 << 16, 1 << 15, 1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("more than the kernel indexes") && err.contains("[65536, 32768, 1]"),
            "{err}"
        );
        let err = checked_dims(Direction::Merge, 2, &[0, 2, 3, 4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty"), "{err}");
    }
}
