//! The CUDA kernels of the fused LayerNorm ([`super::layer_norm`]): launches of `worker/kernels/layer_norm.cu`,
//! whose PTX `worker/build.rs` compiles and candle loads once per device. x, y, dy and dx are contiguous `[.., C]`
//! in f32 or bf16; weight, bias and their gradients f32 `[C]`; everything is computed in f32.
//!
//! One warp per row. The forward saves each row's mean and 1/std ([`Stats`], f32) for the backward, which does not
//! recompute them. Rows of up to 32·N columns sit in registers, N the smallest width instantiated in layer_norm.cu
//! ([`FWD_REGS`], [`BWD_REGS`]); wider rows take the `any` kernels, which loop over global memory. dw and db are
//! per-block (or per-warp, for the `any` kernel) column sums in a scratch buffer, summed in a fixed order by a
//! second kernel: no atomics, and the rows per block depend on the shape only, so the gradients are bitwise
//! reproducible on any GPU.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Storage, Tensor, bail};
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

use super::rows_and_len;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/layer_norm.ptx"));
const MODULE: &str = "lockstep_layer_norm";
const OP: &str = "layer-norm (CUDA)";
/// Threads of the forward and backward kernels: 4 warps, one row each at a time.
const THREADS: u32 = 128;
const WARPS: usize = 4;
const REDUCE_THREADS: u32 = 256;
/// Register widths (columns per lane) instantiated in layer_norm.cu; the backward holds four values per column,
/// so it stops at C = 1024.
const FWD_REGS: [usize; 10] = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64];
const BWD_REGS: [usize; 8] = [1, 2, 4, 8, 12, 16, 24, 32];
/// The backward's rows per block: at least this many (fewer, larger partial sums to reduce) and enough that there
/// are at most about `BWD_MAX_BLOCKS` blocks (a bounded scratch buffer).
const BWD_MIN_ROWS_PER_BLOCK: usize = 32;
const BWD_MAX_BLOCKS: usize = 1024;

/// The forward's per-row statistics, kept by the op for its backward.
pub(super) struct Stats {
    mean: CudaSlice<f32>,
    rstd: CudaSlice<f32>,
}

/// `n<N>` for the smallest register width that holds a row of `c`, else `any`.
fn width(widths: &[usize], c: usize) -> String {
    match widths.iter().find(|&&n| 32 * n >= c) {
        Some(n) => format!("n{n}"),
        None => "any".into(),
    }
}

fn rows_per_block(rows: usize) -> usize {
    BWD_MIN_ROWS_PER_BLOCK.max(rows.div_ceil(BWD_MAX_BLOCKS).div_ceil(WARPS) * WARPS)
}

fn dtype_name(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("{OP}: no kernel for {other:?} (f32 and bf16 only)"),
    }
}

fn kernel(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    Ok(dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function())
}

fn config(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows and C of x, which the kernels' 32-bit indices must cover (2C included: the scratch rows).
fn rows_and_c(dims: &[usize]) -> candle_core::Result<(usize, usize)> {
    let (rows, c) = rows_and_len(dims, OP)?;
    if rows == 0 {
        bail!("{OP}: input {dims:?} has no rows");
    }
    if rows > i32::MAX as usize || 2 * c > i32::MAX as usize {
        bail!("{OP}: input {dims:?} is too large for the kernels (rows and 2·C must fit 32-bit ints)");
    }
    Ok((rows, c))
}

fn range(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: {what} {:?} is not contiguous", l.dims())))
}

/// A contiguous f32 `[c]` parameter (weight or bias) as a view.
fn param<'a>(s: &'a CudaStorage, l: &Layout, c: usize, what: &str) -> candle_core::Result<CudaView<'a, f32>> {
    let CudaStorageSlice::F32(slice) = &s.slice else {
        bail!("{OP}: {what} is {:?}, the kernels take f32", s.dtype())
    };
    if l.dims() != [c] {
        bail!("{OP}: {what} {:?} does not match C = {c}", l.dims());
    }
    let (start, end) = range(l, what)?;
    Ok(slice.slice(start..end))
}

fn cuda_storage<'a>(s: &'a Storage, what: &str) -> candle_core::Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("{OP}: {what} is not on a CUDA device"),
    }
}

/// y (x's dtype and shape) of a contiguous x `[.., C]`, and the statistics for the backward.
pub(super) fn forward(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    eps: f32,
) -> candle_core::Result<(CudaStorage, Stats)> {
    let (rows, c) = rows_and_c(x.1.dims())?;
    let (start, end) = range(x.1, "input")?;
    let (wv, bv) = (param(w.0, w.1, c, "weight")?, param(b.0, b.1, c, "bias")?);
    let dev = x.0.device().clone();
    let name = format!(
        "lockstep_layer_norm_fwd_{}_{}",
        width(&FWD_REGS, c),
        dtype_name(x.0.dtype())?
    );
    let func = kernel(&dev, &name)?;
    // SAFETY: the kernel writes one mean and one 1/std per row.
    let (mut mean, mut rstd) = unsafe { (dev.alloc::<f32>(rows)?, dev.alloc::<f32>(rows)?) };
    let launch = Launch {
        dev: &dev,
        func: &func,
        cfg: config(rows.div_ceil(WARPS), THREADS),
        rows: rows as i32,
        c: c as i32,
    };
    let y = match &x.0.slice {
        CudaStorageSlice::F32(s) => launch.forward(s.slice(start..end), (&wv, &bv), (&mut mean, &mut rstd), eps)?,
        CudaStorageSlice::BF16(s) => launch.forward(s.slice(start..end), (&wv, &bv), (&mut mean, &mut rstd), eps)?,
        _ => bail!("{OP}: no kernel for {:?} (f32 and bf16 only)", x.0.dtype()),
    };
    Ok((y, Stats { mean, rstd }))
}

/// One kernel's launch over the rows of x.
struct Launch<'a> {
    dev: &'a CudaDevice,
    func: &'a CudaFunction,
    cfg: LaunchConfig,
    rows: i32,
    c: i32,
}

impl Launch<'_> {
    fn forward<T: CudaDType + DeviceRepr>(
        &self,
        x: CudaView<'_, T>,
        (w, b): (&CudaView<'_, f32>, &CudaView<'_, f32>),
        (mean, rstd): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        eps: f32,
    ) -> candle_core::Result<CudaStorage> {
        // SAFETY: every element of `y` is written by the kernel.
        let mut y = unsafe { self.dev.alloc::<T>(x.len()) }?;
        let stream = self.dev.cuda_stream();
        let mut builder = stream.launch_builder(self.func);
        builder.arg(&x).arg(w).arg(b).arg(&mut y).arg(mean).arg(rstd);
        builder.arg(&self.rows).arg(&self.c).arg(&eps);
        // SAFETY: the argument list matches the kernel's signature (layer_norm.cu, LOCKSTEP_LN_FWD).
        unsafe { builder.launch(self.cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, self.dev.clone()))
    }

    /// dx, with the column sums of dy·x̂ and dy into `partial`.
    fn backward<T: CudaDType + DeviceRepr>(
        &self,
        (x, dy): (CudaView<'_, T>, CudaView<'_, T>),
        w: &CudaView<'_, f32>,
        stats: &Stats,
        partial: &mut CudaSlice<f32>,
        rows_per_block: i32,
    ) -> candle_core::Result<CudaStorage> {
        // SAFETY: every element of `dx` is written by the kernel.
        let mut dx = unsafe { self.dev.alloc::<T>(x.len()) }?;
        let stream = self.dev.cuda_stream();
        let mut builder = stream.launch_builder(self.func);
        builder.arg(&x).arg(&dy).arg(w).arg(&stats.mean).arg(&stats.rstd);
        builder
            .arg(&mut dx)
            .arg(partial)
            .arg(&self.rows)
            .arg(&self.c)
            .arg(&rows_per_block);
        // SAFETY: the argument list matches the kernel's signature (layer_norm.cu, LOCKSTEP_LN_BWD).
        unsafe { builder.launch(self.cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, self.dev.clone()))
    }
}

/// dx (x's dtype and shape), dw and db (f32, weight's shape) for the upstream gradient `dy` (converted to x's dtype
/// if it is not), from the forward's statistics. Everything stays on the device: no value is read back.
pub(super) fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    stats: &Stats,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let dy = dy.to_dtype(x.dtype())?.contiguous()?;
    if dy.dims() != x.dims() {
        bail!(
            "{OP}: backward: gradient {:?} does not match input {:?}",
            dy.dims(),
            x.dims()
        );
    }
    let (rows, c) = rows_and_c(x.dims())?;
    if stats.mean.len() != rows || stats.rstd.len() != rows {
        bail!(
            "{OP}: backward: {} saved statistics for input {:?} ({rows} rows)",
            stats.mean.len(),
            x.dims()
        );
    }
    let (xs, xl) = x.storage_and_layout();
    let (dys, dyl) = dy.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (xs, dys, ws) = (
        cuda_storage(&xs, "input")?,
        cuda_storage(&dys, "gradient")?,
        cuda_storage(&ws, "weight")?,
    );
    let (x_range, dy_range) = (range(xl, "input")?, range(dyl, "gradient")?);
    let wv = param(ws, wl, c, "weight")?;
    let dev = xs.device().clone();
    let dtype = dtype_name(xs.dtype())?;
    let regs = width(&BWD_REGS, c);
    let func = kernel(&dev, &format!("lockstep_layer_norm_bwd_{regs}_{dtype}"))?;
    let reduce = kernel(&dev, "lockstep_layer_norm_bwd_reduce")?;

    let rows_per_block = rows_per_block(rows);
    let blocks = rows.div_ceil(rows_per_block);
    // The register kernels sum a block's warps into one partial row; the loop kernel keeps one per warp.
    let partial_rows = if regs == "any" { blocks * WARPS } else { blocks };
    // SAFETY: every partial row is written whole by the backward kernel (the loop kernel zeroes its own first).
    let mut partial = unsafe { dev.alloc::<f32>(partial_rows * 2 * c) }?;
    let launch = Launch {
        dev: &dev,
        func: &func,
        cfg: config(blocks, THREADS),
        rows: rows as i32,
        c: c as i32,
    };
    let rpb = rows_per_block as i32;
    let dx = match (&xs.slice, &dys.slice) {
        (CudaStorageSlice::F32(xs), CudaStorageSlice::F32(dys)) => {
            let views = (xs.slice(x_range.0..x_range.1), dys.slice(dy_range.0..dy_range.1));
            launch.backward(views, &wv, stats, &mut partial, rpb)?
        }
        (CudaStorageSlice::BF16(xs), CudaStorageSlice::BF16(dys)) => {
            let views = (xs.slice(x_range.0..x_range.1), dys.slice(dy_range.0..dy_range.1));
            launch.backward(views, &wv, stats, &mut partial, rpb)?
        }
        _ => bail!(
            "{OP}: backward: input {:?} and gradient {:?} must be one dtype, f32 or bf16",
            xs.dtype(),
            dys.dtype()
        ),
    };

    // SAFETY: the reduction writes every column of dw and db.
    let (mut dw, mut db) = unsafe { (dev.alloc::<f32>(c)?, dev.alloc::<f32>(c)?) };
    let (p, c_i) = (partial_rows as i32, c as i32);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&reduce);
    builder.arg(&partial).arg(&mut dw).arg(&mut db).arg(&p).arg(&c_i);
    // SAFETY: the argument list matches lockstep_layer_norm_bwd_reduce's signature (layer_norm.cu).
    unsafe { builder.launch(config((2 * c).div_ceil(32), REDUCE_THREADS)) }.w()?;

    let tensor = |s: CudaStorage, shape: &Shape| {
        Tensor::from_storage(Storage::Cuda(s), shape.clone(), BackpropOp::none(), false)
    };
    let dw = tensor(CudaStorage::wrap_cuda_slice(dw, dev.clone()), w.shape());
    let db = tensor(CudaStorage::wrap_cuda_slice(db, dev.clone()), w.shape());
    Ok((tensor(dx, x.shape()), dw, db))
}
