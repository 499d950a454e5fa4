//! Attention's head split and merge as one op each way: `Split` turns x `[B, T, C]` into `[B, nh, T, hd]`
//! (C = nh·hd, head h of position t being x[b, t, h·hd .. (h + 1)·hd]), `Merge` is the inverse. Both outputs are
//! contiguous. A pure permutation: forward and gradient are exact, in any dtype.
//!
//! It exists for the GPU, where candle's `reshape · transpose · contiguous` (and `transpose · reshape`) is its
//! generic strided copy, and the backward another: heads_cuda.rs moves whole 16-byte pieces of head rows instead
//! (worker/kernels/heads.cu). On the CPU `ops::split_heads` / `ops::merge_heads` keep candle's expressions, so the
//! CPU numerics and speed do not change; the CPU forward here is a plain loop, so the op can be tested without a GPU.
//! The backward of each direction is the other one, through the public dispatchers: on a GPU the other kernel, on
//! the CPU candle's expression.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, bail};

const OP: &str = "attention heads";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    /// `[B, T, C]` → `[B, nh, T, hd]`.
    Split,
    /// `[B, nh, T, hd]` → `[B, T, C]`.
    Merge,
}

pub(super) struct Heads {
    pub n_head: usize,
    pub dir: Direction,
}

/// (B, T, nh, hd) of the op's input; the error names the shape.
pub(super) fn dims(dir: Direction, n_head: usize, input: &[usize]) -> candle_core::Result<[usize; 4]> {
    match (dir, input) {
        (Direction::Split, &[b, t, c]) => {
            if n_head == 0 || c % n_head != 0 {
                bail!(
                    "{OP}: cannot split x {input:?} into {n_head} heads: C = {c} is not a multiple of the head count"
                );
            }
            Ok([b, t, n_head, c / n_head])
        }
        (Direction::Merge, &[b, nh, t, hd]) => {
            if nh != n_head {
                bail!("{OP}: cannot merge y {input:?} as {n_head} heads: it has {nh}");
            }
            Ok([b, t, nh, hd])
        }
        (Direction::Split, _) => bail!("{OP}: the split takes x as [B, T, C], got shape {input:?}"),
        (Direction::Merge, _) => bail!("{OP}: the merge takes y as [B, nh, T, hd], got shape {input:?}"),
    }
}

/// The output shape for (B, T, nh, hd).
pub(super) fn out_shape(dir: Direction, [b, t, nh, hd]: [usize; 4]) -> Shape {
    match dir {
        Direction::Split => Shape::from((b, nh, t, hd)),
        Direction::Merge => Shape::from((b, t, nh * hd)),
    }
}

/// The permutation on the host, a head row (hd elements) at a time.
fn permute<T: Copy>(src: &[T], dir: Direction, [b, t, nh, hd]: [usize; 4]) -> Vec<T> {
    let mut out = Vec::with_capacity(src.len());
    // Walk the output in order; `token` and `head` are the offsets of one head row in [B, T, C] and [B, nh, T, hd].
    let (outer, inner) = match dir {
        Direction::Split => (nh, t),
        Direction::Merge => (t, nh),
    };
    for bi in 0..b {
        for o in 0..outer {
            for i in 0..inner {
                let (h, ti) = match dir {
                    Direction::Split => (o, i),
                    Direction::Merge => (i, o),
                };
                let token = ((bi * t + ti) * nh + h) * hd;
                let head = ((bi * nh + h) * t + ti) * hd;
                let from = match dir {
                    Direction::Split => token,
                    Direction::Merge => head,
                };
                out.extend_from_slice(&src[from..from + hd]);
            }
        }
    }
    out
}

/// A [`crate::error::Error`] from the public dispatchers as candle's (a `bwd` returns candle's).
fn candle_error(e: crate::error::Error) -> candle_core::Error {
    match e {
        crate::error::Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        match self.dir {
            Direction::Split => "split-heads",
            Direction::Merge => "merge-heads",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(self.dir, self.n_head, l.dims())?;
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("{OP}: the input {:?} is not contiguous", l.dims())
        };
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(permute(&x[start..end], self.dir, d)),
            CpuStorage::BF16(x) => CpuStorage::BF16(permute(&x[start..end], self.dir, d)),
            CpuStorage::F16(x) => CpuStorage::F16(permute(&x[start..end], self.dir, d)),
            CpuStorage::F64(x) => CpuStorage::F64(permute(&x[start..end], self.dir, d)),
            other => bail!(
                "{OP}: no CPU kernel for a {:?} input {:?} (floats only)",
                other.dtype(),
                l.dims()
            ),
        };
        Ok((out, out_shape(self.dir, d)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::heads_cuda::forward(s, l, self.n_head, self.dir)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = match self.dir {
            Direction::Split => super::merge_heads(grad),
            Direction::Merge => super::split_heads(grad, self.n_head),
        };
        Ok(Some(dx.map_err(candle_error)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::ops::testing::randn;

    fn bits(t: &Tensor) -> Vec<u64> {
        let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        t.to_vec1::<f64>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    fn split_op(x: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
        x.apply_op1(Heads {
            n_head,
            dir: Direction::Split,
        })
    }

    fn merge_op(y: &Tensor) -> candle_core::Result<Tensor> {
        y.apply_op1(Heads {
            n_head: y.dim(1)?,
            dir: Direction::Merge,
        })
    }

    /// candle's expressions (`ops::composed`), the reference.
    fn split_candle(x: &Tensor, n_head: usize) -> Tensor {
        crate::ops::composed::split_heads(x, n_head).unwrap()
    }

    fn merge_candle(y: &Tensor) -> Tensor {
        crate::ops::composed::merge_heads(y).unwrap()
    }

    /// The output and the gradient of Σ f(x)·up with respect to x.
    fn forward_and_grad(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, up_seed: u64) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor());
        let up = randn(up_seed, y.dims(), 1.0).to_dtype(x.dtype()).unwrap();
        let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        (y, grads.get(v.as_tensor()).unwrap().clone())
    }

    const SHAPES: [(usize, usize, usize, usize); 4] = [(2, 7, 3, 64), (3, 5, 4, 15), (1, 1, 12, 8), (2, 9, 1, 6)];

    #[test]
    fn the_ops_match_candles_expressions_bitwise_forward_and_backward() {
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            for (i, &(b, t, nh, hd)) in SHAPES.iter().enumerate() {
                let what = format!("{dtype:?} B={b} T={t} nh={nh} hd={hd}");
                let seed = 10 * i as u64;
                let x = randn(seed, &[b, t, nh * hd], 1.0).to_dtype(dtype).unwrap();
                let (y, dx) = forward_and_grad(&|x| split_op(x, nh).unwrap(), &x, seed + 1);
                let (y_ref, dx_ref) = forward_and_grad(&|x| split_candle(x, nh), &x, seed + 1);
                assert_eq!(
                    (y.dims(), y.dtype()),
                    (&[b, nh, t, hd][..], dtype),
                    "{what}: split shape"
                );
                assert!(y.is_contiguous(), "{what}: split output contiguous");
                assert_eq!(bits(&y), bits(&y_ref), "{what}: split forward");
                assert_eq!(bits(&dx), bits(&dx_ref), "{what}: split gradient");

                let h = randn(seed + 2, &[b, nh, t, hd], 1.0).to_dtype(dtype).unwrap();
                let (z, dh) = forward_and_grad(&|h| merge_op(h).unwrap(), &h, seed + 3);
                let (z_ref, dh_ref) = forward_and_grad(&merge_candle, &h, seed + 3);
                assert_eq!(z.dims(), &[b, t, nh * hd], "{what}: merge shape");
                assert_eq!(bits(&z), bits(&z_ref), "{what}: merge forward");
                assert_eq!(bits(&dh), bits(&dh_ref), "{what}: merge gradient");
                assert_eq!(bits(&merge_op(&y).unwrap()), bits(&x), "{what}: merge of split");
            }
        }
    }

    /// A view that starts inside its storage (as a narrow makes): the op reads from the layout's start.
    #[test]
    fn the_ops_read_views_from_their_start_offset() {
        let (b, t, nh, hd) = (2, 3, 4, 5);
        let n = b * t * nh * hd;
        let flat = randn(1, &[n + 3], 1.0);
        let x = flat.narrow(0, 3, n).unwrap().reshape((b, t, nh * hd)).unwrap();
        assert_eq!(bits(&split_op(&x, nh).unwrap()), bits(&split_candle(&x, nh)));
        let y = flat.narrow(0, 3, n).unwrap().reshape((b, nh, t, hd)).unwrap();
        assert_eq!(bits(&merge_op(&y).unwrap()), bits(&merge_candle(&y)));
    }

    /// On the CPU the public functions are candle's expressions (same results and gradients), and they refuse bad
    /// shapes naming them.
    #[test]
    fn ops_split_and_merge_heads_keep_candles_expressions_on_the_cpu() {
        let x = randn(5, &[2, 6, 20], 1.0);
        let (y, dx) = forward_and_grad(&|x| crate::ops::split_heads(x, 4).unwrap(), &x, 6);
        let (y_ref, dx_ref) = forward_and_grad(&|x| split_candle(x, 4), &x, 6);
        assert_eq!((bits(&y), bits(&dx)), (bits(&y_ref), bits(&dx_ref)));
        let (z, dy) = forward_and_grad(&|y| crate::ops::merge_heads(y).unwrap(), &y_ref, 7);
        let (z_ref, dy_ref) = forward_and_grad(&merge_candle, &y_ref, 7);
        assert_eq!((bits(&z), bits(&dy)), (bits(&z_ref), bits(&dy_ref)));
        assert_eq!(bits(&z), bits(&x));
    }

    #[test]
    fn the_ops_refuse_shapes_they_do_not_take_naming_them() {
        let x = randn(1, &[2, 3, 10], 1.0);
        let cases = [
            (
                crate::ops::split_heads(&x, 4).unwrap_err().to_string(),
                "[2, 3, 10] into 4 heads",
            ),
            (crate::ops::split_heads(&x, 0).unwrap_err().to_string(), "into 0 heads"),
            (
                crate::ops::split_heads(&x.reshape((6, 10)).unwrap(), 2)
                    .unwrap_err()
                    .to_string(),
                "[B, T, C], got shape [6, 10]",
            ),
            (
                crate::ops::merge_heads(&x).unwrap_err().to_string(),
                "[B, nh, T, hd], got shape [2, 3, 10]",
            ),
            (split_op(&x, 3).unwrap_err().to_string(), "[2, 3, 10] into 3 heads"),
            (
                split_op(&x.to_dtype(DType::U32).unwrap(), 2).unwrap_err().to_string(),
                "floats only",
            ),
            (
                x.reshape((2, 3, 2, 5))
                    .unwrap()
                    .apply_op1(Heads {
                        n_head: 2,
                        dir: Direction::Merge,
                    })
                    .unwrap_err()
                    .to_string(),
                "[2, 3, 2, 5] as 2 heads: it has 3",
            ),
        ];
        for (err, want) in cases {
            assert!(err.contains(want), "{want:?} not in: {err}");
        }
        let err = Tensor::zeros((2, 2), DType::F32, &Device::Cpu)
            .unwrap()
            .apply_op1(Heads {
                n_head: 1,
                dir: Direction::Merge,
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("[B, nh, T, hd]"), "{err}");
    }
}
