//! `lockstep bench coordinator`: how many workers one coordinator serves. For each worker count a real
//! `lockstep-coordinator` process is started; the workers are simulated — tokio tasks in this process, each with its
//! own connection and `Session` stream — that join, heartbeat once a second and report every step at a fixed rate
//! as real ranks do, without training. Meanwhile a separate client times `GetStatus`, and the coordinator's CPU time
//! and memory are read from Linux's /proc.
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use lockstep_common::auth::RunToken;
use lockstep_common::proto::{
    self, CoordinatorMessage, GetStatusRequest, WorkerMessage, coordinator_message::Msg as Down,
    worker_message::Msg as Up,
};
use lockstep_common::transport::{self, ClientSecurity, CoordinatorClient};
use lockstep_common::{PROTOCOL_VERSION, RunSpec};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::error::{Error, Result};
use crate::procs;

/// A coordinator serves N workers when its `GetStatus` p99 stays under this ...
pub const STATUS_P99_LIMIT_MS: f64 = 50.0;
/// ... and, at the end, the step every rank reported is at most this far behind the step they last sent.
pub const MAX_LAG_STEPS: u64 = 2;

const STATUS_PERIOD: Duration = Duration::from_millis(50);
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);
/// Generous: the coordinator checks the (generated) addition data before it listens.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// The assignment comes once the last of the N workers has joined, so a worker may wait for all the others.
const ASSIGNMENT_TIMEOUT: Duration = Duration::from_secs(180);
/// Join attempts per simulated worker, and the pause before the next (times the attempts so far).
const JOIN_ATTEMPTS: u32 = 3;
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
const STATUS_CALL_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Lets every reporting task be spawned before the first step is due.
const START_MARGIN: Duration = Duration::from_millis(200);
/// Linux reports /proc CPU times in USER_HZ, which is 100 on every architecture Lockstep builds for.
const USER_HZ: f64 = 100.0;
/// The ring address in every Join: the coordinator only relays it, and no simulated worker listens.
const RING_ADDR: &str = "127.0.0.1:1";

/// What `lockstep bench coordinator` sweeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Worker counts, one coordinator each.
    pub workers: Vec<u32>,
    /// Step reports per second from every simulated worker.
    pub steps_per_sec: f64,
    /// Length of the measured window per worker count, seconds.
    pub secs: f64,
}

impl Options {
    fn check(&self) -> Result<()> {
        if self.workers.is_empty() || self.workers.contains(&0) {
            return Err(Error::Usage(
                "--workers needs worker counts of at least 1, e.g. 8,32,128".into(),
            ));
        }
        if !(self.steps_per_sec.is_finite() && self.steps_per_sec > 0.0) {
            return Err(Error::Usage(format!(
                "--steps-per-sec {}: must be a positive number",
                self.steps_per_sec
            )));
        }
        if !(self.secs.is_finite() && self.secs > 0.0) || self.steps() == 0 {
            return Err(Error::Usage(format!(
                "--secs {}: must be positive and long enough for one step at --steps-per-sec {}",
                self.secs, self.steps_per_sec
            )));
        }
        Ok(())
    }

    /// Steps every simulated worker reports in the window.
    fn steps(&self) -> u64 {
        (self.secs * self.steps_per_sec).round() as u64
    }
}

/// One coordinator under one load.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub workers: u32,
    /// Simulated workers that got an assignment, counted by distinct rank.
    pub assigned: u32,
    /// The generation they were assigned.
    pub generation: u64,
    /// The measured window (first step due to the last status read), seconds.
    pub secs: f64,
    /// The step the schedule reached: --secs × --steps-per-sec.
    pub target_step: u64,
    /// The newest step every simulated worker sent (below `target_step` only if this process fell behind).
    pub sent_step: u64,
    /// The coordinator's status `step` at the end: the newest step every rank reported, as it has processed them.
    pub coordinator_step: u64,
    /// `sent_step − coordinator_step`: reports sent but not yet processed.
    pub lag_steps: u64,
    /// Step reports sent per second, all workers together.
    pub reports_per_sec: f64,
    /// Workers told to abort, drain or stop during the window, or whose session ended (an overloaded coordinator
    /// declares silent workers lost).
    pub interrupted: u32,
    /// The first interruption: which worker, at which step, and what it got.
    pub interruption: Option<String>,
    /// `GetStatus` calls timed, one every 50 ms by a separate client.
    pub status_calls: u32,
    pub status_p50_ms: f64,
    pub status_p99_ms: f64,
    pub status_max_ms: f64,
    /// From sending `Join` to receiving `Welcome`, per simulated worker (all join at once).
    pub join_p50_ms: f64,
    pub join_p99_ms: f64,
    /// Connections that failed while the workers joined, each followed by a reconnect.
    pub reconnects: u32,
    /// The coordinator's user + system CPU over the window, in % of one core.
    pub cpu_percent: f64,
    /// This process's CPU over the window (the simulated workers and the status client), in % of one core: on a
    /// small host it competes with the coordinator for the same cores.
    pub bench_cpu_percent: f64,
    /// The coordinator's resident memory at the end (VmRSS) and its peak (VmHWM).
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
}

impl Row {
    /// Whether the coordinator kept up: `GetStatus` p99 under [`STATUS_P99_LIMIT_MS`], lag at most
    /// [`MAX_LAG_STEPS`], and no worker interrupted.
    pub fn served(&self) -> bool {
        self.status_p99_ms < STATUS_P99_LIMIT_MS && self.lag_steps <= MAX_LAG_STEPS && self.interrupted == 0
    }

    /// The row of [`table_header`].
    pub fn table_row(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        format!(
            "{:>7} {:>8} {:>6} {:>6} {:>4} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>6} {:>6.1} {:>7.1} {:>7.1} {:>7.1}  {}",
            self.workers,
            self.assigned,
            self.sent_step,
            self.coordinator_step,
            self.lag_steps,
            self.reports_per_sec,
            self.status_p50_ms,
            self.status_p99_ms,
            self.status_max_ms,
            self.join_p50_ms,
            self.join_p99_ms,
            self.reconnects,
            self.cpu_percent,
            self.bench_cpu_percent,
            mib(self.rss_bytes),
            mib(self.hwm_bytes),
            match (self.served(), self.interrupted) {
                (true, _) => "yes".to_string(),
                (false, 0) => "no".to_string(),
                (false, n) => format!("no ({n} interrupted)"),
            }
        )
    }
}

/// Column names for [`Row::table_row`].
pub fn table_header() -> String {
    format!(
        "{:>7} {:>8} {:>6} {:>6} {:>4} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>7} {:>7} {:>7}  {}",
        "workers",
        "assigned",
        "sent",
        "step",
        "lag",
        "reports/s",
        "st.p50",
        "st.p99",
        "st.max",
        "join50",
        "join99",
        "reconn",
        "cpu%",
        "bench%",
        "rss.MiB",
        "hwm.MiB",
        "served"
    )
}

/// The largest worker count the coordinator served ([`Row::served`]).
pub fn capacity(rows: &[Row]) -> Option<u32> {
    rows.iter().filter(|r| r.served()).map(|r| r.workers).max()
}

#[derive(Serialize)]
struct Report<'a> {
    steps_per_sec: f64,
    secs: f64,
    status_p99_limit_ms: f64,
    max_lag_steps: u64,
    capacity: Option<u32>,
    rows: &'a [Row],
}

/// `lockstep bench coordinator`: measures every worker count of `opts` in turn and prints a table row as each is
/// done (or, with `json`, one JSON document at the end).
pub async fn command(opts: &Options, json: bool) -> Result<Vec<Row>> {
    opts.check()?;
    if !json {
        println!(
            "{} simulated workers per coordinator, {} steps/s each, {} s per point; st = GetStatus ms, join = Join→Welcome ms, step = the coordinator's at the end, cpu% = the coordinator's, bench% = this process's",
            opts.workers.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
            opts.steps_per_sec,
            opts.secs
        );
        println!("{}", table_header());
    }
    let mut rows = Vec::with_capacity(opts.workers.len());
    for &n in &opts.workers {
        let row = measure(n, opts.steps_per_sec, opts.secs).await?;
        if !json {
            println!("{}", row.table_row());
            if let Some(why) = &row.interruption {
                println!("        first interrupted: {why}");
            }
        }
        rows.push(row);
    }
    let best = capacity(&rows);
    if json {
        let report = Report {
            steps_per_sec: opts.steps_per_sec,
            secs: opts.secs,
            status_p99_limit_ms: STATUS_P99_LIMIT_MS,
            max_lag_steps: MAX_LAG_STEPS,
            capacity: best,
            rows: &rows,
        };
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Usage(format!("cannot write the results as JSON: {e}")))?;
        println!("{text}");
    } else {
        println!(
            "capacity (GetStatus p99 < {STATUS_P99_LIMIT_MS} ms, lag ≤ {MAX_LAG_STEPS} steps): {}",
            best.map_or_else(
                || "none of the worker counts tried".to_string(),
                |n| format!("{n} workers")
            )
        );
    }
    Ok(rows)
}

/// The run spec of one measurement: the addition data and the default small model (the coordinator never builds
/// it), exactly `workers` ranks, one sequence each, steps without end, nothing written but the run state.
pub fn spec_for(workers: u32, dir: &Path) -> Result<RunSpec> {
    let mut spec = RunSpec::default();
    spec.run.name = format!("bench-coordinator-{workers}");
    spec.cluster.listen = "127.0.0.1:0".into();
    spec.cluster.min_workers = workers;
    spec.cluster.max_workers = workers;
    spec.cluster.heartbeat_interval_secs = 1;
    spec.cluster.state_dir = dir.join("state");
    spec.train.global_batch = workers as usize;
    spec.train.micro_batch = 1;
    spec.train.total_steps = 1_000_000_000;
    spec.train.eval_interval = 0;
    spec.train.checksum_interval = 0;
    spec.checkpoint.dir = dir.join("checkpoints");
    spec.checkpoint.interval = 0;
    spec.validate()?;
    Ok(spec)
}

/// Starts a coordinator for `workers` simulated workers, measures it for `secs` seconds of steps at `steps_per_sec`,
/// and stops it. On failure the coordinator's directory (spec, log, state) is kept and named in the error.
pub async fn measure(workers: u32, steps_per_sec: f64, secs: f64) -> Result<Row> {
    let opts = Options {
        workers: vec![workers],
        steps_per_sec,
        secs,
    };
    opts.check()?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("lockstep-bench-coordinator-{workers}-"))
        .tempdir()
        .map_err(|source| Error::Io {
            context: format!("create a directory under {}", std::env::temp_dir().display()),
            source,
        })?;
    let spec = spec_for(workers, dir.path())?;
    let config = dir.path().join("run.toml");
    let text = toml::to_string(&spec).map_err(|e| Error::Usage(format!("cannot write the run spec as TOML: {e}")))?;
    std::fs::write(&config, text).map_err(|source| Error::Io {
        context: format!("write {}", config.display()),
        source,
    })?;
    let log = dir.path().join("coordinator.log");
    let started = procs::spawn_coordinator(&config, &log, &[], START_TIMEOUT, &RunToken::generate()).await;
    let mut coordinator = match started {
        Ok(c) => c,
        Err(e) => {
            let _ = dir.keep();
            return Err(e);
        }
    };
    // One sequence per rank per step.
    let tokens = spec.train.seq_len as u64;
    let measured = drive(&coordinator, &opts, tokens).await;
    procs::terminate(&mut coordinator.child, STOP_GRACE).await;
    measured.map_err(|e| {
        let kept = dir.keep();
        Error::Process {
            process: format!("lockstep bench coordinator with {workers} workers"),
            message: format!(
                "{}; the coordinator's spec, log and state are kept in {}",
                lockstep_common::error::one_line(&e),
                kept.display()
            ),
        }
    })
}

/// Joins the simulated workers, runs the window, and reads the figures. Every session is closed on return.
/// `tokens`: what each rank reports having trained per step.
async fn drive(coordinator: &procs::CoordinatorProcess, opts: &Options, tokens: u64) -> Result<Row> {
    let url = coordinator.url();
    let n = opts.workers[0];
    let pid = coordinator.child.id().ok_or_else(|| Error::Process {
        process: "lockstep-coordinator".into(),
        message: "exited before the workers joined".into(),
    })?;
    let security = ClientSecurity::new(coordinator.token.clone());

    let mut joining = JoinSet::new();
    for i in 0..n {
        joining.spawn(join(url.clone(), security.clone(), format!("bench-{i}")));
    }
    let mut sessions = Vec::with_capacity(n as usize);
    while let Some(joined) = joining.join_next().await {
        match joined {
            Ok(Ok(session)) => sessions.push(session),
            Ok(Err(e)) => {
                joining.abort_all();
                return Err(e);
            }
            Err(e) => {
                joining.abort_all();
                return Err(Error::Usage(format!("a simulated worker's task failed: {e}")));
            }
        }
    }
    let ranks: BTreeSet<u32> = sessions.iter().map(|s| s.rank).collect();
    let generations: BTreeSet<u64> = sessions.iter().map(|s| s.generation).collect();
    if generations.len() > 1 {
        return Err(Error::Usage(format!(
            "the simulated workers were assigned different generations {generations:?}; expected one"
        )));
    }
    let generation = generations.first().copied().unwrap_or(0);
    let join_ms: Vec<f64> = sessions.iter().map(|s| s.join_ms).collect();
    let reconnects: u32 = sessions.iter().map(|s| s.reconnects).sum();

    let mut status = transport::connect(&url, &security, CONNECT_TIMEOUT).await?;
    let steps = opts.steps();
    let period = Duration::from_secs_f64(1.0 / opts.steps_per_sec);
    let start = Instant::now() + START_MARGIN;
    let end = start + period.mul_f64(steps as f64);
    let mut reporting = JoinSet::new();
    for session in sessions {
        let plan = Plan {
            start,
            period,
            steps,
            tokens,
        };
        reporting.spawn(report_steps(session, plan));
    }
    tokio::time::sleep_until(start).await;
    let cpu_start = cpu_ticks(pid)?;
    let own_start = cpu_ticks(std::process::id())?;
    let status_ms = poll_status(&mut status, end, &url).await?;
    let mut finished = Vec::with_capacity(n as usize);
    while let Some(done) = reporting.join_next().await {
        finished.push(done.map_err(|e| Error::Usage(format!("a simulated worker's task failed: {e}")))?);
    }
    let last = call_status(&mut status, &url).await?;
    let cpu_end = cpu_ticks(pid)?;
    let own_end = cpu_ticks(std::process::id())?;
    let window = start.elapsed().as_secs_f64();
    let (rss_bytes, hwm_bytes) = memory(pid)?;

    let sent_step = finished.iter().map(|f| f.last_step).min().unwrap_or(0);
    let reports: u64 = finished.iter().map(|f| f.reports).sum();
    let interrupted = finished.iter().filter(|f| f.interrupted.is_some()).count();
    let interruption = finished.iter().find_map(|f| f.interrupted.clone());
    // The sessions stay open until the final status and memory were read, so they saw every member in the run.
    drop(finished);
    let sorted_status = sorted(status_ms);
    let sorted_join = sorted(join_ms);
    Ok(Row {
        workers: n,
        assigned: u32::try_from(ranks.len()).unwrap_or(u32::MAX),
        generation,
        secs: window,
        target_step: steps,
        sent_step,
        coordinator_step: last.step,
        lag_steps: sent_step.saturating_sub(last.step),
        reports_per_sec: reports as f64 / period.mul_f64(steps as f64).as_secs_f64(),
        interrupted: u32::try_from(interrupted).unwrap_or(u32::MAX),
        interruption,
        status_calls: u32::try_from(sorted_status.len()).unwrap_or(u32::MAX),
        status_p50_ms: percentile(&sorted_status, 50.0),
        status_p99_ms: percentile(&sorted_status, 99.0),
        status_max_ms: sorted_status.last().copied().unwrap_or(0.0),
        join_p50_ms: percentile(&sorted_join, 50.0),
        join_p99_ms: percentile(&sorted_join, 99.0),
        reconnects,
        cpu_percent: 100.0 * (cpu_end.saturating_sub(cpu_start)) as f64 / USER_HZ / window,
        bench_cpu_percent: 100.0 * (own_end.saturating_sub(own_start)) as f64 / USER_HZ / window,
        rss_bytes,
        hwm_bytes,
    })
}

type Outbound = mpsc::UnboundedSender<WorkerMessage>;
type Inbound = tonic::Streaming<CoordinatorMessage>;

/// One simulated worker's open session, after its assignment.
struct Session {
    id: String,
    up: Outbound,
    down: Inbound,
    generation: u64,
    rank: u32,
    join_ms: f64,
    /// Connections that failed before this one got its Welcome.
    reconnects: u32,
}

fn up(msg: Up) -> WorkerMessage {
    WorkerMessage { msg: Some(msg) }
}

/// The next command on a session, or why there is none.
async fn next_down(down: &mut Inbound) -> std::result::Result<Down, String> {
    match down.next().await {
        Some(Ok(CoordinatorMessage { msg: Some(msg) })) => Ok(msg),
        Some(Ok(CoordinatorMessage { msg: None })) => Err("the coordinator sent an empty message".into()),
        Some(Err(status)) => Err(format!(
            "the session failed: {} ({:?})",
            status.message(),
            status.code()
        )),
        None => Err("the coordinator ended the session".into()),
    }
}

fn name(down: &Down) -> String {
    match down {
        Down::Welcome(_) => "Welcome".into(),
        Down::Assignment(_) => "Assignment".into(),
        Down::Abort(a) => format!("Abort ({})", a.reason),
        Down::Stop(s) => format!("Stop ({})", s.reason),
        Down::Reject(r) => format!("Reject ({})", r.reason),
        Down::Drain(d) => format!("Drain ({})", d.reason),
        Down::Committed(c) => format!("CheckpointCommitted ({})", c.step),
    }
}

/// Why one attempt to join got no `Welcome`.
enum Attempt {
    /// The connection failed (as it can when hundreds connect at once and the coordinator's accept queue
    /// overflows); a real worker reconnects.
    Transport(String),
    /// The coordinator answered, and not with `Welcome`.
    Refused(String),
}

fn transport_failure(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unknown | tonic::Code::Unavailable)
}

/// Connects, sends `Join` and waits for `Welcome`. `sent` is set when the first `Join` of all attempts goes out.
async fn welcome(
    url: &str,
    security: &ClientSecurity,
    id: &str,
    sent: &mut Option<Instant>,
) -> std::result::Result<(Outbound, Inbound), Attempt> {
    let mut client = transport::connect(url, security, CONNECT_TIMEOUT)
        .await
        .map_err(|e| Attempt::Transport(e.to_string()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(up(Up::Join(proto::Join {
        protocol_version: PROTOCOL_VERSION,
        worker_id: id.to_string(),
        host: "bench".into(),
        device: "cpu".into(),
        ring_addr: RING_ADDR.into(),
        ..Default::default()
    })))
    .map_err(|_| Attempt::Transport("the session's sender closed before Join".into()))?;
    sent.get_or_insert_with(Instant::now);
    let mut down = match client.session(UnboundedReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(s) => {
            let why = format!("the Session call failed: {}", lockstep_common::error::one_line(&s));
            return Err(if transport_failure(&s) {
                Attempt::Transport(why)
            } else {
                Attempt::Refused(why)
            });
        }
    };
    let first = match tokio::time::timeout(WELCOME_TIMEOUT, down.next()).await {
        Err(_) => {
            return Err(Attempt::Refused(format!(
                "no Welcome within {WELCOME_TIMEOUT:?} of Join"
            )));
        }
        Ok(Some(Err(s))) if transport_failure(&s) => {
            return Err(Attempt::Transport(format!(
                "the session failed before Welcome: {}",
                lockstep_common::error::one_line(&s)
            )));
        }
        Ok(Some(Ok(CoordinatorMessage { msg: Some(msg) }))) => msg,
        Ok(Some(Ok(CoordinatorMessage { msg: None }))) => {
            return Err(Attempt::Refused("the coordinator sent an empty message".into()));
        }
        Ok(Some(Err(s))) => return Err(Attempt::Refused(format!("the session failed: {}", s.message()))),
        Ok(None) => {
            return Err(Attempt::Refused(
                "the coordinator ended the session before Welcome".into(),
            ));
        }
    };
    match first {
        Down::Welcome(_) => Ok((tx, down)),
        Down::Reject(r) => Err(Attempt::Refused(format!("join rejected: {}", r.reason))),
        other => Err(Attempt::Refused(format!("expected Welcome, got {}", name(&other)))),
    }
}

/// Joins as `id` (reconnecting after a failed connection, up to [`JOIN_ATTEMPTS`] in all) and waits for the
/// assignment. The Join→Welcome time runs from the first `Join` sent, so reconnecting counts against it.
async fn join(url: String, security: ClientSecurity, id: String) -> Result<Session> {
    let refused = |message: String| Error::Coordinator {
        addr: url.clone(),
        message: format!("simulated worker {id}: {message}"),
    };
    let mut sent = None;
    let mut attempts = 0;
    let (tx, mut down) = loop {
        attempts += 1;
        match welcome(&url, &security, &id, &mut sent).await {
            Ok(open) => break open,
            Err(Attempt::Transport(why)) if attempts < JOIN_ATTEMPTS => {
                tracing::debug!(worker = %id, attempts, %why, "reconnecting");
                tokio::time::sleep(RECONNECT_DELAY * attempts).await;
            }
            Err(Attempt::Transport(why)) => return Err(refused(format!("{why} (after {attempts} attempts)"))),
            Err(Attempt::Refused(why)) => return Err(refused(why)),
        }
    };
    let join_ms = sent.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    // Waiting members must heartbeat too, or the coordinator drops them before the last one has joined.
    let mut beats = tokio::time::interval_at(Instant::now() + HEARTBEAT_PERIOD, HEARTBEAT_PERIOD);
    beats.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let assigned = tokio::time::timeout(ASSIGNMENT_TIMEOUT, async {
        loop {
            tokio::select! {
                _ = beats.tick() => {
                    tx.send(up(Up::Heartbeat(proto::Heartbeat { step: 0 })))
                        .map_err(|_| "the session closed while waiting for the Assignment".to_string())?;
                }
                down = next_down(&mut down) => match down? {
                    Down::Assignment(a) => return Ok(a),
                    Down::Welcome(_) => {}
                    other => return Err(format!("expected an Assignment, got {}", name(&other))),
                },
            }
        }
    })
    .await
    .map_err(|_| refused(format!("no Assignment within {ASSIGNMENT_TIMEOUT:?} of Welcome")))?
    .map_err(&refused)?;
    Ok(Session {
        id,
        up: tx,
        down,
        generation: assigned.generation,
        rank: assigned.rank,
        join_ms,
        reconnects: attempts - 1,
    })
}

/// When and what a simulated worker reports.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// When step 1 is due; step k is due at `start + (k − 1) × period`.
    start: Instant,
    period: Duration,
    steps: u64,
    tokens: u64,
}

/// A simulated worker after its window; its session is still open.
struct Reported {
    /// Held, not read: dropping it would end the session before the final status.
    _session: Session,
    last_step: u64,
    reports: u64,
    interrupted: Option<String>,
}

/// Reports steps 1..=`plan.steps` on schedule and a heartbeat every second, as a training rank does, until the
/// last step or until the coordinator interrupts the generation.
async fn report_steps(mut session: Session, plan: Plan) -> Reported {
    let mut steps = tokio::time::interval_at(plan.start, plan.period);
    // Catch up when this process falls behind, so the offered load stays the one asked for.
    steps.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut beats = tokio::time::interval_at(plan.start + HEARTBEAT_PERIOD, HEARTBEAT_PERIOD);
    beats.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let step_ms = plan.period.as_secs_f64() * 1e3;
    let (mut step, mut reports, mut interrupted) = (0u64, 0u64, None);
    while step < plan.steps && interrupted.is_none() {
        let msg = tokio::select! {
            _ = steps.tick() => {
                step += 1;
                reports += 1;
                up(Up::Step(step_report(&session, step, plan.tokens, step_ms)))
            }
            _ = beats.tick() => up(Up::Heartbeat(proto::Heartbeat { step })),
            down = next_down(&mut session.down) => {
                match down {
                    Ok(Down::Abort(_) | Down::Stop(_) | Down::Drain(_) | Down::Reject(_)) | Err(_) => {
                        let what = down.map_or_else(|e| e, |d| format!("got {}", name(&d)));
                        interrupted = Some(format!("{} at step {step}: {what}", session.id));
                    }
                    Ok(Down::Welcome(_) | Down::Assignment(_) | Down::Committed(_)) => {}
                }
                continue;
            }
        };
        if session.up.send(msg).is_err() {
            interrupted = Some(format!("{}: the session closed at step {step}", session.id));
        }
    }
    Reported {
        _session: session,
        last_step: step,
        reports,
        interrupted,
    }
}

/// Plausible figures of a small model's step; every rank reports the same reduced loss.
fn step_report(session: &Session, step: u64, tokens: u64, step_ms: f64) -> proto::StepReport {
    let loss = 0.5 + 3.0 * (-(step as f64) / 500.0).exp();
    proto::StepReport {
        generation: session.generation,
        rank: session.rank,
        step,
        loss,
        tokens,
        lr: 1e-3,
        grad_norm: 1.0,
        step_ms,
        forward_ms: 0.25 * step_ms,
        backward_ms: 0.6 * step_ms,
        allreduce_ms: 0.1 * step_ms,
        optimizer_ms: 0.05 * step_ms,
        param_checksum: String::new(),
        skipped: false,
    }
}

async fn call_status(client: &mut CoordinatorClient, url: &str) -> Result<proto::RunStatus> {
    let failed = |message: String| Error::Coordinator {
        addr: url.to_string(),
        message,
    };
    tokio::time::timeout(STATUS_CALL_TIMEOUT, client.get_status(GetStatusRequest {}))
        .await
        .map_err(|_| failed(format!("GetStatus took over {STATUS_CALL_TIMEOUT:?}")))?
        .map(tonic::Response::into_inner)
        .map_err(|s| failed(format!("GetStatus failed: {} ({:?})", s.message(), s.code())))
}

/// Times one `GetStatus` every [`STATUS_PERIOD`] (or right after the previous one, when slower) until `end`; ms.
async fn poll_status(client: &mut CoordinatorClient, end: Instant, url: &str) -> Result<Vec<f64>> {
    let mut tick = tokio::time::interval(STATUS_PERIOD);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut ms = Vec::new();
    loop {
        tick.tick().await;
        let sent = Instant::now();
        if sent >= end {
            return Ok(ms);
        }
        call_status(client, url).await?;
        ms.push(sent.elapsed().as_secs_f64() * 1e3);
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Nearest-rank percentile `p` of ascending `sorted`; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn read_proc(pid: u32, file: &str) -> Result<String> {
    let path = format!("/proc/{pid}/{file}");
    std::fs::read_to_string(&path).map_err(|source| Error::Io {
        context: format!("read {path} (the coordinator's CPU and memory come from Linux's /proc)"),
        source,
    })
}

/// The process's user + system CPU time so far, in clock ticks (`utime` + `stime` of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = read_proc(pid, "stat")?;
    parse_cpu_ticks(&stat).ok_or_else(|| Error::Process {
        process: "lockstep-coordinator".into(),
        message: format!("/proc/{pid}/stat has no utime and stime fields: {stat:?}"),
    })
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses; the fields after its last ')' start at field 3.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS and VmHWM of /proc/PID/status, in bytes.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = read_proc(pid, "status")?;
    let field = |key: &str| {
        parse_kib(&status, key).ok_or_else(|| Error::Process {
            process: "lockstep-coordinator".into(),
            message: format!("/proc/{pid}/status has no {key} line"),
        })
    };
    Ok((field("VmRSS")?, field("VmHWM")?))
}

fn parse_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(workers: u32, p99: f64, lag: u64, interrupted: u32) -> Row {
        Row {
            workers,
            assigned: workers,
            generation: 1,
            secs: 20.0,
            target_step: 200,
            sent_step: 200,
            coordinator_step: 200 - lag,
            lag_steps: lag,
            reports_per_sec: 10.0 * f64::from(workers),
            interrupted,
            interruption: None,
            status_calls: 400,
            status_p50_ms: 1.0,
            status_p99_ms: p99,
            status_max_ms: p99,
            join_p50_ms: 1.0,
            join_p99_ms: 2.0,
            reconnects: 0,
            cpu_percent: 10.0,
            bench_cpu_percent: 10.0,
            rss_bytes: 20 << 20,
            hwm_bytes: 21 << 20,
        }
    }

    #[test]
    fn capacity_is_the_largest_count_served() {
        let rows = [
            row(8, 1.0, 0, 0),
            row(32, 49.9, 2, 0),
            row(128, 50.0, 0, 0),
            row(256, 10.0, 3, 0),
            row(512, 10.0, 0, 1),
        ];
        assert_eq!(capacity(&rows), Some(32));
        assert_eq!(capacity(&rows[2..]), None);
        assert!(rows[4].table_row().ends_with("no (1 interrupted)"));
        assert!(rows[0].table_row().ends_with("yes"));
        assert_eq!(
            table_header().split_whitespace().count(),
            rows[0].table_row().split_whitespace().count()
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 100.0);
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&v, 100.0), 200.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn proc_fields_are_parsed() {
        let stat = "4242 (lockstep (co) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 123 45 0 0 20 0 9 0 100 1 2";
        assert_eq!(parse_cpu_ticks(stat), Some(168));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        let status = "Name:\tlockstep\nVmHWM:\t   30000 kB\nVmRSS:\t   25000 kB\n";
        assert_eq!(parse_kib(status, "VmRSS"), Some(25000 * 1024));
        assert_eq!(parse_kib(status, "VmHWM"), Some(30000 * 1024));
        assert_eq!(parse_kib(status, "VmSwap"), None);
    }

    #[test]
    fn the_spec_has_exactly_n_ranks_and_writes_no_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_for(512, dir.path()).unwrap();
        assert_eq!((spec.cluster.min_workers, spec.cluster.max_workers), (512, 512));
        assert!(spec.train.global_batch >= 512);
        assert_eq!(spec.cluster.heartbeat_interval_secs, 1);
        assert_eq!(spec.checkpoint.interval, 0);
        assert!(spec.cluster.state_dir.starts_with(dir.path()) && spec.checkpoint.dir.starts_with(dir.path()));
    }

    #[test]
    fn bad_options_name_the_flag() {
        let opts = |workers: Vec<u32>, steps_per_sec: f64, secs: f64| Options {
            workers,
            steps_per_sec,
            secs,
        };
        let err = |o: Options| o.check().unwrap_err().to_string();
        assert!(err(opts(vec![8, 0], 10.0, 1.0)).contains("--workers"));
        assert!(err(opts(vec![], 10.0, 1.0)).contains("--workers"));
        assert!(err(opts(vec![8], 0.0, 1.0)).contains("--steps-per-sec"));
        assert!(err(opts(vec![8], 10.0, 0.01)).contains("--secs"));
        assert!(opts(vec![8], 10.0, 1.0).check().is_ok());
    }
}
