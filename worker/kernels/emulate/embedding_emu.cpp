// Runs the embedding kernels of ../embedding.cu on the CPU through emu.h and checks them against a sequential
// reference, in f32 and bf16. No GPU needed:
//
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -I worker/kernels worker/kernels/emulate/embedding_emu.cpp \
//       -o /tmp/embedding_emu && /tmp/embedding_emu [--quick]
//
// The launches (grids, slices of the rank kernel, buffers and their initial contents) are made as embedding_cuda.rs
// makes them; the buffers the host leaves uninitialised start as garbage here, so an element a kernel forgets shows.
// Checked exactly, not to a tolerance:
//   * the forward: every in-range row bitwise the weight's row, every out-of-range row all NaN;
//   * the sort: cnt, start and order equal a host counting sort (positions increasing within an id);
//   * the gradient: bitwise the sequential f32 sum over the positions in increasing order, rounded once to the
//     dtype, and exactly 0 for ids that do not occur; out-of-range ids contribute nothing.
// Shapes: many repeats (V = 37, N = 300), V > N, one id everywhere, ids ≥ V, N across several rank tiles and
// slices (also with slices of several tiles, which the host picks only past N = 32768), C not a multiple of the
// threads or of a 16-byte pack and rows of more packs than a row's threads, V odd (a half-used last block of the
// sum kernel), misaligned inputs (the scalar paths), counts over several chunks of the scan. The kernels with
// barriers (rank, offsets) also run under the warp-by-warp schedules of emu.h. Every kernel launches 256 threads,
// as on the GPU, which also spares the emulator re-creating its fibers' stacks between launches. What it cannot
// check: speed, and how nvcc compiles the 16-byte packs (worker/tests/kernels_gpu/embedding.rs runs them on a GPU).
#define LOCKSTEP_EMULATE
#include "../embedding.cu"
#include "check.h"

#include <cstring>
#include <random>
#include <string>

namespace {

template <typename T> bool same_bits(T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

unsigned ceil_div(long a, long b) { return unsigned((a + b - 1) / b); }

const char *const SCHEDULES[] = {"lockstep", "warps first to last", "warps last to first"};

struct Case {
    const char *name;
    int n, v, c;
    // Every id the same; and how many positions (spread out) get an id ≥ V.
    bool constant;
    int out_of_range;
};

std::vector<uint32_t> make_ids(const Case &k, std::mt19937 &rng) {
    std::vector<uint32_t> ids(k.n);
    // A skewed draw, so that some ids repeat a lot and others not at all: min of two uniforms.
    std::uniform_int_distribution<int> u(0, k.v - 1);
    for (auto &id : ids) id = k.constant ? uint32_t(k.v / 2) : uint32_t(std::min(u(rng), u(rng)));
    for (int i = 0; i < k.out_of_range; ++i) {
        const size_t at = (size_t(i) * 7919 + 3) % k.n;
        ids[at] = i % 2 ? 0xffffffffu : uint32_t(k.v + i);
    }
    return ids;
}

// The host's counting sort: cnt per id, exclusive prefix start, positions grouped by id in increasing order.
struct Sorted {
    std::vector<int> cnt, start, order;
};

Sorted host_sort(const std::vector<uint32_t> &ids, int V) {
    Sorted s;
    s.cnt.assign(V, 0), s.start.assign(V, 0);
    for (uint32_t id : ids)
        if (id < uint32_t(V)) ++s.cnt[id];
    for (int v = 1; v < V; ++v) s.start[v] = s.start[v - 1] + s.cnt[v - 1];
    std::vector<int> next = s.start;
    s.order.assign(V ? s.start[V - 1] + s.cnt[V - 1] : 0, -1);
    for (int p = 0; p < int(ids.size()); ++p)
        if (ids[p] < uint32_t(V)) s.order[next[ids[p]]++] = p;
    return s;
}

// The backward's sort (kernels 1 to 4) as embedding_cuda.rs launches it, or with `slice_len` positions per rank
// slice when given (a multiple of RANK_TILE).
Sorted device_sort(const std::vector<uint32_t> &ids, int V, emu::Schedule schedule, int slice_len = 0) {
    const int N = int(ids.size());
    if (slice_len == 0) slice_len = rank_slice_len(N);
    const int slices = int(ceil_div(N, slice_len));
    const int garbage = 0x5a5a5a5a;
    std::vector<int> partial(size_t(2) * slices * N, garbage), rank_buf(N, garbage), order(N, garbage);
    Sorted s;
    s.cnt.assign(V, 0);  // alloc_zeros
    s.start.assign(V, garbage);
    emu::st().schedule = schedule;
    emu::launch(emu::Dim3{ceil_div(N, RANK_THREADS), unsigned(slices), 1}, RANK_THREADS, 0,
                [&] { rank(ids.data(), partial.data(), N, slice_len); });
    emu::st().schedule = emu::LOCKSTEP;
    emu::launch(emu::Dim3{ceil_div(N, POS_THREADS), 1, 1}, POS_THREADS, 0,
                [&] { count(ids.data(), partial.data(), rank_buf.data(), s.cnt.data(), N, V, slices); });
    emu::st().schedule = schedule;
    emu::launch(emu::Dim3{1, 1, 1}, SCAN_THREADS, 0, [&] { offsets(s.cnt.data(), s.start.data(), V); });
    emu::st().schedule = emu::LOCKSTEP;
    emu::launch(emu::Dim3{ceil_div(N, POS_THREADS), 1, 1}, POS_THREADS, 0,
                [&] { place(ids.data(), rank_buf.data(), s.start.data(), order.data(), N, V); });
    s.order = order;
    return s;
}

// The sort's results against the host's: cnt and start whole, order over the in-range positions (the rest of the
// buffer is never written or read).
void check_sort(const std::string &what, const Sorted &got, const Sorted &want) {
    bool ok = got.cnt == want.cnt && got.start == want.start;
    for (size_t i = 0; i < want.order.size(); ++i) ok = ok && got.order[i] == want.order[i];
    check(what + " cnt, start, order", ok);
}

// Values in T padded by `offset` elements in front (1: not 16-byte aligned).
template <typename T> std::vector<T> padded(const std::vector<float> &x, int offset) {
    std::vector<T> out(offset, from_f32<T>(0.f));
    for (T v : convert<T>(x)) out.push_back(v);
    return out;
}

template <typename T> void run(const Case &k, std::mt19937 &rng, int offset, bool schedules, int slice_len = 0) {
    const int N = k.n, V = k.v, C = k.c;
    const bool is_bf16 = sizeof(T) == 2;
    const auto ids = make_ids(k, rng);
    const auto wf = randn(rng, size_t(V) * C, 1.f, is_bf16), gf = randn(rng, size_t(N) * C, 1.f, is_bf16);
    const auto weight = padded<T>(wf, offset), grad = padded<T>(gf, offset);
    const std::string p = std::string(k.name) + " " + dtype_name<T>() + (offset ? " misaligned" : "") +
                          (slice_len ? " slices of " + std::to_string(slice_len) : "");
    std::printf("%s: N=%d V=%d C=%d\n", p.c_str(), N, V, C);

    // Forward: out starts as garbage (the host's uninitialised allocation).
    std::vector<T> out(size_t(N) * C + offset, from_f32<T>(12345.f));
    emu::st().schedule = emu::LOCKSTEP;
    emu::launch(emu::Dim3{ceil_div(N, FWD_ROWS), 1, 1}, FWD_THREADS, 0,
                [&] { gather<T>(weight.data() + offset, ids.data(), out.data() + offset, N, V, C); });
    bool fwd_ok = true;
    int nan_rows = 0;
    for (int q = 0; q < N; ++q) {
        const T *row = out.data() + offset + size_t(q) * C;
        if (ids[q] >= uint32_t(V)) {
            ++nan_rows;
            for (int c = 0; c < C; ++c) fwd_ok = fwd_ok && std::isnan(to_f32(row[c]));
        } else {
            const T *src = weight.data() + offset + size_t(ids[q]) * C;
            for (int c = 0; c < C; ++c) fwd_ok = fwd_ok && same_bits(row[c], src[c]);
        }
    }
    check(p + " forward rows exact (" + std::to_string(nan_rows) + " out-of-range rows NaN)", fwd_ok);

    // Backward: the reference sum in increasing p, in f32, rounded once.
    const Sorted want = host_sort(ids, V);
    std::vector<T> dw_ref(size_t(V) * C, from_f32<T>(0.f));
    for (int v = 0; v < V; ++v)
        for (int c = 0; c < C; ++c) {
            float s = 0.f;
            for (int i = 0; i < want.cnt[v]; ++i)
                s += to_f32(grad[offset + size_t(want.order[want.start[v] + i]) * C + c]);
            dw_ref[size_t(v) * C + c] = from_f32<T>(s);
        }
    const int runs = schedules ? 3 : 1;
    for (int s = 0; s < runs; ++s) {
        const auto schedule = emu::Schedule(s);
        const Sorted got = device_sort(ids, V, schedule, slice_len);
        check_sort(p + " " + SCHEDULES[s], got, want);
        std::vector<T> dw(size_t(V) * C + offset, from_f32<T>(quiet_nan()));  // uninitialised on the GPU
        emu::st().schedule = emu::LOCKSTEP;
        emu::launch(emu::Dim3{ceil_div(V, SUM_ROWS), 1, 1}, SUM_THREADS, 0, [&] {
            sum_rows<T>(grad.data() + offset, got.cnt.data(), got.start.data(), got.order.data(), dw.data() + offset,
                        V, C);
        });
        bool ok = true;
        size_t bad = 0;
        for (size_t i = 0; i < dw_ref.size(); ++i)
            if (!same_bits(dw[offset + i], dw_ref[i]) && ok) ok = false, bad = i;
        std::string detail = ok ? "" : " (first difference at row " + std::to_string(bad / C) + ", column " +
                                           std::to_string(bad % C) + ": " + std::to_string(to_f32(dw[offset + bad])) +
                                           " vs " + std::to_string(to_f32(dw_ref[bad])) + ")";
        check(p + " " + SCHEDULES[s] + " dW bitwise the sequential sum" + detail, ok);
    }
}

// The offsets kernel alone over counts of several scan chunks (V > SCAN_CHUNK), against a host prefix sum.
void run_offsets(std::mt19937 &rng, int V, emu::Schedule schedule) {
    std::uniform_int_distribution<int> u(0, 5);
    std::vector<int> cnt(V), start(V, 0x5a5a5a5a), want(V, 0);
    for (int &c : cnt) c = u(rng) < 3 ? 0 : u(rng);
    for (int v = 1; v < V; ++v) want[v] = want[v - 1] + cnt[v - 1];
    emu::st().schedule = schedule;
    emu::launch(emu::Dim3{1, 1, 1}, SCAN_THREADS, 0, [&] { offsets(cnt.data(), start.data(), V); });
    emu::st().schedule = emu::LOCKSTEP;
    check("offsets V=" + std::to_string(V) + " " + SCHEDULES[schedule] + ": the exclusive prefix sum", start == want);
}

// The host's slicing of the rank kernel: whole tiles, at most RANK_MAX_SLICES slices, every position in one.
void check_slicing() {
    bool ok = true;
    for (int n : {1, 2, 1023, 1024, 1025, 16384, 32768, 32769, 100000, 1 << 24}) {
        const int len = rank_slice_len(n), slices = rank_slices(n);
        ok = ok && len % RANK_TILE == 0 && slices <= RANK_MAX_SLICES && slices * len >= n && (slices - 1) * len < n;
    }
    ok = ok && rank_slices(16384) == 16 && rank_slice_len(16384) == RANK_TILE;
    check("rank slicing: whole tiles, at most 32 slices, every position in exactly one", ok);
}

}  // namespace

int main(int argc, char **argv) {
    std::mt19937 rng(2024);
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    check_slicing();
    const std::vector<Case> cases = {
        {"repeats", 300, 37, 20, false, 0},
        {"V > N", 50, 1000, 8, false, 0},
        {"one id", 700, 9, 33, true, 0},
        {"ids >= V", 257, 40, 136, false, 9},
        {"one row", 1, 3, 5, false, 0},
        {"wide rows", 40, 7, 1032, false, 2},
        {"tiles", 2503, 300, 12, false, 3},
    };
    for (const Case &k : cases) {
        const bool schedules = !quick || k.n <= 300;
        run<float>(k, rng, 0, schedules);
        run<bf16>(k, rng, 0, schedules);
        run<float>(k, rng, 1, false);
        if (!quick) run<bf16>(k, rng, 1, false);
    }
    // Slices of several tiles (the host's choice only past N = 32768, too slow here): 2 slices, 2 tiles + 1 tile.
    run<float>(Case{"multi-tile slices", 2503, 300, 12, false, 3}, rng, 0, !quick, 2 * RANK_TILE);
    run_offsets(rng, 9000, emu::LOCKSTEP);
    if (!quick)
        for (int s = 1; s < 3; ++s) run_offsets(rng, 2 * SCAN_CHUNK + 1, emu::Schedule(s));
    std::printf("%d checks\n", checks);
    return finish();
}
