//! Tokenizers: text ↔ token ids, one facade over five kinds (see [`TokenizerSpec`]).
//!
//! `char` learns its vocabulary from the corpus (sorted distinct characters), so every process that reads the same
//! corpus derives the same ids; `byte` is the 256 byte values; `gpt2` is GPT-2's byte-level BPE, built in
//! (tiktoken-rs, no download); `hf:PATH` is any Hugging Face `tokenizer.json`; `bpe:N` trains a GPT-2-style
//! byte-level BPE on the corpus. Tokenizers built for `lockstep prepare` ([`Tokenizer::train`]) always have an
//! end-of-text token, which prepare puts before every document. Prepared directories and checkpoints store the
//! tokenizer as `tokenizer.json` ([`Tokenizer::save`]), so training, evaluation and generation share it.
use std::path::Path;

use crate::error::{Error, Result};

mod bpe;
mod char_byte;
mod chunks;
mod file;
mod gpt2;
mod hf;
mod pretokenize;
mod spec;
mod stream;

use char_byte::{ByteTokenizer, CharTokenizer};
use gpt2::Gpt2Tokenizer;
pub use hf::EOT_CANDIDATES;
use hf::HfTokenizer;
pub use spec::{BPE_VOCAB_RANGE, TokenizerSpec};
pub use stream::TextStream;

/// The end-of-text token's text for `char`, `byte`, `gpt2` and `bpe` (GPT-2's spelling).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// A tokenizer of any kind. Two tokenizers are equal iff they map text to the same ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenizer {
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Char(CharTokenizer),
    Byte(ByteTokenizer),
    Gpt2(Gpt2Tokenizer),
    /// `hf:PATH` and trained `bpe:N` alike: both are Hugging Face tokenizers.
    Hf(HfTokenizer),
}

impl Tokenizer {
    /// The tokenizer for the in-memory `text` and `addition` data sources, which add no end-of-text token: `char`
    /// learns its vocabulary from `text` and has no end-of-text id (so the addition demo keeps its 13 ids), `byte`
    /// has the 256 byte ids only; `gpt2` and `hf:PATH` are what they are. `bpe:N` must be trained by
    /// `lockstep prepare`.
    pub fn for_text(spec: &TokenizerSpec, text: &str) -> Result<Tokenizer> {
        let kind = match spec {
            TokenizerSpec::Char => Kind::Char(CharTokenizer::learn([text].into_iter(), false)),
            TokenizerSpec::Byte => Kind::Byte(ByteTokenizer { eot: false }),
            TokenizerSpec::Gpt2 => Kind::Gpt2(Gpt2Tokenizer),
            TokenizerSpec::Hf(path) => Kind::Hf(HfTokenizer::from_file(path)?),
            TokenizerSpec::Bpe { .. } => {
                return Err(Error::Invalid {
                    field: "data.tokenizer",
                    value: spec.to_string(),
                    reason: format!(
                        "a BPE vocabulary is trained when the corpus is prepared: run `lockstep prepare --tokenizer \
                         {spec}` and train on the prepared directory (data.source = \"prepared\")"
                    ),
                });
            }
        };
        Ok(Tokenizer { kind })
    }

    /// The tokenizer for `lockstep prepare`; every one it returns has an end-of-text token. `char` learns the
    /// distinct characters of all `texts` (sorted) and puts end-of-text after them; `byte` is the 256 bytes plus
    /// end-of-text = 256; `gpt2` has 50,257 ids, end-of-text 50256; `hf:PATH` uses the first of
    /// [`EOT_CANDIDATES`] in the file's vocabulary; `bpe:N` trains a byte-level BPE of exactly N ids (the 256
    /// byte symbols, merges, and end-of-text = N − 1) on `texts`. `texts` is streamed (memory grows with the
    /// vocabulary statistics, not the corpus); kinds that learn nothing leave it untouched.
    pub fn train<I>(spec: &TokenizerSpec, texts: I) -> Result<Tokenizer>
    where
        I: Iterator<Item = String> + Send,
    {
        let kind = match spec {
            TokenizerSpec::Char => Kind::Char(CharTokenizer::learn(texts, true)),
            TokenizerSpec::Byte => Kind::Byte(ByteTokenizer { eot: true }),
            TokenizerSpec::Gpt2 => Kind::Gpt2(Gpt2Tokenizer),
            TokenizerSpec::Hf(path) => {
                let tok = HfTokenizer::from_file(path)?;
                tok.require_eot(path)?;
                Kind::Hf(tok)
            }
            TokenizerSpec::Bpe { vocab_size } => Kind::Hf(bpe::train(*vocab_size, texts)?),
        };
        Ok(Tokenizer { kind })
    }

    /// Number of ids, end-of-text included; every id the tokenizer produces is below it.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::Char(t) => t.vocab_size(),
            Kind::Byte(t) => t.vocab_size(),
            Kind::Gpt2(_) => gpt2::VOCAB_SIZE,
            Kind::Hf(t) => t.vocab_size(),
        }
    }

    /// The end-of-text id, if this tokenizer has one (all that [`Tokenizer::train`] returns do).
    pub fn eot(&self) -> Option<u32> {
        match &self.kind {
            Kind::Char(t) => t.eot(),
            Kind::Byte(t) => t.eot(),
            Kind::Gpt2(_) => Some(gpt2::EOT),
            Kind::Hf(t) => t.eot(),
        }
    }

    /// The ids of plain text. A literal `<|endoftext|>` (or any other special token) inside `text` is encoded as
    /// ordinary characters, never as the end-of-text id, so the only end-of-text ids in prepared data are the
    /// document separators. For Hugging Face tokenizers (`hf:`, `bpe:`) this means special tokens are not matched
    /// in the text and no template tokens (BOS, CLS, …) are added; truncation and padding are off. Fails for `char`
    /// on a character outside the vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Char(t) => t.encode(text),
            Kind::Byte(t) => Ok(t.encode(text)),
            Kind::Gpt2(t) => Ok(t.encode(text)),
            Kind::Hf(t) => t.encode(text),
        }
    }

    /// The text of `ids`. Ids outside the vocabulary (possible when the model's vocabulary is padded) become
    /// U+FFFD; the end-of-text id becomes its token text (`<|endoftext|>` except for `hf:` tokenizers that spell it
    /// otherwise); byte sequences that are not UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.kind {
            Kind::Char(t) => t.decode(ids),
            Kind::Byte(t) => t.decode(ids),
            Kind::Gpt2(t) => t.decode(ids),
            Kind::Hf(t) => t.decode(ids),
        }
    }

    /// Writes `tokenizer.json`: `char`, `byte` and `gpt2` as Lockstep JSON (`{"kind": "char", ...}`), `hf:` and
    /// `bpe:` as a Hugging Face `tokenizer.json` that `tokenizers` and `transformers` read as is.
    pub fn save(&self, path: &Path) -> Result<()> {
        file::save(self, path)
    }

    /// Reads what [`Tokenizer::save`] wrote (either format; files of earlier versions load as the tokenizers they
    /// were) or any Hugging Face `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        file::load(path)
    }

    /// One line for logs, e.g. `gpt2 (50,257 ids)`, `bpe (8,192 ids)`, `char (65 ids + end-of-text)`.
    pub fn describe(&self) -> String {
        let eot = |t: bool| if t { " + end-of-text" } else { "" };
        match &self.kind {
            Kind::Char(t) => format!("char ({} ids{})", thousands(t.chars().len()), eot(t.eot().is_some())),
            Kind::Byte(t) => format!("byte (256 ids{})", eot(t.eot)),
            Kind::Gpt2(_) => format!("gpt2 ({} ids)", thousands(gpt2::VOCAB_SIZE)),
            Kind::Hf(t) => format!("{} ({} ids)", t.label(), thousands(t.vocab_size())),
        }
    }
}

/// `n` with thousands separators: 50257 → "50,257".
fn thousands(n: usize) -> String {
    crate::data::shard::thousands(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated English-like text with some non-ASCII words, for training and round trips.
    pub(super) fn corpus(docs: usize) -> Vec<String> {
        let words = [
            "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "away", "from", "naïve",
            "café", "data", "parallel", "training", "tokens", "are", "fun", "übung", "Straße", "日本", "語",
        ];
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let mut next = |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        (0..docs)
            .map(|d| {
                let mut doc = format!("Document {d}.");
                for _ in 0..40 + next(40) {
                    doc.push(' ');
                    doc.push_str(words[next(words.len())]);
                    if next(8) == 0 {
                        doc.push_str(if next(2) == 0 { ",\n" } else { "!" });
                    }
                }
                doc
            })
            .collect()
    }

    #[test]
    fn round_trips_for_every_kind() {
        let dir = tempfile::tempdir().unwrap();
        let text = "Hello, world! naïve café ☃ 日本語\n\ttabs  and  spaces";
        let bpe = Tokenizer::train(&TokenizerSpec::Bpe { vocab_size: 300 }, corpus(200).into_iter()).unwrap();
        let hf_path = dir.path().join("tokenizer.json");
        bpe.save(&hf_path).unwrap();
        // The char vocabularies include the characters of the literal end-of-text tested below.
        let char_corpus = format!("{text}{END_OF_TEXT}");
        let tokenizers = [
            Tokenizer::for_text(&TokenizerSpec::Char, &char_corpus).unwrap(),
            Tokenizer::train(&TokenizerSpec::Char, [char_corpus.clone()].into_iter()).unwrap(),
            Tokenizer::for_text(&TokenizerSpec::Byte, "").unwrap(),
            Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty()).unwrap(),
            Tokenizer::train(&TokenizerSpec::Gpt2, std::iter::empty()).unwrap(),
            Tokenizer::train(&TokenizerSpec::Hf(hf_path), std::iter::empty()).unwrap(),
            bpe,
        ];
        for tok in &tokenizers {
            let ids = tok.encode(text).unwrap();
            assert!(
                ids.iter().all(|&id| (id as usize) < tok.vocab_size()),
                "{}",
                tok.describe()
            );
            assert_eq!(tok.decode(&ids), text, "{}", tok.describe());
            if let Some(eot) = tok.eot() {
                let mut with_eot = vec![eot];
                with_eot.extend(&ids);
                assert_eq!(
                    tok.decode(&with_eot),
                    format!("{END_OF_TEXT}{text}"),
                    "{}",
                    tok.describe()
                );
                // Literal end-of-text in a document is text, not the separator.
                let literal = tok.encode(&format!("a{END_OF_TEXT}b")).unwrap();
                assert!(!literal.contains(&eot), "{}: {literal:?}", tok.describe());
                assert_eq!(tok.decode(&literal), format!("a{END_OF_TEXT}b"));
            }
            let past = tok.vocab_size() as u32 + 5;
            assert_eq!(tok.decode(&[past]), "\u{FFFD}", "{}", tok.describe());
        }
    }

    #[test]
    fn describe_names_kind_and_size() {
        let gpt2 = Tokenizer::for_text(&TokenizerSpec::Gpt2, "").unwrap();
        assert_eq!(gpt2.describe(), "gpt2 (50,257 ids)");
        let chars = Tokenizer::train(&TokenizerSpec::Char, ["abc".to_string()].into_iter()).unwrap();
        assert_eq!(chars.describe(), "char (3 ids + end-of-text)");
        assert_eq!(
            Tokenizer::for_text(&TokenizerSpec::Byte, "").unwrap().describe(),
            "byte (256 ids)"
        );
        let bpe = Tokenizer::train(&TokenizerSpec::Bpe { vocab_size: 300 }, corpus(100).into_iter()).unwrap();
        assert_eq!(bpe.describe(), "bpe (300 ids)");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn tokenizers_can_be_shared_between_threads() {
        fn shareable<T: Clone + std::fmt::Debug + PartialEq + Send + Sync>() {}
        shareable::<Tokenizer>();
    }

    #[test]
    fn bpe_is_only_for_prepare() {
        let err = Tokenizer::for_text(&TokenizerSpec::Bpe { vocab_size: 512 }, "text")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lockstep prepare --tokenizer bpe:512"), "{err}");
    }

    #[test]
    fn kinds_differ() {
        let byte = Tokenizer::for_text(&TokenizerSpec::Byte, "").unwrap();
        let byte_eot = Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty()).unwrap();
        let chars = Tokenizer::for_text(&TokenizerSpec::Char, "ab").unwrap();
        assert_ne!(byte, byte_eot);
        assert_ne!(byte, chars);
        assert_ne!(chars, Tokenizer::for_text(&TokenizerSpec::Char, "abc").unwrap());
        assert_eq!(chars, Tokenizer::for_text(&TokenizerSpec::Char, "ba").unwrap());
    }
}
