//! lockstep-worker: everything that touches tensors. The GPT model, its parameters in canonical order, the
//! optimizer and learning-rate schedule, checkpoints, the gradient collectives (TCP ring on CPU), and the training
//! loop driven by the coordinator's assignment over one gRPC session.
//!
//! It must not make run-level decisions (membership, when the run ends, which checkpoint counts): those are the
//! coordinator's. It must not make the math depend on the world size (DESIGN §3).

pub mod checkpoint;
pub mod collective;
pub mod compute_pool;
pub mod coordinator_link;
pub mod decode;
pub mod device;
pub mod device_grads;
pub mod error;
pub mod flops;
pub mod generate;
pub mod hardware;
pub mod loader;
pub mod model;
pub mod ops;
pub mod optim;
#[cfg(feature = "cuda")]
mod optim_cuda;
pub mod params;
pub mod sampling;
pub mod session;
pub mod sft_eval;
pub mod trainer;
pub mod weight_casts;

pub use error::Error;
