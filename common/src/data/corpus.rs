//! Turns a [`crate::spec::DataSpec`] into a tokenizer and train/validation token streams, cut into fixed windows of
//! `seq_len + 1` tokens (inputs and next-token targets overlap by all but one; see [`Windows`]).
//!
//! The built-in addition task and `text` files are tokenised in memory at start-up; a `prepared` directory is
//! memory-mapped ([`crate::data::dataset`]); `sft` conversations are rendered through the chat template into one
//! masked window each ([`crate::data::sft`]). Either way the windows are read through the same [`Windows`], so the
//! trainer, evaluation and generation have one path.
use std::path::PathBuf;

use crate::data::addition::{self, Problem};
use crate::data::chat::ChatTemplate;
use crate::data::dataset::{Dataset, Layout, ShardTokens, Windows};
use crate::data::sft::{self, RowStats};
use crate::data::tokenizer::{Tokenizer, TokenizerSpec};
use crate::error::{Error, Result};
use crate::spec::{DataSource, DataVerify, InitFrom, RunSpec};

/// Most addition problems generated for operands of many digits.
const ADDITION_LIMIT: usize = 200_000;

#[derive(Debug, Clone)]
pub struct Corpus {
    pub tokenizer: Tokenizer,
    pub train: Windows,
    pub val: Windows,
    pub seq_len: usize,
    /// The held-out problems, for the addition task's accuracy.
    pub val_problems: Vec<Problem>,
    /// Where the tokens come from: a file, a directory, or `<built-in addition data>`.
    pub origin: PathBuf,
    /// How a directory was laid out; `None` for data tokenised in memory.
    pub layout: Option<Layout>,
    /// SHA-256 identifying the tokens (see [`Corpus::fingerprint`]).
    pub fingerprint: String,
    /// Fine-tuning data only: the chat template and what fitting the examples into windows did.
    pub sft: Option<SftInfo>,
}

/// What a fine-tuning corpus adds: its template (whose special tokens the model's vocabulary must hold) and how
/// many examples were cut or left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftInfo {
    pub template: ChatTemplate,
    pub train: RowStats,
    pub val: RowStats,
    /// Examples in each split before any was left out.
    pub examples: (usize, usize),
}

impl SftInfo {
    /// What fitting the examples into windows of `seq_len + 1` tokens cost, for a warning; `None` when nothing.
    pub fn warning(&self, seq_len: usize) -> Option<String> {
        let (cut, left_out) = (
            self.train.truncated + self.val.truncated,
            self.train.dropped + self.val.dropped,
        );
        (cut + left_out > 0).then(|| {
            format!(
                "{cut} of {} conversations are longer than train.seq_len + 1 = {} tokens and were cut there (their \
                 tails are not trained on); {left_out} were left out because no answer token remained; raise \
                 train.seq_len (and model.block_size) to keep them",
                self.examples.0 + self.examples.1,
                seq_len + 1
            )
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Corpus {
    /// Loads the corpus a spec names, checking a prepared directory's sizes and headers (what a worker checks).
    /// Deterministic: every process gets the same tokens.
    pub fn load(spec: &RunSpec) -> Result<Self> {
        Self::load_checked(spec, DataVerify::Sizes)
    }

    /// As [`Corpus::load`], checking a prepared directory as `verify` says (the coordinator passes `data.verify`).
    pub fn load_checked(spec: &RunSpec, verify: DataVerify) -> Result<Self> {
        let d = &spec.data;
        let seq_len = spec.train.seq_len;
        let tokenizer_spec = d.tokenizer.clone().unwrap_or(crate::spec::TokenizerSpec::Char);
        let (tokenizer, train, val, val_problems, origin) = match d.source {
            DataSource::Addition => {
                let (train, val) = addition::split(d.addition_digits, d.val_fraction, spec.run.seed, ADDITION_LIMIT);
                let tokenizer = Tokenizer::for_text(&tokenizer_spec, addition::ALPHABET)?;
                let text = |ps: &[Problem]| ps.iter().map(Problem::line).collect::<String>();
                let train_ids = tokenizer.encode(&text(&train))?;
                let val_ids = tokenizer.encode(&text(&val))?;
                (
                    tokenizer,
                    train_ids,
                    val_ids,
                    val,
                    PathBuf::from("<built-in addition data>"),
                )
            }
            DataSource::Prepared => return Self::load_prepared(spec, verify),
            DataSource::Sft => return Self::load_sft(spec),
            DataSource::Text => {
                let path = d.path.clone().unwrap_or_default();
                let bytes = std::fs::read(&path).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
                let text = String::from_utf8(bytes).map_err(|e| Error::Data {
                    path: path.clone(),
                    message: format!(
                        "not UTF-8 (first bad byte at offset {}); convert the file to UTF-8 (e.g. with iconv)",
                        e.utf8_error().valid_up_to()
                    ),
                })?;
                let tokenizer = Tokenizer::for_text(&tokenizer_spec, &text)?;
                let ids = tokenizer.encode(&text)?;
                let n_val = ((ids.len() as f64) * d.val_fraction).round() as usize;
                let split_at = ids.len() - n_val;
                (
                    tokenizer,
                    ids[..split_at].to_vec(),
                    ids[split_at..].to_vec(),
                    Vec::new(),
                    path,
                )
            }
        };
        let in_memory = |ids: Vec<u32>| Windows::new(vec![ShardTokens::Memory(ids)], seq_len, &origin);
        let (train, val) = (in_memory(train), in_memory(val));
        let corpus = Corpus {
            tokenizer,
            train,
            val,
            seq_len,
            val_problems,
            origin,
            layout: None,
            fingerprint: String::new(),
            sft: None,
        };
        corpus.checked(spec)
    }

    /// Reads and renders the conversations of `data.path`: the last `data.val_fraction` of them (at least one) are
    /// the validation split. The tokenizer is `data.tokenizer` if set, else the one `model.init_from` carries (a
    /// Lockstep checkpoint's or a Hugging Face directory's `tokenizer.json`; GPT-2's for a Hugging Face directory
    /// without one), else `char` over the conversations' text.
    fn load_sft(spec: &RunSpec) -> Result<Self> {
        let d = &spec.data;
        let path = d.path.clone().unwrap_or_default();
        let mut conversations = sft::read_conversations(&path)?;
        if conversations.len() < 2 {
            return Err(Error::Data {
                path,
                message: "needs at least 2 examples: one to train on and one held out for validation".into(),
            });
        }
        let val = sft::split_val(&mut conversations, d.val_fraction);
        let tokenizer = match (&d.tokenizer, spec.model.init_source()?) {
            (Some(tok), _) => Tokenizer::for_text(tok, &sft::all_text(&conversations))?,
            (None, InitFrom::Lockstep(dir)) => Tokenizer::load(&dir.join("tokenizer.json"))?,
            (None, InitFrom::HuggingFace(dir)) => match sft::init_tokenizer_file(&dir) {
                Some(file) => Tokenizer::load(&file)?,
                None => Tokenizer::for_text(&TokenizerSpec::Gpt2, "")?,
            },
            (None, InitFrom::Random) => {
                let mut text = sft::all_text(&conversations);
                text.push_str(&sft::all_text(&val));
                Tokenizer::for_text(&TokenizerSpec::Char, &text)?
            }
        };
        let template = ChatTemplate::new(&tokenizer);
        let seq_len = spec.train.seq_len;
        let (train_rows, train) = sft::build_rows(&conversations, &template, &tokenizer, seq_len, &path, 1)?;
        let first_val = conversations.len() + 1;
        let (val_rows, val_stats) = sft::build_rows(&val, &template, &tokenizer, seq_len, &path, first_val)?;
        let corpus = Corpus {
            train: Windows::rows(train_rows, seq_len, &path),
            val: Windows::rows(val_rows, seq_len, &path),
            tokenizer,
            seq_len,
            val_problems: Vec::new(),
            origin: path,
            layout: None,
            fingerprint: String::new(),
            sft: Some(SftInfo {
                template,
                train,
                val: val_stats,
                examples: (conversations.len(), val.len()),
            }),
        };
        corpus.checked(spec)
    }

    /// Ids the model's vocabulary must hold: the tokenizer's, and the chat template's special tokens for
    /// fine-tuning data.
    pub fn vocab_needed(&self) -> usize {
        match &self.sft {
            Some(info) => info.template.vocab_size(),
            None => self.tokenizer.vocab_size(),
        }
    }

    /// Opens a `prepared` directory (or llm.c shards), checking it as `verify` says.
    fn load_prepared(spec: &RunSpec, verify: DataVerify) -> Result<Self> {
        let d = &spec.data;
        let seq_len = spec.train.seq_len;
        let dir = d.path.clone().unwrap_or_default();
        let data = Dataset::open(&dir, d.tokenizer.as_ref(), verify)?;
        let corpus = Corpus {
            tokenizer: data.tokenizer,
            train: Windows::new(data.train, seq_len, &dir),
            val: Windows::new(data.val, seq_len, &dir),
            seq_len,
            val_problems: Vec::new(),
            origin: dir,
            layout: Some(data.layout),
            fingerprint: String::new(),
            sft: None,
        };
        corpus.checked(spec)
    }

    /// The corpus, if both splits hold a window and the model's vocabulary fits the tokenizer.
    fn checked(self, spec: &RunSpec) -> Result<Self> {
        for (split, name) in [(Split::Train, "training"), (Split::Val, "validation")] {
            if self.num_windows(split) == 0 {
                let hint = match self.layout {
                    Some(Layout::Prepared) if self.split(split).num_shards() == 0 => {
                        " (it has no shards: prepare the data with a --val-fraction above 0)"
                    }
                    Some(Layout::LlmC) if self.split(split).num_shards() == 0 => {
                        " (no *val*.bin shard was found next to the training shards)"
                    }
                    _ if self.sft.is_some() => {
                        " (every example of it was left out: none has an assistant word within train.seq_len + 1 \
                         tokens; raise train.seq_len)"
                    }
                    _ => "",
                };
                return Err(Error::Data {
                    path: self.origin.clone(),
                    message: format!(
                        "the {name} split has {} tokens{hint}, fewer than one window of train.seq_len + 1 = {}; use \
                         more data or a shorter sequence",
                        self.split(split).tokens(),
                        self.seq_len + 1
                    ),
                });
            }
        }
        if let Some(info) = &self.sft
            && spec.model.vocab_size != 0
            && spec.model.vocab_size < info.template.vocab_size()
        {
            return Err(Error::Invalid {
                field: "model.vocab_size",
                value: spec.model.vocab_size.to_string(),
                reason: format!(
                    "the tokenizer has {} ids and the chat template adds 4 special tokens after them: set it to at \
                     least {} (a model from model.init_from grows its embedding to fit)",
                    self.tokenizer.vocab_size(),
                    info.template.vocab_size()
                ),
            });
        }
        spec.vocab_size(self.vocab_needed())?;
        let fingerprint = self.fingerprint()?;
        Ok(Corpus { fingerprint, ..self })
    }

    /// SHA-256 that differs when two processes would read different tokens: of `manifest.json` for a prepared
    /// directory (it holds every shard's SHA-256 and the tokenizer's), else of the shards' names and token counts
    /// (llm.c shards) or the token ids themselves (data tokenised in memory), with the sequence length. Workers
    /// compare theirs with the coordinator's, so a host with another copy of the data is refused instead of
    /// silently training on other sequences (the gradients are summed, so nothing else would notice).
    fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update((self.seq_len as u64).to_le_bytes());
        if self.layout == Some(Layout::Prepared) {
            let path = self.origin.join(crate::data::manifest::MANIFEST_FILE);
            let bytes = std::fs::read(&path).map_err(|source| Error::Read { path, source })?;
            hasher.update(&bytes);
        } else {
            self.train.identify(&mut hasher);
            hasher.update(b"val");
            self.val.identify(&mut hasher);
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// The windows of `split`.
    pub fn split(&self, split: Split) -> &Windows {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Non-overlapping windows of `seq_len + 1` tokens (the last token of one is the first of the next).
    pub fn num_windows(&self, split: Split) -> u64 {
        self.split(split).len()
    }

    /// Appends the inputs of window `index` to `inputs` and its targets (the inputs shifted by one) to `targets`.
    pub fn extend_window(&self, split: Split, index: u64, inputs: &mut Vec<u32>, targets: &mut Vec<u32>) -> Result<()> {
        self.split(split).extend_window(index, inputs, targets)
    }

    /// Targets of window `index` of `split` that count in the loss (all of them except in fine-tuning data).
    pub fn counted(&self, split: Split, index: u64) -> u64 {
        self.split(split).counted(index)
    }

    /// Inputs and targets of window `index`: `tokens[i·T .. i·T+T]` and the same shifted by one (within its shard).
    pub fn window(&self, split: Split, index: u64) -> Result<(Vec<u32>, Vec<u32>)> {
        let t = self.seq_len;
        let (mut inputs, mut targets) = (Vec::with_capacity(t), Vec::with_capacity(t));
        self.extend_window(split, index, &mut inputs, &mut targets)?;
        Ok((inputs, targets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addition_windows_start_on_a_problem() {
        let mut spec = RunSpec::default();
        spec.train.seq_len = 40;
        let corpus = Corpus::load(&spec).unwrap();
        assert_eq!(corpus.tokenizer.vocab_size(), 13);
        let (x, y) = corpus.window(Split::Train, 3).unwrap();
        let text = corpus.tokenizer.decode(&x);
        assert_eq!(text.len(), 40);
        assert_eq!(text.as_bytes()[2], b'+', "{text}");
        assert_eq!(text.as_bytes()[9], b'\n', "{text}");
        assert_eq!(&corpus.tokenizer.decode(&y)[..39], &text[1..]);
        assert_eq!(corpus.val_problems.len(), 1000);
    }

    #[test]
    fn text_corpus_splits_and_names_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt");
        std::fs::write(&path, "abcdefghij".repeat(50)).unwrap();
        let mut spec = RunSpec::default();
        spec.data.source = DataSource::Text;
        spec.data.path = Some(path.clone());
        spec.train.seq_len = 8;
        let corpus = Corpus::load(&spec).unwrap();
        assert_eq!(corpus.train.tokens() + corpus.val.tokens(), 500);
        assert_eq!(corpus.val.tokens(), 50);
        assert_eq!(corpus.num_windows(Split::Val), 49 / 8);
        spec.data.path = Some(dir.path().join("missing.txt"));
        let err = Corpus::load(&spec).unwrap_err().to_string();
        assert!(err.contains("missing.txt"), "{err}");
    }

    #[test]
    fn sft_corpus_masks_prompts_holds_out_the_last_examples_and_warns_about_cuts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        let mut lines: Vec<String> = (0..9)
            .map(|i| format!("{{\"prompt\": \"say {i}\", \"response\": \"{i}{i}\"}}"))
            .collect();
        lines.push(format!(
            "{{\"prompt\": \"{}\", \"response\": \"late\"}}",
            "long ".repeat(20)
        ));
        std::fs::write(&path, lines.join("\n")).unwrap();
        let mut spec = RunSpec::default();
        spec.data.source = DataSource::Sft;
        spec.data.path = Some(path);
        spec.data.val_fraction = 0.2;
        spec.train.seq_len = 16;
        let corpus = Corpus::load(&spec).unwrap();
        let info = corpus.sft.as_ref().unwrap();
        // 2 of 10 held out; the long one (last) is in validation and cut before its answer: left out.
        assert_eq!(info.examples, (8, 2));
        assert_eq!(
            (corpus.num_windows(Split::Train), corpus.num_windows(Split::Val)),
            (8, 1)
        );
        assert_eq!(corpus.vocab_needed(), corpus.tokenizer.vocab_size() + 4);
        // "say 0" → answer "00" and <|end|>: 3 counted targets per training window.
        assert_eq!(corpus.counted(Split::Train, 0), 3);
        let warning = info.warning(16).unwrap();
        assert!(
            warning.contains("1 of 10") && warning.contains("1 were left out"),
            "{warning}"
        );
        // A model vocabulary without room for the template's tokens is refused, naming the key.
        spec.model.vocab_size = corpus.tokenizer.vocab_size();
        let err = Corpus::load(&spec).unwrap_err().to_string();
        assert!(
            err.contains("model.vocab_size") && err.contains("4 special tokens"),
            "{err}"
        );
    }
}
