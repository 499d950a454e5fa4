//! `lockstep generate` against a tiny checkpoint written by `checkpoint::save` (no training).
mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use lockstep_common::data::Tokenizer;
use lockstep_common::spec::TokenizerSpec;
use lockstep_worker::checkpoint;
use lockstep_worker::generate::{Generator, generate};
use lockstep_worker::sampling::{Sampler, SamplingConfig};

const CORPUS: &str = "hello world, the quick brown fox\n";

/// A random-weight char model of the corpus's vocabulary, saved as step 7 under `root`.
fn tiny_checkpoint(root: &Path) -> PathBuf {
    let tok = Tokenizer::for_text(&TokenizerSpec::Char, CORPUS).unwrap();
    common::tiny_checkpoint(root, &tok)
}

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .output()
        .unwrap()
}

fn generate_args<'a>(dir: &'a str, prompt: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["generate", "--checkpoint", dir, "--prompt", prompt];
    v.extend_from_slice(extra);
    v
}

#[test]
fn generate_streams_the_prompt_and_n_tokens_reproducibly() {
    let root = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(root.path());
    let prompt = "the fox";
    let args = ["--max-new-tokens", "5", "--seed", "1", "--temperature", "1"];
    let out = lockstep(&generate_args(dir.to_str().unwrap(), prompt, &args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with(prompt), "{stdout:?}");
    let text = stdout.strip_suffix('\n').unwrap();
    let new: String = text.chars().skip(prompt.chars().count()).collect();
    assert_eq!(new.chars().count(), 5, "{stdout:?}");
    assert!(new.chars().all(|c| CORPUS.contains(c)), "{new:?}");
    // The summary: one line on stderr, with the seed.
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("5 tokens") && stderr.contains("tokens/s") && stderr.contains("seed 1"),
        "{stderr}"
    );

    // The same as the library's cached decoding with the same seed; and the checkpoint root works too (its
    // newest step is picked), giving the same text.
    let loaded = checkpoint::load(&dir, &Device::Cpu).unwrap();
    let model = loaded.model().unwrap();
    let ids = loaded.tokenizer.encode(prompt).unwrap();
    let mut g = Generator::new(&model, &[ids], &Device::Cpu).unwrap();
    let cfg = SamplingConfig {
        temperature: 1.0,
        ..SamplingConfig::default()
    };
    let mut s = Sampler::new(cfg, 1).unwrap();
    let want = generate(&mut g, &mut s, 5, |_| Ok(ControlFlow::Continue(()))).unwrap();
    assert_eq!(new, loaded.tokenizer.decode(&want));
    let again = lockstep(&generate_args(root.path().to_str().unwrap(), prompt, &args));
    assert!(again.status.success());
    assert_eq!(String::from_utf8(again.stdout).unwrap(), stdout);
}

#[test]
fn generate_past_the_block_size_keeps_going() {
    let root = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(root.path());
    let out = lockstep(&generate_args(
        dir.to_str().unwrap(),
        "hello",
        &["--max-new-tokens", "20", "--temperature", "0"],
    ));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.chars().count(), 5 + 20 + 1, "{stdout:?}"); // block size 8 < 25
    assert!(stdout.starts_with("hello") && stdout.ends_with('\n'));
}

#[test]
fn generate_rejects_bad_input_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(root.path());
    let dir = dir.to_str().unwrap();
    let missing = root.path().join("missing");
    for (args, needle) in [
        (generate_args(dir, "the Zebra", &["--seed", "1"]), "'Z'"),
        (generate_args(dir, "the", &["--top-p", "0"]), "--top-p"),
        (generate_args(dir, "the", &["--temperature=-1"]), "--temperature"),
        (generate_args(missing.to_str().unwrap(), "the", &[]), "missing"),
    ] {
        let out = lockstep(&args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error:") && stderr.contains(needle), "{stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
