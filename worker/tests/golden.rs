//! Golden tests against Hugging Face `transformers` (fixtures/hf-gpt2-tiny, see its README.md): the same
//! checkpoint must give the same logits, loss, gradients, AdamW step and greedy tokens as the reference.
//!
//! On the CPU by default; `LOCKSTEP_TEST_DEVICE=cuda:0` runs them on a GPU (a build with the `cuda` feature;
//! scripts/gpu-check.sh). The expected values are always read on the CPU.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lockstep_worker::checkpoint::load_hf;
use lockstep_worker::generate::greedy;
use lockstep_worker::model::{Gpt, cross_entropy_sum};
use lockstep_worker::optim::{AdamW, AdamWConfig};
use lockstep_worker::params::Params;

/// The crate directory: cargo sets it at run time too; a test binary copied to a GPU host gets it from the script.
fn fixture_dir() -> PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(crate_dir).join("tests/fixtures/hf-gpt2-tiny")
}

/// The device under test, one for the whole process (tensors of two CUDA devices do not mix).
fn device() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let flag = std::env::var("LOCKSTEP_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
            lockstep_worker::device::parse(&flag).unwrap().0
        })
        .clone()
}

fn expected_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap()).unwrap()
}

fn load_tensors(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join(file), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

struct Loaded {
    gpt: Gpt,
    params: Params,
}

fn load_model() -> Loaded {
    let (cfg, vm) = load_hf(&fixture_dir(), &device()).unwrap();
    let gpt = Gpt::new(VarBuilder::from_varmap(&vm, DType::F32, &device()), &cfg).unwrap();
    Loaded {
        gpt,
        params: Params::from_varmap(&vm).unwrap(),
    }
}

/// Input ids [2, 16] as u32 (the fixture stores torch's i64).
fn input_ids() -> Tensor {
    load_tensors("expected_forward.safetensors")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_device(&device())
        .unwrap()
}

/// HF's causal-LM loss: positions 0..T-2 predict 1..T-1, mean over B*(T-1).
fn hf_loss(logits: &Tensor, ids: &Tensor) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    let sum = cross_entropy_sum(&logits.narrow(1, 0, t - 1).unwrap(), &ids.narrow(1, 1, t - 1).unwrap()).unwrap();
    (sum / (b * (t - 1)) as f64).unwrap()
}

#[test]
fn logits_match_hugging_face() {
    let m = load_model();
    let logits = m.gpt.forward(&input_ids(), None).unwrap();
    let want = &load_tensors("expected_forward.safetensors")["logits"];
    assert_eq!(logits.dims(), want.dims());
    let max_diff = values(&logits)
        .iter()
        .zip(values(want))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "max |logit diff| = {max_diff}");
}

#[test]
fn loss_and_every_gradient_match_hugging_face() {
    let m = load_model();
    let ids = input_ids();
    let loss = hf_loss(&m.gpt.forward(&ids, None).unwrap(), &ids);
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    let want = expected_json()["loss"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-4, "loss {got} vs {want}");

    let grads = loss.backward().unwrap();
    let expected = load_tensors("expected_grads.safetensors");
    assert_eq!(
        expected.len(),
        m.params.len(),
        "the fixture has one gradient per parameter"
    );
    for (name, var) in m.params.names().iter().zip(m.params.vars()) {
        let g = values(
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient")),
        );
        let w = values(&expected[name]);
        assert_eq!(g.len(), w.len(), "{name}");
        let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
        let max_diff = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(
            max_diff <= 1e-4 * scale,
            "{name}: max diff {max_diff} vs max |g| {scale}"
        );
    }
}

#[test]
fn one_adamw_step_matches_torch() {
    let m = load_model();
    let expected_grads = load_tensors("expected_grads.safetensors");
    let grads: Vec<Tensor> = m
        .params
        .names()
        .iter()
        .map(|n| expected_grads[n].to_device(&device()).unwrap())
        .collect();
    let adamw = &expected_json()["adamw"];
    let cfg = AdamWConfig {
        beta1: adamw["betas"][0].as_f64().unwrap(),
        beta2: adamw["betas"][1].as_f64().unwrap(),
        eps: adamw["eps"].as_f64().unwrap(),
        weight_decay: adamw["weight_decay_on_dims_ge_2"].as_f64().unwrap(),
    };
    assert_eq!(adamw["weight_decay_other"].as_f64(), Some(0.0));
    let mut opt = AdamW::new(&m.params, cfg).unwrap();
    opt.step(&m.params, &grads, adamw["lr"].as_f64().unwrap()).unwrap();
    let after = load_tensors("expected_after_adamw_step.safetensors");
    for (name, var) in m.params.names().iter().zip(m.params.vars()) {
        let got = values(var.as_tensor());
        let want = values(&after[name]);
        let max_diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff <= 1e-6, "{name}: max diff {max_diff}");
    }
}

/// The fixture's `greedy_output` was produced by the reference model AFTER its AdamW step (its README says
/// "the model", but from the model of `model.safetensors` HF's own `expected_forward` logits pick token 52 after
/// the prompt, not the 32 in `greedy_output`). So: decode from the post-step parameters and require the exact
/// tokens, and from the pre-step parameters require the argmax of HF's own logits.
#[test]
fn greedy_generation_matches_hugging_face() {
    let m = load_model();
    let exp = expected_json();
    let as_ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let prompt = as_ids(&exp["greedy_prompt"]);
    let full = as_ids(&exp["greedy_output"]);

    // Pre-step: the prompt is the start of input_ids row 0, so HF's logits at its last position give the token.
    let ids = values(&input_ids());
    assert_eq!(
        ids[..prompt.len()].iter().map(|&x| x as u32).collect::<Vec<_>>(),
        prompt
    );
    let hf_logits = &load_tensors("expected_forward.safetensors")["logits"];
    let row = values(
        &hf_logits
            .narrow(0, 0, 1)
            .unwrap()
            .narrow(1, prompt.len() - 1, 1)
            .unwrap(),
    );
    let hf_next = (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as u32;
    assert_eq!(greedy(&m.gpt, &prompt, 1, None, &device()).unwrap(), [hf_next]);

    let after = load_tensors("expected_after_adamw_step.safetensors");
    for (name, var) in m.params.names().iter().zip(m.params.vars()) {
        var.set(&after[name].to_device(&device()).unwrap()).unwrap();
    }
    let new = greedy(&m.gpt, &prompt, full.len() - prompt.len(), None, &device()).unwrap();
    assert_eq!(new, full[prompt.len()..]);
}
