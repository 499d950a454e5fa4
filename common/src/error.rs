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

    /// The run token is missing or unusable; `origin` says where it was looked for or read from.
    #[error("run token from {origin}: {message}")]
    Token { origin: String, message: String },

    /// A client could not set up or open its connection to the coordinator.
    #[error("coordinator {addr}: {message}")]
    Connect { addr: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line, for a binary's last word. Errors here already print their source; a cause
/// whose text the line already ends with is not repeated.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(err);
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_does_not_repeat_a_cause_the_message_already_holds() {
        let err = Error::Read {
            path: "/nonexist".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "No such file"),
        };
        assert_eq!(one_line(&err), "cannot read /nonexist: No such file");
    }
}
