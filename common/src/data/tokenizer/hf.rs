//! Hugging Face tokenizers (`hf:PATH/tokenizer.json`, and the byte-level BPEs that `bpe:N` trains), used for plain
//! text: no template tokens (BOS, CLS, …), no truncation or padding, and special tokens in the text are not matched.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokenizers::{Model, ModelWrapper, PreTokenizerWrapper};

use super::{chunks, pretokenize};
use crate::error::{Error, Result};

/// End-of-text spellings, most common first; an `hf:` tokenizer's end-of-text is the first in its vocabulary.
pub const EOT_CANDIDATES: [&str; 5] = ["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>"];

/// Where a Hugging Face tokenizer came from, for [`HfTokenizer::label`].
#[derive(Debug, Clone)]
pub(super) enum Origin {
    /// Trained by `bpe:N` in this process.
    Trained,
    /// Read from this `tokenizer.json`.
    File(PathBuf),
}

#[derive(Clone)]
pub(super) struct HfTokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    eot: Option<(u32, String)>,
    /// Largest id + 1 (ids may have holes).
    vocab_size: usize,
    /// SHA-256 of the canonical serialization: equal digests, equal ids for every text.
    digest: [u8; 32],
    /// Whether long texts may be cut into [`chunks::pieces`] without changing their ids.
    byte_level: bool,
    /// For a plain byte-level BPE, whether ByteLevel adds a space before the text; `None` for other tokenizers.
    /// Such a tokenizer is encoded word by word here (see [`HfTokenizer::encode_words`]), several times faster than
    /// through `tokenizers`' pipeline, to the same ids.
    fast: Option<bool>,
    origin: Origin,
}

impl HfTokenizer {
    /// Reads a Hugging Face `tokenizer.json`.
    pub(super) fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a Hugging Face `tokenizer.json` read from `path`.
    pub(super) fn from_json(text: &str, path: &Path) -> Result<Self> {
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| Error::Data {
            path: path.to_path_buf(),
            message: format!("not a Hugging Face tokenizer.json that this version of `tokenizers` reads: {e}"),
        })?;
        Self::new(inner, Origin::File(path.to_path_buf()))
    }

    pub(super) fn new(mut inner: tokenizers::Tokenizer, origin: Origin) -> Result<Self> {
        let describe = |e: &dyn std::fmt::Display| match &origin {
            Origin::File(path) => Error::Data {
                path: path.clone(),
                message: e.to_string(),
            },
            Origin::Trained => Error::Tokenizer(e.to_string()),
        };
        // Plain text in, ids out: settings for model inputs (fixed lengths) would cut or pad documents.
        inner.with_truncation(None).map_err(|e| describe(&e))?;
        inner.with_padding(None);
        let canonical = inner.to_string(false).map_err(|e| describe(&e))?;
        // Not part of the file: a literal "<|endoftext|>" in a document stays text (see `Tokenizer::encode`).
        inner.set_encode_special_tokens(true);
        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.values().max().map_or(0, |&id| id as usize + 1);
        let eot = EOT_CANDIDATES
            .iter()
            .find_map(|&t| vocab.get(t).map(|&id| (id, t.to_string())));
        let byte_level_pre = match inner.get_pre_tokenizer() {
            Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && inner.get_normalizer().is_none() => Some(b),
            _ => None,
        };
        let byte_level = byte_level_pre.is_some();
        // Added tokens split the text before pre-tokenization; special ones are ignored (`encode_special_tokens`).
        let only_special_added = inner.get_added_tokens_decoder().values().all(|t| t.special);
        let fast = byte_level_pre
            .filter(|_| only_special_added && matches!(inner.get_model(), ModelWrapper::BPE(_)))
            .map(|b| b.add_prefix_space);
        Ok(HfTokenizer {
            inner: Arc::new(inner),
            eot,
            vocab_size,
            digest: Sha256::digest(canonical.as_bytes()).into(),
            byte_level,
            fast,
            origin,
        })
    }

    /// Fails, naming the file and the spellings looked for, when the vocabulary has no end-of-text token.
    pub(super) fn require_eot(&self, path: &Path) -> Result<()> {
        if self.eot.is_some() {
            return Ok(());
        }
        Err(Error::Data {
            path: path.to_path_buf(),
            message: format!(
                "this tokenizer has no end-of-text token to separate documents: none of {} is in its vocabulary; \
                 add one as a special token (e.g. with `tokenizer.add_special_tokens` in Python) and save it again",
                EOT_CANDIDATES.join(", ")
            ),
        })
    }

    pub(super) fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub(super) fn eot(&self) -> Option<u32> {
        self.eot.as_ref().map(|(id, _)| *id)
    }

    /// `bpe` for a tokenizer trained here, `hf:PATH` for one read from a file.
    pub(super) fn label(&self) -> String {
        match &self.origin {
            Origin::Trained => "bpe".into(),
            Origin::File(path) => format!("hf:{}", path.display()),
        }
    }

    pub(super) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(add_prefix_space) = self.fast {
            return self.encode_words(text, add_prefix_space);
        }
        if !self.byte_level || text.len() <= chunks::MAX_PIECE {
            return self.encode_piece(text);
        }
        let mut ids = Vec::with_capacity(text.len() / 3);
        for piece in chunks::pieces(text, chunks::MAX_PIECE) {
            ids.extend(self.encode_piece(piece)?);
        }
        Ok(ids)
    }

    /// What `tokenizers` does for a byte-level BPE without normalizer and with only special added tokens: cut GPT-2
    /// words ([`pretokenize::gpt2_words`]), map their bytes to ByteLevel's characters, and let the BPE model merge
    /// each word (with its cache). A test checks it against the whole pipeline.
    fn encode_words(&self, text: &str, add_prefix_space: bool) -> Result<Vec<u32>> {
        let prefixed;
        let text = if add_prefix_space && !text.is_empty() && !text.starts_with(' ') {
            prefixed = format!(" {text}");
            &prefixed
        } else {
            text
        };
        let model = self.inner.get_model();
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut chars = String::new();
        for word in pretokenize::gpt2_words(text) {
            chars.clear();
            pretokenize::push_byte_chars(word, &mut chars);
            let tokens = model
                .tokenize(&chars)
                .map_err(|e| Error::Tokenizer(format!("{}: cannot encode {word:?}: {e}", self.label())))?;
            ids.extend(tokens.iter().map(|t| t.id));
        }
        Ok(ids)
    }

    fn encode_piece(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("{}: cannot encode the text: {e}", self.label())))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub(super) fn decode(&self, ids: &[u32]) -> String {
        // `tokenizers` drops unknown ids silently; they become U+FFFD here, between runs of known ids.
        let mut out = String::new();
        let mut start = 0;
        for (i, &id) in ids.iter().enumerate() {
            if self.inner.id_to_token(id).is_none() {
                self.decode_run(&ids[start..i], &mut out);
                out.push(char::REPLACEMENT_CHARACTER);
                start = i + 1;
            }
        }
        self.decode_run(&ids[start..], &mut out);
        out
    }

    fn decode_run(&self, run: &[u32], out: &mut String) {
        if run.is_empty() {
            return;
        }
        match self.inner.decode(run, false) {
            Ok(text) => out.push_str(&text),
            Err(_) => out.push(char::REPLACEMENT_CHARACTER),
        }
    }

    /// The Hugging Face `tokenizer.json` text.
    pub(super) fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(format!("{}: cannot serialize: {e}", self.label())))
    }
}

impl PartialEq for HfTokenizer {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the vocabulary: tens of thousands of entries.
        f.debug_struct("HfTokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size)
            .field("eot", &self.eot)
            .field("digest", &hex::encode(self.digest))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::corpus;
    use super::super::{Tokenizer, TokenizerSpec};

    fn saved_bpe(dir: &std::path::Path) -> (Tokenizer, std::path::PathBuf) {
        let bpe = Tokenizer::train(&TokenizerSpec::Bpe { vocab_size: 320 }, corpus(200).into_iter()).unwrap();
        let path = dir.join("tokenizer.json");
        bpe.save(&path).unwrap();
        (bpe, path)
    }

    #[test]
    fn a_saved_bpe_loads_through_hf_with_the_same_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (bpe, path) = saved_bpe(dir.path());
        let spec = TokenizerSpec::Hf(path.clone());
        let trained = Tokenizer::train(&spec, std::iter::empty()).unwrap();
        let text_only = Tokenizer::for_text(&spec, "ignored").unwrap();
        assert_eq!(trained, bpe);
        assert_eq!(text_only, bpe);
        assert_eq!(trained.eot(), bpe.eot());
        assert_eq!(trained.vocab_size(), 320);
        let text = "the lazy dog jumps — naïve ☃";
        assert_eq!(trained.encode(text).unwrap(), bpe.encode(text).unwrap());
        assert_eq!(trained.describe(), format!("hf:{} (320 ids)", path.display()));
    }

    #[test]
    fn hf_without_end_of_text_is_refused_for_prepare() {
        let dir = tempfile::tempdir().unwrap();
        let (_, path) = saved_bpe(dir.path());
        // The same tokenizer with its end-of-text renamed to something no candidate matches.
        let json = std::fs::read_to_string(&path)
            .unwrap()
            .replace("<|endoftext|>", "<|separator|>");
        let renamed = dir.path().join("renamed.json");
        std::fs::write(&renamed, json).unwrap();
        let spec = TokenizerSpec::Hf(renamed.clone());
        let err = Tokenizer::train(&spec, std::iter::empty()).unwrap_err().to_string();
        assert!(
            err.contains("renamed.json") && err.contains("<|endoftext|>, <|end_of_text|>, </s>"),
            "{err}"
        );
        // In-memory text sources add no separators, so they do not need one.
        let tok = Tokenizer::for_text(&spec, "").unwrap();
        assert_eq!(tok.eot(), None);
        assert_eq!(tok.decode(&tok.encode("dog fox").unwrap()), "dog fox");
    }

    #[test]
    fn other_candidates_are_found_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_, path) = saved_bpe(dir.path());
        let json = std::fs::read_to_string(&path).unwrap().replace("<|endoftext|>", "</s>");
        let eos = dir.path().join("eos.json");
        std::fs::write(&eos, json).unwrap();
        let tok = Tokenizer::train(&TokenizerSpec::Hf(eos), std::iter::empty()).unwrap();
        assert_eq!(tok.eot(), Some(319));
        assert_eq!(tok.decode(&[319]), "</s>");
    }

    #[test]
    fn long_texts_encode_in_pieces_to_the_same_ids() {
        let bpe = Tokenizer::train(&TokenizerSpec::Bpe { vocab_size: 400 }, corpus(100).into_iter()).unwrap();
        let long = corpus(3000).join(" ");
        assert!(long.len() > super::chunks::MAX_PIECE);
        let super::super::Kind::Hf(hf) = &bpe.kind else {
            panic!("bpe is a Hugging Face tokenizer")
        };
        assert!(hf.byte_level);
        assert_eq!(bpe.encode(&long).unwrap(), hf.encode_piece(&long).unwrap());
    }

    #[test]
    fn missing_or_broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let err = Tokenizer::for_text(&TokenizerSpec::Hf(missing), "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.json"), "{err}");
        let broken = dir.path().join("broken.json");
        std::fs::write(&broken, r#"{"model": {"type": "BPE", "vocab": 3}}"#).unwrap();
        let err = Tokenizer::for_text(&TokenizerSpec::Hf(broken), "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.json") && err.contains("Hugging Face"), "{err}");
    }

    #[test]
    fn the_word_by_word_encoder_matches_the_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        let (bpe, path) = saved_bpe(dir.path());
        // The same model with ByteLevel's add_prefix_space on, as RoBERTa-style tokenizers have it.
        let json = std::fs::read_to_string(&path).unwrap().replacen(
            "\"add_prefix_space\": false",
            "\"add_prefix_space\": true",
            1,
        );
        let prefixed = dir.path().join("prefixed.json");
        std::fs::write(&prefixed, json).unwrap();
        let prefixed = Tokenizer::for_text(&TokenizerSpec::Hf(prefixed), "").unwrap();
        let pieces = [
            "the",
            " fox",
            "'s",
            "naïve",
            " café",
            "日本",
            "123",
            "!!",
            " ",
            "  ",
            "\n",
            "\t",
            "\u{3000}",
            "😀",
            "<|endoftext|>",
            "x",
            "Straße",
            "--",
            "e\u{301}",
        ];
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let mut next = |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        for tok in [&bpe, &prefixed] {
            let super::super::Kind::Hf(hf) = &tok.kind else {
                panic!("a Hugging Face tokenizer")
            };
            assert!(hf.fast.is_some());
            for _ in 0..1000 {
                let text: String = (0..next(16)).map(|_| pieces[next(pieces.len())]).collect();
                assert_eq!(tok.encode(&text).unwrap(), hf.encode_piece(&text).unwrap(), "{text:?}");
            }
        }
    }
}
