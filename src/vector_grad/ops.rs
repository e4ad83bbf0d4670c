//! Generic forward and backward operators for the steering-vector gradient: each forward op
//! mirrors the f32 one in `cpu_ops` (same formula, same order of rounding where it matters), and
//! each backward op is its vector-Jacobian product with respect to the *input* only — weights
//! are frozen, so no weight gradient is ever formed. Weights are f32 [out, in] as stored.
//!
//! Row-major everywhere. Parallel loops write disjoint outputs in a fixed partition, so results
//! do not depend on the number of threads (checkpoint/resume relies on that).

use rayon::prelude::*;

use super::float::Float;

/// Σ_k a[k]·w[k] with 8 independent accumulators (vectorises for both f32 and f64).
#[inline]
pub fn dot<F: Float>(a: &[F], w: &[f32]) -> F {
    let mut acc = [F::ZERO; 8];
    let (ca, cw) = (a.chunks_exact(8), w.chunks_exact(8));
    let (ra, rw) = (ca.remainder(), cw.remainder());
    for (x, y) in ca.zip(cw) {
        for i in 0..8 {
            acc[i] += x[i] * F::of(y[i]);
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (x, &y) in ra.iter().zip(rw) {
        s += *x * F::of(y);
    }
    s
}

/// Σ_k a[k]·b[k] for two activations.
#[inline]
pub fn dot_ff<F: Float>(a: &[F], b: &[F]) -> F {
    let mut acc = [F::ZERO; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..4 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    s
}

/// out[t, m] = Σ_k x[t, k]·w[m, k] (+ bias[m]).  out: [T, M], x: [T, K], w: [M, K].
/// Parallel over blocks of 16 output features so each weight row is read once for all T rows.
pub fn matmul<F: Float>(out: &mut [F], x: &[F], w: &[f32], bias: Option<&[f32]>, k: usize) {
    let t = x.len() / k.max(1);
    let m = w.len() / k.max(1);
    assert_eq!(x.len(), t * k, "matmul: x is not [T, K={k}]");
    assert_eq!(out.len(), t * m, "matmul: out is not [T={t}, M={m}]");
    const BLOCK: usize = 16;
    let mut mt = vec![F::ZERO; t * m]; // [M, T]
    mt.par_chunks_mut(BLOCK * t.max(1))
        .enumerate()
        .for_each(|(bi, chunk)| {
            for (j, row) in chunk.chunks_mut(t.max(1)).enumerate() {
                let mi = bi * BLOCK + j;
                let wr = &w[mi * k..(mi + 1) * k];
                let b = bias.map_or(F::ZERO, |b| F::of(b[mi]));
                for (ti, o) in row.iter_mut().enumerate() {
                    *o = dot(&x[ti * k..(ti + 1) * k], wr) + b;
                }
            }
        });
    for (ti, orow) in out.chunks_mut(m.max(1)).enumerate() {
        for (mi, o) in orow.iter_mut().enumerate() {
            *o = mt[mi * t + ti];
        }
    }
}

/// The input gradient of `matmul`: dx[t, k] += Σ_m dy[t, m]·w[m, k].
/// dx: [T, K], dy: [T, M], w: [M, K]. Tiles of 32 rows × 64 columns, each accumulated over all
/// M in a small buffer (axpy with a weight row segment), so w is streamed ⌈T/32⌉ times.
pub fn matmul_t_acc<F: Float>(dx: &mut [F], dy: &[F], w: &[f32], k: usize) {
    const TT: usize = 32;
    const KT: usize = 64;
    let t = dx.len() / k.max(1);
    let m = w.len() / k.max(1);
    assert_eq!(dx.len(), t * k, "matmul_t: dx is not [T, K={k}]");
    assert_eq!(dy.len(), t * m, "matmul_t: dy is not [T={t}, M={m}]");
    let (nt, nk) = (t.div_ceil(TT), k.div_ceil(KT));
    let tiles: Vec<Vec<F>> = (0..nt * nk)
        .into_par_iter()
        .map(|tile| {
            let (t0, k0) = ((tile / nk) * TT, (tile % nk) * KT);
            let (t1, k1) = ((t0 + TT).min(t), (k0 + KT).min(k));
            let kw = k1 - k0;
            let mut acc = vec![F::ZERO; (t1 - t0) * kw]; // [TT, KT]
            for mi in 0..m {
                let wr = &w[mi * k + k0..mi * k + k1];
                for (ti, a) in acc.chunks_exact_mut(kw).enumerate() {
                    let g = dy[(t0 + ti) * m + mi];
                    for (o, &wv) in a.iter_mut().zip(wr) {
                        *o += g * F::of(wv);
                    }
                }
            }
            acc
        })
        .collect();
    for (tile, acc) in tiles.iter().enumerate() {
        let (t0, k0) = ((tile / nk) * TT, (tile % nk) * KT);
        let kw = (k0 + KT).min(k) - k0;
        for (ti, a) in acc.chunks_exact(kw).enumerate() {
            let row = &mut dx[(t0 + ti) * k + k0..(t0 + ti) * k + k0 + kw];
            row.iter_mut().zip(a).for_each(|(o, &v)| *o += v);
        }
    }
}

/// y[t] = x[t]·r[t]·weight with r[t] = 1/sqrt(mean(x[t]²) + eps); r is kept for the backward.
/// y, x: [T, D], weight: [D], r: [T].
pub fn rmsnorm_fwd<F: Float>(y: &mut [F], r: &mut [F], x: &[F], weight: &[f32], eps: f32) {
    let d = weight.len();
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(r.par_iter_mut())
        .for_each(|((yr, xr), ri)| {
            let mut ss = F::ZERO;
            for &v in xr {
                ss += v * v;
            }
            let inv = F::ONE / (ss / F::of(d as f32) + F::of(eps)).sqrt();
            *ri = inv;
            for i in 0..d {
                yr[i] = xr[i] * inv * F::of(weight[i]);
            }
        });
}

/// dx[t] += r·(w ⊙ dy) − x·(r³/D)·Σ_i x_i w_i dy_i: the input gradient of `rmsnorm_fwd`.
pub fn rmsnorm_bwd_acc<F: Float>(dx: &mut [F], dy: &[F], x: &[F], r: &[F], weight: &[f32]) {
    let d = weight.len();
    dx.par_chunks_mut(d)
        .zip(dy.par_chunks(d).zip(x.par_chunks(d)))
        .zip(r.par_iter())
        .for_each(|((dxr, (dyr, xr)), &ri)| {
            let mut s = F::ZERO;
            for i in 0..d {
                s += xr[i] * F::of(weight[i]) * dyr[i];
            }
            let c = ri * ri * ri * s / F::of(d as f32);
            for i in 0..d {
                dxr[i] += ri * F::of(weight[i]) * dyr[i] - xr[i] * c;
            }
        });
}

/// Rotary embedding in place ("rotate half" pairs (i, i + Dh/2)); `inverse` rotates by the
/// negative angle, which is the transpose of the rotation and so its backward.
/// x: [T, heads, Dh], positions: [T], inv_freq: [Dh/2]. The angle is formed in f32 exactly as
/// `cpu_ops::rope` forms it, then sin/cos are taken in F.
pub fn rope<F: Float>(
    x: &mut [F],
    positions: &[usize],
    inv_freq: &[f32],
    heads: usize,
    inverse: bool,
) {
    let half = inv_freq.len();
    let dh = 2 * half;
    x.par_chunks_mut(heads * dh)
        .zip(positions.par_iter())
        .for_each(|(xt, &pos)| {
            for i in 0..half {
                let angle = pos as f32 * inv_freq[i];
                let (mut sin, cos) = F::of(angle).sin_cos();
                if inverse {
                    sin = -sin;
                }
                for h in 0..heads {
                    let base = h * dh;
                    let (a, b) = (xt[base + i], xt[base + i + half]);
                    xt[base + i] = a * cos - b * sin;
                    xt[base + i + half] = b * cos + a * sin;
                }
            }
        });
}

/// act = silu(gate)·up.  All [T, F].
pub fn silu_mul_fwd<F: Float>(act: &mut [F], gate: &[F], up: &[F]) {
    act.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (&g, &u))| *o = g / (F::ONE + (-g).exp()) * u);
}

/// The backward of `silu_mul_fwd`: with σ = sigmoid(g), d act/d g = u·σ·(1 + g·(1 − σ)) and
/// d act/d u = g·σ. Overwrites dgate and dup [T, F].
pub fn silu_mul_bwd<F: Float>(dgate: &mut [F], dup: &mut [F], dact: &[F], gate: &[F], up: &[F]) {
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .zip(dact.par_iter().zip(gate.par_iter().zip(up.par_iter())))
        .for_each(|((dg, du), (&da, (&g, &u)))| {
            let s = F::ONE / (F::ONE + (-g).exp());
            *dg = da * u * s * (F::ONE + g * (F::ONE - s));
            *du = da * g * s;
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_t_is_the_transpose_of_matmul() {
        // ⟨dy, x·wᵀ⟩ = ⟨dyᵀ·... ⟩: for any x, dy, Σ dy ⊙ matmul(x) = Σ x ⊙ matmul_t(dy).
        let (t, k, m) = (37, 70, 19);
        let x: Vec<f64> = (0..t * k)
            .map(|i| ((i * 7 % 13) as f64 - 6.0) / 5.0)
            .collect();
        let dy: Vec<f64> = (0..t * m)
            .map(|i| ((i * 5 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let w: Vec<f32> = (0..m * k)
            .map(|i| ((i * 3 % 17) as f32 - 8.0) / 7.0)
            .collect();
        let mut y = vec![0.0; t * m];
        matmul(&mut y, &x, &w, None, k);
        let mut dx = vec![0.0; t * k];
        matmul_t_acc(&mut dx, &dy, &w, k);
        let a: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
        let b: f64 = dx.iter().zip(&x).map(|(a, b)| a * b).sum();
        assert!((a - b).abs() <= 1e-10 * a.abs().max(1.0), "{a} vs {b}");
        // And matmul agrees with cpu_ops::matmul in f32, bit for bit (same dot order).
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let bias: Vec<f32> = (0..m).map(|i| i as f32 * 0.1).collect();
        let mut ours = vec![0f32; t * m];
        matmul(&mut ours, &xf, &w, Some(&bias), k);
        let mut theirs = vec![0f32; t * m];
        crate::cpu_ops::matmul(&mut theirs, &xf, &w, Some(&bias), t, k, m, &mut Vec::new());
        assert_eq!(ours, theirs);
    }

    #[test]
    fn rope_inverse_undoes_rope() {
        let inv = [1.0f32, 0.1, 0.01];
        let x0: Vec<f64> = (0..2 * 2 * 6).map(|i| i as f64 * 0.3 - 2.0).collect();
        let mut x = x0.clone();
        rope(&mut x, &[3, 17], &inv, 2, false);
        assert!(x.iter().zip(&x0).any(|(a, b)| (a - b).abs() > 1e-3));
        rope(&mut x, &[3, 17], &inv, 2, true);
        for (a, b) in x.iter().zip(&x0) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }
}
