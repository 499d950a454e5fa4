//! `lockstep score` as a user runs it: the built binary on the golden fixture's 30 pairs written one segment per
//! line, its JSON compared with sacreBLEU 2.6.0, rouge-score 0.1.2 and nltk 3.10.4 at the fixture README's
//! tolerances (BLEU, chrF and METEOR 1e-9, ROUGE 1e-12).
//!
//! Pair 23 is a two-line pair ("This sentence\nhas two lines."). A line-per-segment file cannot hold a newline
//! inside a segment, so it is written with the newline as a space. The tools scored it as one string: sacreBLEU's 13a
//! tokenizer turns "\n" into a space and chrF drops all whitespace, and rouge-score's tokenizer and nltk's
//! `str.split()` treat it as any separator, so every figure is unchanged — the corpus BLEU and chrF below match the
//! fixture's, computed over the 30 strings — except that pair's ROUGE-Lsum, which splits sentences at newlines. As
//! one line it has one sentence, so its ROUGE-Lsum is its ROUGE-L; the test checks that instead.
//!
//! The WordNet run reads the database from `LOCKSTEP_WORDNET_DIR` or `/usr/share/wordnet`, as the golden METEOR test
//! does; `LOCKSTEP_SKIP_WORDNET=1` skips it where none is installed.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lockstep_common::metrics::chrf::sentence_chrf;
use serde_json::Value;

const TWO_LINE_PAIR: usize = 23;
const BLEU_TOL: f64 = 1e-9;
const ROUGE_TOL: f64 = 1e-12;
const METEOR_TOL: f64 = 1e-9;
const VARIANTS: [&str; 4] = ["rouge1", "rouge2", "rougeL", "rougeLsum"];

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../common/tests/fixtures/text-metrics/expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn pairs(fixture: &Value) -> &Vec<Value> {
    let pairs = fixture["pairs"].as_array().expect("fixture has a pairs array");
    assert_eq!(pairs.len(), 30);
    assert!(
        pairs[TWO_LINE_PAIR]["hyp"].as_str().unwrap().contains('\n'),
        "pair {TWO_LINE_PAIR} is the two-line pair"
    );
    pairs
}

/// The fixture's hypotheses and references as two files, one segment per line, with `terminator` after each.
fn write_files(dir: &Path, fixture: &Value, terminator: &str) -> (PathBuf, PathBuf) {
    let file = |key: &str| -> String {
        pairs(fixture)
            .iter()
            .map(|p| {
                let text = p[key].as_str().unwrap();
                assert!(!text.contains('\r'), "no fixture string holds a carriage return");
                format!("{}{terminator}", text.replace('\n', " "))
            })
            .collect()
    };
    let (hyp, reference) = (dir.join("hyp.txt"), dir.join("ref.txt"));
    std::fs::write(&hyp, file("hyp")).unwrap();
    std::fs::write(&reference, file("ref")).unwrap();
    (hyp, reference)
}

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .env_remove("LOCKSTEP_WORDNET_DIR")
        .output()
        .unwrap()
}

fn score_json(args: &[&str]) -> Value {
    let out = lockstep(&[&["score", "--json"], args].concat());
    assert!(
        out.status.success(),
        "lockstep score failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("score --json printed no JSON ({e})"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

fn close(actual: &Value, expected: &Value, tol: f64, what: &str) {
    let (a, e) = (num(actual, what), num(expected, what));
    assert!(
        (a - e).abs() <= tol,
        "{what}: lockstep score gives {a:?}, the reference tool {e:?}"
    );
}

/// The corpus BLEU and chrF, and each row's sentence BLEU and chrF, against the fixture.
fn check_bleu_chrf(report: &Value, fixture: &Value) {
    close(
        &report["bleu"]["score"],
        &fixture["corpus_bleu"],
        BLEU_TOL,
        "corpus BLEU",
    );
    let detail = &fixture["corpus_bleu_detail"];
    for key in ["counts", "totals"] {
        assert_eq!(report["bleu"][key], detail[key], "corpus BLEU {key}");
    }
    close(&report["bleu"]["bp"], &detail["bp"], BLEU_TOL, "corpus BLEU bp");
    assert_eq!(report["bleu"]["hyp_len"], detail["sys_len"]);
    assert_eq!(report["bleu"]["ref_len"], detail["ref_len"]);
    close(
        &report["chrf"]["score"],
        &fixture["corpus_chrf"],
        BLEU_TOL,
        "corpus chrF",
    );

    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 30);
    for (i, (row, pair)) in rows.iter().zip(pairs(fixture)).enumerate() {
        assert_eq!(row["line"], i + 1);
        close(
            &row["bleu"],
            &pair["sentence_bleu"],
            BLEU_TOL,
            &format!("line {} sentence BLEU", i + 1),
        );
        // The fixture has no sentence chrF; the row must be the library's (itself golden-tested at corpus level).
        let hyp = pair["hyp"].as_str().unwrap().replace('\n', " ");
        let reference = pair["ref"].as_str().unwrap().replace('\n', " ");
        let expected = sentence_chrf(&hyp, &[reference.as_str()]);
        // serde_json's default float parser may miss the last bit, hence a tolerance rather than equality.
        close(
            &row["chrf"],
            &Value::from(expected),
            1e-12,
            &format!("line {} sentence chrF", i + 1),
        );
    }
}

/// Each row's ROUGE and METEOR against the fixture's `rouge_key` and `meteor_key`, and the corpus means.
fn check_rouge_meteor(report: &Value, fixture: &Value, rouge_key: &str, meteor_key: &str) {
    let rows = report["rows"].as_array().expect("rows");
    let mut sums = [[0.0_f64; 3]; 4];
    let mut meteor_sum = 0.0;
    for (i, (row, pair)) in rows.iter().zip(pairs(fixture)).enumerate() {
        for (v, variant) in VARIANTS.iter().enumerate() {
            // One line has one sentence: Lsum of the two-line pair written on one line is its ROUGE-L.
            let expected = if i == TWO_LINE_PAIR && *variant == "rougeLsum" {
                &pair[rouge_key]["rougeL"]
            } else {
                &pair[rouge_key][variant]
            };
            for (k, field) in ["p", "r", "f"].iter().enumerate() {
                let what = format!("line {} {rouge_key} {variant} {field}", i + 1);
                close(&row["rouge"][variant][field], &expected[field], ROUGE_TOL, &what);
                sums[v][k] += num(&expected[field], &what);
            }
        }
        close(
            &row["meteor"],
            &pair[meteor_key],
            METEOR_TOL,
            &format!("line {} {meteor_key}", i + 1),
        );
        meteor_sum += num(&pair[meteor_key], meteor_key);
    }
    for (v, variant) in VARIANTS.iter().enumerate() {
        for (k, field) in ["p", "r", "f"].iter().enumerate() {
            let mean = Value::from(sums[v][k] / 30.0);
            close(
                &report["rouge"][variant][field],
                &mean,
                ROUGE_TOL,
                &format!("mean {variant} {field}"),
            );
        }
    }
    close(
        &report["meteor"]["score"],
        &Value::from(meteor_sum / 30.0),
        METEOR_TOL,
        "mean METEOR",
    );
}

fn wordnet_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("LOCKSTEP_WORDNET_DIR").unwrap_or_else(|| "/usr/share/wordnet".into()));
    if dir.join("index.noun").is_file() {
        return Some(dir);
    }
    assert_eq!(
        std::env::var("LOCKSTEP_SKIP_WORDNET").as_deref(),
        Ok("1"),
        "no WordNet 3.0 database at {}: install it with `sudo apt-get install -y wordnet-base` (Debian/Ubuntu), or set \
         LOCKSTEP_WORDNET_DIR to a WordNet 3.0 dict directory, or set LOCKSTEP_SKIP_WORDNET=1 to skip this test",
        dir.display()
    );
    eprintln!(
        "skipped: no WordNet 3.0 database at {} (LOCKSTEP_SKIP_WORDNET=1)",
        dir.display()
    );
    None
}

#[test]
fn score_matches_the_reference_tools_with_wordnet_and_stemmer() {
    let Some(wordnet) = wordnet_dir() else { return };
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (hyp, reference) = write_files(dir.path(), &fixture, "\n");
    let report = score_json(&[
        "--hyp",
        s(&hyp),
        "--ref",
        s(&reference),
        "--rouge-stem",
        "true",
        "--wordnet",
        s(&wordnet),
    ]);
    assert_eq!(report["segments"], 30);
    assert_eq!(report["references"], 1);
    check_bleu_chrf(&report, &fixture);
    check_rouge_meteor(&report, &fixture, "rouge_stem", "meteor_wordnet");
    assert_eq!(report["rouge"]["stemmer"], true);
    assert_eq!(report["meteor"]["wordnet"], s(&wordnet));
}

#[test]
fn score_without_wordnet_or_stemmer_matches_and_says_so() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    // CRLF files score as LF files do: only the line terminator is removed.
    let (hyp, reference) = write_files(dir.path(), &fixture, "\r\n");
    let report = score_json(&["--hyp", s(&hyp), "--ref", s(&reference), "--no-wordnet"]);
    check_bleu_chrf(&report, &fixture);
    check_rouge_meteor(&report, &fixture, "rouge_plain", "meteor_exact_stem");
    assert_eq!(report["rouge"]["stemmer"], false, "rouge-score's default: no stemmer");
    assert!(report["meteor"]["wordnet"].is_null());
    assert!(report["meteor"]["stages"].as_str().unwrap().contains("no WordNet"));

    let table = lockstep(&["score", "--hyp", s(&hyp), "--ref", s(&reference), "--no-wordnet"]);
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    for expected in [
        "BLEU          25.60",
        "chrF          51.42",
        "ROUGE-Lsum",
        "no WordNet",
        "mean of segment scores",
    ] {
        assert!(table.contains(expected), "the table lacks {expected:?}:\n{table}");
    }
}

#[test]
fn only_the_metrics_asked_for_are_computed() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (hyp, reference) = write_files(dir.path(), &fixture, "\n");
    // Two reference files: BLEU clips against both, so a hypothesis that is also a reference scores 100.
    let report = score_json(&[
        "--hyp",
        s(&hyp),
        "--ref",
        s(&reference),
        "--ref",
        s(&hyp),
        "--metrics",
        "bleu,chrf",
    ]);
    assert_eq!(report["references"], 2);
    assert!(report.get("rouge").is_none() && report.get("meteor").is_none());
    close(
        &report["bleu"]["score"],
        &Value::from(100.0),
        BLEU_TOL,
        "BLEU against itself",
    );
    assert!(report["rows"][0].get("meteor").is_none());
}

/// A failure is one line on stderr, `error: ...`, naming the file(s), and exit status 1.
fn one_line_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "exit status");
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

#[test]
fn line_count_mismatch_and_missing_files_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let hyp = dir.path().join("hyp.txt");
    let short = dir.path().join("short.txt");
    std::fs::write(&hyp, "one\ntwo\nthree\n").unwrap();
    std::fs::write(&short, "one\ntwo").unwrap();

    let err = one_line_error(&lockstep(&[
        "score",
        "--hyp",
        s(&hyp),
        "--ref",
        s(&hyp),
        "--ref",
        s(&short),
    ]));
    for expected in [s(&hyp), s(&short), "3", "2"] {
        assert!(err.contains(expected), "the error should name {expected:?}: {err}");
    }

    let missing = dir.path().join("missing.txt");
    let err = one_line_error(&lockstep(&["score", "--hyp", s(&missing), "--ref", s(&hyp)]));
    assert!(err.contains(s(&missing)) && err.contains("hypothesis"), "{err}");
    let err = one_line_error(&lockstep(&["score", "--hyp", s(&hyp), "--ref", s(&missing)]));
    assert!(err.contains(s(&missing)) && err.contains("reference"), "{err}");

    let err = one_line_error(&lockstep(&[
        "score",
        "--hyp",
        s(&hyp),
        "--ref",
        s(&hyp),
        "--wordnet",
        s(dir.path()),
    ]));
    assert!(err.contains(s(dir.path())), "a bad WordNet directory is named: {err}");
}
