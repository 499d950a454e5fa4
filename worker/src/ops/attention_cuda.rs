//! The CUDA kernels of the fused causal attention ([`super::attention`]): launches of `worker/kernels/attention.cu`,
//! whose PTX `worker/build.rs` compiles and candle loads once per device. Inputs are contiguous `[B, H, T, D]`.
//!
//! bf16 runs on the tensor cores (mma.sync, sm_80+), f32 on plain FMAs (the SIMT kernels), both accumulating in f32
//! with the row log-sum-exp in f32. `LOCKSTEP_ATTENTION_KERNELS=simt` sends bf16 to the SIMT kernels too: a
//! fallback, and a second implementation to compare against (scripts/gpu-check.sh tests both).
//!
//! The launch shapes and shared-memory sizes below mirror the constants in attention.cu; a kernel given less shared
//! memory than it carves up stops with a launch error instead of writing past it.
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Storage, Tensor, bail};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "lockstep_attention";
const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];
const THREADS: u32 = 128;
/// Rows a block owns: queries (forward, dQ) or keys (dK/dV).
const MMA_ROWS: usize = 64;
const SIMT_ROWS: usize = 32;
/// Shared memory a kernel may use without opting in.
const DEFAULT_SMEM: u32 = 48 * 1024;

/// Whether the kernels cover this head size and dtype (else the composed path is used).
pub(super) fn supports(head_dim: usize, dtype: DType) -> bool {
    HEAD_DIMS.contains(&head_dim) && matches!(dtype, DType::F32 | DType::BF16)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    TensorCore,
    Simt,
}

fn family(dtype: DType) -> candle_core::Result<Family> {
    static FORCE_SIMT: OnceLock<Result<bool, String>> = OnceLock::new();
    let force_simt = FORCE_SIMT.get_or_init(|| match std::env::var("LOCKSTEP_ATTENTION_KERNELS") {
        Err(_) => Ok(false),
        Ok(v) if v.is_empty() || v == "mma" => Ok(false),
        Ok(v) if v == "simt" => Ok(true),
        Ok(v) => Err(format!(
            "LOCKSTEP_ATTENTION_KERNELS={v}: expected `mma` (the default: tensor cores for bf16) or `simt`"
        )),
    });
    let force_simt = force_simt.clone().map_err(candle_core::Error::Msg)?;
    // The tensor-core kernels are empty in PTX built for GPUs before sm_80.
    let tensor_cores = env!("LOCKSTEP_CUDA_COMPUTE_CAP")
        .parse::<u32>()
        .is_ok_and(|cap| cap >= 80);
    Ok(if dtype == DType::BF16 && tensor_cores && !force_simt {
        Family::TensorCore
    } else {
        Family::Simt
    })
}

/// `[B, H, T, D]` as (B·H, T, D).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Dims {
    heads: usize,
    t: usize,
    d: usize,
}

impl Dims {
    fn of(dims: &[usize], what: &str) -> candle_core::Result<Self> {
        let &[b, h, t, d] = dims else {
            bail!("causal attention (CUDA): {what} must be [B, H, T, D], got {dims:?}")
        };
        let dims = Self { heads: b * h, t, d };
        if dims.heads == 0 || t == 0 {
            bail!("causal attention (CUDA): {what} {:?} is empty", [b, h, t, d]);
        }
        if !HEAD_DIMS.contains(&d) {
            bail!("causal attention (CUDA): head size {d} has no kernel (supported: {HEAD_DIMS:?})");
        }
        // The kernels index rows with 32-bit ints and the grid's y dimension counts row tiles (at most 65535).
        if dims.heads * t > i32::MAX as usize || t.div_ceil(SIMT_ROWS) > 65535 {
            bail!(
                "causal attention (CUDA): {what} {:?} is too large for the kernels",
                [b, h, t, d]
            );
        }
        Ok(dims)
    }

    fn rows(&self) -> usize {
        self.heads * self.t
    }

    fn elems(&self) -> usize {
        self.rows() * self.d
    }
}

/// The dims and element range of a contiguous input.
fn contiguous(l: &Layout, what: &str) -> candle_core::Result<(Dims, (usize, usize))> {
    let dims = Dims::of(l.dims(), what)?;
    let range = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("causal attention (CUDA): {what} is not contiguous")))?;
    Ok((dims, range))
}

/// An input's elements: a view into its storage, or a copy where the view would not start 16-byte aligned (the
/// tensor-core kernels copy rows with 16-byte cp.async; a narrowed tensor can start anywhere).
enum Input<'a, T> {
    View(CudaView<'a, T>),
    Copy(CudaSlice<T>),
}

impl<'a, T: DeviceRepr> Input<'a, T> {
    fn new(s: &'a CudaSlice<T>, (start, end): (usize, usize), dev: &CudaDevice) -> candle_core::Result<Self> {
        let view = s.slice(start..end);
        if (start * std::mem::size_of::<T>()).is_multiple_of(16) {
            Ok(Self::View(view))
        } else {
            Ok(Self::Copy(dev.cuda_stream().clone_dtod(&view).w()?))
        }
    }

    fn view(&self) -> CudaView<'_, T> {
        match self {
            Self::View(v) => v.slice(..),
            Self::Copy(c) => c.slice(..),
        }
    }
}

fn smem_stride(d: usize) -> usize {
    d + 8
}

/// attention.cu's `bwd_tile<D>()`.
fn bwd_tile(d: usize) -> usize {
    if d <= 64 { 64 } else { 32 }
}

/// Dynamic shared memory of the tensor-core kernels (attention.cu's `*_mma_smem<D>()`).
fn fwd_mma_smem(d: usize) -> u32 {
    ((MMA_ROWS + 4 * MMA_ROWS) * smem_stride(d) * 2) as u32
}

fn dq_mma_smem(d: usize) -> u32 {
    ((2 * MMA_ROWS + 4 * bwd_tile(d)) * smem_stride(d) * 2) as u32
}

fn dkdv_mma_smem(d: usize) -> u32 {
    dq_mma_smem(d) + (4 * bwd_tile(d) * 4) as u32
}

/// A kernel of the module, allowed `smem` bytes of dynamic shared memory; launched on candle's stream.
fn kernel(dev: &CudaDevice, name: &str, smem: u32) -> candle_core::Result<CudaFunction> {
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function();
    if smem > DEFAULT_SMEM {
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    Ok(func)
}

/// One block per (head, tile of `rows` rows), 128 threads.
fn grid(dims: Dims, rows: usize, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (dims.heads as u32, dims.t.div_ceil(rows) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The kernel family's name for `kernel` and the launch shape.
fn entry(family: Family, kernel: &str, dtype: &str, dims: Dims, mma_smem: u32) -> (String, LaunchConfig) {
    match family {
        Family::TensorCore => (
            format!("lockstep_attn_{kernel}_mma_{}", dims.d),
            grid(dims, MMA_ROWS, mma_smem),
        ),
        Family::Simt => (
            format!("lockstep_attn_{kernel}_simt_{dtype}_{}", dims.d),
            grid(dims, SIMT_ROWS, 0),
        ),
    }
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

fn dtype_name(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("causal attention (CUDA): no kernel for {other:?} (f32 and bf16 only)"),
    }
}

/// O [B, H, T, D] (q's dtype) and the row log-sum-exp L [B·H·T] (f32) of softmax(scale·QKᵀ + causal mask)·V.
pub(super) fn forward(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    scale: f32,
) -> candle_core::Result<(CudaStorage, CudaSlice<f32>)> {
    let (dims, q_range) = contiguous(q.1, "q")?;
    let (k_dims, k_range) = contiguous(k.1, "k")?;
    let (v_dims, v_range) = contiguous(v.1, "v")?;
    if k_dims != dims || v_dims != dims {
        bail!(
            "causal attention (CUDA): q {:?}, k {:?}, v {:?} differ",
            q.1.dims(),
            k.1.dims(),
            v.1.dims()
        );
    }
    let dev = q.0.device().clone();
    let dtype = q.0.dtype();
    let family = family(dtype)?;
    let (name, cfg) = entry(family, "fwd", dtype_name(dtype)?, dims, fwd_mma_smem(dims.d));
    let func = kernel(&dev, &name, cfg.shared_mem_bytes)?;
    // SAFETY: every element of `lse` (one per row) is written by the kernel.
    let mut lse = unsafe { dev.alloc::<f32>(dims.rows()) }?;
    let (t, scale_log2) = (dims.t as i32, scale * std::f32::consts::LOG2_E);

    macro_rules! launch {
        ($qs:expr, $ks:expr, $vs:expr) => {{
            let (qi, ki, vi) = (
                Input::new($qs, q_range, &dev)?,
                Input::new($ks, k_range, &dev)?,
                Input::new($vs, v_range, &dev)?,
            );
            let (qv, kv, vv) = (qi.view(), ki.view(), vi.view());
            // SAFETY: every element of `o` is written by the kernel.
            let mut o = unsafe { alloc_like($qs, &dev, dims.elems()) }?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&qv)
                .arg(&kv)
                .arg(&vv)
                .arg(&mut o)
                .arg(&mut lse)
                .arg(&t)
                .arg(&scale_log2);
            // SAFETY: the argument list matches the kernel's signature (attention.cu, LOCKSTEP_*_KERNELS).
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(o, dev.clone())
        }};
    }
    let o = match (&q.0.slice, &k.0.slice, &v.0.slice) {
        (CudaStorageSlice::F32(qs), CudaStorageSlice::F32(ks), CudaStorageSlice::F32(vs)) => launch!(qs, ks, vs),
        (CudaStorageSlice::BF16(qs), CudaStorageSlice::BF16(ks), CudaStorageSlice::BF16(vs)) => launch!(qs, ks, vs),
        _ => bail!(
            "causal attention (CUDA): q, k, v must share one dtype, f32 or bf16; got {:?}, {:?}, {:?}",
            dtype,
            k.0.dtype(),
            v.0.dtype()
        ),
    };
    Ok((o, lse))
}

/// dQ, dK, dV (q's dtype, shape of q) from the forward's O and L and the upstream gradient dO.
pub(super) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &CudaSlice<f32>,
    scale: f32,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let tensors = [q, k, v, o, d_o].map(|t| t.contiguous());
    let [q, k, v, o, d_o] = tensors;
    let (q, k, v, o, d_o) = (q?, k?, v?, o?, d_o?);
    let guards = [&q, &k, &v, &o, &d_o].map(|t| t.storage_and_layout());
    let names = ["q", "k", "v", "o", "dO"];
    let mut parts = Vec::with_capacity(5);
    for ((storage, layout), what) in guards.iter().zip(names) {
        let Storage::Cuda(s) = &**storage else {
            bail!("causal attention (CUDA): the backward's {what} is not on a CUDA device")
        };
        let (dims, range) = contiguous(layout, what)?;
        parts.push((s, dims, range));
    }
    let dims = parts[0].1;
    if let Some((_, other, what)) = parts
        .iter()
        .zip(names)
        .map(|(p, n)| (p.0, p.1, n))
        .find(|p| p.1 != dims)
    {
        bail!("causal attention (CUDA): backward: {what} {other:?} does not match q {dims:?}");
    }
    if lse.len() != dims.rows() {
        bail!(
            "causal attention (CUDA): backward: {} saved log-sum-exps for {} rows",
            lse.len(),
            dims.rows()
        );
    }
    let dev = parts[0].0.device().clone();
    let dtype = parts[0].0.dtype();
    let dtype_name = dtype_name(dtype)?;
    let family = family(dtype)?;
    let (dq_name, dq_cfg) = entry(family, "dq", dtype_name, dims, dq_mma_smem(dims.d));
    let (dkdv_name, dkdv_cfg) = entry(family, "dkdv", dtype_name, dims, dkdv_mma_smem(dims.d));
    let rowdot = kernel(&dev, &format!("lockstep_attn_rowdot_{dtype_name}"), 0)?;
    let dq_func = kernel(&dev, &dq_name, dq_cfg.shared_mem_bytes)?;
    let dkdv_func = kernel(&dev, &dkdv_name, dkdv_cfg.shared_mem_bytes)?;
    let rowdot_cfg = LaunchConfig {
        grid_dim: (dims.rows().div_ceil(4) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (t, rows, d) = (dims.t as i32, dims.rows() as i32, dims.d as i32);
    let (scale_log2, scale) = (scale * std::f32::consts::LOG2_E, scale);
    // SAFETY: one D_i per row, each written by the row-dot kernel.
    let mut dvec = unsafe { dev.alloc::<f32>(dims.rows()) }?;

    macro_rules! launch {
        ($variant:ident) => {{
            let mut slices = Vec::with_capacity(5);
            for ((storage, _, _), what) in parts.iter().zip(names) {
                let CudaStorageSlice::$variant(s) = &storage.slice else {
                    bail!(
                        "causal attention (CUDA): backward: {what} is {:?}, q is {dtype:?}",
                        storage.dtype()
                    )
                };
                slices.push(s);
            }
            let inputs = slices
                .iter()
                .zip(&parts)
                .map(|(s, p)| Input::new(s, p.2, &dev))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let [qv, kv, vv, ov, dov] = [0, 1, 2, 3, 4].map(|i| inputs[i].view());
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&rowdot);
            b.arg(&dov).arg(&ov).arg(&mut dvec).arg(&rows).arg(&d);
            // SAFETY: the argument lists match the kernels' signatures (attention.cu).
            unsafe { b.launch(rowdot_cfg) }.w()?;
            // SAFETY: every element of the gradients is written by the kernels.
            let (mut dq, mut dk, mut dv) = unsafe {
                (
                    alloc_like(slices[0], &dev, dims.elems())?,
                    alloc_like(slices[0], &dev, dims.elems())?,
                    alloc_like(slices[0], &dev, dims.elems())?,
                )
            };
            let mut b = stream.launch_builder(&dq_func);
            b.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(lse).arg(&dvec).arg(&mut dq);
            b.arg(&t).arg(&scale_log2).arg(&scale);
            unsafe { b.launch(dq_cfg) }.w()?;
            let mut b = stream.launch_builder(&dkdv_func);
            b.arg(&qv)
                .arg(&kv)
                .arg(&vv)
                .arg(&dov)
                .arg(lse)
                .arg(&dvec)
                .arg(&mut dk)
                .arg(&mut dv);
            b.arg(&t).arg(&scale_log2).arg(&scale);
            unsafe { b.launch(dkdv_cfg) }.w()?;
            [dq, dk, dv].map(|g| CudaStorage::wrap_cuda_slice(g, dev.clone()))
        }};
    }
    let grads = match dtype {
        DType::F32 => launch!(F32),
        DType::BF16 => launch!(BF16),
        other => bail!("causal attention (CUDA): no kernel for {other:?}"),
    };
    drop(guards);
    let [dq, dk, dv] =
        grads.map(|g| Tensor::from_storage(Storage::Cuda(g), q.shape().clone(), BackpropOp::none(), false));
    Ok((dq, dk, dv))
}
