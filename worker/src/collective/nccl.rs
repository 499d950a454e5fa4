//! NCCL all-reduce between CUDA workers, behind the same [`Collective`] trait as the ring (DESIGN §2).
//!
//! Rank 0's unique id travels in the assignment (every CUDA worker makes one at join with [`unique_id`]; the
//! coordinator relays rank 0's). The communicator is created non-blocking (`ncclConfig_t.blocking = 0`): its set-up
//! and every all-reduce return at once and this rank polls `ncclCommGetAsyncError` and a CUDA event, so a deadline
//! or an [`NcclAbort`] interrupts a hung collective with `ncclCommAbort` instead of waiting forever. The
//! communicator belongs to the thread that made it and only that thread calls NCCL: the abort handle sets a flag
//! that the polling loop acts on within microseconds.
//!
//! [`Collective::all_reduce_tensor`] reduces a gradient tensor where it lives, into a new device buffer;
//! [`Collective::all_reduce_sum`] copies a host buffer through a device buffer kept between calls. NCCL's ring sums
//! every element in one order on every rank, so all ranks end bitwise identical, as the trait requires. Each call
//! returns only once the reduction has finished (that is how its deadline is kept): one host synchronisation.
//!
//! The communicator gets a stream of its own. Not candle's: candle queues on the per-thread default stream, and a
//! non-blocking communicator may launch from NCCL's own thread, where that handle means another stream. And made
//! with the raw driver call, because cudarc's `new_stream` would switch the whole context to multi-stream event
//! tracking, which costs every candle kernel launch an event record. Work on candle's stream that the reduction
//! reads is ordered before it with an event.
use std::cell::RefCell;
use std::ffi::{CStr, c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use cudarc::nccl::sys;

use super::{Abort, Collective};
use crate::error::{Error, Result};

/// Bytes in an NCCL unique id (`ncclUniqueId`).
pub const UNIQUE_ID_LEN: usize = 128;

/// Polls spent spinning (yielding the thread) before the wait sleeps between polls.
const SPIN_POLLS: u32 = 2_000;
const POLL_SLEEP: Duration = Duration::from_micros(100);

/// A fresh NCCL unique id for rank 0 of a future communicator. Creating one starts NCCL's bootstrap listener in
/// this process, so only the process that made the id may be rank 0 with it.
pub fn unique_id() -> Result<Vec<u8>> {
    let id = cudarc::nccl::result::get_uniqueid().map_err(|e| Error::Nccl {
        rank: None,
        message: format!(
            "cannot create a unique id ({}): is a network interface up (NCCL_SOCKET_IFNAME)?",
            describe(e.0)
        ),
    })?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// One rank's place in a communicator.
#[derive(Debug, Clone)]
pub struct NcclConfig {
    pub rank: u32,
    pub world_size: u32,
    /// Rank 0's [`unique_id`], [`UNIQUE_ID_LEN`] bytes.
    pub unique_id: Vec<u8>,
    /// Deadline of the communicator's set-up and of every all-reduce.
    pub timeout: Duration,
}

/// Interrupts an [`Nccl`] from another thread (the coordinator's abort): the current and every later call fails
/// promptly, and the owning thread aborts the communicator.
#[derive(Debug, Clone, Default)]
pub struct NcclAbort {
    aborted: Arc<AtomicBool>,
}

impl NcclAbort {
    pub fn new() -> Self {
        Self::default()
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

impl Abort for NcclAbort {
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }
}

/// An NCCL communicator of one rank, on one CUDA device.
#[derive(Debug)]
pub struct Nccl {
    /// Null once aborted.
    comm: sys::ncclComm_t,
    /// The stream below, owned here (cudarc's wrapper only borrows it) and destroyed on drop.
    raw_stream: cudarc::driver::sys::CUstream,
    stream: Arc<CudaStream>,
    /// Device copy of a host buffer being reduced; grows to the largest buffer seen.
    scratch: Option<CudaSlice<f32>>,
    /// Recorded on candle's stream: the reduction's input is ready.
    ready: CudaEvent,
    /// Recorded on this stream after a reduction: its completion is polled, never waited for blindly.
    done: CudaEvent,
    rank: u32,
    world_size: u32,
    timeout: Duration,
    abort: NcclAbort,
    /// All-reduces started so far, for messages.
    ops: u64,
    /// Set by the first failure: the communicator is aborted and cannot be used again.
    broken: Option<String>,
}

// SAFETY: NCCL communicators may be used from any thread as long as calls are not concurrent; every call goes
// through `&mut self` (or `Drop`), so they never are. The abort handle only touches an atomic flag.
unsafe impl Send for Nccl {}

/// Why a reduction or the set-up ended early.
enum Interrupted {
    Aborted,
    Timeout,
    Failed(String),
}

type Waited = std::result::Result<(), Interrupted>;

impl Nccl {
    /// Joins the communicator of `cfg.world_size` ranks on `device`, which must be a CUDA device. Blocks until every
    /// rank has joined, `cfg.timeout` passes, or `abort` fires.
    pub fn connect(device: &Device, cfg: NcclConfig, abort: NcclAbort) -> Result<Nccl> {
        let rank = cfg.rank;
        let fail = |message: String| Error::Nccl {
            rank: Some(rank),
            message,
        };
        let problem = if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            Some(format!("rank {} is not below world size {}", cfg.rank, cfg.world_size))
        } else if cfg.unique_id.len() != UNIQUE_ID_LEN {
            Some(format!(
                "the assignment's NCCL unique id has {} bytes, not {UNIQUE_ID_LEN}: are the coordinator and the \
                 workers the same Lockstep version?",
                cfg.unique_id.len()
            ))
        } else if cfg.timeout.is_zero() {
            Some("the timeout is zero".into())
        } else {
            None
        };
        if let Some(p) = problem {
            return Err(fail(p));
        }
        let Device::Cuda(cuda) = device else {
            return Err(fail("NCCL needs a CUDA device; this worker computes on the CPU".into()));
        };
        let driver = |what: &str, e: DriverError| fail(format!("{what}: {e}"));
        let context = cuda.cuda_stream().context().clone();
        context
            .bind_to_thread()
            .map_err(|e| driver("bind the CUDA context", e))?;
        let ready = context.new_event(None).map_err(|e| driver("create a CUDA event", e))?;
        let done = context.new_event(None).map_err(|e| driver("create a CUDA event", e))?;
        let raw_stream =
            cudarc::driver::result::stream::create(cudarc::driver::result::stream::StreamKind::NonBlocking)
                .map_err(|e| driver("create a CUDA stream", e))?;
        // SAFETY: a stream of this context that `Nccl` owns and destroys only after everything using it is gone.
        let stream = unsafe { context.wrap_borrowed_stream(raw_stream) };
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (dst, &src) in id.internal.iter_mut().zip(&cfg.unique_id) {
            *dst = src as std::ffi::c_char;
        }
        let mut config = nonblocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` outlive the call; the id is passed by value. Out-of-range sizes saturate and
        // NCCL refuses them.
        let started = unsafe {
            sys::ncclCommInitRankConfig(
                &mut comm,
                c_int::try_from(cfg.world_size).unwrap_or(c_int::MAX),
                id,
                c_int::try_from(cfg.rank).unwrap_or(c_int::MAX),
                &mut config,
            )
        };
        // From here on, dropping `nccl` ends the communicator and destroys the stream.
        let mut nccl = Nccl {
            comm,
            raw_stream,
            stream,
            scratch: None,
            ready,
            done,
            rank,
            world_size: cfg.world_size,
            timeout: cfg.timeout,
            abort,
            ops: 0,
            broken: None,
        };
        let waited = if pending_or_ok(started) {
            nccl.wait(Instant::now() + cfg.timeout, || Ok(true))
        } else {
            Err(Interrupted::Failed(nccl.last_error(started)))
        };
        let why = match waited {
            Ok(()) => {
                tracing::debug!(rank, world_size = cfg.world_size, "NCCL communicator ready");
                return Ok(nccl);
            }
            Err(why) => why,
        };
        let error = match why {
            Interrupted::Aborted => Error::Aborted(format!("NCCL set-up of rank {rank} interrupted")),
            Interrupted::Timeout => fail(format!(
                "set-up made no progress within the {:?} deadline: did every rank of the generation start, and can \
                 the hosts reach each other (NCCL_SOCKET_IFNAME)?",
                cfg.timeout
            )),
            Interrupted::Failed(detail) => fail(init_failure(&detail)),
        };
        // Dropped as broken: aborted, not finalized (a half-made communicator cannot be).
        nccl.broken = Some(error.to_string());
        Err(error)
    }

    /// Sums `len` f32 at `send` over all ranks into `recv` (which may be `send`) on this stream, and polls until
    /// that has finished.
    fn reduce(&self, send: u64, recv: u64, len: usize) -> Waited {
        let deadline = Instant::now() + self.timeout;
        // SAFETY: both pointers address `len` f32 on this communicator's device that stay allocated until this
        // returns; on success the reduction has finished, and after a failure the callers keep the buffers until
        // they have aborted the communicator (which stops its kernels).
        let r = unsafe {
            sys::ncclAllReduce(
                send as *const c_void,
                recv as *mut c_void,
                len,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        if !pending_or_ok(r) {
            return Err(Interrupted::Failed(self.last_error(r)));
        }
        // A non-blocking communicator may still be enqueueing: finish that before recording the event after it.
        self.wait(deadline, || Ok(true))?;
        self.done
            .record(&self.stream)
            .map_err(driver_failure("record a CUDA event"))?;
        self.wait(deadline, || {
            self.done
                .try_is_complete()
                .map_err(|e| format!("the all-reduce kernel failed: {e}"))
        })
    }

    /// Host → scratch buffer, sum in place across ranks, → host.
    fn reduce_host(&mut self, buf: &mut [f32]) -> Waited {
        self.bind()?;
        let mut scratch = match self.scratch.take() {
            Some(s) if s.len() >= buf.len() => s,
            // A smaller old buffer is freed first: the new one may need its memory.
            _ => self
                .stream
                .alloc_zeros::<f32>(buf.len())
                .map_err(driver_failure("allocate the device buffer"))?,
        };
        let result = self.reduce_host_via(&mut scratch, buf);
        self.scratch = Some(scratch);
        result
    }

    fn reduce_host_via(&self, scratch: &mut CudaSlice<f32>, buf: &mut [f32]) -> Waited {
        let stream = &self.stream;
        let mut view = scratch.slice_mut(0..buf.len());
        stream
            .memcpy_htod(&*buf, &mut view)
            .map_err(driver_failure("copy gradients to the GPU"))?;
        let ptr = {
            let (ptr, _in_use) = view.device_ptr_mut(stream);
            ptr
        };
        self.reduce(ptr, ptr, buf.len())?;
        // The stream has nothing left before this copy, so its implicit synchronisation cannot hang.
        stream
            .memcpy_dtoh(&view, buf)
            .map_err(driver_failure("copy gradients from the GPU"))
    }

    /// `src` (on candle's stream for this device) summed across ranks into a new buffer on that device. After a
    /// failure the new buffer goes to `orphan`, to be freed only once the communicator is aborted (its kernel may
    /// still write there).
    fn reduce_device(
        &self,
        src: &CudaStorage,
        layout: &Layout,
        orphan: &RefCell<Option<CudaSlice<f32>>>,
    ) -> std::result::Result<CudaStorage, Interrupted> {
        self.bind()?;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| Interrupted::Failed("the gradient buffer is not contiguous".into()))?;
        let len = end - start;
        let src_slice = src
            .as_cuda_slice::<f32>()
            .map_err(|e| Interrupted::Failed(format!("the gradient buffer is not f32: {e}")))?
            .slice(start..end);
        let device = &src.device;
        // SAFETY: every element is written by the reduction before anyone reads it.
        let mut dst = unsafe { device.alloc::<f32>(len) }
            .map_err(|e| Interrupted::Failed(format!("allocate the reduced buffer: {e}")))?;
        // The input (and the allocation just queued) come from candle's stream: the reduction waits for them.
        let candle_stream = device.cuda_stream();
        self.ready
            .record(&candle_stream)
            .map_err(driver_failure("record a CUDA event"))?;
        self.stream
            .wait(&self.ready)
            .map_err(driver_failure("order the reduction after the gradients"))?;
        let send = {
            let (ptr, _in_use) = src_slice.device_ptr(&self.stream);
            ptr
        };
        let recv = {
            let (ptr, _in_use) = dst.device_ptr_mut(&self.stream);
            ptr
        };
        match self.reduce(send, recv, len) {
            Ok(()) => Ok(CudaStorage::wrap_cuda_slice(dst, device.clone())),
            Err(why) => {
                *orphan.borrow_mut() = Some(dst);
                Err(why)
            }
        }
    }

    fn bind(&self) -> Waited {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver_failure("bind the CUDA context"))
    }

    /// Polls until the communicator has no operation in progress and `finished` says so too; fails on the abort
    /// flag, at `deadline`, or on an asynchronous NCCL error.
    fn wait(&self, deadline: Instant, mut finished: impl FnMut() -> std::result::Result<bool, String>) -> Waited {
        let mut polls = 0u32;
        loop {
            if self.abort.is_aborted() {
                return Err(Interrupted::Aborted);
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator (it is null only after abort_comm, after which nothing waits).
            let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if r != sys::ncclResult_t::ncclSuccess {
                return Err(Interrupted::Failed(self.last_error(r)));
            }
            match state {
                sys::ncclResult_t::ncclInProgress => {}
                sys::ncclResult_t::ncclSuccess => {
                    if finished().map_err(Interrupted::Failed)? {
                        return Ok(());
                    }
                }
                failed => return Err(Interrupted::Failed(self.last_error(failed))),
            }
            if Instant::now() >= deadline {
                return Err(Interrupted::Timeout);
            }
            polls = polls.saturating_add(1);
            if polls < SPIN_POLLS {
                std::thread::yield_now();
            } else {
                std::thread::sleep(POLL_SLEEP);
            }
        }
    }

    /// NCCL's name for `r` and, when it has one, its own account of the last failure (on this communicator, or in
    /// this process before there was one: NCCL accepts a null communicator here).
    fn last_error(&self, r: sys::ncclResult_t) -> String {
        let mut out = describe(r);
        // SAFETY: a live communicator or null; NCCL returns a NUL-terminated string it owns, or null.
        let last = unsafe { sys::ncclGetLastError(self.comm) };
        if !last.is_null() {
            // SAFETY: non-null and NUL-terminated.
            let text = unsafe { CStr::from_ptr(last) }.to_string_lossy();
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            if !text.is_empty() {
                out = format!("{out}: {text}");
            }
        }
        out
    }

    /// Ends a healthy communicator cleanly: `ncclCommFinalize` lets this rank's last sends reach its peers (an abort
    /// could cut them off and leave a peer hanging until its deadline), then `ncclCommDestroy`. A broken, aborted or
    /// unfinishable one is aborted.
    fn close(&mut self) {
        if self.comm.is_null() {
            return;
        }
        if self.broken.is_none() && !self.abort.is_aborted() && self.bind().is_ok() {
            // SAFETY: a live communicator, used by no other thread.
            let r = unsafe { sys::ncclCommFinalize(self.comm) };
            if pending_or_ok(r) && self.wait(Instant::now() + self.timeout, || Ok(true)).is_ok() {
                // SAFETY: finalized; never used again.
                let _ = unsafe { sys::ncclCommDestroy(self.comm) };
                self.comm = std::ptr::null_mut();
                return;
            }
        }
        self.abort_comm();
    }

    /// Aborts the communicator (stopping whatever NCCL kernel still runs) and forgets it.
    fn abort_comm(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: a live communicator, used by no other thread, never used again.
        let _ = unsafe { sys::ncclCommAbort(self.comm) };
        self.comm = std::ptr::null_mut();
    }

    /// Refuses a call on an aborted or broken communicator; else counts it and names it for messages.
    fn start(&mut self, len: usize) -> Result<String> {
        let rank = self.rank;
        if self.abort.is_aborted() {
            self.abort_comm();
            return Err(Error::Aborted(format!(
                "the NCCL communicator of rank {rank} was aborted"
            )));
        }
        if let Some(why) = &self.broken {
            return Err(Error::Aborted(format!(
                "the NCCL communicator of rank {rank} is unusable after an earlier failure ({why}): re-form the \
                 generation"
            )));
        }
        self.ops += 1;
        Ok(format!("all-reduce #{} ({len} floats)", self.ops))
    }

    /// After a failed call the communicator's state is unknown: abort it, so that peers blocked on this rank fail
    /// too instead of waiting for their own deadline, and refuse every later call.
    fn fail(&mut self, what: &str, why: Interrupted) -> Error {
        self.abort_comm();
        let rank = self.rank;
        let error = match why {
            Interrupted::Aborted => Error::Aborted(format!("NCCL {what} of rank {rank} interrupted")),
            Interrupted::Timeout => Error::Nccl {
                rank: Some(rank),
                message: format!(
                    "{what} made no progress within the {:?} deadline: is every worker alive, or slower than the \
                     deadline allows (cluster.collective_timeout_secs)?",
                    self.timeout
                ),
            },
            Interrupted::Failed(detail) => Error::Nccl {
                rank: Some(rank),
                message: format!("{what} failed: {detail}"),
            },
        };
        self.broken = Some(error.to_string());
        error
    }
}

impl Collective for Nccl {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let what = self.start(buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.reduce_host(buf).map_err(|why| self.fail(&what, why))
    }

    /// Reduces on the device, even at world size 1 (so a one-GPU host can test the whole path).
    fn all_reduce_tensor(&mut self, buf: &Tensor) -> Result<Tensor> {
        if !buf.device().is_cuda() || buf.dtype() != DType::F32 || buf.rank() != 1 {
            return Err(Error::Nccl {
                rank: Some(self.rank),
                message: format!(
                    "all_reduce_tensor needs a 1-D f32 tensor on the GPU, got {:?} {:?} on {:?}",
                    buf.dtype(),
                    buf.dims(),
                    buf.device().location()
                ),
            });
        }
        let what = self.start(buf.elem_count())?;
        let op = DeviceAllReduce {
            nccl: self,
            failure: RefCell::new(None),
            orphan: RefCell::new(None),
        };
        let result = buf.apply_op1_no_bwd(&op);
        let DeviceAllReduce { failure, orphan, .. } = op;
        let error = match (result, failure.into_inner()) {
            (Ok(t), None) => return Ok(t),
            (_, Some(why)) => self.fail(&what, why),
            (Err(e), None) => self.fail(&what, Interrupted::Failed(e.to_string())),
        };
        // Aborted now: nothing writes to the orphaned buffer any more.
        drop(orphan);
        Err(error)
    }
}

/// [`Nccl::reduce_device`] as a candle op, which is how a tensor's CUDA storage is reached. The cause of a failure
/// is kept aside, since candle's error type cannot carry it.
struct DeviceAllReduce<'a> {
    nccl: &'a Nccl,
    failure: RefCell<Option<Interrupted>>,
    orphan: RefCell<Option<CudaSlice<f32>>>,
}

impl CustomOp1 for DeviceAllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _storage: &CpuStorage, _layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL reduces GPU tensors only")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match self.nccl.reduce_device(storage, layout, &self.orphan) {
            Ok(out) => Ok((out, layout.shape().clone())),
            Err(why) => {
                *self.failure.borrow_mut() = Some(why);
                candle_core::bail!("NCCL all-reduce failed")
            }
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        self.close();
        // The buffer is freed on the stream, so before the stream goes.
        self.scratch = None;
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: the stream was created in `connect`, and nothing uses it any more.
        let _ = unsafe { cudarc::driver::result::stream::destroy(self.raw_stream) };
    }
}

fn pending_or_ok(r: sys::ncclResult_t) -> bool {
    matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress)
}

/// Maps a failed driver call to a failure that names `what`.
fn driver_failure(what: &'static str) -> impl Fn(DriverError) -> Interrupted {
    move |e| Interrupted::Failed(format!("{what}: {e}"))
}

/// A config like `NCCL_CONFIG_INITIALIZER` with `blocking = 0`. It describes itself as NCCL 2.28's (the pinned
/// library; its fields are a prefix of the newer struct the bindings declare), so any library from 2.28 on reads
/// exactly the fields set here.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF_INT: c_int = c_int::MIN;
    let undef_ptr = std::ptr::null();
    sys::ncclConfig_t {
        size: std::mem::offset_of!(sys::ncclConfig_t, graphUsageMode),
        magic: 0xcafe_beef,
        version: 22800,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: undef_ptr,
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: undef_ptr,
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    }
}

/// NCCL's name and description of a result code.
fn describe(r: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code, or null.
    let text = unsafe { sys::ncclGetErrorString(r) };
    if text.is_null() {
        return format!("{r:?}");
    }
    // SAFETY: non-null, static and NUL-terminated.
    format!("{r:?} ({})", unsafe { CStr::from_ptr(text) }.to_string_lossy())
}

/// A failed set-up, with the fix for the cause everyone meets first.
fn init_failure(detail: &str) -> String {
    if detail.contains("Duplicate GPU") {
        format!(
            "set-up failed: {detail}: two ranks of the generation use one GPU; give every worker its own --device \
             cuda:N"
        )
    } else {
        format!("set-up failed: {detail}")
    }
}
