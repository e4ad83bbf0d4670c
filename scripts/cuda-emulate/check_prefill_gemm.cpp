// check_prefill_gemm.cpp: the tensor-core prefill attention (prefill_attention.cu; bf16 output,
// bound 2^-7 of the largest |ref|: its rounding, 2^-9, and that of the probabilities, 2^-9 of a
// convex sum) and every tile of the prefill / large-batch product — gemm.cu's two row tiles and
// gemm_wgmma.cu's two column tiles — (f32, 1e-4), with and without a live row count and split K.
#include "prefill_attention.cu"
#include "gemm.cu"
#include "gemm_wgmma.cu"

// Prefill chunk of n queries at positions p0.. of one slot over a bf16 cache [slots, S, Hkv, Dh].
static void prefill(int n, int p0, int H, int Hkv, int Dh) {
    const int slots = 2, slot = 1, S = p0 + n + 5, group = H / Hkv;
    auto bf = [](const std::vector<float>& v) {
        std::vector<bf16_t> b(v.size());
        for (size_t i = 0; i < v.size(); ++i) b[i] = f2bf(v[i]);
        return b;
    };
    const auto q = bf(randv((size_t)n * H * Dh, 2.0f));
    const auto kc = bf(randv((size_t)slots * S * Hkv * Dh, 2.0f)), vc = bf(randv((size_t)slots * S * Hkv * Dh, 2.0f));
    std::vector<double> want((size_t)n * H * Dh);
    const double scale = 1.0 / std::sqrt((double)Dh);
    for (int i = 0; i < n; ++i)
        for (int h = 0; h < H; ++h) {
            const int g = h / group, L = p0 + i + 1;
            std::vector<double> p(L);
            double mx = -1e300, sum = 0;
            for (int j = 0; j < L; ++j) {
                double s = 0;
                for (int d = 0; d < Dh; ++d)
                    s += (double)bf2f(q[((size_t)i * H + h) * Dh + d]) *
                         bf2f(kc[(((size_t)slot * S + j) * Hkv + g) * Dh + d]);
                mx = std::max(mx, p[j] = s * scale);
            }
            for (int j = 0; j < L; ++j) sum += (p[j] = std::exp(p[j] - mx));
            for (int d = 0; d < Dh; ++d) {
                double o = 0;
                for (int j = 0; j < L; ++j) o += p[j] * bf2f(vc[(((size_t)slot * S + j) * Hkv + g) * Dh + d]);
                want[((size_t)i * H + h) * Dh + d] = o / sum;
            }
        }
    std::vector<bf16_t> out((size_t)n * H * Dh, 0x7fc0);  // NaN: every entry must be written
    launch(dim3{(unsigned)((n + 63) / 64), (unsigned)H, 1}, 128, [&] {
        attention_prefill_bf16(q.data(), kc.data(), vc.data(), out.data(), n, p0, slot, H, Hkv, Dh, S);
    }, (size_t)4 * 64 * (Dh + 8) * 2);
    std::vector<float> got(out.size());
    for (size_t i = 0; i < out.size(); ++i) got[i] = bf2f(out[i]);
    char tag[96];
    snprintf(tag, sizeof tag, "prefill n %d p0 %d H %d Hkv %d Dh %d", n, p0, H, Hkv, Dh);
    compare(tag, got, want, std::vector<char>(want.size(), 1), 1.0 / 128);
}

// attention_runs_bf16 over a call of runs {len, p0, slot} (rows in order): run query i attends the
// cache of its slot at 0 .. p0−1, then the run's own k_self / v_self rows 0 .. i.
struct RunSpec {
    int len, p0, slot;
};
static void runs(const std::vector<RunSpec>& rs, int H, int Hkv, int Dh) {
    const int slots = 3, group = H / Hkv;
    int T = 0, S = 1;
    for (const auto& r : rs) {
        T += r.len;
        S = std::max(S, r.p0 + r.len + 3);
    }
    auto bf = [](const std::vector<float>& v) {
        std::vector<bf16_t> b(v.size());
        for (size_t i = 0; i < v.size(); ++i) b[i] = f2bf(v[i]);
        return b;
    };
    const auto q = bf(randv((size_t)T * H * Dh, 2.0f));
    const auto kc = bf(randv((size_t)slots * S * Hkv * Dh, 2.0f)), vc = bf(randv((size_t)slots * S * Hkv * Dh, 2.0f));
    const auto ks = bf(randv((size_t)T * Hkv * Dh, 2.0f)), vs = bf(randv((size_t)T * Hkv * Dh, 2.0f));
    std::vector<double> want((size_t)T * H * Dh);
    std::vector<int> tiles;
    const double scale = 1.0 / std::sqrt((double)Dh);
    int first = 0;
    for (const auto& r : rs) {
        for (int q0 = 0; q0 < r.len; q0 += 64) tiles.insert(tiles.end(), {first, r.len, q0, r.p0, r.slot});
        for (int i = 0; i < r.len; ++i)
            for (int h = 0; h < H; ++h) {
                const int g = h / group, L = r.p0 + i + 1;
                // Key j's row: the cache below p0, the run's own rows from p0.
                auto key = [&](const std::vector<bf16_t>& c, const std::vector<bf16_t>& own, int j, int d) {
                    return (double)bf2f(j < r.p0 ? c[(((size_t)r.slot * S + j) * Hkv + g) * Dh + d]
                                                 : own[(((size_t)first + j - r.p0) * Hkv + g) * Dh + d]);
                };
                std::vector<double> p(L);
                double mx = -1e300, sum = 0;
                for (int j = 0; j < L; ++j) {
                    double sc = 0;
                    for (int d = 0; d < Dh; ++d)
                        sc += (double)bf2f(q[(((size_t)first + i) * H + h) * Dh + d]) * key(kc, ks, j, d);
                    mx = std::max(mx, p[j] = sc * scale);
                }
                for (int j = 0; j < L; ++j) sum += (p[j] = std::exp(p[j] - mx));
                for (int d = 0; d < Dh; ++d) {
                    double o = 0;
                    for (int j = 0; j < L; ++j) o += p[j] * key(vc, vs, j, d);
                    want[(((size_t)first + i) * H + h) * Dh + d] = o / sum;
                }
            }
        first += r.len;
    }
    const int n_tiles = (int)tiles.size() / 5;
    std::vector<bf16_t> out((size_t)T * H * Dh, 0x7fc0);  // NaN: every entry must be written
    launch(dim3{(unsigned)n_tiles, (unsigned)H, 1}, 128, [&] {
        attention_runs_bf16(q.data(), kc.data(), vc.data(), ks.data(), vs.data(), out.data(), tiles.data(), H, Hkv,
                            Dh, S);
    }, (size_t)4 * 64 * (Dh + 8) * 2);
    std::vector<float> got(out.size());
    for (size_t i = 0; i < out.size(); ++i) got[i] = bf2f(out[i]);
    char tag[96];
    snprintf(tag, sizeof tag, "runs %zu (T %d, %d tiles) H %d Hkv %d Dh %d", rs.size(), T, n_tiles, H, Hkv, Dh);
    compare(tag, got, want, std::vector<char>(want.size(), 1), 1.0 / 128);
}

// A product kernel and its glu twin, with their launch shape: bn rows of x and bm rows of W per
// block (glu: bm / 2 outputs), k tiles of bk.
struct Tile {
    const char* tag;
    int bn, bm, bk;
    unsigned threads;
    size_t smem;
    decltype(&gemm_bf16) plain;
    decltype(&gemm_glu_bf16) glu;
};
static const Tile T64{"", 64, 128, 32, 128, 0, gemm_bf16, gemm_glu_bf16};
static const Tile T128{"_n128", 128, 128, 32, 256, 0, gemm_bf16_n128, gemm_glu_bf16_n128};
static const Tile TWG{"_wg", 128, 128, 64, 256, 6 * 256 * 128 + 1024, gemm_wg_bf16, gemm_glu_wg_bf16};
static const Tile TWG256{"_wg_m256", 128, 256, 64, 256, 4 * 384 * 128 + 1024, gemm_wg_bf16_m256,
                         gemm_glu_wg_bf16_m256};

// out [N, M] = x [N, K] · W [M, K]ᵀ, bf16 inputs, f32 output, on tile t's kernel. live ≥ 0: the
// launch's live count (a device int, gemm.cu banner): rows < min(N, live) must match; every row
// of a row tile (t.bn rows) starting at or past live keeps its NaN; rows of the tile holding the
// boundary are unspecified and not compared. splits > 1: split K (gemm.cu banner): split z takes
// k tiles [z·per, (z+1)·per) of t.bk and writes its raw sums to part[z]; the sum over z (done
// here, in z order, as vg_mm_reduce_f32 does) must match, and `out` must stay untouched.
static void gemm(int N, int M, int Kd, const Tile& t, int live = -1, int splits = 1) {
    std::vector<bf16_t> x((size_t)N * Kd), W((size_t)M * Kd);
    for (auto& v : x) v = f2bf(randv(1, 2.0f)[0]);
    for (auto& v : W) v = f2bf(randv(1, 0.5f)[0]);
    const int bn = t.bn, rows = live < 0 ? N : std::min(N, live);
    std::vector<double> want((size_t)N * M, 0.0);
    std::vector<char> needed((size_t)N * M, 0), dead((size_t)N * M, 0);
    for (int n = 0; n < N; ++n)
        for (int m = 0; m < M; ++m) {
            needed[(size_t)n * M + m] = n < rows;
            dead[(size_t)n * M + m] = live >= 0 && n / bn * bn >= live;
            if (n >= rows) continue;
            double s = 0;
            for (int k = 0; k < Kd; ++k) s += (double)bf2f(x[(size_t)n * Kd + k]) * bf2f(W[(size_t)m * Kd + k]);
            want[(size_t)n * M + m] = s;
        }
    std::vector<float> out((size_t)N * M, NAN);
    const int* lp = live >= 0 ? &live : nullptr;
    const int nk = (Kd + t.bk - 1) / t.bk, per = (nk + splits - 1) / splits;
    std::vector<float> part(splits > 1 ? (size_t)splits * N * M : 0, NAN);
    float* pp = splits > 1 ? part.data() : nullptr;
    launch(dim3{(unsigned)((M + t.bm - 1) / t.bm), (unsigned)((N + bn - 1) / bn), (unsigned)splits}, t.threads,
           [&] { t.plain(out.data(), x.data(), W.data(), N, M, Kd, lp, pp, per); }, t.smem);
    char tag[96];
    // Split K: the host's reduce, in z order; `out` itself must be untouched.
    const std::vector<float> untouched = out;
    if (splits > 1)
        for (size_t e = 0; e < out.size(); ++e) {
            float v = 0.0f;
            for (int z = 0; z < splits; ++z) v += part[(size_t)z * N * M + e];
            out[e] = v;
        }
    snprintf(tag, sizeof tag, "gemm%s N %d M %d K %d", t.tag, N, M, Kd);
    if (splits > 1) snprintf(tag + strlen(tag), sizeof tag - strlen(tag), " splits %d", splits);
    if (live >= 0) snprintf(tag + strlen(tag), sizeof tag - strlen(tag), " live %d", live);
    if (rows > 0)
        compare(tag, out, want, needed);
    else
        printf("%s\n", tag);
    if (splits > 1) kept_nan("  split K: out untouched", untouched, std::vector<char>(untouched.size(), 1));
    if (live < 0 || live >= N) return;
    snprintf(tag, sizeof tag, "  rows of tiles from row %d keep NaN", (live + bn - 1) / bn * bn);
    kept_nan(tag, out, dead);
}

// act [N, F] = bf16(silu(g) · u) of W = [gate; up] bf16 [2F, K] on tile t's glu kernel: bit for
// bit what its plain kernel then silu_mul gives, and
// within 2^-7 of the largest |ref| of the double reference (the bf16 output alone is off by up
// to 2^-8 of its value; twice that leaves room for the f32 sums). live ≥ 0: rows
// < min(N, live) compared, rows of tiles starting at or past live keep their NaN.
static void gemm_glu(int N, int F, int Kd, const Tile& t, int live = -1) {
    std::vector<bf16_t> x((size_t)N * Kd), W((size_t)2 * F * Kd);
    for (auto& v : x) v = f2bf(randv(1, 2.0f)[0]);
    for (auto& v : W) v = f2bf(randv(1, 0.5f)[0]);
    const int bn = t.bn, rows = live < 0 ? N : std::min(N, live);
    std::vector<double> want((size_t)N * F, 0.0);
    std::vector<char> needed((size_t)N * F, 0), dead((size_t)N * F, 0);
    for (int n = 0; n < N; ++n)
        for (int f = 0; f < F; ++f) {
            needed[(size_t)n * F + f] = n < rows;
            dead[(size_t)n * F + f] = live >= 0 && n / bn * bn >= live;
            if (n >= rows) continue;
            double gs = 0, us = 0;
            for (int k = 0; k < Kd; ++k) {
                gs += (double)bf2f(x[(size_t)n * Kd + k]) * bf2f(W[(size_t)f * Kd + k]);
                us += (double)bf2f(x[(size_t)n * Kd + k]) * bf2f(W[(size_t)(F + f) * Kd + k]);
            }
            want[(size_t)n * F + f] = gs / (1.0 + std::exp(-gs)) * us;
        }
    std::vector<bf16_t> act((size_t)N * F, 0x7fc0);  // NaN
    std::vector<float> gate_up((size_t)N * 2 * F, NAN);
    const int* lp = live >= 0 ? &live : nullptr;
    const int half = t.bm / 2, nk = (Kd + t.bk - 1) / t.bk;
    launch(dim3{(unsigned)((F + half - 1) / half), (unsigned)((N + bn - 1) / bn), 1}, t.threads,
           [&] { t.glu(act.data(), x.data(), W.data(), N, F, Kd, lp); }, t.smem);
    launch(dim3{(unsigned)((2 * F + t.bm - 1) / t.bm), (unsigned)((N + bn - 1) / bn), 1}, t.threads,
           [&] { t.plain(gate_up.data(), x.data(), W.data(), N, 2 * F, Kd, lp, nullptr, nk); }, t.smem);
    std::vector<float> got(act.size()), unfused(act.size());
    for (size_t e = 0; e < act.size(); ++e) {
        got[e] = bf2f(act[e]);
        const size_t n = e / F, f = e % F;
        unfused[e] = bf2f(f2bf(silu_mul(gate_up[n * 2 * F + f], gate_up[n * 2 * F + F + f])));
    }
    char tag[96];
    snprintf(tag, sizeof tag, "gemm_glu%s N %d F %d K %d", t.tag, N, F, Kd);
    if (live >= 0) snprintf(tag + strlen(tag), sizeof tag - strlen(tag), " live %d", live);
    if (rows == 0) {
        printf("%s\n", tag);
    } else {
        compare(tag, got, want, needed, 1.0 / 128);
        std::vector<float> g;  // the needed rows only (rows past live hold NaN or nothing)
        std::vector<double> same;
        for (size_t e = 0; e < act.size(); ++e)
            if (needed[e]) g.push_back(got[e]), same.push_back(unfused[e]);
        within("  = gemm then silu_mul (exact)", g, same, std::vector<double>(same.size(), 0.0));
    }
    if (live < 0 || live >= N) return;
    snprintf(tag, sizeof tag, "  rows of tiles from row %d keep NaN", (live + bn - 1) / bn * bn);
    kept_nan(tag, got, dead);
}

// common.cuh's gemm_tile visits every (column tile, row tile) of a grid exactly once, for every
// grid of up to 40 × 40 tiles (fewer than 8 column tiles, one row tile, ragged last groups).
static void gemm_tile_order() {
    int bad = 0;
    for (unsigned gx = 1; gx <= 40; ++gx)
        for (unsigned gy = 1; gy <= 40; ++gy) {
            gridDim = dim3{gx, gy, 1};
            std::vector<int> seen(gx * gy, 0);
            for (unsigned y = 0; y < gy; ++y)
                for (unsigned x = 0; x < gx; ++x) {
                    blockIdx = dim3{x, y, 0};
                    int mt, nt;
                    gemm_tile(&mt, &nt);
                    if (mt < 0 || mt >= (int)gx || nt < 0 || nt >= (int)gy || seen[nt * gx + mt]++) ++bad;
                }
        }
    report("gemm_tile: a bijection on grids to 40 x 40", bad == 0, std::to_string(bad) + " tiles missed or repeated");
}

void run_prefill_gemm() {
    gemm_tile_order();
    gemm(70, 136, 72, T64);
    gemm(70, 136, 72, T128);
    gemm(70, 136, 24, T64);  // one k tile: fewer than the ring's stages
    gemm(70, 136, 24, T128);
    gemm(200, 264, 40, T128);
    // 11 column tiles × 3 row tiles: a full group of 8 column tiles and a ragged one of 3
    // (common.cuh's gemm_tile order).
    gemm(130, 1300, 40, T64);
    // The hybrid step's candidate rows: only rows < live computed, tiles past them skipped.
    {
        OwnRng own(101);
        gemm(200, 136, 72, T64, 70);  // boundary inside tile 1 of 64; tiles 2, 3 skipped
        gemm(200, 136, 72, T64, 64);  // boundary on a tile edge: tile 1 skipped too
        gemm(200, 136, 72, T64, 0);   // nothing live
        gemm(200, 136, 72, T64, 1000);  // live ≥ N: every row
        gemm(200, 136, 72, T128, 70);  // boundary inside tile 0 of 128; tile 1 skipped
        gemm(200, 136, 72, T128, 128);
        gemm(200, 136, 72, T128, 0);
    }
    // Split K (decode batches): K = 8·53 = 424 is 14 k tiles, 4 splits of 4 (the last of 2,
    // ragged in K); then with a live count.
    {
        OwnRng own(102);
        gemm(40, 136, 424, T64, -1, 4);
        gemm(40, 136, 424, T128, -1, 4);
        gemm(200, 136, 424, T64, 70, 3);
    }
    // The MLP's gate|up with SiLU·mul in the epilogue: F not a multiple of 64 (ragged last
    // column block), K one k tile and ragged, live counts.
    {
        OwnRng own(103);
        gemm_glu(70, 100, 72, T64);
        gemm_glu(130, 72, 24, T128);
        gemm_glu(200, 136, 40, T64, 70);
        gemm_glu(200, 64, 72, T128, 70);
        gemm_glu(200, 64, 72, T64, 0);
    }
    // gemm_wgmma.cu: ragged N, M and K (72 = one k tile and 8), rings that wrap (K = 264: 5 k
    // tiles on 4 stages; K = 520: 9 on 6), one k tile of 8, odd M (scalar stores), live counts, split K (424: 7
    // k tiles of 64, 3 splits of 3, the last of 1), and the glu twins with ragged and odd F.
    {
        OwnRng own(104);
        gemm(150, 300, 72, TWG);
        gemm(150, 1300, 72, TWG);  // 11 column tiles × 2 row tiles (gemm_tile's groups)
        gemm(150, 300, 264, TWG256);
        gemm(150, 300, 520, TWG);  // 9 k tiles on 6 stages
        gemm(130, 136, 8, TWG);
        gemm(70, 137, 136, TWG256);
        gemm(300, 136, 72, TWG, 130);  // boundary inside tile 1 of 128; tile 2 skipped
        gemm(300, 136, 72, TWG256, 0);
        gemm(40, 136, 424, TWG, -1, 3);
        gemm(200, 300, 424, TWG256, 70, 2);
        gemm_glu(150, 100, 136, TWG);
        gemm_glu(130, 200, 264, TWG256);
        gemm_glu(70, 37, 72, TWG);
        gemm_glu(300, 64, 72, TWG, 130);
        gemm_glu(300, 130, 72, TWG256, 200);
    }
    prefill(37, 5, 6, 2, 64);
    prefill(100, 90, 4, 2, 64);  // Dh 64 over 4 key tiles: the ring wraps
    prefill(70, 0, 6, 2, 128);
    prefill(130, 100, 4, 4, 128);
    prefill(1, 0, 2, 1, 64);
    {
        OwnRng own(107);
        // A run over two tiles at the start of the cache and one past a key tile boundary, runs
        // of one (a written row, a window of one), a run of exactly 64, in several slots.
        runs({{70, 0, 1}, {1, 40, 0}, {3, 61, 2}, {64, 5, 0}, {1, 0, 2}, {130, 70, 1}}, 4, 2, 64);
        runs({{17, 90, 0}, {1, 3, 1}, {66, 10, 2}}, 4, 2, 128);
    }
}
