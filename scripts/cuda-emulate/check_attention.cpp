// check_attention.cpp: kernels/attention.cu's decode attention (attention_decode_bf16 and
// attention_decode_u1_bf16, Dh 64 and 128) against a double softmax over the keys its banner
// names: positions 0 .. pos[t]−1 of the cache slot (none when the slot is out of range) plus the
// token's own k_self / v_self. Launched as src/cuda/kernels.rs does: grid (NS, H, T), block 256,
// chunk 64, NS = ceil(S / 64) fixed for the launch, so rows use 1 .. NS−1 splits (some with no
// cache key at all) and the last split of each head combines the partials in-kernel; the grouped
// kernel attention_decode_g{G}_bf16 for G = H / Hkv on grid (NS, Hkv, T), for several G. The
// kernels run back to back on one counter array, which must be left at zero. Then with a live
// row count (rows ≥ live untouched, counters still 0), each kernel twice. With `runs`, read-only
// runs (run[t] = a: keys at positions < pos[a] from the cache, then k_self / v_self rows a .. t):
// a run across a split boundary, one from position 0 (no cache key), rows alone beside them.
//
// Bound on out (bf16): its RNE rounding, 2^-8 relative, on top of the f32 error: each score
// q·k·scale is off by at most E = (Dh/32 + 8)·2^-24·Σ|q·k|·scale (a lane's products, 5 shuffle
// levels, the scaling), which moves each softmax weight by e^{±2E}; the exps, rescalings and the
// sums over ≤ L keys and the splits add (L + 64)·4·2^-24 relative. Both act on Σ p·|v|.
#include "attention.cu"

namespace attention_check {
// (The fused-RoPE path of these kernels is checked in check_rope.cpp, against qkv_rope_bf16.)

using decode_fn = void (*)(const bf16_t*, const bf16_t*, const bf16_t*, const bf16_t*, const bf16_t*, const int*,
                           const int*, float*, float*, bf16_t*, unsigned int*, int, int, int, int, int, int, int,
                           const int*, const float*, const float*, const float*, int, bf16_t*, bf16_t*,
                           const int*);

// The grouped kernel for G = H / Hkv query heads per kv head (grid y = Hkv).
static decode_fn grouped(int G) {
    switch (G) {
        case 2: return attention_decode_g2_bf16;
        case 3: return attention_decode_g3_bf16;
        case 4: return attention_decode_g4_bf16;
        case 5: return attention_decode_g5_bf16;
        case 6: return attention_decode_g6_bf16;
        case 7: return attention_decode_g7_bf16;
        case 8: return attention_decode_g8_bf16;
        default: return nullptr;
    }
}

struct Kernel {
    const char* name;
    decode_fn fn;
    int grid_y;  // H (one head per block) or Hkv (a GQA group per block)
};

static void decode(int Dh, int H = 4, int Hkv = 2, bool runs = false) {
    const int slots = 3, S = 320, chunk = 64, NS = (S + chunk - 1) / chunk, group = H / Hkv;
    std::vector<int> pos = {0, 63, 64, 200, 130}, slot = {2, 0, -1, 1, 0}, run;
    if (runs) {
        pos = {10, 61, 62, 63, 64, 65, 0, 1, 2, 62};
        slot = {1, 0, 0, 0, 0, 0, 2, 2, 2, 0};
        run = {0, 1, 1, 1, 1, 1, 6, 6, 6, 9};
    }
    const int T = (int)pos.size();
    const int* rp = runs ? run.data() : nullptr;
    const auto q = randbf((size_t)T * H * Dh, 1.5f);
    const auto kc = randbf((size_t)slots * S * Hkv * Dh), vc = randbf((size_t)slots * S * Hkv * Dh);
    const auto ks = randbf((size_t)T * Hkv * Dh), vs = randbf((size_t)T * Hkv * Dh);
    const double scale = 1.0 / std::sqrt((double)Dh);
    std::vector<double> want((size_t)T * H * Dh), tol(want.size());
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < H; ++h) {
            const int g = h / group, s = slot[t], a = runs ? run[t] : t, pa = pos[a];
            std::vector<const bf16_t*> kr, vr;  // the attended keys and values
            for (int j = 0; j < pa && s >= 0 && s < slots; ++j) {
                kr.push_back(&kc[(((size_t)s * S + j) * Hkv + g) * Dh]);
                vr.push_back(&vc[(((size_t)s * S + j) * Hkv + g) * Dh]);
            }
            for (int i = a; i <= t; ++i) {  // the run's rows up to the token itself
                kr.push_back(&ks[((size_t)i * Hkv + g) * Dh]);
                vr.push_back(&vs[((size_t)i * Hkv + g) * Dh]);
            }
            const size_t L = kr.size();
            const bf16_t* qr = &q[((size_t)t * H + h) * Dh];
            std::vector<double> sc(L);
            double mx = -1e300, E = 0;
            for (size_t j = 0; j < L; ++j) {
                double d = 0, a = 0;
                for (int i = 0; i < Dh; ++i) {
                    d += (double)bf2f(qr[i]) * bf2f(kr[j][i]);
                    a += std::fabs((double)bf2f(qr[i]) * bf2f(kr[j][i]));
                }
                sc[j] = d * scale;
                E = std::max(E, (Dh / 32 + 8) * U32 * a * scale);
                mx = std::max(mx, sc[j]);
            }
            double sum = 0;
            for (size_t j = 0; j < L; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
            const double rel = 4 * E + (L + 64) * 4 * U32;
            for (int d = 0; d < Dh; ++d) {
                double o = 0, a = 0;
                for (size_t j = 0; j < L; ++j) {
                    o += sc[j] * bf2f(vr[j][d]);
                    a += sc[j] * std::fabs(bf2f(vr[j][d]));
                }
                o /= sum;
                const double ef = rel * a / sum;
                want[((size_t)t * H + h) * Dh + d] = o;
                tol[((size_t)t * H + h) * Dh + d] = UBF * (std::fabs(o) + ef) + ef + 1e-30;
            }
        }
    std::vector<unsigned int> counters((size_t)T * H, 0u);
    char gname[40];
    snprintf(gname, sizeof gname, "attention_decode_g%d_bf16", group);
    std::vector<Kernel> kernels = {{"attention_decode_bf16", attention_decode_bf16, H},
                                   {"attention_decode_u1_bf16", attention_decode_u1_bf16, H}};
    if (grouped(group)) kernels.push_back({gname, grouped(group), Hkv});
    for (const auto& [name, fn, grid_y] : kernels) {
        std::vector<float> part_o((size_t)T * H * NS * Dh, NAN), part_ml((size_t)T * H * NS * 2, NAN);
        std::vector<bf16_t> out((size_t)T * H * Dh, 0x7fc0);  // NaN: every entry must be written
        launch(dim3{(unsigned)NS, (unsigned)grid_y, (unsigned)T}, 256, [&] {
            fn(q.data(), kc.data(), vc.data(), ks.data(), vs.data(), pos.data(), slot.data(), part_o.data(),
               part_ml.data(), out.data(), counters.data(), H, Hkv, Dh, S, slots, chunk, NS, nullptr, nullptr, nullptr, nullptr, 0, nullptr,
               nullptr, rp);
        });
        char tag[96];
        snprintf(tag, sizeof tag, "%s Dh %d T %d H %d Hkv %d NS %d%s", name, Dh, T, H, Hkv, NS, runs ? " runs" : "");
        within(tag, from_bf(out), want, tol);
    }
    same("  counters left at 0", counters, std::vector<unsigned int>(counters.size(), 0u));
    if (runs) return;

    // A live row count (the hybrid step's candidate rows): rows t ≥ live return at once, so their
    // out keeps its NaN and their counters stay 0; rows < live as above. Each kernel twice on the
    // same counters, which the first run must leave at 0 for the second.
    const int live = 3;
    std::vector<char> done(want.size(), 0);
    for (size_t i = 0; i < done.size(); ++i) done[i] = i < (size_t)live * H * Dh;  // rows first
    std::vector<char> left(done.size());
    for (size_t i = 0; i < done.size(); ++i) left[i] = !done[i];
    for (const auto& [name, fn, grid_y] : kernels)
        for (int rep = 0; rep < 2; ++rep) {
            std::vector<float> part_o((size_t)T * H * NS * Dh, NAN), part_ml((size_t)T * H * NS * 2, NAN);
            std::vector<bf16_t> out((size_t)T * H * Dh, 0x7fc0);
            launch(dim3{(unsigned)NS, (unsigned)grid_y, (unsigned)T}, 256, [&] {
                fn(q.data(), kc.data(), vc.data(), ks.data(), vs.data(), pos.data(), slot.data(), part_o.data(),
                   part_ml.data(), out.data(), counters.data(), H, Hkv, Dh, S, slots, chunk, NS, &live, nullptr, nullptr, nullptr, 0,
                   nullptr, nullptr, nullptr);
            });
            const auto got = from_bf(out);
            char tag[96];
            snprintf(tag, sizeof tag, "%s Dh %d T %d live %d run %d", name, Dh, T, live, rep + 1);
            within(tag, pick(got, done), pick(want, done), pick(tol, done));
            kept_nan("  rows past live keep NaN", got, left);
            same("  counters at 0", counters, std::vector<unsigned int>(counters.size(), 0u));
        }
}

}  // namespace attention_check

void run_attention() {
    attention_check::decode(64);
    attention_check::decode(128);
    // GQA groups of the real shapes: Qwen2.5-1.5B (12 / 2 = 6 heads per kv head, Dh 128),
    // Llama-3.1-8B (32 / 8 = 4), Qwen2.5-7B (28 / 4 = 7), and 8 at Dh 64.
    attention_check::decode(128, 12, 2);
    attention_check::decode(128, 8, 2);
    attention_check::decode(128, 14, 2);
    attention_check::decode(64, 16, 2);
    // Read-only runs (steering windows), one head per block and the GQA groups.
    attention_check::decode(128, 12, 2, true);
    attention_check::decode(64, 4, 2, true);
}
