// sampling.cu: on-device greedy pick and logit gathers over the LM-head output.
//
// argmax_f32:    ids[b] = first i with logits[b, i] = max_i logits[b, i]     logits f32 [B, V], ids int32 [B]
//                (rows holding NaN give an unspecified index). Each of NB blocks per row reduces
//                a contiguous span to (value, index) in part_v/part_i f32/int32 [B, NB]; the last
//                block of a row to finish (atomic count in counters u32 [B], zero before and left
//                zero after) reduces the NB partials. Launch: grid (NB, B), block 256, NB ≤ 1024.
//                live (nullable, device): rows b ≥ *live return at once (common.cuh live_rows).
// logits_at_f32: out[b, j] = logits[b, ids[b, j]]       ids int32 [B, C], out f32 [B, C]
//                (ids outside [0, V) give −inf). Launch: grid-stride, block 256.
#include "common.cuh"

#define ARGMAX_UNROLL 4

// Keeps (v, i) when it beats (best, bi): larger value, or equal value at a lower index.
__device__ __forceinline__ void arg_better(float& best, int& bi, float v, int i) {
    if (v > best || (v == best && i < bi)) {
        best = v;
        bi = i;
    }
}

// Block-wide first maximum; the result is valid in thread 0.
__device__ __forceinline__ void block_argmax(float& best, int& bi, float* sv, int* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        arg_better(best, bi, ov, oi);
    }
    __syncthreads();
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        best = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            arg_better(best, bi, ov, oi);
        }
    }
}

extern "C" __global__ void argmax_f32(int* __restrict__ ids, const float* __restrict__ logits, int V,
                                      float* __restrict__ part_v, int* __restrict__ part_i,
                                      unsigned int* __restrict__ counters, const int* __restrict__ live) {
    pdl_enter();
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ bool is_last;
    const int b = blockIdx.y, nb = gridDim.x;
    if (b >= live_rows(live, gridDim.y)) return;  // every block of the row returns: counter untouched
    const float* row = logits + (size_t)b * V;
    // Block x scans the columns [x·span, (x+1)·span); each thread the ones ≡ tid (mod blockDim),
    // ARGMAX_UNROLL loads in flight, keeping the first strict maximum (ties go to the lower index
    // in every reduction, which together gives the first maximum of the row).
    const int span = (V + nb - 1) / nb;
    const int c0 = blockIdx.x * span, c1 = min(c0 + span, V);
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int i0 = c0 + threadIdx.x; i0 < c1; i0 += ARGMAX_UNROLL * blockDim.x) {
        float v[ARGMAX_UNROLL];
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; ++u) {
            const int i = i0 + u * blockDim.x;
            v[u] = i < c1 ? row[i] : -INFINITY;
        }
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; ++u) {
            const int i = i0 + u * blockDim.x;
            if (i < c1 && (v[u] > best || bi == 0x7fffffff)) {
                best = v[u];
                bi = i;
            }
        }
    }
    block_argmax(best, bi, sv, si);
    if (threadIdx.x == 0) {
        part_v[(size_t)b * nb + blockIdx.x] = best;
        part_i[(size_t)b * nb + blockIdx.x] = bi;
        __threadfence();  // the partial is visible before it is counted
        unsigned int* cnt = counters + b;
        is_last = atomicAdd(cnt, 1u) == (unsigned int)(nb - 1);
        if (is_last) *cnt = 0u;  // left at 0 for the next launch
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    best = -INFINITY;
    bi = 0x7fffffff;
    for (int x = threadIdx.x; x < nb; x += blockDim.x)
        arg_better(best, bi, __ldcg(part_v + (size_t)b * nb + x), __ldcg(part_i + (size_t)b * nb + x));
    block_argmax(best, bi, sv, si);
    if (threadIdx.x == 0) ids[b] = bi == 0x7fffffff ? 0 : bi;
}

extern "C" __global__ void logits_at_f32(float* __restrict__ out, const float* __restrict__ logits,
                                         const int* __restrict__ ids, int B, int C, int V) {
    pdl_enter();
    const int n = B * C;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        const int b = e / C, id = ids[e];
        out[e] = (id >= 0 && id < V) ? logits[(size_t)b * V + id] : -INFINITY;
    }
}
