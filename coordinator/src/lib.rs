//! lockstep-coordinator: owns one training run's control plane.
//!
//! It admits workers, forms a generation (ranks, world size, peer addresses), hands out assignments, records the
//! progress workers report (loss, throughput, checksums, committed checkpoints), decides when the run finished or
//! failed, and answers status and the loss history over gRPC together with the standard health and reflection
//! services.
//!
//! What it must not do: link candle or touch tensors, or sit on the per-step data path — gradients travel between
//! workers only, and a slow coordinator must never slow a step. The decisions live in [`machine::RunMachine`], a
//! synchronous state machine with no I/O; [`service`] and [`server`] are thin adapters around it.

pub mod admission;
pub mod auth;
pub mod error;
pub mod history;
pub mod machine;
pub mod progress;
pub mod record;
pub mod server;
pub mod service;
pub mod store;

pub use auth::ServerSecurity;
pub use error::{Error, Result};
pub use machine::{Action, ConnId, Event, Phase, RunMachine, RunOutcome};
pub use server::{RunState, ServeOptions, open_state, run, run_with_signals, serve_state};
