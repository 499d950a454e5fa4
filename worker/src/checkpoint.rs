//! Checkpoints (DESIGN §5): `<root>/step-00000120/` with `model.safetensors` + `config.json` (Hugging Face GPT-2
//! layout, so `transformers` loads it), `optimizer.safetensors`, `trainer.json`, `tokenizer.json`, `spec.json` and
//! `manifest.json` (SHA-256 and size of every other file).
//!
//! A checkpoint is written into a hidden temporary directory inside `root`, every file and the directory are
//! fsynced, and only then is it renamed into place (and the parent fsynced): a crash leaves either the old state
//! or the complete new checkpoint, never a half-written `step-*` directory. The manifest is written last, so a
//! `step-*` directory without one is not a checkpoint.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lockstep_common::RunSpec;
use lockstep_common::data::Tokenizer;
use lockstep_common::data::chat::ChatTemplate;
use lockstep_common::spec::{DataSource, ModelShape};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::{Gpt, GptConfig, param_specs};
use crate::optim::AdamW;
use crate::params::Params;

pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const SPEC_FILE: &str = "spec.json";
pub const MANIFEST_FILE: &str = "manifest.json";

/// The optimizer's step count travels inside `optimizer.safetensors` (as a one-element i64 tensor) because it can
/// differ from the trainer's step (skipped non-finite steps) and Adam's bias correction depends on it.
const OPTIMIZER_STEPS_TENSOR: &str = "lockstep.optimizer_steps";

/// Where training stands: saved as `trainer.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed; the checkpoint directory is named after it.
    pub step: u64,
    /// Sequences consumed (the data plan's cursor).
    pub data_cursor: u64,
    /// World size at save time (informational: resuming on another world size is allowed).
    pub world_size: u32,
    /// `RunSpec::training_hash` of the run that wrote it.
    pub spec_hash: String,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub step: u64,
    /// File name (inside the checkpoint directory) → digest and size.
    pub files: BTreeMap<String, ManifestEntry>,
}

const MANIFEST_FORMAT: &str = "lockstep-checkpoint";
const MANIFEST_VERSION: u32 = 1;

/// The directory name of the checkpoint after `step` steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn ckpt_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn fsync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("fsync {}", path.display())))
}

fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("fsync directory {}", path.display())))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(io_err(format!("write {}", path.display())))
}

/// SHA-256 (hex) and size of a file, streamed.
fn digest_file(path: &Path) -> Result<ManifestEntry> {
    let mut file = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(io_err(format!("read {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(ManifestEntry {
        sha256: hex::encode(hasher.finalize()),
        bytes,
    })
}

fn save_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(&tensors, path).map_err(|e| ckpt_err(path, format!("cannot write tensors: {e}")))
}

/// Writes the checkpoint of `state.step` under `root` and returns its path. Re-saving an existing step replaces it.
/// Nothing older is deleted here: only [`prune_committed`], once the coordinator has committed a newer checkpoint.
pub fn save(
    root: &Path,
    state: &TrainerState,
    params: &Params,
    cfg: &GptConfig,
    opt: &AdamW,
    tokenizer: &Tokenizer,
    spec_json: &str,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io_err(format!("create checkpoint directory {}", root.display())))?;
    let name = step_dir_name(state.step);
    let final_dir = root.join(&name);
    // A fixed temporary name: a leftover from a crashed save of the same step is simply replaced.
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(format!("remove stale {}", tmp.display())))?;
    }
    std::fs::create_dir(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;

    let model: HashMap<String, Tensor> = params
        .names()
        .iter()
        .zip(params.vars())
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    save_tensors(&tmp.join(MODEL_FILE), model)?;

    let mut optim: HashMap<String, Tensor> = opt.state(params).into_iter().collect();
    let steps =
        i64::try_from(opt.steps_taken()).map_err(|_| Error::Model("optimizer step count overflows i64".into()))?;
    optim.insert(OPTIMIZER_STEPS_TENSOR.into(), Tensor::new(&[steps], &Device::Cpu)?);
    save_tensors(&tmp.join(OPTIMIZER_FILE), optim)?;

    write_file(&tmp.join(CONFIG_FILE), to_json(&cfg.to_hf_config())?.as_bytes())?;
    write_file(&tmp.join(TRAINER_FILE), to_json(state)?.as_bytes())?;
    write_file(&tmp.join(SPEC_FILE), spec_json.as_bytes())?;
    tokenizer.save(&tmp.join(TOKENIZER_FILE))?;

    let mut files = BTreeMap::new();
    for file in [
        MODEL_FILE,
        CONFIG_FILE,
        OPTIMIZER_FILE,
        TRAINER_FILE,
        TOKENIZER_FILE,
        SPEC_FILE,
    ] {
        let path = tmp.join(file);
        fsync_file(&path)?;
        files.insert(file.to_string(), digest_file(&path)?);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        step: state.step,
        files,
    };
    let manifest_path = tmp.join(MANIFEST_FILE);
    write_file(&manifest_path, to_json(&manifest)?.as_bytes())?;
    fsync_file(&manifest_path)?;
    fsync_dir(&tmp)?;

    if final_dir.exists() {
        // rename(2) cannot replace a non-empty directory: move the old one aside first, so at every instant
        // either the old or the new checkpoint is complete on disk.
        let old = root.join(format!(".old-{name}"));
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err(format!("remove stale {}", old.display())))?;
        }
        std::fs::rename(&final_dir, &old).map_err(io_err(format!("move aside {}", final_dir.display())))?;
        std::fs::rename(&tmp, &final_dir).map_err(io_err(format!("rename {} into place", tmp.display())))?;
        fsync_dir(root)?;
        std::fs::remove_dir_all(&old).map_err(io_err(format!("remove replaced {}", old.display())))?;
    } else {
        std::fs::rename(&tmp, &final_dir).map_err(io_err(format!("rename {} into place", tmp.display())))?;
    }
    fsync_dir(root)?;
    Ok(final_dir)
}

/// Serialising our own plain structs and `serde_json::Value`s cannot fail in practice; the error is still mapped
/// rather than unwrapped.
fn to_json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string_pretty(value).map_err(|e| Error::Model(format!("cannot serialise JSON: {e}")))
}

/// `step-*` directories under `root` (complete or not), with their step numbers, oldest first.
pub fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                context: format!("list {}", root.display()),
                source: e,
            });
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(format!("list {}", root.display())))?;
        if let Some(step) = entry.file_name().to_str().and_then(parse_step_dir)
            && entry.path().is_dir()
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Where an assignment's checkpoints go and how many of them stay on disk: its spec's `checkpoint.dir` and
/// `checkpoint.keep` (0 = all). The writer and the pruner both take them from here, so they agree on the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub root: PathBuf,
    pub keep: usize,
}

impl Retention {
    pub fn of(spec: &RunSpec) -> Self {
        Self {
            root: spec.checkpoint.dir.clone(),
            keep: spec.checkpoint.keep,
        }
    }
}

/// Deletes the `step-*` directories under `root` older than the newest `keep` (0 = keep all) of those at or before
/// `committed`, the newest step the coordinator has committed. Anything newer than `committed` stays: it may not be
/// committed yet, and until it is, an older checkpoint is what a restart resumes from.
pub fn prune_committed(root: &Path, keep: usize, committed: u64) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let settled: Vec<(u64, PathBuf)> = step_dirs(root)?
        .into_iter()
        .filter(|(step, _)| *step <= committed)
        .collect();
    let excess = settled.len().saturating_sub(keep);
    for (_, path) in settled.into_iter().take(excess) {
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            // Already gone (another pruner, or an operator): what was asked for holds.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Io {
                    context: format!("remove old checkpoint {}", path.display()),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// The newest complete checkpoint under `root` (a `step-*` directory with a manifest), if any. It does not verify
/// the hashes: [`load`] and [`verify`] do.
pub fn newest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(step_dirs(root)?
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .find(|p| p.join(MANIFEST_FILE).is_file()))
}

/// Reads the manifest and checks every listed file's size and SHA-256; the error names the damaged file.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ckpt_err(
            &path,
            format!("cannot read the manifest ({e}); the checkpoint is incomplete"),
        )
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| ckpt_err(&path, format!("not a checkpoint manifest: {e}")))?;
    if manifest.format != MANIFEST_FORMAT || manifest.version != MANIFEST_VERSION {
        return Err(ckpt_err(
            &path,
            format!(
                "manifest format {} v{} is not {MANIFEST_FORMAT} v{MANIFEST_VERSION}",
                manifest.format, manifest.version
            ),
        ));
    }
    for required in [
        MODEL_FILE,
        CONFIG_FILE,
        OPTIMIZER_FILE,
        TRAINER_FILE,
        TOKENIZER_FILE,
        SPEC_FILE,
    ] {
        if !manifest.files.contains_key(required) {
            return Err(ckpt_err(&path, format!("the manifest does not list {required}")));
        }
    }
    for (name, want) in &manifest.files {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(ckpt_err(
                &path,
                format!("the manifest lists an invalid file name {name:?}"),
            ));
        }
        let file = dir.join(name);
        let got =
            digest_file(&file).map_err(|e| ckpt_err(&file, format!("listed in the manifest but unreadable: {e}")))?;
        if got.bytes != want.bytes {
            return Err(ckpt_err(
                &file,
                format!(
                    "damaged: {} bytes, the manifest says {}; use an older checkpoint",
                    got.bytes, want.bytes
                ),
            ));
        }
        if got.sha256 != want.sha256 {
            return Err(ckpt_err(
                &file,
                "damaged: SHA-256 differs from the manifest; use an older checkpoint",
            ));
        }
    }
    Ok(manifest)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ckpt_err(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| ckpt_err(path, format!("invalid JSON: {e}")))
}

pub struct LoadedModel {
    pub cfg: GptConfig,
    pub varmap: VarMap,
    pub tokenizer: Tokenizer,
    pub state: TrainerState,
    pub spec_json: String,
}

impl LoadedModel {
    /// The GPT over these parameters, in f32 on the device the checkpoint was loaded to.
    pub fn model(&self) -> Result<Gpt> {
        let device = self
            .varmap
            .all_vars()
            .first()
            .map_or(Device::Cpu, |v| v.device().clone());
        Gpt::new(VarBuilder::from_varmap(&self.varmap, DType::F32, &device), &self.cfg)
    }

    /// The chat template, if this is a chat model: one fine-tuned on conversations (`data.source = "sft"`), whose
    /// vocabulary holds the template's special tokens.
    pub fn chat_template(&self) -> Option<ChatTemplate> {
        let spec = RunSpec::from_json(&self.spec_json).ok()?;
        let template = ChatTemplate::new(&self.tokenizer);
        (spec.data.source == DataSource::Sft && self.cfg.vocab_size >= template.vocab_size()).then_some(template)
    }
}

/// Loads a verified checkpoint for inference (or as the model half of a resume).
pub fn load(dir: &Path, device: &Device) -> Result<LoadedModel> {
    verify(dir)?;
    let (cfg, varmap) = load_hf(dir, device)?;
    let tok_path = dir.join(TOKENIZER_FILE);
    let tokenizer = Tokenizer::load(&tok_path).map_err(|e| ckpt_err(&tok_path, e.to_string()))?;
    let state: TrainerState = read_json(&dir.join(TRAINER_FILE))?;
    let spec_path = dir.join(SPEC_FILE);
    let spec_json =
        std::fs::read_to_string(&spec_path).map_err(|e| ckpt_err(&spec_path, format!("cannot read: {e}")))?;
    Ok(LoadedModel {
        cfg,
        varmap,
        tokenizer,
        state,
        spec_json,
    })
}

/// Loads `config.json` + `model.safetensors` of any Hugging Face GPT-2 directory (ours or `save_pretrained`'s; no
/// manifest needed) into a `VarMap` of f32 variables on `device`. Every expected tensor must be present with its
/// shape; the tied `lm_head.weight` and the old attention-mask buffers are ignored, and names saved without the
/// `transformer.` prefix (the original GPT-2 checkpoints) are accepted.
pub fn load_hf(dir: &Path, device: &Device) -> Result<(GptConfig, VarMap)> {
    let config_path = dir.join(CONFIG_FILE);
    let cfg =
        GptConfig::from_hf_config(&read_json(&config_path)?).map_err(|e| ckpt_err(&config_path, e.to_string()))?;
    let model_path = dir.join(MODEL_FILE);
    let mut tensors = candle_core::safetensors::load(&model_path, device)
        .map_err(|e| ckpt_err(&model_path, format!("cannot read tensors: {e}")))?;
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Model("variable map lock poisoned".into()))?;
        for (name, shape, _) in param_specs(&cfg) {
            let short = name.strip_prefix("transformer.").unwrap_or(&name).to_string();
            let tensor = tensors
                .remove(&name)
                .or_else(|| tensors.remove(&short))
                .ok_or_else(|| ckpt_err(&model_path, format!("missing tensor {name} (shape {shape:?})")))?;
            if tensor.dims() != shape.as_slice() {
                return Err(ckpt_err(
                    &model_path,
                    format!(
                        "tensor {name} has shape {:?}; config.json implies {shape:?}",
                        tensor.dims()
                    ),
                ));
            }
            data.insert(name, Var::from_tensor(&tensor.to_dtype(DType::F32)?)?);
        }
    }
    Ok((cfg, varmap))
}

/// Checks that weights read from `dir` (a checkpoint or a Hugging Face directory, whose `config.json` says
/// `theirs`) fit the run's model `ours`; the error names every differing field with both values. Dropout and the
/// initialisation scale are training settings, not shape, and may differ.
pub fn check_shape(ours: &GptConfig, theirs: &GptConfig, dir: &Path) -> Result<()> {
    let shape = |c: &GptConfig| ModelShape {
        n_layer: c.n_layer,
        n_head: c.n_head,
        n_embd: c.n_embd,
        block_size: c.block_size,
        vocab_size: c.vocab_size,
        positions: c.positions,
    };
    let mut diffs = shape(ours).differences(&shape(theirs));
    if ours.layer_norm_eps != theirs.layer_norm_eps {
        diffs.push(format!(
            "the LayerNorm epsilon (fixed) = {:e} vs layer_norm_epsilon = {:e}",
            ours.layer_norm_eps, theirs.layer_norm_eps
        ));
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(ckpt_err(
        &dir.join(CONFIG_FILE),
        format!(
            "the weights do not fit the run's model: {}; make the run spec's model section match (or remove its \
             shape keys and model.preset so that model.init_from supplies them)",
            diffs.join(", ")
        ),
    ))
}

/// [`check_shape`] for weights a run starts from (`model.init_from`): the run's vocabulary may be larger than
/// theirs (fine-tuning adds the chat template's tokens), and [`grow_embedding`] then makes room.
pub fn check_init_shape(ours: &GptConfig, theirs: &GptConfig, dir: &Path) -> Result<()> {
    // A larger vocabulary of ours is no difference; a smaller one still is.
    let theirs = GptConfig {
        vocab_size: theirs.vocab_size.max(ours.vocab_size),
        ..theirs.clone()
    };
    check_shape(ours, &theirs, dir)
}

/// The name of the token embedding (tied to the LM head).
const WTE: &str = "transformer.wte.weight";

/// Grows the token embedding in `varmap` to `vocab` rows (nothing if it has as many already): the new rows are the
/// mean of the old ones, so a new token starts out as an average token — its logit is the average logit, neither
/// dominant nor impossible — instead of noise (Hugging Face's `resize_token_embeddings` does the same). Returns the
/// rows it had.
pub fn grow_embedding(varmap: &VarMap, vocab: usize) -> Result<usize> {
    let mut data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Model("variable map lock poisoned".into()))?;
    let wte = data
        .get(WTE)
        .ok_or_else(|| Error::Model(format!("the weights have no {WTE}")))?;
    let (from, c) = wte.as_tensor().dims2()?;
    if vocab > from {
        let old = wte.as_tensor().detach();
        let extra = old.mean_keepdim(0)?.broadcast_as((vocab - from, c))?.contiguous()?;
        let grown = Var::from_tensor(&Tensor::cat(&[&old, &extra], 0)?)?;
        data.insert(WTE.to_string(), grown);
    }
    Ok(from)
}

/// A loaded model with its embedding grown to `vocab` rows ([`grow_embedding`]): what fine-tuning starts from,
/// e.g. to score a pretrained model through the chat template before fine-tuning.
pub fn grow_vocab(mut loaded: LoadedModel, vocab: usize) -> Result<LoadedModel> {
    grow_embedding(&loaded.varmap, vocab)?;
    loaded.cfg.vocab_size = loaded.cfg.vocab_size.max(vocab);
    Ok(loaded)
}

/// Checks that `dir` is a checkpoint (a directory with a manifest) before it is loaded, so that naming a
/// `checkpoint.dir` instead of one of its `step-*` directories gets an error that says so.
pub fn check_is_checkpoint(dir: &Path) -> Result<()> {
    if dir.join(MANIFEST_FILE).is_file() {
        return Ok(());
    }
    let message = match newest(dir)? {
        Some(step) => format!(
            "not a checkpoint but a checkpoint directory; name one of its step directories, e.g. the newest: {}",
            step.display()
        ),
        None if dir.is_dir() => format!("not a checkpoint: it has no {MANIFEST_FILE} (an incomplete write?)"),
        None => "no such directory".to_string(),
    };
    Err(ckpt_err(dir, message))
}

/// Restores the optimizer's moments and step count from a checkpoint directory (already verified by [`load`]).
pub fn restore_optimizer(dir: &Path, params: &Params, opt: &mut AdamW) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let device = params.vars().first().map_or(Device::Cpu, |v| v.device().clone());
    let mut tensors = candle_core::safetensors::load(&path, &device)
        .map_err(|e| ckpt_err(&path, format!("cannot read tensors: {e}")))?;
    let steps = tensors
        .remove(OPTIMIZER_STEPS_TENSOR)
        .ok_or_else(|| ckpt_err(&path, format!("missing tensor {OPTIMIZER_STEPS_TENSOR}")))?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let steps = match steps.as_slice() {
        [s] if *s >= 0 => *s as u64,
        _ => {
            return Err(ckpt_err(
                &path,
                format!("tensor {OPTIMIZER_STEPS_TENSOR} is not one non-negative count"),
            ));
        }
    };
    opt.load_state(params, &tensors, steps)
        .map_err(|e| ckpt_err(&path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init_varmap;
    use crate::optim::AdamWConfig;
    use lockstep_common::spec::{Positions, TokenizerSpec};

    fn cfg() -> GptConfig {
        GptConfig {
            vocab_size: 13,
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            block_size: 8,
            dropout: 0.0,
            positions: Positions::Sinusoidal,
            init_std: 0.02,
            layer_norm_eps: 1e-5,
        }
    }

    struct Fixture {
        cfg: GptConfig,
        params: Params,
        opt: AdamW,
        tok: Tokenizer,
    }

    fn fixture() -> Fixture {
        let cfg = cfg();
        let vm = init_varmap(&cfg, 5, &Device::Cpu).unwrap();
        let params = Params::from_varmap(&vm).unwrap();
        let mut opt = AdamW::new(
            &params,
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            },
        )
        .unwrap();
        let grads: Vec<f32> = (0..params.num_elements()).map(|i| (i as f32 * 0.37).sin()).collect();
        opt.step(&params, &params.unflatten(&grads).unwrap(), 1e-2).unwrap();
        let tok = Tokenizer::for_text(&TokenizerSpec::Char, "0123456789+=\n").unwrap();
        Fixture { cfg, params, opt, tok }
    }

    fn state(step: u64) -> TrainerState {
        TrainerState {
            step,
            data_cursor: step * 32,
            world_size: 2,
            spec_hash: "abc".into(),
            seed: 1337,
        }
    }

    fn save_at(root: &Path, f: &Fixture, step: u64) -> PathBuf {
        save(root, &state(step), &f.params, &f.cfg, &f.opt, &f.tok, "{\"spec\":1}").unwrap()
    }

    /// The names under `root`, sorted.
    fn names(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn round_trip_gives_identical_tensors_and_state() {
        let root = tempfile::tempdir().unwrap();
        let f = fixture();
        let dir = save_at(root.path(), &f, 120);
        assert_eq!(dir, root.path().join("step-00000120"));
        let loaded = load(&dir, &Device::Cpu).unwrap();
        assert_eq!(loaded.cfg, f.cfg);
        assert_eq!(loaded.tokenizer, f.tok);
        assert_eq!(loaded.state, state(120));
        assert_eq!(loaded.spec_json, "{\"spec\":1}");
        let back = Params::from_varmap(&loaded.varmap).unwrap();
        assert_eq!(back.names(), f.params.names());
        for (a, b) in back.vars().iter().zip(f.params.vars()) {
            assert_eq!(values(a.as_tensor()), values(b.as_tensor()));
        }
        assert_eq!(back.checksum().unwrap(), f.params.checksum().unwrap());

        let mut opt = AdamW::new(
            &back,
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            },
        )
        .unwrap();
        restore_optimizer(&dir, &back, &mut opt).unwrap();
        assert_eq!(opt.steps_taken(), 1);
        for ((n1, t1), (n2, t2)) in f.opt.state(&f.params).iter().zip(opt.state(&back).iter()) {
            assert_eq!(n1, n2);
            assert_eq!(values(t1), values(t2), "{n1}");
        }
        // No temporary directories are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("step-00000120")]);
    }

    #[test]
    fn corrupted_file_is_detected_and_named() {
        let root = tempfile::tempdir().unwrap();
        let f = fixture();
        let dir = save_at(root.path(), &f, 3);
        let model = dir.join(MODEL_FILE);
        let mut bytes = std::fs::read(&model).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&model, &bytes).unwrap();
        let err = load(&dir, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("model.safetensors") && err.contains("damaged"), "{err}");

        std::fs::write(dir.join(TRAINER_FILE), "{}").unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") || err.contains("trainer.json"),
            "{err}"
        );
    }

    #[test]
    fn save_deletes_nothing_prune_keeps_the_newest_committed_and_resave_replaces() {
        let root = tempfile::tempdir().unwrap();
        let f = fixture();
        for step in [10, 20, 30, 40] {
            save_at(root.path(), &f, step);
        }
        assert_eq!(
            names(root.path()),
            ["step-00000010", "step-00000020", "step-00000030", "step-00000040"]
        );
        prune_committed(root.path(), 2, 40).unwrap();
        assert_eq!(names(root.path()), ["step-00000030", "step-00000040"]);
        assert_eq!(newest(root.path()).unwrap(), Some(root.path().join("step-00000040")));
        // A re-formed run resumed further back and committed an older step: keeping 1 keeps that one, and the
        // newer directories stay, since nothing says they are not still needed.
        save_at(root.path(), &f, 5);
        prune_committed(root.path(), 1, 5).unwrap();
        assert_eq!(names(root.path()), ["step-00000005", "step-00000030", "step-00000040"]);
        // Re-saving an existing step replaces it in place.
        let dir = save_at(root.path(), &f, 40);
        verify(&dir).unwrap();
        assert_eq!(names(root.path()), ["step-00000005", "step-00000030", "step-00000040"]);
        prune_committed(root.path(), 1, 40).unwrap();
        assert_eq!(names(root.path()), ["step-00000040"]);
        // An incomplete directory (no manifest) is not a checkpoint.
        std::fs::create_dir(root.path().join("step-00000099")).unwrap();
        assert_eq!(newest(root.path()).unwrap(), Some(root.path().join("step-00000040")));
        assert_eq!(newest(&root.path().join("absent")).unwrap(), None);
    }

    /// The reviewer's interleaving: 500, 1000 and 1500 committed, then 2000..3000 written while the coordinator was
    /// away. Until it confirms one of those, the committed ones are what a restart resumes from.
    #[test]
    fn prune_never_counts_checkpoints_newer_than_the_committed_one() {
        let root = tempfile::tempdir().unwrap();
        let steps = |from: u64| -> Vec<String> { (from..=3000).step_by(500).map(step_dir_name).collect() };
        for step in (500..=3000).step_by(500) {
            std::fs::create_dir(root.path().join(step_dir_name(step))).unwrap();
        }
        std::fs::create_dir(root.path().join(".tmp-step-00003500")).unwrap();
        std::fs::write(root.path().join("notes"), "not a checkpoint").unwrap();
        let listed =
            |root: &Path| -> Vec<String> { names(root).into_iter().filter(|n| n.starts_with("step-")).collect() };

        prune_committed(root.path(), 3, 1500).unwrap();
        assert_eq!(listed(root.path()), steps(500));
        prune_committed(root.path(), 3, 2000).unwrap();
        assert_eq!(listed(root.path()), steps(1000));
        // A confirmation that comes late (an older step than one already pruned for) deletes nothing new.
        prune_committed(root.path(), 3, 1500).unwrap();
        assert_eq!(listed(root.path()), steps(1000));
        prune_committed(root.path(), 1, 3000).unwrap();
        assert_eq!(listed(root.path()), steps(3000));
        // Only `step-*` directories are checkpoints to prune.
        assert!(root.path().join(".tmp-step-00003500").is_dir());
        assert!(root.path().join("notes").is_file());
    }

    #[test]
    fn keep_zero_keeps_every_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        for step in [1, 2, 3] {
            std::fs::create_dir(root.path().join(step_dir_name(step))).unwrap();
        }
        prune_committed(root.path(), 0, 3).unwrap();
        assert_eq!(names(root.path()), ["step-00000001", "step-00000002", "step-00000003"]);
        // Nothing written yet: nothing to prune, and no error.
        prune_committed(&root.path().join("absent"), 2, 3).unwrap();
    }

    /// Interop, Lockstep → Hugging Face: for the config of the fixture that `save_pretrained` wrote, our
    /// checkpoint has exactly its tensor names, shapes and dtypes (no `lm_head.weight`: it is tied), and a
    /// `config.json` with the keys `transformers` reads, agreeing with the fixture's on every key both have.
    #[test]
    fn checkpoint_has_the_layout_of_hf_save_pretrained() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny");
        let hf_config: serde_json::Value = read_json(&fixture.join(CONFIG_FILE)).unwrap();
        let cfg = GptConfig::from_hf_config(&hf_config).unwrap();
        let params = Params::from_varmap(&init_varmap(&cfg, 3, &Device::Cpu).unwrap()).unwrap();
        let opt = AdamW::new(
            &params,
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            },
        )
        .unwrap();
        let root = tempfile::tempdir().unwrap();
        let tok = Tokenizer::for_text(&TokenizerSpec::Char, "0123456789+=\n").unwrap();
        let dir = save(root.path(), &state(1), &params, &cfg, &opt, &tok, "{}").unwrap();

        let layout = |path: &Path| -> BTreeMap<String, (Vec<usize>, DType)> {
            candle_core::safetensors::load(path, &Device::Cpu)
                .unwrap()
                .into_iter()
                .map(|(name, t)| (name, (t.dims().to_vec(), t.dtype())))
                .collect()
        };
        let ours = layout(&dir.join(MODEL_FILE));
        let theirs = layout(&fixture.join(MODEL_FILE));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "tensor names"
        );
        assert_eq!(ours, theirs, "shapes and dtypes");

        let our_config: serde_json::Value = read_json(&dir.join(CONFIG_FILE)).unwrap();
        assert_eq!(GptConfig::from_hf_config(&our_config).unwrap(), cfg);
        // What GPT2Config and GPT2LMHeadModel.from_pretrained need to rebuild the same architecture.
        for key in [
            "model_type",
            "architectures",
            "vocab_size",
            "n_positions",
            "n_embd",
            "n_layer",
            "n_head",
            "n_inner",
            "activation_function",
            "layer_norm_epsilon",
            "tie_word_embeddings",
            "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx",
            "reorder_and_upcast_attn",
            "resid_pdrop",
            "embd_pdrop",
            "attn_pdrop",
            "initializer_range",
        ] {
            let (a, b) = (&our_config[key], &hf_config[key]);
            assert!(!a.is_null() || key == "n_inner", "config.json lacks {key}");
            let same = match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => x == y,
                _ => a == b,
            };
            assert!(same, "config.json {key}: ours {a}, save_pretrained's {b}");
        }
    }

    #[test]
    fn shape_check_names_each_field_and_checkpoint_roots_get_a_hint() {
        let ours = cfg();
        let theirs = GptConfig {
            n_layer: 3,
            positions: Positions::Learned,
            dropout: 0.3,
            ..cfg()
        };
        let err = check_shape(&ours, &theirs, Path::new("/models/x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/models/x/config.json"), "{err}");
        assert!(err.contains("model.n_layer = 1 vs n_layer = 3"), "{err}");
        assert!(
            err.contains("model.positions = sinusoidal vs lockstep.positions = learned"),
            "{err}"
        );
        assert!(!err.contains("dropout"), "{err}");
        check_shape(&ours, &GptConfig { dropout: 0.3, ..cfg() }, Path::new("x")).unwrap();

        let root = tempfile::tempdir().unwrap();
        let err = check_is_checkpoint(root.path()).unwrap_err().to_string();
        assert!(err.contains("manifest.json"), "{err}");
        let dir = save_at(root.path(), &fixture(), 7);
        check_is_checkpoint(&dir).unwrap();
        let err = check_is_checkpoint(root.path()).unwrap_err().to_string();
        assert!(err.contains("step-00000007"), "{err}");
        let err = check_is_checkpoint(&root.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("no such directory"), "{err}");
    }

    #[test]
    fn missing_or_misshaped_tensor_is_named() {
        let root = tempfile::tempdir().unwrap();
        let f = fixture();
        let dir = save_at(root.path(), &f, 1);
        let model = dir.join(MODEL_FILE);
        let mut tensors = candle_core::safetensors::load(&model, &Device::Cpu).unwrap();
        tensors.remove("transformer.h.0.attn.c_proj.bias");
        candle_core::safetensors::save(&tensors, &model).unwrap();
        let err = load_hf(&dir, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("transformer.h.0.attn.c_proj.bias"), "{err}");
        tensors.insert(
            "transformer.h.0.attn.c_proj.bias".into(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, &model).unwrap();
        let err = load_hf(&dir, &Device::Cpu).err().unwrap().to_string();
        assert!(
            err.contains("transformer.h.0.attn.c_proj.bias") && err.contains("[7]"),
            "{err}"
        );
    }
}
