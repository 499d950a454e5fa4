//! Writing a prepared directory from token ids already in memory — for tests and benchmarks that need one without
//! running `lockstep prepare` on text. The layout is the one `lockstep prepare` writes.
use std::path::Path;

use crate::data::manifest::{FORMAT, Manifest, ShardEntry, SourceEntry, SplitEntry, TOKENIZER_FILE, TokenizerEntry};
use crate::data::shard::{TokenWidth, sha256_file, write_shard};
use crate::data::tokenizer::{Tokenizer, TokenizerSpec};
use crate::error::{Error, Result};

/// Writes `train_<i>.bin` and `val_<i>.bin` shards, `tokenizer.json` and `manifest.json` (last) into `dir` (which
/// must exist). `spec` is what the manifest records as the tokenizer's spec; the tokenizer needs an end-of-text id
/// (those [`Tokenizer::train`] builds have one).
pub fn write_prepared(
    dir: &Path,
    tokenizer: &Tokenizer,
    spec: &TokenizerSpec,
    train: &[Vec<u32>],
    val: &[Vec<u32>],
) -> Result<Manifest> {
    let eot = tokenizer.eot().ok_or_else(|| {
        Error::Tokenizer(format!(
            "{} has no end-of-text id; a prepared directory needs one (build it with Tokenizer::train)",
            tokenizer.describe()
        ))
    })?;
    let width = TokenWidth::for_vocab(tokenizer.vocab_size());
    let split = |name: &str, shards: &[Vec<u32>]| -> Result<SplitEntry> {
        let shards = shards
            .iter()
            .enumerate()
            .map(|(i, tokens)| {
                let file = format!("{name}_{i:06}.bin");
                let path = dir.join(&file);
                write_shard(&path, tokens, width)?;
                Ok(ShardEntry {
                    file,
                    tokens: tokens.len() as u64,
                    sha256: sha256_file(&path)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SplitEntry {
            tokens: shards.iter().map(|s| s.tokens).sum(),
            documents: 0,
            shards,
        })
    };
    let tok_path = dir.join(TOKENIZER_FILE);
    tokenizer.save(&tok_path)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        tokenizer: TokenizerEntry {
            spec: spec.to_string(),
            file: TOKENIZER_FILE.into(),
            sha256: sha256_file(&tok_path)?,
            vocab_size: tokenizer.vocab_size(),
            eot,
        },
        train: split("train", train)?,
        val: split("val", val)?,
        source: SourceEntry {
            inputs: Vec::new(),
            files: 0,
            format: "tokens".into(),
            field: None,
            bytes: 0,
            val_fraction: 0.0,
            skipped_invalid_utf8: 0,
            skipped_empty: 0,
        },
    };
    manifest.save(dir)?;
    Ok(manifest)
}
