//! The `eval` and `report` commands: their flags, the model-pair presets of hybrid.md §3
//! (models/presets/*.json, compiled in), dataset-name resolution, and the step from flags to an
//! `EvalSpec`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use clap::{Args, ValueEnum};
use serde::Deserialize;

use super::dataset::{load_dataset, DatasetKind};
use super::run::{
    run_eval, DatasetConfig, EvalMode, EvalSpec, HybridConfig, PromptBuilder, RunConfig, SideConfig,
};
use crate::hybrid::ablations::Ablations;
use crate::hybrid::{Mode, Settings};
use crate::weights::checkpoint_fingerprint;

impl EvalDevice {
    /// Whether to run the models in `dirs` on the GPU: `cuda` insists (saying why it cannot),
    /// `auto` falls back to the CPU when no GPU is usable or the kernels do not take a model's
    /// shapes (the tiny test checkpoints).
    pub fn use_cuda_for(self, dirs: &[&std::path::Path]) -> anyhow::Result<bool> {
        if self != EvalDevice::Auto {
            return self.use_cuda();
        }
        for d in dirs {
            let c = crate::config::Config::from_file(&d.join("config.json"))?;
            if !crate::cuda::model::supports(&c) {
                return Ok(false);
            }
        }
        self.use_cuda()
    }

    /// Whether to run on the GPU: `cuda` insists (saying why it cannot), `auto` falls back.
    pub fn use_cuda(self) -> anyhow::Result<bool> {
        Ok(match self {
            EvalDevice::Cpu => false,
            EvalDevice::Auto => crate::cuda::available().is_ok(),
            EvalDevice::Cuda => {
                crate::cuda::available().map_err(|why| anyhow!("--device cuda: {why}"))?;
                true
            }
        })
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum EvalDevice {
    Cpu,
    /// The CUDA engine (its kernels take head_dim 64 or 128; the hybrid's exact mode, the
    /// oracle, runs on the CPU).
    Cuda,
    /// CUDA when a GPU is usable, else the CPU.
    Auto,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// gsm8k, math500 (in ../shared/data from the working folder, then beside the checkout
    /// thinksteer was built from, then /work/shared/data) or a JSONL file.
    #[arg(long)]
    pub dataset: String,
    /// How a JSONL file is read and graded: gsm8k (`#### N` answers), math500 or custom (graded
    /// as MATH). Default: from --dataset's name; for a file, gsm8k when every answer holds
    /// `#### N`, else custom.
    #[arg(long)]
    pub kind: Option<String>,
    /// Which answers to collect, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "base,thinking,hybrid"
    )]
    pub modes: Vec<EvalMode>,
    /// A model pair of the paper (sets coefficients, windows, prompts; checks the SAE's and the
    /// vectors' layers): r1-distill-qwen-1.5b, r1-distill-llama-8b, r1-distill-qwen-14b,
    /// r1-distill-qwen-32b, qwq-32b, or a preset JSON file.
    #[arg(long)]
    pub preset: Option<String>,
    /// The base model's checkpoint folder.
    #[arg(long)]
    pub base: PathBuf,
    /// The thinking model's checkpoint folder.
    #[arg(long)]
    pub thinking: PathBuf,
    /// SAE on the thinking model's residual (needed for hybrid).
    #[arg(long)]
    pub sae: Option<PathBuf>,
    /// Steering set for the base model (needed for hybrid).
    #[arg(long)]
    pub vectors: Option<PathBuf>,
    /// Output folder: config.json, results*.jsonl; rerunning with it resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// Maximum new tokens per answer.
    #[arg(long, value_parser = crate::cli_args::count, default_value_t = 2000)]
    pub max_new_tokens: usize,
    /// Problems decoded together.
    #[arg(long, value_parser = crate::cli_args::count, default_value_t = 8)]
    pub batch: usize,
    /// Hybrid with window 0: base-model cache slots for window-0 candidates' steered K/V (see
    /// `hybrid --help`; default: as many as useful and fit a quarter of the free memory).
    #[arg(long)]
    pub prefix_caches: Option<usize>,
    /// Hybrid on the GPU: the thinking model on CUDA device N, the base model on device 0 (see
    /// `hybrid --help`).
    #[arg(long)]
    pub thinking_gpu: Option<usize>,
    /// i/n: only problems with index % n == i (results go to results.shard-i-of-n.jsonl).
    #[arg(long, allow_hyphen_values = true)]
    pub shard: Option<String>,
    /// At most N problems (after --offset). Default: for `--dataset gsm8k`, up to question 500,
    /// the paper's evaluation set (its first 500 test questions of 1,319; `--limit 1319` for
    /// all); every problem otherwise.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Skip the first N problems of the file.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// The JSONL field holding the question.
    #[arg(long)]
    pub question_field: Option<String>,
    /// The JSONL field holding the reference answer.
    #[arg(long)]
    pub answer_field: Option<String>,
    /// An external judge (sh -c): reads {"question","reference","response"} on stdin, prints
    /// true/false; it decides `correct`. Where it fails the answer is written awaiting it
    /// (`correct: null`), judged when the same eval runs again; 3 failures in a row stop the run.
    #[arg(long)]
    pub judge_cmd: Option<String>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: EvalDevice,
    /// Hybrid loop: exact (recompute: the oracle), cached (default; the same function as exact
    /// for any windows), persistent (our extension; windows -1).
    #[arg(long, value_enum, default_value = "cached")]
    pub hybrid_mode: Mode,
    /// Steering coefficients C (default: the preset's, else 0.1,…,1.0).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub coefficients: Option<Vec<f32>>,
    /// Windows W: 0 = every position, -N = the last N (default: the preset's, e.g. 0,-1,-15,-50,-100,
    /// else -1). Window -1 alone runs the one-graph GPU step; others a slower host-driven loop.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub windows: Option<Vec<i64>>,
    /// The base model's prompt with {question} (default: the paper's plain prompt).
    #[arg(long)]
    pub base_prompt: Option<String>,
    /// Give the thinking model the plain prompt instead of its chat template.
    #[arg(long)]
    pub thinking_plain: bool,
    /// The hybrid mode's ablations (recorded in config.json, named in the report).
    #[command(flatten)]
    pub ablations: Ablations,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The evaluation folder (every results*.jsonl in it is merged). Repeated: each folder's
    /// report is written, and one table comparing them (e.g. one folder per ablation) printed.
    #[arg(long, required = true)]
    pub out: Vec<PathBuf>,
}

/// One model pair's paper settings.
#[derive(Clone, Debug, Deserialize)]
pub struct Preset {
    pub name: String,
    pub thinking: String,
    pub base: String,
    pub sae_layer: usize,
    pub latents: usize,
    pub steer_layer: usize,
    pub coefficients: Vec<f32>,
    pub windows: Vec<i64>,
    pub base_prompt: String,
    /// "chat" (the thinking model's template) or "plain".
    pub thinking_prompt: String,
}

macro_rules! preset_file {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/models/presets/",
                $name,
                ".json"
            )),
        )
    };
}

/// The presets compiled into the binary, so `--preset NAME` works from any directory.
pub const PRESETS: [(&str, &str); 5] = [
    preset_file!("r1-distill-qwen-1.5b"),
    preset_file!("r1-distill-llama-8b"),
    preset_file!("r1-distill-qwen-14b"),
    preset_file!("r1-distill-qwen-32b"),
    preset_file!("qwq-32b"),
];

/// A preset by name, or read from a JSON file path.
pub fn load_preset(name: &str) -> Result<Preset> {
    let text = match PRESETS.iter().find(|(n, _)| *n == name) {
        Some((_, t)) => t.to_string(),
        None if Path::new(name).is_file() => crate::files::read_text(Path::new(name))?,
        None => {
            let known: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            return Err(anyhow!(
                "--preset {name:?}: expected one of {} or a preset JSON file, found neither",
                known.join(", ")
            ));
        }
    };
    let p: Preset = serde_json::from_str(&text)
        .map_err(|e| anyhow!("--preset {name}: malformed preset JSON ({e})"))?;
    if p.thinking_prompt != "chat" && p.thinking_prompt != "plain" {
        return Err(anyhow!(
            "--preset {name}: thinking_prompt: expected \"chat\" or \"plain\", found {:?}",
            p.thinking_prompt
        ));
    }
    Ok(p)
}

/// The paper's evaluation set of a named dataset, as a limit: the first 500 GSM8K test
/// questions (MATH-500 is whole).
fn paper_limit(dataset: &str) -> Option<usize> {
    dataset.eq_ignore_ascii_case("gsm8k").then_some(500)
}

/// gsm8k / math500 → the shared data file: `../shared/data` from the working folder, then
/// beside the checkout thinksteer was built from, then `/work/shared/data`; anything else is a
/// path.
pub fn resolve_dataset(name: &str) -> Result<(PathBuf, DatasetKind)> {
    let file = match name.to_ascii_lowercase().as_str() {
        "gsm8k" => Some(("gsm8k_test.jsonl", DatasetKind::Gsm8k)),
        "math500" | "math-500" => Some(("math500_test.jsonl", DatasetKind::Math500)),
        _ => None,
    };
    let Some((file, kind)) = file else {
        let p = PathBuf::from(name);
        if !p.is_file() {
            let found = match p.is_dir() {
                true => "a folder",
                false => "no such file",
            };
            return Err(anyhow!(
                "--dataset {name:?}: expected gsm8k, math500 or a JSONL file, found {found}"
            ));
        }
        return Ok((p, DatasetKind::Custom));
    };
    let candidates = [
        PathBuf::from("../shared/data").join(file),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(file),
        PathBuf::from("/work/shared/data").join(file),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| (p.clone(), kind))
        .ok_or_else(|| {
            let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            anyhow!(
                "--dataset {name}: expected one of {}, found none; pass the JSONL file's path",
                tried.join(", ")
            )
        })
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || anyhow!("--shard {s:?}: expected i/n with 0 ≤ i < n, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// An absolute form of a path for the recorded configuration (as given when it cannot be resolved).
pub(crate) fn abs(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// "sae <hex>, vectors <hex>": `fnv1a` of both files' bytes; None when either cannot be read
/// (loading it then says why).
fn file_hashes(sae: Option<&Path>, vectors: Option<&Path>) -> Option<String> {
    let hash = |p: Option<&Path>| std::fs::read(p?).ok().map(|b| crate::rng::fnv1a(&b));
    Some(format!(
        "sae {:016x}, vectors {:016x}",
        hash(sae)?,
        hash(vectors)?
    ))
}

/// Builds the run from flags (and a preset) without loading any model.
pub fn spec(a: &EvalArgs) -> Result<EvalSpec> {
    let preset = a.preset.as_deref().map(load_preset).transpose()?;
    let (path, named_kind) = resolve_dataset(&a.dataset)?;
    let mut kind = match &a.kind {
        Some(k) => k.parse::<DatasetKind>()?,
        None => named_kind,
    };
    let shard = a.shard.as_deref().map(parse_shard).transpose()?;
    if a.modes.is_empty() {
        return Err(anyhow!(
            "--modes: expected at least one of base, thinking, hybrid"
        ));
    }
    let hybrid = a.modes.contains(&EvalMode::Hybrid);
    if hybrid && (a.sae.is_none() || a.vectors.is_none()) {
        return Err(anyhow!(
            "--modes hybrid: expected --sae FILE and --vectors FILE, found {}",
            match (&a.sae, &a.vectors) {
                (None, None) => "neither",
                (None, _) => "no --sae",
                _ => "no --vectors",
            }
        ));
    }
    // A GSM8K-format file given by its path (every answer of the whole file holds `#### N`) is
    // read and graded as GSM8K: the reference is the number after `####` (as MATH, it would be
    // the whole worked solution).
    let mut notes = vec![];
    if kind == DatasetKind::Custom {
        let all = load_dataset(
            &path,
            kind,
            a.question_field.as_deref(),
            a.answer_field.as_deref(),
            0,
            None,
        )?;
        if !all.is_empty() && all.iter().all(|p| p.answer.contains("#### ")) {
            if a.kind.is_none() {
                kind = DatasetKind::Gsm8k;
                notes.push(format!(
                    "note: every answer of {} holds GSM8K's `#### N`: read and graded as GSM8K (the number after ####); --kind custom grades as MATH (as folders written before this rule did)",
                    path.display()
                ));
            } else {
                notes.push(format!(
                    "note: every answer of {} holds GSM8K's `#### N`, yet --kind custom grades it as MATH; --kind gsm8k takes the number after ####",
                    path.display()
                ));
            }
        }
    }
    let mut problems = load_dataset(
        &path,
        kind,
        a.question_field.as_deref(),
        a.answer_field.as_deref(),
        a.offset,
        match (a.limit, paper_limit(&a.dataset)) {
            (Some(n), _) => Some(n),
            (None, Some(first)) if a.offset >= first => {
                return Err(anyhow!(
                    "--offset {}: --dataset {} evaluates the paper's first {first} questions; expected a smaller offset, or --limit N for questions past them",
                    a.offset,
                    a.dataset
                ))
            }
            (None, first) => first.map(|n| n - a.offset),
        },
    )?;
    if let Some((i, n)) = shard {
        problems.retain(|p| p.index % n == i);
        if problems.is_empty() {
            return Err(anyhow!(
                "--shard {i}/{n}: no problem of the selection has index % {n} == {i}"
            ));
        }
    }
    let (dq, da) = kind.default_fields();
    let base_prompt = a
        .base_prompt
        .clone()
        .or_else(|| preset.as_ref().map(|p| p.base_prompt.clone()));
    let thinking_plain = a.thinking_plain
        || preset
            .as_ref()
            .is_some_and(|p| p.thinking_prompt == "plain");
    let prompts = PromptBuilder::load(&a.base, &a.thinking, thinking_plain, base_prompt.clone())?;
    let coefficients = a
        .coefficients
        .clone()
        .or_else(|| preset.as_ref().map(|p| p.coefficients.clone()))
        .unwrap_or_else(|| Settings::default().coefficients);
    // A preset's windows in every mode (cached is the same function as exact for any windows),
    // except persistent, which steers the newest position only.
    let windows = match (&a.windows, &preset) {
        (Some(w), _) => w.clone(),
        (None, Some(p)) if a.hybrid_mode != Mode::Persistent => p.windows.clone(),
        _ => vec![-1],
    };
    let mut settings = Settings {
        mode: a.hybrid_mode,
        coefficients: coefficients.clone(),
        windows: windows.clone(),
        max_new_tokens: a.max_new_tokens,
        batch: a.batch.max(1),
        prefix_caches: a.prefix_caches,
        thinking_gpu: a.thinking_gpu,
        ..Settings::default()
    };
    a.ablations.apply(&mut settings);
    // Refused now rather than when the hybrid mode starts, after the other modes' runs.
    let hybrid_only = match (a.prefix_caches, a.thinking_gpu, a.ablations.names().first()) {
        (Some(_), _, _) => Some("--prefix-caches".to_string()),
        (None, Some(_), _) => Some("--thinking-gpu".to_string()),
        (None, None, Some(name)) => Some(format!("the ablation {name}")),
        (None, None, None) => None,
    };
    if hybrid {
        settings.validate(&[])?;
    } else if let Some(what) = hybrid_only {
        return Err(anyhow!(
            "{what} goes with --modes hybrid, found --modes {}",
            a.modes
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    let mode_name = serde_json::to_value(a.hybrid_mode)?
        .as_str()
        .unwrap_or("cached")
        .to_string();
    let added = prompts.added_ids()?;
    let config = RunConfig {
        dataset: DatasetConfig {
            path: abs(&path),
            kind: format!("{kind:?}").to_ascii_lowercase(),
            question_field: a.question_field.clone().unwrap_or(dq.to_string()),
            answer_field: a.answer_field.clone().unwrap_or(da.to_string()),
            grading: format!("{:?}", kind.default_grade_kind()).to_ascii_lowercase(),
        },
        max_new_tokens: a.max_new_tokens,
        judge_cmd: a.judge_cmd.clone(),
        base: SideConfig {
            model: abs(&a.base),
            prompt: prompts.base_text("{question}"),
            fingerprint: Some(checkpoint_fingerprint(&a.base)?),
            added_ids: Some(added.0),
        },
        thinking: SideConfig {
            model: abs(&a.thinking),
            prompt: prompts.thinking_text("{question}")?,
            fingerprint: Some(checkpoint_fingerprint(&a.thinking)?),
            added_ids: Some(added.1),
        },
        hybrid: hybrid.then(|| HybridConfig {
            sae: a.sae.as_deref().map(abs).unwrap_or_default(),
            vectors: a.vectors.as_deref().map(abs).unwrap_or_default(),
            preset: preset.as_ref().map(|p| p.name.clone()),
            mode: mode_name,
            coefficients,
            windows,
            ablations: a.ablations.recorded(),
            file_hashes: file_hashes(a.sae.as_deref(), a.vectors.as_deref()),
        }),
    };
    let use_cuda = a.device.use_cuda_for(&[&a.base, &a.thinking])?;
    if let Some(n) = a.thinking_gpu {
        crate::hybrid::check_thinking_gpu(n, use_cuda && a.hybrid_mode != Mode::Exact)?;
    }
    let mut modes: Vec<EvalMode> = vec![];
    for m in &a.modes {
        if !modes.contains(m) {
            modes.push(*m);
        }
    }
    Ok(EvalSpec {
        config,
        base: a.base.clone(),
        thinking: a.thinking.clone(),
        sae: a.sae.clone(),
        vectors: a.vectors.clone(),
        thinking_plain,
        base_prompt,
        problems,
        modes,
        grade_kind: kind.default_grade_kind(),
        settings,
        ablations: a.ablations.clone(),
        expect: preset.map(|p| (p.name, p.sae_layer, p.latents, p.steer_layer)),
        batch: a.batch,
        shard,
        out: a.out.clone(),
        use_cuda,
        progress: !a.quiet,
        notes,
    })
}

/// `thinksteer eval`.
pub fn eval(mut a: EvalArgs) -> Result<()> {
    a.base = crate::gguf::checkpoint_dir(&a.base)?;
    a.thinking = crate::gguf::checkpoint_dir(&a.thinking)?;
    let spec = spec(&a)?;
    let s = run_eval(&spec)?;
    let rejudged = match s.rejudged {
        0 => String::new(),
        n => format!(" ({n} of them judged now: they awaited the judge)"),
    };
    eprintln!(
        "{} result lines written, {} already present{rejudged}; {}",
        s.written,
        s.skipped,
        spec.out
            .join(super::run::results_name(spec.shard))
            .display()
    );
    // The report of every result in the folder so far (other shards' included), and its
    // summary row on stdout.
    let (_, r) = super::report::write_report(&spec.out)?;
    let name = spec.out.display().to_string();
    print!("{}", super::report::render_comparison(&[(name, r)]));
    eprintln!("report: {}", spec.out.join("report.md").display());
    Ok(())
}

/// `thinksteer report`.
pub fn report(a: ReportArgs) -> Result<()> {
    if let [out] = &a.out[..] {
        print!("{}", super::report::write_report(out)?.0);
        return Ok(());
    }
    print!("{}", super::report::comparison(&a.out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_match_the_spec_table() {
        let want = [
            ("r1-distill-qwen-1.5b", 4, 15, 10, 10),
            ("r1-distill-llama-8b", 6, 15, 12, 10),
            ("r1-distill-qwen-14b", 38, 5, 18, 10),
            ("r1-distill-qwen-32b", 27, 15, 24, 6),
            ("qwq-32b", 27, 10, 24, 6),
        ];
        for (name, lt, k, lb, nc) in want {
            let p = load_preset(name).unwrap();
            assert_eq!(
                (p.name.as_str(), p.sae_layer, p.latents, p.steer_layer),
                (name, lt, k, lb)
            );
            assert_eq!(p.coefficients.len(), nc, "{name}");
        }
        let e = load_preset("r1-7b").unwrap_err().to_string();
        assert!(e.contains("qwq-32b") && e.contains("r1-7b"), "{e}");
    }

    #[test]
    fn gsm8k_is_the_papers_first_500_unless_a_limit_says_otherwise() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: EvalArgs,
        }
        if resolve_dataset("gsm8k").is_err() {
            println!("skipping: no gsm8k_test.jsonl in ../shared/data or /work/shared/data");
            return;
        }
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let count = |extra: &[&str]| {
            let mut args = vec!["eval", "--modes", "base", "--out", "/nonexistent"];
            let (base, thinking) = (
                format!("{fixtures}/qwen2-f32"),
                format!("{fixtures}/thinking-qwen2-f32"),
            );
            args.extend(["--base", &base, "--thinking", &thinking, "--device", "cpu"]);
            args.extend(extra);
            let spec = spec(&Cli::parse_from(args).a).unwrap();
            (spec.problems.len(), spec.problems.last().unwrap().index)
        };
        assert_eq!(count(&["--dataset", "gsm8k"]), (500, 499));
        assert_eq!(
            count(&["--dataset", "gsm8k", "--limit", "1319"]),
            (1319, 1318)
        );
        // An offset stays inside the paper's 500.
        assert_eq!(
            count(&["--dataset", "gsm8k", "--offset", "400"]),
            (100, 499)
        );
        let mut args = vec![
            "eval",
            "--modes",
            "base",
            "--out",
            "/nonexistent",
            "--dataset",
        ];
        let (b, t) = (
            format!("{fixtures}/qwen2-f32"),
            format!("{fixtures}/thinking-qwen2-f32"),
        );
        args.extend(["gsm8k", "--offset", "500", "--base", &b, "--thinking", &t]);
        let e = spec(&Cli::parse_from(args).a).err().unwrap().to_string();
        assert!(e.contains("--offset 500") && e.contains("--limit N"), "{e}");
        assert_eq!(count(&["--dataset", "math500"]), (500, 499));
        let (path, _) = resolve_dataset("gsm8k").unwrap();
        let file = path.display().to_string();
        let n = count(&["--dataset", &file, "--kind", "gsm8k"]).0;
        assert_eq!(n, 1319, "a file is read whole");
    }

    #[test]
    fn shards_parse() {
        assert_eq!(parse_shard("1/4").unwrap(), (1, 4));
        assert!(parse_shard("4/4").is_err());
        assert!(parse_shard("x").is_err());
    }
}
