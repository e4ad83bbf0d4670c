// check_grad_small.cpp: the small kernels of kernels/grad.cu (included by check_grad.cpp), each
// against a double reference written from its banner and launched as src/cuda/kernels.rs's vg_*
// wrapper launches it (the same grid, block and argument order):
//   vg_rmsnorm_fwd_f32  y = x·r·w, r = 1/sqrt(mean x² + eps); a zero row (r = eps^−½) and a row
//                       where eps matters. Grid T, block 256; D above and below the block.
//   vg_rmsnorm_bwd_f32  dx += r·w·dy − x·(r³/D)·Σ x·w·dy (the derivative of the forward); dx starts
//                       nonzero (it accumulates).
//   vg_rope_f32         rotate-half pairs by ±f32(pos)·inv_freq (forward and inverse), columns past
//                       heads·Dh untouched; the host's grid and a 1-block grid (grid-stride loop).
//   vg_silu_mul_*_f32   silu(g)·u and its two derivatives; |g| up to 30; the host's grids, grids
//                       that make both loops of the backward stride, and F > 64·256.
//   vg_xent_f32         loss = logsumexp(c·z) − c·z_y; with want_grad z = c·(softmax(c·z) − onehot);
//                       z untouched without it; y outside [0, V): NaN loss, no onehot; a row of
//                       large logits (max subtraction); V below and above the 1024-thread block.
//   vg_rows_f32         gather (repeats, skipped indices keep dst) and scatter-add (distinct idx).
//   vg_steer_rows_f32   add v (+ extra, or null) at idx (a repeat adds twice); reduce Σ_r h[idx[r]]
//                       into v; indices outside h's rows skipped; the other buffer untouched.
// Bounds are per element (u = 2^-24, one f32 rounding): each is built where it is used from the
// roundings on the kernel's path (first order), with 2 ulp (4u relative) for CUDA's expf and
// sinf / cosf, 1 ulp for logf.

namespace grad_small_check {

static double sq(double x) { return x * x; }
// Tree depth of a 256- or 1024-thread block_sum after each thread's own `per` sequential terms:
// ≤ per additions in the thread, 5 shuffle levels in the warp, 5 more over the warps' partials.
static double sum_depth(int n, int threads) { return (double)((n + threads - 1) / threads) + 10.0; }

static void rmsnorm(int T, int D) {
    const float eps = 1e-6f;
    auto x = randv((size_t)T * D, 1.5f);
    std::fill(x.begin() + D, x.begin() + 2 * D, 0.0f);           // row 1: zeros, r = eps^−½
    for (int i = 0; i < D; ++i) x[2 * (size_t)D + i] *= 1e-3f;  // row 2: mean x² ~ eps
    const auto w = to_bf(randv(D, 0.3f));
    auto W = [&](int i) { return (double)bf2f(w[i]); };
    // Forward. inv: the sum of squares (one rounding per square, sum_depth additions of positive
    // terms), /D and +eps (2u), halved by the square root (+u), the reciprocal (+u); y: two
    // products (2u).
    const double e_inv = (sum_depth(D, 256) + 2) / 2 * U32 + 2 * U32;
    std::vector<double> r_want(T), r_tol(T), y_want((size_t)T * D), y_tol(y_want.size());
    for (int t = 0; t < T; ++t) {
        double ss = 0;
        for (int i = 0; i < D; ++i) ss += sq(x[(size_t)t * D + i]);
        const double inv = 1.0 / std::sqrt(ss / D + (double)eps);
        r_want[t] = inv;
        r_tol[t] = e_inv * inv;
        for (int i = 0; i < D; ++i) {
            const double y = x[(size_t)t * D + i] * inv * W(i);
            y_want[(size_t)t * D + i] = y;
            y_tol[(size_t)t * D + i] = (e_inv + 2 * U32) * std::fabs(y) + 1e-30;
        }
    }
    std::vector<float> y((size_t)T * D, NAN), r(T, NAN);
    launch(dim3{(unsigned)T, 1, 1}, 256, [&] { vg_rmsnorm_fwd_f32(y.data(), r.data(), x.data(), w.data(), D, eps); });
    char tag[80];
    snprintf(tag, sizeof tag, "vg_rmsnorm_fwd_f32 T %d D %d", T, D);
    printf("%s\n", tag);
    within("  y", y, y_want, y_tol);
    within("  r", r, r_want, r_tol);

    // Backward, from the f32 r of the double forward (an input: its rounding is not the kernel's).
    // s = Σ x·w·dy: two products per term, sum_depth additions of mixed signs: (depth + 2)u·Σ|.|;
    // c = r³·s/D: 4 roundings; dx + ((r·w)·dy − x·c): 2 + 1 + 1 + 1 roundings of the terms shown.
    const auto dy = randv((size_t)T * D), dx0 = randv((size_t)T * D, 0.5f);
    std::vector<float> rf(T);
    for (int t = 0; t < T; ++t) rf[t] = (float)r_want[t];
    std::vector<double> dx_want((size_t)T * D), dx_tol(dx_want.size());
    for (int t = 0; t < T; ++t) {
        const double ri = rf[t];
        double s = 0, sa = 0;
        for (int i = 0; i < D; ++i) {
            const double p = x[(size_t)t * D + i] * W(i) * dy[(size_t)t * D + i];
            s += p;
            sa += std::fabs(p);
        }
        const double c = ri * ri * ri * s / D, ec = ri * ri * ri / D * (sum_depth(D, 256) + 6) * U32 * sa;
        for (int i = 0; i < D; ++i) {
            const size_t e = (size_t)t * D + i;
            const double a = ri * W(i) * dy[e], b = x[e] * c, v = dx0[e] + a - b;
            dx_want[e] = v;
            dx_tol[e] = U32 * (3 * std::fabs(a) + 2 * std::fabs(b) + std::fabs(v)) + std::fabs(x[e]) * ec + 1e-30;
        }
    }
    auto dx = dx0;
    launch(dim3{(unsigned)T, 1, 1}, 256,
           [&] { vg_rmsnorm_bwd_f32(dx.data(), dy.data(), x.data(), rf.data(), w.data(), D); });
    snprintf(tag, sizeof tag, "vg_rmsnorm_bwd_f32 T %d D %d (dx +=)", T, D);
    within(tag, dx, dx_want, dx_tol);
}

// grid 0: the host's grid_stride(T·heads·half).
static void rope(int T, int heads, int half, int ld, int pos0, bool inverse, unsigned grid) {
    const int total = T * heads * half;
    if (!grid) grid = (unsigned)std::clamp((total + 255) / 256, 1, 1 << 16);
    const auto x0 = randv((size_t)T * ld, 2.0f);
    std::vector<float> fr(half);
    for (int i = 0; i < half; ++i) fr[i] = (float)std::pow(1e6, -(double)i / half);
    // Untouched columns: exact. Rotated: sinf and cosf of the f32 angle within 2 ulp (≤ 2u
    // absolute, both ≤ 1 in size): 2u·(|a| + |b|); two products and a sum or difference, one
    // rounding each: ≤ 2u·(|a| + |b|) more.
    std::vector<double> want(x0.begin(), x0.end()), tol(want.size(), 0.0);
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < half; ++i) {
                const size_t p = (size_t)t * ld + (size_t)h * 2 * half + i;
                const double a = x0[p], b = x0[p + half];
                const double ang = (double)((float)(pos0 + t) * fr[i]) * (inverse ? -1 : 1);
                want[p] = a * std::cos(ang) - b * std::sin(ang);
                want[p + half] = b * std::cos(ang) + a * std::sin(ang);
                tol[p] = tol[p + half] = 4 * U32 * (std::fabs(a) + std::fabs(b)) + 1e-30;
            }
    auto x = x0;
    launch(dim3{grid, 1, 1}, 256,
           [&] { vg_rope_f32(x.data(), fr.data(), T, heads, half, ld, pos0, (int)inverse); });
    printf("vg_rope_f32 T %d heads %d Dh %d ld %d pos0 %d grid %u\n", T, heads, 2 * half, ld, pos0, grid);
    within(inverse ? "  x (inverse)" : "  x (forward)", x, want, tol);
}

// Gate values: normal with σ 3, and a few at ±20, ±30 (the sigmoid saturated both ways).
static std::vector<float> gate_up(int T, int F) {
    auto gu = randv((size_t)T * 2 * F, 3.0f);
    const float far[4] = {20.0f, -20.0f, 30.0f, -30.0f};
    for (int k = 0; k < 4; ++k) gu[(size_t)(k % T) * 2 * F + (size_t)(7 * k + 1) % F] = far[k];
    return gu;
}

// grid.x 0: the host's grids.
static void silu_mul(int T, int F, dim3 fwd_grid, dim3 bwd_grid) {
    if (!fwd_grid.x) fwd_grid = dim3{(unsigned)std::clamp((T * F + 255) / 256, 1, 1 << 16), 1, 1};
    if (!bwd_grid.x) bwd_grid = dim3{(unsigned)std::min((F + 255) / 256, 64), (unsigned)std::min(T, 65535), 1};
    const auto gu = gate_up(T, F), da = randv((size_t)T * F);
    std::vector<double> a_want((size_t)T * F), a_tol(a_want.size()), d_want((size_t)T * 2 * F), d_tol(d_want.size());
    for (int t = 0; t < T; ++t)
        for (int f = 0; f < F; ++f) {
            const double g = gu[(size_t)t * 2 * F + f], u = gu[(size_t)t * 2 * F + F + f], d = da[(size_t)t * F + f];
            const double s = 1 / (1 + std::exp(-g)), act = g * s * u;
            // σ: expf's 4u, passed at most whole through 1 + e^−g, the add and divide: 6u.
            // act: σ's 6u and two more roundings (g·σ, ·u) — the kernel divides g by 1 + e^−g
            // instead, the same count.
            a_want[(size_t)t * F + f] = act;
            a_tol[(size_t)t * F + f] = 8 * U32 * std::fabs(act) + 1e-30;
            // d up = da·g·σ: σ's 6u and two products.
            const double du = d * g * s;
            d_want[(size_t)t * 2 * F + F + f] = du;
            d_tol[(size_t)t * 2 * F + F + f] = 8 * U32 * std::fabs(du) + 1e-30;
            // d gate = A·q, A = da·u·σ (8u as above), q = 1 + g·(1 − σ): σ's absolute 6u·σ and
            // 1 − σ's rounding, times |g|, are ≤ 6u·|g|; the product and the add, u·|q| — plus the
            // final product's u. q can cancel (g ≈ −1.28), hence the absolute 6u·|g| term.
            const double A = d * u * s, q = 1 + g * (1 - s);
            d_want[(size_t)t * 2 * F + f] = A * q;
            d_tol[(size_t)t * 2 * F + f] = std::fabs(A) * (10 * U32 * std::fabs(q) + 6 * U32 * std::fabs(g)) + 1e-30;
        }
    std::vector<float> act((size_t)T * F, NAN), dgu((size_t)T * 2 * F, NAN);
    launch(fwd_grid, 256, [&] { vg_silu_mul_fwd_f32(act.data(), gu.data(), T, F); });
    launch(bwd_grid, 256, [&] { vg_silu_mul_bwd_f32(dgu.data(), da.data(), gu.data(), T, F); });
    char tag[96];
    snprintf(tag, sizeof tag, "vg_silu_mul_fwd_f32 T %d F %d grid %u", T, F, fwd_grid.x);
    within(tag, act, a_want, a_tol);
    snprintf(tag, sizeof tag, "vg_silu_mul_bwd_f32 T %d F %d grid (%u, %u)", T, F, bwd_grid.x, bwd_grid.y);
    within(tag, dgu, d_want, d_tol);
}

static void xent(int R, int V, float c, const std::vector<int>& y, int big_row) {
    auto z0 = randv((size_t)R * V, 2.0f);
    for (int i = 0; i < V; ++i) z0[(size_t)big_row * V + i] *= 20.0f;  // exp(c·z) overflows f32
    const double n_add = sum_depth(V, 1024);
    std::vector<double> l_want(R), l_tol(R), g_want((size_t)R * V), g_tol(g_want.size());
    std::vector<char> bad(R);
    for (int r = 0; r < R; ++r) {
        const float* zr = z0.data() + (size_t)r * V;
        bad[r] = y[r] < 0 || y[r] >= V;
        double mx = -INFINITY, M = 0, sum = 0;
        for (int i = 0; i < V; ++i) {
            mx = std::max(mx, (double)c * zr[i]);
            M = std::max(M, std::fabs((double)c * zr[i]));
        }
        for (int i = 0; i < V; ++i) sum += std::exp((double)c * zr[i] - mx);
        const double L = std::log(sum), lse = mx + L;
        // lse: each exponent c·z_i − max is off by ≤ u·|c·z_i| + u·|c·z_i − max| ≤ 3u·M (M =
        // max |c·z|), expf adds 4u relative, the positive sum n_add·u relative: all absolute in
        // log Σ; logf 1 ulp (2u·|L|); + max, u·|lse|.
        const double e_lse = U32 * (3 * M + 4 + n_add + 2 * L + std::fabs(lse));
        if (!bad[r]) {
            l_want[r] = lse - (double)c * zr[y[r]];
            l_tol[r] = e_lse + U32 * (M + std::fabs(l_want[r]));  // c·z_y and the difference
        }
        for (int i = 0; i < V; ++i) {
            const double a = (double)c * zr[i] - lse, p = std::exp(a), g = c * (p - (i == y[r] ? 1.0 : 0.0));
            g_want[(size_t)r * V + i] = g;
            // The exponent: c·z_i (u·M), lse's error, its own rounding (u·|a|); expf 4u; ·c u;
            // − c, u·|g|.
            g_tol[(size_t)r * V + i] = std::fabs(c) * p * (e_lse + U32 * (M + std::fabs(a) + 5)) + U32 * std::fabs(g) + 1e-30;
        }
    }
    char tag[96];
    for (int want_grad = 0; want_grad < 2; ++want_grad) {
        auto z = z0;
        std::vector<float> loss(R, -7.0f);
        launch(dim3{(unsigned)R, 1, 1}, 1024, [&] { vg_xent_f32(z.data(), loss.data(), y.data(), V, c, want_grad); });
        snprintf(tag, sizeof tag, "vg_xent_f32 R %d V %d c %g want_grad %d", R, V, (double)c, want_grad);
        printf("%s\n", tag);
        std::vector<float> lg;
        std::vector<double> lw, lt;
        bool nan_ok = true;
        for (int r = 0; r < R; ++r)
            if (bad[r])
                nan_ok = nan_ok && std::isnan(loss[r]);
            else {
                lg.push_back(loss[r]);
                lw.push_back(l_want[r]);
                lt.push_back(l_tol[r]);
            }
        within("  loss", lg, lw, lt);
        if (std::count(bad.begin(), bad.end(), 1)) report("  loss NaN where y is outside [0, V)", nan_ok, "");
        if (want_grad)
            within("  z = c·(softmax(c·z) − onehot(y))", z, g_want, g_tol);
        else
            within("  z untouched (exact)", z, std::vector<double>(z0.begin(), z0.end()),
                   std::vector<double>(z0.size(), 0.0));
    }
}

static void rows(int R, int D, int rows_n, const std::vector<int>& idx, bool scatter) {
    const unsigned grid = (unsigned)std::clamp((R * D + 255) / 256, 1, 1 << 16);
    const auto src = randv((size_t)(scatter ? R : rows_n) * D), dst0 = randv((size_t)(scatter ? rows_n : R) * D);
    std::vector<double> want(dst0.begin(), dst0.end()), tol(want.size(), 0.0);
    for (int r = 0; r < R; ++r) {
        if (idx[r] < 0 || idx[r] >= rows_n) continue;  // skipped: dst keeps its values
        for (int i = 0; i < D; ++i)
            if (scatter) {
                double& w = want[(size_t)idx[r] * D + i];
                w += src[(size_t)r * D + i];
                tol[(size_t)idx[r] * D + i] = U32 * std::fabs(w);  // one f32 addition
            } else
                want[(size_t)r * D + i] = src[(size_t)idx[r] * D + i];  // a copy: exact
        }
    auto dst = dst0;
    launch(dim3{grid, 1, 1}, 256,
           [&] { vg_rows_f32(dst.data(), src.data(), idx.data(), R, D, rows_n, (int)scatter); });
    char tag[96];
    snprintf(tag, sizeof tag, "vg_rows_f32 %s R %d D %d rows %d", scatter ? "scatter-add" : "gather (exact)", R, D,
             rows_n);
    within(tag, dst, want, tol);
}

static void steer_rows(int D, int rows_n, const std::vector<int>& idx, bool add, bool with_extra) {
    const int R = (int)idx.size();
    const auto h0 = randv((size_t)rows_n * D), v0 = randv(D), extra = randv(D, 0.5f);
    auto h = h0, v = v0;
    if (!add) std::fill(v.begin(), v.end(), NAN);  // every element must be written
    launch(dim3{(unsigned)((D + 255) / 256), 1, 1}, 256, [&] {
        vg_steer_rows_f32(h.data(), v.data(), with_extra ? extra.data() : nullptr, idx.data(), R, D, rows_n, (int)add);
    });
    std::vector<int> hits(rows_n, 0);
    for (int r : idx)
        if (r >= 0 && r < rows_n) ++hits[r];
    char tag[96];
    snprintf(tag, sizeof tag, "vg_steer_rows_f32 %s D %d rows %d R %d", add ? (with_extra ? "add v + extra" : "add v")
                                                                            : "reduce into v",
             D, rows_n, R);
    printf("%s\n", tag);
    const std::vector<double> h_old(h0.begin(), h0.end()), v_old(v0.begin(), v0.end());
    if (add) {
        // k adds of a = v + extra (one rounding) to a row: k·u·(|h| + (k + 1)·|a|).
        std::vector<double> want = h_old, tol(want.size(), 0.0);
        for (int row = 0; row < rows_n; ++row)
            for (int i = 0; i < D; ++i) {
                const double a = (double)v0[i] + (with_extra ? extra[i] : 0.0), k = hits[row];
                const size_t e = (size_t)row * D + i;
                want[e] += k * a;
                tol[e] = k * U32 * (std::fabs(h_old[e]) + (k + 1) * std::fabs(a));
            }
        within("  h", h, want, tol);
        within("  v untouched (exact)", v, v_old, std::vector<double>(D, 0.0));
    } else {
        // n terms summed in order from 0: (n − 1)·u·Σ|terms|.
        std::vector<double> want(D, 0.0), tol(D, 0.0);
        int n = 0;
        for (int r : idx)
            if (r >= 0 && r < rows_n) {
                ++n;
                for (int i = 0; i < D; ++i) {
                    want[i] += h0[(size_t)r * D + i];
                    tol[i] += std::fabs(h0[(size_t)r * D + i]);
                }
            }
        for (auto& t : tol) t = std::max(n - 1, 0) * U32 * t + 1e-30;
        within("  v", v, want, tol);
        within("  h untouched (exact)", h, h_old, std::vector<double>(h_old.size(), 0.0));
    }
}

}  // namespace grad_small_check

void run_grad_small() {
    using namespace grad_small_check;
    rmsnorm(4, 1000);
    rmsnorm(3, 37);
    rope(7, 3, 20, 133, 5, false, 0);
    rope(5, 2, 32, 135, 70000, true, 0);
    rope(7, 3, 20, 133, 5, true, 1);
    silu_mul(5, 333, dim3{0, 1, 1}, dim3{0, 1, 1});
    silu_mul(5, 333, dim3{2, 1, 1}, dim3{1, 2, 1});
    silu_mul(2, 16500, dim3{0, 1, 1}, dim3{0, 1, 1});
    xent(6, 1000, 1.0f, {3, 999, 0, 500, 1000, -1}, 3);
    xent(3, 3001, 0.7f, {3000, 17, 1234}, 1);
    rows(7, 45, 10, {3, -1, 9, 10, 0, 9, 4}, false);
    rows(7, 300, 10, {3, -1, 9, 10, 0, 7, 1000}, true);
    steer_rows(300, 6, {2, -1, 5, 6, 2}, true, true);
    steer_rows(45, 6, {0, 4, 7}, true, false);
    steer_rows(300, 6, {2, -1, 5, 6, 0, 2}, false, false);
}
