//! The steering-vector gradient on the GPU (src/cuda/vector_grad.rs, kernels/grad.cu) against
//! the CPU reference (src/vector_grad/): each new kernel alone on odd sizes, then the loss and
//! dL/dv end to end on a random head_dim-64 checkpoint. Without a GPU every test prints
//! "skipped: <reason>" and passes.
//!
//! Tolerances. The checkpoint stores bf16 weights; the CPU model widens them to f32 exactly and
//! the GPU kernels widen the same bits exactly, and both keep every activation and gradient in
//! f32. So the two differ in the order of f32 sums, in expf/sincosf against Rust's libm
//! (≤ 2 ulp), and, where a product runs on tensor cores (vg_mm_tc_f32: every end-to-end
//! product here, K being a multiple of 8), in splitting each f32 activation into two bf16 terms,
//! which moves each product by ≤ 2^-16 of itself. A sum of K products in f32 is off by at most
//! K·u·Σ|terms| (u = 2^-24).
//! - kernel tests against an f64 reference: |err| ≤ 4·K·u·Σ|terms| (+ a few ulp of the value);
//! - end to end: the widest sum is K = 2F = 1024, so one op is off by ≤ 1024·u + 2^-16 < 2^-13
//!   of its scale (worst case; the rounding errors have random signs, so typically far less);
//!   a gradient passes ≤ 16 such ops per block pair (forward and backward), and errors of
//!   independent orders partly cancel, so we allow 2^-10 of ‖g‖ (norm-wise) for the gradient
//!   and 2^-14 of the loss sum for the loss (the loss passes half the ops and none of the
//!   backward's; a sum over targets of per-token losses of one sign, so its relative error is
//!   that of a typical token). Both held on the H100 with the tensor-core products
//!   (PERFORMANCE.md run 15).

// Reference loops index several arrays by the same position.
#![allow(clippy::needless_range_loop)]

mod common;

use cudarc::driver::CudaSlice;
use half::bf16;
use std::sync::Arc;
use thinksteer::cuda::kernels::{self as k, Mm, MmPath, VgAttn};
use thinksteer::cuda::model::CudaEngine;
use thinksteer::cuda::vector_grad::CudaVectorGrad;
use thinksteer::cuda::Gpu;
use thinksteer::model::Model;
use thinksteer::rng::Rng;
use thinksteer::vector_grad::{attention, loss_grad, ops, prepare, Example};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gpu() -> Option<Gpu> {
    common::cuda_or_skip().then(|| Gpu::new(0).expect("CUDA is available but Gpu::new failed"))
}

fn rand(r: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (scale * r.normal()) as f32).collect()
}

/// Values rounded to bf16 (as f32), so CPU and GPU see the same weights.
fn rand_bf(r: &mut Rng, n: usize, scale: f64) -> (Vec<f32>, Vec<bf16>) {
    let b: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32((scale * r.normal()) as f32))
        .collect();
    (b.iter().map(|x| x.to_f32()).collect(), b)
}

fn up<T: cudarc::driver::DeviceRepr>(g: &Gpu, v: &[T]) -> CudaSlice<T> {
    g.stream.clone_htod(v).unwrap()
}

fn down(g: &Gpu, v: &CudaSlice<f32>) -> Vec<f32> {
    g.stream.clone_dtoh(v).unwrap()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Asserts |got − want| ≤ tol[i] (+ 8 ulp of want) element-wise.
fn close(what: &str, got: &[f32], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        let bound = t + 8.0 * U * w.abs() + 1e-30;
        assert!(
            ((g as f64) - w).abs() <= bound,
            "{what}[{i}]: GPU {g} vs reference {w} (bound {bound})"
        );
    }
}

#[test]
fn mm_both_orientations_strided_with_bias_and_accumulate() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new(1);
    let (t, n, kk) = (37usize, 70usize, 45usize);
    let (ldx, ldo) = (kk + 3, n + 5);
    let x = rand(&mut r, t * ldx, 1.0);
    let bias = rand(&mut r, n, 1.0);
    let out0 = rand(&mut r, t * ldo, 1.0);
    for trans in [false, true] {
        // W [N, K] (x·Wᵀ) or [K, N] (x·W).
        let (wf, wb) = rand_bf(&mut r, n * kk, 0.3);
        let bw = |ki: usize, ni: usize| wf[if trans { ki * n + ni } else { ni * kk + ki }] as f64;
        let mut want = f64s(&out0);
        let mut tol = vec![0.0; t * ldo];
        for ti in 0..t {
            for ni in 0..n {
                let mut s = bias[ni] as f64;
                let mut a = bias[ni].abs() as f64;
                for ki in 0..kk {
                    let p = x[ti * ldx + ki] as f64 * bw(ki, ni);
                    s += p;
                    a += p.abs();
                }
                let o = ti * ldo + ni;
                a += want[o].abs();
                want[o] += s;
                tol[o] = 4.0 * (kk + 2) as f64 * U * a;
            }
        }
        let mut out = up(&g, &out0);
        let m = Mm {
            t,
            n,
            k: kk,
            ldx,
            ldw: if trans { n } else { kk },
            ldo,
            trans_w: trans,
            accumulate: true,
        };
        let path = k::vg_mm(
            &g,
            &mut out.slice_mut(..),
            &up(&g, &x).slice(..),
            &up(&g, &wb).slice(..),
            Some(&up(&g, &bias).slice(..)),
            m,
            None,
        )
        .unwrap();
        // K = 45 is no multiple of 8: the f32 FMA kernel runs.
        assert_eq!(path, MmPath::F32, "mm trans {trans}: kernel");
        close(&format!("mm trans {trans}"), &down(&g, &out), &want, &tol);
    }
}

/// The tensor-core product (hi/lo bf16 split of x) in both orientations, with and without
/// split K, on tail sizes (T, N not multiples of the 64 × 128 tile). Each x is split as
/// hi + lo with |x − hi − lo| ≤ 2^-16·|x| (two round-to-nearest bf16 steps of 2^-8 each), so each
/// product is off by ≤ 2^-16 of its size; the f32 sums add ≤ 4·K·u·Σ|terms| as for vg_mm_f32.
#[test]
fn mm_tensor_cores_split_k_tails() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new(11);
    // (T, N, K, ldx pad, ldo pad): a one-tile output, several tiles with ragged edges, long K.
    let cases = [
        (5usize, 24usize, 64usize, 4usize, 0usize),
        (70, 136, 256, 0, 3),
        (129, 264, 1024, 8, 1),
    ];
    for (t, n, kk, px, po) in cases {
        let (ldx, ldo) = (kk + px, n + po);
        let x = rand(&mut r, t * ldx, 1.0);
        let bias = rand(&mut r, n, 1.0);
        let out0 = rand(&mut r, t * ldo, 1.0);
        for trans in [false, true] {
            let (wf, wb) = rand_bf(&mut r, n * kk, 0.3);
            let bw =
                |ki: usize, ni: usize| wf[if trans { ki * n + ni } else { ni * kk + ki }] as f64;
            for (acc, with_part) in [(false, false), (true, false), (true, true), (false, true)] {
                let mut want = if acc { f64s(&out0) } else { vec![0.0; t * ldo] };
                let mut tol = vec![0.0; t * ldo];
                for ti in 0..t {
                    for ni in 0..n {
                        let (mut s, mut a) = (bias[ni] as f64, bias[ni].abs() as f64);
                        for ki in 0..kk {
                            let p = x[ti * ldx + ki] as f64 * bw(ki, ni);
                            s += p;
                            a += p.abs();
                        }
                        let o = ti * ldo + ni;
                        a += want[o].abs();
                        want[o] += s;
                        tol[o] = (1.0 / 65536.0 + 4.0 * (kk + 2) as f64 * U) * a;
                    }
                }
                // Rows of out outside [T, N] keep out0 (or stay what they were).
                for ti in 0..t {
                    for ni in n..ldo {
                        want[ti * ldo + ni] = out0[ti * ldo + ni] as f64;
                    }
                }
                let mut out = up(&g, &out0);
                let mut part = up(&g, &vec![0f32; 8 * t * n]);
                let m = Mm {
                    t,
                    n,
                    k: kk,
                    ldx,
                    ldw: if trans { n } else { kk },
                    ldo,
                    trans_w: trans,
                    accumulate: acc,
                };
                let path = k::vg_mm(
                    &g,
                    &mut out.slice_mut(..),
                    &up(&g, &x).slice(..),
                    &up(&g, &wb).slice(..),
                    Some(&up(&g, &bias).slice(..)),
                    m,
                    with_part.then(|| part.slice_mut(..)).as_mut(),
                )
                .unwrap();
                let tag = format!("T {t} N {n} K {kk} trans {trans} acc {acc} part {with_part}");
                // Every case has fewer tiles than two waves; K is split (each split keeping ≥ 4
                // k-steps of 32) when scratch is given and K has ≥ 8 k-steps.
                let split = with_part && kk >= 8 * 32;
                let want_splits = if split { "> 1" } else { "1" };
                match path {
                    MmPath::TensorCore { splits } if (splits > 1) == split => {}
                    other => panic!(
                        "{tag}: expected tensor cores with splits {want_splits}, ran {other:?}"
                    ),
                }
                close(&tag, &down(&g, &out), &want, &tol);
            }
        }
    }
}

#[test]
fn rmsnorm_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new(2);
    let (t, d) = (5usize, 300usize);
    let x = rand(&mut r, t * d, 2.0);
    let dy = rand(&mut r, t * d, 1.0);
    let dx0 = rand(&mut r, t * d, 1.0);
    let (wf, wb) = rand_bf(&mut r, d, 1.0);
    let (x64, dy64) = (f64s(&x), f64s(&dy));
    let mut y64 = vec![0.0; t * d];
    let mut r64 = vec![0.0; t];
    ops::rmsnorm_fwd(&mut y64, &mut r64, &x64, &wf, 1e-6);
    let mut dx64 = f64s(&dx0);
    ops::rmsnorm_bwd_acc(&mut dx64, &dy64, &x64, &r64, &wf);

    let (mut y, mut rr) = (up(&g, &vec![0f32; t * d]), up(&g, &vec![0f32; t]));
    let (xd, wd) = (up(&g, &x), up(&g, &wb));
    k::vg_rmsnorm_fwd(
        &g,
        &mut y.slice_mut(..),
        &mut rr.slice_mut(..),
        &xd.slice(..),
        &wd.slice(..),
        t,
        1e-6,
    )
    .unwrap();
    // y = x·r·w: relative error of a D-term sum of squares, then a few roundings.
    let tol: Vec<f64> = y64
        .iter()
        .map(|v| (4.0 * d as f64 + 8.0) * U * v.abs())
        .collect();
    close("rmsnorm y", &down(&g, &y), &y64, &tol);
    let tol: Vec<f64> = r64.iter().map(|v| 4.0 * d as f64 * U * v.abs()).collect();
    close("rmsnorm r", &down(&g, &rr), &r64, &tol);

    let mut dx = up(&g, &dx0);
    k::vg_rmsnorm_bwd(
        &g,
        &mut dx.slice_mut(..),
        &up(&g, &dy).slice(..),
        &xd.slice(..),
        &rr.slice(..),
        &wd.slice(..),
        t,
    )
    .unwrap();
    // The Σ x·w·dy term carries D terms; bound by the row's Σ|x w dy|·r³/D·|x| plus the rest.
    let mut tol = vec![0.0; t * d];
    for ti in 0..t {
        let ri = r64[ti];
        let s: f64 = (0..d)
            .map(|i| (x64[ti * d + i] * wf[i] as f64 * dy64[ti * d + i]).abs())
            .sum();
        for i in 0..d {
            let o = ti * d + i;
            tol[o] = 4.0
                * (d as f64 + 8.0)
                * U
                * (ri.powi(3) * s / d as f64 * x64[o].abs()
                    + ri * (wf[i] as f64 * dy64[o]).abs()
                    + dx0[o].abs() as f64);
        }
    }
    close("rmsnorm dx", &down(&g, &dx), &dx64, &tol);
}

#[test]
fn rope_forward_and_inverse_on_strided_columns() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new(3);
    let (t, heads, dh, ld, pos0) = (7usize, 3usize, 64usize, 3 * 64 + 40, 11usize);
    let inv: Vec<f32> = (0..dh / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / dh as f32))
        .collect();
    let x = rand(&mut r, t * ld, 1.0);
    let positions: Vec<usize> = (pos0..pos0 + t).collect();
    for inverse in [false, true] {
        // Reference: the first heads·Dh columns of each row through ops::rope in f64; the rest
        // must be untouched.
        let mut want = f64s(&x);
        let mut block: Vec<f64> = (0..t)
            .flat_map(|ti| want[ti * ld..ti * ld + heads * dh].to_vec())
            .collect();
        ops::rope(&mut block, &positions, &inv, heads, inverse);
        for ti in 0..t {
            want[ti * ld..ti * ld + heads * dh]
                .copy_from_slice(&block[ti * heads * dh..(ti + 1) * heads * dh]);
        }
        let mut xd = up(&g, &x);
        k::vg_rope(
            &g,
            &mut xd.slice_mut(..),
            &up(&g, &inv).slice(..),
            t,
            heads,
            ld,
            pos0,
            inverse,
        )
        .unwrap();
        // Angles up to ~17 rad formed identically in f32; sin/cos of f32 vs f64 and two
        // products: a few ulp of the pair's magnitude.
        let tol: Vec<f64> = x.iter().map(|_| 32.0 * U * 4.0).collect();
        close(
            &format!("rope inverse {inverse}"),
            &down(&g, &xd),
            &want,
            &tol,
        );
    }
}

#[test]
fn attention_forward_and_backward_with_a_prefix() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new(4);
    // One 64 × 64 tile of every product; then several, with ragged (query, head) and key tiles
    // and Dh = 128.
    for (ta, s0, h, hkv, dh) in [
        (9usize, 13usize, 4usize, 2usize, 64usize),
        (70, 80, 6, 2, 128),
    ] {
        attention_case(&g, &mut r, ta, s0, h, hkv, dh);
    }
}

fn attention_case(g: &Gpu, r: &mut Rng, ta: usize, s0: usize, h: usize, hkv: usize, dh: usize) {
    let tag = format!("Ta {ta} S0 {s0} H {h} Hkv {hkv} Dh {dh}");
    let (qd, kvd) = (h * dh, hkv * dh);
    let qkvw = qd + 2 * kvd;
    let qkv = rand(r, ta * qkvw, 0.5);
    let k_pre = rand(r, s0 * kvd, 0.5);
    let v_pre = rand(r, s0 * kvd, 1.0);
    let dout = rand(r, ta * qd, 1.0);
    let col = |c0: usize, w: usize| -> Vec<f64> {
        (0..ta)
            .flat_map(|t| {
                qkv[t * qkvw + c0..t * qkvw + c0 + w]
                    .iter()
                    .map(|&x| x as f64)
            })
            .collect()
    };
    let (q, kk, vv) = (col(0, qd), col(qd, kvd), col(qd + kvd, kvd));
    let kv = attention::Kv {
        heads: h,
        kv_heads: hkv,
        dh,
        k_pre: &k_pre,
        v_pre: &v_pre,
        k: &kk,
        v: &vv,
    };
    let mut out64 = vec![0.0; ta * qd];
    let mut lse64 = vec![0.0; ta * h];
    attention::forward(&mut out64, &mut lse64, &q, &kv);
    let (mut dq, mut dk, mut dv) = (vec![0.0; ta * qd], vec![0.0; ta * kvd], vec![0.0; ta * kvd]);
    attention::backward(&mut dq, &mut dk, &mut dv, &f64s(&dout), &q, &lse64, &kv);

    let a = VgAttn {
        ta,
        s0,
        h,
        hkv,
        dh,
        ld: qkvw,
    };
    let (qkv_d, kp, vp) = (up(g, &qkv), up(g, &k_pre), up(g, &v_pre));
    let mut out = up(g, &vec![0f32; ta * qd]);
    let mut lse = up(g, &vec![0f32; ta * h]);
    let mut sc = up(g, &vec![0f32; a.scratch_len()]);
    let mut ds = up(g, &vec![0f32; a.scratch_len()]);
    k::vg_attn_fwd(
        g,
        &mut out.slice_mut(..),
        &mut lse.slice_mut(..),
        &mut sc.slice_mut(..),
        &qkv_d.slice(..),
        &kp.slice(..),
        &vp.slice(..),
        a,
    )
    .unwrap();
    // Scores are Dh-term dots (|q·k| ≲ a few), softmax over ≤ S0 + Ta keys, outputs are
    // convex combinations of values of size ~1: 4·(Dh + S)·u of the value scale (≤ 4).
    let scale = 4.0 * (dh + s0 + ta) as f64 * U * 4.0;
    close(
        &format!("attention out, {tag}"),
        &down(g, &out),
        &out64,
        &vec![scale; ta * qd],
    );
    close(
        &format!("attention lse, {tag}"),
        &down(g, &lse),
        &lse64,
        &vec![scale; ta * h],
    );

    let mut dqkv = up(g, &vec![0f32; ta * qkvw]);
    k::vg_attn_bwd(
        g,
        &mut dqkv.slice_mut(..),
        &mut sc.slice_mut(..),
        &mut ds.slice_mut(..),
        &up(g, &dout).slice(..),
        &lse.slice(..),
        &qkv_d.slice(..),
        &kp.slice(..),
        &vp.slice(..),
        a,
    )
    .unwrap();
    let got = down(g, &dqkv);
    let mut want = vec![0.0; ta * qkvw];
    for t in 0..ta {
        want[t * qkvw..t * qkvw + qd].copy_from_slice(&dq[t * qd..(t + 1) * qd]);
        want[t * qkvw + qd..t * qkvw + qd + kvd].copy_from_slice(&dk[t * kvd..(t + 1) * kvd]);
        want[t * qkvw + qd + kvd..(t + 1) * qkvw].copy_from_slice(&dv[t * kvd..(t + 1) * kvd]);
    }
    // Gradients sum ≤ S·group products of ~unit terms on top of the forward's error.
    let gs = 8.0 * ((dh + s0 + ta) * h / hkv) as f64 * U * 8.0;
    close(
        &format!("attention dqkv, {tag}"),
        &got,
        &want,
        &vec![gs; ta * qkvw],
    );
}

#[test]
fn silu_mul_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new(5);
    let (t, f) = (3usize, 257usize);
    let gu = rand(&mut r, t * 2 * f, 3.0);
    let dact = rand(&mut r, t * f, 1.0);
    let (gate, upv): (Vec<f64>, Vec<f64>) = {
        let mut a = vec![];
        let mut b = vec![];
        for ti in 0..t {
            a.extend(f64s(&gu[ti * 2 * f..ti * 2 * f + f]));
            b.extend(f64s(&gu[ti * 2 * f + f..(ti + 1) * 2 * f]));
        }
        (a, b)
    };
    let mut act64 = vec![0.0; t * f];
    ops::silu_mul_fwd(&mut act64, &gate, &upv);
    let (mut dg, mut du) = (vec![0.0; t * f], vec![0.0; t * f]);
    ops::silu_mul_bwd(&mut dg, &mut du, &f64s(&dact), &gate, &upv);
    let gud = up(&g, &gu);
    let mut act = up(&g, &vec![0f32; t * f]);
    k::vg_silu_mul_fwd(&g, &mut act.slice_mut(..), &gud.slice(..), t, f).unwrap();
    let tol: Vec<f64> = act64
        .iter()
        .map(|v| 16.0 * U * v.abs() + 16.0 * U)
        .collect();
    close("silu act", &down(&g, &act), &act64, &tol);
    let mut dgu = up(&g, &vec![0f32; t * 2 * f]);
    k::vg_silu_mul_bwd(
        &g,
        &mut dgu.slice_mut(..),
        &up(&g, &dact).slice(..),
        &gud.slice(..),
        t,
        f,
    )
    .unwrap();
    let mut want = vec![0.0; t * 2 * f];
    for ti in 0..t {
        want[ti * 2 * f..ti * 2 * f + f].copy_from_slice(&dg[ti * f..(ti + 1) * f]);
        want[ti * 2 * f + f..(ti + 1) * 2 * f].copy_from_slice(&du[ti * f..(ti + 1) * f]);
    }
    let tol: Vec<f64> = want.iter().map(|v| 32.0 * U * v.abs() + 64.0 * U).collect();
    close("silu dgu", &down(&g, &dgu), &want, &tol);
}

#[test]
fn cross_entropy_rows_with_coldness() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new(6);
    let (rows, v, c) = (3usize, 1000usize, 1.7f32);
    let z = rand(&mut r, rows * v, 3.0);
    let y = [0i32, 999, 417];
    let mut want_loss = vec![0.0; rows];
    let mut want_grad = vec![0.0; rows * v];
    for ri in 0..rows {
        let zr = f64s(&z[ri * v..(ri + 1) * v]);
        let cz: Vec<f64> = zr.iter().map(|x| c as f64 * x).collect();
        let m = cz.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + cz.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        want_loss[ri] = lse - cz[y[ri] as usize];
        for i in 0..v {
            want_grad[ri * v + i] =
                c as f64 * ((cz[i] - lse).exp() - f64::from(i == y[ri] as usize));
        }
    }
    let mut zd = up(&g, &z);
    let mut loss = up(&g, &vec![0f32; rows]);
    k::vg_xent(
        &g,
        &mut zd.slice_mut(..),
        &mut loss.slice_mut(..),
        &up(&g, &y).slice(..),
        v,
        c,
        true,
    )
    .unwrap();
    // lse sums V terms ≤ 1 each: 4·V·u relative to |lse| ≲ 20.
    close(
        "xent loss",
        &down(&g, &loss),
        &want_loss,
        &vec![4.0 * v as f64 * U * 32.0; rows],
    );
    close(
        "xent grad",
        &down(&g, &zd),
        &want_grad,
        &vec![4.0 * v as f64 * U * c as f64; rows * v],
    );
}

#[test]
fn rows_gather_scatter_and_steer_rows() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new(7);
    let (n, d) = (11usize, 301usize);
    let h = rand(&mut r, n * d, 1.0);
    let src = rand(&mut r, 3 * d, 1.0);
    let idx = [7i32, 0, 10];
    let idx_d = up(&g, &idx);
    // gather
    let mut x = up(&g, &vec![0f32; 3 * d]);
    k::vg_rows(
        &g,
        &mut x.slice_mut(..),
        &up(&g, &h).slice(..),
        &idx_d.slice(..),
        d,
        false,
    )
    .unwrap();
    let want: Vec<f64> = idx
        .iter()
        .flat_map(|&i| f64s(&h[i as usize * d..(i as usize + 1) * d]))
        .collect();
    close("gather", &down(&g, &x), &want, &vec![0.0; 3 * d]);
    // scatter-add
    let mut hd = up(&g, &h);
    k::vg_rows(
        &g,
        &mut hd.slice_mut(..),
        &up(&g, &src).slice(..),
        &idx_d.slice(..),
        d,
        true,
    )
    .unwrap();
    let mut want = f64s(&h);
    for (j, &i) in idx.iter().enumerate() {
        for e in 0..d {
            want[i as usize * d + e] = (h[i as usize * d + e] + src[j * d + e]) as f64;
        }
    }
    close("scatter-add", &down(&g, &hd), &want, &vec![0.0; n * d]);
    // steer add and reduce
    let v = rand(&mut r, d, 1.0);
    let extra = rand(&mut r, d, 1.0);
    let mut hd = up(&g, &h);
    let mut vd = up(&g, &v);
    k::vg_steer_rows(
        &g,
        &mut hd.slice_mut(..),
        &mut vd.slice_mut(..),
        Some(&up(&g, &extra).slice(..)),
        &idx_d.slice(..),
        d,
        true,
    )
    .unwrap();
    let mut want = f64s(&h);
    for &i in &idx {
        for e in 0..d {
            want[i as usize * d + e] = (h[i as usize * d + e] + (v[e] + extra[e])) as f64;
        }
    }
    close("steer add", &down(&g, &hd), &want, &vec![0.0; n * d]);
    k::vg_steer_rows(
        &g,
        &mut hd.slice_mut(..),
        &mut vd.slice_mut(..),
        None,
        &idx_d.slice(..),
        d,
        false,
    )
    .unwrap();
    let hn = down(&g, &hd);
    let want: Vec<f64> = (0..d)
        .map(|e| idx.iter().fold(0f32, |s, &i| s + hn[i as usize * d + e]) as f64)
        .collect();
    close("steer reduce", &down(&g, &vd), &want, &vec![0.0; d]);
}

#[test]
fn loss_and_gradient_match_the_cpu_reference() {
    let Some(g) = gpu() else { return };
    let dir = common::random_checkpoint("vgrad", 42, 3);
    let model = Model::load(&dir).unwrap();
    let eng = CudaEngine::load(Arc::new(g), &dir, 1, 256, 64).unwrap();
    let mut vg = CudaVectorGrad::new(eng.gpu.clone(), &eng.config, eng.w.clone()).unwrap();
    let d = model.config.hidden_size;
    let mut r = Rng::new(9);
    let ids: Vec<u32> = (0..120).map(|_| 1 + r.below(511) as u32).collect();
    let v = rand(&mut r, d, 0.5);
    let extra = rand(&mut r, d, 0.2);
    // (layer, positions, coldness, extra): a frozen prefix with a constant row, a start at 0
    // (no prefix), and the last block (no block after it: head only).
    let cases: [(usize, Vec<usize>, f32, bool); 4] = [
        (0, vec![20, 21, 35, 60, 61, 90, 117], 1.0, false),
        (1, vec![0, 5, 9, 40, 77], 2.5, true),
        (0, (30..100).step_by(3).collect(), 0.7, true),
        (2, vec![3, 50, 51], 1.0, false),
    ];
    for (layer, positions, cold, with_extra) in cases {
        let ex = Example {
            ids: ids.clone(),
            positions: positions.clone(),
        };
        let fz = prepare(&model, &ex, layer).unwrap();
        let e = with_extra.then_some(extra.as_slice());
        let want = loss_grad::<f32>(&model, &fz, &v, e, cold, true);
        let got = vg.loss_grad(&fz, &v, e, cold, true).unwrap();
        let tag = format!("layer {layer}, positions {positions:?}, coldness {cold}");
        // The forward alone gives the same loss (the same kernels in the same order).
        let fwd = vg.loss_grad(&fz, &v, e, cold, false).unwrap();
        assert_eq!(
            fwd.loss_sum, got.loss_sum,
            "{tag}: loss without the gradient"
        );
        assert_eq!(
            fwd.targets, got.targets,
            "{tag}: targets without the gradient"
        );
        assert_eq!(got.targets, want.targets, "{tag}: targets");
        let tol_l = want.loss_sum.abs() / (1u64 << 14) as f64;
        assert!(
            (got.loss_sum - want.loss_sum).abs() <= tol_l,
            "{tag}: loss {} vs CPU {} (tolerance {tol_l})",
            got.loss_sum,
            want.loss_sum
        );
        let norm = |x: &[f32]| x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
        let diff: Vec<f32> = got
            .grad_sum
            .iter()
            .zip(&want.grad_sum)
            .map(|(a, b)| a - b)
            .collect();
        let (en, gn) = (norm(&diff), norm(&want.grad_sum));
        assert!(
            gn > 0.0,
            "{tag}: the CPU gradient is zero; the test would be vacuous"
        );
        assert!(
            en <= gn / 1024.0,
            "{tag}: ‖GPU − CPU gradient‖ = {en} > 2^-10·‖CPU gradient‖ = {}",
            gn / 1024.0
        );
    }
}
