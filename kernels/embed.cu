// embed.cu: token embedding gather.
//
//   r[t, :] = f32(table[ids[t], :])            t < T
//
// dtypes: table bf16 [V, D], ids int32 [T] (device memory), r f32 [T, D]. bf16 -> f32 is exact,
// so there is no rounding. Ids outside [0, V) write zeros (the host validates ids; this only
// keeps a bad id from reading out of bounds).
// Launch: grid (T), block 256; each thread copies 8 elements per step when D % 8 == 0.
#include "common.cuh"

extern "C" __global__ void embed_bf16(float* __restrict__ r, const bf16_t* __restrict__ table,
                                      const int* __restrict__ ids, int V, int D) {
    pdl_enter();
    const int t = blockIdx.x;
    const int id = ids[t];
    float* out = r + (size_t)t * D;
    if (id < 0 || id >= V) {
        for (int i = threadIdx.x; i < D; i += blockDim.x) out[i] = 0.0f;
        return;
    }
    const bf16_t* row = table + (size_t)id * D;
    if ((D & 7) == 0) {
        const uint4* row8 = reinterpret_cast<const uint4*>(row);
        for (int i = threadIdx.x; i < D / 8; i += blockDim.x) {
            uint4 w = row8[i];
            float4 a = make_float4(bf_lo(w.x), bf_hi(w.x), bf_lo(w.y), bf_hi(w.y));
            float4 b = make_float4(bf_lo(w.z), bf_hi(w.z), bf_lo(w.w), bf_hi(w.w));
            reinterpret_cast<float4*>(out)[2 * i] = a;
            reinterpret_cast<float4*>(out)[2 * i + 1] = b;
        }
    } else {
        for (int i = threadIdx.x; i < D; i += blockDim.x) out[i] = bf2f(row[i]);
    }
}
