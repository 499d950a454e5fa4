//! METEOR exactly as nltk 3.10's `meteor_score([reference.split()], hypothesis.split())` computes it, with its
//! defaults α = 0.9, β = 3, γ = 0.5 and `str.lower` preprocessing.
//!
//! Words are aligned in three stages — exact, Porter stem ([`PorterMode::NltkExtensions`]), WordNet synonym — each
//! greedy from the last hypothesis word backwards to the last free reference word that matches, as nltk does. Later
//! stages see the earlier stage's output: after the stem stage the unmatched words are stems, and the synonym stage
//! looks those stems up in WordNet. Without a WordNet database only the first two stages run.

use std::collections::HashSet;

use super::porter::{self, PorterMode};
use super::tokenize_13a::python_split;
use super::wordnet::Wordnet;

/// Weight of precision against recall in the harmonic mean.
pub const ALPHA: f64 = 0.9;
/// Shape of the fragmentation penalty.
pub const BETA: f64 = 3.0;
/// Weight of the fragmentation penalty.
pub const GAMMA: f64 = 0.5;

/// METEOR of `hyp` against one `reference`. `wordnet: None` runs the exact and stem stages only.
pub fn meteor(hyp: &str, reference: &str, wordnet: Option<&Wordnet>) -> f64 {
    let mut hyp_words = words(hyp);
    let mut ref_words = words(reference);
    let (hyp_len, ref_len) = (hyp_words.len(), ref_words.len());

    let mut matches = match_exact(&mut hyp_words, &mut ref_words);
    let stem_all = |list: &[(usize, String)]| -> Vec<(usize, String)> {
        list.iter()
            .map(|(i, w)| (*i, porter::stem(w, PorterMode::NltkExtensions)))
            .collect()
    };
    hyp_words = stem_all(&hyp_words);
    ref_words = stem_all(&ref_words);
    matches.extend(match_exact(&mut hyp_words, &mut ref_words));
    if let Some(wordnet) = wordnet {
        matches.extend(match_synonyms(&mut hyp_words, &mut ref_words, wordnet));
    }
    matches.sort_by_key(|&(h, _)| h);

    let m = matches.len();
    // nltk returns 0 on its ZeroDivisionError: an empty side or no match at all.
    if m == 0 || hyp_len == 0 || ref_len == 0 {
        return 0.0;
    }
    let precision = m as f64 / hyp_len as f64;
    let recall = m as f64 / ref_len as f64;
    let fmean = (precision * recall) / (ALPHA * precision + (1.0 - ALPHA) * recall);
    let fragmentation = count_chunks(&matches) as f64 / m as f64;
    let penalty = GAMMA * fragmentation.powf(BETA);
    (1.0 - penalty) * fmean
}

/// The best METEOR of `hyp` over several references, as nltk's `meteor_score`; 0 when there are none.
pub fn meteor_multi<S: AsRef<str>>(hyp: &str, references: &[S], wordnet: Option<&Wordnet>) -> f64 {
    references
        .iter()
        .map(|r| meteor(hyp, r.as_ref(), wordnet))
        .fold(0.0, f64::max)
}

/// Python's `str.split()` then `str.lower()` per word, each with its position.
fn words(text: &str) -> Vec<(usize, String)> {
    python_split(text).map(str::to_lowercase).enumerate().collect()
}

/// nltk's `_match_enums`: for each hypothesis word from the last, the last still-unmatched equal reference word.
/// Matched words leave both lists.
fn match_exact(hyp: &mut Vec<(usize, String)>, reference: &mut Vec<(usize, String)>) -> Vec<(usize, usize)> {
    let mut matches = Vec::new();
    for i in (0..hyp.len()).rev() {
        if let Some(j) = (0..reference.len()).rev().find(|&j| reference[j].1 == hyp[i].1) {
            matches.push((hyp[i].0, reference[j].0));
            hyp.remove(i);
            reference.remove(j);
        }
    }
    matches
}

/// nltk's `_enum_wordnetsyn_match`: a reference word matches a hypothesis word that it equals or that is a lemma
/// name (without `_`) of one of the hypothesis word's synsets.
fn match_synonyms(
    hyp: &mut Vec<(usize, String)>,
    reference: &mut Vec<(usize, String)>,
    wordnet: &Wordnet,
) -> Vec<(usize, usize)> {
    let mut matches = Vec::new();
    for i in (0..hyp.len()).rev() {
        let word = hyp[i].1.as_str();
        let mut synonyms: HashSet<&str> = wordnet
            .synsets(word)
            .into_iter()
            .flatten()
            .map(String::as_str)
            .filter(|n| !n.contains('_'))
            .collect();
        synonyms.insert(word);
        if let Some(j) = (0..reference.len())
            .rev()
            .find(|&j| synonyms.contains(reference[j].1.as_str()))
        {
            matches.push((hyp[i].0, reference[j].0));
            hyp.remove(i);
            reference.remove(j);
        }
    }
    matches
}

/// nltk's `_count_chunks` over matches sorted by hypothesis position: a new chunk starts wherever the next match
/// is not adjacent in both sentences.
fn count_chunks(matches: &[(usize, usize)]) -> usize {
    1 + matches
        .windows(2)
        .filter(|w| !(w[1].0 == w[0].0 + 1 && w[1].1 == w[0].1 + 1))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_sentences_lose_only_the_one_chunk_penalty() {
        // 6 matches, 1 chunk: fmean 1, penalty 0.5 * (1/6)^3.
        let expected = 1.0 - 0.5 * (1.0f64 / 6.0).powf(3.0);
        assert_eq!(
            meteor("the cat sat on the mat", "The Cat sat on the mat", None),
            expected
        );
    }

    #[test]
    fn no_match_or_empty_side_scores_zero() {
        assert_eq!(meteor("non matching hypothesis", "this is a cat", None), 0.0);
        assert_eq!(meteor("", "this is a cat", None), 0.0);
        assert_eq!(meteor("cat", "", None), 0.0);
    }

    #[test]
    fn stems_match_after_exact_words() {
        // "running" and "runs" both stem to "run".
        let with_stems = meteor("running fast", "runs fast", None);
        assert!(with_stems > meteor("walking fast", "runs fast", None));
    }

    #[test]
    fn best_reference_wins() {
        let refs = ["completely different", "the cat sat"];
        assert_eq!(
            meteor_multi("the cat sat", &refs, None),
            meteor("the cat sat", "the cat sat", None)
        );
        assert_eq!(meteor_multi::<&str>("the cat sat", &[], None), 0.0);
    }

    #[test]
    fn chunks_count_breaks_in_either_sentence() {
        assert_eq!(count_chunks(&[(0, 0), (1, 1), (2, 2)]), 1);
        assert_eq!(count_chunks(&[(0, 0), (1, 2), (2, 3)]), 2);
        assert_eq!(count_chunks(&[(0, 3), (1, 0)]), 2);
    }
}
