//! Supervised fine-tuning data (`data.source = "sft"`): a JSONL file of conversations, each rendered through the
//! [`ChatTemplate`] into one window of `train.seq_len` inputs and targets, the targets of everything but the
//! assistant's words masked ([`IGNORE`]).
//!
//! Each line is one example, either
//!
//! ```text
//! {"prompt": "Translate to Pig Latin: the cat", "response": "ethay atcay"}          (optional "system": "...")
//! {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
//! ```
//!
//! One example per window, padded at the end: with causal attention, padding after a sequence cannot change what
//! comes before it, so padding needs no attention mask, only masked targets (the pad inputs are `<|end|>`). An
//! example longer than a window is cut at `seq_len + 1` tokens (its tail is not trained on); one left with no
//! counted target is dropped. Both are counted and logged by the caller.
use std::path::{Path, PathBuf};

use crate::data::IGNORE;
use crate::data::chat::{ChatTemplate, Message, Role};
use crate::data::dataset::windows::Rows;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// One example: a whole conversation with at least one assistant turn.
pub type Conversation = Vec<Message>;

/// Reads every non-blank line of `path` as a conversation. Errors name the file, the 1-based line and the field.
pub fn read_conversations(path: &Path) -> Result<Vec<Conversation>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(line).map_err(|message| Error::Data {
            path: path.to_path_buf(),
            message: format!("line {}: {message}", i + 1),
        })?);
    }
    if out.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            message: "no examples; write one JSON object per line: {\"prompt\": ..., \"response\": ...} or \
                      {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}"
                .into(),
        });
    }
    Ok(out)
}

/// One line: `{"prompt", "response"[, "system"]}` or `{"messages": [...]}`.
fn parse_line(line: &str) -> std::result::Result<Conversation, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = value.as_object().ok_or("not a JSON object")?;
    let string = |v: &serde_json::Value, field: &str| -> std::result::Result<String, String> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("field \"{field}\" must be a string"))
    };
    let conversation = if let Some(messages) = obj.get("messages") {
        let list = messages.as_array().ok_or("field \"messages\" must be a list")?;
        list.iter()
            .enumerate()
            .map(|(j, m)| {
                let field = format!("messages[{j}]");
                let role = m.get("role").ok_or_else(|| format!("{field} has no \"role\""))?;
                let role = string(role, &format!("{field}.role"))?;
                let role = Role::parse(&role)
                    .ok_or_else(|| format!("{field}.role is \"{role}\"; use \"system\", \"user\" or \"assistant\""))?;
                let content = m.get("content").ok_or_else(|| format!("{field} has no \"content\""))?;
                Ok(Message::new(role, string(content, &format!("{field}.content"))?))
            })
            .collect::<std::result::Result<Vec<_>, String>>()?
    } else {
        let get = |field: &str| {
            obj.get(field)
                .ok_or_else(|| format!("field \"{field}\" is missing (or give \"messages\")"))
                .and_then(|v| string(v, field))
        };
        let mut conversation = Vec::new();
        if let Some(system) = obj.get("system") {
            conversation.push(Message::new(Role::System, string(system, "system")?));
        }
        conversation.push(Message::new(Role::User, get("prompt")?));
        conversation.push(Message::new(Role::Assistant, get("response")?));
        conversation
    };
    if !conversation.iter().any(|m| m.role == Role::Assistant) {
        return Err("the conversation has no assistant message, so it has nothing to train on".into());
    }
    Ok(conversation)
}

/// What building the windows did to the examples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowStats {
    /// Examples longer than a window, cut at `seq_len + 1` tokens.
    pub truncated: usize,
    /// Examples with no counted target left after the cut, left out.
    pub dropped: usize,
}

/// One padded window per conversation (see the module docs). `path` and the example's position name a bad one.
pub fn build_rows(
    conversations: &[Conversation],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    seq_len: usize,
    path: &Path,
    first_line: usize,
) -> Result<(Rows, RowStats)> {
    let mut rows = Rows::default();
    let mut stats = RowStats::default();
    let (mut inputs, mut targets) = (Vec::with_capacity(seq_len), Vec::with_capacity(seq_len));
    for (i, conversation) in conversations.iter().enumerate() {
        let rendered = template.render(tokenizer, conversation).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            message: format!("example {}: {}", first_line + i, crate::error::one_line(&e)),
        })?;
        if rendered.ids.len() > seq_len + 1 {
            stats.truncated += 1;
        }
        let n = rendered.ids.len().min(seq_len + 1);
        inputs.clear();
        targets.clear();
        inputs.extend_from_slice(&rendered.ids[..n - 1]);
        targets.extend(
            rendered.ids[1..n]
                .iter()
                .zip(&rendered.counted[1..n])
                .map(|(&id, &counted)| if counted { id } else { IGNORE }),
        );
        if targets.iter().all(|&t| t == IGNORE) {
            stats.dropped += 1;
            continue;
        }
        inputs.resize(seq_len, template.end_id());
        targets.resize(seq_len, IGNORE);
        rows.push(&inputs, &targets);
    }
    Ok((rows, stats))
}

/// Splits off the validation conversations: the last `val_fraction` of them, at least one, and at least one left to
/// train on (`conversations` needs two or more). Returns the validation part; `conversations` keeps the rest.
pub fn split_val(conversations: &mut Vec<Conversation>, val_fraction: f64) -> Vec<Conversation> {
    let n = conversations.len();
    let n_val = (((n as f64) * val_fraction).round() as usize).clamp(1, n.saturating_sub(1).max(1));
    conversations.split_off(n - n_val.min(n))
}

/// A held-out item for generation metrics: the conversation before its last assistant turn, and that turn's text
/// as the reference. `None` when the conversation does not end with an assistant turn.
pub fn split_reply(conversation: &[Message]) -> Option<(&[Message], &str)> {
    match conversation.split_last() {
        Some((last, history)) if last.role == Role::Assistant => Some((history, &last.content)),
        _ => None,
    }
}

/// The texts a `char` tokenizer must cover to encode these conversations.
pub fn all_text(conversations: &[Conversation]) -> String {
    conversations.iter().flatten().map(|m| m.content.as_str()).collect()
}

/// The `tokenizer.json` an `init_from` directory carries, if any.
pub fn init_tokenizer_file(dir: &Path) -> Option<PathBuf> {
    Some(dir.join("tokenizer.json")).filter(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::TokenizerSpec;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sft.jsonl");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn both_line_formats_are_read() {
        let (_dir, path) = write(concat!(
            "{\"prompt\": \"ab\", \"response\": \"ba\"}\n",
            "\n",
            "{\"system\": \"s\", \"prompt\": \"a\", \"response\": \"b\"}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
        ));
        let c = read_conversations(&path).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[0],
            [Message::new(Role::User, "ab"), Message::new(Role::Assistant, "ba")]
        );
        assert_eq!(c[1][0], Message::new(Role::System, "s"));
        assert_eq!(
            c[2],
            [Message::new(Role::User, "a"), Message::new(Role::Assistant, "b")]
        );
        assert_eq!(split_reply(&c[1]).unwrap(), (&c[1][..2], "b"));
    }

    #[test]
    fn bad_lines_name_the_file_line_and_field() {
        for (text, want) in [
            ("{\"prompt\": \"a\"}\n", "\"response\" is missing"),
            ("{\"prompt\": 1, \"response\": \"b\"}\n", "\"prompt\" must be a string"),
            (
                "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n",
                "messages[0].role is \"bot\"",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
                "no assistant message",
            ),
            ("[1]\n", "not a JSON object"),
            ("{oops\n", "not JSON"),
        ] {
            let (_dir, path) = write(&format!("{{\"prompt\": \"a\", \"response\": \"b\"}}\n{text}"));
            let err = read_conversations(&path).unwrap_err().to_string();
            assert!(err.contains("sft.jsonl: line 2") && err.contains(want), "{err}");
        }
        let (_dir, path) = write("\n\n");
        assert!(
            read_conversations(&path)
                .unwrap_err()
                .to_string()
                .contains("no examples")
        );
    }

    #[test]
    fn rows_mask_everything_but_the_reply_and_pad_at_the_end() {
        let tok = Tokenizer::for_text(&TokenizerSpec::Char, "abcxyz").unwrap();
        let t = ChatTemplate::new(&tok);
        let short = vec![Message::new(Role::User, "ab"), Message::new(Role::Assistant, "xy")];
        let long = vec![
            Message::new(Role::User, "abcabc"),
            Message::new(Role::Assistant, "xyzxyz"),
        ];
        let prompt_only = vec![
            Message::new(Role::User, "abcabcabc"),
            Message::new(Role::Assistant, "x"),
        ];
        let (rows, stats) = build_rows(&[short, long, prompt_only], &t, &tok, 10, Path::new("d"), 1).unwrap();
        assert_eq!(
            stats,
            RowStats {
                truncated: 2,
                dropped: 1
            }
        );
        assert_eq!(rows.len(), 2);
        let w = crate::data::dataset::Windows::rows(rows, 10, Path::new("d"));
        let (mut x, mut y) = (Vec::new(), Vec::new());
        w.extend_window(0, &mut x, &mut y).unwrap();
        // <|user|> a b <|end|> <|assistant|> x y <|end|>, then padding.
        assert_eq!(t.decode(&tok, &x[..8]), "<|user|>ab<|end|><|assistant|>xy<|end|>");
        assert!(x[8..].iter().all(|&id| id == t.end_id()));
        let shown: Vec<String> = y
            .iter()
            .map(|&id| {
                if id == IGNORE {
                    "-".into()
                } else {
                    t.decode(&tok, &[id])
                }
            })
            .collect();
        assert_eq!(shown.concat(), "----xy<|end|>---");
        assert_eq!(w.counted(0), 3);
        // The long one is cut after 11 tokens: its reply's first 2 characters remain.
        assert_eq!(w.counted(1), 2);
        assert!(w.extend_window(2, &mut x, &mut y).is_err());
    }
}
