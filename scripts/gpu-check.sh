#!/usr/bin/env bash
# scripts/gpu-check.sh — issue 5's GPU correctness checks, in one run on a GPU host, everything on stdout.
#
# The GPU host needs no Rust: on a build box (no GPU needed) run
#     bash scripts/cuda/build.sh --tests --pack
# which leaves .device/cuda.tar.xz (~25 MB; carry it along with the checkout), then on the GPU host, from the
# repository root:
#     bash scripts/gpu-check.sh
# Checks, each PASS / FAIL / SKIP in the summary (exit status 1 if any failed):
#   1. --device: an absent GPU is refused in one line; cuda:0 opens.
#   2. the golden fixture tests (worker/tests/golden.rs) on the GPU, f32;
#   2b. the fused causal attention kernels (worker/tests/attention_gpu.rs) against the composed attention, f32 and
#      bf16, with the default kernels and with LOCKSTEP_ATTENTION_KERNELS=simt; then the fwd+bwd time of the GPT-2
#      shape (B=16, H=12, T=1024, D=64, bf16) beside PyTorch's flash attention (scripts/torch_attention.py);
#   2c. the fused LayerNorm, GELU, bias-add, cross-entropy, AdamW, embedding and head split/merge kernels
#      (worker/tests/kernels_gpu/) against the composed candle ops, forward and gradients, f32 and bf16;
#   3. NCCL, world size 1 (worker/tests/nccl.rs): exact round trips, abort, deadline;
#   4. the demo for GPU_CHECK_STEPS (200) steps on the GPU and on the CPU, same seed, f32: the loss curves must agree
#      within |gpu - cpu| <= 0.02 + 0.02 * cpu at every step (GPU and CPU sum in different orders, so the curves
#      drift apart slowly; this bound is a first guess until measured);
#   5. a short `lockstep bench train` on the GPU, f32 and bf16 (a smoke run);
#   6. issue 5's figures, side by side: `lockstep bench train` and scripts/torch_reference.py (when python3 has
#      torch) for GPT-2 124M (ctx 1024, micro-batch 16, vocab 50304) and the shakespeare-char shape (ctx 256,
#      batch 64), f32 and bf16, GPU_CHECK_FIGURE_STEPS (10) steps after 3 warm-up steps, the GPT-2 bf16 step's
#      profile (`lockstep bench train --profile`), and GPT-2 bf16 once more with every fused GPU kernel off
#      (LOCKSTEP_GPU_COMPOSED=all: issue 8's "before"). Copy them into docs/BENCHMARKS.md with the date and the GPU.
# Environment: GPU_CHECK_DEVICE (cuda:0), GPU_CHECK_STEPS (200), GPU_CHECK_BIN (.device/cuda/bin; point it at
# target/debug with GPU_CHECK_DEVICE=cpu to rehearse sections 1 and 4 on a machine without a GPU),
# GPU_CHECK_SECTIONS (all: "1 2 2b 2c 3 4 5 6"; run in the order given, e.g. "2b 2c 6 2 3 4 1 5" to get the kernel
# checks and the figures first; sections left out show as SKIP),
# GPU_CHECK_LIMIT (300: seconds any one test binary or benchmark may run before it is killed and counted as FAIL, so
# a hung kernel costs one check, not the device time of the rest),
# GPU_CHECK_BUDGET (unset: no limit; else seconds for the whole script: each command's limit shrinks to what is left,
# a section that would start with under 20 s left is skipped as SKIP, one that the budget cuts short is PARTIAL
# (FAIL if something else in it failed), and the summary still prints, so a runner with a hard time limit gets every
# result finished before it), GPU_CHECK_LOG (also write everything to this file, e.g.
# "$OUT/gpu-check.log" on the device tool, whose reply keeps only the output's tail).
# One call on a time-limited GPU machine (docs/CUDA.md), with the runner's limit ~40 s above the budget:
#     GPU_CHECK_SECTIONS="2b 2c 6 2 3 4 1 5" GPU_CHECK_BUDGET=520 GPU_CHECK_LOG=$OUT/gpu-check.log \
#       bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
exec 2>&1
TEE_PID=""
if [[ -n ${GPU_CHECK_LOG:-} ]]; then
  exec > >(tee "$GPU_CHECK_LOG") 2>&1
  TEE_PID=$!
fi
LIMIT=${GPU_CHECK_LIMIT:-300}
BUDGET=${GPU_CHECK_BUDGET:-}
if [[ -n $BUDGET && ! $BUDGET =~ ^[0-9]+$ ]]; then
  echo "GPU_CHECK_BUDGET=$BUDGET: give whole seconds, or leave it unset"; exit 2
fi
[[ $LIMIT =~ ^[0-9]+$ ]] || { echo "GPU_CHECK_LIMIT=$LIMIT: give whole seconds"; exit 2; }
# Seconds kept back from the budget for the summary; a section does not start with less than SECTION_MIN left.
RESERVE=10 SECTION_MIN=20
# left: the seconds of the budget still to spend (a large number without a budget).
left() { if [[ -n $BUDGET ]]; then echo $((BUDGET - RESERVE - SECONDS)); else echo 1000000; fi; }
# limit_now: the time limit for a command started now, GPU_CHECK_LIMIT or what is left of the budget.
limit_now() { local l; l=$(left); ((l < LIMIT)) && echo "$l" || echo "$LIMIT"; }
# CUT counts the commands the budget (not GPU_CHECK_LIMIT) cut short or never started; a section during which it
# grows is PARTIAL, not FAIL (see verdict).
CUT=0
# limited CMD...: CMD under the time limit. Killed by GPU_CHECK_LIMIT: 124 (timeout's status), a failure. Killed, or
# never started, because the budget ran out: counted in CUT, status 0 (it did not fail; it did not finish).
limited() {
  local lim
  lim=$(limit_now)
  if ((lim < 1)); then
    echo "(not started: GPU_CHECK_BUDGET spent)"
    CUT=$((CUT + 1))
    return 0
  fi
  # In the background, waited for: bash runs a signal's trap during `wait` but not during a foreground command, and
  # timeout puts its command in a process group of its own, out of reach of a signal to ours (see finish).
  timeout --kill-after=10 "$lim" "$@" &
  wait $!
  local rc=$?
  if ((rc == 124 || rc == 137)) && cut_short "$lim" "it was"; then
    return 0
  fi
  return $rc
}
# cut_short LIM WHO: after a command run under timeout LIM was killed, says which limit did it; true, and counted in
# CUT, if it was the budget (LIM below GPU_CHECK_LIMIT).
cut_short() {
  if (($1 < LIMIT)); then
    echo "($2 killed after $1 s: GPU_CHECK_BUDGET ran out)"
    CUT=$((CUT + 1))
    return 0
  fi
  echo "($2 killed after $1 s: GPU_CHECK_LIMIT)"
  return 1
}
# quick CMD...: a command that answers in seconds when all is well (nvidia-smi, a worker that opens the GPU and
# gives up on an absent coordinator), limited to a minute so a wedged driver cannot hold the script past its budget.
quick() { timeout --kill-after=5 60 "$@"; }
DEVICE=${GPU_CHECK_DEVICE:-cuda:0}
STEPS=${GPU_CHECK_STEPS:-200}
BIN=${GPU_CHECK_BIN:-.device/cuda/bin}
[[ $BIN == /* ]] || BIN=$PWD/$BIN
ALL_SECTIONS="1 2 2b 2c 3 4 5 6"
read -r -a SECTIONS <<<"${GPU_CHECK_SECTIONS:-$ALL_SECTIONS}"
for s in "${SECTIONS[@]}"; do
  if [[ " $ALL_SECTIONS " != *" $s "* ]]; then
    echo "GPU_CHECK_SECTIONS: no section '$s' (there are: $ALL_SECTIONS)"; exit 2
  fi
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lockstep-gpu-check.XXXXXX")
# On any exit: stop what is still running in the background (every limited command runs there, each in the process
# group timeout gives it, which a signal to the script's group does not reach), remove the scratch, and let tee write
# the log's last lines before the caller collects it.
finish() {
  local pids
  pids=$(jobs -p)
  if [[ -n $pids ]]; then
    kill $pids 2>/dev/null
    # They may still be writing into $WORK.
    wait $pids 2>/dev/null
  fi
  rm -rf "$WORK"
  if [[ -n $TEE_PID ]]; then
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
  fi
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
declare -a RESULTS=()
section() { echo; echo "==================== $*"; }
# The coordinators and workers started here share one run token (they refuse to run without one).
LOCKSTEP_TOKEN=${LOCKSTEP_TOKEN:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}
export LOCKSTEP_TOKEN
result() { RESULTS+=("$1  $2"); echo "---- $1: $2"; }

if [[ ! -x $BIN/lockstep-worker && -f .device/cuda.tar.xz && $BIN == "$PWD/.device/cuda/bin" ]]; then
  echo "unpacking .device/cuda.tar.xz"
  tar -C .device -xJf .device/cuda.tar.xz || exit 2
fi
if [[ ! -x $BIN/lockstep-worker ]]; then
  echo "no binaries in $BIN: run 'bash scripts/cuda/build.sh --tests --pack' on a build box first (docs/CUDA.md)"
  exit 2
fi

# run_demo DEVICE DIR: the built-in demo (spec defaults: 2-digit addition, seed 1337, f32) for $STEPS steps with one
# worker; the worker's JSON log ends up in DIR/worker.log.
run_demo() {
  local device=$1 dir=$2 addr="" _
  mkdir -p "$dir"
  cat > "$dir/run.toml" <<EOF
[run]
name = "gpu-check-demo"
[cluster]
listen = "127.0.0.1:0"
min_workers = 1
max_workers = 1
[train]
total_steps = $STEPS
$( ((STEPS < 50)) && echo "warmup_steps = $((STEPS / 2))  # the default 50 may not exceed total_steps" )
[checkpoint]
dir = "$dir/checkpoints"
EOF
  # Both processes run under one limit: a worker that fails leaves a coordinator waiting for it, which the limit ends.
  local lim clim
  clim=$(limit_now)
  ((clim >= 1)) || { echo "(not started: GPU_CHECK_BUDGET spent)"; CUT=$((CUT + 1)); return 1; }
  (cd "$dir" && exec timeout --kill-after=10 "$clim" "$BIN/lockstep-coordinator" --config run.toml \
     > coordinator.out 2> coordinator.log) &
  local coordinator=$!
  for _ in $(seq 300); do
    addr=$(sed -n 's/^listening on //p' "$dir/coordinator.out" 2>/dev/null)
    [[ -n $addr ]] && break
    kill -0 "$coordinator" 2>/dev/null || break
    sleep 0.1
  done
  if [[ -z $addr ]]; then
    echo "the coordinator did not start:"; cat "$dir/coordinator.log"; kill "$coordinator" 2>/dev/null; return 1
  fi
  local started=$SECONDS
  # The coordinator's start took some of the budget.
  lim=$(limit_now)
  ((lim >= 1)) || lim=1
  (cd "$dir" && exec timeout --kill-after=10 "$lim" "$BIN/lockstep-worker" --coordinator "http://$addr" \
     --device "$device" --log-format json > worker.log 2>&1) &
  wait $!
  local worker_rc=$?
  ((worker_rc == 0)) || kill "$coordinator" 2>/dev/null
  wait "$coordinator"; local coordinator_rc=$?
  echo "$device: the $STEPS-step run ended after $((SECONDS - started)) s (worker exit $worker_rc, coordinator exit $coordinator_rc)"
  # Both end at about the same moment when the budget runs out; whichever limit fired first, it was the budget's.
  if ((worker_rc == 124 || worker_rc == 137)) && cut_short "$lim" "the worker was"; then
    return 1
  fi
  if ((worker_rc == 0 && (coordinator_rc == 124 || coordinator_rc == 137))) \
    && cut_short "$clim" "the coordinator was"; then
    return 1
  fi
  [[ $worker_rc -eq 0 && $coordinator_rc -eq 0 ]] || { tail -n 5 "$dir/worker.log" "$dir/coordinator.log"; return 1; }
}

check_1() {
  section "1. --device"
  local out rc ok
  out=$(quick "$BIN/lockstep-worker" --device cuda:99 2>&1); rc=$?
  echo "\$ lockstep-worker --device cuda:99   (exit $rc)"; echo "$out"
  ok=1
  [[ $rc -ne 0 && $(grep -c '^error:' <<<"$out") -eq 1 && $out == *"--device cuda:99"* ]] || ok=0
  # The device opens, then the worker fails only on the coordinator that is not there.
  out=$(quick "$BIN/lockstep-worker" --device "$DEVICE" --coordinator http://127.0.0.1:1 --connect-timeout-secs 1 2>&1)
  rc=$?
  echo "\$ lockstep-worker --device $DEVICE --coordinator http://127.0.0.1:1   (exit $rc)"; echo "$out"
  [[ $rc -ne 0 && $out == *"127.0.0.1:1"* && $out != *"--device"* ]] || ok=0
  verdict $ok "1 --device"
}

# on_gpu LABEL: true on a GPU; on the CPU (a rehearsal) says LABEL is skipped as a GPU check.
on_gpu() {
  [[ $DEVICE != cpu ]] && return 0
  result SKIP "$1 (a GPU check)"
  return 1
}

# has_binary LABEL NAME: true if $BIN/NAME is there; else says LABEL is skipped for the want of it.
has_binary() {
  [[ -x $BIN/$2 ]] && return 0
  result SKIP "$1 (no $BIN/$2)"
  return 1
}

# test_binary NAME ARGS...: the test binary $BIN/NAME on $DEVICE under the time limit, its command line echoed. The
# caller's environment assignments reach it.
test_binary() {
  local name=$1
  shift
  echo "\$ $name $*"
  LOCKSTEP_TEST_DEVICE=$DEVICE limited "$BIN/$name" "$@"
}

# verdict OK LABEL: PASS or FAIL for LABEL, as OK is 1 or 0; PARTIAL if it passed so far but the budget cut some of
# it short (CUT grew since the section began: CUT_BEFORE).
verdict() {
  if ! (($1)); then
    result FAIL "$2"
  elif ((CUT > CUT_BEFORE)); then
    result PARTIAL "$2 (GPU_CHECK_BUDGET ran out before all of it ran)"
  else
    result PASS "$2"
  fi
}

check_2() {
  section "2. golden fixture tests on $DEVICE (f32)"
  has_binary "2 golden tests" test-golden || return 0
  # The tests find worker/tests/fixtures through CARGO_MANIFEST_DIR, as under cargo.
  local ok=1
  CARGO_MANIFEST_DIR=$PWD/worker test_binary test-golden --test-threads=1 || ok=0
  verdict $ok "2 golden tests on $DEVICE"
}

check_2b() {
  section "2b. fused causal attention on $DEVICE: kernels against the composed attention, and their speed"
  on_gpu "2b attention kernels" && has_binary "2b attention kernels" test-attention_gpu || return 0
  local ok=1 kernels
  # The default picks the tensor cores for bf16; simt is the plain-FMA fallback (and the f32 path either way).
  for kernels in mma simt; do
    echo "(LOCKSTEP_ATTENTION_KERNELS=$kernels)"
    LOCKSTEP_ATTENTION_KERNELS=$kernels test_binary test-attention_gpu --test-threads=1 --nocapture || ok=0
  done
  for kernels in mma simt; do
    echo "(LOCKSTEP_ATTENTION_KERNELS=$kernels)"
    LOCKSTEP_ATTENTION_KERNELS=$kernels test_binary test-attention_gpu --ignored --nocapture time_gpt2_shape_bf16 \
      || ok=0
  done
  if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    limited python3 scripts/torch_attention.py || ok=0
  else
    echo "(no PyTorch with CUDA here: no flash-attention time to compare with)"
  fi
  verdict $ok "2b attention kernels on $DEVICE"
}

check_2c() {
  section "2c. fused LayerNorm, GELU, bias, cross-entropy, AdamW, embedding, heads kernels on $DEVICE vs composed ops"
  on_gpu "2c fused kernels" && has_binary "2c fused kernels" test-kernels_gpu || return 0
  local ok=1
  test_binary test-kernels_gpu --test-threads=1 --nocapture || ok=0
  verdict $ok "2c fused kernels on $DEVICE"
}

check_3() {
  section "3. NCCL all-reduce, world size 1, on $DEVICE"
  on_gpu "3 NCCL" && has_binary "3 NCCL" test-nccl || return 0
  local ok=1
  NCCL_DEBUG=${NCCL_DEBUG:-WARN} test_binary test-nccl --test-threads=1 || ok=0
  verdict $ok "3 NCCL world size 1"
}

check_4() {
  section "4. demo, $STEPS steps: $DEVICE against cpu (same seed, f32)"
  local ok=1
  if run_demo cpu "$WORK/demo-cpu" && run_demo "$DEVICE" "$WORK/demo-gpu"; then
    if python3 - "$WORK/demo-cpu/worker.log" "$WORK/demo-gpu/worker.log" <<'EOF'
import json, sys

def losses(path):
    out = {}
    for line in open(path):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("message") == "step done":
            out[int(e["step"])] = float(e["loss"])
    return out

cpu, gpu = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(cpu) & set(gpu))
if not steps or len(steps) != len(cpu) or len(steps) != len(gpu):
    print(f"step reports differ: cpu {len(cpu)}, gpu {len(gpu)}, common {len(steps)}")
    sys.exit(1)
worst, bad = 0.0, []
for s in steps:
    d = abs(gpu[s] - cpu[s])
    worst = max(worst, d)
    if d > 0.02 + 0.02 * cpu[s]:
        bad.append(s)
print("step     cpu loss   gpu loss   |diff|")
for s in steps:
    if s in (1, 2, 5, 10) or s % 25 == 0 or s == steps[-1] or s in bad[:5]:
        print(f"{s:5d}  {cpu[s]:9.5f}  {gpu[s]:9.5f}  {abs(gpu[s] - cpu[s]):.2e}")
print(f"max |gpu - cpu| over {len(steps)} steps: {worst:.3e}; steps outside 0.02 + 2%: {len(bad)}")
sys.exit(1 if bad else 0)
EOF
    then :; else ok=0; fi
  elif ((CUT == CUT_BEFORE)); then
    ok=0
  fi
  verdict $ok "4 demo loss curve $DEVICE vs cpu"
}

check_5() {
  section "5. lockstep bench train on $DEVICE (smoke)"
  on_gpu "5 bench" && has_binary "5 bench" lockstep || return 0
  local ok=1 dtype
  for dtype in f32 bf16; do
    echo "\$ lockstep bench train --device $DEVICE --preset shakespeare-char --micro-batch 64 --dtype $dtype --warmup 2 --steps 5"
    limited "$BIN/lockstep" bench train --device "$DEVICE" --preset shakespeare-char --micro-batch 64 --dtype "$dtype" \
      --warmup 2 --steps 5 || ok=0
  done
  verdict $ok "5 bench smoke"
}

check_6() {
  section "6. figures: lockstep bench train vs PyTorch, same GPU, same sitting"
  on_gpu "6 figures" && has_binary "6 figures" lockstep || return 0
  local fsteps=${GPU_CHECK_FIGURE_STEPS:-10} ok=1 have_torch=0
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && have_torch=1
  # The order puts issue 9's bars first (GPT-2 bf16, then f32) and the profile third, so that a budget that runs
  # out takes the small shape's figures and the "before", not those.
  local gpt2="gpt2 --seq-len 1024 --micro-batch 16 --vocab-size 50304" small="shakespeare-char --micro-batch 64"
  for run in "$gpt2|bf16" "$gpt2|f32" "profile" "$small|bf16" "$small|f32" "before"; do
    if [[ $run == profile ]]; then
      # Where the GPT-2 bf16 step's milliseconds go, part by part (issue 8's profile, rerun after every change).
      echo "\$ lockstep bench train --profile --device $DEVICE --preset $gpt2 --dtype bf16 --warmup 3 --steps $fsteps"
      # shellcheck disable=SC2086 # $gpt2 is several flags
      limited "$BIN/lockstep" bench train --profile --device "$DEVICE" --preset $gpt2 --dtype bf16 --warmup 3 \
        --steps "$fsteps" || ok=0
      continue
    fi
    if [[ $run == before ]]; then
      # Issue 8's "before": the same GPT-2 bf16 step with every fused GPU kernel off (candle's composed ops,
      # attention's T×T probabilities stored).
      echo "\$ LOCKSTEP_GPU_COMPOSED=all lockstep bench train --device $DEVICE --preset $gpt2 --dtype bf16 --warmup 3 --steps $fsteps"
      # shellcheck disable=SC2086 # $gpt2 is several flags
      LOCKSTEP_GPU_COMPOSED=all limited "$BIN/lockstep" bench train --device "$DEVICE" --preset $gpt2 --dtype bf16 \
        --warmup 3 --steps "$fsteps" || ok=0
      continue
    fi
    local shape=${run%|*} dtype=${run#*|}
    echo "\$ lockstep bench train --device $DEVICE --preset $shape --dtype $dtype --warmup 3 --steps $fsteps"
    # shellcheck disable=SC2086 # $shape is several flags
    limited "$BIN/lockstep" bench train --device "$DEVICE" --preset $shape --dtype "$dtype" --warmup 3 \
      --steps "$fsteps" || ok=0
    if ((have_torch)); then
      echo "\$ python3 scripts/torch_reference.py --preset $shape --dtype $dtype --warmup 3 --steps $fsteps"
      # shellcheck disable=SC2086
      limited python3 scripts/torch_reference.py --preset $shape --dtype "$dtype" --warmup 3 --steps "$fsteps" \
        || ok=0
    fi
  done
  ((have_torch)) || echo "(no PyTorch with CUDA here: the reference figures are missing)"
  verdict $ok "6 figures printed"
}

section "environment"
if [[ $DEVICE == cuda* ]]; then
  # shellcheck source=scripts/cuda/cuda-libs.sh
  . scripts/cuda/cuda-libs.sh
  quick nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>/dev/null \
    || echo "(no nvidia-smi, or it did not answer)"
fi
echo "device $DEVICE, binaries $BIN, scratch $WORK"
quick "$BIN/lockstep-worker" --version
if [[ $DEVICE == cuda* ]]; then
  # Preflight: if the GPU does not open, every section would fail for that one reason; say it once and stop.
  said=$(quick "$BIN/lockstep-worker" --device "$DEVICE" --coordinator http://127.0.0.1:1 --connect-timeout-secs 1 2>&1)
  rc=$?
  ((rc == 124 || rc == 137)) && said="$said
(the worker did not answer within 60 s of opening $DEVICE: is the driver hung? see nvidia-smi)"
  if [[ $rc -eq 124 || $rc -eq 137 || $said == *"--device $DEVICE"* || $said == *"error while loading shared libraries"* ]]
  then
    echo "$said"
    echo "$DEVICE does not open here, so no check can run: fix the above (docs/CUDA.md, 'When it does not work')"
    exit 2
  fi
fi

for s in "${SECTIONS[@]}"; do
  CUT_BEFORE=$CUT
  if (($(left) < SECTION_MIN)); then
    section "$s: not started"
    result SKIP "$s (GPU_CHECK_BUDGET spent)"
  else
    "check_$s"
  fi
done
for s in $ALL_SECTIONS; do
  [[ " ${SECTIONS[*]} " == *" $s "* ]] || result SKIP "$s (not in GPU_CHECK_SECTIONS)"
done

section "summary"
failed=0
for r in "${RESULTS[@]}"; do
  echo "$r"
  [[ $r == FAIL* ]] && failed=1
done
exit $failed
