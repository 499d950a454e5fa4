//! The patched candle autograd (vendor/candle-core/PATCH.md): the first gradient reaching a tensor is stored as it is
//! instead of added to fresh zeros. These tests fail if the patch is lost (the `[patch]` entry or the vendored
//! change), and check that gradients, fan-in, the subtracting rules and the add's shape and dtype checks are as they
//! were.
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, Var};

fn var(values: &[f32]) -> Var {
    Var::new(values, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Where a CPU f32 tensor's storage starts: two tensors with the same address share their storage.
fn storage_address(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
        _ => panic!("expected CPU f32 storage"),
    }
}

#[test]
fn a_single_gradient_is_stored_without_a_copy() {
    let (a, b) = (var(&[1.0, 2.0, 3.0]), var(&[4.0, 5.0, 6.0]));
    let w = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
    let loss = (a.as_tensor() + b.as_tensor())
        .unwrap()
        .mul(&w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let (ga, gb) = (grads.get(a.as_tensor()).unwrap(), grads.get(b.as_tensor()).unwrap());
    assert_eq!(values(ga), [0.5, -1.0, 2.0]);
    assert_eq!(values(gb), [0.5, -1.0, 2.0]);
    // Both are the sum's gradient itself: unpatched candle added each into its own tensor of zeros.
    assert_eq!(storage_address(ga), storage_address(gb));
    assert!(ga.is_contiguous() && ga.layout().start_offset() == 0);
}

#[test]
fn fan_in_still_accumulates() {
    let a = var(&[1.0, -2.0, 3.0]);
    let x = a.as_tensor();
    // d/da (a*a + a + 3a) = 2a + 4
    let y = ((x * x).unwrap() + x).unwrap() + (x * 3.0).unwrap();
    let grads = y.unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(grads.get(x).unwrap()), [6.0, 0.0, 10.0]);
}

#[test]
fn subtracting_rules_negate_the_first_gradient_and_accumulate_later_ones() {
    let (a, b) = (var(&[1.0, 2.0]), var(&[3.0, 4.0]));
    let (x, z) = (a.as_tensor(), b.as_tensor());
    let grads = (x - z).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(grads.get(z).unwrap()), [-1.0, -1.0]);
    // b reached twice: through the subtraction and through 3b.
    let y = ((x - z).unwrap() + (z * 3.0).unwrap()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(values(grads.get(z).unwrap()), [2.0, 2.0]);
    // d/db (a / b) = -a / b²
    let grads = (x / z).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(grads.get(z).unwrap()), [-1.0 / 9.0, -2.0 / 16.0]);
}

#[test]
fn a_broadcast_or_transposed_gradient_is_stored_contiguous() {
    let bias = var(&[1.0, 2.0, 3.0]);
    let m = var(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let m2 = m.as_tensor().reshape((2, 3)).unwrap();
    let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
    // The transposed product hands m2's gradient back as a transposed view; the sum's as a broadcast one.
    let y = m2.t().unwrap().broadcast_mul(&w.sum_keepdim(1).unwrap()).unwrap();
    let y = y.t().unwrap().broadcast_add(bias.as_tensor()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let gm = grads.get(m.as_tensor()).unwrap();
    assert!(gm.is_contiguous() && gm.layout().start_offset() == 0);
    assert_eq!(values(gm), [3.0, 7.0, 11.0, 3.0, 7.0, 11.0]);
    let gb = grads.get(bias.as_tensor()).unwrap();
    assert!(gb.is_contiguous());
    assert_eq!(values(gb), [2.0, 2.0, 2.0]);
}

/// The identity, with a backward that returns a gradient of the wrong shape or dtype.
struct BadBackward {
    shape: bool,
}

impl CustomOp1 for BadBackward {
    fn name(&self) -> &'static str {
        "bad-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((s.clone(), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(if self.shape {
            Tensor::zeros(arg.elem_count() + 1, arg.dtype(), arg.device())?
        } else {
            grad_res.to_dtype(DType::F64)?
        }))
    }
}

#[test]
fn a_gradient_of_the_wrong_shape_or_dtype_is_still_refused() {
    let a = var(&[1.0, 2.0]);
    for shape in [true, false] {
        let y = a.as_tensor().apply_op1(BadBackward { shape }).unwrap();
        let err = y.sum_all().unwrap().backward().unwrap_err().to_string();
        let want = if shape { "shape mismatch" } else { "dtype mismatch" };
        assert!(err.contains(want), "{err}");
    }
}
