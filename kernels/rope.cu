// rope.cu: q/k/v bias + rotary embedding + KV-cache append, one pass over the fused qkv product.
//
//   u = qkv[t] + bias                         qkv f32 [T, (H + 2·Hkv)·Dh] (q heads, then k, then v),
//                                             bias f32 [(H + 2·Hkv)·Dh] or null
//   for q and k heads, pairs (i, i + Dh/2), angle = f32(pos[t]) · inv_freq[i]:
//     u'[i]        = u[i]·cos − u[i+Dh/2]·sin
//     u'[i + Dh/2] = u[i+Dh/2]·cos + u[i]·sin
//   q[t, h]      = bf16(u'_q)                  q bf16 [T, H, Dh]
//   k_self[t, j] = bf16(u'_k),  v_self[t, j] = bf16(u_v)          bf16 [T, Hkv, Dh]
//   if t < n_write: k_cache[slot[t], pos[t], j] = k_self[t, j], same for v
//                                             caches bf16 [slots, S, Hkv, Dh]; slot, pos int32 [T]
// inv_freq f32 [Dh/2] is computed on the host (llama3 scaling included). The rotation is
// common.cuh's rope_pair (precise sincosf of the f32 angle, explicit fmaf), which attention.cu's
// fused decode path shares. Rounding: bias add and rotation in f32, one RNE rounding to bf16 per
// output.
// Rows with slot/pos outside [0, slots) x [0, S) skip the cache write.
// Launch: grid (T, ceil(((H + Hkv)·Dh/2 + Hkv·Dh) / 256)), block 256: one thread per rotated pair
// or v element, so a row costs one memory round trip whatever the head count.
#include "common.cuh"

extern "C" __global__ void qkv_rope_bf16(
    const float* __restrict__ qkv, const float* __restrict__ bias, const float* __restrict__ inv_freq,
    const int* __restrict__ pos, const int* __restrict__ slot, int n_write, bf16_t* __restrict__ q,
    bf16_t* __restrict__ k_self, bf16_t* __restrict__ v_self, bf16_t* __restrict__ k_cache,
    bf16_t* __restrict__ v_cache, int H, int Hkv, int Dh, int slots, int S) {
    pdl_enter();
    const int t = blockIdx.x;
    const int half = Dh / 2;
    const int width = (H + 2 * Hkv) * Dh;
    const int n_rot = (H + Hkv) * half;  // rotated pairs of the q and k heads
    const int e = blockIdx.y * blockDim.x + threadIdx.x;
    if (e >= n_rot + Hkv * Dh) return;
    const float* u = qkv + (size_t)t * width;
    const int p = pos[t];
    const int s = slot[t];
    const bool write = t < n_write && s >= 0 && s < slots && p >= 0 && p < S;
    const size_t cache_row = ((size_t)s * S + p) * Hkv * Dh;  // start of [Hkv, Dh] at (s, p)
    if (e < n_rot) {
        // q and k heads: rotate the pair (i, i + Dh/2).
        const int h = e / half, i = e % half;
        const int c0 = h * Dh + i, c1 = c0 + half;
        float a = u[c0], b = u[c1];
        if (bias) {
            a += bias[c0];
            b += bias[c1];
        }
        bf16_t o0, o1;
        rope_pair(a, b, p, inv_freq[i], &o0, &o1);
        if (h < H) {
            bf16_t* qo = q + ((size_t)t * H + h) * Dh;
            qo[i] = o0;
            qo[i + half] = o1;
        } else {
            const int j = h - H;
            bf16_t* ko = k_self + ((size_t)t * Hkv + j) * Dh;
            ko[i] = o0;
            ko[i + half] = o1;
            if (write) {
                k_cache[cache_row + j * Dh + i] = o0;
                k_cache[cache_row + j * Dh + i + half] = o1;
            }
        }
    } else {
        // v heads: bias only.
        const int ev = e - n_rot;
        const int c = (H + Hkv) * Dh + ev;
        float v = u[c];
        if (bias) v += bias[c];
        const bf16_t o = f2bf(v);
        v_self[(size_t)t * Hkv * Dh + ev] = o;
        if (write) v_cache[cache_row + ev] = o;
    }
}
