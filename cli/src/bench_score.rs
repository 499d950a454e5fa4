//! `lockstep bench score`: how many segments per second each metric of `lockstep score` scores, on generated
//! English-like pairs (a reference of 20–30 words and a hypothesis that keeps most of it, inflects, swaps in
//! synonyms, drops, inserts and reorders), timed through the same code as the command.
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::score::{self, Metric, Options, Segment};

/// Words that come in synonym pairs in WordNet, so that METEOR's synonym stage has work to do.
const SYNONYMS: &[(&str, &str)] = &[
    ("big", "large"),
    ("small", "little"),
    ("quick", "fast"),
    ("begin", "start"),
    ("buy", "purchase"),
    ("house", "home"),
    ("car", "automobile"),
    ("answer", "reply"),
    ("help", "assist"),
    ("show", "display"),
    ("road", "route"),
    ("child", "kid"),
    ("happy", "glad"),
    ("end", "finish"),
    ("speak", "talk"),
];

/// Content words a suffix can inflect, so that the stem stages match what the exact stage misses.
const CONTENT: &[&str] = &[
    "walk", "train", "model", "report", "market", "city", "water", "system", "student", "paper", "river", "price",
    "result", "team", "plan", "work", "change", "school", "people", "test", "year", "letter", "village", "power",
    "number", "country", "open", "close", "call", "move", "play", "learn", "need", "follow", "build", "value",
];

const FUNCTION: &[&str] = &[
    "the", "a", "of", "to", "and", "in", "on", "for", "with", "that", "it", "was", "is", "by", "at", "from", "this",
    "as", "be", "have",
];

const SUFFIXES: &[&str] = &["s", "ed", "ing", "er"];

/// One metric's timing.
#[derive(Debug, Clone)]
pub struct Timing {
    pub metric: String,
    pub secs: f64,
    pub segments_per_sec: f64,
}

#[derive(Debug, Clone)]
pub struct ScoreBench {
    pub segments: usize,
    pub hyp_words: usize,
    pub ref_words: usize,
    /// The WordNet directory and the seconds it took to load, when one was found.
    pub wordnet_load: Option<(PathBuf, f64)>,
    pub timings: Vec<Timing>,
}

fn word(rng: &mut ChaCha8Rng) -> String {
    let x: f64 = rng.random();
    let pick = |rng: &mut ChaCha8Rng, list: &[&str]| list.choose(rng).copied().unwrap_or("the").to_string();
    if x < 0.45 {
        pick(rng, FUNCTION)
    } else if x < 0.8 {
        pick(rng, CONTENT)
    } else {
        let (a, b) = SYNONYMS[rng.random_range(0..SYNONYMS.len())];
        if rng.random_bool(0.5) { a } else { b }.to_string()
    }
}

fn synonym(w: &str) -> Option<&'static str> {
    SYNONYMS.iter().find_map(|&(a, b)| {
        if a == w {
            Some(b)
        } else if b == w {
            Some(a)
        } else {
            None
        }
    })
}

/// One generated pair, deterministic in `rng`.
fn pair(rng: &mut ChaCha8Rng) -> Segment {
    let len = rng.random_range(20..=30);
    let reference: Vec<String> = (0..len).map(|_| word(rng)).collect();
    let mut hyp: Vec<String> = Vec::with_capacity(len + 4);
    for w in &reference {
        let x: f64 = rng.random();
        if x < 0.65 {
            hyp.push(w.clone());
        } else if x < 0.75 && CONTENT.contains(&w.as_str()) {
            hyp.push(format!("{w}{}", SUFFIXES.choose(rng).copied().unwrap_or("s")));
        } else if x < 0.83 {
            hyp.push(synonym(w).map_or_else(|| w.clone(), str::to_string));
        } else if x < 0.90 {
            // dropped
        } else {
            hyp.push(word(rng));
        }
        if rng.random_bool(0.04) {
            hyp.push(word(rng));
        }
    }
    if hyp.len() > 6 && rng.random_bool(0.3) {
        let at = rng.random_range(1..hyp.len() - 3);
        hyp[at..].rotate_left(3);
    }
    let sentence = |words: &[String]| {
        let mut s = words.join(" ");
        if let Some(first) = s.get(..1) {
            s.replace_range(..1, &first.to_uppercase());
        }
        s + "."
    };
    Segment {
        hyp: sentence(&hyp),
        refs: vec![sentence(&reference)],
    }
}

/// `segments` generated pairs from `seed`.
pub fn generate(segments: usize, seed: u64) -> Vec<Segment> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..segments).map(|_| pair(&mut rng)).collect()
}

/// Times each metric over `segments` generated pairs; METEOR with WordNet too when `wordnet` (or the default
/// directory) gives one.
pub fn run(segments: usize, seed: u64, wordnet: Option<&Path>) -> Result<ScoreBench> {
    let pairs = generate(segments, seed);
    let words = |s: &str| s.split_whitespace().count();
    let hyp_words = pairs.iter().map(|p| words(&p.hyp)).sum();
    let ref_words = pairs
        .iter()
        .map(|p| p.refs.iter().map(|r| words(r)).sum::<usize>())
        .sum();

    let start = Instant::now();
    let opened = score::open_wordnet(wordnet)?;
    let wordnet_load = opened
        .as_ref()
        .map(|(dir, _)| (dir.clone(), start.elapsed().as_secs_f64()));

    let mut timings = Vec::new();
    let mut time = |name: &str, opts: &Options| {
        let start = Instant::now();
        let report = score::score(&pairs, opts);
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(report);
        timings.push(Timing {
            metric: name.to_string(),
            secs,
            segments_per_sec: segments as f64 / secs,
        });
    };
    let only = |m: Metric, rouge_stem: bool| Options {
        metrics: vec![m],
        rouge_stem,
        wordnet: None,
    };
    time("BLEU (sentence + corpus)", &only(Metric::Bleu, false));
    time("chrF (sentence + corpus)", &only(Metric::Chrf, false));
    time("ROUGE-1/2/L/Lsum", &only(Metric::Rouge, false));
    time("ROUGE-1/2/L/Lsum, stemmer", &only(Metric::Rouge, true));
    time("METEOR, exact + stem", &only(Metric::Meteor, false));
    if let Some(w) = opened {
        let opts = Options {
            metrics: vec![Metric::Meteor],
            rouge_stem: false,
            wordnet: Some(w),
        };
        time("METEOR, WordNet", &opts);
    }
    Ok(ScoreBench {
        segments,
        hyp_words,
        ref_words,
        wordnet_load,
        timings,
    })
}

impl ScoreBench {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} generated pairs: {:.1} hypothesis words, {:.1} reference words per segment\n",
            self.segments,
            self.hyp_words as f64 / self.segments.max(1) as f64,
            self.ref_words as f64 / self.segments.max(1) as f64
        );
        match &self.wordnet_load {
            Some((dir, secs)) => out += &format!("WordNet {} loaded in {secs:.2} s\n", dir.display()),
            None => out += "no WordNet found: METEOR timed with exact + stem only\n",
        }
        out += &format!("{:<28} {:>9} {:>12}\n", "metric", "seconds", "segments/s");
        for t in &self.timings {
            out += &format!("{:<28} {:>9.3} {:>12.0}\n", t.metric, t.secs, t.segments_per_sec);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_deterministic_sized_and_overlapping() {
        let pairs = generate(200, 7);
        assert_eq!(pairs, generate(200, 7), "the same seed gives the same pairs");
        assert_ne!(pairs, generate(200, 8));
        for p in &pairs {
            let reference: Vec<&str> = p.refs[0].split_whitespace().collect();
            assert!((20..=30).contains(&reference.len()), "{}", p.refs[0]);
            let shared = p.hyp.split_whitespace().filter(|w| reference.contains(w)).count();
            assert!(shared * 3 >= reference.len(), "a hypothesis shares most words: {p:?}");
        }
        eprintln!("{:#?}", &pairs[..2]);
    }
}
