//! `lockstep run`: a whole run on this host — a coordinator and N worker processes on 127.0.0.1 — with a progress
//! bar fed by the coordinator's `WatchStatus` stream. Ctrl-C (or SIGTERM) stops every child. The run gets a fresh
//! token, handed to the children in their environment; nothing else on the host can join or steer the run.
//!
//! Everything a run leaves lives in its run directory (`--out`): `run.toml`, `logs/`, the coordinator's run state
//! in `state/` and the checkpoints in `checkpoints/`. What that directory already holds is decided on before any
//! process starts ([`plan_config_run`], [`plan_demo_run`]): a coordinator started on an ended run's state would
//! only report its old outcome, or hang its workers, instead of training.
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use lockstep_common::RunSpec;
use lockstep_common::auth::RunToken;
use lockstep_common::proto::{RunState, RunStatus, WatchStatusRequest};
use lockstep_common::transport::{self, ClientSecurity};
use lockstep_coordinator::record::{OUTCOME_FAILED, OUTCOME_FINISHED, Saved};
use lockstep_coordinator::store::Store;
use tokio::process::Child;

use crate::error::{Error, Result};
use crate::procs::{self, CoordinatorProcess};
use crate::status_view;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub spec: RunSpec,
    pub workers: u32,
    /// Run directory: `run.toml` and `logs/` (`lockstep run` also puts the spec's state and checkpoints there:
    /// [`state_dir`], [`checkpoint_dir`]).
    pub out: PathBuf,
    pub threads_per_worker: usize,
    pub progress: bool,
}

/// How the run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub status: RunStatus,
    pub out: PathBuf,
    pub interrupted: bool,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// Where `lockstep run` keeps the coordinator's run state (`cluster.state_dir`) for run directory `out`.
pub fn state_dir(out: &Path) -> PathBuf {
    out.join("state")
}

/// Where `lockstep run` has the workers write checkpoints (`checkpoint.dir`) for run directory `out`.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// What `lockstep run` does with a run directory, decided before any process starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Nothing to pick up: a new run.
    Fresh,
    /// The state holds this run, stopped, stalled or interrupted: the coordinator resumes it from `checkpoint`
    /// (step, path), or from step 0 when none was committed.
    Resume {
        name: String,
        checkpoint: Option<(u64, String)>,
    },
    /// Nothing is started; the line says why and what to do (exit 2).
    Refuse(String),
}

impl Start {
    /// The one line announcing a resumed run; `None` for the others.
    pub fn resuming_line(&self) -> Option<String> {
        match self {
            Start::Resume {
                name,
                checkpoint: Some((step, path)),
            } => Some(format!("resuming run {name} from {path} (step {step})")),
            Start::Resume { name, checkpoint: None } => Some(format!(
                "resuming run {name} from step 0: it ended before its first checkpoint"
            )),
            _ => None,
        }
    }

    /// The step training resumes from (0 for a fresh run).
    pub fn resume_step(&self) -> u64 {
        match self {
            Start::Resume {
                checkpoint: Some((step, _)),
                ..
            } => *step,
            _ => 0,
        }
    }
}

/// The saved state in `<out>/state`: `Ok(None)` when there is none, `Err(Start::Refuse)` when a coordinator holds it.
fn read_state(out: &Path) -> Result<Result<Option<Saved>, Start>> {
    let dir = state_dir(out);
    match Store::read(&dir) {
        Ok(saved) if saved.run.is_none() => Ok(Ok(None)),
        Ok(saved) => Ok(Ok(Some(saved))),
        Err(lockstep_coordinator::Error::NoState { .. }) => Ok(Ok(None)),
        Err(lockstep_coordinator::Error::StateLocked { .. }) => Ok(Err(Start::Refuse(format!(
            "{}: a coordinator is running on this run state (another `lockstep run --out {}`?); wait for it to end, \
             or use another --out",
            dir.display(),
            out.display()
        )))),
        Err(e) => Err(Error::Usage(format!("--out {}: {e}", out.display()))),
    }
}

/// What `lockstep run --config` does with run directory `out` for `spec` (whose state and checkpoint directories
/// are already `out`'s): a new run, the saved run resumed, or a refusal. The state is only read, never changed.
pub fn plan_config_run(out: &Path, spec: &RunSpec) -> Result<Start> {
    let again = format!("use another --out, or delete {} to train again", out.display());
    let state = state_dir(out);
    let saved = match read_state(out)? {
        Ok(Some(saved)) => saved,
        Ok(None) => {
            // Checkpoints without the state that committed them: the new run's would be mixed with them, and
            // `generate --checkpoint DIR` would load whichever step is newest, perhaps the old run's.
            let checkpoints = checkpoint_dir(out);
            if lockstep_worker::checkpoint::step_dirs(&checkpoints)?.is_empty() {
                return Ok(Start::Fresh);
            }
            return Ok(Start::Refuse(format!(
                "{} holds checkpoints of an earlier run whose state is gone; use another --out, or delete them",
                checkpoints.display()
            )));
        }
        Err(refusal) => return Ok(refusal),
    };
    let Some((name, hash, json)) = saved.run.clone() else {
        return Ok(Start::Fresh);
    };
    let checkpoint = saved.latest_checkpoint().cloned();
    let checkpoint_text = checkpoint
        .as_ref()
        .map_or_else(|| "no checkpoint".to_string(), |(_, path)| format!("checkpoint {path}"));
    match &saved.ended {
        Some((outcome, _)) if outcome == OUTCOME_FINISHED => {
            let steps = saved
                .steps
                .last()
                .map(|s| s.step)
                .or(checkpoint.as_ref().map(|(step, _)| *step))
                .unwrap_or(0);
            return Ok(Start::Refuse(format!(
                "{}: run {name} already finished ({steps} steps; {checkpoint_text}): {again}",
                state.display()
            )));
        }
        Some((outcome, message)) if outcome == OUTCOME_FAILED => {
            return Ok(Start::Refuse(format!(
                "{}: run {name} failed ({message}; {checkpoint_text}): {again}",
                state.display()
            )));
        }
        // Stopped, stalled (failed for want of workers) or interrupted: resumable, as the coordinator does.
        _ => {}
    }
    // The coordinator would refuse this too, but only after the workers started; a changed --steps lands here.
    if hash != spec.training_hash() {
        let diff = RunSpec::from_json(&json)
            .map(|theirs| theirs.training_diff(spec).join("; "))
            .unwrap_or_else(|e| format!("its saved spec cannot be read: {e}"));
        return Ok(Start::Refuse(format!(
            "{}: run {name} was started with another training spec (saved vs this command: {diff}); run it again \
             with its own config and --steps to resume it, or {again}",
            state.display()
        )));
    }
    Ok(Start::Resume { name, checkpoint })
}

/// In a run directory, what kind of run `lockstep run` last started there: [`DEMO`] or [`CONFIG`]. The demo clears
/// its directory; this says whether what it would clear is its own.
const KIND_FILE: &str = ".lockstep-run";
pub const DEMO: &str = "demo";
pub const CONFIG: &str = "config";

/// Records that `lockstep run` starts a run of `kind` in `out`.
pub fn mark_kind(out: &Path, kind: &str) -> Result<()> {
    std::fs::create_dir_all(out).map_err(io(format!("create {}", out.display())))?;
    let path = out.join(KIND_FILE);
    std::fs::write(&path, kind).map_err(io(format!("write {}", path.display())))
}

/// Empties run directory `out` of the built-in demo's earlier state and checkpoints: the demo is a fresh run every
/// time, and an older run's checkpoints left beside the new ones would be what `generate --checkpoint DIR` loads
/// (it takes the newest step). Refused while a coordinator runs on that state, and when `out` holds a run started
/// with --config (one the same command resumes; a demo's default --out may be a config run's, when both are named
/// `addition-demo`). A directory with no mark is a demo's: before the mark, only the demo kept its state there.
pub fn plan_demo_run(out: &Path) -> Result<Start> {
    let kind = out.join(KIND_FILE);
    match std::fs::read_to_string(&kind) {
        Ok(k) if k.trim() == CONFIG => {
            return Ok(Start::Refuse(format!(
                "{} holds a run started with --config, which the demo would delete; use another --out for the \
                 demo, or delete {} first",
                out.display(),
                out.display()
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("read {}", kind.display()))(e)),
    }
    if let Err(refusal) = read_state(out)
        // A state that cannot be read is cleared all the same: nothing in it will be used.
        .unwrap_or(Ok(None))
    {
        return Ok(refusal);
    }
    for dir in [state_dir(out), checkpoint_dir(out)] {
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(format!("clear the demo's earlier {}", dir.display()))(e));
            }
            _ => {}
        }
    }
    Ok(Start::Fresh)
}

/// After an interrupted `--config` run (every process stopped): the line saying where it stands in `out`'s state
/// and how to go on.
pub fn interrupted_line(out: &Path) -> String {
    match read_state(out) {
        Ok(Ok(Some(saved))) => {
            let step = saved.steps.last().map_or(0, |s| s.step);
            match saved.latest_checkpoint() {
                Some((_, path)) => {
                    format!("interrupted at step {step}; run the same command again to resume from {path}")
                }
                None => format!(
                    "interrupted at step {step}, before the first checkpoint; run the same command again to start \
                     it over"
                ),
            }
        }
        Ok(Ok(None)) => "interrupted before the first step; run the same command again to start it".to_string(),
        Ok(Err(_)) | Err(_) => format!(
            "interrupted; its state in {} could not be read; run the same command again to resume",
            state_dir(out).display()
        ),
    }
}

/// Writes the resolved spec to `<out>/run.toml`, starts the daemons, follows the run to its end.
pub async fn run_local(opts: RunOptions, interrupt: impl std::future::Future<Output = ()>) -> Result<RunSummary> {
    let logs = opts.out.join("logs");
    std::fs::create_dir_all(&logs).map_err(io(format!("create {}", logs.display())))?;
    let config = opts.out.join("run.toml");
    let text =
        toml::to_string(&opts.spec).map_err(|e| Error::Usage(format!("cannot write the run spec as TOML: {e}")))?;
    std::fs::write(&config, text).map_err(io(format!("write {}", config.display())))?;

    let coordinator_log = logs.join("coordinator.log");
    let token = RunToken::generate();
    let mut coordinator =
        procs::spawn_coordinator(&config, &coordinator_log, &[], Duration::from_secs(120), &token).await?;
    let url = coordinator.url();
    let mut workers: Vec<Child> = Vec::new();
    for i in 0..opts.workers {
        let args = vec![
            "--threads".to_string(),
            opts.threads_per_worker.to_string(),
            "--worker-id".to_string(),
            format!("worker-{i}"),
        ];
        workers.push(procs::spawn_worker(
            &url,
            &logs.join(format!("worker-{i}.log")),
            &args,
            &token,
        )?);
    }

    tokio::pin!(interrupt);
    let follow = follow(&url, &token, opts.spec.train.total_steps, opts.progress);
    let outcome = tokio::select! {
        status = follow => Some(status),
        () = &mut interrupt => None,
    };
    match outcome {
        None => {
            for child in workers.iter_mut() {
                procs::terminate(child, Duration::from_secs(10)).await;
            }
            procs::terminate(&mut coordinator.child, Duration::from_secs(10)).await;
            Ok(RunSummary {
                status: RunStatus::default(),
                out: opts.out,
                interrupted: true,
            })
        }
        Some(status) => {
            let status = match status {
                Ok(s) => s,
                Err(e) => {
                    // A coordinator that ended by itself (e.g. its saved state says the run is over) said why last.
                    let exited = tokio::time::timeout(Duration::from_secs(2), coordinator.child.wait()).await;
                    let e = match exited {
                        Ok(Ok(_)) => Error::Process {
                            process: "lockstep-coordinator".into(),
                            message: format!("exited: {}", procs::last_line(&coordinator_log)),
                        },
                        _ => e,
                    };
                    stop_all(&mut workers, &mut coordinator).await;
                    return Err(with_logs(e, &logs));
                }
            };
            // After the final status the workers get Stop/Abort and exit by themselves; then the coordinator.
            for child in workers.iter_mut() {
                if tokio::time::timeout(Duration::from_secs(30), child.wait())
                    .await
                    .is_err()
                {
                    procs::terminate(child, Duration::from_secs(5)).await;
                }
            }
            if tokio::time::timeout(Duration::from_secs(30), coordinator.child.wait())
                .await
                .is_err()
            {
                procs::terminate(&mut coordinator.child, Duration::from_secs(5)).await;
            }
            Ok(RunSummary {
                status,
                out: opts.out,
                interrupted: false,
            })
        }
    }
}

async fn stop_all(workers: &mut [Child], coordinator: &mut CoordinatorProcess) {
    for child in workers.iter_mut() {
        procs::terminate(child, Duration::from_secs(5)).await;
    }
    procs::terminate(&mut coordinator.child, Duration::from_secs(5)).await;
}

fn with_logs(e: Error, logs: &Path) -> Error {
    Error::Process {
        process: "lockstep run".into(),
        message: format!("{e}; logs are in {}", logs.display()),
    }
}

/// Follows `WatchStatus` until the run finishes or fails, drawing a progress bar; returns the last status.
async fn follow(url: &str, token: &RunToken, total_steps: u64, progress: bool) -> Result<RunStatus> {
    let unreachable = |message: String| Error::Coordinator {
        addr: url.to_string(),
        message,
    };
    let mut client = transport::connect(url, &ClientSecurity::new(token.clone()), Duration::from_secs(10)).await?;
    let mut stream = client
        .watch_status(WatchStatusRequest {})
        .await
        .map_err(|e| unreachable(e.message().to_string()))?
        .into_inner();
    let bar = if progress {
        ProgressBar::new(total_steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("waiting for workers");
    let mut last = RunStatus::default();
    loop {
        match stream.message().await {
            Ok(Some(status)) => {
                bar.set_position(status.step);
                if status.state == RunState::Running as i32 || status.step > 0 {
                    let mut msg = format!("loss {}", status.last_loss.map_or("-".into(), |l| format!("{l:.4}")));
                    if status.val_loss.is_some() {
                        msg.push_str(&format!("  val {}", status_view::val(status.val_loss)));
                    }
                    msg.push_str(&format!("  {}", status_view::rate(status.tokens_per_sec)));
                    bar.set_message(msg);
                }
                let done = status_view::is_terminal(&status);
                last = status;
                if done {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => return Err(unreachable(format!("status stream failed: {}", e.message()))),
        }
    }
    bar.finish_and_clear();
    if !status_view::is_terminal(&last) {
        return Err(unreachable("the coordinator went away before the run ended".into()));
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use lockstep_coordinator::record::{OUTCOME_STALLED, OUTCOME_STOPPED, Record, StepRecord};

    use super::*;

    /// The spec `lockstep run --config` would run into `out`.
    fn spec_for(out: &Path) -> RunSpec {
        let mut spec = RunSpec::default();
        spec.run.name = "r".into();
        spec.checkpoint.dir = checkpoint_dir(out);
        spec.cluster.state_dir = state_dir(out);
        spec
    }

    fn step(step: u64) -> Record {
        Record::Step(StepRecord {
            step,
            loss: 1.5,
            lr: 0.1,
            grad_norm: 1.0,
            tokens: 64,
            skipped: false,
        })
    }

    /// Writes a state in `out` for `spec` that trained 3 steps with a checkpoint at 2, then `ended`.
    fn write_state(out: &Path, spec: &RunSpec, ended: Option<(&str, &str)>) -> String {
        let checkpoint = checkpoint_dir(out).join("step-00000002").display().to_string();
        let mut records = vec![
            Record::Run {
                name: spec.run.name.clone(),
                spec_hash: spec.training_hash(),
                spec_json: spec.to_json(),
            },
            step(1),
            step(2),
            Record::Checkpoint {
                step: 2,
                path: checkpoint.clone(),
            },
            step(3),
        ];
        if let Some((outcome, message)) = ended {
            records.push(Record::Ended {
                outcome: outcome.into(),
                message: message.into(),
            });
        }
        Store::open(&state_dir(out)).unwrap().append(&records).unwrap();
        checkpoint
    }

    fn refusal(start: Start) -> String {
        match start {
            Start::Refuse(why) => why,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_directory_without_state_is_a_fresh_run_unless_it_holds_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let spec = spec_for(&out);
        assert_eq!(plan_config_run(&out, &spec).unwrap(), Start::Fresh);
        // Neither anything else in checkpoints/ nor an empty state directory counts.
        std::fs::create_dir_all(checkpoint_dir(&out).join("notes")).unwrap();
        std::fs::create_dir_all(state_dir(&out)).unwrap();
        assert_eq!(plan_config_run(&out, &spec).unwrap(), Start::Fresh);
        std::fs::create_dir_all(checkpoint_dir(&out).join("step-00000300")).unwrap();
        let why = refusal(plan_config_run(&out, &spec).unwrap());
        assert_eq!(
            why,
            format!(
                "{} holds checkpoints of an earlier run whose state is gone; use another --out, or delete them",
                checkpoint_dir(&out).display()
            )
        );
    }

    #[test]
    fn a_finished_or_failed_run_is_refused_with_what_it_left() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let spec = spec_for(&out);
        let checkpoint = write_state(&out, &spec, Some((OUTCOME_FINISHED, "")));
        assert_eq!(
            refusal(plan_config_run(&out, &spec).unwrap()),
            format!(
                "{}: run r already finished (3 steps; checkpoint {checkpoint}): use another --out, or delete {} to \
                 train again",
                state_dir(&out).display(),
                out.display()
            )
        );
        // Also with another --steps: it is the run directory that is taken.
        let mut longer = spec.clone();
        longer.train.total_steps += 100;
        assert!(refusal(plan_config_run(&out, &longer).unwrap()).contains("already finished"));

        let out = dir.path().join("failed");
        let spec = spec_for(&out);
        write_state(&out, &spec, Some((OUTCOME_FAILED, "5 non-finite steps in a row")));
        let why = refusal(plan_config_run(&out, &spec).unwrap());
        assert!(
            why.contains("run r failed (5 non-finite steps in a row")
                && why.contains(&format!("delete {} to train again", out.display())),
            "{why}"
        );
    }

    #[test]
    fn a_stopped_stalled_or_interrupted_run_resumes_from_its_newest_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        for (i, ended) in [
            Some((OUTCOME_STOPPED, "SIGTERM")),
            Some((OUTCOME_STALLED, "no workers")),
            None,
        ]
        .into_iter()
        .enumerate()
        {
            let out = dir.path().join(format!("out-{i}"));
            let spec = spec_for(&out);
            let checkpoint = write_state(&out, &spec, ended);
            let start = plan_config_run(&out, &spec).unwrap();
            assert_eq!(
                start,
                Start::Resume {
                    name: "r".into(),
                    checkpoint: Some((2, checkpoint.clone())),
                }
            );
            assert_eq!(start.resume_step(), 2);
            assert_eq!(
                start.resuming_line().unwrap(),
                format!("resuming run r from {checkpoint} (step 2)")
            );
            assert_eq!(
                interrupted_line(&out),
                format!("interrupted at step 3; run the same command again to resume from {checkpoint}")
            );
        }
    }

    #[test]
    fn a_resumable_run_with_another_training_spec_is_refused_naming_the_difference() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let spec = spec_for(&out);
        write_state(&out, &spec, Some((OUTCOME_STOPPED, "SIGTERM")));
        let mut other = spec.clone();
        other.train.total_steps = 200;
        let why = refusal(plan_config_run(&out, &other).unwrap());
        assert!(
            why.contains("another training spec") && why.contains("train.total_steps") && why.contains("--out"),
            "{why}"
        );
    }

    #[test]
    fn a_state_in_use_is_refused_and_the_demo_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let spec = spec_for(&out);
        write_state(&out, &spec, None);
        let held = Store::open(&state_dir(&out)).unwrap();
        let why = refusal(plan_config_run(&out, &spec).unwrap());
        assert!(why.contains("a coordinator is running"), "{why}");
        let why = refusal(plan_demo_run(&out).unwrap());
        assert!(why.contains("a coordinator is running"), "{why}");
        drop(held);
        assert!(state_dir(&out).join("run.redb").is_file());
    }

    #[test]
    fn the_demo_clears_its_earlier_state_and_checkpoints_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let spec = spec_for(&out);
        write_state(&out, &spec, Some((OUTCOME_FINISHED, "")));
        std::fs::create_dir_all(checkpoint_dir(&out).join("step-00000300")).unwrap();
        std::fs::create_dir_all(out.join("logs")).unwrap();
        assert_eq!(plan_demo_run(&out).unwrap(), Start::Fresh);
        assert!(!state_dir(&out).exists() && !checkpoint_dir(&out).exists());
        assert!(out.join("logs").is_dir());
        // Nothing to clear is fine too.
        assert_eq!(plan_demo_run(&dir.path().join("new")).unwrap(), Start::Fresh);
    }

    #[test]
    fn an_interrupted_run_without_a_checkpoint_says_it_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let spec = spec_for(&out);
        assert_eq!(
            interrupted_line(&out),
            "interrupted before the first step; run the same command again to start it"
        );
        Store::open(&state_dir(&out))
            .unwrap()
            .append(&[
                Record::Run {
                    name: "r".into(),
                    spec_hash: spec.training_hash(),
                    spec_json: spec.to_json(),
                },
                step(1),
            ])
            .unwrap();
        assert_eq!(
            interrupted_line(&out),
            "interrupted at step 1, before the first checkpoint; run the same command again to start it over"
        );
        let start = plan_config_run(&out, &spec).unwrap();
        assert_eq!(start.resume_step(), 0);
        assert_eq!(
            start.resuming_line().unwrap(),
            "resuming run r from step 0: it ended before its first checkpoint"
        );
    }
}
