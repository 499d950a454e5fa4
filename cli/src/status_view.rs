//! How a `RunStatus` is shown: a table for people, JSON for programs (stable field names, enums as strings).
use std::fmt::Write;

use lockstep_common::proto::{RunState, RunStatus, WorkerState, WorkerStatus};
use serde_json::{Value, json};

pub fn run_state_name(state: i32) -> &'static str {
    match RunState::try_from(state).unwrap_or(RunState::Unspecified) {
        RunState::Waiting => "waiting",
        RunState::Running => "running",
        RunState::Finished => "finished",
        RunState::Failed => "failed",
        RunState::Reforming => "re-forming",
        RunState::Stopped => "stopped",
        RunState::Unspecified => "unknown",
    }
}

pub fn worker_state_name(state: i32) -> &'static str {
    match WorkerState::try_from(state).unwrap_or(WorkerState::Unspecified) {
        WorkerState::Joined => "joined",
        WorkerState::Training => "training",
        WorkerState::Finished => "finished",
        WorkerState::Lost => "lost",
        WorkerState::Left => "left",
        WorkerState::Unspecified => "unknown",
    }
}

pub fn is_terminal(status: &RunStatus) -> bool {
    matches!(
        RunState::try_from(status.state),
        Ok(RunState::Finished | RunState::Failed | RunState::Stopped)
    )
}

fn worker_json(w: &WorkerStatus) -> Value {
    json!({
        "worker_id": w.worker_id,
        "rank": w.rank,
        "host": w.host,
        "device": w.device,
        "state": worker_state_name(w.state),
        "last_step": w.last_step,
        "last_step_ms": w.last_step_ms,
        "tokens_per_sec": w.tokens_per_sec,
        "param_checksum": w.param_checksum,
        "silent_secs": w.silent_secs,
    })
}

pub fn to_json(s: &RunStatus) -> Value {
    json!({
        "run_name": s.run_name,
        "state": run_state_name(s.state),
        "generation": s.generation,
        "step": s.step,
        "total_steps": s.total_steps,
        "last_loss": s.last_loss,
        "val_loss": s.val_loss,
        "val_perplexity": s.val_loss.map(f64::exp),
        "eval_metrics": s.eval_metrics.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "eval_metrics_step": s.eval_metrics_step,
        "lr": s.lr,
        "tokens_per_sec": s.tokens_per_sec,
        "eta_secs": s.eta_secs,
        "elapsed_secs": s.elapsed_secs,
        "world_size": s.world_size,
        "last_checkpoint": s.last_checkpoint,
        "error": s.error,
        "restarts": s.restarts,
        "skipped_steps": s.skipped_steps,
        "workers": s.workers.iter().map(worker_json).collect::<Vec<_>>(),
        "lost": s.lost.iter().map(|l| json!({
            "worker_id": l.worker_id,
            "host": l.host,
            "rank": l.rank,
            "generation": l.generation,
            "last_step": l.last_step,
            "reason": l.reason,
            "unix_ms": l.unix_ms,
        })).collect::<Vec<_>>(),
    })
}

pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn rate(tokens_per_sec: f64) -> String {
    if tokens_per_sec >= 1e6 {
        format!("{:.2}M tok/s", tokens_per_sec / 1e6)
    } else if tokens_per_sec >= 1e3 {
        format!("{:.1}k tok/s", tokens_per_sec / 1e3)
    } else {
        format!("{tokens_per_sec:.0} tok/s")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.4}"))
}

/// A validation loss with its perplexity, `exp(loss)`: `2.0794 (ppl 8.00)`.
pub fn val(loss: Option<f64>) -> String {
    loss.map_or_else(|| "-".into(), |l| format!("{l:.4} (ppl {:.2})", l.exp()))
}

/// The generation metrics' keys (`RunStatus.eval_metrics`) and how they are shown, in display order.
pub const METRIC_LABELS: [(&str, &str); 6] = [
    ("bleu", "BLEU"),
    ("chrf", "chrF"),
    ("rouge1", "ROUGE-1"),
    ("rouge2", "ROUGE-2"),
    ("rougeL", "ROUGE-L"),
    ("meteor", "METEOR"),
];

/// The newest generation metrics, `generation @ step 200: BLEU 41.2  chrF 60.1  ...`; `None` when there are none.
pub fn metrics_line(s: &RunStatus) -> Option<String> {
    if s.eval_metrics.is_empty() {
        return None;
    }
    let names = METRIC_LABELS;
    let mut parts: Vec<String> = names
        .iter()
        .filter_map(|(key, name)| s.eval_metrics.get(*key).map(|v| format!("{name} {v:.1}")))
        .collect();
    let mut others: Vec<_> = s
        .eval_metrics
        .iter()
        .filter(|(k, _)| !names.iter().any(|(n, _)| n == k))
        .collect();
    others.sort_by(|a, b| a.0.cmp(b.0));
    parts.extend(others.into_iter().map(|(k, v)| format!("{k} {v:.1}")));
    let step = s
        .eval_metrics_step
        .map_or_else(String::new, |step| format!(" @ step {step}"));
    Some(format!("generation{step}: {}", parts.join("  ")))
}

pub fn render_table(s: &RunStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {}  {}  generation {}  world {}  elapsed {}",
        s.run_name,
        run_state_name(s.state).to_uppercase(),
        s.generation,
        s.world_size,
        duration(s.elapsed_secs)
    );
    let _ = writeln!(
        out,
        "step {}/{}  loss {}  val {}  lr {:.2e}  {}  ETA {}",
        s.step,
        s.total_steps,
        opt(s.last_loss),
        val(s.val_loss),
        s.lr,
        rate(s.tokens_per_sec),
        s.eta_secs.map_or_else(|| "-".into(), duration)
    );
    if let Some(line) = metrics_line(s) {
        let _ = writeln!(out, "{line}");
    }
    if !s.last_checkpoint.is_empty() {
        let _ = writeln!(out, "checkpoint {}", s.last_checkpoint);
    }
    if !s.error.is_empty() {
        let _ = writeln!(out, "error: {}", s.error);
    }
    if s.restarts > 0 || s.skipped_steps > 0 {
        let _ = writeln!(
            out,
            "restarts {}  skipped non-finite steps {}",
            s.restarts, s.skipped_steps
        );
    }
    for l in &s.lost {
        let rank = if l.rank < 0 {
            "-".to_string()
        } else {
            l.rank.to_string()
        };
        let _ = writeln!(
            out,
            "lost: worker {} (rank {rank}, host {}, generation {}) at step {}: {}",
            l.worker_id, l.host, l.generation, l.last_step, l.reason
        );
    }
    let _ = writeln!(
        out,
        "{:<5} {:<20} {:<16} {:<7} {:<9} {:>7} {:>9} {:>12} {:>7}  CHECKSUM",
        "RANK", "WORKER", "HOST", "DEVICE", "STATE", "STEP", "STEP MS", "TOK/S", "HEARD"
    );
    for w in &s.workers {
        let rank = if w.rank < 0 {
            "-".to_string()
        } else {
            w.rank.to_string()
        };
        let _ = writeln!(
            out,
            "{:<5} {:<20} {:<16} {:<7} {:<9} {:>7} {:>9.1} {:>12.0} {:>7}  {}",
            rank,
            w.worker_id,
            w.host,
            w.device,
            worker_state_name(w.state),
            w.last_step,
            w.last_step_ms,
            w.tokens_per_sec,
            format!("{} ago", duration(w.silent_secs)),
            w.param_checksum
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_every_field_and_names_states() {
        let s = RunStatus {
            run_name: "r".into(),
            state: RunState::Running as i32,
            step: 3,
            total_steps: 10,
            last_loss: Some(1.5),
            workers: vec![WorkerStatus {
                rank: 1,
                state: WorkerState::Training as i32,
                silent_secs: 12.5,
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = to_json(&s);
        assert_eq!(v["state"], "running");
        assert_eq!(v["last_loss"], 1.5);
        assert!(v["val_loss"].is_null());
        assert!(v["val_perplexity"].is_null());
        assert_eq!(v["workers"][0]["state"], "training");
        assert_eq!(v["workers"][0]["silent_secs"], 12.5);
        assert!(render_table(&s).contains("13s ago"), "{}", render_table(&s));
        assert!(render_table(&s).contains("step 3/10"));
    }

    #[test]
    fn lost_workers_and_restarts_are_shown() {
        let s = RunStatus {
            restarts: 1,
            lost: vec![lockstep_common::proto::LostWorker {
                worker_id: "w1".into(),
                host: "h".into(),
                rank: 1,
                generation: 0,
                last_step: 17,
                reason: "lost: stream closed".into(),
                unix_ms: 1,
            }],
            ..Default::default()
        };
        let table = render_table(&s);
        assert!(table.contains("restarts 1"), "{table}");
        assert!(
            table.contains("lost: worker w1 (rank 1, host h, generation 0) at step 17: lost: stream closed"),
            "{table}"
        );
        let v = to_json(&s);
        assert_eq!(v["lost"][0]["last_step"], 17);
        assert_eq!(v["restarts"], 1);
    }

    #[test]
    fn validation_loss_comes_with_its_perplexity() {
        let s = RunStatus {
            val_loss: Some(8f64.ln()),
            ..Default::default()
        };
        let v = to_json(&s);
        assert!((v["val_perplexity"].as_f64().unwrap() - 8.0).abs() < 1e-9);
        let table = render_table(&s);
        assert!(table.contains("val 2.0794 (ppl 8.00)"), "{table}");
    }

    #[test]
    fn generation_metrics_are_shown_with_their_step() {
        let s = RunStatus {
            eval_metrics: [("bleu".to_string(), 41.3), ("rougeL".to_string(), 70.0)].into(),
            eval_metrics_step: Some(200),
            ..Default::default()
        };
        let table = render_table(&s);
        assert!(
            table.contains("generation @ step 200: BLEU 41.3  ROUGE-L 70.0"),
            "{table}"
        );
        let v = to_json(&s);
        assert_eq!(v["eval_metrics"]["bleu"], 41.3);
        assert_eq!(v["eval_metrics_step"], 200);
        assert!(metrics_line(&RunStatus::default()).is_none());
    }

    #[test]
    fn durations() {
        assert_eq!(duration(5.2), "5s");
        assert_eq!(duration(65.0), "1m05s");
        assert_eq!(duration(7300.0), "2h01m");
    }
}
