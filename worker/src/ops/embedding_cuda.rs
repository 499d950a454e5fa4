//! The CUDA side of [`super::embedding`]: launches of worker/kernels/embedding.cu, whose PTX `worker/build.rs`
//! compiles and candle loads once per device. The weight `[V, C]` is f32 or bf16, the ids `[N]` u32, both
//! contiguous (any start offset: the kernels fall back to scalar accesses where a pointer is not 16-byte aligned).
//!
//! Forward: a warp per output row copies the weight's row. Backward: a stable counting sort of the positions by id
//! (rank, count, offsets, place: integer kernels, no atomics) and then a block per pair of vocabulary rows summing
//! their positions' gradient rows in increasing position order, in f32. Every sum has a fixed order and the launch
//! shapes depend on N, V and C only, so the gradient is bitwise reproducible on any GPU, and nothing is read back to
//! the host. An id ≥ V makes its forward row NaN (refusing it would need that read) and is left out of the backward.
//!
//! The launch shapes below mirror the constants and helpers in embedding.cu (`rank_slice_len`).
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Layout, Shape, Storage, Tensor, bail};
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/embedding.ptx"));
const MODULE: &str = "lockstep_embedding";
const OP: &str = "embedding (CUDA)";
/// embedding.cu's FWD_THREADS and FWD_ROWS: a warp per output row.
const FWD_THREADS: u32 = 256;
const FWD_ROWS: usize = 8;
/// embedding.cu's RANK_THREADS, RANK_TILE and RANK_MAX_SLICES.
const RANK_THREADS: u32 = 256;
const RANK_TILE: usize = 1024;
const RANK_MAX_SLICES: usize = 32;
/// embedding.cu's POS_THREADS (count and place) and SCAN_THREADS (offsets, one block).
const POS_THREADS: u32 = 256;
const SCAN_THREADS: u32 = 256;
/// embedding.cu's SUM_THREADS and SUM_ROWS: two vocabulary rows per block.
const SUM_THREADS: u32 = 256;
const SUM_ROWS: usize = 2;
/// The most positions: the kernels index positions with 32-bit ints, with room for a block's threads past N.
const MAX_POSITIONS: usize = 1 << 30;

fn kernel(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    Ok(dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function())
}

fn config(grid: (usize, usize), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// embedding.cu's `rank_slice_len`: positions per slice of the rank kernel, whole tiles, at most
/// `RANK_MAX_SLICES` slices.
fn slice_len(n: usize) -> usize {
    let tiles = n.div_ceil(RANK_TILE);
    tiles.div_ceil(tiles.min(RANK_MAX_SLICES)) * RANK_TILE
}

/// (V, C, N) of a weight `[V, C]` and ids `[N]`, none empty and each within the kernels' 32-bit indices.
fn dims(weight: &[usize], ids: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    let (v, c, n) = super::embedding::shapes(weight, ids)?;
    if v == 0 || c == 0 || n == 0 {
        bail!("{OP}: weight {weight:?}, ids {ids:?}: empty (ops::embedding takes index_select for these)");
    }
    if v > i32::MAX as usize || c > i32::MAX as usize || n > MAX_POSITIONS {
        bail!("{OP}: weight {weight:?}, ids {ids:?}: too large for the kernels (V and C below 2^31, N at most 2^30)");
    }
    Ok((v, c, n))
}

fn range(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: the {what} {:?} is not contiguous", l.dims())))
}

fn ids_view<'a>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<CudaView<'a, u32>> {
    let CudaStorageSlice::U32(ids) = &s.slice else {
        bail!("{OP}: the ids must be u32, got {:?}", s.dtype())
    };
    let (start, end) = range(l, "ids")?;
    Ok(ids.slice(start..end))
}

fn cuda_storage<'a>(s: &'a Storage, what: &str) -> candle_core::Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("{OP}: the {what} is not on a CUDA device"),
    }
}

/// out `[N, C]` (the weight's dtype): the weight's rows named by the ids, NaN rows for ids ≥ V.
pub(super) fn forward(
    (ws, wl): (&CudaStorage, &Layout),
    (is, il): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(
        weight: CudaView<T>,
        ids: &CudaView<u32>,
        (v, c, n): (usize, usize, usize),
        dev: &CudaDevice,
        dtype: &str,
    ) -> candle_core::Result<CudaStorage> {
        let func = kernel(dev, &format!("lockstep_embedding_fwd_{dtype}"))?;
        // SAFETY: the kernel writes every row of `out` (the weight's row, or NaN).
        let mut out = unsafe { dev.alloc::<T>(n * c) }?;
        let stream = dev.cuda_stream();
        let (n32, v32, c32) = (n as i32, v as i32, c as i32);
        let mut b = stream.launch_builder(&func);
        b.arg(&weight).arg(ids).arg(&mut out).arg(&n32).arg(&v32).arg(&c32);
        // SAFETY: the arguments match lockstep_embedding_fwd_* (embedding.cu).
        unsafe { b.launch(config((n.div_ceil(FWD_ROWS), 1), FWD_THREADS)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let shape = dims(wl.dims(), il.dims())?;
    let (v, c, n) = shape;
    let ids = ids_view(is, il)?;
    let (w0, w1) = range(wl, "weight")?;
    let dev = ws.device();
    let out = match &ws.slice {
        CudaStorageSlice::F32(w) => run(w.slice(w0..w1), &ids, shape, dev, "f32")?,
        CudaStorageSlice::BF16(w) => run(w.slice(w0..w1), &ids, shape, dev, "bf16")?,
        _ => bail!(
            "{OP}: no kernel for a {:?} weight [{v}, {c}] (f32 and bf16 only)",
            ws.dtype()
        ),
    };
    Ok((out, Shape::from((n, c))))
}

/// The positions sorted by id: for each id v < V, its count and the start of its positions (increasing) in order.
struct Sorted {
    cnt: CudaSlice<i32>,
    start: CudaSlice<i32>,
    order: CudaSlice<i32>,
}

/// Kernels 1 to 4 of embedding.cu: a stable counting sort of the N positions by id, on the device.
fn sort(ids: &CudaView<u32>, (v, n): (usize, usize), dev: &CudaDevice) -> candle_core::Result<Sorted> {
    let len = slice_len(n);
    let slices = n.div_ceil(len);
    let stream = dev.cuda_stream();
    let (n32, v32, len32, slices32) = (n as i32, v as i32, len as i32, slices as i32);
    // SAFETY: rank writes both partial counts of every (slice, position); count writes every rank; offsets every
    // start. `order` is written at the in-range positions' slots only, and the sum kernel reads no others.
    let (mut partial, mut rank, mut start, mut order) = unsafe {
        (
            dev.alloc::<i32>(2 * slices * n)?,
            dev.alloc::<i32>(n)?,
            dev.alloc::<i32>(v)?,
            dev.alloc::<i32>(n)?,
        )
    };
    // Only the first occurrence of each id writes its count: the others stay 0.
    let mut cnt = dev.alloc_zeros::<i32>(v)?;

    let func = kernel(dev, "lockstep_embedding_rank")?;
    let mut b = stream.launch_builder(&func);
    b.arg(ids).arg(&mut partial).arg(&n32).arg(&len32);
    // SAFETY: the arguments match lockstep_embedding_rank (embedding.cu); the grid is its documented one.
    unsafe { b.launch(config((n.div_ceil(RANK_THREADS as usize), slices), RANK_THREADS)) }.w()?;

    let positions = config((n.div_ceil(POS_THREADS as usize), 1), POS_THREADS);
    let func = kernel(dev, "lockstep_embedding_count")?;
    let mut b = stream.launch_builder(&func);
    b.arg(ids).arg(&partial).arg(&mut rank).arg(&mut cnt);
    b.arg(&n32).arg(&v32).arg(&slices32);
    // SAFETY: the arguments match lockstep_embedding_count (embedding.cu).
    unsafe { b.launch(positions) }.w()?;

    let func = kernel(dev, "lockstep_embedding_offsets")?;
    let mut b = stream.launch_builder(&func);
    b.arg(&cnt).arg(&mut start).arg(&v32);
    // SAFETY: the arguments match lockstep_embedding_offsets (embedding.cu), one block.
    unsafe { b.launch(config((1, 1), SCAN_THREADS)) }.w()?;

    let func = kernel(dev, "lockstep_embedding_place")?;
    let mut b = stream.launch_builder(&func);
    b.arg(ids).arg(&rank).arg(&start).arg(&mut order).arg(&n32).arg(&v32);
    // SAFETY: the arguments match lockstep_embedding_place (embedding.cu).
    unsafe { b.launch(positions) }.w()?;
    Ok(Sorted { cnt, start, order })
}

/// d weight (the weight's shape and dtype) for the upstream gradient `grad` `[N, C]` (converted to the weight's
/// dtype if it is not): row v the sum over the positions with id v, in increasing position order, in f32. Reads
/// nothing back to the host.
pub(super) fn backward(weight: &Tensor, ids: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    fn run<T: CudaDType + DeviceRepr>(
        grad: CudaView<T>,
        sorted: &Sorted,
        (v, c): (usize, usize),
        dev: &CudaDevice,
        dtype: &str,
    ) -> candle_core::Result<CudaStorage> {
        let func = kernel(dev, &format!("lockstep_embedding_sum_{dtype}"))?;
        // SAFETY: the sum kernel writes every row of dw (zeros for ids that do not occur).
        let mut dw = unsafe { dev.alloc::<T>(v * c) }?;
        let stream = dev.cuda_stream();
        let (v32, c32) = (v as i32, c as i32);
        let mut b = stream.launch_builder(&func);
        b.arg(&grad).arg(&sorted.cnt).arg(&sorted.start).arg(&sorted.order);
        b.arg(&mut dw).arg(&v32).arg(&c32);
        // SAFETY: the arguments match lockstep_embedding_sum_* (embedding.cu).
        unsafe { b.launch(config((v.div_ceil(SUM_ROWS), 1), SUM_THREADS)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
    }
    // The gradient's shape was checked by the op's `bwd`.
    let (v, c, n) = dims(weight.dims(), ids.dims())?;
    let grad = grad.to_dtype(weight.dtype())?.contiguous()?;
    let ids = ids.contiguous()?;
    let (is, il) = ids.storage_and_layout();
    let (gs, gl) = grad.storage_and_layout();
    let (is, gs) = (cuda_storage(&is, "ids")?, cuda_storage(&gs, "gradient")?);
    let idv = ids_view(is, il)?;
    let (g0, g1) = range(gl, "gradient")?;
    let dev = gs.device();
    let sorted = sort(&idv, (v, n), dev)?;
    let dw = match &gs.slice {
        CudaStorageSlice::F32(g) => run(g.slice(g0..g1), &sorted, (v, c), dev, "f32")?,
        CudaStorageSlice::BF16(g) => run(g.slice(g0..g1), &sorted, (v, c), dev, "bf16")?,
        _ => bail!(
            "{OP}: backward: no kernel for a {:?} weight (f32 and bf16 only)",
            weight.dtype()
        ),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(dw),
        weight.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

// Built only with the `cuda` feature, whose test binaries need the NVIDIA driver to start: these run on a GPU host
// (`cargo test --release --features cuda -p lockstep-worker --lib -- _cuda::`), not in gpu-check.sh. On every
// `cargo test` the emulator program launches the kernels with the kernel source's twins of these helpers.
#[cfg(test)]
mod tests {
    use super::*;

    /// The rank kernel's slicing (as embedding_emu.cpp checks embedding.cu's): whole tiles, at most
    /// `RANK_MAX_SLICES` slices, every position in exactly one; GPT-2's micro-batch is 16 slices of one tile.
    #[test]
    fn rank_slices_are_whole_tiles_and_cover_every_position() {
        for n in [1, 2, 1023, 1024, 1025, 16384, 32768, 32769, 100_000, MAX_POSITIONS] {
            let len = slice_len(n);
            let slices = n.div_ceil(len);
            assert_eq!(len % RANK_TILE, 0, "{n}");
            assert!(
                slices <= RANK_MAX_SLICES && slices * len >= n && (slices - 1) * len < n,
                "{n}"
            );
        }
        assert_eq!(
            (slice_len(16384), 16384usize.div_ceil(slice_len(16384))),
            (RANK_TILE, 16)
        );
    }

    #[test]
    fn the_kernels_bounds_are_checked_with_the_shapes_named() {
        assert!(dims(&[50304, 768], &[16384]).is_ok());
        let err = dims(&[4, 3], &[MAX_POSITIONS + 1]).unwrap_err().to_string();
        assert!(err.contains("too large") && err.contains("[4, 3]"), "{err}");
        let err = dims(&[0, 3], &[5]).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }
}
