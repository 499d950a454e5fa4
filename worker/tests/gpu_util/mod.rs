//! What the GPU test binaries (attention_gpu.rs, kernels_gpu/) share: the GPU to test on, seeded inputs, and the
//! comparison with a reference. A module of each, not a test target of its own.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `LOCKSTEP_TEST_DEVICE`, default `cuda:0`; no GPU is a failure, not a skip. So is `LOCKSTEP_GPU_COMPOSED`: with
/// kernels turned off, tests of the fused ops against the composed ones would compare the composed ones with
/// themselves and pass for nothing.
pub fn gpu() -> Device {
    use lockstep_worker::ops::gpu_kernels;
    // An empty value turns nothing off, as in the worker; a misspelt one is refused here as there.
    match gpu_kernels::turned_off() {
        Ok([]) => {}
        Ok(off) => panic!(
            "{}: the GPU kernel tests need every fused kernel on, but {} turned off; unset it",
            gpu_kernels::VAR,
            off.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
        ),
        Err(e) => panic!("{e}"),
    }
    let flag = std::env::var("LOCKSTEP_TEST_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    match lockstep_worker::device::parse(&flag) {
        Ok((device, _)) if device.is_cuda() => device,
        Ok(_) => panic!("LOCKSTEP_TEST_DEVICE={flag}: these tests need a GPU (cuda:N)"),
        Err(e) => panic!("no GPU for the GPU tests ({e}); they run on a GPU host: bash scripts/gpu-check.sh"),
    }
}

/// Roughly normal values (a sum of uniforms), seeded, as f32 on `device`.
pub fn randn(seed: u64, dims: &[usize], std: f32, device: &Device) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * std * 1.7)
        .collect();
    Tensor::from_vec(v, dims, device).unwrap()
}

/// |got − want| ≤ tol·max(max|want|, 1) on every element (both compared as f32 on the host), else a panic naming the
/// worst one; prints the error either way.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let flat = |t: &Tensor| {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (got, want) = (flat(got), flat(want));
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs())) as f64;
    let (mut worst, mut at) = (0f64, 0);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(a.is_finite(), "{what}: element {i} is {a} (reference {b})");
        let err = (a - b).abs() as f64;
        if err > worst {
            (worst, at) = (err, i);
        }
    }
    println!(
        "  {what}: max error {worst:.2e} = {:.2e} of scale {scale:.3} (tolerance {tol:.0e})",
        worst / scale
    );
    assert!(
        worst <= tol * scale,
        "{what}: element {at}: {} vs reference {} (|error| {worst:.3e} > {tol:.0e} x {scale:.3})",
        got[at],
        want[at]
    );
}
