// Fused LayerNorm over the last dimension, forward and backward, for worker/src/ops/layer_norm_cuda.rs (which
// launches these and must agree with the launch shapes documented on each kernel). Compiled to PTX by
// worker/build.rs.
//
// x, y, dy, dx are contiguous [rows, C] in the activation dtype (f32 or bf16); weight, bias, dw, db are f32 [C]; the
// per-row statistics mean and rstd = 1/√(var + eps) (biased variance, as torch) are f32 [rows]. With
// x̂ = (x − mean)·rstd and g = dy·w:
//
//   forward    y = x̂·w + b                           (saves mean and rstd for the backward)
//   backward   dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),  dw = Σ_rows dy·x̂,  db = Σ_rows dy
//
// One warp per row, lane l holding columns l, l + 32, l + 64, ...: every load and store of a warp covers 32
// consecutive elements (coalesced), and the row sums are a per-lane sum in column order followed by warp_sum's
// fixed butterfly. All arithmetic is f32 whatever the dtype.
//
// Rows of up to 32·N columns are held in registers (N values per lane, N a template parameter the host picks as
// the smallest instantiated one that fits), so x is read once and the variance is the two-pass Σ(x − mean)² without
// a second read. Wider rows take the `any` kernels, which loop over the row in global memory (three passes forward,
// two backward) — the same arithmetic in the same order, only slower.
//
// dw and db are reduced without atomics, in a fixed order (bitwise reproducible): the backward kernel writes
// per-block (register path) or per-warp (loop path) column sums into a scratch buffer partial[P, 2C] (dw partials
// in columns 0..C, db in C..2C), and bwd_reduce sums its P rows in a fixed order. The host picks the rows per block
// from the shape alone, so the result does not depend on the GPU either.
//
// Without a GPU, emulate/layer_norm_emu.cpp runs every kernel here on the CPU against a float64 reference; the
// command is in its header. worker/tests/kernels_gpu/layer_norm.rs is the test on the GPU.
#include "prims.cuh"

namespace {

constexpr int THREADS = 128;  // forward and backward: 4 warps
constexpr int WARPS = THREADS / 32;
constexpr int REDUCE_THREADS = 256;  // bwd_reduce: 32 columns x 8 groups of partial rows
constexpr int REDUCE_GROUPS = REDUCE_THREADS / 32;

// Forward, the row in registers (C <= 32·N). Grid ceil(rows/4), 128 threads; warp w of block b owns row 4b + w.
template <int N, typename T>
DEV void fwd_regs(const T *__restrict__ x, const float *__restrict__ w, const float *__restrict__ b,
                  T *__restrict__ y, float *__restrict__ mean_out, float *__restrict__ rstd_out, int rows, int C,
                  float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * WARPS + threadIdx.x / 32;
    if (row >= rows) return;  // whole warps
    x += (size_t)row * C, y += (size_t)row * C;

    float v[N];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int c = lane + 32 * i;
        v[i] = c < C ? to_f32(x[c]) : 0.f;
        s += v[i];
    }
    const float mean = warp_sum(s) / C;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int c = lane + 32 * i;
        v[i] = c < C ? v[i] - mean : 0.f;  // the padding must not add mean² to the variance
        q += v[i] * v[i];
    }
    // A correctly rounded 1/sqrt rather than rsqrtf's approximation: once per row, and it matches the CPU kernel.
    const float rstd = 1.f / sqrtf(warp_sum(q) / C + eps);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int c = lane + 32 * i;
        if (c < C) y[c] = from_f32<T>(v[i] * rstd * w[c] + b[c]);
    }
    if (lane == 0) mean_out[row] = mean, rstd_out[row] = rstd;
}

// Forward for any C, reading the row from global memory three times. Launched as fwd_regs.
template <typename T>
DEV void fwd_any(const T *__restrict__ x, const float *__restrict__ w, const float *__restrict__ b,
                 T *__restrict__ y, float *__restrict__ mean_out, float *__restrict__ rstd_out, int rows, int C,
                 float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * WARPS + threadIdx.x / 32;
    if (row >= rows) return;
    x += (size_t)row * C, y += (size_t)row * C;

    float s = 0.f;
    for (int c = lane; c < C; c += 32) s += to_f32(x[c]);
    const float mean = warp_sum(s) / C;
    float q = 0.f;
    for (int c = lane; c < C; c += 32) {
        const float d = to_f32(x[c]) - mean;
        q += d * d;
    }
    const float rstd = 1.f / sqrtf(warp_sum(q) / C + eps);
    for (int c = lane; c < C; c += 32) y[c] = from_f32<T>((to_f32(x[c]) - mean) * rstd * w[c] + b[c]);
    if (lane == 0) mean_out[row] = mean, rstd_out[row] = rstd;
}

// Backward, the row in registers (C <= 32·N): dx, and the block's column sums of dy·x̂ and dy into
// partial[blockIdx.x] (all 2C values written). Grid ceil(rows/rows_per_block), 128 threads; block b owns rows
// [b·rows_per_block, (b+1)·rows_per_block), warp w of them the rows w, w + 4, ... (in that order).
template <int N, typename T>
DEV void bwd_regs(const T *__restrict__ x, const T *__restrict__ dy, const float *__restrict__ w,
                  const float *__restrict__ mean, const float *__restrict__ rstd, T *__restrict__ dx,
                  float *__restrict__ partial, int rows, int C, int rows_per_block) {
    __shared__ float red[WARPS][32 * N];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int first = blockIdx.x * rows_per_block;
    const int end = min(first + rows_per_block, rows);

    float dw[N], db[N];
#pragma unroll
    for (int i = 0; i < N; ++i) dw[i] = 0.f, db[i] = 0.f;
    for (int row = first + warp; row < end; row += WARPS) {
        const float mu = mean[row], r = rstd[row];
        const T *xr = x + (size_t)row * C, *dyr = dy + (size_t)row * C;
        float xh[N], g[N];
        float sg = 0.f, sgx = 0.f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const int c = lane + 32 * i;
            xh[i] = 0.f, g[i] = 0.f;
            if (c < C) {
                const float d = to_f32(dyr[c]);
                xh[i] = (to_f32(xr[c]) - mu) * r;
                g[i] = d * w[c];
                dw[i] += d * xh[i];
                db[i] += d;
            }
            sg += g[i];
            sgx += g[i] * xh[i];
        }
        const float mg = warp_sum(sg) / C, mgx = warp_sum(sgx) / C;
        T *dxr = dx + (size_t)row * C;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const int c = lane + 32 * i;
            if (c < C) dxr[c] = from_f32<T>(r * (g[i] - mg - xh[i] * mgx));
        }
    }

    // The 4 warps' column sums, added in warp order: dw into columns 0..C of the block's partial row, then db.
    float *out = partial + (size_t)blockIdx.x * 2 * C;
    for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int i = 0; i < N; ++i) red[warp][lane + 32 * i] = half ? db[i] : dw[i];
        block_sync();
        for (int c = threadIdx.x; c < C; c += THREADS) {
            float s = 0.f;
#pragma unroll
            for (int k = 0; k < WARPS; ++k) s += red[k][c];
            out[half * C + c] = s;
        }
        block_sync();  // red is rewritten for db
    }
}

// Backward for any C: two passes over the row in global memory. Launched as bwd_regs, but the column sums are the
// warp's own, accumulated in place in partial[4·blockIdx.x + warp] (so P = 4·blocks; all 2C values written).
template <typename T>
DEV void bwd_any(const T *__restrict__ x, const T *__restrict__ dy, const float *__restrict__ w,
                 const float *__restrict__ mean, const float *__restrict__ rstd, T *__restrict__ dx,
                 float *__restrict__ partial, int rows, int C, int rows_per_block) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int first = blockIdx.x * rows_per_block;
    const int end = min(first + rows_per_block, rows);
    // Lane l alone writes and reads acc[c] and acc[C + c] for its columns c = l, l + 32, ..., zeroing included:
    // no other thread touches them, so no fence or warp sync is needed between the passes.
    float *acc = partial + ((size_t)blockIdx.x * WARPS + warp) * 2 * C;
    for (int c = lane; c < C; c += 32) acc[c] = 0.f, acc[C + c] = 0.f;

    for (int row = first + warp; row < end; row += WARPS) {
        const float mu = mean[row], r = rstd[row];
        const T *xr = x + (size_t)row * C, *dyr = dy + (size_t)row * C;
        float sg = 0.f, sgx = 0.f;
        for (int c = lane; c < C; c += 32) {
            const float g = to_f32(dyr[c]) * w[c];
            sg += g;
            sgx += g * ((to_f32(xr[c]) - mu) * r);
        }
        const float mg = warp_sum(sg) / C, mgx = warp_sum(sgx) / C;
        T *dxr = dx + (size_t)row * C;
        for (int c = lane; c < C; c += 32) {
            const float d = to_f32(dyr[c]);
            const float xh = (to_f32(xr[c]) - mu) * r;
            const float g = d * w[c];
            dxr[c] = from_f32<T>(r * (g - mg - xh * mgx));
            acc[c] += d * xh;
            acc[C + c] += d;
        }
    }
}

// dw[c] = Σ_p partial[p][c], db[c] = Σ_p partial[p][C + c], p in a fixed order. Grid ceil(2C/32), 256 threads:
// lane l of warp k sums column 32·blockIdx.x + l over the k-th of 8 contiguous ranges of p, then warp 0 adds the 8
// range sums in order.
DEV void bwd_reduce(const float *__restrict__ partial, float *__restrict__ dw, float *__restrict__ db, int P,
                    int C) {
    __shared__ float red[REDUCE_GROUPS][32];
    const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
    const int col = blockIdx.x * 32 + lane;
    const int per = (P + REDUCE_GROUPS - 1) / REDUCE_GROUPS;
    const int p0 = min(group * per, P), p1 = min(p0 + per, P);
    float s = 0.f;
    if (col < 2 * C)
        for (int p = p0; p < p1; ++p) s += partial[(size_t)p * 2 * C + col];
    red[group][lane] = s;
    block_sync();
    if (group == 0 && col < 2 * C) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < REDUCE_GROUPS; ++k) t += red[k][lane];
        if (col < C)
            dw[col] = t;
        else
            db[col - C] = t;
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Entry points: lockstep_layer_norm_{fwd,bwd}_{n<N>,any}_<dtype>, and lockstep_layer_norm_bwd_reduce. The N
// instantiated must match FWD_REGS / BWD_REGS in layer_norm_cuda.rs. The backward keeps 4N floats per lane live
// (x̂, g and the two column sums), so its register path stops at N = 32 (C <= 1024); the forward's at 64.
// ---------------------------------------------------------------------------------------------------------------

#define LOCKSTEP_LN_FWD(NAME_, T_, TNAME_, ...)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        lockstep_layer_norm_fwd_##NAME_##_##TNAME_(const T_ *x, const float *w, const float *b, T_ *y,             \
                                                   float *mean, float *rstd, int rows, int c, float eps) {         \
        __VA_ARGS__(x, w, b, y, mean, rstd, rows, c, eps);                                                         \
    }

#define LOCKSTEP_LN_BWD(NAME_, T_, TNAME_, ...)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        lockstep_layer_norm_bwd_##NAME_##_##TNAME_(const T_ *x, const T_ *dy, const float *w, const float *mean,   \
                                                   const float *rstd, T_ *dx, float *partial, int rows, int c,     \
                                                   int rows_per_block) {                                           \
        __VA_ARGS__(x, dy, w, mean, rstd, dx, partial, rows, c, rows_per_block);                                   \
    }

#define LOCKSTEP_LN_FWD_N(N_)                                                                                      \
    LOCKSTEP_LN_FWD(n##N_, float, f32, fwd_regs<N_, float>)                                                        \
    LOCKSTEP_LN_FWD(n##N_, bf16, bf16, fwd_regs<N_, bf16>)

#define LOCKSTEP_LN_BWD_N(N_)                                                                                      \
    LOCKSTEP_LN_BWD(n##N_, float, f32, bwd_regs<N_, float>)                                                        \
    LOCKSTEP_LN_BWD(n##N_, bf16, bf16, bwd_regs<N_, bf16>)

LOCKSTEP_LN_FWD_N(1)
LOCKSTEP_LN_FWD_N(2)
LOCKSTEP_LN_FWD_N(4)
LOCKSTEP_LN_FWD_N(8)
LOCKSTEP_LN_FWD_N(12)
LOCKSTEP_LN_FWD_N(16)
LOCKSTEP_LN_FWD_N(24)
LOCKSTEP_LN_FWD_N(32)
LOCKSTEP_LN_FWD_N(48)
LOCKSTEP_LN_FWD_N(64)
LOCKSTEP_LN_FWD(any, float, f32, fwd_any<float>)
LOCKSTEP_LN_FWD(any, bf16, bf16, fwd_any<bf16>)

LOCKSTEP_LN_BWD_N(1)
LOCKSTEP_LN_BWD_N(2)
LOCKSTEP_LN_BWD_N(4)
LOCKSTEP_LN_BWD_N(8)
LOCKSTEP_LN_BWD_N(12)
LOCKSTEP_LN_BWD_N(16)
LOCKSTEP_LN_BWD_N(24)
LOCKSTEP_LN_BWD_N(32)
LOCKSTEP_LN_BWD(any, float, f32, bwd_any<float>)
LOCKSTEP_LN_BWD(any, bf16, bf16, bwd_any<bf16>)

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
    lockstep_layer_norm_bwd_reduce(const float *partial, float *dw, float *db, int p, int c) {
    bwd_reduce(partial, dw, db, p, c);
}
