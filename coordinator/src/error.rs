//! The one error type of lockstep-coordinator, and its one mapping to gRPC status codes.
use std::net::SocketAddr;

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Protocol(_) => tonic::Status::invalid_argument(message),
            Error::JoinTimeout { .. } => tonic::Status::deadline_exceeded(message),
            Error::ShuttingDown => tonic::Status::unavailable(message),
            Error::Spec(_) => tonic::Status::failed_precondition(message),
            Error::Listener(_) | Error::Reflection(_) | Error::Serve { .. } | Error::ServerStopped { .. } => {
                tonic::Status::internal(message)
            }
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
