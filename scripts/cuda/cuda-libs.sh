#!/usr/bin/env bash
# Source this on a GPU host before running a CUDA build of Lockstep:  . scripts/cuda/cuda-libs.sh
# It finds the CUDA 13 user-space libraries (cuBLAS, cuRAND, NVRTC, cudart, NCCL) and the driver (libcuda.so.1)
# wherever that host keeps them (a CUDA toolkit, PyTorch's nvidia/* wheels, the wheels scripts/cuda/setup-cuda-build.sh
# installed, the driver folder) and exports LD_LIBRARY_PATH. Set CUDA_LIB_DIRS=dir1:dir2 to search those first.
# It also keeps the driver's JIT cache (candle's kernels ship as PTX: the first launch in a process compiles them,
# seconds) in a persistent folder, unless CUDA_CACHE_PATH is set already. Prints what it found. See docs/CUDA.md.
# ---- locate the CUDA 13 user-space libraries the binary needs
NEED=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13 libnccl.so.2)
cands=()
[[ -n ${CUDA_LIB_DIRS:-} ]] && IFS=: read -r -a cands <<<"$CUDA_LIB_DIRS"
cands+=("${LOCKSTEP_CUDA_PREFIX:-$HOME/.cache/lockstep-cuda}/pip/nvidia/cu13/lib" \
       "${LOCKSTEP_CUDA_PREFIX:-$HOME/.cache/lockstep-cuda}/pip/nvidia/nccl/lib" /opt/lockstep/cuda/lib)
for py in python3 /opt/*/.venv/bin/python3 /usr/bin/python3; do
  command -v "$py" >/dev/null 2>&1 || continue
  sp=$("$py" -c 'import nvidia,os;print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null) || continue
  [[ -n $sp ]] || continue
  cands+=("$sp/nvidia/cu13/lib")
  for d in "$sp"/nvidia/*/lib; do cands+=("$d"); done
done
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda*/lib64 \
         /usr/local/cuda*/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib \
         /usr/lib/x86_64-linux-gnu /usr/lib64; do
  cands+=("$d")
done
LIBDIRS=()
add_dir() { local d; for d in "${LIBDIRS[@]}"; do [[ $d == "$1" ]] && return; done; LIBDIRS+=("$1"); }
for lib in "${NEED[@]}"; do
  found=
  for d in "${cands[@]}"; do
    [[ $d == */stubs* || $d == */compat* ]] && continue
    if [[ -e $d/$lib ]]; then found=$d; break; fi
  done
  if [[ -z $found ]]; then   # last resort: search the whole filesystem
    f=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$lib*" -print 2>/dev/null \
        | grep -v -e /stubs/ -e /compat/ | head -1)
    [[ -n $f ]] && found=$(dirname "$f")
  fi
  if [[ -n $found ]]; then echo "found $lib in $found"; add_dir "$found"
  else echo "NOT FOUND: $lib"; fi
done
# the driver: libcuda.so.1 (normally in the loader cache or /usr/local/nvidia/lib64)
if ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 '; then
  echo "found libcuda.so.1 in the loader cache: $(ldconfig -p | grep 'libcuda.so.1 ' | head -1 | sed 's/.*=> //')"
else
  # a real driver library is tens of MB; link-time stubs are tiny: skip those
  real_drv() { [[ -e $1 && $(stat -L -c %s "$1" 2>/dev/null || echo 0) -gt 2000000 ]]; }
  drv=
  for f in /usr/local/nvidia/lib64/libcuda.so.1 /usr/local/nvidia/lib/libcuda.so.1 \
           /usr/lib/x86_64-linux-gnu/libcuda.so.1 /usr/lib64/libcuda.so.1 /lib/x86_64-linux-gnu/libcuda.so.1; do
    real_drv "$f" && { drv=$(dirname "$f"); break; }
  done
  if [[ -z $drv ]]; then
    while read -r f; do real_drv "$f" && { drv=$(dirname "$f"); break; }; done < <(
      find / -xdev \( -path /proc -o -path /sys \) -prune -o -name 'libcuda.so.1' -print 2>/dev/null | grep -v -e /stubs/ -e /compat/)
  fi
  if [[ -n $drv ]]; then echo "found libcuda.so.1 in $drv"; add_dir "$drv"; else echo "NOT FOUND: libcuda.so.1 (driver)"; fi
fi
LD_LIBRARY_PATH=$(IFS=:; echo "${LIBDIRS[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
# ---- the driver's JIT cache: persistent, and large enough for all of candle's kernels
if [[ -z ${CUDA_CACHE_PATH:-} ]]; then
  CUDA_CACHE_PATH=${XDG_CACHE_HOME:-$HOME/.cache}/lockstep/cuda-jit
  mkdir -p "$CUDA_CACHE_PATH" 2>/dev/null || true
fi
export CUDA_CACHE_PATH
export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
echo "CUDA_CACHE_PATH=$CUDA_CACHE_PATH"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | sed 's/^/GPU: /'
true
