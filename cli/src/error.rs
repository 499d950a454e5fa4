//! The one error type of lockstep-cli.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] lockstep_common::Error),

    #[error(transparent)]
    Worker(#[from] lockstep_worker::Error),

    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },

    #[error(
        "cannot find the {name} binary next to {beside} or on PATH; build the binaries first (cargo build --bins, \
         with --release for a release run; cargo test --workspace builds them too)"
    )]
    MissingBinary { name: String, beside: PathBuf },

    #[error("{process}: {message}")]
    Process { process: String, message: String },

    #[error("coordinator {addr}: {message}")]
    Coordinator { addr: String, message: String },

    #[error(
        "{reference} has {ref_lines} lines but {hyp} has {hyp_lines}: every --ref file needs one line per line of \
         --hyp (one segment per line)"
    )]
    LineCount {
        hyp: PathBuf,
        hyp_lines: usize,
        reference: PathBuf,
        ref_lines: usize,
    },

    #[error("{path} line {line}: {field} {message}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },

    #[error("{0}")]
    Usage(String),

    /// A part of `bench train --profile` failed (e.g. its shape did not fit in device memory).
    #[error("profile part {part}: {source}")]
    Profile {
        part: String,
        #[source]
        source: Box<Error>,
    },

    #[error(
        "{}: the model has no chat tokens (model.vocab_size {vocab_size}, the chat template needs {needed}); \
         fine-tune it with data.source = \"sft\" first (see README \"Fine-tuning\")",
        checkpoint.display()
    )]
    NotChatModel {
        checkpoint: PathBuf,
        vocab_size: usize,
        needed: usize,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
