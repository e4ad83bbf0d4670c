// emulate.h: just enough of the CUDA execution model to run the kernels of kernels/*.cu on the
// CPU, for checking kernel logic on a machine without a GPU. Force-included before
// kernels/common.cuh (compiled with THINKSTEER_EMULATOR, which leaves out its PTX-only helpers:
// they are defined here in C++ with the same results). One block at a time, so a kernel whose
// last block combines the others' partials (attention decode, argmax) sees all of them; the
// block's threads are real threads (started once per launch and reused block after block)
// meeting at a barrier for __syncthreads(); __shared__ variables are function statics (one copy,
// shared by the block's threads, reused by the next block) and dynamic shared memory
// (`extern __shared__ T name[];`, rewritten by run.sh into a pointer) one buffer per launch;
// warp-collective operations (shuffles, mma) exchange through per-thread slots between two
// barriers of the calling warp, so the 32 lanes of a warp must reach them together (as in every
// kernel here), while other warps may take other paths. Atomics are std::atomic_ref operations
// (truly atomic across the block's threads). Slow and for small sizes only.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* g_barrier = nullptr;
inline std::vector<std::barrier<>*> g_warp_barriers;  // one per warp of the running block
inline void warp_sync() { g_warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() g_barrier->arrive_and_wait()
using std::max;
using std::min;

inline float as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) { return as_float((unsigned int)i); }
inline float __uint_as_float(unsigned int u) { return as_float(u); }

// Warp shuffles of any 4-byte type (float, int, unsigned): one slot per thread and type.
template <class T>
inline T* shfl_slots() {
    static T buf[1024];
    return buf;
}
template <class T>
inline T __shfl_xor_sync(unsigned int, T v, int o) {
    T* buf = shfl_slots<T>();
    const int t = (int)threadIdx.x;
    buf[t] = v;
    warp_sync();
    const T r = buf[t ^ o];
    warp_sync();
    return r;
}
// Broadcast from lane `src` of the calling warp.
template <class T>
inline T __shfl_sync(unsigned int, T v, int src) {
    T* buf = shfl_slots<T>();
    const int t = (int)threadIdx.x;
    buf[t] = v;
    warp_sync();
    const T r = buf[(t & ~31) + (src & 31)];
    warp_sync();
    return r;
}

// Cached / read-only / cache-global loads are plain loads here.
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
template <class T>
inline T __ldcg(const T* p) {
    return *p;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T>
inline T atomicAdd(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v);
}
template <class T>
inline T atomicSub(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_sub(v);
}
// CUDA's atomicInc: old >= limit ? 0 : old + 1, returning old.
inline unsigned int atomicInc(unsigned int* p, unsigned int limit) {
    std::atomic_ref<unsigned int> a(*p);
    unsigned int old = a.load();
    while (!a.compare_exchange_weak(old, old >= limit ? 0u : old + 1u)) {
    }
    return old;
}

struct float4 {
    float x, y, z, w;
};
struct uint4 {
    unsigned int x, y, z, w;
};
struct uint2 {
    unsigned int x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned int a, unsigned int b, unsigned int c, unsigned int d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned int a, unsigned int b) { return {a, b}; }

// Dynamic shared memory of the running launch (run.sh rewrites `extern __shared__ T name[];`
// into `T* const name = emu_dynamic_shared<T>();`). Filled with 0xff bytes (NaN floats) so a
// read before a write shows.
inline std::vector<double> g_dynamic_smem;
template <class T>
inline T* emu_dynamic_shared() {
    return reinterpret_cast<T*>(g_dynamic_smem.data());
}

// Runs f (a kernel call with its arguments bound) over the grid, block by block, with `smem`
// bytes of dynamic shared memory. The block's threads are started once and run every block in
// turn, meeting at a barrier between blocks (so a block starts only when the previous one has
// finished, and all its writes are visible).
inline void launch(dim3 grid, unsigned int threads, const std::function<void()>& f, size_t smem = 0) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    g_dynamic_smem.assign((smem + 7) / 8, 0.0);
    std::memset(g_dynamic_smem.data(), 0xff, g_dynamic_smem.size() * 8);
    std::barrier<> bar((std::ptrdiff_t)threads), block_end((std::ptrdiff_t)threads);
    g_barrier = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    g_warp_barriers.clear();
    for (unsigned int w = 0; w < (threads + 31) / 32; ++w) {
        wb.push_back(std::make_unique<std::barrier<>>((std::ptrdiff_t)std::min(32u, threads - 32 * w)));
        g_warp_barriers.push_back(wb.back().get());
    }
    std::vector<std::thread> ts;
    for (unsigned int t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
            threadIdx = dim3{t, 0, 0};
            for (unsigned int z = 0; z < grid.z; ++z)
                for (unsigned int y = 0; y < grid.y; ++y)
                    for (unsigned int x = 0; x < grid.x; ++x) {
                        blockIdx = dim3{x, y, z};
                        f();
                        block_end.arrive_and_wait();
                    }
        });
    for (auto& th : ts) th.join();
}

// The PTX-only helpers of kernels/common.cuh. Rounding as cvt.rn.bf16.f32: to nearest even.
inline unsigned short f2bf(float f) {
    unsigned int u = as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
// cp.async, done at once (a kernel may read the copy only after its wait, so earlier is fine).
inline void cp_async16(void* smem, const void* gmem, int src_bytes) {
    std::memset(smem, 0, 16);
    if (src_bytes) std::memcpy(smem, gmem, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
// mma.sync m16n8k16 over the fragment layout of kernels/common.cuh (g = lane/4, c = lane%4):
//   a0 = A[g][2c..2c+1], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..]
//   b0 = B[2c..2c+1][g],  b1 = B[2c+8..][g];  d0,d1 = D[g][2c..], d2,d3 = D[g+8][2c..]
// Each lane's share is gathered through per-thread slots between two barriers of its warp.
inline void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
    static unsigned int fa[1024][4], fb[1024][2];
    const int t = (int)threadIdx.x, lane = t & 31, w0 = t & ~31;
    auto lo = [](unsigned int w) { return as_float(w << 16); };
    auto hi = [](unsigned int w) { return as_float(w & 0xffff0000u); };
    for (int e = 0; e < 4; ++e) fa[t][e] = a[e];
    for (int e = 0; e < 2; ++e) fb[t][e] = b[e];
    warp_sync();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, c = l & 3;
        const unsigned int* x = fa[w0 + l];
        const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * c, 2 * c, 2 * c + 8, 2 * c + 8};
        for (int e = 0; e < 4; ++e) {
            A[rows[e]][cols[e]] = lo(x[e]);
            A[rows[e]][cols[e] + 1] = hi(x[e]);
        }
        const unsigned int* y = fb[w0 + l];
        B[2 * c][g] = lo(y[0]);
        B[2 * c + 1][g] = hi(y[0]);
        B[2 * c + 8][g] = lo(y[1]);
        B[2 * c + 9][g] = hi(y[1]);
    }
    warp_sync();
    const int g = lane >> 2, c = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int r = g + (e >> 1) * 8, col = 2 * c + (e & 1);
        float s = d[e];
        for (int k = 0; k < 16; ++k) s = fmaf(A[r][k], B[k][col], s);
        d[e] = s;
    }
}
// ld.global.nc.L1::no_allocate: a plain 16-byte load here, counted (the gemv weight loads) so a
// check can tell that a launch with nothing to compute read no weights.
inline std::atomic<long> g_stream_loads{0};
inline uint4 ld_stream(const uint4* p) {
    g_stream_loads.fetch_add(1, std::memory_order_relaxed);
    return *p;
}
