//! `Decoder`: a model bound to its KV cache and activation buffers on one backend. The
//! generation loop, the hybrid loop and the CLI talk to this trait only; the CPU engine is
//! here, the CUDA engine in `cuda::model`.

use crate::config::Config;
use crate::cpu_ops::argmax;
use crate::model::{Hooks, KvCache, Model, Slots, Step, Workspace};
use crate::Result;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub trait Decoder {
    fn config(&self) -> &Config;
    /// Positions per slot (the context the cache was sized for).
    fn max_len(&self) -> usize;
    /// Cache slots, all of them (`Slots::total`): past the ones in every block may come prefix
    /// caches held only from the steering point on, which a call through every block refuses.
    fn slots(&self) -> usize;
    /// Tokens one hooked call (or one with read-only runs) may hold.
    fn max_rows(&self) -> usize {
        usize::MAX
    }
    /// Runs `ids` (one per entry of `step`) through every block, with hooks on the residual,
    /// and returns the logits [R, V] of the token indices in `logit_rows`.
    fn forward(
        &mut self,
        ids: &[u32],
        step: &Step,
        logit_rows: &[usize],
        hooks: &mut Hooks,
    ) -> Result<&[f32]>;
    /// The greedy id of every token of a call whose tokens all write the cache (a decode step).
    /// The CUDA engine keeps the logits on the device and replays the step from a graph.
    fn greedy(&mut self, ids: &[u32], step: &Step) -> Result<Vec<u32>> {
        greedy_from_logits(self, ids, step)
    }
    /// A decode step (every token writes the cache) that also returns each token's residual at
    /// point `p` ([T, D]): (greedy ids, residuals). The engine keeps the step's logits for
    /// `logits_at` until its next call.
    fn greedy_capture(
        &mut self,
        ids: &[u32],
        step: &Step,
        p: usize,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        self.start_capture(ids, step, p)?;
        self.finish_capture()
    }
    /// The first half of `greedy_capture`: starts the step and returns before its results are
    /// needed, so that another engine's step can run meanwhile (the CUDA engine queues it on its
    /// stream; the CPU engine runs it now).
    fn start_capture(&mut self, ids: &[u32], step: &Step, p: usize) -> Result<()>;
    /// The second half of `greedy_capture`: (greedy ids, residuals) of the step
    /// `start_capture` started, which must be the engine's last call.
    fn finish_capture(&mut self) -> Result<(Vec<u32>, Vec<f32>)>;
    /// Logits of the last call, if it was a `greedy_capture` of T tokens: with n = ids.len() / T
    /// ids per token, out[r·n + i] = logits[r, ids[r·n + i]], −inf for an id outside the
    /// vocabulary (u32::MAX: no candidate there).
    fn logits_at(&mut self, ids: &[u32]) -> Result<Vec<f32>>;
    /// From now on, keeps the residual at point `p` of every token that a call without steering
    /// writes to the cache in slots 0..slots ([slots, max_len, D] f32; the slots past them, e.g.
    /// prefix caches, keep none), so that `forward_kept` can start read-only runs there.
    /// Steering at or after p never reaches the blocks before it, so a position's kept residual
    /// stays valid whatever was steered since. Nothing changes when the engine already keeps
    /// point p for at least that many slots.
    fn keep_residuals(&mut self, p: usize, slots: usize) -> Result<()>;
    /// Rows started at the kept point: row i's residual there is the one kept for
    /// (steer.from[i] or, when `from` is empty, slots[i], positions[i]) plus
    /// coef[i] · vecs[idx[i]] of `steer`; the blocks from the point on follow, and the logits
    /// [R, V] of the token indices in `logit_rows` come back. Rows 0..n_write append their
    /// (steered) K/V to the cache of their slot in those blocks, as a forward call's would (a
    /// window-0 candidate's prefix kept in a slot of its own); the rest are read-only runs.
    /// Every kept position read must have been written since the first `keep_residuals` at this
    /// point (before that the engine holds NaN there).
    fn forward_kept(
        &mut self,
        step: &Step,
        steer: &SteerRows,
        logit_rows: &[usize],
    ) -> Result<&[f32]>;
    /// The greedy id of each of `forward_kept`'s logit rows (the CUDA engine takes the argmax on
    /// the device and reads back only the ids).
    fn greedy_kept(
        &mut self,
        step: &Step,
        steer: &SteerRows,
        logit_rows: &[usize],
    ) -> Result<Vec<u32>> {
        let v = self.config().vocab_size;
        let logits = self.forward_kept(step, steer, logit_rows)?;
        Ok(logits.chunks(v).map(|l| argmax(l) as u32).collect())
    }
}

/// The starting rows of a `forward_kept` call: row i is the kept residual of slot from[i] at its
/// position, plus coef[i] · vecs[idx[i]], from J vectors vecs [J, D] (one b + V[category] per
/// steered problem, one coefficient per run), so that a call of many rows carries J·D values
/// instead of one row each.
pub struct SteerRows<'a> {
    pub vecs: &'a [f32],
    pub idx: &'a [u32],
    pub coef: &'a [f32],
    /// [T], or empty: each row's own slot.
    pub from: &'a [usize],
}

impl<'a> SteerRows<'a> {
    /// Rows that start from the kept residuals of their own slots.
    pub fn own(vecs: &'a [f32], idx: &'a [u32], coef: &'a [f32]) -> SteerRows<'a> {
        SteerRows {
            vecs,
            idx,
            coef,
            from: &[],
        }
    }

    /// The slot whose kept residual row i of `step` starts from.
    pub fn from_slot(&self, i: usize, step: &Step) -> usize {
        self.from.get(i).copied().unwrap_or(step.slots[i])
    }
}

impl SteerRows<'_> {
    /// Row i's steering added to `h` [D] as the exact mode adds it: the product rounded, then
    /// the sum.
    pub fn add_to(&self, i: usize, h: &mut [f32]) {
        let d = h.len();
        let (j, c) = (self.idx[i] as usize, self.coef[i]);
        for (x, v) in h.iter_mut().zip(&self.vecs[j * d..(j + 1) * d]) {
            *x += c * v;
        }
    }
}

/// `Decoder::greedy` through `forward`: every token's logits, then their argmax on the host.
pub fn greedy_from_logits<D: Decoder + ?Sized>(
    e: &mut D,
    ids: &[u32],
    step: &Step,
) -> Result<Vec<u32>> {
    let rows: Vec<usize> = (0..ids.len()).collect();
    let v = e.config().vocab_size;
    let logits = e.forward(ids, step, &rows, &mut Hooks::default())?;
    Ok(logits.chunks(v).map(|l| argmax(l) as u32).collect())
}

pub struct CpuEngine {
    pub model: Arc<Model>,
    pub cache: KvCache,
    pub ws: Workspace,
    h: Vec<f32>, // [T, D] residual stream
    /// (point, slots kept, [slots kept, max_len, D]) once `keep_residuals` was called.
    kept: Option<(usize, usize, Vec<f32>)>,
    /// [T, V] logits of the last call when it was a `greedy_capture` (else empty).
    captured: Vec<f32>,
    /// (greedy ids, residuals) of the last call when it was a `start_capture`.
    pending: Option<(Vec<u32>, Vec<f32>)>,
    /// Tokens a call with read-only runs may hold (`Decoder::max_rows`; unbounded by default,
    /// set lower to split a step's candidate runs into several calls as a GPU engine does).
    pub max_rows: usize,
}

impl CpuEngine {
    /// An engine of `slots` cache slots (a count: in every block; or a `Slots` with prefix-cache
    /// slots in the later blocks only) of `max_len` positions each.
    pub fn new(model: Arc<Model>, slots: impl Into<Slots>, max_len: usize) -> CpuEngine {
        let cache = KvCache::new(&model.config, slots, max_len);
        CpuEngine {
            model,
            cache,
            ws: Workspace::default(),
            h: Vec::new(),
            kept: None,
            captured: Vec::new(),
            pending: None,
            max_rows: usize::MAX,
        }
    }
}

impl Decoder for CpuEngine {
    fn config(&self) -> &Config {
        &self.model.config
    }
    fn max_len(&self) -> usize {
        self.cache.max_len
    }
    fn slots(&self) -> usize {
        self.cache.slots.total()
    }
    fn max_rows(&self) -> usize {
        self.max_rows
    }
    fn forward(
        &mut self,
        ids: &[u32],
        step: &Step,
        logit_rows: &[usize],
        hooks: &mut Hooks,
    ) -> Result<&[f32]> {
        check_step(
            self.config(),
            ids,
            step,
            self.cache.slots,
            self.cache.max_len,
        )?;
        let n = self.model.config.num_hidden_layers;
        self.captured.clear();
        self.pending = None;
        // Kept residuals come from a capture at the point, added last and taken back after.
        let keep = match &self.kept {
            Some((p, _, _)) if hooks.steer.is_none() && step.n_write > 0 => Some(*p),
            _ => None,
        };
        if let Some(p) = keep {
            hooks.capture.push((p, Vec::new()));
        }
        self.model.embed(ids, &mut self.h);
        self.model.layers(
            &mut self.ws,
            &mut self.cache,
            &mut self.h,
            0..n,
            step,
            hooks,
        );
        if let (Some((_, kept_slots, kept)), Some((_, rows))) =
            (&mut self.kept, keep.and_then(|_| hooks.capture.pop()))
        {
            let d = self.model.config.hidden_size;
            for (i, row) in rows.chunks(d).take(step.n_write).enumerate() {
                if step.slots[i] >= *kept_slots {
                    continue;
                }
                let at = (step.slots[i] * self.cache.max_len + step.positions[i]) * d;
                kept[at..at + d].copy_from_slice(row);
            }
        }
        Ok(self.model.head(&mut self.ws, &self.h, logit_rows))
    }
    fn start_capture(&mut self, ids: &[u32], step: &Step, p: usize) -> Result<()> {
        check_point(self.config(), p)?;
        if step.n_write != ids.len() {
            crate::bail!(
                "start_capture: expected a decode step ({} tokens that all write the cache), found n_write {}",
                ids.len(),
                step.n_write
            );
        }
        let rows: Vec<usize> = (0..ids.len()).collect();
        let mut hooks = Hooks {
            capture: vec![(p, vec![])],
            steer: None,
        };
        let logits = self.forward(ids, step, &rows, &mut hooks)?.to_vec();
        let v = self.config().vocab_size;
        let toks = logits.chunks(v).map(|l| argmax(l) as u32).collect();
        self.captured = logits;
        let (_, h) = hooks.capture.pop().expect("one capture asked for");
        self.pending = Some((toks, h));
        Ok(())
    }
    fn finish_capture(&mut self) -> Result<(Vec<u32>, Vec<f32>)> {
        self.pending.take().ok_or_else(no_capture)
    }
    fn logits_at(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let v = self.config().vocab_size;
        let n = check_logits_at(self.captured.len() / v, ids)?;
        Ok(ids
            .iter()
            .enumerate()
            .map(|(e, &id)| {
                if (id as usize) < v {
                    self.captured[(e / n) * v + id as usize]
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect())
    }
    fn keep_residuals(&mut self, p: usize, slots: usize) -> Result<()> {
        let c = &self.model.config;
        check_point(c, p)?;
        check_kept_slots(slots, self.cache.slots.all)?;
        if self.kept.as_ref().is_some_and(|k| k.0 == p && k.1 >= slots) {
            return Ok(());
        }
        // NaN until written, so that a run over a position never written shows in its logits.
        let n = slots * self.cache.max_len * c.hidden_size;
        self.kept = Some((p, slots, vec![f32::NAN; n]));
        Ok(())
    }
    fn forward_kept(
        &mut self,
        step: &Step,
        steer: &SteerRows,
        logit_rows: &[usize],
    ) -> Result<&[f32]> {
        let (slots, len) = (self.cache.slots, self.cache.max_len);
        let p = check_kept(
            self.config(),
            self.kept.as_ref().map(|k| (k.0, k.1)),
            step,
            steer,
            logit_rows,
            slots,
            len,
        )?;
        if step.positions.len() > self.max_rows {
            crate::bail!(
                "a call of {} tokens from the kept residuals exceeds the engine's {} tokens per call",
                step.positions.len(),
                self.max_rows
            );
        }
        let c = &self.model.config;
        let (d, n) = (c.hidden_size, c.num_hidden_layers);
        self.captured.clear();
        self.pending = None;
        let kept = &self.kept.as_ref().expect("checked by check_kept").2;
        self.h.clear();
        for (i, &pos) in step.positions.iter().enumerate() {
            let at = (steer.from_slot(i, step) * len + pos) * d;
            self.h.extend_from_slice(&kept[at..at + d]);
        }
        for (i, row) in self.h.chunks_mut(d).enumerate() {
            steer.add_to(i, row);
        }
        self.model.layers(
            &mut self.ws,
            &mut self.cache,
            &mut self.h,
            p..n,
            step,
            &mut Hooks::default(),
        );
        Ok(self.model.head(&mut self.ws, &self.h, logit_rows))
    }
}

/// A checkpoint folder as a run uses it: its config (checked against the weight files' layer
/// count and bias tensors) at once, its f32 CPU weights only when a CPU run asks for them (the
/// weights' shapes, dtypes and values are checked as either backend loads them). A GPU engine
/// uploads bf16 straight from the folder, so a GPU run never holds the f32 copy (4 bytes per
/// parameter: 32 GB for an 8B model).
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    cpu: Option<Arc<Model>>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let config = Config::from_file(&dir.join("config.json"))?;
        crate::model::Weights::check(&crate::weights::WeightFiles::open(dir)?, &config)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            cpu: None,
        })
    }

    /// The f32 model for the CPU backend, loaded on the first call.
    pub fn cpu_model(&mut self) -> Result<Arc<Model>> {
        if self.cpu.is_none() {
            self.cpu = Some(Arc::new(Model::load(&self.dir)?));
        }
        Ok(self.cpu.clone().expect("just loaded"))
    }

    /// The model with `slots` sequences of `ctx` positions: on the GPU (weights uploaded from
    /// the folder, up to `call_rows()` tokens per call) or on the CPU.
    pub fn decoder(&mut self, slots: usize, ctx: usize, cuda: bool) -> Result<Box<dyn Decoder>> {
        if cuda {
            let gpu = Arc::new(crate::cuda::Gpu::new(0)?);
            Ok(Box::new(crate::cuda::model::CudaEngine::load(
                gpu,
                &self.dir,
                slots,
                ctx,
                ctx.clamp(16, crate::cuda::model::call_rows()),
            )?))
        } else {
            Ok(Box::new(CpuEngine::new(self.cpu_model()?, slots, ctx)))
        }
    }
}

/// Validates a step against the vocabulary and the cache before any work is done.
pub fn check_step(
    c: &Config,
    ids: &[u32],
    step: &Step,
    slots: Slots,
    max_len: usize,
) -> Result<()> {
    check_rows(ids.len(), step, slots, 0, max_len)?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
        crate::bail!(
            "token id {bad} is outside the vocabulary: expected ids below vocab_size {}",
            c.vocab_size
        );
    }
    Ok(())
}

/// The error of a `finish_capture` whose engine's last call was not a `start_capture`.
pub fn no_capture() -> crate::Error {
    crate::Error::Input(
        "finish_capture: expected the engine's last call to be a start_capture, found another call (or none)".into(),
    )
}

/// Validates a `logits_at` call after a `greedy_capture` of `t` tokens (0: none was the last
/// call); returns the ids per token.
pub fn check_logits_at(t: usize, ids: &[u32]) -> Result<usize> {
    if t == 0 {
        crate::bail!("logits_at: the engine's last call was not a greedy_capture");
    }
    if !ids.len().is_multiple_of(t) {
        crate::bail!(
            "logits_at: expected the same number of ids for each of the {t} tokens, found {} ids",
            ids.len()
        );
    }
    Ok(ids.len() / t)
}

/// A residual point of the model: 0 (the embeddings) to N (after the last block).
pub fn check_point(c: &Config, p: usize) -> Result<()> {
    if p > c.num_hidden_layers {
        crate::bail!(
            "residual point {p}: expected 0..={} (the model has {} blocks)",
            c.num_hidden_layers,
            c.num_hidden_layers
        );
    }
    Ok(())
}

/// Validates `keep_residuals`'s slot count against the engine's slots in every block.
pub fn check_kept_slots(slots: usize, engine: usize) -> Result<()> {
    if slots == 0 || slots > engine {
        crate::bail!(
            "keep_residuals: expected 1..={engine} slots (the engine's slots in every block), found {slots}"
        );
    }
    Ok(())
}

/// Validates a `forward_kept` call (`kept`: the engine's kept point and slot count); returns the
/// point.
pub fn check_kept(
    c: &Config,
    kept: Option<(usize, usize)>,
    step: &Step,
    steer: &SteerRows,
    logit_rows: &[usize],
    slots: Slots,
    max_len: usize,
) -> Result<usize> {
    let Some((p, kept_slots)) = kept else {
        crate::bail!("forward_kept: this engine keeps no residuals (keep_residuals first)");
    };
    let (t, d) = (step.positions.len(), c.hidden_size);
    check_rows(t, step, slots, p, max_len)?;
    if !steer.from.is_empty() && steer.from.len() != t {
        crate::bail!(
            "steering rows: expected a kept slot for each of the {t} tokens (or none), found {}",
            steer.from.len()
        );
    }
    if let Some(bad) = (0..t)
        .map(|i| steer.from_slot(i, step))
        .find(|&s| s >= kept_slots)
    {
        crate::bail!(
            "steering rows: kept slot {bad} is outside the {kept_slots} slots whose residuals are kept"
        );
    }
    let nv = steer.vecs.len() / d;
    if steer.vecs.len() != nv * d || steer.idx.len() != t || steer.coef.len() != t {
        crate::bail!(
            "steering rows: expected vectors [J, D={d}], indices [T={t}] and coefficients [T={t}], found {} values, {} indices, {} coefficients",
            steer.vecs.len(),
            steer.idx.len(),
            steer.coef.len()
        );
    }
    if let Some(&bad) = steer.idx.iter().find(|&&j| j as usize >= nv) {
        crate::bail!("steering rows: vector index {bad} is outside the {nv} vectors given");
    }
    if let Some(&bad) = logit_rows.iter().find(|&&x| x >= t) {
        crate::bail!("logit row {bad} is outside the {t} tokens of the call");
    }
    Ok(p)
}

/// The shape of a step of `t` tokens, its runs, and its slots and positions against the cache of
/// the blocks the call runs (`block`..).
fn check_rows(t: usize, step: &Step, slots: Slots, block: usize, max_len: usize) -> Result<()> {
    if step.slots.len() != t || step.positions.len() != t || step.n_write > t {
        crate::bail!(
            "step: expected {t} slots and positions and n_write ≤ {t}, found {} slots, {} positions, n_write {}",
            step.slots.len(),
            step.positions.len(),
            step.n_write
        );
    }
    check_runs(step)?;
    let n = slots.in_block(block);
    for (&s, &p) in step.slots.iter().zip(step.positions) {
        if (slots.all..slots.total()).contains(&s) && s >= n {
            crate::bail!(
                "slot {s} holds K/V only in blocks {} on (a prefix cache), and this call starts at block {block}: expected a slot below {}",
                slots.from,
                slots.all
            );
        }
        if s >= n || p >= max_len {
            crate::bail!("position {p} in slot {s} is outside the cache: expected slot < {n} and position < {max_len} (the context)");
        }
    }
    Ok(())
}

/// Read-only runs (`Step::run_start`): each starts at a read-only row at or before its token,
/// and covers consecutive positions of one slot in consecutive rows; a row either starts a run
/// or continues the run of the row before it (runs do not nest or interleave, as the CUDA run
/// attention's tiles assume).
fn check_runs(step: &Step) -> Result<()> {
    let (t, w) = (step.slots.len(), step.n_write);
    if step.run_start.is_empty() {
        return Ok(());
    }
    if step.run_start.len() != t - w {
        crate::bail!(
            "step: expected {} run starts (one per read-only row), found {}",
            t - w,
            step.run_start.len()
        );
    }
    for r in w..t {
        let a = step.run_start[r - w];
        let continues = r > w && step.run_start[r - 1 - w] == a;
        let ok = (a == r || continues)
            && step.slots[a..=r].iter().all(|&s| s == step.slots[r])
            && (a..=r).all(|i| step.positions[i] == step.positions[a] + (i - a));
        if !ok {
            crate::bail!("step: row {r}'s run starts at row {a}: expected row {r} itself or the start of row {}'s run, with the same slot and consecutive positions", r.saturating_sub(1));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_runs;
    use crate::model::Step;

    fn runs_ok(slots: &[usize], positions: &[usize], n_write: usize, run_start: &[usize]) -> bool {
        let step = Step {
            slots,
            positions,
            n_write,
            run_start,
        };
        check_runs(&step).is_ok()
    }

    #[test]
    fn read_only_runs_are_consecutive_positions_of_one_slot() {
        // One written token, then two runs of slot 0 (positions 3..5 and 5) and one of slot 1.
        let (slots, pos) = ([0, 0, 0, 0, 0, 1, 1], [5, 3, 4, 5, 5, 8, 9]);
        assert!(runs_ok(&slots, &pos, 1, &[1, 1, 1, 4, 5, 5]));
        assert!(runs_ok(&slots, &pos, 1, &[]));
        assert!(!runs_ok(&slots, &pos, 1, &[1, 1, 1, 4, 5])); // one start missing
        assert!(!runs_ok(&slots, &pos, 1, &[0, 1, 1, 4, 5, 5])); // starts at a written row
        assert!(!runs_ok(&slots, &pos, 1, &[1, 1, 1, 1, 5, 5])); // positions 3, 4, 5, 5
        assert!(!runs_ok(&slots, &pos, 1, &[1, 1, 1, 4, 4, 5])); // crosses into slot 1
        assert!(!runs_ok(&slots, &pos, 1, &[1, 3, 1, 4, 5, 5])); // starts after its row
        assert!(!runs_ok(&slots, &pos, 1, &[1, 1, 2, 4, 5, 5])); // row 3's run starts inside row 2's
    }
}
