//! Text metrics computed exactly as the reference tools compute them (issue 7): sacreBLEU's BLEU and chrF,
//! rouge-score's ROUGE-1/2/L/Lsum, and nltk's METEOR. Golden values from those tools are in
//! `common/tests/fixtures/text-metrics/` (its README says how each was called).
//!
//! Pure functions over strings: no I/O except reading a WordNet database for METEOR's synonym stage.

pub mod bleu;
pub mod chrf;
pub mod meteor;
pub mod porter;
pub mod rouge;
pub mod tokenize_13a;
pub mod wordnet;
