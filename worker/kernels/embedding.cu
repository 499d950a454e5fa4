// The token embedding, a row gather, forward and backward, for worker/src/ops/embedding_cuda.rs (which launches
// these and must agree with the launch shapes documented on each kernel). Compiled to PTX by worker/build.rs.
//
// weight [V, C] and out, grad, dw [N, C] / [V, C] are contiguous in f32 or bf16; ids [N] u32. V and C are below 2^31
// and N at most 2^30 (checked on the host: a block's threads past N must not overflow an int either), so positions,
// ids and counts are ints; element offsets (row·C) are size_t.
//
//   forward    out[p, :] = weight[ids[p], :]                       (NaN for an id ≥ V: see below)
//   backward   dw[v, :]  = Σ_{p : ids[p] = v} grad[p, :]           (in increasing p, in f32; 0 for absent rows)
//
// candle's backward of index_select is index_add, one thread per column looping over all N ids with a dependent
// read-modify-write each: for GPT-2's [50304, 768] table that is one block of 1024 threads doing 16k serial global
// round trips. Here the backward is a stable counting sort of the positions by id, then a vocabulary row per half
// block summing its positions' gradient rows in position order: parallel, no float atomics (no atomics at all), every
// sum in a fixed order, so the gradient is bitwise reproducible and equals a sequential f32 sum in p order.
//
//   1. rank     partial counts, per position p and slice s of positions q: #{q in s, q < p, ids[q] = ids[p]}
//               and #{q in s, ids[q] = ids[p]}. O(N²) integer compares through shared-memory tiles, 4 ids per
//               16-byte read: 268M for N = 16384, spread over (N/256)·S blocks (1024 for GPT-2), an estimated tens
//               of microseconds on an H200 (not yet measured). Quadratic: 16x that at N = 65536 (still far below
//               index_add); a radix sort would be the next step beyond. The partial counts take 2·S·N ints, S ≤ 32.
//   2. count    rank[p] = Σ_s (q < p counts); the first occurrence of each in-range id (rank 0) writes cnt[id] =
//               Σ_s (all counts), the id's total (one writer per entry; cnt zeroed by the host for the rest).
//   3. offsets  start = exclusive prefix sum of cnt, by one block (integers: any order gives the same result).
//   4. place    order[start[ids[p]] + rank[p]] = p for in-range ids: the positions grouped by id, increasing
//               within a group.
//   5. sum      row v: dw[v, c] = Σ_k grad[order[start[v] + k], c], k = 0 .. cnt[v], in f32. Writes every row
//               (zeros where cnt is 0), so dw needs no memset. A row's positions are summed by one half block: an
//               id repeated n times costs it n row reads (all N for a constant batch, a slow but correct case).
//
// An id ≥ V cannot be refused without a device-to-host copy of the ids (a sync per step): the forward writes that
// row as NaN, so the loss and the step are visibly non-finite (the trainer skips such steps), and the backward
// leaves it out. The CPU op refuses it with an error.
//
// Without a GPU, emulate/embedding_emu.cpp runs every kernel here on the CPU against a sequential reference.
#include "prims.cuh"

namespace embedding {

// Forward: a warp per output row, FWD_ROWS rows per block.
constexpr int FWD_THREADS = 256;
constexpr int FWD_ROWS = FWD_THREADS / 32;
// rank: RANK_THREADS positions per block; the positions they are compared with come through shared memory
// RANK_TILE at a time; at most RANK_MAX_SLICES slices (grid.y), which bounds the partial counts at 2·S·N ints.
constexpr int RANK_THREADS = 256;
constexpr int RANK_TILE = 1024;
constexpr int RANK_MAX_SLICES = 32;
// count and place: a thread per position.
constexpr int POS_THREADS = 256;
// offsets: one block; SCAN_ITEMS consecutive counts per thread per chunk of SCAN_THREADS·SCAN_ITEMS.
constexpr int SCAN_THREADS = 256;
constexpr int SCAN_ITEMS = 16;
constexpr int SCAN_CHUNK = SCAN_THREADS * SCAN_ITEMS;
// sum: SUM_ROWS vocabulary rows per block, SUM_ROW_THREADS threads over each row's columns (16-byte packs where
// aligned).
constexpr int SUM_THREADS = 256;
constexpr int SUM_ROWS = 2;
constexpr int SUM_ROW_THREADS = SUM_THREADS / SUM_ROWS;
constexpr int SUM_UNROLL = 4;

// Positions per slice of the rank kernel for n ≥ 1 positions (embedding_cuda.rs: `slice_len`): whole tiles, at most
// RANK_MAX_SLICES slices.
HD constexpr int rank_slice_len(int n) {
    const int tiles = (n + RANK_TILE - 1) / RANK_TILE;
    const int slices = tiles < RANK_MAX_SLICES ? tiles : RANK_MAX_SLICES;
    return (tiles + slices - 1) / slices * RANK_TILE;
}

HD constexpr int rank_slices(int n) {
    const int len = rank_slice_len(n);
    return (n + len - 1) / len;
}

// Elements per 16-byte access.
template <typename T> HD constexpr int vec_width() { return int(16 / sizeof(T)); }

// 16 bytes of T: plain loads and stores of it compile to one 128-bit access.
template <typename T> struct alignas(16) Pack {
    T v[vec_width<T>()];
};

DEV bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

DEV float quiet_nan() { return INFINITY - INFINITY; }

// Forward. Grid ceil(N / FWD_ROWS), FWD_THREADS threads: warp w of block b copies row p = FWD_ROWS·b + w, lane l
// the packs (or elements) l, l + 32, ... of it.
template <typename T>
DEV void gather(const T *__restrict__ weight, const uint32_t *__restrict__ ids, T *__restrict__ out, int N, int V,
                int C) {
    const int lane = int(threadIdx.x) % 32;
    const int p = int(blockIdx.x) * FWD_ROWS + int(threadIdx.x) / 32;
    if (p >= N) return;
    const uint32_t id = ids[p];
    T *dst = out + size_t(p) * C;
    if (id >= uint32_t(V)) {
        const T nan = from_f32<T>(quiet_nan());
        for (int c = lane; c < C; c += 32) dst[c] = nan;
        return;
    }
    const T *src = weight + size_t(id) * C;
    constexpr int VEC = vec_width<T>();
    // Every row is aligned when the base pointers are and a row is whole packs.
    if (C % VEC == 0 && aligned16(weight) && aligned16(out)) {
        const Pack<T> *s = reinterpret_cast<const Pack<T> *>(src);
        Pack<T> *d = reinterpret_cast<Pack<T> *>(dst);
        for (int i = lane; i < C / VEC; i += 32) d[i] = s[i];
        return;
    }
    for (int c = lane; c < C; c += 32) dst[c] = src[c];
}

// Four ids, so that the rank kernel's compares read shared memory 16 bytes at a time.
struct alignas(16) Ids4 {
    uint32_t v[4];
};

// 1. Grid ceil(N / RANK_THREADS) x rank_slices(N), RANK_THREADS threads; slice_len = rank_slice_len(N). Thread t of
// block (b, s) counts, for p = RANK_THREADS·b + t, the q in [s·slice_len, (s + 1)·slice_len) with ids[q] = ids[p]:
// those before p into partial[s·N + p], all of them into partial[(S + s)·N + p] (S = gridDim.y).
DEV void rank(const uint32_t *__restrict__ ids, int *__restrict__ partial, int N, int slice_len) {
    __shared__ Ids4 tile[RANK_TILE / 4];
    const int t = int(threadIdx.x);
    const int p = int(blockIdx.x) * RANK_THREADS + t;
    const uint32_t mine = p < N ? ids[p] : 0u;  // threads past N still load tiles and meet the barriers
    const int q_begin = int(blockIdx.y) * slice_len;
    const int q_end = min(q_begin + slice_len, N);
    int before = 0, all = 0;
    for (int q0 = q_begin; q0 < q_end; q0 += RANK_TILE) {
        const int len = min(RANK_TILE, q_end - q0);
        for (int i = t; i < len; i += RANK_THREADS) tile[i / 4].v[i % 4] = ids[q0 + i];
        block_sync();
        int in_tile = 0;
#pragma unroll 4
        for (int g = 0; g < len / 4; ++g) {
            const Ids4 x = tile[g];
            in_tile += (x.v[0] == mine) + (x.v[1] == mine) + (x.v[2] == mine) + (x.v[3] == mine);
        }
        for (int j = len / 4 * 4; j < len; ++j) in_tile += tile[j / 4].v[j % 4] == mine;
        all += in_tile;
        // Before p: the whole tile, none of it, or (in the one tile that holds p) its first p − q0 ids.
        if (q0 + len <= p)
            before += in_tile;
        else if (q0 < p)
            for (int j = 0; j < p - q0; ++j) before += tile[j / 4].v[j % 4] == mine;
        block_sync();  // the tile is reloaded
    }
    if (p < N) {
        const size_t S = gridDim.y;
        partial[size_t(blockIdx.y) * N + p] = before;
        partial[(S + blockIdx.y) * N + p] = all;
    }
}

// 2. Grid ceil(N / POS_THREADS), POS_THREADS threads, a thread per position; `slices` = rank_slices(N).
DEV void count(const uint32_t *__restrict__ ids, const int *__restrict__ partial, int *__restrict__ rank_out,
               int *__restrict__ cnt, int N, int V, int slices) {
    const int p = int(blockIdx.x) * POS_THREADS + int(threadIdx.x);
    if (p >= N) return;
    int before = 0, all = 0;
    for (int s = 0; s < slices; ++s) {
        before += partial[size_t(s) * N + p];
        all += partial[size_t(slices + s) * N + p];
    }
    rank_out[p] = before;
    const uint32_t id = ids[p];
    if (before == 0 && id < uint32_t(V)) cnt[id] = all;
}

// 3. Grid 1, SCAN_THREADS threads. start[v] = Σ_{u < v} cnt[u]. Chunk by chunk: a coalesced load into shared memory,
// each thread sums its SCAN_ITEMS consecutive counts, a Hillis-Steele scan of the thread sums, each thread writes
// its counts' exclusive prefixes back, a coalesced store; `carry` is the sum of the chunks before.
DEV void offsets(const int *__restrict__ cnt, int *__restrict__ start, int V) {
    __shared__ int tile[SCAN_CHUNK];
    __shared__ int sums[2][SCAN_THREADS];
    const int t = int(threadIdx.x);
    int carry = 0;
    for (int base = 0; base < V; base += SCAN_CHUNK) {
        for (int k = 0; k < SCAN_ITEMS; ++k) {
            const int i = k * SCAN_THREADS + t;
            tile[i] = base + i < V ? cnt[base + i] : 0;
        }
        block_sync();
        int own = 0;
        for (int k = 0; k < SCAN_ITEMS; ++k) own += tile[t * SCAN_ITEMS + k];
        // Inclusive scan of the thread sums, ping-ponging between two buffers: one barrier per step.
        int cur = 0;
        sums[cur][t] = own;
        block_sync();
        for (int d = 1; d < SCAN_THREADS; d *= 2) {
            sums[cur ^ 1][t] = sums[cur][t] + (t >= d ? sums[cur][t - d] : 0);
            cur ^= 1;
            block_sync();
        }
        int prefix = carry + sums[cur][t] - own;
        for (int k = 0; k < SCAN_ITEMS; ++k) {
            const int x = tile[t * SCAN_ITEMS + k];
            tile[t * SCAN_ITEMS + k] = prefix;
            prefix += x;
        }
        carry += sums[cur][SCAN_THREADS - 1];
        block_sync();
        for (int k = 0; k < SCAN_ITEMS; ++k) {
            const int i = k * SCAN_THREADS + t;
            if (base + i < V) start[base + i] = tile[i];
        }
        block_sync();  // tile and sums are rewritten by the next chunk
    }
}

// 4. Grid and threads as count.
DEV void place(const uint32_t *__restrict__ ids, const int *__restrict__ rank_in, const int *__restrict__ start,
               int *__restrict__ order, int N, int V) {
    const int p = int(blockIdx.x) * POS_THREADS + int(threadIdx.x);
    if (p >= N) return;
    const uint32_t id = ids[p];
    if (id < uint32_t(V)) order[start[id] + rank_in[p]] = p;
}

// 5. Grid ceil(V / SUM_ROWS), SUM_THREADS threads: threads [r·SUM_ROW_THREADS, (r + 1)·SUM_ROW_THREADS) of block b
// write dw row v = SUM_ROWS·b + r, thread t of them the packs (or elements) t, t + SUM_ROW_THREADS, ... Each output
// element is 0 + g_0 + g_1 + ... in f32 over the row's positions in increasing order; the unrolled loop only issues
// SUM_UNROLL rows' loads before adding them in that order.
template <typename T>
DEV void sum_rows(const T *__restrict__ grad, const int *__restrict__ cnt, const int *__restrict__ start,
                  const int *__restrict__ order, T *__restrict__ dw, int V, int C) {
    const int v = int(blockIdx.x) * SUM_ROWS + int(threadIdx.x) / SUM_ROW_THREADS;
    const int t = int(threadIdx.x) % SUM_ROW_THREADS;
    if (v >= V) return;
    const int n = cnt[v];
    const int *pos = order + start[v];
    constexpr int VEC = vec_width<T>();
    if (C % VEC == 0 && aligned16(grad) && aligned16(dw)) {
        const int packs = C / VEC;
        const Pack<T> *g = reinterpret_cast<const Pack<T> *>(grad);
        Pack<T> *out = reinterpret_cast<Pack<T> *>(dw) + size_t(v) * packs;
        for (int i = t; i < packs; i += SUM_ROW_THREADS) {
            float acc[VEC];
            for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
            int k = 0;
            for (; k + SUM_UNROLL <= n; k += SUM_UNROLL) {
                Pack<T> r[SUM_UNROLL];
#pragma unroll
                for (int u = 0; u < SUM_UNROLL; ++u) r[u] = g[size_t(pos[k + u]) * packs + i];
#pragma unroll
                for (int u = 0; u < SUM_UNROLL; ++u)
                    for (int e = 0; e < VEC; ++e) acc[e] += to_f32(r[u].v[e]);
            }
            for (; k < n; ++k) {
                const Pack<T> r = g[size_t(pos[k]) * packs + i];
                for (int e = 0; e < VEC; ++e) acc[e] += to_f32(r.v[e]);
            }
            Pack<T> o;
            for (int e = 0; e < VEC; ++e) o.v[e] = from_f32<T>(acc[e]);
            out[i] = o;
        }
        return;
    }
    T *out = dw + size_t(v) * C;
    for (int c = t; c < C; c += SUM_ROW_THREADS) {
        float acc = 0.f;
        int k = 0;
        for (; k + SUM_UNROLL <= n; k += SUM_UNROLL) {
            float r[SUM_UNROLL];
#pragma unroll
            for (int u = 0; u < SUM_UNROLL; ++u) r[u] = to_f32(grad[size_t(pos[k + u]) * C + c]);
#pragma unroll
            for (int u = 0; u < SUM_UNROLL; ++u) acc += r[u];
        }
        for (; k < n; ++k) acc += to_f32(grad[size_t(pos[k]) * C + c]);
        out[c] = from_f32<T>(acc);
    }
}

}  // namespace embedding

using namespace embedding;

// ---------------------------------------------------------------------------------------------------------------
// Entry points: lockstep_embedding_{fwd,sum}_<dtype>, and the dtype-free lockstep_embedding_{rank,count,offsets,
// place}.
// ---------------------------------------------------------------------------------------------------------------

#define LOCKSTEP_EMBEDDING_KERNELS(T_, NAME_)                                                                      \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS)                                                      \
        lockstep_embedding_fwd_##NAME_(const T_ *weight, const uint32_t *ids, T_ *out, int n, int v, int c) {      \
        gather<T_>(weight, ids, out, n, v, c);                                                                     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(SUM_THREADS) lockstep_embedding_sum_##NAME_(                      \
        const T_ *grad, const int *cnt, const int *start, const int *order, T_ *dw, int v, int c) {               \
        sum_rows<T_>(grad, cnt, start, order, dw, v, c);                                                           \
    }

LOCKSTEP_EMBEDDING_KERNELS(float, f32)
LOCKSTEP_EMBEDDING_KERNELS(bf16, bf16)

extern "C" __global__ void __launch_bounds__(RANK_THREADS)
    lockstep_embedding_rank(const uint32_t *ids, int *partial, int n, int slice_len) {
    rank(ids, partial, n, slice_len);
}

extern "C" __global__ void __launch_bounds__(POS_THREADS)
    lockstep_embedding_count(const uint32_t *ids, const int *partial, int *rank_out, int *cnt, int n, int v,
                             int slices) {
    count(ids, partial, rank_out, cnt, n, v, slices);
}

extern "C" __global__ void __launch_bounds__(SCAN_THREADS)
    lockstep_embedding_offsets(const int *cnt, int *start, int v) {
    offsets(cnt, start, v);
}

extern "C" __global__ void __launch_bounds__(POS_THREADS)
    lockstep_embedding_place(const uint32_t *ids, const int *rank_in, const int *start, int *order, int n, int v) {
    place(ids, rank_in, start, order, n, v);
}
