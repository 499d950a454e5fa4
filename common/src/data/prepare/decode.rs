//! A unit's bytes → its documents' text: the UTF-8 check (fail, or leave out the line / record), and for JSONL the
//! record's `--field`. Runs on the tokenising workers.
use std::path::Path;

use super::read::{Unit, UnitKind};
use super::{InvalidUtf8, PrepareOptions};
use crate::error::{Error, Result};

/// Text of one document, or of part of one (a chunk of a text file).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Piece {
    /// The piece begins a document (the end-of-text id goes before it).
    pub starts_doc: bool,
    pub text: String,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Decoded {
    pub pieces: Vec<Piece>,
    /// Lines (text) or records (JSONL) left out as not UTF-8.
    pub skipped_invalid_utf8: u64,
    /// Records without text in the field (JSONL), empty files (text).
    pub skipped_empty: u64,
}

const SKIP_HINT: &str = "fix the file, or pass --invalid-utf8 skip to leave out what is not UTF-8";

/// Decodes `unit`, a unit of the file at `path`.
pub(super) fn decode(unit: Unit, path: &Path, opts: &PrepareOptions) -> Result<Decoded> {
    match unit.kind {
        UnitKind::Text { doc_start } => decode_text(unit.bytes, doc_start, unit.offset, path, opts.invalid_utf8),
        UnitKind::Jsonl { first_line, ref ends } => {
            decode_jsonl(&unit.bytes, ends, first_line, unit.offset, path, opts)
        }
    }
}

fn decode_text(bytes: Vec<u8>, starts_doc: bool, offset: u64, path: &Path, mode: InvalidUtf8) -> Result<Decoded> {
    let mut out = Decoded::default();
    if bytes.is_empty() {
        out.skipped_empty = u64::from(starts_doc);
        return Ok(out);
    }
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let bad = offset + e.utf8_error().valid_up_to() as u64;
            if mode == InvalidUtf8::Fail {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    message: format!("invalid UTF-8 at byte offset {bad}; {SKIP_HINT}"),
                });
            }
            let bytes = e.into_bytes();
            let mut text = String::with_capacity(bytes.len());
            for line in bytes.split_inclusive(|&b| b == b'\n') {
                match std::str::from_utf8(line) {
                    Ok(line) => text.push_str(line),
                    Err(_) => out.skipped_invalid_utf8 += 1,
                }
            }
            text
        }
    };
    out.pieces.push(Piece { starts_doc, text });
    Ok(out)
}

fn decode_jsonl(
    bytes: &[u8],
    ends: &[usize],
    first_line: u64,
    offset: u64,
    path: &Path,
    opts: &PrepareOptions,
) -> Result<Decoded> {
    let mut out = Decoded::default();
    let mut start = 0;
    for (i, &end) in ends.iter().enumerate() {
        let raw = &bytes[start..end];
        let (line, at) = (first_line + i as u64, offset + start as u64);
        start = end;
        if raw.trim_ascii().is_empty() {
            continue;
        }
        let err = |message: String| Error::Data {
            path: path.to_path_buf(),
            message: format!("line {line} (byte offset {at}): {message}"),
        };
        let record = match std::str::from_utf8(raw) {
            Ok(record) => record,
            Err(e) if opts.invalid_utf8 == InvalidUtf8::Fail => {
                let bad = at + e.valid_up_to() as u64;
                return Err(err(format!("invalid UTF-8 at byte offset {bad}; {SKIP_HINT}")));
            }
            Err(_) => {
                out.skipped_invalid_utf8 += 1;
                continue;
            }
        };
        let value: serde_json::Value = serde_json::from_str(record).map_err(|e| {
            // serde_json counts lines within the record, which is always one line.
            let why = e.to_string().replace(" at line 1 column ", " at column ");
            err(format!(
                "not JSON ({why}); each line of a --format jsonl file must be one JSON object"
            ))
        })?;
        let serde_json::Value::Object(mut fields) = value else {
            return Err(err(format!(
                "a JSON {}, not an object; each line of a --format jsonl file must be one JSON object with a {:?} \
                 field",
                kind(&value),
                opts.field
            )));
        };
        match fields.remove(&opts.field) {
            Some(serde_json::Value::String(text)) if !text.is_empty() => {
                out.pieces.push(Piece { starts_doc: true, text })
            }
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::String(_)) => out.skipped_empty += 1,
            Some(other) => {
                return Err(err(format!(
                    "field {:?} is a JSON {}, not a string; choose the text field with --field",
                    opts.field,
                    kind(&other)
                )));
            }
        }
    }
    Ok(out)
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}
