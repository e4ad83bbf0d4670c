//! The hybrid decode loop of hybrid.md §3–4 on the CPU: the base model generates; the thinking
//! model, through an SAE on its residual, picks the steering category; on steps where the two
//! models' greedy tokens disagree, steered candidates of the base model are scored by the
//! thinking model's logits.
//!
//! Modes: `Exact` recomputes both full sequences every step (any windows: the oracle);
//! `Cached` keeps both KV caches, which hold unsteered K/V, and is the same function as exact
//! for any windows: a candidate of window −N reruns only the last N positions through the
//! blocks after the steering point (window 0: every position), as a read-only run that attends
//! to the cache before it; `Persistent` (our extension, windows [-1]) also commits the winning
//! candidate's steered K/V to the cache.

use crate::config::Config;
use crate::cpu_ops::argmax;
use crate::engine::{CpuEngine, Decoder, SteerRows};
use crate::model::{Hooks, KvCache, Model, Slots, Step, Workspace};
use crate::rng::Rng;
use crate::sae::Sae;
use crate::steering::SteeringSet;
use crate::{bail, Result};
use serde::Serialize;
use std::ops::ControlFlow;
use std::sync::Arc;

pub mod ablations;
pub mod prefix;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Exact,
    Cached,
    /// Our extension: the chosen candidate's steered K/V stay in the context.
    Persistent,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub coefficients: Vec<f32>, // C, outer loop
    pub windows: Vec<i64>,      // W, inner loop: 0 = every position, -N = the last N
    pub max_new_tokens: usize,
    /// Ablation: add only the bias vector.
    pub only_bias: bool,
    /// Ablation: pick the category uniformly at random (seeded) instead of by the SAE.
    pub random_firing: Option<u64>,
    /// Ablation: steer every step, agreement or not.
    pub no_gating: bool,
    /// Add at the input of block L_b instead of its output (where the reference code trained).
    pub steer_at_block_input: bool,
    /// The reference code's quirk: encode the raw activation (no centring / unit norm).
    pub sae_raw_activations: bool,
    /// Problems decoded together in the cached modes; a finished problem's slot takes the next.
    pub batch: usize,
    /// Cached mode with window 0: base-engine slots that keep window-0 candidates' steered K/V
    /// (`prefix`); None: one per (problem slot, category, coefficient), as many as fit a
    /// quarter of the free memory.
    pub prefix_caches: Option<usize>,
    /// GPU runs: the CUDA device (ordinal) of the thinking model; the base model is on device 0.
    /// Some(_) runs the host-driven loop (`cuda::hybrid::GpuHybrid`), also for Some(0); None:
    /// both on device 0, in the one-graph step where the other settings allow it.
    pub thinking_gpu: Option<usize>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::Cached,
            coefficients: (1..=10).map(|i| i as f32 / 10.0).collect(),
            windows: vec![-1],
            max_new_tokens: 2000,
            only_bias: false,
            random_firing: None,
            no_gating: false,
            steer_at_block_input: false,
            sae_raw_activations: false,
            batch: 8,
            prefix_caches: None,
            thinking_gpu: None,
        }
    }
}

impl Settings {
    /// Coefficients, windows and mode that the loops take, and prompts to start from.
    pub fn validate(&self, problems: &[Prompts]) -> Result<()> {
        if self.coefficients.is_empty() || self.windows.is_empty() {
            bail!(
                "expected at least one coefficient and one window, found {} and {}",
                self.coefficients.len(),
                self.windows.len()
            );
        }
        if let Some(w) = self.windows.iter().find(|&&w| w > 0) {
            bail!("expected windows 0 (every position) or -N (the last N positions), found {w}");
        }
        if let Some(c) = self.coefficients.iter().find(|c| !c.is_finite()) {
            bail!("--coefficients: expected finite numbers, found {c}");
        }
        if self.max_new_tokens == 0 || self.batch == 0 {
            bail!(
                "expected --max-new-tokens and --batch of at least 1, found {} and {}",
                self.max_new_tokens,
                self.batch
            );
        }
        if self.mode == Mode::Persistent && self.windows != [-1] {
            bail!(
                "--mode persistent commits the newest position's steered K/V, so windows must be [-1]; found {:?} (use --mode cached or exact for other windows)",
                self.windows
            );
        }
        if self.prefix_caches.is_some_and(|n| n > 0)
            && (self.mode != Mode::Cached || !self.windows.contains(&0))
        {
            bail!(
                "--prefix-caches keeps window-0 candidates: expected --mode cached with window 0, found --mode {} and windows {:?}",
                format!("{:?}", self.mode).to_lowercase(),
                self.windows
            );
        }
        if let Some(i) = problems
            .iter()
            .position(|p| p.base.is_empty() || p.thinking.is_empty())
        {
            bail!("problem {i}: empty prompt");
        }
        Ok(())
    }
}

/// What happened at one generated token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepRecord {
    pub category: usize,
    pub steered: bool,
    /// The winning candidate's coefficient and window (steered steps only).
    pub coef: Option<f32>,
    pub window: Option<i64>,
    /// Steered steps: the emitted token differs from the base model's own (unsteered greedy)
    /// token. A step can be steered without changing it: the thinking model's logits may pick
    /// a candidate whose token is the base model's (the steering too weak to move it, or the
    /// thinking model preferring it; under --no-gating, the models agree at most steps). False
    /// on unsteered steps.
    pub changed: bool,
}

#[derive(Debug, Clone)]
pub struct Output {
    pub ids: Vec<u32>,
    pub steps: Vec<StepRecord>,
}

impl Output {
    pub fn steered_fraction(&self) -> f64 {
        let n = self.steps.len().max(1);
        self.steps.iter().filter(|s| s.steered).count() as f64 / n as f64
    }
    /// How often each category fired (steered steps), [K].
    pub fn category_counts(&self, k: usize) -> Vec<usize> {
        let mut c = vec![0; k];
        for s in self.steps.iter().filter(|s| s.steered) {
            c[s.category] += 1;
        }
        c
    }
}

/// What the `on_step` of a hybrid loop returns: `()` to go on, or a `ControlFlow<()>` whose
/// `Break` ends the loop after that token (the outputs it returns are then partial).
pub trait StepFlow {
    fn stops(self) -> bool;
}

impl StepFlow for () {
    fn stops(self) -> bool {
        false
    }
}

impl StepFlow for ControlFlow<()> {
    fn stops(self) -> bool {
        self.is_break()
    }
}

/// Runs `run` (one of the hybrid loops, given its `on_step`) over `n` problems and hands each
/// problem's output to `hand` the moment it stops at an end-of-sequence id of `eos` or at `max`
/// new tokens, and the others (stopped by a full context) after the loop, from the outputs it
/// returns. A failing `hand` (a closed stdout, a full disk, a judge that went down) ends the
/// loop at once: the problems still decoding are not handed over, and its error is returned.
pub fn hand_over_as_they_finish<E: From<crate::Error>>(
    n: usize,
    eos: &[u32],
    max: usize,
    run: impl FnOnce(&mut dyn FnMut(usize, u32, &StepRecord) -> ControlFlow<()>) -> Result<Vec<Output>>,
    mut hand: impl FnMut(usize, &Output) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut outs: Vec<Output> = (0..n)
        .map(|_| Output {
            ids: vec![],
            steps: vec![],
        })
        .collect();
    let mut handed = vec![false; n];
    let mut failed: Option<E> = None;
    let ended = run(&mut |i, tok, rec| {
        let o = &mut outs[i];
        o.ids.push(tok);
        o.steps.push(*rec);
        if eos.contains(&tok) || o.ids.len() >= max {
            handed[i] = true;
            if let Err(e) = hand(i, o) {
                failed = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    for (i, o) in ended.iter().enumerate().filter(|(i, _)| !handed[*i]) {
        hand(i, o)?;
    }
    Ok(())
}

/// The two models and the artifacts that connect them, validated against each other.
pub struct Pair<'a> {
    pub base: &'a Arc<Model>,
    pub thinking: &'a Arc<Model>,
    pub sae: &'a Sae,
    pub steering: &'a SteeringSet,
}

impl Pair<'_> {
    pub fn validate(&self) -> Result<()> {
        self.artifacts()
            .validate_for(&self.base.config, &self.thinking.config)
    }

    /// See `check_prompts`.
    pub fn check_prompts(
        &self,
        problems: &[Prompts],
        index: impl Fn(usize) -> usize,
    ) -> Result<()> {
        check_prompts(&self.base.config, &self.thinking.config, problems, index)
    }

    pub fn artifacts(&self) -> Artifacts<'_> {
        Artifacts {
            sae: self.sae,
            steering: self.steering,
        }
    }
}

/// `--thinking-gpu n` for a run that is (`on_gpu`) or is not on the GPU: a device this process
/// sees, and only on the GPU.
pub fn check_thinking_gpu(n: usize, on_gpu: bool) -> Result<()> {
    if !on_gpu {
        bail!("--thinking-gpu {n}: expected a run on the GPU (cached or persistent mode, --device cuda, or auto with a usable GPU and shapes the kernels take), found one on the CPU");
    }
    let count = crate::cuda::device_count()?;
    if n >= count {
        bail!("--thinking-gpu {n}: expected a CUDA device ordinal below {count}, the number of devices this process sees (CUDA_VISIBLE_DEVICES)");
    }
    Ok(())
}

/// Each problem's prompts against their models: ids in the vocabularies, and room in the
/// contexts for at least one new token. Errors name problem `index(i)` (its row in the caller's
/// numbering).
pub fn check_prompts(
    base: &Config,
    thinking: &Config,
    problems: &[Prompts],
    index: impl Fn(usize) -> usize,
) -> Result<()> {
    for (p, i) in problems.iter().zip((0..).map(index)) {
        for (side, c, ids) in [("base", base, &p.base), ("thinking", thinking, &p.thinking)] {
            let ctx = c.max_position_embeddings;
            if ids.len() >= ctx {
                bail!(
                    "problem {i}: the {side} prompt has {} tokens, expected fewer than the {side} model's context of {ctx} (max_position_embeddings)",
                    ids.len()
                );
            }
            c.check_ids(ids)
                .map_err(|e| crate::Error::Input(format!("problem {i}, {side} prompt: {e}")))?;
        }
    }
    Ok(())
}

/// The SAE on the thinking model and the steering set on the base model.
#[derive(Clone, Copy)]
pub struct Artifacts<'a> {
    pub sae: &'a Sae,
    pub steering: &'a SteeringSet,
}

impl Artifacts<'_> {
    /// The SAE against the thinking model, the steering set against the base model and the SAE.
    pub fn validate_for(&self, base: &Config, thinking: &Config) -> Result<()> {
        // The thinking model's logits score the base model's candidate ids.
        if base.vocab_size > thinking.vocab_size {
            bail!(
                "the thinking model must score every base-model token id: expected a thinking vocab_size ≥ the base model's {}, found {}",
                base.vocab_size,
                thinking.vocab_size
            );
        }
        self.sae
            .validate_for(thinking.hidden_size, thinking.num_hidden_layers)?;
        self.steering
            .validate_for(base.hidden_size, base.num_hidden_layers)?;
        self.steering.check_matches_sae(self.sae)?;
        Ok(())
    }

    /// The residual point where steering is added: after block L_b (or before it, with the flag).
    pub fn steer_point(&self, s: &Settings) -> usize {
        if s.steer_at_block_input {
            self.steering.layer
        } else {
            self.steering.layer + 1
        }
    }

    fn category(&self, h: &[f32], z: &mut [f32], s: &Settings, rng: &mut Option<Rng>) -> usize {
        if let Some(rng) = rng.as_mut() {
            return rng.below(self.sae.latents);
        }
        if s.sae_raw_activations {
            self.sae.encode_raw(h, z);
        } else {
            self.sae.encode(h, z);
        }
        argmax(z)
    }
}

/// One problem: the base model's prompt ids and the thinking model's prompt ids.
pub struct Prompts {
    pub base: Vec<u32>,
    pub thinking: Vec<u32>,
}

/// Runs the hybrid loop for every problem; `Exact` runs one problem at a time, the cached modes
/// decode all problems in one batch. `on_step(problem, token, record)` sees each token as it is chosen.
pub fn run<F: StepFlow>(
    pair: &Pair,
    problems: &[Prompts],
    s: &Settings,
    mut on_step: impl FnMut(usize, u32, &StepRecord) -> F,
) -> Result<Vec<Output>> {
    pair.validate()?;
    s.validate(problems)?;
    pair.check_prompts(problems, |i| i)?;
    match s.mode {
        Mode::Exact => {
            let mut outs = Vec::with_capacity(problems.len());
            let mut stopped = false;
            for (i, p) in problems.iter().enumerate() {
                if stopped {
                    break;
                }
                outs.push(exact_one(pair, p, s, |t, r| {
                    stopped = on_step(i, t, r).stops();
                    stopped
                })?);
            }
            Ok(outs)
        }
        Mode::Cached | Mode::Persistent => {
            let ctx = |m: &Model, prompt: fn(&Prompts) -> usize| {
                let longest = problems.iter().map(prompt).max().unwrap_or(0);
                m.config
                    .max_position_embeddings
                    .min(longest + s.max_new_tokens)
            };
            let slots = s.batch.max(1).min(problems.len().max(1));
            let (ctx_b, ctx_t) = (
                ctx(pair.base, |p| p.base.len()),
                ctx(pair.thinking, |p| p.thinking.len()),
            );
            let point = pair.artifacts().steer_point(s);
            // What the engines take besides the caches: both models' K/V for the problems'
            // slots and the base model's kept residuals.
            let engines = slots
                * (prefix::slot_bytes(&pair.base.config, 0, ctx_b, 4)
                    + prefix::slot_bytes(&pair.thinking.config, 0, ctx_t, 4)
                    + ctx_b * pair.base.config.hidden_size * 4);
            let avail = prefix::cpu_available().saturating_sub(engines);
            let per = prefix::slot_bytes(&pair.base.config, point, ctx_b, 4);
            let late = prefix::count(s, slots, pair.sae.latents, per, avail)?;
            let base_slots = Slots {
                all: slots,
                late,
                from: point,
            };
            let mut base = CpuEngine::new(pair.base.clone(), base_slots, ctx_b);
            let mut think = CpuEngine::new(pair.thinking.clone(), slots, ctx_t);
            run_cached(
                pair.artifacts(),
                &mut base,
                &mut think,
                problems,
                s,
                on_step,
            )
        }
    }
}

/// The candidate with the highest thinking-model logit (`scores`, in candidate order); ties go
/// to the earliest: strict `>` keeps the first maximum.
fn pick(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in scores.iter().enumerate() {
        if x > scores[best] {
            best = i;
        }
    }
    best
}

/// A full forward of one sequence (slot 0, fresh positions), steering `add` [T, D] at `point`,
/// capturing `capture`; returns the last position's logits and the captured last row.
struct Full {
    ws: Workspace,
    cache: KvCache,
    h: Vec<f32>,
}

impl Full {
    fn new(m: &Model, len: usize) -> Full {
        Full {
            ws: Workspace::default(),
            cache: KvCache::new(&m.config, 1, len),
            h: vec![],
        }
    }
    fn run(
        &mut self,
        m: &Model,
        ids: &[u32],
        steer: Option<(usize, &[f32])>,
        capture: Option<usize>,
    ) -> (Vec<f32>, Vec<f32>) {
        let t = ids.len();
        let (slots, pos) = (vec![0; t], (0..t).collect::<Vec<_>>());
        let step = Step {
            slots: &slots,
            positions: &pos,
            n_write: t,
            run_start: &[],
        };
        let mut hooks = Hooks {
            capture: capture.map(|p| (p, vec![])).into_iter().collect(),
            steer,
        };
        m.embed(ids, &mut self.h);
        m.layers(
            &mut self.ws,
            &mut self.cache,
            &mut self.h,
            0..m.config.num_hidden_layers,
            &step,
            &mut hooks,
        );
        let logits = m.head(&mut self.ws, &self.h, &[t - 1]).to_vec();
        let d = m.config.hidden_size;
        let last = hooks
            .capture
            .first()
            .map(|(_, c)| c[(t - 1) * d..].to_vec())
            .unwrap_or_default();
        (logits, last)
    }
}

/// One problem in exact mode; `on_step` returns true to end it after that token.
fn exact_one(
    pair: &Pair,
    p: &Prompts,
    s: &Settings,
    mut on_step: impl FnMut(u32, &StepRecord) -> bool,
) -> Result<Output> {
    let (b, t) = (pair.base, pair.thinking);
    let art = pair.artifacts();
    let ctx_b = b
        .config
        .max_position_embeddings
        .min(p.base.len() + s.max_new_tokens);
    let ctx_t = t
        .config
        .max_position_embeddings
        .min(p.thinking.len() + s.max_new_tokens);
    let (mut fb, mut ft) = (Full::new(b, ctx_b), Full::new(t, ctx_t));
    let (mut seq_b, mut seq_t) = (p.base.clone(), p.thinking.clone());
    let d = b.config.hidden_size;
    let point = art.steer_point(s);
    let mut z = vec![0f32; pair.sae.latents];
    let mut vec_d = vec![0f32; d];
    let mut rng = s.random_firing.map(Rng::new);
    let mut out = Output {
        ids: vec![],
        steps: vec![],
    };
    while out.ids.len() < s.max_new_tokens && seq_b.len() < ctx_b && seq_t.len() < ctx_t {
        // 1. The thinking model on its whole sequence: category and logits at the last position.
        let (think_logits, h) = ft.run(t, &seq_t, None, Some(pair.sae.layer + 1));
        let category = art.category(&h, &mut z, s, &mut rng);
        let think_tok = argmax(&think_logits) as u32;
        // 2. The base model unsteered.
        let (base_logits, _) = fb.run(b, &seq_b, None, None);
        let base_tok = argmax(&base_logits) as u32;
        let mut rec = StepRecord {
            category,
            steered: false,
            coef: None,
            window: None,
            changed: false,
        };
        let tok = if think_tok == base_tok && !s.no_gating {
            base_tok
        } else {
            // 4. One steered base run per (c, w); the thinking model's logits pick the winner.
            vec_d.fill(0.0);
            pair.steering
                .add_scaled(category, 1.0, s.only_bias, &mut vec_d);
            let n = seq_b.len();
            let mut add = vec![0f32; n * d];
            let (mut cands, mut which) = (vec![], vec![]);
            for &c in &s.coefficients {
                for &w in &s.windows {
                    let first = window_start(w, n);
                    add.fill(0.0);
                    for row in add[first * d..].chunks_mut(d) {
                        for (a, v) in row.iter_mut().zip(&vec_d) {
                            *a = c * v;
                        }
                    }
                    let (l, _) = fb.run(b, &seq_b, Some((point, &add)), None);
                    cands.push(argmax(&l) as u32);
                    which.push((c, w));
                }
            }
            let scores: Vec<f32> = cands.iter().map(|&c| think_logits[c as usize]).collect();
            let k = pick(&scores);
            rec = StepRecord {
                category,
                steered: true,
                coef: Some(which[k].0),
                window: Some(which[k].1),
                changed: cands[k] != base_tok,
            };
            cands[k]
        };
        let stop = on_step(tok, &rec);
        out.ids.push(tok);
        out.steps.push(rec);
        if stop || b.config.eos_token_ids.contains(&tok) {
            break;
        }
        seq_b.push(tok);
        seq_t.push(tok);
    }
    Ok(out)
}

/// Per-engine state of the cached loop, per cache slot: the whole sequence (prompt, then the
/// emitted tokens) and how many of its tokens the cache holds; the rest are fed next.
struct Side {
    len: Vec<usize>,
    seq: Vec<Vec<u32>>,
}

impl Side {
    fn new(slots: usize) -> Side {
        Side {
            len: vec![0; slots],
            seq: vec![vec![]; slots],
        }
    }

    fn load(&mut self, slot: usize, prompt: &[u32]) {
        self.len[slot] = 0;
        self.seq[slot] = prompt.to_vec();
    }

    /// Flattens the tokens still to feed of `rows` into one step; returns (ids, slots,
    /// positions, last index per row).
    fn gather(&self, rows: &[usize]) -> (Vec<u32>, Vec<usize>, Vec<usize>, Vec<usize>) {
        let (mut ids, mut slots, mut pos, mut last) = (vec![], vec![], vec![], vec![]);
        for &r in rows {
            let (from, to) = (self.len[r], self.seq[r].len());
            ids.extend_from_slice(&self.seq[r][from..to]);
            slots.extend(std::iter::repeat_n(r, to - from));
            pos.extend(from..to);
            last.push(ids.len() - 1);
        }
        (ids, slots, pos, last)
    }

    /// Feeds all but the last token still to feed of each of `rows` in one call without hooks
    /// or logits (a long prompt: the engine may split it into calls), so that the step's decode
    /// call (`greedy_capture`, `greedy`) holds one token per row.
    fn prefill(&mut self, e: &mut dyn Decoder, rows: &[usize]) -> Result<()> {
        let (mut ids, mut slots, mut pos) = (vec![], vec![], vec![]);
        for &r in rows {
            let (from, to) = (self.len[r], self.seq[r].len() - 1);
            ids.extend_from_slice(&self.seq[r][from..to]);
            slots.extend(std::iter::repeat_n(r, to - from));
            pos.extend(from..to);
        }
        if ids.is_empty() {
            return Ok(());
        }
        let step = Step {
            slots: &slots,
            positions: &pos,
            n_write: ids.len(),
            run_start: &[],
        };
        e.forward(&ids, &step, &[], &mut Hooks::default())?;
        for &r in rows {
            self.len[r] = self.seq[r].len() - 1;
        }
        Ok(())
    }

    /// The slot's cache takes its remaining tokens, and `tok` is fed next.
    fn advance(&mut self, slot: usize, tok: u32) {
        self.len[slot] = self.seq[slot].len();
        self.seq[slot].push(tok);
    }
}

/// The cached and persistent modes on any two engines (CPU or CUDA, through `Decoder`): both
/// KV caches hold unsteered K/V, and the base model keeps every position's residual at the
/// steering point (`Decoder::keep_residuals`). A steered step's candidate of window w takes the
/// kept residuals of the window's positions, adds c·(b + V[category]) and runs the blocks after
/// the point (as a read-only run in the problem's slot: it attends to the cache before the
/// window, then to its own rows); the blocks before the point would only give the kept values
/// again. Persistent mode then rewrites the newest position with the winner's steering.
/// With window 0, the base engine's slots beyond the batch's (up to `s.prefix_caches`) keep
/// window-0 candidates' steered K/V (`prefix`): such a candidate then runs only the positions
/// its slot lacks, writing them there.
/// `batch` problems decode together, and a finished problem's slot takes the next one.
pub fn run_cached<F: StepFlow>(
    art: Artifacts,
    base: &mut dyn Decoder,
    think: &mut dyn Decoder,
    problems: &[Prompts],
    s: &Settings,
    mut on_step: impl FnMut(usize, u32, &StepRecord) -> F,
) -> Result<Vec<Output>> {
    art.validate_for(base.config(), think.config())?;
    s.validate(problems)?;
    if s.mode == Mode::Exact {
        bail!("run_cached runs the cached and persistent modes, found --mode exact");
    }
    let (ctx_b, ctx_t) = (base.max_len(), think.max_len());
    let eos = base.config().eos_token_ids.clone();
    let nslots = s
        .batch
        .max(1)
        .min(problems.len().max(1))
        .min(base.slots())
        .min(think.slots());
    let (mut sb, mut st) = (Side::new(nslots), Side::new(nslots));
    let mut who: Vec<Option<usize>> = vec![None; nslots];
    // Problems whose prompt leaves no room to generate get an empty output.
    let mut queue = (0..problems.len()).filter(|&p| {
        s.max_new_tokens > 0 && problems[p].base.len() < ctx_b && problems[p].thinking.len() < ctx_t
    });
    for (slot, holds) in who.iter_mut().enumerate() {
        if let Some(p) = queue.next() {
            sb.load(slot, &problems[p].base);
            st.load(slot, &problems[p].thinking);
            *holds = Some(p);
        }
    }
    let d = base.config().hidden_size;
    let dt = think.config().hidden_size;
    // Candidates per steered row, in (c, w) order.
    let per = s.coefficients.len() * s.windows.len();
    let point = art.steer_point(s);
    base.keep_residuals(point, nslots)?;
    let caches = match s.windows.contains(&0) && s.mode == Mode::Cached {
        true => (base.slots() - nslots).min(s.prefix_caches.unwrap_or(usize::MAX)),
        false => 0,
    };
    let mut prefixes = prefix::Prefixes::new(nslots, caches);
    let mut step_no = 0;
    let mut z = vec![0f32; art.sae.latents];
    // --random-firing: each problem draws from its own generator, seeded as in exact mode.
    let mut rngs: Vec<Option<Rng>> = problems
        .iter()
        .map(|_| s.random_firing.map(Rng::new))
        .collect();
    let mut outs: Vec<Output> = problems
        .iter()
        .map(|_| Output {
            ids: vec![],
            steps: vec![],
        })
        .collect();
    let mut active: Vec<usize> = (0..nslots).filter(|&r| who[r].is_some()).collect();
    while !active.is_empty() {
        step_no += 1;
        // New prompts: all but their last token, in calls of their own.
        st.prefill(think, &active)?;
        sb.prefill(base, &active)?;
        // 1. Thinking model: feed the newest tokens (a decode step), capture block L_t's
        // output; its logits stay with the engine (only the candidates' are read, in 4). It
        // runs while the base model's step (2) does, where the engines allow (CUDA streams).
        let (tids, slots, pos, last_t) = st.gather(&active);
        let step = Step {
            slots: &slots,
            positions: &pos,
            n_write: tids.len(),
            run_start: &[],
        };
        think.start_capture(&tids, &step, art.sae.layer + 1)?;

        // 2. Base model unsteered (one token per row: a decode step).
        let (ids, slots, pos, _) = sb.gather(&active);
        let step = Step {
            slots: &slots,
            positions: &pos,
            n_write: ids.len(),
            run_start: &[],
        };
        let base_toks = base.greedy(&ids, &step)?;

        let (think_all, captured) = think.finish_capture()?;
        let think_toks: Vec<u32> = last_t.iter().map(|&i| think_all[i]).collect();
        let categories: Vec<usize> = last_t
            .iter()
            .zip(&active)
            .map(|(&i, &r)| {
                let rng = &mut rngs[who[r].expect("active slots hold a problem")];
                art.category(&captured[i * dt..(i + 1) * dt], &mut z, s, rng)
            })
            .collect();

        // 3–4. Candidates for every row that needs steering, as read-only runs.
        let steer_rows: Vec<usize> = (0..active.len())
            .filter(|&k| s.no_gating || think_toks[k] != base_toks[k])
            .collect();
        // Each steered row's vector b + V[category], [steer rows, D].
        let mut vecs = vec![0f32; steer_rows.len() * d];
        for (j, &k) in steer_rows.iter().enumerate() {
            let row = &mut vecs[j * d..(j + 1) * d];
            art.steering
                .add_scaled(categories[k], 1.0, s.only_bias, row);
        }
        let slot_of = |j: usize| active[steer_rows[j]];
        let (mut runs, which) = candidate_runs(steer_rows.len(), s, |j| sb.seq[slot_of(j)].len());
        // Window-0 runs continue their prefix caches where there is one.
        let zero: Vec<usize> = match caches > 0 {
            true => (0..runs.len()).filter(|&i| runs[i].first == 0).collect(),
            false => vec![],
        };
        let wants: Vec<(prefix::Key, usize)> = zero
            .iter()
            .map(|&i| {
                let (r, k) = (&runs[i], steer_rows[runs[i].j]);
                let category = if s.only_bias {
                    usize::MAX
                } else {
                    categories[k]
                };
                let p = who[active[k]].expect("active slots hold a problem");
                ((p, category, r.c.to_bits()), r.n)
            })
            .collect();
        for (&i, w) in zero.iter().zip(prefixes.take_step(&wants, step_no)) {
            runs[i].write = w;
        }
        // Runs that write their cache first: a call's written rows come before its read-only ones.
        let order: Vec<usize> = (0..runs.len())
            .filter(|&i| runs[i].write.is_some())
            .chain((0..runs.len()).filter(|&i| runs[i].write.is_none()))
            .collect();
        let mut cand = vec![0; runs.len()];
        for group in run_groups(&runs, &order, base.max_rows().min(CANDIDATE_ROWS)) {
            let (mut cslots, mut cpos, mut starts, mut lasts, mut idx, mut coef, mut from) =
                (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
            let mut n_write = 0;
            for &ri in group {
                let r = &runs[ri];
                let own = slot_of(r.j);
                let (slot, first) = r.write.unwrap_or((own, r.first));
                let first_row = cpos.len();
                for p in first..r.n {
                    cslots.push(slot);
                    cpos.push(p);
                    from.push(own);
                    idx.push(r.j as u32);
                    coef.push(r.c);
                    match r.write {
                        Some(_) => n_write += 1,
                        None => starts.push(first_row),
                    }
                }
                lasts.push(cpos.len() - 1);
            }
            // Row i: the kept residual of its problem's slot plus c · vecs[j] of its run (the
            // steered row's b + V[category]).
            let steer = SteerRows {
                vecs: &vecs,
                idx: &idx,
                coef: &coef,
                from: &from,
            };
            let cstep = Step {
                slots: &cslots,
                positions: &cpos,
                n_write,
                run_start: &starts,
            };
            let ids = base.greedy_kept(&cstep, &steer, &lasts)?;
            for (&ri, id) in group.iter().zip(ids) {
                cand[ri] = id;
            }
        }
        let mut chosen: Vec<(u32, StepRecord)> = (0..active.len())
            .map(|k| {
                let rec = StepRecord {
                    category: categories[k],
                    steered: false,
                    coef: None,
                    window: None,
                    changed: false,
                };
                (base_toks[k], rec)
            })
            .collect();
        // The thinking model's logits at each steered row's candidates ([tokens, per], u32::MAX
        // where there is none) pick the winners.
        let mut at = vec![u32::MAX; tids.len() * per];
        for (j, &k) in steer_rows.iter().enumerate() {
            for (i, &(ri, _, _)) in which[j].iter().enumerate() {
                at[last_t[k] * per + i] = cand[ri];
            }
        }
        let scores = if steer_rows.is_empty() {
            vec![]
        } else {
            think.logits_at(&at)?
        };
        for (j, &k) in steer_rows.iter().enumerate() {
            let toks: Vec<u32> = which[j].iter().map(|&(ri, _, _)| cand[ri]).collect();
            let from = last_t[k] * per;
            let win = pick(&scores[from..from + toks.len()]);
            let (_, c, w) = which[j][win];
            let rec = StepRecord {
                category: categories[k],
                steered: true,
                coef: Some(c),
                window: Some(w),
                changed: toks[win] != base_toks[k],
            };
            chosen[k] = (toks[win], rec);
            if s.mode == Mode::Persistent {
                // The newest position again, with the winner's steering, writing its K/V
                // (windows are [-1] in this mode).
                let slot = slot_of(j);
                let n = sb.seq[slot].len();
                let add: Vec<f32> = vecs[j * d..(j + 1) * d].iter().map(|x| c * x).collect();
                let one = Step {
                    slots: &[slot],
                    positions: &[n - 1],
                    n_write: 1,
                    run_start: &[],
                };
                let mut hooks = Hooks {
                    capture: vec![],
                    steer: Some((point, &add)),
                };
                base.forward(&sb.seq[slot][n - 1..n], &one, &[], &mut hooks)?;
            }
        }
        // 5. Emit, and queue the token for both models; finished problems free their slot.
        for (k, &r) in active.iter().enumerate() {
            let (tok, rec) = chosen[k];
            let p = who[r].expect("active slots hold a problem");
            let stop = on_step(p, tok, &rec).stops();
            outs[p].ids.push(tok);
            outs[p].steps.push(rec);
            if stop {
                return Ok(outs);
            }
            sb.advance(r, tok);
            st.advance(r, tok);
            // As in exact mode: a sequence ends when it fills the context.
            let fits = sb.seq[r].len() < ctx_b && st.seq[r].len() < ctx_t;
            let done = eos.contains(&tok) || outs[p].ids.len() >= s.max_new_tokens || !fits;
            if done {
                who[r] = None;
                prefixes.drop_problem(p);
                if let Some(q) = queue.next() {
                    sb.load(r, &problems[q].base);
                    st.load(r, &problems[q].thinking);
                    who[r] = Some(q);
                }
            }
        }
        active = (0..nslots).filter(|&r| who[r].is_some()).collect();
    }
    Ok(outs)
}

/// One steered base-model run of the cached loop: steered row j (of the step's steered rows),
/// coefficient c, the steering added from position `first` to the newest (the window).
struct Run {
    j: usize,
    c: f32,
    first: usize,
    n: usize, // the sequence length: the run covers positions first..n
    /// (slot, from) of a window-0 run that continues its prefix cache: only positions from..n
    /// run, writing their K/V to that slot.
    write: Option<(usize, usize)>,
}

impl Run {
    /// Rows the run takes in a call.
    fn rows(&self) -> usize {
        self.n - self.write.map_or(self.first, |w| w.1)
    }
}

/// Candidate rows computed in one call at most (bounds the CPU workspace, [rows, F] per
/// buffer); a longer run gets a call of its own.
const CANDIDATE_ROWS: usize = 2048;

/// The runs of `rows` steered rows (`len(j)`: row j's sequence length), and for each row its
/// candidates in (c, w) order as (run, c, w). Windows that cover the same positions share a run
/// (e.g. -100 and 0 while the sequence is shorter than 100).
#[allow(clippy::type_complexity)]
fn candidate_runs(
    rows: usize,
    s: &Settings,
    len: impl Fn(usize) -> usize,
) -> (Vec<Run>, Vec<Vec<(usize, f32, i64)>>) {
    let (mut runs, mut which) = (vec![], vec![]);
    for j in 0..rows {
        let n = len(j);
        let mut mine = vec![];
        for &c in &s.coefficients {
            for &w in &s.windows {
                let first = window_start(w, n);
                let same = |r: &Run| r.j == j && r.c.to_bits() == c.to_bits() && r.first == first;
                let ri = match runs.iter().rposition(same) {
                    Some(ri) => ri,
                    None => {
                        runs.push(Run {
                            j,
                            c,
                            first,
                            n,
                            write: None,
                        });
                        runs.len() - 1
                    }
                };
                mine.push((ri, c, w));
            }
        }
        which.push(mine);
    }
    (runs, which)
}

/// The runs `order` (indices into `runs`) in consecutive groups whose rows fit in one call of
/// `budget` rows (a longer run alone).
fn run_groups<'a>(runs: &[Run], order: &'a [usize], budget: usize) -> Vec<&'a [usize]> {
    let (mut groups, mut from, mut rows) = (vec![], 0, 0);
    for (i, &ri) in order.iter().enumerate() {
        let r = runs[ri].rows();
        if i > from && rows + r > budget {
            groups.push(&order[from..i]);
            (from, rows) = (i, 0);
        }
        rows += r;
    }
    if from < order.len() {
        groups.push(&order[from..]);
    }
    groups
}

/// The first steered position of window w in a sequence of n tokens: 0 for w = 0 (every
/// position), n − N for w = −N (the last N).
fn window_start(w: i64, n: usize) -> usize {
    if w == 0 {
        0
    } else {
        n.saturating_sub(w.unsigned_abs() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_shared_by_equal_windows_and_grouped_within_the_row_budget() {
        let s = Settings {
            coefficients: vec![0.5, 1.0],
            windows: vec![0, -1, -100, -3000],
            ..Settings::default()
        };
        // Row 0: 40 tokens (-100 covers the same positions as 0); row 1: 3,000 tokens.
        let (runs, which) = candidate_runs(2, &s, |j| [40, 3000][j]);
        let spans: Vec<_> = runs.iter().map(|r| (r.j, r.c, r.first, r.n)).collect();
        assert_eq!(
            spans,
            [
                (0, 0.5, 0, 40),
                (0, 0.5, 39, 40),
                (0, 1.0, 0, 40),
                (0, 1.0, 39, 40),
                (1, 0.5, 0, 3000),
                (1, 0.5, 2999, 3000),
                (1, 0.5, 2900, 3000),
                (1, 1.0, 0, 3000),
                (1, 1.0, 2999, 3000),
                (1, 1.0, 2900, 3000),
            ]
        );
        let ri: Vec<usize> = which[0].iter().map(|x| x.0).collect();
        assert_eq!(ri, [0, 1, 0, 0, 2, 3, 2, 2]);
        assert_eq!(which[1][3], (4, 0.5, -3000));
        // Groups of at most CANDIDATE_ROWS rows, a longer run alone, order kept.
        let order: Vec<usize> = (0..runs.len()).collect();
        let sizes: Vec<Vec<usize>> = run_groups(&runs, &order, CANDIDATE_ROWS)
            .iter()
            .map(|g| g.iter().map(|&ri| runs[ri].rows()).collect())
            .collect();
        assert_eq!(
            sizes,
            [
                vec![40, 1, 40, 1],
                vec![3000],
                vec![1, 100],
                vec![3000],
                vec![1, 100]
            ]
        );
    }
}
