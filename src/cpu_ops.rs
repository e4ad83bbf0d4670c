//! Plain f32 CPU operators: the reference backend's building blocks and the oracles that the
//! CUDA kernels are tested against. Row-major everywhere; weights are stored as the checkpoint
//! stores them, [out, in].

use rayon::prelude::*;

/// Dot product with 8 independent accumulators so the compiler can vectorise it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// out[t, m] = Σ_k x[t, k] · w[m, k]  (+ bias[m]).
/// out: [T, M], x: [T, K], w: [M, K], bias: [M]. Parallel over blocks of output features, so the
/// weights are streamed once for all T rows; for T > 1 the blocks are written to `scratch`
/// ([M, T], reused between calls) and transposed into `out`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    t: usize,
    k: usize,
    m: usize,
    scratch: &mut Vec<f32>,
) {
    assert_eq!(x.len(), t * k, "matmul: x is not [T={t}, K={k}]");
    assert_eq!(w.len(), m * k, "matmul: w is not [M={m}, K={k}]");
    assert_eq!(out.len(), t * m, "matmul: out is not [T={t}, M={m}]");
    if t == 0 || m == 0 {
        return; // no rows (e.g. a forward call that asks for no logits)
    }
    const BLOCK: usize = 16;
    let out_mt: &mut [f32] = if t == 1 {
        out
    } else {
        scratch.resize(t * m, 0.0);
        &mut scratch[..t * m]
    };
    out_mt
        .par_chunks_mut(BLOCK * t)
        .enumerate()
        .for_each(|(bi, chunk)| {
            let m0 = bi * BLOCK;
            for (j, row) in chunk.chunks_mut(t).enumerate() {
                let wr = &w[(m0 + j) * k..(m0 + j + 1) * k];
                let b = bias.map_or(0.0, |b| b[m0 + j]);
                for (ti, o) in row.iter_mut().enumerate() {
                    *o = dot(&x[ti * k..(ti + 1) * k], wr) + b;
                }
            }
        });
    if t > 1 {
        for (ti, orow) in out.chunks_mut(m).enumerate() {
            for (mi, o) in orow.iter_mut().enumerate() {
                *o = scratch[mi * t + ti];
            }
        }
    }
}

/// y[t] = x[t] / sqrt(mean(x[t]²) + eps) · weight, per row of D.  y, x: [T, D], weight: [D].
pub fn rmsnorm(y: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for i in 0..d {
                yr[i] = xr[i] * inv * weight[i];
            }
        });
}

/// Rotary embedding in place, HF "rotate half" layout: pairs (i, i + Dh/2).
/// x: [T, heads, Dh], positions: [T], inv_freq: [Dh/2].
pub fn rope(x: &mut [f32], positions: &[usize], inv_freq: &[f32], heads: usize) {
    let dh = inv_freq.len() * 2;
    let half = dh / 2;
    x.par_chunks_mut(heads * dh)
        .zip(positions.par_iter())
        .for_each(|(xt, &pos)| {
            for i in 0..half {
                let angle = pos as f32 * inv_freq[i];
                let (sin, cos) = angle.sin_cos();
                for h in 0..heads {
                    let base = h * dh;
                    let (a, b) = (xt[base + i], xt[base + i + half]);
                    xt[base + i] = a * cos - b * sin;
                    xt[base + i + half] = b * cos + a * sin;
                }
            }
        });
}

/// out[t, i] = silu(gate[t, i]) · up[t, i].  All [T, F].
pub fn silu_mul(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (&g, &u))| {
            *o = g / (1.0 + (-g).exp()) * u;
        });
}

/// Index of the first maximum; NaN entries never win (an all-NaN or empty slice gives 0).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    let mut seen = false;
    for (i, &v) in x.iter().enumerate() {
        // Strict `>` keeps the first of equal maxima, so ties go to the lowest index.
        if !v.is_nan() && (!seen || v > best_v) {
            best = i;
            best_v = v;
            seen = true;
        }
    }
    best
}

/// Attention of one query head over `len` cached positions followed by `n` more key/value rows
/// `own` of the call (the token itself, or its run up to itself: so a token that does not write
/// the cache still sees itself). q: [Dh]; keys/values and own: rows of Dh at `stride` apart;
/// out: [Dh].
#[allow(clippy::too_many_arguments)]
pub fn attend(
    out: &mut [f32],
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    len: usize,
    own: (&[f32], &[f32], usize),
    scores: &mut Vec<f32>,
) {
    let dh = q.len();
    let scale = 1.0 / (dh as f32).sqrt();
    let (own_k, own_v, n) = own;
    scores.clear();
    for s in 0..len {
        scores.push(dot(q, &keys[s * stride..s * stride + dh]) * scale);
    }
    for j in 0..n {
        scores.push(dot(q, &own_k[j * stride..j * stride + dh]) * scale);
    }
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in scores.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    out.fill(0.0);
    for (s, &p) in scores.iter().enumerate() {
        let vr = if s < len {
            &values[s * stride..s * stride + dh]
        } else {
            &own_v[(s - len) * stride..(s - len) * stride + dh]
        };
        let w = p / sum;
        for i in 0..dh {
            out[i] += w * vr[i];
        }
    }
}
