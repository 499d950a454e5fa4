//! GPT-2's byte-level BPE ("r50k_base"), compiled into the binary by tiktoken-rs: no download, and the same ids as
//! OpenAI's GPT-2 and llm.c's GPT-2 shards.
//!
//! Encoding gives tiktoken's `encode_ordinary` ids about three times as fast: words come from
//! [`pretokenize::gpt2_words`] instead of tiktoken's backtracking regex, words that are tokens are looked up in a
//! table built from tiktoken's, and the merges of the others are remembered per thread. A test compares the ids
//! with tiktoken's on random text.
use std::collections::HashMap;
use std::sync::LazyLock;

// FxHash: several times faster than SipHash on short keys; a local tool has no hash flooding to defend against.
use rustc_hash::FxBuildHasher;
use tiktoken_rs::CoreBPE;

use super::pretokenize;

/// 50,000 merges + 256 bytes + `<|endoftext|>`.
pub(super) const VOCAB_SIZE: usize = 50_257;
/// `<|endoftext|>`.
pub(super) const EOT: u32 = 50_256;

/// Stateless: every instance shares one encoder, built on first use and safe to use from many threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Gpt2Tokenizer;

/// tiktoken's GPT-2 encoder: the reference, the decoder, and the encoder of rare long words.
fn bpe() -> &'static CoreBPE {
    tiktoken_rs::r50k_base_singleton()
}

/// Words this long or longer go to tiktoken, whose merge is O(n log n); shorter ones to [`merge`], which is
/// quadratic but has less overhead.
const LONG_WORD: usize = 100;

/// Id of every token's bytes (the 50,256 BPE tokens; end-of-text is not text).
type Ranks = HashMap<Vec<u8>, u32, FxBuildHasher>;

static RANKS: LazyLock<Ranks> = LazyLock::new(|| {
    (0..EOT)
        .filter_map(|id| bpe().decode_bytes(&[id]).ok().map(|bytes| (bytes, id)))
        .collect()
});

/// Most words [`MERGED`] holds per thread before it starts afresh (a few MB).
const MERGED_CAPACITY: usize = 1 << 16;

/// Ids of words that are not tokens themselves.
type Merged = HashMap<Box<[u8]>, Box<[u32]>, FxBuildHasher>;

thread_local! {
    /// Words repeat (Zipf) and merging is the slow path, so each thread remembers the words it merged.
    static MERGED: std::cell::RefCell<Merged> = std::cell::RefCell::default();
}

impl Gpt2Tokenizer {
    /// What tiktoken's `encode_ordinary` returns (so a literal `<|endoftext|>` in the text is encoded as text), but
    /// with the words found by a faster pre-tokenizer ([`pretokenize::gpt2_words`]).
    pub(super) fn encode(&self, text: &str) -> Vec<u32> {
        let ranks = &*RANKS;
        let mut ids = Vec::with_capacity(text.len() / 3);
        MERGED.with_borrow_mut(|merged| {
            for word in pretokenize::gpt2_words(text) {
                let bytes = word.as_bytes();
                if let Some(&id) = ranks.get(bytes) {
                    ids.push(id);
                } else if let Some(cached) = merged.get(bytes) {
                    ids.extend_from_slice(cached);
                } else if bytes.len() < LONG_WORD {
                    let start = ids.len();
                    merge(bytes, ranks, &mut ids);
                    if merged.len() >= MERGED_CAPACITY {
                        merged.clear();
                    }
                    merged.insert(bytes.into(), ids[start..].into());
                } else {
                    ids.extend(bpe().encode_ordinary(word));
                }
            }
        });
        ids
    }

    pub(super) fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let push_run = |bytes: &mut Vec<u8>, run: &[u32]| match bpe().decode_bytes(run) {
            Ok(b) => bytes.extend_from_slice(&b),
            // Every id below VOCAB_SIZE has bytes, so this is not expected.
            Err(_) => bytes.extend_from_slice(REPLACEMENT),
        };
        // An id outside the vocabulary (a padded model) becomes U+FFFD; runs of valid ids between them decode whole.
        let mut start = 0;
        for (i, &id) in ids.iter().enumerate() {
            if id as usize >= VOCAB_SIZE {
                push_run(&mut bytes, &ids[start..i]);
                bytes.extend_from_slice(REPLACEMENT);
                start = i + 1;
            }
        }
        push_run(&mut bytes, &ids[start..]);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Byte-pair encoding of one word (at least two bytes, not itself a token), as tiktoken's `_byte_pair_merge`:
/// repeatedly join the adjacent pair whose joined bytes have the lowest id, until no joined pair is a token.
fn merge(word: &[u8], ranks: &Ranks, ids: &mut Vec<u32>) {
    let rank = |range: std::ops::Range<usize>| ranks.get(&word[range]).copied().unwrap_or(u32::MAX);
    // (start of part i, id of part i joined with part i + 1); the last entry marks the end of the word.
    let mut parts: Vec<(usize, u32)> = (0..word.len() - 1).map(|i| (i, rank(i..i + 2))).collect();
    parts.push((word.len() - 1, u32::MAX));
    parts.push((word.len(), u32::MAX));
    let lowest = |parts: &[(usize, u32)]| {
        parts[..parts.len() - 1]
            .iter()
            .enumerate()
            .filter(|(_, (_, r))| *r != u32::MAX)
            .min_by_key(|(i, (_, r))| (*r, *i))
            .map(|(i, _)| i)
    };
    while let Some(i) = lowest(&parts) {
        // Part i absorbs part i + 1; the pairs around it change.
        parts.remove(i + 1);
        let joined = |parts: &[(usize, u32)], j: usize| {
            if j + 2 < parts.len() {
                rank(parts[j].0..parts[j + 2].0)
            } else {
                u32::MAX
            }
        };
        parts[i].1 = joined(&parts, i);
        if i > 0 {
            parts[i - 1].1 = joined(&parts, i - 1);
        }
    }
    ids.extend(parts.windows(2).map(|w| rank(w[0].0..w[1].0)));
}

/// U+FFFD in UTF-8.
const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();

#[cfg(test)]
mod tests {
    use super::super::{Tokenizer, TokenizerSpec};
    use super::*;

    fn gpt2() -> Tokenizer {
        Tokenizer::train(&TokenizerSpec::Gpt2, std::iter::empty()).unwrap()
    }

    #[test]
    fn known_gpt2_ids() {
        let tok = gpt2();
        assert_eq!(tok.vocab_size(), 50_257);
        assert_eq!(tok.eot(), Some(50_256));
        assert_eq!(tok.encode("Hello world").unwrap(), [15496, 995]);
        assert_eq!(tok.encode("Hello, world!").unwrap(), [15496, 11, 995, 0]);
        assert_eq!(tok.decode(&[15496, 50_256, 995]), "Hello<|endoftext|> world");
        assert_eq!(Tokenizer::for_text(&TokenizerSpec::Gpt2, "ignored").unwrap(), tok);
    }

    #[test]
    fn literal_end_of_text_is_text() {
        let ids = gpt2().encode("<|endoftext|>").unwrap();
        assert!(ids.len() > 1 && !ids.contains(&EOT), "{ids:?}");
    }

    #[test]
    fn gpt2_round_trips_any_utf8_and_pads_unknown_ids() {
        let tok = gpt2();
        let text = "naïve ☃ 😀 日本語\n\n  x\0";
        assert_eq!(tok.decode(&tok.encode(text).unwrap()), text);
        assert_eq!(tok.decode(&[15496, 50_257, 995, 60_000]), "Hello\u{FFFD} world\u{FFFD}");
        // A character split across tokens decodes once whole, and as U+FFFD when cut.
        let snowman = tok.encode("☃").unwrap();
        assert!(snowman.len() > 1);
        assert_eq!(tok.decode(&snowman[..1]), "\u{FFFD}");
    }

    #[test]
    fn same_ids_as_tiktoken_on_random_text() {
        // Pieces that exercise every branch of GPT-2's pattern: contractions, letters of several scripts, numbers,
        // punctuation, runs of assorted whitespace, emoji, combining marks, long words for tiktoken's own merge.
        let pieces = [
            "the",
            " the",
            "'s",
            "'t",
            "'re",
            "'ll",
            "'S",
            "don't",
            "Hello",
            "naïve",
            "café",
            "e\u{301}",
            "日本語",
            "Ωmega",
            "123",
            " 4567",
            "3.14",
            "!!",
            " ?",
            "--",
            "...",
            "\"",
            "(",
            "😀",
            "👍🏽",
            " ",
            "  ",
            "   ",
            "\n",
            "\n\n",
            "\t",
            "\r\n",
            "\u{a0}",
            "\u{3000}",
            " \u{3000}",
            "\u{2028}",
            "\u{0}",
            "<|endoftext|>",
            "supercalifragilisticexpialidocious",
            "x",
        ];
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0x853c_49e6_748f_ea9b);
        let mut next = |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        let tok = Gpt2Tokenizer;
        for _ in 0..5000 {
            let text: String = (0..next(24)).map(|_| pieces[next(pieces.len())]).collect();
            assert_eq!(tok.encode(&text), bpe().encode_ordinary(&text), "{text:?}");
        }
        let long = "a".repeat(LONG_WORD * 3) + &"🙂".repeat(LONG_WORD) + &" ".repeat(500) + "end";
        assert_eq!(tok.encode(&long), bpe().encode_ordinary(&long));
    }
}
