//! `lockstep eval` (the real binary) against a tiny random-weight checkpoint whose tokenizer is that of a tiny
//! prepared dataset.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::tiny_checkpoint;
use lockstep_common::data::Tokenizer;

const CORPUS: &str = "hello world, the quick brown fox jumps over the lazy dog.\n";

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A char-tokenised prepared directory of the corpus repeated, with a validation split.
fn prepared(root: &Path) -> PathBuf {
    let input = root.join("corpus.txt");
    std::fs::write(&input, CORPUS.repeat(40)).unwrap();
    let out = root.join("data");
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
    ok(lockstep(&[
        "prepare",
        "--input",
        i,
        "--tokenizer",
        "char",
        "--out",
        o,
        "--val-fraction",
        "0.2",
    ]));
    out
}

struct Fixture {
    _root: tempfile::TempDir,
    data: PathBuf,
    ckpt: String,
    jsonl: PathBuf,
    prompts: Vec<&'static str>,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let data = prepared(root.path());
    let tok = Tokenizer::load(&data.join("tokenizer.json")).unwrap();
    let ckpt = tiny_checkpoint(&root.path().join("ckpt"), &tok)
        .to_str()
        .unwrap()
        .to_string();
    // Prompts of several lengths, some longer than the block size of 8, so batches group and crop.
    let prompts = vec![
        "the",
        "fox",
        "hello",
        "quick brown",
        "dog",
        "lazy",
        "the lazy dog",
        "over",
    ];
    let jsonl = root.path().join("items.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| serde_json::json!({"source": p, "reference": "the quick brown fox"}).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    Fixture {
        _root: root,
        data,
        ckpt,
        jsonl,
        prompts,
    }
}

fn eval_json(f: &Fixture, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["eval", "--checkpoint", &f.ckpt, "--json", "--no-wordnet"];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(lockstep(&args))).unwrap()
}

#[test]
fn lm_perplexity_is_exp_of_the_loss() {
    let f = fixture();
    let data = f.data.to_str().unwrap();
    let r = eval_json(&f, &["--data", data, "--batch-size", "3"]);
    let (loss, ppl) = (r["loss"].as_f64().unwrap(), r["perplexity"].as_f64().unwrap());
    assert!(loss.is_finite() && ppl.is_finite() && ppl > 1.0, "{r}");
    assert!((ppl - loss.exp()).abs() <= 1e-9 * ppl, "{r}");
    assert_eq!(r["split"], "val");
    let windows = r["windows"].as_u64().unwrap();
    assert!(windows > 2 && r["tokens"].as_u64().unwrap() == windows * 8, "{r}");
    // --limit caps the windows; the batch size does not change the figure (beyond float summation order).
    let limited = eval_json(&f, &["--data", data, "--limit", "2", "--batch-size", "1"]);
    assert_eq!(limited["windows"], 2);
    let one = eval_json(&f, &["--data", data, "--batch-size", "1"]);
    assert!((one["loss"].as_f64().unwrap() - loss).abs() < 1e-5);
    // The table form names both figures.
    let text = ok(lockstep(&["eval", "--checkpoint", &f.ckpt, "--data", data]));
    assert!(text.contains("loss") && text.contains("perplexity"), "{text}");
}

#[test]
fn lm_refuses_data_of_another_tokenizer() {
    let f = fixture();
    let other = f._root.path().join("other");
    let input = f._root.path().join("other.txt");
    std::fs::write(&input, "0123456789+=\n".repeat(50)).unwrap();
    ok(lockstep(&[
        "prepare",
        "--input",
        input.to_str().unwrap(),
        "--tokenizer",
        "char",
        "--out",
        other.to_str().unwrap(),
    ]));
    let out = lockstep(&["eval", "--checkpoint", &f.ckpt, "--data", other.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("other") && stderr.contains("checkpoint") && stderr.contains("char ("),
        "{stderr}"
    );
}

#[test]
fn generation_scores_one_hypothesis_per_line_with_all_metrics() {
    let f = fixture();
    let r = eval_json(
        &f,
        &[
            "--data",
            f.jsonl.to_str().unwrap(),
            "--task",
            "summarize",
            "--max-new-tokens",
            "6",
        ],
    );
    let hyps = r["hypotheses"].as_array().unwrap();
    assert_eq!(hyps.len(), f.prompts.len());
    assert!(hyps.iter().all(|h| !h.as_str().unwrap().contains('\n')));
    let scores = &r["scores"];
    assert_eq!(scores["segments"], f.prompts.len());
    for metric in ["bleu", "chrf", "rouge", "meteor"] {
        assert!(scores[metric].is_object(), "{metric} missing: {r}");
    }
    assert!(r["tokens_per_sec"].as_f64().unwrap() > 0.0);
    let text = ok(lockstep(&[
        "eval",
        "--checkpoint",
        &f.ckpt,
        "--data",
        f.jsonl.to_str().unwrap(),
        "--task",
        "translate",
        "--no-wordnet",
    ]));
    for needle in ["BLEU", "chrF", "ROUGE-L", "METEOR", "tokens/s"] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

#[test]
fn greedy_equals_generate_and_the_batch_size_changes_nothing() {
    let f = fixture();
    let data = f.jsonl.to_str().unwrap();
    let hyps = |batch: &str| -> Vec<String> {
        let r = eval_json(
            &f,
            &[
                "--data",
                data,
                "--task",
                "translate",
                "--max-new-tokens",
                "12",
                "--batch-size",
                batch,
            ],
        );
        r["hypotheses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect()
    };
    let one = hyps("1");
    // Not vacuous: the random model says something before it stops.
    assert!(one.iter().filter(|h| h.chars().count() >= 2).count() >= 4, "{one:?}");
    assert_eq!(hyps("4"), one);
    for (prompt, hyp) in f.prompts.iter().zip(&one) {
        let out = ok(lockstep(&[
            "generate",
            "--checkpoint",
            &f.ckpt,
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
        ]));
        let new = out.strip_prefix(prompt).unwrap().strip_suffix('\n').unwrap();
        // eval stops at a newline or end-of-text; generate keeps going.
        let line = new.split('\n').next().unwrap();
        let line = line.split("<|endoftext|>").next().unwrap();
        assert_eq!(hyp, line, "prompt {prompt:?}");
    }
    // Sampling is seeded per item, so it too is independent of the batch size, and repeatable.
    let sampled = |batch: &str| {
        eval_json(
            &f,
            &[
                "--data",
                data,
                "--task",
                "translate",
                "--temperature",
                "1",
                "--seed",
                "5",
                "--batch-size",
                batch,
            ],
        )["hypotheses"]
            .clone()
    };
    assert_eq!(sampled("1"), sampled("8"));
}

#[test]
fn bad_jsonl_is_a_one_line_error_naming_file_and_line() {
    let f = fixture();
    let bad = f._root.path().join("bad.jsonl");
    for (content, needles) in [
        (
            "{\"source\": \"the\", \"reference\": \"x\"}\n{\"source\": \"fox\"}\n",
            vec!["line 2", "reference"],
        ),
        (
            "{\"source\": \"the\", \"reference\": \"x\"}\n\n{not json\n",
            vec!["line 3", "JSON"],
        ),
        (
            "{\"prompt\": \"the\", \"reference\": \"x\"}\n",
            vec!["line 1", "source"],
        ),
        (
            "{\"source\": \"the Zebra\", \"reference\": \"x\"}\n",
            vec!["line 1", "source", "'Z'"],
        ),
    ] {
        std::fs::write(&bad, content).unwrap();
        let out = lockstep(&[
            "eval",
            "--checkpoint",
            &f.ckpt,
            "--data",
            bad.to_str().unwrap(),
            "--task",
            "translate",
        ]);
        assert!(!out.status.success(), "{content}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error:") && stderr.contains("bad.jsonl"), "{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{n}: {stderr}");
        }
        assert!(out.stdout.is_empty());
    }
}

/// A chat model is asked through the chat template: each hypothesis is the model's answer to the source as a user
/// message (what `lockstep_worker::sft_eval::answer` gives), without special-token text.
#[test]
fn a_chat_model_answers_through_the_template() {
    use lockstep_common::data::chat::{Message, Role};

    let f = fixture();
    let tok = Tokenizer::load(&f.data.join("tokenizer.json")).unwrap();
    let dir = common::tiny_chat_checkpoint(&f._root.path().join("chat"), &tok);
    let args = [
        "eval",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--json",
        "--no-wordnet",
        "--data",
        f.jsonl.to_str().unwrap(),
        "--task",
        "translate",
        "--max-new-tokens",
        "12",
        "--temperature",
        "1",
        "--seed",
        "5",
    ];
    let r: serde_json::Value = serde_json::from_str(&ok(lockstep(&args))).unwrap();
    let hyps: Vec<&str> = r["hypotheses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(hyps.len(), f.prompts.len());
    assert!(hyps.iter().all(|h| !h.contains("<|")), "{hyps:?}");

    // Greedy answers equal the library's, which renders [user: source] + <|assistant|> and stops at <|end|>.
    let greedy = [&args[..11], &["--temperature", "0"]].concat();
    let r: serde_json::Value = serde_json::from_str(&ok(lockstep(&greedy))).unwrap();
    let loaded = lockstep_worker::checkpoint::load(&dir, &candle_core::Device::Cpu).unwrap();
    let template = loaded.chat_template().expect("a chat model");
    let histories: Vec<Vec<Message>> = f.prompts.iter().map(|p| vec![Message::new(Role::User, *p)]).collect();
    let want = lockstep_worker::sft_eval::answer(
        &loaded.model().unwrap(),
        &loaded.tokenizer,
        &template,
        &histories,
        12,
        8,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let got: Vec<String> = r["hypotheses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().into())
        .collect();
    assert_eq!(got, want);
}

/// llm.c GPT-2 shards carry no tokenizer: they are read as GPT-2's, so a GPT-2 checkpoint is evaluated on their val
/// split and any other is refused, saying why.
#[test]
fn lm_perplexity_on_llmc_shards() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("fineweb");
    std::fs::create_dir(&data).unwrap();
    // 256 little-endian i32 [20240520, 1, n, 0, …], then n little-endian u16 token ids.
    let shard = |name: &str, n: u32| {
        let mut bytes: Vec<u8> = [20240520i32, 1, n as i32]
            .into_iter()
            .chain(std::iter::repeat_n(0, 253))
            .flat_map(i32::to_le_bytes)
            .collect();
        bytes.extend((0..n).flat_map(|i| ((i * 7919 % 50257) as u16).to_le_bytes()));
        std::fs::write(data.join(name), bytes).unwrap();
    };
    shard("fineweb_train_000001.bin", 200);
    shard("fineweb_val_000000.bin", 81);
    let gpt2 = Tokenizer::for_text(&lockstep_common::spec::TokenizerSpec::Gpt2, "").unwrap();
    let ckpt = tiny_checkpoint(&root.path().join("gpt2"), &gpt2);
    let d = data.to_str().unwrap();
    let out = ok(lockstep(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        d,
        "--json",
    ]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    // 81 tokens in windows of the block size 8 + 1: (81 − 1) / 8 = 10 windows.
    assert_eq!(
        (r["split"].as_str(), r["windows"].as_u64(), r["tokens"].as_u64()),
        (Some("val"), Some(10), Some(80))
    );
    let (loss, ppl) = (r["loss"].as_f64().unwrap(), r["perplexity"].as_f64().unwrap());
    assert!(loss.is_finite() && (ppl - loss.exp()).abs() <= 1e-9 * ppl, "{r}");

    let chars = Tokenizer::for_text(&lockstep_common::spec::TokenizerSpec::Char, CORPUS).unwrap();
    let other = tiny_checkpoint(&root.path().join("char"), &chars);
    let out = lockstep(&["eval", "--checkpoint", other.to_str().unwrap(), "--data", d]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("llm.c shards are read as GPT-2's"), "{stderr}");
}
