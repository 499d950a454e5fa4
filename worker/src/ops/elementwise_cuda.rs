//! The CUDA kernels of the tanh GELU ([`super::gelu`]), the bias add ([`super::bias`]) and the two fused
//! ([`super::bias_gelu`]): launches of `worker/kernels/elementwise.cu`, whose PTX `worker/build.rs` compiles and
//! candle loads once per device. f32 and bf16, computed in f32, results in the input's dtype; inputs are contiguous
//! (any start offset: the kernels fall back to scalar accesses where a pointer is not 16-byte aligned).
//!
//! The launch shapes below mirror the constants and helpers in elementwise.cu (`elementwise_blocks`,
//! `bias_grad_chunk_rows`); the bias gradient's chunking depends on the shape only, which keeps it deterministic.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Layout, Storage, Tensor, bail};
use cudarc::driver::{CudaFunction, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

use super::rows_and_len;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
const MODULE: &str = "lockstep_elementwise";
const THREADS: usize = 256;
const MAX_BLOCKS: usize = 8192;
const GRAD_COLS: usize = 32;
const GRAD_ROW_STEP: usize = (THREADS / 32) * 8;
const GRAD_TARGET_BLOCKS: usize = 1024;
const GRAD_MIN_CHUNK_ROWS: usize = 256;

fn kernel(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    Ok(dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function())
}

fn config(grid: (usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// elementwise.cu's `elementwise_blocks`: one 16-byte pack per thread, at most `MAX_BLOCKS` (the kernels loop).
fn elementwise_grid<T>(n: usize) -> (usize, usize) {
    let per_block = THREADS * (16 / std::mem::size_of::<T>());
    (n.div_ceil(per_block).clamp(1, MAX_BLOCKS), 1)
}

/// elementwise.cu's `bias_grad_chunk_rows`: about `GRAD_TARGET_BLOCKS` blocks, chunks of at least
/// `GRAD_MIN_CHUNK_ROWS` rows, rounded up to a multiple of the kernel's row step.
fn chunk_rows(rows: usize, c: usize) -> usize {
    let chunks = GRAD_TARGET_BLOCKS
        .div_ceil(c.div_ceil(GRAD_COLS))
        .min(rows.div_ceil(GRAD_MIN_CHUNK_ROWS))
        .max(1);
    rows.div_ceil(chunks).div_ceil(GRAD_ROW_STEP) * GRAD_ROW_STEP
}

/// The element range of a contiguous layout, which the kernels' 32-bit indices must cover.
fn range(l: &Layout, op: &str, what: &str) -> candle_core::Result<(usize, usize)> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op} (CUDA): {what} {:?} is not contiguous", l.dims())
    };
    if end - start > i32::MAX as usize {
        bail!(
            "{op} (CUDA): {what} {:?} has more elements than the kernels index (2^31 - 1)",
            l.dims()
        );
    }
    Ok((start, end))
}

fn cuda_storage<'a>(s: &'a Storage, op: &str, what: &str) -> candle_core::Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("{op} (CUDA): {what} is not on a CUDA device"),
    }
}

fn tensor(s: CudaStorage, like: &Tensor) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), like.shape().clone(), BackpropOp::none(), false)
}

/// GELU of a contiguous f32 or bf16 x, in x's dtype.
pub(super) fn gelu_forward(x: &CudaStorage, l: &Layout) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        x: CudaView<T>,
        dev: &CudaDevice,
        dtype: &str,
    ) -> candle_core::Result<CudaStorage> {
        let n = x.len();
        // SAFETY: every element of `y` is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(n) }?;
        if n > 0 {
            let func = kernel(dev, &format!("lockstep_gelu_fwd_{dtype}"))?;
            let stream = dev.cuda_stream();
            let count = n as i32;
            let mut b = stream.launch_builder(&func);
            b.arg(&x).arg(&mut y).arg(&count);
            // SAFETY: the arguments match lockstep_gelu_fwd_* (elementwise.cu).
            unsafe { b.launch(config(elementwise_grid::<T>(n))) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let (start, end) = range(l, "gelu-tanh", "x")?;
    let dev = x.device();
    match &x.slice {
        CudaStorageSlice::F32(s) => run(s.slice(start..end), dev, "f32"),
        CudaStorageSlice::BF16(s) => run(s.slice(start..end), dev, "bf16"),
        _ => bail!("gelu-tanh (CUDA): x {:?} is {:?}, not f32 or bf16", l.dims(), x.dtype()),
    }
}

/// d/dx of Σ gelu(x)·dy: dy·gelu'(x), for x and dy of one shape and dtype (f32 or bf16), in that dtype.
pub(super) fn gelu_backward(x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    fn run<T: CudaDType + DeviceRepr>(
        x: CudaView<T>,
        dy: CudaView<T>,
        dev: &CudaDevice,
        dtype: &str,
    ) -> candle_core::Result<CudaStorage> {
        let n = x.len();
        // SAFETY: every element of `dx` is written by the kernel.
        let mut dx = unsafe { dev.alloc::<T>(n) }?;
        if n > 0 {
            let func = kernel(dev, &format!("lockstep_gelu_bwd_{dtype}"))?;
            let stream = dev.cuda_stream();
            let count = n as i32;
            let mut b = stream.launch_builder(&func);
            b.arg(&x).arg(&dy).arg(&mut dx).arg(&count);
            // SAFETY: the arguments match lockstep_gelu_bwd_* (elementwise.cu).
            unsafe { b.launch(config(elementwise_grid::<T>(n))) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    }
    const OP: &str = "gelu-tanh backward";
    if x.dims() != dy.dims() || x.dtype() != dy.dtype() {
        bail!(
            "{OP} (CUDA): x {:?} {:?} and its gradient {:?} {:?} differ",
            x.dims(),
            x.dtype(),
            dy.dims(),
            dy.dtype()
        );
    }
    let (x, dy) = (x.contiguous()?, dy.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let (xs, gs) = (cuda_storage(&xs, OP, "x")?, cuda_storage(&gs, OP, "the gradient")?);
    let ((xa, xb), (ga, gb)) = (range(xl, OP, "x")?, range(gl, OP, "the gradient")?);
    let dev = xs.device();
    let dx = match (&xs.slice, &gs.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(g)) => run(x.slice(xa..xb), g.slice(ga..gb), dev, "f32")?,
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(g)) => run(x.slice(xa..xb), g.slice(ga..gb), dev, "bf16")?,
        _ => bail!("{OP} (CUDA): x {:?} is {:?}, not f32 or bf16", xl.dims(), xs.dtype()),
    };
    Ok(tensor(dx, &x))
}

/// x `[.., C]` + bias `[C]` for contiguous x and bias of one dtype (f32 or bf16), in that dtype.
pub(super) fn bias_add_forward(
    x: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    with_bias_forward("bias-add", "bias_fwd", x, b)
}

/// gelu(x + bias) for x `[.., C]` and bias `[C]` (contiguous, one dtype, f32 or bf16), in that dtype, the sum never
/// stored: bitwise [`bias_add_forward`] then [`gelu_forward`].
pub(super) fn bias_gelu_forward(
    x: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    with_bias_forward("bias-gelu", "bias_gelu_fwd", x, b)
}

/// A forward kernel `lockstep_<stem>_<dtype>(x, b, y, n, c)` over x `[.., C]` and a bias `[C]`.
fn with_bias_forward(
    op: &str,
    stem: &str,
    (xs, xl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        x: CudaView<T>,
        b: CudaView<T>,
        dev: &CudaDevice,
        name: String,
    ) -> candle_core::Result<CudaStorage> {
        let (n, c) = (x.len(), b.len());
        // SAFETY: every element of `y` is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(n) }?;
        if n > 0 {
            let func = kernel(dev, &name)?;
            let stream = dev.cuda_stream();
            let (count, cols) = (n as i32, c as i32);
            let mut builder = stream.launch_builder(&func);
            builder.arg(&x).arg(&b).arg(&mut y).arg(&count).arg(&cols);
            // SAFETY: the arguments match lockstep_bias_fwd_* and lockstep_bias_gelu_fwd_* (elementwise.cu).
            unsafe { builder.launch(config(elementwise_grid::<T>(n))) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let (_rows, c) = rows_and_len(xl.dims(), op)?;
    if bl.dims() != [c] {
        bail!("{op} (CUDA): input {:?}, bias {:?} (needs [{c}])", xl.dims(), bl.dims());
    }
    let ((xa, xb), (ba, bb)) = (range(xl, op, "input")?, range(bl, op, "bias")?);
    let dev = xs.device();
    match (&xs.slice, &bs.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(b)) => {
            run(x.slice(xa..xb), b.slice(ba..bb), dev, format!("lockstep_{stem}_f32"))
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(b)) => {
            run(x.slice(xa..xb), b.slice(ba..bb), dev, format!("lockstep_{stem}_bf16"))
        }
        _ => bail!(
            "{op} (CUDA): input {:?} is {:?}, bias {:?}: needs one dtype, f32 or bf16",
            xl.dims(),
            xs.dtype(),
            bs.dtype()
        ),
    }
}

/// d/dx of Σ gelu(x + bias)·dy: dy·gelu'(x + bias), the sum recomputed as [`bias_gelu_forward`] made it, for x and
/// dy `[.., C]` and bias `[C]` of one dtype (f32 or bf16), in that dtype. The bias gradient is [`bias_grad`] of it.
pub(super) fn bias_gelu_backward(x: &Tensor, bias: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    fn run<T: CudaDType + DeviceRepr>(
        [x, b, dy]: [CudaView<T>; 3],
        dev: &CudaDevice,
        dtype: &str,
    ) -> candle_core::Result<CudaStorage> {
        let (n, c) = (x.len(), b.len());
        // SAFETY: every element of `dx` is written by the kernel.
        let mut dx = unsafe { dev.alloc::<T>(n) }?;
        if n > 0 {
            let func = kernel(dev, &format!("lockstep_bias_gelu_bwd_{dtype}"))?;
            let stream = dev.cuda_stream();
            let (count, cols) = (n as i32, c as i32);
            let mut builder = stream.launch_builder(&func);
            builder.arg(&x).arg(&b).arg(&dy).arg(&mut dx).arg(&count).arg(&cols);
            // SAFETY: the arguments match lockstep_bias_gelu_bwd_* (elementwise.cu).
            unsafe { builder.launch(config(elementwise_grid::<T>(n))) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    }
    const OP: &str = "bias-gelu backward";
    let (_rows, c) = rows_and_len(x.dims(), OP)?;
    let same_dtype = bias.dtype() == x.dtype() && dy.dtype() == x.dtype();
    if x.dims() != dy.dims() || bias.dims() != [c] || !same_dtype {
        bail!(
            "{OP} (CUDA): input {:?} {:?}, bias {:?} {:?}, gradient {:?} {:?}: needs a bias [{c}] and a gradient of \
             the input's shape, all of one dtype",
            x.dims(),
            x.dtype(),
            bias.dims(),
            bias.dtype(),
            dy.dims(),
            dy.dtype()
        );
    }
    let tensors = [x, bias, dy].map(|t| t.contiguous());
    let [xc, bc, gc] = tensors;
    let (xc, bc, gc) = (xc?, bc?, gc?);
    let guards = [&xc, &bc, &gc].map(|t| t.storage_and_layout());
    let mut parts = Vec::with_capacity(3);
    for ((storage, layout), what) in guards.iter().zip(["input", "bias", "the gradient"]) {
        parts.push((cuda_storage(storage, OP, what)?, range(layout, OP, what)?));
    }
    let dev = parts[0].0.device();
    macro_rules! views {
        ($variant:ident) => {{
            let mut views = Vec::with_capacity(3);
            for (s, (a, b)) in &parts {
                let CudaStorageSlice::$variant(x) = &s.slice else {
                    bail!("{OP} (CUDA): the operands' dtypes differ")
                };
                views.push(x.slice(*a..*b));
            }
            let views: [_; 3] = views
                .try_into()
                .map_err(|_| candle_core::Error::Msg(format!("{OP} (CUDA): operands miscounted")))?;
            views
        }};
    }
    let dx = match x.dtype() {
        candle_core::DType::F32 => run(views!(F32), dev, "f32")?,
        candle_core::DType::BF16 => run(views!(BF16), dev, "bf16")?,
        other => bail!("{OP} (CUDA): input {:?} is {other:?}, not f32 or bf16", x.dims()),
    };
    drop(guards);
    Ok(tensor(dx, x))
}

/// Σ over the rows of dy `[.., C]`, as a `[C]` tensor of `bias`'s dtype (which must be dy's), summed in f32 in a
/// fixed order.
pub(super) fn bias_grad(dy: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    fn run<T: CudaDType + DeviceRepr>(
        dy: CudaView<T>,
        (rows, c): (usize, usize),
        dev: &CudaDevice,
        dtype: &str,
    ) -> candle_core::Result<CudaStorage> {
        let chunk = chunk_rows(rows, c);
        let chunks = rows.div_ceil(chunk);
        let partial_func = kernel(dev, &format!("lockstep_bias_grad_partial_{dtype}"))?;
        let final_func = kernel(dev, &format!("lockstep_bias_grad_final_{dtype}"))?;
        // SAFETY: every (chunk, column) of `partial` and every element of `db` is written by the kernels.
        let (mut partial, mut db) = unsafe { (dev.alloc::<f32>(chunks * c)?, dev.alloc::<T>(c)?) };
        let stream = dev.cuda_stream();
        let (rows32, c32, chunk32, chunks32) = (rows as i32, c as i32, chunk as i32, chunks as i32);
        let mut b = stream.launch_builder(&partial_func);
        b.arg(&dy).arg(&mut partial).arg(&rows32).arg(&c32).arg(&chunk32);
        // SAFETY: the arguments match lockstep_bias_grad_partial_* (elementwise.cu).
        unsafe { b.launch(config((c.div_ceil(GRAD_COLS), chunks))) }.w()?;
        let mut b = stream.launch_builder(&final_func);
        b.arg(&partial).arg(&mut db).arg(&chunks32).arg(&c32);
        // SAFETY: the arguments match lockstep_bias_grad_final_* (elementwise.cu).
        unsafe { b.launch(config((c.div_ceil(THREADS), 1))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(db, dev.clone()))
    }
    const OP: &str = "bias-add backward";
    let (rows, c) = rows_and_len(dy.dims(), OP)?;
    if bias.dims() != [c] || bias.dtype() != dy.dtype() {
        bail!(
            "{OP} (CUDA): gradient {:?} {:?}, bias {:?} {:?}: needs a bias [{c}] of the gradient's dtype",
            dy.dims(),
            dy.dtype(),
            bias.dims(),
            bias.dtype()
        );
    }
    if rows == 0 {
        return bias.zeros_like();
    }
    let dy = dy.contiguous()?;
    let (gs, gl) = dy.storage_and_layout();
    let gs = cuda_storage(&gs, OP, "the gradient")?;
    let (a, b) = range(gl, OP, "the gradient")?;
    let dev = gs.device();
    let db = match &gs.slice {
        CudaStorageSlice::F32(g) => run(g.slice(a..b), (rows, c), dev, "f32")?,
        CudaStorageSlice::BF16(g) => run(g.slice(a..b), (rows, c), dev, "bf16")?,
        _ => bail!(
            "{OP} (CUDA): gradient {:?} is {:?}, not f32 or bf16",
            gl.dims(),
            gs.dtype()
        ),
    };
    Ok(tensor(db, bias))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunking of GPT-2's bias gradients: enough blocks for an H200's 132 SMs, whole row steps per chunk,
    /// and every row in exactly one chunk.
    #[test]
    fn bias_grad_chunks_fill_the_gpu_and_cover_every_row() {
        for (rows, c) in [
            (16384, 768),
            (16384, 2304),
            (16384, 3072),
            (1, 1),
            (129, 100),
            (70, 768),
        ] {
            let chunk = chunk_rows(rows, c);
            let chunks = rows.div_ceil(chunk);
            assert_eq!(chunk % GRAD_ROW_STEP, 0);
            assert!(chunks * chunk >= rows && (chunks - 1) * chunk < rows);
            assert!(chunks <= 65535);
            if rows == 16384 {
                assert!(chunks * c.div_ceil(GRAD_COLS) >= 4 * 132, "{rows}x{c}: {chunks} chunks");
            }
        }
    }
}
