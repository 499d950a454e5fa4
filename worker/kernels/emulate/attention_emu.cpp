// Runs the attention kernels of ../attention.cu on the CPU through emu.h and compares them with a float64
// reference, for every head size and kernel family, awkward sequence lengths and both layouts the op uses
// (contiguous [B, H, T, D], and q, k, v packed in [B, T, 3C] with o in [B, T, C]). No GPU needed:
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

#include <cstring>
#include <random>
#include <string>

namespace {

// B sequences of H heads; `packed`: q, k, v as column slices of one [B, T, 3C] tensor and o, dO as [B, T, C] (the
// model's layout), else contiguous [B, H, T, D] tensors.
struct Case {
    int b, h, t, d;
    bool packed;
    int bh() const { return b * h; }
};

struct Reference {
    std::vector<double> o, lse, dq, dk, dv;
};

// The float64 attention of every head of q, k, v (contiguous [B·H, T, D]) and its gradients for upstream dO.
Reference reference(const Case &c, const std::vector<float> &q, const std::vector<float> &k,
                    const std::vector<float> &v, const std::vector<float> &d_o, double scale) {
    const int T = c.t, D = c.d;
    Reference r;
    r.o.assign(size_t(c.bh()) * T * D, 0), r.lse.assign(size_t(c.bh()) * T, 0);
    r.dq = r.dk = r.dv = r.o;
    std::vector<double> p(T);
    for (int h = 0; h < c.bh(); ++h) {
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

// The strides attention_cuda.rs passes: `in` for q, k, v and their gradients, `out` for o and dO, and how far into
// the `in` buffer k and v start. Packed: one [B, T, 3C] buffer (k at C, v at 2C); else three [B, H, T, D] buffers.
struct Layout {
    Rows in, out;
    size_t in_len, out_len, k_at, v_at;
};

Layout layout(const Case &c) {
    const long long T = c.t, D = c.d, H = c.h, C = H * D;
    const size_t n = size_t(c.bh()) * T * D;
    if (c.packed) return {Rows{T * 3 * C, D, int(3 * C)}, Rows{T * C, D, int(C)}, 3 * n, n, size_t(C), size_t(2 * C)};
    const Rows contiguous{H * T * D, T * D, int(D)};
    return {contiguous, contiguous, 3 * n, n, n, 2 * n};
}

// Element (head bh, row t, column d) of a buffer laid out as `r`.
size_t at(const Rows &r, int H, int bh, int t, int d) { return r.head(size_t(bh), H) + size_t(t) * r.st + d; }

// Contiguous [B·H, T, D] values into a buffer laid out as `r` from `base` on, and back.
template <typename T_>
void scatter(std::vector<T_> &dst, size_t base, const Rows &r, const Case &c, const std::vector<T_> &src) {
    for (int bh = 0; bh < c.bh(); ++bh)
        for (int t = 0; t < c.t; ++t)
            for (int d = 0; d < c.d; ++d) dst[base + at(r, c.h, bh, t, d)] = src[(size_t(bh) * c.t + t) * c.d + d];
}
template <typename T_>
std::vector<float> gather(const std::vector<T_> &src, size_t base, const Rows &r, const Case &c) {
    std::vector<float> out(size_t(c.bh()) * c.t * c.d);
    for (int bh = 0; bh < c.bh(); ++bh)
        for (int t = 0; t < c.t; ++t)
            for (int d = 0; d < c.d; ++d)
                out[(size_t(bh) * c.t + t) * c.d + d] = to_f32(src[base + at(r, c.h, bh, t, d)]);
    return out;
}

// What one run of the kernels gave, gathered back to contiguous [B·H, T, D] (and [B·H, T] for L).
struct Outputs {
    std::vector<float> o, lse, dq, dk, dv;
};

// The grid and shared memory of each kernel, as attention_cuda.rs launches them.
unsigned tiles(int t, int rows) { return unsigned((t + rows - 1) / rows); }

// Runs the forward, the row dots and both gradient kernels of one family (`mma`: the tensor-core kernels, bf16
// only) on contiguous inputs laid out as the case says; outputs and gradients start as NaN, so an element a kernel
// fails to write shows.
template <int D, typename T_>
Outputs run(const Case &c, bool mma, const std::vector<float> &qf, const std::vector<float> &kf,
            const std::vector<float> &vf, const std::vector<float> &dof, double scale) {
    const int T = c.t, H = c.h;
    const float scale_log2 = float(scale) * LOG2E;
    const Layout l = layout(c);
    const T_ nan = from_f32<T_>(NAN);
    std::vector<T_> qkv(l.in_len, nan), d_o(l.out_len, nan), o(l.out_len, nan), dqkv(l.in_len, nan);
    scatter(qkv, 0, l.in, c, convert<T_>(qf));
    scatter(qkv, l.k_at, l.in, c, convert<T_>(kf));
    scatter(qkv, l.v_at, l.in, c, convert<T_>(vf));
    scatter(d_o, 0, l.out, c, convert<T_>(dof));
    const T_ *q = qkv.data(), *k = q + l.k_at, *v = q + l.v_at;
    T_ *dq = dqkv.data(), *dk = dq + l.k_at, *dv = dq + l.v_at;
    std::vector<float> lse(size_t(c.bh()) * T, NAN), dvec(size_t(c.bh()) * T, NAN);

    if constexpr (sizeof(T_) == 2) {
        if (mma) {
            const emu::Dim3 grid{unsigned(c.bh()), tiles(T, MMA_ROWS), 1};
            emu::launch(grid, MMA_THREADS, fwd_mma_smem<D>(),
                        [&] { fwd_mma<D>(q, k, v, o.data(), lse.data(), T, H, l.in, l.out, scale_log2); });
            emu::launch(emu::Dim3{tiles(c.bh() * T, 4), 1, 1}, 128, 0,
                        [&] { bwd_rowdot<T_>(d_o.data(), o.data(), dvec.data(), c.bh() * T, T, H, l.out, D); });
            emu::launch(grid, MMA_THREADS, dq_mma_smem<D>(), [&] {
                bwd_dq_mma<D>(q, k, v, d_o.data(), lse.data(), dvec.data(), dq, T, H, l.in, l.out, scale_log2,
                              float(scale));
            });
            emu::launch(grid, MMA_THREADS, dkdv_mma_smem<D>(), [&] {
                bwd_dkdv_mma<D>(q, k, v, d_o.data(), lse.data(), dvec.data(), dk, dv, T, H, l.in, l.out, scale_log2,
                                float(scale));
            });
        }
    }
    if (!mma) {
        const emu::Dim3 grid{unsigned(c.bh()), tiles(T, SIMT_ROWS), 1};
        emu::launch(grid, SIMT_THREADS, 0,
                    [&] { fwd_simt<D, T_>(q, k, v, o.data(), lse.data(), T, H, l.in, l.out, scale_log2); });
        emu::launch(emu::Dim3{tiles(c.bh() * T, 4), 1, 1}, 128, 0,
                    [&] { bwd_rowdot<T_>(d_o.data(), o.data(), dvec.data(), c.bh() * T, T, H, l.out, D); });
        emu::launch(grid, SIMT_THREADS, 0, [&] {
            bwd_dq_simt<D, T_>(q, k, v, d_o.data(), lse.data(), dvec.data(), dq, T, H, l.in, l.out, scale_log2,
                               float(scale));
        });
        emu::launch(grid, SIMT_THREADS, 0, [&] {
            bwd_dkdv_simt<D, T_>(q, k, v, d_o.data(), lse.data(), dvec.data(), dk, dv, T, H, l.in, l.out,
                                 scale_log2, float(scale));
        });
    }
    // The packed gradient buffer has no gaps: every element must have been written.
    bool all_written = true;
    for (const T_ &x : dqkv) all_written = all_written && !std::isnan(to_f32(x));
    if (c.packed) check(std::string("  every element of the packed dQKV written"), all_written);
    return {gather(o, 0, l.out, c), lse, gather(dqkv, 0, l.in, c), gather(dqkv, l.k_at, l.in, c),
            gather(dqkv, l.v_at, l.in, c)};
}

bool bitwise_equal(const Outputs &a, const Outputs &b) {
    auto same = [](const std::vector<float> &x, const std::vector<float> &y) {
        return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
    };
    return same(a.o, b.o) && same(a.lse, b.lse) && same(a.dq, b.dq) && same(a.dk, b.dk) && same(a.dv, b.dv);
}

// One family and dtype on one shape, in the contiguous layout and, with `packed_too`, in the packed one as well;
// each against the float64 reference, and the two bitwise against each other (the same arithmetic, only the
// addresses differ).
template <int D, typename T_>
void run_layouts(Case c, bool mma, bool packed_too, std::mt19937 &rng, const std::string &name) {
    const bool is_bf16 = sizeof(T_) == 2;
    const size_t n = size_t(c.bh()) * c.t * D;
    const double scale = 1.0 / std::sqrt(double(D));
    auto qf = randn(rng, n, 1.f, is_bf16), kf = randn(rng, n, 1.f, is_bf16), vf = randn(rng, n, 1.f, is_bf16);
    auto dof = randn(rng, n, 1.f, is_bf16);
    const Reference ref = reference(c, qf, kf, vf, dof, scale);
    const double tol = is_bf16 ? 2e-2 : 1e-5;
    Outputs runs[2];
    for (int packed = 0; packed < (packed_too ? 2 : 1); ++packed) {
        c.packed = packed;
        runs[packed] = run<D, T_>(c, mma, qf, kf, vf, dof, scale);
        const std::string p = name + (packed ? " packed " : " ");
        compare(p + "O", runs[packed].o, ref.o, tol);
        compare(p + "L", runs[packed].lse, ref.lse, 1e-5);
        compare(p + "dQ", runs[packed].dq, ref.dq, tol);
        compare(p + "dK", runs[packed].dk, ref.dk, tol);
        compare(p + "dV", runs[packed].dv, ref.dv, tol);
    }
    if (packed_too) check(name + ": packed and contiguous layouts bitwise the same", bitwise_equal(runs[0], runs[1]));
}

const char *const SCHEDULES[] = {"lockstep", "warps first to last", "warps last to first"};

// Every length under each warp schedule, in both layouts with two sequences of two heads (a block must find its own
// batch and head); `quick` (cargo test) runs the packed layout under the last schedule only, and one sequence of two
// heads in the contiguous layout under the others: the schedule exercises races inside a block, the layout only
// addresses.
template <int D> void run_all(std::mt19937 &rng, const std::vector<int> &lengths, bool quick) {
    for (int t : lengths) {
        for (int schedule = 0; schedule < 3; ++schedule) {
            emu::st().schedule = emu::Schedule(schedule);
            const bool packed = !quick || schedule == 2;
            const Case c = packed ? Case{2, 2, t, D, false} : Case{1, 2, t, D, false};
            std::printf("D=%d T=%d B=%d H=%d, %s%s\n", D, t, c.b, c.h, SCHEDULES[schedule],
                        packed ? ", both layouts" : "");
            run_layouts<D, bf16>(c, true, packed, rng, "mma");
            run_layouts<D, float>(c, false, packed, rng, "simt f32");
            run_layouts<D, bf16>(c, false, packed, rng, "simt bf16");
        }
    }
}

}  // namespace

int main(int argc, char **argv) {
    std::mt19937 rng(1234);
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    const std::vector<int> lengths = quick ? std::vector<int>{37, 130} : std::vector<int>{1, 37, 64, 65, 130, 200};
    run_all<16>(rng, lengths, quick);
    run_all<32>(rng, lengths, quick);
    run_all<64>(rng, lengths, quick);
    run_all<128>(rng, quick ? std::vector<int>{70} : std::vector<int>{1, 33, 70, 130}, quick);
    return finish();
}
