//! Safe wrappers of the steering-vector gradient's kernels (kernels/grad.cu), re-exported by
//! `kernels`: f32 activations, bf16 weights; products on tensor cores (`vg_mm`), RMSNorm, RoPE,
//! tiled attention, SiLU·mul and the cross-entropy, forward and backward.

use super::kernels::{cfg, check, int, is_aligned16, NULL};
use super::launch::{Arg, Launch};
use super::Gpu;
use crate::{Error, Result};
use cudarc::driver::{CudaView, CudaViewMut};
use half::bf16;

/// Elements a strided matrix of `rows` rows of `cols` columns, row stride `ld`, spans.
fn span(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

fn at_least(kernel: &str, tensor: &str, len: usize, want: usize, shape: &str) -> Result<()> {
    if len < want {
        return Err(Error::Input(format!(
            "{kernel}: {tensor} should span {shape} = {want} elements, found {len}"
        )));
    }
    Ok(())
}

fn grid_stride(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 1 << 16) as u32
}

/// The shape of one `vg_mm`: out[t, n] (+)= Σ_k x[t, k]·B[k, n] (+ bias[n]) for t < T, n < N,
/// with row strides ldx, ldw, ldo; `trans_w` false: B[k, n] = W[n·ldw + k] (x·Wᵀ, W [N, K]);
/// true: B[k, n] = W[k·ldw + n] (x·W, W [K, N]).
#[derive(Clone, Copy, Debug)]
pub struct Mm {
    pub t: usize,
    pub n: usize,
    pub k: usize,
    pub ldx: usize,
    pub ldw: usize,
    pub ldo: usize,
    pub trans_w: bool,
    pub accumulate: bool,
}

impl Mm {
    /// x [T, K] · Wᵀ with W [N, K], all dense.
    pub fn nt(t: usize, n: usize, k: usize) -> Mm {
        Mm {
            t,
            n,
            k,
            ldx: k,
            ldw: k,
            ldo: n,
            trans_w: false,
            accumulate: false,
        }
    }
    /// x [T, K] · W with W [K, N], all dense.
    pub fn nn(t: usize, n: usize, k: usize) -> Mm {
        Mm {
            ldw: n,
            trans_w: true,
            ..Mm::nt(t, n, k)
        }
    }
    pub fn acc(self) -> Mm {
        Mm {
            accumulate: true,
            ..self
        }
    }
}

/// Which kernel a [`vg_mm`] ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmPath {
    /// vg_mm_f32: f32 FMA tiles (any shape, stride and alignment).
    F32,
    /// vg_mm_tc_f32: tensor cores on a hi/lo bf16 split of x, K split `splits` ways.
    TensorCore { splits: usize },
}

/// f32 × bf16 matrix product (both orientations, optional accumulate); see [`Mm`].
/// out f32, x f32, w bf16, bias f32 [N]. On tensor cores (vg_mm_tc_f32) when the shape allows
/// (K % 8 == 0, ldx % 4 == 0, ldw % 8 == 0, x and W 16-byte aligned, N % 8 == 0 for x·W) and
/// THINKSTEER_VG_TC is not 0, else on f32 FMA tiles. `part` is scratch for split-K partial
/// sums: with fewer output tiles than two waves of SMs, K is split over up to
/// part.len() / (T·N) blocks per tile. Returns the kernel that ran.
pub fn vg_mm(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, bf16>,
    bias: Option<&CudaView<'_, f32>>,
    m: Mm,
    part: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<MmPath> {
    const K: &str = "vg_mm_f32";
    at_least(K, "out", out.len(), span(m.t, m.n, m.ldo), "[T, N] at ldo")?;
    at_least(K, "x", x.len(), span(m.t, m.k, m.ldx), "[T, K] at ldx")?;
    let wspan = if m.trans_w {
        span(m.k, m.n, m.ldw)
    } else {
        span(m.n, m.k, m.ldw)
    };
    at_least(K, "w", w.len(), wspan, "the weight at ldw")?;
    if let Some(b) = bias {
        check(K, "bias", b.len(), m.n, "[N]")?;
    }
    if m.t == 0 || m.n == 0 {
        return Ok(MmPath::F32);
    }
    let ints = [m.t, m.n, m.k, m.ldx, m.ldw, m.ldo]
        .iter()
        .zip(["T", "N", "K", "ldx", "ldw", "ldo"])
        .map(|(&v, name)| int(K, name, v))
        .collect::<Result<Vec<i32>>>()?;
    let (tr, ac) = (i32::from(m.trans_w), i32::from(m.accumulate));
    let tc_ok = m.k.is_multiple_of(8)
        && m.ldx.is_multiple_of(4)
        && m.ldw.is_multiple_of(8)
        && (!m.trans_w || m.n.is_multiple_of(8))
        && is_aligned16(gpu, x)
        && is_aligned16(gpu, w)
        && std::env::var("THINKSTEER_VG_TC").map_or(true, |v| v != "0");
    if tc_ok {
        return vg_mm_tc(gpu, out, x, w, bias, m, part, &ints, tr, ac);
    }
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(out).arg(x).arg(w);
    match bias {
        Some(b) => l.arg(b),
        None => l.arg(&NULL),
    };
    for v in &ints {
        l.arg(v);
    }
    l.arg(&tr).arg(&ac);
    let grid = (m.n.div_ceil(64) as u32, m.t.div_ceil(64) as u32, 1);
    if grid.1 > 65535 {
        return Err(Error::Input(format!(
            "{K}: T = {} needs more than 65535 row blocks",
            m.t
        )));
    }
    // SAFETY: argument order and types match vg_mm_f32; every buffer spans what the kernel
    // indexes at these strides (checked above); edge tiles are masked in the kernel.
    gpu.launched(K, unsafe { l.launch(cfg(grid, 256, 0)) })?;
    Ok(MmPath::F32)
}

/// The tensor-core branch of [`vg_mm`] (shapes, lengths and alignment checked there).
#[allow(clippy::too_many_arguments)]
fn vg_mm_tc(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, bf16>,
    bias: Option<&CudaView<'_, f32>>,
    m: Mm,
    part: Option<&mut CudaViewMut<'_, f32>>,
    ints: &[i32],
    tr: i32,
    ac: i32,
) -> Result<MmPath> {
    const K: &str = "vg_mm_tc_f32";
    let tiles = m.n.div_ceil(128) * m.t.div_ceil(64);
    if m.t.div_ceil(64) > 65535 {
        return Err(Error::Input(format!(
            "{K}: T = {} needs more than 65535 row blocks",
            m.t
        )));
    }
    let nk = m.k.div_ceil(32);
    // Split K when the tiles fill less than two waves, keeping ≥ 4 k-steps per block and the
    // partial sums within `part`.
    let cap = part.as_ref().map_or(1, |p| p.len() / (m.t * m.n));
    let want = (2 * gpu.sms).div_ceil(tiles);
    let splits = want.min(nk / 4).min(cap).clamp(1, 64);
    let per = nk.div_ceil(splits).max(1);
    let splits = nk.div_ceil(per).max(1);
    let per_i = int(K, "k-steps per split", per)?;
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    let grid = (
        m.n.div_ceil(128) as u32,
        m.t.div_ceil(64) as u32,
        splits as u32,
    );
    match part {
        Some(p) if splits > 1 => {
            l.arg(out).arg(p).arg(x).arg(w);
            match bias {
                Some(b) => l.arg(b),
                None => l.arg(&NULL),
            };
            for v in ints {
                l.arg(v);
            }
            l.arg(&tr).arg(&ac).arg(&per_i);
            // SAFETY: argument order and types match vg_mm_tc_f32; out, x and W span their
            // strided shapes (checked in vg_mm), part holds splits·T·N floats (splits ≤ cap);
            // x and W are 16-byte aligned with K, ldx, ldw (and N for x·W) multiples of the
            // vector widths the kernel loads.
            gpu.launched(K, unsafe { l.launch(cfg(grid, 128, 0)) })?;
            let (t, n, ldo) = (ints[0], ints[1], ints[5]);
            reduce_splits(gpu, out, p, bias, (t, n, ldo), splits, ac != 0, None)?;
            Ok(MmPath::TensorCore { splits })
        }
        _ => {
            let grid = (grid.0, grid.1, 1);
            l.arg(out).arg(&NULL).arg(x).arg(w);
            match bias {
                Some(b) => l.arg(b),
                None => l.arg(&NULL),
            };
            for v in ints {
                l.arg(v);
            }
            let per_all = int(K, "k-steps", nk.max(1))?;
            l.arg(&tr).arg(&ac).arg(&per_all);
            // SAFETY: as above, with one split: the kernel writes out directly and never reads
            // the null part.
            gpu.launched(K, unsafe { l.launch(cfg(grid, 128, 0)) })?;
            Ok(MmPath::TensorCore { splits: 1 })
        }
    }
}

/// out[t, n] (+)= Σ_z part[z, t, n] (+ bias[n]) in z order (vg_mm_reduce_f32): the sum of the
/// partial products of a split-K launch. part f32 [splits, T, N] (the caller's kernel just
/// wrote them), out [T, N] at row stride ldo; with `live`, rows t < live[0] only.
#[allow(clippy::too_many_arguments)]
pub(super) fn reduce_splits<O: Arg>(
    gpu: &Gpu,
    out: &O,
    part: &impl Arg,
    bias: Option<&CudaView<'_, f32>>,
    (t, n, ldo): (i32, i32, i32),
    splits: usize,
    accumulate: bool,
    live: Option<&CudaView<'_, i32>>,
) -> Result<()> {
    const R: &str = "vg_mm_reduce_f32";
    let (splits_i, ac) = (int(R, "splits", splits)?, accumulate as i32);
    let f = gpu.func(R)?;
    let mut l = Launch::new(gpu, f);
    l.arg(out).arg(part).arg(&bias);
    l.arg(&t)
        .arg(&n)
        .arg(&ldo)
        .arg(&splits_i)
        .arg(&ac)
        .arg(&live);
    // SAFETY: argument order and types match vg_mm_reduce_f32; the callers pass part holding
    // splits·T·N floats and out spanning [T, N] at ldo (checked where they were written); live
    // is only read.
    gpu.launched(R, unsafe {
        l.launch(cfg((grid_stride(t as usize * n as usize), 1, 1), 256, 0))
    })
}

/// y f32 [T, D] = rmsnorm(x f32 [T, D]) with weight w bf16 [D]; r f32 [T] = 1/rms.
pub fn vg_rmsnorm_fwd(
    gpu: &Gpu,
    y: &mut CudaViewMut<'_, f32>,
    r: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, bf16>,
    t: usize,
    eps: f32,
) -> Result<()> {
    const K: &str = "vg_rmsnorm_fwd_f32";
    let d = w.len();
    check(K, "y", y.len(), t * d, "[T, D]")?;
    check(K, "r", r.len(), t, "[T]")?;
    check(K, "x", x.len(), t * d, "[T, D]")?;
    if t == 0 {
        return Ok(());
    }
    let di = int(K, "D", d)?;
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(y).arg(r).arg(x).arg(w).arg(&di).arg(&eps);
    // SAFETY: argument order and types match vg_rmsnorm_fwd_f32; lengths checked above.
    gpu.launched(K, unsafe { l.launch(cfg((t as u32, 1, 1), 256, 0)) })
}

/// dx f32 [T, D] += the input gradient of rmsnorm given dy, x f32 [T, D], r f32 [T], w bf16 [D].
pub fn vg_rmsnorm_bwd(
    gpu: &Gpu,
    dx: &mut CudaViewMut<'_, f32>,
    dy: &CudaView<'_, f32>,
    x: &CudaView<'_, f32>,
    r: &CudaView<'_, f32>,
    w: &CudaView<'_, bf16>,
    t: usize,
) -> Result<()> {
    const K: &str = "vg_rmsnorm_bwd_f32";
    let d = w.len();
    check(K, "dx", dx.len(), t * d, "[T, D]")?;
    check(K, "dy", dy.len(), t * d, "[T, D]")?;
    check(K, "x", x.len(), t * d, "[T, D]")?;
    check(K, "r", r.len(), t, "[T]")?;
    if t == 0 {
        return Ok(());
    }
    let di = int(K, "D", d)?;
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(dx).arg(dy).arg(x).arg(r).arg(w).arg(&di);
    // SAFETY: argument order and types match vg_rmsnorm_bwd_f32; lengths checked above.
    gpu.launched(K, unsafe { l.launch(cfg((t as u32, 1, 1), 256, 0)) })
}

/// RoPE in place on the first `heads`·Dh columns of x f32 [T, ld] (row t at position pos0 + t),
/// Dh = 2·inv_freq.len(); `inverse` rotates back (the backward).
#[allow(clippy::too_many_arguments)]
pub fn vg_rope(
    gpu: &Gpu,
    x: &mut CudaViewMut<'_, f32>,
    inv_freq: &CudaView<'_, f32>,
    t: usize,
    heads: usize,
    ld: usize,
    pos0: usize,
    inverse: bool,
) -> Result<()> {
    const K: &str = "vg_rope_f32";
    let half = inv_freq.len();
    at_least(
        K,
        "x",
        x.len(),
        span(t, heads * 2 * half, ld),
        "[T, heads·Dh] at ld",
    )?;
    if t * heads * half == 0 {
        return Ok(());
    }
    let (ti, hi, fi, li) = (
        int(K, "T", t)?,
        int(K, "heads", heads)?,
        int(K, "Dh/2", half)?,
        int(K, "ld", ld)?,
    );
    let (pi, inv) = (int(K, "pos0 + T", pos0 + t)? - ti, i32::from(inverse));
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(x)
        .arg(inv_freq)
        .arg(&ti)
        .arg(&hi)
        .arg(&fi)
        .arg(&li)
        .arg(&pi)
        .arg(&inv);
    let blocks = grid_stride(t * heads * half);
    // SAFETY: argument order and types match vg_rope_f32; x spans T rows at ld (checked above).
    gpu.launched(K, unsafe { l.launch(cfg((blocks, 1, 1), 256, 0)) })
}

/// Dims of the gradient's attention: Ta active rows after S0 frozen ones, H/Hkv heads of Dh;
/// `ld` is the row stride of the q/k/v column blocks (the qkv buffer's width).
#[derive(Clone, Copy, Debug)]
pub struct VgAttn {
    pub ta: usize,
    pub s0: usize,
    pub h: usize,
    pub hkv: usize,
    pub dh: usize,
    pub ld: usize,
}

impl VgAttn {
    fn check(
        &self,
        kernel: &str,
        qkv: &CudaView<'_, f32>,
        pre: [&CudaView<'_, f32>; 2],
    ) -> Result<()> {
        let VgAttn {
            ta,
            s0,
            h,
            hkv,
            dh,
            ld,
        } = *self;
        if hkv == 0 || h % hkv != 0 || dh == 0 || dh > 256 {
            return Err(Error::Input(format!(
                "{kernel}: expected H a multiple of Hkv > 0 and 0 < Dh ≤ 256, found H = {h}, Hkv = {hkv}, Dh = {dh}"
            )));
        }
        at_least(
            kernel,
            "qkv",
            qkv.len(),
            span(ta, (h + 2 * hkv) * dh, ld),
            "[Ta, (H+2Hkv)·Dh] at ld",
        )?;
        for (p, name) in pre.iter().zip(["k_pre", "v_pre"]) {
            check(kernel, name, p.len(), s0 * hkv * dh, "[S0, Hkv·Dh]")?;
        }
        Ok(())
    }
    fn ints(&self, kernel: &str) -> Result<[i32; 6]> {
        Ok([
            int(kernel, "Ta", self.ta)?,
            int(kernel, "H", self.h)?,
            int(kernel, "Hkv", self.hkv)?,
            int(kernel, "Dh", self.dh)?,
            int(kernel, "S0", self.s0)?,
            int(kernel, "ld", self.ld)?,
        ])
    }
    /// Elements of one [Ta·H, S0 + Ta] scratch.
    pub fn scratch_len(&self) -> usize {
        self.ta * self.h * (self.s0 + self.ta)
    }
    fn scale(&self) -> f32 {
        // Formed in f32 as the CPU reference forms it.
        1.0 / (self.dh as f32).sqrt()
    }
}

/// Causal attention of the active rows: out f32 [Ta, H·Dh], lse f32 [Ta, H], from qkv f32
/// [Ta, ld] (q | k | v column blocks, post-RoPE) and the frozen k_pre, v_pre f32 [S0, Hkv·Dh];
/// sc f32 scratch [Ta·H, S0 + Ta] ends holding the probabilities.
#[allow(clippy::too_many_arguments)]
pub fn vg_attn_fwd(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    lse: &mut CudaViewMut<'_, f32>,
    sc: &mut CudaViewMut<'_, f32>,
    qkv: &CudaView<'_, f32>,
    k_pre: &CudaView<'_, f32>,
    v_pre: &CudaView<'_, f32>,
    a: VgAttn,
) -> Result<()> {
    const K: &str = "vg_attn_fwd";
    a.check(K, qkv, [k_pre, v_pre])?;
    check(K, "out", out.len(), a.ta * a.h * a.dh, "[Ta, H·Dh]")?;
    check(K, "lse", lse.len(), a.ta * a.h, "[Ta, H]")?;
    at_least(K, "sc", sc.len(), a.scratch_len(), "[Ta·H, S0 + Ta]")?;
    if a.ta == 0 {
        return Ok(());
    }
    let (qd, kvd) = (a.h * a.dh, a.hkv * a.dh);
    let (k, v) = (qkv.slice(qd..), qkv.slice(qd + kvd..));
    // sc = scale·q·kᵀ; sc = softmax rows, lse; out = sc·v
    vg_attn_scores(gpu, sc, qkv, a.ld, k_pre, &k, a, a.scale())?;
    vg_attn_rows(gpu, "vg_attn_softmax_f32", sc, lse, None, a)?;
    vg_attn_apply(gpu, out, a.h * a.dh, sc, v_pre, &v, a, 1.0)
}

/// Attention backward: dqkv f32 [Ta, ld] gets dq, dk, dv in its q | k | v column blocks (the
/// prefix is constant) from dout f32 [Ta, H·Dh], the saved lse and qkv; p_s, ds_s f32 scratch
/// [Ta·H, S0 + Ta] each.
#[allow(clippy::too_many_arguments)]
pub fn vg_attn_bwd(
    gpu: &Gpu,
    dqkv: &mut CudaViewMut<'_, f32>,
    p_s: &mut CudaViewMut<'_, f32>,
    ds_s: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    lse: &CudaView<'_, f32>,
    qkv: &CudaView<'_, f32>,
    k_pre: &CudaView<'_, f32>,
    v_pre: &CudaView<'_, f32>,
    a: VgAttn,
) -> Result<()> {
    const K: &str = "vg_attn_bwd";
    a.check(K, qkv, [k_pre, v_pre])?;
    at_least(
        K,
        "dqkv",
        dqkv.len(),
        span(a.ta, (a.h + 2 * a.hkv) * a.dh, a.ld),
        "[Ta, (H+2Hkv)·Dh] at ld",
    )?;
    check(K, "dout", dout.len(), a.ta * a.h * a.dh, "[Ta, H·Dh]")?;
    check(K, "lse", lse.len(), a.ta * a.h, "[Ta, H]")?;
    at_least(K, "p_s", p_s.len(), a.scratch_len(), "[Ta·H, S0 + Ta]")?;
    at_least(K, "ds_s", ds_s.len(), a.scratch_len(), "[Ta·H, S0 + Ta]")?;
    if a.ta == 0 {
        return Ok(());
    }
    let (qd, kvd) = (a.h * a.dh, a.hkv * a.dh);
    let (k, v) = (qkv.slice(qd..), qkv.slice(qd + kvd..));
    let hd = a.h * a.dh;
    // p = scale·q·kᵀ, ds = dout·vᵀ; p = exp(p − lse), ds = p·(ds − Σ p·ds)
    vg_attn_scores(gpu, p_s, qkv, a.ld, k_pre, &k, a, a.scale())?;
    vg_attn_scores(gpu, ds_s, dout, hd, v_pre, &v, a, 1.0)?;
    vg_attn_rows(gpu, "vg_attn_dsoftmax_f32", p_s, ds_s, Some(lse), a)?;
    // dq = scale·ds·k; dk = scale·dsᵀ·q; dv = pᵀ·dout
    vg_attn_apply(gpu, dqkv, a.ld, ds_s, k_pre, &k, a, a.scale())?;
    let (p_v, ds_v) = (p_s.slice(..), ds_s.slice(..));
    vg_attn_kv_grad(
        gpu,
        &mut dqkv.slice_mut(qd..),
        &ds_v,
        qkv,
        a.ld,
        a,
        a.scale(),
    )?;
    vg_attn_kv_grad(gpu, &mut dqkv.slice_mut(qd + kvd..), &p_v, dout, hd, a, 1.0)
}

/// sc[(i·H + h), j] = alpha·x[i, h]·y(j) for j ≤ S0 + i (vg_attn_scores_f32); x row stride ldx.
#[allow(clippy::too_many_arguments)]
fn vg_attn_scores(
    gpu: &Gpu,
    sc: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
    ldx: usize,
    y_pre: &CudaView<'_, f32>,
    y: &CudaView<'_, f32>,
    a: VgAttn,
    alpha: f32,
) -> Result<()> {
    const K: &str = "vg_attn_scores_f32";
    at_least(
        K,
        "x",
        x.len(),
        span(a.ta, a.h * a.dh, ldx),
        "[Ta, H·Dh] at ldx",
    )?;
    let ints = a.ints(K)?;
    let ldx_i = int(K, "ldx", ldx)?;
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(sc).arg(x).arg(y_pre).arg(y);
    for i in &ints {
        l.arg(i);
    }
    l.arg(&ldx_i).arg(&alpha);
    let grid = (
        (a.s0 + a.ta).div_ceil(64) as u32,
        (a.ta * a.h / a.hkv).div_ceil(64) as u32,
        a.hkv as u32,
    );
    // SAFETY: argument order and types match vg_attn_scores_f32; sc spans [Ta·H, S0 + Ta],
    // x its Ta rows at ldx, y_pre the S0 prefix rows and y (a column block of qkv) Ta rows at
    // ld (checked by the callers through VgAttn::check and above).
    gpu.launched(K, unsafe { l.launch(cfg(grid, 256, 0)) })
}

/// A per-row pass over the scores (grid Ta·H): vg_attn_softmax_f32 (sc, lse out) or
/// vg_attn_dsoftmax_f32 (sc, ds, lse in).
fn vg_attn_rows(
    gpu: &Gpu,
    kernel: &'static str,
    sc: &mut CudaViewMut<'_, f32>,
    second: &mut CudaViewMut<'_, f32>,
    lse: Option<&CudaView<'_, f32>>,
    a: VgAttn,
) -> Result<()> {
    let ints = a.ints(kernel)?;
    let f = gpu.func(kernel)?;
    let mut l = Launch::new(gpu, f);
    l.arg(sc).arg(second);
    if let Some(lse) = lse {
        l.arg(lse);
    }
    l.arg(&ints[0]).arg(&ints[1]).arg(&ints[4]);
    // SAFETY: argument order and types match the kernel (softmax: sc, lse, Ta, H, S0;
    // dsoftmax: sc, ds, lse, Ta, H, S0); sc and ds span [Ta·H, S0 + Ta], lse [Ta·H] (checked
    // by the callers).
    gpu.launched(kernel, unsafe {
        l.launch(cfg(((a.ta * a.h) as u32, 1, 1), 128, 0))
    })
}

/// out[i, h] (row stride ldo) = alpha·Σ_{j ≤ S0 + i} w[(i·H + h), j]·y(j) (vg_attn_apply_f32).
#[allow(clippy::too_many_arguments)]
fn vg_attn_apply(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    ldo: usize,
    w: &CudaViewMut<'_, f32>,
    y_pre: &CudaView<'_, f32>,
    y: &CudaView<'_, f32>,
    a: VgAttn,
    alpha: f32,
) -> Result<()> {
    const K: &str = "vg_attn_apply_f32";
    at_least(
        K,
        "out",
        out.len(),
        span(a.ta, a.h * a.dh, ldo),
        "[Ta, H·Dh] at ldo",
    )?;
    let ints = a.ints(K)?;
    let ldo_i = int(K, "ldo", ldo)?;
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(out).arg(w).arg(y_pre).arg(y);
    for i in &ints {
        l.arg(i);
    }
    l.arg(&ldo_i).arg(&alpha);
    let grid = (
        a.dh.div_ceil(64) as u32,
        (a.ta * a.h / a.hkv).div_ceil(64) as u32,
        a.hkv as u32,
    );
    // SAFETY: argument order and types match vg_attn_apply_f32; out spans Ta rows of H·Dh at
    // ldo (checked above), w [Ta·H, S0 + Ta], y_pre and y as in vg_attn_scores.
    gpu.launched(K, unsafe { l.launch(cfg(grid, 256, 0)) })
}

/// dkv[j, g] (row stride ld) = alpha·Σ_{i ≥ j, h ∈ g} w[(i·H + h), S0 + j]·x[i, h] for the active
/// keys j < Ta (vg_attn_kv_grad_f32); x row stride ldx.
fn vg_attn_kv_grad(
    gpu: &Gpu,
    dkv: &mut CudaViewMut<'_, f32>,
    w: &CudaView<'_, f32>,
    x: &CudaView<'_, f32>,
    ldx: usize,
    a: VgAttn,
    alpha: f32,
) -> Result<()> {
    const K: &str = "vg_attn_kv_grad_f32";
    at_least(
        K,
        "dkv",
        dkv.len(),
        span(a.ta, a.hkv * a.dh, a.ld),
        "[Ta, Hkv·Dh] at ld",
    )?;
    at_least(
        K,
        "x",
        x.len(),
        span(a.ta, a.h * a.dh, ldx),
        "[Ta, H·Dh] at ldx",
    )?;
    let ints = a.ints(K)?;
    let ldx_i = int(K, "ldx", ldx)?;
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(dkv).arg(w).arg(x);
    for i in &ints[..5] {
        l.arg(i);
    }
    l.arg(&ldx_i).arg(&ints[5]).arg(&alpha);
    let grid = (
        a.dh.div_ceil(64) as u32,
        a.ta.div_ceil(64) as u32,
        a.hkv as u32,
    );
    // SAFETY: argument order and types match vg_attn_kv_grad_f32 (dkv, w, x, Ta, H, Hkv, Dh,
    // S0, ldx, ldd = ld, alpha); dkv spans Ta rows of Hkv·Dh at ld and x Ta rows at ldx
    // (checked above), w [Ta·H, S0 + Ta].
    gpu.launched(K, unsafe { l.launch(cfg(grid, 256, 0)) })
}

/// act f32 [T, F] = silu(gate)·up from gu f32 [T, 2F] (gate | up).
pub fn vg_silu_mul_fwd(
    gpu: &Gpu,
    act: &mut CudaViewMut<'_, f32>,
    gu: &CudaView<'_, f32>,
    t: usize,
    f: usize,
) -> Result<()> {
    const K: &str = "vg_silu_mul_fwd_f32";
    check(K, "act", act.len(), t * f, "[T, F]")?;
    check(K, "gu", gu.len(), t * 2 * f, "[T, 2F]")?;
    if t * f == 0 {
        return Ok(());
    }
    let (ti, fi) = (int(K, "T", t)?, int(K, "F", f)?);
    let func = gpu.func(K)?;
    let mut l = Launch::new(gpu, func);
    l.arg(act).arg(gu).arg(&ti).arg(&fi);
    // SAFETY: argument order and types match vg_silu_mul_fwd_f32; lengths checked (grid-stride).
    gpu.launched(K, unsafe {
        l.launch(cfg((grid_stride(t * f), 1, 1), 256, 0))
    })
}

/// dgu f32 [T, 2F] (d gate | d up) from dact f32 [T, F] and the saved gu f32 [T, 2F].
pub fn vg_silu_mul_bwd(
    gpu: &Gpu,
    dgu: &mut CudaViewMut<'_, f32>,
    dact: &CudaView<'_, f32>,
    gu: &CudaView<'_, f32>,
    t: usize,
    f: usize,
) -> Result<()> {
    const K: &str = "vg_silu_mul_bwd_f32";
    check(K, "dgu", dgu.len(), t * 2 * f, "[T, 2F]")?;
    check(K, "dact", dact.len(), t * f, "[T, F]")?;
    check(K, "gu", gu.len(), t * 2 * f, "[T, 2F]")?;
    if t * f == 0 {
        return Ok(());
    }
    let (ti, fi) = (int(K, "T", t)?, int(K, "F", f)?);
    let func = gpu.func(K)?;
    let mut l = Launch::new(gpu, func);
    l.arg(dgu).arg(dact).arg(gu).arg(&ti).arg(&fi);
    let grid = (f.div_ceil(256).min(64) as u32, t.min(65535) as u32, 1);
    // SAFETY: argument order and types match vg_silu_mul_bwd_f32; lengths checked (grid-stride
    // in both dimensions).
    gpu.launched(K, unsafe { l.launch(cfg(grid, 256, 0)) })
}

/// Per row r of z f32 [R, V]: loss[r] = logsumexp(c·z[r]) − c·z[r, y[r]]; with `want_grad` z[r]
/// becomes c·(softmax(c·z[r]) − onehot(y[r])). y i32 [R]; a y outside 0..V gives a NaN loss.
pub fn vg_xent(
    gpu: &Gpu,
    z: &mut CudaViewMut<'_, f32>,
    loss: &mut CudaViewMut<'_, f32>,
    y: &CudaView<'_, i32>,
    v: usize,
    coldness: f32,
    want_grad: bool,
) -> Result<()> {
    const K: &str = "vg_xent_f32";
    let r = y.len();
    check(K, "z", z.len(), r * v, "[R, V]")?;
    check(K, "loss", loss.len(), r, "[R]")?;
    if r == 0 {
        return Ok(());
    }
    let (vi, g) = (int(K, "V", v)?, i32::from(want_grad));
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(z).arg(loss).arg(y).arg(&vi).arg(&coldness).arg(&g);
    // SAFETY: argument order and types match vg_xent_f32; lengths checked; the kernel reads
    // z[r, y] only for 0 ≤ y < V.
    gpu.launched(K, unsafe { l.launch(cfg((r as u32, 1, 1), 1024, 0)) })
}

/// Rows of D floats by index idx i32 [R] (indices outside the indexed matrix are skipped):
/// `scatter_add` false: dst [R, D] = src[idx]; true: dst[idx] += src [R, D] (idx distinct).
pub fn vg_rows(
    gpu: &Gpu,
    dst: &mut CudaViewMut<'_, f32>,
    src: &CudaView<'_, f32>,
    idx: &CudaView<'_, i32>,
    d: usize,
    scatter_add: bool,
) -> Result<()> {
    const K: &str = "vg_rows_f32";
    let r = idx.len();
    let (packed, name, indexed) = if scatter_add {
        (src.len(), "src", dst.len())
    } else {
        (dst.len(), "dst", src.len())
    };
    check(K, name, packed, r * d, "[R, D]")?;
    if r * d == 0 {
        return Ok(());
    }
    let (ri, di, s) = (int(K, "R", r)?, int(K, "D", d)?, i32::from(scatter_add));
    let rows = int(K, "indexed rows", indexed / d)?;
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(dst)
        .arg(src)
        .arg(idx)
        .arg(&ri)
        .arg(&di)
        .arg(&rows)
        .arg(&s);
    // SAFETY: argument order and types match vg_rows_f32; the packed side's length is checked
    // above and the kernel skips indices outside the indexed side's `rows`.
    gpu.launched(K, unsafe {
        l.launch(cfg((grid_stride(r * d), 1, 1), 256, 0))
    })
}

/// The steer rows idx i32 [R] of h f32 [*, D]: `add` true: h[idx] += v + extra (v, extra [D]);
/// false: v [D] = Σ_r h[idx[r]]. Indices outside h's rows are skipped.
pub fn vg_steer_rows(
    gpu: &Gpu,
    h: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
    extra: Option<&CudaView<'_, f32>>,
    idx: &CudaView<'_, i32>,
    d: usize,
    add: bool,
) -> Result<()> {
    const K: &str = "vg_steer_rows_f32";
    check(K, "v", v.len(), d, "[D]")?;
    if let Some(e) = extra {
        check(K, "extra", e.len(), d, "[D]")?;
    }
    if h.len() % d.max(1) != 0 {
        return Err(Error::Input(format!(
            "{K}: h should be whole rows of D = {d}, found {} elements",
            h.len()
        )));
    }
    if d == 0 {
        return Ok(());
    }
    let (ri, di, a) = (int(K, "R", idx.len())?, int(K, "D", d)?, i32::from(add));
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(h).arg(v);
    match extra {
        Some(e) => l.arg(e),
        None => l.arg(&NULL),
    };
    let rows = int(K, "h rows", h.len() / d)?;
    l.arg(idx).arg(&ri).arg(&di).arg(&rows).arg(&a);
    // SAFETY: argument order and types match vg_steer_rows_f32; v/extra lengths checked, the
    // kernel skips indices outside h's `rows`.
    gpu.launched(K, unsafe {
        l.launch(cfg((d.div_ceil(256) as u32, 1, 1), 256, 0))
    })
}
