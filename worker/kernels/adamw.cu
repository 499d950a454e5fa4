// The optimizer step on the GPU without host round trips, for worker/src/optim_cuda.rs (which launches these and
// must agree with the launch shapes documented on each kernel). Compiled to PTX by worker/build.rs.
//
// One step, all on candle's stream, the host reading three floats back at the very end:
//   accumulate   each micro-batch's gradient tensors into one persistent flat f32 buffer [grads (n) | loss | votes]
//                in canonical parameter order (the first micro-batch overwrites, the later ones add), so no
//                per-step concatenation is allocated; `put` writes this rank's stop vote into its slot;
//   (all-reduce of that buffer, by the collective)
//   norm         the squared L2 norm of the reduced gradients in two deterministic stages: every block sums a fixed
//                strided share into a persistent scratch slot, then one block adds the slots in a fixed tree, and
//                writes stats = [loss, votes, norm²] (the two copied from the reduced buffer's tail);
//   update       one multi-tensor AdamW launch over every parameter: a block per chunk of at most a few thousand
//                elements of one parameter (a static table says which parameter, where in it and where in the flat
//                buffer), the f32 master weights reached through a device table of pointers. It reads the stats
//                itself: a non-finite loss or norm² changes nothing (the step is skipped), otherwise it clips with
//                min(1, max_norm / (‖g‖ + 1e-6)) and applies torch.optim.AdamW's update, op for op as
//                optim.rs's composed `AdamW::step` (f32 arithmetic, f64-derived scalars from the host).
//
// Deterministic: no atomics; every reduction has a fixed order that depends only on n. The optimizer buffers are
// f32 whatever the compute dtype (master weights, f32 gradients); only the gradient a micro-batch hands over may be
// bf16, hence the two accumulate kernels.
//
// Without a GPU, emulate/adamw_emu.cpp runs every kernel here on the CPU against a float64 reference.
#include "prims.cuh"

namespace {

constexpr int THREADS = 256;

// One row of the update's chunk table (optim_cuda.rs's `Chunk`, the same 32 bytes): elements
// [flat, flat + len) of the flat buffers are elements [in_param, in_param + len) of parameter `param`; `decay` is 1
// for tensors of rank >= 2 (the only ones weight decay applies to).
struct Chunk {
    int64_t flat;
    int64_t in_param;
    int32_t param;
    int32_t len;
    int32_t decay;
    int32_t pad;
};
static_assert(sizeof(Chunk) == 32, "optim_cuda.rs mirrors this layout");

// The block's sum of `v`, in thread 0 only: fixed butterflies within each warp, then the warps in order.
DEV float block_sum(float v) {
    __shared__ float warps[THREADS / 32];
    v = warp_sum(v);
    if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = v;
    block_sync();
    float total = 0.f;
    if (threadIdx.x == 0)
        for (int w = 0; w < THREADS / 32; ++w) total += warps[w];
    return total;
}

template <typename T> DEV void accumulate(float *__restrict__ dst, const T *__restrict__ src, int64_t n, int add) {
    const int64_t stride = int64_t(gridDim.x) * THREADS;
    for (int64_t i = int64_t(blockIdx.x) * THREADS + threadIdx.x; i < n; i += stride) {
        const float g = to_f32(src[i]);
        dst[i] = add ? dst[i] + g : g;
    }
}

}  // namespace

// dst[i] = src[i] (add == 0) or dst[i] += src[i], i < n. Grid: min(ceil(n / THREADS), 2048) blocks of THREADS.
extern "C" __global__ void __launch_bounds__(THREADS)
    lockstep_adamw_accumulate_f32(float *__restrict__ dst, const float *__restrict__ src, int64_t n, int add) {
    accumulate(dst, src, n, add);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    lockstep_adamw_accumulate_bf16(float *__restrict__ dst, const bf16 *__restrict__ src, int64_t n, int add) {
    accumulate(dst, src, n, add);
}

// dst[0] = value: the stop vote, a kernel argument rather than a host-to-device copy (which could wait for the
// stream). Grid: 1 block of THREADS.
extern "C" __global__ void __launch_bounds__(THREADS) lockstep_adamw_put_f32(float *dst, float value) {
    if (blockIdx.x == 0 && threadIdx.x == 0) dst[0] = value;
}

// partials[b] = Σ grads[i]² over i ≡ b·THREADS + t (mod gridDim.x·THREADS), t < THREADS: each thread sums its
// strided share in order, then the block. Grid: min(ceil(n / THREADS), NORM_BLOCKS = 1024) blocks of THREADS.
extern "C" __global__ void __launch_bounds__(THREADS)
    lockstep_adamw_norm_partials_f32(const float *__restrict__ grads, int64_t n, float *__restrict__ partials) {
    const int64_t stride = int64_t(gridDim.x) * THREADS;
    float acc = 0.f;
    for (int64_t i = int64_t(blockIdx.x) * THREADS + threadIdx.x; i < n; i += stride) {
        const float g = grads[i];
        acc += g * g;
    }
    const float total = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// stats = [extras[0] (loss), extras[1] (votes), Σ partials[0..blocks)], the partials added in f64 in a fixed tree.
// Grid: 1 block of THREADS.
extern "C" __global__ void __launch_bounds__(THREADS)
    lockstep_adamw_norm_finish_f32(const float *__restrict__ partials, int blocks, const float *__restrict__ extras,
                                   float *__restrict__ stats) {
    __shared__ double sums[THREADS];
    double acc = 0.0;
    for (int i = threadIdx.x; i < blocks; i += THREADS) acc += double(partials[i]);
    sums[threadIdx.x] = acc;
    block_sync();
    for (int half = THREADS / 2; half > 0; half /= 2) {
        if (int(threadIdx.x) < half) sums[threadIdx.x] += sums[threadIdx.x + half];
        block_sync();
    }
    if (threadIdx.x == 0) {
        stats[0] = extras[0];
        stats[1] = extras[1];
        stats[2] = float(sums[0]);
    }
}

// One AdamW step over every parameter, chunk by chunk (block b takes chunks b, b + gridDim.x, ...). `params[j]` is
// the address of parameter j's first f32; grads, m and v are the flat buffers (n elements each, canonical order);
// stats is the norm kernels' [loss, votes, norm²]. The scalars are the host's f64 values rounded to f32 as the
// composed step's `affine` does: decay = 1 − lr·wd, inv_bias2_sqrt = 1 / √(1 − β₂ᵗ), step_size = lr / (1 − β₁ᵗ).
// Grid: min(num_chunks, 1 << 20) blocks of THREADS.
extern "C" __global__ void __launch_bounds__(THREADS)
    lockstep_adamw_update_f32(const Chunk *__restrict__ chunks, int64_t num_chunks, const uint64_t *__restrict__ params,
                              const float *__restrict__ grads, float *__restrict__ m, float *__restrict__ v,
                              const float *__restrict__ stats, float max_norm, float beta1, float one_minus_beta1,
                              float beta2, float one_minus_beta2, float decay, float inv_bias2_sqrt, float eps,
                              float step_size) {
    const float loss = stats[0], norm2 = stats[2];
    // Every rank holds the same reduced values, so every rank skips together.
    if (!isfinite(loss) || !isfinite(norm2)) return;
    float clip = 1.f;
    if (max_norm > 0.f) {
        const float c = max_norm / (sqrtf(norm2) + 1e-6f);
        clip = c < 1.f ? c : 1.f;
    }
    for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
        const Chunk ch = chunks[c];
        float *__restrict__ p = reinterpret_cast<float *>(params[ch.param]) + ch.in_param;
        const float d = ch.decay ? decay : 1.f;
        for (int i = threadIdx.x; i < ch.len; i += THREADS) {
            const int64_t f = ch.flat + i;
            const float g = grads[f] * clip;
            const float mi = m[f] * beta1 + g * one_minus_beta1;
            const float vi = v[f] * beta2 + g * g * one_minus_beta2;
            const float pi = p[i] * d;
            const float denom = sqrtf(vi) * inv_bias2_sqrt + eps;
            p[i] = pi - mi / denom * step_size;
            m[f] = mi;
            v[f] = vi;
        }
    }
}
