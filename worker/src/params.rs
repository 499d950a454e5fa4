//! The parameters in their one canonical order — sorted by name (DESIGN §3). Gradients are reduced as flat f32
//! buffers laid out in this order, so every process must agree on it; `VarMap`'s `HashMap` order differs between
//! processes and is never used.
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct Params {
    names: Vec<String>,
    vars: Vec<Var>,
}

impl Params {
    pub fn from_varmap(vm: &VarMap) -> Result<Self> {
        let data = vm
            .data()
            .lock()
            .map_err(|_| Error::Model("variable map lock poisoned".into()))?;
        let mut entries: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, vars) = entries.into_iter().unzip();
        Ok(Self { names, vars })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Total element count: the length of a flat gradient buffer.
    pub fn num_elements(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// flat[off..off+n] += d(loss)/d(param) for every parameter, in canonical order. Accumulating (rather than
    /// overwriting) is what gradient accumulation over micro-batches needs.
    pub fn accumulate_grads(&self, grads: &GradStore, flat: &mut [f32]) -> Result<()> {
        if flat.len() != self.num_elements() {
            return Err(Error::Model(format!(
                "gradient buffer has {} elements, the parameters {}",
                flat.len(),
                self.num_elements()
            )));
        }
        let mut off = 0;
        for (name, var) in self.names.iter().zip(&self.vars) {
            let n = var.elem_count();
            let grad = grads.get(var.as_tensor()).ok_or_else(|| {
                Error::Model(format!(
                    "parameter {name} received no gradient (is it used in the forward pass?)"
                ))
            })?;
            let values = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (acc, g) in flat[off..off + n].iter_mut().zip(&values) {
                *acc += g;
            }
            off += n;
        }
        Ok(())
    }

    /// Tensors shaped like each parameter (on its device), cut from a flat buffer in canonical order.
    pub fn unflatten(&self, flat: &[f32]) -> Result<Vec<Tensor>> {
        if flat.len() != self.num_elements() {
            return Err(Error::Model(format!(
                "flat buffer has {} elements, the parameters {}",
                flat.len(),
                self.num_elements()
            )));
        }
        let mut off = 0;
        self.vars
            .iter()
            .map(|var| {
                let n = var.elem_count();
                let t = Tensor::from_slice(&flat[off..off + n], var.shape(), var.device())?;
                off += n;
                Ok(t)
            })
            .collect()
    }

    /// First 16 hex chars of SHA-256 over every parameter's f32 little-endian bytes in canonical order: equal
    /// checksums on two ranks mean bitwise-equal parameters.
    pub fn checksum(&self) -> Result<String> {
        let mut hasher = Sha256::new();
        for var in &self.vars {
            let values = var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for v in values {
                hasher.update(v.to_le_bytes());
            }
        }
        Ok(hex::encode(hasher.finalize())[..16].to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn varmap() -> VarMap {
        let vm = VarMap::new();
        {
            let mut data = vm.data().lock().unwrap();
            for (name, vals, shape) in [
                ("b", vec![1f32, 2.0, 3.0, 4.0], vec![2, 2]),
                ("a", vec![5f32, 6.0], vec![2]),
            ] {
                data.insert(
                    name.into(),
                    Var::from_tensor(&Tensor::from_vec(vals, shape, &Device::Cpu).unwrap()).unwrap(),
                );
            }
        }
        vm
    }

    #[test]
    fn sorted_by_name_and_flatten_round_trip() {
        let p = Params::from_varmap(&varmap()).unwrap();
        assert_eq!(p.names(), ["a", "b"]);
        assert_eq!(p.num_elements(), 6);
        let ts = p.unflatten(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!(ts[0].to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert_eq!(ts[1].to_vec2::<f32>().unwrap(), [[3.0, 4.0], [5.0, 6.0]]);
        assert!(p.unflatten(&[0.0; 5]).is_err());
    }

    #[test]
    fn accumulates_gradients_and_names_missing_ones() {
        let p = Params::from_varmap(&varmap()).unwrap();
        let (a, b) = (p.vars()[0].as_tensor(), p.vars()[1].as_tensor());
        let loss = (a.sum_all().unwrap() * 2.0)
            .unwrap()
            .add(&b.sqr().unwrap().sum_all().unwrap())
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut flat = vec![1f32; 6];
        p.accumulate_grads(&grads, &mut flat).unwrap();
        assert_eq!(flat, [3.0, 3.0, 3.0, 5.0, 7.0, 9.0]);
        let only_a = a.sum_all().unwrap().backward().unwrap();
        let err = p.accumulate_grads(&only_a, &mut flat).unwrap_err().to_string();
        assert!(err.contains("parameter b"), "{err}");
    }

    #[test]
    fn checksum_changes_with_values() {
        let vm = varmap();
        let p = Params::from_varmap(&vm).unwrap();
        let before = p.checksum().unwrap();
        assert_eq!(before.len(), 16);
        assert_eq!(before, Params::from_varmap(&vm).unwrap().checksum().unwrap());
        p.vars()[0]
            .set(&Tensor::new(&[5f32, 6.5], &Device::Cpu).unwrap())
            .unwrap();
        assert_ne!(before, p.checksum().unwrap());
    }
}
