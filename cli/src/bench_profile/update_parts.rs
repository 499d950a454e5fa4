//! What a step does besides the model's forward and backward, on the path `Trainer::train_step` takes on this
//! device (the host buffer on a CPU; on CUDA the flat device buffer and the fused optimizer; elsewhere per-tensor
//! device sums and the composed AdamW): the batch's upload, the gradients' accumulation, the all-reduce (world size
//! 1), clipping and AdamW — on the trainer's own parameters and a real step's gradients.
use candle_core::Tensor;
use lockstep_common::RunSpec;
use lockstep_worker::collective::{Collective, Local};
use lockstep_worker::device_grads::{DeviceGrads, FlatGrads};
use lockstep_worker::model::{Gpt, cross_entropy_sum};
use lockstep_worker::optim::{AdamW, AdamWConfig, global_norm};
use lockstep_worker::params::Params;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::model_parts::{Shapes, causal_mask, dims};
use super::timer::Timer;
use super::{Category, Part};
use crate::error::Result;

/// A micro-batch's inputs and targets as the loader hands them over (host `u32`s, row-major [B, T]).
fn host_batch(b: usize, t: usize, vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut ids = || {
        (0..b * t)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect::<Vec<u32>>()
    };
    (ids(), ids())
}

/// `device_resident`: the trainer's gradient path (`Trainer::set_device_resident`).
pub fn measure(
    model: &Gpt,
    params: &Params,
    spec: &RunSpec,
    s: &Shapes,
    device_resident: bool,
    timer: &Timer,
) -> Result<Vec<Part>> {
    let (b, t, device, micro_batches) = (s.b, s.t, s.device, s.micro_batches);
    let (xs, ys) = host_batch(b, t, model.config().vocab_size);
    let mut parts = vec![Part::labelled("batch upload", {
        let ms = timer.op(
            || Ok((xs.clone(), ys.clone())),
            |(x, y)| {
                Ok((
                    Tensor::from_vec(x, (b, t), device)?,
                    Tensor::from_vec(y, (b, t), device)?,
                ))
            },
        )?;
        Ok(Part::update(
            Category::Copies,
            "batch inputs + targets to the device",
            dims(&[b, t]),
            micro_batches,
            ms,
        ))
    })?];
    // The model builds the mask only for attention dropout (the fused attention masks itself).
    if model.config().dropout > 0.0 {
        parts.push(Part::labelled("causal mask", {
            let ms = timer.op(|| Ok(()), |()| causal_mask(t, device))?;
            Ok(Part::update(
                Category::Copies,
                "causal mask built and uploaded",
                dims(&[t, t]),
                micro_batches,
                ms,
            ))
        })?);
    }

    // One real micro-batch's gradients and loss, as the trainer computes them.
    let x = Tensor::from_vec(xs, (b, t), device)?;
    let y = Tensor::from_vec(ys, (b, t), device)?;
    let scale = 1.0 / (spec.train.global_batch * t) as f64;
    let loss = (cross_entropy_sum(&model.forward_logits(&x, None)?, &y)? * scale)?;
    let grads = loss.backward()?;
    let n = params.num_elements();
    let values = format!("{n} f32 values");
    let cfg = AdamWConfig::from_spec(&spec.train);
    let lr = spec.train.lr;

    if !device_resident {
        // The host path: every gradient is added into one flat buffer, which the all-reduce sums in place.
        let mut flat = vec![0f32; n + 2];
        let accumulate = timer.op(
            || Ok(()),
            |()| {
                params.accumulate_grads(&grads, &mut flat[..n])?;
                flat[n] += loss.to_scalar::<f32>()?;
                Ok(())
            },
        )?;
        parts.push(Part::update(
            Category::Copies,
            "gradients into the flat host buffer (+ loss read)",
            values.clone(),
            micro_batches,
            accumulate,
        ));
        let reduce = timer.op(|| Ok(()), |()| Ok(Local.all_reduce_sum(&mut flat)?))?;
        parts.push(Part::update(
            Category::AllReduce,
            "all_reduce_sum (world size 1: nothing to do)",
            values.clone(),
            1.0,
            reduce,
        ));
        let norm = timer.op(|| Ok(()), |()| Ok(global_norm(&flat[..n])))?;
        parts.push(Part::update(
            Category::Optimizer,
            "global gradient norm (f64)",
            values.clone(),
            1.0,
            norm,
        ));
        // Timed as if the norm exceeded train.grad_clip (the trainer skips the pass when it does not).
        let factor = 0.5f32;
        let scale_ms = timer.op(
            || Ok(()),
            |()| {
                flat[..n].iter_mut().for_each(|g| *g *= factor);
                Ok(())
            },
        )?;
        parts.push(Part::update(
            Category::Optimizer,
            "clip (scale the buffer)",
            values.clone(),
            1.0,
            scale_ms,
        ));
        let unflatten = timer.op(|| Ok(()), |()| Ok(params.unflatten(&flat[..n])?))?;
        parts.push(Part::update(
            Category::Copies,
            "flat buffer into gradient tensors",
            values.clone(),
            1.0,
            unflatten,
        ));
        let grads = params.unflatten(&flat[..n])?;
        parts.push(adamw(params, cfg, &grads, lr, &values, timer)?);
    } else if AdamW::for_params(params, cfg)?.runs_fused() {
        // The fused path (CUDA): gradients copied into the persistent flat buffer, reduced in place, then the norm,
        // clipping and AdamW in three launches and the step's one read-back.
        let fresh = || -> Result<FlatGrads> { Ok(FlatGrads::new(params)?) };
        let first = timer.op(&fresh, |mut acc| Ok(acc.add(params, &grads, &loss)?))?;
        parts.push(Part::update(
            Category::Copies,
            "FlatGrads::add (into the persistent flat buffer)",
            values.clone(),
            micro_batches,
            first,
        ));
        let filled = || -> Result<FlatGrads> {
            let mut acc = FlatGrads::new(params)?;
            acc.add(params, &grads, &loss)?;
            Ok(acc)
        };
        let reduce = timer.op(&filled, |mut acc| Ok(acc.reduce(&mut Local, 0.0)?))?;
        parts.push(Part::update(
            Category::AllReduce,
            "FlatGrads::reduce: the stop vote, all-reduce (world size 1: none)",
            values.clone(),
            1.0,
            reduce,
        ));
        let reduced = filled()?.reduce(&mut Local, 0.0)?;
        let mut opt = AdamW::for_params(params, cfg)?;
        // Clipping active (a max norm far below any real one), as in a step that clips.
        let ms = timer.op(|| Ok(()), |()| Ok(opt.fused_step(params, &reduced, lr, 1e-6)?))?;
        parts.push(Part::update(
            Category::Optimizer,
            format!(
                "fused norm + clip + AdamW over {} tensors, and the one read-back",
                params.len()
            ),
            values.clone(),
            1.0,
            ms,
        ));
    } else {
        // The device path: gradients summed as tensors where they live, one concatenation all-reduced.
        let fresh = || -> Result<DeviceGrads> {
            let mut acc = DeviceGrads::new(params);
            acc.add(params, &grads, &loss)?;
            Ok(acc)
        };
        let first = timer.op(
            || Ok(DeviceGrads::new(params)),
            |mut acc| Ok(acc.add(params, &grads, &loss)?),
        )?;
        parts.push(Part::update(
            Category::Copies,
            "DeviceGrads::add, first micro-batch (cast to f32)",
            values.clone(),
            1.0,
            first,
        ));
        if micro_batches > 1.0 {
            let later = timer.op(&fresh, |mut acc| Ok(acc.add(params, &grads, &loss)?))?;
            parts.push(Part::update(
                Category::Copies,
                "DeviceGrads::add, later micro-batches (sum)",
                values.clone(),
                micro_batches - 1.0,
                later,
            ));
        }
        let reduce = timer.op(&fresh, |acc| Ok(acc.reduce(params, &mut Local, 0.0)?))?;
        parts.push(Part::update(
            Category::AllReduce,
            "DeviceGrads::reduce: concatenate, all-reduce (world size 1: none), norm, read back",
            values.clone(),
            1.0,
            reduce,
        ));
        let reduced = fresh()?.reduce(params, &mut Local, 0.0)?;
        let clip_ms = timer.op(|| Ok(()), |()| Ok(reduced.grads(params, 0.5)?))?;
        parts.push(Part::update(
            Category::Optimizer,
            "clip (scale each gradient view)",
            values.clone(),
            1.0,
            clip_ms,
        ));
        let grads = reduced.grads(params, 1.0)?;
        parts.push(adamw(params, cfg, &grads, lr, &values, timer)?);
    }
    Ok(parts)
}

/// One AdamW update of every parameter. It moves the parameters; the step has been timed already.
fn adamw(params: &Params, cfg: AdamWConfig, grads: &[Tensor], lr: f64, values: &str, timer: &Timer) -> Result<Part> {
    let mut opt = AdamW::new(params, cfg)?;
    let ms = timer.op(|| Ok(()), |()| Ok(opt.step(params, grads, lr)?))?;
    Ok(Part::update(
        Category::Optimizer,
        format!("AdamW over {} tensors", params.len()),
        values.to_string(),
        1.0,
        ms,
    ))
}
