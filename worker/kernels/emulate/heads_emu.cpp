// Runs the head split and merge kernels of ../heads.cu on the CPU through emu.h and checks them bitwise against a
// host permutation, in f32 and bf16. No GPU needed:
//
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -I worker/kernels worker/kernels/emulate/heads_emu.cpp \
//       -o /tmp/heads_emu && /tmp/heads_emu [--quick]
//
// The launches use the grid heads_cuda.rs computes (grid_x, grid_y), and also deliberately small grids, so that both
// grid-stride loops (over the batch in y, over a batch element's units in x) take several turns. Outputs start as a
// garbage pattern, so an element the kernel forgets shows. Checked exactly:
//   * split: out[b, h, t, :] = x[b, t, h·hd ..], every element bitwise;
//   * merge: the inverse, bitwise;
//   * merge of split: the input again.
// Shapes: GPT-2's hd = 64 (the pack path), hd = 15 (the element path), hd a pack but not a multiple of 32, one head,
// one position, B·T·nh not a multiple of the block; and misaligned inputs or outputs (a view that starts one element
// in: the element path with a pack-sized hd). What it cannot check: speed, and how nvcc compiles the 16-byte packs
// (worker/tests/kernels_gpu/heads.rs runs them on a GPU).
#define LOCKSTEP_EMULATE
#include "../heads.cu"
#include "check.h"

#include <cstring>
#include <string>

namespace {

template <typename T> bool same_bits(const T *a, const T *b, size_t n) { return std::memcmp(a, b, n * sizeof(T)) == 0; }

struct Shape {
    const char *name;
    int B, T, nh, hd;
};

// The host's split of x [B, T, nh·hd] into [B, nh, T, hd].
template <typename T> std::vector<T> host_split(const std::vector<T> &x, const Shape &s) {
    std::vector<T> out(x.size());
    for (int b = 0; b < s.B; ++b)
        for (int t = 0; t < s.T; ++t)
            for (int h = 0; h < s.nh; ++h)
                for (int d = 0; d < s.hd; ++d)
                    out[((size_t(b) * s.nh + h) * s.T + t) * s.hd + d] =
                        x[((size_t(b) * s.T + t) * s.nh + h) * s.hd + d];
    return out;
}

// The units of one batch element the host sizes the grid for (heads_cuda.rs: `units`).
template <typename T> int units(const Shape &s) {
    const int per_batch = s.T * s.nh * s.hd;
    return s.hd % vec_width<T>() == 0 ? per_batch / vec_width<T>() : per_batch;
}

// Runs one direction with the host's grid, or with `grid` when given; `in_off` / `out_off` elements of padding in
// front of the input / output (1: not 16-byte aligned).
template <typename T>
std::vector<T> run(bool split, const std::vector<T> &in, const Shape &s, int in_off, int out_off, emu::Dim3 grid) {
    std::vector<T> src(in_off, from_f32<T>(0.f));
    src.insert(src.end(), in.begin(), in.end());
    std::vector<T> dst(in.size() + out_off, from_f32<T>(-12345.f));
    if (grid.x == 0) grid = emu::Dim3{unsigned(grid_x(units<T>(s), s.B)), unsigned(grid_y(s.B)), 1};
    emu::launch(grid, THREADS, 0, [&] {
        if (split)
            heads::move_heads<true, T>(src.data() + in_off, dst.data() + out_off, s.B, s.T, s.nh, s.hd);
        else
            heads::move_heads<false, T>(src.data() + in_off, dst.data() + out_off, s.B, s.T, s.nh, s.hd);
    });
    return std::vector<T>(dst.begin() + out_off, dst.end());
}

template <typename T> void run_shape(const Shape &s, std::mt19937 &rng, bool quick) {
    const size_t n = size_t(s.B) * s.T * s.nh * s.hd;
    const auto x = convert<T>(randn(rng, n, 1.f, sizeof(T) == 2));
    const auto want = host_split(x, s);
    const std::string p = std::string(s.name) + " " + dtype_name<T>() + " B=" + std::to_string(s.B) +
                          " T=" + std::to_string(s.T) + " nh=" + std::to_string(s.nh) + " hd=" + std::to_string(s.hd);
    std::printf("%s (%s path)\n", p.c_str(), s.hd % vec_width<T>() == 0 ? "pack" : "element");
    const emu::Dim3 host{0, 0, 0};
    // Offsets (input, output): aligned, then each side one element in.
    const int offsets[3][2] = {{0, 0}, {1, 0}, {0, 1}};
    for (int o = 0; o < (quick ? 2 : 3); ++o) {
        const int a = offsets[o][0], c = offsets[o][1];
        const std::string tag = a ? " misaligned input" : c ? " misaligned output" : "";
        const auto split = run<T>(true, x, s, a, c, host);
        check(p + tag + ": split bitwise the host permutation", same_bits(split.data(), want.data(), n));
        const auto merged = run<T>(false, want, s, a, c, host);
        check(p + tag + ": merge bitwise the inverse permutation", same_bits(merged.data(), x.data(), n));
    }
    // A round trip through both kernels, and small grids whose loops take several turns in x and y.
    const auto round = run<T>(false, run<T>(true, x, s, 0, 0, host), s, 0, 0, host);
    check(p + ": merge of split is the identity", same_bits(round.data(), x.data(), n));
    const emu::Dim3 small{1, unsigned(s.B > 1 ? s.B - 1 : 1), 1};
    const auto split = run<T>(true, x, s, 0, 0, small);
    const auto merged = run<T>(false, want, s, 0, 0, small);
    check(p + ": grid " + std::to_string(small.x) + "x" + std::to_string(small.y) + " (strided loops), both ways",
          same_bits(split.data(), want.data(), n) && same_bits(merged.data(), x.data(), n));
}

// The host's grid: y within the hardware's bound, at most MAX_BLOCKS blocks (or one column of blocks), and a thread
// per unit unless that cap is reached.
void check_grid() {
    bool ok = true;
    for (int B : {1, 3, 16, 65535, 65536, 1 << 20})
        for (int units : {1, 255, 256, 257, 98304, 1 << 24}) {
            const long long x = grid_x(units, B), y = grid_y(B), cap = std::max(1, MAX_BLOCKS / int(y));
            ok = ok && x >= 1 && y >= 1 && y <= MAX_GRID_Y && y <= B && (x * y <= MAX_BLOCKS || x == 1);
            ok = ok && (x * THREADS >= units || x == cap);
        }
    ok = ok && grid_x(1024 * 96, 16) == 384 && grid_y(16) == 16;  // GPT-2, bf16: a thread per pack
    check("grid: y within 65535, at most MAX_BLOCKS blocks, GPT-2's bf16 split a thread per pack", ok);
}

}  // namespace

int main(int argc, char **argv) {
    std::mt19937 rng(2024);
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    check_grid();
    const std::vector<Shape> shapes = {
        {"GPT-2 head size", 2, 37, 3, 64},
        {"odd head size", 3, 29, 4, 15},
        {"one pack per head", 2, 50, 5, 8},
        {"one head", 2, 33, 1, 24},
        {"one position", 5, 1, 12, 16},
    };
    for (const Shape &s : shapes) {
        run_shape<float>(s, rng, quick);
        run_shape<bf16>(s, rng, quick);
    }
    std::printf("%d checks\n", checks);
    return finish();
}
