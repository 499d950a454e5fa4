//! Stop rule and hypothesis text of `lockstep eval`'s plain (non-chat) decoding: an item stops at end-of-text or a
//! newline, and its hypothesis is the first line. The batched decoding itself is
//! [`lockstep_worker::decode::decode_all`].
use lockstep_common::data::Tokenizer;

/// End-of-text, or a token whose text holds a newline (a hypothesis is one line).
pub fn is_stop(tokenizer: &Tokenizer, token: u32) -> bool {
    Some(token) == tokenizer.eot() || tokenizer.decode(&[token]).contains('\n')
}

/// The text of `out` without its end-of-text token, cut at the first newline.
pub fn hypothesis(tokenizer: &Tokenizer, out: &[u32]) -> String {
    let ids = match (out.split_last(), tokenizer.eot()) {
        (Some((&last, rest)), Some(eot)) if last == eot => rest,
        _ => out,
    };
    let text = tokenizer.decode(ids);
    match text.split_once('\n') {
        Some((line, _)) => line.to_string(),
        None => text,
    }
}
