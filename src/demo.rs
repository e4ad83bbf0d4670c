//! `thinksteer demo`: the whole pipeline of hybrid.md on one small model, sized for a CPU —
//! traces for a handful of GSM8K questions, sentence activations, a small SAE, categories,
//! mean-diff vectors, an evaluation of base / thinking / hybrid on the first few GSM8K problems
//! (the same model as base with the plain prompt and as thinking with its chat template) and
//! the report. Every step calls the library code its own subcommand uses.
//!
//! Resuming: OUT/demo-state.json records the settings and each finished step (its artifacts,
//! what it found, its wall time). A rerun skips a finished step whose artifacts are all still
//! there; once a step runs again, every later step runs again on the new inputs. Traces and
//! the evaluation also resume inside the step (they append one line per finished item).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use crate::eval::cli::{abs, resolve_dataset, EvalArgs, EvalDevice};
use crate::eval::dataset::{load_dataset, DatasetKind};
use crate::eval::report::{load_report, write_report, Report};
use crate::eval::run::{run_eval, EvalMode};
use crate::hybrid::Mode;
use crate::taxonomy::activations::{compute_activations, index_path, Acts};
use crate::taxonomy::annotate::{annotate, read_annotations};
use crate::taxonomy::sizes::train_sizes;
use crate::taxonomy::traces::{write_traces, TraceSettings, Written};
use crate::taxonomy::vectors::{mean_diff, BasePrefix};
use crate::train_sae::TrainConfig;

/// The sentence every summary ends with.
pub const NOT_THE_PAPER: &str = "One small model playing both base and thinking demonstrates the mechanics of the pipeline, not the paper's gains: with the same model in both roles there is no real base-to-thinking gap for the hybrid to recover.";

/// The steps in order: (name, what is being done, for the progress line).
pub const STEPS: [(&str, &str); 7] = [
    ("traces", "generating thinking-model traces"),
    ("activations", "computing sentence activations"),
    ("sae", "training the SAE"),
    ("categories", "annotating sentences with categories"),
    ("vectors", "computing mean-diff steering vectors"),
    ("eval", "evaluating base, thinking and hybrid"),
    ("report", "writing the evaluation report"),
];

/// Run settings of the demo. The defaults are sized so that the whole demo fits in 10 minutes
/// on two CPU cores with SmolLM2-135M (f32 CPU backend).
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Output folder of every artifact (rerunning with it resumes).
    pub out: PathBuf,
    /// GSM8K-format JSONL (`question`, `answer` ending in `#### N`); None: the shared GSM8K
    /// test set (`resolve_dataset("gsm8k")`).
    pub dataset: Option<PathBuf>,
    /// Traces are generated for the last `questions` rows of the dataset, so that they do not
    /// overlap the evaluated problems (the first rows) while the two fit its rows (a note says
    /// when they do not).
    pub questions: usize,
    /// The first `problems` rows are evaluated in each mode.
    pub problems: usize,
    /// New tokens per trace and per answer.
    pub max_new_tokens: usize,
    /// Block of the SAE (thinking side) and of the steering vectors (base side); None: the
    /// middle block.
    pub layer: Option<usize>,
    /// SAE dictionary size K (one category per latent).
    pub latents: usize,
    /// Top-k of the SAE.
    pub k: usize,
    /// Steering coefficients tried on a steered step (fewer than the paper's ten, for time).
    pub coefficients: Vec<f32>,
    /// Seed of the SAE's split, initialisation and batch order.
    pub seed: u64,
    pub device: EvalDevice,
}

/// Defaults shared with the CLI flags.
pub const DEFAULT_OUT: &str = "runs/demo";
pub const DEFAULT_QUESTIONS: usize = 8;
pub const DEFAULT_PROBLEMS: usize = 5;
/// Sized from SmolLM2-135M's shape on two busy cores (f32, random weights, `thinksteer bench`):
/// prefill ~12 ms/token, a decode step ~70 ms at batch 5 and ~110 ms at batch 8. At 256 tokens
/// that is ~40 s of traces, ~20 s each for activations and vectors, ~25 s each for base and
/// thinking and at most ~75 s for the hybrid (two models plus candidate rows per step):
/// about 3.5 minutes, a safety factor of ~3 against the 10-minute budget.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;
pub const DEFAULT_LATENTS: usize = 6;

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            out: PathBuf::from(DEFAULT_OUT),
            dataset: None,
            questions: DEFAULT_QUESTIONS,
            problems: DEFAULT_PROBLEMS,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            layer: None,
            latents: DEFAULT_LATENTS,
            k: 3,
            coefficients: vec![0.25, 0.5, 0.75, 1.0],
            seed: 0,
            device: EvalDevice::Auto,
        }
    }
}

/// What one step produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepSummary {
    /// 1-based.
    pub step: usize,
    pub name: String,
    pub artifacts: Vec<PathBuf>,
    /// One line per finding (counts, FVU, accuracies, …).
    pub facts: Vec<String>,
    /// Wall time of the run that completed the step.
    pub seconds: f64,
    /// Skipped in this run because an earlier run completed it.
    #[serde(skip)]
    pub resumed: bool,
}

#[derive(Clone, Debug)]
pub struct DemoSummary {
    pub out: PathBuf,
    pub steps: Vec<StepSummary>,
    /// The evaluation report (accuracies with Wilson intervals, steered fractions).
    pub report: Report,
    /// Wall time of this run.
    pub seconds: f64,
}

impl DemoSummary {
    /// The summary printed at the end (also written to OUT/summary.md).
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# thinksteer demo: summary\n");
        let _ = writeln!(s, "Output folder: {}\n", self.out.display());
        for st in &self.steps {
            let when = if st.resumed {
                format!("{:.1} s, in an earlier run; skipped now", st.seconds)
            } else {
                format!("{:.1} s", st.seconds)
            };
            let _ = writeln!(s, "[{}/{}] {} ({when})", st.step, STEPS.len(), st.name);
            for f in &st.facts {
                let _ = writeln!(s, "  - {f}");
            }
            let files: Vec<String> = st
                .artifacts
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let _ = writeln!(s, "  - files: {}", files.join(", "));
        }
        let total: f64 = self.steps.iter().map(|st| st.seconds).sum();
        let _ = writeln!(
            s,
            "\nWall time: {:.1} s this run; {:.1} s over all steps.",
            self.seconds, total
        );
        let _ = writeln!(s, "\n{NOT_THE_PAPER}");
        s
    }
}

/// Everything recorded in OUT/demo-state.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    settings: serde_json::Value,
    steps: Vec<StepSummary>,
}

const STATE_FILE: &str = "demo-state.json";

/// Paths of every artifact, relative to nothing: all under `out`.
struct Paths {
    traces: PathBuf,
    acts: PathBuf,
    sae_dir: PathBuf,
    sae: PathBuf,
    categories: PathBuf,
    annotations: PathBuf,
    vectors: PathBuf,
    eval: PathBuf,
}

impl Paths {
    fn new(out: &Path, latents: usize) -> Paths {
        let sae_dir = out.join("sae");
        let categories = out.join("categories");
        Paths {
            traces: out.join("traces.jsonl"),
            acts: out.join("acts.safetensors"),
            sae: sae_dir.join(format!("sae-{latents}.safetensors")),
            sae_dir,
            annotations: categories.join("annotations.jsonl"),
            categories,
            vectors: out.join("vectors.safetensors"),
            eval: out.join("eval"),
        }
    }
}

/// The checked inputs every step reads.
struct Ctx<'a> {
    model: &'a Path,
    o: &'a DemoOptions,
    dataset: PathBuf,
    layer: usize,
    p: Paths,
}

/// Runs (or resumes) the demo on the checkpoint folder `model_dir`, which plays both the base
/// and the thinking model. Progress goes to stderr; the caller prints `render()`.
pub fn run(model_dir: &Path, o: &DemoOptions) -> Result<DemoSummary> {
    let start = Instant::now();
    if o.questions == 0 || o.problems == 0 || o.max_new_tokens == 0 {
        return Err(anyhow!(
            "--questions, --problems and --max-new-tokens must be at least 1, found {}, {} and {}",
            o.questions,
            o.problems,
            o.max_new_tokens
        ));
    }
    if o.k == 0 || o.k > o.latents {
        return Err(anyhow!(
            "SAE top-k {} with {} latents: expected 1 <= k <= latents",
            o.k,
            o.latents
        ));
    }
    let config = crate::config::Config::from_file(&model_dir.join("config.json"))?;
    let layers = config.num_hidden_layers;
    let layer = o.layer.unwrap_or(layers / 2);
    if layer >= layers {
        return Err(anyhow!(
            "--layer {layer}: expected a block below num_hidden_layers {layers} of {}",
            model_dir.display()
        ));
    }
    let dataset = match &o.dataset {
        Some(p) => p.clone(),
        None => resolve_dataset("gsm8k")?.0,
    };
    // The device, the dataset and the output folder before the first step: each would
    // otherwise be refused only after the steps before it ran.
    o.device.use_cuda_for(&[model_dir])?;
    let rows = load_dataset(&dataset, DatasetKind::Gsm8k, None, None, 0, None)?.len();
    for (flag, n) in [("--questions", o.questions), ("--problems", o.problems)] {
        if n > rows {
            return Err(anyhow!(
                "{flag} {n}: expected at most the {rows} rows of {}",
                dataset.display()
            ));
        }
    }
    if o.questions + o.problems > rows {
        eprintln!(
            "note: --questions {} and --problems {} overlap in the {rows} rows of {}: the SAE and vectors are made from traces of {} of the evaluated problems",
            o.questions,
            o.problems,
            dataset.display(),
            o.questions + o.problems - rows
        );
    }
    if o.out.exists() && !o.out.is_dir() {
        return Err(anyhow!(
            "--out {}: expected a folder, found a file",
            o.out.display()
        ));
    }
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let cx = Ctx {
        model: model_dir,
        o,
        dataset,
        layer,
        p: Paths::new(&o.out, o.latents),
    };
    let settings = serde_json::json!({
        "model": abs(model_dir),
        "dataset": abs(&cx.dataset),
        "questions": o.questions,
        "problems": o.problems,
        "max_new_tokens": o.max_new_tokens,
        "layer": layer,
        "latents": o.latents,
        "k": o.k,
        "coefficients": o.coefficients,
        "seed": o.seed,
    });
    let state_path = o.out.join(STATE_FILE);
    let mut done = load_state(&state_path, &settings)?;
    let mut steps: Vec<StepSummary> = Vec::new();
    // Once a step runs, every later step must run on its new output.
    let mut upstream_ran = false;
    for (i, (name, doing)) in STEPS.iter().enumerate() {
        let n = i + 1;
        let tag = format!("[{n}/{}]", STEPS.len());
        let prior = done.iter().find(|s| s.step == n).cloned();
        if let Some(mut prev) = prior.filter(|p| !upstream_ran && complete(p)) {
            eprintln!("{tag} {name}: complete from an earlier run, skipped");
            prev.resumed = true;
            steps.push(prev);
            continue;
        }
        eprintln!("{tag} {doing} …");
        let t0 = Instant::now();
        let (artifacts, facts) = match n {
            1 => step_traces(&cx)?,
            2 => step_activations(&cx)?,
            3 => step_sae(&cx)?,
            4 => step_categories(&cx)?,
            5 => step_vectors(&cx)?,
            6 => step_eval(&cx, upstream_ran)?,
            _ => step_report(&cx)?,
        };
        let seconds = t0.elapsed().as_secs_f64();
        eprintln!("{tag} {name}: done in {seconds:.1} s");
        upstream_ran = true;
        let st = StepSummary {
            step: n,
            name: name.to_string(),
            artifacts,
            facts,
            seconds,
            resumed: false,
        };
        done.retain(|s| s.step < n);
        done.push(st.clone());
        save_state(&state_path, &settings, &done)?;
        steps.push(st);
    }
    let summary = DemoSummary {
        out: o.out.clone(),
        steps,
        report: load_report(&cx.p.eval)?,
        seconds: start.elapsed().as_secs_f64(),
    };
    let md = o.out.join("summary.md");
    crate::files::write_atomic(&md, summary.render().as_bytes())?;
    Ok(summary)
}

/// A finished step is complete while every artifact it wrote is still there.
fn complete(s: &StepSummary) -> bool {
    s.artifacts.iter().all(|p| p.exists())
}

/// The finished steps recorded in `path` (none when it does not exist). A folder holding a
/// demo of other settings is an error: its artifacts would not match these settings.
fn load_state(path: &Path, settings: &serde_json::Value) -> Result<Vec<StepSummary>> {
    if !path.exists() {
        save_state(path, settings, &[])?;
        return Ok(vec![]);
    }
    let text = crate::files::read_text(path)?;
    let state: State = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}: expected the demo's state {{\"settings\", \"steps\"}}, found unreadable JSON ({e}); remove it to start over",
            path.display()
        )
    })?;
    if let (Some(old), Some(new)) = (state.settings.as_object(), settings.as_object()) {
        let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for k in keys {
            let (a, b) = (old.get(k), new.get(k));
            if a != b {
                let show =
                    |v: Option<&serde_json::Value>| v.map_or("nothing".into(), |v| v.to_string());
                return Err(anyhow!(
                    "{} holds a demo with other settings ({k}: {} there, {} now); expected the same settings to resume, use another --out or remove the folder",
                    path.parent().unwrap_or(Path::new(".")).display(),
                    show(a),
                    show(b)
                ));
            }
        }
    }
    // Artifacts are recorded relative to the folder, so that a copied or moved folder checks
    // its own files (a state written with paths as typed names files that no longer match,
    // and those steps run again).
    let out = path.parent().unwrap_or(Path::new("."));
    let mut steps = state.steps;
    for s in &mut steps {
        s.artifacts = s.artifacts.iter().map(|a| out.join(a)).collect();
    }
    Ok(steps)
}

/// Writes the state through a temporary file and a rename, so a kill never leaves half of it.
fn save_state(path: &Path, settings: &serde_json::Value, steps: &[StepSummary]) -> Result<()> {
    let out = path.parent().unwrap_or(Path::new("."));
    let mut steps = steps.to_vec();
    for s in &mut steps {
        let inside = |a: &PathBuf| a.strip_prefix(out).unwrap_or(a).to_path_buf();
        s.artifacts = s.artifacts.iter().map(inside).collect();
    }
    let state = State {
        settings: settings.clone(),
        steps,
    };
    let text = serde_json::to_string_pretty(&state)? + "\n";
    Ok(crate::files::write_atomic(path, text.as_bytes())?)
}

type StepOut = (Vec<PathBuf>, Vec<String>);

fn step_traces(cx: &Ctx) -> Result<StepOut> {
    let o = cx.o;
    let all = load_dataset(&cx.dataset, DatasetKind::Gsm8k, None, None, 0, None)?;
    let from = all.len().saturating_sub(o.questions);
    let qs: Vec<String> = all[from..].iter().map(|p| p.question.clone()).collect();
    let s = TraceSettings {
        max_new_tokens: o.max_new_tokens,
        batch: qs.len(),
        cuda: o.device.use_cuda_for(&[cx.model])?,
        whole_answer: true,
    };
    let total = qs.len();
    let mut finished = 0;
    let Written {
        written,
        skipped,
        spans,
    } = write_traces(cx.model, &qs, &cx.p.traces, &s, |t| {
        finished += 1;
        eprintln!(
            "  trace {finished} finished (GSM8K row {}): {} bytes",
            from + t.index,
            t.text.len()
        );
    })?;
    let (own, filled) = spans.expect("asked with whole_answer");
    let mut facts = vec![format!(
        "{total} traces of GSM8K rows {from}..{} (the last rows, apart from the evaluated first ones), chat template, greedy, up to {} new tokens ({written} generated now, {skipped} present)",
        all.len(),
        o.max_new_tokens
    )];
    facts.push(if filled == 0 {
        format!("{own} traces with a thinking span written by the model")
    } else {
        format!(
            "{own} traces with a <think> span from the model; in the other {filled} the model wrote none, so the whole answer counts as its reasoning"
        )
    });
    Ok((vec![cx.p.traces.clone()], facts))
}

fn step_activations(cx: &Ctx) -> Result<StepOut> {
    let cuda = cx.o.device.use_cuda_for(&[cx.model])?;
    let rep = compute_activations(cx.model, &cx.p.traces, cx.layer, &cx.p.acts, cuda)?;
    let acts = Acts::load(&cx.p.acts)?;
    let facts = vec![format!(
        "{} sentences × D = {} (mean of block {}'s output over each sentence, centred, unit norm) from {} traces ({} without a thinking span, {} without a sentence of 3+ words)",
        acts.n,
        acts.d,
        cx.layer,
        rep.traces,
        rep.no_thinking.len(),
        rep.no_sentences.len()
    )];
    Ok((vec![cx.p.acts.clone(), index_path(&cx.p.acts)], facts))
}

fn step_sae(cx: &Ctx) -> Result<StepOut> {
    let o = cx.o;
    let cfg = TrainConfig {
        k: o.k,
        seed: o.seed,
        ..Default::default()
    };
    let rs = train_sizes(
        &cx.p.acts,
        &[o.latents],
        &cfg,
        &cx.p.sae_dir,
        |_, e, tr, va| {
            if e % 25 == 0 {
                eprintln!(
                    "  epoch {}: train FVU {tr:.4}, validation FVU {va:.4}",
                    e + 1
                );
            }
        },
    )?;
    let r = rs
        .first()
        .ok_or_else(|| anyhow!("SAE training returned no result"))?;
    let rep = &r.report;
    let train_fvu = rep
        .train_fvu
        .get(rep.best_epoch)
        .copied()
        .unwrap_or(f32::NAN);
    let facts = vec![format!(
        "K = {} latents, top-k {}: validation FVU {:.4}, train FVU {:.4} (best epoch {} of {}; {} rows trained on, {} held out)",
        o.latents,
        o.k,
        rep.final_val_fvu,
        train_fvu,
        rep.best_epoch + 1,
        rep.val_fvu.len(),
        rep.n_train,
        rep.n_val
    )];
    Ok((vec![r.path.clone(), cx.p.sae_dir.join("fvu.md")], facts))
}

/// Shortened to `n` characters on one line.
fn clip(s: &str, n: usize) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() <= n {
        return one;
    }
    one.chars().take(n).collect::<String>() + "…"
}

fn step_categories(cx: &Ctx) -> Result<StepOut> {
    // No titles file: with no judge to name them, categories are numbered, and each is shown
    // here by its most activating sentence (the report lists the top 20).
    let counts = annotate(
        &cx.p.sae,
        &cx.p.acts,
        &index_path(&cx.p.acts),
        None,
        &cx.p.categories,
    )?;
    let rows = read_annotations(&cx.p.annotations)?;
    let n: usize = counts.iter().sum();
    let mut facts = vec![format!(
        "{n} sentences in {} categories (argmax of the SAE encoder; no judge names them, so they are numbered)",
        counts.len()
    )];
    for (c, &cnt) in counts.iter().enumerate() {
        let top = rows
            .iter()
            .filter(|r| r.category == c)
            .max_by(|a, b| a.activation.total_cmp(&b.activation));
        let example = top.map_or("no sentence".to_string(), |r| {
            format!("e.g. “{}”", clip(&r.sentence, 70))
        });
        facts.push(format!(
            "category {c}: {cnt} sentences ({:.0}%), {example}",
            100.0 * cnt as f64 / n.max(1) as f64
        ));
    }
    let artifacts = vec![
        cx.p.annotations.clone(),
        cx.p.categories.join("report.md"),
        cx.p.categories.join("categories.svg"),
    ];
    Ok((artifacts, facts))
}

fn step_vectors(cx: &Ctx) -> Result<StepOut> {
    let cuda = cx.o.device.use_cuda_for(&[cx.model])?;
    let (set, rep) = mean_diff(
        cx.model,
        &cx.p.traces,
        &cx.p.annotations,
        cx.layer,
        BasePrefix::Plain,
        cuda,
    )?;
    set.save(&cx.p.vectors)?;
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let norms: Vec<String> = set
        .vectors
        .chunks(set.d.max(1))
        .map(|v| format!("{:.2}", norm(v)))
        .collect();
    let mut facts = vec![format!(
        "bias (norm {:.2}) and {} category vectors (norms {}) at block {}, from {} sentences and {} non-thinking tokens",
        norm(&set.bias),
        set.count,
        norms.join(", "),
        set.layer,
        rep.sentences,
        rep.non_thinking_tokens
    )];
    if !rep.empty_categories.is_empty() {
        facts.push(format!(
            "categories with no sentence (zero vectors): {:?}",
            rep.empty_categories
        ));
    }
    Ok((vec![cx.p.vectors.clone()], facts))
}

fn step_eval(cx: &Ctx, upstream_ran: bool) -> Result<StepOut> {
    let o = cx.o;
    // Answers in it were decoded with the previous SAE and vectors, or (a demo folder moved or
    // copied while this step ran) name this folder's files by another path, which `eval`
    // would refuse.
    let recorded = crate::eval::report::run_config(&cx.p.eval).ok().flatten();
    let elsewhere = recorded
        .and_then(|c| c.hybrid)
        .is_some_and(|h| h.sae != abs(&cx.p.sae));
    if (upstream_ran || elsewhere) && cx.p.eval.exists() {
        std::fs::remove_dir_all(&cx.p.eval)
            .with_context(|| format!("removing stale {}", cx.p.eval.display()))?;
    }
    let args = EvalArgs {
        dataset: cx.dataset.display().to_string(),
        kind: Some("gsm8k".into()),
        modes: vec![EvalMode::Base, EvalMode::Thinking, EvalMode::Hybrid],
        preset: None,
        base: cx.model.to_path_buf(),
        thinking: cx.model.to_path_buf(),
        sae: Some(cx.p.sae.clone()),
        vectors: Some(cx.p.vectors.clone()),
        out: cx.p.eval.clone(),
        max_new_tokens: o.max_new_tokens,
        batch: o.problems,
        prefix_caches: None,
        thinking_gpu: None,
        shard: None,
        limit: Some(o.problems),
        offset: 0,
        question_field: None,
        answer_field: None,
        judge_cmd: None,
        device: o.device,
        hybrid_mode: Mode::Cached,
        coefficients: Some(o.coefficients.clone()),
        windows: None,
        base_prompt: None,
        thinking_plain: false,
        ablations: Default::default(),
        quiet: false,
    };
    let spec = crate::eval::cli::spec(&args)?;
    let s = run_eval(&spec)?;
    let coefs: Vec<String> = o.coefficients.iter().map(|c| c.to_string()).collect();
    let facts = vec![
        format!(
            "the first {} GSM8K problems in 3 modes, up to {} new tokens: base = the model on the plain prompt, thinking = the same model on its chat template, hybrid = base steered through the SAE (cached mode, C = {}, window −1)",
            spec.problems.len(),
            o.max_new_tokens,
            coefs.join(",")
        ),
        format!(
            "{} answers decoded now, {} already present",
            s.written, s.skipped
        ),
    ];
    let artifacts = vec![
        cx.p.eval.join("config.json"),
        cx.p.eval.join(crate::eval::run::results_name(None)),
    ];
    Ok((artifacts, facts))
}

fn step_report(cx: &Ctx) -> Result<StepOut> {
    let (_, r) = write_report(&cx.p.eval)?;
    let mut facts = Vec::new();
    for m in &r.modes {
        let mut line = format!(
            "{}: {}/{} correct = {:.0}% (95% CI {:.0}–{:.0}%), {:.0} tokens per answer",
            m.mode.name(),
            m.correct,
            m.judged(),
            100.0 * m.accuracy,
            100.0 * m.ci_low,
            100.0 * m.ci_high,
            m.mean_tokens
        );
        if let (Some(mean), Some(tw)) = (m.steered_mean, m.steered_token_weighted) {
            let _ = write!(
                line,
                "; steered {:.1}% of tokens (mean of per-problem fractions; {:.1}% token-weighted)",
                100.0 * mean,
                100.0 * tw
            );
        }
        if let Some(cc) = &m.category_counts {
            let _ = write!(line, "; steered steps per category {cc:?}");
        }
        facts.push(line);
    }
    if let Some(g) = &r.gap {
        facts.push(match g.recovered {
            Some(x) => format!("gap recovered: {:.0}%", 100.0 * x),
            None => "gap recovered: undefined (base and thinking score the same)".to_string(),
        });
    }
    let artifacts = ["report.md", "report.svg", "report.json"]
        .iter()
        .map(|f| cx.p.eval.join(f))
        .collect();
    Ok((artifacts, facts))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn clip_keeps_short_text_and_marks_cuts() {
        assert_eq!(clip("a  b\nc", 10), "a b c");
        assert_eq!(clip("abcdef", 3), "abc…");
    }
}
