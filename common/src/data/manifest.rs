//! `manifest.json` of a prepared data directory (written by `lockstep prepare`, read by the coordinator and workers):
//! the tokenizer, and for each split its shards with token counts and SHA-256. It is written last and atomically, so
//! a directory with a manifest is complete.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MANIFEST_FILE: &str = "manifest.json";
/// The tokenizer a prepared directory carries, so training, evaluation and generation use the same one.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Identifies the layout below; bumped on an incompatible change.
pub const FORMAT: &str = "lockstep-prepared/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    pub tokenizer: TokenizerEntry,
    pub train: SplitEntry,
    pub val: SplitEntry,
    pub source: SourceEntry,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerEntry {
    /// As given to `--tokenizer` (`char`, `byte`, `gpt2`, `hf:PATH`, `bpe:N`).
    pub spec: String,
    /// The tokenizer's file in the directory ([`TOKENIZER_FILE`]).
    pub file: String,
    /// SHA-256 of that file: the tokenizer's identity.
    pub sha256: String,
    pub vocab_size: usize,
    /// The end-of-text id prepended to every document.
    pub eot: u32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitEntry {
    /// Tokens over all shards of the split.
    pub tokens: u64,
    /// Documents that start in this split.
    pub documents: u64,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// File name inside the directory.
    pub file: String,
    pub tokens: u64,
    pub sha256: String,
}

/// Where the tokens came from and how they were cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceEntry {
    /// The `--input` paths as given.
    pub inputs: Vec<String>,
    /// Files read, in the order their tokens appear.
    pub files: u64,
    /// `text` or `jsonl`.
    pub format: String,
    /// The JSON field holding a document's text (`jsonl` only).
    pub field: Option<String>,
    /// Bytes of input read.
    pub bytes: u64,
    pub val_fraction: f64,
    /// Lines (text) or records (jsonl) left out because they were not valid UTF-8 (`--invalid-utf8 skip`).
    pub skipped_invalid_utf8: u64,
    /// Records left out because they had no text in `field` (jsonl), or empty files (text).
    pub skipped_empty: u64,
}

impl Manifest {
    /// Reads `dir/manifest.json`; a missing or malformed file names the directory and what to do.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Data {
            path: path.clone(),
            message: format!("not a Lockstep data manifest ({e}); prepare the data again with lockstep prepare"),
        })?;
        if manifest.format != FORMAT {
            return Err(Error::Data {
                path,
                message: format!(
                    "format {:?} is not {FORMAT:?}, the one this Lockstep reads; prepare the data again with this \
                     version's lockstep prepare",
                    manifest.format
                ),
            });
        }
        Ok(manifest)
    }

    /// Writes `dir/manifest.json` atomically (temporary file, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self)?;
        write_atomic(&path, text.as_bytes())
    }

    pub fn split(&self, split: crate::data::corpus::Split) -> &SplitEntry {
        match split {
            crate::data::corpus::Split::Train => &self.train,
            crate::data::corpus::Split::Val => &self.val,
        }
    }
}

/// Writes `bytes` to `path` through `<path>.tmp`, fsynced and renamed, so a reader sees the old file or the new
/// one, never part of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let write_err = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        // Best effort: the write already failed, and a leftover temporary file is harmless.
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            tokenizer: TokenizerEntry {
                spec: "gpt2".into(),
                file: TOKENIZER_FILE.into(),
                sha256: "ab".repeat(32),
                vocab_size: 50257,
                eot: 50256,
            },
            train: SplitEntry {
                tokens: 10,
                documents: 2,
                shards: vec![ShardEntry {
                    file: "train_000000.bin".into(),
                    tokens: 10,
                    sha256: "cd".repeat(32),
                }],
            },
            val: SplitEntry::default(),
            source: SourceEntry {
                inputs: vec!["corpus/".into()],
                files: 1,
                format: "text".into(),
                field: None,
                bytes: 40,
                val_fraction: 0.1,
                skipped_invalid_utf8: 0,
                skipped_empty: 0,
            },
        }
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        sample().save(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), sample());
        assert!(!dir.path().join("manifest.json.tmp").exists());
    }

    #[test]
    fn wrong_format_and_garbage_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample();
        m.format = "lockstep-prepared/99".into();
        m.save(dir.path()).unwrap();
        let err = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("manifest.json") && err.contains("lockstep-prepared/99"),
            "{err}"
        );
        std::fs::write(dir.path().join(MANIFEST_FILE), "{}").unwrap();
        let err = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a Lockstep data manifest"), "{err}");
        let err = Manifest::load(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
