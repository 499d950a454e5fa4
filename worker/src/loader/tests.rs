use std::collections::HashSet;
use std::path::Path;

use lockstep_common::RunSpec;
use lockstep_common::data::dataset::write_prepared;
use lockstep_common::data::{Tokenizer, tokenizer::TokenizerSpec};
use lockstep_common::spec::DataSource;

use super::*;

const SEQ_LEN: usize = 8;
const GLOBAL: usize = 5;

/// A prepared directory of three training shards whose windows do not divide evenly: (100−1)/8 + (61−1)/8 +
/// (30−1)/8 = 12 + 7 + 3 = 22 windows; 5 per step gives 4 steps per epoch and drops 2.
fn corpus(dir: &Path) -> Arc<Corpus> {
    let ids = |from: u32, n: u32| (from..from + n).map(|i| i % 251).collect::<Vec<u32>>();
    let tokenizer = Tokenizer::train(&TokenizerSpec::Byte, std::iter::empty::<String>()).unwrap();
    write_prepared(
        dir,
        &tokenizer,
        &TokenizerSpec::Byte,
        &[ids(0, 100), ids(1000, 61), ids(2000, 30)],
        &[ids(3000, 50)],
    )
    .unwrap();
    let mut spec = RunSpec::default();
    spec.data.source = DataSource::Prepared;
    spec.data.path = Some(dir.to_path_buf());
    spec.train.seq_len = SEQ_LEN;
    Arc::new(Corpus::load(&spec).unwrap())
}

fn share(rank: u32, world_size: u32) -> Share {
    Share {
        rank,
        world_size,
        global_batch: GLOBAL,
        micro_batch: 2,
    }
}

/// What the ranks consume, step by step and rank by rank: for each `(world_size, from, to)` segment a fresh set of
/// loaders starts at `from` (a resume from the cursor `from × G`) and runs to `to`. Returns the windows and the
/// tokens (each sequence's inputs, then its targets) in consumption order.
fn consume(corpus: &Arc<Corpus>, plan: DataPlan, segments: &[(u32, u64, u64)]) -> (Vec<u64>, Vec<u32>) {
    let (mut windows, mut tokens) = (Vec::new(), Vec::new());
    for &(world, from, to) in segments {
        let mut loaders: Vec<Loader> = (0..world)
            .map(|rank| Loader::start(corpus.clone(), plan, share(rank, world), from).unwrap())
            .collect();
        for step in from..to {
            for loader in &mut loaders {
                let batch = loader.take(step).unwrap();
                assert_eq!(batch.step, step);
                for mb in batch.micro {
                    assert_eq!(mb.inputs.len(), mb.windows.len() * SEQ_LEN);
                    assert_eq!(mb.targets.len(), mb.windows.len() * SEQ_LEN);
                    windows.extend(&mb.windows);
                    for (x, y) in mb.inputs.chunks(SEQ_LEN).zip(mb.targets.chunks(SEQ_LEN)) {
                        tokens.extend(x);
                        tokens.extend(y);
                    }
                }
            }
        }
    }
    (windows, tokens)
}

#[test]
fn a_resumed_run_on_another_world_size_consumes_exactly_the_uninterrupted_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let plan = DataPlan::new(1337, corpus.num_windows(Split::Train), GLOBAL as u64).unwrap();
    assert_eq!(
        (plan.num_windows(), plan.steps_per_epoch(), plan.dropped_per_epoch()),
        (22, 4, 2)
    );
    // 11 steps: two whole epochs and three quarters of a third.
    let steps = 11;
    let (windows, tokens) = consume(&corpus, plan, &[(1, 0, steps)]);
    let want: Vec<u64> = (0..steps * GLOBAL as u64).map(|i| plan.window(i)).collect();
    assert_eq!(windows, want);
    // Every epoch reads distinct windows, and epochs are shuffled differently.
    let epochs: Vec<&[u64]> = windows.chunks(plan.sequences_per_epoch() as usize).collect();
    for e in &epochs {
        assert_eq!(e.iter().collect::<HashSet<_>>().len(), e.len());
    }
    assert_ne!(epochs[0], epochs[1]);

    // Stopped at step 6 (in the second epoch) on 2 workers, resumed on 3, on 1, and on 2 again.
    for resumed_world in [3, 1, 2] {
        let got = consume(&corpus, plan, &[(2, 0, 6), (resumed_world, 6, steps)]);
        assert_eq!(got.0, windows, "resumed on {resumed_world}");
        assert_eq!(got.1, tokens, "resumed on {resumed_world}");
    }
    // And the tokens are the windows' own: inputs, then the same shifted by one.
    let mut expected = Vec::new();
    for &w in &windows {
        let (x, y) = corpus.window(Split::Train, w).unwrap();
        assert_eq!(x[1..], y[..SEQ_LEN - 1]);
        expected.extend(x);
        expected.extend(y);
    }
    assert_eq!(tokens, expected);
}

#[test]
fn the_thread_delivers_what_assemble_computes() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let plan = DataPlan::new(7, corpus.num_windows(Split::Train), GLOBAL as u64).unwrap();
    for world in [1, 2, 3] {
        for rank in 0..world {
            let mut loader = Loader::start(corpus.clone(), plan, share(rank, world), 3).unwrap();
            for step in 3..9 {
                let want = assemble(&corpus, &plan, &share(rank, world), step).unwrap();
                let got = loader.take(step).unwrap();
                // Dropout seeds: the micro-batch's place in the global batch.
                let start = rank_share(GLOBAL as u64, world, rank).start;
                assert_eq!(got.micro[0].first, step * GLOBAL as u64 + start);
                assert_eq!(got, want);
            }
        }
    }
}

#[test]
fn errors_in_the_thread_become_errors_of_take_without_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    // A plan over more windows than the data has: some step asks for a window that does not exist.
    let plan = DataPlan::new(3, 220, GLOBAL as u64).unwrap();
    let bad = (0..44)
        .find(|&s| plan.rank_windows(s, 0, 1).iter().any(|&w| w >= 22))
        .unwrap();
    let mut loader = Loader::start(corpus.clone(), plan, share(0, 1), 0).unwrap();
    for step in 0..bad {
        loader.take(step).unwrap();
    }
    let err = loader.take(bad).unwrap_err().to_string();
    assert!(err.contains("window") && err.contains("has 22 windows"), "{err}");
    // The thread is gone: the next step is an error too, not a wait.
    let err = loader.take(bad + 1).unwrap_err().to_string();
    assert!(err.contains("step"), "{err}");

    // Asking for a step out of order is refused, naming both.
    let mut loader = Loader::start(corpus, DataPlan::new(3, 22, 5).unwrap(), share(0, 1), 4).unwrap();
    let err = loader.take(5).unwrap_err().to_string();
    assert!(err.contains("step 5") && err.contains("step 4"), "{err}");
    loader.take(4).unwrap();
}

#[test]
fn dropping_a_loader_with_a_full_channel_stops_its_thread() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let plan = DataPlan::new(1, 22, GLOBAL as u64).unwrap();
    for taken in [0, 1, 5] {
        let mut loader = Loader::start(corpus.clone(), plan, share(0, 1), 0).unwrap();
        for step in 0..taken {
            loader.take(step).unwrap();
        }
        // Returns only once the thread has ended.
        drop(loader);
    }
    // The thread held the only other reference to the corpus.
    assert_eq!(Arc::strong_count(&corpus), 1);
}
