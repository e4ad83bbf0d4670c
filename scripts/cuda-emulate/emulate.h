// emulate.h: just enough of the CUDA execution model to run the kernels of kernels/*.cu on the
// CPU, for checking kernel logic on a machine without a GPU. Force-included before
// kernels/common.cuh (compiled with THINKSTEER_EMULATOR, which leaves out its PTX-only helpers:
// they are defined here in C++ with the same results). One block at a time — in launch order,
// or reversed every other launch —, so a kernel whose last block combines the others' partials
// (attention decode, argmax) sees all of them, and one that relies on block order fails in one
// of the two. The
// block's threads are fibers of the calling thread: each runs until it waits at a
// barrier (__syncthreads, or a warp-collective operation) or ends, then the next one runs, so
// a block's threads interleave only at barriers — deterministically, and stricter than the
// hardware: a kernel that reads another thread's write without a barrier between sees the
// write missing. __shared__ variables are function statics (one copy, shared by the block's
// threads, reused by the next block) and dynamic shared memory (`extern __shared__ T name[];`,
// rewritten by run.sh into a pointer) one buffer per launch, NaN bytes at each block's start;
// warp-collective operations (shuffles, mma) exchange through per-thread slots at a barrier of
// the calling warp, so the 32 lanes of a warp must reach them together (as in every kernel
// here), while other warps may take other paths. A barrier that can never complete (threads
// that ended or wait elsewhere; stricter than the hardware, which counts exited warps as
// arrived), lanes that diverged between warp collectives, and a stack overflow (a guard page)
// stop the program with a message. Slow and for small sizes only. The fiber switch saves the
// general registers the ABI preserves, not MXCSR or the x87 control word: no kernel changes
// the rounding mode.
#pragma once
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx;  // threadIdx: set at every switch to a thread's fiber
inline dim3 blockDim, gridDim;

// Fiber switching: on x86-64 a stack switch that saves the callee-saved registers (no signal
// mask system call, as swapcontext makes); elsewhere ucontext.
#if defined(__x86_64__)
struct EmuCtx {
    void* sp = nullptr;
};
extern "C" void emu_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
inline void emu_swap(EmuCtx& from, EmuCtx& to) { emu_switch(&from.sp, to.sp); }
// A fresh context that starts in entry() on the given stack: entry's address where emu_switch
// returns to, below a zero return address (so entry sees the stack alignment of a call), with
// six zero registers on top.
inline void emu_make(EmuCtx& c, char* stack, size_t size, void (*entry)()) {
    void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack + size)) & ~uintptr_t(15));
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(entry);
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    c.sp = sp;
}
#else
struct EmuCtx {
    ucontext_t uc;
};
inline void emu_swap(EmuCtx& from, EmuCtx& to) { swapcontext(&from.uc, &to.uc); }
inline void emu_make(EmuCtx& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

// The running block's fibers: a thread runs until it waits at a barrier or ends; then the first
// runnable thread in the block's order runs, lowest index first or (every other block) highest
// first. So one warp runs ahead of the others as far as the barriers let it: a thread that
// reads shared memory another warp is still to write, or overwrites what another warp is still
// to read, without a barrier between them, reads or leaves the wrong values in one of the two
// orders (and the check against the reference fails), where the hardware might get it right by
// timing.
struct EmuFibers {
    std::vector<EmuCtx> ctx;
    std::vector<char> done;
    std::vector<unsigned long long> runnable;  // a bit per thread: not ended, not waiting
    char* stacks = nullptr;  // stack_threads × (EMU_GUARD + EMU_STACK), mmap'ed
    size_t stack_threads = 0;
    EmuCtx caller, dead;
    unsigned n = 0, current = 0, alive = 0;
    bool reverse = false;          // this block's order
    unsigned long long blocks = 0;  // blocks run, for the alternation
    const std::function<void()>* body = nullptr;
};
inline EmuFibers g_fibers;
// Each thread's stack (the emulator checks used under 1 KB of it where measured), above an
// inaccessible guard page: an overflow faults at once instead of corrupting the neighbouring
// thread's stack.
static const size_t EMU_STACK = 32 << 10, EMU_GUARD = 4096;
inline char* emu_stack(unsigned t) { return g_fibers.stacks + t * (EMU_GUARD + EMU_STACK) + EMU_GUARD; }

inline void emu_set_runnable(unsigned t, bool on) {
    unsigned long long& w = g_fibers.runnable[t >> 6];
    const unsigned long long bit = 1ull << (t & 63);
    w = on ? (w | bit) : (w & ~bit);
}
// The first runnable thread in the block's order; n when none is.
inline unsigned emu_pick() {
    const std::vector<unsigned long long>& r = g_fibers.runnable;
    if (!g_fibers.reverse) {
        for (size_t i = 0; i < r.size(); ++i)
            if (r[i]) return (unsigned)(i * 64 + __builtin_ctzll(r[i]));
    } else {
        for (size_t i = r.size(); i-- > 0;)
            if (r[i]) return (unsigned)(i * 64 + 63 - __builtin_clzll(r[i]));
    }
    return g_fibers.n;
}
// Saves the running context in `from` and runs thread `to` (threadIdx follows the switch).
inline void emu_enter(EmuCtx& from, unsigned to) {
    g_fibers.current = to;
    threadIdx = dim3{to, 0, 0};
    emu_swap(from, g_fibers.ctx[to]);
}
[[noreturn]] inline void emu_deadlock(const char* what) {
    std::fprintf(stderr, "emulate.h: deadlock in block (%u, %u, %u): %s, and no thread can run\n", blockIdx.x,
                 blockIdx.y, blockIdx.z, what);
    std::abort();
}
inline void emu_fiber_main() {
    (*g_fibers.body)();
    g_fibers.done[g_fibers.current] = 1;
    emu_set_runnable(g_fibers.current, false);
    if (--g_fibers.alive == 0) emu_swap(g_fibers.dead, g_fibers.caller);  // never returns here
    const unsigned to = emu_pick();
    if (to == g_fibers.n) emu_deadlock("a thread ended while others wait at a barrier it did not reach");
    emu_enter(g_fibers.dead, to);
}

// A barrier of `expected` threads: the last to arrive releases the others (they become
// runnable again); a thread that waits when no thread can run is a deadlock.
struct EmuBarrier {
    unsigned expected = 0, count = 0, tag = 0;
    std::vector<unsigned> waiters;
    // tag: for a warp barrier, the arriving lane's count of warp collectives; lanes arriving
    // with different counts have diverged (one made a collective the others did not), which
    // would pair the wrong slots.
    void arrive_and_wait(unsigned my_tag = 0) {
        if (count == 0)
            tag = my_tag;
        else if (my_tag != tag) {
            std::fprintf(stderr, "emulate.h: thread %u of block (%u, %u, %u) reached warp collective %u where "
                         "its warp's first lane reached %u: the lanes diverged\n", threadIdx.x, blockIdx.x,
                         blockIdx.y, blockIdx.z, my_tag, tag);
            std::abort();
        }
        if (++count == expected) {
            count = 0;
            for (unsigned t : waiters) emu_set_runnable(t, true);
            waiters.clear();
            // The releasing thread waits its turn too: the released ones run in the block's
            // order, not after whichever thread happened to arrive last.
            const unsigned me = threadIdx.x, to = emu_pick();
            if (to != me) emu_enter(g_fibers.ctx[me], to);
            return;
        }
        const unsigned me = threadIdx.x;
        waiters.push_back(me);
        emu_set_runnable(me, false);
        const unsigned to = emu_pick();
        if (to == g_fibers.n) {
            char what[96];
            std::snprintf(what, sizeof what, "thread %u waits at a barrier of %u (%u arrived)", me, expected, count);
            emu_deadlock(what);
        }
        emu_enter(g_fibers.ctx[me], to);  // back here once released and picked
    }
};
inline EmuBarrier g_block_barrier;
inline EmuBarrier* g_barrier = &g_block_barrier;
inline std::vector<EmuBarrier> g_warp_barriers;  // one per warp of the running block
// Warp-collective operations exchange through per-thread slots in two banks, used in turn: a
// lane writes its bank, meets its warp at one barrier and reads the others' values. It writes
// that bank again only two operations later, after the next barrier, which no lane passes
// before every lane has finished reading. So one barrier per operation suffices. Every lane of
// a warp makes the same sequence of collectives, so their bank counters agree.
inline unsigned g_bank[1024];
inline unsigned warp_bank() { return g_bank[threadIdx.x]++ & 1; }
inline void warp_sync() { g_warp_barriers[threadIdx.x / 32].arrive_and_wait(g_bank[threadIdx.x]); }

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

// Warp shuffles of any 4-byte type (float, int, unsigned): one slot per thread, bank and type.
template <class T>
inline T* shfl_slots(unsigned bank) {
    static T buf[2][1024];
    return buf[bank];
}
template <class T>
inline T __shfl_xor_sync(unsigned int, T v, int o) {
    T* buf = shfl_slots<T>(warp_bank());
    const int t = (int)threadIdx.x;
    buf[t] = v;
    warp_sync();
    return buf[t ^ o];
}
// Broadcast from lane `src` of the calling warp.
template <class T>
inline T __shfl_sync(unsigned int, T v, int src) {
    T* buf = shfl_slots<T>(warp_bank());
    const int t = (int)threadIdx.x;
    buf[t] = v;
    warp_sync();
    return buf[(t & ~31) + (src & 31)];
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

// Aligned as CUDA's vector types are (a load or store of one at an address that is not a
// multiple of its size faults on the hardware): build-device.sh compiles the kernels with
// -fsanitize=alignment, so such an access stops the emulator with the address and type.
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned int a, unsigned int b, unsigned int c, unsigned int d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned int a, unsigned int b) { return {a, b}; }

// Each thread's pending cp.async copies (see cp_async16 below), emptied at every block's start.
struct EmuCopy {
    void* dst;
    const void* src;
    int bytes;
};
struct EmuCopyGroups {
    std::vector<EmuCopy> open;
    std::vector<std::vector<EmuCopy>> closed;  // oldest first
};
inline EmuCopyGroups g_copies[1024];

// Each thread's pending wgmma products (see wgmma_bf16_n128 below), emptied at every block's
// start. `held`: the accumulator arrays with products pending, and their true values (the
// registers themselves hold NaN until the wait).
struct EmuWgmma {
    float* d;
    int n;
    unsigned long long da, db;
    std::vector<unsigned short> seen;  // the thread's operands at the issue (emu_wgmma_operands)
};
struct EmuWgmmaGroups {
    std::vector<EmuWgmma> open;
    std::vector<std::vector<EmuWgmma>> closed;  // oldest first
    std::vector<std::pair<float*, std::vector<float>>> held;
    bool fenced = false;      // wgmma.fence since the last commit
    bool unfenced_writes = false;  // cp.async writes landed since the last fence.proxy.async
};
inline EmuWgmmaGroups g_wgmma[1024];
inline unsigned g_unfenced_threads = 0;  // threads of the block with unfenced_writes

// Dynamic shared memory of the running launch (run.sh rewrites `extern __shared__ T name[];`
// into `T* const name = emu_dynamic_shared<T>();`). Filled with 0xff bytes (NaN floats) so a
// read before a write shows.
inline std::vector<double> g_dynamic_smem;
template <class T>
inline T* emu_dynamic_shared() {
    return reinterpret_cast<T*>(g_dynamic_smem.data());
}

// Runs f (a kernel call with its arguments bound) over the grid, block by block, with `smem`
// bytes of dynamic shared memory: each block's threads start as fresh fibers once the previous
// block has ended (so all its writes are visible).
inline void launch(dim3 grid, unsigned int threads, const std::function<void()>& f, size_t smem = 0) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    g_dynamic_smem.assign((smem + 7) / 8, 0.0);
    EmuFibers& F = g_fibers;
    if (F.stack_threads < threads) {
        if (F.stacks) munmap(F.stacks, F.stack_threads * (EMU_GUARD + EMU_STACK));
        void* m = mmap(nullptr, threads * (EMU_GUARD + EMU_STACK), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) std::abort();
        F.stacks = static_cast<char*>(m);
        F.stack_threads = threads;
        for (unsigned int t = 0; t < threads; ++t) mprotect(emu_stack(t) - EMU_GUARD, EMU_GUARD, PROT_NONE);
    }
    F.ctx.resize(threads);
    F.done.assign(threads, 0);
    F.n = threads;
    F.body = &f;
    g_block_barrier = EmuBarrier{threads};
    g_warp_barriers.assign((threads + 31) / 32, EmuBarrier{});
    for (unsigned int w = 0; w < g_warp_barriers.size(); ++w) g_warp_barriers[w].expected = std::min(32u, threads - 32 * w);
    // Blocks run one after another, in launch order or (every other launch) in reverse: a
    // kernel whose blocks rely on one another's order, other than through the atomics of a
    // last-block combine, gets a wrong result in one of the two.
    static unsigned long long launches = 0;
    const bool backwards = (launches++ & 1) != 0;
    const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
    for (unsigned long long b = 0; b < nblocks; ++b) {
        const unsigned long long lin = backwards ? nblocks - 1 - b : b;
        blockIdx = dim3{(unsigned)(lin % grid.x), (unsigned)(lin / grid.x % grid.y), (unsigned)(lin / grid.x / grid.y)};
        // Dynamic shared memory starts as NaN bytes in every block, so a read before a write
        // shows (static __shared__ variables keep the previous block's values).
        std::memset(g_dynamic_smem.data(), 0xff, g_dynamic_smem.size() * 8);
        for (unsigned int t = 0; t < threads; ++t) {
            emu_make(F.ctx[t], emu_stack(t), EMU_STACK, emu_fiber_main);
            F.done[t] = 0;
        }
        std::fill(g_bank, g_bank + threads, 0u);
        for (unsigned int t = 0; t < threads; ++t) g_copies[t] = EmuCopyGroups{}, g_wgmma[t] = EmuWgmmaGroups{};
        g_unfenced_threads = 0;
        F.alive = threads;
        F.runnable.assign((threads + 63) / 64, 0);
        for (unsigned int t = 0; t < threads; ++t) emu_set_runnable(t, true);
        F.reverse = (F.blocks++ & 1) != 0;
        emu_enter(F.caller, emu_pick());
    }
}

// The PTX-only helpers of kernels/common.cuh. Rounding as cvt.rn.bf16.f32: to nearest even.
inline unsigned short f2bf(float f) {
    unsigned int u = as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
// cp.async, deferred as on the hardware: a thread's copies join its open group, cp.async.commit
// closes the group, and cp.async.wait_group N performs (reads the source and writes shared
// memory for) every closed group but the newest N. Until then the destination holds NaN bytes,
// from the issue on: a tile read before its wait, or a buffer refilled while another warp still
// reads it (which the warp-ahead order above exposes), reads NaN and the check against the
// reference fails. Copies still pending when the block ends are dropped. Both addresses must be
// 16-byte aligned, as the hardware requires.
inline void cp_async16(void* smem, const void* gmem, int src_bytes) {
    if ((reinterpret_cast<std::uintptr_t>(smem) | reinterpret_cast<std::uintptr_t>(gmem)) % 16) {
        std::fprintf(stderr, "emulate.h: cp.async of 16 bytes from %p to %p (thread %u): both must be 16-byte aligned\n",
                     gmem, smem, threadIdx.x);
        std::abort();
    }
    std::memset(smem, 0xff, 16);  // NaN until the wait: what the hardware holds there is unknown
    g_copies[threadIdx.x].open.push_back({smem, gmem, src_bytes});
}
inline void cp_async_commit() {
    EmuCopyGroups& q = g_copies[threadIdx.x];
    q.closed.push_back(std::move(q.open));
    q.open.clear();
}
template <int N>
inline void cp_async_wait() {
    EmuCopyGroups& q = g_copies[threadIdx.x];
    const size_t done = q.closed.size() > (size_t)N ? q.closed.size() - N : 0;
    bool landed = false;
    for (size_t i = 0; i < done; ++i)
        for (const EmuCopy& c : q.closed[i]) {
            std::memset(c.dst, 0, 16);
            if (c.bytes) std::memcpy(c.dst, c.src, 16);
            landed = true;
        }
    q.closed.erase(q.closed.begin(), q.closed.begin() + done);
    // Landed writes are generic-proxy writes: a wgmma (async proxy) may read them only after
    // this thread's fence.proxy.async (checked in emu_wgmma).
    EmuWgmmaGroups& w = g_wgmma[threadIdx.x];
    if (landed && !w.unfenced_writes) w.unfenced_writes = true, ++g_unfenced_threads;
}
// The 32 row addresses of the calling warp's ldmatrix .x4, indexed by lane: lane l gives row
// l % 8 of matrix l / 8 (16-byte aligned, as the hardware requires). They go through per-thread
// slots as in the mma below.
inline const unsigned short* const* ldmatrix_rows(const unsigned short* p) {
    static const unsigned short* rows[2][1024];
    if (reinterpret_cast<std::uintptr_t>(p) % 16) {
        std::fprintf(stderr, "emulate.h: ldmatrix row address %p of thread %u is not 16-byte aligned\n",
                     (const void*)p, threadIdx.x);
        std::abort();
    }
    const unsigned bank = warp_bank();
    const int t = (int)threadIdx.x;
    rows[bank][t] = p;
    warp_sync();
    return &rows[bank][t & ~31];
}
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: each lane l receives r[i] = the 32 bits at elements
// 2·(l % 4), +1 of row l / 4 of matrix i.
inline void ldmatrix_x4(unsigned int* r, const unsigned short* p) {
    const unsigned short* const* rows = ldmatrix_rows(p);
    const int lane = threadIdx.x & 31;
    for (int i = 0; i < 4; ++i) std::memcpy(&r[i], rows[8 * i + lane / 4] + 2 * (lane % 4), 4);
}
// ldmatrix ... .x4.trans: lane l receives r[i] = the bf16 at column l / 4 of rows 2·(l % 4) and
// 2·(l % 4) + 1 of matrix i (low half first).
inline void ldmatrix_x4_trans(unsigned int* r, const unsigned short* p) {
    const unsigned short* const* rows = ldmatrix_rows(p);
    const int lane = threadIdx.x & 31;
    for (int i = 0; i < 4; ++i) {
        const unsigned short lo = rows[8 * i + 2 * (lane % 4)][lane / 4];
        const unsigned short hi = rows[8 * i + 2 * (lane % 4) + 1][lane / 4];
        r[i] = (unsigned int)lo | ((unsigned int)hi << 16);
    }
}
// mma.sync m16n8k16 over the fragment layout of kernels/common.cuh (g = lane/4, c = lane%4):
//   a0 = A[g][2c..2c+1], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..]
//   b0 = B[2c..2c+1][g],  b1 = B[2c+8..][g];  d0,d1 = D[g][2c..], d2,d3 = D[g+8][2c..]
// Each lane's share goes through per-thread slots (warp_bank); a lane then gathers only what
// its outputs need: rows g and g+8 of A from lanes 4g..4g+3, columns 2c and 2c+1 of B from
// lanes 4·(2c)..4·(2c)+3 and 4·(2c+1)..4·(2c+1)+3. Sums in k order, one fmaf each.
inline void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
    static unsigned int fa[2][1024][4], fb[2][1024][2];
    const unsigned bank = warp_bank();
    const int t = (int)threadIdx.x, lane = t & 31, w0 = t & ~31;
    auto lo = [](unsigned int w) { return as_float(w << 16); };
    auto hi = [](unsigned int w) { return as_float(w & 0xffff0000u); };
    for (int e = 0; e < 4; ++e) fa[bank][t][e] = a[e];
    for (int e = 0; e < 2; ++e) fb[bank][t][e] = b[e];
    warp_sync();
    const int g = lane >> 2, c = lane & 3;
    float A[2][16], B[2][16];  // A rows g, g+8; B columns 2c, 2c+1 (over k)
    for (int cc = 0; cc < 4; ++cc) {
        const unsigned int* x = fa[bank][w0 + 4 * g + cc];
        A[0][2 * cc] = lo(x[0]), A[0][2 * cc + 1] = hi(x[0]);
        A[1][2 * cc] = lo(x[1]), A[1][2 * cc + 1] = hi(x[1]);
        A[0][2 * cc + 8] = lo(x[2]), A[0][2 * cc + 9] = hi(x[2]);
        A[1][2 * cc + 8] = lo(x[3]), A[1][2 * cc + 9] = hi(x[3]);
        for (int j = 0; j < 2; ++j) {
            const unsigned int* y = fb[bank][w0 + 4 * (2 * c + j) + cc];
            B[j][2 * cc] = lo(y[0]), B[j][2 * cc + 1] = hi(y[0]);
            B[j][2 * cc + 8] = lo(y[1]), B[j][2 * cc + 9] = hi(y[1]);
        }
    }
    for (int e = 0; e < 4; ++e) {
        float s = d[e];
        for (int k = 0; k < 16; ++k) s = fmaf(A[e >> 1][k], B[e & 1][k], s);
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

// The shared-memory address of p (wgmma descriptors take one): EMU_SMEM_BASE plus its offset in
// the launch's dynamic shared memory, the only shared memory gemm_wgmma.cu addresses this way.
// The base is deliberately not 1024-byte aligned (the hardware promises 16), so a kernel that
// does not align its swizzled tiles itself reads the wrong elements here.
static const unsigned EMU_SMEM_BASE = 0x410;
inline unsigned int shared_addr(const void* p) {
    const char* base = reinterpret_cast<const char*>(g_dynamic_smem.data());
    const char* c = static_cast<const char*>(p);
    if (c < base || c >= base + g_dynamic_smem.size() * 8) {
        std::fprintf(stderr, "emulate.h: shared_addr of %p, outside the launch's dynamic shared memory\n", p);
        std::abort();
    }
    return EMU_SMEM_BASE + (unsigned int)(c - base);
}
inline void fence_proxy_async() {
    EmuWgmmaGroups& w = g_wgmma[threadIdx.x];
    if (w.unfenced_writes) w.unfenced_writes = false, --g_unfenced_threads;
}
inline void wgmma_fence() { g_wgmma[threadIdx.x].fenced = true; }
template <int R>
inline void wgmma_hold(float*) {}
// One bf16 (its bits) of a wgmma operand: row r (of M or N), element k of the descriptor's K-major tile in
// the 128-byte swizzle — the hardware's address (start + 8-row group · stride byte offset +
// 128·(r % 8) + 2k) with address bits 4–6 XORed by bits 7–9. The descriptor must have the form
// gemm_wgmma.cu builds (swizzle mode 1, base offset 0).
inline unsigned short emu_wgmma_operand(unsigned long long desc, int r, int k) {
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) {
        std::fprintf(stderr, "emulate.h: wgmma descriptor %016llx: only the 128-byte swizzle with base offset 0 is emulated\n", desc);
        std::abort();
    }
    const unsigned start = (unsigned)(desc & 0x3FFF) << 4, sbo = (unsigned)((desc >> 32) & 0x3FFF) << 4;
    unsigned a = start + (unsigned)(r >> 3) * sbo + (unsigned)(r & 7) * 128 + 2 * (unsigned)k;
    a ^= ((a >> 7) & 7) << 4;
    if (a < EMU_SMEM_BASE || a - EMU_SMEM_BASE + 2 > g_dynamic_smem.size() * 8) {
        std::fprintf(stderr, "emulate.h: wgmma operand at shared address %#x is outside the launch's %zu bytes of dynamic shared memory\n",
                     a, g_dynamic_smem.size() * 8);
        std::abort();
    }
    unsigned short v;
    std::memcpy(&v, reinterpret_cast<const char*>(g_dynamic_smem.data()) + (a - EMU_SMEM_BASE), 2);
    return v;
}
// The operands one thread's outputs of an m64nNk16 product read, as bf16 bits: rows 16q + l/4
// and + 8 of A, columns 8j + 2·(l%4) and + 1 of B, each over k = 0..15.
inline std::vector<unsigned short> emu_wgmma_operands(const EmuWgmma& w) {
    const int q = (threadIdx.x >> 5) & 3, l = threadIdx.x & 31;
    std::vector<unsigned short> v;
    v.reserve(16 * (2 + w.n / 4));
    for (int k = 0; k < 16; ++k) {
        for (int h = 0; h < 2; ++h) v.push_back(emu_wgmma_operand(w.da, 16 * q + l / 4 + 8 * h, k));
        for (int j = 0; j < w.n / 8; ++j)
            for (int e = 0; e < 2; ++e) v.push_back(emu_wgmma_operand(w.db, 8 * j + 2 * (l % 4) + e, k));
    }
    return v;
}
// wgmma.mma_async.m64nNk16.f32.bf16.bf16 (scale-d 1, both operands K-major in shared memory),
// deferred as on the hardware: the product joins the thread's open group, wgmma.commit_group
// closes it, and wgmma.wait_group N performs every closed group but the newest N and writes the
// accumulators back; from the issue until then they read NaN. The hardware may read the
// operands at any time in between, so the thread's operands are read at the issue and again at
// the wait, and a difference stops the program: a stage read before every thread's copies
// landed (NaN at the issue), or refilled before its products were waited for. The issue also
// requires a wgmma.fence since the last commit, and no thread of the block holding landed
// cp.async writes without a fence.proxy.async after them. Thread t of the warpgroup (warp
// q = (t / 32) % 4, lane l) owns d[4j + e] = D[16q + l/4 + 8·(e/2)][8j + 2·(l%4) + e%2]; each
// sums its 16 products in k order, one fmaf each. Not seen: the PTX text itself (ptxas checks
// it), descriptors that differ between the threads of a warpgroup, the tensor cores' own
// summation order.
inline void emu_wgmma(float* d, int n, unsigned long long da, unsigned long long db) {
    EmuWgmmaGroups& g = g_wgmma[threadIdx.x];
    if (!g.fenced) {
        std::fprintf(stderr, "emulate.h: thread %u issued wgmma without a wgmma.fence since its last commit\n",
                     threadIdx.x);
        std::abort();
    }
    if (g_unfenced_threads) {
        std::fprintf(stderr, "emulate.h: thread %u issued wgmma while %u thread(s) of the block hold landed cp.async "
                     "writes without a fence.proxy.async\n", threadIdx.x, g_unfenced_threads);
        std::abort();
    }
    bool held = false;
    for (auto& h : g.held) held |= h.first == d;
    if (!held) g.held.emplace_back(d, std::vector<float>(d, d + n / 2));
    for (int i = 0; i < n / 2; ++i) d[i] = NAN;
    g.open.push_back({d, n, da, db, {}});
    g.open.back().seen = emu_wgmma_operands(g.open.back());
}
inline void wgmma_bf16_n128(float* d, unsigned long long da, unsigned long long db) { emu_wgmma(d, 128, da, db); }
inline void wgmma_bf16_n256(float* d, unsigned long long da, unsigned long long db) { emu_wgmma(d, 256, da, db); }
inline void wgmma_commit() {
    EmuWgmmaGroups& g = g_wgmma[threadIdx.x];
    g.closed.push_back(std::move(g.open));
    g.open.clear();
    g.fenced = false;
}
template <int N>
inline void wgmma_wait() {
    EmuWgmmaGroups& g = g_wgmma[threadIdx.x];
    const size_t done = g.closed.size() > (size_t)N ? g.closed.size() - N : 0;
    for (size_t i = 0; i < done; ++i)
        for (const EmuWgmma& w : g.closed[i]) {
            std::vector<float>* v = nullptr;
            for (auto& h : g.held)
                if (h.first == w.d) v = &h.second;
            const std::vector<unsigned short> now = emu_wgmma_operands(w);
            if (now != w.seen) {
                std::fprintf(stderr, "emulate.h: thread %u of block (%u, %u, %u): a wgmma's shared-memory operands "
                             "changed between its issue and its wait_group (read before they landed, or overwritten "
                             "while in flight)\n", threadIdx.x, blockIdx.x, blockIdx.y, blockIdx.z);
                std::abort();
            }
            // this thread's rows 16q + l/4 (+8) and columns 8j + 2·(l%4) (+1), in the order of
            // emu_wgmma_operands
            float A[2][16], B[64][16];
            const int per_k = 2 + w.n / 4;
            for (int k = 0; k < 16; ++k) {
                const unsigned short* o = now.data() + k * per_k;
                for (int h = 0; h < 2; ++h) A[h][k] = as_float((unsigned int)o[h] << 16);
                for (int c = 0; c < w.n / 4; ++c) B[c][k] = as_float((unsigned int)o[2 + c] << 16);
            }
            for (int r = 0; r < w.n / 2; ++r) {
                const int j = r / 4, e = r % 4;
                float s = (*v)[r];
                for (int k = 0; k < 16; ++k) s = fmaf(A[e / 2][k], B[2 * j + e % 2][k], s);
                (*v)[r] = s;
            }
        }
    g.closed.erase(g.closed.begin(), g.closed.begin() + done);
    // Accumulators with nothing pending any more get their values.
    auto pending = [&](float* d) {
        for (const auto& grp : g.closed)
            for (const EmuWgmma& w : grp)
                if (w.d == d) return true;
        for (const EmuWgmma& w : g.open)
            if (w.d == d) return true;
        return false;
    };
    for (size_t h = 0; h < g.held.size();) {
        if (pending(g.held[h].first)) {
            ++h;
            continue;
        }
        std::copy(g.held[h].second.begin(), g.held[h].second.end(), g.held[h].first);
        g.held.erase(g.held.begin() + (long)h);
    }
}
