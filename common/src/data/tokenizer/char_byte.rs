//! The `char` and `byte` tokenizers. With an end-of-text token (what `lockstep prepare` builds) its id follows the
//! last character or byte; without one (the in-memory demo sources, and files of earlier versions) ids are exactly
//! the characters or bytes.
use std::collections::{BTreeSet, HashMap};

use super::END_OF_TEXT;
use crate::error::{Error, Result};

/// Marks an ASCII character outside the vocabulary in [`CharTokenizer::ascii`].
const ABSENT: u32 = u32::MAX;

/// Token id = position of the character in `chars` (sorted, distinct); end-of-text, if any, = `chars.len()`.
#[derive(Clone)]
pub(super) struct CharTokenizer {
    chars: Vec<char>,
    eot: bool,
    /// Id of each ASCII character (or [`ABSENT`]): most text is ASCII, and a table beats hashing.
    ascii: Box<[u32; 128]>,
    /// Ids of the other characters.
    other: HashMap<char, u32>,
}

impl CharTokenizer {
    /// `chars` must be sorted and distinct (as [`CharTokenizer::learn`] and the file loader ensure).
    pub(super) fn new(chars: Vec<char>, eot: bool) -> Self {
        let mut ascii = Box::new([ABSENT; 128]);
        let mut other = HashMap::new();
        for (id, &c) in chars.iter().enumerate() {
            if c.is_ascii() {
                ascii[c as usize] = id as u32;
            } else {
                other.insert(c, id as u32);
            }
        }
        CharTokenizer {
            chars,
            eot,
            ascii,
            other,
        }
    }

    /// The sorted distinct characters of `texts`.
    pub(super) fn learn<S: AsRef<str>>(texts: impl Iterator<Item = S>, eot: bool) -> Self {
        let mut ascii = [false; 128];
        let mut other = BTreeSet::new();
        for text in texts {
            for c in text.as_ref().chars() {
                if c.is_ascii() {
                    ascii[c as usize] = true;
                } else {
                    other.insert(c);
                }
            }
        }
        let chars = (0u8..128)
            .filter(|&b| ascii[b as usize])
            .map(char::from)
            .chain(other) // every non-ASCII char sorts after every ASCII one
            .collect();
        Self::new(chars, eot)
    }

    pub(super) fn chars(&self) -> &[char] {
        &self.chars
    }

    pub(super) fn vocab_size(&self) -> usize {
        self.chars.len() + usize::from(self.eot)
    }

    pub(super) fn eot(&self) -> Option<u32> {
        self.eot.then_some(self.chars.len() as u32)
    }

    fn id(&self, c: char) -> Option<u32> {
        if c.is_ascii() {
            Some(self.ascii[c as usize]).filter(|&id| id != ABSENT)
        } else {
            self.other.get(&c).copied()
        }
    }

    pub(super) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len());
        for c in text.chars() {
            match self.id(c) {
                Some(id) => ids.push(id),
                None => return Err(self.unknown(c)),
            }
        }
        Ok(ids)
    }

    fn unknown(&self, c: char) -> Error {
        let n = self.chars.len();
        let known = if n <= 100 {
            format!(
                ", which has only these {n} characters: {:?}",
                self.chars.iter().collect::<String>()
            )
        } else {
            format!(" ({n} characters)")
        };
        Error::Tokenizer(format!(
            "character {c:?} is not in the vocabulary; this char tokenizer was learned from the training corpus{known}"
        ))
    }

    pub(super) fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::with_capacity(ids.len());
        for &id in ids {
            match self.chars.get(id as usize) {
                Some(&c) => out.push(c),
                None if self.eot() == Some(id) => out.push_str(END_OF_TEXT),
                None => out.push(char::REPLACEMENT_CHARACTER),
            }
        }
        out
    }
}

impl PartialEq for CharTokenizer {
    fn eq(&self, other: &Self) -> bool {
        // The lookup tables are functions of `chars`.
        self.chars == other.chars && self.eot == other.eot
    }
}

impl std::fmt::Debug for CharTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CharTokenizer")
            .field("chars", &self.chars.iter().collect::<String>())
            .field("eot", &self.eot)
            .finish()
    }
}

/// Token id = byte value; end-of-text, if any, = 256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ByteTokenizer {
    pub(super) eot: bool,
}

impl ByteTokenizer {
    pub(super) fn vocab_size(&self) -> usize {
        256 + usize::from(self.eot)
    }

    pub(super) fn eot(&self) -> Option<u32> {
        self.eot.then_some(256)
    }

    pub(super) fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    pub(super) fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len());
        for &id in ids {
            match u8::try_from(id) {
                Ok(b) => bytes.push(b),
                Err(_) if self.eot() == Some(id) => bytes.extend_from_slice(END_OF_TEXT.as_bytes()),
                Err(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Tokenizer, TokenizerSpec};

    #[test]
    fn addition_alphabet_keeps_its_13_sorted_ids() {
        let tok = Tokenizer::for_text(&TokenizerSpec::Char, "0123456789+=\n").unwrap();
        assert_eq!(tok.vocab_size(), 13);
        assert_eq!(tok.eot(), None);
        // '\n' < '+' < '0'..'9' < '='
        assert_eq!(tok.encode("\n+0123456789=").unwrap(), (0..13).collect::<Vec<u32>>());
        assert_eq!(tok.describe(), "char (13 ids)");
    }

    #[test]
    fn char_ids_are_sorted_and_unknown_characters_are_named() {
        let tok = Tokenizer::for_text(&TokenizerSpec::Char, "hello, world é").unwrap();
        assert_eq!(tok.vocab_size(), 10);
        assert_eq!(tok.encode(" ").unwrap(), vec![0]); // ' ' sorts first
        assert_eq!(tok.encode("é").unwrap(), vec![9]); // non-ASCII last
        let ids = tok.encode("world hello é").unwrap();
        assert_eq!(tok.decode(&ids), "world hello é");
        let err = tok.encode("z").unwrap_err().to_string();
        assert!(
            err.contains("'z'") && err.contains("10 characters") && err.contains("corpus"),
            "{err}"
        );
        assert_eq!(tok.decode(&[10]), "\u{FFFD}");
    }

    #[test]
    fn trained_char_puts_end_of_text_after_the_characters() {
        let texts = ["ba".to_string(), "cab☃".to_string()];
        let tok = Tokenizer::train(&TokenizerSpec::Char, texts.into_iter()).unwrap();
        assert_eq!(tok.vocab_size(), 5);
        assert_eq!(tok.eot(), Some(4));
        assert_eq!(tok.encode("abc☃").unwrap(), [0, 1, 2, 3]);
        assert_eq!(tok.decode(&[0, 4, 1]), "a<|endoftext|>b");
        assert_eq!(tok.decode(&[5]), "\u{FFFD}");
        assert_eq!(tok.describe(), "char (4 ids + end-of-text)");
    }

    #[test]
    fn byte_round_trips_any_utf8() {
        for spec_eot in [false, true] {
            let tok = if spec_eot {
                Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty()).unwrap()
            } else {
                Tokenizer::for_text(&TokenizerSpec::Byte, "ignored").unwrap()
            };
            let text = "naïve ☃ 😀\0\u{7f}";
            let ids = tok.encode(text).unwrap();
            assert_eq!(ids.len(), text.len());
            assert_eq!(tok.decode(&ids), text);
            assert_eq!(tok.vocab_size(), 256 + usize::from(spec_eot));
        }
        let tok = Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty()).unwrap();
        assert_eq!(tok.eot(), Some(256));
        assert_eq!(
            tok.decode(&[104, 256, 105, 257, 0xff]),
            "h<|endoftext|>i\u{FFFD}\u{FFFD}"
        );
        let legacy = Tokenizer::for_text(&TokenizerSpec::Byte, "").unwrap();
        assert_eq!(legacy.eot(), None);
        assert_eq!(legacy.decode(&[104, 256]), "h\u{FFFD}");
    }

    #[test]
    fn kinds_that_learn_nothing_leave_the_texts_alone() {
        // Prepare streams the corpus again to encode it: a kind with a fixed vocabulary must not read it first.
        for spec in [TokenizerSpec::Byte, TokenizerSpec::Gpt2] {
            let mut pulled = 0;
            let texts = std::iter::from_fn(|| {
                pulled += 1;
                Some("x".to_string())
            })
            .take(3);
            Tokenizer::train(&spec, texts).unwrap();
            assert_eq!(pulled, 0, "{spec}");
        }
    }
}
