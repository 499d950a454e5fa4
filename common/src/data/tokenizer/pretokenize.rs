//! GPT-2's pre-tokenizer: the regex that cuts text into words before BPE merges bytes within each word.
//!
//! GPT-2's pattern is `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`. Backtracking
//! engines (tiktoken's and `tokenizers`' fancy-regex) run it at a few MB/s, which would make it the slowest step of
//! `lockstep prepare`. Here words made only of ASCII are cut by a hand-written scanner, and any word whose
//! boundaries depend on a non-ASCII character is handed to the `regex` crate. `regex` has no look-ahead, so it
//! matches whitespace runs whole and the scanner applies `\s+(?!\S)` itself: a run followed by a non-space leaves
//! its last character to the next word (`"  x"` → `" "`, `" x"`). A test checks the result against tiktoken.
use std::sync::LazyLock;

use regex::Regex;

/// GPT-2's pattern without the look-ahead.
const PATTERN: &str = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

static WORDS: LazyLock<Regex> = LazyLock::new(|| Regex::new(PATTERN).expect("a constant pattern compiles"));

/// GPT-2's byte-to-character map (`bytes_to_unicode`): printable Latin-1 bytes stand for themselves, the others for
/// U+0100 onwards, in byte order.
pub(super) static BYTE_CHARS: LazyLock<[char; 256]> = LazyLock::new(|| {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    chars
});

/// Appends the ByteLevel characters of `word`'s bytes to `out`.
pub(super) fn push_byte_chars(word: &str, out: &mut String) {
    out.extend(word.bytes().map(|b| BYTE_CHARS[b as usize]));
}

/// The words of `text` as `tokenizers`' ByteLevel pre-tokenizer (GPT-2's regex, no added prefix space) gives them
/// to a BPE model or trainer: each word's bytes as ByteLevel characters.
pub(super) fn byte_level_words(text: &str) -> Vec<String> {
    gpt2_words(text)
        .map(|word| {
            let mut chars = String::with_capacity(word.len() * 2);
            push_byte_chars(word, &mut chars);
            chars
        })
        .collect()
}

/// What an ASCII byte is to the pattern.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(b: u8) -> Class {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
        b'0'..=b'9' => Class::Number,
        // Unicode White_Space in ASCII: tab, line feed, vertical tab, form feed, carriage return, space.
        b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' => Class::Space,
        _ => Class::Other,
    }
}

/// The words of `text`, in order; they concatenate to `text`.
pub(super) fn gpt2_words(text: &str) -> impl Iterator<Item = &str> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= text.len() {
            return None;
        }
        let end = ascii_word(text.as_bytes(), pos).unwrap_or_else(|| regex_word(text, pos));
        let word = &text[pos..end];
        pos = end;
        Some(word)
    })
}

/// The end of the word at `pos` when ASCII alone decides it; `None` when a non-ASCII character could change it.
fn ascii_word(bytes: &[u8], pos: usize) -> Option<usize> {
    let b = *bytes.get(pos).filter(|b| b.is_ascii())?;
    if b == b'\'' {
        let rest = &bytes[pos + 1..];
        if rest.first().is_some_and(|c| matches!(c, b's' | b'd' | b'm' | b't')) {
            return Some(pos + 2);
        }
        if rest.starts_with(b"ll") || rest.starts_with(b"ve") || rest.starts_with(b"re") {
            return Some(pos + 3);
        }
    }
    // ` ?X+`: a space joins the run of letters, numbers or other characters that follows it.
    let (start, kind) = match class(b) {
        Class::Space if b == b' ' => match bytes.get(pos + 1) {
            Some(&next) if !next.is_ascii() => return None,
            Some(&next) if class(next) != Class::Space => (pos + 1, class(next)),
            _ => (pos, Class::Space),
        },
        kind => (pos, kind),
    };
    let mut end = start + 1;
    while let Some(&next) = bytes.get(end) {
        if !next.is_ascii() {
            return None;
        }
        if class(next) != kind {
            break;
        }
        end += 1;
    }
    // `\s+(?!\S)|\s+`: before a non-space, a run of several whitespace characters leaves the last one.
    if kind == Class::Space && end < bytes.len() && end - start > 1 {
        end -= 1;
    }
    Some(end)
}

/// The end of the word at `pos`, by the regex.
fn regex_word(text: &str, pos: usize) -> usize {
    // Every character is a letter, a number, whitespace or something else, so a match starts at `pos`.
    let end = WORDS.find_at(text, pos).map_or(text.len(), |m| m.end());
    match text[pos..end].chars().next_back() {
        Some(last) if last.is_whitespace() && end < text.len() && end - pos > last.len_utf8() => end - last.len_utf8(),
        _ => end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_before_a_word_goes_with_it() {
        let words: Vec<&str> = gpt2_words("Hello  world's\n\n end   ").collect();
        assert_eq!(words, ["Hello", " ", " world", "'s", "\n\n", " end", "   "]);
        let words: Vec<&str> = gpt2_words("a \u{3000}b 12 !! \t\nx").collect();
        assert_eq!(words, ["a", " ", "\u{3000}", "b", " 12", " !!", " \t", "\n", "x"]);
        assert_eq!(gpt2_words("").count(), 0);
    }

    #[test]
    fn the_ascii_scanner_agrees_with_the_regex() {
        let text = "It's 12:30 -- don't  panic!\n\n\tOK?  'twas 'LL x'y \u{b}\u{c}\r\n end \u{7f}\u{1}~  ";
        let mut pos = 0;
        while pos < text.len() {
            let end = regex_word(text, pos);
            assert_eq!(
                ascii_word(text.as_bytes(), pos),
                Some(end),
                "at {pos}: {:?}",
                &text[pos..]
            );
            pos = end;
        }
    }

    #[test]
    fn byte_level_words_are_those_of_tokenizers() {
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let pieces = [
            "the",
            " fox",
            "'s",
            "'LL",
            "naïve",
            " café",
            "日本",
            "123",
            "٣",
            "!!",
            " ",
            "  ",
            "\n",
            "\t",
            "\r\n",
            "\u{3000}",
            "\u{a0}",
            "😀",
            "<|endoftext|>",
            "x",
            "--",
            "e\u{301}",
            "\u{0}",
            "\u{7f}",
            "\u{b}",
        ];
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        for _ in 0..2000 {
            let text: String = (0..next(16)).map(|_| pieces[next(pieces.len())]).collect();
            let mut pre = PreTokenizedString::from(text.as_str());
            ByteLevel::new(false, true, true).pre_tokenize(&mut pre).unwrap();
            let theirs: Vec<String> = pre
                .get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(s, _, _)| s.to_string())
                .collect();
            assert_eq!(byte_level_words(&text), theirs, "{text:?}");
        }
        assert_eq!(ByteLevel::alphabet().len(), 256);
        assert!(BYTE_CHARS.iter().all(|c| ByteLevel::alphabet().contains(c)));
    }
}
