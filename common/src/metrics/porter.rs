//! The Porter stemmer in the two variants nltk 3.10's `PorterStemmer` has that the metrics need:
//! [`PorterMode::NltkExtensions`] (nltk's default, which METEOR's stem stage and rouge-score use) and
//! [`PorterMode::Original`] (the published 1980 algorithm, `PorterStemmer("ORIGINAL_ALGORITHM")`).
//!
//! Words are handled as sequences of Unicode scalar values, as Python strings are, so that lengths and "is this a
//! consonant" agree with nltk on any input: everything that is not `a e i o u` (or a `y` after a vowel) counts as a
//! consonant, accented letters and digits included.

/// Which of nltk's Porter variants to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PorterMode {
    /// `PorterStemmer.ORIGINAL_ALGORITHM`: the paper, with no later amendments.
    Original,
    /// `PorterStemmer.NLTK_EXTENSIONS` (nltk's default): Martin Porter's later changes plus nltk's own — an
    /// irregular-forms table, words of one or two letters left alone, `-ies`/`-ied` on four-letter words, `y`→`i`
    /// only after a consonant, `-alli` first, `-fulli`, `-logi`.
    NltkExtensions,
}

/// The stem of `word`, lowercased first, exactly as nltk's `PorterStemmer(mode).stem(word)`.
pub fn stem(word: &str, mode: PorterMode) -> String {
    let nltk = mode == PorterMode::NltkExtensions;
    let lower = word.to_lowercase();
    if nltk && let Some(paradigm) = irregular(&lower) {
        return paradigm.to_string();
    }
    // nltk tests the length of the word as given, before lowercasing.
    if nltk && word.chars().count() <= 2 {
        return lower;
    }
    let s = Stemmer { nltk };
    let mut w: Vec<char> = lower.chars().collect();
    w = s.step1a(w);
    w = s.step1b(w);
    w = s.step1c(w);
    w = s.step2(w);
    w = s.step3(w);
    w = s.step4(w);
    w = s.step5a(w);
    w = s.step5b(w);
    w.into_iter().collect()
}

/// nltk's table of irregular forms (NLTK mode only), looked up after lowercasing.
fn irregular(word: &str) -> Option<&'static str> {
    Some(match word {
        "sky" | "skies" => "sky",
        "dying" => "die",
        "lying" => "lie",
        "tying" => "tie",
        "news" => "news",
        "innings" | "inning" => "inning",
        "outings" | "outing" => "outing",
        "cannings" | "canning" => "canning",
        "howe" => "howe",
        "proceed" => "proceed",
        "exceed" => "exceed",
        "succeed" => "succeed",
        _ => return None,
    })
}

/// A rule's condition on the stem left once its suffix is removed.
#[derive(Clone, Copy)]
enum Cond {
    Always,
    /// m > 0
    Positive,
    /// m > 1
    Gt1,
    /// m > 1 and the stem ends in `s` or `t` (the `-ion` rule)
    Gt1AndSt,
    /// nltk's `-logi` rule: m > 0 for the stem with the suffix's `l` kept
    PositiveWithL,
}

struct Stemmer {
    nltk: bool,
}

fn ends_with(w: &[char], suffix: &str) -> bool {
    let n = suffix.chars().count();
    w.len() >= n && w[w.len() - n..].iter().copied().eq(suffix.chars())
}

fn without(w: &[char], suffix: &str) -> Vec<char> {
    w[..w.len() - suffix.chars().count()].to_vec()
}

fn with(mut stem: Vec<char>, replacement: &str) -> Vec<char> {
    stem.extend(replacement.chars());
    stem
}

fn is_consonant(w: &[char], i: usize) -> bool {
    // A `y` is a consonant at the start or after a vowel, a vowel after a consonant: walk back over the run of
    // `y`s to the letter that decides.
    let mut i = i;
    let mut flips = false;
    loop {
        match w[i] {
            'a' | 'e' | 'i' | 'o' | 'u' => return flips,
            'y' if i > 0 => {
                flips = !flips;
                i -= 1;
            }
            _ => return !flips,
        }
    }
}

/// Porter's m: the number of vowel-consonant transitions.
fn measure(stem: &[char]) -> usize {
    (1..stem.len())
        .filter(|&i| !is_consonant(stem, i - 1) && is_consonant(stem, i))
        .count()
}

fn contains_vowel(stem: &[char]) -> bool {
    (0..stem.len()).any(|i| !is_consonant(stem, i))
}

fn ends_double_consonant(w: &[char]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

impl Stemmer {
    /// Porter's *o, with nltk's extra case of a two-letter vowel-consonant word.
    fn ends_cvc(&self, w: &[char]) -> bool {
        let n = w.len();
        (n >= 3
            && is_consonant(w, n - 3)
            && !is_consonant(w, n - 2)
            && is_consonant(w, n - 1)
            && !matches!(w[n - 1], 'w' | 'x' | 'y'))
            || (self.nltk && n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
    }

    fn holds(cond: Cond, stem: &[char]) -> bool {
        match cond {
            Cond::Always => true,
            Cond::Positive => measure(stem) > 0,
            Cond::Gt1 => measure(stem) > 1,
            Cond::Gt1AndSt => measure(stem) > 1 && matches!(stem.last(), Some('s' | 't')),
            Cond::PositiveWithL => {
                let mut with_l = stem.to_vec();
                with_l.push('l');
                measure(&with_l) > 0
            }
        }
    }

    /// The first rule whose suffix matches decides: it applies if its condition holds, and otherwise the word is
    /// left as it is — later rules are not tried (nltk's `_apply_rule_list`).
    fn apply(w: Vec<char>, rules: &[(&str, &str, Cond)]) -> Vec<char> {
        for &(suffix, replacement, cond) in rules {
            if ends_with(&w, suffix) {
                let stem = without(&w, suffix);
                return if Self::holds(cond, &stem) {
                    with(stem, replacement)
                } else {
                    w
                };
            }
        }
        w
    }

    fn step1a(&self, w: Vec<char>) -> Vec<char> {
        if self.nltk && w.len() == 4 && ends_with(&w, "ies") {
            return with(without(&w, "ies"), "ie");
        }
        Self::apply(
            w,
            &[
                ("sses", "ss", Cond::Always),
                ("ies", "i", Cond::Always),
                ("ss", "ss", Cond::Always),
                ("s", "", Cond::Always),
            ],
        )
    }

    fn step1b(&self, w: Vec<char>) -> Vec<char> {
        if self.nltk && ends_with(&w, "ied") {
            let replacement = if w.len() == 4 { "ie" } else { "i" };
            return with(without(&w, "ied"), replacement);
        }
        if ends_with(&w, "eed") {
            let stem = without(&w, "eed");
            return if measure(&stem) > 0 { with(stem, "ee") } else { w };
        }
        let Some(stem) = ["ed", "ing"]
            .into_iter()
            .filter(|suffix| ends_with(&w, suffix))
            .map(|suffix| without(&w, suffix))
            .find(|stem| contains_vowel(stem))
        else {
            return w;
        };
        for (suffix, replacement) in [("at", "ate"), ("bl", "ble"), ("iz", "ize")] {
            if ends_with(&stem, suffix) {
                return with(without(&stem, suffix), replacement);
            }
        }
        if ends_double_consonant(&stem) {
            let last = stem[stem.len() - 1];
            return if matches!(last, 'l' | 's' | 'z') {
                stem
            } else {
                stem[..stem.len() - 1].to_vec()
            };
        }
        if measure(&stem) == 1 && self.ends_cvc(&stem) {
            with(stem, "e")
        } else {
            stem
        }
    }

    fn step1c(&self, w: Vec<char>) -> Vec<char> {
        if !ends_with(&w, "y") {
            return w;
        }
        let stem = without(&w, "y");
        let turns = if self.nltk {
            stem.len() > 1 && is_consonant(&stem, stem.len() - 1)
        } else {
            contains_vowel(&stem)
        };
        if turns { with(stem, "i") } else { w }
    }

    fn step2(&self, w: Vec<char>) -> Vec<char> {
        if self.nltk && ends_with(&w, "alli") && measure(&without(&w, "alli")) > 0 {
            return self.step2(with(without(&w, "alli"), "al"));
        }
        let p = Cond::Positive;
        let mut rules = vec![
            ("ational", "ate", p),
            ("tional", "tion", p),
            ("enci", "ence", p),
            ("anci", "ance", p),
            ("izer", "ize", p),
            if self.nltk {
                ("bli", "ble", p)
            } else {
                ("abli", "able", p)
            },
            ("alli", "al", p),
            ("entli", "ent", p),
            ("eli", "e", p),
            ("ousli", "ous", p),
            ("ization", "ize", p),
            ("ation", "ate", p),
            ("ator", "ate", p),
            ("alism", "al", p),
            ("iveness", "ive", p),
            ("fulness", "ful", p),
            ("ousness", "ous", p),
            ("aliti", "al", p),
            ("iviti", "ive", p),
            ("biliti", "ble", p),
        ];
        if self.nltk {
            rules.push(("fulli", "ful", p));
            rules.push(("logi", "log", Cond::PositiveWithL));
        }
        Self::apply(w, &rules)
    }

    fn step3(&self, w: Vec<char>) -> Vec<char> {
        let p = Cond::Positive;
        Self::apply(
            w,
            &[
                ("icate", "ic", p),
                ("ative", "", p),
                ("alize", "al", p),
                ("iciti", "ic", p),
                ("ical", "ic", p),
                ("ful", "", p),
                ("ness", "", p),
            ],
        )
    }

    fn step4(&self, w: Vec<char>) -> Vec<char> {
        let g = Cond::Gt1;
        Self::apply(
            w,
            &[
                ("al", "", g),
                ("ance", "", g),
                ("ence", "", g),
                ("er", "", g),
                ("ic", "", g),
                ("able", "", g),
                ("ible", "", g),
                ("ant", "", g),
                ("ement", "", g),
                ("ment", "", g),
                ("ent", "", g),
                ("ion", "", Cond::Gt1AndSt),
                ("ou", "", g),
                ("ism", "", g),
                ("ate", "", g),
                ("iti", "", g),
                ("ous", "", g),
                ("ive", "", g),
                ("ize", "", g),
            ],
        )
    }

    /// Unlike the other steps, both conditions of 5a are tried on the same suffix.
    fn step5a(&self, w: Vec<char>) -> Vec<char> {
        if ends_with(&w, "e") {
            let stem = without(&w, "e");
            let m = measure(&stem);
            if m > 1 || (m == 1 && !self.ends_cvc(&stem)) {
                return stem;
            }
        }
        w
    }

    fn step5b(&self, w: Vec<char>) -> Vec<char> {
        if ends_with(&w, "ll") && measure(&w[..w.len() - 1]) > 1 {
            return w[..w.len() - 1].to_vec();
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nltk(w: &str) -> String {
        stem(w, PorterMode::NltkExtensions)
    }

    fn original(w: &str) -> String {
        stem(w, PorterMode::Original)
    }

    #[test]
    fn paper_examples_in_both_modes() {
        for (word, expected) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("caress", "caress"),
            ("cats", "cat"),
            ("feed", "feed"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("hopping", "hop"),
            ("falling", "fall"),
            ("filing", "file"),
            ("relational", "relat"),
            ("conditional", "condit"),
            ("rational", "ration"),
            ("triplicate", "triplic"),
            ("electrical", "electr"),
            ("adjustable", "adjust"),
            ("adoption", "adopt"),
            ("controll", "control"),
            ("roll", "roll"),
        ] {
            assert_eq!(nltk(word), expected, "nltk mode, {word}");
            assert_eq!(original(word), expected, "original mode, {word}");
        }
    }

    #[test]
    fn modes_differ_where_nltk_extends_the_paper() {
        for (word, n, o) in [
            ("generously", "gener", "gener"),
            ("ties", "tie", "ti"),
            ("died", "die", "di"),
            ("spied", "spi", "spi"),
            ("enjoy", "enjoy", "enjoi"),
            ("happy", "happi", "happi"),
            ("dying", "die", "dy"),
            ("skies", "sky", "ski"),
            ("is", "is", "i"),
            ("as", "as", "a"),
            ("sensibility", "sensibl", "sensibl"),
            ("conformabli", "conform", "conform"),
            ("radically", "radic", "radic"),
            ("hopefully", "hope", "hopefulli"),
            ("geology", "geolog", "geologi"),
        ] {
            assert_eq!(nltk(word), n, "nltk mode, {word}");
            assert_eq!(original(word), o, "original mode, {word}");
        }
    }

    #[test]
    fn lowercases_and_survives_odd_input() {
        assert_eq!(nltk("Running"), "run");
        assert_eq!(nltk("Skies"), "sky");
        assert_eq!(nltk(""), "");
        assert_eq!(original(""), "");
        assert_eq!(original("s"), "");
        assert_eq!(nltk("yyyyyy"), "yyyyyi");
        assert_eq!(nltk("s"), "s");
        assert_eq!(nltk("café"), "café");
        assert_eq!(nltk("résumés"), "résumé");
    }
}
