//! Difference-of-means steering vectors in the base model (hybrid.md §2.2, the cheaper
//! alternative to gradient-trained vectors). The base model reads each trace; a sentence's
//! activation is the mean of block L's output over its tokens (as for the SAE, but in the base
//! model and uncentred).
//!
//! - category vector c = mean over the sentences of category c − mean over all sentences
//!   (a category with no sentence gets a zero vector and is reported);
//! - bias = mean over all sentences − mean over all non-thinking tokens (prompt and any text
//!   after `</think>`, every trace included). Our choice: the bias is meant to move ordinary
//!   text towards "reasoning-model thinking" in general, so it is the step from the
//!   non-thinking positions to the average thinking sentence; sentences and tokens are each
//!   weighted equally within their own mean. Position 0 is left out: it is the attention sink
//!   (bos for Llama 3), whose residual is orders of magnitude larger in a few dimensions, so
//!   one such row per trace would set the bias there.

use std::collections::BTreeMap;
use std::path::Path;

use crate::bail;
use crate::chat::plain_base_prompt;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::steering::SteeringSet;
use crate::tokenizer::Tokenizer;

use super::annotate::{read_annotations, Annotation};
use super::spans::{block_runner, token_span};
use super::traces::{in_trace, read_traces, Trace};

/// Which text the base model reads before a trace's `text`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasePrefix {
    /// The thinking model's rendered chat prompt: the base reads exactly the same text.
    SameAsTrace,
    /// The paper's plain base prompt (hybrid.md §3), as the base sees it when steered.
    Plain,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VectorReport {
    pub per_category: Vec<usize>, // [K] sentences averaged
    pub sentences: usize,
    pub non_thinking_tokens: usize,
    pub empty_categories: Vec<usize>,
}

/// Sums in f64, then means.
struct MeanAcc {
    sum: Vec<f64>, // [D]
    n: usize,
}

impl MeanAcc {
    fn new(d: usize) -> Self {
        MeanAcc {
            sum: vec![0.0; d],
            n: 0,
        }
    }
    fn add(&mut self, x: &[f32]) {
        self.sum
            .iter_mut()
            .zip(x)
            .for_each(|(s, &v)| *s += v as f64);
        self.n += 1;
    }
    fn mean(&self) -> Vec<f64> {
        let n = self.n.max(1) as f64;
        self.sum.iter().map(|s| s / n).collect()
    }
}

/// The mean-diff steering set at block `layer` of the base model in `base_dir`; `cuda`: the
/// forward passes run on the GPU (see `spans::block_runner`).
pub fn mean_diff(
    base_dir: &Path,
    traces_path: &Path,
    annotations_path: &Path,
    layer: usize,
    prefix: BasePrefix,
    cuda: bool,
) -> Result<(SteeringSet, VectorReport)> {
    let c = &Config::from_file(&base_dir.join("config.json"))?;
    let tok = Tokenizer::from_dir(base_dir)?.ok_or_else(|| {
        Error::Input(format!(
            "{}: train-vectors needs tokenizer.json in the base model folder, found none",
            base_dir.display()
        ))
    })?;
    if layer >= c.num_hidden_layers {
        bail!(
            "--layer {layer}: expected a block of the base model below num_hidden_layers {}",
            c.num_hidden_layers
        );
    }
    let traces = read_traces(traces_path)?;
    if traces.is_empty() {
        bail!(
            "{}: expected at least one trace, found an empty file",
            traces_path.display()
        );
    }
    let annots = read_annotations(annotations_path)?;
    let (kk, by_trace) = annotations_by_trace(&traces, &annots, traces_path, annotations_path)?;
    let mut run = block_runner(base_dir, layer, cuda)?;

    let d = c.hidden_size;
    let mut cats: Vec<MeanAcc> = (0..kk).map(|_| MeanAcc::new(d)).collect();
    let (mut all, mut non_thinking) = (MeanAcc::new(d), MeanAcc::new(d));
    let mut m = vec![0f32; d];
    for t in &traces {
        let pre = match prefix {
            BasePrefix::SameAsTrace => t.prompt.clone(),
            BasePrefix::Plain => plain_base_prompt(&t.question),
        };
        let p = pre.len();
        let (ids, offsets) =
            tok.encode_with_offsets(&format!("{pre}{}", t.text), prefix == BasePrefix::Plain)?;
        if ids.is_empty() {
            continue;
        }
        let h = run(&ids).map_err(|e| in_trace(traces_path, t, e))?; // [T, D]
        let think = t
            .thinking
            .and_then(|s| token_span(&offsets, p + s.start, p + s.end));
        for (i, row) in h.chunks_exact(d).enumerate().skip(1) {
            if !think.is_some_and(|(a, b)| (a..b).contains(&i)) {
                non_thinking.add(row);
            }
        }
        for a in by_trace
            .get(&t.index)
            .into_iter()
            .flatten()
            .map(|&i| &annots[i])
        {
            check_sentence(annotations_path, t, a)?;
            let Some(span) = token_span(&offsets, p + a.start, p + a.end) else {
                continue;
            };
            super::spans::span_mean(&h, d, span, &mut m);
            cats[a.category].add(&m);
            all.add(&m);
        }
    }
    if all.n == 0 {
        bail!(
            "{}: expected annotated sentences to average, found none that the base tokenizer covers",
            annotations_path.display()
        );
    }
    if non_thinking.n == 0 {
        bail!(
            "{}: expected some non-thinking tokens (prompt or answer) for the bias, found none",
            traces_path.display()
        );
    }
    let mean_all = all.mean();
    let mean_nt = non_thinking.mean();
    let bias: Vec<f32> = mean_all
        .iter()
        .zip(&mean_nt)
        .map(|(a, b)| (a - b) as f32)
        .collect();
    let mut vectors = vec![0f32; kk * d];
    let mut empty = Vec::new();
    for (ci, acc) in cats.iter().enumerate() {
        if acc.n == 0 {
            empty.push(ci);
            continue;
        }
        let mc = acc.mean();
        for i in 0..d {
            vectors[ci * d + i] = (mc[i] - mean_all[i]) as f32;
        }
    }
    let set = SteeringSet {
        bias,
        vectors,
        layer,
        model: base_dir.display().to_string(),
        d,
        count: kk,
        trained_at_block_input: false,
    };
    set.validate_for(d, c.num_hidden_layers)?;
    let report = VectorReport {
        per_category: cats.iter().map(|a| a.n).collect(),
        sentences: all.n,
        non_thinking_tokens: non_thinking.n,
        empty_categories: empty,
    };
    Ok((set, report))
}

/// K (checked as in `check_annotations`) and the annotation indices of each trace; every trace
/// the annotations name must be in `traces`.
pub(crate) fn annotations_by_trace(
    traces: &[Trace],
    annots: &[Annotation],
    traces_path: &Path,
    annotations_path: &Path,
) -> Result<(usize, BTreeMap<usize, Vec<usize>>)> {
    let kk = check_annotations(annotations_path, annots)?;
    let mut by_trace: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, a) in annots.iter().enumerate() {
        by_trace.entry(a.trace).or_default().push(i);
    }
    if let Some(missing) = by_trace
        .keys()
        .find(|&&i| !traces.iter().any(|t| t.index == i))
    {
        bail!(
            "{}: annotations refer to trace {missing}, expected a trace with that index in {}",
            annotations_path.display(),
            traces_path.display()
        );
    }
    Ok((kk, by_trace))
}

/// The annotated sentence must be the bytes it names in its trace (annotations of another
/// traces file otherwise slip through as wrong spans).
pub(crate) fn check_sentence(annotations_path: &Path, t: &Trace, a: &Annotation) -> Result<()> {
    if t.text.get(a.start..a.end) != Some(a.sentence.as_str()) {
        bail!(
            "{}: trace {} bytes {}..{} do not hold the annotated sentence {:?}: expected the traces file the annotations were made from",
            annotations_path.display(),
            t.index,
            a.start,
            a.end,
            a.sentence
        );
    }
    Ok(())
}

/// K from the annotations; every row must agree on it and have a category below it.
pub(crate) fn check_annotations(path: &Path, annots: &[Annotation]) -> Result<usize> {
    let Some(first) = annots.first() else {
        bail!(
            "{}: expected at least one annotation, found an empty file",
            path.display()
        );
    };
    let kk = first.latents;
    for (i, a) in annots.iter().enumerate() {
        if a.latents != kk || a.category >= kk || a.start > a.end {
            bail!(
                "{}:{}: expected latents = {kk} and a category below it, found latents {} and category {}",
                path.display(),
                i + 1,
                a.latents,
                a.category
            );
        }
    }
    Ok(kk)
}
