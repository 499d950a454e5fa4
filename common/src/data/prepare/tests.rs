//! End-to-end tests of `prepare` on generated files.
use std::path::{Path, PathBuf};

use super::*;
use crate::data::corpus::Split;
use crate::data::shard::{read_header, read_shard};
use crate::data::tokenizer::Tokenizer;

/// Byte tokenizer ids: the bytes, end-of-text 256.
const EOT: u32 = 256;

fn opts(inputs: &[&Path], spec: &str, out: &Path) -> PrepareOptions {
    let mut o = PrepareOptions::new(
        inputs.iter().map(|p| p.to_path_buf()).collect(),
        spec.parse().unwrap(),
        out.to_path_buf(),
    );
    o.threads = 2;
    // Small units, so that small files make many of them.
    o.chunk = ChunkLimits { target: 16, max: 64 };
    o
}

fn run(o: &PrepareOptions) -> Result<PrepareSummary> {
    prepare(o, &|_| {})
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

/// A split's tokens, shard after shard, as the manifest lists them.
fn tokens(dir: &Path, split: Split) -> Vec<u32> {
    let m = Manifest::load(dir).unwrap();
    m.split(split)
        .shards
        .iter()
        .flat_map(|s| read_shard(&dir.join(&s.file)).unwrap())
        .collect()
}

/// Byte-tokenizer ids of documents: end-of-text, then the bytes.
fn byte_ids(docs: &[&str]) -> Vec<u32> {
    docs.iter()
        .flat_map(|d| std::iter::once(EOT).chain(d.bytes().map(u32::from)))
        .collect()
}

/// Siblings of `out` left behind (partial directories).
fn leftovers(out: &Path) -> Vec<String> {
    let name = out.file_name().unwrap().to_string_lossy().to_string();
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(&name))
        .collect()
}

fn lines(n: usize) -> String {
    (0..n).map(|i| format!("line {i:04} of the text\n")).collect()
}

#[test]
fn text_files_become_documents_split_at_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(&dir.path().join("in/a.txt"), "abcdefghi\n".repeat(60));
    let b = write(&dir.path().join("in/b.txt"), "ABCDEFGHI\n".repeat(40));
    let out = dir.path().join("out");
    let mut o = opts(&[&dir.path().join("in")], "byte", &out);
    // 1000 bytes: validation from byte 905, so from the first line start at or after it, 910.
    o.val_fraction = 0.095;
    let s = run(&o).unwrap();
    let all = byte_ids(&[&"abcdefghi\n".repeat(60), &"ABCDEFGHI\n".repeat(40)]);
    let train = tokens(&out, Split::Train);
    let val = tokens(&out, Split::Val);
    assert_eq!(val, all[all.len() - 90..]);
    assert_eq!([train, val].concat(), all);
    let m = &s.manifest;
    assert_eq!((m.train.documents, m.val.documents), (2, 0));
    assert_eq!((m.train.tokens, m.val.tokens), (912, 90));
    assert_eq!(m.source.bytes, 1000);
    assert_eq!(m.source.files, 2);
    assert_eq!(m.source.format, "text");
    assert_eq!(m.source.field, None);
    assert_eq!(m.source.inputs, vec![dir.path().join("in").display().to_string()]);
    assert_eq!(m.tokenizer.spec, "byte");
    assert_eq!((m.tokenizer.vocab_size, m.tokenizer.eot), (257, EOT));
    assert!(leftovers(&out) == vec!["out".to_string()], "{:?}", leftovers(&out));
    let _ = (a, b);
}

#[test]
fn a_file_after_the_split_is_a_validation_document() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(&dir.path().join("a.txt"), "x".repeat(90));
    let b = write(&dir.path().join("b.txt"), "hello\n");
    let out = dir.path().join("out");
    let mut o = opts(&[&a, &b], "byte", &out);
    // The split at byte 90 of 96: where b.txt starts.
    o.val_fraction = 0.0625;
    let m = run(&o).unwrap().manifest;
    assert_eq!(tokens(&out, Split::Val), byte_ids(&["hello\n"]));
    assert_eq!(tokens(&out, Split::Train), byte_ids(&[&"x".repeat(90)]));
    assert_eq!((m.train.documents, m.val.documents), (1, 1));
}

#[test]
fn manifest_checksums_and_counts_match_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let text = lines(200);
    let input = write(&dir.path().join("t.txt"), &text);
    let out = dir.path().join("out");
    let mut o = opts(&[&input], "byte", &out);
    o.shard_tokens = 1000;
    o.val_fraction = 0.3;
    let m = run(&o).unwrap().manifest;
    assert_eq!(m, Manifest::load(&out).unwrap());
    assert!(m.train.shards.len() > 2, "{m:?}");
    for (split, name) in [(&m.train, "train"), (&m.val, "val")] {
        for (i, shard) in split.shards.iter().enumerate() {
            let path = out.join(&shard.file);
            assert_eq!(shard.file, format!("{name}_{i:06}.bin"));
            assert_eq!(sha256_file(&path).unwrap(), shard.sha256, "{}", shard.file);
            assert_eq!(read_header(&path).unwrap().tokens, shard.tokens);
            assert!(shard.tokens <= 1000);
        }
        // Only a split's last shard is short.
        assert!(split.shards[..split.shards.len() - 1].iter().all(|s| s.tokens == 1000));
        assert_eq!(split.tokens, split.shards.iter().map(|s| s.tokens).sum::<u64>());
    }
    let tok = out.join(TOKENIZER_FILE);
    assert_eq!(m.tokenizer.sha256, sha256_file(&tok).unwrap());
    assert_eq!(Tokenizer::load(&tok).unwrap().vocab_size(), 257);
    assert_eq!(
        [tokens(&out, Split::Train), tokens(&out, Split::Val)].concat(),
        byte_ids(&[&text])
    );
    // Nothing else in the directory.
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names.len(), m.train.shards.len() + m.val.shards.len() + 2);
}

#[test]
fn shards_are_what_the_llm_c_format_specifies() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(&dir.path().join("t.txt"), "hi\nyo\n");
    let out = dir.path().join("out");
    let mut o = opts(&[&input], "byte", &out);
    o.val_fraction = 0.5;
    o.chunk = ChunkLimits { target: 1, max: 8 };
    run(&o).unwrap();
    // By hand: 256 little-endian i32 [20240520, 1, n, 0, …], then n little-endian u16.
    let expect = |ids: &[u16]| {
        let mut header = vec![0i32; 256];
        header[..3].copy_from_slice(&[20240520, 1, ids.len() as i32]);
        let mut bytes: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.extend(ids.iter().flat_map(|v| v.to_le_bytes()));
        bytes
    };
    assert_eq!(
        std::fs::read(out.join("train_000000.bin")).unwrap(),
        expect(&[256, 104, 105, 10])
    );
    assert_eq!(
        std::fs::read(out.join("val_000000.bin")).unwrap(),
        expect(&[121, 111, 10])
    );
}

#[test]
fn output_does_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    for i in 0..5 {
        let text = format!("file {i}\n{}", lines(30 + 17 * i)).replace("of the", "of\n\n  the ");
        inputs.push(write(&dir.path().join(format!("in/{i}.txt")), text));
    }
    let input = dir.path().join("in");
    for spec in ["byte", "char", "gpt2"] {
        let contents = |threads: usize| {
            let out = dir.path().join(format!("out-{spec}-{threads}"));
            let mut o = opts(&[&input], spec, &out);
            o.threads = threads;
            o.shard_tokens = 500;
            run(&o).unwrap();
            let mut files: Vec<_> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| {
                    let path = e.unwrap().path();
                    (path.file_name().unwrap().to_owned(), std::fs::read(&path).unwrap())
                })
                .collect();
            files.sort();
            files
        };
        let one = contents(1);
        assert!(one.len() > 4, "{spec}: {} files", one.len());
        assert_eq!(one, contents(3), "{spec}");
    }
}

/// Text with blank lines, indentation, trailing spaces, CRLF, tabs and long paragraphs without single line breaks
/// (cut between words).
fn tricky_text() -> String {
    let mut text = String::new();
    for i in 0..40 {
        text.push_str(&format!("Chapter {i}\n\nIt was a   dark night.  \nThe end.\n"));
        text.push_str("    indented(code) {\n\treturn x;\n    }\n\n\n");
        text.push_str("trailing spaces   \nand\r\nCRLF lines\r\n\r\nnaïve café — “quotes” 123 4567\n");
        text.push_str(&"a long paragraph with no single line break ".repeat(8));
        text.push_str("\n\n");
    }
    text
}

#[test]
fn chunked_gpt2_ids_equal_whole_file_ids() {
    let tok = Tokenizer::train(&TokenizerSpec::Gpt2, std::iter::empty()).unwrap();
    let text = tricky_text();
    let whole = tok.encode(&text).unwrap();
    let limits = ChunkLimits { target: 24, max: 96 };
    let chunks = chunk::tests::cut_all(text.as_bytes(), limits.target, limits.max);
    assert!(chunks.len() > 200, "{} chunks", chunks.len());
    let chunked: Vec<u32> = chunks
        .iter()
        .flat_map(|c| tok.encode(std::str::from_utf8(c).unwrap()).unwrap())
        .collect();
    assert_eq!(chunked, whole);

    // And through prepare, split included.
    let dir = tempfile::tempdir().unwrap();
    let input = write(&dir.path().join("t.txt"), &text);
    let out = dir.path().join("out");
    let mut o = opts(&[&input], "gpt2", &out);
    o.chunk = limits;
    o.val_fraction = 0.2;
    run(&o).unwrap();
    let all = [tokens(&out, Split::Train), tokens(&out, Split::Val)].concat();
    assert_eq!(all[0], 50_256);
    assert_eq!(all[1..], whole[..]);
}

#[test]
fn jsonl_records_are_documents_and_empty_ones_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let records = [
        r#"{"text": "first doc", "id": 1}"#,
        r#"{"id": 2}"#,
        "",
        r#"{"text": "", "id": 3}"#,
        r#"{"text": null}"#,
        r#"{"text": "second\ndoc ☃", "meta": {"text": 5}}"#,
        "   ",
        r#"{"body": "x", "text": "third"}"#,
    ];
    let text = records.join("\n");
    let input = write(&dir.path().join("d.jsonl"), &text);
    let out = dir.path().join("out");
    let mut o = opts(&[&input], "byte", &out);
    o.format = InputFormat::Jsonl;
    // The split half a byte before the last record: at its first byte.
    let last = text.rfind("{\"body\"").unwrap() as f64;
    o.val_fraction = (text.len() as f64 - last + 0.5) / text.len() as f64;
    let m = run(&o).unwrap().manifest;
    assert_eq!(tokens(&out, Split::Train), byte_ids(&["first doc", "second\ndoc ☃"]));
    assert_eq!(tokens(&out, Split::Val), byte_ids(&["third"]));
    assert_eq!((m.train.documents, m.val.documents), (2, 1));
    assert_eq!(m.source.skipped_empty, 3);
    assert_eq!(m.source.field.as_deref(), Some("text"));
    assert_eq!(m.source.format, "jsonl");

    // Only the last record has a "body": nothing to train on.
    o.field = "body".into();
    o.out = dir.path().join("out2");
    let err = run(&o).unwrap_err().to_string();
    assert!(
        err.contains("training split is empty") && err.contains("lower --val-fraction"),
        "{err}"
    );
}

#[test]
fn bad_jsonl_lines_are_named_by_file_line_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "{\"text\": \"ok\"}\n{\"text\": \"unclosed\n",
            "line 2 (byte offset 15): not JSON",
        ),
        (
            "{\"text\": \"ok\"}\n[1, 2]\n",
            "line 2 (byte offset 15): a JSON array, not an object",
        ),
        (
            "{\"text\": 42}\n",
            "line 1 (byte offset 0): field \"text\" is a JSON number, not a string",
        ),
    ];
    for (i, (content, expected)) in cases.into_iter().enumerate() {
        let input = write(&dir.path().join(format!("bad{i}.jsonl")), content);
        let out = dir.path().join(format!("out{i}"));
        let mut o = opts(&[&input], "byte", &out);
        o.format = InputFormat::Jsonl;
        let err = run(&o).unwrap_err().to_string();
        assert!(
            err.contains(&format!("bad{i}.jsonl")) && err.contains(expected),
            "{err}"
        );
        assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
    }
}

#[test]
fn invalid_utf8_fails_with_file_and_offset_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = lines(10).into_bytes();
    text.extend(b"bad \xff line\n");
    text.extend(lines(2).as_bytes());
    text.extend(b"also \xc3( bad\n");
    let input = write(&dir.path().join("t.txt"), &text);
    let out = dir.path().join("out");
    let mut o = opts(&[&input], "char", &out);
    // The split at a line start (byte 231), not inside a bad line.
    o.val_fraction = 0.2;
    let err = run(&o).unwrap_err().to_string();
    let bad_at = 10 * 22 + 4;
    assert!(
        err.contains("t.txt") && err.contains(&format!("invalid UTF-8 at byte offset {bad_at}")),
        "{err}"
    );
    assert!(err.contains("--invalid-utf8 skip"), "{err}");
    assert!(leftovers(&out).is_empty());

    o.invalid_utf8 = InvalidUtf8::Skip;
    let s = run(&o).unwrap();
    assert_eq!(s.manifest.source.skipped_invalid_utf8, 2);
    assert!(s.line().contains("skipped 2 lines not UTF-8"), "{}", s.line());
    let tok = Tokenizer::load(&out.join(TOKENIZER_FILE)).unwrap();
    let all = [tokens(&out, Split::Train), tokens(&out, Split::Val)].concat();
    let eot = s.manifest.tokenizer.eot;
    assert_eq!(all[0], eot);
    assert_eq!(tok.decode(&all[1..]), lines(10) + &lines(2));

    // JSONL: the record goes.
    let input = write(
        &dir.path().join("d.jsonl"),
        b"{\"text\": \"a\xffb\"}\n{\"text\": \"good\"}\n{\"text\": \"more\"}\n",
    );
    let mut o = opts(&[&input], "byte", &dir.path().join("j"));
    o.format = InputFormat::Jsonl;
    o.val_fraction = 0.4;
    let err = run(&o).unwrap_err().to_string();
    assert!(
        err.contains("d.jsonl") && err.contains("line 1 (byte offset 0): invalid UTF-8 at byte offset 11"),
        "{err}"
    );
    o.invalid_utf8 = InvalidUtf8::Skip;
    let m = run(&o).unwrap().manifest;
    assert_eq!(m.source.skipped_invalid_utf8, 1);
    assert_eq!(m.train.documents + m.val.documents, 2);
}

#[test]
fn empty_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e1 = write(&dir.path().join("in/a.txt"), "");
    write(&dir.path().join("in/b.txt"), "");
    let out = dir.path().join("out");
    let err = run(&opts(&[&dir.path().join("in")], "byte", &out))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no documents in 0 bytes of input (2 empty and 0 not UTF-8 left out)"),
        "{err}"
    );
    assert!(leftovers(&out).is_empty());

    std::fs::remove_file(&e1).unwrap();
    std::fs::remove_file(dir.path().join("in/b.txt")).unwrap();
    let err = run(&opts(&[&dir.path().join("in")], "byte", &out))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no input files"), "{err}");

    let jsonl = write(&dir.path().join("e.jsonl"), "\n{\"id\": 1}\n");
    let mut o = opts(&[&jsonl], "byte", &out);
    o.format = InputFormat::Jsonl;
    let err = run(&o).unwrap_err().to_string();
    assert!(err.contains("no documents") && err.contains("\"text\" field"), "{err}");

    let mut o = opts(&[], "byte", &out);
    o.inputs.clear();
    let err = run(&o).unwrap_err().to_string();
    assert!(err.contains("--input"), "{err}");
}

#[test]
fn a_one_line_input_cannot_fill_both_splits() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(&dir.path().join("one.jsonl"), "{\"text\": \"only one\"}\n");
    let mut o = opts(&[&input], "byte", &dir.path().join("out"));
    o.format = InputFormat::Jsonl;
    let err = run(&o).unwrap_err().to_string();
    assert!(
        err.contains("validation split is empty") && err.contains("raise --val-fraction"),
        "{err}"
    );
    assert!(err.contains("one.jsonl"), "{err}");
}

#[test]
fn an_existing_output_is_refused_or_replaced_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(&dir.path().join("t.txt"), lines(20));
    let out = dir.path().join("out");
    write(&out.join("keep.txt"), "mine");
    let o = opts(&[&input], "byte", &out);
    let err = run(&o).unwrap_err().to_string();
    assert!(
        err.contains(&out.display().to_string()) && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");

    // --force, but the new data fails: the old directory stays as it was.
    let bad = write(&dir.path().join("bad.txt"), b"\xff\n");
    let mut o = opts(&[&input, &bad], "byte", &out);
    o.force = true;
    assert!(run(&o).is_err());
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");

    let mut o = opts(&[&input], "byte", &out);
    o.force = true;
    run(&o).unwrap();
    assert!(!out.join("keep.txt").exists());
    Manifest::load(&out).unwrap();
    assert_eq!(leftovers(&out), vec!["out".to_string()]);
}

#[cfg(target_os = "linux")]
#[test]
fn a_failure_mid_stream_leaves_no_directory() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(&dir.path().join("good.txt"), lines(500));
    let out = dir.path().join("sub/out");
    // A file every read of which fails (EIO), whoever runs the test.
    let unreadable = Path::new("/proc/self/mem");
    let mut o = opts(&[&good, unreadable], "byte", &out);
    o.shard_tokens = 100;
    let err = run(&o).unwrap_err().to_string();
    assert!(err.contains("cannot read /proc/self/mem"), "{err}");
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
}

/// A stand-in that maps every character to 1 and the letter `z` to an id past the vocabulary.
struct Broken;

impl pipeline::Encoder for Broken {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.chars().map(|c| if c == 'z' { 300 } else { 1 }).collect())
    }

    fn eot(&self) -> u32 {
        0
    }

    fn vocab_size(&self) -> usize {
        257
    }
}

#[test]
fn an_id_outside_the_vocabulary_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(&dir.path().join("t.txt"), format!("{}z\n", lines(3)));
    let o = opts(&[&input], "byte", &dir.path().join("out"));
    let files = inputs::resolve(&o.inputs).unwrap();
    let reader = read::Reader {
        files: &files,
        opts: &o,
        split_at: 1000,
    };
    let plan = pipeline::ShardPlan {
        dir: dir.path(),
        width: TokenWidth::U16,
        shard_tokens: 100,
    };
    let err = pipeline::tokenize(&reader, &Broken, 2, &plan, 0, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t.txt") && err.contains("id 300, outside its vocabulary of 257 ids"),
        "{err}"
    );
    // The shard being written was abandoned.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("t.txt")], "{left:?}");
}

#[test]
fn progress_reaches_the_total() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(&dir.path().join("t.txt"), lines(50));
    let seen = std::sync::Mutex::new(Vec::new());
    let o = opts(&[&input], "char", &dir.path().join("out"));
    prepare(&o, &|p| seen.lock().unwrap().push(*p)).unwrap();
    let seen = seen.into_inner().unwrap();
    let total = lines(50).len() as u64;
    for phase in [Phase::Learn, Phase::Tokenize] {
        let last = seen.iter().rev().find(|p| p.phase == phase).unwrap();
        assert_eq!((last.bytes, last.total_bytes), (total, total), "{phase:?}");
    }
    assert_eq!(seen.last().unwrap().tokens, total + 1);
}

#[test]
fn a_trained_bpe_sees_the_text_once_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let text = tricky_text();
    let input = write(&dir.path().join("t.txt"), &text);
    let out = dir.path().join("out");
    let mut o = opts(&[&input], "bpe:320", &out);
    o.val_fraction = 0.1;
    let m = run(&o).unwrap().manifest;
    assert_eq!((m.tokenizer.vocab_size, m.tokenizer.eot), (320, 319));
    let tok = Tokenizer::load(&out.join(TOKENIZER_FILE)).unwrap();
    let all = [tokens(&out, Split::Train), tokens(&out, Split::Val)].concat();
    assert_eq!(all[0], 319);
    assert!(all.len() < text.len() / 2, "merges were learned: {} tokens", all.len());
    assert_eq!(tok.decode(&all[1..]), text);
    // Chunked as prepare cuts it, the ids are those of the whole text.
    assert_eq!(all[1..], tok.encode(&text).unwrap()[..]);
}

#[test]
fn text_units_are_cut_at_the_target_and_once_at_the_split() {
    let dir = tempfile::tempdir().unwrap();
    // 22-byte lines: every line start is a cut point.
    let input = write(&dir.path().join("t.txt"), lines(100));
    let mut o = opts(&[&input], "byte", &dir.path().join("out"));
    o.chunk = ChunkLimits { target: 50, max: 200 };
    let files = inputs::resolve(&o.inputs).unwrap();
    let reader = read::Reader {
        files: &files,
        opts: &o,
        split_at: 1000,
    };
    let mut units = Vec::new();
    reader
        .run(&std::sync::atomic::AtomicBool::new(false), &mut |u| {
            units.push((u.seq, u.offset, u.bytes.len() as u64, u.split));
            true
        })
        .unwrap();
    // The first line start at or after byte 1000 is 1012; before it and after it, chunks end at the first line
    // start at or after 50 bytes (66).
    let expected: Vec<(u64, u64, Split)> = (0..15)
        .map(|i| (i * 66, 66, Split::Train))
        .chain([(990, 22, Split::Train)])
        .chain((0..18).map(|i| (1012 + i * 66, 66, Split::Val)))
        .collect();
    assert_eq!(1012 + 18 * 66, 2200);
    let got: Vec<(u64, u64, Split)> = units.iter().map(|&(_, off, len, split)| (off, len, split)).collect();
    assert_eq!(got, expected);
    assert!(units.iter().enumerate().all(|(i, u)| u.0 == i as u64));
}
