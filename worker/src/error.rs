//! The one error type of lockstep-worker.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Common(#[from] lockstep_common::Error),

    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("ring peer {peer}: {message}")]
    Ring { peer: String, message: String },

    #[error("ring config: {0}")]
    RingConfig(String),

    /// `rank`: in the communicator, once there is one.
    #[error("NCCL{}: {message}", .rank.map(|r| format!(" rank {r}")).unwrap_or_default())]
    Nccl { rank: Option<u32>, message: String },

    #[error("model: {0}")]
    Model(String),

    #[error("data loader: {0}")]
    Loader(String),

    #[error("coordinator {addr}: {message}")]
    Coordinator { addr: String, message: String },

    #[error("rejected by the coordinator: {0}")]
    Rejected(String),

    #[error("aborted: {0}")]
    Aborted(String),

    /// A bad flag or argument; the message names it.
    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
