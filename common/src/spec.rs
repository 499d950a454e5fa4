//! The run spec: one typed, validated description of a training run.
//!
//! Read from TOML with `LOCKSTEP_<SECTION>__<KEY>` environment overrides (e.g. `LOCKSTEP_TRAIN__TOTAL_STEPS=50`);
//! an unknown key in either place is rejected by name. Every field has a default, and the defaults are the built-in
//! addition demo, so an empty file is a valid run. The coordinator sends the resolved spec to every worker, and the
//! checkpoint stores it.
//!
//! Two keys fill in the model's shape from elsewhere, underneath the file and the environment: `model.preset` (a
//! named shape from [`crate::presets`]) and `model.init_from` (the `config.json` of the checkpoint the weights come
//! from). Layers, lowest first: built-in defaults < `init_from`'s `config.json` < the preset < the file < the
//! environment. A key written in the file or the environment therefore overrides the preset; a shape that then
//! disagrees with `init_from`'s `config.json` is an error naming every differing field (the weights would not fit).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::data::tokenizer::TokenizerSpec;
use crate::error::{Error, Result};
use crate::presets;

/// Environment variables with this prefix and a `__` between section and key override the file.
pub const ENV_PREFIX: &str = "LOCKSTEP";

type ConfigBuilder = config::builder::ConfigBuilder<config::builder::DefaultState>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    pub run: RunSection,
    pub cluster: ClusterSpec,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub train: TrainSpec,
    pub checkpoint: CheckpointSpec,
    pub security: SecuritySpec,
    pub sft: SftSpec,
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
    /// How often workers send a heartbeat. A member silent for 5 intervals is declared lost.
    pub heartbeat_interval_secs: u64,
    /// How many times the run may re-form after losing a member before it fails.
    pub max_restarts: u32,
    /// After a loss, how long the run waits for enough workers (`min_workers`) to re-form before it fails.
    pub reform_timeout_secs: u64,
    /// This many non-finite steps in a row (loss or gradient norm NaN/Inf; each one is skipped) stop the run.
    pub max_nonfinite_steps: u32,
    /// Where the coordinator keeps the run's state (an embedded database), so a restarted coordinator resumes it.
    pub state_dir: PathBuf,
}

/// Default of `security.max_message_bytes`: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Smallest `security.max_message_bytes`: a run's spec and status must still fit.
pub const MIN_MAX_MESSAGE_BYTES: usize = 64 << 10;

/// Who may talk to the coordinator, and how (README "Security"). Not part of the training math. The run token
/// itself is never here: this spec is sent to every worker and written into every checkpoint. Paths are on the
/// coordinator's host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySpec {
    /// A file holding the run token (used when `LOCKSTEP_TOKEN` is unset). Without either, the coordinator
    /// generates one into `<cluster.state_dir>/token` (mode 0600) and reuses it on restart.
    pub token_file: Option<PathBuf>,
    /// The coordinator's TLS certificate chain (PEM); with `tls_key`, the coordinator serves TLS only.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by this CA (PEM). Needs `tls_cert` and `tls_key`.
    pub tls_client_ca: Option<PathBuf>,
    /// Largest gRPC message, in bytes, that the coordinator and its clients encode or decode.
    pub max_message_bytes: usize,
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
    /// A named shape ([`crate::presets`]) under the shape keys below: `n_layer`, `n_head`, `n_embd`,
    /// `block_size` and `vocab_size` written in the file or the environment override it. `custom` = none.
    pub preset: String,
    /// Where the initial weights come from: empty = a seeded random initialisation; `hf:DIR` = a Hugging Face
    /// GPT-2 directory (`config.json` + `model.safetensors`, as `save_pretrained` writes it); `lockstep:DIR` = the
    /// model of a Lockstep checkpoint (a `step-*` directory; the optimizer starts fresh). Its `config.json`
    /// supplies the shape keys the spec does not set. Relative paths are relative to each process's working
    /// directory, and every worker reads DIR.
    pub init_from: String,
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
    /// A UTF-8 text file at `data.path`, tokenised in memory at start-up (small corpora).
    Text,
    /// A directory `lockstep prepare` wrote (token shards + `manifest.json` + `tokenizer.json`) at `data.path`, or a
    /// directory of llm.c `.bin` shards (`*train*.bin`, `*val*.bin`) with `data.tokenizer` naming their tokenizer.
    Prepared,
    /// Supervised fine-tuning: a JSONL file of conversations at `data.path` (`{"prompt", "response"}` or
    /// `{"messages": [...]}` per line), rendered through the chat template; the loss counts only the assistant's
    /// words. The last `data.val_fraction` of the examples are held out.
    Sft,
}

/// Generation metrics while fine-tuning: at every evaluation (`train.eval_interval`), the model answers held-out
/// conversations and its answers are scored against theirs. Only evaluation, not the training math: left out of
/// [`RunSpec::training_hash`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftSpec {
    /// A JSONL file of conversations (the formats of `data.source = "sft"`) whose last assistant turn is the
    /// reference; empty = no generation metrics. Every worker reads it at this path.
    pub eval_data: Option<PathBuf>,
    /// The first this many conversations of `eval_data` are answered (split across the workers).
    pub eval_items: usize,
    /// Most tokens generated per answer (greedy; an answer ends at `<|end|>`).
    pub max_new_tokens: usize,
}

impl Default for SftSpec {
    fn default() -> Self {
        Self {
            eval_data: None,
            eval_items: 64,
            max_new_tokens: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    pub source: DataSource,
    /// The text file (`source = "text"`) or prepared directory (`source = "prepared"`). Every worker reads it at
    /// this path.
    pub path: Option<PathBuf>,
    /// `char`, `byte`, `gpt2` or `hf:PATH/tokenizer.json`. For `text` the default is `char`; for `prepared` the
    /// directory's manifest names the tokenizer and this, when set, must agree with it.
    pub tokenizer: Option<TokenizerSpec>,
    /// Share of the data held out for validation.
    pub val_fraction: f64,
    /// Digits per operand, for `source = "addition"`.
    pub addition_digits: u32,
    /// How much of a prepared directory the coordinator checks at start-up (workers always check only what is
    /// cheap): `full` (default) reads every shard once — its SHA-256 against the manifest and every token id
    /// against the tokenizer's vocabulary, naming the file and byte offset of the first bad one; `sizes` checks
    /// only that every shard exists, its header parses and agrees with the file's size and the manifest's count.
    /// Shards are memory-mapped while training and must not be modified until the run ends.
    pub verify: DataVerify,
}

/// How thoroughly the coordinator checks a prepared directory at start-up (`data.verify`). Not part of the training
/// math: it is left out of [`RunSpec::training_hash`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataVerify {
    /// Sizes and headers, plus one pass over every byte: SHA-256 of each shard and every token id < vocabulary.
    #[default]
    Full,
    /// Every shard exists, its header parses, and its size and token count agree with the header and manifest.
    Sizes,
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
    /// The dtype of the forward and backward; parameters, gradients and optimizer state stay f32 ("master
    /// weights") whatever it is.
    pub compute_dtype: ComputeDtype,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    /// bfloat16 activations and matmuls; LayerNorm, softmax and the loss are computed in f32.
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// Checkpoints go to `<dir>/step-00001200/`.
    pub dir: PathBuf,
    /// Write one every this many steps (and always at the end); 0 = only at the end.
    pub interval: u64,
    /// Keep the newest this many; older ones are deleted once the coordinator has committed a newer one (never while
    /// it is unreachable). 0 = keep all.
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
            max_restarts: 10,
            reform_timeout_secs: 300,
            max_nonfinite_steps: 5,
            state_dir: PathBuf::from("lockstep-state"),
        }
    }
}

impl Default for SecuritySpec {
    fn default() -> Self {
        Self {
            token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            preset: presets::CUSTOM.into(),
            init_from: String::new(),
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
            tokenizer: None,
            val_fraction: 0.1,
            addition_digits: 2,
            verify: DataVerify::Full,
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
            compute_dtype: ComputeDtype::F32,
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
    /// environment, fills in the model shape from `model.preset` and `model.init_from`, validates, and checks that
    /// `model.init_from`'s files exist and have the run's shape.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`RunSpec::load`], with the environment given explicitly (tests use this).
    pub fn load_with_env(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let shown = path.map_or_else(|| "<defaults>".to_string(), |p| p.display().to_string());
        if let Some(p) = path
            && !p.is_file()
        {
            return Err(Error::Config {
                path: shown,
                message: "no such file; pass the path of a TOML run spec (see deploy/examples/)".into(),
            });
        }
        // Only `LOCKSTEP_<SECTION>__<KEY>` variables are spec keys; plain `LOCKSTEP_<FLAG>` variables belong to
        // the binaries' command-line flags and must not be mistaken for unknown keys.
        let prefix = format!("{ENV_PREFIX}_");
        if let Some(p) = path {
            let text = std::fs::read_to_string(p).map_err(|e| Error::Config {
                path: shown.clone(),
                message: format!("cannot read it: {e}"),
            })?;
            crate::spec_types::check(&shown, &text)?;
        }
        let env: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with(&prefix)).collect();
        if let Some(message) = crate::spec_types::misspelt_override(env.iter().map(|(k, _)| k.as_str())) {
            return Err(Error::Config { path: shown, message });
        }
        let overrides: config::Map<String, String> = env.into_iter().filter(|(k, _)| k.contains("__")).collect();
        Self::resolve(&shown, |mut builder| {
            if let Some(p) = path {
                builder = builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
            }
            builder.add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(overrides.clone())),
            )
        })
    }

    /// Parses TOML text (no environment), resolves the preset and `init_from` as [`RunSpec::load`] does, then
    /// validates.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        crate::spec_types::check("<inline>", text)?;
        Self::resolve("<inline>", |builder| {
            builder.add_source(config::File::from_str(text, config::FileFormat::Toml))
        })
    }

    /// Builds the spec from `layers` (the file and environment sources) on top of the defaults that
    /// `model.init_from` and `model.preset`, read from those same layers, imply.
    fn resolve(shown: &str, layers: impl Fn(ConfigBuilder) -> ConfigBuilder) -> Result<Self> {
        let config_err = |e: config::ConfigError| Error::Config {
            path: shown.to_string(),
            message: e.to_string(),
        };
        let raw = layers(config::Config::builder()).build().map_err(config_err)?;
        let text = |key: &str| match raw.get_string(key) {
            Ok(s) => Ok(Some(s)),
            Err(config::ConfigError::NotFound(_)) => Ok(None),
            Err(e) => Err(config_err(e)),
        };
        let mut builder = config::Config::builder();
        // Defaults, lowest first; a later `set_default` of the same key replaces an earlier one.
        if let Some(init) = text("model.init_from")? {
            let source = InitFrom::parse(&init)?;
            if let Some(shape) = CheckpointShape::read(&source)? {
                for (key, value) in shape.defaults() {
                    builder = builder.set_default(key, value).map_err(config_err)?;
                }
            }
        }
        if let Some(name) = text("model.preset")? {
            if let Some(p) = presets::find(&name) {
                for (key, value) in [
                    ("model.n_layer", p.n_layer),
                    ("model.n_head", p.n_head),
                    ("model.n_embd", p.n_embd),
                    ("model.block_size", p.block_size),
                    ("model.vocab_size", p.vocab_size),
                ] {
                    builder = builder.set_default(key, value as u64).map_err(config_err)?;
                }
            } else if name != presets::CUSTOM {
                return Err(unknown_preset(&name));
            }
        }
        let raw = layers(builder).build().map_err(config_err)?;
        let spec: RunSpec = raw.try_deserialize().map_err(config_err)?;
        spec.validate()?;
        spec.check_init_from()?;
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
        if !presets::is_known(&m.preset) {
            return Err(unknown_preset(&m.preset));
        }
        m.init_source()?;
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
        if c.max_nonfinite_steps == 0 {
            return bad("cluster.max_nonfinite_steps", 0, "must be at least 1");
        }
        if c.state_dir.as_os_str().is_empty() {
            return bad("cluster.state_dir", "\"\"", "must name a directory");
        }
        if c.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("cluster.listen", &c.listen, "must be an IP:port such as 0.0.0.0:7070");
        }
        self.security.validate()?;
        if let Some(path) = &self.sft.eval_data
            && d.source != DataSource::Sft
        {
            return bad(
                "sft.eval_data",
                path.display(),
                "generation metrics score a chat model: they need data.source = \"sft\"",
            );
        }
        if self.sft.eval_data.is_some() && self.sft.eval_items == 0 {
            return bad("sft.eval_items", 0, "must be at least 1 (or leave sft.eval_data unset)");
        }
        if self.sft.max_new_tokens == 0 {
            return bad("sft.max_new_tokens", 0, "must be at least 1");
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
            DataSource::Prepared if d.path.is_none() => {
                return bad(
                    "data.path",
                    "(none)",
                    "data.source = \"prepared\" needs the directory lockstep prepare wrote",
                );
            }
            DataSource::Sft if d.path.is_none() => {
                return bad(
                    "data.path",
                    "(none)",
                    "data.source = \"sft\" needs the path of a JSONL file of conversations",
                );
            }
            DataSource::Addition | DataSource::Text | DataSource::Sft
                if matches!(d.tokenizer, Some(TokenizerSpec::Bpe { .. })) =>
            {
                return bad(
                    "data.tokenizer",
                    d.tokenizer.as_ref().map(ToString::to_string).unwrap_or_default(),
                    "a BPE is trained by lockstep prepare --tokenizer bpe:N; train on the directory it writes \
                     (data.source = \"prepared\")",
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

    /// The training-relevant part of the spec as dotted keys → JSON values (all but `cluster` and `security`).
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
        // The preset only fills in the shape, which is compared itself. An empty `init_from` (random init) is
        // left out so that specs from before it existed keep their hash (and their checkpoints stay resumable).
        // `data.verify` only decides how much the coordinator checks at start-up; `sft.*` only what is evaluated.
        out.retain(|k, v| {
            let not_math = ["cluster.", "security.", "sft."].iter().any(|p| k.starts_with(p));
            !not_math
                && k != "model.preset"
                && k != "data.verify"
                && !(k == "model.init_from" && v.as_str() == Some(""))
        });
        out
    }

    /// Fields whose values differ between two specs (ignoring `cluster` and `security`), as `key: ours vs theirs`.
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

    /// Checks `model.init_from` against the disk: the directory and its files exist and its `config.json` has
    /// the run's model shape (every differing field is named). Loading a spec from a file does this, so the
    /// coordinator reports a bad `init_from` at start-up; the worker checks the tensors themselves when it loads
    /// them.
    pub fn check_init_from(&self) -> Result<()> {
        let source = self.model.init_source()?;
        let Some(shape) = CheckpointShape::read(&source)? else {
            return Ok(());
        };
        let diffs = shape.differences(&self.model);
        if diffs.is_empty() {
            return Ok(());
        }
        Err(Error::Invalid {
            field: "model.init_from",
            value: self.model.init_from.clone(),
            reason: format!(
                "the run's model shape differs from {}: {}; remove those keys (and model.preset) from the spec to \
                 take the checkpoint's shape, or set them to its values",
                shape.config_path.display(),
                diffs.join(", ")
            ),
        })
    }
}

impl SecuritySpec {
    /// TLS needs both halves of the coordinator's identity; mutual TLS needs TLS. Files are read (and named when
    /// unreadable) where they are used, on the coordinator's host.
    fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, value: String, reason: &str| {
            Err(Error::Invalid {
                field,
                value,
                reason: reason.into(),
            })
        };
        let shown = |p: &Path| p.display().to_string();
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), None) => {
                return bad(
                    "security.tls_key",
                    format!("(none; security.tls_cert = {})", shown(cert)),
                    "TLS needs the certificate's private key too; set security.tls_key, or drop security.tls_cert",
                );
            }
            (None, Some(key)) => {
                return bad(
                    "security.tls_cert",
                    format!("(none; security.tls_key = {})", shown(key)),
                    "TLS needs the certificate the key belongs to; set security.tls_cert, or drop security.tls_key",
                );
            }
            _ => {}
        }
        if let Some(ca) = &self.tls_client_ca
            && self.tls_cert.is_none()
        {
            return bad(
                "security.tls_client_ca",
                shown(ca),
                "mutual TLS needs the coordinator's own certificate: set security.tls_cert and security.tls_key",
            );
        }
        if self.max_message_bytes < MIN_MAX_MESSAGE_BYTES {
            return bad(
                "security.max_message_bytes",
                self.max_message_bytes.to_string(),
                &format!("must be at least {MIN_MAX_MESSAGE_BYTES} (64 KiB)"),
            );
        }
        Ok(())
    }
}

fn unknown_preset(name: &str) -> Error {
    Error::Invalid {
        field: "model.preset",
        value: name.to_string(),
        reason: format!("unknown preset; use one of: {}", presets::known_names()),
    }
}

/// Where a run's initial weights come from: `model.init_from`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitFrom {
    /// `""`: a seeded random initialisation.
    Random,
    /// `hf:DIR`: a Hugging Face GPT-2 directory with `config.json` and `model.safetensors`.
    HuggingFace(PathBuf),
    /// `lockstep:DIR`: the model weights of a Lockstep checkpoint (`<checkpoint.dir>/step-00001200`).
    Lockstep(PathBuf),
}

impl InitFrom {
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Invalid {
            field: "model.init_from",
            value: text.to_string(),
            reason: reason.to_string(),
        };
        if text.is_empty() {
            return Ok(Self::Random);
        }
        let (scheme, dir) = text.split_once(':').ok_or_else(|| {
            bad(
                "must be empty (random initialisation), \"hf:DIR\" (a Hugging Face GPT-2 directory) or \
                 \"lockstep:DIR\" (a Lockstep checkpoint's step directory)",
            )
        })?;
        if dir.is_empty() {
            return Err(bad("names no directory after the colon"));
        }
        match scheme {
            "hf" => Ok(Self::HuggingFace(PathBuf::from(dir))),
            "lockstep" => Ok(Self::Lockstep(PathBuf::from(dir))),
            _ => Err(bad(
                "unknown source; use \"hf:DIR\" (a Hugging Face GPT-2 directory) or \"lockstep:DIR\" (a Lockstep \
                 checkpoint's step directory)",
            )),
        }
    }

    /// The directory the weights are read from; `None` for a random initialisation.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Self::Random => None,
            Self::HuggingFace(dir) | Self::Lockstep(dir) => Some(dir),
        }
    }
}

impl ModelSpec {
    /// `init_from`, parsed.
    pub fn init_source(&self) -> Result<InitFrom> {
        InitFrom::parse(&self.init_from)
    }
}

/// The shape keys of a GPT-2 `config.json` (Hugging Face's `GPT2Config` schema, which Lockstep's checkpoints
/// also use), under the run spec's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointShape {
    pub config_path: PathBuf,
    /// `block_size` is `n_positions` (or the older `n_ctx`); `positions` is `lockstep.positions` in Lockstep's own
    /// checkpoints, `learned` otherwise.
    pub shape: ModelShape,
}

impl CheckpointShape {
    /// Checks that `source`'s directory holds the files it needs and reads the shape from its `config.json`;
    /// `None` for a random initialisation.
    pub fn read(source: &InitFrom) -> Result<Option<Self>> {
        let Some(dir) = source.dir() else {
            return Ok(None);
        };
        let missing = |what: String| Error::Invalid {
            field: "model.init_from",
            value: match source {
                InitFrom::Lockstep(_) => format!("lockstep:{}", dir.display()),
                _ => format!("hf:{}", dir.display()),
            },
            reason: what,
        };
        if !dir.is_dir() {
            return Err(missing(format!(
                "{} is not a directory (relative paths are relative to the working directory)",
                dir.display()
            )));
        }
        let mut required = vec!["config.json", "model.safetensors"];
        if let InitFrom::Lockstep(_) = source {
            required.push("manifest.json");
        }
        for name in required {
            if dir.join(name).is_file() {
                continue;
            }
            let hint = match source {
                InitFrom::Lockstep(_) if has_step_dirs(dir) => {
                    "; this looks like a checkpoint.dir: name one of its step-* directories"
                }
                InitFrom::Lockstep(_) => "; name a complete checkpoint's step-* directory",
                _ => "; a Hugging Face directory needs config.json and model.safetensors (as save_pretrained writes)",
            };
            return Err(missing(format!("{} has no {name}{hint}", dir.display())));
        }
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Read {
            path: config_path.clone(),
            source,
        })?;
        let bad = |message: String| Error::Data {
            path: config_path.clone(),
            message,
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let field = |names: &[&str]| -> Result<usize> {
            for name in names {
                if let Some(x) = v.get(name).filter(|x| !x.is_null()) {
                    return x
                        .as_u64()
                        .and_then(|x| usize::try_from(x).ok())
                        .ok_or_else(|| bad(format!("field {name} = {x} is not a non-negative integer")));
                }
            }
            Err(bad(format!(
                "missing the field {}; is this a GPT-2 config.json?",
                names.join(" / ")
            )))
        };
        let positions = match v.pointer("/lockstep/positions") {
            None => Positions::Learned,
            Some(p) => match p.as_str() {
                Some("learned") => Positions::Learned,
                Some("sinusoidal") => Positions::Sinusoidal,
                _ => {
                    return Err(bad(format!(
                        "field lockstep.positions = {p} is not \"learned\" or \"sinusoidal\""
                    )));
                }
            },
        };
        let shape = ModelShape {
            n_layer: field(&["n_layer"])?,
            n_head: field(&["n_head"])?,
            n_embd: field(&["n_embd"])?,
            block_size: field(&["n_positions", "n_ctx"])?,
            vocab_size: field(&["vocab_size"])?,
            positions,
        };
        Ok(Some(Self { config_path, shape }))
    }

    /// The spec keys this shape fills in, for the config layer underneath the preset.
    fn defaults(&self) -> Vec<(&'static str, config::Value)> {
        vec![
            ("model.n_layer", (self.shape.n_layer as u64).into()),
            ("model.n_head", (self.shape.n_head as u64).into()),
            ("model.n_embd", (self.shape.n_embd as u64).into()),
            ("model.block_size", (self.shape.block_size as u64).into()),
            ("model.vocab_size", (self.shape.vocab_size as u64).into()),
            ("model.positions", positions_name(self.shape.positions).into()),
        ]
    }

    /// `model.KEY = ours vs KEY = theirs` for every shape field where `model` differs.
    pub fn differences(&self, model: &ModelSpec) -> Vec<String> {
        ModelShape::of(model).init_differences(&self.shape)
    }
}

/// The fields that fix a GPT-2 model's tensor shapes, compared wherever weights meet a run: the coordinator's
/// start-up check against `config.json` and the worker's check of the loaded weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub vocab_size: usize,
    pub positions: Positions,
}

impl ModelShape {
    pub fn of(model: &ModelSpec) -> Self {
        Self {
            n_layer: model.n_layer,
            n_head: model.n_head,
            n_embd: model.n_embd,
            block_size: model.block_size,
            vocab_size: model.vocab_size,
            positions: model.positions,
        }
    }

    /// [`ModelShape::differences`] for weights a run starts from, which may have a smaller vocabulary: the run's
    /// embedding then grows (new tokens, e.g. the chat template's, start at the mean of the old rows).
    pub fn init_differences(&self, theirs: &ModelShape) -> Vec<String> {
        let theirs = ModelShape {
            vocab_size: if self.vocab_size >= theirs.vocab_size {
                self.vocab_size
            } else {
                theirs.vocab_size
            },
            ..*theirs
        };
        self.differences(&theirs)
    }

    /// `model.KEY = ours vs KEY = theirs` (the spec's key, then `config.json`'s) for every field that differs.
    pub fn differences(&self, theirs: &ModelShape) -> Vec<String> {
        let rows: [(&str, &str, String, String); 6] = [
            (
                "n_layer",
                "n_layer",
                self.n_layer.to_string(),
                theirs.n_layer.to_string(),
            ),
            ("n_head", "n_head", self.n_head.to_string(), theirs.n_head.to_string()),
            ("n_embd", "n_embd", self.n_embd.to_string(), theirs.n_embd.to_string()),
            (
                "block_size",
                "n_positions",
                self.block_size.to_string(),
                theirs.block_size.to_string(),
            ),
            (
                "vocab_size",
                "vocab_size",
                self.vocab_size.to_string(),
                theirs.vocab_size.to_string(),
            ),
            (
                "positions",
                "lockstep.positions",
                positions_name(self.positions).to_string(),
                positions_name(theirs.positions).to_string(),
            ),
        ];
        rows.into_iter()
            .filter(|(_, _, ours, theirs)| ours != theirs)
            .map(|(key, hf_key, ours, theirs)| format!("model.{key} = {ours} vs {hf_key} = {theirs}"))
            .collect()
    }
}

fn positions_name(p: Positions) -> &'static str {
    match p {
        Positions::Learned => "learned",
        Positions::Sinusoidal => "sinusoidal",
    }
}

fn has_step_dirs(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("step-")))
    })
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
    fn an_env_override_with_one_underscore_is_refused_with_the_right_spelling() {
        let env = vec![("LOCKSTEP_TRAIN_TOTAL_STEPS".to_string(), "5".to_string())];
        let err = RunSpec::load_with_env(None, env).unwrap_err().to_string();
        assert!(err.contains("LOCKSTEP_TRAIN__TOTAL_STEPS"), "{err}");
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
    fn security_is_validated_and_left_out_of_the_training_hash() {
        let a = RunSpec::default();
        let mut b = a.clone();
        b.security.token_file = Some("/t".into());
        b.security.tls_cert = Some("/c.pem".into());
        b.security.tls_key = Some("/k.pem".into());
        b.security.tls_client_ca = Some("/ca.pem".into());
        b.security.max_message_bytes = 1 << 20;
        b.validate().unwrap();
        assert!(a.training_diff(&b).is_empty());
        assert_eq!(a.training_hash(), b.training_hash());
        assert_eq!(RunSpec::from_json(&b.to_json()).unwrap(), b);

        let err = |edit: fn(&mut SecuritySpec)| {
            let mut spec = RunSpec::default();
            edit(&mut spec.security);
            spec.validate().unwrap_err().to_string()
        };
        let e = err(|s| s.tls_cert = Some("/c.pem".into()));
        assert!(e.contains("security.tls_key") && e.contains("/c.pem"), "{e}");
        let e = err(|s| s.tls_key = Some("/k.pem".into()));
        assert!(e.contains("security.tls_cert") && e.contains("/k.pem"), "{e}");
        let e = err(|s| s.tls_client_ca = Some("/ca.pem".into()));
        assert!(e.contains("security.tls_client_ca") && e.contains("tls_cert"), "{e}");
        let e = err(|s| s.max_message_bytes = 100);
        assert!(e.contains("security.max_message_bytes"), "{e}");

        let spec =
            RunSpec::from_toml_str("[security]\ntoken_file = \"/run/token\"\nmax_message_bytes = 1048576\n").unwrap();
        assert_eq!(spec.security.token_file, Some(PathBuf::from("/run/token")));
        assert_eq!(spec.security.max_message_bytes, 1 << 20);
        // A spec from before the section existed (an old checkpoint's) still reads.
        let old = serde_json::json!({ "run": { "name": "old", "seed": 1 } }).to_string();
        assert_eq!(RunSpec::from_json(&old).unwrap().security, SecuritySpec::default());
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
mod preset_tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A stand-in for a Hugging Face GPT-2 directory: a `config.json` of this shape and an empty weights file
    /// (the spec only checks that it exists).
    pub(crate) fn hf_dir(dir: &Path, n_layer: usize, n_head: usize, n_embd: usize, n_positions: usize, vocab: usize) {
        std::fs::create_dir_all(dir).unwrap();
        let config = serde_json::json!({
            "model_type": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
            "n_positions": n_positions, "vocab_size": vocab, "activation_function": "gelu_new",
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"").unwrap();
    }

    #[test]
    fn preset_fills_the_shape_and_written_keys_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "run.toml", "[model]\npreset = \"gpt2\"\nn_layer = 3\n");
        let spec = RunSpec::load_with_env(Some(&path), env(&[("LOCKSTEP_MODEL__N_EMBD", "384")])).unwrap();
        let m = &spec.model;
        assert_eq!(m.preset, "gpt2");
        assert_eq!(
            (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size),
            (3, 12, 384, 1024, 50257)
        );
        // Everything outside the shape keeps its default.
        assert_eq!(spec.train, TrainSpec::default());
        assert_eq!(m.dropout, 0.0);
    }

    #[test]
    fn every_preset_resolves_from_the_environment() {
        for p in presets::PRESETS {
            let spec = RunSpec::load_with_env(None, env(&[("LOCKSTEP_MODEL__PRESET", p.name)])).unwrap();
            let m = &spec.model;
            assert_eq!(
                (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size),
                (p.n_layer, p.n_head, p.n_embd, p.block_size, p.vocab_size),
                "{}",
                p.name
            );
        }
        // `tiny` is the defaults' shape, and `custom` changes nothing.
        let tiny = RunSpec::load_with_env(None, env(&[("LOCKSTEP_MODEL__PRESET", "tiny")])).unwrap();
        assert!(tiny.training_diff(&RunSpec::default()).is_empty());
        let custom = RunSpec::from_toml_str("[model]\npreset = \"custom\"\n").unwrap();
        assert_eq!(custom, RunSpec::default());
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = RunSpec::from_toml_str("[model]\npreset = \"gpt3\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.preset") && err.contains("gpt3"), "{err}");
        assert!(
            err.contains("gpt2-medium") && err.contains("nanogpt-cpu") && err.contains("custom"),
            "{err}"
        );
        let mut spec = RunSpec::default();
        spec.model.preset = "huge".into();
        assert!(spec.validate().unwrap_err().to_string().contains("gpt2-xl"));
    }

    #[test]
    fn preset_is_not_part_of_the_training_hash_but_init_from_is() {
        let a = RunSpec::default();
        let mut b = a.clone();
        b.model.preset = "tiny".into();
        assert_eq!(a.training_hash(), b.training_hash());
        b.model.init_from = "hf:x".into();
        assert_eq!(
            a.training_diff(&b),
            vec!["model.init_from: (absent) vs \"hf:x\"".to_string()]
        );
    }

    #[test]
    fn init_from_implies_the_shape() {
        let dir = tempfile::tempdir().unwrap();
        let hf = dir.path().join("hf model");
        hf_dir(&hf, 3, 2, 16, 48, 50);
        let text = format!("[model]\ninit_from = \"hf:{}\"\n", hf.display());
        let spec = RunSpec::from_toml_str(&text).unwrap();
        let m = &spec.model;
        assert_eq!(
            (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size),
            (3, 2, 16, 48, 50)
        );
        assert_eq!(m.init_source().unwrap(), InitFrom::HuggingFace(hf.clone()));
        // A shape key that agrees may be written too.
        let text = format!("[model]\ninit_from = \"hf:{}\"\nn_layer = 3\n", hf.display());
        assert_eq!(RunSpec::from_toml_str(&text).unwrap(), spec);
        // Lockstep's own config.json says which positions it uses.
        let ours = dir.path().join("step-00000010");
        hf_dir(&ours, 1, 2, 8, 64, 13);
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ours.join("config.json")).unwrap()).unwrap();
        config["lockstep"] = serde_json::json!({ "positions": "sinusoidal" });
        std::fs::write(ours.join("config.json"), config.to_string()).unwrap();
        std::fs::write(ours.join("manifest.json"), "{}").unwrap();
        let text = format!("[model]\ninit_from = \"lockstep:{}\"\n", ours.display());
        let spec = RunSpec::from_toml_str(&text).unwrap();
        assert_eq!(spec.model.positions, Positions::Sinusoidal);
        assert_eq!(spec.model.n_embd, 8);
    }

    #[test]
    fn init_from_shape_mismatch_names_every_differing_field() {
        let dir = tempfile::tempdir().unwrap();
        let hf = dir.path().join("hf");
        hf_dir(&hf, 2, 4, 48, 32, 97);
        let text = format!(
            "[model]\npreset = \"gpt2\"\ninit_from = \"hf:{}\"\nn_embd = 48\n",
            hf.display()
        );
        let err = RunSpec::from_toml_str(&text).unwrap_err().to_string();
        for want in [
            "model.init_from",
            "config.json",
            "model.n_layer = 12 vs n_layer = 2",
            "model.n_head = 12 vs n_head = 4",
            "model.block_size = 1024 vs n_positions = 32",
        ] {
            assert!(err.contains(want), "{want:?} not in: {err}");
        }
        // A larger vocabulary than the checkpoint's is not a mismatch: the embedding grows.
        assert!(!err.contains("model.n_embd") && !err.contains("vocab_size"), "{err}");
        let smaller = format!(
            "[model]\ninit_from = \"hf:{}\"\nvocab_size = 50\n[train]\nseq_len = 16\n",
            hf.display()
        );
        let err = RunSpec::from_toml_str(&smaller).unwrap_err().to_string();
        assert!(err.contains("model.vocab_size = 50 vs vocab_size = 97"), "{err}");
        // The same check runs on a spec that was built in code.
        let mut spec = RunSpec::default();
        spec.model.init_from = format!("hf:{}", hf.display());
        let err = spec.check_init_from().unwrap_err().to_string();
        assert!(err.contains("model.n_embd = 64 vs n_embd = 48"), "{err}");
    }

    #[test]
    fn init_from_missing_files_and_bad_syntax_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let load = |init: String| {
            RunSpec::load_with_env(None, env(&[("LOCKSTEP_MODEL__INIT_FROM", &init)]))
                .unwrap_err()
                .to_string()
        };
        let absent = dir.path().join("absent");
        let err = load(format!("hf:{}", absent.display()));
        assert!(
            err.contains("model.init_from") && err.contains("absent") && err.contains("not a directory"),
            "{err}"
        );

        let hf = dir.path().join("hf");
        hf_dir(&hf, 2, 4, 48, 32, 97);
        std::fs::remove_file(hf.join("model.safetensors")).unwrap();
        let err = load(format!("hf:{}", hf.display()));
        assert!(err.contains("model.safetensors"), "{err}");

        // A Lockstep checkpoint needs its manifest; a checkpoint.dir gets a hint to name a step directory.
        let root = dir.path().join("ckpt");
        hf_dir(&root.join("step-00000005"), 2, 4, 48, 32, 97);
        let err = load(format!("lockstep:{}", root.join("step-00000005").display()));
        assert!(err.contains("manifest.json"), "{err}");
        let err = load(format!("lockstep:{}", root.display()));
        assert!(err.contains("step-*"), "{err}");

        std::fs::write(hf.join("model.safetensors"), b"").unwrap();
        std::fs::write(hf.join("config.json"), "{\"n_layer\": 2}").unwrap();
        let err = load(format!("hf:{}", hf.display()));
        assert!(err.contains("config.json") && err.contains("n_head"), "{err}");

        for bad in ["gpt2", "s3:bucket/gpt2", "hf:"] {
            let err = load(bad.to_string());
            assert!(err.contains("model.init_from") && err.contains(bad), "{bad}: {err}");
        }
        // Syntax is checked without the disk too (a spec arriving over the wire).
        let mut spec = RunSpec::default();
        spec.model.init_from = "gpt2".into();
        assert!(spec.validate().unwrap_err().to_string().contains("hf:DIR"));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped examples must stay valid as the spec evolves. An example that starts from Hugging Face
    /// weights gets a stand-in directory with the real GPT-2 small `config.json` shape.
    #[test]
    fn every_deploy_example_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let stand_in = tempfile::tempdir().unwrap();
        super::preset_tests::hf_dir(stand_in.path(), 12, 12, 768, 1024, 50257);
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let env = if text.contains("init_from = \"hf:") {
                    vec![(
                        "LOCKSTEP_MODEL__INIT_FROM".to_string(),
                        format!("hf:{}", stand_in.path().display()),
                    )]
                } else {
                    vec![]
                };
                RunSpec::load_with_env(Some(&path), env).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 4);
    }

    /// The benchmark example is the nanogpt-cpu preset with the vocabulary padded to 65.
    #[test]
    fn nanogpt_example_uses_its_preset() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/nanogpt-cpu.toml");
        let m = RunSpec::load_with_env(Some(&path), vec![]).unwrap().model;
        assert_eq!(
            (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size),
            (4, 4, 128, 64, 65)
        );
    }

    /// The fully written-out demo equals the defaults it documents.
    #[test]
    fn addition_example_is_the_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/addition.toml");
        assert_eq!(RunSpec::load_with_env(Some(&path), vec![]).unwrap(), RunSpec::default());
    }
}
