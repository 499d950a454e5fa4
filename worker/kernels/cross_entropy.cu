// Softmax cross-entropy summed over rows, forward and backward, for worker/src/ops/cross_entropy_cuda.rs (which
// launches these and must agree with the launch shapes documented on each kernel). Compiled to PTX by
// worker/build.rs.
//
// Logits are a contiguous [N, V] matrix in f32 or bf16 (the bf16 ones are read as they are: no f32 copy of a
// 50k-wide vocabulary), targets [N] u32, IGNORE (0xffffffff) for rows that take no part. For row r with target t:
//
//   forward    lse_r = log Σ_j exp x_rj,   loss = Σ_{r not ignored} (lse_r − x_{r,t})
//   backward   dx_rj = g·(exp(x_rj − lse_r) − [j = t])      (g: the scalar upstream gradient, read on the device)
//
// The forward reads each row once, with an online max/sum per thread, and keeps lse (N floats) for the backward,
// which then reads the row once more and writes its gradient: the probabilities are never stored. The row losses
// are summed by a separate single-block kernel in a fixed order (in f64), so the loss is bitwise reproducible
// without atomics.
//
// A target ≥ V that is not IGNORE cannot be refused on the host without a device-to-host copy of the targets: the
// kernels read nothing out of bounds and make that row's loss, and so the summed loss, NaN, and its gradient row NaN,
// so the step is visibly non-finite (the trainer skips such steps). Ignored rows cost nothing but a zero-filled
// gradient row; their lse is written as 0 and never read.
//
// Without a GPU, emulate/cross_entropy_emu.cpp runs these kernels on the CPU against a float64 reference.
#include "prims.cuh"

namespace {

constexpr int CE_THREADS = 256;
constexpr int CE_WARPS = CE_THREADS / 32;
// 16-byte vectors each thread loads before using them: enough bytes in flight to cover the memory latency.
constexpr int CE_UNROLL = 4;
constexpr uint32_t CE_IGNORE = 0xffffffffu;

// 16 bytes of T: one vectorised global load or store.
template <typename T> struct alignas(16) Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

// Elements before the first 16-byte boundary of `p`, at most `len`.
template <typename T> DEV int misaligned_head(const T *p, int len) {
    const int bytes = int((16 - reinterpret_cast<uintptr_t>(p) % 16) % 16);
    return min(bytes / int(sizeof(T)), len);
}

// max that propagates NaN (fmaxf drops it): a NaN logit must make the loss NaN, as on the CPU.
DEV float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

DEV float quiet_nan() { return INFINITY - INFINITY; }

// The block-wide max or sum of one value per thread, in a fixed order; every thread gets it.
template <bool MAX> DEV float block_reduce(float v) {
    __shared__ float partial[CE_WARPS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    v = MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) partial[warp] = v;
    block_sync();
    v = lane < CE_WARPS ? partial[lane] : (MAX ? -INFINITY : 0.f);
    v = MAX ? warp_max(v) : warp_sum(v);
    block_sync();  // `partial` may be reused by the next call
    return v;
}

// A thread's running (max m, Σ exp(x − m)) over the logits it has seen, updated with N more.
struct Online {
    float m = -INFINITY, s = 0.f;

    template <int N> DEV void add(const float (&x)[N]) {
        float cm = x[0];
#pragma unroll
        for (int i = 1; i < N; ++i) cm = nan_max(cm, x[i]);
        const float nm = nan_max(m, cm);
        if (nm > m) s *= expf(m - nm);  // exp(−∞) = 0 for the first values
        m = nm;
        if (m == -INFINITY) return;  // all −∞ so far: nothing to add (and −∞ − −∞ would be NaN)
#pragma unroll
        for (int i = 0; i < N; ++i) s += expf(x[i] - m);
    }

    DEV void add1(float x) {
        const float one[1] = {x};
        add(one);
    }
};

// Forward. Grid (N), CE_THREADS threads, no dynamic shared memory: one block per row. Writes lse[r] and loss[r]
// (0 for ignored rows; NaN for a target ≥ V).
template <typename T>
DEV void ce_forward(const T *__restrict__ logits, const uint32_t *__restrict__ targets, float *__restrict__ lse,
                    float *__restrict__ loss, int V) {
    const int r = blockIdx.x;
    const uint32_t target = targets[r];
    if (target == CE_IGNORE) {  // the whole block leaves: no barrier is skipped by part of it
        if (threadIdx.x == 0) lse[r] = 0.f, loss[r] = 0.f;
        return;
    }
    const T *x = logits + size_t(r) * V;
    constexpr int VEC = Pack<T>::N;
    const int head = misaligned_head(x, V);
    const int n_vec = (V - head) / VEC;
    const int tail = head + n_vec * VEC;
    const Pack<T> *xv = reinterpret_cast<const Pack<T> *>(x + head);

    Online acc;
    for (int j = threadIdx.x; j < head; j += CE_THREADS) acc.add1(to_f32(x[j]));
    int i = threadIdx.x;
    // CE_UNROLL loads in flight per thread, then one max and one rescale for all of their values.
    for (; i + (CE_UNROLL - 1) * CE_THREADS < n_vec; i += CE_UNROLL * CE_THREADS) {
        Pack<T> p[CE_UNROLL];
#pragma unroll
        for (int u = 0; u < CE_UNROLL; ++u) p[u] = xv[i + u * CE_THREADS];
        float f[CE_UNROLL * VEC];
#pragma unroll
        for (int u = 0; u < CE_UNROLL; ++u)
#pragma unroll
            for (int k = 0; k < VEC; ++k) f[u * VEC + k] = to_f32(p[u].v[k]);
        acc.add(f);
    }
    for (; i < n_vec; i += CE_THREADS) {
        const Pack<T> p = xv[i];
        float f[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) f[k] = to_f32(p.v[k]);
        acc.add(f);
    }
    for (int j = tail + threadIdx.x; j < V; j += CE_THREADS) acc.add1(to_f32(x[j]));

    // Combine the threads' (m, s): rescale each sum to the row max, then add. A thread with m = −∞ saw only −∞
    // (or nothing) and adds 0; a NaN anywhere is already in that thread's s.
    const float row_max = block_reduce<true>(acc.m);
    const float part = acc.m == -INFINITY ? 0.f : acc.s * expf(acc.m - row_max);
    const float sum = block_reduce<false>(part);
    if (threadIdx.x == 0) {
        const float l = row_max + logf(sum);
        lse[r] = l;
        loss[r] = target < uint32_t(V) ? l - to_f32(x[target]) : quiet_nan();
    }
}

// The sum of the N row losses into out[0], accumulated in f64 in a fixed order. Grid (1), CE_THREADS threads.
DEV void ce_sum(const float *__restrict__ loss, float *__restrict__ out, int n) {
    __shared__ double partial[CE_THREADS];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += CE_THREADS) acc += double(loss[i]);
    partial[threadIdx.x] = acc;
    block_sync();
    for (int stride = CE_THREADS / 2; stride > 0; stride /= 2) {
        if (int(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        block_sync();
    }
    if (threadIdx.x == 0) out[0] = float(partial[0]);
}

// Every element of a row of dx set to `value`: the gradient of an ignored row (0) or of one whose target is out of
// range (NaN). The logits are not read.
template <typename T> DEV void fill_row(T *dx, int V, float value) {
    constexpr int VEC = Pack<T>::N;
    const int head = misaligned_head(dx, V);
    const int n_vec = (V - head) / VEC;
    Pack<T> p;
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = from_f32<T>(value);
    Pack<T> *dxv = reinterpret_cast<Pack<T> *>(dx + head);
    for (int j = threadIdx.x; j < head; j += CE_THREADS) dx[j] = p.v[0];
    for (int i = threadIdx.x; i < n_vec; i += CE_THREADS) dxv[i] = p;
    for (int j = head + n_vec * VEC + threadIdx.x; j < V; j += CE_THREADS) dx[j] = p.v[0];
}

// Backward. Grid (N), CE_THREADS threads, no dynamic shared memory: one block per row, which reads the row of
// logits once and writes the row of dlogits once. `g` points at the scalar upstream gradient (f32, on the device).
template <typename T>
DEV void ce_backward(const T *__restrict__ logits, const uint32_t *__restrict__ targets,
                     const float *__restrict__ lse, const float *__restrict__ g, T *__restrict__ dlogits, int V) {
    const int r = blockIdx.x;
    const uint32_t target = targets[r];
    T *dx = dlogits + size_t(r) * V;
    if (target >= uint32_t(V)) {
        fill_row(dx, V, target == CE_IGNORE ? 0.f : quiet_nan());
        return;
    }
    const float l = lse[r], gr = g[0];
    const int t = int(target);
    auto grad = [&](float x, int j) {
        const float p = expf(x - l);
        return from_f32<T>(gr * (j == t ? p - 1.f : p));
    };

    const T *x = logits + size_t(r) * V;
    constexpr int VEC = Pack<T>::N;
    int head = misaligned_head(x, V);
    // Vector loads and stores need x and dx equally misaligned (they are unless the logits are a view at an odd
    // offset); otherwise the whole row goes element by element.
    if (reinterpret_cast<uintptr_t>(dx + head) % 16 != 0) head = V;
    const int n_vec = (V - head) / VEC;
    const int tail = head + n_vec * VEC;
    const Pack<T> *xv = reinterpret_cast<const Pack<T> *>(x + head);
    Pack<T> *dxv = reinterpret_cast<Pack<T> *>(dx + head);

    // One vector: its gradient stored where it was loaded from.
    auto store = [&](const Pack<T> &p, int i) {
        Pack<T> out;
        const int j0 = head + i * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) out.v[k] = grad(to_f32(p.v[k]), j0 + k);
        dxv[i] = out;
    };
    for (int j = threadIdx.x; j < head; j += CE_THREADS) dx[j] = grad(to_f32(x[j]), j);
    int i = threadIdx.x;
    // All CE_UNROLL loads before the stores: the compiler cannot move loads above stores it cannot prove disjoint.
    for (; i + (CE_UNROLL - 1) * CE_THREADS < n_vec; i += CE_UNROLL * CE_THREADS) {
        Pack<T> p[CE_UNROLL];
#pragma unroll
        for (int u = 0; u < CE_UNROLL; ++u) p[u] = xv[i + u * CE_THREADS];
#pragma unroll
        for (int u = 0; u < CE_UNROLL; ++u) store(p[u], i + u * CE_THREADS);
    }
    for (; i < n_vec; i += CE_THREADS) store(xv[i], i);
    for (int j = tail + threadIdx.x; j < V; j += CE_THREADS) dx[j] = grad(to_f32(x[j]), j);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Entry points: lockstep_cross_entropy_<kernel>_<dtype>.
// ---------------------------------------------------------------------------------------------------------------

#define LOCKSTEP_CE_KERNELS(T_, NAME_)                                                                             \
    extern "C" __global__ void __launch_bounds__(CE_THREADS)                                                       \
        lockstep_cross_entropy_fwd_##NAME_(const T_ *logits, const uint32_t *targets, float *lse, float *loss,     \
                                           int vocab) {                                                            \
        ce_forward<T_>(logits, targets, lse, loss, vocab);                                                         \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(CE_THREADS)                                                       \
        lockstep_cross_entropy_bwd_##NAME_(const T_ *logits, const uint32_t *targets, const float *lse,            \
                                           const float *g, T_ *dlogits, int vocab) {                               \
        ce_backward<T_>(logits, targets, lse, g, dlogits, vocab);                                                  \
    }

LOCKSTEP_CE_KERNELS(float, f32)
LOCKSTEP_CE_KERNELS(bf16, bf16)

extern "C" __global__ void __launch_bounds__(CE_THREADS)
    lockstep_cross_entropy_sum_f32(const float *loss, float *out, int rows) {
    ce_sum(loss, out, rows);
}
