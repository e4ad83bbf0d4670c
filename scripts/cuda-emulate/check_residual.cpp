// check_residual.cpp: kernels/residual_norm.cu's residual_norm_f32 against double references of
// its banner, launched as src/cuda/kernels.rs does (grid T, block 512, dynamic shared memory D·4
// bytes with the SAE, else 0). Cases: x and steering (rows with coef 0, idx out of range, a real
// add) with y and the SAE encode with a mean; the SAE alone on a row whose two largest latents
// tie exactly (two identical W_enc columns: category must be the first); y alone on an untouched
// residual (r must stay bit-identical).
//
// Bounds, per element (u = 2^-24): r = (r + x) + c·v, three f32 roundings: 3u·(|r|+|x|+|c·v|).
// y = bf16(r·inv·w): inv comes from a block sum of ≤ 16 squares per thread and 9 shuffle levels
// (26 additions; the updated r's own 3u doubles in the square), halved by the square root, plus
// the divide, sqrt and products: ~26u relative on top of y's RNE rounding, 2^-8 relative.
// z = Σ_d W_enc[d, k]·(h_d − b_dec_d) + b_enc: D/8 terms per thread, 8 group partials and b_enc
// (D/8 + 10 additions), plus the error carried in by h (the residual's, the norm's as for inv).
#include "residual_norm.cu"

namespace residual_check {

struct Case {
    int T, D, K, NV;
    bool x, steer, y, sae, mean, tie;
};

static void run_case(const Case& c) {
    const int T = c.T, D = c.D, K = c.K, NV = c.NV;
    const float eps = 1e-5f;
    auto r = randv((size_t)T * D, 2.0f);
    const auto r_in = r;
    const auto x = randv((size_t)T * D), table = randv((size_t)NV * D), mean = randv(D, 0.5f);
    const auto w = to_bf(randv(D, 0.2f));
    std::vector<float> coef = {0.7f, 0.0f, -1.3f, 2.0f, 0.5f};
    std::vector<int> idx = {1, 2, NV, -1, 0};  // a real add, coef 0, idx ≥ NV, idx < 0, a real add
    coef.resize(T, 0.25f);
    idx.resize(T, 1);
    auto W_enc = randv((size_t)D * K, 0.05f), b_enc = randv(K), b_dec = randv(D, 0.1f);
    const int ta = 5, tb = 17;  // the tied latents of the tie case
    if (c.tie) {
        for (int d = 0; d < D; ++d) W_enc[(size_t)d * K + tb] = W_enc[(size_t)d * K + ta];
        b_enc[ta] = b_enc[tb] = 50.0f;  // far above every other latent
    }
    // Reference.
    std::vector<double> r_want((size_t)T * D), r_tol((size_t)T * D), y_want((size_t)T * D), y_tol((size_t)T * D);
    std::vector<double> z_want((size_t)T * K), z_tol((size_t)T * K);
    std::vector<int> cat_tie(T, ta);
    for (int t = 0; t < T; ++t) {
        const bool add = c.steer && coef[t] != 0.0f && idx[t] >= 0 && idx[t] < NV;
        double ss = 0;
        std::vector<double> rn(D), er(D);
        for (int d = 0; d < D; ++d) {
            const size_t i = (size_t)t * D + d;
            const double xv = c.x ? x[i] : 0.0, sv = add ? (double)coef[t] * table[(size_t)idx[t] * D + d] : 0.0;
            rn[d] = (double)r_in[i] + xv + sv;
            er[d] = 3 * U32 * (std::fabs(r_in[i]) + std::fabs(xv) + std::fabs(sv));
            r_want[i] = rn[d];
            r_tol[i] = er[d];
            ss += rn[d] * rn[d];
        }
        const double inv = 1.0 / std::sqrt(ss / D + eps), ey = 26 * U32;
        for (int d = 0; d < D; ++d) {
            const size_t i = (size_t)t * D + d;
            const double y = rn[d] * inv * bf2f(w[d]);
            y_want[i] = y;
            y_tol[i] = UBF * std::fabs(y) * (1 + ey) + ey * std::fabs(y) + 1e-30;
        }
        if (!c.sae) continue;
        double s2 = 0;
        for (int d = 0; d < D; ++d) s2 += (rn[d] - (c.mean ? mean[d] : 0.0)) * (rn[d] - (c.mean ? mean[d] : 0.0));
        const double sc = c.mean ? 1.0 / std::sqrt(s2) : 1.0;
        // The norm's relative error: a sum of ⌈D/512⌉ squares per thread and 9 levels, halved.
        const double esc = c.mean ? (0.5 * ((D + 511) / 512 + 10) + 4) * U32 : 0.0;
        std::vector<double> hb(D), eh(D);
        for (int d = 0; d < D; ++d) {
            const double dm = rn[d] - (c.mean ? mean[d] : 0.0), h = dm * sc;
            hb[d] = h - b_dec[d];
            eh[d] = (er[d] + U32 * std::fabs(dm)) * sc + std::fabs(h) * (esc + U32) +
                    U32 * (std::fabs(h) + std::fabs(b_dec[d]));
        }
        for (int k = 0; k < K; ++k) {
            double z = b_enc[k], a = std::fabs(b_enc[k]), e = 0;
            for (int d = 0; d < D; ++d) {
                z += (double)W_enc[(size_t)d * K + k] * hb[d];
                a += std::fabs((double)W_enc[(size_t)d * K + k] * hb[d]);
                e += std::fabs(W_enc[(size_t)d * K + k]) * eh[d];
            }
            z_want[(size_t)t * K + k] = z;
            z_tol[(size_t)t * K + k] = (D / 8 + 10) * U32 * a + e + 1e-30;
        }
    }
    // The kernel.
    std::vector<bf16_t> y((size_t)T * D, 0x7fc0);
    std::vector<float> z((size_t)T * K, NAN);
    std::vector<int> cat(T, -7);
    launch(dim3{(unsigned)T, 1, 1}, 512,
           [&] {
               residual_norm_f32(r.data(), c.x ? x.data() : nullptr, c.steer ? table.data() : nullptr,
                                 c.steer ? coef.data() : nullptr, c.steer ? idx.data() : nullptr, c.steer ? NV : 0,
                                 w.data(), c.y ? y.data() : nullptr, D, eps, c.sae ? W_enc.data() : nullptr,
                                 c.sae ? b_enc.data() : nullptr, c.sae ? b_dec.data() : nullptr,
                                 c.sae && c.mean ? mean.data() : nullptr, c.sae ? z.data() : nullptr,
                                 c.sae ? cat.data() : nullptr, c.sae ? K : 0);
           },
           c.sae ? (size_t)D * 4 : 0);
    char tag[128];
    snprintf(tag, sizeof tag, "residual_norm T %d D %d%s%s%s%s%s", T, D, c.x ? " x" : "", c.steer ? " steer" : "",
             c.y ? " y" : "", c.sae ? " sae" : "", c.mean ? " mean" : "");
    printf("%s\n", tag);
    if (c.x || c.steer)
        within("  r", r, r_want, r_tol);
    else
        within("  r (untouched: exact)", r, r_want, std::vector<double>(r_want.size(), 0.0));
    if (c.y) within("  y", from_bf(y), y_want, y_tol);
    if (!c.sae) return;
    within("  z", z, z_want, z_tol);
    // category: the first maximum of the z the kernel wrote (its rule, exactly), and with the
    // planted tie the first of the two tied latents.
    std::vector<int> first(T);
    for (int t = 0; t < T; ++t) first[t] = (int)(std::max_element(z.begin() + (size_t)t * K, z.begin() + (size_t)(t + 1) * K) -
                                             (z.begin() + (size_t)t * K));
    same("  category = first max of z", cat, first);
    if (c.tie) same("  category on a tie = the lower latent", cat, cat_tie);
}

}  // namespace residual_check

void run_residual() {
    using residual_check::run_case;
    run_case({5, 5000, 40, 3, true, true, true, true, true, false});
    run_case({3, 1000, 64, 0, false, false, false, true, false, true});
    run_case({2, 1024, 0, 0, false, false, true, false, false, false});
}
