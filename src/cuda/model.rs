//! The decoder (Qwen2 / Llama) on the GPU: bf16 weights uploaded once (q|k|v and gate|up fused
//! into one matrix each), every activation and the KV cache preallocated for `max_t` tokens per
//! call, and the forward pass as a flat list of kernel launches. Decode steps without hooks are
//! captured once per row count (and stashed residual point, `greedy_capture`) as a CUDA graph
//! and replayed; only ids, positions and slots travel to the device, and only logits, or greedy
//! ids (with the stashed residual rows), come back.
//!
//! Residual points as in `model.rs`: point p is the residual after p blocks. The fused
//! `residual_norm` kernel at the start of block p (or the final norm, p = N) adds the previous
//! block's MLP output, so that kernel is where point p is steered and captured.

use super::kernels::{self as k, AttnShape, SaeEncode, Steer};
use super::{cuda_err as cu, Gpu};
use crate::config::{Arch, Config};
use crate::engine::{check_step, Decoder, SteerRows};
use crate::model::{Hooks, Slots, Step};
use crate::weights::WeightFiles;
use crate::Result;
use cudarc::driver::{CudaGraph, CudaSlice};
use half::bf16;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

pub struct CudaLayer {
    pub input_layernorm: CudaSlice<bf16>,          // [D]
    pub qkv_proj: CudaSlice<bf16>,                 // [(H+2Hkv)·Dh, D]  q | k | v
    pub qkv_bias: Option<CudaSlice<f32>>,          // [(H+2Hkv)·Dh]
    pub o_proj: CudaSlice<bf16>,                   // [D, H·Dh]
    pub post_attention_layernorm: CudaSlice<bf16>, // [D]
    pub gate_up_proj: CudaSlice<bf16>,             // [2F, D]  gate | up
    pub down_proj: CudaSlice<bf16>,                // [D, F]
}

pub struct CudaWeights {
    pub embed_tokens: CudaSlice<bf16>, // [V, D]
    pub layers: Vec<CudaLayer>,
    pub norm: CudaSlice<bf16>,            // [D]
    pub lm_head: Option<CudaSlice<bf16>>, // [V, D]; None when tied
}

impl CudaWeights {
    /// Uploads a checkpoint's tensors as bf16, fusing q|k|v and gate|up on the host.
    pub fn load(gpu: &Gpu, files: &WeightFiles, c: &Config) -> Result<CudaWeights> {
        files.check_against(c)?;
        let up = |v: Vec<bf16>| gpu.stream.clone_htod(&v).map_err(cu("uploading weights"));
        let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let mut qkv = files.bf16(&format!("{a}.q_proj.weight"), &[q, d])?;
            qkv.extend(files.bf16(&format!("{a}.k_proj.weight"), &[kv, d])?);
            qkv.extend(files.bf16(&format!("{a}.v_proj.weight"), &[kv, d])?);
            let has_bias = c.arch == Arch::Qwen2 || files.has(&format!("{a}.q_proj.bias"));
            let qkv_bias = if has_bias {
                let mut b = files.f32(&format!("{a}.q_proj.bias"), &[q])?;
                b.extend(files.f32(&format!("{a}.k_proj.bias"), &[kv])?);
                b.extend(files.f32(&format!("{a}.v_proj.bias"), &[kv])?);
                Some(gpu.stream.clone_htod(&b).map_err(cu("uploading biases"))?)
            } else {
                None
            };
            let mut gate_up = files.bf16(&format!("{p}.mlp.gate_proj.weight"), &[f, d])?;
            gate_up.extend(files.bf16(&format!("{p}.mlp.up_proj.weight"), &[f, d])?);
            layers.push(CudaLayer {
                input_layernorm: up(files.bf16(&format!("{p}.input_layernorm.weight"), &[d])?)?,
                qkv_proj: up(qkv)?,
                qkv_bias,
                o_proj: up(files.bf16(&format!("{a}.o_proj.weight"), &[d, q])?)?,
                post_attention_layernorm: up(
                    files.bf16(&format!("{p}.post_attention_layernorm.weight"), &[d])?
                )?,
                gate_up_proj: up(gate_up)?,
                down_proj: up(files.bf16(&format!("{p}.mlp.down_proj.weight"), &[d, f])?)?,
            });
        }
        Ok(CudaWeights {
            embed_tokens: up(files.bf16("model.embed_tokens.weight", &[v, d])?)?,
            layers,
            norm: up(files.bf16("model.norm.weight", &[d])?)?,
            lm_head: if c.tie_word_embeddings {
                None
            } else {
                Some(up(files.bf16("lm_head.weight", &[v, d])?)?)
            },
        })
    }

    /// Random weights of a real shape generated on the device, for benchmarks. Matrices are
    /// uniform in ±sqrt(3/fan_in) (unit-variance outputs), norms near 1, so activations stay
    /// finite and timings are of real arithmetic.
    pub fn random(gpu: &Gpu, c: &Config, seed: u64) -> Result<CudaWeights> {
        let mut n = 0u64;
        let mut rand = |len: usize, offset: f32, scale: f32| -> Result<CudaSlice<bf16>> {
            let mut s = gpu
                .stream
                .alloc_zeros::<bf16>(len)
                .map_err(cu("allocating weights"))?;
            n += 1;
            k::fill_random(
                gpu,
                &mut s.as_view_mut(),
                seed.wrapping_mul(1000).wrapping_add(n),
                offset,
                scale,
            )?;
            Ok(s)
        };
        let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let fan = |k: usize| (3.0 / k as f32).sqrt();
        let mut layers = Vec::new();
        for _ in 0..c.num_hidden_layers {
            let qkv_bias = if c.arch == Arch::Qwen2 {
                Some(
                    gpu.stream
                        .alloc_zeros::<f32>(q + 2 * kv)
                        .map_err(cu("allocating biases"))?,
                )
            } else {
                None
            };
            layers.push(CudaLayer {
                input_layernorm: rand(d, 1.0, 0.1)?,
                qkv_proj: rand((q + 2 * kv) * d, 0.0, fan(d))?,
                qkv_bias,
                o_proj: rand(d * q, 0.0, fan(q))?,
                post_attention_layernorm: rand(d, 1.0, 0.1)?,
                gate_up_proj: rand(2 * f * d, 0.0, fan(d))?,
                down_proj: rand(d * f, 0.0, fan(f))?,
            });
        }
        let w = CudaWeights {
            embed_tokens: rand(v * d, 0.0, 1.0)?,
            layers,
            norm: rand(d, 1.0, 0.1)?,
            lm_head: if c.tie_word_embeddings {
                None
            } else {
                Some(rand(v * d, 0.0, fan(d))?)
            },
        };
        // Kernels read weights before their PDL wait (gemv's first loads), so weights written
        // by a kernel must be complete before any later launch: wait here, once.
        gpu.sync()?;
        Ok(w)
    }
}

/// Every device buffer of a forward call, sized for `max_t` tokens.
pub(crate) struct Acts {
    pub(crate) ids: CudaSlice<i32>,        // [max_t]
    pub(crate) pos: CudaSlice<i32>,        // [max_t]
    pub(crate) slot: CudaSlice<i32>,       // [max_t]
    pub(crate) r: CudaSlice<f32>,          // [max_t, D] residual stream
    pub(crate) y: CudaSlice<bf16>,         // [max_t, D] normalised sublayer input
    pub(crate) qkv: CudaSlice<f32>,        // [max_t, (H+2Hkv)·Dh]
    pub(crate) q: CudaSlice<bf16>,         // [max_t, H, Dh]
    pub(crate) k_self: CudaSlice<bf16>,    // [max_t, Hkv, Dh]
    pub(crate) v_self: CudaSlice<bf16>,    // [max_t, Hkv, Dh]
    pub(crate) part_o: CudaSlice<f32>,     // [max_t, H, splits, Dh]
    pub(crate) part_ml: CudaSlice<f32>,    // [max_t, H, splits, 2]
    pub(crate) attn: CudaSlice<bf16>,      // [max_t, H·Dh]
    pub(crate) o: CudaSlice<f32>,          // [max_t, D] sublayer output
    pub(crate) gate_up: CudaSlice<f32>,    // [max_t, 2F]
    pub(crate) act: CudaSlice<bf16>,       // [max_t, F]
    pub(crate) y_sel: CudaSlice<bf16>,     // [max_t, D] rows picked for the LM head
    pub(crate) logits: CudaSlice<f32>,     // [max_t, V]
    pub(crate) next: CudaSlice<i32>,       // [max_t] greedy ids
    pub(crate) run: CudaSlice<i32>,        // [max_t] first row of each row's run (Step::run_start)
    pub(crate) steer_tab: CudaSlice<f32>, // [max_t, D] dense steering rows (hooks), or SteerRows' vectors
    pub(crate) steer_iota: CudaSlice<i32>, // [max_t] = 0, 1, 2, …
    pub(crate) steer_ones: CudaSlice<f32>, // [max_t] = 1
    pub(crate) hy_idx: CudaSlice<i32>,    // [max_t] steering vector per row (hybrid, SteerRows)
    pub(crate) hy_coef: CudaSlice<f32>, // [max_t] steering coefficient per row (hybrid, SteerRows)
    pub(crate) r_saved: CudaSlice<f32>, // [max_t, D] residuals at the steering point (persistent mode)
    pub(crate) live: CudaSlice<i32>,    // [1] rows in use of a call with `use_live` (hybrid)
    pub(crate) stash: CudaSlice<f32>,   // [max_t, D] residuals at one point (greedy_capture)
    pub(crate) tiles: CudaSlice<i32>,   // [max_t, 5] attention_runs tiles of the uploaded call
    pub(crate) from: CudaSlice<i32>,    // [max_t] slot of each row's kept residual (forward_kept)
}

/// Which steering the residual kernel applies: none, the dense per-row rows of `Hooks`, the
/// loaded steering table indexed per row from device memory (the hybrid step), or the J
/// vectors of a `forward_kept` call in steer_tab, indexed per row (`SteerRows`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SteerSel {
    None,
    Dense,
    Table,
    Rows(usize),
}

/// The SAE of a thinking model on the device (encode fused into the residual kernel).
pub struct SaeDev {
    pub(crate) w_enc: CudaSlice<f32>,        // [D, K]
    pub(crate) b_enc: CudaSlice<f32>,        // [K]
    pub(crate) b_dec: CudaSlice<f32>,        // [D]
    pub(crate) mean: Option<CudaSlice<f32>>, // [D]
    pub(crate) z: CudaSlice<f32>,            // [max_t, K]
    pub(crate) category: CudaSlice<i32>,     // [max_t]
    pub(crate) k: usize,
}

/// The steering set of a base model on the device: rows c·(bias + V[k]) are formed per row.
pub struct SteerDev {
    pub(crate) table: CudaSlice<f32>, // [K, D]: bias + V[k] (or bias alone with --only-bias)
    pub(crate) nv: usize,
}

pub struct CudaEngine {
    pub gpu: Arc<Gpu>,
    pub config: Config,
    /// Shared so that a `CudaVectorGrad` can hold the same weights beside the engine.
    pub w: Arc<CudaWeights>,
    inv_freq: CudaSlice<f32>,      // [Dh/2]
    k_cache: Vec<CudaSlice<bf16>>, // per layer [slots.in_block(l), S, Hkv, Dh]
    v_cache: Vec<CudaSlice<bf16>>, // per layer [slots.in_block(l), S, Hkv, Dh]
    slots: Slots,
    max_len: usize, // S
    pub(crate) max_t: usize,
    splits: usize,
    pub(crate) a: Acts,
    logits_host: Vec<f32>,
    chunk_host: Vec<f32>, // logits of one chunk's rows, reused between calls
    host_i32: Vec<i32>,   // step inputs staged for upload, reused between calls
    /// Replayable decode steps, keyed by token count (all tokens write the cache), whether
    /// RoPE ran inside attention (`fuses_rope`) and the point stashed (`greedy_capture`).
    graphs: HashMap<(usize, bool, Option<usize>), CudaGraph>,
    /// Rows of the logits the last `greedy_capture` left on the device (for `logits_at`).
    captured_rows: usize,
    /// Rows of the step the last call started, when it was a `start_capture`.
    pending: Option<usize>,
    /// `logits_at`'s ids and values on the device, grown to the largest call.
    at_ids: Option<CudaSlice<i32>>,
    at_out: Option<CudaSlice<f32>>,
    pub use_graphs: bool,
    /// (slot, first position) while a call is one contiguous chunk of one sequence (prefill).
    prefill: Option<(usize, usize)>,
    /// Set on a thinking model taking part in the hybrid loop.
    pub sae: Option<SaeDev>,
    /// Set on a base model taking part in the hybrid loop.
    pub hy: Option<SteerDev>,
    /// While set, `block` and `head` need only rows < a.live[0] (written on the device by the
    /// gate-first hybrid step), and the kernels that can skip the others do.
    pub(crate) use_live: bool,
    /// Decode attention by query head or by GQA group (THINKSTEER_ATTN=group, read at creation).
    pub attn: k::DecodeAttn,
    /// Decode calls apply bias + RoPE and append K/V inside the attention kernel (`DecodeIn::Raw`)
    /// instead of a `qkv_rope` launch before it, where the call's rows allow it
    /// (THINKSTEER_ROPE=attn, read at creation, until timed).
    pub rope_in_attention: bool,
    /// With `rope_in_attention`: whether no row of the uploaded call attends a position another
    /// row writes (`Step::rows_independent`); and its scratch.
    rows_independent: bool,
    rows_scratch: Vec<(usize, usize, bool)>,
    /// Whether the uploaded call has read-only runs of more than one token (a.run is then
    /// uploaded and decode attention reads it, or a.tiles and `attention_runs`).
    runs: bool,
    /// Calls with runs attend on the prefill tiles (`attention_runs`: each K/V row loaded once
    /// per 64 queries of a run) instead of the decode kernels (THINKSTEER_RUN_ATTN=decode, read
    /// at creation, until timed).
    pub run_attn: bool,
    /// The uploaded call's tiles (a.tiles) and their host staging.
    n_tiles: usize,
    tiles_host: Vec<i32>,
    /// (point, slots kept, [slots kept, S, D] f32) once `keep_residuals` was called
    /// (`Decoder::forward_kept`).
    kept: Option<(usize, usize, CudaSlice<f32>)>,
}

/// Tokens per forward call of the engines the commands open (the prefill chunk: a longer prompt
/// runs in calls of this many rows): 512, or THINKSTEER_PREFILL_ROWS (16–8192) while
/// measurements decide whether larger calls keep the tensor cores busier (PERFORMANCE.md). The
/// activations grow with it (the logits alone by rows · V · 4 bytes).
pub fn call_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("THINKSTEER_PREFILL_ROWS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| (16..=8192).contains(n))
            .unwrap_or(512)
    })
}

/// Whether the CUDA kernels take this model's shapes (the attention kernels: head_dim 64 or 128).
pub fn supports(c: &Config) -> bool {
    c.head_dim == 64 || c.head_dim == 128
}

/// Bytes the engine will allocate on the device beyond the weights.
pub fn cache_and_activation_bytes(
    c: &Config,
    slots: impl Into<Slots>,
    max_len: usize,
    max_t: usize,
) -> usize {
    let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (h, hkv, dh) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let splits = k::decode_splits(max_len);
    let cache = 2 * slots.into().slot_blocks(c.num_hidden_layers) * max_len * hkv * dh * 2;
    let per_t = d * 4
        + d * 2
        + (h + 2 * hkv) * dh * 4
        + (h + 2 * hkv) * dh * 2
        + h * splits * (dh + 2) * 4
        + h * dh * 2
        + d * 4
        + 2 * f * 4
        + f * 2
        + d * 2
        + v * 4
        + d * 4 // steer_tab
        + d * 4 // r_saved
        + d * 4 // stash
        + 15 * 4; // ids, pos, slot, next, run, steer_iota, steer_ones, hy_idx, hy_coef, tiles (5), from
    cache + per_t * max_t
}

impl CudaEngine {
    /// Loads a checkpoint folder onto the GPU.
    pub fn load(
        gpu: Arc<Gpu>,
        dir: &Path,
        slots: impl Into<Slots>,
        max_len: usize,
        max_t: usize,
    ) -> Result<CudaEngine> {
        let slots = slots.into();
        let config = Config::from_file(&dir.join("config.json"))?;
        let files = WeightFiles::open(dir)?;
        // Before check_fits: a wrong layer count would otherwise read as an out-of-memory.
        files.check_against(&config)?;
        Self::check_fits(
            &gpu,
            &config,
            slots,
            max_len,
            max_t,
            config.param_count() * 2,
        )?;
        let w = CudaWeights::load(&gpu, &files, &config)?;
        Self::new(gpu, config, w, slots, max_len, max_t)
    }

    /// Refuses, before allocating anything, a cache and activations that will not fit the card.
    pub fn check_fits(
        gpu: &Gpu,
        c: &Config,
        slots: impl Into<Slots>,
        max_len: usize,
        max_t: usize,
        weight_bytes: usize,
    ) -> Result<()> {
        let slots = slots.into();
        let need = cache_and_activation_bytes(c, slots, max_len, max_t) + weight_bytes;
        let (free, total) = gpu.mem_info()?;
        if need > free {
            crate::bail!(
                "{} sequences × {max_len} positions need {:.2} GiB on the GPU (weights, KV cache, activations); the card has {:.2} GiB free of {:.2} GiB: lower the batch or the context",
                slots.total(),
                need as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            );
        }
        Ok(())
    }

    pub fn new(
        gpu: Arc<Gpu>,
        config: Config,
        w: impl Into<Arc<CudaWeights>>,
        slots: impl Into<Slots>,
        max_len: usize,
        max_t: usize,
    ) -> Result<CudaEngine> {
        let slots = slots.into();
        let c = &config;
        if !supports(c) {
            crate::bail!(
                "the CUDA attention kernels need head_dim 64 or 128, found {}",
                c.head_dim
            );
        }
        let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (h, hkv, dh) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let splits = k::decode_splits(max_len);
        let s = &gpu.stream;
        let z32 = |n: usize| {
            s.alloc_zeros::<f32>(n)
                .map_err(cu("allocating activations"))
        };
        let z16 = |n: usize| {
            s.alloc_zeros::<bf16>(n)
                .map_err(cu("allocating activations"))
        };
        let zi = |n: usize| {
            s.alloc_zeros::<i32>(n)
                .map_err(cu("allocating activations"))
        };
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for l in 0..c.num_hidden_layers {
            let n_cache = slots.in_block(l) * max_len * hkv * dh;
            k_cache.push(z16(n_cache)?);
            v_cache.push(z16(n_cache)?);
        }
        let idx: Vec<i32> = (0..max_t as i32).collect();
        let a = Acts {
            ids: zi(max_t)?,
            pos: zi(max_t)?,
            slot: zi(max_t)?,
            r: z32(max_t * d)?,
            y: z16(max_t * d)?,
            qkv: z32(max_t * (h + 2 * hkv) * dh)?,
            q: z16(max_t * h * dh)?,
            k_self: z16(max_t * hkv * dh)?,
            v_self: z16(max_t * hkv * dh)?,
            part_o: z32(max_t * h * splits * dh)?,
            part_ml: z32(max_t * h * splits * 2)?,
            attn: z16(max_t * h * dh)?,
            o: z32(max_t * d)?,
            gate_up: z32(max_t * 2 * f)?,
            act: z16(max_t * f)?,
            y_sel: z16(max_t * d)?,
            logits: z32(max_t * v)?,
            next: zi(max_t)?,
            run: zi(max_t)?,
            steer_tab: z32(max_t * d)?,
            steer_iota: s.clone_htod(&idx).map_err(cu("allocating activations"))?,
            steer_ones: s
                .clone_htod(&vec![1f32; max_t])
                .map_err(cu("allocating activations"))?,
            hy_idx: zi(max_t)?,
            hy_coef: z32(max_t)?,
            r_saved: z32(max_t * d)?,
            live: zi(1)?,
            stash: z32(max_t * d)?,
            tiles: zi(max_t * 5)?,
            from: zi(max_t)?,
        };
        let inv_freq = s
            .clone_htod(&c.rope_inv_freq())
            .map_err(cu("uploading RoPE frequencies"))?;
        Ok(CudaEngine {
            config,
            w: w.into(),
            inv_freq,
            k_cache,
            v_cache,
            slots,
            max_len,
            max_t,
            splits,
            a,
            logits_host: vec![],
            chunk_host: vec![],
            host_i32: vec![],
            graphs: HashMap::new(),
            captured_rows: 0,
            pending: None,
            at_ids: None,
            at_out: None,
            use_graphs: !gpu.syncs_each_launch(), // THINKSTEER_CUDA_SYNC=1: every kernel eagerly
            prefill: None,
            sae: None,
            hy: None,
            use_live: false,
            attn: k::DecodeAttn::from_env(),
            rope_in_attention: std::env::var("THINKSTEER_ROPE").is_ok_and(|v| v == "attn"),
            rows_independent: false,
            rows_scratch: vec![],
            runs: false,
            run_attn: std::env::var("THINKSTEER_RUN_ATTN").map_or(true, |v| v != "decode"),
            n_tiles: 0,
            tiles_host: vec![],
            kept: None,
            gpu,
        })
    }

    /// The attention shape of block `l` (its cache's slots).
    fn shape(&self, l: usize) -> AttnShape {
        let c = &self.config;
        AttnShape {
            h: c.num_attention_heads,
            hkv: c.num_key_value_heads,
            dh: c.head_dim,
            slots: self.slots.in_block(l),
            s: self.max_len,
        }
    }

    /// Uploads ids (none for a call from the kept residuals), positions and slots of one call
    /// (≤ max_t tokens).
    pub(crate) fn upload_step(&mut self, ids: &[u32], step: &Step) -> Result<()> {
        let (n, t) = (ids.len(), step.positions.len());
        // The logits and ids a `greedy_capture` left are about to be overwritten.
        self.captured_rows = 0;
        self.pending = None;
        // One reused host buffer [ids | positions | slots], so a step allocates nothing here.
        let h = &mut self.host_i32;
        h.clear();
        h.extend(ids.iter().map(|&i| i as i32));
        h.extend(step.positions.iter().map(|&p| p as i32));
        h.extend(step.slots.iter().map(|&p| p as i32));
        let s = &self.gpu.stream;
        if n > 0 {
            s.memcpy_htod(&h[..n], &mut self.a.ids.slice_mut(..n))
                .map_err(cu("uploading ids"))?;
        }
        s.memcpy_htod(&h[n..n + t], &mut self.a.pos.slice_mut(..t))
            .map_err(cu("uploading positions"))?;
        s.memcpy_htod(&h[n + t..], &mut self.a.slot.slice_mut(..t))
            .map_err(cu("uploading slots"))?;
        // Only asked for where it is used (a sort of the call's rows).
        self.rows_independent =
            self.rope_in_attention && step.rows_independent(&mut self.rows_scratch);
        self.runs = step.has_runs();
        if self.runs {
            h.clear();
            h.extend((0..t).map(|x| step.run_of(x) as i32));
            s.memcpy_htod(&h[..t], &mut self.a.run.slice_mut(..t))
                .map_err(cu("uploading runs"))?;
        }
        // The tiles, for read-only runs or chunks of written rows (several sequences' prompts,
        // window-0 prefixes; one chunk alone takes the prefill kernel instead).
        self.n_tiles = 0;
        if self.run_attn
            && (self.runs || step.n_write > 1)
            && k::run_tiles(step, &mut self.tiles_host)
        {
            let n = self.tiles_host.len();
            s.memcpy_htod(&self.tiles_host, &mut self.a.tiles.slice_mut(..n))
                .map_err(cu("uploading attention tiles"))?;
            self.n_tiles = n / 5;
        }
        Ok(())
    }

    /// The residual_norm kernel that closes point `p` for rows `rows`: adds the previous block's
    /// MLP output (when `add_mlp`), steers (`steer`), runs the SAE encode when `sae` is set and
    /// this engine holds an SAE, and normalises into y with the next block's input norm (the
    /// final norm at p = N). `capture` copies the rows' residual to the host.
    pub(crate) fn close_point(
        &mut self,
        rows: Range<usize>,
        p: usize,
        add_mlp: bool,
        steer: SteerSel,
        sae: bool,
        capture: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let c = &self.config;
        let (d, n, t) = (c.hidden_size, c.num_hidden_layers, rows.len());
        let (r0, r1) = (rows.start, rows.end);
        let a = &mut self.a;
        let w = if p < n {
            &self.w.layers[p].input_layernorm
        } else {
            &self.w.norm
        };
        let dense = (
            a.steer_tab.slice(r0 * d..r1 * d),
            a.steer_iota.slice(..t),
            a.steer_ones.slice(..t),
        );
        let hy = (a.hy_idx.slice(r0..r1), a.hy_coef.slice(r0..r1));
        let rows_tab = match steer {
            SteerSel::Rows(nv) => a.steer_tab.slice(..nv * d),
            _ => a.steer_tab.slice(..0),
        };
        let table = self.hy.as_ref().map(|h| (h.table.as_view(), h.nv));
        let st = match (steer, table.as_ref()) {
            (SteerSel::None, _) => None,
            (SteerSel::Dense, _) => Some(Steer {
                table: &dense.0,
                coef: &dense.2,
                idx: &dense.1,
                nv: t,
            }),
            (SteerSel::Table, Some((tv, nv))) => Some(Steer {
                table: tv,
                coef: &hy.1,
                idx: &hy.0,
                nv: *nv,
            }),
            (SteerSel::Table, None) => crate::bail!("this engine holds no steering set"),
            (SteerSel::Rows(nv), _) => Some(Steer {
                table: &rows_tab,
                coef: &hy.1,
                idx: &hy.0,
                nv,
            }),
        };
        let x = a.o.slice(r0 * d..r1 * d);
        // SAE encode of the closed residual (the thinking model at its SAE layer).
        let sae_dev = if sae { self.sae.as_mut() } else { None };
        let mut views = sae_dev.map(|s| {
            let k = s.k;
            let v = (
                s.w_enc.as_view(),
                s.b_enc.as_view(),
                s.b_dec.as_view(),
                s.mean.as_ref().map(|m| m.as_view()),
            );
            (
                v,
                s.z.slice_mut(r0 * k..r1 * k),
                s.category.slice_mut(r0..r1),
                k,
            )
        });
        let mut enc = views
            .as_mut()
            .map(|((we, be, bd, mean), z, cat, k)| SaeEncode {
                w_enc: we,
                b_enc: be,
                b_dec: bd,
                mean: mean.as_ref(),
                z,
                category: cat,
                k: *k,
            });
        k::residual_norm(
            &self.gpu,
            &mut a.r.slice_mut(r0 * d..r1 * d),
            if add_mlp { Some(&x) } else { None },
            st.as_ref(),
            &w.as_view(),
            Some(&mut a.y.slice_mut(r0 * d..r1 * d)),
            enc.as_mut(),
            t,
            d,
            c.rms_norm_eps,
        )?;
        if let Some(buf) = capture {
            buf.resize(t * d, 0.0);
            self.gpu
                .stream
                .memcpy_dtoh(&a.r.slice(r0 * d..r1 * d), buf.as_mut_slice())
                .map_err(cu("capturing the residual"))?;
            self.gpu.sync()?;
        }
        Ok(())
    }

    /// Decoder block l over rows 0..t (attention then MLP), from y = norm(r) to o = the MLP
    /// output, which the next `close_point` adds to r. Rows 0..n_write append their K/V. With
    /// `use_live`, the products, attention and SiLU·mul skip rows ≥ a.live[0].
    pub(crate) fn block(&mut self, t: usize, l: usize, n_write: usize) -> Result<()> {
        let c = &self.config;
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (h, hkv, dh) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (wq, sh, splits) = ((h + 2 * hkv) * dh, self.shape(l), self.splits);
        let fused = self.fuses_rope();
        let g = &self.gpu;
        let (a, w) = (&mut self.a, &self.w.layers[l]);
        let live = self.use_live.then(|| a.live.as_view());
        let live = live.as_ref();
        // Attention: fused q|k|v product, bias + RoPE + cache append (inside decode attention
        // when `fused`), attention, o_proj.
        k::matmul_live(
            g,
            &mut a.qkv.slice_mut(..t * wq),
            &a.y.slice(..t * d),
            &w.qkv_proj.as_view(),
            (t, wq, d),
            live,
        )?;
        let bias = w.qkv_bias.as_ref().map(|b| b.as_view());
        if !fused {
            k::qkv_rope(
                g,
                &a.qkv.slice(..t * wq),
                bias.as_ref(),
                &self.inv_freq.as_view(),
                &a.pos.slice(..t),
                &a.slot.slice(..t),
                n_write,
                &mut a.q.slice_mut(..t * h * dh),
                &mut a.k_self.slice_mut(..t * hkv * dh),
                &mut a.v_self.slice_mut(..t * hkv * dh),
                &mut self.k_cache[l].as_view_mut(),
                &mut self.v_cache[l].as_view_mut(),
                t,
                sh,
            )?;
        }
        match self.prefill {
            // A contiguous chunk of one sequence: tiled causal attention over the cache.
            Some((slot, p0)) => k::attention_prefill(
                g,
                &a.q.slice(..t * h * dh),
                &self.k_cache[l].as_view(),
                &self.v_cache[l].as_view(),
                &mut a.attn.slice_mut(..t * h * dh),
                t,
                p0,
                slot,
                sh,
            )?,
            // Read-only runs: the same tiles, each run's queries over its cache prefix and its
            // own K/V (RoPE is never fused with runs).
            None if self.n_tiles > 0 && !fused => k::attention_runs(
                g,
                &a.q.slice(..t * h * dh),
                &self.k_cache[l].as_view(),
                &self.v_cache[l].as_view(),
                &a.k_self.slice(..t * hkv * dh),
                &a.v_self.slice(..t * hkv * dh),
                &mut a.attn.slice_mut(..t * h * dh),
                &a.tiles.slice(..self.n_tiles * 5),
                t,
                sh,
            )?,
            None => {
                let (qkv, inv_freq) = (a.qkv.slice(..t * wq), self.inv_freq.as_view());
                let run = self.runs.then(|| a.run.slice(..t));
                let (q, k_self) = (a.q.slice(..t * h * dh), a.k_self.slice(..t * hkv * dh));
                let v_self = a.v_self.slice(..t * hkv * dh);
                let input = if fused {
                    k::DecodeIn::Raw {
                        qkv: &qkv,
                        bias: bias.as_ref(),
                        inv_freq: &inv_freq,
                        n_write,
                    }
                } else {
                    k::DecodeIn::Rotated {
                        q: &q,
                        k_self: &k_self,
                        v_self: &v_self,
                    }
                };
                k::attention_decode(
                    g,
                    input,
                    &mut self.k_cache[l].as_view_mut(),
                    &mut self.v_cache[l].as_view_mut(),
                    &a.pos.slice(..t),
                    &a.slot.slice(..t),
                    &mut a.part_o.slice_mut(..t * h * splits * dh),
                    &mut a.part_ml.slice_mut(..t * h * splits * 2),
                    &mut a.attn.slice_mut(..t * h * dh),
                    t,
                    sh,
                    splits,
                    live,
                    run.as_ref(),
                    self.attn,
                )?
            }
        }
        k::matmul_live(
            g,
            &mut a.o.slice_mut(..t * d),
            &a.attn.slice(..t * h * dh),
            &w.o_proj.as_view(),
            (t, d, h * dh),
            live,
        )?;
        // MLP: r += o; y = norm(r); o = down(silu(gate) · up), the gate|up product and SiLU·mul fused.
        let o = a.o.slice(..t * d);
        k::residual_norm(
            g,
            &mut a.r.slice_mut(..t * d),
            Some(&o),
            None,
            &w.post_attention_layernorm.as_view(),
            Some(&mut a.y.slice_mut(..t * d)),
            None,
            t,
            d,
            c.rms_norm_eps,
        )?;
        k::matmul_glu_live(
            g,
            &mut a.act.slice_mut(..t * f),
            &mut a.gate_up.slice_mut(..t * 2 * f),
            &a.y.slice(..t * d),
            &w.gate_up_proj.as_view(),
            (t, f, d),
            live,
        )?;
        k::matmul_live(
            g,
            &mut a.o.slice_mut(..t * d),
            &a.act.slice(..t * f),
            &w.down_proj.as_view(),
            (t, d, f),
            live,
        )
    }

    /// Drops the captured decode graphs (they are captured again at their next use).
    pub fn clear_graphs(&mut self) {
        self.graphs.clear();
    }

    /// Whether `block` applies RoPE inside decode attention for the uploaded call.
    pub(crate) fn fuses_rope(&self) -> bool {
        self.rope_in_attention && self.prefill.is_none() && self.rows_independent
    }

    /// r = embed(ids) for the uploaded rows 0..t.
    pub(crate) fn embed(&mut self, t: usize) -> Result<()> {
        let (d, v) = (self.config.hidden_size, self.config.vocab_size);
        k::embed(
            &self.gpu,
            &mut self.a.r.slice_mut(..t * d),
            &self.w.embed_tokens.as_view(),
            &self.a.ids.slice(..t),
            t,
            d,
            v,
        )
    }

    /// Every launch of one forward call over the uploaded step (t tokens, the first n_write
    /// appending to the cache), ending with the final norm in y. `hooks` may steer and capture;
    /// `stash` copies the residual at that point to a.stash on the device (graph-capturable).
    fn layers(
        &mut self,
        t: usize,
        n_write: usize,
        hooks: &mut Hooks,
        stash: Option<usize>,
    ) -> Result<()> {
        let (d, n) = (self.config.hidden_size, self.config.num_hidden_layers);
        let steer_at = hooks.steer.map(|(p, _)| p);
        if let Some((_, add)) = hooks.steer {
            if add.len() != t * d {
                crate::bail!(
                    "steering rows: expected [T={t}, D={d}] = {} values, found {}",
                    t * d,
                    add.len()
                );
            }
            self.gpu
                .stream
                .memcpy_htod(add, &mut self.a.steer_tab.slice_mut(..t * d))
                .map_err(cu("uploading steering"))?;
        }
        self.embed(t)?;
        // Unsteered rows that write the cache keep their residual at the kept point.
        let keep_at = self.kept.as_ref().map(|k| k.0);
        let keep_at = keep_at.filter(|_| steer_at.is_none() && n_write > 0);
        for l in 0..=n {
            let steer = if steer_at == Some(l) {
                SteerSel::Dense
            } else {
                SteerSel::None
            };
            let cap = hooks
                .capture
                .iter_mut()
                .find(|(p, _)| *p == l)
                .map(|(_, b)| b);
            self.close_point(0..t, l, l > 0, steer, false, cap)?;
            if keep_at == Some(l) {
                self.keep(n_write, k::Keep::Store)?;
            }
            if stash == Some(l) {
                let a = &mut self.a;
                self.gpu
                    .stream
                    .memcpy_dtod(&a.r.slice(..t * d), &mut a.stash.slice_mut(..t * d))
                    .map_err(cu("stashing the residual"))?;
            }
            if l < n {
                self.block(t, l, n_write)?;
            }
        }
        Ok(())
    }

    /// The launches of `forward_kept`, up to the logits of `logit_rows` in a.logits.
    fn kept_launches(
        &mut self,
        step: &Step,
        steer: &SteerRows,
        logit_rows: &[usize],
    ) -> Result<()> {
        let p = crate::engine::check_kept(
            &self.config,
            self.kept.as_ref().map(|k| (k.0, k.1)),
            step,
            steer,
            logit_rows,
            self.slots,
            self.max_len,
        )?;
        let c = &self.config;
        let (t, d, n) = (step.positions.len(), c.hidden_size, c.num_hidden_layers);
        let nv = steer.vecs.len() / d;
        if t > self.max_t || nv > self.max_t || logit_rows.len() > self.max_t {
            crate::bail!(
                "a call of {t} tokens, {nv} steering vectors and {} logit rows from the kept residuals exceeds the engine's {} tokens per call",
                logit_rows.len(),
                self.max_t
            );
        }
        self.upload_step(&[], step)?;
        // The J vectors, each row's vector and coefficient, and the slot of its kept residual.
        let s = &self.gpu.stream;
        let from: Vec<i32> = (0..t).map(|i| steer.from_slot(i, step) as i32).collect();
        s.memcpy_htod(&from, &mut self.a.from.slice_mut(..t))
            .map_err(cu("uploading kept slots"))?;
        s.memcpy_htod(steer.vecs, &mut self.a.steer_tab.slice_mut(..nv * d))
            .map_err(cu("uploading steering"))?;
        let idx: Vec<i32> = steer.idx.iter().map(|&j| j as i32).collect();
        s.memcpy_htod(&idx, &mut self.a.hy_idx.slice_mut(..t))
            .map_err(cu("uploading steering"))?;
        s.memcpy_htod(steer.coef, &mut self.a.hy_coef.slice_mut(..t))
            .map_err(cu("uploading steering"))?;
        // r = kept residual + steering at point p, then the blocks p.. as in `layers`; rows
        // 0..n_write append their K/V (a chunk of one sequence: the prefill attention).
        self.keep(t, k::Keep::Load)?;
        self.prefill = prefill_chunk(step);
        let res = (p..=n).try_for_each(|l| {
            let sel = if l == p {
                SteerSel::Rows(nv)
            } else {
                SteerSel::None
            };
            self.close_point(0..t, l, l > p, sel, false, None)?;
            if l < n {
                self.block(t, l, step.n_write)?;
            }
            Ok(())
        });
        self.prefill = None;
        res?;
        self.head(logit_rows)
    }

    /// Copies rows 0..t of the residual to the kept residuals at their (slot, position), or back
    /// from (a.from, position); rows of slots past the kept ones are skipped by the kernel.
    fn keep(&mut self, t: usize, way: k::Keep) -> Result<()> {
        let Some((_, kept_slots, kept)) = self.kept.as_mut() else {
            crate::bail!("this engine keeps no residuals (keep_residuals first)");
        };
        let (d, shape) = (self.config.hidden_size, (*kept_slots, self.max_len));
        let a = &mut self.a;
        let slots = match way {
            k::Keep::Store => a.slot.slice(..t),
            k::Keep::Load => a.from.slice(..t),
        };
        k::hybrid_keep(
            &self.gpu,
            &mut a.r.slice_mut(..t * d),
            &mut kept.as_view_mut(),
            &slots,
            &a.pos.slice(..t),
            t,
            (shape.0, shape.1, d),
            way,
        )
    }

    /// LM head over the rows `rows` of y → logits [R, V] on the device (with `use_live`, rows of
    /// the output ≥ a.live[0] may be skipped).
    pub(crate) fn head(&mut self, rows: &[usize]) -> Result<()> {
        let c = &self.config;
        let (d, v, r) = (c.hidden_size, c.vocab_size, rows.len());
        let identity = rows.iter().enumerate().all(|(i, &x)| i == x);
        let g = &self.gpu;
        if !identity {
            for (i, &row) in rows.iter().enumerate() {
                g.stream
                    .memcpy_dtod(
                        &self.a.y.slice(row * d..(row + 1) * d),
                        &mut self.a.y_sel.slice_mut(i * d..(i + 1) * d),
                    )
                    .map_err(cu("gathering rows"))?;
            }
        }
        let x = if identity {
            self.a.y.slice(..r * d)
        } else {
            self.a.y_sel.slice(..r * d)
        };
        let lm = self.w.lm_head.as_ref().unwrap_or(&self.w.embed_tokens);
        let live = self.use_live.then(|| self.a.live.as_view());
        k::matmul_live(
            g,
            &mut self.a.logits.slice_mut(..r * v),
            &x,
            &lm.as_view(),
            (r, v, d),
            live.as_ref(),
        )
    }

    /// One greedy decode step for `ids.len()` rows (each writes its K/V), replayed from a CUDA
    /// graph after the first call with that row count. Returns the greedy ids.
    pub fn decode_greedy(&mut self, ids: &[u32], step: &Step) -> Result<Vec<u32>> {
        self.greedy_step(ids, step, None)?;
        self.read_ids(ids.len())
    }

    /// Queues `decode_greedy`'s launches (its ids in a.next), with `stash`, every row's residual
    /// at that point stashed on the device (read back by `finish_capture`); the step's logits
    /// stay there (`logits_at`).
    fn greedy_step(&mut self, ids: &[u32], step: &Step, stash: Option<usize>) -> Result<()> {
        let t = ids.len();
        check_step(&self.config, ids, step, self.slots, self.max_len)?;
        if t > self.max_t || step.n_write != t {
            crate::bail!("a greedy decode step: expected 1..={} rows that all write the cache, found {t} rows, n_write {}", self.max_t, step.n_write);
        }
        self.upload_step(ids, step)?;
        // Decode attention for every row: a graph captured with tiles would replay their count.
        self.n_tiles = 0;
        if self.use_graphs {
            let key = (t, self.fuses_rope(), stash);
            if !self.graphs.contains_key(&key) {
                // Warm-up run outside capture (first-use work such as module loading), then capture.
                self.greedy_launches(t, stash)?;
                self.gpu.sync()?;
                let gpu = self.gpu.clone();
                let graph = gpu.capture(|| self.greedy_launches(t, stash))?;
                self.graphs.insert(key, graph);
            }
            self.graphs[&key]
                .launch()
                .map_err(cu("replaying the decode graph"))?;
        } else {
            self.greedy_launches(t, stash)?;
        }
        Ok(())
    }

    fn greedy_launches(&mut self, t: usize, stash: Option<usize>) -> Result<()> {
        self.layers(t, t, &mut Hooks::default(), stash)?;
        let rows: Vec<usize> = (0..t).collect();
        self.head(&rows)?;
        self.argmax_ids(t)
    }

    /// a.next[..r] = the greedy id of each of the first r rows of a.logits.
    fn argmax_ids(&mut self, r: usize) -> Result<()> {
        let v = self.config.vocab_size;
        k::argmax(
            &self.gpu,
            &mut self.a.next.slice_mut(..r),
            &self.a.logits.slice(..r * v),
            r,
            v,
            None,
        )
    }

    /// The first r greedy ids of a.next, read back (waits for the stream).
    fn read_ids(&self, r: usize) -> Result<Vec<u32>> {
        let mut out = vec![0i32; r];
        self.gpu
            .stream
            .memcpy_dtoh(&self.a.next.slice(..r), out.as_mut_slice())
            .map_err(cu("reading ids"))?;
        self.gpu.sync()?;
        Ok(out.into_iter().map(|x| x as u32).collect())
    }

    /// Forward of up to max_t tokens without returning logits (prefill chunks).
    fn forward_chunk(&mut self, ids: &[u32], step: &Step, hooks: &mut Hooks) -> Result<()> {
        self.upload_step(ids, step)?;
        let t = ids.len();
        self.prefill = prefill_chunk(step);
        let res = self.layers(t, step.n_write, hooks, None);
        self.prefill = None;
        res
    }

    /// The cached keys and values of positions `rows` of slot `slot` in block `layer`, widened
    /// to f32: ([R, Hkv·Dh], [R, Hkv·Dh]), keys after RoPE as attention reads them. The cache
    /// holds bf16, so these are bf16 values (the CPU cache holds unrounded f32).
    pub fn kv_rows(
        &self,
        layer: usize,
        slot: usize,
        rows: Range<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = &self.config;
        if layer >= c.num_hidden_layers
            || slot >= self.slots.in_block(layer)
            || rows.end > self.max_len
        {
            crate::bail!(
                "KV rows: expected block < {}, slot < {} (in that block) and positions ≤ {}, found block {layer}, slot {slot}, positions {rows:?}",
                c.num_hidden_layers,
                self.slots.in_block(layer),
                self.max_len
            );
        }
        let kv = c.num_key_value_heads * c.head_dim;
        // [slots, S, Hkv, Dh]: the rows of one slot are contiguous.
        let base = slot * self.max_len * kv;
        let (a, b) = (base + rows.start * kv, base + rows.end.max(rows.start) * kv);
        if a == b {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut k = vec![bf16::ZERO; b - a];
        let mut v = vec![bf16::ZERO; b - a];
        let s = &self.gpu.stream;
        s.memcpy_dtoh(&self.k_cache[layer].slice(a..b), k.as_mut_slice())
            .map_err(cu("reading the K cache"))?;
        s.memcpy_dtoh(&self.v_cache[layer].slice(a..b), v.as_mut_slice())
            .map_err(cu("reading the V cache"))?;
        self.gpu.sync()?;
        let wide = |x: Vec<bf16>| x.into_iter().map(bf16::to_f32).collect();
        Ok((wide(k), wide(v)))
    }

    /// Bytes of weights a decode step streams (for GB/s).
    pub fn weight_bytes(&self) -> usize {
        self.config.param_count() * 2
    }
}

impl Decoder for CudaEngine {
    fn config(&self) -> &Config {
        &self.config
    }
    fn max_len(&self) -> usize {
        self.max_len
    }
    fn slots(&self) -> usize {
        self.slots.total()
    }
    fn max_rows(&self) -> usize {
        self.max_t
    }
    fn greedy(&mut self, ids: &[u32], step: &Step) -> Result<Vec<u32>> {
        if ids.len() <= self.max_t && step.n_write == ids.len() {
            return self.decode_greedy(ids, step);
        }
        crate::engine::greedy_from_logits(self, ids, step)
    }
    fn forward(
        &mut self,
        ids: &[u32],
        step: &Step,
        logit_rows: &[usize],
        hooks: &mut Hooks,
    ) -> Result<&[f32]> {
        check_step(&self.config, ids, step, self.slots, self.max_len)?;
        let (t, v, r) = (ids.len(), self.config.vocab_size, logit_rows.len());
        if t > self.max_t && step.has_runs() {
            crate::bail!(
                "a call of {t} tokens with read-only runs (a steering window's candidates) exceeds the engine's {} tokens per call",
                self.max_t
            );
        }
        let hooked = hooks.steer.is_some() || !hooks.capture.is_empty();
        if t > self.max_t && hooked {
            crate::bail!(
                "a hooked call of {t} tokens exceeds the engine's {} tokens per call",
                self.max_t
            );
        }
        if let Some(&bad) = logit_rows.iter().find(|&&x| x >= t) {
            crate::bail!("logit row {bad} is outside the {t} tokens of the call");
        }
        self.logits_host.resize(r * v, 0.0);
        // Calls longer than max_t run in chunks; each chunk's K/V is written before the next
        // reads it, and each chunk's LM head covers the logit rows that fall inside it.
        let mut start = 0;
        while start < t {
            let end = (start + self.max_t).min(t);
            let n_write = step.n_write.saturating_sub(start).min(end - start);
            // Runs longer than one token come only in one-chunk calls (refused above otherwise).
            let whole = start == 0 && end == t;
            let sub = Step {
                slots: &step.slots[start..end],
                positions: &step.positions[start..end],
                n_write,
                run_start: if whole { step.run_start } else { &[] },
            };
            self.forward_chunk(&ids[start..end], &sub, hooks)?;
            let here: Vec<(usize, usize)> = logit_rows
                .iter()
                .enumerate()
                .filter(|(_, &x)| x >= start && x < end)
                .map(|(i, &x)| (i, x - start))
                .collect();
            if !here.is_empty() {
                let local: Vec<usize> = here.iter().map(|&(_, x)| x).collect();
                self.head(&local)?;
                let buf = &mut self.chunk_host;
                read_logits(&self.gpu, &self.a.logits, local.len() * v, buf)?;
                for (j, &(i, _)) in here.iter().enumerate() {
                    self.logits_host[i * v..(i + 1) * v].copy_from_slice(&buf[j * v..(j + 1) * v]);
                }
            }
            start = end;
        }
        Ok(&self.logits_host)
    }
    fn start_capture(&mut self, ids: &[u32], step: &Step, p: usize) -> Result<()> {
        crate::engine::check_point(&self.config, p)?;
        self.greedy_step(ids, step, Some(p))?;
        self.captured_rows = ids.len();
        self.pending = Some(ids.len());
        Ok(())
    }
    fn finish_capture(&mut self) -> Result<(Vec<u32>, Vec<f32>)> {
        let t = self.pending.take().ok_or_else(crate::engine::no_capture)?;
        let mut h = vec![0f32; t * self.config.hidden_size];
        self.gpu
            .stream
            .memcpy_dtoh(&self.a.stash.slice(..h.len()), h.as_mut_slice())
            .map_err(cu("reading the captured residual"))?;
        Ok((self.read_ids(t)?, h))
    }
    fn logits_at(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let (t, v) = (self.captured_rows, self.config.vocab_size);
        let n = crate::engine::check_logits_at(t, ids)?;
        if ids.is_empty() {
            return Ok(vec![]);
        }
        // Ids past the vocabulary (u32::MAX included) become −1: −inf in the kernel.
        let dev: Vec<i32> = ids
            .iter()
            .map(|&i| i32::try_from(i).unwrap_or(-1))
            .collect();
        let s = &self.gpu.stream;
        let grow = |have: &Option<usize>| have.is_none_or(|l| l < ids.len());
        if grow(&self.at_ids.as_ref().map(|b| b.len())) {
            self.at_ids = Some(
                s.alloc_zeros::<i32>(ids.len())
                    .map_err(cu("allocating ids"))?,
            );
            self.at_out = Some(
                s.alloc_zeros::<f32>(ids.len())
                    .map_err(cu("allocating logits"))?,
            );
        }
        let (di, dout) = (
            self.at_ids.as_mut().expect("allocated above"),
            self.at_out.as_mut().expect("allocated above"),
        );
        s.memcpy_htod(&dev, &mut di.slice_mut(..ids.len()))
            .map_err(cu("uploading ids"))?;
        k::logits_at(
            &self.gpu,
            &mut dout.slice_mut(..ids.len()),
            &self.a.logits.slice(..t * v),
            &di.slice(..ids.len()),
            t,
            n,
            v,
        )?;
        let mut out = vec![0f32; ids.len()];
        s.memcpy_dtoh(&dout.slice(..ids.len()), out.as_mut_slice())
            .map_err(cu("reading logits"))?;
        self.gpu.sync()?;
        Ok(out)
    }
    fn keep_residuals(&mut self, p: usize, slots: usize) -> Result<()> {
        crate::engine::check_point(&self.config, p)?;
        crate::engine::check_kept_slots(slots, self.slots.all)?;
        if self.kept.as_ref().is_some_and(|k| k.0 == p && k.1 >= slots) {
            return Ok(());
        }
        // The decode graphs captured so far store into the old buffer, or not at all.
        self.kept = None;
        self.graphs.clear();
        let n = slots * self.max_len * self.config.hidden_size;
        let (free, _) = self.gpu.mem_info()?;
        if n * 4 > free {
            crate::bail!(
                "keeping the residuals of {} sequences × {} positions (steering windows) needs {:.2} GiB on the GPU, {:.2} GiB are free: lower the batch or the context",
                slots,
                self.max_len,
                (n * 4) as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            );
        }
        let mut buf = self
            .gpu
            .stream
            .alloc_zeros::<f32>(n)
            .map_err(cu("allocating the kept residuals"))?;
        // NaN until written, as on the CPU: a run over a position never written shows.
        k::fill_nan(&self.gpu, &mut buf)?;
        self.kept = Some((p, slots, buf));
        Ok(())
    }
    fn forward_kept(
        &mut self,
        step: &Step,
        steer: &SteerRows,
        logit_rows: &[usize],
    ) -> Result<&[f32]> {
        self.kept_launches(step, steer, logit_rows)?;
        let v = self.config.vocab_size;
        let n = logit_rows.len() * v;
        read_logits(&self.gpu, &self.a.logits, n, &mut self.logits_host)?;
        Ok(&self.logits_host)
    }
    fn greedy_kept(
        &mut self,
        step: &Step,
        steer: &SteerRows,
        logit_rows: &[usize],
    ) -> Result<Vec<u32>> {
        self.kept_launches(step, steer, logit_rows)?;
        self.argmax_ids(logit_rows.len())?;
        self.read_ids(logit_rows.len())
    }
}

/// (slot, first position) of a call that is one chunk of one sequence, every token writing the
/// cache, and longer than the skinny products take: its attention runs on the prefill tiles.
fn prefill_chunk(step: &Step) -> Option<(usize, usize)> {
    let t = step.positions.len();
    let contiguous = step.slots.iter().all(|&x| x == step.slots[0])
        && step.positions.windows(2).all(|w| w[1] == w[0] + 1);
    (t > k::GEMV_MAX_ROWS && step.n_write == t && contiguous)
        .then(|| (step.slots[0], step.positions[0]))
}

/// Copies the first `n` logits from the device to `buf` (resized to n) and waits for them.
fn read_logits(gpu: &Gpu, logits: &CudaSlice<f32>, n: usize, buf: &mut Vec<f32>) -> Result<()> {
    buf.resize(n, 0.0);
    gpu.stream
        .memcpy_dtoh(&logits.slice(..n), buf.as_mut_slice())
        .map_err(cu("reading logits"))?;
    gpu.sync()
}
