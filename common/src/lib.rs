//! lockstep-common: what the coordinator, the workers and the CLI must agree on.
//!
//! It owns the wire contract (generated from `proto/lockstep/v1`), the run spec (the TOML config, its environment
//! overrides, model presets and validation), the data formats (tokenizers, the built-in demo corpus, the data
//! plan), the run token and how clients reach the coordinator with it ([`auth`], [`transport`]), and telemetry
//! setup. It must not depend on candle or on any process's runtime state: apart from those two security modules'
//! files and connections, everything here is plain data and pure functions, so both daemons compute identical
//! answers from identical inputs.

pub mod auth;
pub mod data;
pub mod error;
pub mod metrics;
pub mod presets;
pub mod spec;
mod spec_types;
pub mod telemetry;
pub mod transport;

pub use error::Error;
pub use spec::RunSpec;

/// The generated gRPC code for `lockstep.v1`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("lockstep.v1");

    /// Encoded file descriptor set, for the gRPC reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lockstep_descriptor");
}

/// The wire version spoken by this build; the coordinator rejects workers that speak another. Version 2 added
/// `CheckpointCommitted`: a worker prunes checkpoints only when told, so under an older coordinator it never would.
pub const PROTOCOL_VERSION: u32 = 2;
