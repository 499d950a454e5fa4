//! Decoding tokens one at a time, as a model generates them, for any tokenizer.
//!
//! A token may end in the middle of a character (byte-level tokenizers) or decode differently after another token
//! (a Hugging Face decoder that drops a leading space). So the stream decodes a short window — the tokens of the
//! last piece it returned, plus the new ones — and returns what the window adds once that no longer ends in
//! U+FFFD, the mark of an unfinished character. The pieces add up to [`Tokenizer::decode`] of all tokens.
use super::Tokenizer;

/// Most tokens held back while the text ends in U+FFFD. A UTF-8 character is at most 4 bytes, so a longer run
/// means real U+FFFDs (ids outside the vocabulary, bytes that are not UTF-8): returning them bounds the work per
/// token (at worst such a run cut inside a character shows one U+FFFD more than `decode`).
const MAX_PENDING: usize = 32;

/// Turns tokens into text as they come.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    /// The tokens of the last returned piece, then those not yet returned.
    ids: Vec<u32>,
    /// How many of `ids` belong to the last returned piece.
    context: usize,
    /// `decode(ids[..context])`.
    context_text: String,
}

impl<'t> TextStream<'t> {
    /// A stream that has returned nothing yet.
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            context: 0,
            context_text: String::new(),
        }
    }

    /// The text that `token` completes (possibly empty).
    pub fn push(&mut self, token: u32) -> String {
        self.ids.push(token);
        let text = self.tokenizer.decode(&self.ids);
        let unfinished = text.ends_with(char::REPLACEMENT_CHARACTER) && self.ids.len() - self.context < MAX_PENDING;
        if unfinished || text.len() <= self.context_text.len() {
            return String::new();
        }
        let new = new_part(&text, &self.context_text);
        self.ids.drain(..self.context);
        self.context = self.ids.len();
        self.context_text = self.tokenizer.decode(&self.ids);
        new
    }

    /// The text of tokens still held back (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let text = self.tokenizer.decode(&self.ids);
        let rest = if text.len() > self.context_text.len() {
            new_part(&text, &self.context_text)
        } else {
            String::new()
        };
        self.ids.clear();
        self.context = 0;
        self.context_text.clear();
        rest
    }
}

/// What `text` adds to `context`. When the new tokens changed how the context itself decodes (a character
/// completed across the boundary), the text from the first difference on.
fn new_part(text: &str, context: &str) -> String {
    if let Some(new) = text.strip_prefix(context) {
        return new.to_string();
    }
    let common = text
        .char_indices()
        .zip(context.chars())
        .find(|((_, a), b)| a != b)
        .map_or(context.len().min(text.len()), |((i, _), _)| i);
    text[common..].to_string()
}

#[cfg(test)]
mod tests {
    use super::super::TokenizerSpec;
    use super::super::tests::corpus;
    use super::*;

    fn stream_all(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
        let mut s = TextStream::new(tok);
        let mut pieces: Vec<String> = ids.iter().map(|&t| s.push(t)).collect();
        pieces.push(s.finish());
        let whole = pieces.concat();
        (pieces, whole)
    }

    #[test]
    fn byte_level_streams_hold_partial_characters_back() {
        let byte = Tokenizer::for_text(&TokenizerSpec::Byte, "").unwrap();
        let ids: Vec<u32> = "a☃é".bytes().map(u32::from).collect();
        assert_eq!(stream_all(&byte, &ids).0, ["a", "", "", "☃", "", "é", ""]);
        let gpt2 = Tokenizer::for_text(&TokenizerSpec::Gpt2, "").unwrap();
        let text = "Hello ☃, naïve 日本語 world<|endoftext|>";
        let mut ids = gpt2.encode(text).unwrap();
        ids.push(50_256);
        let (pieces, whole) = stream_all(&gpt2, &ids);
        assert_eq!(whole, format!("{text}<|endoftext|>"));
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    }

    #[test]
    fn every_kind_streams_to_its_decoding() {
        let bpe = Tokenizer::train(&TokenizerSpec::Bpe { vocab_size: 300 }, corpus(100).into_iter()).unwrap();
        let text = "the naïve fox ☃ jumps 😀 over";
        let all = [
            Tokenizer::for_text(&TokenizerSpec::Char, text).unwrap(),
            Tokenizer::for_text(&TokenizerSpec::Byte, "").unwrap(),
            Tokenizer::for_text(&TokenizerSpec::Gpt2, "").unwrap(),
            bpe,
        ];
        for tok in &all {
            let mut ids = tok.encode(text).unwrap();
            ids.insert(3, tok.vocab_size() as u32 + 1); // an id of a padded vocabulary
            assert_eq!(stream_all(tok, &ids).1, tok.decode(&ids), "{}", tok.describe());
        }
    }

    #[test]
    fn byte_stream_equals_lossy_decoding_of_any_bytes() {
        let tok = Tokenizer::for_text(&TokenizerSpec::Byte, "").unwrap();
        // xorshift64: enough randomness for picking bytes.
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        let alphabet: Vec<u32> = "aé☃😀"
            .bytes()
            .chain([0x80, 0xbf, 0xc0, 0xe2, 0xf0, 0xff])
            .map(u32::from)
            .collect();
        for _ in 0..2000 {
            let n = next(20);
            let mut ids: Vec<u32> = (0..n).map(|_| alphabet[next(alphabet.len())]).collect();
            if next(4) == 0 {
                ids.push(300);
            }
            assert_eq!(stream_all(&tok, &ids).1, tok.decode(&ids), "{ids:?}");
        }
        assert_eq!(stream_all(&tok, &[0xe2, 0x98]).1, "\u{FFFD}"); // cut off at the end
    }

    #[test]
    fn char_stream_is_one_character_per_token() {
        let tok = Tokenizer::for_text(&TokenizerSpec::Char, "ab\n").unwrap();
        let (pieces, whole) = stream_all(&tok, &[1, 2, 0, 9, 1]);
        assert_eq!(pieces, ["a", "b", "\n", "", "\u{FFFD}a", ""]);
        assert_eq!(whole, tok.decode(&[1, 2, 0, 9, 1]));
    }
}
