// check_small.cpp: the small kernels, each against a reference written from its file's banner and
// launched as src/cuda/kernels.rs does:
//   embed.cu        embed_bf16: r[t] = f32(table[ids[t]]), zeros for ids outside [0, V); D % 8 == 0
//                   and not (both copy paths). Exact (bf16 → f32 is exact).
//   elementwise.cu  silu_mul_bf16 = bf16(silu(g)·u): f32 expf, add, divide, multiply (8·2^-24
//                   relative, silu's sensitivity to its denominator ≤ 1) then RNE, 2^-8 relative.
//                   The host's grid, and a 3-block grid for the grid-stride loop; with a live row
//                   count, rows past it keep their NaN.
//   sampling.cu     argmax_f32: the first index of the row maximum, with ties inside a block,
//                   across blocks, rows all equal and all −inf, the maximum last; exact, twice on
//                   the same counters (left at 0); with a live row count, the ids of rows past it
//                   keep their old values. logits_at_f32: exact gather, −inf out of range.
//   hybrid.cu       hybrid_expand_f32, hybrid_select_i32 (gating on and off, candidate ids out of
//                   range, ties: the first candidate), hybrid_gather_f32. Exact.
//                   hybrid_keep_f32: stores rows at (slot, pos) and loads them back, rows with a
//                   slot or position out of range left alone both ways. Exact.
//   random.cu       fill_random_bf16: the same output for the same seed, another for another seed,
//                   every value in offset ± scale (up to bf16 rounding), mean and variance of a
//                   uniform within 6 standard errors.
#include "embed.cu"
#include "elementwise.cu"
#include "sampling.cu"
#include "hybrid.cu"
#include "random.cu"

namespace small_check {

static void embed(int T, int V, int D) {
    const auto table = randbf((size_t)V * D);
    std::vector<int> ids(T);
    for (int t = 0; t < T; ++t) ids[t] = (t * 7 + 3) % V;
    ids[1] = -1;
    ids[T - 1] = V;  // out of range: zeros
    std::vector<float> r((size_t)T * D, NAN);
    launch(dim3{(unsigned)T, 1, 1}, 256, [&] { embed_bf16(r.data(), table.data(), ids.data(), V, D); });
    std::vector<double> want((size_t)T * D, 0.0);
    for (int t = 0; t < T; ++t)
        for (int d = 0; d < D; ++d)
            if (ids[t] >= 0 && ids[t] < V) want[(size_t)t * D + d] = bf2f(table[(size_t)ids[t] * D + d]);
    char tag[64];
    snprintf(tag, sizeof tag, "embed_bf16 T %d V %d D %d (exact)", T, V, D);
    within(tag, r, want, std::vector<double>(want.size(), 0.0));
}

// live ≥ 0: a live row count (a device int): rows t ≥ live keep their NaN.
static void silu_mul(int T, int F, int blocks, int live = -1) {
    const auto gu = randv((size_t)T * 2 * F, 3.0f);
    const int rows = live < 0 ? T : std::min(T, live);
    std::vector<double> want((size_t)T * F), tol(want.size());
    std::vector<char> done(want.size(), 0), left(want.size(), 0);
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < F; ++i) {
            const double g = gu[(size_t)t * 2 * F + i], u = gu[(size_t)t * 2 * F + F + i];
            const double v = g / (1 + std::exp(-g)) * u, ef = 8 * U32 * std::fabs(v);
            want[(size_t)t * F + i] = v;
            tol[(size_t)t * F + i] = UBF * (std::fabs(v) + ef) + ef + 1e-30;
            done[(size_t)t * F + i] = t < rows;
            left[(size_t)t * F + i] = t >= rows;
        }
    std::vector<bf16_t> out((size_t)T * F, 0x7fc0);
    const int* lp = live >= 0 ? &live : nullptr;
    launch(dim3{(unsigned)blocks, 1, 1}, 256, [&] { silu_mul_bf16(out.data(), gu.data(), T, F, lp); });
    char tag[64];
    snprintf(tag, sizeof tag, "silu_mul_bf16 T %d F %d grid %d", T, F, blocks);
    if (live >= 0) snprintf(tag + strlen(tag), sizeof tag - strlen(tag), " live %d", live);
    const auto got = from_bf(out);
    within(tag, pick(got, done), pick(want, done), pick(tol, done));
    if (live >= 0) kept_nan("  rows past live keep NaN", got, left);
}

// live ≥ 0: a live row count (a device int): ids of rows b ≥ live keep their old value.
static void argmax(int V, int live = -1) {
    const int B = 6, nb = std::min(std::max((V + 2047) / 2048, 1), 1024);
    auto lg = randv((size_t)B * V);
    auto row = [&](int b) { return lg.data() + (size_t)b * V; };
    // Row 1: the maximum at several indices: other blocks, other warps, and (+256) later in the
    // same thread.
    for (int i : {V - 3, V / 2 + 1, 2 * V / 3, V / 2 + 33, V / 2 + 1 + 256}) row(1)[i] = 10.0f;
    // Row 2: all equal; row 3: all −inf (the first maximum is index 0 in both).
    std::fill(row(2), row(2) + V, -1.5f);
    std::fill(row(3), row(3) + V, -INFINITY);
    row(4)[V - 1] = 10.0f;  // the last entry
    row(5)[0] = 10.0f;      // the first entry
    std::vector<int> want(B);
    for (int b = 0; b < B; ++b) {
        int best = 0;
        for (int i = 1; i < V; ++i)
            if (row(b)[i] > row(b)[best]) best = i;  // strictly larger: the first maximum stays
        want[b] = live >= 0 && b >= live ? -7 : best;  // -7: the ids' old value
    }
    const int* lp = live >= 0 ? &live : nullptr;
    std::vector<float> part_v((size_t)B * nb, NAN);
    std::vector<int> part_i((size_t)B * nb, -3);
    std::vector<unsigned int> counters(B, 0u);
    for (int rep = 0; rep < 2; ++rep) {  // the second run relies on the counters left at 0
        std::vector<int> ids(B, -7);
        launch(dim3{(unsigned)nb, (unsigned)B, 1}, 256,
               [&] { argmax_f32(ids.data(), lg.data(), V, part_v.data(), part_i.data(), counters.data(), lp); });
        char tag[64];
        snprintf(tag, sizeof tag, "argmax_f32 B %d V %d blocks %d run %d", B, V, nb, rep + 1);
        if (live >= 0) snprintf(tag + strlen(tag), sizeof tag - strlen(tag), " live %d", live);
        same(tag, ids, want);
    }
    same("  counters left at 0", counters, std::vector<unsigned int>(B, 0u));
}

static void logits_at(int B, int C, int V) {
    const auto lg = randv((size_t)B * V);
    std::vector<int> ids((size_t)B * C);
    for (size_t e = 0; e < ids.size(); ++e) ids[e] = (int)((e * 37 + 5) % (V + 4)) - 2;  // some < 0, some ≥ V
    std::vector<double> want(ids.size());
    for (int b = 0; b < B; ++b)
        for (int j = 0; j < C; ++j) {
            const int id = ids[(size_t)b * C + j];
            want[(size_t)b * C + j] = id >= 0 && id < V ? (double)lg[(size_t)b * V + id] : -INFINITY;
        }
    std::vector<float> out(ids.size(), NAN);
    launch(dim3{(unsigned)((B * C + 255) / 256), 1, 1}, 256,
           [&] { logits_at_f32(out.data(), lg.data(), ids.data(), B, C, V); });
    char tag[64];
    snprintf(tag, sizeof tag, "logits_at_f32 B %d C %d V %d (exact)", B, C, V);
    within(tag, out, want, std::vector<double>(want.size(), 0.0));
}

static void hybrid(int B, int C, int D, int V) {
    const int rows = B + B * C;
    // expand: candidate rows copy their problem's residual; idx / coef per row.
    auto r = randv((size_t)rows * D);
    const auto r0 = r;
    std::vector<int> category(B), idx(rows, -9);
    for (int b = 0; b < B; ++b) category[b] = (b * 5) % 7;
    const auto coefs = randv(C);
    std::vector<float> coef(rows, NAN);
    launch(dim3{(unsigned)(B * C), 1, 1}, 256,
           [&] { hybrid_expand_f32(r.data(), idx.data(), coef.data(), category.data(), coefs.data(), B, C, D); });
    std::vector<double> r_want(r0.begin(), r0.end()), coef_want(rows);
    std::vector<int> idx_got(B * C), idx_want(B * C);
    for (int b = 0; b < B; ++b) {
        coef_want[b] = 0.0;
        for (int c = 0; c < C; ++c) {
            const int row = B + b * C + c;
            for (int d = 0; d < D; ++d) r_want[(size_t)row * D + d] = r0[(size_t)b * D + d];
            idx_want[b * C + c] = category[b];
            idx_got[b * C + c] = idx[row];
            coef_want[row] = coefs[c];
        }
    }
    char tag[80];
    snprintf(tag, sizeof tag, "hybrid_expand_f32 B %d C %d D %d", B, C, D);
    printf("%s\n", tag);
    const std::vector<double> exact_r(r_want.size(), 0.0), exact_c(rows, 0.0);
    within("  r (exact)", r, r_want, exact_r);
    within("  coef (exact)", coef, coef_want, exact_c);
    same("  idx of the candidates", idx_got, idx_want);

    // select: per problem, gated agreement emits the base token; otherwise the candidate whose
    // token the thinking model scores highest (first on ties; ids outside [0, V) score −inf).
    const auto tl = randv((size_t)B * V);
    std::vector<int> tok(rows), think(B);
    for (int i = 0; i < rows; ++i) tok[i] = (int)(rng() % (V + 2)) - 1;  // a few out of range
    for (int b = 0; b < B; ++b) {
        think[b] = b % 3 == 0 ? tok[b] : (int)(rng() % V);
        if (b % 5 == 1)  // a tie: two candidates with the same token
            tok[B + b * C + C - 1] = tok[B + b * C + 1];
        if (b % 7 == 2)  // every candidate out of range: all −inf, the first wins
            for (int c = 0; c < C; ++c) tok[B + b * C + c] = V + c;
    }
    for (int gating = 1; gating >= 0; --gating) {
        std::vector<int> emit(B, -9), steered(B, -9), win(B, -9);
        launch(dim3{(unsigned)((B + 127) / 128), 1, 1}, 128, [&] {
            hybrid_select_i32(emit.data(), steered.data(), win.data(), tok.data(), think.data(), tl.data(), B, C, V,
                              gating);
        });
        std::vector<int> emit_w(B), steered_w(B), win_w(B), win_g(B);
        for (int b = 0; b < B; ++b) {
            win_g[b] = win[b];
            if (gating && think[b] == tok[b]) {
                emit_w[b] = tok[b];
                steered_w[b] = 0;
                win_w[b] = win_g[b] = 0;  // unspecified by the banner: not compared
                continue;
            }
            int best = 0;
            double bv = -INFINITY;
            for (int c = 0; c < C; ++c) {
                const int t = tok[B + b * C + c];
                const double v = t >= 0 && t < V ? (double)tl[(size_t)b * V + t] : -INFINITY;
                if (v > bv) {  // strictly larger: the first of equals stays
                    best = c;
                    bv = v;
                }
            }
            emit_w[b] = tok[B + b * C + best];
            steered_w[b] = 1;
            win_w[b] = best;
        }
        snprintf(tag, sizeof tag, "hybrid_select_i32 B %d C %d V %d gating %d", B, C, V, gating);
        printf("%s\n", tag);
        same("  emit", emit, emit_w);
        same("  steered", steered, steered_w);
        same("  win (steered rows)", win_g, win_w);
        if (!gating) continue;
        // gather (persistent mode) on this decision: r[b] = saved[steered ? B + b·C + win : b].
        const auto saved = randv((size_t)rows * D);
        std::vector<float> out((size_t)B * D, NAN);
        launch(dim3{(unsigned)B, 1, 1}, 256,
               [&] { hybrid_gather_f32(out.data(), saved.data(), steered.data(), win.data(), nullptr, B, C, D); });
        std::vector<double> g_want((size_t)B * D);
        for (int b = 0; b < B; ++b) {
            const int row = steered_w[b] ? B + b * C + win_w[b] : b;
            for (int d = 0; d < D; ++d) g_want[(size_t)b * D + d] = saved[(size_t)row * D + d];
        }
        snprintf(tag, sizeof tag, "hybrid_gather_f32 B %d C %d D %d (exact)", B, C, D);
        within(tag, out, g_want, std::vector<double>(g_want.size(), 0.0));
    }
}

// hybrid_keep_f32 over T rows of D into kept [slots, L, D]: store, then load into a NaN r.
static void keep(int T, int slots, int L, int D) {
    const auto r = randv((size_t)T * D);
    std::vector<int> slot(T), pos(T);
    for (int t = 0; t < T; ++t) {
        slot[t] = t % slots;
        pos[t] = L - 1 - t / slots;  // distinct (slot, pos) while T ≤ slots·L
    }
    slot[T - 1] = slots;  // out of range: left alone
    pos[T - 2] = L;
    pos[T - 3] = -1;
    std::vector<float> kept((size_t)slots * L * D, NAN);
    launch(dim3{(unsigned)T, 1, 1}, 256,
           [&] { hybrid_keep_f32((float*)r.data(), kept.data(), slot.data(), pos.data(), slots, L, D, 1); });
    std::vector<char> in(T), written(kept.size(), 0);
    for (int t = 0; t < T; ++t) in[t] = slot[t] >= 0 && slot[t] < slots && pos[t] >= 0 && pos[t] < L;
    std::vector<double> want;
    std::vector<float> got;
    for (int t = 0; t < T; ++t)
        for (int d = 0; in[t] && d < D; ++d) {
            const size_t at = ((size_t)slot[t] * L + pos[t]) * D + d;
            written[at] = 1;
            want.push_back(r[(size_t)t * D + d]);
            got.push_back(kept[at]);
        }
    char tag[80];
    snprintf(tag, sizeof tag, "hybrid_keep_f32 store T %d slots %d L %d D %d (exact)", T, slots, L, D);
    within(tag, got, want, std::vector<double>(want.size(), 0.0));
    std::vector<char> rest(written.size());
    for (size_t i = 0; i < rest.size(); ++i) rest[i] = !written[i];
    kept_nan("  other kept rows", kept, rest);
    std::vector<float> back((size_t)T * D, NAN);
    launch(dim3{(unsigned)T, 1, 1}, 256,
           [&] { hybrid_keep_f32(back.data(), kept.data(), slot.data(), pos.data(), slots, L, D, 0); });
    std::vector<char> row_in(back.size()), row_out(back.size());
    for (size_t i = 0; i < back.size(); ++i) row_in[i] = in[i / D], row_out[i] = !in[i / D];
    std::vector<double> r_in;
    for (float x : pick(r, row_in)) r_in.push_back(x);
    snprintf(tag, sizeof tag, "hybrid_keep_f32 load T %d slots %d L %d D %d (exact)", T, slots, L, D);
    within(tag, pick(back, row_in), r_in, std::vector<double>(r_in.size(), 0.0));
    kept_nan("  rows out of range", back, row_out);
}

static void fill_random(unsigned long long n) {
    const float offset = 0.25f, scale = 0.5f;
    const unsigned blocks = (unsigned)std::min<unsigned long long>((n + 255) / 256, 1 << 16);
    auto run = [&](unsigned long long seed, unsigned grid) {
        std::vector<bf16_t> out(n, 0x7fc0);
        launch(dim3{grid, 1, 1}, 256, [&] { fill_random_bf16(out.data(), n, seed, offset, scale); });
        return out;
    };
    const auto a = run(42, blocks), b = run(42, 3), c = run(43, blocks);
    char tag[80];
    snprintf(tag, sizeof tag, "fill_random_bf16 n %llu", n);
    printf("%s\n", tag);
    same("  same seed, other grid: same values", b, a);
    size_t differ = 0;
    for (size_t i = 0; i < n; ++i) differ += a[i] != c[i];
    // Two independent uniform draws rounded to bf16 agree with probability ~2^-7 (bf16 spacing of
    // values in [−0.25, 0.75]); demand that most differ.
    report("  another seed: other values", differ > n * 9 / 10, std::to_string(differ) + " of " + std::to_string(n) + " differ");
    // Range: offset + scale·u with u in [−1, 1), rounded once (≤ 2^-8 relative).
    double mean = 0, m2 = 0, lo = 1e300, hi = -1e300;
    for (bf16_t v : a) {
        const double x = bf2f(v);
        mean += x;
        m2 += x * x;
        lo = std::min(lo, x);
        hi = std::max(hi, x);
    }
    mean /= n;
    const double var = m2 / n - mean * mean, amax = std::fabs(offset) + scale;
    const bool in_range = lo >= offset - scale - UBF * amax && hi <= offset + scale + UBF * amax;
    char buf[160];
    snprintf(buf, sizeof buf, "min %.4f max %.4f in [%.4f, %.4f] ± rounding", lo, hi, offset - scale, offset + scale);
    report("  range", in_range, buf);
    // A uniform on [o − s, o + s): mean o (standard error s/sqrt(3n)), variance s²/3 (standard
    // error s²·sqrt(4/45n)); bf16 rounding moves either by far less.
    const double se_m = scale / std::sqrt(3.0 * n), se_v = scale * scale * std::sqrt(4.0 / (45.0 * n));
    snprintf(buf, sizeof buf, "mean %.5f (want %.5f ± %.5f) var %.5f (want %.5f ± %.5f)", mean, (double)offset,
             6 * se_m, var, scale * scale / 3.0, 6 * se_v);
    report("  moments", std::fabs(mean - offset) <= 6 * se_m && std::fabs(var - scale * scale / 3.0) <= 6 * se_v, buf);
}

}  // namespace small_check

void run_small() {
    using namespace small_check;
    embed(5, 40, 264);
    embed(4, 40, 100);
    silu_mul(3, 700, (3 * 700 + 255) / 256);
    silu_mul(3, 700, 3);
    {
        OwnRng own(104);
        silu_mul(3, 700, 3, 2);  // row 2 past live
        silu_mul(3, 700, 9, 0);  // nothing live
        silu_mul(3, 700, 9, 5);  // live ≥ T: every row
    }
    argmax(5000);
    argmax(300);
    {
        OwnRng own(105);
        argmax(5000, 4);  // rows 4, 5 past live
        argmax(300, 0);
    }
    logits_at(3, 100, 50);
    hybrid(130, 4, 300, 60);
    {
        OwnRng own(106);
        keep(11, 3, 5, 300);
    }
    fill_random(20000);
}
