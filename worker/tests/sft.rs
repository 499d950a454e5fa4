//! Supervised fine-tuning through the trainer: the loss counts only the assistant's words (masked prompt tokens add
//! exactly nothing to the loss or any gradient), it is divided by the counted tokens of the whole global batch so
//! any world size trains the same model, weights from a smaller vocabulary grow to hold the chat template's tokens,
//! and generation metrics come out the same on every rank.
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lockstep_common::RunSpec;
use lockstep_common::auth::RunToken;
use lockstep_common::data::chat::ChatTemplate;
use lockstep_common::data::corpus::Split;
use lockstep_common::data::{DataPlan, IGNORE};
use lockstep_common::spec::DataSource;
use lockstep_worker::collective::{Local, Ring, RingConfig, RingListener};
use lockstep_worker::model::cross_entropy_sum;
use lockstep_worker::ops::composed;
use lockstep_worker::trainer::Trainer;

/// "reverse: abc" → "cba" conversations over a few letters, some with a system message, prompts of varied length.
fn write_examples(dir: &Path, name: &str, n: usize) -> PathBuf {
    let letters = ['a', 'b', 'c', 'd', 'e', 'f'];
    let mut lines = String::new();
    for i in 0..n {
        let word: String = (0..2 + i % 5)
            .map(|j| letters[(i * 7 + j * 3) % letters.len()])
            .collect();
        let reversed: String = word.chars().rev().collect();
        let line = if i % 3 == 0 {
            serde_json::json!({"system": "be exact", "prompt": format!("reverse: {word}"), "response": reversed})
        } else {
            serde_json::json!({"prompt": format!("reverse: {word}"), "response": reversed})
        };
        lines.push_str(&format!("{line}\n"));
    }
    let path = dir.join(name);
    std::fs::write(&path, lines).unwrap();
    path
}

fn sft_spec(dir: &Path, examples: usize) -> RunSpec {
    let mut spec = RunSpec::default();
    spec.data.source = DataSource::Sft;
    spec.data.path = Some(write_examples(dir, "sft.jsonl", examples));
    spec.data.val_fraction = 0.2;
    spec.model.n_layer = 2;
    spec.model.n_head = 2;
    spec.model.n_embd = 32;
    spec.model.block_size = 32;
    spec.train.seq_len = 32;
    spec.train.global_batch = 6;
    spec.train.micro_batch = 3;
    spec.train.total_steps = 4;
    spec.train.warmup_steps = 1;
    spec.train.lr = 3e-3;
    spec.train.eval_sequences = 8;
    spec.checkpoint.dir = dir.join("checkpoints");
    spec.validate().unwrap();
    spec
}

fn values(t: &Trainer) -> Vec<f32> {
    let mut out = Vec::new();
    for var in t.params().vars() {
        out.extend(var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

fn wte(t: &Trainer) -> Tensor {
    let p = t.params();
    let i = p.names().iter().position(|n| n == "transformer.wte.weight").unwrap();
    p.vars()[i].as_tensor().clone()
}

/// Inputs and targets `[b, T]` of the first step's global batch.
fn first_batch(t: &Trainer) -> (Tensor, Tensor) {
    let corpus = t.corpus();
    let g = t.spec().train.global_batch as u64;
    let plan = DataPlan::new(t.spec().run.seed, corpus.num_windows(Split::Train), g).unwrap();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for w in plan.rank_windows(0, 0, 1) {
        corpus.extend_window(Split::Train, w, &mut xs, &mut ys).unwrap();
    }
    let tl = corpus.seq_len;
    let b = xs.len() / tl;
    (
        Tensor::from_vec(xs, (b, tl), &Device::Cpu).unwrap(),
        Tensor::from_vec(ys, (b, tl), &Device::Cpu).unwrap(),
    )
}

/// The gradient of `loss` for every parameter, in canonical order.
fn grads(t: &Trainer, loss: &Tensor) -> Vec<Vec<f32>> {
    let g = loss.backward().unwrap();
    t.params()
        .names()
        .iter()
        .zip(t.params().vars())
        .map(|(name, var)| {
            g.get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn masked_prompt_tokens_contribute_exactly_zero_to_the_loss_and_its_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let spec = sft_spec(dir.path(), 30);
    let mut t = Trainer::new(spec, Box::new(Local), Device::Cpu).unwrap();
    let (x, y) = first_batch(&t);
    let targets: Vec<u32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let counted: Vec<u32> = (0..targets.len() as u32)
        .filter(|&i| targets[i as usize] != IGNORE)
        .collect();
    assert!(
        !counted.is_empty() && counted.len() < targets.len() / 2,
        "mostly prompt and padding"
    );

    let logits = t.model().forward(&x, None).unwrap();
    let vocab = logits.dim(2).unwrap();
    let flat = logits.reshape((targets.len(), vocab)).unwrap();

    // The masked loss, as the trainer computes it, against the mean over the response tokens alone.
    let masked = cross_entropy_sum(&logits, &y).unwrap();
    let rows = Tensor::new(counted.as_slice(), &Device::Cpu).unwrap();
    let response_targets: Vec<u32> = counted.iter().map(|&i| targets[i as usize]).collect();
    let only_response = composed::cross_entropy_sum(
        &flat.index_select(&rows, 0).unwrap(),
        &Tensor::new(response_targets.as_slice(), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let (a, b) = (
        masked.to_scalar::<f32>().unwrap(),
        only_response.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5 * b.abs(), "masked {a} vs response-only {b}");
    for (i, (ga, gb)) in grads(&t, &masked).iter().zip(grads(&t, &only_response)).enumerate() {
        for (u, v) in ga.iter().zip(&gb) {
            assert!((u - v).abs() <= 1e-5 + 1e-4 * v.abs(), "parameter {i}: {u} vs {v}");
        }
    }

    // A loss over the masked positions alone is exactly zero, and so is every parameter's gradient.
    let all_masked = Tensor::full(IGNORE, y.shape(), &Device::Cpu).unwrap();
    let zero = cross_entropy_sum(&logits, &all_masked).unwrap();
    assert_eq!(zero.to_scalar::<f32>().unwrap(), 0.0);
    for g in grads(&t, &zero) {
        assert!(g.iter().all(|&v| v == 0.0));
    }

    // The trainer's first step reports the mean over the counted tokens of the global batch.
    let out = t.train_step().unwrap();
    let mean = f64::from(b) / counted.len() as f64;
    assert!(
        (out.loss - mean).abs() <= 1e-5 * mean,
        "step loss {} vs {mean}",
        out.loss
    );
}

/// Two ranks whose shares hold different numbers of response tokens train the model one rank trains: the loss is
/// divided by the global batch's count, not averaged per rank. Generation metrics agree on every rank.
#[test]
fn two_ranks_fine_tune_the_model_one_rank_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sft_spec(dir.path(), 30);
    spec.sft.eval_data = Some(write_examples(dir.path(), "held-out.jsonl", 5));
    spec.sft.eval_items = 5;
    spec.sft.max_new_tokens = 6;
    spec.validate().unwrap();
    let steps = 3;

    let mut one = Trainer::new(spec.clone(), Box::new(Local), Device::Cpu).unwrap();
    let losses: Vec<f64> = (0..steps).map(|_| one.train_step().unwrap().loss).collect();
    let want = values(&one);
    let want_metrics = one.evaluate_generation().unwrap().expect("sft.eval_data is set");
    for key in ["bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor"] {
        assert!(want_metrics.contains_key(key), "{key} in {want_metrics:?}");
    }

    let listeners: Vec<RingListener> = (0..2).map(|_| RingListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
    let token = RunToken::generate();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (spec, peers, token) = (spec.clone(), peers.clone(), token.clone());
                s.spawn(move || {
                    let ring = Ring::connect(
                        &listener,
                        RingConfig {
                            rank: rank as u32,
                            world_size: 2,
                            peers,
                            timeout: std::time::Duration::from_secs(60),
                            session: "sft-test".into(),
                            token,
                            cancel: None,
                        },
                    )
                    .unwrap();
                    let mut t = Trainer::new(spec, Box::new(ring), Device::Cpu).unwrap();
                    let losses: Vec<f64> = (0..steps).map(|_| t.train_step().unwrap().loss).collect();
                    let metrics = t.evaluate_generation().unwrap().unwrap();
                    (losses, values(&t), metrics)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (got_losses, got, metrics)) in results.iter().enumerate() {
        for (a, b) in got_losses.iter().zip(&losses) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "rank {rank}: loss {a} vs {b}");
        }
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "rank {rank}: parameters differ by up to {worst}");
        assert_eq!(
            metrics.keys().collect::<Vec<_>>(),
            want_metrics.keys().collect::<Vec<_>>()
        );
        for (k, v) in metrics {
            assert!(
                (v - want_metrics[k]).abs() < 1e-3,
                "rank {rank}: {k} {v} vs {}",
                want_metrics[k]
            );
        }
    }
    // Different shares: the test would not tell a per-rank mean from the global one if both held equal counts.
    let corpus = one.corpus();
    let plan = DataPlan::new(spec.run.seed, corpus.num_windows(Split::Train), 6).unwrap();
    let count = |rank| -> u64 {
        plan.rank_windows(0, rank, 2)
            .iter()
            .map(|&w| corpus.counted(Split::Train, w))
            .sum()
    };
    assert_ne!(count(0), count(1));
}

/// Fine-tuning a pretrained model whose vocabulary lacks the chat template's tokens: the embedding grows, the old
/// rows are kept, the new ones start at the mean of the old.
#[test]
fn init_from_a_smaller_vocabulary_grows_the_embedding() {
    let dir = tempfile::tempdir().unwrap();
    // Pretrain on text holding every character of the conversations, so the tokenizers agree.
    let jsonl = write_examples(dir.path(), "sft.jsonl", 30);
    let text: String = std::fs::read_to_string(&jsonl).unwrap().repeat(3);
    let text_path = dir.path().join("pretrain.txt");
    std::fs::write(&text_path, &text).unwrap();
    let mut pre = RunSpec::default();
    pre.data.source = DataSource::Text;
    pre.data.path = Some(text_path);
    pre.model.block_size = 32;
    pre.train.seq_len = 32;
    pre.train.global_batch = 4;
    pre.train.micro_batch = 4;
    pre.checkpoint.dir = dir.path().join("pre");
    let mut base = Trainer::new(pre, Box::new(Local), Device::Cpu).unwrap();
    base.train_step().unwrap();
    let ckpt = base.save_checkpoint().unwrap();
    let old_vocab = base.model().config().vocab_size;
    let wte_old = wte(&base);

    let mut spec = sft_spec(dir.path(), 30);
    spec.data.path = Some(jsonl);
    spec.model.init_from = format!("lockstep:{}", ckpt.display());
    spec.model.n_layer = 2;
    spec.model.n_head = 4;
    spec.model.n_embd = 64;
    // A spec read from a file takes the checkpoint's vocabulary, which cannot hold the template's 4 tokens: the
    // error says what to set.
    spec.model.vocab_size = old_vocab;
    let err = Trainer::new(spec.clone(), Box::new(Local), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    let template = ChatTemplate::new(&base.corpus().tokenizer);
    let want = format!("model.vocab_size = {old_vocab}");
    assert!(
        err.contains(&want) && err.contains(&format!("at least {}", template.vocab_size())),
        "{err}"
    );
    spec.model.vocab_size = template.vocab_size();
    spec.check_init_from().unwrap();
    let mut tuned = Trainer::new(spec, Box::new(Local), Device::Cpu).unwrap();
    let wte = wte(&tuned);
    assert_eq!(wte.dims(), [old_vocab + 4, 64]);
    let old_rows = wte
        .narrow(0, 0, old_vocab)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(old_rows, wte_old.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let mean = wte_old
        .mean_keepdim(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for r in 0..4 {
        let row = wte
            .narrow(0, old_vocab + r, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(row, mean, "new row {r}");
    }
    assert!(tuned.train_step().unwrap().loss.is_finite());
}

/// Fine-tuning a Hugging Face GPT-2 directory, its shape taken from its config.json as a spec file would.
#[test]
fn fine_tunes_from_a_hugging_face_directory() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = write_examples(dir.path(), "sft.jsonl", 30);
    let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny");
    let load = |tokenizer: Option<&str>| {
        let mut env = vec![
            ("LOCKSTEP_MODEL__INIT_FROM".to_string(), format!("hf:{}", hf.display())),
            ("LOCKSTEP_DATA__SOURCE".into(), "sft".into()),
            ("LOCKSTEP_DATA__PATH".into(), jsonl.display().to_string()),
            ("LOCKSTEP_TRAIN__SEQ_LEN".into(), "32".into()),
            ("LOCKSTEP_TRAIN__GLOBAL_BATCH".into(), "4".into()),
            (
                "LOCKSTEP_CHECKPOINT__DIR".into(),
                dir.path().join("ck").display().to_string(),
            ),
        ];
        if let Some(t) = tokenizer {
            env.push(("LOCKSTEP_DATA__TOKENIZER".into(), t.into()));
        }
        RunSpec::load_with_env(None, env).unwrap()
    };
    // The directory has no tokenizer.json, so GPT-2's is used, whose 50,257 ids (+ 4) the 97-row fixture cannot
    // hold: the error says what to set.
    let err = Trainer::new(load(None), Box::new(Local), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.vocab_size = 97") && err.contains("at least 50261"),
        "{err}"
    );
    // With a character vocabulary that fits, it trains from the fixture's weights.
    let spec = load(Some("char"));
    assert_eq!((spec.model.n_embd, spec.model.vocab_size), (48, 97));
    let mut t = Trainer::new(spec, Box::new(Local), Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(hf.join("model.safetensors"), &Device::Cpu).unwrap();
    let wpe = t
        .params()
        .names()
        .iter()
        .position(|n| n == "transformer.wpe.weight")
        .unwrap();
    let got: Vec<f32> = t.params().vars()[wpe]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        got,
        want["transformer.wpe.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
    let losses: Vec<f64> = (0..3).map(|_| t.train_step().unwrap().loss).collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
}
