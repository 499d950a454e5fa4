//! The built-in demo (addition, no download) and how its quality is judged: exact-match accuracy of greedy
//! answers on held-out problems the model never trained on.
use std::path::Path;

use candle_core::Device;
use lockstep_common::RunSpec;
use lockstep_common::data::Corpus;
use lockstep_common::data::addition::Problem;
use lockstep_worker::checkpoint;
use lockstep_worker::generate;

use crate::error::Result;

/// The demo run for `workers` local workers: the spec defaults (2-digit addition) on a free port.
pub fn demo_spec(workers: u32) -> RunSpec {
    let mut spec = RunSpec::default();
    spec.cluster.listen = "127.0.0.1:0".into();
    spec.cluster.min_workers = workers;
    spec.cluster.max_workers = workers;
    spec
}

/// One judged answer.
#[derive(Debug, Clone)]
pub struct Sample {
    pub prompt: String,
    pub expected: String,
    pub got: String,
}

impl Sample {
    pub fn correct(&self) -> bool {
        self.expected == self.got
    }
}

#[derive(Debug, Clone)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub samples: Vec<Sample>,
}

impl Accuracy {
    pub fn fraction(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Exact-match accuracy of the checkpoint in `dir` on (at most `limit`) held-out addition problems of `spec`.
pub fn addition_accuracy(dir: &Path, spec: &RunSpec, limit: usize) -> Result<Accuracy> {
    let device = Device::Cpu;
    let loaded = checkpoint::load(dir, &device)?;
    let model = loaded.model()?;
    let corpus = Corpus::load(spec)?;
    let problems: Vec<&Problem> = corpus.val_problems.iter().take(limit).collect();
    let mut samples = Vec::with_capacity(problems.len());
    for chunk in problems.chunks(256) {
        let prompts = chunk
            .iter()
            .map(|p| loaded.tokenizer.encode(&p.prompt()))
            .collect::<Result<Vec<_>, _>>()?;
        let answer_len = chunk.first().map_or(0, |p| p.answer().len());
        let outputs = generate::greedy_batch(&model, &prompts, answer_len, &device)?;
        for (p, out) in chunk.iter().zip(outputs) {
            samples.push(Sample {
                prompt: p.prompt(),
                expected: p.answer(),
                got: loaded.tokenizer.decode(&out),
            });
        }
    }
    let correct = samples.iter().filter(|s| s.correct()).count();
    Ok(Accuracy {
        correct,
        total: samples.len(),
        samples,
    })
}

/// The reversed answer as a person writes it: `"250"` → `"052"` → 52.
pub fn readable_answer(reversed: &str) -> String {
    let forward: String = reversed.chars().rev().collect();
    let trimmed = forward.trim_start_matches('0');
    if trimmed.is_empty() { "0".into() } else { trimmed.into() }
}

/// Greedy continuation of `prompt` (token ids) by the checkpoint in `dir`, decoded with its tokenizer.
pub fn sample_text(dir: &Path, prompt: &[u32], max_new: usize) -> Result<String> {
    let device = Device::Cpu;
    let loaded = checkpoint::load(dir, &device)?;
    let model = loaded.model()?;
    let new = generate::greedy(&model, prompt, max_new, None, &device)?;
    Ok(format!(
        "{}{}",
        loaded.tokenizer.decode(prompt),
        loaded.tokenizer.decode(&new)
    ))
}

/// A fine-tuned checkpoint's greedy answers to (at most `limit`) held-out conversations of `spec`'s data (the
/// validation split: the last examples of `data.path`): (what the user said last, the answer, the reference).
pub fn chat_samples(dir: &Path, spec: &RunSpec, limit: usize) -> Result<Vec<(String, String, String)>> {
    let device = Device::Cpu;
    let loaded = checkpoint::load(dir, &device)?;
    let template = loaded.chat_template().ok_or_else(|| {
        crate::error::Error::Usage(format!("{} is not a chat model (data.source = \"sft\")", dir.display()))
    })?;
    let model = loaded.model()?;
    let path = spec.data.path.clone().unwrap_or_default();
    let mut conversations = lockstep_common::data::sft::read_conversations(&path)?;
    // The corpus's own rule, so these are the validation conversations the run held out.
    let val = lockstep_common::data::sft::split_val(&mut conversations, spec.data.val_fraction);
    let items: Vec<_> = val
        .iter()
        .filter_map(|c| lockstep_common::data::sft::split_reply(c))
        .take(limit)
        .collect();
    let histories: Vec<_> = items.iter().map(|(h, _)| h.to_vec()).collect();
    let answers = lockstep_worker::sft_eval::answer(&model, &loaded.tokenizer, &template, &histories, 64, 8, &device)?;
    Ok(items
        .iter()
        .zip(answers)
        .map(|((history, reference), answer)| {
            let said = history.last().map_or_else(String::new, |m| m.content.clone());
            (said, answer, reference.to_string())
        })
        .collect())
}
