// Runs the GELU, bias and fused bias+GELU kernels of ../elementwise.cu on the CPU through emu.h and compares them
// with a float64 reference, in f32 and bf16, over awkward sizes. No GPU needed:
//
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -I worker/kernels worker/kernels/emulate/elementwise_emu.cpp
//       -o /tmp/elementwise_emu && /tmp/elementwise_emu
//
// Each kernel runs with the grid elementwise_cuda.rs gives it; the elementwise ones also with a grid of one and
// two blocks (so that every thread walks the grid-stride loop) and on inputs that start one element past a 16-byte
// boundary (the scalar path). The bias gradient runs on shapes of one and several row chunks, under the three warp
// schedules of emu.h, and must give bitwise the same result under each. What it cannot check: speed, and how nvcc compiles the 16-byte packs
// (the GPU tests in worker/tests/kernels_gpu/elementwise.rs cover that).
#define LOCKSTEP_EMULATE
#include "../elementwise.cu"
#include "check.h"

#include <cstring>
#include <random>
#include <string>

namespace {

double gelu_ref(double x) {
    const double k = std::sqrt(2.0 / M_PI);
    return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}

double gelu_grad_ref(double x) {
    const double k = std::sqrt(2.0 / M_PI);
    const double t = std::tanh(k * (x + 0.044715 * x * x * x));
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x);
}

template <typename T> double tolerance() { return sizeof(T) == 4 ? 1e-5 : 1e-2; }

// The grids to run an elementwise kernel over n elements with: the one elementwise_cuda.rs uses, and (where it
// differs) one and two blocks, whose threads loop.
template <typename T> std::vector<unsigned> elementwise_grids(int n) {
    std::vector<unsigned> grids{unsigned(elementwise_blocks(n, vec_width<T>()))};
    for (unsigned g : {1u, 2u})
        if (g < grids[0]) grids.push_back(g);
    return grids;
}

// The GELU kernels over n elements; `offset` elements of padding before the data (1: not 16-byte aligned).
template <typename T> void run_gelu(std::mt19937 &rng, int n, int offset) {
    const bool is_bf16 = sizeof(T) == 2;
    auto xf = randn(rng, n, 3.f, is_bf16), gf = randn(rng, n, 1.f, is_bf16);
    // The tails: large negative inputs go to 0 (the capped exponent), large positive ones to x.
    const float tails[] = {-30.f, 30.f, -12.f, 12.f, -6.f, 6.f, 0.f};
    for (int i = 0; i < n && i < 7; ++i) xf[size_t(i) * 131 % n] = tails[i];
    std::vector<double> y_ref(n), dx_ref(n);
    for (int i = 0; i < n; ++i) y_ref[i] = gelu_ref(xf[i]), dx_ref[i] = gelu_grad_ref(xf[i]) * gf[i];
    std::vector<T> x(offset), g(offset);
    for (T v : convert<T>(xf)) x.push_back(v);
    for (T v : convert<T>(gf)) g.push_back(v);
    for (unsigned grid : elementwise_grids<T>(n)) {
        std::vector<T> y(n + offset), dx(n + offset);
        emu::launch(emu::Dim3{grid, 1, 1}, THREADS, 0, [&] { gelu_fwd<T>(x.data() + offset, y.data() + offset, n); });
        emu::launch(emu::Dim3{grid, 1, 1}, THREADS, 0,
                    [&] { gelu_bwd<T>(x.data() + offset, g.data() + offset, dx.data() + offset, n); });
        const std::string what = std::string("gelu ") + dtype_name<T>() + " n=" + std::to_string(n) +
                                 " offset=" + std::to_string(offset) + " grid=" + std::to_string(grid);
        compare(what + " y", widen(y.data() + offset, n), y_ref, tolerance<T>());
        compare(what + " dx", widen(dx.data() + offset, n), dx_ref, tolerance<T>());
    }
}

// The bias kernels over x [rows, c]: the forward (at an offset, as run_gelu) and the gradient.
template <typename T> void run_bias(std::mt19937 &rng, int rows, int c, int offset) {
    const bool is_bf16 = sizeof(T) == 2;
    const int n = rows * c;
    auto xf = randn(rng, n, 1.f, is_bf16), bf = randn(rng, c, 1.f, is_bf16), gf = randn(rng, n, 1.f, is_bf16);
    std::vector<double> y_ref(n), db_ref(c, 0.0);
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < c; ++j) {
            y_ref[size_t(r) * c + j] = double(xf[size_t(r) * c + j]) + bf[j];
            db_ref[j] += gf[size_t(r) * c + j];
        }
    std::vector<T> x(offset), b(offset), g = convert<T>(gf);
    for (T v : convert<T>(xf)) x.push_back(v);
    for (T v : convert<T>(bf)) b.push_back(v);
    const std::string shape = std::string(dtype_name<T>()) + " " + std::to_string(rows) + "x" + std::to_string(c);
    for (unsigned grid : elementwise_grids<T>(n)) {
        std::vector<T> y(n + offset);
        emu::launch(emu::Dim3{grid, 1, 1}, THREADS, 0,
                    [&] { bias_fwd<T>(x.data() + offset, b.data() + offset, y.data() + offset, n, c); });
        compare("bias " + shape + " offset=" + std::to_string(offset) + " grid=" + std::to_string(grid) + " y",
                widen(y.data() + offset, n), y_ref, tolerance<T>());
    }
    if (offset) return;
    const int chunk = bias_grad_chunk_rows(rows, c), chunks = bias_grad_chunks(rows, c);
    // Under each schedule (the partial kernel's warps meet in shared memory): lockstep, then each warp alone to the
    // barrier, first to last and last to first.
    std::vector<std::vector<T>> runs;
    for (int schedule = 0; schedule < 3; ++schedule) {
        emu::st().schedule = emu::Schedule(schedule);
        std::vector<float> partial(size_t(chunks) * c, NAN);
        std::vector<T> db(c);
        const unsigned col_blocks = unsigned((c + GRAD_COLS - 1) / GRAD_COLS);
        emu::launch(emu::Dim3{col_blocks, unsigned(chunks), 1}, THREADS, 0,
                    [&] { bias_grad_partial<T>(g.data(), partial.data(), rows, c, chunk); });
        emu::launch(emu::Dim3{unsigned((c + THREADS - 1) / THREADS), 1, 1}, THREADS, 0,
                    [&] { bias_grad_final<T>(partial.data(), db.data(), chunks, c); });
        runs.push_back(db);
    }
    emu::st().schedule = emu::LOCKSTEP;
    compare("bias " + shape + " db (" + std::to_string(chunks) + " chunks of " + std::to_string(chunk) + ")",
            widen(runs[0].data(), c), db_ref, tolerance<T>());
    bool same = true;
    for (const auto &run : runs) same = same && std::memcmp(runs[0].data(), run.data(), sizeof(T) * c) == 0;
    check("bias " + shape + " db bitwise the same under all three warp schedules", same);
}

template <typename T> bool same_bits(const T *a, const T *b, int n) { return std::memcmp(a, b, sizeof(T) * n) == 0; }

// The fused bias+GELU kernels over x [rows, c] (at an offset, as run_gelu): bitwise what bias_fwd then gelu_fwd
// (and gelu_bwd on the stored sum) give, and within the tolerance of the float64 gelu(x + b) and its gradient.
template <typename T> void run_bias_gelu(std::mt19937 &rng, int rows, int c, int offset) {
    const bool is_bf16 = sizeof(T) == 2;
    const int n = rows * c;
    auto xf = randn(rng, n, 2.f, is_bf16), bf = randn(rng, c, 1.f, is_bf16), gf = randn(rng, n, 1.f, is_bf16);
    std::vector<T> x(offset), b(offset), g(offset);
    for (T v : convert<T>(xf)) x.push_back(v);
    for (T v : convert<T>(bf)) b.push_back(v);
    for (T v : convert<T>(gf)) g.push_back(v);
    const T *xp = x.data() + offset, *bp = b.data() + offset, *gp = g.data() + offset;
    std::vector<double> y_ref(n), dx_ref(n);
    for (int i = 0; i < n; ++i) {
        const double h = to_f32(from_f32<T>(to_f32(xp[i]) + to_f32(bp[i % c])));  // the sum as the bias add stores it
        y_ref[i] = gelu_ref(h), dx_ref[i] = gelu_grad_ref(h) * double(to_f32(gp[i]));
    }
    const std::string shape = std::string(dtype_name<T>()) + " " + std::to_string(rows) + "x" + std::to_string(c) +
                              " offset=" + std::to_string(offset);
    for (unsigned grid : elementwise_grids<T>(n)) {
        const emu::Dim3 dims{grid, 1, 1};
        std::vector<T> h(n + offset), y_unfused(n + offset), dx_unfused(n + offset), y(n + offset), dx(n + offset);
        T *hp = h.data() + offset;
        emu::launch(dims, THREADS, 0, [&] { bias_fwd<T>(xp, bp, hp, n, c); });
        emu::launch(dims, THREADS, 0, [&] { gelu_fwd<T>(hp, y_unfused.data() + offset, n); });
        emu::launch(dims, THREADS, 0, [&] { gelu_bwd<T>(hp, gp, dx_unfused.data() + offset, n); });
        emu::launch(dims, THREADS, 0, [&] { bias_gelu_fwd<T>(xp, bp, y.data() + offset, n, c); });
        emu::launch(dims, THREADS, 0, [&] { bias_gelu_bwd<T>(xp, bp, gp, dx.data() + offset, n, c); });
        const std::string what = "bias+gelu " + shape + " grid=" + std::to_string(grid);
        compare(what + " y", widen(y.data() + offset, n), y_ref, tolerance<T>());
        compare(what + " dx", widen(dx.data() + offset, n), dx_ref, tolerance<T>());
        check(what + ": y and dx bitwise bias-add then GELU's",
              same_bits(y.data() + offset, y_unfused.data() + offset, n) &&
                  same_bits(dx.data() + offset, dx_unfused.data() + offset, n));
    }
}

template <typename T> void run_all(std::mt19937 &rng, bool quick) {
    std::printf("%s\n", dtype_name<T>());
    const std::vector<int> sizes = quick ? std::vector<int>{1, 7, 33, 1000, 4099} : std::vector<int>{1, 7, 33, 1000, 4099, 70001};
    for (int n : sizes)
        for (int offset : {0, 1}) run_gelu<T>(rng, n, offset);
    struct Shape {
        int rows, c;
    };
    std::vector<Shape> shapes{{1, 1}, {5, 33}, {70, 768}, {129, 100}, {600, 40}};
    if (!quick) shapes.insert(shapes.end(), {{1100, 33}, {2000, 24}, {300, 2304}});
    for (const Shape &s : shapes)
        for (int offset : {0, 1}) run_bias<T>(rng, s.rows, s.c, offset);
    for (const Shape &s : shapes)
        for (int offset : {0, 1}) run_bias_gelu<T>(rng, s.rows, s.c, offset);
}

}  // namespace

int main(int argc, char **argv) {
    std::mt19937 rng(1234);
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    run_all<float>(rng, quick);
    run_all<bf16>(rng, quick);
    return finish();
}
