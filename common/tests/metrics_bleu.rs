//! Golden tests: sacreBLEU 2.6.0's BLEU and chrF on the fixture's 30 pairs (issue 7), at the README's 1e-9, with
//! integer statistics exact.

use std::path::PathBuf;

use lockstep_common::metrics::bleu::{Bleu, BleuStats, corpus_bleu, sentence_bleu};
use lockstep_common::metrics::chrf::{corpus_chrf, sentence_chrf};
use serde_json::Value;

const TOLERANCE: f64 = 1e-9;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text-metrics/expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn pairs(fixture: &Value) -> Vec<(String, String, Value)> {
    let pairs = fixture["pairs"].as_array().expect("fixture has a pairs array");
    assert_eq!(pairs.len(), 30, "the fixture's README promises 30 pairs");
    pairs
        .iter()
        .map(|p| {
            let hyp = p["hyp"].as_str().expect("pair has hyp").to_owned();
            let reference = p["ref"].as_str().expect("pair has ref").to_owned();
            (hyp, reference, p.clone())
        })
        .collect()
}

fn float(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

fn ints(v: &Value, what: &str) -> Vec<usize> {
    let items = v.as_array().unwrap_or_else(|| panic!("{what} is not an array: {v}"));
    items
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("{what} holds a non-integer: {x}")) as usize)
        .collect()
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= TOLERANCE,
        "{what}: got {actual:?}, sacreBLEU gives {expected:?}"
    );
}

fn assert_bleu(actual: &Bleu, score: f64, detail: &Value, what: &str) {
    assert_close(actual.score, score, &format!("{what} score"));
    assert_eq!(
        actual.counts.to_vec(),
        ints(&detail["counts"], "counts"),
        "{what} counts"
    );
    assert_eq!(
        actual.totals.to_vec(),
        ints(&detail["totals"], "totals"),
        "{what} totals"
    );
    assert_close(actual.bp, float(&detail["bp"], "bp"), &format!("{what} bp"));
    assert_eq!(
        actual.sys_len as u64,
        detail["sys_len"].as_u64().expect("sys_len"),
        "{what} sys_len"
    );
    assert_eq!(
        actual.ref_len as u64,
        detail["ref_len"].as_u64().expect("ref_len"),
        "{what} ref_len"
    );
}

#[test]
fn sentence_bleu_matches_sacrebleu_on_every_pair() {
    let fixture = fixture();
    for (i, (hyp, reference, expected)) in pairs(&fixture).iter().enumerate() {
        let bleu = sentence_bleu(hyp, &[reference.as_str()]);
        let what = format!("pair {i} ({hyp:?} vs {reference:?})");
        assert_bleu(
            &bleu,
            float(&expected["sentence_bleu"], "sentence_bleu"),
            &expected["sentence_bleu_detail"],
            &what,
        );
    }
}

#[test]
fn corpus_bleu_matches_sacrebleu() {
    let fixture = fixture();
    let pairs = pairs(&fixture);
    let bleu = corpus_bleu(pairs.iter().map(|(h, r, _)| (h.as_str(), [r.as_str()])));
    assert_bleu(
        &bleu,
        float(&fixture["corpus_bleu"], "corpus_bleu"),
        &fixture["corpus_bleu_detail"],
        "corpus",
    );
}

#[test]
fn corpus_bleu_is_the_sum_of_segment_statistics() {
    let fixture = fixture();
    let pairs = pairs(&fixture);
    let summed: BleuStats = pairs.iter().map(|(h, r, _)| BleuStats::segment(h, &[r.as_str()])).sum();
    let mut folded = BleuStats::default();
    for (h, r, _) in &pairs {
        folded += BleuStats::segment(h, &[r.as_str()]);
    }
    assert_eq!(summed, folded);
    let corpus = corpus_bleu(pairs.iter().map(|(h, r, _)| (h.as_str(), vec![r.as_str()])));
    assert_eq!(summed.score(false), corpus);
}

#[test]
fn corpus_chrf_matches_sacrebleu() {
    let fixture = fixture();
    let pairs = pairs(&fixture);
    let chrf = corpus_chrf(pairs.iter().map(|(h, r, _)| (h.as_str(), [r.as_str()])));
    assert_close(chrf, float(&fixture["corpus_chrf"], "corpus_chrf"), "corpus chrF");
}

// The fixture has one reference per pair; these cases cover multiple references (closest length with ties to the
// shorter, n-gram clipping at the best reference, chrF's best-reference choice), an empty reference, the trailing
// whitespace strip and an empty hypothesis. Expected values were computed with sacrebleu 2.6.0
// (`sentence_bleu`, `sentence_chrf`, `corpus_bleu`, `corpus_chrf`, defaults).
struct Case {
    hyp: &'static str,
    refs: &'static [&'static str],
    bleu: f64,
    counts: [usize; 4],
    totals: [usize; 4],
    bp: f64,
    sys_len: usize,
    ref_len: usize,
    chrf: f64,
}

const CASES: &[Case] = &[
    Case {
        hyp: "the cat sat on the mat",
        refs: &["a cat sat on a mat", "the cat is on the mat there", "cat on mat"],
        bleu: 53.7284965911771,
        counts: [6, 5, 2, 0],
        totals: [6, 5, 4, 3],
        bp: 1.0,
        sys_len: 6,
        ref_len: 6,
        chrf: 55.11170308673565,
    },
    Case {
        hyp: "a b c d e",
        refs: &["a b c", "a b c d e f g"],
        bleu: 100.00000000000004,
        counts: [5, 4, 3, 2],
        totals: [5, 4, 3, 2],
        bp: 1.0,
        sys_len: 5,
        ref_len: 3,
        chrf: 82.06106870229006,
    },
    Case {
        hyp: "Error: file not found (code 404)  \n",
        refs: &["error - file not found, code 404", ""],
        bleu: 22.31618068926665,
        counts: [5, 3, 1, 0],
        totals: [9, 8, 7, 6],
        bp: 1.0,
        sys_len: 9,
        ref_len: 8,
        chrf: 64.95783434313383,
    },
    Case {
        hyp: "word-\n",
        refs: &["word"],
        bleu: 0.0,
        counts: [0, 0, 0, 0],
        totals: [1, 0, 0, 0],
        bp: 1.0,
        sys_len: 1,
        ref_len: 1,
        chrf: 91.3677130044843,
    },
    Case {
        hyp: "",
        refs: &["something here"],
        bleu: 0.0,
        counts: [0, 0, 0, 0],
        totals: [0, 0, 0, 0],
        bp: 0.0,
        sys_len: 0,
        ref_len: 2,
        chrf: 0.0,
    },
    Case {
        hyp: "x y",
        refs: &["x y z w"],
        bleu: 36.78794411714425,
        counts: [2, 1, 0, 0],
        totals: [2, 1, 0, 0],
        bp: 0.36787944117144233,
        sys_len: 2,
        ref_len: 4,
        chrf: 47.169811320754704,
    },
];

#[test]
fn multiple_references_and_edge_cases_match_sacrebleu() {
    for case in CASES {
        let what = format!("{:?} vs {:?}", case.hyp, case.refs);
        let bleu = sentence_bleu(case.hyp, case.refs);
        assert_close(bleu.score, case.bleu, &format!("{what} BLEU"));
        assert_eq!(bleu.counts, case.counts, "{what} counts");
        assert_eq!(bleu.totals, case.totals, "{what} totals");
        assert_close(bleu.bp, case.bp, &format!("{what} bp"));
        assert_eq!(
            (bleu.sys_len, bleu.ref_len),
            (case.sys_len, case.ref_len),
            "{what} lengths"
        );
        assert_close(sentence_chrf(case.hyp, case.refs), case.chrf, &format!("{what} chrF"));
    }
}

#[test]
fn corpus_scores_with_two_references_match_sacrebleu() {
    let segments = [
        (
            "the cat sat on the mat",
            ["a cat sat on a mat", "the cat is on the mat there"],
        ),
        ("a b c d e", ["a b c", "a b c d e f g"]),
        (
            "Error: file not found (code 404)  \n",
            ["error - file not found, code 404", ""],
        ),
    ];
    let bleu = corpus_bleu(segments);
    assert_close(bleu.score, 45.80055167879256, "corpus BLEU");
    assert_eq!((bleu.counts, bleu.totals), ([16, 12, 6, 2], [20, 17, 14, 11]));
    assert_eq!((bleu.sys_len, bleu.ref_len), (20, 17));
    assert_close(corpus_chrf(segments), 61.93286855094934, "corpus chrF");
}

#[test]
fn no_references_scores_zero_instead_of_failing() {
    let bleu = sentence_bleu("some words", &[]);
    assert_eq!((bleu.score, bleu.counts, bleu.ref_len), (0.0, [0; 4], 0));
    assert_eq!(sentence_chrf("some words", &[]), 0.0);
}
