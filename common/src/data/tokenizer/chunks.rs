//! Cuts a long document into pieces that a byte-level (GPT-2 style) tokenizer encodes to the same ids as the whole,
//! so BPE training and encoding need memory for one piece, not one document.
//!
//! A safe cut is just before a space that sits between two non-whitespace characters ("…a| b…"): GPT-2's
//! pre-tokenizer regex never joins that space to the character before it, and the space starts the next piece (` b`)
//! either way. Prose has such a space every few bytes; a text without any is cut at a character boundary, which may
//! change a token or two at the cut.

/// Longest piece, in bytes.
pub(super) const MAX_PIECE: usize = 1 << 20;

/// The pieces of `text`, each at most `max` bytes (plus up to 3 when a cut lands inside a character).
pub(super) fn pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = if rest.len() <= max {
            rest.len()
        } else {
            cut_point(rest, max)
        };
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Where to end the first piece of `text` (longer than `max`): the last safe cut at or before `max`, else the
/// first character boundary at or after `max`.
fn cut_point(text: &str, max: usize) -> usize {
    let bytes = text.as_bytes();
    // Look back at most half a piece for a space: prose has one every few bytes.
    let lowest = max / 2;
    let mut i = max.min(bytes.len() - 1);
    while i > lowest.max(1) {
        if bytes[i] == b' ' && safe_neighbour_before(text, i) && safe_neighbour_after(text, i + 1) {
            return i;
        }
        i -= 1;
    }
    (max..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len())
}

/// Whether the character ending at byte `end` is not whitespace.
fn safe_neighbour_before(text: &str, end: usize) -> bool {
    text[..end].chars().next_back().is_some_and(|c| !c.is_whitespace())
}

/// Whether the character starting at byte `start` is not whitespace.
fn safe_neighbour_after(text: &str, start: usize) -> bool {
    text.get(start..)
        .and_then(|s| s.chars().next())
        .is_some_and(|c| !c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_rejoin_and_cut_before_a_single_space() {
        let text = "the quick  brown fox\njumps over the lazy dog ".repeat(50);
        for max in [32, 64, 1000] {
            let pieces: Vec<&str> = pieces(&text, max).collect();
            assert_eq!(pieces.concat(), text);
            for p in &pieces[1..] {
                assert!(p.starts_with(' '), "{max}: {p:?}");
                assert!(!p[1..].starts_with(char::is_whitespace), "{max}: {p:?}");
            }
            assert!(pieces.iter().all(|p| p.len() <= max), "{max}");
        }
    }

    #[test]
    fn text_without_spaces_is_cut_at_character_boundaries() {
        let text = "☃".repeat(100);
        let pieces: Vec<&str> = pieces(&text, 10).collect();
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| p.len() == 12), "{pieces:?}"); // 4 snowmen of 3 bytes each
        assert_eq!(super::pieces("", 10).count(), 0);
        assert_eq!(super::pieces("short", 10).collect::<Vec<_>>(), ["short"]);
    }

    /// The words GPT-2's pre-tokenizer splits `text` into.
    fn words(text: &str) -> Vec<String> {
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut pre = PreTokenizedString::from(text);
        ByteLevel::new(false, true, true).pre_tokenize(&mut pre).unwrap();
        pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    }

    #[test]
    fn pieces_pre_tokenize_like_the_whole() {
        let text = super::super::tests::corpus(300).join("\n\n  ") + " tail's end";
        let whole = words(&text);
        for max in [100, 1000, 7919] {
            let pieces: Vec<String> = pieces(&text, max).flat_map(words).collect();
            assert_eq!(pieces, whole, "{max}");
        }
    }
}
