// check_gemv.cpp: every kernel of kernels/gemv.cu against double references of its banner:
//   out[b, m] = Σ_k x[b, k]·W[m, k]  (f32),   act[b, f] = bf16(silu(gate)·up) with gate, up the
//   products with W rows f and F + f.
// Launched as src/cuda/kernels.rs does: tensor-core buckets grid ceil(M / 16) (ceil(F / 8) for
// glu), block 512 (256 for the _w8 variants), without and with a live row count and row0 (the launch covers rows row0.. of
// a batch of which rows < live are needed); single-row kernels grid ceil(M / (8 / WPR)), block
// 256, B = 1, with a K from the host's range for each WPR (one also past the first round of
// loads).
//
// Bounds, per element: bf16·bf16 products are exact in f32, so the f32 result differs from the
// exact sum only by its additions; every term passes through at most `depth` of them (the
// kernel's summation tree as its banner lays it out), hence |err| ≤ depth·2^-24·Σ|x·w|.
// bf16 outputs add their RNE rounding, 2^-8 relative, to the propagated f32 error.
#include "gemv.cu"

namespace gemv_check {

// Depth of the tensor-core buckets' sums: with W warps (16, or 8 for the _w8 variants) warp w
// takes ≤ 4·ceil(nstep / 4W) 32-wide k-steps, each two mma of 16 accumulated products, then W
// warp partials are added.
static double depth_tc(int K, int warps) {
    const int nstep = (K + 31) / 32;
    return 128.0 * ((nstep + 4 * warps - 1) / (4 * warps)) + warps + 2;
}
// Depth of the single-row sums: a lane's ≤ ceil(K / 8 / (32·WPR)) chunks of 8 products (8
// additions each, dot8 then acc), a 5-level warp reduction, WPR partials.
static double depth_b1(int K, int wpr) { return 8.0 * (1 + (K / 8 + 32 * wpr - 1) / (32 * wpr)) + 5 + wpr + 2; }

// Exact products and their magnitude sums: dot[b·rows + m], abs[b·rows + m].
static void products(const std::vector<double>& x, const std::vector<bf16_t>& W, int B, int rows, int K,
                     std::vector<double>& dot, std::vector<double>& mag) {
    dot.assign((size_t)B * rows, 0.0);
    mag.assign((size_t)B * rows, 0.0);
    for (int b = 0; b < B; ++b)
        for (int m = 0; m < rows; ++m) {
            double s = 0, a = 0;
            for (int k = 0; k < K; ++k) {
                const double t = x[(size_t)b * K + k] * bf2f(W[(size_t)m * K + k]);
                s += t;
                a += std::fabs(t);
            }
            dot[(size_t)b * rows + m] = s;
            mag[(size_t)b * rows + m] = a;
        }
}

static double silu(double g) { return g / (1.0 + std::exp(-g)); }
// act = bf16(silu(g)·u) from sums g, u known to ±eg, ±eu: silu' ≤ 1.1 everywhere; silu_mul's own
// f32 operations (expf, add, divide, multiply) a few 2^-24 of the value; then the bf16 rounding.
static void glu_want(double g, double u, double eg, double eu, double& want, double& tol) {
    want = silu(g) * u;
    const double ef = 1.1 * eg * (std::fabs(u) + eu) + std::fabs(silu(g)) * eu + 8 * U32 * std::fabs(want);
    tol = UBF * (std::fabs(want) + ef) + ef + 1e-30;
}

using tc_fn = void (*)(float*, const bf16_t*, const bf16_t*, int, int, int, const int*, int);
using tc_glu_fn = void (*)(bf16_t*, const bf16_t*, const bf16_t*, int, int, int, const int*, int);

// One tensor-core bucket with B rows (≤ the bucket), M outputs (F features with glu). live ≥ 0:
// the launch covers rows row0 .. row0 + B of a batch of row0 + B rows (x and out offset by row0,
// as the host's row groups do) of which rows < live are needed (a device int): it must compute
// exactly rows row0 .. row0 + min(B, live − row0), leave every other row of the batch's output at
// its NaN, and, with no row to compute, read no weights (the banner: it returns before loading
// them; emulate.h counts ld_stream).
static void tc(const char* name, tc_fn plain, tc_glu_fn fused, int B, int M, int K, int live = -1, int row0 = 0,
               int warps = 16) {
    const bool glu = fused != nullptr;
    const int rows = glu ? 2 * M : M, total = row0 + B;
    const int nrun = live < 0 ? B : std::max(0, std::min(B, live - row0));  // rows to compute
    const auto x = randbf((size_t)total * K), W = randbf((size_t)rows * K);
    std::vector<double> xd((size_t)B * K), dot, mag;
    for (size_t i = 0; i < xd.size(); ++i) xd[i] = bf2f(x[(size_t)row0 * K + i]);
    products(xd, W, B, rows, K, dot, mag);
    const double dep = depth_tc(K, warps) * U32;
    // want / tol over the whole batch; `done` marks the rows the launch computes.
    std::vector<double> want((size_t)total * M, 0.0), tol((size_t)total * M, 0.0);
    std::vector<char> done((size_t)total * M, 0), left((size_t)total * M, 0);
    for (int b = 0; b < B; ++b)
        for (int m = 0; m < M; ++m) {
            const size_t o = (size_t)(row0 + b) * M + m;
            done[o] = b < nrun;
            if (!glu) {
                want[o] = dot[(size_t)b * rows + m];
                tol[o] = dep * mag[(size_t)b * rows + m] + 1e-30;
            } else {
                const size_t g = (size_t)b * rows + m, u = g + M;
                glu_want(dot[g], dot[u], dep * mag[g], dep * mag[u], want[o], tol[o]);
            }
        }
    for (size_t i = 0; i < left.size(); ++i) left[i] = !done[i];
    const int* lp = live >= 0 ? &live : nullptr;
    std::vector<float> got;
    char tag[112];
    snprintf(tag, sizeof tag, "%s B %d %s %d K %d", name, B, glu ? "F" : "M", M, K);
    if (live >= 0)
        snprintf(tag + strlen(tag), sizeof tag - strlen(tag), " row0 %d live %d: %d rows", row0, live, nrun);
    g_stream_loads = 0;
    if (!glu) {
        std::vector<float> out((size_t)total * M, NAN);
        launch(dim3{(unsigned)((M + 15) / 16), 1, 1}, 32 * warps, [&] {
            plain(out.data() + (size_t)row0 * M, x.data() + (size_t)row0 * K, W.data(), B, M, K, lp, row0);
        });
        got = out;
    } else {
        std::vector<bf16_t> act((size_t)total * M, 0x7fc0);  // NaN: every computed entry must be written
        launch(dim3{(unsigned)((M + 7) / 8), 1, 1}, 32 * warps, [&] {
            fused(act.data() + (size_t)row0 * M, x.data() + (size_t)row0 * K, W.data(), B, M, K, lp, row0);
        });
        got = from_bf(act);
    }
    if (nrun > 0 || live < 0) {
        within(tag, pick(got, done), pick(want, done), pick(tol, done));
    } else {
        printf("%s\n", tag);
        report("  no weight loaded", g_stream_loads == 0, std::to_string(g_stream_loads.load()) + " ld_stream");
    }
    if (live >= 0) kept_nan("  rows not computed keep NaN", got, left);
}

using b1_fn = void (*)(void*, const bf16_t*, const bf16_t*, int, int, int);
enum Row1 { Plain, Glu };

// One single-row kernel: WPR warps per output, M outputs (F features for the glu variant).
static void b1(const char* name, b1_fn fn, Row1 v, int wpr, int M, int K) {
    const bool glu = v == Glu;
    const int rows = glu ? 2 * M : M;
    const auto W = randbf((size_t)rows * K);
    const auto xb = randbf(K);
    std::vector<double> xd(K);
    for (int k = 0; k < K; ++k) xd[k] = bf2f(xb[k]);
    std::vector<double> dot, mag;
    products(xd, W, 1, rows, K, dot, mag);
    std::vector<double> err(rows);  // bound on each f32 sum
    for (int m = 0; m < rows; ++m) err[m] = depth_b1(K, wpr) * U32 * mag[m];
    std::vector<double> want(M), tol(M);
    for (int m = 0; m < M; ++m) {
        if (glu)
            glu_want(dot[m], dot[M + m], err[m], err[M + m], want[m], tol[m]);
        else {
            want[m] = dot[m];
            tol[m] = err[m] + 1e-30;
        }
    }
    std::vector<float> out(M, NAN);
    std::vector<bf16_t> act(M, 0x7fc0);
    void* o = glu ? (void*)act.data() : (void*)out.data();
    const int per_block = 8 / wpr;
    launch(dim3{(unsigned)((M + per_block - 1) / per_block), 1, 1}, 256,
           [&] { fn(o, xb.data(), W.data(), 1, M, K); });
    char tag[96];
    snprintf(tag, sizeof tag, "%s %s %d K %d", name, glu ? "F" : "M", M, K);
    within(tag, glu ? from_bf(act) : out, want, tol);
}

}  // namespace gemv_check

void run_gemv() {
    using namespace gemv_check;
    const int K = 2056;  // 65 k-steps: warp 0 takes a second round; the last step is partial
    tc("gemv_bf16_b2", gemv_bf16_b2, nullptr, 2, 37, K);
    tc("gemv_bf16_b4", gemv_bf16_b4, nullptr, 3, 37, K);
    tc("gemv_bf16_b8", gemv_bf16_b8, nullptr, 7, 37, K);
    tc("gemv_bf16_b16", gemv_bf16_b16, nullptr, 13, 37, K);
    tc("gemv_bf16_b32", gemv_bf16_b32, nullptr, 29, 37, K);
    tc("gemv_bf16_b32", gemv_bf16_b32, nullptr, 32, 16, 200);
    tc("gemv_glu_bf16_b2", nullptr, gemv_glu_bf16_b2, 2, 21, K);
    tc("gemv_glu_bf16_b4", nullptr, gemv_glu_bf16_b4, 4, 21, K);
    tc("gemv_glu_bf16_b8", nullptr, gemv_glu_bf16_b8, 8, 21, K);
    tc("gemv_glu_bf16_b16", nullptr, gemv_glu_bf16_b16, 9, 21, K);
    tc("gemv_glu_bf16_b32", nullptr, gemv_glu_bf16_b32, 27, 21, K);
    // A live row count (the hybrid step's candidate rows): the launch of rows row0 .. row0 + B
    // computes min(B, live − row0) of them.
    {
        OwnRng own(102);
        tc("gemv_bf16_b32", gemv_bf16_b32, nullptr, 32, 37, K, 40, 32);   // 8 rows
        tc("gemv_bf16_b32", gemv_bf16_b32, nullptr, 32, 37, K, 40, 64);   // none
        tc("gemv_bf16_b32", gemv_bf16_b32, nullptr, 32, 37, 200, 40, 40);  // none: live == row0
        tc("gemv_bf16_b32", gemv_bf16_b32, nullptr, 32, 37, K, 100, 32);  // all: live ≥ row0 + B
        tc("gemv_bf16_b32", gemv_bf16_b32, nullptr, 32, 37, 200, 51, 32);  // 19: into the third tile
        tc("gemv_bf16_b8", gemv_bf16_b8, nullptr, 5, 37, 200, 3, 0);       // 3 of a partial bucket
        tc("gemv_glu_bf16_b16", nullptr, gemv_glu_bf16_b16, 16, 21, K, 40, 32);   // 8 rows
        tc("gemv_glu_bf16_b16", nullptr, gemv_glu_bf16_b16, 16, 21, K, 40, 48);   // none
        tc("gemv_glu_bf16_b16", nullptr, gemv_glu_bf16_b16, 16, 21, 200, 32, 16);  // all: live == row0 + B
        tc("gemv_glu_bf16_b32", nullptr, gemv_glu_bf16_b32, 32, 21, 200, 45, 32);  // 13 rows
        // A one-row group with a live count goes to the 2-row bucket (the b1 kernels take none).
        tc("gemv_bf16_b2", gemv_bf16_b2, nullptr, 1, 37, K, 33, 32);                // the row
        tc("gemv_bf16_b2", gemv_bf16_b2, nullptr, 1, 37, 200, 32, 32);              // none
        tc("gemv_glu_bf16_b2", nullptr, gemv_glu_bf16_b2, 1, 21, K, 33, 32);        // the row
        tc("gemv_glu_bf16_b2", nullptr, gemv_glu_bf16_b2, 1, 21, 200, 20, 32);      // none
    }
    // The 8-warp variants of the 16 and 32 buckets (block 256): K = 2056 takes three rounds of
    // 32 steps (warp 0 a third with one step), K = 8960 (the down product) nine.
    {
        OwnRng own(103);
        tc("gemv_bf16_b16_w8", gemv_bf16_b16_w8, nullptr, 11, 37, K, -1, 0, 8);
        tc("gemv_bf16_b16_w8", gemv_bf16_b16_w8, nullptr, 16, 20, 8960, -1, 0, 8);
        tc("gemv_bf16_b32_w8", gemv_bf16_b32_w8, nullptr, 29, 37, K, -1, 0, 8);
        tc("gemv_glu_bf16_b16_w8", nullptr, gemv_glu_bf16_b16_w8, 11, 21, K, -1, 0, 8);
        tc("gemv_glu_bf16_b32_w8", nullptr, gemv_glu_bf16_b32_w8, 27, 21, 1536, -1, 0, 8);
        tc("gemv_bf16_b32_w8", gemv_bf16_b32_w8, nullptr, 32, 37, K, 40, 32, 8);   // live: 8 rows
        tc("gemv_bf16_b32_w8", gemv_bf16_b32_w8, nullptr, 32, 37, K, 40, 64, 8);   // none
        tc("gemv_glu_bf16_b16_w8", nullptr, gemv_glu_bf16_b16_w8, 16, 21, 200, 40, 32, 8);  // 8 rows
    }
    // The 64-row bucket (8 warps): a full and a ragged batch, glu, and live counts reaching into
    // its last 8-row tile or stopping before it.
    {
        OwnRng own(104);
        tc("gemv_bf16_b64", gemv_bf16_b64, nullptr, 64, 37, K, -1, 0, 8);
        tc("gemv_bf16_b64", gemv_bf16_b64, nullptr, 41, 20, 1536, -1, 0, 8);
        tc("gemv_glu_bf16_b64", nullptr, gemv_glu_bf16_b64, 50, 21, K, -1, 0, 8);
        tc("gemv_bf16_b64", gemv_bf16_b64, nullptr, 64, 37, 200, 121, 64, 8);  // 57 rows
        tc("gemv_glu_bf16_b64", nullptr, gemv_glu_bf16_b64, 64, 21, 200, 80, 64, 8);  // 16 rows
        tc("gemv_bf16_b64", gemv_bf16_b64, nullptr, 64, 37, 200, 64, 64, 8);   // none
    }
    // Single row: the host picks WPR from K (≤ 2048: 1, ≤ 4096: 2, ≤ 8192: 4, else 8).
    struct V {
        const char* name;
        b1_fn fn;
        Row1 v;
        int wpr, K;
    };
    const V vs[] = {
        {"gemv_bf16_b1", gemv_bf16_b1, Plain, 1, 2040},
        {"gemv_bf16_b1", gemv_bf16_b1, Plain, 1, 2056},  // past the first round of 8 loads
        {"gemv_bf16_b1_k2", gemv_bf16_b1_k2, Plain, 2, 4088},
        {"gemv_bf16_b1_k4", gemv_bf16_b1_k4, Plain, 4, 8184},
        {"gemv_bf16_b1_k8", gemv_bf16_b1_k8, Plain, 8, 16392},
        {"gemv_glu_bf16_b1", gemv_glu_bf16_b1, Glu, 1, 1536},
        {"gemv_glu_bf16_b1_k2", gemv_glu_bf16_b1_k2, Glu, 2, 2056},
        {"gemv_glu_bf16_b1_k4", gemv_glu_bf16_b1_k4, Glu, 4, 8192},
        {"gemv_glu_bf16_b1_k8", gemv_glu_bf16_b1_k8, Glu, 8, 16392},
    };
    for (const V& v : vs) b1(v.name, v.fn, v.v, v.wpr, 13, v.K);
}
