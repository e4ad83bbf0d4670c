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
// hybrid_gather_f32 (persistent mode): r[b, :] = saved[steered[b] ? B + b·C + win[b] : b, :].
//   Launch: grid (B), block 256.
#include "common.cuh"

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
    const float* lt = think_logits + (size_t)b * V;
    int best = 0;
    float best_v = -INFINITY;
    for (int c = 0; c < C; ++c) {
        const int t = tok[B + b * C + c];
        const float v = (t >= 0 && t < V) ? lt[t] : -INFINITY;
        if (c == 0 || v > best_v) {
            best = c;
            best_v = v;
        }
    }
    emit[b] = tok[B + b * C + best];
    steered[b] = 1;
    win[b] = best;
}

extern "C" __global__ void hybrid_gather_f32(float* __restrict__ r, const float* __restrict__ saved,
                                             const int* __restrict__ steered, const int* __restrict__ win,
                                             int B, int C, int D) {
    pdl_enter();
    const int b = blockIdx.x;
    const int row = steered[b] ? B + b * C + win[b] : b;
    const float* src = saved + (size_t)row * D;
    float* dst = r + (size_t)b * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = src[i];
}
