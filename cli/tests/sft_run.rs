//! `lockstep run --config` on a fine-tuning spec (real coordinator and two workers): the run reports the held-out
//! generation metrics it computed while training and answers held-out conversations, and `lockstep chat` takes the
//! checkpoint as a chat model. Needs the `lockstep-coordinator` and `lockstep-worker` binaries next to `lockstep`
//! (`cargo test --workspace` builds them).
use std::io::Write;
use std::process::{Command, Stdio};

/// "reverse: abc" → "cba" conversations over four letters.
fn conversations(n: usize, seed: usize) -> String {
    let letters = ['a', 'b', 'c', 'd'];
    (0..n)
        .map(|i| {
            let word: String = (0..2 + (i + seed) % 4)
                .map(|j| letters[(i * 5 + j * 3 + seed) % 4])
                .collect();
            let reversed: String = word.chars().rev().collect();
            format!(
                "{}\n",
                serde_json::json!({"prompt": format!("reverse: {word}"), "response": reversed})
            )
        })
        .collect()
}

#[test]
fn a_fine_tuning_run_reports_generation_metrics_and_makes_a_chat_model() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("train.jsonl"), conversations(200, 0)).unwrap();
    std::fs::write(root.join("held.jsonl"), conversations(12, 1)).unwrap();
    let spec = format!(
        r#"[run]
name = "sft-run-test"
[data]
source = "sft"
path = "{root}/train.jsonl"
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 24
[train]
seq_len = 24
global_batch = 8
micro_batch = 4
total_steps = 40
warmup_steps = 4
eval_interval = 20
eval_sequences = 8
lr = 3e-3
[sft]
eval_data = "{root}/held.jsonl"
eval_items = 12
max_new_tokens = 8
[checkpoint]
dir = "{root}/ckpt"
[cluster]
state_dir = "{root}/state"
"#,
        root = root.display()
    );
    std::fs::write(root.join("run.toml"), spec).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["run", "--workers", "2", "--no-progress", "--config"])
        .arg(root.join("run.toml"))
        .arg("--out")
        .arg(root.join("out"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "finished 40 steps",
        "generation @ step 40: BLEU",
        "ROUGE-L",
        "held-out examples (greedy):",
        "reference:",
    ] {
        assert!(stdout.contains(want), "{want:?} not in:\n{stdout}");
    }

    let mut chat = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["chat", "--temperature", "0", "--checkpoint"])
        // `lockstep run` puts the checkpoints under --out, whatever the spec's checkpoint.dir says.
        .arg(root.join("out").join("checkpoints"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin.take().unwrap().write_all(b"reverse: abc\n/quit\n").unwrap();
    let out = chat.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("warning"),
        "a fine-tuned checkpoint is a chat model: {stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1, "one reply");
}
