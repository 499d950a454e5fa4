//! Whether a `Join` may enter the run, and if not, the reason the worker is told. Pure checks over the request and
//! a view of the run; the state machine decides what to do with the answer.
use lockstep_common::{PROTOCOL_VERSION, RunSpec, proto};

/// What admission needs to know about the run.
pub struct RunView<'a> {
    pub spec: &'a RunSpec,
    /// `None` while waiting for members; otherwise why joining is closed.
    pub closed: Option<String>,
    /// Workers counted against `cluster.max_workers`.
    pub workers: usize,
    /// The worker ids of sessions still connected, with their hosts.
    pub connected: Vec<(&'a str, &'a str)>,
}

/// The name a worker goes by in logs, status and messages.
pub fn worker_name(join: &proto::Join, fallback: impl std::fmt::Display) -> String {
    if join.worker_id.is_empty() {
        format!("{}#{fallback}", join.host)
    } else {
        join.worker_id.clone()
    }
}

/// `None` if `join` is admitted, else the reason to reject it. The checks run in a fixed order, so a worker that
/// is wrong in several ways hears about its most fundamental problem first.
pub fn refusal(join: &proto::Join, id: &str, run: &RunView<'_>) -> Option<String> {
    let who = format!("worker {id} ({})", join.host);
    if join.protocol_version != PROTOCOL_VERSION {
        return Some(format!(
            "{who} speaks protocol version {} but this coordinator speaks {PROTOCOL_VERSION}; run the same lockstep version on both",
            join.protocol_version
        ));
    }
    if !join.spec_json.is_empty() {
        let theirs = match RunSpec::from_json(&join.spec_json) {
            Ok(spec) => spec,
            Err(e) => {
                return Some(format!(
                    "{who} sent a run spec that cannot be read ({e}); start it with the coordinator's config or none"
                ));
            }
        };
        let diff = theirs.training_diff(run.spec);
        if !diff.is_empty() {
            return Some(format!(
                "{who} was started with a run spec that conflicts with the coordinator's (worker vs coordinator): {}; \
                 start it with the coordinator's config or none",
                diff.join("; ")
            ));
        }
    }
    if let Some(closed) = &run.closed {
        return Some(closed.clone());
    }
    let max = run.spec.cluster.max_workers as usize;
    if run.workers >= max {
        return Some(format!(
            "{who} refused: the run already has cluster.max_workers = {max} workers"
        ));
    }
    if let Some((_, host)) = run.connected.iter().find(|(other, _)| *other == id) {
        return Some(format!(
            "{who} refused: a worker with id {id} (host {host}) is already connected; give every worker a unique id"
        ));
    }
    let min = run.spec.cluster.min_workers;
    if join.ring_addr.is_empty() && min > 1 {
        return Some(format!(
            "{who} sent no ring_addr; with cluster.min_workers = {min} every worker needs an address its ring neighbour can reach"
        ));
    }
    None
}
