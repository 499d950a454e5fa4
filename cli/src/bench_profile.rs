//! `lockstep bench train --profile`: where each millisecond of a training step goes.
//!
//! candle has no per-op profiler hook and `loss.backward()` is one call, so every op category of the step is timed
//! on its own, forward and backward, at the model's shapes and dtypes on the chosen device (synchronised around
//! each timed region, warm-up calls first, then the median), and counted as often as a step runs it. The step
//! itself is timed as `bench train` times it (`Trainer::train_step`, one rank). What the parts' sum leaves of the
//! step is "unaccounted": allocation, kernel launches, copies and synchronisation the isolated parts do not see
//! (or, when negative, what the parts cost alone that they do not inside the step: a sync each, cold caches).
use candle_core::Device;
use lockstep_common::RunSpec;
use lockstep_worker::collective::Local;
use lockstep_worker::trainer::Trainer;
use serde::Serialize;

use crate::error::{Error, Result};

mod model_parts;
mod timer;
mod update_parts;

use model_parts::{Shapes, dtype_name};
use timer::{FwdBwd, Timer, median};

/// What a part of the step is, for the per-category totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Matmul,
    Attention,
    Normalisation,
    Activation,
    Residual,
    Embedding,
    Loss,
    Casts,
    Dropout,
    Copies,
    AllReduce,
    Optimizer,
}

impl Category {
    pub const ALL: [Category; 12] = [
        Category::Matmul,
        Category::Attention,
        Category::Normalisation,
        Category::Activation,
        Category::Residual,
        Category::Embedding,
        Category::Loss,
        Category::Casts,
        Category::Dropout,
        Category::Copies,
        Category::AllReduce,
        Category::Optimizer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::Matmul => "matmul",
            Category::Attention => "attention",
            Category::Normalisation => "normalisation",
            Category::Activation => "activation",
            Category::Residual => "residual",
            Category::Embedding => "embedding",
            Category::Loss => "loss",
            Category::Casts => "casts",
            Category::Dropout => "dropout",
            Category::Copies => "copies",
            Category::AllReduce => "all_reduce",
            Category::Optimizer => "optimizer",
        }
    }
}

/// One op (or a few of the same kind) timed alone.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub category: Category,
    pub name: String,
    pub shape: String,
    /// Calls per optimizer step (fractional when the last micro-batch is short).
    pub count: f64,
    /// Median ms of one call's forward and backward; `None` for what has no backward (optimizer, copies of
    /// gradients), whose whole time is `call_ms`.
    pub forward_ms: Option<f64>,
    pub backward_ms: Option<f64>,
    pub call_ms: f64,
    /// count × call_ms.
    pub ms_per_step: f64,
    /// ms_per_step / the measured step.
    pub share: f64,
    /// Per call, for matmuls: 2·M·K·N forward and twice that backward (the input's and the weight's gradients).
    pub flops_forward: Option<f64>,
    pub flops_backward: Option<f64>,
    /// Achieved: (flops_forward + flops_backward) / call_ms.
    pub tflops: Option<f64>,
    /// tflops over the device's dense peak for the dtype, when one is known.
    pub of_peak: Option<f64>,
}

impl Part {
    fn differentiated(category: Category, name: impl Into<String>, shape: String, count: f64, t: FwdBwd) -> Self {
        Self {
            forward_ms: Some(t.forward),
            backward_ms: Some(t.backward),
            ..Self::update(category, name, shape, count, t.forward + t.backward)
        }
    }

    fn update(category: Category, name: impl Into<String>, shape: String, count: f64, call_ms: f64) -> Self {
        Self {
            category,
            name: name.into(),
            shape,
            count,
            forward_ms: None,
            backward_ms: None,
            call_ms,
            ms_per_step: count * call_ms,
            share: 0.0,
            flops_forward: None,
            flops_backward: None,
            tflops: None,
            of_peak: None,
        }
    }

    fn with_matmul_flops(mut self, forward: f64) -> Self {
        let total = 3.0 * forward;
        self.flops_forward = Some(forward);
        self.flops_backward = Some(2.0 * forward);
        self.tflops = (self.call_ms > 0.0).then(|| total / (self.call_ms * 1e9));
        self
    }

    /// `r` with its error naming the part it came from (a CUDA out-of-memory says which shape did not fit).
    fn labelled<T>(part: &str, r: Result<T>) -> Result<T> {
        r.map_err(|source| Error::Profile {
            part: part.to_string(),
            source: Box::new(source),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CategoryTotal {
    pub category: Category,
    pub ms_per_step: f64,
    pub share: f64,
    /// Parts measured (0: the step has none, e.g. dropout off).
    pub parts: usize,
}

/// Medians over the measured steps of `Trainer::train_step`'s own split.
#[derive(Debug, Clone, Serialize)]
pub struct StepTimes {
    pub step_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub allreduce_ms: f64,
    pub optimizer_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelShape {
    pub preset: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub vocab_size: usize,
    pub params: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub model: ModelShape,
    pub device: String,
    pub dtype: String,
    pub micro_batch: usize,
    pub seq_len: usize,
    pub micro_batches_per_step: f64,
    pub warmup: u64,
    pub reps: u64,
    pub peak_tflops: Option<f64>,
    pub parts: Vec<Part>,
    /// Every category, in [`Category::ALL`]'s order.
    pub categories: Vec<CategoryTotal>,
    pub parts_ms: f64,
    /// parts_ms by phase, to hold against the step's own split: the model ops' forwards, their backwards, and the
    /// rest (upload, gradients, all-reduce, optimizer).
    pub parts_forward_ms: f64,
    pub parts_backward_ms: f64,
    pub parts_other_ms: f64,
    pub step: StepTimes,
    /// step − parts_ms (may be negative).
    pub unaccounted_ms: f64,
    pub unaccounted_share: f64,
    pub note: &'static str,
}

pub const NOTE: &str = "each part is timed alone (device synchronised around it, median of the measured calls), so the \
                        parts' sum differs from the step; unaccounted = step - sum: allocation, kernel launches, \
                        copies and synchronisation the isolated parts do not see (negative: the parts cost more alone)";

/// `reps` measured repetitions (median) after `warmup` unmeasured ones, for the step and for every part.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub warmup: u64,
    pub reps: u64,
    /// Force the trainer's gradient path: `Some(true)` the device-resident one (`DeviceGrads`, what accelerators
    /// take), `Some(false)` the flat host buffer; `None` the trainer's default for the device.
    pub device_resident: Option<bool>,
    /// The device's dense peak for the compute dtype in flop/s (`--peak-tflops` or Lockstep's table), if known.
    pub peak_flops: Option<f64>,
}

/// Profiles one rank training `spec` on `device` (named `device_name` in the output): the step first, then every
/// part on the trainer's model shape, parameters and a real step's gradients.
pub fn profile(spec: &RunSpec, device: &Device, device_name: &str, opts: Options) -> Result<Profile> {
    if opts.reps == 0 {
        return Err(Error::Usage(
            "--steps must be at least 1 with --profile (the measured repetitions)".into(),
        ));
    }
    let mut spec = spec.clone();
    spec.train.total_steps = spec.train.total_steps.max(opts.warmup + opts.reps);
    spec.validate()?;
    let mut trainer = Trainer::new(spec.clone(), Box::new(Local), device.clone())?;
    let device_resident = opts.device_resident.unwrap_or(!device.is_cpu());
    trainer.set_device_resident(device_resident);
    for _ in 0..opts.warmup {
        trainer.train_step()?;
    }
    let outs = (0..opts.reps)
        .map(|_| trainer.train_step())
        .collect::<Result<Vec<_>, _>>()?;
    let med = |f: fn(&lockstep_worker::trainer::StepOutcome) -> f64| median(outs.iter().map(f).collect());
    let step = StepTimes {
        step_ms: med(|o| o.step_ms),
        forward_ms: med(|o| o.forward_ms),
        backward_ms: med(|o| o.backward_ms),
        allreduce_ms: med(|o| o.allreduce_ms),
        optimizer_ms: med(|o| o.optimizer_ms),
    };

    let cfg = trainer.model().config().clone();
    let (global, t) = (spec.train.global_batch, spec.train.seq_len);
    let b = spec.train.micro_batch.min(global);
    let shapes = Shapes {
        cfg: &cfg,
        dt: trainer.model().compute_dtype(),
        b,
        t,
        micro_batches: global as f64 / b as f64,
        device,
    };
    let timer = Timer::new(device, opts.warmup as usize, opts.reps as usize);
    let mut parts = model_parts::measure(&shapes, &timer)?;
    let updates = update_parts::measure(
        trainer.model(),
        trainer.params(),
        &spec,
        &shapes,
        device_resident,
        &timer,
    );
    parts.extend(Part::labelled("gradients, all-reduce and optimizer", updates)?);
    let model = ModelShape {
        preset: spec.model.preset.clone(),
        n_layer: cfg.n_layer,
        n_head: cfg.n_head,
        n_embd: cfg.n_embd,
        block_size: cfg.block_size,
        vocab_size: cfg.vocab_size,
        params: trainer.params().num_elements(),
    };
    Ok(Profile::assemble(
        model,
        device_name,
        dtype_name(shapes.dt),
        &shapes,
        opts,
        parts,
        step,
    ))
}

impl Profile {
    fn assemble(
        model: ModelShape,
        device: &str,
        dtype: &str,
        s: &Shapes,
        opts: Options,
        mut parts: Vec<Part>,
        step: StepTimes,
    ) -> Self {
        let share = |ms: f64| if step.step_ms > 0.0 { ms / step.step_ms } else { 0.0 };
        for p in &mut parts {
            p.share = share(p.ms_per_step);
            p.of_peak = opts.peak_flops.zip(p.tflops).map(|(peak, t)| t * 1e12 / peak);
        }
        let categories = Category::ALL
            .iter()
            .map(|&c| {
                let mine = parts.iter().filter(|p| p.category == c);
                let ms: f64 = mine.clone().map(|p| p.ms_per_step).sum();
                CategoryTotal {
                    category: c,
                    ms_per_step: ms,
                    share: share(ms),
                    parts: mine.count(),
                }
            })
            .collect();
        let parts_ms: f64 = parts.iter().map(|p| p.ms_per_step).sum();
        let phase =
            |f: fn(&Part) -> Option<f64>| -> f64 { parts.iter().filter_map(|p| f(p).map(|ms| p.count * ms)).sum() };
        let (parts_forward_ms, parts_backward_ms) = (phase(|p| p.forward_ms), phase(|p| p.backward_ms));
        let parts_other_ms = phase(|p| p.forward_ms.is_none().then_some(p.call_ms));
        let unaccounted_ms = step.step_ms - parts_ms;
        Self {
            model,
            device: device.to_string(),
            dtype: dtype.to_string(),
            micro_batch: s.b,
            seq_len: s.t,
            micro_batches_per_step: s.micro_batches,
            warmup: opts.warmup,
            reps: opts.reps,
            peak_tflops: opts.peak_flops.map(|f| f / 1e12),
            parts,
            categories,
            parts_ms,
            parts_forward_ms,
            parts_backward_ms,
            parts_other_ms,
            unaccounted_share: share(unaccounted_ms),
            unaccounted_ms,
            step,
            note: NOTE,
        }
    }

    /// The table: each category's parts, then its total; the parts' sum, the step and what is unaccounted.
    pub fn render(&self) -> String {
        let m = &self.model;
        let mut out = format!(
            "profile of one training step: {} ({} layers, {} heads, {} dims, vocab {}, {:.2}M params), {}, {}; \
             micro-batch {} × {} tokens, {} micro-batch(es) per step; median of {} after {} warm-up\n",
            m.preset,
            m.n_layer,
            m.n_head,
            m.n_embd,
            m.vocab_size,
            m.params as f64 / 1e6,
            self.device,
            self.dtype,
            self.micro_batch,
            self.seq_len,
            trim(self.micro_batches_per_step),
            self.reps,
            self.warmup
        );
        if let Some(peak) = self.peak_tflops {
            out += &format!("matmul TFLOP/s (share of a {peak:.1} TFLOP/s peak)\n");
        }
        out += &format!("note: {}\n\n", self.note);
        out += &row([
            "category", "part", "shape", "count", "ms/call", "fwd ms", "bwd ms", "ms/step", "share", "TFLOP/s",
        ]);
        let ms = |v: f64| format!("{v:.3}");
        let opt = |v: Option<f64>| v.map_or("-".to_string(), ms);
        let pct = |v: f64| format!("{:.1}%", 100.0 * v);
        for total in &self.categories {
            let name = total.category.name();
            if total.parts == 0 {
                out += &row([name, "(none in this step)", "", "", "", "", "", "0.000", "0.0%", ""]);
                continue;
            }
            for p in self.parts.iter().filter(|p| p.category == total.category) {
                out += &row([
                    name,
                    &p.name,
                    &p.shape,
                    &trim(p.count),
                    &ms(p.call_ms),
                    &opt(p.forward_ms),
                    &opt(p.backward_ms),
                    &ms(p.ms_per_step),
                    &pct(p.share),
                    &match (p.tflops, p.of_peak) {
                        (Some(t), Some(f)) => format!("{t:.3} ({:.0}%)", 100.0 * f),
                        (Some(t), None) => format!("{t:.3}"),
                        _ => String::new(),
                    },
                ]);
            }
            let (total_ms, share) = (ms(total.ms_per_step), pct(total.share));
            out += &row([name, "= total", "", "", "", "", "", &total_ms, &share, ""]);
        }
        let s = &self.step;
        let summary = |label: &str, v: f64, share: f64| row(["", label, "", "", "", "", "", &ms(v), &pct(share), ""]);
        out += "\n";
        out += &summary(
            "sum of the parts",
            self.parts_ms,
            self.parts_ms / s.step_ms.max(f64::MIN_POSITIVE),
        );
        out += &summary("step (Trainer::train_step, as bench train)", s.step_ms, 1.0);
        out += &summary("unaccounted (step - sum)", self.unaccounted_ms, self.unaccounted_share);
        out += &format!(
            "step split (train_step's own timers): forward {:.3}, backward {:.3} (with gradient accumulation), \
             all-reduce {:.3}, optimizer {:.3} ms\n",
            s.forward_ms, s.backward_ms, s.allreduce_ms, s.optimizer_ms
        );
        out += &format!(
            "parts by phase: forward {:.3}, backward {:.3}, other (upload, gradients, all-reduce, optimizer) {:.3} ms\n",
            self.parts_forward_ms, self.parts_backward_ms, self.parts_other_ms
        );
        out
    }
}

/// One line of the table.
fn row(c: [&str; 10]) -> String {
    let line = format!(
        "{:<13} {:<60} {:<26} {:>6} {:>9} {:>9} {:>9} {:>9} {:>6} {:>14}",
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]
    );
    line.trim_end().to_string() + "\n"
}

/// A count without a useless ".0".
fn trim(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_common::spec::ComputeDtype;

    /// The GPU's path on the CPU: bf16 casts, dropout (so the composed attention), two micro-batches a step and the
    /// device-resident gradients.
    #[test]
    fn the_device_resident_bf16_dropout_path_is_profiled() {
        let mut spec = RunSpec::default();
        (
            spec.model.n_layer,
            spec.model.n_head,
            spec.model.n_embd,
            spec.model.dropout,
        ) = (1, 2, 16, 0.1);
        (spec.train.global_batch, spec.train.micro_batch) = (4, 2);
        spec.train.compute_dtype = ComputeDtype::Bf16;
        let opts = Options {
            warmup: 0,
            reps: 1,
            device_resident: Some(true),
            peak_flops: Some(1e12),
        };
        let p = profile(&spec, &Device::Cpu, "cpu", opts).unwrap();
        assert_eq!((p.dtype.as_str(), p.micro_batches_per_step), ("bf16", 2.0));
        let names = |c: Category| -> Vec<&str> {
            p.parts
                .iter()
                .filter(|x| x.category == c)
                .map(|x| x.name.as_str())
                .collect()
        };
        assert_eq!(names(Category::Attention).len(), 3, "{:?}", names(Category::Attention));
        assert_eq!(names(Category::Dropout).len(), 2);
        assert!(names(Category::Casts).iter().all(|n| !n.contains("no-op")));
        assert!(
            names(Category::Casts)
                .iter()
                .any(|n| n.contains("attention scores bf16→f32"))
        );
        assert!(names(Category::AllReduce)[0].starts_with("DeviceGrads::reduce"));
        let later = p.parts.iter().find(|x| x.name.contains("later micro-batches")).unwrap();
        assert_eq!(later.count, 1.0);
        let fc = p.parts.iter().find(|x| x.name.starts_with("mlp.c_fc")).unwrap();
        assert_eq!(fc.count, 2.0, "one layer, two micro-batches");
        assert_eq!(p.categories.len(), Category::ALL.len());
        assert!(p.parts.iter().all(|x| x.call_ms >= 0.0 && x.ms_per_step >= 0.0));
        assert!(p.render().contains("DeviceGrads::add"));
        assert_eq!(p.peak_tflops, Some(1.0));
        let fc_share = fc.tflops.unwrap() / 1.0;
        assert!((fc.of_peak.unwrap() - fc_share).abs() <= 1e-12 * fc_share.max(1.0));
    }

    #[test]
    fn no_measured_repetition_is_refused() {
        let opts = Options {
            warmup: 0,
            reps: 0,
            device_resident: None,
            peak_flops: None,
        };
        let err = profile(&RunSpec::default(), &Device::Cpu, "cpu", opts).unwrap_err();
        assert!(err.to_string().contains("--steps"), "{err}");
    }
}
