//! The CUDA side of the fused optimizer step: launches of `worker/kernels/adamw.cu` (whose PTX `worker/build.rs`
//! compiles and candle loads once per device), all on candle's stream.
//!
//! * [`accumulate`] and [`put`] fill the persistent flat gradient buffer of [`crate::device_grads::FlatGrads`];
//! * [`FusedAdamW::step`] computes the squared gradient norm into a persistent stats buffer (two deterministic
//!   stages through a persistent scratch buffer), runs one multi-tensor AdamW launch over every parameter, and only
//!   then reads [loss, votes, norm²] back: the step's one synchronisation.
//!
//! The update reaches the f32 master weights through a device table of their addresses. A `Var` keeps its device
//! buffer for life (`Var::set` copies into it; candle never swaps a tensor's storage), so the table is uploaded once;
//! every step still reads each parameter's address on the host (no device round trip) and uploads the table again
//! should one have moved. The kernel writes the parameters behind candle's back, which is sound because a trainer's
//! GPU work all runs on one thread, and so on candle's stream for that thread (candle 0.11 gives each thread its own
//! stream), in order. GPU work from a second thread, or a second stream (cudarc's event tracking), would need events
//! here.
//!
//! Launch shapes and the chunk table's layout mirror adamw.cu.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Device, InplaceOp2, Layout, Storage, Tensor, Var, bail};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};

use crate::error::{Error, Result};
use crate::params::Params;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
const MODULE: &str = "lockstep_adamw";
const THREADS: u32 = 256;
/// Grid caps: the accumulate kernel strides beyond it; the norm's partials buffer has one slot per block.
const ACCUMULATE_BLOCKS: usize = 2048;
const NORM_BLOCKS: usize = 1024;
const UPDATE_BLOCKS: usize = 1 << 20;
/// Elements per update block: 16 per thread, enough to amortise reading the block's chunk and the stats, small
/// enough for ~30k blocks on GPT-2 (a full H200 many times over).
const CHUNK: usize = 4096;
/// [loss, votes, norm²].
const STATS: usize = 3;

/// adamw.cu's `Chunk`: elements [flat, flat + len) of the flat buffers are [in_param, in_param + len) of parameter
/// `param`; `decay` is 1 for tensors of rank >= 2.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Chunk {
    flat: i64,
    in_param: i64,
    param: i32,
    len: i32,
    decay: i32,
    pad: i32,
}

// SAFETY: plain `#[repr(C)]` integers, the 32-byte layout adamw.cu reads (it static_asserts the size).
unsafe impl DeviceRepr for Chunk {}

fn func(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    Ok(dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function())
}

fn grid(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn blocks_for(n: usize, cap: usize) -> usize {
    n.div_ceil(THREADS as usize).clamp(1, cap)
}

/// The contiguous element range of a layout, or an error naming `what`.
fn range(l: &Layout, op: &str, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op} (CUDA): {what} {:?} is not contiguous", l.dims())))
}

/// Elements `r` of `s`, or an error (candle's layouts never point past their storage).
fn view<'a, T>(s: &'a CudaSlice<T>, r: std::ops::Range<usize>, what: &str) -> candle_core::Result<CudaView<'a, T>> {
    let len = s.len();
    s.try_slice(r.clone())
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: elements {r:?} of a buffer of {len}")))
}

/// dst[offset + i] = src[i] (or += when `add`) for every element of `src` (f32 or bf16); `dst` is an f32 buffer.
pub(crate) fn accumulate(
    dst: &mut CudaStorage,
    dst_l: &Layout,
    offset: usize,
    src: &CudaStorage,
    src_l: &Layout,
    add: bool,
) -> candle_core::Result<()> {
    const OP: &str = "gradient accumulation";
    let (d0, d1) = range(dst_l, OP, "the flat buffer")?;
    let (s0, s1) = range(src_l, OP, "the gradient")?;
    let n = s1 - s0;
    if offset + n > d1 - d0 {
        bail!(
            "{OP} (CUDA): {n} elements at offset {offset} do not fit the flat buffer of {}",
            d1 - d0
        );
    }
    if n == 0 {
        return Ok(());
    }
    let dev = dst.device().clone();
    let stream = dev.cuda_stream();
    let start = d0 + offset;
    let dst = dst.as_cuda_slice_mut::<f32>()?;
    let Some(mut out) = dst.try_slice_mut(start..start + n) else {
        bail!("{OP} (CUDA): the flat buffer's storage is shorter than its layout")
    };
    let (n64, add) = (n as i64, i32::from(add));
    let cfg = grid(blocks_for(n, ACCUMULATE_BLOCKS));
    match &src.slice {
        CudaStorageSlice::F32(g) => {
            let f = func(&dev, "lockstep_adamw_accumulate_f32")?;
            let g = view(g, s0..s1, OP)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&mut out).arg(&g).arg(&n64).arg(&add);
            // SAFETY: the arguments match the kernel's signature (adamw.cu); `out` and `g` hold n elements.
            unsafe { b.launch(cfg) }.w()?;
        }
        CudaStorageSlice::BF16(g) => {
            let f = func(&dev, "lockstep_adamw_accumulate_bf16")?;
            let g = view(g, s0..s1, OP)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&mut out).arg(&g).arg(&n64).arg(&add);
            // SAFETY: as above.
            unsafe { b.launch(cfg) }.w()?;
        }
        _ => bail!("{OP} (CUDA): gradients must be f32 or bf16, got {:?}", src.dtype()),
    }
    Ok(())
}

/// dst[index] = value, by a kernel argument: a host-to-device copy from pageable memory may wait for the stream.
pub(crate) fn put(dst: &mut CudaStorage, dst_l: &Layout, index: usize, value: f32) -> candle_core::Result<()> {
    let (d0, d1) = range(dst_l, "stop vote", "the flat buffer")?;
    if index >= d1 - d0 {
        bail!(
            "stop vote (CUDA): slot {index} is outside the flat buffer of {}",
            d1 - d0
        );
    }
    let dev = dst.device().clone();
    let f = func(&dev, "lockstep_adamw_put_f32")?;
    let dst = dst.as_cuda_slice_mut::<f32>()?;
    let Some(mut slot) = dst.try_slice_mut(d0 + index..d0 + index + 1) else {
        bail!("stop vote (CUDA): the flat buffer's storage is shorter than its layout")
    };
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut slot).arg(&value);
    // SAFETY: the arguments match the kernel's signature (adamw.cu).
    unsafe { b.launch(grid(1)) }.w()?;
    Ok(())
}

/// The optimizer's scalars for one step; `t` is the 1-based step the bias corrections are for.
pub(crate) struct Hyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub max_norm: f64,
    pub t: u64,
}

/// The fused step's device state, made once for a parameter set: the chunk table, the parameters' address table,
/// the norm's scratch and the stats buffer.
pub(crate) struct FusedAdamW {
    dev: CudaDevice,
    /// Each parameter's element count, in canonical order (the chunk table was cut from these).
    numels: Vec<usize>,
    n: usize,
    chunks: CudaSlice<Chunk>,
    num_chunks: usize,
    /// Parameter addresses as last uploaded to `ptrs`.
    host_ptrs: Vec<u64>,
    ptrs: CudaSlice<u64>,
    partials: CudaSlice<f32>,
    stats: CudaSlice<f32>,
}

/// Parameter `var`'s f32 data address on the device, read on the host.
fn address(name: &str, var: &Var, stream: &CudaStream) -> Result<u64> {
    let (storage, layout) = var.as_tensor().storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(Error::Model(format!(
            "fused AdamW: parameter {name} is not on a CUDA device"
        )));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(Error::Model(format!(
            "fused AdamW: parameter {name} {:?} is not contiguous",
            var.dims()
        )));
    };
    if s.dtype() != DType::F32 || end - start != var.elem_count() {
        return Err(Error::Model(format!(
            "fused AdamW: parameter {name} must be f32 master weights, got {:?} {:?}",
            s.dtype(),
            var.dims()
        )));
    }
    let (ptr, _read) = s.as_cuda_slice::<f32>()?.device_ptr(stream);
    Ok(ptr + (start * std::mem::size_of::<f32>()) as u64)
}

impl FusedAdamW {
    /// For `params`: f32, contiguous, all on one CUDA device.
    pub(crate) fn new(params: &Params) -> Result<Self> {
        let Some(first) = params.vars().first() else {
            return Err(Error::Model("fused AdamW: no parameters".into()));
        };
        let Device::Cuda(dev) = first.device() else {
            return Err(Error::Model(format!(
                "fused AdamW: the parameters are on {:?}, not a CUDA device",
                first.device().location()
            )));
        };
        let dev = dev.clone();
        let stream = dev.cuda_stream();
        if params.len() > i32::MAX as usize {
            return Err(Error::Model(format!(
                "fused AdamW: {} parameter tensors are more than the kernel indexes",
                params.len()
            )));
        }
        let mut table = Vec::new();
        let mut host_ptrs = Vec::with_capacity(params.len());
        let mut numels = Vec::with_capacity(params.len());
        let mut flat = 0usize;
        for (j, (name, var)) in params.names().iter().zip(params.vars()).enumerate() {
            if !var.device().same_device(first.device()) {
                return Err(Error::Model(format!(
                    "fused AdamW: parameter {name} is on {:?}, the first one on {:?}",
                    var.device().location(),
                    first.device().location()
                )));
            }
            host_ptrs.push(address(name, var, &stream)?);
            let n = var.elem_count();
            for start in (0..n).step_by(CHUNK) {
                table.push(Chunk {
                    flat: (flat + start) as i64,
                    in_param: start as i64,
                    param: j as i32,
                    len: CHUNK.min(n - start) as i32,
                    decay: i32::from(var.rank() >= 2),
                    pad: 0,
                });
            }
            numels.push(n);
            flat += n;
        }
        if table.is_empty() {
            return Err(Error::Model("fused AdamW: the parameters have no elements".into()));
        }
        Ok(Self {
            numels,
            n: flat,
            num_chunks: table.len(),
            chunks: dev.clone_htod(&table)?,
            ptrs: dev.clone_htod(&host_ptrs)?,
            host_ptrs,
            partials: dev.alloc_zeros::<f32>(NORM_BLOCKS)?,
            stats: dev.alloc_zeros::<f32>(STATS)?,
            dev,
        })
    }

    /// Re-reads every parameter's address; uploads the table only if one moved (never, with candle as it is).
    fn refresh_addresses(&mut self, params: &Params) -> Result<()> {
        let counts = params.vars().iter().map(|v| v.elem_count());
        if params.len() != self.numels.len() || !counts.eq(self.numels.iter().copied()) {
            return Err(Error::Model(
                "fused AdamW: the parameters are not the ones the optimizer was made for".into(),
            ));
        }
        let stream = self.dev.cuda_stream();
        let mut moved = false;
        for ((name, var), known) in params.names().iter().zip(params.vars()).zip(&mut self.host_ptrs) {
            let ptr = address(name, var, &stream)?;
            moved |= ptr != *known;
            *known = ptr;
        }
        if moved {
            self.dev.memcpy_htod(&self.host_ptrs, &mut self.ptrs)?;
        }
        Ok(())
    }

    /// stats = [loss, votes, Σ g²] from `reduced` ([n gradients | loss | votes], f32).
    fn norm(&mut self, reduced: &Tensor) -> Result<()> {
        let (storage, layout) = reduced.storage_and_layout();
        let (s, (start, end)) = match &*storage {
            Storage::Cuda(s) if s.dtype() == DType::F32 => (s, range(layout, "fused AdamW", "the gradients")?),
            other => {
                return Err(Error::Model(format!(
                    "fused AdamW: the reduced gradients must be f32 on the CUDA device, got {:?} on {:?}",
                    other.dtype(),
                    reduced.device().location()
                )));
            }
        };
        if end - start != self.n + 2 {
            return Err(Error::Model(format!(
                "fused AdamW: the reduced buffer has {} elements, the parameters {} (+ loss and votes)",
                end - start,
                self.n
            )));
        }
        let flat = s.as_cuda_slice::<f32>()?;
        let grads = view(flat, start..start + self.n, "fused AdamW")?;
        let extras = view(flat, start + self.n..end, "fused AdamW")?;
        let blocks = blocks_for(self.n, NORM_BLOCKS);
        let stream = self.dev.cuda_stream();
        let (n, blocks32) = (self.n as i64, blocks as i32);
        let partials = func(&self.dev, "lockstep_adamw_norm_partials_f32")?;
        let mut b = stream.launch_builder(&partials);
        b.arg(&grads).arg(&n).arg(&mut self.partials);
        // SAFETY: the arguments match the kernel's signature (adamw.cu); `partials` has NORM_BLOCKS >= blocks slots.
        unsafe { b.launch(grid(blocks)) }.w()?;
        let finish = func(&self.dev, "lockstep_adamw_norm_finish_f32")?;
        let mut b = stream.launch_builder(&finish);
        b.arg(&self.partials).arg(&blocks32).arg(&extras).arg(&mut self.stats);
        // SAFETY: as above; `stats` has STATS slots.
        unsafe { b.launch(grid(1)) }.w()?;
        Ok(())
    }

    /// The whole step after the all-reduce: norm, AdamW on `params` and the moments `mv` ([2, n] f32: exp_avg, then
    /// exp_avg_sq), then [loss, votes, norm²] read back. The kernel itself skips (changes nothing) when the loss or
    /// norm² is not finite.
    pub(crate) fn step(&mut self, params: &Params, mv: &Tensor, reduced: &Tensor, h: &Hyper) -> Result<[f32; STATS]> {
        if mv.dims() != [2, self.n] || mv.dtype() != DType::F32 {
            return Err(Error::Model(format!(
                "fused AdamW: the moments are {:?} {:?}, expected f32 [2, {}]",
                mv.dtype(),
                mv.dims(),
                self.n
            )));
        }
        self.refresh_addresses(params)?;
        self.norm(reduced)?;
        let t = h.t as f64;
        let (bias1, bias2_sqrt) = (1.0 - h.beta1.powf(t), (1.0 - h.beta2.powf(t)).sqrt());
        let update = Update {
            fused: self,
            scalars: [
                h.max_norm as f32,
                h.beta1 as f32,
                (1.0 - h.beta1) as f32,
                h.beta2 as f32,
                (1.0 - h.beta2) as f32,
                (1.0 - h.lr * h.weight_decay) as f32,
                (1.0 / bias2_sqrt) as f32,
                h.eps as f32,
                (h.lr / bias1) as f32,
            ],
        };
        mv.inplace_op2(reduced, &update)?;
        let mut host = [0f32; STATS];
        self.dev.memcpy_dtoh(&self.stats, &mut host)?;
        // A copy into pageable memory has completed when it returns (CUDA's rule, which candle's `to_vec` relies
        // on too); the stream is idle by then, so saying so costs nothing.
        self.dev.cuda_stream().synchronize().w()?;
        Ok(host)
    }
}

/// The update launch, as an in-place op on the moments (so candle hands over their storage mutably), reading the
/// reduced gradients.
struct Update<'a> {
    fused: &'a FusedAdamW,
    /// max_norm, β₁, 1−β₁, β₂, 1−β₂, 1−lr·wd, 1/√(1−β₂ᵗ), ε, lr/(1−β₁ᵗ): adamw.cu's order.
    scalars: [f32; 9],
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<()> {
        bail!("fused AdamW: the kernel runs on CUDA devices only")
    }

    fn cuda_fwd(&self, mv: &mut CudaStorage, mv_l: &Layout, g: &CudaStorage, g_l: &Layout) -> candle_core::Result<()> {
        let f = self.fused;
        let (m0, m1) = range(mv_l, "fused AdamW", "the moments")?;
        let (g0, g1) = range(g_l, "fused AdamW", "the gradients")?;
        if m1 - m0 != 2 * f.n || g1 - g0 != f.n + 2 {
            bail!(
                "fused AdamW: moments of {} and gradients of {} elements for {} parameters",
                m1 - m0,
                g1 - g0,
                f.n
            );
        }
        let grads = view(g.as_cuda_slice::<f32>()?, g0..g0 + f.n, "fused AdamW")?;
        let mv = mv.as_cuda_slice_mut::<f32>()?;
        let Some(mut both) = mv.try_slice_mut(m0..m1) else {
            bail!("fused AdamW: the moments' storage is shorter than their layout")
        };
        let Some((mut m, mut v)) = both.try_split_at_mut(f.n) else {
            bail!("fused AdamW: cannot split the moments")
        };
        let func = func(&f.dev, "lockstep_adamw_update_f32")?;
        let stream = f.dev.cuda_stream();
        let num_chunks = f.num_chunks as i64;
        let mut b = stream.launch_builder(&func);
        b.arg(&f.chunks)
            .arg(&num_chunks)
            .arg(&f.ptrs)
            .arg(&grads)
            .arg(&mut m)
            .arg(&mut v)
            .arg(&f.stats);
        for s in &self.scalars {
            b.arg(s);
        }
        // SAFETY: the arguments match the kernel's signature (adamw.cu): the chunk table covers exactly the n
        // elements of grads, m and v, and `ptrs` holds the current address of every parameter it names.
        unsafe { b.launch(grid(f.num_chunks.min(UPDATE_BLOCKS))) }.w()?;
        Ok(())
    }
}
