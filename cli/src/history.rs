//! `lockstep history`: a run's loss curve, one row per step (loss, learning rate, gradient norm, tokens, whether it
//! was skipped) with the validation loss on the steps that were evaluated. From a running coordinator (its
//! `GetHistory`, in main.rs) or, once the coordinator has exited, from the run's `cluster.state_dir` itself. CSV for a
//! spreadsheet or pandas; JSON lines for scripts.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use lockstep_common::proto::{RunHistory, StepPoint};
use lockstep_coordinator::store::Store;

use crate::error::{Error, Result};

/// The history kept in `state_dir` after `after_step`, as the coordinator would send it. A coordinator running on
/// that directory holds its lock: then it is the one to ask.
pub fn read_state_dir(state_dir: &Path, after_step: u64) -> Result<Vec<RunHistory>> {
    let saved = Store::read(state_dir).map_err(|e| match e {
        lockstep_coordinator::Error::StateLocked { path } => Error::Usage(format!(
            "{}: a coordinator is running on this state directory; ask it instead: lockstep history --coordinator URL",
            path.display()
        )),
        e => Error::Usage(format!("--state-dir {}: {e}", state_dir.display())),
    })?;
    Ok(lockstep_coordinator::history::messages(
        &saved,
        after_step,
        lockstep_coordinator::history::MESSAGE_BYTES,
    ))
}

/// One row: a step's point, its validation loss, or both.
#[derive(Default)]
struct Row {
    point: Option<StepPoint>,
    val_loss: Option<f64>,
}

/// Steps and evaluations merged by step, in order.
fn rows(messages: &[RunHistory]) -> BTreeMap<u64, Row> {
    let mut rows: BTreeMap<u64, Row> = BTreeMap::new();
    for m in messages {
        for s in &m.steps {
            rows.entry(s.step).or_default().point = Some(*s);
        }
        for e in &m.evals {
            rows.entry(e.step).or_default().val_loss = Some(e.val_loss);
        }
    }
    rows
}

pub const CSV_HEADER: &str = "step,loss,lr,grad_norm,tokens,skipped,val_loss";

/// CSV with [`CSV_HEADER`]: a field a row does not have is empty; a non-finite loss is written as Rust prints it
/// (`NaN`, `inf`), which pandas reads as numbers (spreadsheets keep them as text, which a chart skips).
pub fn write_csv(out: &mut impl Write, messages: &[RunHistory]) -> std::io::Result<()> {
    writeln!(out, "{CSV_HEADER}")?;
    for (step, row) in rows(messages) {
        match &row.point {
            Some(p) => write!(
                out,
                "{step},{},{},{},{},{}",
                p.loss, p.lr, p.grad_norm, p.tokens, p.skipped
            )?,
            None => write!(out, "{step},,,,,")?,
        }
        match row.val_loss {
            Some(v) => writeln!(out, ",{v}")?,
            None => writeln!(out, ",")?,
        }
    }
    Ok(())
}

/// One JSON object per row, with the keys of [`CSV_HEADER`] that the row has; a non-finite number is `null` (JSON has
/// none), `skipped` says why.
pub fn write_jsonl(out: &mut impl Write, messages: &[RunHistory]) -> std::io::Result<()> {
    let num = |x: f64| serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, serde_json::Value::Number);
    for (step, row) in rows(messages) {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        if let Some(p) = &row.point {
            obj.insert("loss".into(), num(p.loss));
            obj.insert("lr".into(), num(p.lr));
            obj.insert("grad_norm".into(), num(p.grad_norm));
            obj.insert("tokens".into(), p.tokens.into());
            obj.insert("skipped".into(), p.skipped.into());
        }
        if let Some(v) = row.val_loss {
            obj.insert("val_loss".into(), num(v));
        }
        writeln!(out, "{}", serde_json::Value::Object(obj))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_common::proto::EvalPoint;

    fn point(step: u64, loss: f64) -> StepPoint {
        StepPoint {
            step,
            loss,
            lr: 0.5,
            grad_norm: 1.25,
            tokens: 64,
            skipped: !loss.is_finite(),
        }
    }

    fn sample() -> Vec<RunHistory> {
        vec![
            RunHistory {
                run_name: "r".into(),
                steps: vec![point(1, 3.5), point(2, f64::NAN)],
                // An evaluation before the first step, and one on a step of the second message.
                evals: vec![
                    EvalPoint { step: 0, val_loss: 4.0 },
                    EvalPoint {
                        step: 3,
                        val_loss: 2.75,
                    },
                ],
                ..RunHistory::default()
            },
            RunHistory {
                run_name: "r".into(),
                steps: vec![point(3, 2.5)],
                ..RunHistory::default()
            },
        ]
    }

    #[test]
    fn csv_merges_steps_and_evaluations_by_step() {
        let mut out = Vec::new();
        write_csv(&mut out, &sample()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "step,loss,lr,grad_norm,tokens,skipped,val_loss\n\
             0,,,,,,4\n\
             1,3.5,0.5,1.25,64,false,\n\
             2,NaN,0.5,1.25,64,true,\n\
             3,2.5,0.5,1.25,64,false,2.75\n"
        );
    }

    #[test]
    fn json_lines_carry_the_keys_a_row_has_and_null_for_non_finite() {
        let mut out = Vec::new();
        write_jsonl(&mut out, &sample()).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], serde_json::json!({"step": 0, "val_loss": 4.0}));
        assert_eq!(lines[2]["loss"], serde_json::Value::Null);
        assert_eq!(lines[2]["skipped"], true);
        assert_eq!(
            lines[3],
            serde_json::json!({"step": 3, "loss": 2.5, "lr": 0.5, "grad_norm": 1.25, "tokens": 64, "skipped": false, "val_loss": 2.75})
        );
    }

    #[test]
    fn a_missing_state_dir_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_state_dir(&dir.path().join("nope"), 0).unwrap_err().to_string();
        assert!(
            e.contains("nope") && e.contains("run.redb") && e.contains("cluster.state_dir"),
            "{e}"
        );
    }
}
