//! sacreBLEU 2.x's chrF with its defaults: character n-grams of orders 1..=6 over the text with all whitespace
//! removed, no word n-grams, β = 2, case kept, and `eps_smoothing=False`.
//!
//! That default averages precision and recall over the "effective" orders (those with n-grams on both sides) and
//! only then takes the F-score, as sacreBLEU before 2.0 did; `eps_smoothing=True` (the chrF++.py/Moses/NLTK way,
//! not the default) would average per-order F-scores instead and is not what `corpus_chrf` computes.

use std::iter::Sum;
use std::ops::{Add, AddAssign};

use rustc_hash::FxHashMap;

use super::tokenize_13a::is_python_whitespace;

/// Character n-gram orders chrF counts.
pub const CHAR_ORDER: usize = 6;

/// Recall weighs β times as much as precision.
const BETA: f64 = 2.0;

/// chrF's sufficient statistics for one segment or, summed, for a corpus: per order 1..=6, the hypothesis n-grams,
/// reference n-grams and clipped matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChrfStats {
    pub hyp: [usize; CHAR_ORDER],
    pub reference: [usize; CHAR_ORDER],
    pub matches: [usize; CHAR_ORDER],
}

/// Sentence chrF (0–100) as `sacrebleu.sentence_chrf(hyp, refs)` computes it.
pub fn sentence_chrf(hyp: &str, refs: &[&str]) -> f64 {
    ChrfStats::segment(hyp, refs).score()
}

/// Corpus chrF (0–100) as `sacrebleu.corpus_chrf` computes it: `segments` yields each hypothesis with its
/// references; the statistics are summed over the corpus and scored once.
pub fn corpus_chrf<'a, R>(segments: impl IntoIterator<Item = (&'a str, R)>) -> f64
where
    R: AsRef<[&'a str]>,
{
    segments
        .into_iter()
        .map(|(hyp, refs)| ChrfStats::segment(hyp, refs.as_ref()))
        .sum::<ChrfStats>()
        .score()
}

impl ChrfStats {
    /// The statistics of one hypothesis against the reference that gives it the best chrF (the first one on a tie,
    /// as in sacreBLEU). With no references every count is zero; sacreBLEU fails there instead.
    pub fn segment(hyp: &str, refs: &[&str]) -> Self {
        let hyp_ngrams = char_ngrams(hyp);
        let mut best: Option<(f64, ChrfStats)> = None;
        for reference in refs {
            let stats = match_stats(&hyp_ngrams, &char_ngrams(reference));
            let score = stats.score();
            if best.is_none_or(|(best_score, _)| score > best_score) {
                best = Some((score, stats));
            }
        }
        best.map(|(_, stats)| stats).unwrap_or_default()
    }

    /// chrF (0–100) of these statistics.
    pub fn score(&self) -> f64 {
        let factor = BETA * BETA;
        let (mut avg_prec, mut avg_rec, mut orders) = (0.0_f64, 0.0_f64, 0_usize);
        for n in 0..CHAR_ORDER {
            let (hyp, reference, matches) = (self.hyp[n], self.reference[n], self.matches[n]);
            if hyp > 0 && reference > 0 {
                avg_prec += matches as f64 / hyp as f64;
                avg_rec += matches as f64 / reference as f64;
                orders += 1;
            }
        }
        if orders > 0 {
            avg_prec /= orders as f64;
            avg_rec /= orders as f64;
        }
        if avg_prec + avg_rec == 0.0 {
            return 0.0;
        }
        let score = (1.0 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec);
        100.0 * score
    }
}

impl Add for ChrfStats {
    type Output = ChrfStats;

    fn add(mut self, other: ChrfStats) -> ChrfStats {
        self += other;
        self
    }
}

impl AddAssign for ChrfStats {
    fn add_assign(&mut self, other: ChrfStats) {
        for n in 0..CHAR_ORDER {
            self.hyp[n] += other.hyp[n];
            self.reference[n] += other.reference[n];
            self.matches[n] += other.matches[n];
        }
    }
}

impl Sum for ChrfStats {
    fn sum<I: Iterator<Item = ChrfStats>>(iter: I) -> ChrfStats {
        iter.fold(ChrfStats::default(), Add::add)
    }
}

/// Counts of character (code point) n-grams per order, over the text with Python-whitespace removed.
struct CharNgrams {
    chars: Vec<char>,
}

impl CharNgrams {
    fn counts(&self, n: usize) -> FxHashMap<&[char], usize> {
        let mut counts = FxHashMap::default();
        for ngram in self.chars.windows(n) {
            *counts.entry(ngram).or_insert(0) += 1;
        }
        counts
    }
}

fn char_ngrams(text: &str) -> CharNgrams {
    CharNgrams {
        chars: text.chars().filter(|&c| !is_python_whitespace(c)).collect(),
    }
}

fn match_stats(hyp: &CharNgrams, reference: &CharNgrams) -> ChrfStats {
    let mut stats = ChrfStats::default();
    for n in 1..=CHAR_ORDER {
        let hyp_counts = hyp.counts(n);
        let ref_counts = reference.counts(n);
        let order = n - 1;
        // sacreBLEU does not count hypothesis n-grams of an order the reference is too short to have.
        if !ref_counts.is_empty() {
            stats.hyp[order] = hyp_counts.values().sum();
        }
        stats.reference[order] = ref_counts.values().sum();
        stats.matches[order] = hyp_counts
            .iter()
            .map(|(ngram, &count)| count.min(ref_counts.get(ngram).copied().unwrap_or(0)))
            .sum();
    }
    stats
}
