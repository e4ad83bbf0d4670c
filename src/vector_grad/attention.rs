//! Causal attention of the active rows (forward saving only the log-sum-exp per row and head)
//! and its backward. The keys and values are the frozen prefix's (f32, constants: they do not
//! depend on the vector) followed by the active rows' own. Probabilities are recomputed from
//! the saved log-sum-exp in the backward, so nothing of size T² is kept between the two passes;
//! the backward materialises P and dS of the active rows for one layer at a time, [Ta, H, Ta].
//!
//! Shapes: q [Ta, H, Dh], k/v [Ta, Hkv, Dh], prefix k/v [S0, Hkv, Dh], lse [Ta, H]. Active row i
//! sits at absolute position S0 + i and attends to the prefix and to active rows 0..=i.

use rayon::prelude::*;

use super::float::Float;
use super::ops::{dot, dot_ff};

/// Everything attention reads besides q: the dims and the keys/values.
pub struct Kv<'a, F> {
    pub heads: usize,     // H
    pub kv_heads: usize,  // Hkv
    pub dh: usize,        // Dh
    pub k_pre: &'a [f32], // [S0, Hkv, Dh]
    pub v_pre: &'a [f32], // [S0, Hkv, Dh]
    pub k: &'a [F],       // [Ta, Hkv, Dh]
    pub v: &'a [F],       // [Ta, Hkv, Dh]
}

impl<F: Float> Kv<'_, F> {
    fn s0(&self) -> usize {
        self.k_pre.len() / (self.kv_heads * self.dh).max(1)
    }
    /// Key and value rows of key j (absolute) for kv head g, as a closure-friendly pair.
    fn score(&self, q: &[F], j: usize, g: usize) -> F {
        let (s0, kvw, dh) = (self.s0(), self.kv_heads * self.dh, self.dh);
        if j < s0 {
            dot(q, &self.k_pre[j * kvw + g * dh..j * kvw + (g + 1) * dh])
        } else {
            let r = (j - s0) * kvw + g * dh;
            dot_ff(q, &self.k[r..r + dh])
        }
    }
    /// out += p·v_j (kv head g).
    fn add_value(&self, out: &mut [F], p: F, j: usize, g: usize) {
        let (s0, kvw, dh) = (self.s0(), self.kv_heads * self.dh, self.dh);
        if j < s0 {
            let vr = &self.v_pre[j * kvw + g * dh..j * kvw + (g + 1) * dh];
            out.iter_mut()
                .zip(vr)
                .for_each(|(o, &v)| *o += p * F::of(v));
        } else {
            let r = (j - s0) * kvw + g * dh;
            out.iter_mut()
                .zip(&self.v[r..r + dh])
                .for_each(|(o, &v)| *o += p * v);
        }
    }
    fn dot_value(&self, x: &[F], j: usize, g: usize) -> F {
        let (s0, kvw, dh) = (self.s0(), self.kv_heads * self.dh, self.dh);
        if j < s0 {
            dot(x, &self.v_pre[j * kvw + g * dh..j * kvw + (g + 1) * dh])
        } else {
            let r = (j - s0) * kvw + g * dh;
            dot_ff(x, &self.v[r..r + dh])
        }
    }
    fn add_key(&self, out: &mut [F], c: F, j: usize, g: usize) {
        let (s0, kvw, dh) = (self.s0(), self.kv_heads * self.dh, self.dh);
        if j < s0 {
            let kr = &self.k_pre[j * kvw + g * dh..j * kvw + (g + 1) * dh];
            out.iter_mut()
                .zip(kr)
                .for_each(|(o, &k)| *o += c * F::of(k));
        } else {
            let r = (j - s0) * kvw + g * dh;
            out.iter_mut()
                .zip(&self.k[r..r + dh])
                .for_each(|(o, &k)| *o += c * k);
        }
    }
}

fn scale<F: Float>(dh: usize) -> F {
    // Formed in f32 as `cpu_ops::attend` forms it.
    F::of(1.0 / (dh as f32).sqrt())
}

/// out[i, h] = Σ_j softmax_j(q[i,h]·k_j/√Dh)·v_j; lse[i, h] = log Σ_j exp(q[i,h]·k_j/√Dh).
/// out: [Ta, H·Dh], q: [Ta, H·Dh], lse: [Ta, H].
pub fn forward<F: Float>(out: &mut [F], lse: &mut [F], q: &[F], kv: &Kv<F>) {
    let (nh, dh) = (kv.heads, kv.dh);
    let group = nh / kv.kv_heads;
    let s0 = kv.s0();
    let sc = scale::<F>(dh);
    out.par_chunks_mut(dh)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<F>, (ih, (o, l))| {
            let (i, h) = (ih / nh, ih % nh);
            let g = h / group;
            let qr = &q[ih * dh..(ih + 1) * dh];
            scores.clear();
            for j in 0..s0 + i + 1 {
                scores.push(kv.score(qr, j, g) * sc);
            }
            let mut max = F::neg_infinity();
            for &s in scores.iter() {
                max = max.max(s);
            }
            let mut sum = F::ZERO;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(F::ZERO);
            for (j, &p) in scores.iter().enumerate() {
                kv.add_value(o, p / sum, j, g);
            }
            *l = max + sum.ln();
        });
}

/// The backward of `forward` with respect to q and the active rows' k and v (the prefix is
/// constant). With P = softmax(S), S = q·kᵀ/√Dh, out = P·V and dout given:
/// dP_j = dout·v_j; dS_j = P_j·(dP_j − Σ_j' P_j'·dP_j'); dq = Σ_j dS_j·k_j/√Dh;
/// dk_j = Σ_(i,h in group) dS_ij·q_i/√Dh; dv_j = Σ_(i,h in group) P_ij·dout_i.
/// dq: [Ta, H·Dh] and dk, dv: [Ta, Hkv·Dh] are overwritten.
pub fn backward<F: Float>(
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    dout: &[F],
    q: &[F],
    lse: &[F],
    kv: &Kv<F>,
) {
    let (nh, nkv, dh) = (kv.heads, kv.kv_heads, kv.dh);
    let group = nh / nkv;
    let s0 = kv.s0();
    let ta = q.len() / (nh * dh).max(1);
    let sc = scale::<F>(dh);
    // P and dS restricted to active keys: [Ta, H, Ta], row (i, h) holds keys 0..=i.
    let mut pa = vec![F::ZERO; ta * nh * ta];
    let mut dsa = vec![F::ZERO; ta * nh * ta];
    dq.par_chunks_mut(dh)
        .zip(
            pa.par_chunks_mut(ta.max(1))
                .zip(dsa.par_chunks_mut(ta.max(1))),
        )
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(p, dp): &mut (Vec<F>, Vec<F>), (ih, (dqr, (par, dsr)))| {
                let (i, h) = (ih / nh, ih % nh);
                let g = h / group;
                let qr = &q[ih * dh..(ih + 1) * dh];
                let dor = &dout[ih * dh..(ih + 1) * dh];
                let n = s0 + i + 1;
                p.clear();
                dp.clear();
                let mut delta = F::ZERO;
                for j in 0..n {
                    let pj = (kv.score(qr, j, g) * sc - lse[ih]).exp();
                    let dpj = kv.dot_value(dor, j, g);
                    delta += pj * dpj;
                    p.push(pj);
                    dp.push(dpj);
                }
                dqr.fill(F::ZERO);
                for j in 0..n {
                    let ds = p[j] * (dp[j] - delta);
                    kv.add_key(dqr, ds * sc, j, g);
                    if j >= s0 {
                        par[j - s0] = p[j];
                        dsr[j - s0] = ds;
                    }
                }
            },
        );
    // dk, dv for active key j of kv head g: sums over the queries i ≥ j of the group's heads.
    dk.par_chunks_mut(dh)
        .zip(dv.par_chunks_mut(dh))
        .enumerate()
        .for_each(|(jg, (dkr, dvr))| {
            let (j, g) = (jg / nkv, jg % nkv);
            dkr.fill(F::ZERO);
            dvr.fill(F::ZERO);
            for i in j..ta {
                for h in g * group..(g + 1) * group {
                    let at = (i * nh + h) * ta + j;
                    let (ds, pp) = (dsa[at] * sc, pa[at]);
                    let qr = &q[(i * nh + h) * dh..(i * nh + h + 1) * dh];
                    let dor = &dout[(i * nh + h) * dh..(i * nh + h + 1) * dh];
                    for x in 0..dh {
                        dkr[x] += ds * qr[x];
                        dvr[x] += pp * dor[x];
                    }
                }
            }
        });
}
