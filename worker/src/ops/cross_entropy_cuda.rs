//! The CUDA side of [`super::cross_entropy`]: launches the kernels of worker/kernels/cross_entropy.cu on candle's
//! stream. f32 and bf16 logits are read as they are (no f32 copy of a bf16 `[N, 50k]` matrix); the loss, the row
//! log-sum-exps and all arithmetic are f32 (the row losses summed in f64).
//!
//! Nothing here reads the device: the upstream gradient goes to the backward kernel as a device pointer, and a
//! target ≥ V that is not IGNORE (which the CPU op refuses, having the targets on the host) makes the loss and that
//! row's gradient NaN instead of an error, so that the step is visibly non-finite (the trainer skips it).
//!
//! The launch shapes mirror cross_entropy.cu: one block of [`THREADS`] per row for the forward and the backward,
//! one block for the sum of the row losses.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Storage, Tensor, bail};
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));
const MODULE: &str = "lockstep_cross_entropy";
/// cross_entropy.cu's `CE_THREADS`.
const THREADS: u32 = 256;
const OP: &str = "cross-entropy (CUDA)";

fn kernel(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    Ok(dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function())
}

fn blocks(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn dtype_name(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("{OP}: no kernel for {other:?} logits (f32 and bf16 only)"),
    }
}

/// What the kernels need to know of logits `[N, V]` and targets `[N]`.
struct Shapes {
    rows: usize,
    vocab: usize,
    /// Element ranges of the two (contiguous) inputs in their buffers.
    logits: (usize, usize),
    targets: (usize, usize),
}

/// The shapes of logits and targets, checked against each other and the kernels' 32-bit row and column indices
/// (N is also the grid size).
fn shapes(logits: &Layout, targets: &Layout) -> candle_core::Result<Shapes> {
    let &[rows, vocab] = logits.dims() else {
        bail!("{OP}: logits must be [N, V], got {:?}", logits.dims())
    };
    if vocab == 0 {
        bail!("{OP}: logits {:?} have an empty vocabulary", logits.dims());
    }
    if targets.dims() != [rows] {
        bail!(
            "{OP}: logits {:?} do not match targets {:?}",
            logits.dims(),
            targets.dims()
        );
    }
    if rows > i32::MAX as usize || vocab > i32::MAX as usize {
        bail!(
            "{OP}: logits {:?} are too large for the kernels' 32-bit indices",
            logits.dims()
        );
    }
    let logits_range = logits
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: logits {:?} are not contiguous", logits.dims())))?;
    let targets_range = targets
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: targets {:?} are not contiguous", targets.dims())))?;
    Ok(Shapes {
        rows,
        vocab,
        logits: logits_range,
        targets: targets_range,
    })
}

/// `s[start..end]`, or an error naming `what` (cudarc's `slice` panics).
fn view<'a, T>(s: &'a CudaSlice<T>, (start, end): (usize, usize), what: &str) -> candle_core::Result<CudaView<'a, T>> {
    s.try_slice(start..end).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{OP}: {what} elements {start}..{end} lie outside its buffer of {}",
            s.len()
        ))
    })
}

/// Uninitialised device memory for `n` elements of `like`'s type.
///
/// # Safety
/// Every element must be written before it is read.
unsafe fn alloc_like<T: DeviceRepr>(
    _like: &CudaSlice<T>,
    dev: &CudaDevice,
    n: usize,
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: passed on to the caller.
    unsafe { dev.alloc::<T>(n) }
}

fn targets_slice(s: &CudaStorage) -> candle_core::Result<&CudaSlice<u32>> {
    match &s.slice {
        CudaStorageSlice::U32(t) => Ok(t),
        _ => bail!("{OP}: targets must be u32, got {:?}", s.dtype()),
    }
}

/// The summed loss (a scalar f32 storage) and the row log-sum-exps `[N]` (f32; 0 for ignored rows) of
/// logits `[N, V]` (f32 or bf16) against targets `[N]` (u32, IGNORE for rows that take no part).
pub(super) fn forward(
    logits: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, CudaSlice<f32>)> {
    let Shapes {
        rows,
        vocab,
        logits: logits_range,
        targets: targets_range,
    } = shapes(logits.1, targets.1)?;
    let dev = logits.0.device().clone();
    let stream = dev.cuda_stream();
    let sum = kernel(&dev, "lockstep_cross_entropy_sum_f32")?;
    // SAFETY: the sum kernel writes its one element.
    let mut loss = unsafe { dev.alloc::<f32>(1) }?;
    if rows == 0 {
        // The driver allocates no empty buffers: one unused lse; the sum of no rows is 0.
        let lse = dev.alloc_zeros::<f32>(1)?;
        let mut b = stream.launch_builder(&sum);
        let (none, n) = (lse.slice(..), 0i32);
        b.arg(&none).arg(&mut loss).arg(&n);
        // SAFETY: the argument list matches lockstep_cross_entropy_sum_f32 (cross_entropy.cu).
        unsafe { b.launch(blocks(1)) }.w()?;
        return Ok((CudaStorage::wrap_cuda_slice(loss, dev.clone()), lse));
    }
    let forward = kernel(
        &dev,
        &format!("lockstep_cross_entropy_fwd_{}", dtype_name(logits.0.dtype())?),
    )?;
    let t = view(targets_slice(targets.0)?, targets_range, "targets")?;
    // SAFETY: the forward kernel writes every row's lse and loss (its block per row).
    let (mut lse, mut row_loss) = unsafe { (dev.alloc::<f32>(rows)?, dev.alloc::<f32>(rows)?) };
    let (n, v) = (rows as i32, vocab as i32);
    macro_rules! launch_forward {
        ($s:expr) => {{
            let x = view($s, logits_range, "logits")?;
            let mut b = stream.launch_builder(&forward);
            b.arg(&x).arg(&t).arg(&mut lse).arg(&mut row_loss).arg(&v);
            // SAFETY: the argument list matches lockstep_cross_entropy_fwd_* (cross_entropy.cu).
            unsafe { b.launch(blocks(rows)) }.w()?;
        }};
    }
    match &logits.0.slice {
        CudaStorageSlice::F32(s) => launch_forward!(s),
        CudaStorageSlice::BF16(s) => launch_forward!(s),
        _ => bail!("{OP}: no kernel for {:?} logits (f32 and bf16 only)", logits.0.dtype()),
    }
    let mut b = stream.launch_builder(&sum);
    b.arg(&row_loss).arg(&mut loss).arg(&n);
    // SAFETY: the argument list matches lockstep_cross_entropy_sum_f32 (cross_entropy.cu).
    unsafe { b.launch(blocks(1)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(loss, dev.clone()), lse))
}

/// dlogits (the logits' dtype and shape) for the scalar upstream gradient `grad`, from the forward's row
/// log-sum-exps `lse` (recomputed by the forward kernel when absent). Reads nothing back to the host.
pub(super) fn backward(
    logits: &Tensor,
    targets: &Tensor,
    lse: Option<&CudaSlice<f32>>,
    grad: &Tensor,
) -> candle_core::Result<Tensor> {
    let logits = logits.contiguous()?;
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    // A scalar in every call candle makes; the sum keeps any other shape correct (on the device, no sync).
    let grad = match grad.elem_count() {
        1 => grad.to_dtype(DType::F32)?.contiguous()?,
        _ => grad.to_dtype(DType::F32)?.sum_all()?,
    };
    let (rows, vocab) = logits.dims2()?;
    if rows == 0 {
        return logits.zeros_like();
    }
    let (ls, ll) = logits.storage_and_layout();
    let (ts, tl) = targets.storage_and_layout();
    let (gs, gl) = grad.storage_and_layout();
    let (Storage::Cuda(ls), Storage::Cuda(ts), Storage::Cuda(gs)) = (&*ls, &*ts, &*gs) else {
        bail!("{OP}: backward: logits, targets and the upstream gradient must all be on the CUDA device")
    };
    let Shapes {
        logits: logits_range,
        targets: targets_range,
        ..
    } = shapes(ll, tl)?;
    let recomputed;
    let lse = match lse {
        Some(lse) if lse.len() == rows => lse,
        _ => {
            recomputed = forward((ls, ll), (ts, tl))?.1;
            &recomputed
        }
    };
    let g = view(
        gs.as_cuda_slice::<f32>()?,
        (gl.start_offset(), gl.start_offset() + 1),
        "upstream gradient",
    )?;
    let t = view(targets_slice(ts)?, targets_range, "targets")?;
    let dev = ls.device().clone();
    let stream = dev.cuda_stream();
    let backward = kernel(&dev, &format!("lockstep_cross_entropy_bwd_{}", dtype_name(ls.dtype())?))?;
    let v = vocab as i32;
    macro_rules! launch_backward {
        ($s:expr) => {{
            let x = view($s, logits_range, "logits")?;
            // SAFETY: the backward kernel writes every element of every row (zeros for ignored rows).
            let mut dx = unsafe { alloc_like($s, &dev, rows * vocab) }?;
            let mut b = stream.launch_builder(&backward);
            b.arg(&x).arg(&t).arg(lse).arg(&g).arg(&mut dx).arg(&v);
            // SAFETY: the argument list matches lockstep_cross_entropy_bwd_* (cross_entropy.cu).
            unsafe { b.launch(blocks(rows)) }.w()?;
            CudaStorage::wrap_cuda_slice(dx, dev.clone())
        }};
    }
    let dx = match &ls.slice {
        CudaStorageSlice::F32(s) => launch_backward!(s),
        CudaStorageSlice::BF16(s) => launch_backward!(s),
        _ => bail!(
            "{OP}: backward: no kernel for {:?} logits (f32 and bf16 only)",
            ls.dtype()
        ),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(dx),
        logits.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}
