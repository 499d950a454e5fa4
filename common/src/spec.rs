//! The run spec: one typed, validated description of a training run.
//!
//! Read from TOML with `LOCKSTEP_<SECTION>__<KEY>` environment overrides (e.g. `LOCKSTEP_TRAIN__TOTAL_STEPS=50`);
//! an unknown key in either place is rejected by name. Every field has a default, and the defaults are the built-in
//! addition demo, so an empty file is a valid run. The coordinator sends the resolved spec to every worker, and the
//! checkpoint stores it.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Environment variables with this prefix and a `__` between section and key override the file.
pub const ENV_PREFIX: &str = "LOCKSTEP";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    pub run: RunSection,
    pub cluster: ClusterSpec,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub train: TrainSpec,
    pub checkpoint: CheckpointSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Shown in status and logs.
    pub name: String,
    /// Seeds the initialisation, the data plan and dropout. Same seed + same world size = bitwise same run.
    pub seed: u64,
}

/// Where the coordinator listens and how many workers make a generation. Not part of the training math: two
/// processes may disagree here (e.g. a different listen address) and still train the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSpec {
    /// gRPC listen address of the coordinator; port 0 picks a free port (printed at start).
    pub listen: String,
    /// Training starts when this many workers have joined.
    pub min_workers: u32,
    /// Workers beyond this are turned away. At most `train.global_batch`.
    pub max_workers: u32,
    /// Deadline for one collective operation (ring connect, send, receive).
    pub collective_timeout_secs: u64,
    /// How often workers send a heartbeat.
    pub heartbeat_interval_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Learned position embeddings (`transformer.wpe.weight`), as GPT-2.
    Learned,
    /// The fixed sinusoidal encoding of "Attention Is All You Need"; no parameters.
    Sinusoidal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Longest context the model supports (GPT-2's `n_positions`). At least `train.seq_len`.
    pub block_size: usize,
    /// Vocabulary size; 0 = the tokenizer's. Larger values pad the embedding (e.g. 50304 for speed).
    pub vocab_size: usize,
    pub dropout: f64,
    pub positions: Positions,
    /// Standard deviation of the normal initialisation (GPT-2: 0.02).
    pub init_std: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// Built-in: zero-padded multi-digit additions with the sum written reversed, e.g. `07+45=250`. No download.
    Addition,
    /// A UTF-8 text file at `data.path`.
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per distinct character of the corpus.
    Char,
    /// One token per byte (vocabulary 256).
    Byte,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    pub source: DataSource,
    /// The text file, for `source = "text"`. Every worker reads it at this path.
    pub path: Option<PathBuf>,
    pub tokenizer: TokenizerKind,
    /// Share of the data held out for validation.
    pub val_fraction: f64,
    /// Digits per operand, for `source = "addition"`.
    pub addition_digits: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    /// Tokens per training sequence (context length used in training).
    pub seq_len: usize,
    /// Sequences per optimizer step, summed over all workers. Fixed for the run whatever the world size.
    pub global_batch: usize,
    /// Most sequences one worker runs in one forward/backward; larger shares are accumulated.
    pub micro_batch: usize,
    pub total_steps: u64,
    /// Peak learning rate, reached after `warmup_steps`.
    pub lr: f64,
    /// Floor of the cosine decay, reached at `total_steps`.
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// Decoupled AdamW weight decay, applied to tensors with two or more dimensions only.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global-norm gradient clipping threshold; 0 disables clipping.
    pub grad_clip: f64,
    /// Evaluate the validation loss every this many steps (and at the end); 0 = only at the end.
    pub eval_interval: u64,
    /// Validation sequences per evaluation (a fixed set, split across workers).
    pub eval_sequences: usize,
    /// Report a checksum of all parameters every this many steps (and at the end); 0 = only at the end.
    pub checksum_interval: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// Checkpoints go to `<dir>/step-00001200/`.
    pub dir: PathBuf,
    /// Write one every this many steps (and always at the end); 0 = only at the end.
    pub interval: u64,
    /// Keep the newest this many; older ones are deleted after a newer one is complete. 0 = keep all.
    pub keep: usize,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            name: "addition-demo".into(),
            seed: 1337,
        }
    }
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".into(),
            min_workers: 1,
            max_workers: 8,
            collective_timeout_secs: 60,
            heartbeat_interval_secs: 2,
        }
    }
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            n_layer: 2,
            n_head: 4,
            n_embd: 64,
            block_size: 64,
            vocab_size: 0,
            dropout: 0.0,
            positions: Positions::Learned,
            init_std: 0.02,
        }
    }
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            source: DataSource::Addition,
            path: None,
            tokenizer: TokenizerKind::Char,
            val_fraction: 0.1,
            addition_digits: 2,
        }
    }
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            seq_len: 40,
            global_batch: 32,
            micro_batch: 16,
            total_steps: 2000,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_interval: 250,
            eval_sequences: 64,
            checksum_interval: 1,
        }
    }
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("checkpoints"),
            interval: 500,
            keep: 3,
        }
    }
}

impl RunSpec {
    /// Reads `path` (TOML; `None` = defaults only), applies `LOCKSTEP_<SECTION>__<KEY>` overrides from the
    /// environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`RunSpec::load`], with the environment given explicitly (tests use this).
    pub fn load_with_env(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let shown = path.map_or_else(|| "<defaults>".to_string(), |p| p.display().to_string());
        let mut builder = config::Config::builder();
        if let Some(p) = path {
            if !p.is_file() {
                return Err(Error::Config {
                    path: shown,
                    message: "no such file; pass the path of a TOML run spec (see deploy/examples/)".into(),
                });
            }
            builder = builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
        }
        // Only `LOCKSTEP_<SECTION>__<KEY>` variables are spec keys; plain `LOCKSTEP_<FLAG>` variables belong to
        // the binaries' command-line flags and must not be mistaken for unknown keys.
        let prefix = format!("{ENV_PREFIX}_");
        let overrides: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix) && k.contains("__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        );
        let raw = builder.build().map_err(|e| Error::Config {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let spec: RunSpec = raw.try_deserialize().map_err(|e| Error::Config {
            path: shown,
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses TOML text (no environment), then validates.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|e| Error::Config {
                path: "<inline>".into(),
                message: e.to_string(),
            })?;
        let spec: RunSpec = raw.try_deserialize().map_err(|e| Error::Config {
            path: "<inline>".into(),
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let spec: RunSpec = serde_json::from_str(text)?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn to_json(&self) -> String {
        // A struct of plain fields always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks every constraint between fields; the first violation is returned, naming the field.
    pub fn validate(&self) -> Result<()> {
        fn bad(field: &'static str, value: impl ToString, reason: impl Into<String>) -> Result<()> {
            Err(Error::Invalid {
                field,
                value: value.to_string(),
                reason: reason.into(),
            })
        }
        let (m, t, c, d) = (&self.model, &self.train, &self.cluster, &self.data);
        if m.n_layer == 0 {
            return bad("model.n_layer", m.n_layer, "must be at least 1");
        }
        if m.n_head == 0 || m.n_embd == 0 || m.n_embd % m.n_head != 0 {
            return bad(
                "model.n_embd",
                m.n_embd,
                format!("must be a positive multiple of model.n_head ({})", m.n_head),
            );
        }
        if m.positions == Positions::Sinusoidal && m.n_embd % 2 != 0 {
            return bad(
                "model.n_embd",
                m.n_embd,
                "sinusoidal positions need an even embedding size",
            );
        }
        if !(0.0..1.0).contains(&m.dropout) {
            return bad("model.dropout", m.dropout, "must be in [0, 1)");
        }
        if m.init_std.is_nan() || m.init_std <= 0.0 {
            return bad("model.init_std", m.init_std, "must be positive");
        }
        if t.seq_len == 0 || t.seq_len > m.block_size {
            return bad(
                "train.seq_len",
                t.seq_len,
                format!("must be in 1..={} (model.block_size)", m.block_size),
            );
        }
        if t.global_batch == 0 {
            return bad("train.global_batch", t.global_batch, "must be at least 1");
        }
        if t.micro_batch == 0 {
            return bad("train.micro_batch", t.micro_batch, "must be at least 1");
        }
        if t.total_steps == 0 {
            return bad("train.total_steps", t.total_steps, "must be at least 1");
        }
        if !t.lr.is_finite() || t.lr <= 0.0 {
            return bad("train.lr", t.lr, "must be a positive number");
        }
        if !(0.0..=t.lr).contains(&t.min_lr) {
            return bad("train.min_lr", t.min_lr, format!("must be in [0, train.lr = {}]", t.lr));
        }
        if t.warmup_steps > t.total_steps {
            return bad(
                "train.warmup_steps",
                t.warmup_steps,
                format!("must not exceed train.total_steps ({})", t.total_steps),
            );
        }
        if !(0.0..1.0).contains(&t.beta1) {
            return bad("train.beta1", t.beta1, "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&t.beta2) {
            return bad("train.beta2", t.beta2, "must be in [0, 1)");
        }
        if t.eps.is_nan() || t.eps <= 0.0 {
            return bad("train.eps", t.eps, "must be positive");
        }
        if t.weight_decay.is_nan() || t.weight_decay < 0.0 {
            return bad("train.weight_decay", t.weight_decay, "must be zero or positive");
        }
        if t.grad_clip.is_nan() || t.grad_clip < 0.0 {
            return bad("train.grad_clip", t.grad_clip, "must be zero (off) or positive");
        }
        if c.min_workers == 0 {
            return bad("cluster.min_workers", c.min_workers, "must be at least 1");
        }
        if c.max_workers < c.min_workers {
            return bad(
                "cluster.max_workers",
                c.max_workers,
                format!("must be at least cluster.min_workers ({})", c.min_workers),
            );
        }
        if c.min_workers as usize > t.global_batch {
            return bad(
                "cluster.min_workers",
                c.min_workers,
                format!(
                    "every worker needs at least one sequence of train.global_batch ({})",
                    t.global_batch
                ),
            );
        }
        if c.collective_timeout_secs == 0 {
            return bad("cluster.collective_timeout_secs", 0, "must be at least 1");
        }
        if c.heartbeat_interval_secs == 0 {
            return bad("cluster.heartbeat_interval_secs", 0, "must be at least 1");
        }
        if c.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("cluster.listen", &c.listen, "must be an IP:port such as 0.0.0.0:7070");
        }
        if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
            return bad("data.val_fraction", d.val_fraction, "must be in (0, 1)");
        }
        match d.source {
            DataSource::Text if d.path.is_none() => {
                return bad(
                    "data.path",
                    "(none)",
                    "data.source = \"text\" needs the path of a UTF-8 text file",
                );
            }
            DataSource::Addition if !(1..=6).contains(&d.addition_digits) => {
                return bad("data.addition_digits", d.addition_digits, "must be in 1..=6");
            }
            _ => {}
        }
        Ok(())
    }

    /// The effective vocabulary size for a tokenizer of `tokenizer_vocab` tokens.
    pub fn vocab_size(&self, tokenizer_vocab: usize) -> Result<usize> {
        match self.model.vocab_size {
            0 => Ok(tokenizer_vocab),
            v if v >= tokenizer_vocab => Ok(v),
            v => Err(Error::Invalid {
                field: "model.vocab_size",
                value: v.to_string(),
                reason: format!("the tokenizer has {tokenizer_vocab} tokens; use 0 (= tokenizer's) or more"),
            }),
        }
    }

    /// The training-relevant part of the spec as dotted keys → JSON values (everything but `cluster`).
    fn training_fields(&self) -> BTreeMap<String, serde_json::Value> {
        fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flatten(&key, v, out);
                    }
                }
                other => {
                    out.insert(prefix.to_string(), other.clone());
                }
            }
        }
        let mut out = BTreeMap::new();
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        flatten("", &value, &mut out);
        out.retain(|k, _| !k.starts_with("cluster."));
        out
    }

    /// Fields whose values differ between two specs (ignoring `cluster`), as `key: ours vs theirs`.
    pub fn training_diff(&self, other: &RunSpec) -> Vec<String> {
        let (a, b) = (self.training_fields(), other.training_fields());
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| {
                let show = |v: Option<&serde_json::Value>| v.map_or("(absent)".to_string(), |v| v.to_string());
                format!("{k}: {} vs {}", show(a.get(k)), show(b.get(k)))
            })
            .collect()
    }

    /// SHA-256 (hex) of the training-relevant fields; equal hashes mean the same training math.
    pub fn training_hash(&self) -> String {
        let text = serde_json::to_string(&self.training_fields()).unwrap_or_default();
        hex::encode(Sha256::digest(text.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_are_valid_and_round_trip_through_json() {
        let spec = RunSpec::default();
        spec.validate().unwrap();
        assert_eq!(RunSpec::from_json(&spec.to_json()).unwrap(), spec);
    }

    #[test]
    fn file_and_env_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "[train]\ntotal_steps = 7\nwarmup_steps = 2\nlr = 0.01\n[model]\nn_layer = 3\n",
        );
        let env = vec![
            ("LOCKSTEP_TRAIN__TOTAL_STEPS".to_string(), "9".to_string()),
            ("LOCKSTEP_COORDINATOR".to_string(), "http://x".to_string()), // a flag's variable, not a key
        ];
        let spec = RunSpec::load_with_env(Some(&path), env).unwrap();
        assert_eq!(spec.train.total_steps, 9);
        assert_eq!(spec.train.lr, 0.01);
        assert_eq!(spec.model.n_layer, 3);
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[train]\ntotal_stepz = 7\n");
        let err = RunSpec::load_with_env(Some(&path), vec![]).unwrap_err().to_string();
        assert!(err.contains("total_stepz"), "{err}");
        assert!(err.contains("run.toml"), "{err}");
    }

    #[test]
    fn unknown_key_in_env_is_named() {
        let env = vec![("LOCKSTEP_TRAIN__BOGUS".to_string(), "1".to_string())];
        let err = RunSpec::load_with_env(None, env).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = RunSpec::load_with_env(Some(Path::new("/nonexistent/run.toml")), vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/run.toml"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut spec = RunSpec::default();
        spec.model.n_embd = 65;
        assert!(spec.validate().unwrap_err().to_string().contains("model.n_embd"));
        let mut spec = RunSpec::default();
        spec.train.seq_len = spec.model.block_size + 1;
        assert!(spec.validate().unwrap_err().to_string().contains("train.seq_len"));
        let mut spec = RunSpec::default();
        spec.cluster.min_workers = 40;
        spec.cluster.max_workers = 40;
        assert!(spec.validate().unwrap_err().to_string().contains("cluster.min_workers"));
        let mut spec = RunSpec::default();
        spec.data.source = DataSource::Text;
        assert!(spec.validate().unwrap_err().to_string().contains("data.path"));
    }

    #[test]
    fn diff_names_training_fields_and_ignores_cluster() {
        let a = RunSpec::default();
        let mut b = a.clone();
        b.cluster.listen = "0.0.0.0:9".into();
        assert!(a.training_diff(&b).is_empty());
        assert_eq!(a.training_hash(), b.training_hash());
        b.train.global_batch = 64;
        let diff = a.training_diff(&b);
        assert_eq!(diff, vec!["train.global_batch: 32 vs 64".to_string()]);
        assert_ne!(a.training_hash(), b.training_hash());
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped examples must stay valid as the spec evolves.
    #[test]
    fn every_deploy_example_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                RunSpec::load_with_env(Some(&path), vec![]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3);
    }

    /// The fully written-out demo equals the defaults it documents.
    #[test]
    fn addition_example_is_the_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/addition.toml");
        assert_eq!(RunSpec::load_with_env(Some(&path), vec![]).unwrap(), RunSpec::default());
    }
}
