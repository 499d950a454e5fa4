//! `lockstep bench train --profile`: the real binary on the tiny preset, on the CPU.
use std::process::Command;

use serde_json::Value;

/// Every category the profile reports, in its order (the JSON's contract).
const CATEGORIES: [&str; 12] = [
    "matmul",
    "attention",
    "normalisation",
    "activation",
    "residual",
    "embedding",
    "loss",
    "casts",
    "dropout",
    "copies",
    "all_reduce",
    "optimizer",
];

fn lockstep(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .output()
        .unwrap()
}

/// tiny: 2 layers, 4 heads, 64 dims, 65 characters; 2 sequences of 16 tokens, one micro-batch per step.
const TINY: [&str; 13] = [
    "bench",
    "train",
    "--profile",
    "--preset",
    "tiny",
    "--seq-len",
    "16",
    "--micro-batch",
    "2",
    "--steps",
    "3",
    "--warmup",
    "1",
];

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

#[test]
fn json_profile_has_every_category_the_sum_and_the_step() {
    let out = lockstep(&[&TINY[..], &["--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();

    let categories: Vec<&str> = p["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["category"].as_str().unwrap())
        .collect();
    assert_eq!(categories, CATEGORIES);
    let parts = p["parts"].as_array().unwrap();
    for c in CATEGORIES.iter().filter(|&&c| c != "dropout") {
        assert!(parts.iter().any(|x| x["category"] == *c), "no part of category {c}");
    }

    for x in parts {
        for key in ["count", "call_ms", "ms_per_step"] {
            assert!(num(x, key) >= 0.0, "{key} of {x}");
        }
        for key in ["forward_ms", "backward_ms"] {
            assert!(x[key].is_null() || num(x, key) >= 0.0, "{key} of {x}");
        }
        assert!((num(x, "ms_per_step") - num(x, "count") * num(x, "call_ms")).abs() <= 1e-9);
    }
    for c in p["categories"].as_array().unwrap() {
        assert!(num(c, "ms_per_step") >= 0.0, "{c}");
    }
    let step = &p["step"];
    for key in ["step_ms", "forward_ms", "backward_ms", "allreduce_ms", "optimizer_ms"] {
        assert!(num(step, key) >= 0.0, "step {key}");
    }
    assert!(num(step, "step_ms") > 0.0);
    let sum: f64 = parts.iter().map(|x| num(x, "ms_per_step")).sum();
    let parts_ms = num(&p, "parts_ms");
    assert!(parts_ms > 0.0 && (parts_ms - sum).abs() <= 1e-9 * sum.max(1.0));
    let phases = num(&p, "parts_forward_ms") + num(&p, "parts_backward_ms") + num(&p, "parts_other_ms");
    assert!(
        (phases - parts_ms).abs() <= 1e-9 * parts_ms.max(1.0),
        "{phases} vs {parts_ms}"
    );
    let unaccounted = num(&p, "unaccounted_ms");
    assert!((unaccounted - (num(step, "step_ms") - parts_ms)).abs() <= 1e-9 * parts_ms.max(1.0));
    assert!(p["note"].as_str().unwrap().contains("alone"));

    // The matmuls' flops, by hand: mlp.c_fc is [B·T, C]·[C, 4C] = [32×64]·[64×256], once per layer; forward
    // 2·32·64·256 = 1,048,576 flops, backward twice that (the input's and the weight's gradients).
    let fc = parts
        .iter()
        .find(|x| x["name"].as_str().unwrap().starts_with("mlp.c_fc"))
        .unwrap();
    assert_eq!(fc["shape"], "[32×64]·[64×256]");
    assert_eq!(num(fc, "count"), 2.0);
    assert_eq!(num(fc, "flops_forward"), 1_048_576.0);
    assert_eq!(num(fc, "flops_backward"), 2_097_152.0);
    // The tied LM head: [32×64]·[64×65], 2·32·64·65 = 266,240.
    let head = parts
        .iter()
        .find(|x| x["name"].as_str().unwrap().starts_with("lm_head"))
        .unwrap();
    assert_eq!(num(head, "flops_forward"), 266_240.0);
    assert!(
        parts
            .iter()
            .filter(|x| x["category"] == "matmul")
            .all(|x| x["tflops"].is_null() || num(x, "tflops") >= 0.0)
    );
    assert_eq!(
        (
            p["model"]["n_layer"].as_u64(),
            p["dtype"].as_str(),
            p["device"].as_str()
        ),
        (Some(2), Some("f32"), Some("cpu"))
    );
}

#[test]
fn the_table_names_every_category_and_the_unaccounted_rest() {
    let out = lockstep(&[&TINY[..], &["--peak-tflops", "2"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("share of a 2.0 TFLOP/s peak"), "{table}");
    for c in CATEGORIES {
        assert!(table.lines().any(|l| l.starts_with(c)), "{c} missing:\n{table}");
    }
    for line in [
        "sum of the parts",
        "step (Trainer::train_step",
        "unaccounted (step - sum)",
        "TFLOP/s",
    ] {
        assert!(table.contains(line), "{line} missing:\n{table}");
    }
    assert!(table.contains("timed alone"), "{table}");
}

#[test]
fn profile_flags_are_checked() {
    let out = lockstep(&["bench", "train", "--json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--profile"));
    let out = lockstep(&[&TINY[..], &["--workers", "2"]].concat());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--workers") && stderr.contains("--profile"), "{stderr}");
}
