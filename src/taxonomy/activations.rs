//! Sentence activations (hybrid.md §2.1): for each thinking sentence, the mean of block L's
//! output over the sentence's tokens, then centred by the dataset mean and scaled to unit L2
//! norm. File: `activations` [N, D] f32 and `activation_mean` [D] f32 (safetensors, metadata
//! `layer`, `model`), plus `<out stem>.index.jsonl`, one row per sentence in the same order.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Error, Result};
use crate::sae::{
    expect_shape, meta_usize, parse_safetensors, read_metadata, tensor_f32, write_f32_safetensors,
};
use crate::tokenizer::Tokenizer;

use super::spans::{block_runner, span_mean, tokenise_trace};
use super::traces::read_traces;
use crate::config::Config;

/// A sentence-activation file in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Acts {
    pub activations: Vec<f32>, // [N, D] centred, unit norm
    pub mean: Vec<f32>,        // [D] the dataset mean that was subtracted
    pub n: usize,
    pub d: usize,
    pub layer: usize,
    pub model: String,
}

impl Acts {
    pub fn load(path: &Path) -> Result<Acts> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = parse_safetensors(&bytes, &file)?;
        let meta = read_metadata(&bytes, &file)?;
        let (shape, activations) = tensor_f32(&st, &file, "activations", 2, "[N, D]")?;
        let (n, d) = (shape[0], shape[1]);
        if n == 0 || d == 0 {
            bail!(
                "{file}: tensor `activations` has shape {shape:?}, expected [N, D] with N, D >= 1"
            );
        }
        let (ms, mean) = tensor_f32(&st, &file, "activation_mean", 1, "[D]")?;
        expect_shape(
            &file,
            "activation_mean",
            &ms,
            &[d],
            "[D] with D from `activations`",
        )?;
        let layer = meta_usize(&meta, &file, "layer")?;
        let model = meta.get("model").cloned().unwrap_or_default();
        Ok(Acts {
            activations,
            mean,
            n,
            d,
            layer,
            model,
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("activations", vec![self.n, self.d], &self.activations),
            ("activation_mean", vec![self.d], &self.mean),
        ];
        let mut meta = BTreeMap::new();
        meta.insert("layer".to_string(), self.layer.to_string());
        meta.insert("model".to_string(), self.model.clone());
        write_f32_safetensors(path, &tensors, &meta)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.activations[i * self.d..(i + 1) * self.d]
    }
}

/// One row of the index: which trace and sentence an activation row came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexRow {
    pub trace: usize,
    pub sentence: String,
    /// Byte range of the sentence in the trace's `text`.
    pub start: usize,
    pub end: usize,
    /// Token range [a, b) in the tokenised `prompt + text`.
    pub tokens: (usize, usize),
}

/// `acts.safetensors` → `acts.index.jsonl`.
pub fn index_path(acts: &Path) -> PathBuf {
    acts.with_extension("index.jsonl")
}

pub fn read_index(path: &Path) -> Result<Vec<IndexRow>> {
    read_jsonl(
        path,
        "an index row {\"trace\", \"sentence\", \"start\", \"end\", \"tokens\"}",
    )
}

/// Reads a JSONL file of `T` rows; `what` names the expected row in errors.
pub(crate) fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path, what: &str) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(line).map_err(|e| {
            Error::Input(format!(
                "{}:{}: expected {what}, found a line that does not parse: {e}",
                path.display(),
                i + 1
            ))
        })?);
    }
    Ok(out)
}

pub(crate) fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(f);
    for r in rows {
        let line = serde_json::to_string(r).expect("plain rows always serialise");
        writeln!(w, "{line}").map_err(|e| Error::io(path, e))?;
    }
    w.flush().map_err(|e| Error::io(path, e))
}

/// What happened to the traces: how many had no thinking span (by index) or no sentence of
/// at least three words in it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActsReport {
    pub traces: usize,
    pub sentences: usize,
    pub no_thinking: Vec<usize>,
    pub no_sentences: Vec<usize>,
    pub uncovered: usize,
}

/// Sentence means of every trace: (raw means [N, D], index rows, report). `run` gives the block
/// output [T, D] for a token sequence (on the CPU or the GPU).
pub fn sentence_means(
    d: usize,
    tok: &Tokenizer,
    traces_path: &Path,
    run: &mut dyn FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<(Vec<f32>, Vec<IndexRow>, ActsReport)> {
    let traces = read_traces(traces_path)?;
    if traces.is_empty() {
        bail!(
            "{}: expected at least one trace, found an empty file",
            traces_path.display()
        );
    }
    let mut rep = ActsReport {
        traces: traces.len(),
        ..Default::default()
    };
    let (mut raw, mut index) = (Vec::new(), Vec::new());
    for t in &traces {
        if t.thinking.is_none() {
            rep.no_thinking.push(t.index);
            continue;
        }
        let tk = tokenise_trace(tok, &t.prompt, &t.text, t.thinking)?;
        rep.uncovered += tk.uncovered;
        if tk.sentences.is_empty() {
            rep.no_sentences.push(t.index);
            continue;
        }
        let h = run(&tk.ids)?; // [T, D]
        let mut m = vec![0f32; d];
        for s in &tk.sentences {
            span_mean(&h, d, s.tokens, &mut m);
            raw.extend_from_slice(&m);
            index.push(IndexRow {
                trace: t.index,
                sentence: t.text[s.start..s.end].to_string(),
                start: s.start,
                end: s.end,
                tokens: s.tokens,
            });
        }
    }
    rep.sentences = index.len();
    Ok((raw, index, rep))
}

/// Centres rows [N, D] by their mean (returned) and scales each to unit L2 norm (a row equal
/// to the mean becomes zero, as `Sae::encode` does).
pub fn centre_and_normalise(rows: &mut [f32], d: usize) -> Vec<f32> {
    let n = rows.len() / d;
    let mut acc = vec![0f64; d];
    for r in rows.chunks_exact(d) {
        for (a, &x) in acc.iter_mut().zip(r) {
            *a += x as f64;
        }
    }
    let mean: Vec<f32> = acc.iter().map(|a| (a / n.max(1) as f64) as f32).collect();
    for r in rows.chunks_exact_mut(d) {
        for (x, m) in r.iter_mut().zip(&mean) {
            *x -= m;
        }
        let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        r.iter_mut().for_each(|x| *x *= inv);
    }
    mean
}

/// The `activations` command: writes `out` and its index; errors when no sentence is found.
/// `cuda`: the forward passes run on the GPU (see `spans::block_runner`), else on the CPU.
pub fn compute_activations(
    model_dir: &Path,
    traces_path: &Path,
    layer: usize,
    out: &Path,
    cuda: bool,
) -> Result<ActsReport> {
    let tok = Tokenizer::from_dir(model_dir)?.ok_or_else(|| {
        Error::Input(format!(
            "{}: activations need tokenizer.json in the model folder, found none",
            model_dir.display()
        ))
    })?;
    let config = Config::from_file(&model_dir.join("config.json"))?;
    let d = config.hidden_size;
    let mut run = block_runner(model_dir, layer, cuda)?;
    let (mut raw, index, rep) = sentence_means(d, &tok, traces_path, &mut run)?;
    if index.is_empty() {
        bail!(
            "{}: expected at least one thinking sentence of 3+ words, found none in {} traces ({} without a thinking span, {} with no such sentence)",
            traces_path.display(),
            rep.traces,
            rep.no_thinking.len(),
            rep.no_sentences.len()
        );
    }
    let mean = centre_and_normalise(&mut raw, d);
    let acts = Acts {
        activations: raw,
        mean,
        n: index.len(),
        d,
        layer,
        model: model_dir.display().to_string(),
    };
    acts.save(out)?;
    write_jsonl(&index_path(out), &index)?;
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centred_rows_are_unit_and_mean_is_returned() {
        let mut rows = vec![1.0, 0.0, 3.0, 0.0, 2.0, 5.0]; // [3, 2]
        let mean = centre_and_normalise(&mut rows, 2);
        assert_eq!(mean, vec![2.0, 5.0 / 3.0]);
        for r in rows.chunks(2) {
            let n: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-6, "{n}");
        }
        // Row 0 was (1, 0) − mean = (−1, −5/3): direction kept.
        assert!(rows[0] < 0.0 && rows[1] < rows[0]);
    }
}
