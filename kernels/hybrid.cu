// hybrid.cu: the per-step decisions of the hybrid loop (hybrid.md §3–4), kept on the device so a
// whole step is one CUDA graph. Rows of the base model's batch: [0, B) are the problems'
// unsteered rows, [B, B + B·C) their candidates (problem b, coefficient c at B + b·C + c).
//
// hybrid_expand_f32: candidate rows start from their problem's residual at the steering point,
//   r[B + b·C + c, :] = r[b, :];  idx[row] = category[b] (candidates), coef[row] = coefs[c]
//   (candidates) or 0 (problem rows). f32 copies, no rounding. Launch: grid (B·C), block 256.
// hybrid_select_i32: per problem b, think = argmax of the thinking model (think_tok[b]), base =
//   tok[b]. If think == base and gating is on: emit base, steered 0. Else emit the candidate
//   tok[B + b·C + c] with the largest think_logits[b, ·] (first on ties), steered 1, win[b] = c.
//   Launch: grid (ceil(B / 128)), block 128: one thread per problem, C ≤ a few dozen.
// hybrid_gather_f32 (persistent mode): r[b, :] = saved[steered[b] ? B + j·C + win[b] : b, :] with
//   j = b, or j = cidx[b] when cidx is given (the gate-first step). Launch: grid (B), block 256.
//
// Gate first (large batches): the problems' rows run the whole base model, the gate picks the
// problems that need candidates, and only their candidates run the blocks after the steering
// point, as rows [0, n·C) of a launch sized for B·C rows (kernels skip rows ≥ live = n·C).
// hybrid_gate_i32: need[b] = !gating || think_tok[b] != tok[b]; the needing problems in order get
//   compact indices i: sel[i] = b, cidx[b] = i (−1 for the others), live[0] = n·C. Every problem
//   gets emit[b] = tok[b], steered[b] = 0, win[b] = −1, which hybrid_select_compact_i32 then
//   overwrites for the needing ones. Launch: grid 1, block a multiple of 32 ≥ B (≤ 1024); the
//   indices come from an inclusive scan in shared memory (Hillis–Steele, log2(block) rounds).
// hybrid_expand_compact_f32: candidate row j = i·C + c of compact problem i < n, b = sel[i]:
//   r[j, :] = saved[b, :] (f32 copy), idx[j] = category[b], coef[j] = coefs[c], pos[j] = pos_p[b],
//   slot[j] = slot_p[b]. Rows j ≥ n·C keep their residual but take the position, slot and
//   category of problem sel[0] (problem 0 when n = 0), so that kernels launched over all B·C rows
//   without a live count still read in bounds. Launch: grid (B·C), block 256.
// hybrid_select_compact_i32: compact problem i < n (thread i), b = sel[i]: emit[b] = the candidate
//   tok[i·C + c] with the largest think_logits[b, ·] (first on ties; ids outside [0, V) score
//   −inf), steered[b] = 1, win[b] = c. Launch: grid (ceil(B / 128)), block 128.
//
// The host-driven windowed loop (src/hybrid.rs run_cached) keeps every cached position's residual
// at the steering point, kept [slots, L, D] f32, so that a window's candidate run starts there.
// hybrid_keep_f32: store = 1: kept[slot[t], pos[t], :] = r[t, :] for rows t < T (rows that wrote
//   the cache); store = 0: r[t, :] = kept[slot[t], pos[t], :] (rows of read-only runs). A row whose
//   slot or position lies outside [0, slots) × [0, L) is left alone (the host refuses such steps
//   first). f32 copies, no rounding. Launch: grid (T), block 256.
#include "common.cuh"

// The candidate of tok[0..C) with the largest lt[id] (first on ties; ids outside [0, V): −inf).
__device__ __forceinline__ int best_candidate(const int* __restrict__ tok, const float* __restrict__ lt, int C,
                                              int V) {
    int best = 0;
    float best_v = -INFINITY;
    for (int c = 0; c < C; ++c) {
        const int t = tok[c];
        const float v = (t >= 0 && t < V) ? lt[t] : -INFINITY;
        if (c == 0 || v > best_v) {
            best = c;
            best_v = v;
        }
    }
    return best;
}

extern "C" __global__ void hybrid_expand_f32(float* __restrict__ r, int* __restrict__ idx, float* __restrict__ coef,
                                             const int* __restrict__ category, const float* __restrict__ coefs,
                                             int B, int C, int D) {
    pdl_enter();
    const int j = blockIdx.x;  // candidate j = b·C + c
    const int b = j / C, c = j % C;
    const float* src = r + (size_t)b * D;
    float* dst = r + (size_t)(B + j) * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = src[i];
    if (threadIdx.x == 0) {
        idx[B + j] = category[b];
        coef[B + j] = coefs[c];
        if (c == 0) {
            idx[b] = 0;
            coef[b] = 0.0f;
        }
    }
}

extern "C" __global__ void hybrid_select_i32(int* __restrict__ emit, int* __restrict__ steered, int* __restrict__ win,
                                             const int* __restrict__ tok, const int* __restrict__ think_tok,
                                             const float* __restrict__ think_logits, int B, int C, int V,
                                             int gating) {
    pdl_enter();
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const int base = tok[b];
    if (gating && think_tok[b] == base) {
        emit[b] = base;
        steered[b] = 0;
        win[b] = -1;
        return;
    }
    const int best = best_candidate(tok + B + b * C, think_logits + (size_t)b * V, C, V);
    emit[b] = tok[B + b * C + best];
    steered[b] = 1;
    win[b] = best;
}

extern "C" __global__ void hybrid_gather_f32(float* __restrict__ r, const float* __restrict__ saved,
                                             const int* __restrict__ steered, const int* __restrict__ win,
                                             const int* __restrict__ cidx, int B, int C, int D) {
    pdl_enter();
    const int b = blockIdx.x;
    const int row = steered[b] ? B + (cidx ? cidx[b] : b) * C + win[b] : b;
    const float* src = saved + (size_t)row * D;
    float* dst = r + (size_t)b * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void hybrid_gate_i32(int* __restrict__ sel, int* __restrict__ cidx, int* __restrict__ live,
                                           int* __restrict__ emit, int* __restrict__ steered, int* __restrict__ win,
                                           const int* __restrict__ tok, const int* __restrict__ think_tok, int B,
                                           int C, int gating) {
    pdl_enter();
    __shared__ int scan[1024];
    const int b = threadIdx.x;
    const bool need = b < B && (!gating || think_tok[b] != tok[b]);
    scan[b] = need ? 1 : 0;
    __syncthreads();
    for (int o = 1; o < (int)blockDim.x; o <<= 1) {
        const int add = b >= o ? scan[b - o] : 0;
        __syncthreads();
        scan[b] += add;
        __syncthreads();
    }
    if (b < B) {
        const int i = scan[b] - 1;  // inclusive scan: this problem's compact index when it needs one
        emit[b] = tok[b];
        steered[b] = 0;
        win[b] = -1;
        cidx[b] = need ? i : -1;
        if (need) sel[i] = b;
    }
    if (b == 0) live[0] = scan[blockDim.x - 1] * C;
}

extern "C" __global__ void hybrid_expand_compact_f32(float* __restrict__ r, int* __restrict__ idx,
                                                     float* __restrict__ coef, int* __restrict__ pos,
                                                     int* __restrict__ slot, const float* __restrict__ saved,
                                                     const int* __restrict__ sel, const int* __restrict__ live,
                                                     const int* __restrict__ category,
                                                     const float* __restrict__ coefs, const int* __restrict__ pos_p,
                                                     const int* __restrict__ slot_p, int C, int D) {
    pdl_enter();
    const int j = blockIdx.x, n = *live / C;
    const int i = j / C, c = j % C;
    const bool real = i < n;
    const int b = real ? sel[i] : (n > 0 ? sel[0] : 0);
    if (threadIdx.x == 0) {
        idx[j] = category[b];
        coef[j] = coefs[c];
        pos[j] = pos_p[b];
        slot[j] = slot_p[b];
    }
    if (!real) return;
    const float* src = saved + (size_t)b * D;
    float* dst = r + (size_t)j * D;
    for (int e = threadIdx.x; e < D; e += blockDim.x) dst[e] = src[e];
}

extern "C" __global__ void hybrid_select_compact_i32(int* __restrict__ emit, int* __restrict__ steered,
                                                     int* __restrict__ win, const int* __restrict__ tok,
                                                     const int* __restrict__ sel, const int* __restrict__ live,
                                                     const float* __restrict__ think_logits, int B, int C, int V) {
    pdl_enter();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B || i >= *live / C) return;
    const int b = sel[i];
    const int best = best_candidate(tok + i * C, think_logits + (size_t)b * V, C, V);
    emit[b] = tok[i * C + best];
    steered[b] = 1;
    win[b] = best;
}

extern "C" __global__ void hybrid_keep_f32(float* __restrict__ r, float* __restrict__ kept, const int* __restrict__ slot,
                                           const int* __restrict__ pos, int slots, int L, int D, int store) {
    pdl_enter();
    const int t = blockIdx.x, s = slot[t], p = pos[t];
    if (s < 0 || s >= slots || p < 0 || p >= L) return;
    float* row = r + (size_t)t * D;
    float* k = kept + ((size_t)s * L + p) * D;
    if (store)
        for (int i = threadIdx.x; i < D; i += blockDim.x) k[i] = row[i];
    else
        for (int i = threadIdx.x; i < D; i += blockDim.x) row[i] = k[i];
}
