//! The compute-dtype copies of the f32 master weights, made once per optimizer step instead of once per use.
//!
//! In a bf16 step every matmul needs its weight in bf16. Cast at each use, a step of K micro-batches casts every
//! weight K times (and its gradient back K times, through K graph nodes). While a [`CastScope`] is open (the
//! trainer opens one around a step's micro-batches, between two optimizer updates) the first cast of a weight is kept
//! and every later use in the scope shares it: one node in the autograd graph per weight and step, its backward
//! summing every micro-batch's gradient into the f32 weight. Outside a scope (evaluation, generation, a scope left
//! early by an error) nothing is kept, so a cast can never outlive the weights it was made from.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Tensor, TensorId};

use crate::error::Result;

#[derive(Default)]
pub struct WeightCasts {
    /// `Some` while a scope is open: the casts made in it, by the master weight's tensor id.
    kept: Mutex<Option<HashMap<TensorId, Tensor>>>,
}

impl WeightCasts {
    /// `weight` in `dtype`: itself when it already is; inside a scope, the scope's one cast of it.
    pub fn get(&self, weight: &Tensor, dtype: DType) -> Result<Tensor> {
        if weight.dtype() == dtype {
            return Ok(weight.clone());
        }
        // A panic elsewhere while the lock was held leaves a map of valid tensors: keep using it.
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(map) = kept.as_mut() else {
            return Ok(weight.to_dtype(dtype)?);
        };
        if let Some(cast) = map.get(&weight.id()).filter(|c| c.dtype() == dtype) {
            return Ok(cast.clone());
        }
        let cast = weight.to_dtype(dtype)?;
        map.insert(weight.id(), cast.clone());
        Ok(cast)
    }

    /// Keeps casts until the returned scope is dropped; the weights must not change meanwhile.
    pub fn scope(self: &Arc<Self>) -> CastScope {
        *self.kept.lock().unwrap_or_else(PoisonError::into_inner) = Some(HashMap::new());
        CastScope(Arc::clone(self))
    }
}

/// While alive, [`WeightCasts::get`] shares one cast per weight; dropping it forgets them all.
pub struct CastScope(Arc<WeightCasts>);

impl Drop for CastScope {
    fn drop(&mut self) {
        *self.0.kept.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn a_scope_shares_one_cast_and_gradients_of_every_use_reach_the_weight() {
        let w = Var::from_slice(&[1f32, 2.0, 3.0], 3, &Device::Cpu).unwrap();
        let casts = Arc::new(WeightCasts::default());
        // Outside a scope: a fresh cast per use.
        let (a, b) = (
            casts.get(w.as_tensor(), DType::BF16).unwrap(),
            casts.get(w.as_tensor(), DType::BF16).unwrap(),
        );
        assert_ne!(a.id(), b.id());
        let scope = casts.scope();
        let (a, b) = (
            casts.get(w.as_tensor(), DType::BF16).unwrap(),
            casts.get(w.as_tensor(), DType::BF16).unwrap(),
        );
        assert_eq!(a.id(), b.id());
        // Two "micro-batches" through the one cast, each with its own backward, as the trainer does.
        let mut total = vec![0f32; 3];
        for k in [1f64, 3.0] {
            let loss = (a.to_dtype(DType::F32).unwrap() * k).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let g = g.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            total.iter_mut().zip(g).for_each(|(t, g)| *t += g);
        }
        assert_eq!(total, vec![4.0; 3]);
        drop(scope);
        let c = casts.get(w.as_tensor(), DType::BF16).unwrap();
        assert_ne!(c.id(), a.id(), "the scope's casts are forgotten when it ends");
        // The dtype the weight already has costs nothing.
        assert_eq!(casts.get(w.as_tensor(), DType::F32).unwrap().id(), w.as_tensor().id());
    }
}
