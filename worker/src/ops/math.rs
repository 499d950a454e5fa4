//! Scalar building blocks the kernels inline into their loops: a branch-free `exp` and 8-lane reductions, so
//! that LLVM can vectorise the loops (a float sum in one accumulator cannot be reordered, and libm's `expf` is a
//! call per element), and [`simd_kernel!`], which compiles a kernel twice: for the baseline x86-64 (4 lanes) and
//! for AVX2 (8 lanes), picked at run time.

/// Defines `fn $name(args)` (returning nothing: kernels write into `&mut` slices) whose body is compiled twice,
/// for the build's baseline target and, on x86-64, with AVX2 and FMA enabled, the latter taken when the CPU has
/// them. Both give bitwise the same results: the lane count changes, the arithmetic does not (Rust never fuses
/// a·b + c into an FMA by itself, and the reductions keep 8 partial sums either way).
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn kernel($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    kernel($($arg),*)
                }
                if $crate::ops::math::wide_allowed()
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: `avx2` needs exactly the CPU features checked on the line above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            kernel($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

#[cfg(test)]
thread_local! {
    /// Set by tests to run this thread's kernels on the baseline path.
    pub(crate) static BASELINE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether [`simd_kernel!`] may take its AVX2 path (always, outside tests).
#[inline(always)]
pub(crate) fn wide_allowed() -> bool {
    #[cfg(test)]
    {
        !BASELINE_ONLY.with(std::cell::Cell::get)
    }
    #[cfg(not(test))]
    {
        true
    }
}

/// ln of the smallest normal f32: below it [`exp`] returns exactly 0.
const LN_MIN_NORMAL: f32 = -87.336_55;

/// eˣ in f32, within 2 ulp of the exact value for x ≥ −87.33, exactly 0 below (so exp(−∞) = 0, which the
/// masked softmax relies on), saturating at e⁸⁸ above 88; NaN stays NaN. Cephes' `expf`: x = n·ln2 + r with
/// |r| ≤ ln2/2, eʳ by a degree-7 polynomial, 2ⁿ built in the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-88.0, 88.0); // a NaN stays NaN
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n ∈ [−127, 127]; the result is only kept for x ≥ LN_MIN_NORMAL, where n ≥ −126 and 2ⁿ is a normal number.
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let pow2n = f32::from_bits((n.wrapping_add(127) << 23) as u32);
    if x < LN_MIN_NORMAL { 0.0 } else { e * pow2n }
}

/// Σ xs, in 8 interleaved partial sums.
#[inline(always)]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a·b, in 8 interleaved partial sums.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// max xs (−∞ for an empty slice; NaNs are skipped).
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_over_its_range() {
        let mut worst = 0.0f64;
        let mut x = -87.3f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            worst = worst.max((got - want).abs() / ulp as f64);
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
    }

    #[test]
    fn reductions_match_plain_loops_on_odd_lengths() {
        for n in [0usize, 1, 7, 8, 9, 17, 130] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5).collect();
            let s: f32 = a.iter().sum();
            let d: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let m = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert!((sum(&a) - s).abs() < 1e-4, "{n}");
            assert!((dot(&a, &b) - d).abs() < 1e-4, "{n}");
            assert_eq!(max(&a), m, "{n}");
        }
    }
}
