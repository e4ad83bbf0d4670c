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
use super::traces::{in_trace, read_traces, Trace};
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
    let text = crate::files::read_text(path)?;
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
    let mut text = String::new();
    for r in rows {
        text += &serde_json::to_string(r).expect("plain rows always serialise");
        text.push('\n');
    }
    crate::files::write_atomic(path, text.as_bytes())
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
    /// Traces whose means a killed run had already written (resumed, not run again).
    pub resumed: usize,
}

/// What decides a sentence mean besides its trace: recorded in the progress file, so that a
/// resume with another model or layer is refused instead of mixing two runs' rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActsRun {
    pub model: String,
    pub layer: usize,
    pub d: usize,
    /// "cpu" (f32) or "cuda" (bf16): the two give different means, so a requeued job on another
    /// kind of machine must not mix them.
    pub device: String,
    /// `weights::checkpoint_fingerprint` of the model: a checkpoint replaced under the same
    /// path is another model (None: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// What one trace gave: its index rows (one per sentence, in order) or why it gave none.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TraceDone {
    /// `fnv1a` of the trace's JSON, in hex: a trace changed since (another text, span or
    /// prompt) is run again.
    fingerprint: String,
    trace: usize,
    no_thinking: bool,
    uncovered: usize,
    rows: Vec<IndexRow>,
}

fn fingerprint(t: &Trace) -> String {
    let json = serde_json::to_string(t).expect("plain rows always serialise");
    format!("{:016x}", crate::rng::fnv1a(json.as_bytes()))
}

/// The raw means of the traces done so far, kept beside the output while a run goes on, so that
/// a killed run resumes where it stopped: `acts.safetensors.partial.f32` holds the rows [rows, D]
/// (f32, little-endian) in the order they were run; `.progress.jsonl` the run's settings, then one
/// line per trace done, appended after the trace's rows. Both go when the output is written.
struct Partial {
    raw_path: PathBuf,
    log_path: PathBuf,
    raw: std::fs::File,
    log: std::fs::File,
    /// Fingerprint → (the trace's entry, its first row in the raw file).
    done: BTreeMap<String, (TraceDone, usize)>,
    rows: usize,
    d: usize,
}

impl Partial {
    /// `acts.safetensors` → `acts.safetensors.partial.f32` and `.progress.jsonl`: the whole name,
    /// so that outputs differing only in their extension keep apart.
    fn paths(out: &Path) -> (PathBuf, PathBuf) {
        let beside = |ext: &str| {
            let mut name = out.file_name().unwrap_or_default().to_os_string();
            name.push(ext);
            out.with_file_name(name)
        };
        (beside(".partial.f32"), beside(".progress.jsonl"))
    }

    /// Opens the partial files of `out`: new ones, or those of a killed run with the same
    /// settings (a torn last line is dropped, rows past the last recorded trace are cut).
    /// Files of a run killed before they took the whole name (`acts.partial.f32`) are taken
    /// over.
    fn open(out: &Path, run: &ActsRun) -> Result<Partial> {
        let (raw_path, log_path) = Self::paths(out);
        let older = (
            out.with_extension("partial.f32"),
            out.with_extension("progress.jsonl"),
        );
        if !log_path.exists() && older.1.exists() {
            if older.0.exists() {
                std::fs::rename(&older.0, &raw_path).map_err(|e| Error::io(&older.0, e))?;
            }
            std::fs::rename(&older.1, &log_path).map_err(|e| Error::io(&older.1, e))?;
        }
        let (mut done, mut rows) = (BTreeMap::new(), 0);
        // Only whole lines count: a kill in the middle of a line leaves a tail without '\n'.
        if log_path.exists() {
            crate::files::cut_torn_line(&log_path)?;
        }
        let text = match std::fs::read_to_string(&log_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&log_path, e)),
        };
        let mut lines = text.lines();
        if let Some(header) = lines.next() {
            let was: ActsRun = serde_json::from_str(header).map_err(|e| {
                Error::Input(format!(
                    "{}:1: expected the settings of an activations run, found a line that does not parse ({e}): delete it to start over",
                    log_path.display()
                ))
            })?;
            let unprinted = |r: &ActsRun| ActsRun {
                fingerprint: None,
                ..r.clone()
            };
            let changed = crate::weights::checkpoint_changed(
                &was.model,
                was.fingerprint.as_deref(),
                run.fingerprint.as_deref(),
            );
            if let Some(what) = changed.filter(|_| unprinted(&was) == unprinted(run)) {
                bail!(
                    "{} holds a killed run of {what}: expected the same checkpoint to resume, use another --out or delete it to start over",
                    log_path.display()
                );
            }
            if unprinted(&was) != unprinted(run) {
                bail!(
                    "{} holds a killed run of {} at layer {} (D = {}) on {}, now {} at layer {} (D = {}) on {}: expected the same settings to resume, use another --out or delete it to start over",
                    log_path.display(),
                    was.model,
                    was.layer,
                    was.d,
                    was.device,
                    run.model,
                    run.layer,
                    run.d,
                    run.device
                );
            }
            for (i, line) in lines.enumerate() {
                let t: TraceDone = serde_json::from_str(line).map_err(|e| {
                    Error::Input(format!(
                        "{}:{}: expected a finished trace, found a line that does not parse ({e}): delete it to start over",
                        log_path.display(),
                        i + 2
                    ))
                })?;
                let n = t.rows.len();
                done.insert(t.fingerprint.clone(), (t, rows));
                rows += n;
            }
        }
        let need = (rows * run.d * 4) as u64;
        let have = std::fs::metadata(&raw_path).map_or(0, |m| m.len());
        if have < need {
            bail!(
                "{}: expected {rows} rows of {} f32 ({need} bytes) for the traces {} records, found {have} bytes: delete both to start over",
                raw_path.display(),
                run.d,
                log_path.display()
            );
        }
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::io(p, e))
        };
        let raw = open(&raw_path)?;
        // Rows written after the last recorded trace belong to a trace that was not finished.
        raw.set_len(need).map_err(|e| Error::io(&raw_path, e))?;
        let mut log = open(&log_path)?;
        if text.is_empty() {
            let line = serde_json::to_string(run).expect("plain rows always serialise");
            writeln!(log, "{line}").map_err(|e| Error::io(&log_path, e))?;
        }
        Ok(Partial {
            raw_path,
            log_path,
            raw,
            log,
            done,
            rows,
            d: run.d,
        })
    }

    /// Appends a trace's rows [n, D], then its line (so a line is never ahead of its rows).
    fn record(&mut self, t: TraceDone, means: &[f32]) -> Result<()> {
        self.check_len()?;
        let bytes: Vec<u8> = means.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.raw
            .write_all(&bytes)
            .map_err(|e| Error::io(&self.raw_path, e))?;
        let line = serde_json::to_string(&t).expect("plain rows always serialise");
        writeln!(self.log, "{line}").map_err(|e| Error::io(&self.log_path, e))?;
        let n = t.rows.len();
        self.done.insert(t.fingerprint.clone(), (t, self.rows));
        self.rows += n;
        Ok(())
    }

    /// Removes the partial files (a run that recorded nothing).
    fn discard(&self) {
        let _ = std::fs::remove_file(&self.raw_path);
        let _ = std::fs::remove_file(&self.log_path);
    }

    /// Refuses rows this run did not write: a second run on the same output appending too.
    fn check_len(&self) -> Result<()> {
        let want = (self.rows * self.d * 4) as u64;
        let have = std::fs::metadata(&self.raw_path).map_or(0, |m| m.len());
        if have != want {
            bail!(
                "{}: expected {want} bytes of rows written by this run, found {have}: is another `activations` run writing the same --out?",
                self.raw_path.display()
            );
        }
        Ok(())
    }

    /// All rows written so far [rows, D].
    fn read_rows(&self) -> Result<Vec<f32>> {
        self.check_len()?;
        // Read straight into the f32 rows (no second copy of the file in memory).
        let io = |e| Error::io(&self.raw_path, e);
        let mut rows = vec![0f32; self.rows * self.d];
        let mut f = std::fs::File::open(&self.raw_path).map_err(io)?;
        std::io::Read::read_exact(&mut f, bytemuck::cast_slice_mut(&mut rows)).map_err(io)?;
        rows.iter_mut()
            .for_each(|x| *x = f32::from_le_bytes(x.to_ne_bytes()));
        if let Some(i) = rows.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: row {} holds {}: expected finite activations (from the model, or a damaged file: delete it and {} to run those traces again)",
                self.raw_path.display(),
                i / self.d.max(1),
                rows[i],
                self.log_path.display()
            );
        }
        Ok(rows)
    }

    /// The progress file first: rows without it are cut to none when a run starts, while a
    /// progress file without its rows would be refused.
    fn remove(self) -> Result<()> {
        for p in [&self.log_path, &self.raw_path] {
            std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
        }
        Ok(())
    }
}

/// The sentence means of one trace [n, D] and its entry. `run` gives the block output [T, D]
/// for a token sequence (on the CPU or the GPU).
fn trace_means(
    d: usize,
    tok: &Tokenizer,
    t: &Trace,
    run: &mut dyn FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<(TraceDone, Vec<f32>)> {
    let mut done = TraceDone {
        fingerprint: fingerprint(t),
        trace: t.index,
        no_thinking: t.thinking.is_none(),
        uncovered: 0,
        rows: Vec::new(),
    };
    let mut means = Vec::new();
    if t.thinking.is_none() {
        return Ok((done, means));
    }
    let tk = tokenise_trace(tok, &t.prompt, &t.text, t.thinking)?;
    done.uncovered = tk.uncovered;
    if tk.sentences.is_empty() {
        return Ok((done, means));
    }
    let h = run(&tk.ids)?; // [T, D]
    let mut m = vec![0f32; d];
    for s in &tk.sentences {
        span_mean(&h, d, s.tokens, &mut m);
        means.extend_from_slice(&m);
        done.rows.push(IndexRow {
            trace: t.index,
            sentence: t.text[s.start..s.end].to_string(),
            start: s.start,
            end: s.end,
            tokens: s.tokens,
        });
    }
    Ok((done, means))
}

/// Sentence means of every trace of `traces_path`, written to `out` (centred, unit norm) and
/// its index. Each trace's raw means are kept on disk as they are made, so a killed run given
/// the same settings runs only the traces not done yet (or changed since) and writes the same
/// files as an uninterrupted one. Errors when no sentence is found.
pub fn write_activations(
    tok: &Tokenizer,
    traces_path: &Path,
    settings: &ActsRun,
    out: &Path,
    run: &mut dyn FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<ActsReport> {
    let traces = read_traces(traces_path)?;
    if traces.is_empty() {
        bail!(
            "{}: expected at least one trace, found an empty file",
            traces_path.display()
        );
    }
    let d = settings.d;
    let _lock = crate::files::lock_output(out, "--out")?;
    let mut partial = Partial::open(out, settings)?;
    let mut rep = ActsReport {
        traces: traces.len(),
        ..Default::default()
    };
    let keys: Vec<String> = traces.iter().map(fingerprint).collect();
    rep.resumed = keys
        .iter()
        .filter(|k| partial.done.contains_key(*k))
        .count();
    for (t, key) in traces.iter().zip(&keys) {
        if partial.done.contains_key(key) {
            continue; // done before the kill
        }
        let (done, means) = match trace_means(d, tok, t, run) {
            Ok(r) => r,
            Err(e) => {
                // A run that fails before any trace is recorded, by it or a killed run before
                // it (a trace too long for the model's context, on the first trace), leaves no
                // partial files to block a corrected rerun.
                if partial.done.is_empty() {
                    partial.discard();
                }
                return Err(in_trace(traces_path, t, e));
            }
        };
        partial.record(done, &means)?;
    }
    // The rows in the traces' order, whatever order they were run in: as read when they are
    // already in it (the usual case, resumed runs included), else gathered into it.
    let all = partial.read_rows()?;
    let spans: Vec<(usize, usize)> = keys
        .iter()
        .map(|k| (partial.done[k].1, partial.done[k].0.rows.len()))
        .collect();
    let total: usize = spans.iter().map(|s| s.1).sum();
    let in_order = spans
        .iter()
        .scan(0, |at, &(first, n)| {
            let ok = first == *at;
            *at += n;
            Some(ok)
        })
        .all(|ok| ok);
    let mut raw = match in_order {
        true => all,
        false => spans
            .iter()
            .flat_map(|&(first, n)| all[first * d..(first + n) * d].iter().copied())
            .collect(),
    };
    raw.truncate(total * d);
    let mut index = Vec::new();
    for key in &keys {
        let (t, _) = &partial.done[key];
        if t.no_thinking {
            rep.no_thinking.push(t.trace);
        } else if t.rows.is_empty() {
            rep.no_sentences.push(t.trace);
        }
        rep.uncovered += t.uncovered;
        index.extend(t.rows.iter().cloned());
    }
    rep.sentences = index.len();
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
        layer: settings.layer,
        model: settings.model.clone(),
    };
    acts.save(out)?;
    write_jsonl(&index_path(out), &index)?;
    partial.remove()?;
    Ok(rep)
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
    if layer >= config.num_hidden_layers {
        bail!(
            "--layer {layer}: expected a block index below {} ({}), found {layer}",
            config.num_hidden_layers,
            model_dir.display()
        );
    }
    let settings = ActsRun {
        model: crate::eval::cli::abs(model_dir),
        layer,
        d: config.hidden_size,
        device: if cuda { "cuda" } else { "cpu" }.to_string(),
        fingerprint: Some(crate::weights::checkpoint_fingerprint(model_dir)?),
    };
    let mut run = block_runner(model_dir, layer, cuda)?;
    write_activations(&tok, traces_path, &settings, out, &mut run)
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
