//! Where a text file is cut into chunks for parallel tokenisation, so that encoding the chunks one by one gives
//! the ids of encoding the whole file.
//!
//! A chunk is at least `min` bytes (the target, ~1 MiB, or less so that a chunk ends where the validation split
//! begins) and ends at the first cut point at or after `min`, preferring, in order:
//!
//! 1. a line start after a single line break between two non-whitespace characters (`…x\n|Y…`);
//! 2. when no such line starts within `max` bytes (~8 MiB), a space between two non-whitespace characters
//!    (`…x| y…`);
//! 3. when there is neither, a UTF-8 character boundary.
//!
//! Cut points 1 and 2 are exact for GPT-2-style byte-level BPE (`gpt2`, `bpe:N`): its pre-tokenizer never joins
//! across them, so chunked ids equal whole-file ids. A blank line or trailing whitespace before the break is not a
//! cut point: GPT-2's `\s+(?!\S)` keeps `"\n\n"` before a word as two tokens but as one at the end of a chunk.
//! Kind 1 is also exact for Llama-3-style regexes; kind 3 may change a token or two at the cut.
//!
//! Whether a position is a cut point depends only on the bytes around it, never on how much of the file has been
//! read, so the chunks are the same whatever the read sizes or thread count.

/// Bytes of look-ahead needed to judge a position: one UTF-8 character.
const LOOKAHEAD: usize = 4;

/// The length of the next chunk of `buf` (the unread rest of a file, from a chunk boundary), or `None` when more of
/// the file must be read first. `eof`: `buf` reaches the end of the file. `split`: where the validation split
/// begins, if it is ahead in `buf`'s file (then `min` is at most that): the chunk must not run past it, to the end of
/// the file, without a cut at the first cut point of any kind at or after it.
pub(super) fn next_cut(buf: &[u8], min: usize, max: usize, eof: bool, split: Option<usize>) -> Option<usize> {
    let len = buf.len();
    if min >= len {
        return eof.then_some(len);
    }
    let limit = len.min(max);
    let decidable = |p: &usize| eof || p + LOOKAHEAD <= len;
    if let Some(p) = (min..limit).take_while(decidable).find(|&p| is_line_start(buf, p)) {
        return Some(p);
    }
    let from = if eof && len <= max {
        // The rest of the file is one chunk, unless the split is inside it.
        match split {
            Some(at) if at < len => at,
            _ => return Some(len),
        }
    } else if len >= max + LOOKAHEAD || eof {
        min
    } else {
        return None;
    };
    if let Some(p) = (from..limit).find(|&p| is_word_start(buf, p)) {
        return Some(p);
    }
    // Never inside a character (and never 0: `from` ≥ 1 when called).
    Some(
        (from..len.min(from + LOOKAHEAD))
            .find(|&p| !is_continuation(buf[p]))
            .unwrap_or(from),
    )
}

/// `…x\n|Y…`: `p` follows a line break whose neighbours are not whitespace.
fn is_line_start(buf: &[u8], p: usize) -> bool {
    p >= 2 && buf[p - 1] == b'\n' && !whitespace_before(buf, p - 1) && !whitespace_at(buf, p)
}

/// `…x| y…`: `p` is a space whose neighbours are not whitespace.
fn is_word_start(buf: &[u8], p: usize) -> bool {
    buf[p] == b' ' && !whitespace_before(buf, p) && !whitespace_at(buf, p + 1)
}

fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

/// Whether the character ending just before `end` is whitespace; unknown (`end` = 0) counts as whitespace, bytes
/// that are not UTF-8 do not.
fn whitespace_before(buf: &[u8], end: usize) -> bool {
    if end == 0 {
        return true;
    }
    let mut start = end - 1;
    while start > 0 && end - start < LOOKAHEAD && is_continuation(buf[start]) {
        start -= 1;
    }
    std::str::from_utf8(&buf[start..end]).is_ok_and(|s| s.chars().next_back().is_some_and(char::is_whitespace))
}

/// Whether the character starting at `p` is whitespace; past the end counts as whitespace, bytes that are not
/// UTF-8 do not.
fn whitespace_at(buf: &[u8], p: usize) -> bool {
    let Some(&lead) = buf.get(p) else {
        return true;
    };
    let width = match lead {
        0x00..=0x7F => return (lead as char).is_whitespace(),
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    };
    buf.get(p..p + width)
        .and_then(|c| std::str::from_utf8(c).ok())
        .is_some_and(|s| s.chars().next().is_some_and(char::is_whitespace))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Cuts a whole file (as the reader does, all in memory) with `min` = `target`.
    pub(crate) fn cut_all(text: &[u8], target: usize, max: usize) -> Vec<&[u8]> {
        let mut rest = text;
        let mut out = Vec::new();
        while !rest.is_empty() {
            let cut = next_cut(rest, target, max, true, None).unwrap();
            out.push(&rest[..cut]);
            rest = &rest[cut..];
        }
        out
    }

    #[test]
    fn cuts_at_the_first_line_start_after_the_target() {
        let text = b"aaaa\nbbbb\ncccc\n";
        assert_eq!(cut_all(text, 3, 100), vec![&b"aaaa\n"[..], b"bbbb\n", b"cccc\n"]);
        assert_eq!(cut_all(text, 6, 100), vec![&b"aaaa\nbbbb\n"[..], b"cccc\n"]);
    }

    #[test]
    fn blank_lines_indentation_and_trailing_spaces_are_not_cut_points() {
        for text in [
            &b"aaaa\n\nbbbb"[..],
            b"aaaa\n  bbbb",
            b"aaaa \nbbbb",
            b"aaaa\r\nbbbb",
            b"aaaa\n\tbbbb",
        ] {
            assert_eq!(cut_all(text, 1, 100), vec![text], "{:?}", String::from_utf8_lossy(text));
        }
        // Unicode whitespace counts too: U+3000 ends the line, U+00A0 starts the next.
        for text in ["aaaa\u{3000}\nbbbb", "aaaa\n\u{a0}bbbb"] {
            assert_eq!(cut_all(text.as_bytes(), 1, 100).len(), 1, "{text:?}");
        }
        // Non-ASCII, non-whitespace neighbours are fine.
        assert_eq!(cut_all("aé\nçb".as_bytes(), 1, 100).len(), 2);
    }

    #[test]
    fn without_line_starts_a_space_between_words_then_a_character_boundary() {
        // max 8: no line start within it, so a word boundary at or after the target.
        assert_eq!(cut_all(b"aaaa bbbb cccc", 3, 8), vec![&b"aaaa"[..], b" bbbb", b" cccc"]);
        // A line start within max still wins over an earlier word boundary.
        assert_eq!(cut_all(b"aa bb\ncc", 1, 8), vec![&b"aa bb\n"[..], b"cc"]);
        // No whitespace at all: a character boundary at or after the target, never inside a character.
        let text = "ééééééééé".as_bytes();
        let chunks = cut_all(text, 3, 6);
        assert!(chunks.iter().all(|c| std::str::from_utf8(c).is_ok()), "{chunks:?}");
        assert_eq!(chunks.concat(), text);
        assert_eq!(chunks[0].len(), 4);
    }

    #[test]
    fn a_short_file_is_one_chunk() {
        assert_eq!(cut_all(b"aaaa bbbb", 3, 100), vec![&b"aaaa bbbb"[..]]);
        assert_eq!(next_cut(b"", 10, 100, true, None), Some(0));
    }

    #[test]
    fn at_the_split_every_kind_of_cut_point_counts_before_the_end_of_the_file() {
        assert_eq!(next_cut(b"aaaa\nbbbb\n", 2, 100, true, Some(2)), Some(5));
        assert_eq!(next_cut(b"aaaa bbbb", 2, 100, true, Some(2)), Some(4));
        assert_eq!(next_cut(b"aaaabbbb", 2, 100, true, Some(2)), Some(2));
        // The split further than the target: a line start before it is still a cut point ...
        assert_eq!(next_cut(b"aa\nbb cc dd", 2, 100, true, Some(9)), Some(3));
        // ... and without one, the cut is at the split, not at the target.
        assert_eq!(next_cut(b"aabb cc dd", 2, 100, true, Some(6)), Some(7));
        assert_eq!(next_cut(b"aabbccdd", 2, 100, true, Some(6)), Some(6));
        // The split at or past the end: the rest is one chunk.
        assert_eq!(next_cut(b"aaaa", 4, 100, true, Some(4)), Some(4));
        assert_eq!(next_cut(b"aaaa bb", 2, 100, true, Some(7)), Some(7));
    }

    #[test]
    fn asks_for_more_until_a_position_can_be_judged() {
        // The character after the break is not there yet.
        assert_eq!(next_cut(b"aaaa\n", 1, 100, false, None), None);
        assert_eq!(next_cut(b"aaaa\nbbbbb", 1, 100, false, None), Some(5));
        // No cut point and less than max read: read more.
        assert_eq!(next_cut(b"aaaa bbbb", 1, 100, false, None), None);
    }

    #[test]
    fn cuts_do_not_depend_on_how_much_was_read() {
        let text = "one two\nthree\n\nfour  five\nsix\u{a0}seven\r\neight nine ten\n".repeat(5);
        let bytes = text.as_bytes();
        let (target, max) = (7, 20);
        let whole = cut_all(bytes, target, max);
        for step in [1, 2, 3, 5, 64] {
            // The reader's loop: grow the buffer by `step` until a cut is found.
            let (mut start, mut end, mut chunks) = (0, 0, Vec::new());
            while start < bytes.len() {
                let eof = end == bytes.len();
                match next_cut(&bytes[start..end], target, max, eof, None) {
                    Some(cut) => {
                        chunks.push(&bytes[start..start + cut]);
                        start += cut;
                    }
                    None => end = (end + step).min(bytes.len()),
                }
            }
            assert_eq!(chunks, whole, "read step {step}");
        }
        assert!(whole.len() > 5);
    }
}
