// check_util.h: what every check_<family>.cpp shares: the seeded generator, bf16 helpers, and
// the comparisons that print one `ok` / `FAIL` line per checked output and count failures.
#pragma once
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "common.cuh"

static std::mt19937 rng(7);
// Within its scope, the draws come from a stream of their own (seeded here) and the shared one is
// restored after: checks added later leave the inputs of the checks after them unchanged.
struct OwnRng {
    std::mt19937 saved;
    explicit OwnRng(unsigned seed) : saved(rng) { rng.seed(seed); }
    ~OwnRng() { rng = saved; }
};
static std::vector<float> randv(size_t n, float s = 1.0f) {
    std::normal_distribution<float> d(0.0f, s);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}
static std::vector<bf16_t> to_bf(const std::vector<float>& v) {
    std::vector<bf16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = f2bf(v[i]);
    return b;
}
static std::vector<float> from_bf(const std::vector<bf16_t>& b) {
    std::vector<float> v(b.size());
    for (size_t i = 0; i < b.size(); ++i) v[i] = bf2f(b[i]);
    return v;
}
static std::vector<bf16_t> randbf(size_t n, float s = 1.0f) { return to_bf(randv(n, s)); }

// Unit roundoffs: RNE to a p-bit significand errs by at most 2^-p relative (f32 p = 24, bf16
// p = 8).
static const double U32 = std::ldexp(1.0, -24), UBF = std::ldexp(1.0, -8);

// The bf16 nearest to a double (RNE), and whether a value within `rel`·|v| of v could round to
// another bf16 (v that close to a rounding midpoint): where the kernel's f32 value may differ
// from the double by that much, both roundings are right.
static double bf_round(double v) {
    if (v == 0 || !std::isfinite(v)) return v;
    int e;
    std::frexp(v, &e);                         // |v| in [2^(e-1), 2^e)
    const double ulp = std::ldexp(1.0, e - 8);  // 8 significant bits
    double q = v / ulp, r = std::nearbyint(q);  // nearbyint: ties to even under the default mode
    return r * ulp;
}
static bool bf_ambiguous(double v, double rel) {
    if (v == 0) return false;
    int e;
    std::frexp(v, &e);
    const double ulp = std::ldexp(1.0, e - 8), q = std::fabs(v) / ulp;
    return std::fabs(q - std::floor(q) - 0.5) * ulp <= rel * std::fabs(v) + 1e-300;
}

static int failures = 0;
static void report(const char* what, bool ok, const std::string& detail) {
    printf("%-44s %s %s\n", what, detail.c_str(), ok ? "ok" : "FAIL");
    if (!ok) ++failures;
}

// The worst error of `got` relative to the largest |want| (where mask is set); ok when ≤ bound.
static void compare(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                    const std::vector<char>& mask, double bound = 1e-4) {
    double mx = 0, err = 0;
    for (size_t i = 0; i < want.size(); ++i)
        if (mask[i]) mx = std::max(mx, std::fabs(want[i]));
    for (size_t i = 0; i < want.size(); ++i)
        if (mask[i]) {
            const double d = std::fabs(got[i] - want[i]);
            err = std::isnan(d) ? INFINITY : std::max(err, d);  // a NaN fails
            if (std::isnan(d)) break;
        }
    const double rel = err / (mx + 1e-30);
    char buf[96];
    snprintf(buf, sizeof buf, "max |ref| %9.3e  max err / max |ref| %9.2e", mx, rel);
    report(what, rel <= bound, buf);
}

// Element-wise: |got[i] − want[i]| ≤ tol[i] for every i (tol 0: exact, −inf and +inf included).
// Prints the worst ratio err / tol and, on failure, the first offending element.
static void within(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                   const std::vector<double>& tol) {
    double worst = 0;
    long bad = -1;
    for (size_t i = 0; i < want.size(); ++i) {
        const bool same = (double)got[i] == want[i];  // exact (covers ±inf)
        const double d = same ? 0.0 : std::fabs((double)got[i] - want[i]);
        if (!(d <= tol[i])) {  // NaN fails
            if (bad < 0) bad = (long)i;
            worst = INFINITY;
        } else if (tol[i] > 0)
            worst = std::max(worst, d / tol[i]);
    }
    char buf[160];
    if (bad < 0)
        snprintf(buf, sizeof buf, "max err / bound %9.2e", worst);
    else
        snprintf(buf, sizeof buf, "[%ld] got %.9g want %.9g bound %.3g", bad, (double)got[bad], want[bad], tol[bad]);
    report(what, bad < 0, buf);
}

// Entries a launch must leave alone (mask set) still hold their NaN sentinel (f32 outputs, or
// bf16 ones through from_bf). Prints how many were checked, or the first one that was written.
static void kept_nan(const char* what, const std::vector<float>& got, const std::vector<char>& mask) {
    long bad = -1;
    size_t n = 0;
    for (size_t i = 0; i < got.size(); ++i)
        if (mask[i]) {
            ++n;
            if (bad < 0 && !std::isnan(got[i])) bad = (long)i;
        }
    char buf[120];
    if (bad < 0)
        snprintf(buf, sizeof buf, "%zu values still NaN", n);
    else
        snprintf(buf, sizeof buf, "[%ld] written: %.9g", bad, (double)got[bad]);
    report(what, bad < 0, buf);
}

// The entries of v where mask is set, in order (to compare the written part of an output).
template <class T>
static std::vector<T> pick(const std::vector<T>& v, const std::vector<char>& mask) {
    std::vector<T> out;
    for (size_t i = 0; i < v.size(); ++i)
        if (mask[i]) out.push_back(v[i]);
    return out;
}

// Exact equality of integer outputs.
template <class T>
static void same(const char* what, const std::vector<T>& got, const std::vector<T>& want) {
    long bad = -1;
    for (size_t i = 0; i < want.size() && bad < 0; ++i)
        if (got[i] != want[i]) bad = (long)i;
    char buf[120];
    if (bad < 0)
        snprintf(buf, sizeof buf, "%zu values equal", want.size());
    else
        snprintf(buf, sizeof buf, "[%ld] got %lld want %lld", bad, (long long)got[bad], (long long)want[bad]);
    report(what, bad < 0, buf);
}
