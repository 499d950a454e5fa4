// A host emulation of the GPU primitives in prims.cuh, for running the attention kernels on a CPU:
// every CUDA thread of a block is a fiber (ucontext) on one OS thread, and the blocks of a grid run one after
// another. Block and warp synchronisation are scheduler barriers; warp-collective operations (shuffles, ldmatrix,
// mma) exchange their operands through per-warp scratch between two warp barriers, implementing the fragment
// layouts as the PTX ISA documents them. Checks along the way, each fatal with a message:
//   * a warp-collective op reached by only part of a warp, or a __syncthreads not reached by every thread (the
//     scheduler finds no runnable thread: a deadlock);
//   * ldmatrix / cp.async addresses that are misaligned or outside the block's dynamic shared memory;
//   * reads of shared memory that a cp.async has not delivered yet: cp.async poisons its destination with NaN
//     bytes when issued, and its data lands only at the first __syncthreads after the cp.async.wait_group that
//     covers it (stricter than the hardware, where the issuing thread sees its own copies at the wait; these
//     kernels never rely on that). Dynamic shared memory starts every block as NaN bytes.
//   * races between warps, with the schedules of `Schedule`: besides all threads in lockstep, each warp in turn
//     runs on alone to its next __syncthreads, first to last or last to first, so that a warp that overwrites a
//     buffer another still reads (or reads one before it is written) meets poison or stale data.
// Not emulated: timing, bank conflicts, register pressure, memory-model subtleties beyond the above.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define DEV inline
#define HD
#define __global__
#define __launch_bounds__(n)
#define __restrict__
// One block runs at a time and all its fibers see a function's statics: exactly shared memory.
#define __shared__ static

using std::max;
using std::min;

struct bf16 {
    uint16_t bits;
};

inline float bf16_bits_to_f32(uint16_t b) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, as __float2bfloat16_rn.
inline uint16_t f32_to_bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) { return bf16_bits_to_f32(x.bits); }
template <typename T> T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
template <> inline bf16 from_f32<bf16>(float x) { return bf16{f32_to_bf16_bits(x)}; }
inline uint32_t pack_bf16x2(float lo, float hi) {
    return uint32_t(f32_to_bf16_bits(lo)) | (uint32_t(f32_to_bf16_bits(hi)) << 16);
}

namespace emu {

[[noreturn]] inline void die(const char *what) {
    std::fprintf(stderr, "emulator: %s\n", what);
    std::abort();
}

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};

enum Wait { RUNNABLE, AT_BLOCK, AT_WARP, DONE };

struct Copy {
    unsigned char *dst;
    unsigned char data[16];
};

struct Fiber {
    Dim3 tid;
    ucontext_t ctx;
    std::vector<char> stack;
    Wait wait = RUNNABLE;
    std::vector<std::vector<Copy>> committed;  // cp.async groups in flight, oldest first
    std::vector<Copy> open;                    // issued, not yet committed
    std::vector<Copy> landed;                  // waited for: written at the next __syncthreads
};

struct WarpScratch {
    const void *ptr[32];
    uint32_t a[32][4];
    uint32_t b[32][2];
    float v[32];
};

// How the fibers of a block take turns between barriers.
enum Schedule { LOCKSTEP, WARPS_FIRST_TO_LAST, WARPS_LAST_TO_FIRST };

struct State {
    Schedule schedule = LOCKSTEP;
    Dim3 block, grid;
    std::vector<Fiber> fibers;
    std::vector<WarpScratch> warps;
    Fiber *cur = nullptr;
    ucontext_t sched;
    std::vector<unsigned char> smem;  // the block's dynamic shared memory, exactly as large as the launch asked
    const std::function<void()> *body = nullptr;
};

inline State &st() {
    static State s;
    return s;
}
inline Fiber &current() { return *st().cur; }
inline int tid_linear() { return int(current().tid.x); }

inline void yield(Wait w) {
    State &s = st();
    s.cur->wait = w;
    swapcontext(&s.cur->ctx, &s.sched);
}

inline void fiber_entry() {
    (*st().body)();
    State &s = st();
    // Empty groups (committed so that wait_group counts stay uniform) may be left; real copies may not.
    bool in_flight = !s.cur->open.empty() || !s.cur->landed.empty();
    for (const auto &group : s.cur->committed) in_flight = in_flight || !group.empty();
    if (in_flight) die("a thread exited with cp.async copies still in flight");
    s.cur->wait = DONE;
    swapcontext(&s.cur->ctx, &s.sched);
}

inline void resume(Fiber &f) {
    State &s = st();
    s.cur = &f;
    swapcontext(&s.sched, &f.ctx);
    s.cur = nullptr;
}

// Runs warp `w` until each of its threads is done or at __syncthreads (warp barriers released as they fill).
inline void run_warp_alone(int w) {
    State &s = st();
    for (;;) {
        for (int l = 0; l < 32; ++l)
            if (s.fibers[w * 32 + l].wait == RUNNABLE) resume(s.fibers[w * 32 + l]);
        int at_warp = 0;
        for (int l = 0; l < 32; ++l) at_warp += s.fibers[w * 32 + l].wait == AT_WARP;
        if (at_warp == 0) return;
        if (at_warp < 32) return;  // part of the warp at a warp op: the caller reports the deadlock
        for (int l = 0; l < 32; ++l) s.fibers[w * 32 + l].wait = RUNNABLE;
    }
}

inline void run_block(int threads, unsigned bx, unsigned by) {
    State &s = st();
    const int warps = threads / 32;
    for (;;) {
        if (s.schedule == LOCKSTEP) {
            for (Fiber &f : s.fibers)
                if (f.wait == RUNNABLE) resume(f);
        } else {
            for (int i = 0; i < warps; ++i) run_warp_alone(s.schedule == WARPS_FIRST_TO_LAST ? i : warps - 1 - i);
        }
        int done = 0, at_block = 0;
        for (Fiber &f : s.fibers) done += f.wait == DONE, at_block += f.wait == AT_BLOCK;
        if (done == threads) return;
        bool released = false;
        for (int w = 0; w < warps; ++w) {
            bool all = true;
            for (int l = 0; l < 32; ++l) all = all && s.fibers[w * 32 + l].wait == AT_WARP;
            if (all) {
                for (int l = 0; l < 32; ++l) s.fibers[w * 32 + l].wait = RUNNABLE;
                released = true;
            }
        }
        if (released) continue;
        if (at_block == threads) {
            for (Fiber &f : s.fibers) {
                for (const Copy &c : f.landed) std::memcpy(c.dst, c.data, 16);
                f.landed.clear();
                f.wait = RUNNABLE;
            }
            continue;
        }
        std::fprintf(stderr, "block (%u, %u): %d threads done, %d at __syncthreads, the rest at a warp op\n", bx,
                     by, done, at_block);
        die("deadlock: a barrier or warp-collective op that not every thread reaches");
    }
}

// Runs `body` as every thread of every block of `grid` (x, y), `threads` threads per block (a multiple of 32).
inline void launch(Dim3 grid, int threads, size_t dynamic_smem, const std::function<void()> &body) {
    State &s = st();
    if (threads % 32) die("block size must be whole warps");
    s.grid = grid;
    s.body = &body;
    s.fibers.resize(threads);
    s.warps.resize(threads / 32);
    s.smem.assign(dynamic_smem, 0xff);
    for (Fiber &f : s.fibers)
        if (f.stack.empty()) f.stack.resize(1 << 20);
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            s.block = Dim3{bx, by, 0};
            std::fill(s.smem.begin(), s.smem.end(), 0xff);
            for (int t = 0; t < threads; ++t) {
                Fiber &f = s.fibers[t];
                f.tid = Dim3{unsigned(t), 0, 0};
                f.wait = RUNNABLE;
                f.committed.clear();
                f.open.clear();
                f.landed.clear();
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = f.stack.data();
                f.ctx.uc_stack.ss_size = f.stack.size();
                f.ctx.uc_link = nullptr;
                makecontext(&f.ctx, fiber_entry, 0);
            }
            run_block(threads, bx, by);
        }
    }
    s.body = nullptr;
}

inline WarpScratch &scratch() { return st().warps[tid_linear() / 32]; }
inline int lane() { return tid_linear() % 32; }

inline void check_smem(const void *p, size_t bytes, size_t align, const char *what) {
    State &s = st();
    auto a = reinterpret_cast<uintptr_t>(p), lo = reinterpret_cast<uintptr_t>(s.smem.data());
    if (a % align) die(what);
    if (a < lo || a + bytes > lo + s.smem.size()) die(what);
}

}  // namespace emu

#define threadIdx (emu::current().tid)
#define blockIdx (emu::st().block)
#define gridDim (emu::st().grid)

inline float shfl_xor(float v, int lane_mask) {
    emu::WarpScratch &w = emu::scratch();
    const int l = emu::lane();
    w.v[l] = v;
    emu::yield(emu::AT_WARP);
    const float r = w.v[l ^ lane_mask];
    emu::yield(emu::AT_WARP);
    return r;
}

inline void block_sync() { emu::yield(emu::AT_BLOCK); }

#define blockDim (emu::Dim3{unsigned(emu::st().fibers.size()), 1, 1})
// Device math the host lacks.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::isfinite;

inline unsigned char *dynamic_smem() { return emu::st().smem.data(); }
inline uint32_t dynamic_smem_size() { return uint32_t(emu::st().smem.size()); }
inline void fail_launch() { emu::die("the launch gave less dynamic shared memory than the kernel needs"); }

namespace emu {
inline uint16_t smem_b16(const void *row, int col) {
    uint16_t x;
    std::memcpy(&x, static_cast<const unsigned char *>(row) + 2 * col, 2);
    return x;
}

inline void ldmatrix(uint32_t (&r)[4], const bf16 *row, bool trans) {
    WarpScratch &w = scratch();
    const int l = lane();
    check_smem(row, 16, 16, "ldmatrix: row address misaligned or outside shared memory");
    w.ptr[l] = row;
    yield(AT_WARP);
    for (int i = 0; i < 4; ++i) {
        const void *const *rows = &w.ptr[8 * i];
        uint16_t lo, hi;
        if (!trans) {
            lo = smem_b16(rows[l / 4], 2 * (l % 4));
            hi = smem_b16(rows[l / 4], 2 * (l % 4) + 1);
        } else {
            lo = smem_b16(rows[2 * (l % 4)], l / 4);
            hi = smem_b16(rows[2 * (l % 4) + 1], l / 4);
        }
        r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    yield(AT_WARP);
}

inline float half_of(uint32_t reg, int which) { return bf16_bits_to_f32(uint16_t(which ? reg >> 16 : reg)); }
}  // namespace emu

inline void ldmatrix_x4(uint32_t (&r)[4], const bf16 *row) { emu::ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16 *row) { emu::ldmatrix(r, row, true); }

inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu::WarpScratch &w = emu::scratch();
    const int l = emu::lane();
    for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
    w.b[l][0] = b0, w.b[l][1] = b1;
    emu::yield(emu::AT_WARP);
    // A(r, k) lives in lane (r%8)*4 + (k%8)/2, register r/8 + 2*(k/8), half k%2;
    // B(k, n) lives in lane n*4 + (k%8)/2, register k/8, half k%2.
    auto A = [&](int r, int k) { return emu::half_of(w.a[(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)], k % 2); };
    auto B = [&](int k, int n) { return emu::half_of(w.b[n * 4 + (k % 8) / 2][k / 8], k % 2); };
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
        const int r = g + 8 * (e / 2), n = 2 * t + (e % 2);
        float acc = d[e];
        for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
        d[e] = acc;
    }
    emu::yield(emu::AT_WARP);
}

inline void cp_async_16(void *smem, const void *gmem, bool valid) {
    emu::check_smem(smem, 16, 16, "cp.async: destination misaligned or outside shared memory");
    if (reinterpret_cast<uintptr_t>(gmem) % 16) emu::die("cp.async: source not 16-byte aligned");
    emu::Copy c;
    c.dst = static_cast<unsigned char *>(smem);
    if (valid)
        std::memcpy(c.data, gmem, 16);
    else
        std::memset(c.data, 0, 16);
    std::memset(c.dst, 0xff, 16);  // NaN until waited for
    emu::current().open.push_back(c);
}

inline void cp_async_commit() {
    emu::Fiber &f = emu::current();
    f.committed.push_back(std::move(f.open));
    f.open.clear();
}

template <int N> inline void cp_async_wait() {
    emu::Fiber &f = emu::current();
    while (f.committed.size() > size_t(N)) {
        for (const emu::Copy &c : f.committed.front()) f.landed.push_back(c);
        f.committed.erase(f.committed.begin());
    }
}
