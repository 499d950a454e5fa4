//! The NCCL collective on a GPU host: only in a build with the `cuda` feature, which cannot start without the
//! NVIDIA driver, so never part of the default suite (scripts/gpu-check.sh runs it). One GPU allows one rank (NCCL
//! refuses two ranks on a GPU), so these use world size 1: the reduction of one rank must give back exactly what it
//! was given, through the host path and the device path, and deadlines and aborts must end calls that cannot finish.
#![cfg(feature = "cuda")]

use std::time::Duration;

use candle_core::{Device, Tensor};
use lockstep_worker::collective::{Abort, Collective, Nccl, NcclAbort, NcclConfig, UNIQUE_ID_LEN, offered_nccl_id};
use lockstep_worker::error::Error;

/// `LOCKSTEP_TEST_DEVICE`, default `cuda:0`.
fn gpu() -> Device {
    let flag = std::env::var("LOCKSTEP_TEST_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    let device = lockstep_worker::device::parse(&flag).unwrap().0;
    assert!(
        device.is_cuda(),
        "LOCKSTEP_TEST_DEVICE={flag}: these tests need a GPU (cuda:N)"
    );
    device
}

fn config(world_size: u32, unique_id: Vec<u8>, timeout: Duration) -> NcclConfig {
    NcclConfig {
        rank: 0,
        world_size,
        unique_id,
        timeout,
    }
}

fn alone(device: &Device) -> Nccl {
    let id = offered_nccl_id(device);
    assert_eq!(id.len(), UNIQUE_ID_LEN);
    Nccl::connect(device, config(1, id, Duration::from_secs(60)), NcclAbort::new()).unwrap()
}

/// Values whose bits would show any arithmetic: signs, signed zeros, subnormals, large and odd magnitudes.
fn awkward_values(n: usize) -> Vec<f32> {
    let special = [0.0, -0.0, f32::MIN_POSITIVE / 4.0, -1e-30, 3.0e38, -7.25, 1.0 / 3.0];
    (0..n)
        .map(|i| special.get(i).copied().unwrap_or(((i as f32) * 0.618).sin() * 1e3))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_world_of_one_round_trips_host_buffers_exactly() {
    let device = gpu();
    let mut nccl = alone(&device);
    assert_eq!((nccl.rank(), nccl.world_size()), (0, 1));
    // Twice, and larger the second time: the device buffer is kept, then grown.
    for n in [1_000, 3_000_017] {
        let want = awkward_values(n);
        let mut buf = want.clone();
        nccl.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(bits(&buf), bits(&want), "{n} floats");
    }
    nccl.all_reduce_sum(&mut []).unwrap();
}

#[test]
fn a_world_of_one_round_trips_device_tensors_exactly() {
    let device = gpu();
    let mut nccl = alone(&device);
    let want = awkward_values(1_000_003);
    let t = Tensor::from_vec(want.clone(), want.len(), &device).unwrap();
    let out = nccl.all_reduce_tensor(&t).unwrap();
    assert!(out.device().is_cuda());
    assert_eq!(bits(&out.to_vec1::<f32>().unwrap()), bits(&want));
    // A view that starts inside its storage.
    let part = t.narrow(0, 5, 1_000).unwrap();
    let out = nccl.all_reduce_tensor(&part).unwrap();
    assert_eq!(bits(&out.to_vec1::<f32>().unwrap()), bits(&want[5..1_005]));
    // The input is untouched: the reduction writes a new buffer.
    assert_eq!(bits(&t.to_vec1::<f32>().unwrap()), bits(&want));
}

#[test]
fn a_cpu_tensor_is_refused() {
    let mut nccl = alone(&gpu());
    let t = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
    match nccl.all_reduce_tensor(&t) {
        Err(Error::Nccl { message, .. }) => assert!(message.contains("on the GPU"), "{message}"),
        other => panic!("expected an NCCL error, got {other:?}"),
    }
}

#[test]
fn an_abort_fails_every_later_call() {
    let device = gpu();
    let id = offered_nccl_id(&device);
    let abort = NcclAbort::new();
    let mut nccl = Nccl::connect(&device, config(1, id, Duration::from_secs(60)), abort.clone()).unwrap();
    let mut buf = vec![1.0f32; 16];
    nccl.all_reduce_sum(&mut buf).unwrap();
    abort.abort();
    for _ in 0..2 {
        match nccl.all_reduce_sum(&mut buf) {
            Err(Error::Aborted(m)) => assert!(m.contains("aborted"), "{m}"),
            other => panic!("expected Aborted, got {other:?}"),
        }
    }
}

#[test]
fn an_abort_before_set_up_ends_it() {
    let device = gpu();
    let abort = NcclAbort::new();
    abort.abort();
    // World size 2 with no second rank: only the abort can end the set-up before its (long) deadline.
    let cfg = config(2, offered_nccl_id(&device), Duration::from_secs(600));
    match Nccl::connect(&device, cfg, abort) {
        Err(Error::Aborted(m)) => assert!(m.contains("set-up"), "{m}"),
        other => panic!("expected Aborted, got {other:?}"),
    }
}

#[test]
fn a_missing_peer_ends_the_set_up_at_its_deadline() {
    let device = gpu();
    let cfg = config(2, offered_nccl_id(&device), Duration::from_secs(3));
    match Nccl::connect(&device, cfg, NcclAbort::new()) {
        Err(Error::Nccl { message, .. }) => assert!(message.contains("deadline"), "{message}"),
        other => panic!("expected a deadline error, got {other:?}"),
    }
}

#[test]
fn a_bad_unique_id_is_named() {
    let cfg = config(1, vec![0; 12], Duration::from_secs(5));
    match Nccl::connect(&gpu(), cfg, NcclAbort::new()) {
        Err(Error::Nccl { message, .. }) => assert!(message.contains("12 bytes"), "{message}"),
        other => panic!("expected an NCCL error, got {other:?}"),
    }
}
