// attention.cu: decode attention over the bf16 KV cache (flash-decoding).
//
// Common: GQA, kv head = h / (H / Hkv); scale 1/sqrt(Dh); scores, softmax and accumulation in f32
// (exp is the precise expf); the output is rounded to bf16 once. Dh ∈ {64, 128}.
// Caches bf16 [slots, S, Hkv, Dh].
//
// attention_decode_bf16 — token t (query heads q[t] bf16 [T, H, Dh]) attends positions
//   0 .. pos[t]−1 of k_cache/v_cache[slot[t]] plus its own k_self/v_self[t] (bf16 [T, Hkv, Dh]) at
//   position pos[t]: L = pos[t] + 1 keys. Rows that did not write the cache still see themselves.
//   run (nullable, i32 [T]): read-only runs (a steering window's candidate rerun, model.rs
//   `Step::run_start`): token t's run starts at row a = run[t] ≤ t, rows a..t holding consecutive
//   positions of one slot; positions 0 .. pos[a]−1 come from the cache and pos[a] .. pos[t] from
//   k_self/v_self rows a .. t. run[t] = t (or run null) is the case above. Not with fused RoPE
//   (the run's other rows would have no rotated K/V): the host refuses that pair.
//   The keys are cut into splits of `chunk` positions; split sp writes its unnormalised partial
//     part_o[t, h, sp] = Σ_j exp(s_j − m_sp) · v_j    f32 [T, H, NS, Dh]
//     part_ml[t, h, sp] = (m_sp, Σ_j exp(s_j − m_sp)) f32 [T, H, NS, 2]
//   and the last used split of (t, h) to finish (counted with an atomic in counters[t, h], u32
//   [T, H], zero before the launch and left zero after it) combines them:
//     out[t, h] = bf16(Σ_sp e^{m_sp−M} part_o / Σ_sp e^{m_sp−M} l_sp) over the ceil(L/chunk) used
//     splits, M = max m_sp.
//   Launch: grid (NS, H, T), block 256 (DEC_WARPS = 8 warps, keys strided over warps, Dh/32 dims
//   per lane); attention_decode_bf16 takes 8 keys per warp step (a split in one memory round trip,
//   for launches of few blocks), attention_decode_u1_bf16 one (fewer registers, more blocks per
//   SM). NS is fixed by the caller (ceil(max context / chunk)); splits with sp·chunk ≥ L return
//   at once, so the launch does not depend on lengths (CUDA graphs). live (nullable, device): rows
//   t ≥ *live return at once (common.cuh live_rows).
// attention_decode_g{2..8}_bf16 — the same function for a model with G = H / Hkv query heads per kv
//   head, one block per (split, kv head, token) computing the whole group: each K/V row is loaded
//   once for G heads instead of once per head (G× less traffic from L2 into the SMs, which may
//   bound long contexts at large batches; not yet timed); 4 keys per warp step. The group's
//   partials are written per head as above, counted in counters[t, kvh·G], and its last split
//   combines all G heads. Launch: grid (NS, Hkv, T), block 256, static shared memory
//   G·8·128·4 bytes + 0.7 KB.
// Fused RoPE (every decode kernel above; `qkv` non-null): the queries and the token's own key and
//   value come from the raw q|k|v product qkv f32 [T, (H + 2·Hkv)·Dh] (q heads, then k, then v)
//   plus bias f32 [(H + 2·Hkv)·Dh] (nullable), rotated in the kernel by common.cuh's rope_rotate
//   at pos[t] with inv_freq f32 [Dh/2] (each thread's angles computed once, as rope_pair computes
//   them, for all its heads), and rounded to bf16 exactly as rope.cu's qkv_rope_bf16 rounds them (so the output is bit for bit that of qkv_rope_bf16 followed by the unfused
//   kernel); q, k_self and v_self are then not read and nothing writes them. The split holding
//   position pos[t] computes the token's own K/V row; for rows t < n_write with slot and pos in
//   range, that split's block of the group's first head also stores it at (slot[t], pos[t]) of
//   kc_w / vc_w (the caches, the same buffers as k_cache / v_cache: no block of the launch reads
//   that position). Precondition (the caller's): no row of the launch attends a position another
//   row writes, e.g. one row per sequence, or the hybrid step's candidate rows beside their
//   problem's row. Rows at or past *live (when given) store nothing: the host refuses a live
//   count with n_write > 0 here, since qkv_rope_bf16 would store them. One launch per block of
//   the model instead of two.
// attention_prefill_bf16 (prefill chunks, on tensor cores) lives in prefill_attention.cu.
#include "common.cuh"

// Warps per decode-attention block. Each warp takes U keys per step (U = 8: a 64-key split in
// one step, for launches of few blocks; U = 1: fewer registers, for launches of many blocks).
#define DEC_WARPS 8

// Loads NPL consecutive bf16 (this lane's share of a Dh-row) as f32.
template <int NPL>
__device__ __forceinline__ void load_row_part(const bf16_t* row, int lane, float* out) {
    const bf16_t* p = row + lane * NPL;
    if (NPL == 4) {
        uint2 w = *reinterpret_cast<const uint2*>(p);
        out[0] = bf_lo(w.x); out[1] = bf_hi(w.x); out[2] = bf_lo(w.y); out[3] = bf_hi(w.y);
    } else if (NPL == 2) {
        unsigned int w = *reinterpret_cast<const unsigned int*>(p);
        out[0] = bf_lo(w); out[1] = bf_hi(w);
    } else {
#pragma unroll
        for (int i = 0; i < NPL; ++i) out[i] = bf2f(p[i]);
    }
}

// The combine of head h of token t by the last split to finish: out[t, h] from the `used` splits'
// partials (see the banner).
template <int DH>
__device__ void combine_head(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                             bf16_t* __restrict__ out, int t, int h, int H, int NS, int used) {
    // The used splits' maxima and sums are read by all threads at once (block reductions), then
    // each thread sums its dims over the splits.
    const size_t b0 = ((size_t)t * H + h) * NS;
    __shared__ float sw[32];
    // Maximum over all used splits, then weights e^{m_sp − M}.
    float MM = -INFINITY;
    for (int q2 = threadIdx.x; q2 < used; q2 += blockDim.x) MM = fmaxf(MM, __ldcg(part_ml + (b0 + q2) * 2));
    MM = block_max(MM, sw);
    float lpart = 0.0f;
    for (int q2 = threadIdx.x; q2 < used; q2 += blockDim.x)
        lpart += expf(__ldcg(part_ml + (b0 + q2) * 2) - MM) * __ldcg(part_ml + (b0 + q2) * 2 + 1);
    const float inv = 1.0f / block_sum(lpart, sw);
    for (int d = threadIdx.x; d < DH; d += blockDim.x) {
        float o = 0.0f;
#pragma unroll 8
        for (int q2 = 0; q2 < used; ++q2)
            o += expf(__ldcg(part_ml + (b0 + q2) * 2) - MM) * __ldcg(part_o + (b0 + q2) * DH + d);
        out[((size_t)t * H + h) * DH + d] = f2bf(o * inv);
    }
}

// The warps' per-head partials, merged at the end of a split: declared once per kernel for the
// larger head dim (both Dh instantiations use it), so a group of 8 heads fits 48 KB.
template <int G>
struct DecodeShared {
    float m[DEC_WARPS][G], l[DEC_WARPS][G];
    float acc[DEC_WARPS][G][128];
    // Fused RoPE: the token's own K and V row, rotated and rounded (Dh ≤ 128).
    __align__(16) bf16_t k_own[128];
    __align__(16) bf16_t v_own[128];
};

// Fused RoPE: the sin and cos of this lane's NPL dims (lane·NPL ..) at position p, the angles of
// their pairs i = d mod Dh/2 (computed once per thread: the same for every head).
template <int NPL>
__device__ __forceinline__ void rope_lane_angles(const float* __restrict__ inv_freq, int p, int lane, float* sn,
                                                 float* cs) {
    constexpr int HALF = NPL * 16;
#pragma unroll
    for (int n = 0; n < NPL; ++n) sincosf((float)p * inv_freq[(lane * NPL + n) % HALF], &sn[n], &cs[n]);
}

// Fused RoPE: this lane's NPL dims of q or k head `head` of the raw q|k|v row u
// (f32 [(H + 2·Hkv)·Dh], bias nullable) rotated by the lane's angles, rounded to bf16 and
// widened back: the values qkv_rope_bf16 writes. Dims d < Dh/2 are the first of their pair, the
// others the second.
template <int NPL>
__device__ __forceinline__ void rope_row_part(const float* __restrict__ u, const float* __restrict__ bias,
                                              const float* sn, const float* cs, int head, int lane, float* out) {
    constexpr int DH = NPL * 32, HALF = DH / 2;
#pragma unroll
    for (int n = 0; n < NPL; ++n) {
        const int d = lane * NPL + n, i = d % HALF;
        const int c0 = head * DH + i, c1 = c0 + HALF;
        float a = u[c0], b = u[c1];
        if (bias) {  // as rope.cu adds it (no + 0 when absent: −0 stays −0)
            a += bias[c0];
            b += bias[c1];
        }
        bf16_t o0, o1;
        rope_rotate(a, b, sn[n], cs[n], &o0, &o1);
        out[n] = bf2f(d < HALF ? o0 : o1);
    }
}

// One split of the keys of token t for G query heads h0 .. h0 + G − 1 (h0 = blockIdx.y·G), which
// share kv head h0 / (H / Hkv): G = 1, one head per block; G = H / Hkv, a whole GQA group, each
// K/V row loaded once for all of its heads. The last split to finish (counted in
// counters[t, h0]) combines the group's heads.
template <int NPL, int G, int U>
__device__ void decode_split(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
                             const bf16_t* __restrict__ v_cache, const bf16_t* __restrict__ k_self,
                             const bf16_t* __restrict__ v_self, const int* __restrict__ pos,
                             const int* __restrict__ slot, float* __restrict__ part_o,
                             float* __restrict__ part_ml, bf16_t* __restrict__ out,
                             unsigned int* __restrict__ counters, int H, int Hkv, int S, int slots, int chunk,
                             int NS, const int* __restrict__ live, const float* __restrict__ qkv,
                             const float* __restrict__ bias, const float* __restrict__ inv_freq, int n_write,
                             bf16_t* __restrict__ kc_w, bf16_t* __restrict__ vc_w, const int* __restrict__ run,
                             DecodeShared<G>& sm) {
    pdl_enter();
    constexpr int DH = NPL * 32;
    const int sp = blockIdx.x, h0 = blockIdx.y * G, t = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (t >= live_rows(live, gridDim.z)) return;  // all splits of the row return: counter untouched
    const int p = pos[t];
    const int L = p + 1;
    const int j0 = sp * chunk;
    if (j0 >= L) return;
    const int j1 = min(j0 + chunk, L);
    const int kvh = h0 / (H / Hkv);
    const int s = slot[t];
    // The run's first row and position: keys from pa on are rows a .. t of k_self / v_self.
    const int a = (run && !qkv) ? run[t] : t;
    const int pa = a == t ? p : pos[a];
    // Cache positions actually readable: an out-of-range slot or pos reads only the run.
    const int cache_len = (s >= 0 && s < slots) ? min(pa, S) : 0;

    const float scale = rsqrtf((float)DH);
    const float* u = qkv ? qkv + (size_t)t * (H + 2 * Hkv) * DH : nullptr;  // fused RoPE: the raw row
    float qv[G][NPL], m[G], l[G], acc[G][NPL];
    float sn[NPL], cs[NPL];  // fused RoPE: this lane's angles at p
    if (u) rope_lane_angles<NPL>(inv_freq, p, lane, sn, cs);
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (u)
            rope_row_part<NPL>(u, bias, sn, cs, h0 + g, lane, qv[g]);
        else
            load_row_part<NPL>(q + ((size_t)t * H + h0 + g) * DH, lane, qv[g]);
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < NPL; ++i) {
            qv[g][i] *= scale;
            acc[g][i] = 0.0f;
        }
    }
    const bf16_t* kself = sm.k_own;
    const bf16_t* vself = sm.v_own;
    if (!u) {
        kself = k_self + ((size_t)t * Hkv + kvh) * DH;
        vself = v_self + ((size_t)t * Hkv + kvh) * DH;
    } else if (p < j1) {
        // Fused RoPE, the split holding the token itself: its K/V row into shared memory, and
        // into the caches from the group's first head's block when the row writes them.
        const bool store = t < n_write && h0 % (H / Hkv) == 0 && s >= 0 && s < slots && p < S;
        const size_t at = (((size_t)s * S + p) * Hkv + kvh) * DH;
        if (warp == 0) {
            float kr[NPL];
            rope_row_part<NPL>(u, bias, sn, cs, H + kvh, lane, kr);
#pragma unroll
            for (int i = 0; i < NPL; ++i) {
                const int d = lane * NPL + i;
                sm.k_own[d] = f2bf(kr[i]);  // exact: kr holds bf16 values
                if (store) kc_w[at + d] = sm.k_own[d];
            }
        } else if (warp == 1) {
            const int c = (H + Hkv + kvh) * DH;
#pragma unroll
            for (int i = 0; i < NPL; ++i) {
                const int d = lane * NPL + i;
                float v = u[c + d];
                if (bias) v += bias[c + d];
                sm.v_own[d] = f2bf(v);
                if (store) vc_w[at + d] = sm.v_own[d];
            }
        }
        __syncthreads();
    }
    // Warp w takes keys j0 + w + DEC_WARPS·i, U of them per step: all their K and V loads are
    // issued before any score is used, so a split of 64 keys costs 64 / (8·U) memory round trips.
    for (int jb = j0 + warp; jb < j1; jb += DEC_WARPS * U) {
        float kv[U][NPL], vv[U][NPL];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = jb + DEC_WARPS * u;
            // Cache positions past cache_len (an out-of-range slot) are skipped; the token itself
            // (j == p) reads k_self / v_self, and so do its run's earlier positions.
            ok[u] = j < j1 && (j >= pa || j < cache_len);
            const bf16_t *kr = kself, *vr = vself;
            if (j < pa) {
                const size_t off = (((size_t)s * S + j) * Hkv + kvh) * DH;
                kr = k_cache + off;
                vr = v_cache + off;
            } else if (j < p) {
                const size_t off = ((size_t)(a + j - pa) * Hkv + kvh) * DH;
                kr = k_self + off;
                vr = v_self + off;
            }
            if (ok[u]) {
                load_row_part<NPL>(kr, lane, kv[u]);
                load_row_part<NPL>(vr, lane, vv[u]);
            }
        }
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float sc[U];
            float m_new = m[g];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float d = 0.0f;
                if (ok[u]) {
#pragma unroll
                    for (int i = 0; i < NPL; ++i) d += qv[g][i] * kv[u][i];
                }
                sc[u] = ok[u] ? warp_sum(d) : -INFINITY;  // ok[u] is the same on every lane
                m_new = fmaxf(m_new, sc[u]);
            }
            if (m_new == -INFINITY) continue;  // no key in this step
            const float corr = expf(m[g] - m_new);  // 0 on the first step (m = −inf)
            l[g] *= corr;
#pragma unroll
            for (int i = 0; i < NPL; ++i) acc[g][i] *= corr;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (!ok[u]) continue;
                const float e = expf(sc[u] - m_new);
                l[g] += e;
#pragma unroll
                for (int i = 0; i < NPL; ++i) acc[g][i] += e * vv[u][i];
            }
            m[g] = m_new;
        }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (lane == 0) {
            sm.m[warp][g] = m[g];
            sm.l[warp][g] = l[g];
        }
#pragma unroll
        for (int i = 0; i < NPL; ++i) sm.acc[warp][g][lane * NPL + i] = acc[g][i];
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; ++g) {
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) M = fmaxf(M, sm.m[w][g]);
        float f[DEC_WARPS];
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) f[w] = sm.m[w][g] == -INFINITY ? 0.0f : expf(sm.m[w][g] - M);
        const size_t base = ((size_t)t * H + h0 + g) * NS + sp;
        for (int d = threadIdx.x; d < DH; d += blockDim.x) {
            float o = 0.0f;
#pragma unroll
            for (int w = 0; w < DEC_WARPS; ++w) o += f[w] * sm.acc[w][g][d];
            part_o[base * DH + d] = o;
        }
        if (threadIdx.x == 0) {
            float lw = 0.0f;
#pragma unroll
            for (int w = 0; w < DEC_WARPS; ++w) lw += f[w] * sm.l[w][g];
            part_ml[base * 2] = M;
            part_ml[base * 2 + 1] = lw;
        }
    }

    // The last split of (t, h0) to finish combines all of them (no second launch). Its counter is
    // left at 0 for the next launch.
    const int used = min((L + chunk - 1) / chunk, NS);
    __shared__ bool is_last;
    __threadfence();  // publish this split's partials before counting it
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* cnt = counters + (size_t)t * H + h0;
        is_last = atomicAdd(cnt, 1u) == (unsigned int)(used - 1);
        if (is_last) *cnt = 0u;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int g = 0; g < G; ++g) combine_head<DH>(part_o, part_ml, out, t, h0 + g, H, NS, used);
}

#define DECODE_KERNEL(NAME, G, U)                                                                                 \
    extern "C" __global__ void NAME(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,            \
                                    const bf16_t* __restrict__ v_cache, const bf16_t* __restrict__ k_self,       \
                                    const bf16_t* __restrict__ v_self, const int* __restrict__ pos,              \
                                    const int* __restrict__ slot, float* __restrict__ part_o,                    \
                                    float* __restrict__ part_ml, bf16_t* __restrict__ out,                       \
                                    unsigned int* __restrict__ counters, int H, int Hkv, int Dh, int S, int slots, \
                                    int chunk, int NS, const int* __restrict__ live,                             \
                                    const float* __restrict__ qkv, const float* __restrict__ bias,               \
                                    const float* __restrict__ inv_freq, int n_write, bf16_t* __restrict__ kc_w,  \
                                    bf16_t* __restrict__ vc_w, const int* __restrict__ run) {                    \
        __shared__ DecodeShared<G> sm;                                                                           \
        if (Dh == 128)                                                                                           \
            decode_split<4, G, U>(q, k_cache, v_cache, k_self, v_self, pos, slot, part_o, part_ml, out, counters, \
                                  H, Hkv, S, slots, chunk, NS, live, qkv, bias, inv_freq, n_write, kc_w, vc_w,   \
                                  run, sm);                                                                           \
        else if (Dh == 64)                                                                                       \
            decode_split<2, G, U>(q, k_cache, v_cache, k_self, v_self, pos, slot, part_o, part_ml, out, counters, \
                                  H, Hkv, S, slots, chunk, NS, live, qkv, bias, inv_freq, n_write, kc_w, vc_w,   \
                                  run, sm);                                                                           \
    }
DECODE_KERNEL(attention_decode_bf16, 1, 8)
DECODE_KERNEL(attention_decode_u1_bf16, 1, 1)
DECODE_KERNEL(attention_decode_g2_bf16, 2, 4)
DECODE_KERNEL(attention_decode_g3_bf16, 3, 4)
DECODE_KERNEL(attention_decode_g4_bf16, 4, 4)
DECODE_KERNEL(attention_decode_g5_bf16, 5, 4)
DECODE_KERNEL(attention_decode_g6_bf16, 6, 4)
DECODE_KERNEL(attention_decode_g7_bf16, 7, 4)
DECODE_KERNEL(attention_decode_g8_bf16, 8, 4)
