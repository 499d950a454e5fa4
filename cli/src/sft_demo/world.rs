//! The synthetic world of `lockstep demo-sft`: a small English-like language, an invented second language
//! (Vellan) and two instruction tasks over them, all generated from one seed — no download, no external file.
//!
//! - **English** has about 100 words (people, animals, things, places, adjectives, verbs, prepositions,
//!   determiners) and 15 names. A sentence is `subject verb object [preposition place]`, where a noun phrase is a
//!   name or `determiner [adjective] noun`.
//! - **Vellan** maps every English word 1:1 to a pseudo-word drawn from the seed, keeps names, and puts the
//!   adjective after its noun (`the red fox` → `ka fox' red'`), so translating is a word map plus a reordering,
//!   never a copy.
//! - **Summaries.** A passage of 3–5 sentences introduces a person (`Mira is a brave farmer.`), says where they live
//!   and what they do every day, mixed with distractors about other people and things, in a seeded order. Its
//!   summary is `Mira the brave farmer feeds the goat near the river.`: every fact is in the passage, the
//!   sentence is not.
//! - **Pretraining text** is monolingual: documents of English sentences and passages and documents of Vellan
//!   sentences, never a sentence next to its translation and never a summary, so a model pretrained on it knows
//!   both languages' words but neither task.
//! - **Instruction sets**: training and held-out examples of both tasks with a few prompt phrasings; no held-out
//!   source (sentence or passage) occurs in the training set or in the pretraining text.
use std::collections::{BTreeMap, HashSet};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The invented language's name, as prompts spell it.
pub const LANGUAGE: &str = "Vellan";

const PEOPLE: [&str; 14] = [
    "farmer", "baker", "sailor", "hunter", "teacher", "doctor", "miller", "weaver", "smith", "king", "queen", "child",
    "guard", "poet",
];
const ANIMALS: [&str; 10] = [
    "fox", "dog", "cat", "bird", "horse", "goat", "wolf", "bear", "owl", "mouse",
];
const THINGS: [&str; 16] = [
    "apple", "basket", "letter", "lamp", "bread", "stone", "boat", "cart", "key", "ring", "map", "bell", "coat",
    "book", "cup", "rope",
];
const PLACES: [&str; 15] = [
    "river", "forest", "village", "market", "garden", "castle", "harbor", "valley", "mountain", "field", "bridge",
    "tower", "meadow", "lake", "road",
];
// None starts with a vowel, so "a {adjective}" never needs "an".
const ADJECTIVES: [&str; 20] = [
    "red", "big", "small", "dark", "bright", "quiet", "brave", "happy", "tired", "clever", "gentle", "proud", "green",
    "cold", "warm", "tall", "wild", "kind", "young", "slow",
];
const VERBS: [&str; 20] = [
    "sees", "follows", "finds", "helps", "carries", "watches", "calls", "feeds", "paints", "builds", "hides", "loves",
    "meets", "visits", "guards", "pulls", "holds", "cleans", "sells", "buys",
];
const PREPOSITIONS: [&str; 5] = ["near", "in", "behind", "under", "beyond"];
const DETERMINERS: [&str; 3] = ["the", "this", "that"];
const NAMES: [&str; 15] = [
    "Mira", "Tomas", "Elin", "Bram", "Sofi", "Kato", "Lena", "Oren", "Ida", "Pavel", "Runa", "Felix", "Nora", "Ansel",
    "Greta",
];

const TRANSLATE_PROMPTS: [&str; 3] = [
    "Translate to Vellan: ",
    "Translate this sentence into Vellan: ",
    "English to Vellan: ",
];
const SUMMARIZE_PROMPTS: [&str; 3] = [
    "Summarize: ",
    "Summarize in one sentence: ",
    "Give a one-line summary: ",
];

/// The two instruction tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    Translate,
    Summarize,
}

impl Task {
    pub const ALL: [Task; 2] = [Task::Translate, Task::Summarize];

    pub fn name(self) -> &'static str {
        match self {
            Task::Translate => "translate",
            Task::Summarize => "summarize",
        }
    }
}

/// One instruction example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub task: Task,
    /// The sentence or passage the prompt is about; held-out items differ from training items here.
    pub source: String,
    /// The user's message: a phrasing of the task, then the source.
    pub prompt: String,
    /// The assistant's answer: the reference.
    pub response: String,
}

/// How much to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Training examples of each task.
    pub train_per_task: usize,
    /// Held-out examples of each task.
    pub heldout_per_task: usize,
    /// Pretraining documents (English sentences, English passages and Vellan sentences, about a third each).
    pub documents: usize,
}

/// Everything the demo trains and evaluates on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Monolingual documents for pretraining.
    pub corpus: Vec<String>,
    /// Both tasks, interleaved in a seeded order.
    pub train: Vec<Example>,
    /// Translate items first, then summarize items.
    pub heldout: Vec<Example>,
}

impl Dataset {
    /// The held-out items of one task.
    pub fn heldout_of(&self, task: Task) -> impl Iterator<Item = &Example> {
        self.heldout.iter().filter(move |e| e.task == task)
    }
}

/// The two lexicons: every English word's Vellan word. Names are not in it (they are kept as they are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    vellan: BTreeMap<&'static str, String>,
}

/// A noun phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Np {
    Name(&'static str),
    Noun {
        det: &'static str,
        adj: Option<&'static str>,
        noun: &'static str,
    },
}

/// `subject verb object [preposition place]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sentence {
    subject: Np,
    verb: &'static str,
    object: Np,
    place: Option<(&'static str, Np)>,
}

/// The facts of a passage about one person, from which its summary follows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Person {
    name: &'static str,
    adj: &'static str,
    role: &'static str,
    place: &'static str,
    verb: &'static str,
    object: &'static str,
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, list: &[T]) -> T {
    list[rng.random_range(0..list.len())]
}

fn pick_other(rng: &mut ChaCha8Rng, list: &[&'static str], not: &str) -> &'static str {
    loop {
        let w = pick(rng, list);
        if w != not {
            return w;
        }
    }
}

/// `text` with its first letter upper-case.
fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Words joined as a sentence: capitalised, with a full stop.
fn sentence_text(words: &[&str]) -> String {
    format!("{}.", capitalized(&words.join(" ")))
}

impl World {
    /// The lexicons for `seed`: a distinct pseudo-word (2–3 syllables) for every English word.
    pub fn new(seed: u64) -> Self {
        const CONSONANTS: [&str; 15] = [
            "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh",
        ];
        const VOWELS: [&str; 5] = ["a", "e", "i", "o", "u"];
        const CODAS: [&str; 6] = ["", "", "", "n", "r", "l"];
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e11_a000);
        let english: Vec<&'static str> = Self::english_words().collect();
        let taken: HashSet<&str> = english.iter().copied().collect();
        let mut used = HashSet::new();
        let mut vellan = BTreeMap::new();
        for word in english {
            let pseudo = loop {
                let syllables = if rng.random_bool(0.7) { 2 } else { 3 };
                let mut w = String::new();
                for _ in 0..syllables {
                    w.push_str(pick(&mut rng, &CONSONANTS));
                    w.push_str(pick(&mut rng, &VOWELS));
                }
                w.push_str(pick(&mut rng, &CODAS));
                if !taken.contains(w.as_str()) && used.insert(w.clone()) {
                    break w;
                }
            };
            vellan.insert(word, pseudo);
        }
        World { vellan }
    }

    /// Every English word that has a Vellan word, in a fixed order.
    pub fn english_words() -> impl Iterator<Item = &'static str> {
        DETERMINERS
            .iter()
            .chain(&PEOPLE)
            .chain(&ANIMALS)
            .chain(&THINGS)
            .chain(&PLACES)
            .chain(&ADJECTIVES)
            .chain(&VERBS)
            .chain(&PREPOSITIONS)
            .copied()
    }

    /// The names, which both languages share.
    pub fn names() -> &'static [&'static str] {
        &NAMES
    }

    /// Whether `word` is an adjective.
    pub fn is_adjective(word: &str) -> bool {
        ADJECTIVES.contains(&word)
    }

    /// Whether `word` is a noun (a person, animal, thing or place).
    pub fn is_noun(word: &str) -> bool {
        PEOPLE.contains(&word) || ANIMALS.contains(&word) || THINGS.contains(&word) || PLACES.contains(&word)
    }

    /// The Vellan word for an English word (lower-case), if it has one.
    pub fn vellan(&self, english: &str) -> Option<&str> {
        self.vellan.get(english).map(String::as_str)
    }

    /// Every example, corpus document and held-out item for `seed`.
    pub fn dataset(&self, seed: u64, sizes: Sizes) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut heldout = Vec::with_capacity(2 * sizes.heldout_per_task);
        let mut seen = HashSet::new();
        for task in Task::ALL {
            while heldout.iter().filter(|e: &&Example| e.task == task).count() < sizes.heldout_per_task {
                let e = self.example(&mut rng, task);
                if seen.insert(e.source.clone()) {
                    heldout.push(e);
                }
            }
        }
        let held: HashSet<String> = heldout.iter().map(|e| e.source.clone()).collect();
        let mut train = Vec::with_capacity(2 * sizes.train_per_task);
        for task in Task::ALL {
            let mut n = 0;
            while n < sizes.train_per_task {
                let e = self.example(&mut rng, task);
                if !held.contains(&e.source) {
                    train.push(e);
                    n += 1;
                }
            }
        }
        train.shuffle(&mut rng);
        let mut corpus = Vec::with_capacity(sizes.documents);
        while corpus.len() < sizes.documents {
            if let Some(doc) = self.document(&mut rng, corpus.len() % 3, &held) {
                corpus.push(doc);
            }
        }
        Dataset { corpus, train, heldout }
    }

    /// One pretraining document of `kind` (0: English sentences, 1: an English passage, 2: Vellan sentences), or
    /// `None` if it would hold a held-out source.
    fn document(&self, rng: &mut ChaCha8Rng, kind: usize, held: &HashSet<String>) -> Option<String> {
        if kind == 1 {
            let (passage, _) = passage(rng);
            return (!held.contains(&passage)).then_some(passage);
        }
        let n = rng.random_range(3..=7);
        let mut texts = Vec::with_capacity(n);
        for _ in 0..n {
            let s = sentence(rng);
            let english = s.english();
            if held.contains(&english) {
                return None;
            }
            texts.push(if kind == 0 { english } else { self.translate(&s) });
        }
        Some(texts.join(" "))
    }

    fn example(&self, rng: &mut ChaCha8Rng, task: Task) -> Example {
        match task {
            Task::Translate => {
                let s = sentence(rng);
                let source = s.english();
                Example {
                    task,
                    prompt: format!("{}{source}", pick(rng, &TRANSLATE_PROMPTS)),
                    response: self.translate(&s),
                    source,
                }
            }
            Task::Summarize => {
                let (source, person) = passage(rng);
                Example {
                    task,
                    prompt: format!("{}{source}", pick(rng, &SUMMARIZE_PROMPTS)),
                    response: person.summary(),
                    source,
                }
            }
        }
    }

    /// The Vellan word of an English word of the lexicon (every word the grammar uses has one).
    fn word<'a>(&'a self, english: &'a str) -> &'a str {
        self.vellan(english).unwrap_or(english)
    }

    /// A noun phrase in Vellan: determiner, noun, adjective.
    fn push_vellan<'a>(&'a self, np: Np, out: &mut Vec<&'a str>) {
        match np {
            Np::Name(n) => out.push(n),
            Np::Noun { det, adj, noun } => {
                out.push(self.word(det));
                out.push(self.word(noun));
                out.extend(adj.map(|a| self.word(a)));
            }
        }
    }

    fn translate(&self, s: &Sentence) -> String {
        let mut out = Vec::with_capacity(12);
        self.push_vellan(s.subject, &mut out);
        out.push(self.word(s.verb));
        self.push_vellan(s.object, &mut out);
        if let Some((prep, place)) = s.place {
            out.push(self.word(prep));
            self.push_vellan(place, &mut out);
        }
        sentence_text(&out)
    }
}

impl Np {
    fn push_english(self, out: &mut Vec<&'static str>) {
        match self {
            Np::Name(n) => out.push(n),
            Np::Noun { det, adj, noun } => {
                out.push(det);
                out.extend(adj);
                out.push(noun);
            }
        }
    }
}

impl Sentence {
    fn english(&self) -> String {
        let mut out = Vec::with_capacity(12);
        self.subject.push_english(&mut out);
        out.push(self.verb);
        self.object.push_english(&mut out);
        if let Some((prep, place)) = self.place {
            out.push(prep);
            place.push_english(&mut out);
        }
        sentence_text(&out)
    }
}

impl Person {
    fn summary(&self) -> String {
        format!(
            "{} the {} {} {} the {} near the {}.",
            self.name, self.adj, self.role, self.verb, self.object, self.place
        )
    }
}

fn noun_phrase(rng: &mut ChaCha8Rng, nouns: &[&'static str]) -> Np {
    Np::Noun {
        det: pick(rng, &DETERMINERS),
        adj: rng.random_bool(0.5).then(|| pick(rng, &ADJECTIVES)),
        noun: pick(rng, nouns),
    }
}

fn sentence(rng: &mut ChaCha8Rng) -> Sentence {
    let beings: Vec<&'static str> = PEOPLE.iter().chain(&ANIMALS).copied().collect();
    let objects: Vec<&'static str> = beings.iter().chain(&THINGS).copied().collect();
    let subject = if rng.random_bool(0.3) {
        Np::Name(pick(rng, &NAMES))
    } else {
        noun_phrase(rng, &beings)
    };
    let object = if rng.random_bool(0.15) {
        Np::Name(pick(rng, &NAMES))
    } else {
        noun_phrase(rng, &objects)
    };
    let place = rng
        .random_bool(0.5)
        .then(|| (pick(rng, &PREPOSITIONS), noun_phrase(rng, &PLACES)));
    Sentence {
        subject,
        verb: pick(rng, &VERBS),
        object,
        place,
    }
}

/// A passage about one person (introduction first, then where they live, what they do every day and 0–2
/// distractors in a seeded order) and that person's facts.
fn passage(rng: &mut ChaCha8Rng) -> (String, Person) {
    let p = Person {
        name: pick(rng, &NAMES),
        adj: pick(rng, &ADJECTIVES),
        role: pick(rng, &PEOPLE),
        place: pick(rng, &PLACES),
        verb: pick(rng, &VERBS),
        object: pick(rng, &THINGS),
    };
    let mut rest = vec![
        format!("{} lives near the {}.", p.name, p.place),
        format!("Every day {} {} the {}.", p.name, p.verb, p.object),
    ];
    for _ in 0..rng.random_range(0..=2) {
        let other = pick_other(rng, &NAMES, p.name);
        rest.push(match rng.random_range(0..3) {
            0 => format!("The {} is {}.", pick(rng, &THINGS), pick(rng, &ADJECTIVES)),
            // "often" keeps it from being a sentence of the translation task (a held-out one, say).
            1 => format!("{other} often {} the {}.", pick(rng, &VERBS), pick(rng, &THINGS)),
            _ => format!("{other} lives near the {}.", pick_other(rng, &PLACES, p.place)),
        });
    }
    rest.shuffle(rng);
    let intro = format!("{} is a {} {}.", p.name, p.adj, p.role);
    let text = std::iter::once(intro).chain(rest).collect::<Vec<_>>().join(" ");
    (text, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: Sizes = Sizes {
        train_per_task: 300,
        heldout_per_task: 40,
        documents: 200,
    };

    fn words(text: &str) -> Vec<String> {
        text.trim_end_matches('.')
            .split(' ')
            .map(|w| {
                if NAMES.contains(&w) {
                    w.to_string()
                } else {
                    w.to_lowercase()
                }
            })
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_world_and_another_seed_another() {
        let a = World::new(1).dataset(1, SIZES);
        assert_eq!(a, World::new(1).dataset(1, SIZES));
        assert_ne!(World::new(1), World::new(2));
        assert_ne!(a.train, World::new(1).dataset(2, SIZES).train);
        assert_eq!(a.train.len(), 2 * SIZES.train_per_task);
        assert_eq!(a.heldout.len(), 2 * SIZES.heldout_per_task);
        assert_eq!(a.corpus.len(), SIZES.documents);
    }

    #[test]
    fn vellan_is_a_one_to_one_map_onto_new_words() {
        let world = World::new(7);
        let english: HashSet<&str> = World::english_words().collect();
        assert!(
            (100..=200).contains(&(english.len() + NAMES.len())),
            "{}",
            english.len()
        );
        let vellan: HashSet<&str> = english.iter().filter_map(|w| world.vellan(w)).collect();
        assert_eq!(
            vellan.len(),
            english.len(),
            "every English word has its own Vellan word"
        );
        assert!(vellan.iter().all(|v| !english.contains(v) && !NAMES.contains(v)));
    }

    #[test]
    fn held_out_sources_are_never_trained_on_nor_pretrained_on() {
        let d = World::new(3).dataset(3, SIZES);
        let held: HashSet<&str> = d.heldout.iter().map(|e| e.source.as_str()).collect();
        assert_eq!(held.len(), d.heldout.len(), "held-out items are distinct");
        for e in &d.train {
            assert!(!held.contains(e.source.as_str()), "{}", e.source);
        }
        for doc in &d.corpus {
            for h in &held {
                assert!(!doc.contains(h), "{h} in the pretraining text");
            }
        }
        for task in Task::ALL {
            assert_eq!(d.heldout_of(task).count(), SIZES.heldout_per_task);
            assert!(d.train.iter().any(|e| e.task == task));
        }
    }

    #[test]
    fn translation_maps_every_word_and_puts_the_adjective_after_its_noun() {
        let world = World::new(5);
        let d = world.dataset(5, SIZES);
        let mut reordered = 0;
        for e in d.train.iter().chain(&d.heldout).filter(|e| e.task == Task::Translate) {
            assert!(e.prompt.ends_with(&e.source));
            let (src, out) = (words(&e.source), words(&e.response));
            assert_eq!(src.len(), out.len(), "{} → {}", e.source, e.response);
            let mut i = 0;
            while i < src.len() {
                let w = &src[i];
                if NAMES.contains(&w.as_str()) {
                    assert_eq!(&out[i], w, "names are kept");
                    i += 1;
                } else if World::is_adjective(w) {
                    // English `adj noun` is Vellan `noun' adj'`.
                    assert_eq!(Some(out[i].as_str()), world.vellan(&src[i + 1]));
                    assert_eq!(Some(out[i + 1].as_str()), world.vellan(w));
                    reordered += 1;
                    i += 2;
                } else {
                    assert_eq!(Some(out[i].as_str()), world.vellan(w), "{w} in {}", e.source);
                    i += 1;
                }
            }
            assert_ne!(e.source, e.response);
        }
        assert!(
            reordered > 100,
            "adjectives occur often enough to learn the order: {reordered}"
        );
    }

    #[test]
    fn a_summary_states_the_persons_facts_from_the_passage_in_new_words() {
        let d = World::new(9).dataset(9, SIZES);
        let mut distractors = 0;
        for e in d.train.iter().chain(&d.heldout).filter(|e| e.task == Task::Summarize) {
            let passage = &e.source;
            let s = words(&e.response);
            // "{Name} the {adj} {role} {verb} the {object} near the {place}."
            let [name, the, adj, role, verb, the2, object, near, the3, place] = &s[..] else {
                panic!("summary shape: {}", e.response)
            };
            assert_eq!(
                (the, the2, near, the3),
                (&"the".into(), &"the".into(), &"near".into(), &"the".into())
            );
            assert!(passage.starts_with(&format!("{name} is a {adj} {role}.")), "{passage}");
            assert!(
                passage.contains(&format!("{name} lives near the {place}.")),
                "{passage}"
            );
            assert!(
                passage.contains(&format!("Every day {name} {verb} the {object}.")),
                "{passage}"
            );
            assert!(!passage.contains(&e.response));
            let sentences = passage.matches(". ").count() + 1;
            assert!((3..=5).contains(&sentences), "{passage}");
            distractors += sentences - 3;
        }
        assert!(distractors > 0);
    }

    #[test]
    fn pretraining_text_holds_both_languages_but_no_task() {
        let world = World::new(11);
        let d = world.dataset(11, SIZES);
        let vellan: Vec<&str> = World::english_words().filter_map(|w| world.vellan(w)).collect();
        let has_vellan = |doc: &str| words(doc).iter().any(|w| vellan.contains(&w.as_str()));
        assert!(d.corpus.iter().any(|doc| has_vellan(doc)));
        assert!(d.corpus.iter().any(|doc| !has_vellan(doc)));
        for doc in &d.corpus {
            assert!(!doc.contains(LANGUAGE) && !doc.contains("Summar"), "{doc}");
            assert!(
                !doc.contains(" the ") || !has_vellan(doc),
                "one language per document: {doc}"
            );
        }
    }
}
