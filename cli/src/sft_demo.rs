//! `lockstep demo-sft`: the fine-tuning story end to end, on data Lockstep generates itself (no download).
//!
//! ```text
//! lockstep demo-sft [--workers 2] [--out runs/sft-demo] [--quick] [--json]
//! ```
//!
//! 1. Generates a small synthetic world ([`world`]): English-like text, an invented language (Vellan), and an
//!    instruction set of two tasks — translating English sentences into Vellan, and summarising short passages —
//!    with held-out items never trained on. Files under `OUT/data`.
//! 2. Trains a byte-level BPE on the monolingual pretraining text and prepares it into token shards (what
//!    `lockstep prepare` does).
//! 3. Pretrains a GPT on that text with a local coordinator and workers (`OUT/pretrain`): it learns both languages'
//!    words, but neither task.
//! 4. Scores the pretrained model on the held-out items through the chat template ("before"; its embedding grown
//!    exactly as fine-tuning grows it).
//! 5. Fine-tunes it on the instruction set (`data.source = "sft"`, `OUT/finetune`), with generation metrics on the
//!    held-out items at every evaluation.
//! 6. Scores the fine-tuned model ("after") and prints BLEU, chrF, ROUGE-1/2/L and METEOR per task, before →
//!    after, with a few example answers.
//!
//! Every run is fresh: `OUT/data`, `OUT/pretrain` and `OUT/finetune` are replaced.
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lockstep_common::RunSpec;
use lockstep_common::data::prepare::{InputFormat, PrepareOptions, PrepareSummary, prepare};
use lockstep_common::data::tokenizer::TokenizerSpec;
use lockstep_common::proto::RunState;

use crate::error::{Error, Result};
use crate::run::{RunOptions, RunSummary, run_local};

pub mod judge;
pub mod plan;
pub mod report;
pub mod world;

use judge::Stage;
use plan::Plan;
use report::{DataFigures, Report, RunFigures, Sample, TaskRow};
use world::{Dataset, Example, Task, World};

/// Pretrain a small GPT on generated text, fine-tune it on a generated instruction set (translation into an
/// invented language, summaries of short passages), and show held-out BLEU/chrF/ROUGE/METEOR before and after.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoSftArgs {
    /// Worker processes of each training run.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Directory for the generated data and both runs (data/, pretrain/, finetune/ are replaced).
    #[arg(long, default_value = "runs/sft-demo")]
    pub out: PathBuf,
    /// A smaller model, data and fewer steps (about a minute on two cores; the CI test's size).
    #[arg(long)]
    pub quick: bool,
    /// Seed of the generated world, the data and both runs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the report as JSON (progress lines go to stderr).
    #[arg(long)]
    pub json: bool,
    /// CPU threads per worker (default: cores / workers, at least 1).
    #[arg(long)]
    pub threads_per_worker: Option<usize>,
    /// No progress bars (e.g. in CI logs).
    #[arg(long)]
    pub no_progress: bool,
    /// A WordNet 3.0 dict directory for METEOR's synonym stage [default: /usr/share/wordnet if it exists].
    #[arg(long, value_name = "DIR", env = "LOCKSTEP_WORDNET_DIR")]
    pub wordnet: Option<PathBuf>,
}

/// How the demo ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Done(Box<Report>),
    /// Ctrl-C or SIGTERM: every process of the current run was stopped.
    Interrupted,
}

/// The files the demo writes under `OUT/data`.
struct DataFiles {
    dir: PathBuf,
    corpus: PathBuf,
    train: PathBuf,
    heldout: PathBuf,
    prepared: PathBuf,
}

impl DataFiles {
    fn under(dir: PathBuf) -> Self {
        DataFiles {
            corpus: dir.join("corpus.jsonl"),
            train: dir.join("train.jsonl"),
            heldout: dir.join("heldout.jsonl"),
            prepared: dir.join("pretrain"),
            dir,
        }
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// Runs the whole demo. `interrupt` makes a future that resolves on Ctrl-C; each training run waits on a new one.
pub async fn run<F, Fut>(args: &DemoSftArgs, interrupt: F) -> Result<Outcome>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let started = Instant::now();
    if args.workers == 0 {
        return Err(Error::Usage("--workers must be at least 1".into()));
    }
    let plan = if args.quick { Plan::quick() } else { Plan::full() };
    if args.workers as usize > plan.pretrain.global_batch.min(plan.finetune.global_batch) {
        return Err(Error::Usage(format!(
            "--workers {} is more than the demo's global batch of {} sequences; use at most that many",
            args.workers,
            plan.pretrain.global_batch.min(plan.finetune.global_batch)
        )));
    }
    let say = |line: String| {
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let out = std::path::absolute(&args.out).map_err(io(format!("resolve --out {}", args.out.display())))?;
    for sub in ["data", "pretrain", "finetune"] {
        let dir = out.join(sub);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(format!("clear the demo's old {}", dir.display())))?;
        }
    }
    let wordnet = crate::score::open_wordnet(args.wordnet.as_deref())?;
    let meteor = match &wordnet {
        Some((dir, _)) => format!("exact, stem and WordNet synonyms from {}", dir.display()),
        None => "exact and stem only, no WordNet found (give --wordnet DIR)".to_string(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args
        .threads_per_worker
        .unwrap_or((cores / args.workers as usize).max(1));

    let files = DataFiles::under(out.join("data"));
    let (seed, sizes) = (args.seed, plan.world);
    let work = blocking({
        let files = DataFiles::under(files.dir.clone());
        move || {
            let data = World::new(seed).dataset(seed, sizes);
            write_data(&data, &files)?;
            let prepared = prepare_corpus(&files, plan.bpe_vocab)?;
            Ok((data, prepared))
        }
    });
    let Some((data, prepared)) = unless(interrupt(), work).await? else {
        return Ok(Outcome::Interrupted);
    };
    say(format!(
        "generated {} training and {} held-out instructions ({} tasks: translate into {}, summarize) and {} \
         documents of pretraining text in {}; {}",
        data.train.len(),
        data.heldout.len(),
        Task::ALL.len(),
        world::LANGUAGE,
        data.corpus.len(),
        files.dir.display(),
        prepared.tokenizer
    ));

    let workers = args.workers;
    let run_opts = |spec: RunSpec, dir: PathBuf| RunOptions {
        spec,
        workers,
        out: dir,
        threads_per_worker: threads,
        progress: !args.no_progress,
    };
    let pre_dir = out.join("pretrain");
    let spec = plan.pretrain_spec(seed, workers, &files.prepared, &pre_dir);
    say(format!(
        "pretraining: {} layers × {} dims, {} steps of {} × {} tokens, {workers} worker(s) × {threads} thread(s); \
         logs in {}",
        plan.n_layer,
        plan.n_embd,
        plan.pretrain.steps,
        plan.pretrain.global_batch,
        plan.pretrain.seq_len,
        pre_dir.join("logs").display()
    ));
    let Some(pre) = train("pretraining", run_opts(spec, pre_dir), interrupt()).await? else {
        return Ok(Outcome::Interrupted);
    };
    say(pre.line("pretrained"));

    let vocab = plan::finetune_vocab(prepared.manifest.tokenizer.vocab_size);
    let max_new = plan.max_new_tokens;
    let heldout = data.heldout.clone();
    let pre_ckpt = PathBuf::from(&pre.checkpoint);
    let work = blocking(move || judge::answers(&pre_ckpt, Stage::Before { vocab }, &heldout, max_new));
    let Some(before) = unless(interrupt(), work).await? else {
        return Ok(Outcome::Interrupted);
    };

    let ft_dir = out.join("finetune");
    let spec = plan.finetune_spec(
        seed,
        workers,
        Path::new(&pre.checkpoint),
        prepared.manifest.tokenizer.vocab_size,
        plan::SftFiles {
            train: &files.train,
            heldout: &files.heldout,
        },
        &ft_dir,
    );
    say(format!(
        "fine-tuning on {} instructions: {} steps of {} × {} tokens (loss on the answers only); logs in {}",
        data.train.len(),
        plan.finetune.steps,
        plan.finetune.global_batch,
        plan.finetune.seq_len,
        ft_dir.join("logs").display()
    ));
    let Some(ft) = train("fine-tuning", run_opts(spec, ft_dir), interrupt()).await? else {
        return Ok(Outcome::Interrupted);
    };
    say(ft.line("fine-tuned"));
    let heldout = data.heldout.clone();
    let ft_ckpt = PathBuf::from(&ft.checkpoint);
    let work = blocking(move || judge::answers(&ft_ckpt, Stage::After, &heldout, max_new));
    let Some(after) = unless(interrupt(), work).await? else {
        return Ok(Outcome::Interrupted);
    };

    let opts = judge::options(wordnet);
    let scores = table(&data.heldout, &before, &after, &opts);
    let report = Report {
        quick: args.quick,
        seed,
        workers,
        data: DataFigures {
            train_examples: data.train.len(),
            heldout_examples: data.heldout.len(),
            pretrain_documents: data.corpus.len(),
            pretrain_tokens: prepared.manifest.train.tokens + prepared.manifest.val.tokens,
            tokenizer: prepared.tokenizer.clone(),
            dir: files.dir.display().to_string(),
        },
        pretrain: pre,
        finetune: ft,
        scores,
        examples: samples(&data, &before, &after),
        meteor,
        secs: started.elapsed().as_secs_f64(),
    };
    Ok(Outcome::Done(Box::new(report)))
}

/// `work`'s result, or `None` if `interrupt` comes first (the blocking thread then finishes on its own; no child
/// process runs while it does).
async fn unless<T>(interrupt: impl Future<Output = ()>, work: impl Future<Output = Result<T>>) -> Result<Option<T>> {
    tokio::select! {
        r = work => r.map(Some),
        () = interrupt => Ok(None),
    }
}

/// Runs blocking work (files, tokenizing, decoding) off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Process {
        process: "lockstep demo-sft".into(),
        message: format!("a background task failed: {e}"),
    })?
}

fn write_data(data: &Dataset, files: &DataFiles) -> Result<()> {
    std::fs::create_dir_all(&files.dir).map_err(io(format!("create {}", files.dir.display())))?;
    let corpus = data.corpus.iter().map(|text| serde_json::json!({ "text": text }));
    write_jsonl(&files.corpus, corpus)?;
    let pairs = |items: &[Example]| {
        items
            .iter()
            .map(|e| serde_json::json!({ "prompt": e.prompt, "response": e.response }))
            .collect::<Vec<_>>()
    };
    write_jsonl(&files.train, pairs(&data.train))?;
    // Interleaved, so that the first `sft.eval_items` items cover both tasks.
    let (translate, summarize): (Vec<Example>, Vec<Example>) =
        data.heldout.iter().cloned().partition(|e| e.task == Task::Translate);
    let mixed: Vec<Example> = translate.into_iter().zip(summarize).flat_map(|(a, b)| [a, b]).collect();
    write_jsonl(&files.heldout, pairs(&mixed))
}

fn write_jsonl(path: &Path, lines: impl IntoIterator<Item = serde_json::Value>) -> Result<()> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(io(format!("write {}", path.display())))
}

/// The pretraining text → BPE of `vocab` ids + token shards (as `lockstep prepare --format jsonl`).
fn prepare_corpus(files: &DataFiles, vocab: usize) -> Result<PrepareSummary> {
    let mut opts = PrepareOptions::new(
        vec![files.corpus.clone()],
        TokenizerSpec::Bpe { vocab_size: vocab },
        files.prepared.clone(),
    );
    opts.format = InputFormat::Jsonl;
    opts.field = "text".into();
    opts.val_fraction = 0.05;
    Ok(prepare(&opts, &|_| {})?)
}

/// One training run to its end: `None` when interrupted, an error naming the logs when it failed.
async fn train(what: &str, opts: RunOptions, interrupt: impl Future<Output = ()>) -> Result<Option<RunFigures>> {
    let started = Instant::now();
    let logs = opts.out.join("logs");
    let RunSummary {
        status, interrupted, ..
    } = run_local(opts, interrupt).await?;
    if interrupted {
        return Ok(None);
    }
    if status.state != RunState::Finished as i32 || status.last_checkpoint.is_empty() {
        return Err(Error::Process {
            process: what.into(),
            message: format!("the run failed: {}; logs are in {}", status.error, logs.display()),
        });
    }
    Ok(Some(RunFigures {
        steps: status.step,
        secs: started.elapsed().as_secs_f64(),
        loss: status.last_loss,
        val_loss: status.val_loss,
        checkpoint: status.last_checkpoint,
        logs: logs.display().to_string(),
        eval_metrics: status.eval_metrics.into_iter().collect(),
        eval_metrics_step: status.eval_metrics_step,
    }))
}

impl RunFigures {
    fn line(&self, what: &str) -> String {
        let loss = |l: Option<f64>| l.map_or("-".into(), |l| format!("{l:.3}"));
        format!(
            "{what}: {} steps in {:.1} s, loss {}, val loss {}; {}",
            self.steps,
            self.secs,
            loss(self.loss),
            loss(self.val_loss),
            self.checkpoint
        )
    }
}

fn table(items: &[Example], before: &[String], after: &[String], opts: &crate::score::Options) -> Vec<TaskRow> {
    let b = judge::score_by_task(items, before, opts);
    let a = judge::score_by_task(items, after, opts);
    let name = |t: &Option<Task>| t.map_or("all", Task::name).to_string();
    let count = |t: &Option<Task>| items.iter().filter(|e| t.is_none_or(|t| e.task == t)).count();
    // Tasks first, the overall row last.
    let mut keys: Vec<Option<Task>> = a.keys().copied().filter(Option::is_some).collect();
    keys.push(None);
    keys.iter()
        .map(|k| TaskRow {
            task: name(k),
            items: count(k),
            before: b.get(k).copied().unwrap_or_default(),
            after: a.get(k).copied().unwrap_or_default(),
        })
        .collect()
}

/// Two translations and one summary, with both models' answers.
fn samples(data: &Dataset, before: &[String], after: &[String]) -> Vec<Sample> {
    let index: BTreeMap<Task, Vec<usize>> = data.heldout.iter().enumerate().fold(BTreeMap::new(), |mut m, (i, e)| {
        m.entry(e.task).or_insert_with(Vec::new).push(i);
        m
    });
    let take = |task: Task, n: usize| index.get(&task).into_iter().flatten().take(n).copied();
    take(Task::Translate, 2)
        .chain(take(Task::Summarize, 1))
        .map(|i| {
            let e = &data.heldout[i];
            Sample {
                task: e.task.name().into(),
                prompt: e.prompt.clone(),
                reference: e.response.clone(),
                before: before.get(i).cloned().unwrap_or_default(),
                after: after.get(i).cloned().unwrap_or_default(),
            }
        })
        .collect()
}
