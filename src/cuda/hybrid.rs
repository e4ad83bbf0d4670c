//! The hybrid step on the GPU (hybrid.md §4): both models, the SAE encode, the gate and the
//! candidate choice stay on the device, so one step is one CUDA graph per batch size and the
//! host reads back five small integers per problem, in one copy.
//!
//! The thinking model runs on a sibling stream of the base model's (`think_gpu`): the two
//! models' launches up to the gate are independent, and at batch 1 each alone reached ~65% of the
//! memory-bandwidth floor (PERFORMANCE.md run 13), so overlapping them may beat two plain
//! forwards run one after the other (not yet timed). A fork event starts the thinking model after the base stream's earlier work;
//! the base stream waits for an event after the SAE layer before it builds candidates from the
//! categories (so the single pass's candidate rows run beside the thinking model's later blocks),
//! and for a join event before it reads the thinking model's greedy ids and logits.
//!
//! Two ways to run a step, the same function as the CPU loop (which computes candidates only
//! when needed):
//! - single pass (small batches): base-model rows [0, B) are the problems' unsteered rows,
//!   [B, B + B·C) the candidates (problem b, coefficient c at B + b·C + c), all through the blocks
//!   after the steering point together. Candidates are computed every step, agreement or not: on
//!   a memory-bound GPU they share the weight reads of the unsteered rows, and the gate then only
//!   chooses which row's token is emitted.
//! - gate first (large batches, where B·C candidate rows would make the products compute-bound):
//!   the problems' rows run the whole base model, the gate picks the problems whose greedy ids
//!   disagree (about one step in eight in the paper's runs), and only their candidates, compacted
//!   to rows [0, n·C), run a second pass from the steering point. n is counted on the device and
//!   the kernels of that pass skip rows ≥ n·C, so the step stays one graph with no host round
//!   trip; when no problem disagrees the second pass costs its launches only.

use super::kernels::{self as k, Gate};
use super::model::{call_rows, CudaEngine, SaeDev, SteerDev, SteerSel};
use super::{cuda_err as cu, Gpu};
use crate::config::Config;
use crate::engine::Decoder;
use crate::hybrid::{
    prefix, run_cached, Artifacts, Mode, Output, Prompts, Settings, StepFlow, StepRecord,
};
use crate::model::{Hooks, Slots, Step};
use crate::sae::Sae;
use crate::steering::SteeringSet;
use crate::{bail, Result};
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, CudaView};
use std::collections::HashMap;
use std::sync::Arc;

pub struct CudaHybrid {
    pub gpu: Arc<Gpu>,
    pub think: CudaEngine,
    pub base: CudaEngine,
    s: Settings,
    sae_point: usize,   // residual point of the SAE: after block L_t
    steer_point: usize, // residual point of the steering: after block L_b (or before it)
    c: usize,
    coefs: CudaSlice<f32>, // [C]
    /// What a step reads back, in one copy: [OUT_ROWS, max_b] rows EMIT, STEERED, WIN
    /// (the winning coefficient's index), CATEGORY (copied from the thinking model's SAE) and
    /// BASE_TOK (the base model's unsteered greedy ids).
    out: CudaSlice<i32>,
    out_host: Vec<i32>, // [OUT_ROWS, max_b] its host copy, reused every step
    think_tok: CudaSlice<i32>, // [max_b]
    // Gate first: compact index → problem, problem → compact index (or −1), and the problems'
    // positions and slots, kept while the candidate pass reuses the base model's rows.
    sel: CudaSlice<i32>,    // [max_b]
    cidx: CudaSlice<i32>,   // [max_b]
    pos_p: CudaSlice<i32>,  // [max_b]
    slot_p: CudaSlice<i32>, // [max_b]
    max_b: usize,
    graphs: HashMap<(usize, bool, (bool, bool)), CudaGraph>, // by (problems, gate first, each model fusing RoPE)
    pub use_graphs: bool,
    /// Forces the gate-first step on or off (None: gate first when B·C > GATE_FIRST_ROWS). Set
    /// from THINKSTEER_GATE_FIRST=1|0 when present.
    pub gate_first: Option<bool>,
    // With the thinking model on a sibling stream: `fork` lets it start after the base stream's
    // earlier work, `categories_ready` marks its SAE categories written (the single pass builds
    // its candidates from them), `join` holds the base stream until all its outputs are written.
    two_streams: bool,
    fork: CudaEvent,
    categories_ready: CudaEvent,
    join: CudaEvent,
}

/// Candidate rows above which a step runs gate first: below, the single pass's candidates ride
/// along the weight reads of at most two 32-row product launches per matrix.
pub const GATE_FIRST_ROWS: usize = 64;

/// The rows of `CudaHybrid::out` (the selection kernels take the first three split in order).
const EMIT: usize = 0;
const STEERED: usize = 1;
const WIN: usize = 2;
const CATEGORY: usize = 3;
const BASE_TOK: usize = 4;
const OUT_ROWS: usize = 5;

/// Row `row` of `out` ([OUT_ROWS, m]) for problems [0, b).
fn out_row(out: &CudaSlice<i32>, m: usize, row: usize, b: usize) -> CudaView<'_, i32> {
    out.slice(row * m..row * m + b)
}

/// The SAE category of the thinking model's rows [0, b) (the fused encode writes them).
fn categories(think: &CudaEngine, b: usize) -> CudaView<'_, i32> {
    think
        .sae
        .as_ref()
        .expect("the hybrid step puts the SAE on the thinking engine")
        .category
        .slice(..b)
}

/// One problem's outcome of a hybrid step, as read back.
#[derive(Clone, Copy)]
struct StepOut {
    /// The emitted id.
    tok: u32,
    steered: bool,
    /// The winning coefficient's index (steered steps).
    win: i32,
    category: usize,
    /// The base model's own (unsteered greedy) id.
    base_tok: u32,
}

/// The handle for the thinking model of a hybrid step whose base model runs on `gpu`: a sibling
/// stream, so the two models' launches overlap (each alone is bound by latency at small
/// batches), or `gpu` itself with THINKSTEER_HYBRID_STREAMS=1.
pub fn think_gpu(gpu: &Arc<Gpu>) -> Result<Arc<Gpu>> {
    if std::env::var("THINKSTEER_HYBRID_STREAMS").as_deref() == Ok("1") {
        return Ok(gpu.clone());
    }
    Ok(Arc::new(gpu.sibling()?))
}

impl CudaHybrid {
    /// Puts the SAE on the thinking engine and the steering table on the base engine. The base
    /// engine must have been built with max_t ≥ max_b·(1 + C) rows.
    pub fn new(
        mut think: CudaEngine,
        mut base: CudaEngine,
        sae: &Sae,
        steering: &SteeringSet,
        s: &Settings,
        max_b: usize,
    ) -> Result<CudaHybrid> {
        if s.mode == Mode::Exact {
            bail!("--mode exact recomputes whole sequences and runs on the CPU; use --device cpu");
        }
        if s.windows != [-1] {
            bail!(
                "the one-graph step steers the newest position only, so windows must be [-1]; found {:?} (GpuHybrid runs other windows on the host-driven loop)",
                s.windows
            );
        }
        if s.random_firing.is_some() {
            bail!("--random-firing draws categories on the host: GpuHybrid runs it on the host-driven loop, not the one-graph step");
        }
        let (tc, bc) = (&think.config, &base.config);
        Artifacts { sae, steering }.validate_for(bc, tc)?;
        if sae.latents > k::SAE_MAX_K {
            bail!(
                "the GPU SAE encode supports at most {} latents, found {}",
                k::SAE_MAX_K,
                sae.latents
            );
        }
        let c = s.coefficients.len();
        if c == 0 {
            bail!("expected at least one coefficient");
        }
        if base.max_t < max_b * (1 + c) || think.max_t < max_b {
            bail!("the base engine needs {} rows per call for {max_b} problems × (1 + {c} candidates), it has {}", max_b * (1 + c), base.max_t);
        }
        // The base model's handle runs the step; the thinking model's is the same one, or a
        // sibling whose stream runs concurrently (ordered by the fork / join events).
        let gpu = base.gpu.clone();
        if !Arc::ptr_eq(&think.gpu.ctx, &gpu.ctx) {
            bail!("the two engines of the hybrid step must be on one device (one CUDA context)");
        }
        let tst = think.gpu.stream.clone();
        let st = &gpu.stream;
        let up_on = |s: &Arc<cudarc::driver::CudaStream>, v: &[f32]| {
            s.clone_htod(v)
                .map_err(cu("uploading the SAE / steering set"))
        };
        let up = |v: &[f32]| up_on(st, v);
        let tup = |v: &[f32]| up_on(&tst, v);
        let sae_mean = if s.sae_raw_activations {
            None
        } else {
            sae.activation_mean.as_deref()
        };
        think.sae = Some(SaeDev {
            w_enc: tup(&sae.w_enc)?,
            b_enc: tup(&sae.b_enc)?,
            b_dec: tup(&sae.b_dec)?,
            mean: sae_mean.map(tup).transpose()?,
            z: tst
                .alloc_zeros::<f32>(think.max_t * sae.latents)
                .map_err(cu("allocating SAE outputs"))?,
            category: tst
                .alloc_zeros::<i32>(think.max_t)
                .map_err(cu("allocating SAE outputs"))?,
            k: sae.latents,
        });
        // One table row per category: bias + V[k] (or the bias alone with --only-bias).
        let d = bc.hidden_size;
        let mut table = vec![0f32; steering.count * d];
        for (kk, row) in table.chunks_mut(d).enumerate() {
            steering.combined_into(kk, s.only_bias, row);
        }
        base.hy = Some(SteerDev {
            table: up(&table)?,
            nv: steering.count,
        });
        let zi = |n: usize| {
            st.alloc_zeros::<i32>(n)
                .map_err(cu("allocating hybrid buffers"))
        };
        let steer_point = if s.steer_at_block_input {
            steering.layer
        } else {
            steering.layer + 1
        };
        let event = || {
            gpu.ctx
                .new_event(None)
                .map_err(cu("creating the hybrid step's events"))
        };
        let (fork, categories_ready, join) = (event()?, event()?, event()?);
        let two_streams = !Arc::ptr_eq(&think.gpu, &gpu);
        // Everything above is queued on two streams: done before either reads the other's.
        think.gpu.sync()?;
        gpu.sync()?;
        Ok(CudaHybrid {
            two_streams,
            fork,
            categories_ready,
            join,
            coefs: up(&s.coefficients)?,
            out: zi(OUT_ROWS * max_b)?,
            out_host: vec![0; OUT_ROWS * max_b],
            think_tok: zi(max_b)?,
            sel: zi(max_b)?,
            cidx: zi(max_b)?,
            pos_p: zi(max_b)?,
            slot_p: zi(max_b)?,
            gate_first: match std::env::var("THINKSTEER_GATE_FIRST").as_deref() {
                Ok("1") => Some(true),
                Ok("0") => Some(false),
                _ => None,
            },
            sae_point: sae.layer + 1,
            steer_point,
            c,
            s: s.clone(),
            max_b,
            graphs: HashMap::new(),
            use_graphs: !gpu.syncs_each_launch(), // THINKSTEER_CUDA_SYNC=1: every kernel eagerly
            gpu,
            think,
            base,
        })
    }

    /// Whether these settings run on the one-graph step (cached or persistent mode, window -1,
    /// categories from the SAE); `GpuHybrid` runs the others on the host-driven loop.
    pub fn supports(s: &Settings) -> bool {
        s.mode != Mode::Exact && s.random_firing.is_none() && s.windows == [-1]
    }

    /// Drops the captured step graphs (captured again at their next use).
    pub fn clear_graphs(&mut self) {
        self.graphs.clear();
    }

    /// Changes the number of new tokens of later `run` calls.
    pub fn set_max_new_tokens(&mut self, n: usize) {
        self.s.max_new_tokens = n;
    }

    /// Whether a step of b problems runs gate first. Not by default with --no-gating: every
    /// problem then needs its candidates, and gate first would only add a second pass.
    fn runs_gate_first(&self, b: usize) -> bool {
        b <= k::GATE_MAX_B
            && self
                .gate_first
                .unwrap_or(b * self.c > GATE_FIRST_ROWS && !self.s.no_gating)
    }

    /// Every launch of one step for b problems (ids, positions and slots already uploaded).
    fn step_launches(&mut self, b: usize) -> Result<()> {
        if self.two_streams {
            self.fork
                .record(&self.gpu.stream)
                .map_err(cu("forking the thinking model's stream"))?;
            self.think
                .gpu
                .stream
                .wait(&self.fork)
                .map_err(cu("forking the thinking model's stream"))?;
        }
        let r = self.think_launches(b).and_then(|_| {
            if self.runs_gate_first(b) {
                self.gate_first_launches(b)
            } else {
                self.single_pass_launches(b)
            }
        });
        if r.is_err() {
            // Join the thinking model's stream even so: a capture left unjoined would report
            // "unjoined" instead of this error (its own failure, if any, is the lesser one).
            let _ = self.join_thinking();
        }
        r
    }

    /// Holds the base model's stream until the thinking model's SAE categories are written (its
    /// later blocks may still run). Nothing with one stream.
    fn wait_categories(&self) -> Result<()> {
        if self.two_streams {
            self.gpu
                .stream
                .wait(&self.categories_ready)
                .map_err(cu("waiting for the thinking model's categories"))?;
        }
        Ok(())
    }

    /// Holds the base model's stream until the thinking model's launches so far are done (its
    /// category, greedy ids and logits are read next). Nothing with one stream.
    fn join_thinking(&self) -> Result<()> {
        if self.two_streams {
            self.join
                .record(&self.think.gpu.stream)
                .map_err(cu("joining the thinking model's stream"))?;
            self.gpu
                .stream
                .wait(&self.join)
                .map_err(cu("joining the thinking model's stream"))?;
        }
        Ok(())
    }

    /// The thinking model over its b rows: SAE encode fused into the residual kernel at its
    /// layer (categories), logits, greedy ids.
    fn think_launches(&mut self, b: usize) -> Result<()> {
        let (nt, v) = (
            self.think.config.num_hidden_layers,
            self.think.config.vocab_size,
        );
        let t = &mut self.think;
        t.embed(b)?;
        for l in 0..=nt {
            t.close_point(0..b, l, l > 0, SteerSel::None, l == self.sae_point, None)?;
            if l == self.sae_point && self.two_streams {
                // The categories are written: the base stream may build its candidates while
                // the thinking model's later blocks run.
                self.categories_ready
                    .record(&t.gpu.stream)
                    .map_err(cu("marking the thinking model's categories"))?;
            }
            if l < nt {
                t.block(b, l, b)?;
            }
        }
        t.head(&(0..b).collect::<Vec<_>>())?;
        k::argmax(
            &t.gpu,
            &mut self.think_tok.slice_mut(..b),
            &t.a.logits.slice(..b * v),
            b,
            v,
            None,
        )
    }

    /// The base model's rows [0, b) up to the steering point (unsteered, writing the cache).
    fn base_to_point(&mut self, b: usize) -> Result<()> {
        let p = self.steer_point;
        let bm = &mut self.base;
        bm.embed(b)?;
        for l in 0..p {
            bm.close_point(0..b, l, l > 0, SteerSel::None, false, None)?;
            bm.block(b, l, b)?;
        }
        bm.close_point(0..b, p, p > 0, SteerSel::None, false, None)
    }

    /// The base model's rows [0, rows) from the steering point (closed) to greedy ids in
    /// a.next[..rows]; rows [0, n_write) write the cache. With `live`, rows ≥ a.live[0] may be
    /// skipped. The final norm is closed for every row.
    fn base_from_point(&mut self, rows: usize, n_write: usize, live: bool) -> Result<()> {
        let (p, nb, v) = (
            self.steer_point,
            self.base.config.num_hidden_layers,
            self.base.config.vocab_size,
        );
        let bm = &mut self.base;
        bm.use_live = live;
        let r = (|| {
            for l in p..nb {
                bm.block(rows, l, n_write)?;
                bm.close_point(0..rows, l + 1, true, SteerSel::None, false, None)?;
            }
            bm.head(&(0..rows).collect::<Vec<_>>())
        })();
        bm.use_live = false; // on an error too: later calls on the engine need every row
        r?;
        let count = bm.a.live.as_view();
        k::argmax(
            &self.gpu,
            &mut bm.a.next.slice_mut(..rows),
            &bm.a.logits.slice(..rows * v),
            rows,
            v,
            live.then_some(&count),
        )
    }

    /// The problems' unsteered greedy ids (rows [0, b) of a.next), kept for the readback: the
    /// candidate pass of a gate-first step overwrites them.
    fn keep_base_tokens(&mut self, b: usize) -> Result<()> {
        let m = self.max_b;
        self.gpu
            .stream
            .memcpy_dtod(
                &self.base.a.next.slice(..b),
                &mut self.out.slice_mut(BASE_TOK * m..BASE_TOK * m + b),
            )
            .map_err(cu("keeping the base model's tokens"))
    }

    /// The thinking model's SAE categories beside the other outputs, for the one readback
    /// (after the join: the thinking model's stream wrote them).
    fn keep_categories(&mut self, b: usize) -> Result<()> {
        let m = self.max_b;
        self.gpu
            .stream
            .memcpy_dtod(
                &categories(&self.think, b),
                &mut self.out.slice_mut(CATEGORY * m..CATEGORY * m + b),
            )
            .map_err(cu("keeping the categories"))
    }

    /// Persistent mode: the problems' rows rerun from the steering point with the winner's
    /// residual (or the unsteered one), writing K/V; `cidx` maps problems to the candidate rows
    /// of a gate-first step.
    fn commit_winners(&mut self, b: usize, gate_first: bool) -> Result<()> {
        let (c, p, nb) = (self.c, self.steer_point, self.base.config.num_hidden_layers);
        let d = self.base.config.hidden_size;
        let bm = &mut self.base;
        let cidx = self.cidx.slice(..b);
        k::hybrid_gather(
            &self.gpu,
            &mut bm.a.r.slice_mut(..b * d),
            &bm.a.r_saved.slice(..(b + b * c) * d),
            &out_row(&self.out, self.max_b, STEERED, b),
            &out_row(&self.out, self.max_b, WIN, b),
            gate_first.then_some(&cidx),
            b,
            c,
            d,
        )?;
        bm.close_point(0..b, p, false, SteerSel::None, false, None)?;
        for l in p..nb {
            bm.block(b, l, b)?;
            if l + 1 < nb {
                bm.close_point(0..b, l + 1, true, SteerSel::None, false, None)?;
            }
        }
        Ok(())
    }

    /// Single pass: problem rows and every candidate row through the blocks after the point.
    fn single_pass_launches(&mut self, b: usize) -> Result<()> {
        let (c, r) = (self.c, b + b * self.c);
        let p = self.steer_point;
        let (d, v) = (self.base.config.hidden_size, self.base.config.vocab_size);
        self.base_to_point(b)?;
        // Candidate rows: copies of each problem's residual, steered by c·(b + V[category]).
        self.wait_categories()?;
        let bm = &mut self.base;
        let category = categories(&self.think, b);
        k::hybrid_expand(
            &self.gpu,
            &mut bm.a.r.slice_mut(..r * d),
            &mut bm.a.hy_idx.slice_mut(..r),
            &mut bm.a.hy_coef.slice_mut(..r),
            &category,
            &self.coefs.as_view(),
            b,
            c,
            d,
        )?;
        bm.close_point(b..r, p, false, SteerSel::Table, false, None)?;
        if self.s.mode == Mode::Persistent {
            self.gpu
                .stream
                .memcpy_dtod(&bm.a.r.slice(..r * d), &mut bm.a.r_saved.slice_mut(..r * d))
                .map_err(cu("saving residuals"))?;
        }
        // Blocks after the point for every row; only the problem rows write the cache.
        self.base_from_point(r, b, false)?;
        self.keep_base_tokens(b)?;
        // Gate and candidate choice by the thinking model's greedy ids and logits.
        self.join_thinking()?;
        self.keep_categories(b)?;
        // Rows EMIT, STEERED and WIN of `out`.
        let (mut emit, mut rest) = self.out.split_at_mut(self.max_b);
        let (mut steered, mut rest) = rest.split_at_mut(self.max_b);
        k::hybrid_select(
            &self.gpu,
            &mut emit.slice_mut(..b),
            &mut steered.slice_mut(..b),
            &mut rest.slice_mut(..b),
            &self.base.a.next.slice(..r),
            &self.think_tok.slice(..b),
            &self.think.a.logits.slice(..b * v),
            b,
            c,
            v,
            !self.s.no_gating,
        )?;
        if self.s.mode == Mode::Persistent {
            self.commit_winners(b, false)?;
        }
        Ok(())
    }

    /// Gate first: the problems through the whole base model, the gate, then the needing
    /// problems' candidates (rows [0, n·C) of a pass sized for B·C rows) from the point.
    fn gate_first_launches(&mut self, b: usize) -> Result<()> {
        let (c, n) = (self.c, b * self.c);
        let (d, v) = (self.base.config.hidden_size, self.base.config.vocab_size);
        let st = self.gpu.stream.clone();
        self.base_to_point(b)?;
        {
            let a = &mut self.base.a;
            st.memcpy_dtod(&a.r.slice(..b * d), &mut a.r_saved.slice_mut(..b * d))
                .map_err(cu("saving residuals"))?;
            st.memcpy_dtod(&a.pos.slice(..b), &mut self.pos_p.slice_mut(..b))
                .map_err(cu("saving positions"))?;
            st.memcpy_dtod(&a.slot.slice(..b), &mut self.slot_p.slice_mut(..b))
                .map_err(cu("saving slots"))?;
        }
        self.base_from_point(b, b, false)?;
        self.keep_base_tokens(b)?;
        self.join_thinking()?;
        self.keep_categories(b)?;
        // Rows EMIT, STEERED and WIN of `out`.
        let (mut emit, mut rest) = self.out.split_at_mut(self.max_b);
        let (mut steered, mut rest) = rest.split_at_mut(self.max_b);
        k::hybrid_gate(
            &self.gpu,
            &mut Gate {
                sel: &mut self.sel.slice_mut(..b),
                cidx: &mut self.cidx.slice_mut(..b),
                live: &mut self.base.a.live.slice_mut(..1),
                emit: &mut emit.slice_mut(..b),
                steered: &mut steered.slice_mut(..b),
                win: &mut rest.slice_mut(..b),
            },
            &self.base.a.next.slice(..b),
            &self.think_tok.slice(..b),
            b,
            c,
            !self.s.no_gating,
        )?;
        // The candidate pass: rows [0, n) of the base model's buffers, none writing the cache.
        let p = self.steer_point;
        let category = categories(&self.think, b);
        let a = &mut self.base.a;
        let saved = a.r_saved.slice(..b * d);
        k::hybrid_expand_compact(
            &self.gpu,
            k::CandidateRows {
                r: &mut a.r.slice_mut(..n * d),
                idx: &mut a.hy_idx.slice_mut(..n),
                coef: &mut a.hy_coef.slice_mut(..n),
                pos: &mut a.pos.slice_mut(..n),
                slot: &mut a.slot.slice_mut(..n),
            },
            &saved,
            &self.sel.slice(..b),
            &a.live.slice(..1),
            (&category, &self.pos_p.slice(..b), &self.slot_p.slice(..b)),
            &self.coefs.as_view(),
            b,
            c,
            d,
        )?;
        self.base
            .close_point(0..n, p, false, SteerSel::Table, false, None)?;
        if self.s.mode == Mode::Persistent {
            let a = &mut self.base.a;
            st.memcpy_dtod(
                &a.r.slice(..n * d),
                &mut a.r_saved.slice_mut(b * d..(b + n) * d),
            )
            .map_err(cu("saving residuals"))?;
        }
        self.base_from_point(n, 0, true)?;
        let a = &self.base.a;
        // Rows EMIT, STEERED and WIN of `out`.
        let (mut emit, mut rest) = self.out.split_at_mut(self.max_b);
        let (mut steered, mut rest) = rest.split_at_mut(self.max_b);
        k::hybrid_select_compact(
            &self.gpu,
            (
                &mut emit.slice_mut(..b),
                &mut steered.slice_mut(..b),
                &mut rest.slice_mut(..b),
            ),
            &a.next.slice(..n),
            &self.sel.slice(..b),
            &a.live.slice(..1),
            &self.think.a.logits.slice(..b * v),
            b,
            c,
            v,
        )?;
        // The problems' positions and slots back in rows [0, b): the commit below reads them, and
        // so does a replay of this step from the same uploaded inputs (graph capture warms up).
        let a = &mut self.base.a;
        st.memcpy_dtod(&self.pos_p.slice(..b), &mut a.pos.slice_mut(..b))
            .map_err(cu("restoring positions"))?;
        st.memcpy_dtod(&self.slot_p.slice(..b), &mut a.slot.slice_mut(..b))
            .map_err(cu("restoring slots"))?;
        if self.s.mode == Mode::Persistent {
            self.commit_winners(b, true)?;
        }
        Ok(())
    }

    /// Uploads the step inputs, runs (or replays) the step and reads back each problem's
    /// outcome.
    fn step(
        &mut self,
        ids: &[u32],
        think_ids: &[u32],
        slots: &[usize],
        pos_b: &[usize],
        pos_t: &[usize],
    ) -> Result<Vec<StepOut>> {
        let b = ids.len();
        // Single pass: problem rows then candidates, which share their problem's slot and
        // position. Gate first: the problem rows (the candidates' are set on the device).
        let c = if self.runs_gate_first(b) { 0 } else { self.c };
        let mut bslots = slots.to_vec();
        let mut bpos = pos_b.to_vec();
        for i in 0..b {
            bslots.extend(std::iter::repeat_n(slots[i], c));
            bpos.extend(std::iter::repeat_n(pos_b[i], c));
        }
        let mut bids = ids.to_vec();
        bids.resize(b + b * c, 0);
        self.base.upload_step(
            &bids,
            &Step {
                slots: &bslots,
                positions: &bpos,
                n_write: b,
                run_start: &[],
            },
        )?;
        self.think.upload_step(
            think_ids,
            &Step {
                slots,
                positions: pos_t,
                n_write: b,
                run_start: &[],
            },
        )?;
        // A replayed graph starts from the base stream: it must not overtake the upload on the
        // thinking model's stream.
        self.join_thinking()?;
        if self.use_graphs {
            // The problems' rows are independent (one slot each, candidates beside them), so
            // both models fuse RoPE into attention whenever they are set to.
            let fused = (self.base.fuses_rope(), self.think.fuses_rope());
            let key = (b, self.runs_gate_first(b), fused);
            if !self.graphs.contains_key(&key) {
                // The step is idempotent (same inputs rewrite the same cache entries), so a
                // warm-up run before capture changes nothing.
                self.step_launches(b)?;
                self.gpu.sync()?;
                let gpu = self.gpu.clone();
                let graph = gpu.capture(|| self.step_launches(b))?;
                self.graphs.insert(key, graph);
            }
            self.graphs[&key]
                .launch()
                .map_err(cu("replaying the hybrid step"))?;
        } else {
            self.step_launches(b)?;
        }
        // One copy for everything the host needs of the step.
        let m = self.max_b;
        self.gpu
            .stream
            .memcpy_dtoh(&self.out, self.out_host.as_mut_slice())
            .map_err(cu("reading the step"))?;
        self.gpu.sync()?;
        let at = |row: usize, i: usize| self.out_host[row * m + i];
        Ok((0..b)
            .map(|i| StepOut {
                tok: at(EMIT, i) as u32,
                steered: at(STEERED, i) != 0,
                win: at(WIN, i),
                category: at(CATEGORY, i) as usize,
                base_tok: at(BASE_TOK, i) as u32,
            })
            .collect())
    }

    /// The hybrid loop over any number of problems, max_b decoded together (cached or
    /// persistent mode): a finished problem's slot takes the next problem, so the step keeps
    /// its batch size (and its CUDA graph) until the queue runs dry.
    pub fn run<F: StepFlow>(
        &mut self,
        problems: &[Prompts],
        mut on_step: impl FnMut(usize, u32, &StepRecord) -> F,
    ) -> Result<Vec<Output>> {
        let (ctx_b, ctx_t) = (self.base.max_len(), self.think.max_len());
        for (i, p) in problems.iter().enumerate() {
            if p.base.is_empty() || p.thinking.is_empty() {
                bail!("problem {i}: empty prompt");
            }
        }
        let eos = self.base.config.eos_token_ids.clone();
        let mut outs: Vec<Output> = problems
            .iter()
            .map(|_| Output {
                ids: vec![],
                steps: vec![],
            })
            .collect();
        let nslots = self.max_b.min(problems.len());
        // Per slot: the problem it holds, the next token of each model and its position.
        let mut who: Vec<Option<usize>> = vec![None; nslots];
        let (mut next, mut think_next) = (vec![0u32; nslots], vec![0u32; nslots]);
        let (mut pos_b, mut pos_t) = (vec![0usize; nslots], vec![0usize; nslots]);
        // As in the other loops, a problem whose prompt leaves no room to generate gets an
        // empty output.
        let any = self.s.max_new_tokens > 0;
        let fits = |p: &Prompts| p.base.len() < ctx_b && p.thinking.len() < ctx_t;
        let mut queue = (0..problems.len()).filter(|&p| any && fits(&problems[p]));
        for slot in 0..nslots {
            if let Some(p) = queue.next() {
                self.prefill(slot, &problems[p])?;
                who[slot] = Some(p);
                (next[slot], think_next[slot]) = (
                    *problems[p].base.last().unwrap(),
                    *problems[p].thinking.last().unwrap(),
                );
                (pos_b[slot], pos_t[slot]) =
                    (problems[p].base.len() - 1, problems[p].thinking.len() - 1);
            }
        }
        let mut active: Vec<usize> = (0..nslots).filter(|&r| who[r].is_some()).collect();
        while !active.is_empty() {
            // Both models are fed the emitted token; on a problem's first step each feeds the
            // last token of its own prompt.
            let ids: Vec<u32> = active.iter().map(|&r| next[r]).collect();
            let tids: Vec<u32> = active.iter().map(|&r| think_next[r]).collect();
            let pb: Vec<usize> = active.iter().map(|&r| pos_b[r]).collect();
            let pt: Vec<usize> = active.iter().map(|&r| pos_t[r]).collect();
            let res = self.step(&ids, &tids, &active, &pb, &pt)?;
            for (j, &r) in active.iter().enumerate() {
                let StepOut {
                    tok,
                    steered,
                    win,
                    category,
                    base_tok,
                } = res[j];
                let rec = if steered {
                    StepRecord {
                        category,
                        steered: true,
                        coef: Some(self.s.coefficients[win.max(0) as usize]),
                        window: Some(-1),
                        changed: tok != base_tok,
                    }
                } else {
                    StepRecord {
                        category,
                        steered: false,
                        coef: None,
                        window: None,
                        changed: false,
                    }
                };
                let p = who[r].expect("active slots hold a problem");
                let stop = on_step(p, tok, &rec).stops();
                outs[p].ids.push(tok);
                outs[p].steps.push(rec);
                if stop {
                    return Ok(outs);
                }
                (next[r], think_next[r]) = (tok, tok);
                pos_b[r] += 1;
                pos_t[r] += 1;
                // As in exact mode: a sequence ends when it fills the context (the emitted
                // token, at pos + 1, included).
                let done = eos.contains(&tok)
                    || outs[p].ids.len() >= self.s.max_new_tokens
                    || pos_b[r] + 1 >= ctx_b
                    || pos_t[r] + 1 >= ctx_t;
                if done {
                    who[r] = None;
                    if let Some(q) = queue.next() {
                        self.prefill(r, &problems[q])?;
                        who[r] = Some(q);
                        (next[r], think_next[r]) = (
                            *problems[q].base.last().unwrap(),
                            *problems[q].thinking.last().unwrap(),
                        );
                        (pos_b[r], pos_t[r]) =
                            (problems[q].base.len() - 1, problems[q].thinking.len() - 1);
                    }
                }
            }
            active = (0..nslots).filter(|&r| who[r].is_some()).collect();
        }
        Ok(outs)
    }

    /// Prefills a problem into cache slot `slot`: all but the last prompt token of each model
    /// (the first step feeds the last one).
    fn prefill(&mut self, slot: usize, p: &Prompts) -> Result<()> {
        for (e, ids) in [(&mut self.base, &p.base), (&mut self.think, &p.thinking)] {
            let n = ids.len() - 1;
            if n > 0 {
                let slots = vec![slot; n];
                let pos: Vec<usize> = (0..n).collect();
                let step = Step {
                    slots: &slots,
                    positions: &pos,
                    n_write: n,
                    run_start: &[],
                };
                Decoder::forward(e, &ids[..n], &step, &[], &mut Hooks::default())?;
            }
        }
        Ok(())
    }
}

/// The hybrid loop on the GPU, cached or persistent mode: the one-graph step where the settings
/// allow it (`CudaHybrid::supports`), else the host-driven loop (`hybrid::run_cached`) on two
/// CUDA engines, for windows other than -1 and --random-firing. That loop runs both models'
/// steps as decode graphs, the thinking model's on a sibling stream (`think_gpu`) while the base
/// model's runs, reads back the greedy ids, the thinking model's residual at the SAE
/// layer and, on steered steps, its logits at the candidates, and launches each steered step's
/// candidate runs as one more call from the base engine's kept residuals; that engine takes a
/// window's whole run in one call.
pub enum GpuHybrid {
    Step(Box<CudaHybrid>),
    Engines {
        base: Box<CudaEngine>,
        think: Box<CudaEngine>,
    },
}

/// The slots of a base engine of `max_b` problem slots, `ctx` positions and `rows` per call
/// whose weights take `weights` bytes, steered at block input `point`: the problems' slots and
/// the prefix caches (`hybrid::prefix`) in the blocks from the point on, as many as
/// `prefix::count` says with the GPU memory left free by the engine and its kept residuals.
#[allow(clippy::too_many_arguments)]
pub fn base_slots(
    gpu: &Gpu,
    c: &Config,
    s: &Settings,
    max_b: usize,
    latents: usize,
    point: usize,
    ctx: usize,
    rows: usize,
    weights: usize,
) -> Result<Slots> {
    let (free, _) = gpu.mem_info()?;
    let engine = super::model::cache_and_activation_bytes(c, max_b, ctx, rows)
        + weights
        + max_b * ctx * c.hidden_size * 4;
    let per = prefix::slot_bytes(c, point, ctx, 2);
    let late = prefix::count(s, max_b, latents, per, free.saturating_sub(engine))?;
    Ok(Slots {
        all: max_b,
        late,
        from: point,
    })
}

impl GpuHybrid {
    /// Loads both checkpoints, sized for `max_b` problems whose prompts and answers fit
    /// `ctx_base` / `ctx_think` positions: the base model on device 0, the thinking model there
    /// too or on device `s.thinking_gpu`. Two devices take the host-driven loop: the one-graph
    /// step keeps both models' work on one device.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        base_dir: &std::path::Path,
        think_dir: &std::path::Path,
        sae: &Sae,
        steering: &SteeringSet,
        s: &Settings,
        max_b: usize,
        ctx_base: usize,
        ctx_think: usize,
    ) -> Result<GpuHybrid> {
        if s.mode == Mode::Exact {
            bail!("--mode exact recomputes whole sequences and runs on the CPU; use --device cpu");
        }
        s.validate(&[])?;
        let gpu = Arc::new(Gpu::new(0)?);
        let tg = match s.thinking_gpu {
            Some(n) if n != 0 => Arc::new(Gpu::new(n)?),
            _ => think_gpu(&gpu)?,
        };
        // Rows per call: the prefill chunk at least; the one-graph step's candidate rows, or the
        // host-driven loop's longest run (window 0: the whole sequence; -N: the last N).
        let call = call_rows();
        let think_max_t = max_b.max(call);
        if s.thinking_gpu.is_none() && CudaHybrid::supports(s) {
            let think = CudaEngine::load(tg, think_dir, max_b, ctx_think, think_max_t)?;
            let rows = (max_b * (1 + s.coefficients.len())).max(call);
            let base = CudaEngine::load(gpu, base_dir, max_b, ctx_base, rows)?;
            let h = CudaHybrid::new(think, base, sae, steering, s, max_b)?;
            return Ok(GpuHybrid::Step(Box::new(h)));
        }
        let longest = s
            .windows
            .iter()
            .map(|&w| match w {
                0 => ctx_base,
                _ => (w.unsigned_abs() as usize).min(ctx_base),
            })
            .max()
            .unwrap_or(1);
        let think = CudaEngine::load(tg, think_dir, max_b, ctx_think, think_max_t)?;
        let rows = (max_b * s.coefficients.len()).max(longest).max(call);
        let cb = Config::from_file(&base_dir.join("config.json"))?;
        let weights = cb.param_count() * 2;
        let art = Artifacts { sae, steering };
        let point = art.steer_point(s);
        let slots = base_slots(
            &gpu,
            &cb,
            s,
            max_b,
            sae.latents,
            point,
            ctx_base,
            rows,
            weights,
        )?;
        let mut base = CudaEngine::load(gpu, base_dir, slots, ctx_base, rows)?;
        // The residuals the candidate runs start from (slots · context · D f32), allocated now
        // so that a card too small says so before any problem runs.
        base.keep_residuals(point, max_b)?;
        let heads = base.config.num_attention_heads;
        if rows * heads > super::SCRATCH_COUNTERS {
            bail!(
                "windows {:?} at a context of {ctx_base} need calls of {rows} rows × {heads} heads, above decode attention's {} (row, head) counters",
                s.windows,
                super::SCRATCH_COUNTERS
            );
        }
        Ok(GpuHybrid::Engines {
            base: Box::new(base),
            think: Box::new(think),
        })
    }

    /// Runs every problem (`art`: the artifacts `load` was given).
    pub fn run<F: StepFlow>(
        &mut self,
        art: Artifacts,
        problems: &[Prompts],
        s: &Settings,
        on_step: impl FnMut(usize, u32, &StepRecord) -> F,
    ) -> Result<Vec<Output>> {
        match self {
            GpuHybrid::Step(h) => {
                h.set_max_new_tokens(s.max_new_tokens);
                h.run(problems, on_step)
            }
            GpuHybrid::Engines { base, think } => {
                run_cached(art, &mut **base, &mut **think, problems, s, on_step)
            }
        }
    }

    /// The (thinking, base) engines.
    pub fn engines_mut(&mut self) -> (&mut CudaEngine, &mut CudaEngine) {
        match self {
            GpuHybrid::Step(h) => (&mut h.think, &mut h.base),
            GpuHybrid::Engines { base, think } => (&mut **think, &mut **base),
        }
    }
}
