//! Safe wrappers of the hybrid step's kernels (kernels/hybrid.cu), re-exported by `kernels`.
//! Base-model rows: [0, B) the problems, then B·C candidates. The single-pass step puts problem
//! b's candidate c at row B + b·C + c; the gate-first step (`hybrid_gate` …) runs the problems
//! first and then only the needing problems' candidates, compacted to rows [0, n·C) of a second
//! pass, with n·C counted on the device (`live`).

use super::kernels::{cfg, check, int};
use super::launch::Launch;
use super::Gpu;
use crate::{Error, Result};
use cudarc::driver::{CudaView, CudaViewMut};

/// Candidate rows of the hybrid step (kernels/hybrid.cu): r f32 [B + B·C, D] (rows ≥ B written),
/// idx i32 / coef f32 [B + B·C], category i32 [B], coefs f32 [C].
#[allow(clippy::too_many_arguments)]
pub fn hybrid_expand(
    gpu: &Gpu,
    r: &mut CudaViewMut<'_, f32>,
    idx: &mut CudaViewMut<'_, i32>,
    coef: &mut CudaViewMut<'_, f32>,
    category: &CudaView<'_, i32>,
    coefs: &CudaView<'_, f32>,
    b: usize,
    c: usize,
    d: usize,
) -> Result<()> {
    const K: &str = "hybrid_expand_f32";
    let rows = b + b * c;
    check(K, "r", r.len(), rows * d, "[B + B·C, D]")?;
    check(K, "idx", idx.len(), rows, "[B + B·C]")?;
    check(K, "coef", coef.len(), rows, "[B + B·C]")?;
    check(K, "category", category.len(), b, "[B]")?;
    check(K, "coefs", coefs.len(), c, "[C]")?;
    if b * c == 0 {
        return Ok(());
    }
    let (bi, ci, di) = (int(K, "B", b)?, int(K, "C", c)?, int(K, "D", d)?);
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(r)
        .arg(idx)
        .arg(coef)
        .arg(category)
        .arg(coefs)
        .arg(&bi)
        .arg(&ci)
        .arg(&di);
    // SAFETY: argument order and types match hybrid_expand_f32; lengths checked above.
    gpu.launched(K, unsafe { l.launch(cfg(((b * c) as u32, 1, 1), 256, 0)) })
}

/// The hybrid decision per problem: emit/steered/win i32 [B] from tok i32 [B + B·C] (greedy ids of
/// every base row), think_tok i32 [B] and think_logits f32 [B, V].
#[allow(clippy::too_many_arguments)]
pub fn hybrid_select(
    gpu: &Gpu,
    emit: &mut CudaViewMut<'_, i32>,
    steered: &mut CudaViewMut<'_, i32>,
    win: &mut CudaViewMut<'_, i32>,
    tok: &CudaView<'_, i32>,
    think_tok: &CudaView<'_, i32>,
    think_logits: &CudaView<'_, f32>,
    b: usize,
    c: usize,
    v: usize,
    gating: bool,
) -> Result<()> {
    const K: &str = "hybrid_select_i32";
    for (name, len) in [
        ("emit", emit.len()),
        ("steered", steered.len()),
        ("win", win.len()),
        ("think_tok", think_tok.len()),
    ] {
        check(K, name, len, b, "[B]")?;
    }
    check(K, "tok", tok.len(), b + b * c, "[B + B·C]")?;
    check(K, "think_logits", think_logits.len(), b * v, "[B, V]")?;
    if b == 0 {
        return Ok(());
    }
    if c == 0 {
        return Err(Error::Input(format!(
            "{K}: at least one coefficient is needed"
        )));
    }
    let (bi, ci, vi, gi) = (
        int(K, "B", b)?,
        int(K, "C", c)?,
        int(K, "V", v)?,
        gating as i32,
    );
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(emit)
        .arg(steered)
        .arg(win)
        .arg(tok)
        .arg(think_tok)
        .arg(think_logits);
    l.arg(&bi).arg(&ci).arg(&vi).arg(&gi);
    // SAFETY: argument order and types match hybrid_select_i32; lengths checked above; candidate
    // ids are range-checked in the kernel.
    gpu.launched(K, unsafe {
        l.launch(cfg((b.div_ceil(128) as u32, 1, 1), 128, 0))
    })
}

/// Persistent mode: r[b] = saved[steered[b] ? B + j·C + win[b] : b] with j = b, or j = cidx[b]
/// (the gate-first step's compact index) when given.  r f32 [B, D], saved f32 [B + B·C, D],
/// steered/win/cidx i32 [B].
#[allow(clippy::too_many_arguments)]
pub fn hybrid_gather(
    gpu: &Gpu,
    r: &mut CudaViewMut<'_, f32>,
    saved: &CudaView<'_, f32>,
    steered: &CudaView<'_, i32>,
    win: &CudaView<'_, i32>,
    cidx: Option<&CudaView<'_, i32>>,
    b: usize,
    c: usize,
    d: usize,
) -> Result<()> {
    const K: &str = "hybrid_gather_f32";
    check(K, "r", r.len(), b * d, "[B, D]")?;
    check(K, "saved", saved.len(), (b + b * c) * d, "[B + B·C, D]")?;
    check(K, "steered", steered.len(), b, "[B]")?;
    check(K, "win", win.len(), b, "[B]")?;
    if let Some(ci) = cidx {
        check(K, "cidx", ci.len(), b, "[B]")?;
    }
    if b == 0 {
        return Ok(());
    }
    let (bi, ci, di) = (int(K, "B", b)?, int(K, "C", c)?, int(K, "D", d)?);
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(r)
        .arg(saved)
        .arg(steered)
        .arg(win)
        .arg(&cidx)
        .arg(&bi)
        .arg(&ci)
        .arg(&di);
    // SAFETY: argument order and types match hybrid_gather_f32; lengths checked above; win[b] < C
    // whenever steered[b], and cidx[b] < B then too (written by hybrid_select /
    // hybrid_select_compact and hybrid_gate).
    gpu.launched(K, unsafe { l.launch(cfg((b as u32, 1, 1), 256, 0)) })
}

/// Buffers the gate-first step's decisions live in, all i32 on the device: sel [B] (compact
/// index → problem), cidx [B] (problem → compact index or −1), live [1] (= n·C), and the
/// per-problem outputs emit / steered / win [B].
pub struct Gate<'a, 'b> {
    pub sel: &'b mut CudaViewMut<'a, i32>,
    pub cidx: &'b mut CudaViewMut<'a, i32>,
    pub live: &'b mut CudaViewMut<'a, i32>,
    pub emit: &'b mut CudaViewMut<'a, i32>,
    pub steered: &'b mut CudaViewMut<'a, i32>,
    pub win: &'b mut CudaViewMut<'a, i32>,
}

/// Largest batch the gate-first step takes (one block scans the problems).
pub const GATE_MAX_B: usize = 1024;

/// The gate of the gate-first step: tok i32 [B] (the base model's greedy ids of the problem rows),
/// think_tok i32 [B]; fills every buffer of `g` (see kernels/hybrid.cu hybrid_gate_i32).
pub fn hybrid_gate(
    gpu: &Gpu,
    g: &mut Gate<'_, '_>,
    tok: &CudaView<'_, i32>,
    think_tok: &CudaView<'_, i32>,
    b: usize,
    c: usize,
    gating: bool,
) -> Result<()> {
    const K: &str = "hybrid_gate_i32";
    for (name, len) in [
        ("sel", g.sel.len()),
        ("cidx", g.cidx.len()),
        ("emit", g.emit.len()),
        ("steered", g.steered.len()),
        ("win", g.win.len()),
        ("tok", tok.len()),
        ("think_tok", think_tok.len()),
    ] {
        check(K, name, len, b, "[B]")?;
    }
    check(K, "live", g.live.len(), 1, "[1]")?;
    if b == 0 || b > GATE_MAX_B || c == 0 {
        return Err(Error::Input(format!(
            "{K}: expected 1..={GATE_MAX_B} problems and at least one coefficient, found {b} and {c}"
        )));
    }
    let (bi, ci, gi) = (int(K, "B", b)?, int(K, "C", c)?, gating as i32);
    let threads = b.div_ceil(32) * 32;
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(&*g.sel)
        .arg(&*g.cidx)
        .arg(&*g.live)
        .arg(&*g.emit)
        .arg(&*g.steered)
        .arg(&*g.win);
    l.arg(tok).arg(think_tok).arg(&bi).arg(&ci).arg(&gi);
    // SAFETY: argument order and types match hybrid_gate_i32; lengths checked above; one block of
    // ≥ B threads (B ≤ 1024, the kernel's shared scan).
    gpu.launched(K, unsafe { l.launch(cfg((1, 1, 1), threads as u32, 0)) })
}

/// Rows [0, B·C) of the base model's buffers that the gate-first step's second pass runs:
/// residual r f32 [B·C, D]; steering vector idx i32, coefficient coef f32, position pos i32 and
/// cache slot i32, each [B·C].
pub struct CandidateRows<'a, 'b> {
    pub r: &'b mut CudaViewMut<'a, f32>,
    pub idx: &'b mut CudaViewMut<'a, i32>,
    pub coef: &'b mut CudaViewMut<'a, f32>,
    pub pos: &'b mut CudaViewMut<'a, i32>,
    pub slot: &'b mut CudaViewMut<'a, i32>,
}

/// Fills the candidate rows of the gate-first step's second pass from the problems' saved
/// residuals at the steering point (saved f32 [B, D]), category i32 [B], coefs f32 [C] and the
/// problems' positions and slots pos_p / slot_p i32 [B] (see hybrid_expand_compact_f32).
#[allow(clippy::too_many_arguments)]
pub fn hybrid_expand_compact(
    gpu: &Gpu,
    rows: CandidateRows<'_, '_>,
    saved: &CudaView<'_, f32>,
    sel: &CudaView<'_, i32>,
    live: &CudaView<'_, i32>,
    problem: (&CudaView<'_, i32>, &CudaView<'_, i32>, &CudaView<'_, i32>),
    coefs: &CudaView<'_, f32>,
    b: usize,
    c: usize,
    d: usize,
) -> Result<()> {
    const K: &str = "hybrid_expand_compact_f32";
    let CandidateRows {
        r,
        idx,
        coef,
        pos,
        slot,
    } = rows;
    let (category, pos_p, slot_p) = problem;
    let n = b * c;
    check(K, "r", r.len(), n * d, "[B·C, D]")?;
    for (name, len) in [
        ("idx", idx.len()),
        ("coef", coef.len()),
        ("pos", pos.len()),
        ("slot", slot.len()),
    ] {
        check(K, name, len, n, "[B·C]")?;
    }
    check(K, "saved", saved.len(), b * d, "[B, D]")?;
    for (name, len) in [
        ("sel", sel.len()),
        ("category", category.len()),
        ("pos_p", pos_p.len()),
        ("slot_p", slot_p.len()),
    ] {
        check(K, name, len, b, "[B]")?;
    }
    check(K, "live", live.len(), 1, "[1]")?;
    check(K, "coefs", coefs.len(), c, "[C]")?;
    if n == 0 {
        return Ok(());
    }
    let (ci, di) = (int(K, "C", c)?, int(K, "D", d)?);
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(&*r).arg(&*idx).arg(&*coef).arg(&*pos).arg(&*slot);
    l.arg(saved)
        .arg(sel)
        .arg(live)
        .arg(category)
        .arg(coefs)
        .arg(pos_p)
        .arg(slot_p)
        .arg(&ci)
        .arg(&di);
    // SAFETY: argument order and types match hybrid_expand_compact_f32; lengths checked above;
    // live[0] = n·C ≤ B·C and sel[i] < B for i < n (written by hybrid_gate).
    gpu.launched(K, unsafe { l.launch(cfg((n as u32, 1, 1), 256, 0)) })
}

/// The choice among the needing problems' candidates (gate-first step): tok i32 [B·C] (greedy
/// ids of the candidate rows, compact problem i at rows i·C..), sel/live from `hybrid_gate`,
/// think_logits f32 [B, V]; writes emit/steered/win [B] of the needing problems.
#[allow(clippy::too_many_arguments)]
pub fn hybrid_select_compact(
    gpu: &Gpu,
    out: (
        &mut CudaViewMut<'_, i32>,
        &mut CudaViewMut<'_, i32>,
        &mut CudaViewMut<'_, i32>,
    ),
    tok: &CudaView<'_, i32>,
    sel: &CudaView<'_, i32>,
    live: &CudaView<'_, i32>,
    think_logits: &CudaView<'_, f32>,
    b: usize,
    c: usize,
    v: usize,
) -> Result<()> {
    const K: &str = "hybrid_select_compact_i32";
    let (emit, steered, win) = out;
    for (name, len) in [
        ("emit", emit.len()),
        ("steered", steered.len()),
        ("win", win.len()),
        ("sel", sel.len()),
    ] {
        check(K, name, len, b, "[B]")?;
    }
    check(K, "tok", tok.len(), b * c, "[B·C]")?;
    check(K, "live", live.len(), 1, "[1]")?;
    check(K, "think_logits", think_logits.len(), b * v, "[B, V]")?;
    if b == 0 {
        return Ok(());
    }
    if c == 0 {
        return Err(Error::Input(format!(
            "{K}: at least one coefficient is needed"
        )));
    }
    let (bi, ci, vi) = (int(K, "B", b)?, int(K, "C", c)?, int(K, "V", v)?);
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(emit).arg(steered).arg(win);
    l.arg(tok)
        .arg(sel)
        .arg(live)
        .arg(think_logits)
        .arg(&bi)
        .arg(&ci)
        .arg(&vi);
    // SAFETY: argument order and types match hybrid_select_compact_i32; lengths checked above;
    // threads i < live[0] / C ≤ B read sel[i] < B (hybrid_gate); candidate ids are range-checked.
    gpu.launched(K, unsafe {
        l.launch(cfg((b.div_ceil(128) as u32, 1, 1), 128, 0))
    })
}

/// Which way `hybrid_keep` copies: rows of the call into the kept table, or back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Keep {
    Store,
    Load,
}

/// Kept residuals of the host-driven windowed loop (kernels/hybrid.cu hybrid_keep_f32): `Store`
/// copies the rows of r f32 [T, D] to kept f32 [slots, L, D] at (slot, pos) i32 [T]; `Load`
/// copies them back into r.
#[allow(clippy::too_many_arguments)]
pub fn hybrid_keep(
    gpu: &Gpu,
    r: &mut CudaViewMut<'_, f32>,
    kept: &mut CudaViewMut<'_, f32>,
    slot: &CudaView<'_, i32>,
    pos: &CudaView<'_, i32>,
    t: usize,
    (slots, l, d): (usize, usize, usize),
    way: Keep,
) -> Result<()> {
    const K: &str = "hybrid_keep_f32";
    check(K, "r", r.len(), t * d, "[T, D]")?;
    check(K, "kept", kept.len(), slots * l * d, "[slots, L, D]")?;
    check(K, "slot", slot.len(), t, "[T]")?;
    check(K, "pos", pos.len(), t, "[T]")?;
    if t == 0 {
        return Ok(());
    }
    let (si, li, di) = (int(K, "slots", slots)?, int(K, "L", l)?, int(K, "D", d)?);
    let store = i32::from(way == Keep::Store);
    let f = gpu.func(K)?;
    let mut b = Launch::new(gpu, f);
    b.arg(r)
        .arg(kept)
        .arg(slot)
        .arg(pos)
        .arg(&si)
        .arg(&li)
        .arg(&di)
        .arg(&store);
    // SAFETY: argument order and types match hybrid_keep_f32; lengths checked above; the kernel
    // skips rows whose (slot, pos) lies outside kept.
    gpu.launched(K, unsafe { b.launch(cfg((t as u32, 1, 1), 256, 0)) })
}
