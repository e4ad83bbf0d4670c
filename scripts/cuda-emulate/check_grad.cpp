// check_grad.cpp: kernels/grad.cu's steering-vector-gradient attention (forward and backward, as
// src/cuda/kernels.rs's vg_attn_fwd / vg_attn_bwd launch them) and its products vg_mm_tc_f32
// (with and without split K, plus vg_mm_reduce_f32) and vg_mm_f32. f32 outputs, bound 1e-4 of
// the largest |ref| (f32 sums of ≤ 200 terms are ~1e-6; a wrong index is O(1)).
#include "grad.cu"

static void attention(int Ta, int S0, int H, int Hkv, int Dh) {
    const int group = H / Hkv, S = S0 + Ta, qd = H * Dh, kvd = Hkv * Dh, ld = qd + 2 * kvd + 8;
    const float scale = 1.0f / std::sqrt((float)Dh);
    auto qkv = randv((size_t)Ta * ld), k_pre = randv((size_t)S0 * kvd), v_pre = randv((size_t)S0 * kvd);
    auto dout = randv((size_t)Ta * qd);
    const float *k = qkv.data() + qd, *v = qkv.data() + qd + kvd;
    auto K = [&](int j, int g, int d) -> double {
        return j < S0 ? k_pre[((size_t)j * Hkv + g) * Dh + d] : k[(size_t)(j - S0) * ld + g * Dh + d];
    };
    auto V = [&](int j, int g, int d) -> double {
        return j < S0 ? v_pre[((size_t)j * Hkv + g) * Dh + d] : v[(size_t)(j - S0) * ld + g * Dh + d];
    };
    // Reference.
    std::vector<double> out((size_t)Ta * qd), lse((size_t)Ta * H), dqkv((size_t)Ta * ld, 0.0);
    for (int i = 0; i < Ta; ++i)
        for (int h = 0; h < H; ++h) {
            const int g = h / group, n = S0 + i + 1;
            std::vector<double> p(n), dp(n);
            double mx = -1e300;
            for (int j = 0; j < n; ++j) {
                double s = 0;
                for (int d = 0; d < Dh; ++d) s += (double)qkv[(size_t)i * ld + h * Dh + d] * K(j, g, d);
                p[j] = s * scale;
                mx = std::max(mx, p[j]);
            }
            double sum = 0;
            for (int j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
            for (int j = 0; j < n; ++j) p[j] /= sum;
            lse[(size_t)i * H + h] = mx + std::log(sum);
            for (int d = 0; d < Dh; ++d) {
                double o = 0;
                for (int j = 0; j < n; ++j) o += p[j] * V(j, g, d);
                out[(size_t)i * qd + h * Dh + d] = o;
            }
            double delta = 0;
            for (int j = 0; j < n; ++j) {
                double s = 0;
                for (int d = 0; d < Dh; ++d) s += (double)dout[(size_t)i * qd + h * Dh + d] * V(j, g, d);
                dp[j] = s;
                delta += p[j] * s;
            }
            for (int j = 0; j < n; ++j) {
                const double ds = p[j] * (dp[j] - delta);
                for (int d = 0; d < Dh; ++d) {
                    dqkv[(size_t)i * ld + h * Dh + d] += scale * ds * K(j, g, d);
                    if (j >= S0) {
                        const size_t r = (size_t)(j - S0) * ld;
                        dqkv[r + qd + g * Dh + d] += scale * ds * qkv[(size_t)i * ld + h * Dh + d];
                        dqkv[r + qd + kvd + g * Dh + d] += p[j] * dout[(size_t)i * qd + h * Dh + d];
                    }
                }
            }
        }
    // The kernels, launched as vg_attn_fwd / vg_attn_bwd launch them.
    std::vector<float> sc((size_t)Ta * H * S, NAN), ds((size_t)Ta * H * S, NAN), o((size_t)Ta * qd, NAN),
        l((size_t)Ta * H, NAN), dq((size_t)Ta * ld, 0.0f);
    const dim3 gs{(unsigned)((S + 63) / 64), (unsigned)((Ta * group + 63) / 64), (unsigned)Hkv};
    const dim3 ga{(unsigned)((Dh + 63) / 64), (unsigned)((Ta * group + 63) / 64), (unsigned)Hkv};
    const dim3 gk{(unsigned)((Dh + 63) / 64), (unsigned)((Ta + 63) / 64), (unsigned)Hkv};
    const dim3 gr{(unsigned)(Ta * H), 1, 1};
    launch(gs, 256, [&] { vg_attn_scores_f32(sc.data(), qkv.data(), k_pre.data(), k, Ta, H, Hkv, Dh, S0, ld, ld, scale); });
    launch(gr, 128, [&] { vg_attn_softmax_f32(sc.data(), l.data(), Ta, H, S0); });
    launch(ga, 256, [&] { vg_attn_apply_f32(o.data(), sc.data(), v_pre.data(), v, Ta, H, Hkv, Dh, S0, ld, qd, 1.0f); });
    launch(gs, 256, [&] { vg_attn_scores_f32(sc.data(), qkv.data(), k_pre.data(), k, Ta, H, Hkv, Dh, S0, ld, ld, scale); });
    launch(gs, 256, [&] { vg_attn_scores_f32(ds.data(), dout.data(), v_pre.data(), v, Ta, H, Hkv, Dh, S0, ld, qd, 1.0f); });
    launch(gr, 128, [&] { vg_attn_dsoftmax_f32(sc.data(), ds.data(), l.data(), Ta, H, S0); });
    launch(ga, 256, [&] { vg_attn_apply_f32(dq.data(), ds.data(), k_pre.data(), k, Ta, H, Hkv, Dh, S0, ld, ld, scale); });
    launch(gk, 256, [&] { vg_attn_kv_grad_f32(dq.data() + qd, ds.data(), qkv.data(), Ta, H, Hkv, Dh, S0, ld, ld, scale); });
    launch(gk, 256, [&] { vg_attn_kv_grad_f32(dq.data() + qd + kvd, sc.data(), dout.data(), Ta, H, Hkv, Dh, S0, qd, ld, 1.0f); });
    char tag[96];
    snprintf(tag, sizeof tag, "Ta %d S0 %d H %d Hkv %d Dh %d", Ta, S0, H, Hkv, Dh);
    printf("attention, %s\n", tag);
    compare("  out", o, out, std::vector<char>(out.size(), 1));
    compare("  lse", l, lse, std::vector<char>(lse.size(), 1));
    std::vector<char> m((size_t)Ta * ld, 0);
    for (int i = 0; i < Ta; ++i)
        for (int c = 0; c < qd + 2 * kvd; ++c) m[(size_t)i * ld + c] = 1;
    compare("  dq | dk | dv", dq, dqkv, m);
}

static void mm_tc(int T, int N, int Kd, bool trans, int splits_per) {
    const int ldx = Kd + 4, ldo = N + 3, ldw = trans ? N : Kd;
    auto x = randv((size_t)T * ldx), bias = randv(N), out0 = randv((size_t)T * ldo);
    std::vector<bf16_t> W((size_t)N * Kd);
    for (auto& w : W) w = f2bf(randv(1, 0.3f)[0]);
    auto B = [&](int k, int n) -> double { return bf2f(trans ? W[(size_t)k * N + n] : W[(size_t)n * Kd + k]); };
    std::vector<double> want(out0.begin(), out0.end());
    for (int t = 0; t < T; ++t)
        for (int n = 0; n < N; ++n) {
            double s = bias[n];
            for (int k = 0; k < Kd; ++k) s += (double)x[(size_t)t * ldx + k] * B(k, n);
            want[(size_t)t * ldo + n] += s;
        }
    if (splits_per < 0) {  // the f32 FMA kernel vg_mm_f32 on the same inputs
        std::vector<float> out = out0;
        const dim3 g{(unsigned)((N + 63) / 64), (unsigned)((T + 63) / 64), 1};
        launch(g, 256, [&] {
            vg_mm_f32(out.data(), x.data(), W.data(), bias.data(), T, N, Kd, ldx, ldw, ldo, trans, 1);
        });
        char tag[96];
        snprintf(tag, sizeof tag, "mm_f32 T %d N %d K %d trans %d", T, N, Kd, (int)trans);
        compare(tag, out, want, std::vector<char>(want.size(), 1));
        return;
    }
    const int nk = (Kd + 31) / 32, per = splits_per ? splits_per : nk, splits = (nk + per - 1) / per;
    std::vector<float> out = out0, part((size_t)splits * T * N, NAN);
    const dim3 g{(unsigned)((N + 127) / 128), (unsigned)((T + 63) / 64), (unsigned)splits};
    launch(g, 128, [&] {
        vg_mm_tc_f32(out.data(), part.data(), x.data(), W.data(), bias.data(), T, N, Kd, ldx, ldw, ldo, trans, 1, per);
    });
    if (splits > 1)
        launch(dim3{4, 1, 1}, 256, [&] { vg_mm_reduce_f32(out.data(), part.data(), bias.data(), T, N, ldo, splits, 1, nullptr); });
    char tag[96];
    snprintf(tag, sizeof tag, "mm_tc T %d N %d K %d trans %d splits %d", T, N, Kd, (int)trans, splits);
    compare(tag, out, want, std::vector<char>(want.size(), 1));
}

// vg_mm_reduce_f32 with a live row count (the end of a split gemm_bf16 in the hybrid step's
// candidate pass): rows < live get Σ_z part in z order (no bias, no accumulate), the others keep
// their NaN.
static void reduce_live(int T, int N, int splits, int live) {
    OwnRng own(103);
    const auto part = randv((size_t)splits * T * N);
    std::vector<float> out((size_t)T * N, NAN);
    std::vector<double> want(out.size(), 0.0);
    std::vector<char> needed(out.size(), 0), dead(out.size(), 0);
    for (int t = 0; t < T; ++t)
        for (int n = 0; n < N; ++n) {
            const size_t e = (size_t)t * N + n;
            needed[e] = t < live;
            dead[e] = t >= live;
            for (int z = 0; z < splits; ++z) want[e] += part[(size_t)z * T * N + e];
        }
    launch(dim3{3, 1, 1}, 256,
           [&] { vg_mm_reduce_f32(out.data(), part.data(), nullptr, T, N, N, splits, 0, &live); });
    char tag[96];
    snprintf(tag, sizeof tag, "mm_reduce T %d N %d splits %d live %d", T, N, splits, live);
    compare(tag, out, want, needed);
    kept_nan("  rows from live keep NaN", out, dead);
}

void run_grad() {
    reduce_live(40, 37, 3, 13);
    attention(70, 25, 4, 2, 64);
    attention(9, 0, 6, 2, 128);
    attention(40, 70, 8, 8, 64);
    mm_tc(70, 136, 64, false, 0);
    mm_tc(70, 136, 64, true, 0);
    mm_tc(20, 24, 256, true, 2);
    mm_tc(20, 24, 256, false, 3);
    mm_tc(70, 77, 45, false, -1);
    mm_tc(70, 77, 45, true, -1);
}
