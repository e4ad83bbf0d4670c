//! Gradient-trained steering vectors (hybrid.md §2.2): each vector is optimised so that, added to
//! the base model's residual after block L at the target positions, the base model assigns high
//! probability to thinking-model text. Gradients come from `crate::vector_grad`.
//!
//! Data. The base model reads `prefix + trace text` (the same inputs as mean-diff vectors).
//! - bias: one example per trace with a thinking span; P = the span's tokens (the vector at every
//!   thinking position, the loss on every thinking token);
//! - category c: one example per sentence annotated c, cut after the sentence; P = its tokens;
//!   the trained bias is added (frozen) at the same positions.
//!
//! Loss of a minibatch: the mean over all its target tokens of the cross-entropy of
//! softmax(coldness · logits) (token-weighted, as a padded batch with ignored labels would be).
//!
//! Schedule. Per vector: shuffle its examples with the seed; the held-out split is the first
//! ⌊n/10⌋ (at least 1 when n ≥ 2, at most 256); training takes up to `max_examples` of the rest.
//! Adam (β 0.9/0.999, ε 1e-8) from a zero vector, lr·½(1 + cos(π·step/steps)) over the planned
//! steps = epochs·⌈n_train/batch⌉. After each epoch the held-out loss is measured; training
//! stops after `patience` epochs without a new best and the best vector is kept (without a
//! held-out split, every epoch runs and the last vector is kept).
//!
//! Backends. On the CPU the frozen prefixes come from the f32 model (`vector_grad::prepare`) and
//! the loss and gradient from `vector_grad::loss_grad`; with `cuda`, from the CUDA engine's bf16
//! forward (`cuda::frozen`) and `CudaVectorGrad` over the engine's weights (f32 activations). The
//! two agree to bf16 rounding of the prefixes, not bit for bit, so the checkpoint fingerprint
//! names the device and a run is resumed only on the device it started on.
//!
//! Checkpoints. After every epoch the whole state (finished vectors, the current vector, Adam
//! moments, step, epoch, best, loss history) is written with every float as its bit pattern;
//! each epoch's shuffle is seeded from (seed, vector, epoch), so that is the whole RNG state and a
//! resumed run is bit-identical to an uninterrupted one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bail;
use crate::chart::{line_chart_svg, Series};
use crate::chat::plain_base_prompt;
use crate::config::Config;
use crate::cuda::frozen::prepare_on_gpu;
use crate::cuda::model::{call_rows, CudaEngine};
use crate::cuda::vector_grad::CudaVectorGrad;
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::rng::Rng;
use crate::steering::SteeringSet;
use crate::tokenizer::Tokenizer;
use crate::vector_grad::{loss_grad, prepare, Example, Frozen};

use super::annotate::read_annotations;
use super::spans::token_span;
use super::traces::read_traces;
use super::vectors::BasePrefix;
use super::vectors::{annotations_by_trace, check_sentence};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;
/// The default budget of frozen prefixes kept in memory across epochs (beyond it they are
/// recomputed each time; the result is the same either way): half the memory available now
/// (/proc/meminfo), at least 1 GiB; 2 GiB where that cannot be read.
pub fn default_prefix_cache_bytes() -> usize {
    match crate::memory::available() {
        Some(bytes) => (bytes / 2).max(1 << 30),
        None => 2 << 30,
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct OptimiseSettings {
    pub layer: usize,
    pub epochs: usize,
    pub lr: f64,
    pub max_examples: usize,
    pub batch: usize,
    pub coldness: f32,
    pub patience: usize,
    pub seed: u64,
    /// Run at most this many epochs in this call (all vectors together), then return with the
    /// checkpoint written; None runs to the end.
    pub stop_after: Option<usize>,
    /// `optimise` runs on the CUDA engine (GPU 0) instead of the CPU. `train_on` and
    /// `train_with` ignore it: they are handed their backend.
    pub cuda: bool,
    /// Bytes of frozen prefixes kept across epochs (None: `default_prefix_cache_bytes`).
    /// Only speed depends on it.
    pub prefix_cache_bytes: Option<usize>,
}

impl Default for OptimiseSettings {
    fn default() -> Self {
        OptimiseSettings {
            layer: 0,
            epochs: 50,
            lr: 1e-2,
            max_examples: 2048,
            batch: 6,
            coldness: 0.7,
            patience: 5,
            seed: 0,
            stop_after: None,
            cuda: false,
            prefix_cache_bytes: None,
        }
    }
}

/// One row of the loss curves: after `epoch` epochs (0 = the initial zero vector).
#[derive(Clone, Debug, PartialEq)]
pub struct CurvePoint {
    pub vector: String, // "bias" or "c<k>"
    pub split: String,  // "train" or "val"
    pub epoch: usize,
    pub loss: f64,
}

/// Adam and early-stopping state of the vector being trained.
#[derive(Clone, Debug, PartialEq)]
pub struct VectorState {
    pub v: Vec<f32>,  // [D]
    pub m: Vec<f32>,  // [D] first moment
    pub s: Vec<f32>,  // [D] second moment
    pub step: u64,    // Adam steps taken
    pub epoch: usize, // epochs finished
    pub best: Vec<f32>,
    pub best_val: f64,
    pub since_best: usize,
}

impl VectorState {
    fn new(d: usize) -> Self {
        VectorState {
            v: vec![0.0; d],
            m: vec![0.0; d],
            s: vec![0.0; d],
            step: 0,
            epoch: 0,
            best: vec![0.0; d],
            best_val: f64::INFINITY,
            since_best: 0,
        }
    }
}

/// Everything a run needs to continue: stage 0 is the bias, stage 1 + c category c.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    pub fingerprint: String,
    pub stage: usize,
    pub bias: Option<Vec<f32>>,
    pub vectors: Vec<Option<Vec<f32>>>, // [K]
    pub current: Option<VectorState>,
    pub curves: Vec<CurvePoint>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VectorSummary {
    pub vector: String,
    pub train_examples: usize,
    pub val_examples: usize,
    pub epochs: usize,
    pub early_stopped: bool,
}

pub struct OptimiseReport {
    pub set: Option<SteeringSet>, // None when stopped before the end (--stop-after)
    pub summaries: Vec<VectorSummary>,
    pub empty_categories: Vec<usize>,
    pub epochs_run: usize,
}

/// The bias examples and, per category, the sentence examples of a traces/annotations pair;
/// a trace longer than `context` tokens (with its prefix) is refused.
pub fn build_examples(
    tok: &Tokenizer,
    traces_path: &Path,
    annotations_path: &Path,
    prefix: BasePrefix,
    context: usize,
) -> Result<(Vec<Example>, Vec<Vec<Example>>)> {
    let traces = read_traces(traces_path)?;
    let annots = read_annotations(annotations_path)?;
    let (kk, by_trace) = annotations_by_trace(&traces, &annots, traces_path, annotations_path)?;
    let mut bias = Vec::new();
    let mut cats: Vec<Vec<Example>> = vec![Vec::new(); kk];
    for t in &traces {
        let pre = match prefix {
            BasePrefix::SameAsTrace => t.prompt.clone(),
            BasePrefix::Plain => plain_base_prompt(&t.question),
        };
        let p = pre.len();
        let (ids, offsets) =
            tok.encode_with_offsets(&format!("{pre}{}", t.text), prefix == BasePrefix::Plain)?;
        // An example runs the ids up to its last target token.
        let fits = |end: usize| {
            if end > context {
                bail!(
                    "{}: trace {}: an example of {end} tokens (with its prefix), expected at most the base model's context of {context} (max_position_embeddings)",
                    traces_path.display(),
                    t.index
                );
            }
            Ok(())
        };
        let span = |s: usize, e: usize| token_span(&offsets, p + s, p + e);
        if let Some((a, b)) = t.thinking.and_then(|s| span(s.start, s.end)) {
            fits(b)?;
            bias.push(Example {
                ids: ids[..b].to_vec(),
                positions: (a..b).collect(),
            });
        }
        for &i in by_trace.get(&t.index).into_iter().flatten() {
            let a = &annots[i];
            check_sentence(annotations_path, t, a)?;
            if let Some((s0, s1)) = span(a.start, a.end) {
                fits(s1)?;
                cats[a.category].push(Example {
                    ids: ids[..s1].to_vec(),
                    positions: (s0..s1).collect(),
                });
            }
        }
    }
    if bias.is_empty() {
        bail!(
            "{}: expected traces with a thinking span to train the bias on, found none",
            traces_path.display()
        );
    }
    Ok((bias, cats))
}

/// Where the frozen prefixes and the loss and gradient are computed.
pub enum Backend<'a> {
    /// The f32 model: `vector_grad::prepare` and `vector_grad::loss_grad`.
    Cpu(&'a Model),
    /// The CUDA engine: its bf16 forward for the prefixes (`cuda::frozen::prepare_on_gpu`, slot
    /// 0, context ≥ the longest example) and `CudaVectorGrad` over its weights.
    Cuda(&'a mut CudaEngine),
}

impl Backend<'_> {
    pub fn config(&self) -> &Config {
        match self {
            Backend::Cpu(m) => &m.config,
            Backend::Cuda(e) => &e.config,
        }
    }
}

/// (loss sum, targets, grad sum [D]) of one example.
type ExampleLoss = (f64, usize, Vec<f32>);

/// Frozen prefixes of one vector's examples, kept while under the byte budget.
struct FrozenCache<'a, 'm> {
    backend: &'a mut Backend<'m>,
    layer: usize,
    slots: Vec<Option<Frozen>>,
    bytes: usize,
    budget: usize,
    /// The GPU loss and gradient (its buffers kept between examples), made on first use.
    grad: Option<CudaVectorGrad>,
}

impl<'a, 'm> FrozenCache<'a, 'm> {
    fn new(backend: &'a mut Backend<'m>, s: &OptimiseSettings, n: usize) -> Self {
        FrozenCache {
            backend,
            layer: s.layer,
            slots: (0..n).map(|_| None).collect(),
            bytes: 0,
            budget: s
                .prefix_cache_bytes
                .unwrap_or_else(default_prefix_cache_bytes),
            grad: None,
        }
    }

    /// Keeps `fz` as example i's prefix if the budget allows; else hands it back.
    fn keep(&mut self, i: usize, fz: Frozen) -> Option<Frozen> {
        if self.bytes + fz.bytes() <= self.budget {
            self.bytes += fz.bytes();
            self.slots[i] = Some(fz);
            None
        } else {
            Some(fz)
        }
    }

    /// (loss sum, targets, grad sum) of each example of `ix`, in the order of `ix`.
    fn run(
        &mut self,
        ix: &[usize],
        examples: &[Example],
        v: &[f32],
        extra: Option<&[f32]>,
        coldness: f32,
        want_grad: bool,
    ) -> Result<Vec<ExampleLoss>> {
        let layer = self.layer;
        let mut out = Vec::with_capacity(ix.len());
        // One example at a time: at most one prefix over the budget is alive.
        for &i in ix {
            let made = match (&self.slots[i], &mut *self.backend) {
                (Some(_), _) => None,
                (None, Backend::Cpu(m)) => Some(prepare(m, &examples[i], layer)?),
                (None, Backend::Cuda(e)) => Some(prepare_on_gpu(e, &examples[i], layer)?),
            };
            let unkept = made.and_then(|fz| self.keep(i, fz));
            let Some(fz) = unkept.as_ref().or(self.slots[i].as_ref()) else {
                bail!("example {i}: its frozen prefix was neither kept nor made");
            };
            let lg = match &*self.backend {
                Backend::Cpu(m) => loss_grad::<f32>(m, fz, v, extra, coldness, want_grad),
                Backend::Cuda(e) => {
                    let g = match &mut self.grad {
                        Some(g) => g,
                        none => {
                            none.insert(CudaVectorGrad::new(e.gpu.clone(), &e.config, e.w.clone())?)
                        }
                    };
                    g.loss_grad(fz, v, extra, coldness, want_grad)?
                }
            };
            out.push((lg.loss_sum, lg.targets, lg.grad_sum));
        }
        Ok(out)
    }
}

/// Mean loss over examples `ix` (forward only).
fn mean_loss(
    cache: &mut FrozenCache,
    examples: &[Example],
    ix: &[usize],
    v: &[f32],
    extra: Option<&[f32]>,
    coldness: f32,
) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0);
    for (l, t, _) in cache.run(ix, examples, v, extra, coldness, false)? {
        sum += l;
        n += t;
    }
    Ok(sum / n.max(1) as f64)
}

/// The seed of one epoch's shuffle, from (seed, stage, epoch).
fn epoch_seed(seed: u64, stage: usize, epoch: usize) -> u64 {
    let mut r = Rng::new(seed ^ (stage as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.next_u64() ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// (train, val) indices of `n` examples of stage `stage`.
pub fn split(n: usize, s: &OptimiseSettings, stage: usize) -> (Vec<usize>, Vec<usize>) {
    let mut ix: Vec<usize> = (0..n).collect();
    Rng::new(epoch_seed(s.seed, stage, usize::MAX)).shuffle(&mut ix);
    let n_val = if n >= 2 { (n / 10).clamp(1, 256) } else { 0 };
    let val = ix[..n_val].to_vec();
    let mut train = ix[n_val..].to_vec();
    train.truncate(s.max_examples);
    (train, val)
}

fn vector_name(stage: usize) -> String {
    if stage == 0 {
        "bias".to_string()
    } else {
        format!("c{}", stage - 1)
    }
}

/// Trains one vector from `st` onwards. Returns (finished, early stopped, epochs run now).
#[allow(clippy::too_many_arguments)]
fn train_vector(
    backend: &mut Backend,
    s: &OptimiseSettings,
    stage: usize,
    examples: &[Example],
    extra: Option<&[f32]>,
    st: &mut VectorState,
    curves: &mut Vec<CurvePoint>,
    budget: &mut Option<usize>,
    mut checkpoint: impl FnMut(&VectorState, &[CurvePoint]) -> Result<()>,
) -> Result<(bool, bool, usize)> {
    let d = backend.config().hidden_size;
    let (train, val) = split(examples.len(), s, stage);
    let name = vector_name(stage);
    let mut cache = FrozenCache::new(backend, s, examples.len());
    let batch = s.batch.max(1);
    let total_steps = (s.epochs * train.len().div_ceil(batch)).max(1) as f64;
    let point = |split: &str, epoch: usize, loss: f64| CurvePoint {
        vector: name.clone(),
        split: split.to_string(),
        epoch,
        loss,
    };
    if st.epoch == 0 && !curves.iter().any(|c| c.vector == name) {
        let l0 = mean_loss(&mut cache, examples, &train, &st.v, extra, s.coldness)?;
        curves.push(point("train", 0, l0));
        if !val.is_empty() {
            let v0 = mean_loss(&mut cache, examples, &val, &st.v, extra, s.coldness)?;
            curves.push(point("val", 0, v0));
            st.best_val = v0;
            st.best = st.v.clone();
        }
    }
    let mut ran = 0;
    while st.epoch < s.epochs && (val.is_empty() || st.since_best < s.patience.max(1)) {
        if *budget == Some(0) {
            return Ok((false, false, ran));
        }
        let mut order = train.clone();
        Rng::new(epoch_seed(s.seed, stage, st.epoch)).shuffle(&mut order);
        let (mut ep_sum, mut ep_n) = (0.0, 0);
        for mb in order.chunks(batch) {
            let mut g = vec![0f64; d];
            let (mut bsum, mut bn) = (0.0, 0);
            for (l, t, gi) in cache.run(mb, examples, &st.v, extra, s.coldness, true)? {
                bsum += l;
                bn += t;
                g.iter_mut().zip(&gi).for_each(|(a, &b)| *a += b as f64);
            }
            ep_sum += bsum;
            ep_n += bn;
            if bn == 0 {
                continue;
            }
            adam_step(st, &g, bn, s.lr, total_steps);
        }
        st.epoch += 1;
        ran += 1;
        let tl = ep_sum / ep_n.max(1) as f64;
        curves.push(point("train", st.epoch, tl));
        let mut msg = format!("{name} epoch {}/{}: train {tl:.4}", st.epoch, s.epochs);
        if !val.is_empty() {
            let vl = mean_loss(&mut cache, examples, &val, &st.v, extra, s.coldness)?;
            curves.push(point("val", st.epoch, vl));
            if vl < st.best_val {
                st.best_val = vl;
                st.best = st.v.clone();
                st.since_best = 0;
            } else {
                st.since_best += 1;
            }
            msg += &format!(" val {vl:.4} (best {:.4})", st.best_val);
        }
        eprintln!("{msg}");
        if let Some(b) = budget.as_mut() {
            *b -= 1;
        }
        checkpoint(st, curves)?;
    }
    let early = !val.is_empty() && st.epoch < s.epochs;
    Ok((true, early, ran))
}

/// The settings a checkpoint belongs to. A GPU run adds " device=cuda" (a CPU run's string is
/// what it was before there was a GPU path, so older CPU checkpoints still resume).
fn settings(s: &OptimiseSettings, base: &str, n_bias: usize, cats: &[Vec<Example>]) -> String {
    let counts: Vec<usize> = cats.iter().map(Vec::len).collect();
    let device = if s.cuda { " device=cuda" } else { "" };
    format!(
        "base={base} layer={} epochs={} lr={:e} max_examples={} batch={} coldness={} patience={} seed={} bias_examples={n_bias} category_examples={counts:?}{device}",
        s.layer,
        s.epochs,
        s.lr,
        s.max_examples,
        s.batch,
        s.coldness,
        s.patience,
        s.seed
    )
}

/// The settings (base folder as an absolute path) and `fnv1a` of every example's ids and target
/// positions, so that other traces, annotations, tokenizer or `--prefix` are another run.
fn fingerprint(
    s: &OptimiseSettings,
    base: &Path,
    bias: &[Example],
    cats: &[Vec<Example>],
) -> String {
    let mut bytes = Vec::new();
    for stage in std::iter::once(bias).chain(cats.iter().map(Vec::as_slice)) {
        for e in stage {
            e.ids
                .iter()
                .for_each(|i| bytes.extend_from_slice(&i.to_le_bytes()));
            bytes.push(b'|');
            for p in &e.positions {
                bytes.extend_from_slice(&(*p as u64).to_le_bytes());
            }
            bytes.push(b';');
        }
        bytes.push(b'#');
    }
    let base = crate::eval::cli::abs(base);
    format!(
        "{} examples={:016x}",
        settings(s, &base, bias.len(), cats),
        crate::rng::fnv1a(&bytes)
    )
}

/// Trains the bias and every category vector; writes `checkpoint` after every epoch and, when
/// finished, returns the steering set. With `resume`, continues from `checkpoint`.
pub fn optimise(
    base_dir: &Path,
    traces_path: &Path,
    annotations_path: &Path,
    prefix: BasePrefix,
    s: &OptimiseSettings,
    checkpoint: &Path,
    resume: bool,
) -> Result<(OptimiseReport, Vec<CurvePoint>)> {
    let config = Config::from_file(&base_dir.join("config.json"))?;
    let tok = Tokenizer::from_dir(base_dir)?.ok_or_else(|| {
        Error::Input(format!(
            "{}: train-vectors needs tokenizer.json in the base model folder, found none",
            base_dir.display()
        ))
    })?;
    let c = &config;
    if s.layer >= c.num_hidden_layers {
        bail!(
            "--layer {}: expected a block of the base model below num_hidden_layers {}",
            s.layer,
            c.num_hidden_layers
        );
    }
    if s.epochs == 0 || s.batch == 0 || s.max_examples == 0 || !s.lr.is_finite() || s.lr <= 0.0 {
        bail!(
            "--epochs, --batch, --max-examples and --lr must be positive, found {}, {}, {} and {}",
            s.epochs,
            s.batch,
            s.max_examples,
            s.lr
        );
    }
    if !(s.coldness.is_finite() && s.coldness > 0.0) {
        bail!(
            "--coldness: expected a finite number > 0 (the logits' factor), found {}",
            s.coldness
        );
    }
    let (bias_ex, cats) = build_examples(
        &tok,
        traces_path,
        annotations_path,
        prefix,
        c.max_position_embeddings,
    )?;
    let d = c.hidden_size;
    let kk = cats.len();
    let fp = fingerprint(s, base_dir, &bias_ex, &cats);
    // `--resume` with no checkpoint yet starts, so one command both starts and restarts a run
    // (a requeued job); without it, a checkpoint there is refused rather than overwritten.
    let mut state = if resume && checkpoint.exists() {
        let mut st = read_checkpoint(checkpoint)?;
        // Written before the examples were hashed: the settings alone, the base as typed.
        let older = settings(s, &base_dir.display().to_string(), bias_ex.len(), &cats);
        if st.fingerprint == older && prefix == BasePrefix::Plain {
            // Those were written when `same` was the default, and do not record the prefix.
            bail!(
                "{}: a checkpoint of an older format, which does not record --prefix: expected --prefix same to resume it (the default when it was written), or another --checkpoint to start a --prefix plain run",
                checkpoint.display()
            );
        }
        if st.fingerprint != fp && st.fingerprint != older {
            let examples = |f: &str| f.rsplit_once(" examples=").map(|(s, _)| s.to_string());
            let why = match examples(&fp) == examples(&st.fingerprint) {
                true => "other examples: the traces, annotations, tokenizer or --prefix (plain by default since 2026-11-29) differ",
                false => "other settings",
            };
            bail!(
                "{}: checkpoint is for a different run ({why}): expected {fp:?}, found {:?}",
                checkpoint.display(),
                st.fingerprint
            );
        }
        // From here on it names these examples, so a later resume checks them too.
        st.fingerprint = fp;
        let at = match (&st.current, st.stage > kk) {
            (_, true) => "every vector trained".to_string(),
            (Some(v), _) => format!("vector {} after epoch {}", vector_name(st.stage), v.epoch),
            (None, _) => format!("vector {} from its start", vector_name(st.stage)),
        };
        eprintln!("--resume: continuing {} at {at}", checkpoint.display());
        st
    } else {
        if resume {
            eprintln!(
                "--resume: no checkpoint {} yet, starting the run",
                checkpoint.display()
            );
        } else if checkpoint.exists() {
            bail!(
                "{}: a checkpoint of an earlier run is there: expected --resume to continue it (or to take its finished vectors), or delete it to start over",
                checkpoint.display()
            );
        }
        TrainState {
            fingerprint: fp,
            stage: 0,
            bias: None,
            vectors: vec![None; kk],
            current: None,
            curves: Vec::new(),
        }
    };
    // The model, once every cheap check has passed: on the GPU the CPU f32 weights are never
    // loaded.
    let (model, mut engine);
    let mut backend = if s.cuda {
        let all: Vec<&Example> = bias_ex.iter().chain(cats.iter().flatten()).collect();
        engine = open_engine(base_dir, c, &all)?;
        Backend::Cuda(&mut engine)
    } else {
        model = Model::load(base_dir)?;
        Backend::Cpu(&model)
    };
    let mut budget = s.stop_after;
    let mut summaries = Vec::new();
    let mut epochs_run = 0;
    while state.stage <= kk {
        let stage = state.stage;
        let examples: &[Example] = if stage == 0 {
            &bias_ex
        } else {
            &cats[stage - 1]
        };
        let mut st = state.current.take().unwrap_or_else(|| VectorState::new(d));
        if examples.is_empty() {
            // A category with no sentence keeps a zero vector (reported).
            state.vectors[stage - 1] = Some(vec![0.0; d]);
            state.stage += 1;
            continue;
        }
        let bias = state.bias.clone();
        let extra = if stage == 0 { None } else { bias.as_deref() };
        let mut curves = std::mem::take(&mut state.curves);
        let (done, early, ran) = {
            let snapshot = |st: &VectorState, curves: &[CurvePoint]| {
                let mut ck = state.clone();
                ck.current = Some(st.clone());
                ck.curves = curves.to_vec();
                write_checkpoint(checkpoint, &ck)
            };
            train_vector(
                &mut backend,
                s,
                stage,
                examples,
                extra,
                &mut st,
                &mut curves,
                &mut budget,
                snapshot,
            )?
        };
        state.curves = curves;
        epochs_run += ran;
        if !done {
            state.current = Some(st);
            write_checkpoint(checkpoint, &state)?;
            return Ok((
                OptimiseReport {
                    set: None,
                    summaries,
                    empty_categories: vec![],
                    epochs_run,
                },
                state.curves,
            ));
        }
        let (train, val) = split(examples.len(), s, stage);
        summaries.push(VectorSummary {
            vector: vector_name(stage),
            train_examples: train.len(),
            val_examples: val.len(),
            epochs: st.epoch,
            early_stopped: early,
        });
        let final_v = if val.is_empty() { st.v } else { st.best };
        if stage == 0 {
            state.bias = Some(final_v);
        } else {
            state.vectors[stage - 1] = Some(final_v);
        }
        state.stage += 1;
        write_checkpoint(checkpoint, &state)?;
    }
    let empty_categories: Vec<usize> = (0..kk).filter(|&k| cats[k].is_empty()).collect();
    let set = SteeringSet {
        bias: state.bias.clone().unwrap_or_else(|| vec![0.0; d]),
        vectors: state
            .vectors
            .iter()
            .flat_map(|v| v.clone().unwrap_or_else(|| vec![0.0; d]))
            .collect(),
        layer: s.layer,
        model: base_dir.display().to_string(),
        d,
        count: kk,
        trained_at_block_input: false,
    };
    set.validate_for(d, c.num_hidden_layers)?;
    Ok((
        OptimiseReport {
            set: Some(set),
            summaries,
            empty_categories,
            epochs_run,
        },
        state.curves,
    ))
}

/// The CUDA engine of `base_dir` on GPU 0 with one sequence of the longest example's length.
fn open_engine(base_dir: &Path, c: &Config, examples: &[&Example]) -> Result<CudaEngine> {
    let ctx = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    if ctx > c.max_position_embeddings {
        bail!(
            "{}: the longest example (prompt + trace) has {ctx} tokens: expected at most the base model's max_position_embeddings {}",
            base_dir.display(),
            c.max_position_embeddings
        );
    }
    let gpu = Arc::new(Gpu::new(0)?);
    CudaEngine::load(gpu, base_dir, 1, ctx, ctx.clamp(16, call_rows()))
}

/// The loss curves as CSV: `epoch,split,vector,loss`.
pub fn curves_csv(curves: &[CurvePoint]) -> String {
    let mut s = String::from("epoch,split,vector,loss\n");
    for c in curves {
        s += &format!("{},{},{},{}\n", c.epoch, c.split, c.vector, c.loss);
    }
    s
}

/// One line per (vector, split): held-out solid, training dashed, one colour per vector.
pub fn curves_svg(curves: &[CurvePoint]) -> String {
    let mut series: Vec<Series> = Vec::new();
    for c in curves {
        let label = format!("{} {}", c.vector, c.split);
        let idx = match series.iter().position(|s| s.label == label) {
            Some(i) => i,
            None => {
                let colour = {
                    let mut names: Vec<&str> = Vec::new();
                    for p in curves {
                        if !names.contains(&p.vector.as_str()) {
                            names.push(&p.vector);
                        }
                    }
                    names.iter().position(|n| *n == c.vector).unwrap_or(0)
                };
                series.push(Series {
                    label,
                    points: Vec::new(),
                    colour,
                    dashed: c.split == "train",
                });
                series.len() - 1
            }
        };
        series[idx].points.push((c.epoch as f64, c.loss));
    }
    line_chart_svg("Steering-vector loss", "epoch", "cross-entropy", &series)
}

/// `<out>` with its extension replaced by `ext` (e.g. "curves.csv").
pub fn sibling(out: &Path, ext: &str) -> PathBuf {
    out.with_extension(ext)
}

// --- checkpoint file: JSON with floats as bit patterns, so a reload is exact ---

#[derive(Serialize, Deserialize)]
struct VectorStateFile {
    v: Vec<u32>,
    m: Vec<u32>,
    s: Vec<u32>,
    step: u64,
    epoch: usize,
    best: Vec<u32>,
    best_val: u64,
    since_best: usize,
}

#[derive(Serialize, Deserialize)]
struct CurveFile {
    vector: String,
    split: String,
    epoch: usize,
    loss: u64,
}

#[derive(Serialize, Deserialize)]
struct TrainStateFile {
    fingerprint: String,
    stage: usize,
    bias: Option<Vec<u32>>,
    vectors: Vec<Option<Vec<u32>>>,
    current: Option<VectorStateFile>,
    curves: Vec<CurveFile>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn unbits(v: &[u32]) -> Vec<f32> {
    v.iter().map(|&x| f32::from_bits(x)).collect()
}

pub fn write_checkpoint(path: &Path, st: &TrainState) -> Result<()> {
    let f = TrainStateFile {
        fingerprint: st.fingerprint.clone(),
        stage: st.stage,
        bias: st.bias.as_deref().map(bits),
        vectors: st.vectors.iter().map(|v| v.as_deref().map(bits)).collect(),
        current: st.current.as_ref().map(|c| VectorStateFile {
            v: bits(&c.v),
            m: bits(&c.m),
            s: bits(&c.s),
            step: c.step,
            epoch: c.epoch,
            best: bits(&c.best),
            best_val: c.best_val.to_bits(),
            since_best: c.since_best,
        }),
        curves: st
            .curves
            .iter()
            .map(|c| CurveFile {
                vector: c.vector.clone(),
                split: c.split.clone(),
                epoch: c.epoch,
                loss: c.loss.to_bits(),
            })
            .collect(),
    };
    let text = serde_json::to_string(&f)
        .map_err(|e| Error::Input(format!("{}: cannot encode checkpoint: {e}", path.display())))?;
    // Whole or not at all: a run killed mid-write leaves the previous checkpoint intact.
    crate::files::write_atomic(path, text.as_bytes())
}

pub fn read_checkpoint(path: &Path) -> Result<TrainState> {
    let text = crate::files::read_text(path)?;
    let f: TrainStateFile = serde_json::from_str(&text).map_err(|e| {
        Error::Input(format!(
            "{}: expected a train-vectors checkpoint, found JSON that does not parse as one: {e}",
            path.display()
        ))
    })?;
    Ok(TrainState {
        fingerprint: f.fingerprint,
        stage: f.stage,
        bias: f.bias.as_deref().map(unbits),
        vectors: f.vectors.iter().map(|v| v.as_deref().map(unbits)).collect(),
        current: f.current.map(|c| VectorState {
            v: unbits(&c.v),
            m: unbits(&c.m),
            s: unbits(&c.s),
            step: c.step,
            epoch: c.epoch,
            best: unbits(&c.best),
            best_val: f64::from_bits(c.best_val),
            since_best: c.since_best,
        }),
        curves: f
            .curves
            .into_iter()
            .map(|c| CurvePoint {
                vector: c.vector,
                split: c.split,
                epoch: c.epoch,
                loss: f64::from_bits(c.loss),
            })
            .collect(),
    })
}

/// Trains one vector on fixed examples (no held-out split, no checkpoint): the building block the
/// CLI runs per vector, exposed for tests and experiments. Returns the vector and the training
/// loss after each epoch. On the CPU; `train_with` takes any backend.
pub fn train_on(
    model: &Model,
    examples: &[Example],
    extra: Option<&[f32]>,
    s: &OptimiseSettings,
) -> Result<(Vec<f32>, Vec<f64>)> {
    train_with(&mut Backend::Cpu(model), examples, extra, s)
}

/// `train_on` on `backend` (for the GPU: `Backend::Cuda` with an engine whose context holds
/// the longest example).
pub fn train_with(
    backend: &mut Backend,
    examples: &[Example],
    extra: Option<&[f32]>,
    s: &OptimiseSettings,
) -> Result<(Vec<f32>, Vec<f64>)> {
    let d = backend.config().hidden_size;
    let mut st = VectorState::new(d);
    let mut cache = FrozenCache::new(backend, s, examples.len());
    let ix: Vec<usize> = (0..examples.len()).collect();
    let batch = s.batch.max(1);
    let total_steps = (s.epochs * ix.len().div_ceil(batch)).max(1) as f64;
    let mut losses = Vec::new();
    for epoch in 0..s.epochs {
        let mut order = ix.clone();
        Rng::new(epoch_seed(s.seed, 0, epoch)).shuffle(&mut order);
        let (mut ep_sum, mut ep_n) = (0.0, 0);
        for mb in order.chunks(batch) {
            let mut g = vec![0f64; d];
            let mut bn = 0;
            for (l, t, gi) in cache.run(mb, examples, &st.v, extra, s.coldness, true)? {
                ep_sum += l;
                ep_n += t;
                bn += t;
                g.iter_mut().zip(&gi).for_each(|(a, &b)| *a += b as f64);
            }
            if bn == 0 {
                continue;
            }
            adam_step(&mut st, &g, bn, s.lr, total_steps);
        }
        losses.push(ep_sum / ep_n.max(1) as f64);
    }
    Ok((st.v, losses))
}

/// One Adam step on the vector with the token-mean gradient g_sum / n and a cosine-decayed lr.
fn adam_step(st: &mut VectorState, g_sum: &[f64], n: usize, lr0: f64, total_steps: f64) {
    let lr = lr0 * 0.5 * (1.0 + (std::f64::consts::PI * st.step as f64 / total_steps).cos());
    st.step += 1;
    let (c1, c2) = (
        1.0 - BETA1.powi(st.step as i32),
        1.0 - BETA2.powi(st.step as i32),
    );
    for (i, &g) in g_sum.iter().enumerate() {
        let gi = g / n as f64;
        let m = BETA1 * st.m[i] as f64 + (1.0 - BETA1) * gi;
        let v2 = BETA2 * st.s[i] as f64 + (1.0 - BETA2) * gi * gi;
        st.m[i] = m as f32;
        st.s[i] = v2 as f32;
        let upd = lr * (m / c1) / ((v2 / c2).sqrt() + ADAM_EPS);
        st.v[i] = (st.v[i] as f64 - upd) as f32;
    }
}
