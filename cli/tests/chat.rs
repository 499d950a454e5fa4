//! `lockstep chat` (the real binary, stdin piped) against a tiny random-weight chat checkpoint: the weights say
//! nothing, so these tests check the mechanics — commands, history, determinism, what reaches stdout.
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use lockstep_common::data::Tokenizer;
use lockstep_common::data::chat::SPECIAL_TOKENS;
use lockstep_common::spec::TokenizerSpec;

/// The char tokenizer's whole vocabulary: no newline, so each reply is exactly one line of stdout.
const CORPUS: &str = "hello hi world, the quick brown fox";

fn tokenizer() -> Tokenizer {
    Tokenizer::for_text(&TokenizerSpec::Char, CORPUS).unwrap()
}

fn chat_checkpoint(root: &Path) -> PathBuf {
    common::tiny_chat_checkpoint(root, &tokenizer())
}

/// `lockstep chat --checkpoint DIR EXTRA...` with `input` on stdin.
fn chat(dir: &Path, extra: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["chat", "--checkpoint", dir.to_str().unwrap()])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

const GREEDY: [&str; 6] = ["--temperature", "0", "--seed", "1", "--max-new-tokens", "12"];

/// The replies of a successful session, one per line.
fn replies(out: &Output) -> Vec<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(stdout.is_empty() || stdout.ends_with('\n'), "{stdout:?}");
    stdout.lines().map(String::from).collect()
}

#[test]
fn a_piped_session_answers_each_message_reproducibly() {
    let root = tempfile::tempdir().unwrap();
    let dir = chat_checkpoint(root.path());
    let input = "hello\n/reset\n\nhi\n/quit\nnever read\n";
    let out = chat(&dir, &GREEDY, input);
    let got = replies(&out);
    assert_eq!(got.len(), 2, "{got:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    for special in SPECIAL_TOKENS.iter().chain(&["<|endoftext|>", "\u{fffd}"]) {
        assert!(!stdout.contains(special), "{special} in {stdout:?}");
    }
    assert!(!stdout.contains("you>"), "no prompt when stdin is a pipe: {stdout:?}");
    assert!(
        got.iter().flat_map(|r| r.chars()).all(|c| CORPUS.contains(c)),
        "{got:?}"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("seed 1") && stderr.contains("[conversation cleared]"),
        "{stderr}"
    );

    let again = chat(&dir, &GREEDY, input);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), stdout);
    // The checkpoint root works too (its newest step is used).
    let from_root = chat(root.path(), &GREEDY, input);
    assert_eq!(String::from_utf8(from_root.stdout).unwrap(), stdout);
    // End of input ends the session as /quit does.
    assert_eq!(replies(&chat(&dir, &GREEDY, "hello")).len(), 1);

    // Sampling: one seeded stream for the session, so the same seed gives the same replies. (Random weights that
    // tie the embedding to the output mostly echo the <|assistant|> marker, so greedy replies are often empty;
    // this seed samples text, which must hold no special token either.)
    let sampled = ["--temperature", "1", "--seed", "4", "--max-new-tokens", "12"];
    let first = chat(&dir, &sampled, input);
    let got = replies(&first);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().any(|r| !r.is_empty()), "{got:?}");
    assert!(
        got.iter().flat_map(|r| r.chars()).all(|c| CORPUS.contains(c)),
        "{got:?}"
    );
    assert_eq!(chat(&dir, &sampled, input).stdout, first.stdout);
}

#[test]
fn reset_forgets_the_conversation() {
    let root = tempfile::tempdir().unwrap();
    let dir = chat_checkpoint(root.path());
    let fresh = replies(&chat(&dir, &GREEDY, "hi\n"));
    let after_reset = replies(&chat(&dir, &GREEDY, "hello world\n/reset\nhi\n"));
    let with_history = replies(&chat(&dir, &GREEDY, "hello world\nhi\n"));
    assert_eq!(after_reset[1], fresh[0]);
    // The same message after a conversation is answered from a longer prompt: with these weights, differently.
    assert_ne!(with_history[1], fresh[0], "{with_history:?} vs {fresh:?}");
    // The system message is part of every prompt, and /reset keeps it.
    let system = ["--system", "be brief"];
    let with_system = replies(&chat(&dir, &[&GREEDY[..], &system].concat(), "hi\n"));
    let system_reset = replies(&chat(
        &dir,
        &[&GREEDY[..], &system].concat(),
        "hello world\n/reset\nhi\n",
    ));
    assert_eq!(system_reset[1], with_system[0]);
}

#[test]
fn a_long_conversation_stays_within_the_context_window() {
    let root = tempfile::tempdir().unwrap();
    let dir = chat_checkpoint(root.path());
    // 64-token window: each reply may take up to 16 tokens, so old exchanges must be forgotten.
    let input = "the quick brown fox\n".repeat(6) + &"hello ".repeat(20) + "\n";
    let out = chat(&dir, &["--temperature", "1", "--seed", "3"], &input);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let got = replies(&out);
    assert_eq!(got.len(), 7, "{stderr}");
    assert!(got.iter().all(|r| r.chars().count() < 64), "{got:?}");
    assert!(stderr.contains("oldest exchanges are forgotten"), "{stderr}");
    assert!(stderr.contains("the model sees only the last"), "{stderr}");
}

#[test]
fn a_model_without_chat_tokens_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = common::tiny_checkpoint(root.path(), &tokenizer());
    let out = chat(&dir, &GREEDY, "hi\n");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no chat tokens") && stderr.contains("data.source = \"sft\""),
        "{stderr}"
    );
}

#[test]
fn a_message_the_tokenizer_cannot_encode_costs_only_that_message() {
    let root = tempfile::tempdir().unwrap();
    let dir = chat_checkpoint(root.path());
    let out = chat(&dir, &GREEDY, "héllo\n/nonsense\nhi\n");
    let got = replies(&out);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(got.len(), 1, "{stderr}");
    assert!(stderr.contains("error:") && stderr.contains("'é'"), "{stderr}");
    assert!(
        stderr.contains("/nonsense is not a command") && stderr.contains("/reset"),
        "{stderr}"
    );
    // The refused message never entered the history.
    assert_eq!(got, replies(&chat(&dir, &GREEDY, "hi\n")));
    // A flag the tokenizer cannot encode is refused up front, naming the flag.
    let out = chat(&dir, &["--system", "é"], "hi\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--system"));
}
