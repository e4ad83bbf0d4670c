//! Every CUDA kernel against a CPU reference (`thinksteer::cpu_ops` where it has the operator, a
//! plain loop here where it does not), on seeded random inputs with odd and tail sizes. Inputs
//! are rounded to bf16 before the reference sees them, so only accumulation order and the output
//! rounding differ. Without a GPU every test prints "skipped: <reason>" and passes.
//!
//! Tolerances: |gpu − ref| ≤ atol + rtol·|ref|.
//! - bf16 outputs: rtol = 2^-8 (one RNE rounding is ≤ 2^-9 relative; twice that covers the
//!   reference's f32 value sitting near a rounding boundary that the GPU's f32 crosses).
//! - f32 sums of K products: atol = 4·sqrt(K)·eps_f32·Σ_k|x_k·w_k| (the probabilistic bound on
//!   recursive-summation error, for the GPU and the f32 reference each).

mod common;

use cudarc::driver::CudaSlice;
use half::bf16;
use thinksteer::cpu_ops;
use thinksteer::cuda::kernels::{self as k, AttnShape, DecodeAttn, GemmTile, GemvWarps};
use thinksteer::cuda::Gpu;

const EPS32: f32 = f32::EPSILON;
const RTOL_BF16: f32 = 1.0 / 256.0;

fn gpu() -> Option<Gpu> {
    common::cuda_or_skip().then(|| Gpu::new(0).expect("CUDA is available but Gpu::new failed"))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// n values in [−scale, scale), already bf16-exact.
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| bf16::from_f32(self.next() * scale).to_f32())
            .collect()
    }
}

fn to_bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}
fn from_bf(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Fails with the worst element and a few pairs when any |got − want| > atol[i] + rtol·|want|.
fn compare(what: &str, got: &[f32], want: &[f32], atol: &dyn Fn(usize) -> f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    let mut bad = 0;
    for i in 0..got.len() {
        let lim = atol(i) + rtol * want[i].abs();
        let err = (got[i] - want[i]).abs();
        if err.is_nan() || err > lim {
            bad += 1;
        }
        let ratio = if lim > 0.0 { err / lim } else { err };
        if ratio.is_nan() || ratio > worst.1 {
            worst = (i, if ratio.is_nan() { f32::INFINITY } else { ratio });
        }
    }
    if bad > 0 {
        let i = worst.0;
        let pairs: Vec<String> = (0..got.len().min(6))
            .map(|j| format!("{}:{}", got[j], want[j]))
            .collect();
        panic!(
            "{what}: {bad} of {} elements out of tolerance; worst [{i}] gpu {} ref {} (error {:.3}× the limit); first pairs gpu:ref {}",
            got.len(),
            got[i],
            want[i],
            worst.1,
            pairs.join(" ")
        );
    }
}

#[test]
fn embed_matches_table_rows() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(1);
    for &(t, d, v) in &[(3usize, 72usize, 11usize), (17, 37, 5)] {
        let table = rng.vec(v * d, 4.0);
        let ids: Vec<i32> = (0..t).map(|i| ((i * 7 + 3) % v) as i32).collect();
        let tb = g.stream.clone_htod(&to_bf(&table)).unwrap();
        let ib = g.stream.clone_htod(&ids).unwrap();
        let mut r = g.stream.alloc_zeros::<f32>(t * d).unwrap();
        k::embed(
            &g,
            &mut r.as_view_mut(),
            &tb.as_view(),
            &ib.as_view(),
            t,
            d,
            v,
        )
        .unwrap();
        let got = g.stream.clone_dtoh(&r).unwrap();
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec())
            .collect();
        compare("embed (exact)", &got, &want, &|_| 0.0, 0.0);
    }
}

#[test]
fn launches_are_recorded_and_a_left_out_kind_is_not_made() {
    // `bench --marginal`'s mechanism: the embed launch at 3 rows is recorded under its name and
    // grid; left out, its output keeps its old values while the same kernel at 5 rows (another
    // grid) still runs; made again once nothing is left out.
    let Some(g) = gpu() else { return };
    let (d, v) = (64usize, 7usize);
    let tb = g
        .stream
        .clone_htod(&to_bf(&Rng(9).vec(v * d, 4.0)))
        .unwrap();
    let ib = g.stream.clone_htod(&[1i32, 2, 3, 4, 5]).unwrap();
    let embed = |t: usize| -> Vec<f32> {
        let mut r = g.stream.alloc_zeros::<f32>(t * d).unwrap();
        k::embed(
            &g,
            &mut r.as_view_mut(),
            &tb.as_view(),
            &ib.slice(..t),
            t,
            d,
            v,
        )
        .unwrap();
        g.stream.clone_dtoh(&r).unwrap()
    };
    g.record_launches(true);
    let made = embed(3);
    let kinds = g.record_launches(false);
    assert_eq!(kinds.len(), 1, "{kinds:?}");
    assert_eq!(g.kernel_name(kinds[0]), "embed_bf16");
    assert!(made.iter().any(|&x| x != 0.0));
    g.leave_out(Some(kinds[0]));
    assert!(embed(3).iter().all(|&x| x == 0.0), "a left-out launch ran");
    assert!(
        embed(5).iter().any(|&x| x != 0.0),
        "another grid was left out too"
    );
    g.leave_out(None);
    assert_eq!(embed(3), made);
}

#[test]
fn residual_norm_with_steering_and_sae_matches_reference() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(2);
    let (d, nv, kk, eps) = (264usize, 5usize, 37usize, 1e-6f32);
    for &t in &[1usize, 3, 17] {
        let r0 = rng.vec(t * d, 3.0);
        let x = rng.vec(t * d, 3.0);
        let w = rng.vec(d, 1.5);
        let table = rng.vec(nv * d, 1.0);
        let coef: Vec<f32> = (0..t)
            .map(|i| {
                if i % 3 == 1 {
                    0.0
                } else {
                    2.5 - i as f32 * 0.25
                }
            })
            .collect();
        let idx: Vec<i32> = (0..t)
            .map(|i| if i % 4 == 3 { -1 } else { (i % nv) as i32 })
            .collect();
        let w_enc = rng.vec(d * kk, 0.2);
        let b_enc = rng.vec(kk, 0.1);
        let b_dec = rng.vec(d, 0.1);
        let mean = rng.vec(d, 0.5);

        // Reference: r = (r + x) + c·v; y = bf16(rmsnorm(r)·w); SAE on the updated r.
        let mut r = r0.clone();
        for ti in 0..t {
            for i in 0..d {
                let mut v = r[ti * d + i] + x[ti * d + i];
                if coef[ti] != 0.0 && idx[ti] >= 0 {
                    v += coef[ti] * table[idx[ti] as usize * d + i];
                }
                r[ti * d + i] = v;
            }
        }
        let mut y = vec![0f32; t * d];
        cpu_ops::rmsnorm(&mut y, &r, &w, eps);
        let mut z = vec![0f32; t * kk];
        let mut zabs = vec![0f32; t * kk];
        let mut cat = vec![0i32; t];
        for ti in 0..t {
            let c: Vec<f32> = (0..d).map(|i| r[ti * d + i] - mean[i]).collect();
            let nrm = c.iter().map(|v| v * v).sum::<f32>().sqrt();
            let h: Vec<f32> = (0..d).map(|i| c[i] / nrm - b_dec[i]).collect();
            for j in 0..kk {
                let col: Vec<f32> = (0..d).map(|i| w_enc[i * kk + j]).collect();
                z[ti * kk + j] = cpu_ops::dot(&h, &col) + b_enc[j];
                zabs[ti * kk + j] =
                    h.iter().zip(&col).map(|(a, b)| (a * b).abs()).sum::<f32>() + b_enc[j].abs();
            }
            cat[ti] = cpu_ops::argmax(&z[ti * kk..(ti + 1) * kk]) as i32;
        }

        let s = &g.stream;
        let mut rb = s.clone_htod(&r0).unwrap();
        let (xb, wb, tab) = (
            s.clone_htod(&x).unwrap(),
            s.clone_htod(&to_bf(&w)).unwrap(),
            s.clone_htod(&table).unwrap(),
        );
        let (cb, ib) = (s.clone_htod(&coef).unwrap(), s.clone_htod(&idx).unwrap());
        let (web, beb, bdb, mb) = (
            s.clone_htod(&w_enc).unwrap(),
            s.clone_htod(&b_enc).unwrap(),
            s.clone_htod(&b_dec).unwrap(),
            s.clone_htod(&mean).unwrap(),
        );
        let mut yb = s.alloc_zeros::<bf16>(t * d).unwrap();
        let mut zb = s.alloc_zeros::<f32>(t * kk).unwrap();
        let mut catb = s.alloc_zeros::<i32>(t).unwrap();
        let (tabv, cbv, ibv) = (tab.as_view(), cb.as_view(), ib.as_view());
        let steer = k::Steer {
            table: &tabv,
            coef: &cbv,
            idx: &ibv,
            nv,
        };
        let (wev, bev, bdv, mv) = (web.as_view(), beb.as_view(), bdb.as_view(), mb.as_view());
        let mut zv = zb.as_view_mut();
        let mut cv = catb.as_view_mut();
        let mut sae = k::SaeEncode {
            w_enc: &wev,
            b_enc: &bev,
            b_dec: &bdv,
            mean: Some(&mv),
            z: &mut zv,
            category: &mut cv,
            k: kk,
        };
        k::residual_norm(
            &g,
            &mut rb.as_view_mut(),
            Some(&xb.as_view()),
            Some(&steer),
            &wb.as_view(),
            Some(&mut yb.as_view_mut()),
            Some(&mut sae),
            t,
            d,
            eps,
        )
        .unwrap();
        let gr = s.clone_dtoh(&rb).unwrap();
        // r: at most three f32 adds, identical order: exact up to fma contraction (1 ulp per add).
        compare("residual_norm r", &gr, &r, &|_| 0.0, 4.0 * EPS32);
        // y: bf16 output; rmsnorm's f32 sum over D differs in order (≈ sqrt(D)·eps relative).
        compare(
            "residual_norm y",
            &from_bf(&s.clone_dtoh(&yb).unwrap()),
            &y,
            &|_| 1e-6,
            RTOL_BF16,
        );
        let sd = (d as f32).sqrt();
        compare(
            "residual_norm z",
            &s.clone_dtoh(&zb).unwrap(),
            &z,
            &|i| 4.0 * sd * EPS32 * zabs[i] * 4.0,
            0.0,
        );
        let gc = s.clone_dtoh(&catb).unwrap();
        for ti in 0..t {
            if gc[ti] != cat[ti] {
                // Only acceptable when the two latents are tied within the z tolerance.
                let (a, b) = (z[ti * kk + gc[ti] as usize], z[ti * kk + cat[ti] as usize]);
                assert!(
                    (a - b).abs() <= 16.0 * sd * EPS32 * zabs[ti * kk + cat[ti] as usize],
                    "category row {ti}: gpu {} ref {}",
                    gc[ti],
                    cat[ti]
                );
            }
        }
    }
}

fn inv_freq(dh: usize) -> Vec<f32> {
    (0..dh / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / dh as f32))
        .collect()
}

#[test]
fn qkv_rope_matches_cpu_rope_and_appends_cache() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(3);
    let sh = AttnShape {
        h: 4,
        hkv: 2,
        dh: 64,
        slots: 2,
        s: 1100,
    };
    let (t, n_write) = (3usize, 2usize);
    let width = (sh.h + 2 * sh.hkv) * sh.dh;
    let qkv = rng.vec(t * width, 2.0);
    let bias = rng.vec(width, 0.5);
    let pos = vec![0i32, 7, 1033];
    let slot = vec![1i32, 0, 1];
    let inv = inv_freq(sh.dh);
    // Reference: bias, then cpu_ops::rope on the q and k parts, then bf16.
    let u: Vec<f32> = (0..t * width).map(|i| qkv[i] + bias[i % width]).collect();
    let positions: Vec<usize> = pos.iter().map(|&p| p as usize).collect();
    let split = |lo: usize, n: usize| -> Vec<f32> {
        (0..t)
            .flat_map(|ti| u[ti * width + lo..ti * width + lo + n].to_vec())
            .collect()
    };
    let mut q_ref = split(0, sh.h * sh.dh);
    let mut k_ref = split(sh.h * sh.dh, sh.hkv * sh.dh);
    let v_ref = split((sh.h + sh.hkv) * sh.dh, sh.hkv * sh.dh);
    cpu_ops::rope(&mut q_ref, &positions, &inv, sh.h);
    cpu_ops::rope(&mut k_ref, &positions, &inv, sh.hkv);

    let s = &g.stream;
    let (qkvb, bb, ib) = (
        s.clone_htod(&qkv).unwrap(),
        s.clone_htod(&bias).unwrap(),
        s.clone_htod(&inv).unwrap(),
    );
    let (pb, sb) = (s.clone_htod(&pos).unwrap(), s.clone_htod(&slot).unwrap());
    let mut q = s.alloc_zeros::<bf16>(t * sh.h * sh.dh).unwrap();
    let mut ks = s.alloc_zeros::<bf16>(t * sh.hkv * sh.dh).unwrap();
    let mut vs = s.alloc_zeros::<bf16>(t * sh.hkv * sh.dh).unwrap();
    let cl = sh.slots * sh.s * sh.hkv * sh.dh;
    let mut kc = s.alloc_zeros::<bf16>(cl).unwrap();
    let mut vc = s.alloc_zeros::<bf16>(cl).unwrap();
    k::qkv_rope(
        &g,
        &qkvb.as_view(),
        Some(&bb.as_view()),
        &ib.as_view(),
        &pb.as_view(),
        &sb.as_view(),
        n_write,
        &mut q.as_view_mut(),
        &mut ks.as_view_mut(),
        &mut vs.as_view_mut(),
        &mut kc.as_view_mut(),
        &mut vc.as_view_mut(),
        t,
        sh,
    )
    .unwrap();
    // sin/cos of angles up to ~1000 rad: f32 argument reduction differs between libraries by a
    // few ulp of the angle (≈ 1e-4 absolute at 1000), times |u| ≤ 2.5.
    let atol = 2.5 * 1000.0 * 4.0 * EPS32;
    compare(
        "qkv_rope q",
        &from_bf(&s.clone_dtoh(&q).unwrap()),
        &q_ref,
        &|_| atol,
        RTOL_BF16,
    );
    let gk = from_bf(&s.clone_dtoh(&ks).unwrap());
    compare("qkv_rope k_self", &gk, &k_ref, &|_| atol, RTOL_BF16);
    let gv = from_bf(&s.clone_dtoh(&vs).unwrap());
    compare("qkv_rope v_self", &gv, &v_ref, &|_| 0.0, RTOL_BF16);
    let (kcache, vcache) = (
        from_bf(&s.clone_dtoh(&kc).unwrap()),
        from_bf(&s.clone_dtoh(&vc).unwrap()),
    );
    let row = sh.hkv * sh.dh;
    let mut nonzero_rows = 0;
    for sl in 0..sh.slots {
        for p in 0..sh.s {
            let off = (sl * sh.s + p) * row;
            let written = (0..n_write).find(|&ti| slot[ti] as usize == sl && pos[ti] as usize == p);
            match written {
                Some(ti) => {
                    assert_eq!(
                        &kcache[off..off + row],
                        &gk[ti * row..(ti + 1) * row],
                        "k cache row of token {ti}"
                    );
                    assert_eq!(
                        &vcache[off..off + row],
                        &gv[ti * row..(ti + 1) * row],
                        "v cache row of token {ti}"
                    );
                    nonzero_rows += 1;
                }
                None => assert!(
                    kcache[off..off + row]
                        .iter()
                        .chain(&vcache[off..off + row])
                        .all(|&v| v == 0.0),
                    "cache (slot {sl}, pos {p}) written but no token writes it"
                ),
            }
        }
    }
    assert_eq!(nonzero_rows, n_write);
}

/// cpu_ops::attend over explicit key/value rows [L, Dh], the last row being the token itself.
fn attend_ref(q: &[f32], keys: &[f32], vals: &[f32], dh: usize) -> Vec<f32> {
    let mut out = vec![0f32; dh];
    let mut scores = Vec::new();
    let n = keys.len() / dh - 1;
    let me = (&keys[n * dh..], &vals[n * dh..], 1);
    cpu_ops::attend(&mut out, q, keys, vals, dh, n, me, &mut scores);
    out
}

#[test]
fn attention_decode_matches_cpu_attend_across_splits() {
    let Some(g) = gpu() else { return };
    // 3 rows: 132 blocks (the 8-keys-per-step kernel); 30 rows: 1,320 blocks (the 1-key kernel);
    // then the grouped kernels (a GQA group per block) with the Qwen2.5-1.5B (12 / 2) and
    // Llama-3.1-8B (32 / 8) head ratios.
    // Each also with read-only runs (a steering window's candidates): rows in runs of three.
    for runs in [false, true] {
        for t in [3usize, 30] {
            check_attention_decode(&g, t, (4, 2), DecodeAttn::PerHead, runs);
        }
        for (t, heads) in [(3usize, (12usize, 2usize)), (30, (32, 8))] {
            check_attention_decode(&g, t, heads, DecodeAttn::Grouped, runs);
        }
    }
}

/// Rows: positions with 1, 5 and 11 splits of 64 keys; with `runs`, runs of three consecutive
/// positions instead (62..=64 in slot 1, across a split boundary, or 0..=2 in slot 0), each row
/// attending the cache before its run, then the run's own K/V up to itself.
fn check_attention_decode(
    g: &Gpu,
    t: usize,
    (h, hkv): (usize, usize),
    kind: DecodeAttn,
    runs: bool,
) {
    let mut rng = Rng(4 + t as u64);
    let sh = AttnShape {
        h,
        hkv,
        dh: 128,
        slots: 2,
        s: 700,
    };
    let (pos, slot, run): (Vec<i32>, Vec<i32>, Vec<i32>) = if runs {
        let even = |i: usize| (i / 3).is_multiple_of(2);
        (
            (0..t)
                .map(|i| if even(i) { 62 } else { 0 } + (i % 3) as i32)
                .collect(),
            (0..t).map(|i| if even(i) { 1 } else { 0 }).collect(),
            (0..t).map(|i| (i / 3 * 3) as i32).collect(),
        )
    } else {
        (
            (0..t).map(|i| [0i32, 300, 699][i % 3]).collect(),
            (0..t).map(|i| [0i32, 1, 0][i % 3]).collect(),
            (0..t as i32).collect(),
        )
    };
    let cl = sh.slots * sh.s * sh.hkv * sh.dh;
    let kc = rng.vec(cl, 2.0);
    let vc = rng.vec(cl, 2.0);
    let q = rng.vec(t * sh.h * sh.dh, 2.0);
    let kself = rng.vec(t * sh.hkv * sh.dh, 2.0);
    let vself = rng.vec(t * sh.hkv * sh.dh, 2.0);
    let mut want = Vec::new();
    for ti in 0..t {
        for h in 0..sh.h {
            let kvh = h / (sh.h / sh.hkv);
            let (mut keys, mut vals) = (Vec::new(), Vec::new());
            let a = run[ti] as usize;
            for p in 0..pos[a] as usize {
                let off = ((slot[ti] as usize * sh.s + p) * sh.hkv + kvh) * sh.dh;
                keys.extend_from_slice(&kc[off..off + sh.dh]);
                vals.extend_from_slice(&vc[off..off + sh.dh]);
            }
            for r in a..=ti {
                let so = (r * sh.hkv + kvh) * sh.dh;
                keys.extend_from_slice(&kself[so..so + sh.dh]);
                vals.extend_from_slice(&vself[so..so + sh.dh]);
            }
            let qo = (ti * sh.h + h) * sh.dh;
            want.extend(attend_ref(&q[qo..qo + sh.dh], &keys, &vals, sh.dh));
        }
    }
    let s = &g.stream;
    let up = |v: &[f32]| s.clone_htod(&to_bf(v)).unwrap();
    let (qb, mut kcb, mut vcb, ksb, vsb) = (up(&q), up(&kc), up(&vc), up(&kself), up(&vself));
    let (pb, sb) = (s.clone_htod(&pos).unwrap(), s.clone_htod(&slot).unwrap());
    let rb = s.clone_htod(&run).unwrap();
    let out = run_decode(
        g,
        k::DecodeIn::Rotated {
            q: &qb.as_view(),
            k_self: &ksb.as_view(),
            v_self: &vsb.as_view(),
        },
        (&mut kcb, &mut vcb),
        (&pb, &sb, runs.then_some(&rb)),
        t,
        sh,
        kind,
    );
    // Output is a convex combination of values ≤ 2: f32 softmax differences are ~1e-6 relative;
    // atol 2^-8·max|v| covers bf16 rounding of outputs near zero.
    compare(
        &format!("attention_decode {kind:?} T={t} H={h} Hkv={hkv} runs {runs}"),
        &from_bf(&out),
        &want,
        &|_| 2.0 / 256.0,
        RTOL_BF16,
    );
}

/// Decode attention with its scratch allocated here (splits for positions up to S): out bf16
/// [T, H, Dh].
fn run_decode(
    g: &Gpu,
    input: k::DecodeIn,
    caches: (&mut CudaSlice<bf16>, &mut CudaSlice<bf16>),
    rows: (&CudaSlice<i32>, &CudaSlice<i32>, Option<&CudaSlice<i32>>),
    t: usize,
    sh: AttnShape,
    kind: DecodeAttn,
) -> Vec<bf16> {
    try_decode(g, input, caches, rows, t, sh, kind).unwrap()
}

/// `run_decode`, returning the wrapper's error.
fn try_decode(
    g: &Gpu,
    input: k::DecodeIn,
    (kc, vc): (&mut CudaSlice<bf16>, &mut CudaSlice<bf16>),
    (pos, slot, run): (&CudaSlice<i32>, &CudaSlice<i32>, Option<&CudaSlice<i32>>),
    t: usize,
    sh: AttnShape,
    kind: DecodeAttn,
) -> thinksteer::Result<Vec<bf16>> {
    let s = &g.stream;
    let splits = k::decode_splits(sh.s + 1);
    let mut po = s.alloc_zeros::<f32>(t * sh.h * splits * sh.dh).unwrap();
    let mut pml = s.alloc_zeros::<f32>(t * sh.h * splits * 2).unwrap();
    let mut out = s.alloc_zeros::<bf16>(t * sh.h * sh.dh).unwrap();
    k::attention_decode(
        g,
        input,
        &mut kc.as_view_mut(),
        &mut vc.as_view_mut(),
        &pos.as_view(),
        &slot.as_view(),
        &mut po.as_view_mut(),
        &mut pml.as_view_mut(),
        &mut out.as_view_mut(),
        t,
        sh,
        splits,
        None,
        run.map(|r| r.as_view()).as_ref(),
        kind,
    )?;
    Ok(s.clone_dtoh(&out).unwrap())
}

#[test]
fn fused_rope_decode_attention_equals_qkv_rope_then_attention() {
    let Some(g) = gpu() else { return };
    // Both head dims, with and without bias, every decode kernel (8-key, 1-key, grouped 6 and 4).
    let cases = [
        (
            3usize,
            (4usize, 2usize),
            128usize,
            true,
            DecodeAttn::PerHead,
        ),
        (30, (4, 2), 64, false, DecodeAttn::PerHead),
        (5, (12, 2), 128, true, DecodeAttn::Grouped),
        (30, (32, 8), 64, false, DecodeAttn::Grouped),
    ];
    for (i, &(t, heads, dh, bias, kind)) in cases.iter().enumerate() {
        check_fused_rope(&g, 40 + i as u64, t, heads, dh, bias, kind);
    }
}

/// `DecodeIn::Raw` must give bit for bit what `qkv_rope` then `DecodeIn::Rotated` gives: the
/// attention output and both caches. Rows: problems 0..n_write, one slot each, at positions with
/// 1 to 11 splits (one past the cache: no write), then candidate rows beside them (same slot and
/// position, not writing), as in the hybrid step.
fn check_fused_rope(
    g: &Gpu,
    seed: u64,
    t: usize,
    (h, hkv): (usize, usize),
    dh: usize,
    with_bias: bool,
    kind: DecodeAttn,
) {
    let mut rng = Rng(seed);
    let n_write = t.div_ceil(2);
    let sh = AttnShape {
        h,
        hkv,
        dh,
        slots: n_write,
        s: 700,
    };
    let ps = [0i32, 63, 64, 300, 699, 700];
    let pos: Vec<i32> = (0..t).map(|i| ps[(i % n_write) % ps.len()]).collect();
    let slot: Vec<i32> = (0..t).map(|i| (i % n_write) as i32).collect();
    let width = (h + 2 * hkv) * dh;
    let cl = sh.slots * sh.s * hkv * dh;
    let s = &g.stream;
    let up = |v: &[f32]| s.clone_htod(&to_bf(v)).unwrap();
    let (kc0, vc0) = (rng.vec(cl, 2.0), rng.vec(cl, 2.0));
    let qkv = s.clone_htod(&rng.vec(t * width, 2.0)).unwrap();
    let bias = s.clone_htod(&rng.vec(width, 0.5)).unwrap();
    let inv = s.clone_htod(&inv_freq(dh)).unwrap();
    let (pb, sb) = (s.clone_htod(&pos).unwrap(), s.clone_htod(&slot).unwrap());
    let bias_v = bias.as_view();
    let bias_opt = with_bias.then_some(&bias_v);
    let run = |fused: bool| {
        let (mut kc, mut vc) = (up(&kc0), up(&vc0));
        let mut q = s.alloc_zeros::<bf16>(t * h * dh).unwrap();
        let mut ks = s.alloc_zeros::<bf16>(t * hkv * dh).unwrap();
        let mut vs = s.alloc_zeros::<bf16>(t * hkv * dh).unwrap();
        if !fused {
            k::qkv_rope(
                g,
                &qkv.as_view(),
                bias_opt,
                &inv.as_view(),
                &pb.as_view(),
                &sb.as_view(),
                n_write,
                &mut q.as_view_mut(),
                &mut ks.as_view_mut(),
                &mut vs.as_view_mut(),
                &mut kc.as_view_mut(),
                &mut vc.as_view_mut(),
                t,
                sh,
            )
            .unwrap();
        }
        let (qv, ksv, vsv, qkvv, invv) = (
            q.as_view(),
            ks.as_view(),
            vs.as_view(),
            qkv.as_view(),
            inv.as_view(),
        );
        let input = if fused {
            k::DecodeIn::Raw {
                qkv: &qkvv,
                bias: bias_opt,
                inv_freq: &invv,
                n_write,
            }
        } else {
            k::DecodeIn::Rotated {
                q: &qv,
                k_self: &ksv,
                v_self: &vsv,
            }
        };
        let out = run_decode(g, input, (&mut kc, &mut vc), (&pb, &sb, None), t, sh, kind);
        let bits = |b: &CudaSlice<bf16>| -> Vec<u16> {
            s.clone_dtoh(b)
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        let out: Vec<u16> = out.iter().map(|x| x.to_bits()).collect();
        (out, bits(&kc), bits(&vc))
    };
    let (sep, fus) = (run(false), run(true));
    let what = format!("fused RoPE {kind:?} T={t} H={h} Hkv={hkv} Dh={dh} bias={with_bias}");
    let changed = sep
        .1
        .iter()
        .zip(to_bf(&kc0))
        .filter(|(a, b)| **a != b.to_bits())
        .count();
    assert!(changed > 0, "{what}: qkv_rope wrote no cache row");
    for (name, a, b) in [
        ("attention output", &sep.0, &fus.0),
        ("K cache", &sep.1, &fus.1),
        ("V cache", &sep.2, &fus.2),
    ] {
        let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
        assert_eq!(
            diff,
            0,
            "{what}: {name} differs in {diff} of {} values",
            a.len()
        );
    }
}

#[test]
fn attention_prefill_matches_cpu_attend() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(5);
    // Partial query tiles (37 of 64), two tiles, and three with keys past several 64-key tiles
    // (the K/V ring wraps), at both head sizes.
    for &(dh, n, p0) in &[
        (64usize, 37usize, 5usize),
        (64, 100, 90),
        (128, 70, 0),
        (128, 130, 100),
    ] {
        let sh = AttnShape {
            h: 6,
            hkv: 2,
            dh,
            slots: 2,
            s: 256,
        };
        let slot = 1usize;
        let cl = sh.slots * sh.s * sh.hkv * sh.dh;
        let kc = rng.vec(cl, 2.0);
        let vc = rng.vec(cl, 2.0);
        let q = rng.vec(n * sh.h * dh, 2.0);
        let mut want = Vec::new();
        for i in 0..n {
            for h in 0..sh.h {
                let kvh = h / (sh.h / sh.hkv);
                let (mut keys, mut vals) = (Vec::new(), Vec::new());
                for p in 0..=p0 + i {
                    let off = ((slot * sh.s + p) * sh.hkv + kvh) * dh;
                    keys.extend_from_slice(&kc[off..off + dh]);
                    vals.extend_from_slice(&vc[off..off + dh]);
                }
                let qo = (i * sh.h + h) * dh;
                want.extend(attend_ref(&q[qo..qo + dh], &keys, &vals, dh));
            }
        }
        let s = &g.stream;
        let up = |v: &[f32]| s.clone_htod(&to_bf(v)).unwrap();
        let (qb, kcb, vcb) = (up(&q), up(&kc), up(&vc));
        let mut out = s.alloc_zeros::<bf16>(n * sh.h * dh).unwrap();
        k::attention_prefill(
            &g,
            &qb.as_view(),
            &kcb.as_view(),
            &vcb.as_view(),
            &mut out.as_view_mut(),
            n,
            p0,
            slot,
            sh,
        )
        .unwrap();
        compare(
            &format!("attention_prefill Dh={dh} n={n} p0={p0}"),
            &from_bf(&s.clone_dtoh(&out).unwrap()),
            &want,
            // The probabilities are rounded to bf16 (≤ 2^-9 each) to multiply V on tensor cores:
            // a convex sum of |v| ≤ 2 moves by ≤ 2·2^-9 = 2^-8; twice that for slack.
            &|_| 2.0 / 256.0,
            RTOL_BF16,
        );
    }
}

/// Runs gemv / gemm / matmul on (n, m, k) and compares with cpu_ops::matmul.
fn check_matmul(g: &Gpu, which: &str, n: usize, m: usize, kd: usize, seed: u64) {
    let mut rng = Rng(seed);
    // Large values: the tolerance scales with Σ|x·w|, so magnitudes must not hide errors.
    let x = rng.vec(n * kd, 8.0);
    let w = rng.vec(m * kd, 4.0);
    let mut want = vec![0f32; n * m];
    cpu_ops::matmul(&mut want, &x, &w, None, n, kd, m, &mut Vec::new());
    let abs: Vec<f32> = (0..n * m)
        .map(|e| {
            let (r, c) = (e / m, e % m);
            (0..kd).map(|i| (x[r * kd + i] * w[c * kd + i]).abs()).sum()
        })
        .collect();
    let s = &g.stream;
    let (xb, wb) = (
        s.clone_htod(&to_bf(&x)).unwrap(),
        s.clone_htod(&to_bf(&w)).unwrap(),
    );
    let mut out = s.alloc_zeros::<f32>(n * m).unwrap();
    let (xv, wv) = (xb.as_view(), wb.as_view());
    let mut ov = out.as_view_mut();
    match which {
        "gemv" => k::gemv(g, &mut ov, &xv, &wv, n, m, kd),
        "gemv_w8" => k::gemv_with(g, &mut ov, &xv, &wv, (n, m, kd), GemvWarps::W8),
        "gemm" => k::gemm_with(g, &mut ov, &xv, &wv, n, m, kd, GemmTile::N64, None),
        "gemm128" => k::gemm_with(g, &mut ov, &xv, &wv, n, m, kd, GemmTile::N128, None),
        "gemm_wg" => k::gemm_with(g, &mut ov, &xv, &wv, n, m, kd, GemmTile::Wg, None),
        "gemm_wg256" => k::gemm_with(g, &mut ov, &xv, &wv, n, m, kd, GemmTile::Wg256, None),
        "gemm_lt" => match k::gemm_with(g, &mut ov, &xv, &wv, n, m, kd, GemmTile::Lt, None) {
            Err(e) if e.to_string().contains("could not be loaded") => {
                println!("skipped gemm_lt: {e}");
                return;
            }
            r => r,
        },
        _ => k::matmul(g, &mut ov, &xv, &wv, n, m, kd),
    }
    .unwrap();
    let got = s.clone_dtoh(&out).unwrap();
    let sk = (kd as f32).sqrt();
    compare(
        &format!("{which} N={n} M={m} K={kd}"),
        &got,
        &want,
        &|e| 2.0 * 4.0 * sk * EPS32 * abs[e],
        0.0,
    );
}

#[test]
fn gemv_matches_cpu_matmul() {
    let Some(g) = gpu() else { return };
    for (i, &b) in [1usize, 2, 3, 8, 13, 16, 17, 24, 32].iter().enumerate() {
        check_matmul(&g, "gemv", b, 77, 8 * 37, 10 + i as u64);
    }
    // Single-row split-K variants: 8 warps per row (K > 8192), 4 (K > 4096), 2 (K > 2048), with
    // M not a multiple of the rows per block.
    check_matmul(&g, "gemv", 1, 1535, 8960, 20);
    check_matmul(&g, "gemv", 1, 5, 6000, 23);
    check_matmul(&g, "gemv", 1, 77, 3000, 21);
    check_matmul(&g, "gemv", 1, 3, 4104, 22);
    // The 8-warp blocks of the 16 and 32 buckets (THINKSTEER_GEMV_WARPS=8), one with K = 8960.
    for (i, &b) in [13usize, 16, 17, 32].iter().enumerate() {
        check_matmul(&g, "gemv_w8", b, 77, 8 * 37, 24 + i as u64);
    }
    check_matmul(&g, "gemv_w8", 11, 40, 8960, 29);
    // The 64-row bucket (THINKSTEER_GEMV_ROWS=64 routes matmul's 33..=64 rows to it).
    check_matmul(&g, "gemv", 40, 77, 8 * 37, 30);
    check_matmul(&g, "gemv", 64, 40, 1536, 31);
}

#[test]
fn gemm_matches_cpu_matmul() {
    let Some(g) = gpu() else { return };
    for (i, &(n, m, kd)) in [
        (17usize, 131usize, 8 * 37usize),
        (70, 256, 64),
        (1, 5, 8),
        (130, 200, 1536),
        // Decode-batch shapes whose few output tiles make gemm_with split K (12 and 8 splits,
        // the second ragged in K), reduced in order by vg_mm_reduce_f32.
        (40, 300, 4096),
        (50, 260, 8 * 421),
    ]
    .iter()
    .enumerate()
    {
        check_matmul(&g, "gemm", n, m, kd, 30 + i as u64);
        check_matmul(&g, "gemm128", n, m, kd, 50 + i as u64);
        check_matmul(&g, "gemm_wg", n, m, kd, 80 + i as u64);
    }
    // Two 128-row tiles, the second ragged.
    check_matmul(&g, "gemm128", 200, 264, 8 * 37, 60);
    // The warpgroup kernels (gemm_wgmma.cu; where the device lacks wgmma, GemmTile falls back
    // to the 64-row tile and these check that again): two row tiles, ragged in N, M and K.
    println!("wgmma products run here: {}", g.has_wgmma());
    check_matmul(&g, "gemm_wg", 200, 264, 8 * 37, 61);
    check_matmul(&g, "gemm_wg256", 200, 300, 8 * 37, 62);
    check_matmul(&g, "gemm_wg256", 40, 300, 4096, 63);
    // cuBLASLt (THINKSTEER_GEMM=lt): the same contract, skipped where libcublasLt is absent.
    for (i, &(n, m, kd)) in [
        (17usize, 131usize, 8 * 37usize),
        (130, 200, 1536),
        (512, 2048, 1536),
    ]
    .iter()
    .enumerate()
    {
        check_matmul(&g, "gemm_lt", n, m, kd, 70 + i as u64);
    }
    check_matmul(&g, "matmul", 16, 33, 24, 40);
    check_matmul(&g, "matmul", 17, 33, 24, 41);
    // Row groups through gemv (33..=128 rows), and the switch to gemm above.
    check_matmul(&g, "matmul", 33, 77, 8 * 37, 42);
    check_matmul(&g, "matmul", 88, 130, 1536, 43);
    check_matmul(&g, "matmul", 128, 33, 24, 44);
    check_matmul(&g, "matmul", 129, 33, 24, 45);
}

#[test]
fn matmul_rejects_k_not_multiple_of_8() {
    let Some(g) = gpu() else { return };
    let s = &g.stream;
    let x = s.alloc_zeros::<bf16>(2 * 12).unwrap();
    let w = s.alloc_zeros::<bf16>(3 * 12).unwrap();
    let mut out = s.alloc_zeros::<f32>(2 * 3).unwrap();
    let e = k::matmul(
        &g,
        &mut out.as_view_mut(),
        &x.as_view(),
        &w.as_view(),
        2,
        3,
        12,
    )
    .unwrap_err();
    assert!(e.to_string().contains("multiple of 8"), "{e}");
}

/// matmul_glu (the fused gate|up product + SiLU·mul) against the CPU: gate and up as f32 products
/// of the same bf16 inputs, then silu·mul, rounded to bf16.
/// `warps`: Some → gemv_glu_with those warps per block (≤ 32 rows), None → matmul_glu.
fn check_glu(g: &Gpu, n: usize, f: usize, kd: usize, seed: u64, warps: Option<GemvWarps>) {
    let mut rng = Rng(seed);
    let x = rng.vec(n * kd, 1.0);
    let w = rng.vec(2 * f * kd, 0.5);
    let mut gu = vec![0f32; n * 2 * f];
    cpu_ops::matmul(&mut gu, &x, &w, None, n, kd, 2 * f, &mut Vec::new());
    let (mut gate, mut up) = (Vec::new(), Vec::new());
    for r in 0..n {
        gate.extend_from_slice(&gu[r * 2 * f..r * 2 * f + f]);
        up.extend_from_slice(&gu[r * 2 * f + f..(r + 1) * 2 * f]);
    }
    let mut want = vec![0f32; n * f];
    cpu_ops::silu_mul(&mut want, &gate, &up);
    // Σ|x·w| per product bounds its f32 summation-order error (as in check_matmul); it reaches the
    // output through d(silu(g)·u) = silu'(g)·u·dg + silu(g)·du with |silu'| ≤ 1.1; then the bf16
    // rounding of the output (RTOL_BF16).
    let abs = |r: usize, row: usize| -> f32 {
        (0..kd)
            .map(|i| (x[r * kd + i] * w[row * kd + i]).abs())
            .sum()
    };
    let sk = (kd as f32).sqrt();
    let tol: Vec<f32> = (0..n * f)
        .map(|e| {
            let (r, c) = (e / f, e % f);
            let (gv, uv) = (gate[e], up[e]);
            let silu = gv / (1.0 + (-gv).exp());
            let dg = 8.0 * sk * EPS32 * abs(r, c);
            let du = 8.0 * sk * EPS32 * abs(r, f + c);
            1.1 * uv.abs() * dg + silu.abs() * du + 1e-30
        })
        .collect();
    let s = &g.stream;
    let (xb, wb) = (
        s.clone_htod(&to_bf(&x)).unwrap(),
        s.clone_htod(&to_bf(&w)).unwrap(),
    );
    let mut act = s.alloc_zeros::<bf16>(n * f).unwrap();
    let mut scratch = s.alloc_zeros::<f32>(n * 2 * f).unwrap();
    match warps {
        Some(wp) => k::gemv_glu_with(
            g,
            &mut act.as_view_mut(),
            &xb.as_view(),
            &wb.as_view(),
            (n, f, kd),
            wp,
        ),
        None => k::matmul_glu(
            g,
            &mut act.as_view_mut(),
            &mut scratch.as_view_mut(),
            &xb.as_view(),
            &wb.as_view(),
            n,
            f,
            kd,
        ),
    }
    .unwrap();
    compare(
        &format!("matmul_glu N={n} F={f} K={kd} warps {warps:?}"),
        &from_bf(&s.clone_dtoh(&act).unwrap()),
        &want,
        &|e| tol[e],
        RTOL_BF16,
    );
}

#[test]
fn matmul_glu_matches_cpu_gate_up_silu_mul() {
    let Some(g) = gpu() else { return };
    // Every gemv_glu bucket (1, 2, 4, 8, 16, 32 rows), row groups (40), the gemm + silu_mul path
    // (129), and the single-row split-K variants (K > 2048, K > 4096); F not a multiple of 8.
    for (i, &(n, f, kd)) in [
        (1usize, 77usize, 8 * 37usize),
        (1, 77, 3000),
        (1, 333, 8960),
        (1, 41, 6000),
        (2, 77, 8 * 37),
        (3, 100, 1536),
        (8, 77, 8 * 37),
        (13, 61, 264),
        (32, 77, 8 * 37),
        (40, 50, 264),
        (129, 33, 64),
    ]
    .iter()
    .enumerate()
    {
        check_glu(&g, n, f, kd, 60 + i as u64, None);
    }
    // The 8-warp blocks of the 16 and 32 buckets (THINKSTEER_GEMV_WARPS=8).
    for (i, &(n, f, kd)) in [
        (11usize, 61usize, 1536usize),
        (16, 77, 264),
        (27, 40, 8 * 37),
    ]
    .iter()
    .enumerate()
    {
        check_glu(&g, n, f, kd, 80 + i as u64, Some(GemvWarps::W8));
    }
    // The 64-row bucket.
    check_glu(&g, 50, 61, 1536, 90, Some(GemvWarps::W16));
    check_glu(&g, 64, 40, 264, 91, Some(GemvWarps::W16));
}

/// The gate|up product with SiLU·mul in gemm's epilogue (`gemm_glu`, every tile, with and
/// without a live row count) equals `gemm_with` then `silu_mul` bit for bit on the rows needed
/// (same sums, same SiLU·mul); the CPU comparison of that path is `matmul_glu_matches_cpu…`.
/// Where gemm would split K, `gemm_glu` declines and launches nothing.
#[test]
fn gemm_glu_equals_gemm_then_silu_mul_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let s = &g.stream;
    let mut rng = Rng(17);
    for &(n, f, kd, live) in &[
        (200usize, 100usize, 72usize, None),
        (130, 64, 1536, None),
        (300, 136, 8 * 37, Some(70i32)),
    ] {
        let x = s.clone_htod(&to_bf(&rng.vec(n * kd, 1.0))).unwrap();
        let w = s.clone_htod(&to_bf(&rng.vec(2 * f * kd, 0.5))).unwrap();
        let count = s.clone_htod(&[live.unwrap_or(0)]).unwrap();
        let lv = live.map(|_| count.as_view());
        let rows = live.map_or(n, |l| l as usize);
        for tile in [GemmTile::N64, GemmTile::N128, GemmTile::Wg, GemmTile::Wg256] {
            let mut fused = s.alloc_zeros::<bf16>(n * f).unwrap();
            let mut act = s.alloc_zeros::<bf16>(n * f).unwrap();
            let mut gu = s.alloc_zeros::<f32>(n * 2 * f).unwrap();
            let (xv, wv) = (x.as_view(), w.as_view());
            let ran = k::gemm_glu(
                &g,
                &mut fused.as_view_mut(),
                &xv,
                &wv,
                (n, f, kd),
                tile,
                lv.as_ref(),
            );
            assert!(ran.unwrap(), "gemm_glu declined N={n} F={f} K={kd}");
            k::gemm_then_silu_mul(
                &g,
                &mut act.as_view_mut(),
                &mut gu.as_view_mut(),
                &xv,
                &wv,
                (n, f, kd),
                tile,
                lv.as_ref(),
            )
            .unwrap();
            let (a, b) = (s.clone_dtoh(&fused).unwrap(), s.clone_dtoh(&act).unwrap());
            let differ = (0..rows * f)
                .filter(|&e| a[e].to_bits() != b[e].to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "gemm_glu {tile:?} N={n} F={f} K={kd} live {live:?}: {differ} of {} values differ",
                rows * f
            );
        }
    }
    // A decode-batch shape on which gemm splits K: declined, nothing written.
    let (n, f, kd) = (40usize, 150usize, 4096usize);
    let x = s.alloc_zeros::<bf16>(n * kd).unwrap();
    let w = s.alloc_zeros::<bf16>(2 * f * kd).unwrap();
    let mut act = s.clone_htod(&vec![bf16::from_f32(3.0); n * f]).unwrap();
    let ran = k::gemm_glu(
        &g,
        &mut act.as_view_mut(),
        &x.as_view(),
        &w.as_view(),
        (n, f, kd),
        GemmTile::N64,
        None,
    );
    assert!(!ran.unwrap());
    assert!(s
        .clone_dtoh(&act)
        .unwrap()
        .iter()
        .all(|v| v.to_f32() == 3.0));
}

#[test]
fn silu_mul_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(6);
    for &(t, f) in &[(1usize, 333usize), (3, 1000)] {
        let gu = rng.vec(t * 2 * f, 6.0);
        let (mut gate, mut up) = (Vec::new(), Vec::new());
        for ti in 0..t {
            gate.extend_from_slice(&gu[ti * 2 * f..ti * 2 * f + f]);
            up.extend_from_slice(&gu[ti * 2 * f + f..(ti + 1) * 2 * f]);
        }
        let mut want = vec![0f32; t * f];
        cpu_ops::silu_mul(&mut want, &gate, &up);
        let s = &g.stream;
        let gb = s.clone_htod(&gu).unwrap();
        let mut out = s.alloc_zeros::<bf16>(t * f).unwrap();
        k::silu_mul(&g, &mut out.as_view_mut(), &gb.as_view(), t, f, None).unwrap();
        // expf differs by ≤ 2 ulp between libraries: far below the bf16 output rounding.
        compare(
            "silu_mul",
            &from_bf(&s.clone_dtoh(&out).unwrap()),
            &want,
            &|_| 1e-30,
            RTOL_BF16,
        );
    }
}

#[test]
fn argmax_picks_first_maximum_and_logits_at_gathers() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(7);
    // 70,001 columns: 35 blocks per row, so ties and maxima cross block boundaries.
    let (b, v, c) = (3usize, 70001usize, 4usize);
    let mut logits = rng.vec(b * v, 10.0);
    // Ties: row 1's maximum appears twice in different blocks (the first must win), row 2 is
    // constant; row 0's maximum sits in the last, partial block.
    logits[v + 100] = 50.0;
    logits[v + 60000] = 50.0;
    logits[v - 1] = 60.0;
    for x in &mut logits[2 * v..3 * v] {
        *x = -1.0;
    }
    let want: Vec<i32> = (0..b)
        .map(|r| cpu_ops::argmax(&logits[r * v..(r + 1) * v]) as i32)
        .collect();
    assert_eq!(want[1], 100);
    let s = &g.stream;
    let lb = s.clone_htod(&logits).unwrap();
    let mut ids = s.alloc_zeros::<i32>(b).unwrap();
    k::argmax(&g, &mut ids.as_view_mut(), &lb.as_view(), b, v, None).unwrap();
    assert_eq!(s.clone_dtoh(&ids).unwrap(), want);

    let cand: Vec<i32> = vec![0, 5002, 17, -1, 3, 3, 4999, 100000, 1, 2, 3, 4];
    assert_eq!(want[0], v as i32 - 1);
    let cb = s.clone_htod(&cand).unwrap();
    let mut out = s.alloc_zeros::<f32>(b * c).unwrap();
    k::logits_at(
        &g,
        &mut out.as_view_mut(),
        &lb.as_view(),
        &cb.as_view(),
        b,
        c,
        v,
    )
    .unwrap();
    let want: Vec<f32> = (0..b * c)
        .map(|e| {
            let id = cand[e];
            if id >= 0 && (id as usize) < v {
                logits[(e / c) * v + id as usize]
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    assert_eq!(s.clone_dtoh(&out).unwrap(), want);
}

/// `matmul_live` and `argmax` with a live row count on the device (the gate-first hybrid step):
/// rows below the count match the CPU, and rows the kernels may skip (every row of a 32-row gemv
/// group from the count on; gemm row tiles starting at or past it, 128 rows being the larger
/// tile) keep the NaN / −7 the buffer held.
#[test]
fn live_rows_are_computed_and_rows_past_them_left_alone() {
    let Some(g) = gpu() else { return };
    let s = &g.stream;
    let (m, kd) = (96usize, 8 * 24usize);
    for (i, &(n, live)) in [
        (20usize, 7usize),
        (33, 32), // a one-row last group (32 rows per gemv launch by default), not needed
        (33, 33), // ... and needed
        (100, 40),
        (100, 0),
        (300, 70),
        (300, 300),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Rng(90 + i as u64);
        let (x, w) = (rng.vec(n * kd, 8.0), rng.vec(m * kd, 4.0));
        let mut want = vec![0f32; n * m];
        cpu_ops::matmul(&mut want, &x, &w, None, n, kd, m, &mut Vec::new());
        let (xb, wb) = (
            s.clone_htod(&to_bf(&x)).unwrap(),
            s.clone_htod(&to_bf(&w)).unwrap(),
        );
        let lb = s.clone_htod(&[live as i32]).unwrap();
        let mut out = s.clone_htod(&vec![f32::NAN; n * m]).unwrap();
        k::matmul_live(
            &g,
            &mut out.as_view_mut(),
            &xb.as_view(),
            &wb.as_view(),
            (n, m, kd),
            Some(&lb.as_view()),
        )
        .unwrap();
        let got = s.clone_dtoh(&out).unwrap();
        let abs: Vec<f32> = (0..live * m)
            .map(|e| {
                let (r, c) = (e / m, e % m);
                (0..kd).map(|j| (x[r * kd + j] * w[c * kd + j]).abs()).sum()
            })
            .collect();
        let sk = (kd as f32).sqrt();
        compare(
            &format!("matmul_live N={n} live={live}"),
            &got[..live * m],
            &want[..live * m],
            &|e| 2.0 * 4.0 * sk * EPS32 * abs[e],
            0.0,
        );
        let skipped_from = if n < k::gemm_from() {
            live
        } else {
            live.div_ceil(128) * 128
        };
        for r in skipped_from.min(n)..n {
            assert!(
                got[r * m..(r + 1) * m].iter().all(|v| v.is_nan()),
                "matmul_live N={n} live={live}: row {r} was written"
            );
        }

        // argmax over the same rows as logits.
        let mut ids = s.clone_htod(&vec![-7i32; n]).unwrap();
        k::argmax(
            &g,
            &mut ids.as_view_mut(),
            &s.clone_htod(&want).unwrap().as_view(),
            n,
            m,
            Some(&lb.as_view()),
        )
        .unwrap();
        let ids = s.clone_dtoh(&ids).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            let expect = if r < live {
                cpu_ops::argmax(&want[r * m..(r + 1) * m]) as i32
            } else {
                -7
            };
            assert_eq!(id, expect, "argmax live={live}: row {r}");
        }
    }
}

/// The registers the driver reports for every kernel are those ptxas reported compiling it
/// (`--ptxas-options=-v`: same source, architecture and options as the runtime's cubins, and
/// a kernel's registers do not depend on the log). On the emulated driver this checks its
/// reading of the cubin, from which it refuses the launches the hardware cannot run (too many
/// registers for the block, more threads than `__launch_bounds__`); on a GPU, that the cubin
/// loaded is the one NVRTC makes. A module built from nvcc's PTX (compiled again by the driver)
/// is left out.
#[test]
fn kernel_registers_are_those_ptxas_reported() {
    use thinksteer::cuda::sources;
    let Some(g) = gpu() else { return };
    if let Err(why) = sources::nvrtc_available() {
        println!("skipped: {why}");
        return;
    }
    let (major, minor) = g.compute_capability;
    let cc = (major * 10 + minor) as u32;
    let arch = sources::nvrtc_arch(cc);
    let mut checked = 0;
    for (stem, names) in sources::MODULES {
        if sources::embedded_ptx(stem, cc).is_some() {
            println!("{stem}: loaded from nvcc's PTX, left out");
            continue;
        }
        let src = sources::source(stem).unwrap();
        let c = sources::compile(&format!("{stem}.cu"), &src, &arch, &["--ptxas-options=-v"])
            .unwrap_or_else(|e| panic!("{e}"));
        for name in names.iter() {
            // ptxas: "Compiling entry function 'NAME' for 'sm_90a'" ... "Used N registers, ...".
            let from = c
                .log
                .find(&format!("entry function '{name}'"))
                .unwrap_or_else(|| panic!("{stem}.cu: no ptxas entry for {name}"));
            let used = c.log[from..]
                .split("Used ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse::<i32>().ok())
                .unwrap_or_else(|| panic!("{stem}.cu: no register count for {name}"));
            assert_eq!(
                g.kernel_registers(name).unwrap(),
                used,
                "{name}: registers the driver reports vs ptxas's"
            );
            checked += 1;
        }
    }
    println!("{checked} kernels' register counts match ptxas's");
}

/// Decode attention refuses a head dimension its kernels lack (they would end without their
/// PDL wait, unordering the launches after them), before launching.
#[test]
fn attention_decode_refuses_a_head_dim_its_kernels_lack() {
    let Some(g) = gpu() else { return };
    let s = &g.stream;
    let sh = AttnShape {
        h: 2,
        hkv: 1,
        dh: 32,
        slots: 1,
        s: 8,
    };
    let z16 = |n: usize| s.alloc_zeros::<bf16>(n).unwrap();
    let (q, ks, vs) = (z16(sh.h * sh.dh), z16(sh.hkv * sh.dh), z16(sh.hkv * sh.dh));
    let (mut kc, mut vc) = (z16(sh.s * sh.hkv * sh.dh), z16(sh.s * sh.hkv * sh.dh));
    let ints = s.clone_htod(&[0i32]).unwrap();
    let input = k::DecodeIn::Rotated {
        q: &q.as_view(),
        k_self: &ks.as_view(),
        v_self: &vs.as_view(),
    };
    let caches = (&mut kc, &mut vc);
    let err = try_decode(
        &g,
        input,
        caches,
        (&ints, &ints, None),
        1,
        sh,
        DecodeAttn::PerHead,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("head dim must be 64 or 128, found 32"),
        "{err}"
    );
}

/// On the emulated driver only (on a card, an illegal address is a sticky error that ends the
/// process's context): a kernel given another device's memory is refused, so the two-device
/// hybrid test (`cuda_hybrid`) would catch a buffer handed from one engine to the other.
#[test]
fn the_emulated_driver_refuses_another_devices_memory() {
    let Some(g0) = gpu() else { return };
    if !g0.ctx.name().unwrap().starts_with("emulated") {
        println!("skipped: the emulated driver's own check (a real card would fault)");
        return;
    }
    let g1 = Gpu::new(1).unwrap();
    let (t, f) = (3, 5);
    let up1 = g1.stream.clone_htod(&vec![0.5f32; t * 2 * f]).unwrap();
    let mut out0: CudaSlice<bf16> = g0.stream.alloc_zeros(t * f).unwrap();
    let mut out1: CudaSlice<bf16> = g1.stream.alloc_zeros(t * f).unwrap();
    // Device 1's kernel, device 1's input, an output on device 0.
    let e = k::silu_mul(&g1, &mut out0.slice_mut(..), &up1.slice(..), t, f, None).unwrap_err();
    assert!(e.to_string().contains("ILLEGAL_ADDRESS"), "{e}");
    // All on device 1: runs.
    k::silu_mul(&g1, &mut out1.slice_mut(..), &up1.slice(..), t, f, None).unwrap();
    g1.sync().unwrap();
    assert_eq!(
        g1.stream.clone_dtoh(&out1).unwrap()[0],
        bf16::from_f32(0.5 / (1.0 + (-0.5f32).exp()) * 0.5)
    );
    let e = Gpu::new(2).err().expect("a third device");
    assert!(e.to_string().contains("expected an ordinal below 2"), "{e}");
}
