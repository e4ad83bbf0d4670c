//! Running an evaluation: the recorded configuration (`RunConfig`, OUT/config.json), the
//! append-only results file (one JSON line per (problem, mode), flushed as each finishes, a torn
//! last line repaired on reopen; lines awaiting the judge judged again in place), the prompts
//! of each mode (`PromptBuilder`, shared with the `hybrid` command) and the loop that decodes
//! the problems still missing, `--batch` at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::dataset::Problem;
use super::grade::{answer_part, grade, run_judge, GradeKind};
use super::judge::Judge;
use crate::bail;
use crate::chat::{plain_base_prompt, ChatTemplate, Message};
use crate::engine::Checkpoint;
use crate::error::{Error, Result};
use crate::generate::{generate_each, GenParams};
use crate::hybrid::ablations::Ablations;
use crate::hybrid::{self, Artifacts, Pair, Prompts, Settings, StepRecord};
use crate::sae::Sae;
use crate::steering::SteeringSet;
use crate::tokenizer::Tokenizer;

/// Which model answers: the base model on the plain prompt, the thinking model on its chat
/// template, or the base model steered by the thinking model.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    Base,
    Thinking,
    Hybrid,
}

impl EvalMode {
    pub fn name(self) -> &'static str {
        match self {
            EvalMode::Base => "base",
            EvalMode::Thinking => "thinking",
            EvalMode::Hybrid => "hybrid",
        }
    }
}

/// Everything that decides what a result line says. Stored in OUT/config.json; a rerun must
/// match it (sections absent on either side, e.g. `hybrid` of a base-only run, are merged).
/// Not part of it: which modes, offset/limit/shard, batch size, device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub dataset: DatasetConfig,
    pub max_new_tokens: usize,
    /// The external judge command, when one decides `correct`.
    pub judge_cmd: Option<String>,
    pub base: SideConfig,
    pub thinking: SideConfig,
    pub hybrid: Option<HybridConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetConfig {
    pub path: String,
    /// gsm8k, math500 or custom.
    pub kind: String,
    pub question_field: String,
    pub answer_field: String,
    /// gsm8k or math.
    pub grading: String,
}

/// One model and the prompt it is given, written out for the question `{question}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SideConfig {
    pub model: String,
    pub prompt: String,
    /// `weights::checkpoint_fingerprint` of the model, so that a checkpoint replaced under the
    /// same path is another configuration (absent in configurations written before it was
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The special-token ids the prompt's encoding adds before its text (Llama 3's bos before
    /// a plain prompt; none for a chat template). Absent in configurations written before plain
    /// prompts got them, whose results hold prompts without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_ids: Option<Vec<u32>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HybridConfig {
    pub sae: String,
    pub vectors: String,
    pub preset: Option<String>,
    /// exact, cached or persistent.
    pub mode: String,
    pub coefficients: Vec<f32>,
    pub windows: Vec<i64>,
    /// Absent when none is set (as in configurations written before they were recorded).
    #[serde(default, skip_serializing_if = "Ablations::is_none")]
    pub ablations: Ablations,
    /// `fnv1a` of the SAE and steering files' bytes, so that a file retrained in place is
    /// another configuration (absent in configurations written before they were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_hashes: Option<String>,
}

impl RunConfig {
    /// Reconciles with the configuration already in `out` (writing it when there is none).
    /// A difference is an input error naming the first differing field.
    pub fn reconcile(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let path = out.join("config.json");
        let mut merged = self.clone();
        if !path.exists() && !read_results(out)?.is_empty() {
            bail!(
                "{}: holds results but no config.json: expected the configuration they were made with, found none; use another --out",
                out.display()
            );
        }
        if path.exists() {
            let text = crate::files::read_text(&path)?;
            let old: RunConfig = serde_json::from_str(&text).map_err(|e| {
                Error::Input(format!(
                    "{}: expected a thinksteer eval configuration, found unreadable JSON ({e})",
                    path.display()
                ))
            })?;
            let mut mine = self.clone();
            match (&old.hybrid, &self.hybrid) {
                (Some(h), None) => {
                    mine.hybrid = Some(h.clone());
                    merged.hybrid = Some(h.clone());
                }
                (None, Some(_)) => mine.hybrid = None,
                _ => {}
            }
            let mut theirs = old.clone();
            if old.hybrid.is_none() {
                theirs.hybrid = None;
            }
            // Written before the files were hashed: their paths alone decide, as then.
            if let (Some(t), Some(m)) = (&theirs.hybrid, &mut mine.hybrid) {
                if t.file_hashes.is_none() {
                    m.file_hashes = None;
                }
            }
            for (side, t, m) in [
                ("base", &theirs.base, &mut mine.base),
                ("thinking", &theirs.thinking, &mut mine.thinking),
            ] {
                if t.fingerprint.is_none() {
                    m.fingerprint = None;
                }
                if t.added_ids.is_none() {
                    if let Some(ids) = m.added_ids.take().filter(|ids| !ids.is_empty()) {
                        bail!(
                            "{} holds results whose {side} prompts were encoded without special tokens (written before plain prompts got them); this tokenizer now adds {ids:?} before each: expected one encoding per folder, use another --out",
                            path.display()
                        );
                    }
                }
            }
            if let Some(field) = first_difference(&to_value(&theirs), &to_value(&mine), "") {
                bail!(
                    "{} holds results of a different configuration ({field}); expected the same configuration to resume, use another --out",
                    path.display()
                );
            }
            if merged == old {
                return Ok(());
            }
        }
        let text = serde_json::to_string_pretty(&merged).expect("config serialises") + "\n";
        crate::files::write_atomic(&path, text.as_bytes())
    }
}

/// Through the JSON text, so that f32 fields read as written (0.9, not 0.8999999761581421).
fn to_value(c: &RunConfig) -> serde_json::Value {
    let text = serde_json::to_string(c).expect("config serialises");
    serde_json::from_str(&text).expect("JSON just written parses")
}

/// The first path where two JSON values differ, as `a.b: X there, Y now`.
fn first_difference(old: &serde_json::Value, new: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value::Object;
    match (old, new) {
        (Object(a), Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                let null = serde_json::Value::Null;
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                first_difference(a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null), &path)
            })
        }
        (a, b) if a == b => None,
        (a, b) => Some(format!("{at}: {a} there, {b} now")),
    }
}

/// One (problem, mode) outcome: one line of a results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultLine {
    pub index: usize,
    pub mode: EvalMode,
    pub question: String,
    pub reference: String,
    /// The decoded new tokens, without the end-of-sequence token.
    pub response: String,
    pub extracted: Option<String>,
    /// The verdict: the judge's with --judge-cmd, else the rules'. None (`null`) while the line
    /// awaits the judge: its command failed, and a rerun of the same eval judges it again.
    pub correct: Option<bool>,
    /// Why the judge gave no verdict (one line), while `correct` is None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_error: Option<String>,
    /// Generated tokens, the end-of-sequence token included when one was emitted.
    pub tokens: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steered_fraction: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steered_tokens: Option<usize>,
    /// Of the steered steps, those whose token differs from the base model's own (absent in
    /// results written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_tokens: Option<usize>,
    /// Steered steps per category, [K].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category_counts: Option<Vec<usize>>,
    /// Steered steps per winning coefficient ("0.5" → count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coef_wins: Option<BTreeMap<String, usize>>,
    /// Steered steps per winning (coefficient, window) ("0.5,-15" → count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cw_wins: Option<BTreeMap<String, usize>>,
    /// Steps per category (the SAE's argmax at the step), steered or not, [K].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category_steps: Option<Vec<usize>>,
    /// Per category, its steered steps per winning (coefficient, window), [K] of "c,w" → count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category_cw_wins: Option<Vec<BTreeMap<String, usize>>>,
    /// Seconds from the start of its batch until this problem finished.
    pub seconds: f64,
    /// Which decode batch it was part of (the batch's wall time is its largest `seconds`).
    pub batch: String,
    /// The dataset row's short fields (MATH: subject, level, unique_id).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// "cpu" (f32) or "cuda" (bf16 weights and activations): a resumed or sharded run may mix
    /// them, and greedy answers can differ between the two (None: written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// The results file of this process: `results.jsonl`, or `results.shard-i-of-n.jsonl`.
pub fn results_name(shard: Option<(usize, usize)>) -> String {
    match shard {
        None => "results.jsonl".to_string(),
        Some((i, n)) => format!("results.shard-{i}-of-{n}.jsonl"),
    }
}

/// Every complete line of every `results*.jsonl` in `out`, in file-name then line order. A last
/// line without its newline (a writer killed mid-line, or one still writing) is not a result.
pub fn read_results(out: &Path) -> Result<Vec<ResultLine>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("results") && name.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    let mut lines = Vec::new();
    for path in files {
        for (i, line) in complete_lines(&path)?.iter().enumerate() {
            if !line.trim().is_empty() {
                lines.push(parse_line(&path, i, line)?);
            }
        }
    }
    Ok(lines)
}

/// The lines of a results file that end in a newline (a torn last line is left out).
fn complete_lines(path: &Path) -> Result<Vec<String>> {
    let text = crate::files::read_complete_lines(path)?;
    Ok(text.lines().map(str::to_string).collect())
}

/// Line `i` (from 0) of a results file.
fn parse_line(path: &Path, i: usize, line: &str) -> Result<ResultLine> {
    serde_json::from_str(line).map_err(|e| {
        Error::Input(format!(
            "{}:{}: expected a result line, found malformed JSON ({e})",
            path.display(),
            i + 1
        ))
    })
}

/// `line` (parsed as `r`) with another verdict. Only the text of the verdict is replaced, the
/// rest kept byte for byte: parsing and writing a float again can move its last digit, and the
/// answer's line must stay as generated. A line in another spelling (edited by hand) is written
/// whole.
fn with_verdict(
    line: &str,
    mut r: ResultLine,
    correct: Option<bool>,
    why: Option<String>,
) -> String {
    let text = |correct: Option<bool>, why: &Option<String>| {
        let mut t = format!("\"correct\":{}", serde_json::json!(correct));
        if let Some(w) = why {
            t += &format!(",\"judge_error\":{}", serde_json::json!(w));
        }
        t
    };
    let old = text(r.correct, &r.judge_error);
    let new = text(correct, &why);
    // Unique: the quotes of `"correct":null` would be escaped inside a string.
    if line.contains(&old) {
        return line.replacen(&old, &new, 1);
    }
    (r.correct, r.judge_error) = (correct, why);
    serde_json::to_string(&r).expect("result line serialises")
}

/// Judges again the lines of this process's results file that await the judge (it failed when
/// they were written): the answers are kept, only the verdict is decided; a failure leaves the
/// line waiting, with the new reason. Each is tried once, and failures in a row here do not
/// stop the run: these are the answers the judge failed on before, and a few it can never
/// judge would otherwise stop every rerun (a judge that is down fails the sample tried first).
/// The file is rewritten whole once, at the end (a kill meanwhile loses verdicts, never
/// answers), other lines keeping their bytes. Returns how many were decided.
fn rejudge(path: &Path, cmd: &str) -> Result<usize> {
    if !path.exists() {
        return Ok(0);
    }
    let mut lines = complete_lines(path)?;
    let (mut decided, mut changed) = (0, false);
    for (i, text) in lines.iter_mut().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let r = parse_line(path, i, text)?;
        if r.correct.is_some() {
            continue;
        }
        let (correct, why) =
            match run_judge(cmd, &r.question, &r.reference, answer_part(&r.response)) {
                Ok(v) => {
                    decided += 1;
                    (Some(v), None)
                }
                Err(e) => {
                    eprintln!(
                        "judge: problem {} ({}): {e}; still awaiting the judge",
                        r.index,
                        r.mode.name()
                    );
                    (None, Some(e.to_string()))
                }
            };
        let new = with_verdict(text, r, correct, why);
        changed |= new != *text;
        *text = new;
    }
    if changed {
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        crate::files::write_atomic(path, body)?;
    }
    Ok(decided)
}

/// The append-only results file: opening it cuts a torn last line; every line is written with
/// one `write_all` and flushed to disk before the next problem is reported done. After a failed
/// write (a full disk) it writes no more: a line appended after a torn one would be unreadable.
pub struct ResultsWriter {
    file: File,
    path: PathBuf,
    failed: bool,
}

impl ResultsWriter {
    pub fn open(out: &Path, shard: Option<(usize, usize)>) -> Result<ResultsWriter> {
        let path = out.join(results_name(shard));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        crate::files::cut_torn_line(&path)?;
        Ok(ResultsWriter {
            file,
            path,
            failed: false,
        })
    }

    pub fn append(&mut self, line: &ResultLine) -> Result<()> {
        if self.failed {
            bail!(
                "{}: problem {} ({}) not written: expected a whole file to append to, found an earlier write failed",
                self.path.display(),
                line.index,
                line.mode.name()
            );
        }
        let mut text = serde_json::to_string(line).expect("result line serialises");
        text.push('\n');
        let r = self
            .file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.sync_data());
        self.failed = r.is_err();
        r.map_err(|e| Error::io(&self.path, e))
    }
}

/// The prompts of each mode: the base model's plain prompt (or a `{question}` template), the
/// thinking model's chat template (or the plain prompt too).
pub struct PromptBuilder {
    pub base_tok: Tokenizer,
    pub think_tok: Tokenizer,
    template: Option<ChatTemplate>,
    base_prompt: Option<String>,
}

impl PromptBuilder {
    pub fn load(
        base: &Path,
        thinking: &Path,
        thinking_plain: bool,
        base_prompt: Option<String>,
    ) -> Result<PromptBuilder> {
        let tok = |dir: &Path| {
            Tokenizer::from_dir(dir)?.ok_or_else(|| {
                Error::Input(format!(
                    "{}: expected tokenizer.json in the model folder, found none",
                    dir.display()
                ))
            })
        };
        if let Some(t) = base_prompt.as_ref().filter(|t| !t.contains("{question}")) {
            bail!(
                "the base prompt: expected a template holding {{question}} (where the question goes), found {t:?}"
            );
        }
        let template = if thinking_plain {
            None
        } else {
            Some(ChatTemplate::from_dir(thinking)?.ok_or_else(|| {
                Error::Input(format!(
                    "{}: expected a chat template for the thinking model, found none; pass --thinking-plain to give it the plain prompt",
                    thinking.display()
                ))
            })?)
        };
        Ok(PromptBuilder {
            base_tok: tok(base)?,
            think_tok: tok(thinking)?,
            template,
            base_prompt,
        })
    }

    pub fn base_text(&self, question: &str) -> String {
        match &self.base_prompt {
            Some(t) => t.replace("{question}", question),
            None => plain_base_prompt(question),
        }
    }

    pub fn thinking_text(&self, question: &str) -> Result<String> {
        match &self.template {
            Some(t) => t.render(&[Message::user(question)], true),
            None => Ok(self.base_text(question)),
        }
    }

    /// The base model's prompt as ids: plain text, so with the tokenizer's own special tokens.
    pub fn base_ids(&self, question: &str) -> Result<Vec<u32>> {
        self.base_tok.encode_plain(&self.base_text(question))
    }

    /// The thinking model's prompt as ids: the chat template writes its special tokens itself;
    /// the plain prompt (`--thinking-plain`) gets the tokenizer's own.
    pub fn thinking_ids(&self, question: &str) -> Result<Vec<u32>> {
        let text = self.thinking_text(question)?;
        match &self.template {
            Some(_) => self.think_tok.encode(&text),
            None => self.think_tok.encode_plain(&text),
        }
    }

    /// The special-token ids each side's encoding adds before the prompt's text: (base,
    /// thinking).
    pub fn added_ids(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        let q = "{question}";
        let added = |with: Vec<u32>, without: Vec<u32>| {
            let n = with.len().saturating_sub(without.len());
            with[..n].to_vec()
        };
        let base = added(self.base_ids(q)?, self.base_tok.encode(&self.base_text(q))?);
        let text = self.thinking_text(q)?;
        let thinking = added(self.thinking_ids(q)?, self.think_tok.encode(&text)?);
        Ok((base, thinking))
    }

    /// Both prompts of one question as ids (the hybrid loop's input).
    pub fn hybrid(&self, question: &str) -> Result<Prompts> {
        Ok(Prompts {
            base: self.base_ids(question)?,
            thinking: self.thinking_ids(question)?,
        })
    }
}

/// What one `eval` invocation does; built by the CLI from flags and a preset.
pub struct EvalSpec {
    pub config: RunConfig,
    pub base: PathBuf,
    pub thinking: PathBuf,
    pub sae: Option<PathBuf>,
    pub vectors: Option<PathBuf>,
    pub thinking_plain: bool,
    pub base_prompt: Option<String>,
    /// Problems after offset/limit/shard.
    pub problems: Vec<Problem>,
    pub modes: Vec<EvalMode>,
    pub grade_kind: GradeKind,
    pub settings: Settings,
    /// The hybrid mode's ablations (`settings` holds the loop's side of them).
    pub ablations: Ablations,
    /// (L_t, K, L_b) the preset expects of the SAE and steering set, with the preset's name.
    pub expect: Option<(String, usize, usize, usize)>,
    pub batch: usize,
    pub shard: Option<(usize, usize)>,
    pub out: PathBuf,
    pub use_cuda: bool,
    pub progress: bool,
    /// Said on stderr once every check has passed (an error stays the only line).
    pub notes: Vec<String>,
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub written: usize,
    pub skipped: usize,
    /// Lines that awaited the judge and were decided now (judged again, not regenerated).
    pub rejudged: usize,
}

/// The device a result line records.
fn device_name(spec: &EvalSpec) -> &'static str {
    if spec.use_cuda {
        "cuda"
    } else {
        "cpu"
    }
}

/// Decodes every (problem, mode) pair not yet in `out` and appends its result line.
pub fn run_eval(spec: &EvalSpec) -> Result<Summary> {
    let prompts = PromptBuilder::load(
        &spec.base,
        &spec.thinking,
        spec.thinking_plain,
        spec.base_prompt.clone(),
    )?;
    let steer = if spec.modes.contains(&EvalMode::Hybrid) {
        Some(load_steering(spec, &prompts)?)
    } else {
        None
    };
    if let Some(cmd) = &spec.config.judge_cmd {
        crate::eval::judge::judge_timeout()?;
        // Tried once before any generation, so that a judge that cannot run loses no answers.
        run_judge(cmd, "What is 1 + 1?", "2", "1 + 1 = 2. The answer is 2.").map_err(|e| {
            Error::Input(format!(
                "--judge-cmd, tried on a sample before generating: {e}"
            ))
        })?;
    }
    // The checkpoints the modes need (configs against weight files) and every prompt against
    // them, before config.json or a results file is written: bad input leaves the folder as it
    // was, and a broken second model is found before the first mode runs.
    let needs = |m: &[EvalMode]| m.iter().any(|x| spec.modes.contains(x));
    let open = |yes: bool, dir: &Path| yes.then(|| Checkpoint::open(dir)).transpose();
    let mut base_ckpt = open(needs(&[EvalMode::Base, EvalMode::Hybrid]), &spec.base)?;
    let mut think_ckpt = open(
        needs(&[EvalMode::Thinking, EvalMode::Hybrid]),
        &spec.thinking,
    )?;
    check_prompts(spec, &prompts, steer.as_ref(), &base_ckpt, &think_ckpt)?;
    // The lock (which makes the folder) before config.json is touched: a run refused by it
    // changes nothing.
    let _lock = lock_shard(spec)?;
    spec.config.reconcile(&spec.out)?;
    let old = read_results(&spec.out)?;
    let questions: HashMap<usize, &str> = spec
        .problems
        .iter()
        .map(|p| (p.index, p.question.as_str()))
        .collect();
    if let Some(r) = old
        .iter()
        .find(|r| questions.get(&r.index).is_some_and(|q| *q != r.question))
    {
        bail!(
            "{}: the result for problem {} ({}) holds another question than the dataset's: expected results of {}, use another --out",
            spec.out.display(),
            r.index,
            r.mode.name(),
            spec.config.dataset.path
        );
    }
    let device = device_name(spec);
    if let Some(other) = old
        .iter()
        .filter_map(|r| r.device.as_deref())
        .find(|d| *d != device)
    {
        eprintln!(
            "note: {} holds results run on {other}, this run is on {device}: greedy answers can differ between the CPU (f32) and the GPU (bf16), and the report will say the devices are mixed",
            spec.out.display()
        );
    }
    spec.notes.iter().for_each(|n| eprintln!("{n}"));
    let done: HashSet<(usize, EvalMode)> = old.into_iter().map(|r| (r.index, r.mode)).collect();
    let mut summary = Summary::default();
    if let Some(cmd) = &spec.config.judge_cmd {
        // Before the writer opens the file: the rewrite replaces it. Other shards' files are
        // their processes' to rewrite.
        summary.rejudged = rejudge(&spec.out.join(results_name(spec.shard)), cmd)?;
    }
    let mut judge = spec.config.judge_cmd.as_deref().map(Judge::new);
    let mut writer = ResultsWriter::open(&spec.out, spec.shard)?;
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    for &mode in &spec.modes {
        let todo: Vec<&Problem> = spec
            .problems
            .iter()
            .filter(|p| !done.contains(&(p.index, mode)))
            .collect();
        summary.skipped += spec.problems.len() - todo.len();
        if todo.is_empty() {
            continue;
        }
        let mut progress = Progress::new(mode, todo.len(), spec.progress);
        let mut sink = Sink {
            spec,
            writer: &mut writer,
            progress: &mut progress,
            judge: judge.as_mut(),
            written: 0,
        };
        // Opened above for every mode; the f32 CPU weights only if a CPU run asks for them.
        let opened = "opened for the modes that need it";
        match mode {
            EvalMode::Base => {
                let m = base_ckpt.as_mut().expect(opened);
                let ids = todo
                    .iter()
                    .map(|p| prompts.base_ids(&p.question))
                    .collect::<Result<Vec<_>>>()?;
                run_plain(
                    spec,
                    m,
                    &prompts.base_tok,
                    &todo,
                    &ids,
                    mode,
                    run_id,
                    &mut sink,
                )?;
            }
            EvalMode::Thinking => {
                let m = think_ckpt.as_mut().expect(opened);
                let ids = todo
                    .iter()
                    .map(|p| prompts.thinking_ids(&p.question))
                    .collect::<Result<Vec<_>>>()?;
                run_plain(
                    spec,
                    m,
                    &prompts.think_tok,
                    &todo,
                    &ids,
                    mode,
                    run_id,
                    &mut sink,
                )?;
            }
            EvalMode::Hybrid => {
                let (b, t) = (base_ckpt.as_mut(), think_ckpt.as_mut());
                let (b, t) = (b.expect(opened), t.expect(opened));
                let (sae, steering) = steer.as_ref().expect("loaded when hybrid is a mode");
                run_hybrid(
                    spec,
                    b,
                    t,
                    &prompts,
                    (sae, steering),
                    &todo,
                    run_id,
                    &mut sink,
                )?;
            }
        }
        summary.written += sink.written;
        progress.finish();
    }
    Ok(summary)
}

/// Every prompt of the selection against the models of its modes (context, vocabulary) and,
/// in hybrid mode, the SAE and steering set against both models.
fn check_prompts(
    spec: &EvalSpec,
    prompts: &PromptBuilder,
    steer: Option<&(Sae, SteeringSet)>,
    base: &Option<Checkpoint>,
    thinking: &Option<Checkpoint>,
) -> Result<()> {
    let problems = &spec.problems;
    let plain = |mode: EvalMode, ckpt: &Checkpoint, ids: &dyn Fn(&str) -> Result<Vec<u32>>| {
        let context = ckpt.config.max_position_embeddings;
        for p in problems {
            let n = ids(&p.question)?.len();
            if n >= context {
                bail!(
                    "problem {}: the {} prompt has {n} tokens, expected fewer than the model's context of {context} (max_position_embeddings)",
                    p.index,
                    mode.name()
                );
            }
        }
        Ok(())
    };
    for &mode in &spec.modes {
        match (mode, base, thinking) {
            (EvalMode::Base, Some(b), _) => plain(mode, b, &|q| prompts.base_ids(q))?,
            (EvalMode::Thinking, _, Some(t)) => plain(mode, t, &|q| prompts.thinking_ids(q))?,
            (EvalMode::Hybrid, Some(b), Some(t)) => {
                let (sae, steering) = steer.expect("loaded when hybrid is a mode");
                Artifacts { sae, steering }.validate_for(&b.config, &t.config)?;
                let all = problems
                    .iter()
                    .map(|p| prompts.hybrid(&p.question))
                    .collect::<Result<Vec<_>>>()?;
                hybrid::check_prompts(&b.config, &t.config, &all, |i| problems[i].index)?;
            }
            _ => unreachable!("the checkpoints of every mode are opened"),
        }
    }
    Ok(())
}

/// The lock of this process's results file: a second eval on the same folder and shard is
/// refused while one runs (shards run side by side).
fn lock_shard(spec: &EvalSpec) -> Result<std::fs::File> {
    crate::files::lock_output(&spec.out.join(results_name(spec.shard)), "--out")
}

/// The SAE and steering set of the hybrid mode, checked against each other, the tokenizers
/// and the preset before anything is decoded.
fn load_steering(spec: &EvalSpec, prompts: &PromptBuilder) -> Result<(Sae, SteeringSet)> {
    let (Some(sae_path), Some(vec_path)) = (&spec.sae, &spec.vectors) else {
        bail!("--modes hybrid: expected --sae FILE and --vectors FILE, found them missing");
    };
    prompts.base_tok.check_same_ids(&prompts.think_tok)?;
    let sae = Sae::load(sae_path)?;
    let steering = spec.ablations.load_steering(vec_path)?;
    if let Some((name, lt, k, lb)) = &spec.expect {
        let found = (sae.layer, sae.latents, steering.layer);
        if found != (*lt, *k, *lb) {
            bail!(
                "--preset {name}: expected an SAE at thinking layer {lt} with {k} latents and vectors at base layer {lb}, found SAE layer {} with {} latents and vectors at layer {}",
                found.0, found.1, found.2
            );
        }
    }
    Ok((sae, steering))
}

/// Grades and writes finished problems, and reports progress.
struct Sink<'a> {
    spec: &'a EvalSpec,
    writer: &'a mut ResultsWriter,
    progress: &'a mut Progress,
    /// The external judge, with --judge-cmd.
    judge: Option<&'a mut Judge>,
    written: usize,
}

impl Sink<'_> {
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        p: &Problem,
        mode: EvalMode,
        response: String,
        tokens: usize,
        steps: Option<(&[StepRecord], usize)>,
        seconds: f64,
        batch: String,
    ) -> Result<()> {
        let g = grade(self.spec.grade_kind, &p.answer, &response);
        let (correct, judge_error) = self.verdict(p, mode, &response, g.correct);
        let (mut sf, mut st, mut cc, mut wins, mut cw) = (None, None, None, None, None);
        let (mut argmax, mut cat_cw, mut ch) = (None, None, None);
        if let Some((steps, k)) = steps {
            let steered = steps.iter().filter(|s| s.steered).count();
            sf = Some(steered as f64 / steps.len().max(1) as f64);
            st = Some(steered);
            ch = Some(steps.iter().filter(|s| s.changed).count());
            let (mut counts, mut all) = (vec![0; k], vec![0; k]);
            let mut per_cat = vec![BTreeMap::new(); k];
            let (mut w, mut both) = (BTreeMap::new(), BTreeMap::new());
            for s in steps {
                all[s.category] += 1;
                if !s.steered {
                    continue;
                }
                counts[s.category] += 1;
                if let Some(c) = s.coef {
                    *w.entry(format!("{c}")).or_insert(0) += 1;
                    let key = format!("{c},{}", s.window.unwrap_or(-1));
                    *both.entry(key.clone()).or_insert(0) += 1;
                    *per_cat[s.category].entry(key).or_insert(0) += 1;
                }
            }
            cc = Some(counts);
            wins = Some(w);
            cw = Some(both);
            argmax = Some(all);
            cat_cw = Some(per_cat);
        }
        let line = ResultLine {
            index: p.index,
            mode,
            question: p.question.clone(),
            reference: p.answer.clone(),
            response,
            extracted: g.extracted,
            correct,
            judge_error,
            tokens,
            steered_fraction: sf,
            steered_tokens: st,
            changed_tokens: ch,
            category_counts: cc,
            coef_wins: wins,
            cw_wins: cw,
            category_steps: argmax,
            category_cw_wins: cat_cw,
            seconds,
            batch,
            meta: short_meta(&p.meta),
            device: Some(device_name(self.spec).to_string()),
        };
        self.writer.append(&line)?;
        self.written += 1;
        self.progress.add(tokens);
        // After the line is written: a judge that is down stops the run, losing no answer.
        match self.judge.as_ref().and_then(|j| j.down_error()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// (correct, why the judge gave none): the judge's verdict with --judge-cmd, else the
    /// rules'. A failing judge leaves the line awaiting it, said once on stderr.
    fn verdict(
        &mut self,
        p: &Problem,
        mode: EvalMode,
        response: &str,
        by_rules: bool,
    ) -> (Option<bool>, Option<String>) {
        let Some(judge) = self.judge.as_deref_mut() else {
            return (Some(by_rules), None);
        };
        // Once it is down the run stops (said by its error), so nothing more is said per line.
        let was_down = judge.is_down();
        match judge.verdict(&p.question, &p.answer, answer_part(response)) {
            Ok(v) => (Some(v), None),
            Err(e) => {
                if !was_down {
                    self.progress.say(&format!(
                        "judge: problem {} ({}): {e}; its answer is kept, awaiting the judge",
                        p.index,
                        mode.name()
                    ));
                }
                (None, Some(e))
            }
        }
    }
}

/// The dataset fields worth keeping in every line (subject, level, ids), not long solutions.
fn short_meta(
    meta: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    meta.iter()
        .filter(|(_, v)| match v {
            serde_json::Value::String(s) => s.len() <= 200,
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => true,
            _ => false,
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Base or thinking mode: batched greedy generation, one engine reused for every batch.
#[allow(clippy::too_many_arguments)]
fn run_plain(
    spec: &EvalSpec,
    ckpt: &mut Checkpoint,
    tok: &Tokenizer,
    todo: &[&Problem],
    ids: &[Vec<u32>],
    mode: EvalMode,
    run_id: u128,
    sink: &mut Sink,
) -> Result<()> {
    // Every prompt fits the context (`check_prompts`).
    let max_prompt = ids.iter().map(Vec::len).max().unwrap_or(0);
    let ctx = ckpt
        .config
        .max_position_embeddings
        .min(max_prompt + spec.config.max_new_tokens);
    let slots = spec.batch.min(todo.len());
    let mut engine = ckpt.decoder(slots, ctx, spec.use_cuda)?;
    let params = GenParams::greedy(
        spec.config.max_new_tokens,
        ckpt.config.eos_token_ids.clone(),
    );
    // Every problem in one call: `slots` decode together, a finished problem's slot takes the
    // next one, and its line is written the moment it stops.
    let start = Instant::now();
    let batch = format!(
        "{run_id}-{}-{}",
        mode.name(),
        todo.first().map_or(0, |p| p.index)
    );
    generate_each(
        engine.as_mut(),
        None,
        ids,
        &params,
        |_, _| {},
        |i, g| {
            let text = decode_text(tok, &g.ids, &params.eos_ids)?;
            let seconds = start.elapsed().as_secs_f64();
            sink.finish(
                todo[i],
                mode,
                text,
                g.ids.len(),
                None,
                seconds,
                batch.clone(),
            )
        },
    )?;
    Ok(())
}

/// The text of generated ids without the end-of-sequence ids. Ids of the model's padded
/// vocabulary that the tokenizer does not know (V = 320 but 311 tokens in the fixtures; real
/// checkpoints pad too) have no text and are left out rather than failing the whole run.
fn decode_text(tok: &Tokenizer, ids: &[u32], eos: &[u32]) -> Result<String> {
    let body: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|t| !eos.contains(t) && tok.id_to_token(*t).is_some())
        .collect();
    tok.decode(&body)
}

/// Hybrid mode: `hybrid::run` per batch; a problem's line is written as soon as it stops.
#[allow(clippy::too_many_arguments)]
fn run_hybrid(
    spec: &EvalSpec,
    base: &mut Checkpoint,
    thinking: &mut Checkpoint,
    prompts: &PromptBuilder,
    steer: (&Sae, &SteeringSet),
    todo: &[&Problem],
    run_id: u128,
    sink: &mut Sink,
) -> Result<()> {
    let (sae, steering) = steer;
    let art = Artifacts { sae, steering };
    let eos = &base.config.eos_token_ids.clone();
    let max = spec.settings.max_new_tokens;
    let all = todo
        .iter()
        .map(|p| prompts.hybrid(&p.question))
        .collect::<Result<Vec<_>>>()?;
    // The GPU step, when asked for and the settings allow it; sized once for every chunk.
    let mut gpu = if spec.use_cuda && spec.settings.mode != hybrid::Mode::Exact {
        let longest = |f: fn(&hybrid::Prompts) -> usize| all.iter().map(f).max().unwrap_or(1);
        let ctx_b = base
            .config
            .max_position_embeddings
            .min(longest(|p| p.base.len()) + max + 1);
        let ctx_t = thinking
            .config
            .max_position_embeddings
            .min(longest(|p| p.thinking.len()) + max + 1);
        let batch = spec.batch.max(1).min(todo.len().max(1));
        Some(crate::cuda::hybrid::GpuHybrid::load(
            &spec.base,
            &spec.thinking,
            sae,
            steering,
            &spec.settings,
            batch,
            ctx_b,
            ctx_t,
        )?)
    } else {
        None
    };
    // Every problem in one call: `batch` decode together and a finished problem's slot takes
    // the next one; a problem's line is written the moment it stops.
    let batch = format!("{run_id}-hybrid-{}", todo.first().map_or(0, |p| p.index));
    let start = Instant::now();
    let emit = |i: usize, out: &hybrid::Output| -> Result<()> {
        let text = decode_text(&prompts.base_tok, &out.ids, eos)?;
        let secs = start.elapsed().as_secs_f64();
        sink.finish(
            todo[i],
            EvalMode::Hybrid,
            text,
            out.ids.len(),
            Some((&out.steps, sae.latents)),
            secs,
            batch.clone(),
        )
    };
    // A failure (a judge that went down, a full disk) ends the loop at once: the lines written
    // stay, the problems still decoding are decoded again by the next run.
    hybrid::hand_over_as_they_finish(
        todo.len(),
        eos,
        max,
        |on_step| match gpu.as_mut() {
            Some(h) => h.run(art, &all, &spec.settings, on_step),
            None => {
                let (base, thinking) = (&base.cpu_model()?, &thinking.cpu_model()?);
                let pair = Pair {
                    base,
                    thinking,
                    sae,
                    steering,
                };
                hybrid::run(&pair, &all, &spec.settings, on_step)
            }
        },
        emit,
    )
}

/// A one-line progress report on stderr: problems done, tokens, tok/s and ETA.
struct Progress {
    mode: EvalMode,
    total: usize,
    done: usize,
    tokens: usize,
    start: Instant,
    on: bool,
}

impl Progress {
    fn new(mode: EvalMode, total: usize, on: bool) -> Progress {
        Progress {
            mode,
            total,
            done: 0,
            tokens: 0,
            start: Instant::now(),
            on,
        }
    }

    fn add(&mut self, tokens: usize) {
        self.done += 1;
        self.tokens += tokens;
        if !self.on {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let eta = secs / self.done as f64 * (self.total - self.done) as f64;
        let width = 24;
        let filled = width * self.done / self.total.max(1);
        let line = format!(
            "[{}] [{}{}] {}/{} problems, {} tokens, {:.1} tok/s, ETA {}",
            self.mode.name(),
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.done,
            self.total,
            self.tokens,
            self.tokens as f64 / secs,
            clock(eta)
        );
        // A terminal gets one line redrawn in place; a log file (Slurm) one line per problem.
        if std::io::stderr().is_terminal() {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.on && self.done > 0 && std::io::stderr().is_terminal() {
            eprintln!();
        }
    }

    /// A line on stderr, below the progress line a terminal redraws in place.
    fn say(&self, line: &str) {
        self.finish();
        eprintln!("{line}");
    }
}

fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_the_field() {
        let a = serde_json::json!({"x": {"y": 1, "z": 2}});
        let b = serde_json::json!({"x": {"y": 1, "z": 3}});
        assert_eq!(first_difference(&a, &b, "").unwrap(), "x.z: 2 there, 3 now");
        assert!(first_difference(&a, &a, "").is_none());
    }

    #[test]
    fn torn_line_is_cut_on_open() {
        let dir = std::env::temp_dir().join(format!("thinksteer-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("results.jsonl"), "{\"a\":1}\n{\"ind").unwrap();
        let _w = ResultsWriter::open(&dir, None).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("results.jsonl")).unwrap(),
            "{\"a\":1}\n"
        );
        assert_eq!(clock(3725.0), "1:02:05");
    }
}
