//! `lockstep`: run a local training run, ask a coordinator for status, measure throughput.
//!
//! ```text
//! lockstep run                      # the built-in addition demo: coordinator + 2 workers on 127.0.0.1
//! lockstep status --coordinator http://HOST:7070 [--json] [--watch]
//! lockstep stop --coordinator http://HOST:7070 [--reason TEXT]
//!   (status and stop need the run token: LOCKSTEP_TOKEN or --token-file; TLS: --tls-ca, --tls-cert, --tls-key)
//! lockstep bench train|allreduce|data|coordinator|score   (bench train --profile [--json]: where a step's ms go)
//! lockstep generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
//! lockstep chat --checkpoint DIR [--system TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
//! lockstep prepare --input PATH... --tokenizer SPEC --out DIR [--format text|jsonl] [--field NAME] [--val-fraction F]
//!                  [--shard-tokens N] [--threads N] [--invalid-utf8 fail|skip] [--force]
//! lockstep score --hyp FILE --ref FILE [--ref FILE2 ...] [--metrics bleu,chrf,rouge,meteor] [--json]
//!                [--wordnet DIR | --no-wordnet] [--rouge-stem true|false]
//! lockstep demo-sft [--workers 2] [--out runs/sft-demo] [--quick] [--json]
//! lockstep eval --checkpoint DIR --data PATH [--task lm|summarize|translate|chat] [--json] [--max-new-tokens N]
//!               [--temperature T --top-k K --top-p P --seed S] [--batch-size B] [--limit N] [--wordnet DIR]
//! ```
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lockstep_cli::{
    bench, bench_coordinator, bench_profile, bench_score, chat, demo, eval, generate, history, prepare, run, score,
    sft_demo, status_view,
};
use lockstep_common::RunSpec;
use lockstep_common::data::corpus::Split;
use lockstep_common::proto::{GetHistoryRequest, GetStatusRequest, RunState, StopRunRequest, WatchStatusRequest};
use lockstep_common::spec::DataSource;
use lockstep_common::transport::{self, CoordinatorClient};
use lockstep_worker::coordinator_link::SecurityArgs;

#[derive(Debug, Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Data-parallel GPT training: one fast, dependable binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train on this host: a coordinator and N workers on 127.0.0.1 (default: the built-in addition demo).
    Run(RunArgs),
    /// Show a coordinator's run: state, step, loss, throughput, ETA and one row per worker.
    Status(StatusArgs),
    /// A run's loss curve, one row per step (loss, lr, gradient norm, tokens, skipped, validation loss), as CSV or
    /// JSON lines: from its coordinator while it runs, or from its cluster.state_dir afterwards.
    History(HistoryArgs),
    /// Ask a coordinator to stop its run cleanly: the ranks agree on a step, rank 0 checkpoints it, and the run can
    /// be resumed later by starting the coordinator again with the same config.
    Stop(StopArgs),
    /// Measure training-step, all-reduce and data-loader throughput, and coordinator capacity (figures for
    /// docs/BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Continue a prompt with a checkpoint, streaming the text as it is sampled (KV-cached decoding).
    Generate(generate::GenerateArgs),
    /// Talk to a fine-tuned checkpoint: each stdin line is a user message, each reply is streamed through the chat
    /// template (/reset forgets the conversation, /quit leaves).
    Chat(chat::ChatArgs),
    /// Tokenise text or JSONL files into llm.c token shards plus tokenizer.json and manifest.json, for training.
    Prepare(prepare::PrepareArgs),
    /// BLEU, chrF, ROUGE and METEOR of outputs against references, one segment per line (as sacrebleu, rouge-score
    /// and nltk compute them).
    Score(score::ScoreArgs),
    /// Evaluate a checkpoint: perplexity on prepared token data (--task lm), or generation from a JSONL of
    /// sources/prompts scored with BLEU, chrF, ROUGE and METEOR against its references.
    Eval(eval::EvalArgs),
    /// The fine-tuning demo, no download: pretrain on generated text, fine-tune on a generated instruction set
    /// (translation, summaries), and print held-out BLEU/chrF/ROUGE/METEOR before → after.
    DemoSft(sft_demo::DemoSftArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Worker processes to start.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// A TOML run spec (default: the built-in demo). For a local run its [cluster] settings and checkpoint.dir are
    /// replaced: the run state goes to <out>/state, checkpoints to <out>/checkpoints. Run the same command again to
    /// resume a stopped or interrupted run; a finished or failed one is refused (use another --out).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override train.total_steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Run directory (default: runs/<run name>): run.toml, logs/, the run state in state/ and the checkpoints in
    /// checkpoints/. The built-in demo starts afresh each time: it deletes <out>/state and <out>/checkpoints first.
    #[arg(long)]
    out: Option<PathBuf>,
    /// CPU threads per worker (default: cores / workers, at least 1).
    #[arg(long)]
    threads_per_worker: Option<usize>,
    /// No progress bar (e.g. in CI logs).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[arg(long, env = "LOCKSTEP_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep printing after every change until the run ends.
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    security: SecurityArgs,
}

#[derive(Debug, clap::Args)]
struct HistoryArgs {
    #[arg(long, env = "LOCKSTEP_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// Read the run's cluster.state_dir instead of asking a coordinator (for a run whose coordinator has exited,
    /// e.g. runs/<name>/state after `lockstep run`). Wins over --coordinator.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Only the steps after this one (e.g. the last step already fetched), and the evaluations from it on (one is
    /// recorded a moment after its step). A restart runs the steps after its checkpoint again: after one, fetch
    /// again from the checkpoint's step.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// JSON lines instead of CSV.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    security: SecurityArgs,
}

#[derive(Debug, clap::Args)]
struct StopArgs {
    #[arg(long, env = "LOCKSTEP_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// Why, for the coordinator's logs and status.
    #[arg(long, default_value = "lockstep stop")]
    reason: String,
    #[command(flatten)]
    security: SecurityArgs,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Training throughput: tokens/s, ms/step split into forward / backward / all-reduce / optimizer, MFU and peak
    /// memory. Trains --preset on random tokens, or the spec --config names.
    Train {
        /// Ranks (threads in this process joined by a loopback TCP ring).
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Measured steps.
        #[arg(long, default_value_t = 20)]
        steps: u64,
        /// Unmeasured steps first (allocation, the CUDA driver's JIT).
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        /// A model shape (`model.preset`): tiny, nanogpt-cpu, shakespeare-char, gpt2, gpt2-medium, ...
        #[arg(long, default_value = "nanogpt-cpu", conflicts_with = "config")]
        preset: String,
        /// Tokens per sequence [default: the preset's context length].
        #[arg(long, conflicts_with = "config")]
        seq_len: Option<usize>,
        /// Sequences per forward/backward on each rank.
        #[arg(long, default_value_t = 12, conflicts_with = "config")]
        micro_batch: usize,
        /// The model's vocabulary, e.g. 50304 (GPT-2's padded as llm.c does) [default: the preset's, or 65].
        #[arg(long, conflicts_with = "config")]
        vocab_size: Option<usize>,
        /// Compute dtype: f32, or bf16 (f32 master weights).
        #[arg(long, default_value = "f32", value_parser = parse_dtype, conflicts_with = "config")]
        dtype: lockstep_common::spec::ComputeDtype,
        /// A TOML run spec to train instead (its data, shape and batch).
        #[arg(long)]
        config: Option<PathBuf>,
        /// cpu, or cuda:N in a build with the `cuda` feature.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The device's dense peak in TFLOP/s for the dtype, for MFU where Lockstep's table has none (e.g. a CPU).
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// CPU threads for each rank's tensor math (each rank, a thread of this process, trains on a pool of its
        /// own): --workers times --threads should not exceed the cores.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Where each millisecond of the step goes: every op category (matmuls, attention, LayerNorm, GELU, loss,
        /// casts, copies, optimizer, ...) timed alone, forward and backward, at the model's shapes, against the
        /// measured step. One rank; --steps is the measured repetitions (median), --warmup the unmeasured ones.
        #[arg(long, conflicts_with = "workers")]
        profile: bool,
        /// With --profile: print JSON instead of a table.
        #[arg(long, requires = "profile")]
        json: bool,
    },
    /// How many simulated workers (heartbeat every second, a report every step) one real coordinator serves:
    /// GetStatus and Join latency, lag, CPU and memory per worker count.
    Coordinator {
        /// Comma-separated worker counts, one fresh coordinator each.
        #[arg(long, value_delimiter = ',', default_value = "8,32,128,512")]
        workers: Vec<u32>,
        /// Step reports per second from every worker.
        #[arg(long, default_value_t = 10.0)]
        steps_per_sec: f64,
        /// Measured seconds per worker count.
        #[arg(long, default_value_t = 20.0)]
        secs: f64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ring all-reduce bus bandwidth, 2(n-1)/n × bytes / time, on loopback.
    Allreduce {
        /// Comma-separated rank counts.
        #[arg(long, value_delimiter = ',', default_value = "2,4")]
        ranks: Vec<u32>,
        /// Comma-separated buffer sizes in MiB of f32.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        mib: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        iters: u32,
    },
    /// Segments per second of each `lockstep score` metric on generated segment pairs.
    Score {
        /// Generated hypothesis/reference pairs.
        #[arg(long, default_value_t = 10_000)]
        segments: usize,
        /// Seed of the generator (the same seed gives the same pairs).
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// A WordNet 3.0 dict directory for METEOR with synonyms [default: /usr/share/wordnet if it exists].
        #[arg(long, value_name = "DIR", env = "LOCKSTEP_WORDNET_DIR")]
        wordnet: Option<PathBuf>,
    },
    /// Batch-assembly throughput of one worker's data loader (tokens/s) on a prepared directory.
    Data {
        /// A prepared directory (lockstep prepare's output) or a directory of llm.c shards; default: a generated
        /// one of 32 Mi byte tokens.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// The tokenizer of llm.c shards (e.g. gpt2); a prepared directory names its own.
        #[arg(long, value_name = "SPEC")]
        tokenizer: Option<lockstep_common::spec::TokenizerSpec>,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 1024)]
        seq_len: usize,
        /// Sequences per step.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Measured steps.
        #[arg(long, default_value_t = 2000)]
        steps: u64,
    },
}

fn main() -> ExitCode {
    lockstep_worker::device::keep_freed_memory();
    let cli = Cli::parse();
    if let Command::Bench(BenchCommand::Train { threads, .. }) = &cli.command {
        let n = (*threads).max(1);
        // candle sizes its CPU pool from this variable. SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", lockstep_common::error::one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => run_cmd(args).await,
        Command::DemoSft(args) => demo_sft_cmd(args).await,
        Command::Status(args) => status_cmd(args).await,
        Command::History(args) => history_cmd(args).await,
        Command::Stop(args) => stop_cmd(args).await,
        Command::Generate(args) => {
            tokio::task::spawn_blocking(move || generate::command(&args)).await??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Chat(args) => {
            tokio::task::spawn_blocking(move || chat::command(&args)).await??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Score(args) => {
            tokio::task::spawn_blocking(move || score::command(&args)).await??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => {
            tokio::task::spawn_blocking(move || eval::command(&args)).await??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Score {
            segments,
            seed,
            wordnet,
        }) => {
            let b = tokio::task::spawn_blocking(move || bench_score::run(segments, seed, wordnet.as_deref())).await??;
            print!("{}", b.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Prepare(args) => {
            let summary = tokio::task::spawn_blocking(move || prepare::command(&args)).await??;
            println!("{}", summary.line());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Train {
            workers,
            steps,
            warmup,
            preset,
            seq_len,
            micro_batch,
            vocab_size,
            dtype,
            config,
            device,
            peak_tflops,
            profile,
            json,
            ..
        }) => {
            let (device, _label) = lockstep_worker::device::parse(&device)?;
            // The driver's name (e.g. "NVIDIA H200") is what the table of device peaks knows, not "cuda:0".
            let device_name = lockstep_worker::device::hardware_name(&device);
            if device.is_cuda() {
                // Which figures these are: LOCKSTEP_GPU_COMPOSED can turn fused kernels off. Not into --json's output.
                let line = format!(
                    "{device_name}: fused GPU kernels: {}",
                    lockstep_worker::ops::gpu_kernels::check()?
                );
                if json {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
            }
            let (spec, _generated) = match config {
                Some(path) => (RunSpec::load(Some(&path))?, None),
                None => {
                    let r = bench::RandomTokens {
                        preset,
                        seq_len,
                        micro_batch,
                        vocab_size,
                        dtype,
                    };
                    let (spec, dir) = bench::random_tokens_spec(&r, workers)?;
                    (spec, Some(dir))
                }
            };
            if profile {
                let peak = peak_tflops.map(|t| t * 1e12);
                let opts = bench_profile::Options {
                    warmup,
                    reps: steps,
                    device_resident: None,
                    peak_flops: peak
                        .or_else(|| lockstep_worker::hardware::peak_flops(&device_name, spec.train.compute_dtype)),
                };
                let p = tokio::task::spawn_blocking(move || bench_profile::profile(&spec, &device, &device_name, opts))
                    .await??;
                if json {
                    println!("{}", serde_json::to_string_pretty(&p)?);
                } else {
                    print!("{}", p.render());
                }
                return Ok(ExitCode::SUCCESS);
            }
            let dtype = spec.train.compute_dtype;
            let b = tokio::task::spawn_blocking(move || bench::train(&spec, &device, workers, warmup, steps)).await??;
            println!(
                "workers {}  params {}  steps {}  {:.0} tokens/s  {:.1} ms/step  (forward {:.1}, backward {:.1}, all-reduce {:.1}, optimizer {:.1})",
                b.workers,
                b.params,
                b.steps,
                b.tokens_per_sec,
                b.step_ms,
                b.forward_ms,
                b.backward_ms,
                b.allreduce_ms,
                b.optimizer_ms
            );
            let peak = peak_tflops
                .map(|t| (t * 1e12, "--peak-tflops".to_string()))
                .or_else(|| {
                    lockstep_worker::hardware::peak_flops(&device_name, dtype)
                        .map(|p| (p, format!("{device_name} {dtype:?}")))
                });
            let mfu = match peak {
                Some((flops, source)) => format!(
                    "MFU {:.2}% of {:.0} TFLOP/s ({source})",
                    100.0 * b.mfu(flops),
                    flops / 1e12
                ),
                None => format!("MFU n/a (no peak known for {device_name}; give --peak-tflops)"),
            };
            let memory = b.peak_rss_bytes.map_or("n/a".to_string(), |m| {
                format!("{:.2} GiB", m as f64 / (1u64 << 30) as f64)
            });
            let device_memory = b.peak_device_bytes.map_or(String::new(), |m| {
                format!(", {:.2} GiB on the GPU", m as f64 / (1u64 << 30) as f64)
            });
            println!(
                "{:.3} GFLOP/token  {mfu}  peak memory {memory} (process resident){device_memory}",
                b.flops_per_token / 1e9
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Data {
            data,
            tokenizer,
            seq_len,
            batch,
            steps,
        }) => {
            let b = tokio::task::spawn_blocking(move || {
                bench::data(data.as_deref(), tokenizer.as_ref(), seq_len, batch, steps)
            })
            .await??;
            println!(
                "data {}{}  seq_len {}  batch {}  steps {}  {:.2}M tokens/s  ({:.3} s)",
                b.data.display(),
                if b.generated { " (generated)" } else { "" },
                b.seq_len,
                b.batch,
                b.steps,
                b.tokens_per_sec / 1e6,
                b.secs
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Coordinator {
            workers,
            steps_per_sec,
            secs,
            json,
        }) => {
            let opts = bench_coordinator::Options {
                workers,
                steps_per_sec,
                secs,
            };
            bench_coordinator::command(&opts, json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Allreduce { ranks, mib, iters }) => {
            for &n in &ranks {
                for &m in &mib {
                    let r = tokio::task::spawn_blocking(move || {
                        lockstep_worker::collective::bench_allreduce(n, m << 20, iters)
                    })
                    .await??;
                    println!(
                        "ranks {n}  {m:>3} MiB  {:.2} ms/op  bus bandwidth {:.2} GB/s",
                        r.secs_per_op * 1e3,
                        r.bus_gbps
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run_cmd(args: RunArgs) -> anyhow::Result<ExitCode> {
    if args.workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    let mut spec = match &args.config {
        Some(path) => RunSpec::load(Some(path))?,
        None => RunSpec::load(None)?,
    };
    let demo_cluster = demo::demo_spec(args.workers).cluster;
    spec.cluster.listen = demo_cluster.listen;
    spec.cluster.min_workers = args.workers;
    spec.cluster.max_workers = args.workers;
    if let Some(steps) = args.steps {
        spec.train.total_steps = steps;
        spec.train.warmup_steps = spec.train.warmup_steps.min(steps);
    }
    let out = args.out.unwrap_or_else(|| PathBuf::from("runs").join(&spec.run.name));
    // Everything the run leaves is under --out, config or not: a state or checkpoint directory shared by the runs of
    // several configs (the spec defaults, relative to the working directory) would mix them, or refuse the next run.
    spec.checkpoint.dir = run::checkpoint_dir(&out);
    spec.cluster.state_dir = run::state_dir(&out);
    spec.validate()?;
    // Decided before any process starts: a coordinator started on an ended run's state only reports its old outcome.
    let start = if args.config.is_some() {
        let (out, spec) = (out.clone(), spec.clone());
        tokio::task::spawn_blocking(move || run::plan_config_run(&out, &spec)).await??
    } else {
        // The built-in demo is a fresh run every time: no earlier state or checkpoints of it are kept.
        let out = out.clone();
        tokio::task::spawn_blocking(move || run::plan_demo_run(&out)).await??
    };
    if let run::Start::Refuse(why) = &start {
        eprintln!("error: {why}");
        return Ok(ExitCode::from(2));
    }
    run::mark_kind(&out, if args.config.is_some() { run::CONFIG } else { run::DEMO })?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args
        .threads_per_worker
        .unwrap_or((cores / args.workers as usize).max(1));
    println!(
        "lockstep run: {} ({} steps, global batch {}, {} worker(s) × {} thread(s)); logs in {}",
        spec.run.name,
        spec.train.total_steps,
        spec.train.global_batch,
        args.workers,
        threads,
        out.join("logs").display()
    );
    if let Some(line) = start.resuming_line() {
        println!("{line}");
    }
    let opts = run::RunOptions {
        spec: spec.clone(),
        workers: args.workers,
        out: out.clone(),
        threads_per_worker: threads,
        progress: !args.no_progress,
    };
    let summary = run::run_local(opts, interrupted()).await?;
    if summary.interrupted {
        let line = if args.config.is_some() {
            let out = out.clone();
            tokio::task::spawn_blocking(move || run::interrupted_line(&out)).await?
        } else {
            "interrupted; the demo starts afresh each time".to_string()
        };
        eprintln!("{line}; logs are in {}", out.join("logs").display());
        return Ok(ExitCode::from(130));
    }
    let s = &summary.status;
    if s.state != RunState::Finished as i32 {
        eprintln!(
            "error: run failed: {}; logs are in {}",
            s.error,
            out.join("logs").display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let resumed_at = start.resume_step();
    let figures = format!(
        "loss {}  val loss {}  {}",
        s.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        status_view::val(s.val_loss),
        status_view::rate(s.tokens_per_sec)
    );
    if s.step <= resumed_at {
        // Its checkpoint was already the last step: nothing was trained now, so no "finished N steps in 0s".
        println!(
            "run {} had no steps left after its checkpoint at step {resumed_at}",
            spec.run.name
        );
    } else if resumed_at > 0 {
        println!(
            "finished {} steps ({} of them now, resumed at step {resumed_at}) in {}: {figures}",
            s.step,
            s.step - resumed_at,
            status_view::duration(s.elapsed_secs)
        );
    } else {
        println!(
            "finished {} steps in {}: {figures}",
            s.step,
            status_view::duration(s.elapsed_secs)
        );
    }
    println!("checkpoint: {}", s.last_checkpoint);
    let ckpt = PathBuf::from(&s.last_checkpoint);
    if spec.data.source == DataSource::Addition {
        let spec2 = spec.clone();
        let acc = tokio::task::spawn_blocking(move || demo::addition_accuracy(&ckpt, &spec2, usize::MAX))
            .await?
            .context("evaluate the checkpoint")?;
        println!(
            "addition accuracy on {} held-out problems: {:.1}% ({} / {})",
            acc.total,
            100.0 * acc.fraction(),
            acc.correct,
            acc.total
        );
        for sample in acc.samples.iter().take(6) {
            let prompt = sample.prompt.trim_end_matches('=');
            println!(
                "  {prompt} = {:<5} {}",
                demo::readable_answer(&sample.got),
                if sample.correct() {
                    "✓".to_string()
                } else {
                    format!("✗ (expected {})", demo::readable_answer(&sample.expected))
                }
            );
        }
    } else if spec.data.source == DataSource::Sft {
        if let Some(line) = status_view::metrics_line(s) {
            println!("{line}");
        }
        let spec2 = spec.clone();
        let samples = tokio::task::spawn_blocking(move || demo::chat_samples(&ckpt, &spec2, 3)).await??;
        println!("held-out examples (greedy):");
        for (said, answer, reference) in samples {
            println!("  user: {said}\n  model: {answer}\n  reference: {reference}");
        }
    } else {
        let corpus = lockstep_common::data::Corpus::load(&spec)?;
        let (prompt, _) = corpus.window(Split::Val, 0)?;
        let prompt = prompt[..prompt.len().min(16)].to_vec();
        let text = tokio::task::spawn_blocking(move || demo::sample_text(&ckpt, &prompt, 200)).await??;
        // An undertrained model's greedy continuation is often a run of newlines; they say nothing.
        println!("sample (greedy):\n{}", text.trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

async fn demo_sft_cmd(args: sft_demo::DemoSftArgs) -> anyhow::Result<ExitCode> {
    match sft_demo::run(&args, interrupted).await? {
        sft_demo::Outcome::Interrupted => {
            eprintln!("interrupted: every process was stopped");
            Ok(ExitCode::from(130))
        }
        sft_demo::Outcome::Done(report) if args.json => {
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        sft_demo::Outcome::Done(report) => {
            print!("{}", report.render());
            println!("demo finished in {:.0} s", report.secs);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One attempt to reach the coordinator at `url` (a person is waiting), with the token and TLS of `security`.
async fn connect(url: &str, security: &SecurityArgs) -> anyhow::Result<CoordinatorClient> {
    let security = security.client_security()?;
    let channel = transport::endpoint(url, &security)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}; is it running?"))?;
    Ok(transport::client(channel, &security)?)
}

/// A refused call as one line: the coordinator's message (which says what to do) and the code.
fn rpc_error(url: &str, status: tonic::Status) -> anyhow::Error {
    let said = format!("{} ({:?})", status.message(), status.code());
    // The two that a wrong address gives: a port that accepts and never answers, and a server of another kind.
    if matches!(status.code(), tonic::Code::Cancelled | tonic::Code::DeadlineExceeded)
        && status.message().contains("Timeout expired")
    {
        return anyhow::anyhow!(
            "coordinator {url}: no answer within {} s ({said}); is it a lockstep-coordinator's --listen address, and \
             is the coordinator responsive?",
            transport::CALL_DEADLINE.as_secs()
        );
    }
    if transport::not_a_coordinator(&status) {
        return anyhow::anyhow!(
            "coordinator {url}: does not speak the lockstep protocol ({said}); is it a lockstep-coordinator's \
             --listen address?"
        );
    }
    anyhow::anyhow!("coordinator {url}: {said}")
}

async fn stop_cmd(args: StopArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.coordinator, &args.security).await?;
    let reply = client
        .stop_run(StopRunRequest { reason: args.reason })
        .await
        .map_err(|status| rpc_error(&args.coordinator, status))?
        .into_inner();
    println!("{}", reply.message);
    Ok(if reply.accepted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn status_cmd(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.coordinator, &args.security).await?;
    let refused = |status: tonic::Status| rpc_error(&args.coordinator, status);
    let show = |s: &lockstep_common::proto::RunStatus| {
        if args.json {
            println!("{}", status_view::to_json(s));
        } else {
            println!("{}", status_view::render_table(s));
        }
    };
    if args.watch {
        let mut stream = client
            .watch_status(WatchStatusRequest {})
            .await
            .map_err(refused)?
            .into_inner();
        while let Some(s) = stream.message().await.map_err(refused)? {
            show(&s);
        }
    } else {
        let s = client
            .get_status(GetStatusRequest {})
            .await
            .map_err(refused)?
            .into_inner();
        show(&s);
    }
    Ok(ExitCode::SUCCESS)
}

async fn history_cmd(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let messages = match &args.state_dir {
        Some(dir) => {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || history::read_state_dir(&dir, args.after)).await??
        }
        None => {
            let mut client = connect(&args.coordinator, &args.security).await?;
            let refused = |status: tonic::Status| rpc_error(&args.coordinator, status);
            let mut stream = client
                .get_history(GetHistoryRequest { after_step: args.after })
                .await
                .map_err(refused)?
                .into_inner();
            let mut messages = Vec::new();
            while let Some(m) = stream.message().await.map_err(refused)? {
                messages.push(m);
            }
            messages
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = if args.json {
        history::write_jsonl(&mut out, &messages)
    } else {
        history::write_csv(&mut out, &messages)
    };
    match written.and_then(|()| std::io::Write::flush(&mut out)) {
        // `lockstep history | head` closes the pipe early; that is not a failure.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing the history to stdout"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

async fn interrupted() {
    let ctrl_c = tokio::signal::ctrl_c();
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    } else {
        let _ = ctrl_c.await;
    }
}

fn parse_dtype(s: &str) -> Result<lockstep_common::spec::ComputeDtype, String> {
    match s {
        "f32" => Ok(lockstep_common::spec::ComputeDtype::F32),
        "bf16" => Ok(lockstep_common::spec::ComputeDtype::Bf16),
        _ => Err(format!("{s:?} is not a dtype; use f32 or bf16")),
    }
}
