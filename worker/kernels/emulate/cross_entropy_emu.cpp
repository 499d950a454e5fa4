// Runs the cross-entropy kernels of ../cross_entropy.cu on the CPU through emu.h and compares them with a float64
// reference: the summed loss, the saved lse and dlogits (for an upstream gradient g ≠ 1), in f32 and bf16, over
// vocabularies that are not multiples of the block or the vector width, with ignored rows, a row with a huge logit,
// a row with −∞ logits, logits at an odd offset (a view: rows misaligned for the vector loads, and misaligned
// differently from the freshly allocated gradient), under each warp schedule. Then the edge cases: a target out of
// range (its row's loss and gradient NaN, nothing read out of bounds under ASan), a NaN logit, no rows at all.
//
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -I worker/kernels \
//       worker/kernels/emulate/cross_entropy_emu.cpp -o /tmp/cross_entropy_emu && /tmp/cross_entropy_emu
//
// UBSan is what checks the 16-byte vector loads and stores for alignment (a misaligned Pack access is a "runtime
// error"; -fno-sanitize-recover makes it fatal).
//
// `--quick` (the CI run, worker/tests/kernels_emulated.rs) leaves out the GPT-2-sized vocabulary.
#define LOCKSTEP_EMULATE
#include "../cross_entropy.cu"

#include <random>
#include <string>

namespace {

int failures = 0;

void report(bool ok, const std::string &what, const char *detail) {
    if (!ok) ++failures;
    std::printf("  %-4s %-44s %s\n", ok ? "ok" : "FAIL", what.c_str(), detail);
}

// |got − want| ≤ tol·max(max|want|, 1) on every element, or with `per_element` ≤ tol·max(|want|, 1) (for values
// of very different sizes, as the lse of a row with a huge logit beside the others); NaN exactly where the
// reference is NaN.
void compare(const std::string &what, const std::vector<float> &got, const std::vector<double> &want, double tol,
             bool per_element = false) {
    double scale = 1, worst = 0;
    size_t at = 0;
    bool nan_mismatch = false;
    for (double w : want)
        if (!std::isnan(w)) scale = std::max(scale, std::fabs(w));
    for (size_t i = 0; i < got.size(); ++i) {
        if (std::isnan(want[i]) || std::isnan(got[i])) {
            if (std::isnan(want[i]) != std::isnan(got[i])) nan_mismatch = true, at = i;
            continue;
        }
        const double e = std::fabs(got[i] - want[i]) / (per_element ? std::max(std::fabs(want[i]), 1.0) : 1.0);
        if (e > worst && !nan_mismatch) worst = e, at = i;
    }
    char detail[200];
    if (per_element) scale = 1;
    std::snprintf(detail, sizeof detail, "max %s err %.3e of scale %.3e (tol %.0e)%s at %zu: %g vs %g",
                  per_element ? "rel" : "abs", worst, scale, tol, nan_mismatch ? ", NaN mismatch" : "", at, got.empty() ? 0.0 : double(got[at]),
                  want.empty() ? 0.0 : want[at]);
    report(!nan_mismatch && worst <= tol * scale, what, detail);
}

struct Reference {
    double loss = 0;
    std::vector<double> lse, dx;
};

// float64 softmax cross-entropy; lse 0 for ignored rows (as the kernel writes), NaN loss and gradient for a target
// out of range.
Reference reference(const std::vector<float> &x, const std::vector<uint32_t> &t, int V, double g) {
    const size_t n = t.size();
    Reference r;
    r.lse.assign(n, 0), r.dx.assign(n * V, 0);
    for (size_t i = 0; i < n; ++i) {
        const float *row = x.data() + i * V;
        if (t[i] == CE_IGNORE) continue;
        double mx = -INFINITY;
        bool nan = false;
        for (int j = 0; j < V; ++j) nan = nan || std::isnan(row[j]), mx = std::max(mx, double(row[j]));
        double sum = 0;
        for (int j = 0; j < V; ++j) sum += std::exp(double(row[j]) - mx);
        const double lse = nan ? NAN : mx + std::log(sum);
        r.lse[i] = lse;
        const bool in_range = t[i] < uint32_t(V);
        r.loss += in_range ? lse - row[t[i]] : NAN;
        for (int j = 0; j < V; ++j)
            r.dx[i * V + j] = in_range ? g * (std::exp(double(row[j]) - lse) - (uint32_t(j) == t[i])) : NAN;
    }
    return r;
}

struct Case {
    int n, v;
};

template <typename T> struct Outputs {
    float loss;
    std::vector<float> lse, dx;
};

// The three kernels as cross_entropy_cuda.rs launches them: the forward and backward one block of CE_THREADS per
// row, the sum one block; the logits at `offset` elements into their buffer, the gradient at the start of its own.
template <typename T>
Outputs<T> run_kernels(const std::vector<float> &xf, const std::vector<uint32_t> &t, int V, float g, int offset) {
    const int n = int(t.size());
    std::vector<T> buf(offset + xf.size());
    for (size_t i = 0; i < xf.size(); ++i) buf[offset + i] = from_f32<T>(xf[i]);
    const T *x = buf.data() + offset;
    std::vector<float> lse(n, -1.f), loss(n, -1.f), out(1, -1.f), gv(1, g);
    std::vector<T> dx(size_t(n) * V, from_f32<T>(-1.f));
    if (n > 0) {
        emu::launch(emu::Dim3{unsigned(n), 1, 1}, CE_THREADS, 0,
                    [&] { ce_forward<T>(x, t.data(), lse.data(), loss.data(), V); });
    }
    emu::launch(emu::Dim3{1, 1, 1}, CE_THREADS, 0, [&] { ce_sum(loss.data(), out.data(), n); });
    if (n > 0) {
        emu::launch(emu::Dim3{unsigned(n), 1, 1}, CE_THREADS, 0,
                    [&] { ce_backward<T>(x, t.data(), lse.data(), gv.data(), dx.data(), V); });
    }
    Outputs<T> o{out[0], lse, {}};
    for (const T &d : dx) o.dx.push_back(to_f32(d));
    return o;
}

// Logits ~ N(0, 2²) rounded through bf16 when the kernel reads bf16 (so both sides see the same values), some rows
// ignored, one with a huge logit (as its target where the row has one), and, where there are rows enough, one with
// −∞ entries.
template <typename T> void run_case(const Case &c, std::mt19937 &rng, int offset, const char *dtype) {
    const bool is_bf16 = sizeof(T) == 2;
    std::normal_distribution<float> dist(0.f, 2.f);
    std::vector<float> x(size_t(c.n) * c.v);
    for (float &v : x) {
        v = dist(rng);
        if (is_bf16) v = bf16_bits_to_f32(f32_to_bf16_bits(v));
    }
    std::vector<uint32_t> t(c.n);
    for (int i = 0; i < c.n; ++i) t[i] = uint32_t(rng() % uint32_t(c.v));
    if (c.n >= 3) t[1] = CE_IGNORE;
    if (c.n >= 5) t[c.n - 1] = CE_IGNORE;
    const int huge = c.n >= 3 ? 2 : 0;  // 1000 is exact in bf16
    x[size_t(huge) * c.v + c.v / 2] = 1000.f;
    if (c.n >= 4) t[huge] = uint32_t(c.v / 2);
    if (c.n >= 4 && c.v >= 4)
        for (int j = 0; j < c.v; j += 3) x[size_t(3) * c.v + j] = j == int(t[3]) ? 0.f : -INFINITY;

    const double g = -1.7;
    const Reference ref = reference(x, t, c.v, g);
    const Outputs<T> got = run_kernels<T>(x, t, c.v, float(g), offset);
    char name[96];
    std::snprintf(name, sizeof name, "%s %dx%d offset %d", dtype, c.n, c.v, offset);
    const std::string p = name;
    compare(p + " loss", {got.loss}, {ref.loss}, 1e-5);
    compare(p + " lse", got.lse, ref.lse, 1e-6, true);
    compare(p + " dlogits", got.dx, ref.dx, is_bf16 ? 8e-3 : 1e-5);
    bool zero = true;
    for (int i = 0; i < c.n; ++i)
        if (t[i] == CE_IGNORE)
            for (int j = 0; j < c.v; ++j) zero = zero && got.dx[size_t(i) * c.v + j] == 0.f;
    report(zero, p + " ignored rows' dlogits exactly 0", "");
}

// A target ≥ V (not IGNORE): that row's loss, so the sum, and its gradient row NaN; the other rows untouched.
template <typename T> void run_out_of_range(std::mt19937 &rng, const char *dtype) {
    const int n = 3, V = 37;
    std::normal_distribution<float> dist(0.f, 1.f);
    std::vector<float> x(size_t(n) * V);
    for (float &v : x) v = bf16_bits_to_f32(f32_to_bf16_bits(dist(rng)));
    const std::vector<uint32_t> t = {4, uint32_t(V), 0x7fffffffu};
    const Outputs<T> got = run_kernels<T>(x, t, V, 0.5f, 0);
    const Reference ref = reference(x, t, V, 0.5);
    const std::string p = std::string(dtype) + " targets out of range";
    report(std::isnan(got.loss), p + ": loss NaN", "");
    compare(p + ": dlogits", got.dx, ref.dx, sizeof(T) == 2 ? 8e-3 : 1e-6);
    compare(p + ": lse", got.lse, ref.lse, 1e-6, true);
}

template <typename T> void run_nan_logit(const char *dtype) {
    std::vector<float> x = {0.f, 1.f, 2.f, 0.f, NAN, 1.f};
    const std::vector<uint32_t> t = {0, 1};
    const Outputs<T> got = run_kernels<T>(x, t, 3, 1.f, 0);
    const bool row0 = !std::isnan(got.dx[0]) && !std::isnan(got.dx[2]);
    const bool row1 = std::isnan(got.dx[3]) && std::isnan(got.dx[5]);
    report(std::isnan(got.loss) && row0 && row1, std::string(dtype) + " NaN logit: loss and its row NaN", "");
}

template <typename T> void run_empty(const char *dtype) {
    const Outputs<T> got = run_kernels<T>({}, {}, 5, 1.f, 0);
    report(got.loss == 0.f, std::string(dtype) + " no rows: loss 0", "");
}

const char *const SCHEDULES[] = {"lockstep", "warps first to last", "warps last to first"};

}  // namespace

int main(int argc, char **argv) {
    std::mt19937 rng(4321);
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    std::vector<Case> cases = {{1, 1}, {3, 19}, {5, 65}, {4, 1000}, {2, 5000}};
    if (!quick) cases.push_back({6, 50304});
    for (int schedule = 0; schedule < 3; ++schedule) {
        emu::st().schedule = emu::Schedule(schedule);
        std::printf("%s\n", SCHEDULES[schedule]);
        for (const Case &c : cases) {
            for (int offset : {0, 1}) {
                run_case<float>(c, rng, offset, "f32");
                run_case<bf16>(c, rng, offset, "bf16");
            }
        }
        run_out_of_range<float>(rng, "f32");
        run_out_of_range<bf16>(rng, "bf16");
        run_nan_logit<float>("f32");
        run_nan_logit<bf16>("bf16");
        run_empty<float>("f32");
    }
    if (failures) {
        std::printf("%d comparison(s) FAILED\n", failures);
        return 1;
    }
    std::printf("all comparisons passed\n");
    return 0;
}
