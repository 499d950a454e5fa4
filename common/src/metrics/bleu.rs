//! sacreBLEU 2.x's BLEU with its defaults: `13a` tokens, case kept, four n-gram orders, `exp` smoothing (mteval's
//! NIST method 3), effective order for sentence BLEU only, and the closest reference length (ties go to the shorter).
//!
//! Segment statistics are integers and add up exactly, so a corpus score is the sum of [`BleuStats`] scored once,
//! never an average of sentence scores. The float steps follow sacreBLEU's expression order so scores agree to the
//! last bits, not merely to a tolerance.

use std::iter::Sum;
use std::ops::{Add, AddAssign};

use rustc_hash::FxHashMap;

use super::tokenize_13a::{is_python_whitespace, tokenize_13a};

/// The highest n-gram order BLEU counts.
pub const MAX_NGRAM_ORDER: usize = 4;

/// sacreBLEU's stand-in for log(0), so that an unmatched order drags the geometric mean to zero without a NaN.
const LOG_OF_ZERO: f64 = -9_999_999_999.0;

/// BLEU's sufficient statistics for one segment or, summed, for a corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BleuStats {
    /// Clipped hypothesis n-gram matches, per order 1..=4.
    pub counts: [usize; MAX_NGRAM_ORDER],
    /// Hypothesis n-grams, per order 1..=4.
    pub totals: [usize; MAX_NGRAM_ORDER],
    /// Hypothesis length in tokens.
    pub sys_len: usize,
    /// The reference length closest to the hypothesis length.
    pub ref_len: usize,
}

/// A BLEU score with the figures sacreBLEU reports beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bleu {
    /// BLEU on sacreBLEU's 0–100 scale.
    pub score: f64,
    pub counts: [usize; MAX_NGRAM_ORDER],
    pub totals: [usize; MAX_NGRAM_ORDER],
    /// Smoothed n-gram precisions on the 0–100 scale; all zero when nothing matched.
    pub precisions: [f64; MAX_NGRAM_ORDER],
    /// Brevity penalty.
    pub bp: f64,
    pub sys_len: usize,
    pub ref_len: usize,
}

/// Sentence BLEU as `sacrebleu.sentence_bleu(hyp, refs)` computes it (effective order on).
///
/// With no references at all sacreBLEU fails; here the segment simply has no matches and a reference length of 0.
pub fn sentence_bleu(hyp: &str, refs: &[&str]) -> Bleu {
    BleuStats::segment(hyp, refs).score(true)
}

/// Corpus BLEU as `sacrebleu.corpus_bleu` computes it: `segments` yields each hypothesis with its references.
///
/// Taking pairs rather than two parallel lists leaves the length check to the caller, which knows the file names.
pub fn corpus_bleu<'a, R>(segments: impl IntoIterator<Item = (&'a str, R)>) -> Bleu
where
    R: AsRef<[&'a str]>,
{
    segments
        .into_iter()
        .map(|(hyp, refs)| BleuStats::segment(hyp, refs.as_ref()))
        .sum::<BleuStats>()
        .score(false)
}

impl BleuStats {
    /// The statistics of one hypothesis against its references, after sacreBLEU's preprocessing (trailing
    /// whitespace stripped, then `13a`). Multiple references clip each n-gram at its highest count in any of them.
    pub fn segment(hyp: &str, refs: &[&str]) -> Self {
        let hyp = preprocess(hyp);
        let hyp_tokens = split_tokens(&hyp);
        let refs: Vec<String> = refs.iter().map(|r| preprocess(r)).collect();
        let ref_tokens: Vec<Vec<&str>> = refs.iter().map(|r| split_tokens(r)).collect();

        let mut ref_max: FxHashMap<&[&str], usize> = FxHashMap::default();
        for tokens in &ref_tokens {
            for (ngram, count) in ngram_counts(tokens) {
                let best = ref_max.entry(ngram).or_insert(0);
                *best = (*best).max(count);
            }
        }

        let mut stats = BleuStats {
            sys_len: hyp_tokens.len(),
            ref_len: closest_ref_len(hyp_tokens.len(), ref_tokens.iter().map(Vec::len)),
            ..BleuStats::default()
        };
        for (ngram, count) in ngram_counts(&hyp_tokens) {
            let order = ngram.len() - 1;
            stats.totals[order] += count;
            stats.counts[order] += count.min(ref_max.get(ngram).copied().unwrap_or(0));
        }
        stats
    }

    /// BLEU from these statistics with `exp` smoothing. `effective_order` (sacreBLEU's default for sentence BLEU,
    /// off for corpus BLEU) averages only over the orders the hypothesis is long enough to have.
    pub fn score(&self, effective_order: bool) -> Bleu {
        let bp = if self.sys_len >= self.ref_len {
            1.0
        } else if self.sys_len == 0 {
            0.0
        } else {
            (1.0 - self.ref_len as f64 / self.sys_len as f64).exp()
        };
        let mut bleu = Bleu {
            score: 0.0,
            counts: self.counts,
            totals: self.totals,
            precisions: [0.0; MAX_NGRAM_ORDER],
            bp,
            sys_len: self.sys_len,
            ref_len: self.ref_len,
        };
        if self.counts.iter().all(|&c| c == 0) {
            return bleu;
        }

        let mut smooth = 1.0_f64;
        let mut orders = MAX_NGRAM_ORDER;
        for n in 0..MAX_NGRAM_ORDER {
            let (correct, total) = (self.counts[n], self.totals[n]);
            if total == 0 {
                break;
            }
            if effective_order {
                orders = n + 1;
            }
            bleu.precisions[n] = if correct == 0 {
                // Each further order with no match halves its pseudo-count again.
                smooth *= 2.0;
                100.0 / (smooth * total as f64)
            } else {
                100.0 * correct as f64 / total as f64
            };
        }
        let log_sum: f64 = bleu.precisions[..orders]
            .iter()
            .map(|&p| if p == 0.0 { LOG_OF_ZERO } else { p.ln() })
            .sum();
        bleu.score = bp * (log_sum / orders as f64).exp();
        bleu
    }
}

impl Add for BleuStats {
    type Output = BleuStats;

    fn add(mut self, other: BleuStats) -> BleuStats {
        self += other;
        self
    }
}

impl AddAssign for BleuStats {
    fn add_assign(&mut self, other: BleuStats) {
        for n in 0..MAX_NGRAM_ORDER {
            self.counts[n] += other.counts[n];
            self.totals[n] += other.totals[n];
        }
        self.sys_len += other.sys_len;
        self.ref_len += other.ref_len;
    }
}

impl Sum for BleuStats {
    fn sum<I: Iterator<Item = BleuStats>>(iter: I) -> BleuStats {
        iter.fold(BleuStats::default(), Add::add)
    }
}

/// sacreBLEU's `_preprocess_segment` with its defaults: Python's `rstrip()` (which decides whether a final "-\n"
/// joins words), then `13a`.
fn preprocess(segment: &str) -> String {
    tokenize_13a(segment.trim_end_matches(is_python_whitespace))
}

/// `13a` output is tokens joined by single spaces; the empty string has no tokens.
fn split_tokens(tokenized: &str) -> Vec<&str> {
    tokenized.split(' ').filter(|t| !t.is_empty()).collect()
}

fn ngram_counts<'t>(tokens: &'t [&'t str]) -> FxHashMap<&'t [&'t str], usize> {
    let mut counts = FxHashMap::default();
    for n in 1..=MAX_NGRAM_ORDER {
        for ngram in tokens.windows(n) {
            *counts.entry(ngram).or_insert(0) += 1;
        }
    }
    counts
}

/// sacreBLEU's `closest` rule: the reference length nearest the hypothesis length, the shorter one on a tie; 0 when
/// there are no references.
fn closest_ref_len(hyp_len: usize, ref_lens: impl Iterator<Item = usize>) -> usize {
    ref_lens.min_by_key(|&len| (len.abs_diff(hyp_len), len)).unwrap_or(0)
}
