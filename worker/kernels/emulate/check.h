// What the emulator programs (*_emu.cpp) share for checking kernels against a float64 reference: seeded inputs
// (rounded through bf16 when both sides must see bf16 values), a tolerance check that prints one ok/FAIL line, and
// the closing verdict that worker/tests/kernels_emulated.rs looks for. Include after emu.h (bf16 rounding).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

inline int failures = 0;

// Normal(mean, std) values; rounded through bf16 when `bf16_inputs`, so both sides then see the same inputs.
inline std::vector<float> randn(std::mt19937 &rng, size_t n, float mean, float std, bool bf16_inputs) {
    std::normal_distribution<float> dist(mean, std);
    std::vector<float> v(n);
    for (float &x : v) {
        x = dist(rng);
        if (bf16_inputs) x = bf16_bits_to_f32(f32_to_bf16_bits(x));
    }
    return v;
}

inline std::vector<float> randn(std::mt19937 &rng, size_t n, float std, bool bf16_inputs) {
    return randn(rng, n, 0.f, std, bf16_inputs);
}

// Values as the kernel's element type T (f32 or bf16), and back as floats: the whole vector, or n from a pointer.
template <typename T> std::vector<T> convert(const std::vector<float> &x) {
    std::vector<T> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = from_f32<T>(x[i]);
    return out;
}
template <typename T> std::vector<float> widen(const T *x, size_t n) {
    std::vector<float> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = to_f32(x[i]);
    return out;
}
template <typename T> std::vector<float> widen(const std::vector<T> &x) { return widen(x.data(), x.size()); }

// max |got − want| ≤ tol·max(max|want|, 1), no NaN and the same length; one line either way, with the worst element.
template <typename V> void compare(const std::string &what, const V &got, const std::vector<double> &want, double tol) {
    double scale = 0, worst = 0;
    size_t at = 0;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    bool nan = got.size() != want.size();
    for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
        if (std::isnan(double(got[i]))) nan = true;
        const double e = std::fabs(double(got[i]) - want[i]);
        if (e > worst || std::isnan(double(got[i]))) worst = e, at = i;
    }
    const double rel = worst / std::max(scale, 1.0);
    const bool ok = !nan && rel <= tol;
    if (!ok) ++failures;
    std::printf("  %-4s %-40s max err %.3e of max %.3e (%.2e, tol %.0e) at %zu: %g vs %g\n", ok ? "ok" : "FAIL",
                what.c_str(), worst, scale, rel, tol, at, got.empty() ? 0.0 : double(got[at]),
                want.empty() ? 0.0 : want[at]);
}

// An exact check (bitwise comparisons, sort orders): one line either way; `checks` counts them for the summary.
inline int checks = 0;
inline void check(const std::string &what, bool ok) {
    ++checks;
    if (!ok) ++failures;
    std::printf("  %-4s %s\n", ok ? "ok" : "FAIL", what.c_str());
}

template <typename T> const char *dtype_name() { return sizeof(T) == 4 ? "f32" : "bf16"; }

// The program's exit status, after the verdict line the Rust test looks for.
inline int finish() {
    if (failures) {
        std::printf("%d comparison(s) FAILED\n", failures);
        return 1;
    }
    std::printf("all comparisons passed\n");
    return 0;
}
