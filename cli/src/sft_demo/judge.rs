//! Before and after: a checkpoint answers the held-out items through the chat template (greedy, until `<|end|>`),
//! and its answers are scored per task with the metrics of `lockstep score`.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use lockstep_common::data::chat::{ChatTemplate, Message, Role};
use lockstep_worker::checkpoint;
use lockstep_worker::sft_eval;
use serde::Serialize;

use super::world::{Example, Task};
use crate::error::{Error, Result};
use crate::score::{self, Metric, Options, Segment};

/// Items answered per forward: the held-out set is small, so batches are small too.
const BATCH: usize = 16;

/// Which model answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The pretrained checkpoint with its embedding grown to `vocab` rows, exactly as fine-tuning starts from it.
    Before { vocab: usize },
    /// The fine-tuned checkpoint (a chat model).
    After,
}

/// The answers of the checkpoint in `dir` to `items`, in order.
pub fn answers(dir: &Path, stage: Stage, items: &[Example], max_new_tokens: usize) -> Result<Vec<String>> {
    let device = Device::Cpu;
    let loaded = checkpoint::load(dir, &device)?;
    let (loaded, template) = match stage {
        Stage::Before { vocab } => {
            let grown = checkpoint::grow_vocab(loaded, vocab)?;
            let template = ChatTemplate::new(&grown.tokenizer);
            (grown, template)
        }
        Stage::After => {
            let template = loaded.chat_template().ok_or_else(|| {
                Error::Usage(format!(
                    "{} is not a chat model (data.source = \"sft\" with the chat template's tokens); the \
                     fine-tuning run did not produce one",
                    dir.display()
                ))
            })?;
            (loaded, template)
        }
    };
    let model = loaded.model()?;
    let histories: Vec<Vec<Message>> = items
        .iter()
        .map(|e| vec![Message::new(Role::User, e.prompt.clone())])
        .collect();
    let answers = sft_eval::answer(
        &model,
        &loaded.tokenizer,
        &template,
        &histories,
        max_new_tokens,
        BATCH,
        &device,
    )?;
    // A byte-level BPE answer often starts with a space; no metric counts it, and a reader need not see it.
    Ok(answers.into_iter().map(|a| a.trim().to_string()).collect())
}

/// The figures of one set of answers, 0–100 each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Scores {
    pub bleu: f64,
    pub chrf: f64,
    pub rouge1: f64,
    pub rouge2: f64,
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
    pub meteor: f64,
}

impl Scores {
    /// `(label, value)` in table order.
    pub fn columns(&self) -> [(&'static str, f64); 6] {
        [
            ("BLEU", self.bleu),
            ("chrF", self.chrf),
            ("ROUGE-1", self.rouge1),
            ("ROUGE-2", self.rouge2),
            ("ROUGE-L", self.rouge_l),
            ("METEOR", self.meteor),
        ]
    }
}

/// Scores `answers` against the items' responses: per task, and over all items (`None` key).
pub fn score_by_task(items: &[Example], answers: &[String], opts: &Options) -> BTreeMap<Option<Task>, Scores> {
    let mut out = BTreeMap::new();
    let tasks = Task::ALL.into_iter().map(Some).chain([None]);
    for task in tasks {
        let segments: Vec<Segment> = items
            .iter()
            .zip(answers)
            .filter(|(e, _)| task.is_none_or(|t| e.task == t))
            .map(|(e, hyp)| Segment {
                hyp: hyp.clone(),
                refs: vec![e.response.clone()],
            })
            .collect();
        if !segments.is_empty() {
            out.insert(task, scores(&segments, opts));
        }
    }
    out
}

fn scores(segments: &[Segment], opts: &Options) -> Scores {
    let r = score::score(segments, opts);
    let rouge = r.rouge.map(|x| x.scores);
    Scores {
        bleu: r.bleu.map_or(0.0, |b| b.score),
        chrf: r.chrf.map_or(0.0, |c| c.score),
        rouge1: rouge.map_or(0.0, |x| 100.0 * x.rouge1.f),
        rouge2: rouge.map_or(0.0, |x| 100.0 * x.rouge2.f),
        rouge_l: rouge.map_or(0.0, |x| 100.0 * x.rouge_l.f),
        meteor: r.meteor.map_or(0.0, |m| 100.0 * m.score),
    }
}

/// Every metric, ROUGE unstemmed (rouge-score's default), METEOR with WordNet when one is given.
pub fn options(wordnet: Option<(std::path::PathBuf, lockstep_common::metrics::wordnet::Wordnet)>) -> Options {
    Options {
        metrics: vec![Metric::Bleu, Metric::Chrf, Metric::Rouge, Metric::Meteor],
        rouge_stem: false,
        wordnet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(task: Task, response: &str) -> Example {
        Example {
            task,
            source: String::new(),
            prompt: String::new(),
            response: response.into(),
        }
    }

    #[test]
    fn scores_are_per_task_and_overall() {
        let items = [
            item(Task::Translate, "Ka vulo mirel sheta."),
            item(Task::Summarize, "Mira the brave farmer feeds the goat near the river."),
        ];
        let answers = ["Ka vulo mirel sheta.".to_string(), "Tomas sells a boat.".to_string()];
        let s = score_by_task(&items, &answers, &options(None));
        assert_eq!(s.len(), 3);
        let t = s[&Some(Task::Translate)];
        assert!(t.columns().iter().all(|&(_, v)| v > 99.0), "{t:?}");
        let m = s[&Some(Task::Summarize)];
        assert!(m.bleu < 10.0 && m.rouge1 < 30.0, "{m:?}");
        let all = s[&None];
        assert!(all.bleu > m.bleu && all.bleu < t.bleu);
    }
}
