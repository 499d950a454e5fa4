//! ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum exactly as rouge-score 0.1.2 computes them
//! (`RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer).score(target=reference, prediction=hyp)`).
//!
//! Its tokenizer keeps only `[a-z0-9]` after lowercasing, so text in other scripts scores 0 — a limit of
//! rouge-score that is reproduced on purpose. With stemming, tokens longer than three characters go through nltk's
//! default Porter stemmer ([`PorterMode::NltkExtensions`]; rouge-score 0.1.2 builds `porter.PorterStemmer()`).

use std::collections::HashMap;

use super::porter::{self, PorterMode};

/// Precision, recall and F1 of one ROUGE variant.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Prf {
    pub p: f64,
    pub r: f64,
    pub f: f64,
}

impl Prf {
    fn new(p: f64, r: f64) -> Self {
        // rouge-score's `scoring.fmeasure`: F is 0, not NaN, when nothing matched.
        let f = if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 };
        Self { p, r, f }
    }
}

/// The four ROUGE variants rouge-score reports for one hypothesis/reference pair.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RougeScores {
    pub rouge1: Prf,
    pub rouge2: Prf,
    pub rouge_l: Prf,
    /// Summary-level LCS over newline-separated sentences.
    pub rouge_lsum: Prf,
}

/// Scores `hyp` against `reference`; `stem` is rouge-score's `use_stemmer`.
pub fn rouge(hyp: &str, reference: &str, stem: bool) -> RougeScores {
    let hyp_tokens = tokenize(hyp, stem);
    let ref_tokens = tokenize(reference, stem);
    let sentences = |text: &str| -> Vec<Vec<String>> {
        text.split('\n')
            .filter(|s| !s.is_empty())
            .map(|s| tokenize(s, stem))
            .collect()
    };
    RougeScores {
        rouge1: rouge_n(&hyp_tokens, &ref_tokens, 1),
        rouge2: rouge_n(&hyp_tokens, &ref_tokens, 2),
        rouge_l: rouge_l(&hyp_tokens, &ref_tokens),
        rouge_lsum: rouge_lsum(&sentences(hyp), &sentences(reference)),
    }
}

/// rouge-score's tokenizer: lowercase, every run of characters outside `[a-z0-9]` becomes a separator, and (with
/// `stem`) tokens longer than three characters are Porter-stemmed.
pub fn tokenize(text: &str, stem: bool) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(|t| {
            if stem && t.len() > 3 {
                porter::stem(t, PorterMode::NltkExtensions)
            } else {
                t.to_string()
            }
        })
        // rouge-score's last check; a stem of an ASCII token stays ASCII, so this only drops empty stems.
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        .collect()
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for gram in tokens.windows(n) {
        *counts.entry(gram).or_insert(0) += 1;
    }
    counts
}

fn rouge_n(hyp: &[String], reference: &[String], n: usize) -> Prf {
    let hyp_counts = ngram_counts(hyp, n);
    let ref_counts = ngram_counts(reference, n);
    let overlap: usize = ref_counts
        .iter()
        .map(|(gram, &count)| count.min(hyp_counts.get(gram).copied().unwrap_or(0)))
        .sum();
    let hyp_total = hyp.len().saturating_sub(n - 1);
    let ref_total = reference.len().saturating_sub(n - 1);
    Prf::new(
        overlap as f64 / hyp_total.max(1) as f64,
        overlap as f64 / ref_total.max(1) as f64,
    )
}

/// The LCS length table over `reference` (rows) and `candidate` (columns), as rouge-score's `_lcs_table`.
fn lcs_table(reference: &[String], candidate: &[String]) -> Vec<Vec<usize>> {
    let mut t = vec![vec![0usize; candidate.len() + 1]; reference.len() + 1];
    for i in 1..=reference.len() {
        for j in 1..=candidate.len() {
            t[i][j] = if reference[i - 1] == candidate[j - 1] {
                t[i - 1][j - 1] + 1
            } else {
                t[i - 1][j].max(t[i][j - 1])
            };
        }
    }
    t
}

fn rouge_l(hyp: &[String], reference: &[String]) -> Prf {
    if hyp.is_empty() || reference.is_empty() {
        return Prf::default();
    }
    let lcs = lcs_table(reference, hyp)[reference.len()][hyp.len()] as f64;
    Prf::new(lcs / hyp.len() as f64, lcs / reference.len() as f64)
}

/// Indices into `reference` of the one LCS that rouge-score's `_backtrack_norec` reads out; which of several equal
/// LCSs it picks matters for ROUGE-Lsum, so the tie-breaking (prefer moving up) is the same.
fn lcs_indices(reference: &[String], candidate: &[String]) -> Vec<usize> {
    let t = lcs_table(reference, candidate);
    let (mut i, mut j) = (reference.len(), candidate.len());
    let mut indices = Vec::new();
    while i > 0 && j > 0 {
        if reference[i - 1] == candidate[j - 1] {
            indices.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i][j - 1] > t[i - 1][j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    indices.reverse();
    indices
}

/// rouge-score's `_summary_level_lcs`: for each reference sentence, the union of its LCSs with every hypothesis
/// sentence, each token counted at most as often as it occurs on both sides.
fn rouge_lsum(hyp: &[Vec<String>], reference: &[Vec<String>]) -> Prf {
    let m: usize = reference.iter().map(Vec::len).sum();
    let n: usize = hyp.iter().map(Vec::len).sum();
    if m == 0 || n == 0 {
        return Prf::default();
    }
    let mut ref_left: HashMap<&str, usize> = HashMap::new();
    for t in reference.iter().flatten() {
        *ref_left.entry(t).or_insert(0) += 1;
    }
    let mut hyp_left: HashMap<&str, usize> = HashMap::new();
    for t in hyp.iter().flatten() {
        *hyp_left.entry(t).or_insert(0) += 1;
    }
    let mut hits = 0usize;
    for sentence in reference {
        let mut union: Vec<usize> = hyp.iter().flat_map(|h| lcs_indices(sentence, h)).collect();
        union.sort_unstable();
        union.dedup();
        for token in union.into_iter().map(|i| sentence[i].as_str()) {
            let (Some(h), Some(r)) = (hyp_left.get_mut(token), ref_left.get_mut(token)) else {
                continue;
            };
            if *h > 0 && *r > 0 {
                hits += 1;
                *h -= 1;
                *r -= 1;
            }
        }
    }
    Prf::new(hits as f64 / n as f64, hits as f64 / m as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_keeps_only_ascii_alphanumerics() {
        assert_eq!(
            tokenize("Hello, World! 4.5% café", false),
            ["hello", "world", "4", "5", "caf"]
        );
        assert!(tokenize("模型训练", false).is_empty());
        assert_eq!(tokenize("The cats were running", true), ["the", "cat", "were", "run"]);
    }

    #[test]
    fn f_is_zero_when_nothing_matches() {
        let s = rouge("alpha beta", "gamma delta", false);
        assert_eq!(s.rouge1, Prf::default());
        assert_eq!(rouge("", "gamma", false).rouge_l, Prf::default());
    }

    #[test]
    fn lsum_counts_each_token_once_across_sentences() {
        // rouge-score's documented example shape: union LCS per reference sentence, clipped by counts.
        let s = rouge("a b c\nd e", "a b\nc d e", false);
        assert_eq!(s.rouge_lsum, Prf { p: 1.0, r: 1.0, f: 1.0 });
        let s = rouge("a a a", "a\na", false);
        assert_eq!((s.rouge_lsum.p, s.rouge_lsum.r), (2.0 / 3.0, 1.0));
    }
}
