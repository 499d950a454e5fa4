// Runs the attention kernels of ../attention.cu on the CPU through emu.h and compares them with a float64
// reference, for every head size and kernel family and awkward sequence lengths. No GPU needed:
//
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -I worker/kernels \
//       worker/kernels/emulate/attention_emu.cpp -o /tmp/attention_emu && /tmp/attention_emu
//
// What it proves: the kernels' indexing, tiling, masking, online softmax, tail handling, shared-memory carve-up
// and cp.async pipelining, given the fragment layouts of mma.m16n8k16 and ldmatrix as documented (emu.h). What it
// cannot: anything about speed, and PTX-level mistakes in the inline assembly (the GPU tests cover those).
#define LOCKSTEP_EMULATE
#include "../attention.cu"
#include "check.h"

#include <random>
#include <string>

namespace {

struct Case {
    int bh, t, d;
};

struct Reference {
    std::vector<double> o, lse, dq, dk, dv;
};

Reference reference(const Case &c, const std::vector<float> &q, const std::vector<float> &k,
                    const std::vector<float> &v, const std::vector<float> &d_o, double scale) {
    const int T = c.t, D = c.d;
    Reference r;
    r.o.assign(size_t(c.bh) * T * D, 0), r.lse.assign(size_t(c.bh) * T, 0);
    r.dq = r.dk = r.dv = r.o;
    std::vector<double> p(T);
    for (int h = 0; h < c.bh; ++h) {
        const size_t base = size_t(h) * T * D;
        auto at = [&](const std::vector<float> &x, int row, int col) { return double(x[base + size_t(row) * D + col]); };
        for (int i = 0; i < T; ++i) {
            double mx = -INFINITY;
            for (int j = 0; j <= i; ++j) {
                double s = 0;
                for (int d = 0; d < D; ++d) s += at(q, i, d) * at(k, j, d);
                p[j] = s * scale;
                mx = std::max(mx, p[j]);
            }
            double sum = 0;
            for (int j = 0; j <= i; ++j) sum += std::exp(p[j] - mx);
            const double lse = mx + std::log(sum);
            r.lse[size_t(h) * T + i] = lse;
            for (int j = 0; j <= i; ++j) p[j] = std::exp(p[j] - lse);
            double di = 0;
            for (int d = 0; d < D; ++d) {
                double o = 0;
                for (int j = 0; j <= i; ++j) o += p[j] * at(v, j, d);
                r.o[base + size_t(i) * D + d] = o;
                di += o * at(d_o, i, d);
            }
            for (int j = 0; j <= i; ++j) {
                double dp = 0;
                for (int d = 0; d < D; ++d) dp += at(d_o, i, d) * at(v, j, d);
                const double ds = p[j] * (dp - di);
                for (int d = 0; d < D; ++d) {
                    r.dv[base + size_t(j) * D + d] += p[j] * at(d_o, i, d);
                    r.dk[base + size_t(j) * D + d] += scale * ds * at(q, i, d);
                    r.dq[base + size_t(i) * D + d] += scale * ds * at(k, j, d);
                }
            }
        }
    }
    return r;
}

// The grid and shared memory of each kernel, as attention_cuda.rs launches them.
unsigned tiles(int t, int rows) { return unsigned((t + rows - 1) / rows); }

template <int D> void run_mma(const Case &c, std::mt19937 &rng) {
    const int T = c.t;
    const size_t n = size_t(c.bh) * T * D;
    const double scale = 1.0 / std::sqrt(double(D));
    const float scale_log2 = float(scale) * LOG2E;
    auto qf = randn(rng, n, 1.f, true), kf = randn(rng, n, 1.f, true), vf = randn(rng, n, 1.f, true);
    auto dof = randn(rng, n, 1.f, true);
    const Reference ref = reference(c, qf, kf, vf, dof, scale);
    auto q = convert<bf16>(qf), k = convert<bf16>(kf), v = convert<bf16>(vf), d_o = convert<bf16>(dof);
    std::vector<bf16> o(n), dq(n), dk(n), dv(n);
    std::vector<float> lse(size_t(c.bh) * T), dvec(size_t(c.bh) * T);
    const emu::Dim3 grid{unsigned(c.bh), tiles(T, MMA_ROWS), 1};

    emu::launch(grid, MMA_THREADS, fwd_mma_smem<D>(),
                [&] { fwd_mma<D>(q.data(), k.data(), v.data(), o.data(), lse.data(), T, scale_log2); });
    emu::launch(emu::Dim3{tiles(c.bh * T, 4), 1, 1}, 128, 0,
                [&] { bwd_rowdot<bf16>(d_o.data(), o.data(), dvec.data(), c.bh * T, D); });
    emu::launch(grid, MMA_THREADS, dq_mma_smem<D>(), [&] {
        bwd_dq_mma<D>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), dvec.data(), dq.data(), T, scale_log2,
                      float(scale));
    });
    emu::launch(grid, MMA_THREADS, dkdv_mma_smem<D>(), [&] {
        bwd_dkdv_mma<D>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), dvec.data(), dk.data(), dv.data(), T,
                        scale_log2, float(scale));
    });
    const double tol = 2e-2;
    compare("mma O", widen(o), ref.o, tol);
    compare("mma L", lse, ref.lse, 1e-5);
    compare("mma dQ", widen(dq), ref.dq, tol);
    compare("mma dK", widen(dk), ref.dk, tol);
    compare("mma dV", widen(dv), ref.dv, tol);
}

template <int D, typename T_> void run_simt(const Case &c, std::mt19937 &rng, const char *name) {
    const int T = c.t;
    const bool is_bf16 = sizeof(T_) == 2;
    const size_t n = size_t(c.bh) * T * D;
    const double scale = 1.0 / std::sqrt(double(D));
    const float scale_log2 = float(scale) * LOG2E;
    auto qf = randn(rng, n, 1.f, is_bf16), kf = randn(rng, n, 1.f, is_bf16), vf = randn(rng, n, 1.f, is_bf16);
    auto dof = randn(rng, n, 1.f, is_bf16);
    const Reference ref = reference(c, qf, kf, vf, dof, scale);
    auto q = convert<T_>(qf), k = convert<T_>(kf), v = convert<T_>(vf), d_o = convert<T_>(dof);
    std::vector<T_> o(n), dq(n), dk(n), dv(n);
    std::vector<float> lse(size_t(c.bh) * T), dvec(size_t(c.bh) * T);
    const emu::Dim3 grid{unsigned(c.bh), tiles(T, SIMT_ROWS), 1};

    emu::launch(grid, SIMT_THREADS, 0,
                [&] { fwd_simt<D, T_>(q.data(), k.data(), v.data(), o.data(), lse.data(), T, scale_log2); });
    emu::launch(emu::Dim3{tiles(c.bh * T, 4), 1, 1}, 128, 0,
                [&] { bwd_rowdot<T_>(d_o.data(), o.data(), dvec.data(), c.bh * T, D); });
    emu::launch(grid, SIMT_THREADS, 0, [&] {
        bwd_dq_simt<D, T_>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), dvec.data(), dq.data(), T,
                           scale_log2, float(scale));
    });
    emu::launch(grid, SIMT_THREADS, 0, [&] {
        bwd_dkdv_simt<D, T_>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), dvec.data(), dk.data(),
                             dv.data(), T, scale_log2, float(scale));
    });
    const double tol = is_bf16 ? 2e-2 : 1e-5;
    const std::string p = std::string("simt ") + name + " ";
    compare(p + "O", widen(o), ref.o, tol);
    compare(p + "L", lse, ref.lse, 1e-5);
    compare(p + "dQ", widen(dq), ref.dq, tol);
    compare(p + "dK", widen(dk), ref.dk, tol);
    compare(p + "dV", widen(dv), ref.dv, tol);
}

const char *const SCHEDULES[] = {"lockstep", "warps first to last", "warps last to first"};

template <int D> void run_all(std::mt19937 &rng, const std::vector<int> &lengths) {
    for (int t : lengths) {
        for (int schedule = 0; schedule < 3; ++schedule) {
            emu::st().schedule = emu::Schedule(schedule);
            const Case c{2, t, D};
            std::printf("D=%d T=%d heads=%d, %s\n", D, t, c.bh, SCHEDULES[schedule]);
            run_mma<D>(c, rng);
            run_simt<D, float>(c, rng, "f32");
            run_simt<D, bf16>(c, rng, "bf16");
        }
    }
}

}  // namespace

int main(int argc, char **argv) {
    std::mt19937 rng(1234);
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    const std::vector<int> lengths = quick ? std::vector<int>{37, 130} : std::vector<int>{1, 37, 64, 65, 130, 200};
    run_all<16>(rng, lengths);
    run_all<32>(rng, lengths);
    run_all<64>(rng, lengths);
    run_all<128>(rng, quick ? std::vector<int>{70} : std::vector<int>{1, 33, 70, 130});
    return finish();
}
