//! The one error type of lockstep-coordinator, and its one mapping to gRPC status codes.
use std::net::SocketAddr;
use std::path::PathBuf;

/// What can stop the coordinator or refuse an RPC. Decisions about workers (rejections, lost workers, diverged
/// ranks) are not errors of this crate: the state machine turns them into `Reject`/`Abort` messages and a failed
/// run outcome.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] lockstep_common::Error),

    #[error("cannot read the listener's local address: {0}")]
    Listener(#[source] std::io::Error),

    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),

    #[error("gRPC server on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },

    #[error("gRPC server on {addr} stopped before the run ended")]
    ServerStopped { addr: SocketAddr },

    /// The worker broke the session protocol (e.g. its first message was not `Join`).
    #[error("session protocol: {0}")]
    Protocol(String),

    #[error("no Join within {secs} s of opening the session; a worker must send Join first")]
    JoinTimeout { secs: u64 },

    #[error("the coordinator is shutting down")]
    ShuttingDown,

    /// A TLS file of `[security]` is missing or not PEM.
    #[error("{field} = {path}: {message}")]
    TlsFile {
        field: &'static str,
        path: std::path::PathBuf,
        message: String,
    },

    /// The TLS files read but do not make a usable server identity (e.g. the key is not the certificate's).
    #[error("TLS setup from {files} failed: {source}; check that the key belongs to the certificate and both are PEM")]
    TlsConfig {
        files: String,
        #[source]
        source: tonic::transport::Error,
    },

    /// The state directory belongs to another run (or another spec of it); the message says which and what to do.
    #[error("{0}")]
    StateConflict(String),

    #[error("cannot create the state directory {path}: {source}; check cluster.state_dir and its permissions")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{path} is in use by another process: is another lockstep-coordinator running with this cluster.state_dir?"
    )]
    StateLocked { path: PathBuf },

    #[error(
        "cannot open the run state {path}: {source}; if it is damaged or not a lockstep state file, move it away \
         (the coordinator then starts the run afresh) or point cluster.state_dir elsewhere"
    )]
    StateOpen {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },

    #[error(
        "the run state {path} has format version {found}, this lockstep-coordinator reads up to {supported}: \
         run a newer lockstep-coordinator, or point cluster.state_dir elsewhere"
    )]
    StateVersion { path: PathBuf, found: u64, supported: u64 },

    #[error("run state {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },

    #[error(
        "record {seq} of the run state {path} cannot be read: {source}; it was written by an incompatible \
         lockstep-coordinator or the file is damaged"
    )]
    StateRecord {
        path: PathBuf,
        seq: u64,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path} does not exist: no run has kept its state there; give the cluster.state_dir of a run")]
    NoState { path: PathBuf },

    /// Reading a run state without a coordinator (`lockstep history --state-dir`) failed.
    #[error("cannot read the run state {path}: {reason}")]
    StateRead { path: PathBuf, reason: String },

    #[error("this coordinator keeps no run state (it was started without cluster.state_dir), so it has no history")]
    NoHistory,

    #[error("cannot encode a record for the run state {path}: {source}; this is a bug in lockstep-coordinator")]
    StateEncode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Protocol(_) => tonic::Status::invalid_argument(message),
            Error::JoinTimeout { .. } => tonic::Status::deadline_exceeded(message),
            Error::ShuttingDown => tonic::Status::unavailable(message),
            Error::StateConflict(_) | Error::NoHistory => tonic::Status::failed_precondition(message),
            Error::Spec(_) => tonic::Status::failed_precondition(message),
            Error::Listener(_)
            | Error::Reflection(_)
            | Error::Serve { .. }
            | Error::ServerStopped { .. }
            | Error::StateDir { .. }
            | Error::NoState { .. }
            | Error::StateRead { .. }
            | Error::StateLocked { .. }
            | Error::StateOpen { .. }
            | Error::StateVersion { .. }
            | Error::State { .. }
            | Error::StateRecord { .. }
            | Error::StateEncode { .. }
            | Error::TlsFile { .. }
            | Error::TlsConfig { .. } => tonic::Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_errors_are_invalid_argument() {
        let status = tonic::Status::from(Error::Protocol("first message must be Join, got heartbeat".into()));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("got heartbeat"));
        assert_eq!(
            tonic::Status::from(Error::ShuttingDown).code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            tonic::Status::from(Error::JoinTimeout { secs: 30 }).code(),
            tonic::Code::DeadlineExceeded
        );
    }
}
