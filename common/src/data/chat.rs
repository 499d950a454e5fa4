//! The one chat template of supervised fine-tuning, `lockstep chat` and `lockstep eval`'s chat-model decoding.
//!
//! A conversation is rendered as
//!
//! ```text
//! [<|endoftext|>] <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> <|user|> ...
//! ```
//!
//! with no spaces or newlines added: every marker is a special token of its own. The four special tokens take the
//! ids right after the tokenizer's vocabulary (`<|system|>` = V, `<|user|>` = V + 1, `<|assistant|>` = V + 2,
//! `<|end|>` = V + 3 for a tokenizer of V ids), so a fine-tuned model needs `model.vocab_size ≥ V + 4`. Message
//! text is encoded as plain text: a literal `<|end|>` typed in a message is characters, never the token, so user
//! input cannot forge a turn. A conversation starts with the tokenizer's end-of-text token when it has one, as
//! every document of pretraining data does (`lockstep prepare` puts it before each), so the model sees the start
//! of a conversation as the start of a document. A system message may come first only.
//!
//! Training counts only what the assistant says: the text of every assistant turn and the `<|end|>` that closes
//! it (so the model learns to stop). Everything else — the end-of-text, the role markers, the system and user
//! turns — is context whose next-token targets are masked out of the loss. To answer, a model is given the
//! conversation so far followed by `<|assistant|>` ([`ChatTemplate::prompt`]) and generates until `<|end|>`.
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// The special tokens' texts, in id order after the tokenizer's vocabulary.
pub const SPECIAL_TOKENS: [&str; 4] = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"];

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name in JSON (`"system"`, `"user"`, `"assistant"`).
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// Parses a JSON role name.
    pub fn parse(name: &str) -> Option<Role> {
        [Role::System, Role::User, Role::Assistant]
            .into_iter()
            .find(|r| r.name() == name)
    }

    fn index(self) -> u32 {
        match self {
            Role::System => 0,
            Role::User => 1,
            Role::Assistant => 2,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A rendered conversation: the token ids and, per id, whether it is a target the loss counts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rendered {
    pub ids: Vec<u32>,
    /// `counted[i]`: `ids[i]` is what the assistant says (its text or the `<|end|>` closing its turn), so
    /// predicting it from `ids[..i]` counts in the loss.
    pub counted: Vec<bool>,
}

/// The template over one tokenizer: where its special tokens sit and how conversations become ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The tokenizer's vocabulary size: the first special token's id.
    base: u32,
    /// The end-of-text id that starts every conversation, if the tokenizer has one.
    bos: Option<u32>,
}

impl ChatTemplate {
    /// The template for `tokenizer`: the special tokens follow its vocabulary.
    pub fn new(tokenizer: &Tokenizer) -> Self {
        Self {
            base: tokenizer.vocab_size() as u32,
            bos: tokenizer.eot(),
        }
    }

    /// Ids a model needs to hold the tokenizer's vocabulary and the special tokens: `model.vocab_size` at least.
    pub fn vocab_size(&self) -> usize {
        self.base as usize + SPECIAL_TOKENS.len()
    }

    /// The id of the marker that opens a `role` turn.
    pub fn role_id(&self, role: Role) -> u32 {
        self.base + role.index()
    }

    /// The id of `<|end|>`, which closes every turn: generation stops there.
    pub fn end_id(&self) -> u32 {
        self.base + 3
    }

    /// Whether `id` is one of the template's special tokens.
    pub fn is_special(&self, id: u32) -> bool {
        (self.base..self.base + SPECIAL_TOKENS.len() as u32).contains(&id)
    }

    /// Renders a whole conversation for training. It must hold an assistant turn (else nothing would be learnt),
    /// and a system message may come first only.
    pub fn render(&self, tokenizer: &Tokenizer, messages: &[Message]) -> Result<Rendered> {
        if !messages.iter().any(|m| m.role == Role::Assistant) {
            return Err(Error::Tokenizer(
                "the conversation has no assistant message, so it has nothing to train on".into(),
            ));
        }
        let mut out = self.start();
        for (i, m) in messages.iter().enumerate() {
            self.push_turn(tokenizer, i, m, &mut out)?;
        }
        Ok(out)
    }

    /// The ids a model continues to answer after `history`: the conversation so far and the assistant's marker.
    /// The history may be empty or end with any role.
    pub fn prompt(&self, tokenizer: &Tokenizer, history: &[Message]) -> Result<Vec<u32>> {
        let mut out = self.start();
        for (i, m) in history.iter().enumerate() {
            self.push_turn(tokenizer, i, m, &mut out)?;
        }
        out.ids.push(self.role_id(Role::Assistant));
        Ok(out.ids)
    }

    /// The conversation in rendered ids, the inverse of [`ChatTemplate::render`]: the leading end-of-text is
    /// optional, and a last turn without its `<|end|>` (a reply cut short) is kept as it is.
    pub fn parse(&self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<Vec<Message>> {
        let ids = match (ids.first(), self.bos) {
            (Some(&first), Some(bos)) if first == bos => &ids[1..],
            _ => ids,
        };
        let mut messages = Vec::new();
        let mut open: Option<(Role, usize)> = None;
        for (i, &id) in ids.iter().enumerate() {
            if !self.is_special(id) {
                if open.is_none() {
                    return Err(Error::Tokenizer(format!(
                        "token {i} ({id}) is outside any turn; a turn starts with a role marker"
                    )));
                }
                continue;
            }
            match (open, self.special_role(id)) {
                (None, Some(role)) => open = Some((role, i + 1)),
                (Some((role, start)), None) => {
                    messages.push(Message::new(role, tokenizer.decode(&ids[start..i])));
                    open = None;
                }
                (Some(_), Some(role)) => {
                    return Err(Error::Tokenizer(format!(
                        "token {i} opens a {role} turn inside an unfinished turn (no <|end|> before it)"
                    )));
                }
                (None, None) => {
                    return Err(Error::Tokenizer(format!("token {i} is an <|end|> outside any turn")));
                }
            }
        }
        if let Some((role, start)) = open {
            messages.push(Message::new(role, tokenizer.decode(&ids[start..])));
        }
        Ok(messages)
    }

    /// The text of `ids` with special tokens spelt out (`<|user|>` …), for logs and tests.
    pub fn decode(&self, tokenizer: &Tokenizer, ids: &[u32]) -> String {
        let mut text = String::new();
        let mut plain = Vec::new();
        for &id in ids {
            if self.is_special(id) {
                text.push_str(&tokenizer.decode(&plain));
                plain.clear();
                text.push_str(SPECIAL_TOKENS[(id - self.base) as usize]);
            } else {
                plain.push(id);
            }
        }
        text.push_str(&tokenizer.decode(&plain));
        text
    }

    fn start(&self) -> Rendered {
        let ids: Vec<u32> = self.bos.into_iter().collect();
        Rendered {
            counted: vec![false; ids.len()],
            ids,
        }
    }

    fn special_role(&self, id: u32) -> Option<Role> {
        match id - self.base {
            0 => Some(Role::System),
            1 => Some(Role::User),
            2 => Some(Role::Assistant),
            _ => None,
        }
    }

    /// Appends message `index` of a conversation: marker, text, `<|end|>`.
    fn push_turn(&self, tokenizer: &Tokenizer, index: usize, m: &Message, out: &mut Rendered) -> Result<()> {
        if m.role == Role::System && index > 0 {
            return Err(Error::Tokenizer(format!(
                "message {} is a system message; only the first message may be one",
                index + 1
            )));
        }
        let text = tokenizer.encode(&m.content).map_err(|e| {
            Error::Tokenizer(format!(
                "message {} ({}): {}",
                index + 1,
                m.role,
                crate::error::one_line(&e)
            ))
        })?;
        let counted = m.role == Role::Assistant;
        out.ids.push(self.role_id(m.role));
        out.counted.push(false);
        out.counted.extend(std::iter::repeat_n(counted, text.len() + 1));
        out.ids.extend(text);
        out.ids.push(self.end_id());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::TokenizerSpec;

    fn conversation() -> Vec<Message> {
        vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Translate: the red cat"),
            Message::new(Role::Assistant, "le chat rouge"),
            Message::new(Role::User, "And <|end|> the dog?"),
            Message::new(Role::Assistant, ""),
        ]
    }

    fn tokenizers() -> Vec<Tokenizer> {
        let text: String = conversation().iter().map(|m| m.content.clone()).collect();
        vec![
            Tokenizer::for_text(&TokenizerSpec::Char, &text).unwrap(),
            Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty()).unwrap(),
            Tokenizer::for_text(&TokenizerSpec::Gpt2, "").unwrap(),
        ]
    }

    #[test]
    fn render_then_parse_gives_the_conversation_back() {
        for tok in tokenizers() {
            let t = ChatTemplate::new(&tok);
            let r = t.render(&tok, &conversation()).unwrap();
            assert_eq!(r.ids.len(), r.counted.len());
            assert_eq!(t.parse(&tok, &r.ids).unwrap(), conversation(), "{}", tok.describe());
            assert!(r.ids.iter().all(|&id| (id as usize) < t.vocab_size()));
            // A literal "<|end|>" in a message is text, not the special token: 5 turns, 5 ends.
            assert_eq!(r.ids.iter().filter(|&&id| id == t.end_id()).count(), 5);
            if let Some(eot) = tok.eot() {
                assert_eq!(r.ids[0], eot, "starts like a document");
            }
        }
    }

    #[test]
    fn only_assistant_text_and_its_end_are_counted() {
        let tok = Tokenizer::for_text(&TokenizerSpec::Char, "abcxyz").unwrap();
        let t = ChatTemplate::new(&tok);
        let messages = [
            Message::new(Role::User, "abc"),
            Message::new(Role::Assistant, "xy"),
            Message::new(Role::User, "z"),
            Message::new(Role::Assistant, "a"),
        ];
        let r = t.render(&tok, &messages).unwrap();
        let counted: String = r
            .ids
            .iter()
            .zip(&r.counted)
            .filter(|(_, c)| **c)
            .map(|(&id, _)| t.decode(&tok, &[id]))
            .collect();
        assert_eq!(counted, "xy<|end|>a<|end|>");
        assert_eq!(
            t.decode(&tok, &r.ids),
            "<|user|>abc<|end|><|assistant|>xy<|end|><|user|>z<|end|><|assistant|>a<|end|>"
        );
        // The prompt for the next answer is the history and the assistant marker, nothing counted.
        let prompt = t.prompt(&tok, &messages[..3]).unwrap();
        assert_eq!(
            t.decode(&tok, &prompt),
            "<|user|>abc<|end|><|assistant|>xy<|end|><|user|>z<|end|><|assistant|>"
        );
        assert_eq!(&r.ids[..prompt.len()], &prompt[..]);
    }

    #[test]
    fn bad_conversations_are_refused_with_the_reason() {
        let tok = Tokenizer::for_text(&TokenizerSpec::Char, "ab").unwrap();
        let t = ChatTemplate::new(&tok);
        let err = t
            .render(&tok, &[Message::new(Role::User, "a")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no assistant message"), "{err}");
        let late_system = [
            Message::new(Role::User, "a"),
            Message::new(Role::System, "b"),
            Message::new(Role::Assistant, "a"),
        ];
        let err = t.render(&tok, &late_system).unwrap_err().to_string();
        assert!(err.contains("message 2") && err.contains("system"), "{err}");
        let unknown_char = [Message::new(Role::User, "q"), Message::new(Role::Assistant, "a")];
        let err = t.render(&tok, &unknown_char).unwrap_err().to_string();
        assert!(err.contains("message 1 (user)"), "{err}");
        let err = t.parse(&tok, &[0, t.end_id()]).unwrap_err().to_string();
        assert!(err.contains("outside any turn"), "{err}");
        let cut = [t.role_id(Role::User), 0, t.end_id(), t.role_id(Role::Assistant), 1];
        assert_eq!(
            t.parse(&tok, &cut).unwrap(),
            [Message::new(Role::User, "a"), Message::new(Role::Assistant, "b")]
        );
    }
}
