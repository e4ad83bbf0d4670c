//! One safe wrapper per CUDA kernel (kernels/*.cu). Each checks the buffer lengths against the
//! shapes it is given (errors name the kernel and the tensor), launches on `gpu.stream`, and
//! returns a `Result`. All `unsafe` of the CUDA backend's launches lives in this file and the two
//! it re-exports: `hybrid_kernels` (the hybrid step's decisions) and `grad_kernels` (the
//! steering-vector gradient).
//!
//! Shapes: T tokens, D model dim, H/Hkv heads, Dh head dim, S cache positions per slot, F ffn dim,
//! V vocab, K SAE latents / reduction dim, M output features, N/B rows, NV steering vectors.
//! bf16 is `half::bf16`; int32 ids/positions are `i32`.

use super::launch::{Arg, Launch};
use super::Gpu;
use crate::{Error, Result};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, LaunchConfig};
use half::bf16;

/// What an absent optional pointer is passed as.
pub(super) static NULL: u64 = 0;

pub use super::grad_kernels::*;
pub use super::hybrid_kernels::*;

/// Rows up to which `matmul` uses one skinny `gemv` launch (row groups of this size above).
pub const GEMV_MAX_ROWS: usize = 32;

/// Rows per gemv launch in `matmul`: GEMV_MAX_ROWS, or 64 with THINKSTEER_GEMV_ROWS=64 (the
/// 64-row bucket, which reads each weight once for 64 rows; read once, until timed).
pub fn gemv_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| match std::env::var("THINKSTEER_GEMV_ROWS").as_deref() {
        Ok("64") => 64,
        _ => GEMV_MAX_ROWS,
    })
}
/// Row groups `matmul` runs through `gemv` before switching to `gemm`.
pub const GEMV_PASSES: usize = 4;

/// Rows from which `matmul` and `matmul_glu` use `gemm` (tensor-core tiles, with split K for
/// decode batches) rather than `gemv` row groups: GEMV_MAX_ROWS·GEMV_PASSES + 1, or
/// THINKSTEER_GEMM_FROM (above one gemv launch's rows) while measurements decide
/// (PERFORMANCE.md).
pub fn gemm_from() -> usize {
    static FROM: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *FROM.get_or_init(|| {
        std::env::var("THINKSTEER_GEMM_FROM")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(GEMV_MAX_ROWS * GEMV_PASSES + 1, |n| n.max(gemv_rows() + 1))
    })
}
/// Query heads per key/value split in decode attention is not fixed; the split length is.
pub const DECODE_CHUNK: usize = 64;

pub(super) fn check(
    kernel: &str,
    tensor: &str,
    len: usize,
    want: usize,
    shape: &str,
) -> Result<()> {
    if len != want {
        return Err(Error::Input(format!(
            "{kernel}: {tensor} should be {shape} = {want} elements, found {len}"
        )));
    }
    Ok(())
}

pub(super) fn int(kernel: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::Input(format!("{kernel}: {what} = {v} does not fit in int32")))
}

pub(super) fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

pub(super) fn is_aligned16<T>(gpu: &Gpu, v: &CudaView<'_, T>) -> bool {
    let (ptr, _sync) = v.device_ptr(&gpu.stream);
    ptr.is_multiple_of(16)
}

fn aligned16<T>(gpu: &Gpu, kernel: &str, tensor: &str, v: &CudaView<'_, T>) -> Result<()> {
    let (ptr, _sync) = v.device_ptr(&gpu.stream);
    if !ptr.is_multiple_of(16) {
        return Err(Error::Input(format!(
            "{kernel}: {tensor} must start 16-byte aligned (address {ptr:#x})"
        )));
    }
    Ok(())
}

/// r[t] = f32(table[ids[t]]).  r f32 [T, D], table bf16 [V, D], ids i32 [T].
pub fn embed(
    gpu: &Gpu,
    r: &mut CudaViewMut<'_, f32>,
    table: &CudaView<'_, bf16>,
    ids: &CudaView<'_, i32>,
    t: usize,
    d: usize,
    v: usize,
) -> Result<()> {
    const K: &str = "embed_bf16";
    check(K, "r", r.len(), t * d, "[T, D]")?;
    check(K, "table", table.len(), v * d, "[V, D]")?;
    check(K, "ids", ids.len(), t, "[T]")?;
    if t == 0 {
        return Ok(());
    }
    let (vi, di) = (int(K, "V", v)?, int(K, "D", d)?);
    let f = gpu.func(K)?;
    let mut b = Launch::new(gpu, f);
    b.arg(r).arg(table).arg(ids).arg(&vi).arg(&di);
    // SAFETY: argument order and types match embed_bf16; lengths checked above; the kernel reads
    // table rows only for ids in [0, V).
    gpu.launched(K, unsafe { b.launch(cfg((t as u32, 1, 1), 256, 0)) })
}

/// Steering input of `residual_norm`: r[t] += coef[t] · table[idx[t]] where coef[t] ≠ 0 and
/// 0 ≤ idx[t] < NV.  table f32 [NV, D], coef f32 [T], idx i32 [T] (device memory: no host trip).
pub struct Steer<'a> {
    pub table: &'a CudaView<'a, f32>,
    pub coef: &'a CudaView<'a, f32>,
    pub idx: &'a CudaView<'a, i32>,
    pub nv: usize,
}

/// SAE encode fused into `residual_norm`, on the updated residual r:
/// h = mean ? (r − mean)/‖r − mean‖ : r;  z = W_encᵀ(h − b_dec) + b_enc;  category = argmax z.
/// w_enc f32 [D, K], b_enc f32 [K], b_dec f32 [D], mean f32 [D], z f32 [T, K], category i32 [T].
pub struct SaeEncode<'a, 'b> {
    pub w_enc: &'a CudaView<'a, f32>,
    pub b_enc: &'a CudaView<'a, f32>,
    pub b_dec: &'a CudaView<'a, f32>,
    pub mean: Option<&'a CudaView<'a, f32>>,
    pub z: &'b mut CudaViewMut<'a, f32>,
    pub category: &'b mut CudaViewMut<'a, i32>,
    pub k: usize,
}

/// Largest SAE width the fused encode supports.
pub const SAE_MAX_K: usize = 64;

/// The fused residual step, per row t:
/// r[t] += x[t] (if x); r[t] += steering (if steer); y[t] = bf16(rmsnorm(r[t]) · w) (if y);
/// then the SAE encode (if sae).  r f32 [T, D], x f32 [T, D], w bf16 [D], y bf16 [T, D].
#[allow(clippy::too_many_arguments)]
pub fn residual_norm(
    gpu: &Gpu,
    r: &mut CudaViewMut<'_, f32>,
    x: Option<&CudaView<'_, f32>>,
    steer: Option<&Steer<'_>>,
    w: &CudaView<'_, bf16>,
    y: Option<&mut CudaViewMut<'_, bf16>>,
    sae: Option<&mut SaeEncode<'_, '_>>,
    t: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    const K: &str = "residual_norm_f32";
    check(K, "r", r.len(), t * d, "[T, D]")?;
    if let Some(x) = x {
        check(K, "x", x.len(), t * d, "[T, D]")?;
    }
    check(K, "w", w.len(), d, "[D]")?;
    if let Some(y) = y.as_ref() {
        check(K, "y", y.len(), t * d, "[T, D]")?;
    }
    if let Some(s) = steer {
        check(K, "steering table", s.table.len(), s.nv * d, "[NV, D]")?;
        check(K, "steering coef", s.coef.len(), t, "[T]")?;
        check(K, "steering idx", s.idx.len(), t, "[T]")?;
    }
    let mut smem = 0u32;
    let kk = if let Some(s) = sae.as_ref() {
        if s.k == 0 || s.k > SAE_MAX_K {
            return Err(Error::Input(format!(
                "{K}: SAE width K must be 1..={SAE_MAX_K}, found {}",
                s.k
            )));
        }
        check(K, "W_enc", s.w_enc.len(), d * s.k, "[D, K]")?;
        check(K, "b_enc", s.b_enc.len(), s.k, "[K]")?;
        check(K, "b_dec", s.b_dec.len(), d, "[D]")?;
        if let Some(m) = s.mean {
            check(K, "SAE mean", m.len(), d, "[D]")?;
        }
        check(K, "z", s.z.len(), t * s.k, "[T, K]")?;
        check(K, "category", s.category.len(), t, "[T]")?;
        smem = (d * 4) as u32;
        if smem > 48 * 1024 {
            return Err(Error::Input(format!(
                "{K}: SAE encode supports D ≤ 12288, found {d}"
            )));
        }
        s.k
    } else {
        0
    };
    if !d.is_multiple_of(4) || d > 8192 {
        return Err(Error::Input(format!(
            "{K}: D must be a multiple of 4 and at most 8192 (float4 rows in registers), found {d}"
        )));
    }
    if t == 0 {
        return Ok(());
    }
    let (nv, di, ki) = (
        int(K, "NV", steer.map_or(0, |s| s.nv))?,
        int(K, "D", d)?,
        int(K, "K", kk)?,
    );
    let f = gpu.func(K)?;
    let mut b = Launch::new(gpu, f);
    b.arg(r);
    match x {
        Some(x) => b.arg(x),
        None => b.arg(&NULL),
    };
    match steer {
        Some(s) => b.arg(s.table).arg(s.coef).arg(s.idx),
        None => b.arg(&NULL).arg(&NULL).arg(&NULL),
    };
    b.arg(&nv).arg(w);
    match y {
        Some(y) => b.arg(y),
        None => b.arg(&NULL),
    };
    b.arg(&di).arg(&eps);
    match sae {
        Some(s) => {
            b.arg(s.w_enc).arg(s.b_enc).arg(s.b_dec);
            match s.mean {
                Some(m) => b.arg(m),
                None => b.arg(&NULL),
            };
            b.arg(&*s.z).arg(&*s.category)
        }
        None => b
            .arg(&NULL)
            .arg(&NULL)
            .arg(&NULL)
            .arg(&NULL)
            .arg(&NULL)
            .arg(&NULL),
    };
    b.arg(&ki);
    // SAFETY: argument order and types match residual_norm_f32 (absent pointers are null, which
    // the kernel tests); every buffer's length was checked against T, D, K, NV above.
    gpu.launched(K, unsafe { b.launch(cfg((t as u32, 1, 1), 512, smem)) })
}

/// Shapes of the attention block.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub h: usize,
    pub hkv: usize,
    pub dh: usize,
    /// Cache slots (sequences) and positions per slot.
    pub slots: usize,
    pub s: usize,
}

impl AttnShape {
    fn check(&self, kernel: &str) -> Result<()> {
        // The kernels' head dimensions (decode attention with another would also end without
        // its PDL wait, unordering the launches after it).
        if !(self.dh == 64 || self.dh == 128) {
            return Err(Error::Input(format!(
                "{kernel}: head dim must be 64 or 128, found {}",
                self.dh
            )));
        }
        if self.hkv == 0 || !self.h.is_multiple_of(self.hkv) {
            return Err(Error::Input(format!(
                "{kernel}: query heads ({}) must be a multiple of key/value heads ({})",
                self.h, self.hkv
            )));
        }
        Ok(())
    }
    fn cache_len(&self) -> usize {
        self.slots * self.s * self.hkv * self.dh
    }
    /// A kernel's K and V caches: [slots, S, Hkv, Dh] each.
    fn check_caches(&self, kernel: &str, k: usize, v: usize) -> Result<()> {
        check(
            kernel,
            "k_cache",
            k,
            self.cache_len(),
            "[slots, S, Hkv, Dh]",
        )?;
        check(
            kernel,
            "v_cache",
            v,
            self.cache_len(),
            "[slots, S, Hkv, Dh]",
        )
    }
    /// (H, Hkv, Dh, S) as kernel arguments.
    fn ints(&self, kernel: &str) -> Result<(i32, i32, i32, i32)> {
        Ok((
            int(kernel, "H", self.h)?,
            int(kernel, "Hkv", self.hkv)?,
            int(kernel, "Dh", self.dh)?,
            int(kernel, "S", self.s)?,
        ))
    }
}

/// Bias + RoPE + KV-cache append over the fused q|k|v product.
/// qkv f32 [T, (H+2Hkv)·Dh], bias f32 [(H+2Hkv)·Dh], inv_freq f32 [Dh/2], pos/slot i32 [T];
/// writes q bf16 [T, H, Dh], k_self/v_self bf16 [T, Hkv, Dh], and for t < n_write the caches
/// bf16 [slots, S, Hkv, Dh] at (slot[t], pos[t]).
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope(
    gpu: &Gpu,
    qkv: &CudaView<'_, f32>,
    bias: Option<&CudaView<'_, f32>>,
    inv_freq: &CudaView<'_, f32>,
    pos: &CudaView<'_, i32>,
    slot: &CudaView<'_, i32>,
    n_write: usize,
    q: &mut CudaViewMut<'_, bf16>,
    k_self: &mut CudaViewMut<'_, bf16>,
    v_self: &mut CudaViewMut<'_, bf16>,
    k_cache: &mut CudaViewMut<'_, bf16>,
    v_cache: &mut CudaViewMut<'_, bf16>,
    t: usize,
    sh: AttnShape,
) -> Result<()> {
    const K: &str = "qkv_rope_bf16";
    sh.check(K)?;
    let width = (sh.h + 2 * sh.hkv) * sh.dh;
    check(K, "qkv", qkv.len(), t * width, "[T, (H+2Hkv)·Dh]")?;
    if let Some(bias) = bias {
        check(K, "bias", bias.len(), width, "[(H+2Hkv)·Dh]")?;
    }
    check(K, "inv_freq", inv_freq.len(), sh.dh / 2, "[Dh/2]")?;
    check(K, "pos", pos.len(), t, "[T]")?;
    check(K, "slot", slot.len(), t, "[T]")?;
    check(K, "q", q.len(), t * sh.h * sh.dh, "[T, H, Dh]")?;
    check(
        K,
        "k_self",
        k_self.len(),
        t * sh.hkv * sh.dh,
        "[T, Hkv, Dh]",
    )?;
    check(
        K,
        "v_self",
        v_self.len(),
        t * sh.hkv * sh.dh,
        "[T, Hkv, Dh]",
    )?;
    sh.check_caches(K, k_cache.len(), v_cache.len())?;
    if n_write > t {
        return Err(Error::Input(format!(
            "{K}: n_write ({n_write}) exceeds the token count ({t})"
        )));
    }
    if t == 0 {
        return Ok(());
    }
    let nw = int(K, "n_write", n_write)?;
    let (h, hkv, dh) = (
        int(K, "H", sh.h)?,
        int(K, "Hkv", sh.hkv)?,
        int(K, "Dh", sh.dh)?,
    );
    let (slots, s) = (int(K, "slots", sh.slots)?, int(K, "S", sh.s)?);
    let f = gpu.func(K)?;
    let mut b = Launch::new(gpu, f);
    b.arg(qkv);
    match bias {
        Some(x) => b.arg(x),
        None => b.arg(&NULL),
    };
    b.arg(inv_freq)
        .arg(pos)
        .arg(slot)
        .arg(&nw)
        .arg(q)
        .arg(k_self)
        .arg(v_self)
        .arg(k_cache)
        .arg(v_cache);
    b.arg(&h).arg(&hkv).arg(&dh).arg(&slots).arg(&s);
    // SAFETY: argument order and types match qkv_rope_bf16; lengths checked above; cache writes
    // are skipped in the kernel for slot/pos outside [0, slots) × [0, S).
    let per_row = (sh.h + sh.hkv) * sh.dh / 2 + sh.hkv * sh.dh;
    gpu.launched(K, unsafe {
        b.launch(cfg((t as u32, per_row.div_ceil(256) as u32, 1), 256, 0))
    })
}

/// Number of sequence splits decode attention launches for contexts up to `max_len` positions
/// (the token itself included): fixed per launch so CUDA graphs can replay it.
pub fn decode_splits(max_len: usize) -> usize {
    max_len.div_ceil(DECODE_CHUNK).max(1)
}

/// Which decode-attention kernel runs: one query head per block (`PerHead`, the default), or one
/// GQA group of H / Hkv ∈ 2..=8 heads per block, each K/V row loaded once for the group
/// (`Grouped`, THINKSTEER_ATTN=group until measured; other ratios fall back to `PerHead`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeAttn {
    PerHead,
    Grouped,
}

impl DecodeAttn {
    /// THINKSTEER_ATTN=group: `Grouped`; otherwise `PerHead`.
    pub fn from_env() -> DecodeAttn {
        match std::env::var("THINKSTEER_ATTN").as_deref() {
            Ok("group") => DecodeAttn::Grouped,
            _ => DecodeAttn::PerHead,
        }
    }
}

/// Where decode attention takes its queries and the token's own key and value from.
pub enum DecodeIn<'a, 'b> {
    /// Written by `qkv_rope`: q bf16 [T, H, Dh], k_self / v_self bf16 [T, Hkv, Dh].
    Rotated {
        q: &'a CudaView<'b, bf16>,
        k_self: &'a CudaView<'b, bf16>,
        v_self: &'a CudaView<'b, bf16>,
    },
    /// The raw q|k|v product f32 [T, (H+2Hkv)·Dh] with its bias [(H+2Hkv)·Dh] and inv_freq
    /// [Dh/2]: the kernel applies bias and RoPE itself, bit for bit as `qkv_rope` would, and
    /// rows < n_write append their K/V to the caches (one launch per block fewer). The caller
    /// guarantees that no row of the call attends a position another row writes (one row per
    /// sequence, or candidate rows beside their problem's row at the same position).
    Raw {
        qkv: &'a CudaView<'b, f32>,
        bias: Option<&'a CudaView<'b, f32>>,
        inv_freq: &'a CudaView<'b, f32>,
        n_write: usize,
    },
}

/// Decode attention (flash-decoding): token t attends cache positions [0, pos[t]) of slot[t] and
/// its own key and value at pos[t] (from `input`). `splits` = decode_splits(longest possible
/// pos + 1). Caches bf16 [slots, S, Hkv, Dh] (written only with `DecodeIn::Raw`), pos/slot i32
/// [T]; scratch part_o f32 [T, H, splits, Dh], part_ml f32 [T, H, splits, 2]; out bf16 [T, H, Dh]
/// (the last split of each head combines the partials, one launch). Positions beyond
/// splits·DECODE_CHUNK are not attended. `live` (i32 [1] on the device, when given): rows
/// t ≥ live[0] are skipped. `run` (i32 [T], when given): read-only runs (`Step::run_start`):
/// token t attends the cache before pos[run[t]], then `input`'s own rows run[t] ..= t; only with
/// `DecodeIn::Rotated`. `kind`: one query head or one GQA group per block.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    gpu: &Gpu,
    input: DecodeIn<'_, '_>,
    k_cache: &mut CudaViewMut<'_, bf16>,
    v_cache: &mut CudaViewMut<'_, bf16>,
    pos: &CudaView<'_, i32>,
    slot: &CudaView<'_, i32>,
    part_o: &mut CudaViewMut<'_, f32>,
    part_ml: &mut CudaViewMut<'_, f32>,
    out: &mut CudaViewMut<'_, bf16>,
    t: usize,
    sh: AttnShape,
    splits: usize,
    live: Option<&CudaView<'_, i32>>,
    run: Option<&CudaView<'_, i32>>,
    kind: DecodeAttn,
) -> Result<()> {
    const K: &str = "attention_decode_bf16";
    sh.check(K)?;
    if let Some(run) = run {
        check(K, "run", run.len(), t, "[T]")?;
        if matches!(input, DecodeIn::Raw { .. }) {
            return Err(Error::Input(format!(
                "{K}: read-only runs need the rotated K/V of every row of the run, not fused RoPE"
            )));
        }
    }
    let kv = t * sh.hkv * sh.dh;
    match &input {
        DecodeIn::Rotated { q, k_self, v_self } => {
            check(K, "q", q.len(), t * sh.h * sh.dh, "[T, H, Dh]")?;
            check(K, "k_self", k_self.len(), kv, "[T, Hkv, Dh]")?;
            check(K, "v_self", v_self.len(), kv, "[T, Hkv, Dh]")?;
        }
        DecodeIn::Raw {
            qkv,
            bias,
            inv_freq,
            n_write,
        } => {
            let width = (sh.h + 2 * sh.hkv) * sh.dh;
            check(K, "qkv", qkv.len(), t * width, "[T, (H+2Hkv)·Dh]")?;
            if let Some(bias) = bias {
                check(K, "bias", bias.len(), width, "[(H+2Hkv)·Dh]")?;
            }
            check(K, "inv_freq", inv_freq.len(), sh.dh / 2, "[Dh/2]")?;
            if *n_write > t {
                return Err(Error::Input(format!(
                    "{K}: n_write ({n_write}) exceeds the token count ({t})"
                )));
            }
            if *n_write > 0 && live.is_some() {
                // Rows past the live count return before storing, where qkv_rope would store.
                return Err(Error::Input(format!(
                    "{K}: a live count with rows writing the cache (n_write {n_write}) in fused RoPE"
                )));
            }
        }
    }
    sh.check_caches(K, k_cache.len(), v_cache.len())?;
    check(K, "pos", pos.len(), t, "[T]")?;
    check(K, "slot", slot.len(), t, "[T]")?;
    check(
        K,
        "part_o",
        part_o.len(),
        t * sh.h * splits * sh.dh,
        "[T, H, splits, Dh]",
    )?;
    check(
        K,
        "part_ml",
        part_ml.len(),
        t * sh.h * splits * 2,
        "[T, H, splits, 2]",
    )?;
    check(K, "out", out.len(), t * sh.h * sh.dh, "[T, H, Dh]")?;
    if splits == 0 || splits > 65535 {
        return Err(Error::Input(format!(
            "{K}: splits must be 1..=65535, found {splits}"
        )));
    }
    if t * sh.h > super::SCRATCH_COUNTERS {
        return Err(Error::Input(format!(
            "{K}: T·H = {} exceeds the {} completion counters",
            t * sh.h,
            super::SCRATCH_COUNTERS
        )));
    }
    if t == 0 {
        return Ok(());
    }
    let (h, hkv, dh) = (
        int(K, "H", sh.h)?,
        int(K, "Hkv", sh.hkv)?,
        int(K, "Dh", sh.dh)?,
    );
    let (s, slots) = (int(K, "S", sh.s)?, int(K, "slots", sh.slots)?);
    let (chunk, ns) = (DECODE_CHUNK as i32, splits as i32);
    // Few blocks (small batches): 8 keys per warp step, one memory round trip per split; many
    // blocks: the 1-key variant, whose lower register use keeps more blocks resident per SM
    // (measured on the H100: the 8-key kernel slowed batch-64 decode by a fifth).
    const GROUPED: [&str; 7] = [
        "attention_decode_g2_bf16",
        "attention_decode_g3_bf16",
        "attention_decode_g4_bf16",
        "attention_decode_g5_bf16",
        "attention_decode_g6_bf16",
        "attention_decode_g7_bf16",
        "attention_decode_g8_bf16",
    ];
    let group = sh.h / sh.hkv;
    let (name, grid_y) =
        if kind == DecodeAttn::Grouped && sh.h.is_multiple_of(sh.hkv) && (2..=8).contains(&group) {
            (GROUPED[group - 2], sh.hkv)
        } else if splits * sh.h * t <= 1024 {
            (K, sh.h)
        } else {
            ("attention_decode_u1_bf16", sh.h)
        };
    let f = gpu.func(name)?;
    let mut b = Launch::new(gpu, f);
    match &input {
        DecodeIn::Rotated { q, .. } => b.arg(*q),
        DecodeIn::Raw { .. } => b.arg(&NULL),
    };
    b.arg(&*k_cache).arg(&*v_cache);
    match &input {
        DecodeIn::Rotated { k_self, v_self, .. } => b.arg(*k_self).arg(*v_self),
        DecodeIn::Raw { .. } => b.arg(&NULL).arg(&NULL),
    };
    b.arg(pos).arg(slot);
    b.arg(&*part_o)
        .arg(&*part_ml)
        .arg(out)
        .arg(&gpu.scratch.counters);
    b.arg(&h)
        .arg(&hkv)
        .arg(&dh)
        .arg(&s)
        .arg(&slots)
        .arg(&chunk)
        .arg(&ns)
        .arg(&live);
    match &input {
        DecodeIn::Rotated { .. } => b
            .arg(&NULL)
            .arg(&NULL)
            .arg(&NULL)
            .arg(&0i32)
            .arg(&NULL)
            .arg(&NULL),
        DecodeIn::Raw {
            qkv,
            bias,
            inv_freq,
            n_write,
        } => b
            .arg(*qkv)
            .arg(bias)
            .arg(*inv_freq)
            .arg(&int(K, "n_write", *n_write)?)
            .arg(&*k_cache)
            .arg(&*v_cache),
    };
    b.arg(&run);
    // SAFETY: argument order and types match attention_decode_bf16 (and the _u1 / grouped
    // kernels, which share it); lengths checked above (the counters hold T·H entries, checked; a
    // group uses the entry of its first head); the kernel reads cache rows only for slot in
    // [0, slots) and positions < min(pos, S), and with `Raw` writes only row (slot, pos) of rows
    // < n_write with both in range, which (the caller's guarantee) no row of the launch reads;
    // `live` (1 element when given) is only read; `run` (T elements when given, only with
    // `Rotated`) names rows a ≤ t of k_self / v_self (the caller's guarantee: run[t] ≤ t, checked
    // by `engine::check_step` for every Step).
    gpu.launched(name, unsafe {
        b.launch(cfg((splits as u32, grid_y as u32, t as u32), 256, 0))
    })
}

/// Causal prefill attention for n queries of one slot at positions p0 .. p0+n−1, whose K/V are
/// already in the cache. q bf16 [n, H, Dh], caches bf16 [slots, S, Hkv, Dh], out bf16 [n, H, Dh].
#[allow(clippy::too_many_arguments)]
pub fn attention_prefill(
    gpu: &Gpu,
    q: &CudaView<'_, bf16>,
    k_cache: &CudaView<'_, bf16>,
    v_cache: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    n: usize,
    p0: usize,
    slot: usize,
    sh: AttnShape,
) -> Result<()> {
    const K: &str = "attention_prefill_bf16";
    sh.check(K)?;
    check(K, "q", q.len(), n * sh.h * sh.dh, "[n, H, Dh]")?;
    sh.check_caches(K, k_cache.len(), v_cache.len())?;
    check(K, "out", out.len(), n * sh.h * sh.dh, "[n, H, Dh]")?;
    if slot >= sh.slots || p0 + n > sh.s {
        return Err(Error::Input(format!(
            "{K}: slot {slot} positions {p0}..{} do not fit a cache of {} slots × {} positions",
            p0 + n,
            sh.slots,
            sh.s
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let (ni, p0i, sl) = (int(K, "n", n)?, int(K, "p0", p0)?, int(K, "slot", slot)?);
    let (h, hkv, dh, s) = sh.ints(K)?;
    let f = gpu.func(K)?;
    let mut b = Launch::new(gpu, f);
    b.arg(q)
        .arg(k_cache)
        .arg(v_cache)
        .arg(out)
        .arg(&ni)
        .arg(&p0i)
        .arg(&sl)
        .arg(&h)
        .arg(&hkv)
        .arg(&dh)
        .arg(&s);
    // SAFETY: argument order and types match attention_prefill_bf16; lengths and the slot /
    // position range checked above; its shared memory limit was raised to the Dh = 128 size
    // when the module was loaded.
    gpu.launched(K, unsafe {
        b.launch(cfg(
            (n.div_ceil(64) as u32, sh.h as u32, 1),
            128,
            prefill_attention_smem(sh.dh),
        ))
    })
}

/// Read-only runs of a decode call on the prefill tiles (kernels/prefill_attention.cu
/// attention_runs_bf16): q bf16 [T, H, Dh], k_self / v_self bf16 [T, Hkv, Dh] (the call's rotated
/// K/V), out bf16 [T, H, Dh], tiles i32 [n_tiles, 5] built by `run_tiles`.
#[allow(clippy::too_many_arguments)]
pub fn attention_runs(
    gpu: &Gpu,
    q: &CudaView<'_, bf16>,
    k_cache: &CudaView<'_, bf16>,
    v_cache: &CudaView<'_, bf16>,
    k_self: &CudaView<'_, bf16>,
    v_self: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    tiles: &CudaView<'_, i32>,
    t: usize,
    sh: AttnShape,
) -> Result<()> {
    const K: &str = "attention_runs_bf16";
    sh.check(K)?;
    check(K, "q", q.len(), t * sh.h * sh.dh, "[T, H, Dh]")?;
    sh.check_caches(K, k_cache.len(), v_cache.len())?;
    check(
        K,
        "k_self",
        k_self.len(),
        t * sh.hkv * sh.dh,
        "[T, Hkv, Dh]",
    )?;
    check(
        K,
        "v_self",
        v_self.len(),
        t * sh.hkv * sh.dh,
        "[T, Hkv, Dh]",
    )?;
    check(K, "out", out.len(), t * sh.h * sh.dh, "[T, H, Dh]")?;
    let n_tiles = tiles.len() / 5;
    check(K, "tiles", tiles.len(), n_tiles * 5, "[n_tiles, 5]")?;
    if n_tiles == 0 {
        return Ok(());
    }
    let (h, hkv, dh, s) = sh.ints(K)?;
    let f = gpu.func(K)?;
    let mut b = Launch::new(gpu, f);
    b.arg(q)
        .arg(k_cache)
        .arg(v_cache)
        .arg(k_self)
        .arg(v_self)
        .arg(out)
        .arg(tiles)
        .arg(&h)
        .arg(&hkv)
        .arg(&dh)
        .arg(&s);
    // SAFETY: argument order and types match attention_runs_bf16; lengths checked above; the
    // tiles come from `run_tiles` over a step `check_step` or `check_kept` accepted (rows < T,
    // slots and positions inside the cache of every block the call runs); its shared memory
    // limit was raised when the module was loaded.
    gpu.launched(K, unsafe {
        b.launch(cfg(
            (n_tiles as u32, sh.h as u32, 1),
            128,
            prefill_attention_smem(sh.dh),
        ))
    })
}

/// The tiles of `attention_runs` for a step: each run in pieces of ≤ 64 queries, as (first row
/// of the run, run length, first query of the piece, the run's first position, slot). A run is
/// a read-only run (`Step::run_of`) or a chunk of rows that write consecutive positions of one
/// slot: a written row's keys at and after the chunk's start are its chunk's own K/V, which
/// the cache then holds too. Returns whether some run holds more than one row.
pub fn run_tiles(step: &crate::model::Step, out: &mut Vec<i32>) -> bool {
    out.clear();
    let (t, w) = (step.positions.len(), step.n_write);
    let mut long = false;
    let mut a = 0;
    while a < t {
        // The run starting at row a: the rows after it whose run starts at a, or for a written
        // row the written rows after it that continue its chunk.
        let mut b = a + 1;
        let continues = |b: usize| {
            if b < w {
                step.slots[b] == step.slots[b - 1] && step.positions[b] == step.positions[b - 1] + 1
            } else {
                a >= w && step.run_of(b) == a
            }
        };
        while b < t && continues(b) {
            b += 1;
        }
        long |= b - a > 1;
        let (len, p0, slot) = (b - a, step.positions[a], step.slots[a]);
        for q0 in (0..len).step_by(64) {
            out.extend([a, len, q0, p0, slot].map(|x| x as i32));
        }
        a = b;
    }
    long
}

/// attention_prefill_bf16's dynamic shared memory: 2 stages of a K and a V tile of 64 keys ×
/// (Dh + 8) bf16.
pub(crate) const fn prefill_attention_smem(dh: usize) -> u32 {
    (4 * 64 * (dh + 8) * 2) as u32
}

/// K and the weights of a product: W bf16 [rows, K], K a positive multiple of 8, 16-byte aligned.
fn weight_checks(
    gpu: &Gpu,
    kernel: &str,
    w: &CudaView<'_, bf16>,
    rows: usize,
    k: usize,
) -> Result<()> {
    if !k.is_multiple_of(8) || k == 0 {
        return Err(Error::Input(format!(
            "{kernel}: the reduction dim K must be a positive multiple of 8 (16-byte loads), found {k}"
        )));
    }
    check(kernel, "W", w.len(), rows * k, "[M, K]")?;
    aligned16(gpu, kernel, "W", w)
}

/// K and the inputs of a skinny or tiled product: x bf16 [N, K], W bf16 [rows, K].
fn product_checks(
    gpu: &Gpu,
    kernel: &str,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (n, rows, k): (usize, usize, usize),
) -> Result<()> {
    weight_checks(gpu, kernel, w, rows, k)?;
    check(kernel, "x", x.len(), n * k, "[N, K]")?;
    aligned16(gpu, kernel, "x", x)
}

fn matmul_checks(
    gpu: &Gpu,
    kernel: &str,
    out: &CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (n, m, k): (usize, usize, usize),
) -> Result<()> {
    check(kernel, "out", out.len(), n * m, "[N, M]")?;
    product_checks(gpu, kernel, x, w, (n, m, k))
}

/// What a single-row gemv fuses around its product (gemv.cu's gemv*_b1 kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row1 {
    Plain,
    Glu,
}

/// The single-row kernel for `v` and rows of length `k`, and its output rows per block: warps
/// per row from the row length, so that each lane has one round of at most 8 loads in flight
/// (K ≤ 2048 · warps); 8 warps per block.
fn gemv1_kernel(v: Row1, k: usize) -> (&'static str, usize) {
    const NAMES: [[&str; 4]; 2] = [
        [
            "gemv_bf16_b1",
            "gemv_bf16_b1_k2",
            "gemv_bf16_b1_k4",
            "gemv_bf16_b1_k8",
        ],
        [
            "gemv_glu_bf16_b1",
            "gemv_glu_bf16_b1_k2",
            "gemv_glu_bf16_b1_k4",
            "gemv_glu_bf16_b1_k8",
        ],
    ];
    let (i, per_block) = match k {
        0..=2048 => (0, 8),
        2049..=4096 => (1, 4),
        4097..=8192 => (2, 2),
        _ => (3, 1),
    };
    (NAMES[v as usize][i], per_block)
}

/// Launches a single-row gemv: `rows` outputs (features for the GLU variant), x of length k.
fn gemv1_launch<O: Arg>(
    gpu: &Gpu,
    v: Row1,
    out: &O,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    rows: usize,
    k: usize,
) -> Result<()> {
    let (name, per_block) = gemv1_kernel(v, k);
    let (mi, ki) = (int(name, "M", rows)?, int(name, "K", k)?);
    let f = gpu.func(name)?;
    let mut l = Launch::new(gpu, f);
    l.arg(out).arg(x).arg(w).arg(&1i32).arg(&mi).arg(&ki).tag(k);
    let launch = cfg((rows.div_ceil(per_block) as u32, 1, 1), 256, 0);
    // SAFETY: argument order and types match the gemv*_b1 kernels (out, x, W, B, M, K); the
    // callers checked lengths (W has `rows` rows, or 2·rows for GLU), K % 8 and the 16-byte
    // alignment of x and W.
    gpu.launched(name, unsafe { l.launch(launch) })
}

/// Warps per block of the tensor-core gemv buckets for 9..=32 rows: 16, or 8 (at their register
/// counts a 16-warp block is alone on its SM, while 8-warp blocks fit two or three). Buckets up
/// to 8 rows always use 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvWarps {
    W16,
    W8,
    /// 8 where the grid has at least two blocks per SM, else 16 (a product of few blocks, e.g.
    /// o or down with M = 1536, has one block per SM either way, and 16 warps keep twice the
    /// loads in flight): THINKSTEER_GEMV_WARPS=8, read once, until timed.
    W8Wide,
}

impl GemvWarps {
    pub fn from_env() -> GemvWarps {
        static W: std::sync::OnceLock<GemvWarps> = std::sync::OnceLock::new();
        *W.get_or_init(|| match std::env::var("THINKSTEER_GEMV_WARPS").as_deref() {
            Ok("8") => GemvWarps::W8Wide,
            _ => GemvWarps::W16,
        })
    }

    /// The choice for a grid of `blocks` on `sms` multiprocessors.
    fn for_grid(self, blocks: usize, sms: usize) -> GemvWarps {
        match self {
            GemvWarps::W8Wide if blocks >= 2 * sms => GemvWarps::W8,
            GemvWarps::W8Wide => GemvWarps::W16,
            w => w,
        }
    }
}

/// Output rows (features with glu) per block of the tensor-core gemv buckets: 16 mma rows.
fn gemv_per_block(glu: bool) -> usize {
    if glu {
        8
    } else {
        16
    }
}

/// The tensor-core gemv kernel for 1..=64 rows (one row only with a live count; `glu`: the fused
/// gate|up + SiLU·mul variant), its output rows (features with glu) per block and its threads
/// per block.
fn gemv_kernel(b: usize, glu: bool, warps: GemvWarps) -> Result<(&'static str, usize, u32)> {
    let w8 = warps == GemvWarps::W8 && b > 8;
    let (plain, fused) = match (b, w8) {
        // One row only with a live count (the b1 kernels take none and always compute).
        (1..=2, _) => ("gemv_bf16_b2", "gemv_glu_bf16_b2"),
        (3..=4, _) => ("gemv_bf16_b4", "gemv_glu_bf16_b4"),
        (5..=8, _) => ("gemv_bf16_b8", "gemv_glu_bf16_b8"),
        (9..=16, false) => ("gemv_bf16_b16", "gemv_glu_bf16_b16"),
        (17..=32, false) => ("gemv_bf16_b32", "gemv_glu_bf16_b32"),
        (9..=16, true) => ("gemv_bf16_b16_w8", "gemv_glu_bf16_b16_w8"),
        (17..=32, true) => ("gemv_bf16_b32_w8", "gemv_glu_bf16_b32_w8"),
        (33..=64, _) => ("gemv_bf16_b64", "gemv_glu_bf16_b64"),
        _ => {
            return Err(Error::Input(format!(
                "gemv: rows must be 1..=64, found {b} (use gemm)"
            )))
        }
    };
    let threads = if w8 || b > 32 { 256 } else { 512 };
    let name = if glu { fused } else { plain };
    Ok((name, gemv_per_block(glu), threads))
}

/// Skinny product for 1..=64 rows: out f32 [B, M] = x bf16 [B, K] · W bf16 [M, K]ᵀ. K % 8 == 0.
pub fn gemv(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    b: usize,
    m: usize,
    k: usize,
) -> Result<()> {
    gemv_live(gpu, out, x, w, (b, m, k), None, GemvWarps::from_env())
}

/// [`gemv`] with the tensor-core buckets' warps per block given (tests of both variants).
pub fn gemv_with(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (b, m, k): (usize, usize, usize),
    warps: GemvWarps,
) -> Result<()> {
    gemv_live(gpu, out, x, w, (b, m, k), None, warps)
}

/// A launch's share of a batch whose needed rows are counted on the device: only rows
/// < count[0] (i32 [1]) are needed, and the launch covers the rows from `row0`.
#[derive(Clone, Copy)]
pub struct Live<'a, 'b> {
    pub count: &'b CudaView<'a, i32>,
    pub row0: usize,
}

/// [`gemv`] skipping the rows past `live` (the multi-row kernels; a single row is always computed).
fn gemv_live(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (b, m, k): (usize, usize, usize),
    live: Option<Live<'_, '_>>,
    warps: GemvWarps,
) -> Result<()> {
    let name = if b == 1 && live.is_none() {
        gemv1_kernel(Row1::Plain, k).0
    } else {
        gemv_kernel(b, false, warps)?.0
    };
    matmul_checks(gpu, name, out, x, w, (b, m, k))?;
    if m == 0 {
        return Ok(());
    }
    if b == 1 && live.is_none() {
        return gemv1_launch(gpu, Row1::Plain, out, x, w, m, k);
    }
    gemv_tc_launch(gpu, false, out, x, w, (b, m, k), live, warps)
}

/// Launches a tensor-core gemv bucket (1..=64 rows): out f32 [B, M], or with `glu` act bf16
/// [B, F] where `rows` = F and W has 2F rows.
#[allow(clippy::too_many_arguments)]
fn gemv_tc_launch<O: Arg>(
    gpu: &Gpu,
    glu: bool,
    out: &O,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (b, rows, k): (usize, usize, usize),
    live: Option<Live<'_, '_>>,
    warps: GemvWarps,
) -> Result<()> {
    let warps = warps.for_grid(rows.div_ceil(gemv_per_block(glu)), gpu.sms);
    let (name, per_block, threads) = gemv_kernel(b, glu, warps)?;
    let (bi, mi, ki, r0) = (
        int(name, "B", b)?,
        int(name, "M", rows)?,
        int(name, "K", k)?,
        int(name, "row0", live.map_or(0, |l| l.row0))?,
    );
    let count = live.map(|l| l.count);
    let f = gpu.func(name)?;
    let mut l = Launch::new(gpu, f);
    l.arg(out).arg(x).arg(w).arg(&bi).arg(&mi).arg(&ki);
    l.arg(&count).arg(&r0).tag(k);
    let launch = cfg((rows.div_ceil(per_block) as u32, 1, 1), threads, 0);
    // SAFETY: argument order and types match gemv_bf16_b* / gemv_glu_bf16_b* (and their _w8
    // variants, launched with the 256 threads they are built for); the callers checked
    // lengths (W has 2F rows with glu), K % 8 and 16-byte alignment (the kernels' vector loads);
    // B ≤ the kernel's bucket; the live count is only read.
    gpu.launched(name, unsafe { l.launch(launch) })
}

/// The MLP's gate|up product with SiLU·mul fused, for 1..=64 rows:
/// act bf16 [B, F] = silu(x·W[..F]ᵀ) · (x·W[F..]ᵀ), x bf16 [B, K], W bf16 [2F, K] (gate rows
/// first). The same arithmetic as `gemv` then `silu_mul`.
pub fn gemv_glu(
    gpu: &Gpu,
    act: &mut CudaViewMut<'_, bf16>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    b: usize,
    f: usize,
    k: usize,
) -> Result<()> {
    gemv_glu_live(gpu, act, x, w, (b, f, k), None, GemvWarps::from_env())
}

/// [`gemv_glu`] with the tensor-core buckets' warps per block given (tests of both variants).
pub fn gemv_glu_with(
    gpu: &Gpu,
    act: &mut CudaViewMut<'_, bf16>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (b, f, k): (usize, usize, usize),
    warps: GemvWarps,
) -> Result<()> {
    gemv_glu_live(gpu, act, x, w, (b, f, k), None, warps)
}

/// [`gemv_glu`] skipping the rows past `live`.
fn gemv_glu_live(
    gpu: &Gpu,
    act: &mut CudaViewMut<'_, bf16>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (b, f, k): (usize, usize, usize),
    live: Option<Live<'_, '_>>,
    warps: GemvWarps,
) -> Result<()> {
    let name = if b == 1 && live.is_none() {
        gemv1_kernel(Row1::Glu, k).0
    } else {
        gemv_kernel(b, true, warps)?.0
    };
    check(name, "act", act.len(), b * f, "[B, F]")?;
    product_checks(gpu, name, x, w, (b, 2 * f, k))?;
    if f == 0 {
        return Ok(());
    }
    if b == 1 && live.is_none() {
        return gemv1_launch(gpu, Row1::Glu, act, x, w, f, k);
    }
    gemv_tc_launch(gpu, true, act, x, w, (b, f, k), live, warps)
}

/// Tensor-core product: out f32 [N, M] = x bf16 [N, K] · W bf16 [M, K]ᵀ. Any N, M; K % 8 == 0.
pub fn gemm(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    n: usize,
    m: usize,
    k: usize,
) -> Result<()> {
    gemm_with(gpu, out, x, w, n, m, k, GemmTile::from_env(), None)
}

/// The kernel of [`gemm`]: ours with 64 rows of x per block (gemm_bf16, 4 warps, the default)
/// or 128 (gemm_bf16_n128, 8 warps); on Hopper the warpgroup kernels of gemm_wgmma.cu (128 rows
/// of x × 128 or 256 of W per block, wgmma; compute capability 9.0 with a cubin built for sm_90a,
/// else the 64-row tile); or cuBLASLt (`super::blaslt`). All but the default are opt-in —
/// THINKSTEER_GEMM=128 | wg | wg256 | lt — until a GPU run has compared them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmTile {
    N64,
    N128,
    Wg,
    Wg256,
    Lt,
}

/// One of our product kernels and its launch shape: `bn` rows of x and `bm` rows of W per block
/// (a glu block: bm / 2 outputs), k tiles of `bk`, `smem` bytes of dynamic shared memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmKernel {
    pub name: &'static str,
    pub bn: usize,
    pub bm: usize,
    pub bk: usize,
    pub threads: u32,
    pub smem: u32,
}

/// gemm_wgmma.cu's dynamic shared memory: its stages (6 for 128 W rows, 4 for 256: wg_stages)
/// of (128 + bm) rows of 128 bytes, and 1 KB to align the ring to 1024 bytes.
pub(crate) const fn wg_smem(bm: usize) -> u32 {
    let stages = if bm == 128 { 6 } else { 4 };
    (stages * (128 + bm) * 128 + 1024) as u32
}

impl GemmTile {
    /// THINKSTEER_GEMM=128 | wg | wg256 | lt, read once per process (every large product asks).
    pub fn from_env() -> GemmTile {
        static TILE: std::sync::OnceLock<GemmTile> = std::sync::OnceLock::new();
        *TILE.get_or_init(|| match std::env::var("THINKSTEER_GEMM").as_deref() {
            Ok("128") => GemmTile::N128,
            Ok("wg") => GemmTile::Wg,
            Ok("wg256") => GemmTile::Wg256,
            Ok("lt") => GemmTile::Lt,
            _ => GemmTile::N64,
        })
    }

    /// The tile used on `gpu` for a product with (`live`) or without a device-side live row
    /// count: cuBLASLt cannot skip rows, so it gives way to the 64-row tile there; so do the
    /// warpgroup kernels where the device or its code lacks wgmma.
    fn resolve(self, gpu: &Gpu, live: bool) -> GemmTile {
        match self {
            GemmTile::Lt if live => GemmTile::N64,
            GemmTile::Wg | GemmTile::Wg256 if !gpu.wgmma => GemmTile::N64,
            t => t,
        }
    }

    /// Our kernel for a plain or a glu product; None for cuBLASLt.
    pub(crate) fn kernel(self, glu: bool) -> Option<GemmKernel> {
        let k = |name, bn, bm, bk, threads, smem| GemmKernel {
            name,
            bn,
            bm,
            bk,
            threads,
            smem,
        };
        Some(match (self, glu) {
            (GemmTile::N64, false) => k("gemm_bf16", 64, 128, 32, 128, 0),
            (GemmTile::N128, false) => k("gemm_bf16_n128", 128, 128, 32, 256, 0),
            (GemmTile::Wg, false) => k("gemm_wg_bf16", 128, 128, 64, 256, wg_smem(128)),
            (GemmTile::Wg256, false) => k("gemm_wg_bf16_m256", 128, 256, 64, 256, wg_smem(256)),
            (GemmTile::N64, true) => k("gemm_glu_bf16", 64, 128, 32, 128, 0),
            (GemmTile::N128, true) => k("gemm_glu_bf16_n128", 128, 128, 32, 256, 0),
            (GemmTile::Wg, true) => k("gemm_glu_wg_bf16", 128, 128, 64, 256, wg_smem(128)),
            (GemmTile::Wg256, true) => k("gemm_glu_wg_bf16_m256", 128, 256, 64, 256, wg_smem(256)),
            (GemmTile::Lt, _) => return None,
        })
    }
}

/// How `gemm` splits K for an [N, M] × K product with kernel `kern` on `sms` SMs: (splits, k
/// tiles per split). Split when the output tiles fill less than two blocks per SM (decode
/// batches): at most K / (8·N) splits, so the partial sums' traffic stays under half the
/// weights', at least 256 of k per split, at most 16 splits, and splits·N·M ≤ `part` floats
/// (the scratch, indexed by the full N). With `live` the rows in use are decided on the device:
/// the split is sized for two row tiles of them (the hybrid step's disagreeing problems are a
/// few of its batch).
pub(crate) fn gemm_split(
    (n, m, k): (usize, usize, usize),
    kern: &GemmKernel,
    sms: usize,
    live: bool,
    part: usize,
) -> (usize, usize) {
    let bn = kern.bn;
    let row_tiles = if live {
        n.div_ceil(bn).min(2)
    } else {
        n.div_ceil(bn)
    };
    let (tiles, nk) = (m.div_ceil(kern.bm) * row_tiles, k.div_ceil(kern.bk).max(1));
    let want = if tiles < sms {
        (2 * sms).div_ceil(tiles.max(1))
    } else {
        1
    };
    let splits = want
        .min(k / (8 * n.min(row_tiles * bn)).max(1))
        .min(nk / (256 / kern.bk))
        .min(part / (n * m).max(1))
        .clamp(1, 16);
    let per = nk.div_ceil(splits);
    (nk.div_ceil(per), per)
}

/// [`gemm`] with the row tile chosen by the caller. `live` (i32 [1] on the device, when given):
/// only rows n < live[0] are needed; our kernels skip row tiles past them, so with `live` cuBLASLt
/// (which cannot) gives way to the 64-row tile.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    n: usize,
    m: usize,
    k: usize,
    tile: GemmTile,
    live: Option<&CudaView<'_, i32>>,
) -> Result<()> {
    let Some(kern) = tile.resolve(gpu, live.is_some()).kernel(false) else {
        matmul_checks(gpu, "cublasLtMatmul", out, x, w, (n, m, k))?;
        if n == 0 || m == 0 {
            return Ok(());
        }
        return gpu.blaslt()?.gemm(gpu, out, x, w, n, m, k);
    };
    let kernel = kern.name;
    matmul_checks(gpu, kernel, out, x, w, (n, m, k))?;
    if n == 0 || m == 0 {
        return Ok(());
    }
    let (ni, mi, ki) = gemm_dims(kernel, kern.bn, (n, m, k))?;
    let (splits, per) = gemm_split(
        (n, m, k),
        &kern,
        gpu.sms,
        live.is_some(),
        super::SCRATCH_GEMM_PART,
    );
    let per_i = int(kernel, "k tiles per split", per)?;
    let part = &gpu.scratch.gemm_part;
    let f = gpu.func(kernel)?;
    let mut l = Launch::new(gpu, f);
    l.arg(out).arg(x).arg(w).arg(&ni).arg(&mi).arg(&ki);
    l.arg(&live).arg(part).arg(&per_i).tag(k);
    let grid = (
        m.div_ceil(kern.bm) as u32,
        n.div_ceil(kern.bn) as u32,
        splits as u32,
    );
    // SAFETY: argument order and types match gemm_bf16, gemm_bf16_n128 and gemm_wg_bf16[_m256];
    // lengths, K % 8 and alignment checked above; edge tiles are zero-filled and masked in the
    // kernel; `live` is only read; with splits > 1 the kernel writes splits·N·M ≤
    // SCRATCH_GEMM_PART floats of part; the warpgroup kernels' shared memory limit was raised to
    // kern.smem when the module was loaded.
    gpu.launched(kernel, unsafe {
        l.launch(cfg(grid, kern.threads, kern.smem))
    })?;
    if splits == 1 {
        return Ok(());
    }
    // out = Σ_z part[z] in z order (no bias, no accumulate).
    super::grad_kernels::reduce_splits(gpu, out, part, None, (ni, mi, mi), splits, false, live)
}

/// A gemm launch's (N, M, K) as kernel ints, its row tiles of `bn` within the grid's y limit.
fn gemm_dims(kernel: &str, bn: usize, (n, m, k): (usize, usize, usize)) -> Result<(i32, i32, i32)> {
    if n.div_ceil(bn) > 65535 {
        return Err(Error::Input(format!(
            "{kernel}: at most {} rows, found {n}",
            65535 * bn
        )));
    }
    Ok((
        int(kernel, "N", n)?,
        int(kernel, "M", m)?,
        int(kernel, "K", k)?,
    ))
}

/// act bf16 [N, F] = silu(x·W_gateᵀ) · (x·W_upᵀ), W = [gate; up] bf16 [2F, K], by the glu twin
/// of `tile`'s kernel (`gemm_glu_bf16` and the others in gemm.cu and gemm_wgmma.cu): the sums and
/// SiLU·mul of `gemm_with` then `silu_mul`, bit for bit, without their f32 [N, 2F] round trip.
/// Ok(false), with nothing launched, where that gemm would split K (decode batches) or `tile` is
/// cuBLASLt: the caller takes that path. `live` as in `gemm_with`.
pub fn gemm_glu(
    gpu: &Gpu,
    act: &mut CudaViewMut<'_, bf16>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (n, f, k): (usize, usize, usize),
    tile: GemmTile,
    live: Option<&CudaView<'_, i32>>,
) -> Result<bool> {
    let tile = tile.resolve(gpu, live.is_some());
    let (Some(kern), Some(plain)) = (tile.kernel(true), tile.kernel(false)) else {
        return Ok(false);
    };
    let part = super::SCRATCH_GEMM_PART;
    if gemm_split((n, 2 * f, k), &plain, gpu.sms, live.is_some(), part).0 > 1 {
        return Ok(false);
    }
    let kernel = kern.name;
    check(kernel, "act", act.len(), n * f, "[N, F]")?;
    product_checks(gpu, kernel, x, w, (n, 2 * f, k))?;
    if n == 0 || f == 0 {
        return Ok(true);
    }
    let (ni, fi, ki) = gemm_dims(kernel, kern.bn, (n, f, k))?;
    let func = gpu.func(kernel)?;
    let mut l = Launch::new(gpu, func);
    l.arg(act)
        .arg(x)
        .arg(w)
        .arg(&ni)
        .arg(&fi)
        .arg(&ki)
        .arg(&live)
        .tag(k);
    let grid = (
        f.div_ceil(kern.bm / 2) as u32,
        n.div_ceil(kern.bn) as u32,
        1,
    );
    // SAFETY: argument order and types match gemm_glu_bf16[_n128] and gemm_glu_wg_bf16[_m256];
    // lengths, K % 8 and alignment checked above; edge tiles are zero-filled and masked in the
    // kernel; `live` is only read; the warpgroup kernels' shared memory limit was raised to
    // kern.smem when the module was loaded.
    gpu.launched(kernel, unsafe {
        l.launch(cfg(grid, kern.threads, kern.smem))
    })?;
    Ok(true)
}

/// out f32 [N, M] = x bf16 [N, K] · W bf16 [M, K]ᵀ: `gemv` for N ≤ `gemv_rows()` (32, or 64);
/// below `gemm_from()` rows, `gemv` over groups of that many rows (the weights are streamed once per group,
/// which beat the 64×128-tile `gemm` before it split K: its grid was a few dozen blocks for these
/// skinny products); `gemm` from there.
pub fn matmul(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    n: usize,
    m: usize,
    k: usize,
) -> Result<()> {
    matmul_live(gpu, out, x, w, (n, m, k), None)
}

/// [`matmul`] where only rows < live[0] (i32 [1] on the device, when given) are needed: the
/// kernels skip row groups and tiles past them (rows past them hold whatever the kernels left).
pub fn matmul_live(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (n, m, k): (usize, usize, usize),
    live: Option<&CudaView<'_, i32>>,
) -> Result<()> {
    let group = |row0| live.map(|count| Live { count, row0 });
    if (1..=gemv_rows()).contains(&n) {
        return gemv_live(gpu, out, x, w, (n, m, k), group(0), GemvWarps::from_env());
    }
    if n >= gemm_from() || out.len() != n * m || x.len() != n * k {
        return gemm_with(gpu, out, x, w, n, m, k, GemmTile::from_env(), live);
    }
    row_groups(n, |r0, rows| {
        gemv_live(
            gpu,
            &mut out.slice_mut(r0 * m..(r0 + rows) * m),
            &x.slice(r0 * k..(r0 + rows) * k),
            w,
            (rows, m, k),
            group(r0),
            GemvWarps::from_env(),
        )
    })
}

/// Calls `f(first row, rows)` for consecutive groups of at most `gemv_rows()` of `n` rows.
fn row_groups(n: usize, mut f: impl FnMut(usize, usize) -> Result<()>) -> Result<()> {
    let mut r0 = 0;
    while r0 < n {
        let rows = gemv_rows().min(n - r0);
        f(r0, rows)?;
        r0 += rows;
    }
    Ok(())
}

/// act bf16 [N, F] = silu(x·W[..F]ᵀ) · (x·W[F..]ᵀ) for the MLP, W bf16 [2F, K] (gate rows first):
/// `gemv_glu` below `gemm_from()` rows (in groups of `gemv_rows()`), else `gemm` into gate_up f32 [N, 2F]
/// then `silu_mul`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_glu(
    gpu: &Gpu,
    act: &mut CudaViewMut<'_, bf16>,
    gate_up: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    n: usize,
    f: usize,
    k: usize,
) -> Result<()> {
    matmul_glu_live(gpu, act, gate_up, x, w, (n, f, k), None)
}

/// [`matmul_glu`] where only rows < live[0] (i32 [1] on the device, when given) are needed.
pub fn matmul_glu_live(
    gpu: &Gpu,
    act: &mut CudaViewMut<'_, bf16>,
    gate_up: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (n, f, k): (usize, usize, usize),
    live: Option<&CudaView<'_, i32>>,
) -> Result<()> {
    if n >= gemm_from() || act.len() != n * f || x.len() != n * k {
        let tile = GemmTile::from_env();
        if gemm_glu(gpu, act, x, w, (n, f, k), tile, live)? {
            return Ok(());
        }
        return gemm_then_silu_mul(gpu, act, gate_up, x, w, (n, f, k), tile, live);
    }
    row_groups(n, |r0, rows| {
        gemv_glu_live(
            gpu,
            &mut act.slice_mut(r0 * f..(r0 + rows) * f),
            &x.slice(r0 * k..(r0 + rows) * k),
            w,
            (rows, f, k),
            live.map(|count| Live { count, row0: r0 }),
            GemvWarps::from_env(),
        )
    })
}

/// The unfused gate|up product: `gemm_with` into gate_up f32 [N, 2F], then `silu_mul` into act
/// bf16 [N, F] (the path where `gemm_glu` declines, and its reference).
#[allow(clippy::too_many_arguments)]
pub fn gemm_then_silu_mul(
    gpu: &Gpu,
    act: &mut CudaViewMut<'_, bf16>,
    gate_up: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    (n, f, k): (usize, usize, usize),
    tile: GemmTile,
    live: Option<&CudaView<'_, i32>>,
) -> Result<()> {
    gemm_with(gpu, gate_up, x, w, n, 2 * f, k, tile, live)?;
    silu_mul(gpu, act, &gate_up.as_view(), n, f, live)
}

/// out bf16 [T, F] = silu(gate) · up, gate_up f32 [T, 2F] (gate first). `live` (i32 [1] on the
/// device, when given): rows t ≥ live[0] are skipped.
pub fn silu_mul(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, bf16>,
    gate_up: &CudaView<'_, f32>,
    t: usize,
    f: usize,
    live: Option<&CudaView<'_, i32>>,
) -> Result<()> {
    const K: &str = "silu_mul_bf16";
    check(K, "out", out.len(), t * f, "[T, F]")?;
    check(K, "gate_up", gate_up.len(), t * 2 * f, "[T, 2F]")?;
    if t * f == 0 {
        return Ok(());
    }
    let (ti, fi) = (int(K, "T", t)?, int(K, "F", f)?);
    let blocks = (t * f).div_ceil(256).min(1 << 16) as u32;
    let func = gpu.func(K)?;
    let mut b = Launch::new(gpu, func);
    b.arg(out).arg(gate_up).arg(&ti).arg(&fi).arg(&live);
    // SAFETY: argument order and types match silu_mul_bf16; lengths checked above (grid-stride
    // loop); `live` is only read.
    gpu.launched(K, unsafe { b.launch(cfg((blocks, 1, 1), 256, 0)) })
}

/// ids i32 [B] = first index of the row maximum of logits f32 [B, V]. `live` (i32 [1] on the
/// device, when given): rows b ≥ live[0] are skipped (their ids keep their old values).
pub fn argmax(
    gpu: &Gpu,
    ids: &mut CudaViewMut<'_, i32>,
    logits: &CudaView<'_, f32>,
    b: usize,
    v: usize,
    live: Option<&CudaView<'_, i32>>,
) -> Result<()> {
    const K: &str = "argmax_f32";
    check(K, "ids", ids.len(), b, "[B]")?;
    check(K, "logits", logits.len(), b * v, "[B, V]")?;
    if b == 0 {
        return Ok(());
    }
    if v == 0 {
        return Err(Error::Input(format!("{K}: vocabulary of 0 entries")));
    }
    // About 8 columns per thread (two steps of ARGMAX_UNROLL loads): 75 blocks per row of a
    // 151,936-entry vocabulary.
    let nb = v.div_ceil(2048).clamp(1, 1024);
    if b > super::SCRATCH_COUNTERS || b * nb > super::SCRATCH_PARTIALS || b > 65535 {
        return Err(Error::Input(format!(
            "{K}: {b} rows × {nb} blocks exceed the scratch space ({} rows, {} partials)",
            super::SCRATCH_COUNTERS.min(65535),
            super::SCRATCH_PARTIALS
        )));
    }
    let vi = int(K, "V", v)?;
    let f = gpu.func(K)?;
    let sc = &gpu.scratch;
    let mut l = Launch::new(gpu, f);
    l.arg(ids)
        .arg(logits)
        .arg(&vi)
        .arg(&sc.arg_v)
        .arg(&sc.arg_i)
        .arg(&sc.counters)
        .arg(&live);
    // SAFETY: argument order and types match argmax_f32; lengths checked above; the partials
    // hold B·NB entries and the counters B (checked), zero between launches (skipped rows leave
    // theirs untouched).
    gpu.launched(K, unsafe {
        l.launch(cfg((nb as u32, b as u32, 1), 256, 0))
    })
}

/// out f32 [B, C] = logits[b, ids[b, c]] (−inf for ids outside [0, V)).  logits f32 [B, V], ids i32 [B, C].
pub fn logits_at(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    logits: &CudaView<'_, f32>,
    ids: &CudaView<'_, i32>,
    b: usize,
    c: usize,
    v: usize,
) -> Result<()> {
    const K: &str = "logits_at_f32";
    check(K, "out", out.len(), b * c, "[B, C]")?;
    check(K, "logits", logits.len(), b * v, "[B, V]")?;
    check(K, "ids", ids.len(), b * c, "[B, C]")?;
    if b * c == 0 {
        return Ok(());
    }
    let (bi, ci, vi) = (int(K, "B", b)?, int(K, "C", c)?, int(K, "V", v)?);
    let f = gpu.func(K)?;
    let mut l = Launch::new(gpu, f);
    l.arg(out).arg(logits).arg(ids).arg(&bi).arg(&ci).arg(&vi);
    // SAFETY: argument order and types match logits_at_f32; lengths checked above; ids are
    // range-checked in the kernel.
    gpu.launched(K, unsafe {
        l.launch(cfg(((b * c).div_ceil(256) as u32, 1, 1), 256, 0))
    })
}

/// Fills `x` with NaN (every byte 0xFF, a quiet NaN as f32), in stream order: device memory that
/// must be written before it is read, so that a read of an unwritten element shows.
pub fn fill_nan(gpu: &Gpu, x: &mut cudarc::driver::CudaSlice<f32>) -> Result<()> {
    use cudarc::driver::DevicePtrMut;
    let n = x.len() * 4;
    if n == 0 {
        return Ok(());
    }
    let stream = &gpu.stream;
    gpu.bind()?; // the raw call below runs in the current context
    let (ptr, _sync) = x.device_ptr_mut(stream);
    // SAFETY: ptr addresses the n bytes of a live allocation on this stream's context (kept
    // alive by the borrow of x); all-ones bytes are a valid f32 (a NaN).
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, n, stream.cu_stream()) }
        .map_err(super::cuda_err("filling with NaN"))
}

/// out bf16 [n] = offset + scale·u, u uniform in [−1, 1) from a hash of (seed, index).
pub fn fill_random(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, bf16>,
    seed: u64,
    offset: f32,
    scale: f32,
) -> Result<()> {
    const K: &str = "fill_random_bf16";
    let n = out.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(256).min(1 << 16) as u32;
    let f = gpu.func(K)?;
    let mut b = Launch::new(gpu, f);
    b.arg(out).arg(&n).arg(&seed).arg(&offset).arg(&scale);
    // SAFETY: argument order and types match fill_random_bf16; it writes exactly n elements.
    gpu.launched(K, unsafe { b.launch(cfg((blocks, 1, 1), 256, 0)) })
}

#[cfg(test)]
mod tests {
    use super::{gemm_split, GemmKernel, GemmTile, GemvWarps};

    const H100_SMS: usize = 132;
    const PART: usize = 1 << 23;

    #[test]
    fn eight_warp_gemv_blocks_only_for_grids_of_two_blocks_per_sm() {
        // Qwen2.5-1.5B: o / down (1536 outputs, 96 blocks) keep 16 warps; gate|up (8960
        // features, 1120 blocks) and the LM head take 8; forced choices pass through.
        let auto = GemvWarps::W8Wide;
        assert_eq!(auto.for_grid(96, H100_SMS), GemvWarps::W16);
        assert_eq!(auto.for_grid(263, H100_SMS), GemvWarps::W16);
        assert_eq!(auto.for_grid(264, H100_SMS), GemvWarps::W8);
        assert_eq!(auto.for_grid(1120, H100_SMS), GemvWarps::W8);
        assert_eq!(GemvWarps::W8.for_grid(5, H100_SMS), GemvWarps::W8);
        assert_eq!(GemvWarps::W16.for_grid(9496, H100_SMS), GemvWarps::W16);
    }

    #[test]
    fn gemm_splits_k_for_decode_batches_only() {
        // Prefill chunks and large batches fill the GPU with output tiles: no split.
        assert_eq!(
            gemm_split((512, 2048, 1536), &n64(), H100_SMS, false, PART).0,
            1
        );
        assert_eq!(
            gemm_split((704, 151_936, 1536), &n64(), H100_SMS, false, PART).0,
            1
        );
        // Batch 64, Qwen2.5-1.5B down product (M 1536, K 8960): 12 tiles, 16 splits of 18 k
        // tiles (the last of 10): 192 blocks.
        assert_eq!(
            gemm_split((64, 1536, 8960), &n64(), H100_SMS, false, PART),
            (16, 18)
        );
        // q|k|v (K 1536): at most K / (8·N) = 3 splits, so partials stay under half the weights.
        assert_eq!(
            gemm_split((64, 2048, 1536), &n64(), H100_SMS, false, PART).0,
            3
        );
        // The warpgroup kernel's 128 × 128 tiles of 64-wide k: the same 12 output tiles, 140 k
        // tiles in 16 splits of 9.
        let wg = GemmTile::Wg.kernel(false).unwrap();
        assert_eq!(
            gemm_split((64, 1536, 8960), &wg, H100_SMS, false, PART),
            (16, 9)
        );
        // Every split has at least 256 of k and together the splits cover K exactly.
        for &(n, m, k) in &[
            (40, 300, 4096),
            (50, 260, 8 * 421),
            (33, 1536, 8960),
            (64, 4096, 14336),
        ] {
            for kern in [n64(), wg] {
                let (splits, per) = gemm_split((n, m, k), &kern, H100_SMS, false, PART);
                let nk = k.div_ceil(kern.bk);
                assert!((1..=16).contains(&splits), "{n}x{m}x{k}: {splits} splits");
                assert!(
                    splits == 1 || per * kern.bk >= 256,
                    "{n}x{m}x{k} {}: {per} k tiles per split",
                    kern.name
                );
                assert!((splits - 1) * per < nk && splits * per >= nk, "{n}x{m}x{k}");
                assert!(splits * n * m <= PART || splits == 1);
            }
        }
    }

    fn n64() -> GemmKernel {
        GemmTile::N64.kernel(false).unwrap()
    }

    #[test]
    fn gemm_split_with_a_live_count_is_sized_for_two_row_tiles() {
        // The gate-first candidate pass at batch 64 (640 rows, most past the live count): the
        // down product splits as for 128 rows, within the scratch indexed by all 640.
        let (splits, _) = gemm_split((640, 1536, 8960), &n64(), H100_SMS, true, PART);
        assert_eq!(splits, 8);
        assert!(splits * 640 * 1536 <= PART);
        // Without the live count the 10 row tiles of 640 rows are too many rows to split.
        assert_eq!(
            gemm_split((640, 1536, 8960), &n64(), H100_SMS, false, PART).0,
            1
        );
        // A small scratch caps the split.
        assert_eq!(
            gemm_split((640, 1536, 8960), &n64(), H100_SMS, true, 2 * 640 * 1536).0,
            2
        );
    }
}
