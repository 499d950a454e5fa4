// Attention's head split and merge, for worker/src/ops/heads_cuda.rs (which launches these with the grid documented
// below). Compiled to PTX by worker/build.rs.
//
//   split   x [B, T, C] -> [B, nh, T, hd]     out[b, h, t, :] = x[b, t, h·hd .. (h + 1)·hd]
//   merge   y [B, nh, T, hd] -> [B, T, C]     the inverse permutation
//
// Both tensors contiguous, f32 or bf16, C = nh·hd. A permutation of whole head rows: each side holds a head row as
// hd contiguous elements (128 bytes for GPT-2's hd = 64 in bf16), so the kernel moves 16-byte packs when every head
// row starts 16-byte aligned (hd a multiple of a pack and both base pointers aligned), single elements otherwise (a
// view that starts mid-pack, or an odd hd). candle's generic strided copy instead resolves every 2-byte element
// through a loop of 64-bit divisions over the dims.
//
// The threads walk the head-side layout [B, nh, T, hd] in order, so a warp reads or writes consecutive addresses on
// that side and whole head rows (runs of hd contiguous elements) on the other. B·T·C < 2^31 (checked on the host),
// so offsets within a batch element are 32-bit; the batch offset is size_t.
//
// Without a GPU, emulate/heads_emu.cpp runs these kernels on the CPU against a host permutation.
#include "prims.cuh"

namespace heads {

constexpr int THREADS = 256;
// Cap on the blocks of a launch (a few waves of 256-thread blocks on a 132-SM H200); larger tensors loop.
constexpr int MAX_BLOCKS = 8192;
// The hardware's bound on gridDim.y.
constexpr int MAX_GRID_Y = 65535;

// Elements per 16-byte access.
template <typename T> HD constexpr int vec_width() { return int(16 / sizeof(T)); }

// The grid for B batch elements of `units` packs (or elements) each (heads_cuda.rs: `grid`): y over the batch, x
// over one batch element's units, at most MAX_BLOCKS blocks in all (at least one per batch row of the grid).
HD constexpr int grid_y(int B) { return B < 1 ? 1 : B > MAX_GRID_Y ? MAX_GRID_Y : B; }
HD constexpr int grid_x(int units, int B) {
    const int y = grid_y(B);
    const int cap = MAX_BLOCKS / y < 1 ? 1 : MAX_BLOCKS / y;
    const int blocks = int((static_cast<long long>(units) + THREADS - 1) / THREADS);
    return blocks < 1 ? 1 : blocks > cap ? cap : blocks;
}

// 16 bytes of T: plain loads and stores of it compile to one 128-bit access.
template <typename T> struct alignas(16) Pack {
    T v[vec_width<T>()];
};

DEV bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Moves units of type U (a pack or an element): a head row is `row` units, a token row nh·row. Unit k of a batch
// element on the head side is (h, t, p) with k = (h·T + t)·row + p; on the token side it is (t·nh + h)·row + p.
// Grid grid_x(T·nh·row, B) x grid_y(B), THREADS threads; both loops stride.
template <bool SPLIT, typename U>
DEV void permute(const U *__restrict__ in, U *__restrict__ out, int B, int T, int nh, int row) {
    const unsigned per_head = unsigned(T) * unsigned(row);  // units of one head of one batch element
    const unsigned per_batch = per_head * unsigned(nh);
    const unsigned token_row = unsigned(nh) * unsigned(row);
    const unsigned stride = gridDim.x * unsigned(THREADS);
    for (int b = int(blockIdx.y); b < B; b += int(gridDim.y)) {
        const size_t base = size_t(b) * per_batch;
        const U *src = in + base;
        U *dst = out + base;
        for (unsigned k = blockIdx.x * unsigned(THREADS) + threadIdx.x; k < per_batch; k += stride) {
            const unsigned h = k / per_head;
            const unsigned tp = k - h * per_head;  // t·row + p
            const unsigned t = tp / unsigned(row);
            const unsigned token = t * token_row + h * unsigned(row) + (tp - t * unsigned(row));
            if (SPLIT)
                dst[k] = src[token];
            else
                dst[token] = src[k];
        }
    }
}

// The kernel's entry: packs when every head row is 16-byte aligned on both sides, elements otherwise.
template <bool SPLIT, typename T>
DEV void move_heads(const T *__restrict__ in, T *__restrict__ out, int B, int T_, int nh, int hd) {
    constexpr int VEC = vec_width<T>();
    if (hd % VEC == 0 && aligned16(in) && aligned16(out)) {
        permute<SPLIT>(reinterpret_cast<const Pack<T> *>(in), reinterpret_cast<Pack<T> *>(out), B, T_, nh, hd / VEC);
        return;
    }
    permute<SPLIT>(in, out, B, T_, nh, hd);
}

}  // namespace heads

using namespace heads;

// ---------------------------------------------------------------------------------------------------------------
// Entry points: lockstep_heads_{split,merge}_<dtype>(in, out, B, T, nh, hd). The grid: grid_x(units, B) x
// grid_y(B) with units = T·nh·hd / vec_width<T>() when hd is a multiple of vec_width<T>(), else T·nh·hd (the
// element path; more blocks than that path needs are harmless, the loops stride).
// ---------------------------------------------------------------------------------------------------------------

#define LOCKSTEP_HEADS_KERNELS(T_, NAME_)                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        lockstep_heads_split_##NAME_(const T_ *in, T_ *out, int b, int t, int nh, int hd) {                       \
        move_heads<true, T_>(in, out, b, t, nh, hd);                                                               \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        lockstep_heads_merge_##NAME_(const T_ *in, T_ *out, int b, int t, int nh, int hd) {                       \
        move_heads<false, T_>(in, out, b, t, nh, hd);                                                              \
    }

LOCKSTEP_HEADS_KERNELS(float, f32)
LOCKSTEP_HEADS_KERNELS(bf16, bf16)
