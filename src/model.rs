//! The decoder shared by Qwen2 and Llama, on the CPU in f32: weights named as the checkpoint
//! names them, a KV cache of fixed slots, and a forward pass written as a flat list of ops.
//!
//! The residual stream is first-class: `Hooks` captures the residual at any point and adds a
//! per-token vector at any point. A *point* p is the residual after p decoder blocks: point 0 is
//! the embedding output, point L+1 the output of block L (0-based), point N the last block's
//! output before the final norm.

use crate::config::{Arch, Config};
use crate::cpu_ops::{argmax, attend, matmul, rmsnorm, rope, silu_mul};
use crate::weights::WeightFiles;
use crate::Result;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;
use std::path::Path;

pub struct Layer {
    pub input_layernorm: Vec<f32>,          // [D]
    pub q_proj: Vec<f32>,                   // [H·Dh, D]
    pub q_bias: Option<Vec<f32>>,           // [H·Dh]     (Qwen2)
    pub k_proj: Vec<f32>,                   // [Hkv·Dh, D]
    pub k_bias: Option<Vec<f32>>,           // [Hkv·Dh]
    pub v_proj: Vec<f32>,                   // [Hkv·Dh, D]
    pub v_bias: Option<Vec<f32>>,           // [Hkv·Dh]
    pub o_proj: Vec<f32>,                   // [D, H·Dh]
    pub post_attention_layernorm: Vec<f32>, // [D]
    pub gate_proj: Vec<f32>,                // [F, D]
    pub up_proj: Vec<f32>,                  // [F, D]
    pub down_proj: Vec<f32>,                // [D, F]
}

pub struct Weights {
    pub embed_tokens: Vec<f32>,    // [V, D]
    pub layers: Vec<Layer>,        // N
    pub norm: Vec<f32>,            // [D]
    pub lm_head: Option<Vec<f32>>, // [V, D]; None when tied to embed_tokens
}

pub struct Model {
    pub config: Config,
    pub weights: Weights,
    pub inv_freq: Vec<f32>, // [Dh/2]
}

impl Weights {
    pub fn load(files: &WeightFiles, c: &Config) -> Result<Weights> {
        Self::load_with(files, c, |name, shape| files.f32(name, shape))
    }

    /// Every tensor's presence, shape and dtype checked against the config, no value read (a
    /// checkpoint opened for a run that loads it later, on either backend).
    pub fn check(files: &WeightFiles, c: &Config) -> Result<()> {
        Self::load_with(files, c, |name, shape| {
            files.raw(name, shape).map(|_| vec![])
        })?;
        Ok(())
    }

    /// The weights, each tensor taken by `get(name, shape)`.
    fn load_with(
        files: &WeightFiles,
        c: &Config,
        get: impl Fn(&str, &[usize]) -> Result<Vec<f32>>,
    ) -> Result<Weights> {
        files.check_against(c)?;
        let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let bias = |name: &str, n: usize| -> Result<Option<Vec<f32>>> {
            match c.arch {
                Arch::Qwen2 => get(name, &[n]).map(Some),
                Arch::Llama if files.has(name) => get(name, &[n]).map(Some),
                Arch::Llama => Ok(None),
            }
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_layernorm: get(&format!("{p}.input_layernorm.weight"), &[d])?,
                q_proj: get(&format!("{p}.self_attn.q_proj.weight"), &[q, d])?,
                q_bias: bias(&format!("{p}.self_attn.q_proj.bias"), q)?,
                k_proj: get(&format!("{p}.self_attn.k_proj.weight"), &[kv, d])?,
                k_bias: bias(&format!("{p}.self_attn.k_proj.bias"), kv)?,
                v_proj: get(&format!("{p}.self_attn.v_proj.weight"), &[kv, d])?,
                v_bias: bias(&format!("{p}.self_attn.v_proj.bias"), kv)?,
                o_proj: get(&format!("{p}.self_attn.o_proj.weight"), &[d, q])?,
                post_attention_layernorm: get(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[d],
                )?,
                gate_proj: get(&format!("{p}.mlp.gate_proj.weight"), &[f, d])?,
                up_proj: get(&format!("{p}.mlp.up_proj.weight"), &[f, d])?,
                down_proj: get(&format!("{p}.mlp.down_proj.weight"), &[d, f])?,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(get("lm_head.weight", &[v, d])?)
        };
        Ok(Weights {
            embed_tokens: get("model.embed_tokens.weight", &[v, d])?,
            layers,
            norm: get("model.norm.weight", &[d])?,
            lm_head,
        })
    }
}

/// The cache slots of an engine: `all` in every block, and `late` more (slots all..all + late)
/// only in the blocks from `from` on. The late slots are the window-0 prefix caches of the
/// hybrid loop (`hybrid::prefix`): their calls start at the steering point, so the blocks before
/// it would hold K/V that nothing reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    pub all: usize,
    pub late: usize,
    pub from: usize,
}

impl Slots {
    pub fn total(&self) -> usize {
        self.all + self.late
    }
    /// The slots block `l` holds.
    pub fn in_block(&self, l: usize) -> usize {
        if l >= self.from {
            self.total()
        } else {
            self.all
        }
    }
    /// Slot-blocks of the whole cache (slots summed over the `layers` blocks).
    pub fn slot_blocks(&self, layers: usize) -> usize {
        self.all * layers + self.late * layers.saturating_sub(self.from)
    }
}

/// `n` slots in every block.
impl From<usize> for Slots {
    fn from(all: usize) -> Slots {
        Slots {
            all,
            late: 0,
            from: 0,
        }
    }
}

/// K/V of every layer for a fixed number of slots (one per concurrent sequence).
pub struct KvCache {
    pub slots: Slots,
    pub max_len: usize,   // S
    pub k: Vec<Vec<f32>>, // per layer [slots.in_block(l), S, Hkv, Dh]
    pub v: Vec<Vec<f32>>, // per layer [slots.in_block(l), S, Hkv, Dh]
}

impl KvCache {
    pub fn new(c: &Config, slots: impl Into<Slots>, max_len: usize) -> KvCache {
        let slots = slots.into();
        let n = |l: usize| slots.in_block(l) * max_len * c.num_key_value_heads * c.head_dim;
        KvCache {
            slots,
            max_len,
            k: (0..c.num_hidden_layers).map(|l| vec![0.0; n(l)]).collect(),
            v: (0..c.num_hidden_layers).map(|l| vec![0.0; n(l)]).collect(),
        }
    }
}

/// The tokens of one forward call: any mix of rows, each token with its cache slot and position.
/// Tokens `0..n_write` append their K/V to the cache; the rest (e.g. steering candidates) only
/// read it. A read-only token belongs to a *run*: consecutive positions of one slot, in
/// consecutive rows of the call (a steering window's candidate). It attends to the cache before
/// the run's first position, then to the run's tokens up to itself.
pub struct Step<'a> {
    pub slots: &'a [usize],     // [T]
    pub positions: &'a [usize], // [T]
    pub n_write: usize,
    /// [T − n_write]: the row where each read-only token's run starts. Empty: every read-only
    /// token is a run of one (it attends to the cache before its position, then itself).
    pub run_start: &'a [usize],
}

impl Step<'_> {
    /// The row where token `t`'s run starts (t itself for a token that writes, or without runs).
    pub fn run_of(&self, t: usize) -> usize {
        match t.checked_sub(self.n_write) {
            Some(i) => self.run_start.get(i).copied().unwrap_or(t),
            None => t,
        }
    }

    /// Whether some read-only run holds more than one token.
    pub fn has_runs(&self) -> bool {
        (self.n_write..self.positions.len()).any(|t| self.run_of(t) != t)
    }

    /// Whether no token of the call attends a position that another token of the call writes:
    /// in every slot, each written position is at or after every position of that slot in the
    /// call (one token per sequence, or candidates beside their problem's token), and no
    /// read-only run is longer than one token. Then the tokens' K/V may be appended while
    /// attention runs (the CUDA fused RoPE path). `scratch` is reused between calls.
    pub fn rows_independent(&self, scratch: &mut Vec<(usize, usize, bool)>) -> bool {
        // A run's later tokens read the K/V its earlier ones computed (not through the cache).
        if self.has_runs() {
            return false;
        }
        scratch.clear();
        scratch.extend(
            self.slots
                .iter()
                .zip(self.positions)
                .enumerate()
                .map(|(t, (&s, &p))| (s, p, t < self.n_write)),
        );
        scratch.sort_unstable();
        // Per slot, sorted by position: a written position below the slot's last one is read.
        scratch.chunk_by(|a, b| a.0 == b.0).all(|rows| {
            let last = rows[rows.len() - 1].1;
            rows.iter().all(|&(_, p, w)| !w || p == last)
        })
    }
}

/// Residual-stream hooks for one forward call.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Points to capture; filled with [T, D] copies of the residual there.
    pub capture: Vec<(usize, Vec<f32>)>,
    /// (point, add [T, D]): added to the residual at that point.
    pub steer: Option<(usize, &'a [f32])>,
}

/// Every activation buffer of a forward call, grown to the largest T seen and then reused, so
/// decoding allocates nothing per token.
#[derive(Default)]
pub struct Workspace {
    xn: Vec<f32>,      // [T, D]    normalised input of a sublayer
    q: Vec<f32>,       // [T, H·Dh]
    k: Vec<f32>,       // [T, Hkv·Dh]
    v: Vec<f32>,       // [T, Hkv·Dh]
    attn: Vec<f32>,    // [T, H·Dh]
    o: Vec<f32>,       // [T, D]
    gate: Vec<f32>,    // [T, F]
    up: Vec<f32>,      // [T, F]
    act: Vec<f32>,     // [T, F]
    logits: Vec<f32>,  // [R, V]
    scratch: Vec<f32>, // matmul transpose buffer
}

impl Workspace {
    fn ensure(&mut self, c: &Config, t: usize) {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        for (buf, n) in [
            (&mut self.xn, t * d),
            (&mut self.q, t * q),
            (&mut self.k, t * kv),
            (&mut self.v, t * kv),
            (&mut self.attn, t * q),
            (&mut self.o, t * d),
            (&mut self.gate, t * f),
            (&mut self.up, t * f),
            (&mut self.act, t * f),
        ] {
            buf.resize(n, 0.0);
        }
    }
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Model {
    pub fn load(dir: &Path) -> Result<Model> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let files = WeightFiles::open(dir)?;
        let weights = Weights::load(&files, &config)?;
        Ok(Model::from_parts(config, weights))
    }

    pub fn from_parts(config: Config, weights: Weights) -> Model {
        let inv_freq = config.rope_inv_freq();
        Model {
            config,
            weights,
            inv_freq,
        }
    }

    /// h[t] = embed_tokens[ids[t]].  h: [T, D]. Ids must have been validated against V.
    pub fn embed(&self, ids: &[u32], h: &mut Vec<f32>) {
        let d = self.config.hidden_size;
        h.resize(ids.len() * d, 0.0);
        for (row, &id) in h.chunks_mut(d).zip(ids) {
            row.copy_from_slice(&self.weights.embed_tokens[id as usize * d..(id as usize + 1) * d]);
        }
    }

    /// Runs decoder blocks `blocks` over the residual h: [T, D], with hooks at the points
    /// blocks.start ..= blocks.end.
    pub fn layers(
        &self,
        ws: &mut Workspace,
        cache: &mut KvCache,
        h: &mut [f32],
        blocks: Range<usize>,
        step: &Step,
        hooks: &mut Hooks,
    ) {
        let c = &self.config;
        let t = step.positions.len();
        ws.ensure(c, t);
        apply_hooks(hooks, blocks.start, h);
        for l in blocks {
            self.block(ws, cache, h, l, step);
            apply_hooks(hooks, l + 1, h);
        }
    }

    /// One decoder block: h += attn(norm(h)); h += mlp(norm(h)).
    fn block(&self, ws: &mut Workspace, cache: &mut KvCache, h: &mut [f32], l: usize, step: &Step) {
        let c = &self.config;
        let w = &self.weights.layers[l];
        let t = step.positions.len();
        let (d, f, dh) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (q, kv) = (nh * dh, nkv * dh);
        let xn = &mut ws.xn[..t * d];

        // Attention: q/k/v projections (+ bias), RoPE, cache append, attend, output projection.
        rmsnorm(xn, h, &w.input_layernorm, c.rms_norm_eps); //              [T, D]
        matmul(
            &mut ws.q[..t * q],
            xn,
            &w.q_proj,
            w.q_bias.as_deref(),
            t,
            d,
            q,
            &mut ws.scratch,
        ); // [T, H·Dh]
        matmul(
            &mut ws.k[..t * kv],
            xn,
            &w.k_proj,
            w.k_bias.as_deref(),
            t,
            d,
            kv,
            &mut ws.scratch,
        ); // [T, Hkv·Dh]
        matmul(
            &mut ws.v[..t * kv],
            xn,
            &w.v_proj,
            w.v_bias.as_deref(),
            t,
            d,
            kv,
            &mut ws.scratch,
        ); // [T, Hkv·Dh]
        rope(&mut ws.q[..t * q], step.positions, &self.inv_freq, nh);
        rope(&mut ws.k[..t * kv], step.positions, &self.inv_freq, nkv);
        let s = cache.max_len;
        for i in 0..step.n_write {
            let at = (step.slots[i] * s + step.positions[i]) * kv;
            cache.k[l][at..at + kv].copy_from_slice(&ws.k[i * kv..(i + 1) * kv]);
            cache.v[l][at..at + kv].copy_from_slice(&ws.v[i * kv..(i + 1) * kv]);
        }
        self.attention(ws, cache, l, step); //                                 [T, H·Dh]
        matmul(
            &mut ws.o[..t * d],
            &ws.attn[..t * q],
            &w.o_proj,
            None,
            t,
            q,
            d,
            &mut ws.scratch,
        );
        add(h, &ws.o[..t * d]);

        // MLP: down(silu(gate(x)) · up(x)).
        let xn = &mut ws.xn[..t * d];
        rmsnorm(xn, h, &w.post_attention_layernorm, c.rms_norm_eps);
        matmul(
            &mut ws.gate[..t * f],
            xn,
            &w.gate_proj,
            None,
            t,
            d,
            f,
            &mut ws.scratch,
        ); // [T, F]
        matmul(
            &mut ws.up[..t * f],
            xn,
            &w.up_proj,
            None,
            t,
            d,
            f,
            &mut ws.scratch,
        ); //     [T, F]
        silu_mul(&mut ws.act[..t * f], &ws.gate[..t * f], &ws.up[..t * f]);
        matmul(
            &mut ws.o[..t * d],
            &ws.act[..t * f],
            &w.down_proj,
            None,
            t,
            f,
            d,
            &mut ws.scratch,
        );
        add(h, &ws.o[..t * d]);
    }

    /// attn[t, h] = softmax(q·Kᵀ/√Dh)·V over the slot's cache before the first position of t's
    /// run (pos[t] for a token that writes or runs alone), then the run's tokens up to t.
    fn attention(&self, ws: &mut Workspace, cache: &KvCache, l: usize, step: &Step) {
        let c = &self.config;
        let (nh, nkv, dh) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (q_all, k_self, v_self) = (&ws.q, &ws.k, &ws.v);
        let (kc, vc, s) = (&cache.k[l], &cache.v[l], cache.max_len);
        let t = step.positions.len();
        ws.attn[..t * nh * dh]
            .par_chunks_mut(dh)
            .enumerate()
            .for_each(|(i, out)| {
                let (tok, head) = (i / nh, i % nh);
                let g = head / (nh / nkv);
                let first = step.run_of(tok);
                let (slot, pos) = (step.slots[tok], step.positions[first]);
                let q = &q_all[i * dh..(i + 1) * dh];
                // Keys/values of this kv head: the cache for positions 0..pos, then the call's
                // rows first..=tok (the token itself, or its run up to it).
                let base = (slot * s * nkv + g) * dh;
                let stride = nkv * dh;
                SCORES.with(|sc| {
                    let mut sc = sc.borrow_mut();
                    let own = (first * nkv + g) * dh..;
                    let run = (&k_self[own.clone()], &v_self[own], tok + 1 - first);
                    attend(out, q, &kc[base..], &vc[base..], stride, pos, run, &mut sc);
                });
            });
    }

    /// Final norm and LM head for the selected rows of h: [T, D] → logits [R, V].
    pub fn head<'w>(&self, ws: &'w mut Workspace, h: &[f32], rows: &[usize]) -> &'w [f32] {
        let c = &self.config;
        let (d, v) = (c.hidden_size, c.vocab_size);
        let r = rows.len();
        ws.xn.resize(r.max(1) * d, 0.0);
        for (i, &row) in rows.iter().enumerate() {
            ws.xn[i * d..(i + 1) * d].copy_from_slice(&h[row * d..(row + 1) * d]);
        }
        let mut normed = std::mem::take(&mut ws.o);
        normed.resize(r * d, 0.0);
        rmsnorm(
            &mut normed,
            &ws.xn[..r * d],
            &self.weights.norm,
            c.rms_norm_eps,
        );
        ws.logits.resize(r * v, 0.0);
        let lm = self
            .weights
            .lm_head
            .as_deref()
            .unwrap_or(&self.weights.embed_tokens);
        matmul(
            &mut ws.logits[..r * v],
            &normed,
            lm,
            None,
            r,
            d,
            v,
            &mut ws.scratch,
        );
        ws.o = normed;
        &ws.logits[..r * v]
    }

    /// Checks token ids against the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        self.config.check_ids(ids)
    }

    /// Greedy token of each row of logits [R, V].
    pub fn greedy(&self, logits: &[f32]) -> Vec<u32> {
        logits
            .chunks(self.config.vocab_size)
            .map(|r| argmax(r) as u32)
            .collect()
    }
}

fn add(h: &mut [f32], x: &[f32]) {
    h.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(a, b)| *a += b);
}

fn apply_hooks(hooks: &mut Hooks, point: usize, h: &mut [f32]) {
    if let Some((p, add_vec)) = hooks.steer {
        if p == point {
            add(h, add_vec);
        }
    }
    for (p, buf) in hooks.capture.iter_mut() {
        if *p == point {
            buf.clear();
            buf.extend_from_slice(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Step;

    fn independent(slots: &[usize], positions: &[usize], n_write: usize) -> bool {
        let step = Step {
            slots,
            positions,
            n_write,
            run_start: &[],
        };
        step.rows_independent(&mut vec![])
    }

    #[test]
    fn rows_are_independent_unless_one_attends_what_another_writes() {
        // One token per sequence, any order.
        assert!(independent(&[2, 0, 1], &[5, 9, 0], 3));
        // Candidates beside their problem's token (same slot and position, not writing).
        assert!(independent(&[0, 1, 0, 0, 1], &[7, 3, 7, 7, 3], 2));
        // Two tokens of one sequence, the first written: the second reads it.
        assert!(!independent(&[0, 0], &[4, 5], 2));
        // The same, listed the other way round, and with another sequence beside it.
        assert!(!independent(&[1, 0, 0], &[0, 5, 4], 3));
        // The later token writes, the earlier one only reads: nothing written is read.
        assert!(independent(&[0, 0], &[5, 4], 1));
        // A prefill chunk.
        assert!(!independent(&[3, 3, 3], &[0, 1, 2], 3));
        // Nothing written at all.
        assert!(independent(&[0, 0, 0], &[0, 1, 2], 0));
        // A read-only run: its second token reads the first's K/V.
        let step = Step {
            slots: &[0, 0],
            positions: &[4, 5],
            n_write: 0,
            run_start: &[0, 0],
        };
        assert!(!step.rows_independent(&mut vec![]));
    }
}
