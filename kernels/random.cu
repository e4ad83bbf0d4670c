// random.cu: device-side random weights for benchmarks of real model shapes (no download, no
// host-side generation of gigabytes).
//
//   out[i] = bf16(offset + scale · u_i),  u_i uniform in [−1, 1) from splitmix64(seed ⊕ i)
//
// dtypes: out bf16 [n]. One RNE rounding to bf16. The values only need to be non-degenerate
// (never all zero) so that timings are of real arithmetic; they are not a statistical RNG.
// Launch: grid-stride, block 256.
#include "common.cuh"

extern "C" __global__ void fill_random_bf16(bf16_t* __restrict__ out, unsigned long long n,
                                            unsigned long long seed, float offset, float scale) {
    pdl_enter();
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed ^ (i * 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.0f / 8388608.0f) - 1.0f;  // 24 bits → [−1, 1)
        out[i] = f2bf(offset + scale * u);
    }
}
