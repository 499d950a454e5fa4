// Fused causal attention, forward and backward, for worker/src/ops/attention_cuda.rs (which launches these and
// must agree with the launch shapes documented on each kernel). Compiled to PTX by worker/build.rs.
//
// q, k, v, o, dO and the gradients are in the input dtype, the row log-sum-exp L and D_i = rowsum(dO∘O) [B·H, T]
// in f32. Where a head's rows lie is given by two `Rows` strides, one for q, k, v and their gradients, one for o and
// dO: contiguous [B, H, T, D] tensors, or the model's own layout, where q, k and v are column slices of the c_attn
// product [B, T, 3C] and o is written straight into [B, T, C], so that no head is ever split or merged by a copy.
// For each head, with s_ij = scale·q_i·k_j for j ≤ i:
//
//   forward    L_i = log Σ_j exp s_ij,   o_i = Σ_j exp(s_ij − L_i)·v_j      (an online softmax over key tiles)
//   backward   p_ij = exp(s_ij − L_i),   dS_ij = p_ij·(dO_i·v_j − D_i)
//              dQ_i = scale·Σ_j dS_ij·k_j,   dK_j = scale·Σ_i dS_ij·q_i,   dV_j = Σ_i p_ij·dO_i
//
// Nothing of size T×T is ever stored: the backward recomputes p from q, k and L tile by tile. dQ is computed by
// its own kernel (parallel over query tiles) and dK, dV by another (parallel over key tiles), so every output
// element is written once by one thread, in a fixed order: no atomics, and the results are bitwise reproducible
// (DESIGN.md §3), at the price of computing q·k and dO·v twice in the backward.
//
// Two families, chosen by the host:
//  * tensor cores (bf16 only, sm_80+): mma.sync m16n8k16 bf16 -> f32. A block of 4 warps owns 64 rows (queries
//    in the forward and dQ kernels, keys in the dK/dV kernel), 16 per warp, and walks over tiles of the other
//    side staged in shared memory by cp.async, double-buffered. Scores, probabilities and accumulators stay in
//    registers in the mma accumulator layout, whose 16x8 tiles are re-packed as the A operand of the next
//    product (p·V, dS·K, pᵀ·dO, dSᵀ·Q) without going through shared memory. Softmax in base 2 (exp2 of
//    scale·log2(e)·s), f32 throughout; the probabilities and dS are rounded to bf16 only as mma operands.
//  * SIMT (f32 and bf16, any GPU): scalar FMAs in f32, 4 threads per row each holding a quarter of the head
//    dimension, the other side's tile in shared memory as f32. The f32 path, and a fallback for bf16
//    (LOCKSTEP_ATTENTION_KERNELS=simt) should the tensor-core one be in doubt.
//
// Causality: the query tile at q0 needs key tiles up to q0 + 64 only; the heavy query tiles (late in the sequence)
// are launched first, so that the short ones fill the tail of the grid.
//
// Without a GPU, emulate/attention_emu.cpp runs every kernel here on the CPU (fibers for threads, the documented
// mma/ldmatrix fragment layouts, poisoned cp.async destinations, warps racing each other) against a float64
// reference; the command is in its header. worker/tests/attention_gpu.rs is the test on the GPU.
#include "prims.cuh"

namespace {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core kernels (bf16)
// ---------------------------------------------------------------------------------------------------------------

constexpr int MMA_THREADS = 128;  // 4 warps
constexpr int MMA_ROWS = 64;      // rows a block owns: 16 per warp

// Shared-memory rows are padded by 8 bf16 (16 bytes): consecutive rows then start 4 banks apart, so the 8 row
// addresses of each ldmatrix phase hit 8 different 16-byte bank groups for every D here (16, 32, 64, 128).
template <int D> HD constexpr int smem_stride() { return D + 8; }

// Tiles of keys per step in the dQ kernel and of queries per step in the dK/dV kernel: smaller for D = 128 to keep
// the per-thread accumulators within the register file.
template <int D> HD constexpr int bwd_tile() { return D <= 64 ? 64 : 32; }

// Dynamic shared memory of each kernel, in bytes (attention_cuda.rs computes the same numbers; the kernels check
// that they were given at least this much).
template <int D> HD constexpr uint32_t fwd_mma_smem() { return (MMA_ROWS + 4 * MMA_ROWS) * smem_stride<D>() * 2; }
template <int D> HD constexpr uint32_t dq_mma_smem() { return (2 * MMA_ROWS + 4 * bwd_tile<D>()) * smem_stride<D>() * 2; }
template <int D> HD constexpr uint32_t dkdv_mma_smem() {
    return (2 * MMA_ROWS + 4 * bwd_tile<D>()) * smem_stride<D>() * 2 + 4 * bwd_tile<D>() * 4;
}

DEV void check_smem(uint32_t needed) {
    if (dynamic_smem_size() < needed) fail_launch();
}

// Row t of head (b, h) starts at element b·sb + h·sh + t·st; its D elements are contiguous. Contiguous [B, H, T, D]:
// (H·T·D, T·D, D). q, k or v as slices of [B, T, 3C] (C = H·D; k and v start C and 2C in): (T·3C, D, 3C). [B, T, C]:
// (T·C, D, C). For the tensor-core kernels every stride is a multiple of 8 (D is 16, 32, 64 or 128, so C is a
// multiple of 16) and every base 16-byte aligned (attention_cuda.rs copies a view that is not), so that rows can be
// copied in 16-byte pieces.
struct Rows {
    long long sb, sh;
    int st;
    // The first element of head `bh` (= b·H + h, the grid's x index) of H heads per sequence.
    DEV size_t head(size_t bh, int H) const { return bh / H * size_t(sb) + bh % H * size_t(sh); }
};

// Rows [row0, row0 + R) of a head's [T, D] bf16 rows (`st` elements apart) into shared memory (row stride D + 8),
// asynchronously; rows at or past T become zeros. The caller commits the group.
template <int R, int D> DEV void load_rows_async(bf16 *dst, const bf16 *src, int row0, int T, int st) {
    constexpr int CHUNKS = D / 8;  // 16-byte pieces per row
    for (int c = threadIdx.x; c < R * CHUNKS; c += MMA_THREADS) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        const int row = row0 + r;
        const bool valid = row < T;
        cp_async_16(dst + r * smem_stride<D>() + col, src + (size_t)(valid ? row : 0) * st + col, valid);
    }
}

// A operands (16 rows x 16 columns per step) of a warp's 16 rows, from shared memory: rows `rows`..+15.
template <int D> DEV void load_a_frags(uint32_t (&f)[D / 16][4], const bf16 *tile, int rows) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        ldmatrix_x4(f[ks], tile + (rows + lane % 16) * smem_stride<D>() + ks * 16 + (lane / 16) * 8);
}

// acc[n][..] += A·Bᵀ for B = the tile's rows (n-tiles of 8 rows, reduced over the D columns): scores q·k, dO·v and
// their transposes. `a` holds the warp's 16 rows as A operands.
template <int D, int N> DEV void mma_abt(float (&acc)[N / 8][4], const uint32_t (&a)[D / 16][4], const bf16 *tile) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int n2 = 0; n2 < N / 16; ++n2) {
            uint32_t b[4];
            ldmatrix_x4(b, tile + (n2 * 16 + (lane / 16) * 8 + lane % 8) * smem_stride<D>() + ks * 16 +
                               ((lane / 8) % 2) * 8);
            mma_bf16(acc[2 * n2], a[ks], b[0], b[1]);
            mma_bf16(acc[2 * n2 + 1], a[ks], b[2], b[3]);
        }
    }
}

// acc[..] += P·B for P = the warp's 16 x N block held in accumulator layout `p` (rounded to bf16 here) and B = the
// tile's N rows x D columns: p·V, dS·K, pᵀ·dO, dSᵀ·Q.
template <int D, int N> DEV void mma_pb(float (&acc)[D / 8][4], const float (&p)[N / 8][4], const bf16 *tile) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {
        // Two accumulator tiles (columns 16kk..16kk+15) are exactly one A operand.
        const uint32_t a[4] = {pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                               pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int d2 = 0; d2 < D / 16; ++d2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * smem_stride<D>() + d2 * 16 +
                                     (lane / 16) * 8);
            mma_bf16(acc[2 * d2], a, b[0], b[1]);
            mma_bf16(acc[2 * d2 + 1], a, b[2], b[3]);
        }
    }
}

// One thread's part of rows `row0` (acc[..][0..2]) and `row0 + 8` (acc[..][2..4]) of a head's [T, D] output rows
// (`st` elements apart), times `mul0` / `mul1`, as bf16; rows at or past T are not written.
template <int D>
DEV void store_rows(bf16 *out, const float (&acc)[D / 8][4], int row0, float mul0, float mul1, int T, int st) {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + 8 * h;
        if (row >= T) continue;
        const float mul = h ? mul1 : mul0;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            *reinterpret_cast<uint32_t *>(out + (size_t)row * st + dt * 8 + 2 * t) =
                pack_bf16x2(acc[dt][2 * h] * mul, acc[dt][2 * h + 1] * mul);
    }
}

// Forward. Grid (B·H, ceil(T/64)), 128 threads, fwd_mma_smem<D>() bytes of dynamic shared memory. q, k, v laid out
// as `in`, o as `out`, H heads per sequence.
template <int D>
DEV void fwd_mma(const bf16 *__restrict__ Q, const bf16 *__restrict__ K, const bf16 *__restrict__ V,
                 bf16 *__restrict__ O, float *__restrict__ L, int T, int H, Rows in, Rows out, float scale_log2) {
#if defined(LOCKSTEP_EMULATE) || __CUDA_ARCH__ >= 800
    constexpr int BM = MMA_ROWS, BN = MMA_ROWS, SS = smem_stride<D>();
    check_smem(fwd_mma_smem<D>());
    bf16 *sQ = reinterpret_cast<bf16 *>(dynamic_smem());
    bf16 *sK = sQ + BM * SS;       // [2][BN][SS]
    bf16 *sV = sK + 2 * BN * SS;   // [2][BN][SS]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const size_t head = blockIdx.x;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;
    const size_t i0 = in.head(head, H), o0 = out.head(head, H);
    Q += i0, K += i0, V += i0, O += o0, L += head * T;
    const int n_tiles = (min(T, q0 + BM) + BN - 1) / BN;
    const int row0 = q0 + warp * 16 + g;  // this thread's rows: row0 and row0 + 8

    load_rows_async<BM, D>(sQ, Q, q0, T, in.st);
    load_rows_async<BN, D>(sK, K, 0, T, in.st);
    load_rows_async<BN, D>(sV, V, 0, T, in.st);
    cp_async_commit();

    uint32_t qf[D / 16][4];
    float acc[D / 8][4] = {};
    float m[2] = {-INFINITY, -INFINITY};  // running row maxima of scale·log2(e)·s
    float l[2] = {0.f, 0.f};              // this thread's part of the running row sums

    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j % 2;
        if (j + 1 < n_tiles) {
            load_rows_async<BN, D>(sK + (1 - buf) * BN * SS, K, (j + 1) * BN, T, in.st);
            load_rows_async<BN, D>(sV + (1 - buf) * BN * SS, V, (j + 1) * BN, T, in.st);
        }
        cp_async_commit();
        cp_async_wait<1>();  // everything but the tile just requested
        block_sync();
        if (j == 0) load_a_frags<D>(qf, sQ, warp * 16);
        const bf16 *k_tile = sK + buf * BN * SS, *v_tile = sV + buf * BN * SS;
        const int k0 = j * BN;

        float s[BN / 8][4] = {};
        mma_abt<D, BN>(s, qf, k_tile);

        // Some key of this tile lies past some row of this warp: mask (keys past T only occur here too).
        const bool diagonal = k0 + BN - 1 > q0 + warp * 16;
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nt][e] * scale_log2;
                if (diagonal && k0 + nt * 8 + 2 * t + (e & 1) > row0 + 8 * (e / 2)) x = -INFINITY;
                s[nt][e] = x;
                mx[e / 2] = fmaxf(mx[e / 2], x);
            }
        }
        float base[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // The 4 threads of a quad hold the row's columns.
            mx[h] = fmaxf(mx[h], shfl_xor(mx[h], 1));
            mx[h] = fmaxf(mx[h], shfl_xor(mx[h], 2));
            base[h] = mx[h] == -INFINITY ? 0.f : mx[h];  // a row with nothing yet stays at zero, not NaN
            const float alpha = exp2f(m[h] - base[h]);
            m[h] = mx[h];
            l[h] *= alpha;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) acc[dt][2 * h] *= alpha, acc[dt][2 * h + 1] *= alpha;
        }
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] = exp2f(s[nt][e] - base[e / 2]);
                l[e / 2] += s[nt][e];
            }
        }
        mma_pb<D, BN>(acc, s, v_tile);
        block_sync();  // this buffer is refilled in the next step
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += shfl_xor(l[h], 1);
        l[h] += shfl_xor(l[h], 2);
    }
    store_rows<D>(O, acc, row0, 1.f / l[0], 1.f / l[1], T, out.st);
    if (t == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
            if (row0 + 8 * h < T) L[row0 + 8 * h] = (m[h] + log2f(l[h])) * LN2;
    }
#endif
}

// dQ. Grid (B·H, ceil(T/64)), 128 threads, dq_mma_smem<D>() bytes of dynamic shared memory. q, k, v and dQ laid
// out as `in`, dO as `out`.
template <int D>
DEV void bwd_dq_mma(const bf16 *__restrict__ Q, const bf16 *__restrict__ K, const bf16 *__restrict__ V,
                    const bf16 *__restrict__ dO, const float *__restrict__ L, const float *__restrict__ Dv,
                    bf16 *__restrict__ dQ, int T, int H, Rows in, Rows out, float scale_log2, float scale) {
#if defined(LOCKSTEP_EMULATE) || __CUDA_ARCH__ >= 800
    constexpr int BM = MMA_ROWS, BN = bwd_tile<D>(), SS = smem_stride<D>();
    check_smem(dq_mma_smem<D>());
    bf16 *sQ = reinterpret_cast<bf16 *>(dynamic_smem());
    bf16 *sdO = sQ + BM * SS;
    bf16 *sK = sdO + BM * SS;      // [2][BN][SS]
    bf16 *sV = sK + 2 * BN * SS;   // [2][BN][SS]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const size_t head = blockIdx.x;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;
    const size_t i0 = in.head(head, H), o0 = out.head(head, H);
    Q += i0, K += i0, V += i0, dQ += i0, dO += o0;
    L += head * T, Dv += head * T;
    const int n_tiles = (min(T, q0 + BM) + BN - 1) / BN;
    const int row0 = q0 + warp * 16 + g;

    load_rows_async<BM, D>(sQ, Q, q0, T, in.st);
    load_rows_async<BM, D>(sdO, dO, q0, T, out.st);
    load_rows_async<BN, D>(sK, K, 0, T, in.st);
    load_rows_async<BN, D>(sV, V, 0, T, in.st);
    cp_async_commit();

    float lse[2], dv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + 8 * h;
        lse[h] = row < T ? L[row] * LOG2E : 0.f;
        dv[h] = row < T ? Dv[row] : 0.f;
    }
    uint32_t qf[D / 16][4], dof[D / 16][4];
    float acc[D / 8][4] = {};

    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j % 2;
        if (j + 1 < n_tiles) {
            load_rows_async<BN, D>(sK + (1 - buf) * BN * SS, K, (j + 1) * BN, T, in.st);
            load_rows_async<BN, D>(sV + (1 - buf) * BN * SS, V, (j + 1) * BN, T, in.st);
        }
        cp_async_commit();
        cp_async_wait<1>();
        block_sync();
        if (j == 0) {
            load_a_frags<D>(qf, sQ, warp * 16);
            load_a_frags<D>(dof, sdO, warp * 16);
        }
        const bf16 *k_tile = sK + buf * BN * SS, *v_tile = sV + buf * BN * SS;
        const int k0 = j * BN;

        float s[BN / 8][4] = {}, dp[BN / 8][4] = {};
        mma_abt<D, BN>(s, qf, k_tile);
        mma_abt<D, BN>(dp, dof, v_tile);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int h = e / 2;
                const bool keep = k0 + nt * 8 + 2 * t + (e & 1) <= row0 + 8 * h;
                const float p = keep ? exp2f(s[nt][e] * scale_log2 - lse[h]) : 0.f;
                s[nt][e] = p * (dp[nt][e] - dv[h]);  // dS
            }
        }
        mma_pb<D, BN>(acc, s, k_tile);
        block_sync();
    }
    store_rows<D>(dQ, acc, row0, scale, scale, T, in.st);
#endif
}

// dK and dV. Grid (B·H, ceil(T/64)), 128 threads, dkdv_mma_smem<D>() bytes of dynamic shared memory. The block
// owns keys k0..k0+63 (16 per warp, as the A side of every product) and walks over the query tiles from k0 on.
// q, k, v, dK and dV laid out as `in`, dO as `out`.
template <int D>
DEV void bwd_dkdv_mma(const bf16 *__restrict__ Q, const bf16 *__restrict__ K, const bf16 *__restrict__ V,
                      const bf16 *__restrict__ dO, const float *__restrict__ L, const float *__restrict__ Dv,
                      bf16 *__restrict__ dK, bf16 *__restrict__ dV, int T, int H, Rows in, Rows out,
                      float scale_log2, float scale) {
#if defined(LOCKSTEP_EMULATE) || __CUDA_ARCH__ >= 800
    constexpr int BN = MMA_ROWS, BM = bwd_tile<D>(), SS = smem_stride<D>();
    check_smem(dkdv_mma_smem<D>());
    bf16 *sK = reinterpret_cast<bf16 *>(dynamic_smem());
    bf16 *sV = sK + BN * SS;
    bf16 *sQ = sV + BN * SS;       // [2][BM][SS]
    bf16 *sdO = sQ + 2 * BM * SS;  // [2][BM][SS]
    float *sL = reinterpret_cast<float *>(sdO + 2 * BM * SS);  // [2][BM], times log2(e)
    float *sDv = sL + 2 * BM;                                    // [2][BM]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const size_t head = blockIdx.x;
    const int k0 = blockIdx.y * BN;  // the long key tiles (early in the sequence) first
    const size_t i0 = in.head(head, H), o0 = out.head(head, H);
    Q += i0, K += i0, V += i0, dK += i0, dV += i0, dO += o0;
    L += head * T, Dv += head * T;
    const int first = k0 / BM, n_tiles = (T + BM - 1) / BM;
    const int key0 = k0 + warp * 16 + g;  // this thread's keys: key0 and key0 + 8

    // Stage the query-side tile i into buffer b: q and dO asynchronously, L and D directly.
    auto load_queries = [&](int i, int b) {
        load_rows_async<BM, D>(sQ + b * BM * SS, Q, i * BM, T, in.st);
        load_rows_async<BM, D>(sdO + b * BM * SS, dO, i * BM, T, out.st);
        for (int r = threadIdx.x; r < BM; r += MMA_THREADS) {
            const int row = i * BM + r;
            sL[b * BM + r] = row < T ? L[row] * LOG2E : 0.f;
            sDv[b * BM + r] = row < T ? Dv[row] : 0.f;
        }
    };
    load_rows_async<BN, D>(sK, K, k0, T, in.st);
    load_rows_async<BN, D>(sV, V, k0, T, in.st);
    load_queries(first, 0);
    cp_async_commit();

    uint32_t kf[D / 16][4], vf[D / 16][4];
    float dk[D / 8][4] = {}, dvacc[D / 8][4] = {};

    for (int i = first; i < n_tiles; ++i) {
        const int buf = (i - first) % 2;
        if (i + 1 < n_tiles) load_queries(i + 1, 1 - buf);
        cp_async_commit();
        cp_async_wait<1>();
        block_sync();
        if (i == first) {
            load_a_frags<D>(kf, sK, warp * 16);
            load_a_frags<D>(vf, sV, warp * 16);
        }
        const bf16 *q_tile = sQ + buf * BM * SS, *do_tile = sdO + buf * BM * SS;
        const float *lse = sL + buf * BM, *dvec = sDv + buf * BM;
        const int q0 = i * BM;

        float st[BM / 8][4] = {}, dpt[BM / 8][4] = {};  // sᵀ and dPᵀ: this warp's 16 keys x BM queries
        mma_abt<D, BM>(st, kf, q_tile);
        mma_abt<D, BM>(dpt, vf, do_tile);
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = nt * 8 + 2 * t + (e & 1), query = q0 + c;
                const bool keep = query >= key0 + 8 * (e / 2) && query < T;
                const float p = keep ? exp2f(st[nt][e] * scale_log2 - lse[c]) : 0.f;
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - dvec[c]);  // dSᵀ
            }
        }
        mma_pb<D, BM>(dvacc, st, do_tile);
        mma_pb<D, BM>(dk, dpt, q_tile);
        block_sync();
    }
    store_rows<D>(dK, dk, key0, scale, scale, T, in.st);
    store_rows<D>(dV, dvacc, key0, 1.f, 1.f, T, in.st);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// SIMT kernels (f32 and bf16): 128 threads = 32 rows x 4 threads; thread c of a row holds columns c, c+4, c+8, ...
// ---------------------------------------------------------------------------------------------------------------

constexpr int SIMT_THREADS = 128;
constexpr int SIMT_ROWS = 32;  // rows a block owns, and rows of the other side per step

// Rows [row0, row0 + SIMT_ROWS) of a head's [T, D] rows (`st` elements apart) into shared memory as f32, D floats
// per row; rows at or past T become zeros.
template <int D, typename T_> DEV void load_rows_f32(float *dst, const T_ *src, int row0, int T, int st) {
    static_assert(SIMT_THREADS % D == 0, "a pass of the block covers whole rows");
    constexpr int ROWS_PER_PASS = SIMT_THREADS / D;
    const int col = threadIdx.x % D;
    for (int r = threadIdx.x / D; r < SIMT_ROWS; r += ROWS_PER_PASS) {
        const int row = row0 + r;
        dst[r * D + col] = row < T ? to_f32(src[(size_t)row * st + col]) : 0.f;
    }
}

// Σ_i a[i]·tile[r][c + 4i] over the 4 threads of a row: the dot product of this row with tile row r.
template <int D> DEV float quad_dot(const float (&a)[D / 4], const float *tile, int r, int c) {
    float x = 0.f;
#pragma unroll
    for (int i = 0; i < D / 4; ++i) x += a[i] * tile[r * D + c + 4 * i];
    x += shfl_xor(x, 1);
    x += shfl_xor(x, 2);
    return x;
}

// Columns c, c + 4, c + 8, ... of row `row` (rows `st` elements apart), as f32; zeros past T.
template <int D, typename T_>
DEV void load_quarter(float (&dst)[D / 4], const T_ *src, int row, int c, int T, int st) {
#pragma unroll
    for (int i = 0; i < D / 4; ++i) dst[i] = row < T ? to_f32(src[(size_t)row * st + c + 4 * i]) : 0.f;
}

template <int D, typename T_>
DEV void store_quarter(T_ *dst, const float (&src)[D / 4], float mul, int row, int c, int T, int st) {
    if (row >= T) return;
#pragma unroll
    for (int i = 0; i < D / 4; ++i) dst[(size_t)row * st + c + 4 * i] = from_f32<T_>(src[i] * mul);
}

// Forward. Grid (B·H, ceil(T/32)), 128 threads. Layouts as in fwd_mma.
template <int D, typename T_>
DEV void fwd_simt(const T_ *__restrict__ Q, const T_ *__restrict__ K, const T_ *__restrict__ V, T_ *__restrict__ O,
                  float *__restrict__ L, int T, int H, Rows in, Rows out, float scale_log2) {
    constexpr int BN = SIMT_ROWS;
    __shared__ float sK[BN * D], sV[BN * D];
    const int r = threadIdx.x / 4, c = threadIdx.x % 4;
    const size_t head = blockIdx.x;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * SIMT_ROWS, row = q0 + r;
    const size_t i0 = in.head(head, H), o0 = out.head(head, H);
    Q += i0, K += i0, V += i0, O += o0, L += head * T;
    const int n_tiles = (min(T, q0 + SIMT_ROWS) + BN - 1) / BN;

    float q[D / 4], o[D / 4] = {};
    load_quarter<D>(q, Q, row, c, T, in.st);
    float m = -INFINITY, l = 0.f;
    for (int j = 0; j < n_tiles; ++j) {
        const int k0 = j * BN;
        block_sync();
        load_rows_f32<D>(sK, K, k0, T, in.st);
        load_rows_f32<D>(sV, V, k0, T, in.st);
        block_sync();
        float s[BN];
        float mx = m;
#pragma unroll
        for (int kk = 0; kk < BN; ++kk) {
            const float x = quad_dot<D>(q, sK, kk, c) * scale_log2;
            s[kk] = k0 + kk <= row ? x : -INFINITY;
            mx = fmaxf(mx, s[kk]);
        }
        const float base = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m - base);
        m = mx;
        l *= alpha;
#pragma unroll
        for (int i = 0; i < D / 4; ++i) o[i] *= alpha;
#pragma unroll
        for (int kk = 0; kk < BN; ++kk) {
            const float p = exp2f(s[kk] - base);
            l += p;
#pragma unroll
            for (int i = 0; i < D / 4; ++i) o[i] += p * sV[kk * D + c + 4 * i];
        }
    }
    store_quarter<D>(O, o, 1.f / l, row, c, T, out.st);
    if (c == 0 && row < T) L[row] = (m + log2f(l)) * LN2;
}

// dQ. Grid (B·H, ceil(T/32)), 128 threads. Layouts as in bwd_dq_mma.
template <int D, typename T_>
DEV void bwd_dq_simt(const T_ *__restrict__ Q, const T_ *__restrict__ K, const T_ *__restrict__ V,
                     const T_ *__restrict__ dO, const float *__restrict__ L, const float *__restrict__ Dv,
                     T_ *__restrict__ dQ, int T, int H, Rows in, Rows out, float scale_log2, float scale) {
    constexpr int BN = SIMT_ROWS;
    __shared__ float sK[BN * D], sV[BN * D];
    const int r = threadIdx.x / 4, c = threadIdx.x % 4;
    const size_t head = blockIdx.x;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * SIMT_ROWS, row = q0 + r;
    const size_t i0 = in.head(head, H), o0 = out.head(head, H);
    Q += i0, K += i0, V += i0, dQ += i0, dO += o0;
    L += head * T, Dv += head * T;
    const int n_tiles = (min(T, q0 + SIMT_ROWS) + BN - 1) / BN;

    float q[D / 4], d_o[D / 4], dq[D / 4] = {};
    load_quarter<D>(q, Q, row, c, T, in.st);
    load_quarter<D>(d_o, dO, row, c, T, out.st);
    const float lse = row < T ? L[row] * LOG2E : 0.f, dvec = row < T ? Dv[row] : 0.f;
    for (int j = 0; j < n_tiles; ++j) {
        const int k0 = j * BN;
        block_sync();
        load_rows_f32<D>(sK, K, k0, T, in.st);
        load_rows_f32<D>(sV, V, k0, T, in.st);
        block_sync();
#pragma unroll 4
        for (int kk = 0; kk < BN; ++kk) {
            const float s = quad_dot<D>(q, sK, kk, c), dp = quad_dot<D>(d_o, sV, kk, c);
            const float p = k0 + kk <= row ? exp2f(s * scale_log2 - lse) : 0.f;
            const float ds = p * (dp - dvec);
#pragma unroll
            for (int i = 0; i < D / 4; ++i) dq[i] += ds * sK[kk * D + c + 4 * i];
        }
    }
    store_quarter<D>(dQ, dq, scale, row, c, T, in.st);
}

// dK and dV. Grid (B·H, ceil(T/32)), 128 threads; the block owns 32 keys and walks the query tiles from them on.
// Layouts as in bwd_dkdv_mma.
template <int D, typename T_>
DEV void bwd_dkdv_simt(const T_ *__restrict__ Q, const T_ *__restrict__ K, const T_ *__restrict__ V,
                       const T_ *__restrict__ dO, const float *__restrict__ L, const float *__restrict__ Dv,
                       T_ *__restrict__ dK, T_ *__restrict__ dV, int T, int H, Rows in, Rows out, float scale_log2,
                       float scale) {
    constexpr int BM = SIMT_ROWS;
    __shared__ float sQ[BM * D], sdO[BM * D], sL[BM], sDv[BM];
    const int r = threadIdx.x / 4, c = threadIdx.x % 4;
    const size_t head = blockIdx.x;
    const int k0 = blockIdx.y * SIMT_ROWS, key = k0 + r;
    const size_t i0 = in.head(head, H), o0 = out.head(head, H);
    Q += i0, K += i0, V += i0, dK += i0, dV += i0, dO += o0;
    L += head * T, Dv += head * T;

    float k[D / 4], v[D / 4], dk[D / 4] = {}, dv[D / 4] = {};
    load_quarter<D>(k, K, key, c, T, in.st);
    load_quarter<D>(v, V, key, c, T, in.st);
    for (int q0 = k0; q0 < T; q0 += BM) {
        block_sync();
        load_rows_f32<D>(sQ, Q, q0, T, in.st);
        load_rows_f32<D>(sdO, dO, q0, T, out.st);
        for (int i = threadIdx.x; i < BM; i += SIMT_THREADS) {
            sL[i] = q0 + i < T ? L[q0 + i] * LOG2E : 0.f;
            sDv[i] = q0 + i < T ? Dv[q0 + i] : 0.f;
        }
        block_sync();
#pragma unroll 4
        for (int qq = 0; qq < BM; ++qq) {
            const float s = quad_dot<D>(k, sQ, qq, c), dp = quad_dot<D>(v, sdO, qq, c);
            const int query = q0 + qq;
            const float p = query >= key && query < T ? exp2f(s * scale_log2 - sL[qq]) : 0.f;
            const float ds = p * (dp - sDv[qq]);
#pragma unroll
            for (int i = 0; i < D / 4; ++i) {
                dv[i] += p * sdO[qq * D + c + 4 * i];
                dk[i] += ds * sQ[qq * D + c + 4 * i];
            }
        }
    }
    store_quarter<D>(dK, dk, scale, key, c, T, in.st);
    store_quarter<D>(dV, dv, 1.f, key, c, T, in.st);
}

// D_i = Σ_d dO_id·O_id in f32, one warp per row; row i = head·T + t of the B·H·T rows, dO and O laid out as `out`.
// Grid ceil(rows/4), 128 threads.
template <typename T_>
DEV void bwd_rowdot(const T_ *__restrict__ dO, const T_ *__restrict__ O, float *__restrict__ Dv, int rows, int T,
                    int H, Rows out, int D) {
    const int row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;  // whole warps
    const size_t at = out.head(row / T, H) + (size_t)(row % T) * out.st;
    float x = 0.f;
    for (int d = lane; d < D; d += 32) x += to_f32(dO[at + d]) * to_f32(O[at + d]);
#pragma unroll
    for (int w = 16; w > 0; w /= 2) x += shfl_xor(x, w);
    if (lane == 0) Dv[row] = x;
}

}  // namespace
// ---------------------------------------------------------------------------------------------------------------
// Entry points: lockstep_attn_<kernel>_<d>; the SIMT ones also carry the dtype. After the tensors, every kernel
// takes T, H and the two layouts as scalars (LAYOUT): in = q, k, v and their gradients, out = o and dO.
// ---------------------------------------------------------------------------------------------------------------

#define LAYOUT_PARAMS                                                                                              \
    int t, int h, long long in_sb, long long in_sh, int in_st, long long out_sb, long long out_sh, int out_st
#define LAYOUT_ARGS t, h, Rows{in_sb, in_sh, in_st}, Rows{out_sb, out_sh, out_st}

#define LOCKSTEP_MMA_KERNELS(D_)                                                                                   \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                                      \
        lockstep_attn_fwd_mma_##D_(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *l, LAYOUT_PARAMS, \
                                   float scale_log2) {                                                             \
        fwd_mma<D_>(q, k, v, o, l, LAYOUT_ARGS, scale_log2);                                                       \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                                      \
        lockstep_attn_dq_mma_##D_(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *d_o, const float *l,   \
                                  const float *dv, bf16 *dq, LAYOUT_PARAMS, float scale_log2, float scale) {       \
        bwd_dq_mma<D_>(q, k, v, d_o, l, dv, dq, LAYOUT_ARGS, scale_log2, scale);                                   \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                                      \
        lockstep_attn_dkdv_mma_##D_(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *d_o,                 \
                                    const float *l, const float *dv, bf16 *dk, bf16 *dvo, LAYOUT_PARAMS,           \
                                    float scale_log2, float scale) {                                               \
        bwd_dkdv_mma<D_>(q, k, v, d_o, l, dv, dk, dvo, LAYOUT_ARGS, scale_log2, scale);                            \
    }

#define LOCKSTEP_SIMT_KERNELS(D_, T_, NAME_)                                                                       \
    extern "C" __global__ void __launch_bounds__(SIMT_THREADS)                                                     \
        lockstep_attn_fwd_simt_##NAME_##_##D_(const T_ *q, const T_ *k, const T_ *v, T_ *o, float *l,             \
                                              LAYOUT_PARAMS, float scale_log2) {                                   \
        fwd_simt<D_, T_>(q, k, v, o, l, LAYOUT_ARGS, scale_log2);                                                  \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(SIMT_THREADS)                                                     \
        lockstep_attn_dq_simt_##NAME_##_##D_(const T_ *q, const T_ *k, const T_ *v, const T_ *d_o, const float *l, \
                                             const float *dv, T_ *dq, LAYOUT_PARAMS, float scale_log2,            \
                                             float scale) {                                                        \
        bwd_dq_simt<D_, T_>(q, k, v, d_o, l, dv, dq, LAYOUT_ARGS, scale_log2, scale);                              \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(SIMT_THREADS)                                                     \
        lockstep_attn_dkdv_simt_##NAME_##_##D_(const T_ *q, const T_ *k, const T_ *v, const T_ *d_o,              \
                                               const float *l, const float *dv, T_ *dk, T_ *dvo, LAYOUT_PARAMS,   \
                                               float scale_log2, float scale) {                                    \
        bwd_dkdv_simt<D_, T_>(q, k, v, d_o, l, dv, dk, dvo, LAYOUT_ARGS, scale_log2, scale);                       \
    }

LOCKSTEP_MMA_KERNELS(16)
LOCKSTEP_MMA_KERNELS(32)
LOCKSTEP_MMA_KERNELS(64)
LOCKSTEP_MMA_KERNELS(128)

LOCKSTEP_SIMT_KERNELS(16, float, f32)
LOCKSTEP_SIMT_KERNELS(32, float, f32)
LOCKSTEP_SIMT_KERNELS(64, float, f32)
LOCKSTEP_SIMT_KERNELS(128, float, f32)
LOCKSTEP_SIMT_KERNELS(16, bf16, bf16)
LOCKSTEP_SIMT_KERNELS(32, bf16, bf16)
LOCKSTEP_SIMT_KERNELS(64, bf16, bf16)
LOCKSTEP_SIMT_KERNELS(128, bf16, bf16)

extern "C" __global__ void __launch_bounds__(128)
    lockstep_attn_rowdot_f32(const float *d_o, const float *o, float *dv, int rows, int t, int h, long long out_sb,
                             long long out_sh, int out_st, int d) {
    bwd_rowdot<float>(d_o, o, dv, rows, t, h, Rows{out_sb, out_sh, out_st}, d);
}

extern "C" __global__ void __launch_bounds__(128)
    lockstep_attn_rowdot_bf16(const bf16 *d_o, const bf16 *o, float *dv, int rows, int t, int h, long long out_sb,
                              long long out_sh, int out_st, int d) {
    bwd_rowdot<bf16>(d_o, o, dv, rows, t, h, Rows{out_sb, out_sh, out_st}, d);
}
