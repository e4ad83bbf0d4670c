// gemm_wgmma.cu: gemm.cu's products on Hopper's warpgroup tensor cores (wgmma, sm_90a only).
//
//   gemm_wg_bf16[_m256]:     out[n, m] = Σ_k f32(x[n, k]) · f32(W[m, k])
//   gemm_glu_wg_bf16[_m256]: act[n, f] = bf16(silu(g) · u),  g = Σ_k x[n, k]·W[f, k],  u = Σ_k x[n, k]·W[F + f, k]
//   x bf16 [N, K], W bf16 [M, K] (glu: [gate; up] [2F, K]), out f32 [N, M], act bf16 [N, F].
//
// The contract of gemm.cu's kernels: any N and M (edge tiles zero-filled by cp.async, stores
// masked), K % 8 == 0, 16-byte-aligned x and W; `live` (nullable, device): row tiles from
// min(N, *live) on return at once; split K over blockIdx.z (k tiles [z·per, (z+1)·per) of 64
// here, raw sums to part[z], added in z order by vg_mm_reduce_f32). The order of each k sum is
// the tensor core's, so results differ from gemm_bf16's by f32 rounding; the glu kernels'
// sums are those of gemm_wg_bf16 of the same tile width, so act equals it then silu_mul_bf16
// bit for bit. No rounding on out (f32); act rounds once (f2bf).
// Tiles: a block covers 128 rows of x × WM rows of W (128, or 256 for _m256) × 64 of k with
// two warpgroups (256 threads): warpgroup w computes x rows 64w.. of the tile with
// wgmma.m64n{WM}k16, 4 per k tile, both operands read by the tensor cores from shared memory.
// Shared layout: K-major with the 128-byte swizzle — tile row r is 128 bytes (64 bf16 of k), its
// 16-byte chunk c stored at chunk c ^ (r % 8); 8-row groups 1024 bytes apart; every tile
// 1024-byte aligned (the swizzle is applied to address bits). A ring of STAGES = 6 (WM = 128) or
// 4 (WM = 256) stages (x tile then W tile) filled by cp.async from every thread: tile i's
// products are issued, then tile i + STAGES − 2 is loaded while they and tile i − 1's may still
// run (wgmma.wait_group 1), so a buffer is refilled two k steps after its products were issued,
// past the barrier where both warpgroups have waited for them. Pairs of outputs are stored as one 8-byte (out) or 4-byte (act) word where aligned.
// Accumulators (m64nN, f32): thread t, warp q = (t / 32) % 4 of its warpgroup, lane l holds
// d[4j + e] = D[16q + l/4 + 8·(e/2)][8j + 2·(l%4) + e%2], j < N/8. glu: the block's W rows are
// gate rows f0.. (columns < WM/2) then up rows F + f0.. (the rest), f0 = (WM/2)·(column tile), so
// each thread holds both sums of its outputs.
// Launch: grid (ceil(M / WM), ceil(N / 128), splits) — glu: (ceil(F / (WM/2)), ceil(N / 128), 1)
// —, block 256, dynamic shared memory STAGES·(128 + WM)·128 + 1024 bytes (193 KB either way:
// the host raises the kernel's limit); tiles in common.cuh's grouped order (gemm_tile).
// On other architectures the kernels compile to a trap: the host uses them only on compute
// capability 9.0 from a cubin built for sm_90a.
#include "common.cuh"

#define WG_BN 128    // x rows per block: two warpgroups of 64
#define WG_BK 64     // k per tile: one 128-byte swizzle row

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(THINKSTEER_EMULATOR)
#define WG_HAS_WGMMA 1
#endif

#if defined(WG_HAS_WGMMA) && !defined(THINKSTEER_EMULATOR)  // emulate.h defines these in C++
__device__ __forceinline__ unsigned int shared_addr(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}
// Makes this thread's landed cp.async writes visible to the tensor cores' reads (the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across the asynchronous products.
template <int R>
__device__ __forceinline__ void wgmma_hold(float* d) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The accumulator registers %0 .. %63 of a wgmma's operand list, from its opening brace.
#define WG_REGS_0_63                                                                 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "         \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
// The accumulator operands d[i .. i + 63] of a wgmma asm statement.
#define WG_D8(i)                                                                                     \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
        "+f"(d[i + 7])
#define WG_D64(i) \
    WG_D8(i), WG_D8(i + 8), WG_D8(i + 16), WG_D8(i + 24), WG_D8(i + 32), WG_D8(i + 40), WG_D8(i + 48), WG_D8(i + 56)
// D[64 × N] += A[64 × 16] · B[N × 16]ᵀ for the calling warpgroup: A and B in shared memory
// through descriptors (wg_desc), D in registers (layout in the banner); scale-d 1 (accumulate),
// no negation, no transpose (both K-major).
__device__ __forceinline__ void wgmma_bf16_n128(float* d, unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        WG_REGS_0_63 "}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : WG_D64(0)
        : "l"(da), "l"(db), "n"(1));
}
__device__ __forceinline__ void wgmma_bf16_n256(float* d, unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        WG_REGS_0_63 ", "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, 0;\n}\n"
        : WG_D64(0), WG_D64(64)
        : "l"(da), "l"(db), "n"(1));
}
#endif

#ifdef WG_HAS_WGMMA
// The wgmma descriptor of a K-major operand in the 128-byte swizzle at shared address `addr`:
// start address >> 4 (bits 0–13), leading byte offset 1 (unused by swizzled K-major layouts,
// bits 16–29), stride byte offset 1024 >> 4 (from one 8-row group to the next, bits 32–45), base
// offset 0 (tiles 1024-byte aligned, bits 49–51), swizzle mode 1 = 128 bytes (bits 62–63).
// The k16 step s of a tile starts 32·s bytes in.
__device__ __forceinline__ unsigned long long wg_desc(unsigned int addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}

template <int WM>
__device__ __forceinline__ void wgmma_tile(float* d, unsigned long long da, unsigned long long db) {
    if constexpr (WM == 128)
        wgmma_bf16_n128(d, da, db);
    else
        wgmma_bf16_n256(d, da, db);
}

// The ring's stages for a W tile of WM rows: as many as fit about 193 KB (6 of 32 KB at WM = 128,
// 4 of 48 KB at WM = 256), so that four tiles' worth of loads (2 or 4 tiles ahead) cover the
// memory latency.
template <int WM>
__device__ constexpr int wg_stages() {
    return WM == 128 ? 6 : 4;
}

// GLU: act written (M = F), out unused; else out (M rows of W).
template <int WM, bool GLU>
__device__ __forceinline__ void gemm_wg_body(float* __restrict__ out, bf16_t* __restrict__ act,
                                             const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int N,
                                             int M, int K, int kt0, int kt1) {
    constexpr int A_BYTES = WG_BN * 128, STAGE = (WG_BN + WM) * 128, R = WM / 2;  // R: accumulators per thread
    constexpr int STAGES = wg_stages<WM>();
    extern __shared__ uint4 wg_smem[];
    const unsigned int raw = shared_addr(wg_smem), pad = (1024u - (raw & 1023u)) & 1023u;
    unsigned char* smem = reinterpret_cast<unsigned char*>(wg_smem) + pad;
    const unsigned int sbase = raw + pad;
    const int tid = threadIdx.x, wg = tid >> 7;
    int mt, nt;
    gemm_tile(&mt, &nt);
    const int m0 = mt * (GLU ? WM / 2 : WM), n0 = nt * WG_BN;
    if (n0 >= N) return;  // a row tile past the live rows

    // Tile kt into stage s, as one commit group (past the block's k range an empty group, so
    // that group i always holds tile kt0 + i).
    auto load_tile = [&](int kt, int s) {
        if (kt < kt1) {
            unsigned char* a = smem + s * STAGE;
            unsigned char* b = a + A_BYTES;
            const int k0 = kt * WG_BK;
#pragma unroll
            for (int i = 0; i < WG_BN * 8 / 256; ++i) {  // x: 128 rows × 8 chunks of 8
                const int ch = tid + i * 256, row = ch >> 3, c = ch & 7, k = k0 + c * 8;
                const bool ok = n0 + row < N && k < K;
                cp_async16(a + row * 128 + ((c ^ (row & 7)) << 4), ok ? x + (size_t)(n0 + row) * K + k : x, ok ? 16 : 0);
            }
#pragma unroll
            for (int i = 0; i < WM * 8 / 256; ++i) {  // W: WM rows × 8 chunks of 8
                const int ch = tid + i * 256, row = ch >> 3, c = ch & 7, k = k0 + c * 8;
                // glu: tile rows < WM/2 are gate rows m0.., the rest up rows M + m0..
                const int m = GLU ? m0 + row % (WM / 2) : m0 + row, wrow = GLU ? m + row / (WM / 2) * M : m;
                const bool ok = m < M && k < K;
                cp_async16(b + row * 128 + ((c ^ (row & 7)) << 4), ok ? W + (size_t)wrow * K + k : W, ok ? 16 : 0);
            }
        }
        cp_async_commit();
    };

    float d[R];
#pragma unroll
    for (int i = 0; i < R; ++i) d[i] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) load_tile(kt0 + s, s);
    for (int kt = kt0; kt < kt1; ++kt) {
        const int i = kt - kt0, s = i % STAGES;
        cp_async_wait<STAGES - 3>();  // this thread's copies of tile kt have landed
        fence_proxy_async();             // ...visible to the tensor cores
        __syncthreads();  // everyone's have; both warpgroups are past tile kt − 2's products,
        const unsigned int a = sbase + s * STAGE + wg * 64 * 128, b = sbase + s * STAGE + A_BYTES;
        wgmma_hold<R>(d);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < WG_BK / 16; ++kk) wgmma_tile<WM>(d, wg_desc(a + kk * 32), wg_desc(b + kk * 32));
        wgmma_commit();
        // ...whose stage this refills (neither tile kt − 1's products nor these read it)
        load_tile(kt + STAGES - 2, (i + STAGES - 2) % STAGES);
        wgmma_wait<1>();  // tile kt − 1's products are done
        wgmma_hold<R>(d);
    }
    wgmma_wait<0>();
    wgmma_hold<R>(d);

    const int q = (tid >> 5) & 3, l = tid & 31;
    const int r0 = n0 + wg * 64 + q * 16 + (l >> 2), c0 = m0 + 2 * (l & 3);
    constexpr int J = GLU ? WM / 16 : WM / 8;  // column groups of 8 written
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // rows r0 and r0 + 8
            const int r = r0 + 8 * h, col = c0 + 8 * j;
            if (r >= N || col >= M) continue;
            const float v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
            if (GLU) {
                const float u0 = d[4 * (j + J) + 2 * h], u1 = d[4 * (j + J) + 2 * h + 1];
                bf16_t* p = act + (size_t)r * M + col;
                if (col + 1 < M && ((size_t)p & 3) == 0) {
                    *reinterpret_cast<unsigned int*>(p) = pack_bf2(silu_mul(v0, u0), silu_mul(v1, u1));
                } else {
                    p[0] = f2bf(silu_mul(v0, u0));
                    if (col + 1 < M) p[1] = f2bf(silu_mul(v1, u1));
                }
            } else {
                float* p = out + (size_t)r * M + col;
                if (col + 1 < M && ((size_t)p & 7) == 0) {
                    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
                } else {
                    p[0] = v0;
                    if (col + 1 < M) p[1] = v1;
                }
            }
        }
}
#endif  // WG_HAS_WGMMA

template <int WM>
__device__ __forceinline__ void gemm_wg(float* out, const bf16_t* x, const bf16_t* W, int N, int M, int K,
                                        const int* live, float* part, int per) {
    pdl_enter();
#ifdef WG_HAS_WGMMA
    const GemmSplit sp = gemm_split(out, part, N, M, K, per, WG_BK);
    gemm_wg_body<WM, false>(sp.dst, nullptr, x, W, live_rows(live, N), M, K, sp.kt0, sp.kt1);
#else
    __trap();
#endif
}

template <int WM>
__device__ __forceinline__ void gemm_glu_wg(bf16_t* act, const bf16_t* x, const bf16_t* W, int N, int F, int K,
                                            const int* live) {
    pdl_enter();
#ifdef WG_HAS_WGMMA
    gemm_wg_body<WM, true>(nullptr, act, x, W, live_rows(live, N), F, K, 0, (K + WG_BK - 1) / WG_BK);
#else
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_wg_bf16(float* __restrict__ out, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int N, int M,
                 int K, const int* __restrict__ live, float* __restrict__ part, int per) {
    gemm_wg<128>(out, x, W, N, M, K, live, part, per);
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_wg_bf16_m256(float* __restrict__ out, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int N,
                      int M, int K, const int* __restrict__ live, float* __restrict__ part, int per) {
    gemm_wg<256>(out, x, W, N, M, K, live, part, per);
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_glu_wg_bf16(bf16_t* __restrict__ act, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int N,
                     int F, int K, const int* __restrict__ live) {
    gemm_glu_wg<128>(act, x, W, N, F, K, live);
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_glu_wg_bf16_m256(bf16_t* __restrict__ act, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W,
                          int N, int F, int K, const int* __restrict__ live) {
    gemm_glu_wg<256>(act, x, W, N, F, K, live);
}
