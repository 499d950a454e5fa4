// Runs the optimizer kernels of ../adamw.cu on the CPU through emu.h and compares them with a float64 reference of
// the same math: gradient accumulation over micro-batches (f32 and bf16 gradients), the stop vote, the two-stage
// squared norm and the multi-tensor AdamW update, over several steps of a few "parameters" of awkward sizes (1, 33,
// 1000, 4097 elements; ranks 1 and 2), with clipping active, inactive and off, and steps that must change nothing
// (a non-finite loss, a NaN gradient). No GPU needed:
//
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -I worker/kernels \
//       worker/kernels/emulate/adamw_emu.cpp -o /tmp/adamw_emu && /tmp/adamw_emu
//
// Every launch has the grid optim_cuda.rs gives it; a second configuration caps the grids and shrinks the chunks so
// that blocks stride over several chunks and over the norm's input, and the full run (without --quick) adds a
// parameter large enough to hit the norm's block cap. The norm runs under the emulator's three warp schedules and
// must come out bitwise the same (its order is fixed). What it cannot check: speed, and anything PTX-level.
#define LOCKSTEP_EMULATE
#include "../adamw.cu"

#include <random>
#include <string>

namespace {

// optim_cuda.rs's launch constants.
constexpr unsigned ACCUMULATE_BLOCKS = 2048, NORM_BLOCKS = 1024, UPDATE_BLOCKS = 1u << 20;
constexpr size_t CHUNK = 4096;

int failures = 0;

void verdict(bool ok, const std::string &what, const std::string &detail) {
    if (!ok) ++failures;
    std::printf("  %-4s %-44s %s\n", ok ? "ok" : "FAIL", what.c_str(), detail.c_str());
}

// max |got − want| ≤ tol·max(max|want|, floor) and nothing non-finite, reported with the worst element.
void compare(const std::string &what, const float *got, const std::vector<double> &want, double tol,
             double floor = 1.0) {
    double scale = 0, worst = 0;
    size_t at = 0;
    bool finite = true;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    for (size_t i = 0; i < want.size(); ++i) {
        const double e = std::fabs(double(got[i]) - want[i]);
        if (!std::isfinite(got[i])) finite = false, at = i;
        if (finite && e > worst) worst = e, at = i;
    }
    const double rel = worst / std::max(scale, floor);
    char detail[200];
    std::snprintf(detail, sizeof detail, "max err %.3e of max %.3e (%.2e, tol %.0e) at %zu: %g vs %g", worst, scale,
                  rel, tol, at, double(got[at]), want[at]);
    verdict(finite && rel <= tol, what, detail);
}

void same_bits(const std::string &what, const float *a, const float *b, size_t n) {
    const bool ok = std::memcmp(a, b, n * sizeof(float)) == 0;
    verdict(ok, what, ok ? "bitwise identical" : "differ");
}

float round_bf16(float x) { return bf16_bits_to_f32(f32_to_bf16_bits(x)); }

unsigned grid_for(int64_t n, unsigned cap) { return unsigned(std::min<int64_t>((n + THREADS - 1) / THREADS, cap)); }

// ---- the launches, as optim_cuda.rs makes them ----

void accumulate(float *dst, const float *src, int64_t n, bool add) {
    emu::launch(emu::Dim3{grid_for(n, ACCUMULATE_BLOCKS), 1, 1}, THREADS, 0,
                [&] { lockstep_adamw_accumulate_f32(dst, src, n, add ? 1 : 0); });
}

void accumulate(float *dst, const bf16 *src, int64_t n, bool add) {
    emu::launch(emu::Dim3{grid_for(n, ACCUMULATE_BLOCKS), 1, 1}, THREADS, 0,
                [&] { lockstep_adamw_accumulate_bf16(dst, src, n, add ? 1 : 0); });
}

void put(float *dst, float value) {
    emu::launch(emu::Dim3{1, 1, 1}, THREADS, 0, [&] { lockstep_adamw_put_f32(dst, value); });
}

// `flat` is [grads (n) | loss | votes]; `cap` is NORM_BLOCKS, or less to make every block stride further.
void norm(const float *flat, int64_t n, float *stats, unsigned cap) {
    std::vector<float> partials(NORM_BLOCKS, NAN);  // poison: a slot the finish reads but nobody wrote shows
    const unsigned blocks = grid_for(n, cap);
    emu::launch(emu::Dim3{blocks, 1, 1}, THREADS, 0,
                [&] { lockstep_adamw_norm_partials_f32(flat, n, partials.data()); });
    emu::launch(emu::Dim3{1, 1, 1}, THREADS, 0,
                [&] { lockstep_adamw_norm_finish_f32(partials.data(), int(blocks), flat + n, stats); });
}

struct Adam {
    double lr, beta1, beta2, eps, wd;
};

// `t`: the 1-based step the bias corrections are for. Scalars rounded to f32 as optim_cuda.rs passes them.
void update(const std::vector<Chunk> &chunks, unsigned cap, const std::vector<uint64_t> &ptrs, const float *grads,
            float *m, float *v, const float *stats, double max_norm, const Adam &h, uint64_t t) {
    const double bias1 = 1.0 - std::pow(h.beta1, double(t)), bias2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, double(t)));
    const int64_t num = int64_t(chunks.size());
    const unsigned grid = unsigned(std::min<int64_t>(num, cap));
    emu::launch(emu::Dim3{grid, 1, 1}, THREADS, 0, [&] {
        lockstep_adamw_update_f32(chunks.data(), num, ptrs.data(), grads, m, v, stats, float(max_norm),
                                  float(h.beta1), float(1.0 - h.beta1), float(h.beta2), float(1.0 - h.beta2),
                                  float(1.0 - h.lr * h.wd), float(1.0 / bias2_sqrt), float(h.eps),
                                  float(h.lr / bias1));
    });
}

// ---- the test ----

struct Param {
    std::vector<size_t> shape;
    std::vector<float> data;
    size_t numel() const { return data.size(); }
};

std::vector<Chunk> chunk_table(const std::vector<Param> &params, size_t chunk) {
    std::vector<Chunk> table;
    int64_t off = 0;
    for (size_t j = 0; j < params.size(); ++j) {
        const size_t n = params[j].numel();
        for (size_t s = 0; s < n; s += chunk)
            table.push_back(Chunk{off + int64_t(s), int64_t(s), int32_t(j), int32_t(std::min(chunk, n - s)),
                                  params[j].shape.size() >= 2 ? 1 : 0, 0});
        off += int64_t(n);
    }
    return table;
}

enum Kind { CLIP, NO_CLIP, CLIP_OFF, INF_LOSS, NAN_GRAD };
const char *const KIND_NAMES[] = {"clipping active", "clipping inactive", "max_norm = 0", "loss = inf",
                                  "a NaN gradient"};

struct Config {
    const char *name;
    std::vector<std::vector<size_t>> shapes;
    size_t chunk;
    unsigned update_cap, norm_cap;
    std::vector<Kind> steps;
    int micro_batches;
};

void run(const Config &c, std::mt19937 &rng) {
    std::printf("%s: chunks of %zu, update grid <= %u, norm grid <= %u\n", c.name, c.chunk, c.update_cap,
                c.norm_cap);
    std::normal_distribution<float> dist(0.f, 1.f);
    std::vector<Param> params;
    for (const auto &shape : c.shapes) {
        size_t n = 1;
        for (size_t d : shape) n *= d;
        Param p{shape, std::vector<float>(n)};
        for (float &x : p.data) x = 0.5f * dist(rng);
        params.push_back(std::move(p));
    }
    size_t n = 0;
    std::vector<size_t> offsets;
    for (const Param &p : params) offsets.push_back(n), n += p.numel();
    const std::vector<Chunk> chunks = chunk_table(params, c.chunk);
    std::vector<uint64_t> ptrs;
    for (Param &p : params) ptrs.push_back(uint64_t(reinterpret_cast<uintptr_t>(p.data.data())));

    const Adam h{1e-2, 0.9, 0.95, 1e-8, 0.1};
    std::vector<double> p_ref(n), m_ref(n, 0.0), v_ref(n, 0.0);
    for (size_t j = 0; j < params.size(); ++j)
        for (size_t i = 0; i < params[j].numel(); ++i) p_ref[offsets[j] + i] = params[j].data[i];
    std::vector<float> m(n, 0.f), v(n, 0.f), flat(n + 2);
    uint64_t taken = 0;

    for (size_t step = 0; step < c.steps.size(); ++step) {
        const Kind kind = c.steps[step];
        const double max_norm = kind == CLIP ? 1.0 : kind == CLIP_OFF ? 0.0 : kind == NO_CLIP ? 1e6 : 1.0;
        std::printf(" step %zu: %s\n", step, KIND_NAMES[kind]);
        // The persistent buffer holds the last step's values; NaN makes "the first micro-batch overwrites" visible.
        std::fill(flat.begin(), flat.end(), NAN);
        std::vector<double> flat_ref(n + 2, 0.0);
        for (int k = 0; k < c.micro_batches; ++k) {
            const bool as_bf16 = k % 2 == 1;
            for (size_t j = 0; j < params.size(); ++j) {
                std::vector<float> g(params[j].numel());
                for (float &x : g) x = 0.1f * dist(rng);
                if (kind == NAN_GRAD && k == c.micro_batches - 1 && j == params.size() / 2) g[g.size() / 2] = NAN;
                if (as_bf16) {
                    std::vector<bf16> b(g.size());
                    for (size_t i = 0; i < g.size(); ++i) b[i] = from_f32<bf16>(g[i]), g[i] = round_bf16(g[i]);
                    accumulate(flat.data() + offsets[j], b.data(), int64_t(b.size()), k > 0);
                } else {
                    accumulate(flat.data() + offsets[j], g.data(), int64_t(g.size()), k > 0);
                }
                for (size_t i = 0; i < g.size(); ++i) flat_ref[offsets[j] + i] += g[i];
            }
            float loss = 2.f + 0.1f * dist(rng);
            if (kind == INF_LOSS && k == 0) loss = INFINITY;
            accumulate(flat.data() + n, &loss, 1, k > 0);
            flat_ref[n] += loss;
        }
        const float vote = float(step % 2);
        put(flat.data() + n + 1, vote);
        flat_ref[n + 1] = vote;
        if (kind != NAN_GRAD)
            compare("accumulated gradients", flat.data(), std::vector<double>(flat_ref.begin(), flat_ref.end() - 2),
                    1e-6);
        if (kind != INF_LOSS)
            compare("accumulated loss, stop vote", flat.data() + n,
                    std::vector<double>(flat_ref.end() - 2, flat_ref.end()), 1e-6);

        double norm2_ref = 0;
        for (size_t i = 0; i < n; ++i) norm2_ref += flat_ref[i] * flat_ref[i];
        float stats[3], again[3], capped[3];
        for (int schedule = 0; schedule < 3; ++schedule) {
            emu::st().schedule = emu::Schedule(schedule);
            norm(flat.data(), int64_t(n), schedule == 0 ? stats : again, c.norm_cap);
            if (schedule > 0) same_bits("norm² under warp schedule " + std::to_string(schedule), stats, again, 3);
        }
        emu::st().schedule = emu::LOCKSTEP;
        norm(flat.data(), int64_t(n), capped, 3);
        same_bits("stats[0..2] = loss, votes", stats, flat.data() + n, 2);
        if (kind == NAN_GRAD) {
            verdict(std::isnan(stats[2]), "norm² of a NaN gradient is NaN", std::to_string(stats[2]));
        } else {
            compare("norm²", stats + 2, {norm2_ref}, 1e-6);
            compare("norm², 3 blocks striding", capped + 2, {norm2_ref}, 1e-6);
        }

        std::vector<std::vector<float>> before;
        for (const Param &p : params) before.push_back(p.data);
        const std::vector<float> m_before = m, v_before = v;
        update(chunks, c.update_cap, ptrs, flat.data(), m.data(), v.data(), stats, max_norm, h, taken + 1);

        const bool skip = !std::isfinite(flat_ref[n]) || !std::isfinite(norm2_ref);
        if (skip) {
            bool same = m == m_before && v == v_before;
            for (size_t j = 0; j < params.size(); ++j) same = same && params[j].data == before[j];
            verdict(same, "skipped step changes nothing", same ? "parameters and moments bitwise unchanged" : "changed");
            continue;
        }
        ++taken;
        const double norm_ref = std::sqrt(norm2_ref);
        const double clip = max_norm > 0 ? std::min(1.0, max_norm / (norm_ref + 1e-6)) : 1.0;
        std::printf("   ‖g‖ = %.4f, clip factor %.4f, t = %llu\n", norm_ref, clip, (unsigned long long)taken);
        const double bias1 = 1.0 - std::pow(h.beta1, double(taken));
        const double bias2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, double(taken)));
        for (size_t j = 0; j < params.size(); ++j) {
            const bool decay = params[j].shape.size() >= 2;
            for (size_t i = 0; i < params[j].numel(); ++i) {
                const size_t f = offsets[j] + i;
                const double g = flat_ref[f] * clip;
                if (decay) p_ref[f] *= 1.0 - h.lr * h.wd;
                m_ref[f] = h.beta1 * m_ref[f] + (1.0 - h.beta1) * g;
                v_ref[f] = h.beta2 * v_ref[f] + (1.0 - h.beta2) * g * g;
                p_ref[f] -= h.lr / bias1 * m_ref[f] / (std::sqrt(v_ref[f]) / bias2_sqrt + h.eps);
            }
            std::string shape;
            for (size_t d : params[j].shape) shape += (shape.empty() ? "" : "x") + std::to_string(d);
            compare("parameter " + shape, params[j].data.data(),
                    std::vector<double>(p_ref.begin() + offsets[j], p_ref.begin() + offsets[j] + params[j].numel()),
                    2e-6);
        }
        compare("exp_avg", m.data(), m_ref, 2e-6, 0.0);
        compare("exp_avg_sq", v.data(), v_ref, 2e-6, 0.0);
    }
}

}  // namespace

int main(int argc, char **argv) {
    std::mt19937 rng(1234);
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    const std::vector<std::vector<size_t>> shapes{{1}, {3, 11}, {1000}, {17, 241}};
    const std::vector<Kind> steps{CLIP, NO_CLIP, INF_LOSS, CLIP_OFF, NAN_GRAD, CLIP};
    run(Config{"launch shapes of optim_cuda.rs", shapes, CHUNK, UPDATE_BLOCKS, NORM_BLOCKS, steps, 3}, rng);
    run(Config{"small chunks, capped grids", shapes, 300, 4, 3, steps, 2}, rng);
    if (!quick) {
        auto big = shapes;
        big.push_back({600, 501});  // 1175 blocks of input: the norm's grid stops at NORM_BLOCKS
        run(Config{"a large parameter", big, CHUNK, UPDATE_BLOCKS, NORM_BLOCKS, {CLIP, NAN_GRAD, NO_CLIP}, 2}, rng);
    }
    if (failures) {
        std::printf("%d comparison(s) FAILED\n", failures);
        return 1;
    }
    std::printf("all comparisons passed\n");
    return 0;
}
