//! What `lockstep demo-sft` found, as JSON (`--json`) or as the table and examples it prints.
use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::judge::Scores;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub quick: bool,
    pub seed: u64,
    pub workers: u32,
    pub data: DataFigures,
    pub pretrain: RunFigures,
    pub finetune: RunFigures,
    /// One row per task, then `all`.
    pub scores: Vec<TaskRow>,
    pub examples: Vec<Sample>,
    /// Which METEOR stages ran: with WordNet synonyms, or exact and stem only.
    pub meteor: String,
    /// The whole demo, generation to the last score.
    pub secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataFigures {
    pub train_examples: usize,
    pub heldout_examples: usize,
    pub pretrain_documents: usize,
    pub pretrain_tokens: u64,
    /// `Tokenizer::describe` of the BPE trained on the pretraining text.
    pub tokenizer: String,
    pub dir: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub steps: u64,
    pub secs: f64,
    pub loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub checkpoint: String,
    pub logs: String,
    /// The run's own generation metrics at its last evaluation (fine-tuning: `sft.eval_data`, the first
    /// `sft.eval_items` held-out items, METEOR exact and stem only), 0–100; empty when it has none.
    pub eval_metrics: BTreeMap<String, f64>,
    pub eval_metrics_step: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    /// `translate`, `summarize` or `all`.
    pub task: String,
    pub items: usize,
    pub before: Scores,
    pub after: Scores,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub task: String,
    pub prompt: String,
    pub reference: String,
    pub before: String,
    pub after: String,
}

impl Report {
    /// The held-out row of `task` (`all` for every item).
    pub fn row(&self, task: &str) -> Option<&TaskRow> {
        self.scores.iter().find(|r| r.task == task)
    }

    /// The scores table, then the examples.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "held-out scores, before → after fine-tuning (0–100; METEOR: {}):",
            self.meteor
        );
        let _ = write!(s, "{:<10} {:>5}", "task", "items");
        for (label, _) in Scores::default().columns() {
            let _ = write!(s, "  {label:>13}");
        }
        s.push('\n');
        for row in &self.scores {
            let _ = write!(s, "{:<10} {:>5}", row.task, row.items);
            for ((_, before), (_, after)) in row.before.columns().into_iter().zip(row.after.columns()) {
                let _ = write!(s, "  {:>13}", format!("{before:.1} → {after:.1}"));
            }
            s.push('\n');
        }
        if let Some(step) = self.finetune.eval_metrics_step {
            let m = &self.finetune.eval_metrics;
            let figures: Vec<String> = crate::status_view::METRIC_LABELS
                .iter()
                .filter_map(|(key, label)| m.get(*key).map(|v| format!("{label} {v:.1}")))
                .collect();
            let _ = writeln!(
                s,
                "the fine-tuning run's own evaluation at step {step} (sft.eval_data, METEOR exact and stem): {}",
                figures.join(", ")
            );
        }
        for e in &self.examples {
            let _ = writeln!(s, "\n[{}] {}", e.task, e.prompt);
            let _ = writeln!(s, "  reference: {}", e.reference);
            let _ = writeln!(s, "  before:    {}", shown(&e.before));
            let _ = writeln!(s, "  after:     {}", shown(&e.after));
        }
        s
    }
}

/// An empty answer would print as nothing at all.
fn shown(answer: &str) -> &str {
    if answer.trim().is_empty() { "(empty)" } else { answer }
}
