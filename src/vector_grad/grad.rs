//! The loss of one prepared example as a function of the steering vector v [D], and dL/dv:
//! blocks L+1..N−1, the final norm and the LM head forward (saving what the backward reads),
//! then the backward in reverse, op by op. Weights are frozen; only input gradients are formed.
//!
//! Forward of one block, active rows only (Ta rows at absolute positions s0..s0+Ta):
//!   xn1 = rmsnorm(h_in)                       [Ta, D]      saved: h_in, r1 [Ta]
//!   q, k, v = xn1·Wqᵀ + bq, ·Wkᵀ + bk, ·Wvᵀ + bv   [Ta, H·Dh], [Ta, Hkv·Dh] ×2
//!   q, k = rope(q), rope(k)                                saved: q, k, v (post-RoPE)
//!   a = attention(q, [k_pre; k], [v_pre; v])  [Ta, H·Dh]   saved: lse [Ta, H]
//!   h_mid = h_in + a·Woᵀ                      [Ta, D]      saved: h_mid, r2
//!   xn2 = rmsnorm(h_mid); g = xn2·Wgᵀ; u = xn2·Wuᵀ [Ta, F] saved: g, u
//!   h_out = h_mid + (silu(g)·u)·Wdᵀ           [Ta, D]
//! Head, per chunk of predicting rows R: z = rmsnorm(h_N[R])·W_lmᵀ [R, V];
//!   loss_r = logsumexp(c·z_r) − c·z_r[y_r] with c the coldness.
//! Backward mirrors it: dz = c·(softmax(c·z) − onehot(y)); dh_N[R] = rms_bwd(dz·W_lm); per
//! block: dh_mid = dh_out + rms_bwd((dg·Wg + du·Wu)) with (dg, du) = silu_mul_bwd(dh_out·Wd);
//! dh_in = dh_mid + rms_bwd(dq·Wq + dk·Wk + dv·Wv) with (dq, dk, dv) = rope⁻¹ ∘
//! attention_bwd(dh_mid·Wo). Finally dL/dv = Σ_{r ∈ steer rows} dh_L[r].

use crate::model::Model;

use super::attention::{self, Kv};
use super::float::Float;
use super::frozen::Frozen;
use super::ops::{
    matmul, matmul_t_acc, rmsnorm_bwd_acc, rmsnorm_fwd, rope, silu_mul_bwd, silu_mul_fwd,
};

/// Loss summed over the example's target tokens, their count, and the gradient of that sum.
#[derive(Clone, Debug)]
pub struct LossGrad<F> {
    pub loss_sum: f64,
    pub targets: usize,
    pub grad_sum: Vec<F>, // [D]; empty when the gradient was not asked for
}

impl<F: Float> LossGrad<F> {
    /// The mean over target tokens (the per-example loss of the spec).
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.targets.max(1) as f64
    }
}

/// What the backward of one block reads.
struct Saved<F> {
    h_in: Vec<F>,  // [Ta, D]
    r1: Vec<F>,    // [Ta]
    q: Vec<F>,     // [Ta, H·Dh] post-RoPE
    k: Vec<F>,     // [Ta, Hkv·Dh] post-RoPE
    v: Vec<F>,     // [Ta, Hkv·Dh]
    lse: Vec<F>,   // [Ta, H]
    h_mid: Vec<F>, // [Ta, D]
    r2: Vec<F>,    // [Ta]
    gate: Vec<F>,  // [Ta, F]
    up: Vec<F>,    // [Ta, F]
}

/// Rows of the LM head computed together: bounds the [R, V] logits buffer.
const HEAD_CHUNK: usize = 64;

/// Loss of `fz` with v [D] (plus the frozen `extra` [D], e.g. the bias) added at its steer rows;
/// with `want_grad` also d(loss_sum)/dv.
pub fn loss_grad<F: Float>(
    model: &Model,
    fz: &Frozen,
    v: &[F],
    extra: Option<&[f32]>,
    coldness: f32,
    want_grad: bool,
) -> LossGrad<F> {
    let c = &model.config;
    let d = c.hidden_size;
    assert_eq!(v.len(), d, "steering vector must have D = {d} entries");
    let cold = F::of(coldness);
    let mut loss_sum = 0.0;
    let mut targets = 0;
    if let Some((logits, y)) = &fz.const_row {
        let z: Vec<F> = logits.iter().map(|&x| F::of(x)).collect();
        loss_sum += row_loss(&z, *y as usize, cold);
        targets += 1;
    }
    let ta = fz.ta;
    if fz.predict.is_empty() {
        return LossGrad {
            loss_sum,
            targets,
            grad_sum: if want_grad { vec![F::ZERO; d] } else { vec![] },
        };
    }

    // x = h_L + v (+ extra) at the steer rows.                                  [Ta, D]
    let mut h: Vec<F> = fz.h_l.iter().map(|&x| F::of(x)).collect();
    for &r in &fz.steer_rows {
        let row = &mut h[r * d..(r + 1) * d];
        for i in 0..d {
            row[i] += v[i] + extra.map_or(F::ZERO, |e| F::of(e[i]));
        }
    }
    let positions: Vec<usize> = (fz.s0..fz.s0 + ta).collect();
    let mut saved = Vec::new();
    for l in fz.layer + 1..c.num_hidden_layers {
        let s = block_forward(model, fz, l, &positions, &mut h);
        if want_grad {
            saved.push(s);
        }
    }

    // Head and loss by chunks of predicting rows; dh collects d(loss)/d h_N.          [Ta, D]
    let lm = model
        .weights
        .lm_head
        .as_deref()
        .unwrap_or(&model.weights.embed_tokens);
    let mut dh = if want_grad {
        vec![F::ZERO; ta * d]
    } else {
        vec![]
    };
    for chunk in fz.predict.chunks(HEAD_CHUNK) {
        let rc = chunk.len();
        let mut x = vec![F::ZERO; rc * d]; //                                          [R, D]
        for (i, &(r, _)) in chunk.iter().enumerate() {
            x[i * d..(i + 1) * d].copy_from_slice(&h[r * d..(r + 1) * d]);
        }
        let mut normed = vec![F::ZERO; rc * d];
        let mut rn = vec![F::ZERO; rc];
        rmsnorm_fwd(
            &mut normed,
            &mut rn,
            &x,
            &model.weights.norm,
            c.rms_norm_eps,
        );
        let mut z = vec![F::ZERO; rc * c.vocab_size]; //                                [R, V]
        matmul(&mut z, &normed, lm, None, d);
        for (i, &(_, y)) in chunk.iter().enumerate() {
            let zr = &mut z[i * c.vocab_size..(i + 1) * c.vocab_size];
            // In place: the row becomes d(loss)/dz when the gradient is wanted.
            loss_sum += row_loss_in_place(zr, y as usize, cold, want_grad);
        }
        targets += rc;
        if want_grad {
            let mut dnormed = vec![F::ZERO; rc * d];
            matmul_t_acc(&mut dnormed, &z, lm, d); //                                 [R, D]
            let mut dx = vec![F::ZERO; rc * d];
            rmsnorm_bwd_acc(&mut dx, &dnormed, &x, &rn, &model.weights.norm);
            for (i, &(r, _)) in chunk.iter().enumerate() {
                let row = &mut dh[r * d..(r + 1) * d];
                row.iter_mut()
                    .zip(&dx[i * d..(i + 1) * d])
                    .for_each(|(a, &b)| *a += b);
            }
        }
    }
    if !want_grad {
        return LossGrad {
            loss_sum,
            targets,
            grad_sum: vec![],
        };
    }

    for (l, s) in (fz.layer + 1..c.num_hidden_layers).zip(&saved).rev() {
        dh = block_backward(model, fz, l, &positions, s, &dh);
    }
    let mut grad = vec![F::ZERO; d];
    for &r in &fz.steer_rows {
        grad.iter_mut()
            .zip(&dh[r * d..(r + 1) * d])
            .for_each(|(g, &x)| *g += x);
    }
    LossGrad {
        loss_sum,
        targets,
        grad_sum: grad,
    }
}

/// Cross-entropy of softmax(c·z) at y, in f64 for the sum; z: [V].
fn row_loss<F: Float>(z: &[F], y: usize, cold: F) -> f64 {
    let mut zz = z.to_vec();
    row_loss_in_place(&mut zz, y, cold, false)
}

/// Cross-entropy of softmax(c·z) at y; with `grad`, z is overwritten by
/// d/dz = c·(softmax(c·z) − onehot(y)).
fn row_loss_in_place<F: Float>(z: &mut [F], y: usize, cold: F, grad: bool) -> f64 {
    let mut max = F::neg_infinity();
    for &x in z.iter() {
        max = max.max(cold * x);
    }
    let mut sum = F::ZERO;
    for &x in z.iter() {
        sum += (cold * x - max).exp();
    }
    let lse = max + sum.ln();
    let loss = (lse - cold * z[y]).to64();
    if grad {
        for x in z.iter_mut() {
            *x = cold * (cold * *x - lse).exp();
        }
        z[y] -= cold;
    }
    loss
}

fn kv<'a, F: Float>(model: &Model, fz: &'a Frozen, l: usize, k: &'a [F], v: &'a [F]) -> Kv<'a, F> {
    let c = &model.config;
    Kv {
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        dh: c.head_dim,
        k_pre: &fz.k_pre[l - fz.layer - 1],
        v_pre: &fz.v_pre[l - fz.layer - 1],
        k,
        v,
    }
}

/// One block forward over the active rows, h [Ta, D] updated in place; returns what the
/// backward reads.
fn block_forward<F: Float>(
    model: &Model,
    fz: &Frozen,
    l: usize,
    positions: &[usize],
    h: &mut [F],
) -> Saved<F> {
    let c = &model.config;
    let w = &model.weights.layers[l];
    let ta = fz.ta;
    let (d, f, dh) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    let (qw, kvw) = (nh * dh, nkv * dh);
    let eps = c.rms_norm_eps;

    let h_in = h.to_vec();
    let mut xn = vec![F::ZERO; ta * d]; //                                          [Ta, D]
    let mut r1 = vec![F::ZERO; ta];
    rmsnorm_fwd(&mut xn, &mut r1, &h_in, &w.input_layernorm, eps);
    let mut q = vec![F::ZERO; ta * qw]; //                                           [Ta, H·Dh]
    let mut k = vec![F::ZERO; ta * kvw]; //                                          [Ta, Hkv·Dh]
    let mut v = vec![F::ZERO; ta * kvw]; //                                          [Ta, Hkv·Dh]
    matmul(&mut q, &xn, &w.q_proj, w.q_bias.as_deref(), d);
    matmul(&mut k, &xn, &w.k_proj, w.k_bias.as_deref(), d);
    matmul(&mut v, &xn, &w.v_proj, w.v_bias.as_deref(), d);
    rope(&mut q, positions, &model.inv_freq, nh, false);
    rope(&mut k, positions, &model.inv_freq, nkv, false);
    let mut a = vec![F::ZERO; ta * qw]; //                                           [Ta, H·Dh]
    let mut lse = vec![F::ZERO; ta * nh]; //                                         [Ta, H]
    attention::forward(&mut a, &mut lse, &q, &kv(model, fz, l, &k, &v));
    let mut o = vec![F::ZERO; ta * d];
    matmul(&mut o, &a, &w.o_proj, None, qw);
    h.iter_mut().zip(&o).for_each(|(x, &y)| *x += y);

    let h_mid = h.to_vec();
    let mut r2 = vec![F::ZERO; ta];
    rmsnorm_fwd(&mut xn, &mut r2, &h_mid, &w.post_attention_layernorm, eps);
    let mut gate = vec![F::ZERO; ta * f]; //                                         [Ta, F]
    let mut up = vec![F::ZERO; ta * f]; //                                           [Ta, F]
    matmul(&mut gate, &xn, &w.gate_proj, None, d);
    matmul(&mut up, &xn, &w.up_proj, None, d);
    let mut act = vec![F::ZERO; ta * f];
    silu_mul_fwd(&mut act, &gate, &up);
    matmul(&mut o, &act, &w.down_proj, None, f);
    h.iter_mut().zip(&o).for_each(|(x, &y)| *x += y);
    Saved {
        h_in,
        r1,
        q,
        k,
        v,
        lse,
        h_mid,
        r2,
        gate,
        up,
    }
}

/// One block backward: d(loss)/d h_in [Ta, D] from d(loss)/d h_out.
fn block_backward<F: Float>(
    model: &Model,
    fz: &Frozen,
    l: usize,
    positions: &[usize],
    s: &Saved<F>,
    dh_out: &[F],
) -> Vec<F> {
    let c = &model.config;
    let w = &model.weights.layers[l];
    let ta = fz.ta;
    let (d, f, dh) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    let (qw, kvw) = (nh * dh, nkv * dh);

    // MLP: h_out = h_mid + down(silu(gate)·up).
    let mut dact = vec![F::ZERO; ta * f]; //                                          [Ta, F]
    matmul_t_acc(&mut dact, dh_out, &w.down_proj, f);
    let mut dgate = vec![F::ZERO; ta * f];
    let mut dup = vec![F::ZERO; ta * f];
    silu_mul_bwd(&mut dgate, &mut dup, &dact, &s.gate, &s.up);
    let mut dxn = vec![F::ZERO; ta * d]; //                                           [Ta, D]
    matmul_t_acc(&mut dxn, &dgate, &w.gate_proj, d);
    matmul_t_acc(&mut dxn, &dup, &w.up_proj, d);
    let mut dh_mid = dh_out.to_vec();
    rmsnorm_bwd_acc(
        &mut dh_mid,
        &dxn,
        &s.h_mid,
        &s.r2,
        &w.post_attention_layernorm,
    );

    // Attention: h_mid = h_in + o_proj(attention(rope(q), rope(k), v)).
    let mut da = vec![F::ZERO; ta * qw]; //                                           [Ta, H·Dh]
    matmul_t_acc(&mut da, &dh_mid, &w.o_proj, qw);
    let mut dq = vec![F::ZERO; ta * qw];
    let mut dk = vec![F::ZERO; ta * kvw];
    let mut dv = vec![F::ZERO; ta * kvw];
    attention::backward(
        &mut dq,
        &mut dk,
        &mut dv,
        &da,
        &s.q,
        &s.lse,
        &kv(model, fz, l, &s.k, &s.v),
    );
    rope(&mut dq, positions, &model.inv_freq, nh, true);
    rope(&mut dk, positions, &model.inv_freq, nkv, true);
    dxn.fill(F::ZERO);
    matmul_t_acc(&mut dxn, &dq, &w.q_proj, d);
    matmul_t_acc(&mut dxn, &dk, &w.k_proj, d);
    matmul_t_acc(&mut dxn, &dv, &w.v_proj, d);
    let mut dh_in = dh_mid;
    rmsnorm_bwd_acc(&mut dh_in, &dxn, &s.h_in, &s.r1, &w.input_layernorm);
    dh_in
}
