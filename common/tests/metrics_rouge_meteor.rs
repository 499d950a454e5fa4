//! Golden tests: ROUGE against rouge-score 0.1.2 and METEOR against nltk 3.10.4 (+ WordNet 3.0) on the 30 pairs of
//! `fixtures/text-metrics/expected.json`, at the fixture README's tolerances.
//!
//! The WordNet test reads the database from `LOCKSTEP_WORDNET_DIR` or `/usr/share/wordnet`. Without one it fails
//! and says how to install it, unless `LOCKSTEP_SKIP_WORDNET=1`.

use std::path::PathBuf;

use lockstep_common::metrics::meteor::meteor;
use lockstep_common::metrics::rouge::{Prf, RougeScores, rouge};
use lockstep_common::metrics::wordnet::Wordnet;
use serde_json::Value;

const ROUGE_TOLERANCE: f64 = 1e-12;
const METEOR_TOLERANCE: f64 = 1e-9;

fn pairs() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text-metrics/expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let fixture: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let pairs = fixture["pairs"].as_array().cloned().unwrap_or_default();
    assert_eq!(pairs.len(), 30, "{}: expected 30 pairs", path.display());
    pairs
}

fn text<'a>(pair: &'a Value, key: &str) -> &'a str {
    pair[key]
        .as_str()
        .unwrap_or_else(|| panic!("pair without string {key:?}: {pair}"))
}

fn number(value: &Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {value}"))
}

/// Every mismatch across all pairs, so one run shows the whole picture.
fn check_rouge(key: &str, stem: bool) {
    let mut failures = Vec::new();
    for (n, pair) in pairs().iter().enumerate() {
        let (hyp, reference) = (text(pair, "hyp"), text(pair, "ref"));
        let got: RougeScores = rouge(hyp, reference, stem);
        let expected = &pair[key];
        for (name, prf) in [
            ("rouge1", got.rouge1),
            ("rouge2", got.rouge2),
            ("rougeL", got.rouge_l),
            ("rougeLsum", got.rouge_lsum),
        ] {
            let Prf { p, r, f } = prf;
            for (field, value) in [("p", p), ("r", r), ("f", f)] {
                let want = number(&expected[name][field], &format!("pair {n} {key}.{name}.{field}"));
                if (value - want).abs() > ROUGE_TOLERANCE {
                    failures.push(format!(
                        "pair {n} {key}.{name}.{field}: got {value}, want {want} ({hyp:?} / {reference:?})"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn check_meteor(key: &str, wordnet: Option<&Wordnet>) {
    let mut failures = Vec::new();
    for (n, pair) in pairs().iter().enumerate() {
        let (hyp, reference) = (text(pair, "hyp"), text(pair, "ref"));
        let got = meteor(hyp, reference, wordnet);
        let want = number(&pair[key], &format!("pair {n} {key}"));
        if (got - want).abs() > METEOR_TOLERANCE {
            failures.push(format!(
                "pair {n} {key}: got {got}, want {want} ({hyp:?} / {reference:?})"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn rouge_with_stemmer_matches_rouge_score() {
    check_rouge("rouge_stem", true);
}

#[test]
fn rouge_without_stemmer_matches_rouge_score() {
    check_rouge("rouge_plain", false);
}

#[test]
fn meteor_exact_and_stem_matches_nltk() {
    check_meteor("meteor_exact_stem", None);
}

#[test]
fn meteor_with_wordnet_matches_nltk() {
    let dir = std::env::var_os("LOCKSTEP_WORDNET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/share/wordnet".into());
    if !dir.join("index.noun").exists() {
        if std::env::var("LOCKSTEP_SKIP_WORDNET").as_deref() == Ok("1") {
            eprintln!(
                "skipped: no WordNet 3.0 database at {} (LOCKSTEP_SKIP_WORDNET=1)",
                dir.display()
            );
            return;
        }
        panic!(
            "no WordNet 3.0 database at {}: install it with `sudo apt-get install -y wordnet-base` (Debian/Ubuntu), or \
             set LOCKSTEP_WORDNET_DIR to a WordNet 3.0 dict directory, or set LOCKSTEP_SKIP_WORDNET=1 to skip this test",
            dir.display()
        );
    }
    let wordnet = Wordnet::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    check_meteor("meteor_wordnet", Some(&wordnet));
}
