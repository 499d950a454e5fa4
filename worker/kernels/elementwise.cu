// GPT-2's tanh GELU and a linear layer's bias add, forward and backward, for worker/src/ops/elementwise_cuda.rs
// (which launches these with the grids documented on each kernel). Compiled to PTX by worker/build.rs.
//
//   gelu       y = x·s with u = √(2/π)·(x + 0.044715·x³), s = σ(2u) = (1 + tanh u)/2
//              dx = dy·(s + 2·x·s·(1 − s)·u'),  u' = √(2/π)·(1 + 3·0.044715·x²)          (as worker/src/ops/gelu.rs)
//   bias add   y[r, c] = x[r, c] + b[c];  db[c] = Σ_r dy[r, c]                            (dx = dy: no kernel)
//   bias+gelu  y = gelu(h) with h = x + b rounded to the dtype;  dx = gelu'(h)·dy, db = Σ_r dx   (h never stored)
//
// Tensors are contiguous, in the input dtype (f32 or bf16), math in f32. All are memory-bound: the elementwise
// kernels move 16 bytes per thread and access (4 f32 or 8 bf16) when every pointer is 16-byte aligned, scalars
// otherwise (a view that starts mid-vector), over a grid-stride loop.
//
// db is deterministic without atomics: the partial kernel gives each block 32 columns (one per lane, so a warp
// reads a contiguous piece of a row) and a chunk of rows (its 8 warps take every 8th row, summing in row order),
// reduces its warps in a fixed order and writes one f32 per column and chunk; the final kernel sums the chunks in
// order. The chunking depends on the shape only, so the result is bitwise the same run to run.
//
// Without a GPU, emulate/elementwise_emu.cpp runs every kernel here on the CPU against a float64 reference.
#include "prims.cuh"

namespace elementwise {

constexpr int THREADS = 256;
// Cap on the elementwise grids (a few waves of 256-thread blocks on a 132-SM H200); larger tensors loop.
constexpr int MAX_BLOCKS = 8192;

constexpr float SQRT_2_OVER_PI = 0.7978845608f;
constexpr float COEF = 0.044715f;

// Elements per 16-byte access.
template <typename T> HD constexpr int vec_width() { return int(16 / sizeof(T)); }

// Blocks of an elementwise launch over n elements of a type of width `vec` (elementwise_cuda.rs: `blocks`).
HD constexpr int elementwise_blocks(int n, int vec) {
    const long long per_block = (long long)THREADS * vec;
    const long long blocks = (n + per_block - 1) / per_block;
    return blocks < 1 ? 1 : blocks > MAX_BLOCKS ? MAX_BLOCKS : int(blocks);
}

// The bias gradient's partial kernel: columns per block (one per lane), warps (row strides) per block, rows each
// thread loads before adding them (loads in flight), and the chunking of the rows.
constexpr int GRAD_COLS = 32;
constexpr int GRAD_WARPS = THREADS / 32;
constexpr int GRAD_UNROLL = 8;
// About one full wave of 8 blocks per SM on an H200; a chunk is at least 256 rows, a multiple of 64.
constexpr int GRAD_TARGET_BLOCKS = 1024;
constexpr int GRAD_MIN_CHUNK_ROWS = 256;
constexpr int GRAD_ROW_STEP = GRAD_WARPS * GRAD_UNROLL;

// Rows per chunk for a [rows, c] gradient (elementwise_cuda.rs: `chunk_rows`); rows ≥ 1, c ≥ 1.
HD constexpr int bias_grad_chunk_rows(int rows, int c) {
    const int col_blocks = (c + GRAD_COLS - 1) / GRAD_COLS;
    int chunks = (GRAD_TARGET_BLOCKS + col_blocks - 1) / col_blocks;
    const int max_chunks = (rows + GRAD_MIN_CHUNK_ROWS - 1) / GRAD_MIN_CHUNK_ROWS;
    if (chunks > max_chunks) chunks = max_chunks;
    if (chunks < 1) chunks = 1;
    const int rows_per = (rows + chunks - 1) / chunks;
    return (rows_per + GRAD_ROW_STEP - 1) / GRAD_ROW_STEP * GRAD_ROW_STEP;
}

HD constexpr int bias_grad_chunks(int rows, int c) {
    const int chunk = bias_grad_chunk_rows(rows, c);
    return (rows + chunk - 1) / chunk;
}

// 16 bytes of T: plain loads and stores of it compile to one 128-bit access.
template <typename T> struct alignas(16) Pack {
    T v[vec_width<T>()];
};

DEV bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// σ(2u) with the exponent capped at 80 as on the CPU (s stays normal for very negative x); a NaN passes through.
DEV float sigmoid_2u(float u) {
    float a = -2.f * u;
    if (a > 80.f) a = 80.f;
    return 1.f / (1.f + expf(a));
}

DEV float gelu(float x) {
    const float u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
    return x * sigmoid_2u(u);
}

DEV float gelu_grad(float x, float g) {
    const float x2 = x * x;
    const float u = SQRT_2_OVER_PI * (x + COEF * x2 * x);
    const float s = sigmoid_2u(u);
    const float du = SQRT_2_OVER_PI * (1.f + 3.f * COEF * x2);
    return g * (s + 2.f * x * s * (1.f - s) * du);
}

DEV unsigned global_thread() { return blockIdx.x * unsigned(THREADS) + threadIdx.x; }
DEV unsigned grid_threads() { return gridDim.x * unsigned(THREADS); }

// Grid: elementwise_blocks(n, vec_width<T>()) x 1, THREADS threads. n < 2^31, so no index below overflows.
template <typename T> DEV void gelu_fwd(const T *__restrict__ x, T *__restrict__ y, int n) {
    constexpr int V = vec_width<T>();
    const unsigned count = unsigned(n), stride = grid_threads();
    unsigned scalar_from = 0;
    if (aligned16(x) && aligned16(y)) {
        const unsigned packs = count / V;
        for (unsigned i = global_thread(); i < packs; i += stride) {
            const Pack<T> in = reinterpret_cast<const Pack<T> *>(x)[i];
            Pack<T> out;
            for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(gelu(to_f32(in.v[k])));
            reinterpret_cast<Pack<T> *>(y)[i] = out;
        }
        scalar_from = packs * V;
    }
    for (unsigned i = scalar_from + global_thread(); i < count; i += stride) y[i] = from_f32<T>(gelu(to_f32(x[i])));
}

// Grid as gelu_fwd.
template <typename T> DEV void gelu_bwd(const T *__restrict__ x, const T *__restrict__ dy, T *__restrict__ dx, int n) {
    constexpr int V = vec_width<T>();
    const unsigned count = unsigned(n), stride = grid_threads();
    unsigned scalar_from = 0;
    if (aligned16(x) && aligned16(dy) && aligned16(dx)) {
        const unsigned packs = count / V;
        for (unsigned i = global_thread(); i < packs; i += stride) {
            const Pack<T> xi = reinterpret_cast<const Pack<T> *>(x)[i];
            const Pack<T> gi = reinterpret_cast<const Pack<T> *>(dy)[i];
            Pack<T> out;
            for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(gelu_grad(to_f32(xi.v[k]), to_f32(gi.v[k])));
            reinterpret_cast<Pack<T> *>(dx)[i] = out;
        }
        scalar_from = packs * V;
    }
    for (unsigned i = scalar_from + global_thread(); i < count; i += stride)
        dx[i] = from_f32<T>(gelu_grad(to_f32(x[i]), to_f32(dy[i])));
}

// y[i] = f(x[i], b[i % c]) (f gives f32) for x [n / c, c] and b [c]. Grid as gelu_fwd. The packed path needs c to be a
// multiple of the pack, so that a pack lies in one row and its bias pack is aligned too.
template <typename T, typename F>
DEV void with_bias(const T *__restrict__ x, const T *__restrict__ b, T *__restrict__ y, int n, int c, F f) {
    constexpr int V = vec_width<T>();
    const unsigned count = unsigned(n), cols = unsigned(c), stride = grid_threads();
    if (cols % V == 0 && aligned16(x) && aligned16(b) && aligned16(y)) {
        const unsigned packs = count / V;
        for (unsigned i = global_thread(); i < packs; i += stride) {
            const Pack<T> xi = reinterpret_cast<const Pack<T> *>(x)[i];
            const Pack<T> bi = reinterpret_cast<const Pack<T> *>(b)[(i * V) % cols / V];
            Pack<T> out;
            for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(f(xi.v[k], bi.v[k]));
            reinterpret_cast<Pack<T> *>(y)[i] = out;
        }
        return;
    }
    for (unsigned i = global_thread(); i < count; i += stride) y[i] = from_f32<T>(f(x[i], b[i % cols]));
}

// x [n / c, c] + b [c]. Grid as gelu_fwd.
template <typename T>
DEV void bias_fwd(const T *__restrict__ x, const T *__restrict__ b, T *__restrict__ y, int n, int c) {
    with_bias(x, b, y, n, c, [](T xv, T bv) { return to_f32(xv) + to_f32(bv); });
}

// x + b as the bias add stores it (rounded to T), back in f32: what the fused bias+GELU kernels feed to GELU, so that
// they give bitwise what bias_fwd followed by gelu_fwd (or gelu_bwd) give.
template <typename T> DEV float biased(T x, T b) { return to_f32(from_f32<T>(to_f32(x) + to_f32(b))); }

// gelu(x + b) for x [n / c, c] and b [c], the sum never stored. Grid as bias_fwd.
template <typename T>
DEV void bias_gelu_fwd(const T *__restrict__ x, const T *__restrict__ b, T *__restrict__ y, int n, int c) {
    with_bias(x, b, y, n, c, [](T xv, T bv) { return gelu(biased(xv, bv)); });
}

// dx = dy·gelu'(x + b), the sum recomputed as the forward made it; db is then bias_grad_* over dx. Grid and
// packed-path condition as bias_fwd.
template <typename T>
DEV void bias_gelu_bwd(const T *__restrict__ x, const T *__restrict__ b, const T *__restrict__ dy, T *__restrict__ dx,
                       int n, int c) {
    constexpr int V = vec_width<T>();
    const unsigned count = unsigned(n), cols = unsigned(c), stride = grid_threads();
    if (cols % V == 0 && aligned16(x) && aligned16(b) && aligned16(dy) && aligned16(dx)) {
        const unsigned packs = count / V;
        for (unsigned i = global_thread(); i < packs; i += stride) {
            const Pack<T> xi = reinterpret_cast<const Pack<T> *>(x)[i];
            const Pack<T> bi = reinterpret_cast<const Pack<T> *>(b)[(i * V) % cols / V];
            const Pack<T> gi = reinterpret_cast<const Pack<T> *>(dy)[i];
            Pack<T> out;
            for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(gelu_grad(biased(xi.v[k], bi.v[k]), to_f32(gi.v[k])));
            reinterpret_cast<Pack<T> *>(dx)[i] = out;
        }
        return;
    }
    for (unsigned i = global_thread(); i < count; i += stride)
        dx[i] = from_f32<T>(gelu_grad(biased(x[i], b[i % cols]), to_f32(dy[i])));
}

// partial[chunk, col] = Σ dy[row, col] over the chunk's rows, for dy [rows, c].
// Grid: ceil(c / GRAD_COLS) x bias_grad_chunks(rows, c), THREADS threads; chunk_rows = bias_grad_chunk_rows(rows, c).
template <typename T>
DEV void bias_grad_partial(const T *__restrict__ dy, float *__restrict__ partial, int rows, int c, int chunk_rows) {
    __shared__ float sums[GRAD_WARPS][GRAD_COLS];
    const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
    const int col = int(blockIdx.x) * GRAD_COLS + lane;
    const int first = int(blockIdx.y) * chunk_rows;
    const int end = rows - first < chunk_rows ? rows : first + chunk_rows;
    float acc = 0.f;
    if (col < c) {
        const T *p = dy + col;
        int r = first + warp;
        // Loads first, then the adds in row order: GRAD_UNROLL loads in flight, the same sum as the plain loop.
        for (; r + (GRAD_UNROLL - 1) * GRAD_WARPS < end; r += GRAD_ROW_STEP) {
            float v[GRAD_UNROLL];
            for (int k = 0; k < GRAD_UNROLL; ++k) v[k] = to_f32(p[(r + k * GRAD_WARPS) * c]);
            for (int k = 0; k < GRAD_UNROLL; ++k) acc += v[k];
        }
        for (; r < end; r += GRAD_WARPS) acc += to_f32(p[r * c]);
    }
    sums[warp][lane] = acc;
    block_sync();
    if (warp == 0 && col < c) {
        float s = 0.f;
        for (int w = 0; w < GRAD_WARPS; ++w) s += sums[w][lane];
        partial[blockIdx.y * c + col] = s;
    }
}

// db[col] = Σ_k partial[k, col] over the `chunks` chunks in order. Grid: ceil(c / THREADS) x 1, THREADS threads.
template <typename T> DEV void bias_grad_final(const float *__restrict__ partial, T *__restrict__ db, int chunks, int c) {
    const int col = int(global_thread());
    if (col >= c) return;
    float s = 0.f;
    for (int k = 0; k < chunks; ++k) s += partial[k * c + col];
    db[col] = from_f32<T>(s);
}

}  // namespace elementwise

using namespace elementwise;

// ---------------------------------------------------------------------------------------------------------------
// Entry points: lockstep_<op>_<kernel>_<dtype>.
// ---------------------------------------------------------------------------------------------------------------

#define LOCKSTEP_ELEMENTWISE_KERNELS(T_, NAME_)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) lockstep_gelu_fwd_##NAME_(const T_ *x, T_ *y, int n) {    \
        gelu_fwd<T_>(x, y, n);                                                                                     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        lockstep_gelu_bwd_##NAME_(const T_ *x, const T_ *dy, T_ *dx, int n) {                                      \
        gelu_bwd<T_>(x, dy, dx, n);                                                                                \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        lockstep_bias_fwd_##NAME_(const T_ *x, const T_ *b, T_ *y, int n, int c) {                                 \
        bias_fwd<T_>(x, b, y, n, c);                                                                               \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        lockstep_bias_gelu_fwd_##NAME_(const T_ *x, const T_ *b, T_ *y, int n, int c) {                            \
        bias_gelu_fwd<T_>(x, b, y, n, c);                                                                          \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        lockstep_bias_gelu_bwd_##NAME_(const T_ *x, const T_ *b, const T_ *dy, T_ *dx, int n, int c) {             \
        bias_gelu_bwd<T_>(x, b, dy, dx, n, c);                                                                     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        lockstep_bias_grad_partial_##NAME_(const T_ *dy, float *partial, int rows, int c, int chunk_rows) {        \
        bias_grad_partial<T_>(dy, partial, rows, c, chunk_rows);                                                   \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        lockstep_bias_grad_final_##NAME_(const float *partial, T_ *db, int chunks, int c) {                        \
        bias_grad_final<T_>(partial, db, chunks, c);                                                               \
    }

LOCKSTEP_ELEMENTWISE_KERNELS(float, f32)
LOCKSTEP_ELEMENTWISE_KERNELS(bf16, bf16)
