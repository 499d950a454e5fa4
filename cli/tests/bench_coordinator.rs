//! `lockstep bench coordinator` against a real `lockstep-coordinator` process (built next to the test binary:
//! `cargo build -p lockstep-coordinator`, or `cargo test --workspace`). Asserts the shape of what is measured, never
//! how fast it is.
use lockstep_cli::bench_coordinator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_simulated_workers_are_served_and_measured() {
    let row = bench_coordinator::measure(4, 10.0, 3.0).await.unwrap();
    assert_eq!((row.workers, row.assigned), (4, 4), "{row:?}");
    assert_eq!(row.interrupted, 0, "{row:?}");
    // Every worker sent every scheduled step, and the coordinator counted steps that all ranks reported.
    assert_eq!((row.target_step, row.sent_step), (30, 30), "{row:?}");
    assert!(
        row.coordinator_step >= 1 && row.coordinator_step <= row.sent_step,
        "{row:?}"
    );
    assert_eq!(row.lag_steps, row.sent_step - row.coordinator_step);
    assert!(row.reports_per_sec > 0.0, "{row:?}");
    assert!(row.status_calls > 0, "{row:?}");
    assert!(
        row.status_p50_ms > 0.0 && row.status_p50_ms <= row.status_p99_ms,
        "{row:?}"
    );
    assert!(row.status_p99_ms <= row.status_max_ms, "{row:?}");
    assert!(row.join_p50_ms > 0.0 && row.join_p50_ms <= row.join_p99_ms, "{row:?}");
    assert_eq!(row.reconnects, 0, "{row:?}");
    assert!(
        row.cpu_percent >= 0.0 && row.bench_cpu_percent >= 0.0 && row.secs > 0.0,
        "{row:?}"
    );
    assert!(row.rss_bytes > 0 && row.hwm_bytes >= row.rss_bytes, "{row:?}");
}

#[tokio::test]
async fn bad_flags_are_refused_before_anything_starts() {
    let opts = bench_coordinator::Options {
        workers: vec![0],
        steps_per_sec: 10.0,
        secs: 1.0,
    };
    let err = bench_coordinator::command(&opts, true).await.unwrap_err().to_string();
    assert!(err.contains("--workers"), "{err}");
}
