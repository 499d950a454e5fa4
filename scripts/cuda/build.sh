#!/usr/bin/env bash
# scripts/cuda/build.sh [--tests] [--pack] [--check]
#
# Builds Lockstep's CUDA flavour on any x86_64 Linux box, GPU or not (docs/CUDA.md):
#   1. the CUDA 13.0 + NCCL build toolchain from pinned PyPI wheels (scripts/cuda/setup-cuda-build.sh, once, ~0.9 GB),
#   2. `cargo build --release --features cuda` of lockstep and lockstep-worker, and lockstep-coordinator (which has
#      no GPU code), in target-cuda/ so that the CPU build in target/ stays as it is,
#   3. stripped copies in .device/cuda/bin/ (git-ignored): what a GPU host or deploy/Containerfile.gpu needs.
# --tests  also builds the GPU test binaries (worker/tests/golden.rs, nccl.rs, attention_gpu.rs, kernels_gpu/) as
#          .device/cuda/bin/test-golden, test-nccl, test-attention_gpu and test-kernels_gpu, for scripts/gpu-check.sh.
# --pack   also writes .device/cuda.tar.xz: the same files, small enough to carry to a GPU host (gpu-check unpacks it).
# --check  also runs, here and without a GPU, the CUDA flavour's tests that need none: the worker's unit tests (the
#          CPU paths as built with the feature, and the host-side logic of the kernel launches), its CPU integration
#          tests and the lockstep CLI's tests, with the toolchain's driver stub standing in for libcuda.so.1 (every
#          driver call fails, so nothing touches a GPU); and that --device cuda:0 then ends with the one-line error
#          naming the stub. About a minute warm; 4 min after a change to the workspace's code.
# Environment: LOCKSTEP_CUDA_PREFIX (toolchain, default ~/.cache/lockstep-cuda), CUDA_COMPUTE_CAP (default 90 =
# H100/H200), CARGO_TARGET_DIR (default target-cuda).
set -euo pipefail
cd "$(dirname "$0")/../.."
tests=0 pack=0 check=0
for arg in "$@"; do
  case $arg in
    --tests) tests=1 ;;
    --pack) pack=1 ;;
    --check) check=1 ;;
    *) echo "usage: scripts/cuda/build.sh [--tests] [--pack] [--check]" >&2; exit 2 ;;
  esac
done
log() { echo "[cuda/build] $*" >&2; }

eval "$(bash scripts/cuda/setup-cuda-build.sh "${LOCKSTEP_CUDA_PREFIX:-$HOME/.cache/lockstep-cuda}" | grep ^export)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
log "cargo build --release --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, into $CARGO_TARGET_DIR; cold: 10+ min)"
cargo build --release --features cuda -p lockstep-worker -p lockstep-cli
cargo build --release -p lockstep-coordinator

out=.device/cuda/bin
rm -rf "$out" && mkdir -p "$out"
for b in lockstep lockstep-worker lockstep-coordinator; do
  strip -o "$out/$b" "$CARGO_TARGET_DIR/release/$b"
done
if ((tests)); then
  log "building the GPU test binaries"
  # The executables' paths come from cargo's JSON messages (their names carry a hash).
  cargo test --release --features cuda -p lockstep-worker --test golden --test nccl --test attention_gpu --test kernels_gpu \
    --no-run \
    --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' \
    | while read -r name exe; do strip -o "$out/test-$name" "$exe"; done
  [[ -x $out/test-golden && -x $out/test-nccl && -x $out/test-attention_gpu && -x $out/test-kernels_gpu ]] \
    || { log "the test binaries were not found"; exit 1; }
fi
ls -l "$out" >&2
if ((pack)); then
  # One archive with a large window: the binaries share most of their bytes (candle and its kernels).
  tar -C .device -cf - cuda/bin | xz -T0 -9 > .device/cuda.tar.xz
  log "packed .device/cuda.tar.xz ($(du -h .device/cuda.tar.xz | cut -f1))"
fi
if ((check)); then
  # The stub is only libcuda.so (so that nothing loads it by accident); the loader wants libcuda.so.1.
  stub=$(mktemp -d)
  trap 'rm -rf "$stub"' EXIT
  ln -s "$CUDA_HOME/lib64/stubs/libcuda.so" "$stub/libcuda.so.1"
  export LD_LIBRARY_PATH=$stub:$CUDA_HOME/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  log "the CUDA flavour's tests that need no GPU, on this CPU (driver stub: $stub/libcuda.so.1)"
  cargo test --release --features cuda -p lockstep-worker --lib --test autograd --test cli --test golden --test sft
  cargo test --release --features cuda -p lockstep-cli
  log "--device cuda:0 against the driver stub"
  set +e
  said=$("$out/lockstep-worker" --device cuda:0 --coordinator http://127.0.0.1:1 2>&1)
  rc=$?
  set -e
  echo "$said" >&2
  if ((rc == 0)) || [[ $(grep -c '^error:' <<<"$said") -ne 1 || $said != *"--device cuda:0"*"stub"* ]]; then
    log "FAIL: expected one error line naming --device cuda:0 and the stub (exit $rc)"; exit 1
  fi
  log "check passed"
fi
