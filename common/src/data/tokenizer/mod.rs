//! Character- and byte-level tokenizers. A char vocabulary is learned from the corpus (sorted distinct characters),
//! so every process that reads the same corpus derives the same ids; checkpoints store it as `tokenizer.json`.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::spec::TokenizerKind;

mod spec;
pub use spec::{BPE_VOCAB_RANGE, TokenizerSpec};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Tokenizer {
    /// Token id = position of the character in `chars` (sorted, distinct).
    Char { chars: String },
    /// Token id = byte value.
    Byte,
}

impl Tokenizer {
    /// The tokenizer of `kind` for `text` (a char vocabulary is learned from it).
    pub fn learn(kind: TokenizerKind, text: &str) -> Self {
        match kind {
            TokenizerKind::Byte => Tokenizer::Byte,
            TokenizerKind::Char => {
                let set: std::collections::BTreeSet<char> = text.chars().collect();
                Tokenizer::Char {
                    chars: set.into_iter().collect(),
                }
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char { chars } => chars.chars().count(),
            Tokenizer::Byte => 256,
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Byte => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Char { chars } => {
                let vocab: Vec<char> = chars.chars().collect();
                text.chars()
                    .map(|c| {
                        vocab.binary_search(&c).map(|i| i as u32).map_err(|_| {
                            Error::Tokenizer(format!(
                                "character {c:?} is not in the vocabulary of {} characters",
                                vocab.len()
                            ))
                        })
                    })
                    .collect()
            }
        }
    }

    /// Decodes ids; ids outside the vocabulary (possible when the model's vocabulary is padded) become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Byte => {
                let bytes: Vec<u8> = ids.iter().map(|&i| u8::try_from(i).unwrap_or(b'?')).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Char { chars } => {
                let vocab: Vec<char> = chars.chars().collect();
                ids.iter()
                    .map(|&i| vocab.get(i as usize).copied().unwrap_or('\u{FFFD}'))
                    .collect()
            }
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            message: format!("not a Lockstep tokenizer: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_round_trip_and_sorted_ids() {
        let tok = Tokenizer::learn(TokenizerKind::Char, "hello, world");
        assert_eq!(tok.vocab_size(), 9);
        let ids = tok.encode("world hello").unwrap();
        assert_eq!(tok.decode(&ids), "world hello");
        assert_eq!(tok.encode(" ").unwrap(), vec![0]); // ' ' sorts first
        assert!(tok.encode("z").unwrap_err().to_string().contains("'z'"));
    }

    #[test]
    fn byte_round_trip_utf8() {
        let tok = Tokenizer::learn(TokenizerKind::Byte, "");
        let text = "naïve ☃";
        assert_eq!(tok.decode(&tok.encode(text).unwrap()), text);
        assert_eq!(tok.vocab_size(), 256);
    }

    #[test]
    fn save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let tok = Tokenizer::learn(TokenizerKind::Char, "0123456789+=\n");
        tok.save(&path).unwrap();
        assert_eq!(Tokenizer::load(&path).unwrap(), tok);
    }
}
