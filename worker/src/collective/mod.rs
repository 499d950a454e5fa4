//! Gradient collectives: summing flat f32 buffers across the ranks of one generation.
//!
//! The training loop holds a `Box<dyn Collective>` and must not be able to tell transports apart:
//! [`Local`] for a world of one, [`Ring`] (TCP) between CPU workers, and `Nccl` between CUDA workers in a build with
//! the `cuda` feature. Every implementation must
//! leave all ranks with bitwise-identical buffers, because the workers' parameters must stay
//! bitwise identical after every step, and must fail rather than hang when a peer is gone.

mod bench;
mod frame;
mod handshake;
mod link;
#[cfg(feature = "cuda")]
mod nccl;
mod ring;
#[cfg(test)]
mod tests;

use std::ops::Range;

pub use bench::{AllReduceBench, bench_allreduce};
pub use link::RingListener;
#[cfg(feature = "cuda")]
pub use nccl::{Nccl, NcclAbort, NcclConfig, UNIQUE_ID_LEN};
pub use ring::{AbortHandle, Ring, RingConfig};

/// Sums gradient buffers across the ranks of one generation. The training loop holds a
/// `Box<dyn Collective>` and cannot tell transports apart (TCP ring or NCCL).
pub trait Collective: Send {
    fn rank(&self) -> u32;
    fn world_size(&self) -> u32;
    /// Elementwise sum of `buf` over all ranks, in place. Every rank ends with bitwise-identical
    /// contents. Fails (never hangs forever) if a peer is gone or slower than the deadline.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> crate::error::Result<()>;

    /// The elementwise sum over all ranks of the 1-D f32 tensor `buf`, on `buf`'s device. This default goes through
    /// host memory and [`Collective::all_reduce_sum`] (what a CPU transport needs anyway); a device transport (NCCL)
    /// reduces the buffer where it lives.
    fn all_reduce_tensor(&mut self, buf: &candle_core::Tensor) -> crate::error::Result<candle_core::Tensor> {
        if self.world_size() <= 1 {
            return Ok(buf.clone());
        }
        let mut host = buf.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut host)?;
        Ok(candle_core::Tensor::from_vec(host, buf.dims(), buf.device())?)
    }
}

/// Interrupts a collective from another thread (the coordinator's abort): the call in progress, and every later
/// one, fails promptly instead of waiting for its deadline.
pub trait Abort: Send + Sync + std::fmt::Debug {
    fn abort(&self);
}

impl Abort for AbortHandle {
    fn abort(&self) {
        AbortHandle::abort(self);
    }
}

/// The NCCL unique id a worker on `device` offers at join: a fresh one on a CUDA device (it is used if this worker
/// becomes rank 0 of an all-CUDA generation), empty on the CPU. A CUDA worker that cannot make one offers none, with
/// a warning: its generation then all-reduces over the TCP ring, which works from GPUs too.
pub fn offered_nccl_id(device: &candle_core::Device) -> Vec<u8> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return nccl::unique_id().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no NCCL id to offer; a generation with this worker uses the TCP ring");
            Vec::new()
        });
    }
    let _ = device;
    Vec::new()
}

/// World size 1: all_reduce is a no-op.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> u32 {
        0
    }

    fn world_size(&self) -> u32 {
        1
    }

    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> crate::error::Result<()> {
        Ok(())
    }
}

/// Elements of chunk `i` when `len` elements are cut into `n` contiguous chunks whose sizes differ
/// by at most one (the first `len % n` chunks get the extra element).
pub(crate) fn chunk_range(len: usize, n: usize, i: usize) -> Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}
