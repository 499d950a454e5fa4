// Runs the LayerNorm kernels of ../layer_norm.cu on the CPU through emu.h and compares them with a float64
// reference, for every instantiated register width and the loop (`any`) kernels, f32 and bf16, over awkward
// shapes (C = 1, C not a multiple of 32, rows not a multiple of the 4 rows per block, several blocks, a partial
// last block). No GPU needed:
//
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -I worker/kernels \
//       worker/kernels/emulate/layer_norm_emu.cpp -o /tmp/layer_norm_emu && /tmp/layer_norm_emu [--quick]
//
// The launches (kernel choice, grid, rows per block, scratch size) are made exactly as layer_norm_cuda.rs makes
// them; each case runs both the kernel the host would pick and the `any` fallback. The backward also runs under
// the emulator's warp-by-warp schedules, since its blocks share a reduction buffer across warps.
#define LOCKSTEP_EMULATE
#include "../layer_norm.cu"
#include "check.h"

#include <random>
#include <string>

namespace {

struct Case {
    int rows, c;
};

struct Reference {
    std::vector<double> y, mean, rstd, dx, dw, db;
};

Reference reference(const Case &k, const std::vector<float> &x, const std::vector<float> &w,
                    const std::vector<float> &b, const std::vector<float> &dy, double eps) {
    const int C = k.c;
    Reference r;
    r.y.assign(size_t(k.rows) * C, 0), r.dx = r.y;
    r.mean.assign(k.rows, 0), r.rstd.assign(k.rows, 0);
    r.dw.assign(C, 0), r.db.assign(C, 0);
    std::vector<double> xh(C), g(C);
    for (int row = 0; row < k.rows; ++row) {
        const size_t o = size_t(row) * C;
        double mean = 0, var = 0;
        for (int c = 0; c < C; ++c) mean += x[o + c];
        mean /= C;
        for (int c = 0; c < C; ++c) var += (x[o + c] - mean) * (x[o + c] - mean);
        var /= C;
        const double rstd = 1 / std::sqrt(var + eps);
        r.mean[row] = mean, r.rstd[row] = rstd;
        double mg = 0, mgx = 0;
        for (int c = 0; c < C; ++c) {
            xh[c] = (x[o + c] - mean) * rstd;
            r.y[o + c] = xh[c] * w[c] + b[c];
            g[c] = double(dy[o + c]) * w[c];
            mg += g[c], mgx += g[c] * xh[c];
            r.dw[c] += dy[o + c] * xh[c];
            r.db[c] += dy[o + c];
        }
        mg /= C, mgx /= C;
        for (int c = 0; c < C; ++c) r.dx[o + c] = rstd * (g[c] - mg - xh[c] * mgx);
    }
    return r;
}

// layer_norm_cuda.rs's choices: the register widths instantiated, the rows per backward block, the partial rows.
const int FWD_REGS[] = {1, 2, 4, 8, 12, 16, 24, 32, 48, 64};
const int BWD_REGS[] = {1, 2, 4, 8, 12, 16, 24, 32};
constexpr int BWD_MIN_ROWS_PER_BLOCK = 32;
constexpr int BWD_MAX_BLOCKS = 1024;

template <size_t K> int pick(const int (&widths)[K], int c) {
    for (int n : widths)
        if (32 * n >= c) return n;
    return 0;  // the loop kernel
}

int rows_per_block(int rows) {
    const int spread = (rows + BWD_MAX_BLOCKS - 1) / BWD_MAX_BLOCKS;
    return std::max(BWD_MIN_ROWS_PER_BLOCK, (spread + WARPS - 1) / WARPS * WARPS);
}

unsigned ceil_div(long a, long b) { return unsigned((a + b - 1) / b); }

template <typename T>
using FwdFn = void (*)(const T *, const float *, const float *, T *, float *, float *, int, int, float);
template <typename T>
using BwdFn = void (*)(const T *, const T *, const float *, const float *, const float *, T *, float *, int, int, int);

template <typename T> FwdFn<T> fwd_kernel(int n) {
    switch (n) {
    case 0: return fwd_any<T>;
    case 1: return fwd_regs<1, T>;
    case 2: return fwd_regs<2, T>;
    case 4: return fwd_regs<4, T>;
    case 8: return fwd_regs<8, T>;
    case 12: return fwd_regs<12, T>;
    case 16: return fwd_regs<16, T>;
    case 24: return fwd_regs<24, T>;
    case 32: return fwd_regs<32, T>;
    case 48: return fwd_regs<48, T>;
    case 64: return fwd_regs<64, T>;
    }
    emu::die("no such forward width");
}

template <typename T> BwdFn<T> bwd_kernel(int n) {
    switch (n) {
    case 0: return bwd_any<T>;
    case 1: return bwd_regs<1, T>;
    case 2: return bwd_regs<2, T>;
    case 4: return bwd_regs<4, T>;
    case 8: return bwd_regs<8, T>;
    case 12: return bwd_regs<12, T>;
    case 16: return bwd_regs<16, T>;
    case 24: return bwd_regs<24, T>;
    case 32: return bwd_regs<32, T>;
    }
    emu::die("no such backward width");
}

const char *const SCHEDULES[] = {"lockstep", "warps first to last", "warps last to first"};

// One forward and backward with register widths (fwd_n, bwd_n) (0 = the loop kernels), launched as the host does
// (but with `rpb` rows per backward block when given: the host's choice exceeds 32 only past 32768 rows, too many
// for the emulator under the sanitizers).
template <typename T>
void run(const Case &k, int fwd_n, int bwd_n, emu::Schedule schedule, std::mt19937 &rng, const char *dtype,
         int rpb = 0) {
    const bool is_bf16 = sizeof(T) == 2;
    const int rows = k.rows, C = k.c;
    const size_t n = size_t(rows) * C;
    const double eps = 1e-5;
    // A non-zero mean and a spread, as a residual stream has.
    auto xf = randn(rng, n, 0.7f, 1.5f, is_bf16), dyf = randn(rng, n, 0.f, 1.f, is_bf16);
    auto w = randn(rng, C, 1.f, 0.3f, false), b = randn(rng, C, 0.f, 0.2f, false);
    const Reference ref = reference(k, xf, w, b, dyf, eps);
    auto x = convert<T>(xf), dy = convert<T>(dyf);
    std::vector<T> y(n), dx(n);
    std::vector<float> mean(rows, NAN), rstd(rows, NAN), dw(C, NAN), db(C, NAN);

    emu::st().schedule = emu::LOCKSTEP;
    emu::launch(emu::Dim3{ceil_div(rows, WARPS), 1, 1}, THREADS, 0, [&] {
        fwd_kernel<T>(fwd_n)(x.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data(), rows, C, float(eps));
    });

    emu::st().schedule = schedule;
    if (rpb == 0) rpb = rows_per_block(rows);
    const unsigned blocks = ceil_div(rows, rpb);
    const int partial_rows = bwd_n ? int(blocks) : int(blocks) * WARPS;
    std::vector<float> partial(size_t(partial_rows) * 2 * C, NAN);  // NaN: an element left unwritten shows
    emu::launch(emu::Dim3{blocks, 1, 1}, THREADS, 0, [&] {
        bwd_kernel<T>(bwd_n)(x.data(), dy.data(), w.data(), mean.data(), rstd.data(), dx.data(), partial.data(),
                             rows, C, rpb);
    });
    emu::launch(emu::Dim3{ceil_div(2L * C, 32), 1, 1}, REDUCE_THREADS, 0,
                [&] { bwd_reduce(partial.data(), dw.data(), db.data(), partial_rows, C); });

    // y and dx are rounded to bf16 once at the end (2^-9 of the element). In f32 they carry the cancellation in
    // x − mean and in g − mean(g) − x̂·mean(g·x̂), which a row of a few close values (C = 3, 1/std ~ 200) blows up
    // to ~3e-5 of the largest element: inherent to f32, the CPU kernel's too. The statistics, dw and db are f32 sums.
    const double tol = is_bf16 ? 1e-2 : 1e-4;
    const std::string p = std::string(dtype) + " n" + std::to_string(fwd_n) + "/" + std::to_string(bwd_n) + " ";
    std::printf("rows=%d C=%d %s (fwd n=%d, bwd n=%d, %u backward blocks of %d rows), %s\n", rows, C, dtype, fwd_n,
                bwd_n, blocks, rpb, SCHEDULES[schedule]);
    compare(p + "y", widen(y), ref.y, tol);
    compare(p + "mean", mean, ref.mean, 1e-5);
    compare(p + "rstd", rstd, ref.rstd, 1e-5);
    compare(p + "dx", widen(dx), ref.dx, tol);
    compare(p + "dw", dw, ref.dw, 2e-5);
    compare(p + "db", db, ref.db, 2e-5);
}

template <typename T> void run_case(const Case &k, std::mt19937 &rng, const char *dtype, bool schedules) {
    const int fwd_n = pick(FWD_REGS, k.c), bwd_n = pick(BWD_REGS, k.c);
    run<T>(k, fwd_n, bwd_n, emu::LOCKSTEP, rng, dtype);
    if (k.rows > 64) run<T>(k, fwd_n, bwd_n, emu::LOCKSTEP, rng, dtype, 45);  // odd, and not a multiple of 4 warps
    if (schedules && bwd_n)
        for (int s = 1; s < 3; ++s) run<T>(k, fwd_n, bwd_n, emu::Schedule(s), rng, dtype);
    if (fwd_n || bwd_n) run<T>(k, 0, 0, emu::LOCKSTEP, rng, dtype);  // the loop kernels on the same shape
}

}  // namespace

int main(int argc, char **argv) {
    std::mt19937 rng(1234);
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    std::vector<Case> cases = {{1, 1}, {3, 33}, {5, 100}, {70, 768}, {9, 2100}};
    if (!quick) {
        // Every register width, the edges of the widths, and enough rows for several backward blocks.
        for (Case k : std::vector<Case>{{2, 31}, {7, 32}, {4, 64}, {6, 65}, {3, 128}, {5, 200}, {6, 384},
                                        {4, 500}, {3, 1024}, {2, 1025}, {3, 1536}, {2, 1600}, {2, 2048}, {1, 2049},
                                        {133, 96}, {257, 40}, {1500, 3}})
            cases.push_back(k);
    }
    for (const Case &k : cases) {
        run_case<float>(k, rng, "f32", true);
        run_case<bf16>(k, rng, "bf16", !quick);
    }
    return finish();
}
