// common.cuh: helpers shared by every kernel file.
//
// The kernels include no CUDA headers at all: bf16 is carried as its raw 16 bits (`bf16_t`), and
// conversions, tensor-core products and async copies are written as inline PTX. That way NVRTC
// compiles them without a CUDA include directory (no `cuda_bf16.h` to find at run time), and nvcc
// compiles the same text.
//
// Rounding: f32 -> bf16 is round-to-nearest-even (`cvt.rn.bf16.f32`), the same as `half::bf16::from_f32`.
#pragma once

typedef unsigned short bf16_t;

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// bf16 -> f32 is exact: the bf16 bits are the top half of the f32.
__device__ __forceinline__ float bf2f(bf16_t v) { return __uint_as_float(((unsigned int)v) << 16); }

// silu(g) · u in f32, as every MLP kernel computes it (so fused and unfused paths agree).
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

#ifndef THINKSTEER_EMULATOR  // scripts/cuda-emulate/emulate.h defines the PTX-only helpers in C++
__device__ __forceinline__ bf16_t f2bf(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
#endif

// Two bf16 packed in one 32-bit word (low half = element 0), as 128-bit loads deliver them.
__device__ __forceinline__ float bf_lo(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(unsigned int w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ unsigned int pack_bf2(float lo, float hi) {
    return (unsigned int)f2bf(lo) | ((unsigned int)f2bf(hi) << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32 floats.
// Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Programmatic dependent launch (PDL; sm_90+, src/cuda/launch.rs). No-ops on older GPUs and when
// the kernel was launched without the attribute.
//   pdl_trigger(): the next kernel on the stream may be scheduled now (its blocks then sit in
//                  their pdl_wait()).
//   pdl_wait():    returns once every earlier kernel on the stream has finished and its writes are
//                  visible. Before it a kernel may read only what no kernel writes (weights); it
//                  must not read activations nor write anything.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// The start of a kernel that reads activations from its first instruction.
__device__ __forceinline__ void pdl_enter() {
    pdl_trigger();
    pdl_wait();
}

// Rows in use when a launch covers more rows than a step filled (the hybrid step's candidate
// rows, counted on the device): min(T, *live), or T when live is null. Read after pdl_wait: live
// is written by an earlier kernel.
__device__ __forceinline__ int live_rows(const int* live, int T) { return live ? min(T, *live) : T; }

// The output tile (column tile mt of W rows, row tile nt of x rows) of a product block (gemm.cu,
// gemm_wgmma.cu; grid (column tiles, row tiles, splits)) in grouped order: the blocks, taken in
// launch order (x fastest), walk a group of 8 column tiles down every row tile before the next
// group, so blocks resident together share their W tiles in L2. In plain launch order a wave
// pairs one x tile with up to a wave of different W tiles, so a W larger than L2 (55 MB for the
// Qwen2.5-1.5B gate|up) can be read from memory once per row tile (reasoned, not measured).
__device__ __forceinline__ void gemm_tile(int* mt, int* nt) {
    const int tiles_m = gridDim.x, tiles_n = gridDim.y, lin = blockIdx.y * tiles_m + blockIdx.x;
    const int first = lin / (8 * tiles_n) * 8, size = min(tiles_m - first, 8), r = lin % (8 * tiles_n);
    *mt = first + r % size;
    *nt = r / size;
}

// Split K of the products (gemm.cu, gemm_wgmma.cu): the block's k tiles (of `bk`) and output —
// all of K into out, or, with gridDim.z > 1, split z's `per` tiles into part[z] (f32 [splits,
// N, M], added in z order by vg_mm_reduce_f32).
struct GemmSplit {
    float* dst;
    int kt0, kt1;
};
__device__ __forceinline__ GemmSplit gemm_split(float* out, float* part, int N, int M, int K, int per, int bk) {
    const int nk = (K + bk - 1) / bk;
    if (gridDim.z == 1) return {out, 0, nk};
    const int kt0 = blockIdx.z * per;
    return {part + (size_t)blockIdx.z * N * M, kt0, min(nk, kt0 + per)};
}

// RoPE of one pair (a, b) = (u[i], u[i + Dh/2]) of a q or k head at the f32 angle
// f32(pos)·inv_freq_i, sin/cos the precise sincosf (positions reach 10^5, where the fast versions
// drift): o0 = bf16(a·cos − b·sin), o1 = bf16(b·cos + a·sin), written with explicit fmaf so that
// every kernel that rotates (rope.cu, attention.cu's fused decode) rounds bit for bit alike.
// rope_rotate takes the angle's sin and cos already computed (shared by every head at pos).
__device__ __forceinline__ void rope_rotate(float a, float b, float sn, float cs, bf16_t* o0, bf16_t* o1) {
    *o0 = f2bf(fmaf(a, cs, -(b * sn)));
    *o1 = f2bf(fmaf(b, cs, a * sn));
}
__device__ __forceinline__ void rope_pair(float a, float b, int pos, float inv_freq, bf16_t* o0, bf16_t* o1) {
    float sn, cs;
    sincosf((float)pos * inv_freq, &sn, &cs);
    rope_rotate(a, b, sn, cs, o0, o1);
}

// Maximum over the whole block, like block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}
#ifndef THINKSTEER_EMULATOR
// 16-byte asynchronous global -> shared copy; bytes past `src_bytes` (0 or 16) are zero-filled,
// which is how tiles read past a matrix edge without branching.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    unsigned int s = (unsigned int)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8 × 8 b16 matrices from shared memory: lane l gives the address of row l % 8 of matrix
// l / 8 (16-byte aligned); r[i] = the two elements 2·(l % 4), +1 of row l / 4 of matrix i —
// one instruction for an mma A fragment (matrices: rows +0/+8 × columns +0/+8) or two B ones.
__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, const bf16_t* p) {
    unsigned int s = (unsigned int)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// ldmatrix_x4 with .trans: the same row addresses, each matrix delivered transposed — r[i] = the
// elements (row 2·(l % 4), column l / 4) and (row 2·(l % 4) + 1, column l / 4) of matrix i, low
// half first: an mma B fragment from a matrix stored with its k index along the rows (V in
// prefill attention).
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int* r, const bf16_t* p) {
    unsigned int s = (unsigned int)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// D = A·B + D on tensor cores: A 16x16 bf16 (row), B 16x8 bf16 (col), D 16x8 f32.
// Fragment layout (g = lane/4, c = lane%4):
//   a0 = A[g][2c..2c+1], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..]
//   b0 = B[2c..2c+1][g],  b1 = B[2c+8..][g]
//   d0,d1 = D[g][2c..2c+1], d2,d3 = D[g+8][2c..2c+1]
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// gemv.cu's 16-byte streaming weight load (read-only path, no L1 allocation).
// Weights are touched once: bypass L1 so x keeps it.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}
#endif  // THINKSTEER_EMULATOR

