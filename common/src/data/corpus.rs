//! Turns a [`DataSpec`] into a tokenizer and train/validation token streams, cut into fixed windows of
//! `seq_len + 1` tokens (inputs and next-token targets overlap by all but one).
use std::path::PathBuf;

use crate::data::addition::{self, Problem};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::spec::{DataSource, RunSpec};

/// Most addition problems generated for operands of many digits.
const ADDITION_LIMIT: usize = 200_000;

#[derive(Debug, Clone)]
pub struct Corpus {
    pub tokenizer: Tokenizer,
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    pub seq_len: usize,
    /// The held-out problems, for the addition task's accuracy.
    pub val_problems: Vec<Problem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Corpus {
    /// Loads the corpus a spec names. Deterministic: every process gets the same tokens.
    pub fn load(spec: &RunSpec) -> Result<Self> {
        let d = &spec.data;
        let seq_len = spec.train.seq_len;
        // Interim until the tokenizer module grows gpt2 / hf: support for in-memory text.
        let kind = match &d.tokenizer {
            None | Some(crate::spec::TokenizerSpec::Char) => crate::spec::TokenizerKind::Char,
            Some(crate::spec::TokenizerSpec::Byte) => crate::spec::TokenizerKind::Byte,
            Some(other) => {
                return Err(Error::Invalid {
                    field: "data.tokenizer",
                    value: other.to_string(),
                    reason: "not supported for this data source yet".into(),
                });
            }
        };
        let (tokenizer, train, val, val_problems, origin) = match d.source {
            DataSource::Addition => {
                let (train, val) = addition::split(d.addition_digits, d.val_fraction, spec.run.seed, ADDITION_LIMIT);
                let tokenizer = Tokenizer::learn(kind, addition::ALPHABET);
                let text = |ps: &[Problem]| ps.iter().map(Problem::line).collect::<String>();
                let train_ids = tokenizer.encode(&text(&train))?;
                let val_ids = tokenizer.encode(&text(&val))?;
                (
                    tokenizer,
                    train_ids,
                    val_ids,
                    val,
                    PathBuf::from("<built-in addition data>"),
                )
            }
            DataSource::Prepared => {
                return Err(Error::Invalid {
                    field: "data.source",
                    value: "prepared".into(),
                    reason: "not supported yet".into(),
                });
            }
            DataSource::Text => {
                let path = d.path.clone().unwrap_or_default();
                let bytes = std::fs::read(&path).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
                let text = String::from_utf8(bytes).map_err(|e| Error::Data {
                    path: path.clone(),
                    message: format!(
                        "not UTF-8 (first bad byte at offset {}); convert the file to UTF-8 (e.g. with iconv)",
                        e.utf8_error().valid_up_to()
                    ),
                })?;
                let tokenizer = Tokenizer::learn(kind, &text);
                let ids = tokenizer.encode(&text)?;
                let n_val = ((ids.len() as f64) * d.val_fraction).round() as usize;
                let split_at = ids.len() - n_val;
                (
                    tokenizer,
                    ids[..split_at].to_vec(),
                    ids[split_at..].to_vec(),
                    Vec::new(),
                    path,
                )
            }
        };
        let corpus = Corpus {
            tokenizer,
            train,
            val,
            seq_len,
            val_problems,
        };
        for (split, name) in [(Split::Train, "training"), (Split::Val, "validation")] {
            if corpus.num_windows(split) == 0 {
                return Err(Error::Data {
                    path: origin,
                    message: format!(
                        "the {name} split has {} tokens, fewer than one window of train.seq_len + 1 = {}; use more data or a shorter sequence",
                        corpus.tokens(split).len(),
                        seq_len + 1
                    ),
                });
            }
        }
        spec.vocab_size(corpus.tokenizer.vocab_size())?;
        Ok(corpus)
    }

    fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Non-overlapping windows of `seq_len + 1` tokens (the last token of one is the first of the next).
    pub fn num_windows(&self, split: Split) -> u64 {
        (self.tokens(split).len().saturating_sub(1) / self.seq_len) as u64
    }

    /// Inputs and targets of window `index`: `tokens[i·T .. i·T+T]` and the same shifted by one.
    pub fn window(&self, split: Split, index: u64) -> (&[u32], &[u32]) {
        let tokens = self.tokens(split);
        let start = index as usize * self.seq_len;
        (
            &tokens[start..start + self.seq_len],
            &tokens[start + 1..start + self.seq_len + 1],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addition_windows_start_on_a_problem() {
        let mut spec = RunSpec::default();
        spec.train.seq_len = 40;
        let corpus = Corpus::load(&spec).unwrap();
        assert_eq!(corpus.tokenizer.vocab_size(), 13);
        let (x, y) = corpus.window(Split::Train, 3);
        let text = corpus.tokenizer.decode(x);
        assert_eq!(text.len(), 40);
        assert_eq!(text.as_bytes()[2], b'+', "{text}");
        assert_eq!(text.as_bytes()[9], b'\n', "{text}");
        assert_eq!(&corpus.tokenizer.decode(y)[..39], &text[1..]);
        assert_eq!(corpus.val_problems.len(), 1000);
    }

    #[test]
    fn text_corpus_splits_and_names_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt");
        std::fs::write(&path, "abcdefghij".repeat(50)).unwrap();
        let mut spec = RunSpec::default();
        spec.data.source = DataSource::Text;
        spec.data.path = Some(path.clone());
        spec.train.seq_len = 8;
        let corpus = Corpus::load(&spec).unwrap();
        assert_eq!(corpus.train.len() + corpus.val.len(), 500);
        assert_eq!(corpus.val.len(), 50);
        spec.data.path = Some(dir.path().join("missing.txt"));
        let err = Corpus::load(&spec).unwrap_err().to_string();
        assert!(err.contains("missing.txt"), "{err}");
    }
}
