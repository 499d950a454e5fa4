//! A step's gradients kept where the parameters live (DESIGN §4, issue 5: no host round trips on a GPU).
//!
//! The host path (`Params::accumulate_grads` into a flat `Vec<f32>`) copies every gradient of every micro-batch to
//! the host; on a CPU that is free, on a GPU it is a synchronisation and a PCIe copy per tensor. Here the
//! micro-batches' gradients are summed as tensors on the device, concatenated with the loss into one flat tensor in
//! canonical order, all-reduced where it lives ([`Collective::all_reduce_tensor`]), and cut back into per-parameter
//! views for clipping and AdamW, all on the device. The loss and the squared gradient norm come back to the host
//! together: the step's one synchronisation.
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::params::Params;

/// Gradient sums of one step, per parameter in canonical order, and the loss.
pub struct DeviceGrads {
    sums: Vec<Option<Tensor>>,
    loss: Option<Tensor>,
}

/// A step's gradients after the all-reduce.
pub struct Reduced {
    /// Every parameter's gradient, flattened in canonical order, f32, on the device.
    flat: Tensor,
    pub loss: f64,
    pub grad_norm: f64,
    /// The ranks' stop votes, summed.
    pub stop_votes: f64,
}

impl DeviceGrads {
    pub fn new(params: &Params) -> Self {
        Self {
            sums: vec![None; params.len()],
            loss: None,
        }
    }

    /// Adds one micro-batch's gradients and its (already scaled) loss.
    pub fn add(&mut self, params: &Params, grads: &GradStore, loss: &Tensor) -> Result<()> {
        for ((name, var), sum) in params.names().iter().zip(params.vars()).zip(&mut self.sums) {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| {
                    Error::Model(format!(
                        "parameter {name} received no gradient (is it used in the forward pass?)"
                    ))
                })?
                .to_dtype(DType::F32)?;
            *sum = Some(match sum.take() {
                None => g,
                Some(s) => (s + g)?,
            });
        }
        let loss = loss.detach().to_dtype(DType::F32)?;
        self.loss = Some(match self.loss.take() {
            None => loss,
            Some(l) => (l + loss)?,
        });
        Ok(())
    }

    /// Sums the gradients, the loss and the stop votes (`vote`: this rank's, 0 or 1) over all ranks and reads back
    /// the loss, the votes and the global norm.
    pub fn reduce(self, params: &Params, collective: &mut dyn Collective, vote: f32) -> Result<Reduced> {
        let mut parts = Vec::with_capacity(self.sums.len() + 1);
        for (name, sum) in params.names().iter().zip(self.sums) {
            let sum = sum.ok_or_else(|| Error::Model(format!("no micro-batch gave a gradient for {name}")))?;
            parts.push(sum.flatten_all()?);
        }
        let loss = self
            .loss
            .ok_or_else(|| Error::Model("a step without micro-batches".into()))?;
        parts.push(loss.reshape(1)?);
        parts.push(Tensor::new(&[vote], loss.device())?);
        let flat = collective.all_reduce_tensor(&Tensor::cat(&parts, 0)?)?;
        let n = params.num_elements();
        let grads = flat.narrow(0, 0, n)?;
        let norm2 = grads.sqr()?.sum_all()?.reshape(1)?;
        let host = Tensor::cat(&[flat.narrow(0, n, 2)?, norm2], 0)?.to_vec1::<f32>()?;
        Ok(Reduced {
            flat: grads,
            loss: f64::from(host[0]),
            stop_votes: f64::from(host[1]),
            grad_norm: f64::from(host[2]).sqrt(),
        })
    }
}

impl Reduced {
    /// Per-parameter gradients (views of the flat tensor, reshaped), multiplied by `scale` (the clipping factor).
    pub fn grads(&self, params: &Params, scale: f64) -> Result<Vec<Tensor>> {
        let mut off = 0;
        params
            .vars()
            .iter()
            .map(|var| {
                let n = var.elem_count();
                let g = self.flat.narrow(0, off, n)?.reshape(var.shape())?;
                off += n;
                Ok(if scale == 1.0 { g } else { g.affine(scale, 0.0)? })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    /// Stands for a second rank that computed exactly the same gradients: the sum doubles everything.
    struct Twin;

    impl Collective for Twin {
        fn rank(&self) -> u32 {
            0
        }
        fn world_size(&self) -> u32 {
            2
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
    }

    #[test]
    fn micro_batches_add_up_and_ranks_are_summed_through_the_collective() {
        let vm = VarMap::new();
        let (w, b) = (
            Var::from_slice(&[1f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu).unwrap(),
            Var::from_slice(&[0.5f32, -0.5], 2, &Device::Cpu).unwrap(),
        );
        vm.data().lock().unwrap().insert("a.weight".into(), w.clone());
        vm.data().lock().unwrap().insert("a.bias".into(), b.clone());
        let params = Params::from_varmap(&vm).unwrap();
        let mut acc = DeviceGrads::new(&params);
        for k in [1f64, 3.0] {
            // loss = k · (Σw² + Σb): d/dw = 2k·w, d/db = k.
            let loss = ((w.as_tensor().sqr().unwrap().sum_all().unwrap() + b.as_tensor().sum_all().unwrap()).unwrap()
                * k)
                .unwrap();
            let grads = loss.backward().unwrap();
            acc.add(&params, &grads, &loss).unwrap();
        }
        let r = acc.reduce(&params, &mut Twin, 1.0).unwrap();
        // One vote on each of the two ranks.
        assert_eq!(r.stop_votes, 2.0);
        // Σw² + Σb = 30; the two micro-batches weigh 1 + 3 = 4; the twin rank doubles: 240.
        assert_eq!(r.loss, 240.0);
        let g = r.grads(&params, 0.5).unwrap();
        // Canonical order is by name: a.bias, then a.weight. Gradients 2·(1+3)·w·2 ranks, db = 4·2, then × 0.5.
        assert_eq!(g[0].to_vec1::<f32>().unwrap(), vec![4.0, 4.0]);
        assert_eq!(g[1].to_vec2::<f32>().unwrap(), vec![vec![8.0, 16.0], vec![24.0, 32.0]]);
        let norm = (2.0 * 8f64.powi(2) + [16f64, 32.0, 48.0, 64.0].iter().map(|x| x * x).sum::<f64>()).sqrt();
        assert!((r.grad_norm - norm).abs() < 1e-9 * norm, "{} vs {norm}", r.grad_norm);
    }
}
