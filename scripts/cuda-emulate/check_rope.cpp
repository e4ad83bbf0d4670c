// check_rope.cpp: kernels/rope.cu's qkv_rope_bf16 against double references of its banner
// (bias add, rotation of the pairs (i, i + Dh/2) by the f32 angle f32(pos)·inv_freq[i], one bf16
// rounding per output, the cache append for rows t < n_write with slot and pos in range),
// launched as src/cuda/kernels.rs does: grid (T, ceil(((H + Hkv)·Dh/2 + Hkv·Dh) / 256)), block
// 256. inv_freq is an input computed on the host: plain θ^(−2i/Dh) and llama3-scaled (factor 8,
// low/high frequency factors 1 and 4, 8192 original positions), both exercised; positions up to
// 10^5 (where only precise sin/cos keep the angle). Cache entries not written must keep their
// old bits; written ones must equal k_self / v_self exactly.
//
// Bound (u = 2^-24): the biased a, b carry one rounding each; sin and cos of the f32 angle are
// within 2 ulp (≤ 4u absolute, |sin|, |cos| ≤ 1); two products and a sum: ≤ 8u·(|a| + |b|) in
// f32, then the bf16 RNE rounding, 2^-8 relative.
#include "rope.cu"

namespace rope_check {

static std::vector<float> inv_freq(int Dh, double theta, bool llama3) {
    std::vector<float> f(Dh / 2);
    for (int i = 0; i < Dh / 2; ++i) {
        double fr = std::pow(theta, -2.0 * i / Dh);
        if (llama3) {
            const double factor = 8, lo = 1, hi = 4, L = 8192, wl = 2 * M_PI / fr;
            if (wl > L / lo)
                fr /= factor;
            else if (wl >= L / hi) {
                const double sm = (L / wl - lo) / (hi - lo);
                fr = (1 - sm) * fr / factor + sm * fr;
            }
        }
        f[i] = (float)fr;
    }
    return f;
}

static void run_case(int H, int Hkv, int Dh, bool bias_on, bool llama3) {
    const int T = 5, n_write = 4, slots = 2, S = 16, width = (H + 2 * Hkv) * Dh, half = Dh / 2;
    // Rows: a cache write; a position past S (no write; large angle); slot == slots (no write);
    // a write; t ≥ n_write (no write though in range).
    const std::vector<int> pos = {3, 100000, 5, 7, 5}, slot = {0, 1, slots, 1, 0};
    const auto qkv = randv((size_t)T * width, 2.0f), bias = randv(width, 0.5f);
    const auto fr = inv_freq(Dh, llama3 ? 500000.0 : 1000000.0, llama3);
    const auto kc0 = randbf((size_t)slots * S * Hkv * Dh), vc0 = randbf((size_t)slots * S * Hkv * Dh);
    std::vector<double> q_want((size_t)T * H * Dh), q_tol(q_want.size()), k_want((size_t)T * Hkv * Dh),
        k_tol(k_want.size()), v_want(k_want.size()), v_tol(k_want.size());
    for (int t = 0; t < T; ++t) {
        auto u = [&](int c) { return (double)qkv[(size_t)t * width + c] + (bias_on ? bias[c] : 0.0); };
        for (int h = 0; h < H + Hkv; ++h)
            for (int i = 0; i < half; ++i) {
                const double a = u(h * Dh + i), b = u(h * Dh + i + half);
                const double ang = (double)((float)pos[t] * fr[i]);  // the f32 angle
                const double cs = std::cos(ang), sn = std::sin(ang), ef = 8 * U32 * (std::fabs(a) + std::fabs(b));
                const double o0 = a * cs - b * sn, o1 = b * cs + a * sn;
                double* w = h < H ? &q_want[((size_t)t * H + h) * Dh] : &k_want[((size_t)t * Hkv + h - H) * Dh];
                double* e = h < H ? &q_tol[((size_t)t * H + h) * Dh] : &k_tol[((size_t)t * Hkv + h - H) * Dh];
                w[i] = o0;
                w[i + half] = o1;
                e[i] = UBF * (std::fabs(o0) + ef) + ef + 1e-30;
                e[i + half] = UBF * (std::fabs(o1) + ef) + ef + 1e-30;
            }
        for (int e = 0; e < Hkv * Dh; ++e) {
            const double v = u((H + Hkv) * Dh + e);
            v_want[(size_t)t * Hkv * Dh + e] = v;
            v_tol[(size_t)t * Hkv * Dh + e] = UBF * std::fabs(v) * (1 + U32) + U32 * std::fabs(v) + 1e-30;
        }
    }
    std::vector<bf16_t> q((size_t)T * H * Dh, 0x7fc0), ks((size_t)T * Hkv * Dh, 0x7fc0), vs(ks.size(), 0x7fc0);
    auto kc = kc0, vc = vc0;
    const int per_row = (H + Hkv) * Dh / 2 + Hkv * Dh;
    launch(dim3{(unsigned)T, (unsigned)((per_row + 255) / 256), 1}, 256, [&] {
        qkv_rope_bf16(qkv.data(), bias_on ? bias.data() : nullptr, fr.data(), pos.data(), slot.data(), n_write,
                      q.data(), ks.data(), vs.data(), kc.data(), vc.data(), H, Hkv, Dh, slots, S);
    });
    // The caches: old bits everywhere but the written rows, which hold k_self / v_self.
    std::vector<double> kc_want(kc0.size()), vc_want(vc0.size());
    for (size_t i = 0; i < kc0.size(); ++i) {
        kc_want[i] = bf2f(kc0[i]);
        vc_want[i] = bf2f(vc0[i]);
    }
    for (int t = 0; t < n_write; ++t)
        if (slot[t] >= 0 && slot[t] < slots && pos[t] >= 0 && pos[t] < S)
            for (int e = 0; e < Hkv * Dh; ++e) {
                const size_t c = ((size_t)slot[t] * S + pos[t]) * Hkv * Dh + e;
                kc_want[c] = bf2f(ks[(size_t)t * Hkv * Dh + e]);
                vc_want[c] = bf2f(vs[(size_t)t * Hkv * Dh + e]);
            }
    char tag[128];
    snprintf(tag, sizeof tag, "qkv_rope_bf16 T %d H %d Hkv %d Dh %d%s%s", T, H, Hkv, Dh, bias_on ? " bias" : "",
             llama3 ? " llama3" : "");
    printf("%s\n", tag);
    within("  q", from_bf(q), q_want, q_tol);
    within("  k_self", from_bf(ks), k_want, k_tol);
    within("  v_self", from_bf(vs), v_want, v_tol);
    const std::vector<double> exact(kc_want.size(), 0.0);
    within("  k_cache (exact)", from_bf(kc), kc_want, exact);
    within("  v_cache (exact)", from_bf(vc), vc_want, exact);
}

// attention.cu's fused RoPE path (qkv non-null) must give bit for bit what qkv_rope_bf16 followed
// by the same kernel unfused gives: the attention output and both caches (cache entries that
// neither writes keep their old bits in both). Rows as the hybrid step has them: problems with a
// slot each (a position past S: no write; an out-of-range slot, reading only itself), then
// candidate rows at their problem's slot and position, not writing (t ≥ n_write). Each decode
// kernel: 8 keys per step, 1 key, and the grouped one for G = H / Hkv. With `live` ≥ 0, the
// gate-first candidate pass: a live row count, no row writing the cache (n_write 0).
static void fused(int H, int Hkv, int Dh, bool bias_on, int live = -1) {
    OwnRng own(11 + H + Dh + (live >= 0 ? 100 + live : 0));
    using attention_check::decode_fn;
    const int S = 200, chunk = 64, NS = (S + chunk - 1) / chunk, width = (H + 2 * Hkv) * Dh;
    const int np = 5, n_write = live >= 0 ? 0 : np, slots = 4, T = 9, G = H / Hkv;
    const std::vector<int> pslot = {0, 3, 1, 2, slots}, ppos = {0, 64, 199, S, 70};
    std::vector<int> slot(T), pos(T);
    for (int t = 0; t < T; ++t) {
        slot[t] = pslot[t % np];
        pos[t] = ppos[t % np];
    }
    const int* lp = live >= 0 ? &live : nullptr;
    const auto qkv = randv((size_t)T * width, 2.0f), bias = randv(width, 0.5f);
    const auto fr = inv_freq(Dh, 1000000.0, false);
    const auto kc0 = randbf((size_t)slots * S * Hkv * Dh), vc0 = randbf(kc0.size());
    std::vector<unsigned int> counters((size_t)T * H, 0u);
    struct K {
        const char* name;
        decode_fn fn;
        int grid_y;
    };
    std::vector<K> kernels = {{"attention_decode_bf16", attention_decode_bf16, H},
                              {"attention_decode_u1_bf16", attention_decode_u1_bf16, H}};
    if (attention_check::grouped(G)) kernels.push_back({"attention_decode_g*_bf16", attention_check::grouped(G), Hkv});
    const float* b = bias_on ? bias.data() : nullptr;
    for (const auto& k : kernels) {
        auto run = [&](bool fuse, std::vector<bf16_t>& kc, std::vector<bf16_t>& vc) {
            std::vector<bf16_t> q((size_t)T * H * Dh), ks((size_t)T * Hkv * Dh), vs(ks.size());
            if (!fuse) {
                const int per_row = (H + Hkv) * Dh / 2 + Hkv * Dh;
                launch(dim3{(unsigned)T, (unsigned)((per_row + 255) / 256), 1}, 256, [&] {
                    qkv_rope_bf16(qkv.data(), b, fr.data(), pos.data(), slot.data(), n_write, q.data(), ks.data(),
                                  vs.data(), kc.data(), vc.data(), H, Hkv, Dh, slots, S);
                });
            }
            std::vector<float> part_o((size_t)T * H * NS * Dh, NAN), part_ml((size_t)T * H * NS * 2, NAN);
            std::vector<bf16_t> out((size_t)T * H * Dh, 0x7fc0);
            launch(dim3{(unsigned)NS, (unsigned)k.grid_y, (unsigned)T}, 256, [&] {
                k.fn(fuse ? nullptr : q.data(), kc.data(), vc.data(), fuse ? nullptr : ks.data(),
                     fuse ? nullptr : vs.data(), pos.data(), slot.data(), part_o.data(), part_ml.data(), out.data(),
                     counters.data(), H, Hkv, Dh, S, slots, chunk, NS, lp, fuse ? qkv.data() : nullptr, b,
                     fuse ? fr.data() : nullptr, fuse ? n_write : 0, fuse ? kc.data() : nullptr,
                     fuse ? vc.data() : nullptr, nullptr);
            });
            return out;
        };
        auto kc_a = kc0, vc_a = vc0, kc_b = kc0, vc_b = vc0;
        const auto out_a = run(false, kc_a, vc_a), out_b = run(true, kc_b, vc_b);
        char tag[128];
        snprintf(tag, sizeof tag, "%s fused RoPE H %d Hkv %d Dh %d%s%s", k.name, H, Hkv, Dh, bias_on ? " bias" : "",
                 live >= 0 ? (" live " + std::to_string(live)).c_str() : "");
        printf("%s\n", tag);
        same("  out (bits)", out_b, out_a);
        same("  k_cache (bits)", kc_b, kc_a);
        same("  v_cache (bits)", vc_b, vc_a);
        same("  counters at 0", counters, std::vector<unsigned int>(counters.size(), 0u));
        // The unfused path wrote rows (0, 0), (3, 64), (1, 199) and nothing else (nothing with
        // n_write 0).
        long written = 0;
        for (size_t i = 0; i < kc0.size(); ++i) written += kc_a[i] != kc0[i];
        const bool three = n_write ? written > 0 && written <= 3L * Hkv * Dh : written == 0;
        report(n_write ? "  cache rows written: the three in range" : "  cache rows written: none", three,
               std::to_string(written) + " entries");
        if (live >= 0) {  // rows past the live count: untouched by both paths
            long kept = 0;
            for (size_t i = (size_t)live * H * Dh; i < out_b.size(); ++i) kept += out_b[i] == 0x7fc0;
            report("  rows past live untouched", kept == (long)(out_b.size() - (size_t)live * H * Dh),
                   std::to_string(kept) + " values");
        }
    }
}

}  // namespace rope_check

void run_rope() {
    rope_check::run_case(4, 2, 128, true, false);
    rope_check::run_case(6, 2, 64, false, true);
    rope_check::fused(4, 2, 128, true);
    rope_check::fused(12, 2, 128, false);
    rope_check::fused(8, 2, 64, true);
    rope_check::fused(14, 2, 64, true);    // G = 7
    rope_check::fused(16, 2, 128, false);  // G = 8
    rope_check::fused(12, 2, 128, true, 6);  // the gate-first candidate pass: 6 live rows
}
