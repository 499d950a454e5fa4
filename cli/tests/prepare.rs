//! `lockstep prepare` as a user runs it: the built binary on generated text and JSONL, read back shard by shard.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lockstep_common::data::Tokenizer;
use lockstep_common::data::manifest::{Manifest, SplitEntry, TOKENIZER_FILE};
use lockstep_common::data::shard::read_shard;

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .output()
        .unwrap()
}

fn prepare(args: &[&str]) -> Output {
    let out = lockstep(&[&["prepare"], args].concat());
    // stderr is not a terminal here: no progress bar.
    if out.status.success() {
        assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// The documents of a prepared directory: its tokens (train, then validation) cut at each end-of-text id and
/// decoded with its own tokenizer.
fn documents(dir: &Path) -> Vec<String> {
    let m = Manifest::load(dir).unwrap();
    let tok = Tokenizer::load(&dir.join(TOKENIZER_FILE)).unwrap();
    let read = |split: &SplitEntry| -> Vec<u32> {
        split
            .shards
            .iter()
            .flat_map(|sh| read_shard(&dir.join(&sh.file)).unwrap())
            .collect()
    };
    let ids = [read(&m.train), read(&m.val)].concat();
    assert_eq!(
        ids.first(),
        Some(&m.tokenizer.eot),
        "every document starts with end-of-text"
    );
    ids[1..]
        .split(|&id| id == m.tokenizer.eot)
        .map(|doc| tok.decode(doc))
        .collect()
}

/// Lines of English-like text.
fn prose(seed: usize, lines: usize) -> String {
    let words = [
        "the", "river", "ran", "past", "a", "quiet", "town,", "and", "nobody", "noticed.",
    ];
    (0..lines)
        .map(|i| {
            let n = 4 + (i * 7 + seed) % 9;
            let line: Vec<&str> = (0..n).map(|j| words[(i * 31 + j * 17 + seed) % words.len()]).collect();
            format!("{}\n", line.join(" "))
        })
        .collect()
}

#[test]
fn a_directory_of_text_files_round_trips_with_byte_and_char() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("corpus");
    // Walked in path order, hidden files skipped.
    let docs = [
        ("a.txt", prose(1, 40)),
        ("b/c.txt", prose(2, 25)),
        ("b/d.txt", "naïve café ☃\n".repeat(30)),
    ];
    for (name, text) in &docs {
        write(&input.join(name), text);
    }
    write(&input.join(".hidden.txt"), "not me");
    let expected: Vec<String> = docs.iter().map(|(_, t)| t.clone()).collect();
    let total: usize = expected.iter().map(String::len).sum();

    for (spec, vocab) in [("byte", Some(257)), ("char", None)] {
        let out = dir.path().join(format!("out-{spec}"));
        let run = prepare(&[
            "--input",
            s(&input),
            "--tokenizer",
            spec,
            "--out",
            s(&out),
            "--val-fraction",
            "0.2",
            "--shard-tokens",
            "1000",
        ]);
        assert!(run.status.success(), "{spec}: {}", String::from_utf8_lossy(&run.stderr));
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(stdout.starts_with(&format!("prepared {}", out.display())), "{stdout}");
        assert!(stdout.contains("3 documents from 3 files"), "{stdout}");

        let m = Manifest::load(&out).unwrap();
        assert_eq!(m.tokenizer.spec, spec);
        if let Some(v) = vocab {
            assert_eq!(m.tokenizer.vocab_size, v);
        }
        assert_eq!(m.source.files, 3);
        assert_eq!(m.source.bytes, total as u64);
        assert_eq!(m.train.documents + m.val.documents, 3);
        assert!(m.train.shards.len() > 1 && !m.val.shards.is_empty(), "{m:?}");
        assert!(m.train.shards.iter().all(|sh| sh.tokens <= 1000));
        // Validation is the tail: about a fifth of the input.
        let share = m.val.tokens as f64 / (m.train.tokens + m.val.tokens) as f64;
        assert!((0.15..0.25).contains(&share), "{share}");
        assert_eq!(documents(&out), expected, "{spec}");
    }
}

#[test]
fn a_jsonl_file_round_trips_with_byte_and_char() {
    let dir = tempfile::tempdir().unwrap();
    let texts: Vec<String> = (0..60)
        .map(|i| format!("record {i}: {}", prose(i, 1 + i % 3)))
        .collect();
    let mut jsonl = String::new();
    for (i, t) in texts.iter().enumerate() {
        jsonl.push_str(&serde_json::json!({"id": i, "body": t}).to_string());
        jsonl.push('\n');
        if i % 20 == 0 {
            jsonl.push_str("{\"id\": \"no body\"}\n");
        }
    }
    let input = dir.path().join("data.jsonl");
    write(&input, &jsonl);
    for spec in ["byte", "char"] {
        let out = dir.path().join(format!("out-{spec}"));
        let run = prepare(&[
            "--input",
            s(&input),
            "--format",
            "jsonl",
            "--field",
            "body",
            "--tokenizer",
            spec,
            "--out",
            s(&out),
            "--val-fraction",
            "0.1",
            "--threads",
            "3",
        ]);
        assert!(run.status.success(), "{spec}: {}", String::from_utf8_lossy(&run.stderr));
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            stdout.contains("60 documents") && stdout.contains("skipped 3 records without text"),
            "{stdout}"
        );
        let m = Manifest::load(&out).unwrap();
        assert_eq!(m.source.format, "jsonl");
        assert_eq!(m.source.field.as_deref(), Some("body"));
        assert_eq!(m.source.skipped_empty, 3);
        assert!(m.val.documents >= 1 && m.train.documents >= 50, "{m:?}");
        assert_eq!(documents(&out), texts, "{spec}");
    }
}

#[test]
fn mistakes_get_one_line_naming_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.txt");
    write(&good, &prose(0, 50));
    let out = dir.path().join("out");
    let base = |extra: &[&str]| -> Output {
        let args = [&["--input", s(&good), "--tokenizer", "byte", "--out", s(&out)], extra].concat();
        prepare(&args)
    };
    let stderr = |o: &Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).trim_end().to_string()
    };

    // Not UTF-8: file and byte offset; with skip, counted.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"fine line\nbroken \xfe line\nfine again\n").unwrap();
    let o = prepare(&["--input", s(&good), s(&bad), "--tokenizer", "byte", "--out", s(&out)]);
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("bad.txt") && e.contains("invalid UTF-8 at byte offset 17"),
        "{e}"
    );
    assert!(!out.exists());
    let o = prepare(&[
        "--input",
        s(&good),
        s(&bad),
        "--tokenizer",
        "byte",
        "--out",
        s(&out),
        "--invalid-utf8",
        "skip",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("skipped 1 line not UTF-8"));
    assert_eq!(Manifest::load(&out).unwrap().source.skipped_invalid_utf8, 1);

    // The directory exists now.
    let e = stderr(&base(&[]));
    assert!(e.contains(&out.display().to_string()) && e.contains("--force"), "{e}");
    assert!(base(&["--force"]).status.success());

    // Missing input, --field without jsonl, a bad tokenizer.
    let fresh = dir.path().join("fresh");
    let e = stderr(&prepare(&[
        "--input",
        "/nonexistent/corpus",
        "--tokenizer",
        "byte",
        "--out",
        s(&fresh),
    ]));
    assert!(e.contains("/nonexistent/corpus"), "{e}");
    let e = stderr(&prepare(&[
        "--input",
        s(&good),
        "--tokenizer",
        "byte",
        "--out",
        s(&fresh),
        "--field",
        "x",
    ]));
    assert!(e.contains("--format jsonl"), "{e}");
    let e = stderr(&prepare(&[
        "--input",
        s(&good),
        "--tokenizer",
        "bert",
        "--out",
        s(&fresh),
    ]));
    assert!(e.contains("bpe:VOCAB_SIZE"), "{e}");
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty() && !fresh.exists(), "{leftovers:?}");
}
