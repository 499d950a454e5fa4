//! Generation metrics of a chat model: it answers held-out conversations through the chat template (greedy, until
//! `<|end|>`), and its answers are scored against the held-out ones with BLEU, chrF, ROUGE and METEOR.
//!
//! While fine-tuning (`sft.eval_data`), each rank answers its share of the items and the metrics' sufficient
//! statistics are summed with one all-reduce ([`GenStats::to_f32s`]), so every rank gets the same figures, the
//! decoding is spread over the ranks, and the figures do not depend on the world size. Corpus BLEU and chrF sum
//! n-gram counts (as sacreBLEU); ROUGE and METEOR are means of segment scores (as rouge-score and nltk users
//! aggregate). METEOR runs its exact and Porter-stem stages only here (no WordNet on workers); `lockstep eval`
//! scores with WordNet too.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use lockstep_common::data::Tokenizer;
use lockstep_common::data::chat::{ChatTemplate, Message};
use lockstep_common::data::sft::{read_conversations, split_reply};
use lockstep_common::metrics::bleu::{BleuStats, MAX_NGRAM_ORDER};
use lockstep_common::metrics::chrf::{CHAR_ORDER, ChrfStats};
use lockstep_common::metrics::meteor::meteor;
use lockstep_common::metrics::rouge::rouge;

use crate::decode::{DecodeOptions, decode_all};
use crate::error::{Error, Result};
use crate::model::Gpt;
use crate::sampling::SamplingConfig;

/// Held-out conversations: what the model is told, and the answer it should give.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeldOut {
    pub histories: Vec<Vec<Message>>,
    pub references: Vec<String>,
}

impl HeldOut {
    /// The first `limit` conversations of a JSONL file (the formats of `data.source = "sft"`), each of which must
    /// end with an assistant turn: that turn is the reference, the rest the history.
    pub fn read(path: &Path, limit: usize) -> Result<Self> {
        let mut out = HeldOut::default();
        for (i, conversation) in read_conversations(path)?.into_iter().take(limit).enumerate() {
            let (history, reference) = split_reply(&conversation).ok_or_else(|| {
                Error::Common(lockstep_common::Error::Data {
                    path: path.to_path_buf(),
                    message: format!(
                        "example {}: the last message must be the assistant's answer (the reference to score \
                         against)",
                        i + 1
                    ),
                })
            })?;
            out.histories.push(history.to_vec());
            out.references.push(reference.to_string());
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.references.len()
    }

    pub fn is_empty(&self) -> bool {
        self.references.is_empty()
    }
}

/// The model's greedy answer to each history, as text (up to its `<|end|>`, on one line).
pub fn answer(
    model: &Gpt,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    histories: &[Vec<Message>],
    max_new_tokens: usize,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<String>> {
    let prompts = histories
        .iter()
        .map(|h| template.prompt(tokenizer, h))
        .collect::<lockstep_common::error::Result<Vec<_>>>()?;
    let opts = DecodeOptions {
        max_new_tokens,
        sampling: SamplingConfig::GREEDY,
        seed: 0,
        batch_size,
    };
    let stop = |id: u32| template.is_special(id) || Some(id) == tokenizer.eot();
    let decoded = decode_all(model, &prompts, &opts, device, stop, |_| {})?;
    Ok(decoded
        .outputs
        .iter()
        .map(|out| reply(template, tokenizer, out))
        .collect())
}

/// A chat model's reply in `out`: the text before its `<|end|>` (or any special token, or end-of-text), on one line
/// (newlines become spaces: a hypothesis is one segment).
pub fn reply(template: &ChatTemplate, tokenizer: &Tokenizer, out: &[u32]) -> String {
    let end = out
        .iter()
        .position(|&id| template.is_special(id) || Some(id) == tokenizer.eot())
        .unwrap_or(out.len());
    tokenizer.decode(&out[..end]).replace(['\n', '\r'], " ")
}

/// The metrics' sufficient statistics over some hypothesis/reference pairs; sums of them are the statistics of
/// the union.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenStats {
    pub items: u64,
    pub bleu: BleuStats,
    pub chrf: ChrfStats,
    /// Sums of the segments' ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0–1).
    pub rouge_f: [f64; 3],
    /// Sum of the segments' METEOR (0–1, exact and stem stages).
    pub meteor: f64,
}

/// Slots of [`GenStats::to_f32s`].
const SLOTS: usize = 1 + 2 * MAX_NGRAM_ORDER + 2 + 3 * CHAR_ORDER + 3 + 1;

impl GenStats {
    /// Adds one hypothesis with its reference.
    pub fn add(&mut self, hyp: &str, reference: &str) {
        self.items += 1;
        self.bleu += BleuStats::segment(hyp, &[reference]);
        self.chrf += ChrfStats::segment(hyp, &[reference]);
        let r = rouge(hyp, reference, false);
        for (sum, f) in self.rouge_f.iter_mut().zip([r.rouge1.f, r.rouge2.f, r.rouge_l.f]) {
            *sum += f;
        }
        self.meteor += meteor(hyp, reference, None);
    }

    /// The figures, all on a 0–100 scale: `bleu`, `chrf` (corpus), `rouge1`, `rouge2`, `rougeL` (mean F),
    /// `meteor` (mean).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let n = self.items.max(1) as f64;
        BTreeMap::from([
            ("bleu".to_string(), self.bleu.score(false).score),
            ("chrf".to_string(), self.chrf.score()),
            ("rouge1".to_string(), 100.0 * self.rouge_f[0] / n),
            ("rouge2".to_string(), 100.0 * self.rouge_f[1] / n),
            ("rougeL".to_string(), 100.0 * self.rouge_f[2] / n),
            ("meteor".to_string(), 100.0 * self.meteor / n),
        ])
    }

    /// Flat f32 form for an all-reduce sum. Counts are exact in f32 up to 2^24 (16.7M n-grams per evaluation).
    pub fn to_f32s(&self) -> Vec<f32> {
        let b = &self.bleu;
        let c = &self.chrf;
        let counts = b.counts.iter().chain(&b.totals).chain([&b.sys_len, &b.ref_len]);
        let chrf = c.hyp.iter().chain(&c.reference).chain(&c.matches);
        std::iter::once(self.items as f32)
            .chain(counts.chain(chrf).map(|&v| v as f32))
            .chain(self.rouge_f.iter().chain([&self.meteor]).map(|&v| v as f32))
            .collect()
    }

    /// The inverse of [`GenStats::to_f32s`] (after a sum).
    pub fn from_f32s(v: &[f32]) -> Result<Self> {
        if v.len() != SLOTS {
            return Err(Error::Model(format!(
                "generation statistics: {} values, expected {SLOTS}",
                v.len()
            )));
        }
        // Counts were integers before the sum; the rounding only undoes f32's representation.
        let count = |i: usize| v[i].round() as usize;
        let mut s = GenStats {
            items: v[0].round() as u64,
            ..Default::default()
        };
        let mut i = 1;
        let b = &mut s.bleu;
        for x in b
            .counts
            .iter_mut()
            .chain(&mut b.totals)
            .chain([&mut b.sys_len, &mut b.ref_len])
        {
            *x = count(i);
            i += 1;
        }
        let c = &mut s.chrf;
        for x in c.hyp.iter_mut().chain(&mut c.reference).chain(&mut c.matches) {
            *x = count(i);
            i += 1;
        }
        for x in s.rouge_f.iter_mut().chain([&mut s.meteor]) {
            *x = f64::from(v[i]);
            i += 1;
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_survive_the_flat_form_and_sum_like_the_corpus() {
        let pairs = [
            ("the cat sat on the mat", "the cat sat on a mat"),
            ("a dog ran", "the dog ran away"),
            ("", "nothing at all"),
        ];
        let mut all = GenStats::default();
        let mut parts = [GenStats::default(), GenStats::default()];
        for (i, (h, r)) in pairs.iter().enumerate() {
            all.add(h, r);
            parts[i % 2].add(h, r);
        }
        let summed: Vec<f32> = parts[0]
            .to_f32s()
            .iter()
            .zip(parts[1].to_f32s())
            .map(|(a, b)| a + b)
            .collect();
        let back = GenStats::from_f32s(&summed).unwrap();
        assert_eq!(back.items, 3);
        assert_eq!((back.bleu, back.chrf), (all.bleu, all.chrf));
        let (m, want) = (back.metrics(), all.metrics());
        for (k, v) in &want {
            assert!((m[k] - v).abs() < 1e-4, "{k}: {} vs {v}", m[k]);
        }
        // The corpus BLEU is sacreBLEU's over the pairs, not a mean of sentence scores.
        let corpus = lockstep_common::metrics::bleu::corpus_bleu(pairs.iter().map(|(h, r)| (*h, [*r]))).score;
        assert!((want["bleu"] - corpus).abs() < 1e-9);
        assert!(GenStats::from_f32s(&[1.0]).is_err());
    }
}
