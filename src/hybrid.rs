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

use crate::cpu_ops::argmax;
use crate::model::{Hooks, KvCache, Model, Step, Workspace};
use crate::rng::Rng;
use crate::sae::Sae;
use crate::steering::SteeringSet;
use crate::{bail, Result};
use serde::Serialize;

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
    /// The reference code's off-by-one: add at the input of block L_b instead of its output.
    pub steer_at_block_input: bool,
    /// The reference code's quirk: encode the raw activation (no centring / unit norm).
    pub sae_raw_activations: bool,
    /// Problems decoded together in the cached modes; a finished problem's slot takes the next.
    pub batch: usize,
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
        }
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

/// The two models and the artifacts that connect them, validated against each other.
pub struct Pair<'a> {
    pub base: &'a Model,
    pub thinking: &'a Model,
    pub sae: &'a Sae,
    pub steering: &'a SteeringSet,
}

impl Pair<'_> {
    pub fn validate(&self) -> Result<()> {
        let (b, t) = (&self.base.config, &self.thinking.config);
        self.sae.validate_for(t.hidden_size, t.num_hidden_layers)?;
        self.steering
            .validate_for(b.hidden_size, b.num_hidden_layers)?;
        self.steering.check_matches_sae(self.sae)?;
        Ok(())
    }

    /// The residual point where steering is added: after block L_b (or before it, with the flag).
    fn steer_point(&self, s: &Settings) -> usize {
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
pub fn run(
    pair: &Pair,
    problems: &[Prompts],
    s: &Settings,
    mut on_step: impl FnMut(usize, u32, &StepRecord),
) -> Result<Vec<Output>> {
    pair.validate()?;
    if s.coefficients.is_empty() || s.windows.is_empty() {
        bail!(
            "expected at least one coefficient and one window, found {} and {}",
            s.coefficients.len(),
            s.windows.len()
        );
    }
    if let Some(w) = s.windows.iter().find(|&&w| w > 0) {
        bail!("expected windows 0 (every position) or -N (the last N positions), found {w}");
    }
    if s.mode == Mode::Persistent && s.windows != [-1] {
        bail!(
            "--mode persistent commits the newest position's steered K/V, so windows must be [-1]; found {:?} (use --mode cached or exact for other windows)",
            s.windows
        );
    }
    for (i, p) in problems.iter().enumerate() {
        pair.base
            .check_ids(&p.base)
            .map_err(|e| crate::Error::Input(format!("problem {i}, base prompt: {e}")))?;
        pair.thinking
            .check_ids(&p.thinking)
            .map_err(|e| crate::Error::Input(format!("problem {i}, thinking prompt: {e}")))?;
        if p.base.is_empty() || p.thinking.is_empty() {
            bail!("problem {i}: empty prompt");
        }
    }
    match s.mode {
        Mode::Exact => problems
            .iter()
            .enumerate()
            .map(|(i, p)| exact_one(pair, p, s, |t, r| on_step(i, t, r)))
            .collect(),
        Mode::Cached | Mode::Persistent => cached_batch(pair, problems, s, on_step),
    }
}

/// Ties go to the earliest candidate: strict `>` keeps the first maximum.
fn pick(think_logits: &[f32], cands: &[u32]) -> usize {
    let mut best = 0;
    for (i, &c) in cands.iter().enumerate() {
        if think_logits[c as usize] > think_logits[cands[best] as usize] {
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

fn exact_one(
    pair: &Pair,
    p: &Prompts,
    s: &Settings,
    mut on_step: impl FnMut(u32, &StepRecord),
) -> Result<Output> {
    let (b, t) = (pair.base, pair.thinking);
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
    let point = pair.steer_point(s);
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
        let category = pair.category(&h, &mut z, s, &mut rng);
        let think_tok = argmax(&think_logits) as u32;
        // 2. The base model unsteered.
        let (base_logits, _) = fb.run(b, &seq_b, None, None);
        let base_tok = argmax(&base_logits) as u32;
        let mut rec = StepRecord {
            category,
            steered: false,
            coef: None,
            window: None,
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
            let k = pick(&think_logits, &cands);
            rec = StepRecord {
                category,
                steered: true,
                coef: Some(which[k].0),
                window: Some(which[k].1),
            };
            cands[k]
        };
        on_step(tok, &rec);
        out.ids.push(tok);
        out.steps.push(rec);
        if b.config.eos_token_ids.contains(&tok) {
            break;
        }
        seq_b.push(tok);
        seq_t.push(tok);
    }
    Ok(out)
}

/// Per-model state of the cached loop: cache, workspace, residual, and per-row positions.
struct Side {
    cache: KvCache,
    ws: Workspace,
    h: Vec<f32>,            // [T, D]
    len: Vec<usize>,        // tokens in the cache, per problem slot
    pending: Vec<Vec<u32>>, // tokens to feed next, per problem
}

impl Side {
    fn new(m: &Model, prompts: Vec<Vec<u32>>, ctx: usize) -> Side {
        Side {
            cache: KvCache::new(&m.config, prompts.len(), ctx),
            ws: Workspace::default(),
            h: vec![],
            len: vec![0; prompts.len()],
            pending: prompts,
        }
    }

    /// Flattens the pending tokens of `rows` into one step; returns (ids, slots, positions, last index per row).
    fn gather(&self, rows: &[usize]) -> (Vec<u32>, Vec<usize>, Vec<usize>, Vec<usize>) {
        let (mut ids, mut slots, mut pos, mut last) = (vec![], vec![], vec![], vec![]);
        for &r in rows {
            for (j, &id) in self.pending[r].iter().enumerate() {
                ids.push(id);
                slots.push(r);
                pos.push(self.len[r] + j);
            }
            last.push(ids.len() - 1);
        }
        (ids, slots, pos, last)
    }
}

fn cached_batch(
    pair: &Pair,
    problems: &[Prompts],
    s: &Settings,
    mut on_step: impl FnMut(usize, u32, &StepRecord),
) -> Result<Vec<Output>> {
    let (b, t) = (pair.base, pair.thinking);
    let max_prompt = |f: fn(&Prompts) -> usize| problems.iter().map(f).max().unwrap_or(0);
    let ctx_b = b
        .config
        .max_position_embeddings
        .min(max_prompt(|p| p.base.len()) + s.max_new_tokens);
    let ctx_t = t
        .config
        .max_position_embeddings
        .min(max_prompt(|p| p.thinking.len()) + s.max_new_tokens);
    // Cache slots, each holding one problem at a time; a finished problem's slot takes the
    // next one (its positions restart at 0, overwriting the old K/V before they are read).
    let nslots = s.batch.max(1).min(problems.len().max(1));
    let mut sb = Side::new(b, vec![vec![]; nslots], ctx_b);
    let mut st = Side::new(t, vec![vec![]; nslots], ctx_t);
    let mut who: Vec<Option<usize>> = vec![None; nslots];
    // Problems whose prompt leaves no room to generate get an empty output.
    let mut queue = (0..problems.len()).filter(|&p| {
        s.max_new_tokens > 0 && problems[p].base.len() < ctx_b && problems[p].thinking.len() < ctx_t
    });
    let load =
        |slot: usize, p: usize, sb: &mut Side, st: &mut Side, who: &mut Vec<Option<usize>>| {
            sb.len[slot] = 0;
            st.len[slot] = 0;
            sb.pending[slot] = problems[p].base.clone();
            st.pending[slot] = problems[p].thinking.clone();
            who[slot] = Some(p);
        };
    for slot in 0..nslots {
        if let Some(p) = queue.next() {
            load(slot, p, &mut sb, &mut st, &mut who);
        }
    }
    let (d, v) = (b.config.hidden_size, b.config.vocab_size);
    let point = pair.steer_point(s);
    let (nb, nt) = (b.config.num_hidden_layers, t.config.num_hidden_layers);
    let mut z = vec![0f32; pair.sae.latents];
    let mut rng = s.random_firing.map(Rng::new);
    let mut outs: Vec<Output> = problems
        .iter()
        .map(|_| Output {
            ids: vec![],
            steps: vec![],
        })
        .collect();
    let fits = |r: usize, sb: &Side, st: &Side| {
        sb.len[r] + sb.pending[r].len() <= ctx_b && st.len[r] + st.pending[r].len() <= ctx_t
    };
    let mut active: Vec<usize> = (0..nslots).filter(|&r| who[r].is_some()).collect();
    let mut h_point: Vec<f32> = vec![];
    // Windows other than -1: every position's residual at the steering point, per slot [len, D].
    let windowed = s.windows != [-1];
    let mut hist: Vec<Vec<f32>> = vec![vec![]; nslots];
    while !active.is_empty() {
        // 1. Thinking model: feed pending tokens, capture block L_t's output, logits at the last token.
        let (ids, slots, pos, last_t) = st.gather(&active);
        let step = Step {
            slots: &slots,
            positions: &pos,
            n_write: ids.len(),
            run_start: &[],
        };
        let mut hooks = Hooks {
            capture: vec![(pair.sae.layer + 1, vec![])],
            steer: None,
        };
        t.embed(&ids, &mut st.h);
        t.layers(
            &mut st.ws,
            &mut st.cache,
            &mut st.h,
            0..nt,
            &step,
            &mut hooks,
        );
        let think_logits = t.head(&mut st.ws, &st.h, &last_t).to_vec(); // [R, V]
        let captured = &hooks.capture[0].1;
        let categories: Vec<usize> = last_t
            .iter()
            .map(|&i| pair.category(&captured[i * d..(i + 1) * d], &mut z, s, &mut rng))
            .collect();

        // 2. Base model unsteered, keeping the residual at the steering point of each last token.
        let (ids, slots, pos, last_b) = sb.gather(&active);
        let step = Step {
            slots: &slots,
            positions: &pos,
            n_write: ids.len(),
            run_start: &[],
        };
        b.embed(&ids, &mut sb.h);
        b.layers(
            &mut sb.ws,
            &mut sb.cache,
            &mut sb.h,
            0..point,
            &step,
            &mut Hooks::default(),
        );
        h_point.clear();
        for &i in &last_b {
            h_point.extend_from_slice(&sb.h[i * d..(i + 1) * d]);
        }
        if windowed {
            for (i, row) in sb.h.chunks(d).enumerate() {
                hist[slots[i]].truncate(pos[i] * d);
                hist[slots[i]].extend_from_slice(row);
            }
        }
        b.layers(
            &mut sb.ws,
            &mut sb.cache,
            &mut sb.h,
            point..nb,
            &step,
            &mut Hooks::default(),
        );
        let base_toks: Vec<u32> = b
            .head(&mut sb.ws, &sb.h, &last_b)
            .chunks(v)
            .map(|l| argmax(l) as u32)
            .collect();

        // 3–4. Candidates for every row that needs steering, as read-only runs.
        let steer_rows: Vec<usize> = (0..active.len())
            .filter(|&k| {
                s.no_gating || argmax(&think_logits[k * v..(k + 1) * v]) as u32 != base_toks[k]
            })
            .collect();
        let mut chosen: Vec<(u32, StepRecord)> = (0..active.len())
            .map(|k| {
                (
                    base_toks[k],
                    StepRecord {
                        category: categories[k],
                        steered: false,
                        coef: None,
                        window: None,
                    },
                )
            })
            .collect();
        // Each steered row's vector b + V[category], [steer rows, D].
        let mut vecs = vec![0f32; steer_rows.len() * d];
        for (j, &k) in steer_rows.iter().enumerate() {
            pair.steering.add_scaled(
                categories[k],
                1.0,
                s.only_bias,
                &mut vecs[j * d..(j + 1) * d],
            );
        }
        let newest = |k: usize| (slots[last_b[k]], pos[last_b[k]] + 1);
        let (runs, which) = candidate_runs(&steer_rows, s, |j| newest(steer_rows[j]).1);
        // A run's residual at the steering point before the steering: the newest position's from
        // this step, earlier ones from the history (kept only when some window reaches them).
        let resid = |r: &Run, p: usize| {
            let slot = newest(steer_rows[r.j]).0;
            if p + 1 == r.n {
                &h_point[steer_rows[r.j] * d..(steer_rows[r.j] + 1) * d]
            } else {
                &hist[slot][p * d..(p + 1) * d]
            }
        };
        let mut cand = Vec::with_capacity(runs.len());
        for group in run_groups(&runs) {
            let (mut h, mut cslots, mut cpos, mut starts, mut lasts) =
                (vec![], vec![], vec![], vec![], vec![]);
            for r in group {
                let slot = newest(steer_rows[r.j]).0;
                let first_row = cpos.len();
                for p in r.first..r.n {
                    let x = resid(r, p);
                    let sv = &vecs[r.j * d..(r.j + 1) * d];
                    h.extend(x.iter().zip(sv).map(|(x, sv)| x + r.c * sv));
                    cslots.push(slot);
                    cpos.push(p);
                    starts.push(first_row);
                }
                lasts.push(cpos.len() - 1);
            }
            let cstep = Step {
                slots: &cslots,
                positions: &cpos,
                n_write: 0,
                run_start: &starts,
            };
            b.layers(
                &mut sb.ws,
                &mut sb.cache,
                &mut h,
                point..nb,
                &cstep,
                &mut Hooks::default(),
            );
            cand.extend(
                b.head(&mut sb.ws, &h, &lasts)
                    .chunks(v)
                    .map(|l| argmax(l) as u32),
            );
        }
        for (j, &k) in steer_rows.iter().enumerate() {
            // Candidates in (c, w) order; the thinking model's logits pick the winner.
            let toks: Vec<u32> = which[j].iter().map(|&(ri, _, _)| cand[ri]).collect();
            let win = pick(&think_logits[k * v..(k + 1) * v], &toks);
            let (_, c, w) = which[j][win];
            chosen[k] = (
                toks[win],
                StepRecord {
                    category: categories[k],
                    steered: true,
                    coef: Some(c),
                    window: Some(w),
                },
            );
            if s.mode == Mode::Persistent {
                // Commit the winner's steered K/V at the newest position in the blocks after the
                // point: rerun its steered residual there (windows are [-1] in this mode).
                let (slot, n) = newest(k);
                let sv = &vecs[j * d..(j + 1) * d];
                let mut row: Vec<f32> = h_point[k * d..(k + 1) * d]
                    .iter()
                    .zip(sv)
                    .map(|(x, sv)| x + c * sv)
                    .collect();
                let one = Step {
                    slots: &[slot],
                    positions: &[n - 1],
                    n_write: 1,
                    run_start: &[],
                };
                b.layers(
                    &mut sb.ws,
                    &mut sb.cache,
                    &mut row,
                    point..nb,
                    &one,
                    &mut Hooks::default(),
                );
            }
        }
        // 5. Emit, and queue the token for both models; finished problems free their slot.
        for (k, &r) in active.iter().enumerate() {
            let (tok, rec) = chosen[k];
            let p = who[r].expect("active slots hold a problem");
            on_step(p, tok, &rec);
            outs[p].ids.push(tok);
            outs[p].steps.push(rec);
            sb.len[r] += sb.pending[r].len();
            st.len[r] += st.pending[r].len();
            sb.pending[r] = vec![tok];
            st.pending[r] = vec![tok];
            let done = b.config.eos_token_ids.contains(&tok)
                || outs[p].ids.len() >= s.max_new_tokens
                || !fits(r, &sb, &st);
            if done {
                who[r] = None;
                if let Some(q) = queue.next() {
                    load(r, q, &mut sb, &mut st, &mut who);
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
}

/// Candidate rows computed in one call at most (bounds the workspace, [rows, F] per buffer);
/// a longer run gets a call of its own.
const CANDIDATE_ROWS: usize = 2048;

/// The runs of the steered rows (`len(j)`: row j's sequence length), and for each row its
/// candidates in (c, w) order as (run, c, w). Windows that cover the same positions share a run
/// (e.g. -100 and 0 while the sequence is shorter than 100).
#[allow(clippy::type_complexity)]
fn candidate_runs(
    steer_rows: &[usize],
    s: &Settings,
    len: impl Fn(usize) -> usize,
) -> (Vec<Run>, Vec<Vec<(usize, f32, i64)>>) {
    let (mut runs, mut which) = (vec![], vec![]);
    for j in 0..steer_rows.len() {
        let n = len(j);
        let mut mine = vec![];
        for &c in &s.coefficients {
            for &w in &s.windows {
                let first = window_start(w, n);
                let same = |r: &Run| r.j == j && r.c.to_bits() == c.to_bits() && r.first == first;
                let ri = match runs.iter().rposition(same) {
                    Some(ri) => ri,
                    None => {
                        runs.push(Run { j, c, first, n });
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

/// Consecutive runs whose rows fit in one call of CANDIDATE_ROWS (a longer run alone).
fn run_groups(runs: &[Run]) -> Vec<&[Run]> {
    let (mut groups, mut from, mut rows) = (vec![], 0, 0);
    for (i, r) in runs.iter().enumerate() {
        if i > from && rows + r.n - r.first > CANDIDATE_ROWS {
            groups.push(&runs[from..i]);
            (from, rows) = (i, 0);
        }
        rows += r.n - r.first;
    }
    if from < runs.len() {
        groups.push(&runs[from..]);
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
        let (runs, which) = candidate_runs(&[3, 7], &s, |j| [40, 3000][j]);
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
        let sizes: Vec<Vec<usize>> = run_groups(&runs)
            .iter()
            .map(|g| g.iter().map(|r| r.n - r.first).collect())
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
