//! The CUDA kernels of the fused causal attention ([`super::attention`]): launches of `worker/kernels/attention.cu`,
//! whose PTX `worker/build.rs` compiles and candle loads once per device. Two layouts, the same kernels: contiguous
//! `[B, H, T, D]` q, k, v and o ([`forward`], [`backward`]), or the model's own, q, k and v the column thirds of the
//! c_attn product `[B, T, 3C]` and the output `[B, T, C]` ([`forward_packed`], [`backward_packed`]), which spares a
//! layer the copies that split the heads out and merge them back, forward and backward.
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
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Storage, Tensor, bail};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};

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

/// attention.cu's `Rows`: row t of head (b, h) starts at element b·sb + h·sh + t·st of its buffer; a row's D
/// elements are contiguous.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Rows {
    sb: i64,
    sh: i64,
    st: i64,
}

/// One call's shape (B·H heads of T rows of D, H per sequence) and where the rows lie: `input` for q, k, v and
/// their gradients, `output` for o and dO; `k_at` / `v_at`: the elements from q's first to k's and v's, when the
/// three share one buffer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Geometry {
    heads: usize,
    h: usize,
    t: usize,
    d: usize,
    input: Rows,
    output: Rows,
    k_at: usize,
    v_at: usize,
}

impl Geometry {
    /// q, k, v and o as contiguous `[B, H, T, D]` tensors of their own.
    fn contiguous(dims: &[usize], what: &str) -> candle_core::Result<Self> {
        let &[b, h, t, d] = dims else {
            bail!("causal attention (CUDA): {what} must be [B, H, T, D], got {dims:?}")
        };
        let rows = Rows {
            sb: (h * t * d) as i64,
            sh: (t * d) as i64,
            st: d as i64,
        };
        Self::checked(b, h, t, d, rows, rows, (0, 0), dims, what)
    }

    /// q, k and v as the column slices [0, C), [C, 2C) and [2C, 3C) of `qkv` `[B, T, 3C]`, each in `n_head` heads
    /// of C / n_head columns, and o as `[B, T, C]`: the c_attn product and the c_proj input, as the model has them.
    fn packed(dims: &[usize], n_head: usize) -> candle_core::Result<Self> {
        let &[b, t, c3] = dims else {
            bail!("causal attention (CUDA): qkv must be [B, T, 3C], got {dims:?}")
        };
        let c = c3 / 3;
        if c3 % 3 != 0 || n_head == 0 || c % n_head != 0 {
            bail!(
                "causal attention (CUDA): qkv {dims:?}: the last dimension must be 3C with C a multiple of the {n_head} heads"
            );
        }
        let d = c / n_head;
        let (input, output) = (
            Rows {
                sb: (t * c3) as i64,
                sh: d as i64,
                st: c3 as i64,
            },
            Rows {
                sb: (t * c) as i64,
                sh: d as i64,
                st: c as i64,
            },
        );
        Self::checked(b, n_head, t, d, input, output, (c, 2 * c), dims, "qkv")
    }

    #[allow(clippy::too_many_arguments)] // the fields, checked
    fn checked(
        b: usize,
        h: usize,
        t: usize,
        d: usize,
        input: Rows,
        output: Rows,
        (k_at, v_at): (usize, usize),
        dims: &[usize],
        what: &str,
    ) -> candle_core::Result<Self> {
        let g = Self {
            heads: b * h,
            h,
            t,
            d,
            input,
            output,
            k_at,
            v_at,
        };
        if g.heads == 0 || t == 0 {
            bail!("causal attention (CUDA): {what} {dims:?} is empty");
        }
        if !HEAD_DIMS.contains(&d) {
            bail!("causal attention (CUDA): head size {d} has no kernel (supported: {HEAD_DIMS:?})");
        }
        // What the tensor-core kernels' 16-byte row copies need of the strides. It follows from today's head sizes
        // (all multiples of 8); checked anyway, since a new head size that broke it would read misaligned rows.
        let strides = [
            input.sb,
            input.sh,
            input.st,
            output.sb,
            output.sh,
            output.st,
            k_at as i64,
            v_at as i64,
        ];
        if strides.iter().any(|s| s % 8 != 0) {
            bail!("causal attention (CUDA): {what} {dims:?} gives strides {g:?} that are not whole 16-byte rows");
        }
        // The kernels count rows and take row strides as 32-bit ints, and the grid's y dimension counts row tiles
        // (at most 65535).
        let wide = g.rows() > i32::MAX as usize
            || input.st > i32::MAX as i64
            || output.st > i32::MAX as i64
            || t.div_ceil(SIMT_ROWS) > 65535;
        if wide {
            bail!("causal attention (CUDA): {what} {dims:?} is too large for the kernels");
        }
        Ok(g)
    }

    fn rows(&self) -> usize {
        self.heads * self.t
    }

    /// Elements of an input (q, k, v together when packed) and of an output.
    fn lens(&self) -> (usize, usize) {
        let n = self.rows() * self.d;
        if self.k_at == 0 { (n, n) } else { (3 * n, n) }
    }

    /// The scalars every kernel takes after its tensors (attention.cu's LAYOUT_PARAMS).
    fn args(&self) -> LayoutArgs {
        LayoutArgs {
            t: self.t as i32,
            h: self.h as i32,
            in_sb: self.input.sb,
            in_sh: self.input.sh,
            in_st: self.input.st as i32,
            out_sb: self.output.sb,
            out_sh: self.output.sh,
            out_st: self.output.st as i32,
        }
    }
}

/// attention.cu's LAYOUT_PARAMS, held for the duration of a launch (the builder keeps references).
struct LayoutArgs {
    t: i32,
    h: i32,
    in_sb: i64,
    in_sh: i64,
    in_st: i32,
    out_sb: i64,
    out_sh: i64,
    out_st: i32,
}

impl LayoutArgs {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(&self.t).arg(&self.h);
        b.arg(&self.in_sb).arg(&self.in_sh).arg(&self.in_st);
        b.arg(&self.out_sb).arg(&self.out_sh).arg(&self.out_st);
    }

    /// The row-dot kernel's part: T, H and the output layout.
    fn push_output<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(&self.t).arg(&self.h);
        b.arg(&self.out_sb).arg(&self.out_sh).arg(&self.out_st);
    }
}

/// The element range of a contiguous input.
fn contiguous(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("causal attention (CUDA): {what} is not contiguous")))
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
fn grid(g: &Geometry, rows: usize, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (g.heads as u32, g.t.div_ceil(rows) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The kernel family's name for `kernel` and the launch shape.
fn entry(family: Family, kernel: &str, dtype: &str, g: &Geometry, mma_smem: u32) -> (String, LaunchConfig) {
    match family {
        Family::TensorCore => (
            format!("lockstep_attn_{kernel}_mma_{}", g.d),
            grid(g, MMA_ROWS, mma_smem),
        ),
        Family::Simt => (
            format!("lockstep_attn_{kernel}_simt_{dtype}_{}", g.d),
            grid(g, SIMT_ROWS, 0),
        ),
    }
}

fn dtype_name(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("causal attention (CUDA): no kernel for {other:?} (f32 and bf16 only)"),
    }
}

/// The forward kernel over q, k, v (`input` layout; views starting at each one's first element) into `o` (`output`
/// layout) and `lse` (one per row).
fn launch_forward<T: DeviceRepr>(
    dev: &CudaDevice,
    dtype: DType,
    g: &Geometry,
    [q, k, v]: [&CudaView<T>; 3],
    o: &mut CudaSlice<T>,
    lse: &mut CudaSlice<f32>,
    scale: f32,
) -> candle_core::Result<()> {
    let (name, cfg) = entry(family(dtype)?, "fwd", dtype_name(dtype)?, g, fwd_mma_smem(g.d));
    let func = kernel(dev, &name, cfg.shared_mem_bytes)?;
    let (layout, scale_log2) = (g.args(), scale * std::f32::consts::LOG2_E);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(q).arg(k).arg(v).arg(o).arg(lse);
    layout.push(&mut b);
    b.arg(&scale_log2);
    // SAFETY: the argument list matches the kernel's signature (attention.cu, LOCKSTEP_*_KERNELS); the geometry
    // keeps every row the strides reach inside the buffers the views start in (Geometry::contiguous / packed).
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// The backward kernels: D_i = dO_i·o_i, then dQ, then dK and dV (`input` layout, views starting at each one's
/// first element), from q, k, v, o, dO and the forward's `lse`.
#[allow(clippy::too_many_arguments)] // the op's tensors, each a view
fn launch_backward<T: DeviceRepr>(
    dev: &CudaDevice,
    dtype: DType,
    g: &Geometry,
    [q, k, v, o, d_o]: [&CudaView<T>; 5],
    lse: &CudaSlice<f32>,
    [dq, dk, dv]: [&mut CudaViewMut<T>; 3],
    scale: f32,
) -> candle_core::Result<()> {
    let dtype_name = dtype_name(dtype)?;
    let family = family(dtype)?;
    let (dq_name, dq_cfg) = entry(family, "dq", dtype_name, g, dq_mma_smem(g.d));
    let (dkdv_name, dkdv_cfg) = entry(family, "dkdv", dtype_name, g, dkdv_mma_smem(g.d));
    let rowdot = kernel(dev, &format!("lockstep_attn_rowdot_{dtype_name}"), 0)?;
    let dq_func = kernel(dev, &dq_name, dq_cfg.shared_mem_bytes)?;
    let dkdv_func = kernel(dev, &dkdv_name, dkdv_cfg.shared_mem_bytes)?;
    let rowdot_cfg = LaunchConfig {
        grid_dim: (g.rows().div_ceil(4) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let layout = g.args();
    let (rows, d) = (g.rows() as i32, g.d as i32);
    let (scale_log2, scale) = (scale * std::f32::consts::LOG2_E, scale);
    // SAFETY: one D_i per row, each written by the row-dot kernel.
    let mut dvec = unsafe { dev.alloc::<f32>(g.rows()) }?;
    let stream = dev.cuda_stream();

    let mut b = stream.launch_builder(&rowdot);
    b.arg(d_o).arg(o).arg(&mut dvec).arg(&rows);
    layout.push_output(&mut b);
    b.arg(&d);
    // SAFETY (all three launches): the argument lists match the kernels' signatures (attention.cu); the geometry
    // keeps every row the strides reach inside the buffers the views start in.
    unsafe { b.launch(rowdot_cfg) }.w()?;

    let mut b = stream.launch_builder(&dq_func);
    b.arg(q).arg(k).arg(v).arg(d_o).arg(lse).arg(&dvec).arg(dq);
    layout.push(&mut b);
    b.arg(&scale_log2).arg(&scale);
    unsafe { b.launch(dq_cfg) }.w()?;

    let mut b = stream.launch_builder(&dkdv_func);
    b.arg(q).arg(k).arg(v).arg(d_o).arg(lse).arg(&dvec).arg(dk).arg(dv);
    layout.push(&mut b);
    b.arg(&scale_log2).arg(&scale);
    unsafe { b.launch(dkdv_cfg) }.w()?;
    Ok(())
}

fn same_dtype(what: &str, got: DType, want: DType) -> candle_core::Result<()> {
    if got != want {
        bail!("causal attention (CUDA): {what} is {got:?}, q is {want:?}");
    }
    Ok(())
}

/// O [B, H, T, D] (q's dtype) and the row log-sum-exp L [B·H·T] (f32) of softmax(scale·QKᵀ + causal mask)·V, for
/// contiguous q, k, v [B, H, T, D].
pub(super) fn forward(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    scale: f32,
) -> candle_core::Result<(CudaStorage, CudaSlice<f32>)> {
    let g = Geometry::contiguous(q.1.dims(), "q")?;
    if k.1.dims() != q.1.dims() || v.1.dims() != q.1.dims() {
        bail!(
            "causal attention (CUDA): q {:?}, k {:?}, v {:?} differ",
            q.1.dims(),
            k.1.dims(),
            v.1.dims()
        );
    }
    let ranges = [contiguous(q.1, "q")?, contiguous(k.1, "k")?, contiguous(v.1, "v")?];
    let dev = q.0.device().clone();
    let dtype = q.0.dtype();
    same_dtype("k", k.0.dtype(), dtype)?;
    same_dtype("v", v.0.dtype(), dtype)?;
    // SAFETY: every element of `lse` (one per row) is written by the kernel.
    let mut lse = unsafe { dev.alloc::<f32>(g.rows()) }?;

    let parts = [(q.0, ranges[0]), (k.0, ranges[1]), (v.0, ranges[2])];

    macro_rules! launch {
        ($variant:ident) => {{
            let slices = parts.map(|(s, _)| match &s.slice {
                CudaStorageSlice::$variant(x) => Some(x),
                _ => None,
            });
            let inputs = inputs(&slices, &parts, &["q", "k", "v"], &dev)?;
            let [qv, kv, vv] = [0, 1, 2].map(|i| inputs[i].view());
            // SAFETY: every element of `o` is written by the kernel.
            let mut o = unsafe { dev.alloc(g.lens().1) }?;
            launch_forward(&dev, dtype, &g, [&qv, &kv, &vv], &mut o, &mut lse, scale)?;
            CudaStorage::wrap_cuda_slice(o, dev.clone())
        }};
    }
    let o = match dtype {
        DType::F32 => launch!(F32),
        DType::BF16 => launch!(BF16),
        other => bail!("causal attention (CUDA): no kernel for {other:?} (f32 and bf16 only)"),
    };
    Ok((o, lse))
}

/// The CUDA storages and element ranges of contiguous tensors (made contiguous by the caller), named for errors.
fn cuda_parts<'a, G: std::ops::Deref<Target = Storage>, const N: usize>(
    guards: &'a [(G, &'a Layout); N],
    names: [&str; N],
) -> candle_core::Result<[(&'a CudaStorage, (usize, usize)); N]> {
    let mut parts = Vec::with_capacity(N);
    for ((storage, layout), what) in guards.iter().zip(names) {
        let Storage::Cuda(s) = &**storage else {
            bail!("causal attention (CUDA): the backward's {what} is not on a CUDA device")
        };
        same_dtype(what, s.dtype(), guards[0].0.dtype())?;
        parts.push((s, contiguous(layout, what)?));
    }
    parts
        .try_into()
        .map_err(|_| candle_core::Error::Msg("causal attention (CUDA): backward operands miscounted".into()))
}

/// The operands' elements as views (copies where a view would start misaligned, see `Input`); `slices` holds each
/// operand's storage where it has the call's element type.
fn inputs<'a, T: DeviceRepr>(
    slices: &[Option<&'a CudaSlice<T>>],
    parts: &[(&CudaStorage, (usize, usize))],
    names: &[&str],
    dev: &CudaDevice,
) -> candle_core::Result<Vec<Input<'a, T>>> {
    let mut inputs = Vec::with_capacity(slices.len());
    for ((slice, (storage, range)), what) in slices.iter().zip(parts).zip(names) {
        let Some(slice) = slice else {
            bail!(
                "causal attention (CUDA): {what} is {:?}, not the call's dtype",
                storage.dtype()
            )
        };
        inputs.push(Input::new(slice, *range, dev)?);
    }
    Ok(inputs)
}

/// dQ, dK, dV (q's dtype, shape of q) from the forward's O and L and the upstream gradient dO, all `[B, H, T, D]`.
pub(super) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &CudaSlice<f32>,
    scale: f32,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let g = Geometry::contiguous(q.dims(), "q")?;
    let names = ["q", "k", "v", "o", "dO"];
    for (t, what) in [k, v, o, d_o].into_iter().zip(&names[1..]) {
        if t.dims() != q.dims() {
            bail!(
                "causal attention (CUDA): backward: {what} {:?} does not match q {:?}",
                t.dims(),
                q.dims()
            );
        }
    }
    check_lse(lse, &g)?;
    let tensors = [q, k, v, o, d_o].map(|t| t.contiguous());
    let [q, k, v, o, d_o] = tensors;
    let (q, k, v, o, d_o) = (q?, k?, v?, o?, d_o?);
    let guards = [&q, &k, &v, &o, &d_o].map(|t| t.storage_and_layout());
    let parts = cuda_parts(&guards, names)?;
    let dev = parts[0].0.device().clone();
    let dtype = parts[0].0.dtype();

    macro_rules! launch {
        ($variant:ident) => {{
            let slices = parts.map(|(s, _)| match &s.slice {
                CudaStorageSlice::$variant(x) => Some(x),
                _ => None,
            });
            let inputs = inputs(&slices, &parts, &names, &dev)?;
            let [qv, kv, vv, ov, dov] = [0, 1, 2, 3, 4].map(|i| inputs[i].view());
            let n = g.lens().0;
            // SAFETY: every element of the gradients is written by the kernels.
            let (mut dq, mut dk, mut dv) = unsafe { (dev.alloc(n)?, dev.alloc(n)?, dev.alloc(n)?) };
            launch_backward(
                &dev,
                dtype,
                &g,
                [&qv, &kv, &vv, &ov, &dov],
                lse,
                [&mut dq.slice_mut(..), &mut dk.slice_mut(..), &mut dv.slice_mut(..)],
                scale,
            )?;
            [dq, dk, dv].map(|x| CudaStorage::wrap_cuda_slice(x, dev.clone()))
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

fn check_lse(lse: &CudaSlice<f32>, g: &Geometry) -> candle_core::Result<()> {
    if lse.len() != g.rows() {
        bail!(
            "causal attention (CUDA): backward: {} saved log-sum-exps for {} rows",
            lse.len(),
            g.rows()
        );
    }
    Ok(())
}

/// Y [B, T, C] (qkv's dtype) and the row log-sum-exp L [B·H·T] (f32) of causal attention over `n_head` heads whose
/// q, k and v are the column thirds of the contiguous `qkv` [B, T, 3C]: the heads are read and written in place,
/// never split or merged by a copy.
pub(super) fn forward_packed(
    qkv: (&CudaStorage, &Layout),
    n_head: usize,
    scale: f32,
) -> candle_core::Result<(CudaStorage, Shape, CudaSlice<f32>)> {
    let dims = qkv.1.dims();
    let g = Geometry::packed(dims, n_head)?;
    let range = contiguous(qkv.1, "qkv")?;
    let dev = qkv.0.device().clone();
    let dtype = qkv.0.dtype();
    // SAFETY: every element of `lse` (one per row) is written by the kernel.
    let mut lse = unsafe { dev.alloc::<f32>(g.rows()) }?;

    macro_rules! launch {
        ($s:expr) => {{
            let input = Input::new($s, range, &dev)?;
            let all = input.view();
            let (q, k, v) = (all.slice(..), all.slice(g.k_at..), all.slice(g.v_at..));
            // SAFETY: every element of `y` is written by the kernel (each head's D columns of each row).
            let mut y = unsafe { dev.alloc(g.lens().1) }?;
            launch_forward(&dev, dtype, &g, [&q, &k, &v], &mut y, &mut lse, scale)?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    let y = match &qkv.0.slice {
        CudaStorageSlice::F32(s) => launch!(s),
        CudaStorageSlice::BF16(s) => launch!(s),
        _ => bail!("causal attention (CUDA): no kernel for {dtype:?} qkv (f32 and bf16 only)"),
    };
    Ok((y, Shape::from((dims[0], dims[1], dims[2] / 3)), lse))
}

/// dQKV [B, T, 3C] (qkv's dtype) from the forward's input `qkv`, output `y` and L, and the upstream gradient `dy`
/// [B, T, C]: the gradients of q, k and v land in their column thirds directly.
pub(super) fn backward_packed(
    qkv: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    n_head: usize,
    lse: &CudaSlice<f32>,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let g = Geometry::packed(qkv.dims(), n_head)?;
    let out_dims = [g.heads / g.h, g.t, g.h * g.d];
    for (t, what) in [(y, "y"), (dy, "dy")] {
        if t.dims() != out_dims {
            bail!(
                "causal attention (CUDA): backward: {what} {:?} does not match qkv {:?} (want {out_dims:?})",
                t.dims(),
                qkv.dims()
            );
        }
    }
    check_lse(lse, &g)?;
    let names = ["qkv", "y", "dy"];
    let tensors = [qkv, y, dy].map(|t| t.contiguous());
    let [qkv_c, y, dy] = tensors;
    let (qkv_c, y, dy) = (qkv_c?, y?, dy?);
    let guards = [&qkv_c, &y, &dy].map(|t| t.storage_and_layout());
    let parts = cuda_parts(&guards, names)?;
    let dev = parts[0].0.device().clone();
    let dtype = parts[0].0.dtype();

    macro_rules! launch {
        ($variant:ident) => {{
            let slices = parts.map(|(s, _)| match &s.slice {
                CudaStorageSlice::$variant(x) => Some(x),
                _ => None,
            });
            let inputs = inputs(&slices, &parts, &names, &dev)?;
            let [all, yv, dyv] = [0, 1, 2].map(|i| inputs[i].view());
            let (q, k, v) = (all.slice(..), all.slice(g.k_at..), all.slice(g.v_at..));
            // SAFETY: every element of dQKV is written by the kernels: dQ's columns by one, dK's and dV's by the
            // other.
            let mut dqkv = unsafe { dev.alloc(g.lens().0) }?;
            // Views starting at dQ's, dK's and dV's first elements; the kernels reach the rest of each through the
            // strides, so a view's own length does not bound what is written (the whole buffer is).
            let (mut dq, mut rest) = dqkv.split_at_mut(g.k_at);
            let (mut dk, mut dv) = rest.split_at_mut(g.v_at - g.k_at);
            launch_backward(
                &dev,
                dtype,
                &g,
                [&q, &k, &v, &yv, &dyv],
                lse,
                [&mut dq, &mut dk, &mut dv],
                scale,
            )?;
            CudaStorage::wrap_cuda_slice(dqkv, dev.clone())
        }};
    }
    let dqkv = match dtype {
        DType::F32 => launch!(F32),
        DType::BF16 => launch!(BF16),
        other => bail!("causal attention (CUDA): no kernel for {other:?}"),
    };
    drop(guards);
    Ok(Tensor::from_storage(
        Storage::Cuda(dqkv),
        qkv.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

// Built only with the `cuda` feature, whose test binaries need the NVIDIA driver to start: these run on a GPU host
// (`cargo test --release --features cuda -p lockstep-worker --lib -- _cuda::`). The kernels' use of the strides is
// checked under the emulator on every `cargo test` (attention_emu.cpp builds the same layouts).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packed_geometry_reads_thirds_of_qkv_and_writes_heads_side_by_side() {
        let g = Geometry::packed(&[16, 1024, 2304], 12).unwrap();
        assert_eq!((g.heads, g.h, g.t, g.d), (192, 12, 1024, 64));
        let (c3, c) = (2304, 768);
        assert_eq!(
            g.input,
            Rows {
                sb: 1024 * c3,
                sh: 64,
                st: c3
            }
        );
        assert_eq!(
            g.output,
            Rows {
                sb: 1024 * c,
                sh: 64,
                st: c
            }
        );
        assert_eq!((g.k_at, g.v_at), (768, 1536));
        assert_eq!(g.lens(), (16 * 1024 * 2304, 16 * 1024 * 768));
        let g = Geometry::contiguous(&[2, 3, 5, 16], "q").unwrap();
        assert_eq!(
            g.input,
            Rows {
                sb: 3 * 5 * 16,
                sh: 5 * 16,
                st: 16
            }
        );
        assert_eq!((g.input, g.k_at, g.lens()), (g.output, 0, (480, 480)));
    }

    #[test]
    fn shapes_without_a_kernel_are_refused_naming_them() {
        for (dims, n_head, want) in [
            (vec![2, 8, 100], 2, "3C"),
            (vec![2, 8, 3 * 96], 2, "head size 48"),
            (vec![0, 8, 3 * 64], 1, "empty"),
            (vec![8, 192], 1, "[B, T, 3C]"),
        ] {
            let err = Geometry::packed(&dims, n_head).unwrap_err().to_string();
            assert!(err.contains(want), "{dims:?}: {err}");
        }
    }
}
