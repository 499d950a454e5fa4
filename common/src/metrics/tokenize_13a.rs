//! sacreBLEU's default `13a` tokenizer (the mteval-v13a rules WMT uses), reproduced character for character.
//!
//! sacreBLEU runs four Python `re.sub` passes over the padded line. Each pattern is one or two fixed characters, so
//! a left-to-right scan that takes a match as soon as it sees one and resumes after it is exactly `re.sub`'s
//! leftmost, non-overlapping matching; no regex engine is needed to be exact, and no Unicode class question
//! arises: every class in those patterns is ASCII (`[^0-9]` is any code point but the ten ASCII digits).

/// Tokenizes one segment as sacreBLEU's `Tokenizer13a` does: tokens joined by single spaces.
///
/// BLEU strips trailing whitespace before calling this (see [`super::bleu`]); the tokenizer itself does not.
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    // Sequential, as sacreBLEU does it: "&amp;lt;" ends up as "<", not "&lt;".
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    // The padding lets a leading "." or "," count as preceded by a non-digit.
    let padded = format!(" {line} ");

    let mut spaced = String::with_capacity(padded.len() * 2);
    for c in padded.chars() {
        if is_13a_symbol(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    // Period and comma split unless preceded by a digit, then unless followed by one, so "4.5" and "1,000" stay.
    let spaced = split_pairs(
        &spaced,
        |a| !a.is_ascii_digit(),
        is_period_or_comma,
        |out, a, b| push_all(out, &[a, ' ', b, ' ']),
    );
    let spaced = split_pairs(
        &spaced,
        is_period_or_comma,
        |b| !b.is_ascii_digit(),
        |out, a, b| push_all(out, &[' ', a, ' ', b]),
    );
    let spaced = split_pairs(
        &spaced,
        |a| a.is_ascii_digit(),
        |b| b == '-',
        |out, a, b| push_all(out, &[a, ' ', b, ' ']),
    );

    python_split(&spaced).collect::<Vec<_>>().join(" ")
}

/// Whether Python's `str.isspace()` holds, which is what `str.split()` and `str.strip()` split on.
///
/// That is Unicode White_Space plus the four ASCII information separators U+001C..U+001F, which Rust's
/// `char::is_whitespace` leaves out; listed explicitly so the answer does not drift with Rust's Unicode tables.
pub fn is_python_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{9}'..='\u{d}'
            | '\u{1c}'..='\u{20}'
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// Python's argument-less `str.split()`: runs of whitespace separate, and no empty pieces.
pub fn python_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_python_whitespace).filter(|piece| !piece.is_empty())
}

/// The first pass's class `[\{-\~\[-\` -\&\(-\+\:-\@\/]`: ASCII punctuation except `'`, `,`, `-` and `.`, plus space.
fn is_13a_symbol(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

fn is_period_or_comma(c: char) -> bool {
    c == '.' || c == ','
}

fn push_all(out: &mut String, chars: &[char]) {
    out.extend(chars.iter());
}

/// One `re.sub` pass of a two-character pattern `(first)(second)`: a match is consumed whole, and scanning resumes
/// after its second character, so that character cannot start another match (as in Python).
fn split_pairs(
    s: &str,
    first: impl Fn(char) -> bool,
    second: impl Fn(char) -> bool,
    replace: impl Fn(&mut String, char, char),
) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    let mut chars = s.chars().peekable();
    while let Some(a) = chars.next() {
        if first(a)
            && let Some(&b) = chars.peek()
            && second(b)
        {
            chars.next();
            replace(&mut out, a, b);
            continue;
        }
        out.push(a);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected strings are what sacrebleu 2.6.0's Tokenizer13a returns for the same input.
    #[test]
    fn matches_sacrebleu_on_punctuation_numbers_and_entities() {
        let cases = [
            ("Hello, world!", "Hello , world !"),
            ("The price rose by 4.5% in March.", "The price rose by 4.5 % in March ."),
            ("1,000.5 items, 3-4 days", "1,000.5 items , 3 - 4 days"),
            ("Data-parallel e.g. U.S.A.", "Data-parallel e . g . U . S . A ."),
            ("We don't know.", "We don't know ."),
            ("&quot;a&quot; &amp;lt; b &gt; c", "\" a \" < b > c"),
            ("line one-\nline two\nthree", "line oneline two three"),
            ("<skipped> .5 ,x x,", ". 5 , x x ,"),
            ("a..b,,c", "a . . b , , c"),
            ("9.,9 .9 9. -9 9-", "9 . , 9 . 9 9 . -9 9 -"),
            ("café naïve «x» 模型,训练。", "café naïve «x» 模型 , 训练。"),
            ("", ""),
        ];
        for (input, expected) in cases {
            assert_eq!(tokenize_13a(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn python_whitespace_includes_information_separators() {
        assert_eq!(
            python_split("a\u{1c}b\u{a0}c\u{3000} d\t").collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert!(!is_python_whitespace('\u{200b}'));
        assert!(!is_python_whitespace('\u{180e}'));
    }
}
