// sampling.cu: on-device greedy pick and logit gathers over the LM-head output.
//
// argmax_f32:    ids[b] = first i with logits[b, i] = max_i logits[b, i]     logits f32 [B, V], ids int32 [B]
//                (rows holding NaN give an unspecified index). Launch: grid (B), block 1024.
// logits_at_f32: out[b, j] = logits[b, ids[b, j]]       ids int32 [B, C], out f32 [B, C]
//                (ids outside [0, V) give −inf). Launch: grid-stride, block 256.
#include "common.cuh"

extern "C" __global__ void argmax_f32(int* __restrict__ ids, const float* __restrict__ logits, int V) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float* row = logits + (size_t)b * V;
    // Each thread scans i ≡ tid (mod blockDim) upwards and keeps the first strict maximum; the
    // reduction then prefers the lower index on ties, which together gives the first maximum.
    float best = tid < V ? row[tid] : -INFINITY;
    int bi = tid < V ? tid : 0x7fffffff;
    for (int i = tid + blockDim.x; i < V; i += blockDim.x) {
        const float v = row[i];
        if (v > best) {
            best = v;
            bi = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) {
            best = ov;
            bi = oi;
        }
    }
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
            if (ov > best || (ov == best && oi < bi)) {
                best = ov;
                bi = oi;
            }
        }
        if (lane == 0) ids[b] = bi == 0x7fffffff ? 0 : bi;
    }
}

extern "C" __global__ void logits_at_f32(float* __restrict__ out, const float* __restrict__ logits,
                                         const int* __restrict__ ids, int B, int C, int V) {
    const int n = B * C;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        const int b = e / C, id = ids[e];
        out[e] = (id >= 0 && id < V) ? logits[(size_t)b * V + id] : -INFINITY;
    }
}
