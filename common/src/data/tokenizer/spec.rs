//! How a user names a tokenizer (`lockstep prepare --tokenizer SPEC`, `data.tokenizer` in a run spec).
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A tokenizer as the user names it: `char`, `byte`, `gpt2`, `hf:PATH/tokenizer.json` or `bpe:VOCAB_SIZE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TokenizerSpec {
    /// One token per distinct character of the corpus (the vocabulary is learned from it).
    Char,
    /// One token per byte.
    Byte,
    /// GPT-2's byte-level BPE (50,257 ids), built in: no download.
    Gpt2,
    /// Any Hugging Face `tokenizer.json`.
    Hf(PathBuf),
    /// A byte-level BPE of this vocabulary size, trained on the corpus.
    Bpe { vocab_size: usize },
}

/// Smallest and largest vocabulary `bpe:N` accepts: the 256 bytes plus the end-of-text token at least, and ids that
/// fit a `u32` shard.
pub const BPE_VOCAB_RANGE: std::ops::RangeInclusive<usize> = 257..=4_000_000;

impl TokenizerSpec {
    /// Whether the vocabulary is learned from the corpus (so preparing it needs a pass over the data first).
    pub fn is_trained(&self) -> bool {
        matches!(self, TokenizerSpec::Char | TokenizerSpec::Bpe { .. })
    }
}

impl fmt::Display for TokenizerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerSpec::Char => f.write_str("char"),
            TokenizerSpec::Byte => f.write_str("byte"),
            TokenizerSpec::Gpt2 => f.write_str("gpt2"),
            TokenizerSpec::Hf(path) => write!(f, "hf:{}", path.display()),
            TokenizerSpec::Bpe { vocab_size } => write!(f, "bpe:{vocab_size}"),
        }
    }
}

impl FromStr for TokenizerSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::Tokenizer(format!("{s:?}: {reason}"));
        match s {
            "char" => return Ok(TokenizerSpec::Char),
            "byte" => return Ok(TokenizerSpec::Byte),
            "gpt2" => return Ok(TokenizerSpec::Gpt2),
            _ => {}
        }
        if let Some(path) = s.strip_prefix("hf:") {
            if path.is_empty() {
                return Err(invalid(
                    "hf: needs the path of a tokenizer.json, e.g. hf:models/gpt2/tokenizer.json".into(),
                ));
            }
            return Ok(TokenizerSpec::Hf(PathBuf::from(path)));
        }
        if let Some(n) = s.strip_prefix("bpe:") {
            let vocab_size: usize = n
                .parse()
                .map_err(|_| invalid(format!("bpe: takes a vocabulary size, e.g. bpe:8192, not {n:?}")))?;
            if !BPE_VOCAB_RANGE.contains(&vocab_size) {
                return Err(invalid(format!(
                    "a BPE vocabulary holds the 256 bytes and the end-of-text token, so it is between {} and {}",
                    BPE_VOCAB_RANGE.start(),
                    BPE_VOCAB_RANGE.end()
                )));
            }
            return Ok(TokenizerSpec::Bpe { vocab_size });
        }
        Err(invalid(
            "expected char, byte, gpt2, hf:PATH/tokenizer.json or bpe:VOCAB_SIZE".into(),
        ))
    }
}

impl TryFrom<String> for TokenizerSpec {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<TokenizerSpec> for String {
    fn from(spec: TokenizerSpec) -> String {
        spec.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for s in ["char", "byte", "gpt2", "hf:models/x/tokenizer.json", "bpe:8192"] {
            let spec: TokenizerSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            "bpe:300".parse::<TokenizerSpec>().unwrap(),
            TokenizerSpec::Bpe { vocab_size: 300 }
        );
    }

    #[test]
    fn bad_specs_say_what_is_accepted() {
        for (s, hint) in [
            ("wordpiece", "expected char"),
            ("hf:", "path of a tokenizer.json"),
            ("bpe:lots", "vocabulary size"),
            ("bpe:100", "between 257"),
        ] {
            let err = s.parse::<TokenizerSpec>().unwrap_err().to_string();
            assert!(err.contains(hint), "{s}: {err}");
        }
    }
}
