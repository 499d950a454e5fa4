//! The token embedding as a gather with its own backward, for weight `[V, C]` and ids `[N]` (u32):
//! out[p, :] = weight[ids[p], :], and d weight[v, :] = Σ grad[p, :] over the positions p with ids[p] = v, summed in
//! increasing p in f32 (0 for ids that do not occur) and stored in the weight's dtype; the ids get no gradient.
//!
//! It exists for the GPU: there candle's backward of `index_select` is `index_add`, a single block whose threads each
//! loop over all N ids with a dependent read-modify-write per id (~16k serial memory round trips for a GPT-2
//! micro-batch), while embedding_cuda.rs sorts the positions by id and sums each row in parallel, without atomics, in
//! the same fixed order (worker/kernels/embedding.cu). On the CPU `ops::embedding` keeps candle's `index_select`,
//! so the CPU numerics do not change; the CPU forward and backward here are plain loops in the GPU's order, so the op
//! can be tested without a GPU.
//!
//! An id ≥ V is an error here; on a GPU the forward writes that row as NaN instead (refusing it would need the ids on
//! the host, a sync per step) and the backward leaves it out.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType, bail};

const OP: &str = "embedding";

pub(super) struct Embedding;

/// (V, C, N) of a weight `[V, C]` and ids `[N]`; the error names both shapes.
pub(super) fn shapes(weight: &[usize], ids: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    match (weight, ids) {
        (&[v, c], &[n]) => Ok((v, c, n)),
        (&[_, _], _) => bail!("{OP}: the ids must be a 1-D [N] tensor, got shape {ids:?}"),
        _ => bail!("{OP}: the weight must be a 2-D [vocab, C] table, got shape {weight:?}"),
    }
}

fn range(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: the {what} {:?} is not contiguous", l.dims())))
}

/// The rows of `table` (`v` rows of `c`) named by `ids`, or an error naming the first id out of range.
fn gather<T: WithDType>(table: &[T], v: usize, c: usize, ids: &[u32]) -> candle_core::Result<Vec<T>> {
    let mut out = Vec::with_capacity(ids.len() * c);
    for (p, &id) in ids.iter().enumerate() {
        let row = id as usize;
        if row >= v {
            bail!("{OP}: token id {id} at position {p} is out of range for a vocabulary of {v}");
        }
        out.extend_from_slice(&table[row * c..(row + 1) * c]);
    }
    Ok(out)
}

/// d weight `[V, C]` in f32: each row the sum of its positions' gradient rows in increasing position order, rows
/// with no position 0, ids ≥ V left out.
fn scatter_sum(grad: &[f32], ids: &[u32], v: usize, c: usize) -> Vec<f32> {
    let mut dw = vec![0f32; v * c];
    for (&id, g) in ids.iter().zip(grad.chunks_exact(c.max(1))) {
        let row = id as usize;
        if row < v {
            for (d, &g) in dw[row * c..(row + 1) * c].iter_mut().zip(g) {
                *d += g;
            }
        }
    }
    dw
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (v, c, n) = shapes(l1.dims(), l2.dims())?;
        let ((w0, w1), (i0, i1)) = (range(l1, "weight")?, range(l2, "ids")?);
        let CpuStorage::U32(ids) = s2 else {
            bail!("{OP}: the ids must be u32, got {:?}", s2.dtype())
        };
        let ids = &ids[i0..i1];
        let out = match s1 {
            CpuStorage::F32(w) => CpuStorage::F32(gather(&w[w0..w1], v, c, ids)?),
            CpuStorage::BF16(w) => CpuStorage::BF16(gather(&w[w0..w1], v, c, ids)?),
            other => bail!("{OP}: no kernel for a {:?} weight (f32 and bf16 only)", other.dtype()),
        };
        Ok((out, Shape::from((n, c))))
    }

    /// An id ≥ V makes its row NaN instead of an error (see embedding_cuda.rs).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::embedding_cuda::forward((s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        weight: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (v, c, n) = shapes(weight.dims(), ids.dims())?;
        if grad.dims() != [n, c] {
            bail!(
                "{OP}: backward: the gradient {:?} does not match ids {:?} and weight {:?}",
                grad.dims(),
                ids.dims(),
                weight.dims()
            );
        }
        #[cfg(feature = "cuda")]
        if weight.device().is_cuda() {
            let dw = super::embedding_cuda::backward(weight, ids, grad)?;
            return Ok((Some(dw), None));
        }
        if ids.dtype() != DType::U32 {
            bail!("{OP}: backward: the ids must be u32, got {:?}", ids.dtype());
        }
        let ids = ids.to_vec1::<u32>()?;
        let g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let dw = Tensor::from_vec(scatter_sum(&g, &ids, v, c), (v, c), weight.device())?;
        Ok((Some(dw.to_dtype(weight.dtype())?), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::ops::testing::{assert_close, randn};

    /// `n` ids below `v`, skewed so that small ids repeat often and some ids never occur.
    fn ids(seed: u64, n: usize, v: usize) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| rng.random_range(0..v).min(rng.random_range(0..v)) as u32)
            .collect()
    }

    fn apply(weight: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        weight.apply_op2(ids, Embedding)
    }

    /// The gradient of Σ f(weight)·up with respect to weight.
    fn grad(f: &dyn Fn(&Tensor) -> Tensor, weight: &Tensor, up: &Tensor) -> Tensor {
        let w = Var::from_tensor(weight).unwrap();
        let loss = (f(w.as_tensor()) * up).unwrap().sum_all().unwrap();
        loss.backward().unwrap().get(w.as_tensor()).unwrap().clone()
    }

    /// The specification: per row, 0 + g_p0 + g_p1 + ... in f32 over its positions in increasing order.
    fn sequential(up: &[f32], ids: &[u32], v: usize, c: usize) -> Vec<f32> {
        let mut dw = vec![0f32; v * c];
        for row in 0..v {
            for col in 0..c {
                let mut s = 0f32;
                for (p, &id) in ids.iter().enumerate() {
                    if id as usize == row {
                        s += up[p * c + col];
                    }
                }
                dw[row * c + col] = s;
            }
        }
        dw
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        t.to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn embedding_matches_index_select_forward_exactly_and_sums_gradients_in_position_order() {
        // Many repeats, V > N, one id everywhere, a single position, C = 1.
        for (seed, (v, c, n)) in [(37, 20, 300), (1000, 8, 50), (9, 33, 70), (3, 5, 1), (11, 1, 40)]
            .into_iter()
            .enumerate()
        {
            let seed = seed as u64;
            let mut id_list = ids(seed, n, v);
            if v == 9 {
                id_list = vec![4; n];
            }
            let idt = Tensor::from_vec(id_list.clone(), n, &Device::Cpu).unwrap();
            let weight = randn(100 + seed, &[v, c], 1.0);
            let up = randn(200 + seed, &[n, c], 1.0);
            let what = format!("V={v} C={c} N={n}");

            let fused = apply(&weight, &idt).unwrap();
            let reference = weight.index_select(&idt, 0).unwrap();
            assert_eq!(bits(&fused), bits(&reference), "{what}: forward");

            let dw = grad(&|w| apply(w, &idt).unwrap(), &weight, &up);
            let want = sequential(&up.flatten_all().unwrap().to_vec1().unwrap(), &id_list, v, c);
            let want = Tensor::from_vec(want, (v, c), &Device::Cpu).unwrap();
            assert_eq!(bits(&dw), bits(&want), "{what}: gradient vs the sequential sum");
            let candle = grad(&|w| w.index_select(&idt, 0).unwrap(), &weight, &up);
            assert_close(&format!("{what}: gradient vs index_select"), &dw, &candle, 1e-6, 1e-6);
        }
    }

    /// bf16: the forward copies bits; the gradient is the f32 sum of the bf16 upstream rows, rounded once.
    #[test]
    fn embedding_in_bf16_rounds_the_f32_sum_once() {
        let (v, c, n) = (13, 7, 90);
        let id_list = ids(5, n, v);
        let idt = Tensor::from_vec(id_list.clone(), n, &Device::Cpu).unwrap();
        let weight = randn(6, &[v, c], 1.0).to_dtype(DType::BF16).unwrap();
        let up = randn(7, &[n, c], 1.0).to_dtype(DType::BF16).unwrap();
        let fused = apply(&weight, &idt).unwrap();
        assert_eq!(fused.dtype(), DType::BF16);
        assert_eq!(bits(&fused), bits(&weight.index_select(&idt, 0).unwrap()));
        let dw = grad(&|w| apply(w, &idt).unwrap(), &weight, &up);
        assert_eq!(dw.dtype(), DType::BF16);
        let up32 = up
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = Tensor::from_vec(sequential(&up32, &id_list, v, c), (v, c), &Device::Cpu).unwrap();
        assert_eq!(bits(&dw), bits(&want.to_dtype(DType::BF16).unwrap()));
    }

    #[test]
    fn embedding_refuses_an_id_out_of_range_naming_it() {
        let weight = randn(1, &[6, 4], 1.0);
        let idt = Tensor::new(&[0u32, 5, 6, 1], &Device::Cpu).unwrap();
        let err = apply(&weight, &idt).unwrap_err().to_string();
        assert!(
            err.contains("token id 6") && err.contains("position 2") && err.contains("vocabulary of 6"),
            "{err}"
        );
    }

    #[test]
    fn embedding_refuses_shapes_and_dtypes_it_does_not_take() {
        let weight = randn(1, &[6, 4], 1.0);
        let idt = Tensor::new(&[0u32, 5], &Device::Cpu).unwrap();
        let cases = [
            (randn(2, &[6, 4, 1], 1.0), idt.clone(), "2-D [vocab, C]"),
            (randn(3, &[6], 1.0), idt.clone(), "2-D [vocab, C]"),
            (weight.clone(), idt.reshape((1, 2)).unwrap(), "1-D [N]"),
            (weight.clone(), idt.to_dtype(DType::I64).unwrap(), "must be u32"),
            (weight.to_dtype(DType::F64).unwrap(), idt.clone(), "f32 and bf16 only"),
        ];
        for (w, i, want) in cases {
            let err = apply(&w, &i).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "weight {:?}, ids {:?} {:?}: {err}",
                w.dims(),
                i.dims(),
                i.dtype()
            );
        }
    }

    /// On the CPU the public function is candle's index_select: same results, bitwise, forward and backward.
    #[test]
    fn ops_embedding_keeps_index_select_on_the_cpu() {
        let (v, c, n) = (17, 6, 40);
        let idt = Tensor::from_vec(ids(9, n, v), n, &Device::Cpu).unwrap();
        let weight = randn(10, &[v, c], 1.0);
        let up = randn(11, &[n, c], 1.0);
        let ours = crate::ops::embedding(&weight, &idt).unwrap();
        assert_eq!(bits(&ours), bits(&weight.index_select(&idt, 0).unwrap()));
        let dw = grad(&|w| crate::ops::embedding(w, &idt).unwrap(), &weight, &up);
        let candle = grad(&|w| w.index_select(&idt, 0).unwrap(), &weight, &up);
        assert_eq!(bits(&dw), bits(&candle));
    }
}
