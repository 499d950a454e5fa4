//! The one error type of lockstep-common.
use std::path::PathBuf;

/// Everything that can go wrong while reading a spec or data. Messages name the file, key or value at fault and,
/// where it is not obvious, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {message}")]
    Config { path: String, message: String },

    #[error("invalid config: {field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },

    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },

    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },

    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("run spec JSON: {0}")]
    SpecJson(#[from] serde_json::Error),

    #[error("logging setup: {0}")]
    Telemetry(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
