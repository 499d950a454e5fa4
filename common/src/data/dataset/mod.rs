//! Opening a directory of token shards for training: one `lockstep prepare` wrote (`manifest.json`, the shards it
//! lists, and `tokenizer.json`), or — without a manifest — llm.c's layout (`*train*.bin` and `*val*.bin` shards, as
//! llm.c's `fineweb.py` writes them, with the tokenizer named by `data.tokenizer`).
//!
//! Opening always checks what is cheap: every shard exists, its header parses, its size equals what the header
//! says and its token count equals the manifest's; the tokenizer file's SHA-256 equals the manifest's; and
//! `data.tokenizer`, when set, names the manifest's tokenizer. [`DataVerify::Full`] adds one pass over every byte:
//! each shard's SHA-256 against the manifest, and every token id against the tokenizer's vocabulary (the
//! coordinator does this once at start-up; workers do not repeat it). Shards are memory-mapped ([`tokens`]).
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::data::manifest::{MANIFEST_FILE, Manifest, SplitEntry};
use crate::data::tokenizer::{Tokenizer, TokenizerSpec};
use crate::error::{Error, Result};
use crate::spec::DataVerify;

pub mod tokens;
pub mod verify;
pub mod windows;
pub mod write;

pub use tokens::{MappedShard, ShardTokens};
pub use windows::Windows;
pub use write::write_prepared;

/// How the directory is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `manifest.json` + shards + `tokenizer.json`, as `lockstep prepare` writes it.
    Prepared,
    /// llm.c's `*train*.bin` / `*val*.bin` shards, no manifest.
    LlmC,
}

/// An opened directory: its tokenizer and its mapped shards, train and validation, in order.
#[derive(Debug)]
pub struct Dataset {
    pub dir: PathBuf,
    pub layout: Layout,
    pub tokenizer: Tokenizer,
    pub train: Vec<ShardTokens>,
    pub val: Vec<ShardTokens>,
}

impl Dataset {
    /// Opens `dir`, checking it as the module documentation says. `tokenizer` is `data.tokenizer`.
    pub fn open(dir: &Path, tokenizer: Option<&TokenizerSpec>, verify: DataVerify) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Data {
                path: dir.to_path_buf(),
                message: "not a directory; data.path must name the directory lockstep prepare wrote, or a \
                          directory of llm.c .bin shards"
                    .into(),
            });
        }
        if dir.join(MANIFEST_FILE).exists() {
            open_prepared(dir, tokenizer, verify)
        } else {
            open_llmc(dir, tokenizer, verify)
        }
    }
}

fn open_prepared(dir: &Path, wanted: Option<&TokenizerSpec>, verify: DataVerify) -> Result<Dataset> {
    let manifest = Manifest::load(dir)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_err = |message: String| Error::Data {
        path: manifest_path.clone(),
        message,
    };
    let entry = &manifest.tokenizer;
    let recorded: TokenizerSpec = entry.spec.parse().map_err(|e| {
        manifest_err(format!(
            "its tokenizer spec {:?} is not one this Lockstep knows ({e}); prepare the data again",
            entry.spec
        ))
    })?;
    if let Some(want) = wanted
        && *want != recorded
    {
        return Err(Error::Invalid {
            field: "data.tokenizer",
            value: want.to_string(),
            reason: format!(
                "{} says the shards were prepared with the {recorded} tokenizer; remove data.tokenizer (the \
                 directory carries its tokenizer) or prepare the data again with {want}",
                manifest_path.display()
            ),
        });
    }
    let tok_path = dir.join(plain_name(&entry.file, &manifest_path)?);
    let bytes = std::fs::read(&tok_path).map_err(|source| Error::Read {
        path: tok_path.clone(),
        source,
    })?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if !sha.eq_ignore_ascii_case(&entry.sha256) {
        return Err(Error::Data {
            path: tok_path,
            message: format!(
                "SHA-256 {sha}, but manifest.json says {}: this is not the tokenizer the shards were written with; \
                 restore it or re-run lockstep prepare",
                entry.sha256
            ),
        });
    }
    let tokenizer = Tokenizer::load(&tok_path)?;
    if tokenizer.vocab_size() != entry.vocab_size || tokenizer.eot() != Some(entry.eot) {
        return Err(manifest_err(format!(
            "says the tokenizer has {} ids and end-of-text id {}, but {} has {} ids and end-of-text {}; re-run \
             lockstep prepare",
            entry.vocab_size,
            entry.eot,
            tok_path.display(),
            tokenizer.vocab_size(),
            tokenizer.eot().map_or("none".to_string(), |id| id.to_string())
        )));
    }

    let open_split = |split: &SplitEntry, name: &str| -> Result<Vec<MappedShard>> {
        let listed: u64 = split.shards.iter().map(|s| s.tokens).sum();
        if listed != split.tokens {
            return Err(manifest_err(format!(
                "the {name} split says {} tokens but its shards add up to {listed}; re-run lockstep prepare",
                split.tokens
            )));
        }
        split
            .shards
            .iter()
            .map(|e| {
                let path = dir.join(plain_name(&e.file, &manifest_path)?);
                if !path.exists() {
                    return Err(Error::Data {
                        path,
                        message: "listed in manifest.json but missing; restore it or re-run lockstep prepare".into(),
                    });
                }
                let shard = MappedShard::open(&path)?;
                if shard.header().tokens != e.tokens {
                    return Err(Error::Data {
                        path,
                        message: format!(
                            "the header says {} tokens but manifest.json says {}; the shard is not the one \
                             prepared — re-run lockstep prepare",
                            shard.header().tokens,
                            e.tokens
                        ),
                    });
                }
                Ok(shard)
            })
            .collect()
    };
    let train = open_split(&manifest.train, "train")?;
    let val = open_split(&manifest.val, "val")?;
    if verify == DataVerify::Full {
        let entries = manifest.train.shards.iter().chain(&manifest.val.shards);
        let checks: Vec<verify::Check<'_>> = train
            .iter()
            .chain(&val)
            .zip(entries)
            .map(|(shard, e)| verify::Check {
                shard,
                sha256: Some(&e.sha256),
            })
            .collect();
        verify::verify_all(&checks, tokenizer.vocab_size())?;
    }
    Ok(Dataset {
        dir: dir.to_path_buf(),
        layout: Layout::Prepared,
        tokenizer,
        train: train.into_iter().map(ShardTokens::Mapped).collect(),
        val: val.into_iter().map(ShardTokens::Mapped).collect(),
    })
}

fn open_llmc(dir: &Path, wanted: Option<&TokenizerSpec>, verify: DataVerify) -> Result<Dataset> {
    let spec = wanted.ok_or_else(|| Error::Invalid {
        field: "data.tokenizer",
        value: "(none)".into(),
        reason: format!(
            "{} has no {MANIFEST_FILE}, so it is read as llm.c shards (*train*.bin, *val*.bin), which do not say \
             their tokenizer: set data.tokenizer (gpt2 for llm.c's GPT-2 shards), or prepare the data with lockstep \
             prepare",
            dir.display()
        ),
    })?;
    let tokenizer = tokenizer_for(spec)?;
    let (train_paths, val_paths) = llmc_shards(dir)?;
    if train_paths.is_empty() {
        return Err(Error::Data {
            path: dir.to_path_buf(),
            message: format!(
                "no {MANIFEST_FILE} and no *train*.bin shards; point data.path at the directory lockstep prepare \
                 wrote, or at llm.c's shards"
            ),
        });
    }
    let open = |paths: &[PathBuf]| paths.iter().map(|p| MappedShard::open(p)).collect::<Result<Vec<_>>>();
    let (train, val) = (open(&train_paths)?, open(&val_paths)?);
    if verify == DataVerify::Full {
        let checks: Vec<verify::Check<'_>> = train
            .iter()
            .chain(&val)
            .map(|shard| verify::Check { shard, sha256: None })
            .collect();
        verify::verify_all(&checks, tokenizer.vocab_size())?;
    }
    Ok(Dataset {
        dir: dir.to_path_buf(),
        layout: Layout::LlmC,
        tokenizer,
        train: train.into_iter().map(ShardTokens::Mapped).collect(),
        val: val.into_iter().map(ShardTokens::Mapped).collect(),
    })
}

/// The `.bin` files of `dir` whose names contain `train`, then those containing `val`, each sorted by name.
fn llmc_shards(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let read_err = |source| Error::Read {
        path: dir.to_path_buf(),
        source,
    };
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".bin") || !path.is_file() {
            continue;
        }
        if name.contains("train") {
            train.push(path);
        } else if name.contains("val") {
            val.push(path);
        }
    }
    train.sort();
    val.sort();
    Ok((train, val))
}

/// The tokenizer `data.tokenizer` names, for shards that do not carry theirs.
fn tokenizer_for(spec: &TokenizerSpec) -> Result<Tokenizer> {
    match spec {
        // A learned vocabulary needs the text it was learned from, which shards do not have.
        TokenizerSpec::Char => Err(Error::Invalid {
            field: "data.tokenizer",
            value: spec.to_string(),
            reason: "a char vocabulary is learned from text, and llm.c shards carry no tokenizer; prepare the text \
                     with lockstep prepare --tokenizer char and train on that directory"
                .into(),
        }),
        other => Tokenizer::for_text(other, ""),
    }
}

/// `name` if it is a plain file name (shards and the tokenizer live in the directory itself).
fn plain_name<'a>(name: &'a str, manifest: &Path) -> Result<&'a str> {
    if Path::new(name).file_name().and_then(|n| n.to_str()) == Some(name) {
        Ok(name)
    } else {
        Err(Error::Data {
            path: manifest.to_path_buf(),
            message: format!(
                "lists {name:?}, which is not a plain file name in the directory; re-run lockstep prepare"
            ),
        })
    }
}

#[cfg(test)]
mod tests;
