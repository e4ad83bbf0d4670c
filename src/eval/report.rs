//! The evaluation report: merges every results file of an output folder (shards included),
//! then per mode accuracy with a 95% Wilson interval, the share of the base→thinking gap the
//! hybrid recovers (hybrid.md §2.4), steered fractions, tokens and tok/s, category firing counts,
//! and accuracy by MATH subject and level. Written as report.md (and report.json for scripts).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

use super::run::{read_results, EvalMode, HybridConfig, ResultLine};
use crate::bail;
use crate::error::{Error, Result};

/// z of a two-sided 95% normal interval.
const Z95: f64 = 1.959_963_984_540_054;

/// The 95% Wilson score interval of k successes in n trials ((0, 1) when n = 0).
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// The paper's gap recovered: max(0, (hybrid − min(base, thinking)) / |thinking − base|);
/// undefined when the two models score the same.
pub fn gap_recovered(base: f64, thinking: f64, hybrid: f64) -> Option<f64> {
    let gap = (thinking - base).abs();
    (gap > 0.0).then(|| ((hybrid - base.min(thinking)) / gap).max(0.0))
}

#[derive(Clone, Debug, Serialize)]
pub struct ModeStats {
    pub mode: EvalMode,
    /// Answered problems, judged or not.
    pub problems: usize,
    /// Of those, the ones awaiting the judge (it failed on them): not in `correct`, `accuracy`
    /// or its interval, which count the judged ones only.
    pub awaiting_judge: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub tokens: usize,
    pub mean_tokens: f64,
    /// Σ over decode batches of the batch's wall time (its slowest problem).
    pub wall_seconds: f64,
    pub tok_per_s: Option<f64>,
    /// Steered tokens / all tokens (hybrid only).
    pub steered_token_weighted: Option<f64>,
    /// Mean of per-problem steered fractions (the paper's figure).
    pub steered_mean: Option<f64>,
    /// Of the steered tokens, the share whose token differs from the base model's own, over
    /// the results that record it (None where none does).
    pub changed_of_steered: Option<f64>,
    pub category_counts: Option<Vec<usize>>,
    pub coef_wins: Option<BTreeMap<String, usize>>,
    /// Steered steps per winning (coefficient, window), "c,w".
    pub cw_wins: Option<BTreeMap<String, usize>>,
    /// Hybrid results without those counts (written before they were recorded).
    #[serde(skip_serializing_if = "is_zero")]
    pub cw_missing: usize,
    /// Steps per category (the SAE's argmax), steered or not, [K].
    pub category_steps: Option<Vec<usize>>,
    /// Per category, steered steps per winning (coefficient, window), [K] of "c,w" → count.
    pub category_cw_wins: Option<Vec<BTreeMap<String, usize>>>,
    /// Hybrid results without the two per-category counts above (written before they were
    /// recorded); those count only in `category_counts`.
    #[serde(skip_serializing_if = "is_zero")]
    pub category_missing: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl ModeStats {
    /// The problems with a verdict: what accuracy is out of.
    pub fn judged(&self) -> usize {
        self.problems - self.awaiting_judge
    }
}

/// Base, thinking and hybrid accuracy on the problems all three answered with a verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Gap {
    pub problems: usize,
    pub base: f64,
    pub thinking: f64,
    pub hybrid: f64,
    pub recovered: Option<f64>,
}

/// (correct, judged) per mode.
pub type ModeCells = BTreeMap<EvalMode, (usize, usize)>;

/// Accuracy per value of one dataset field (MATH `subject`, `level`), per mode: (correct, n).
#[derive(Clone, Debug, Serialize)]
pub struct Breakdown {
    pub field: String,
    pub rows: Vec<(String, ModeCells)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub lines: usize,
    /// Repeated (index, mode) lines dropped (the first is kept).
    pub duplicates: usize,
    pub modes: Vec<ModeStats>,
    pub gap: Option<Gap>,
    pub breakdowns: Vec<Breakdown>,
    /// The categories' names: the `titles` of the SAE in the folder's config.json, when that
    /// file can still be read and has them.
    pub titles: Option<Vec<String>>,
    /// The hybrid mode's settings from the folder's config.json, in words.
    pub hybrid_settings: Option<String>,
    /// What was evaluated, from the folder's config.json: dataset, grading, models, length, and
    /// the SAE and steering files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Whether its categories were drawn at random (--random-firing), not by the SAE.
    pub random_firing: bool,
    /// Result lines per device ("cpu", "cuda"; lines written before it was kept are left out).
    pub devices: BTreeMap<String, usize>,
    /// Result lines awaiting the judge, all modes together.
    pub awaiting_judge: usize,
    /// Why the judge failed on the first of them (its `judge_error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge_error: Option<String>,
}

/// Reads every results file in `out` and summarises it.
pub fn load_report(out: &Path) -> Result<Report> {
    let (lines, config) = load_folder(out)?;
    Ok(report_of(&lines, config))
}

/// The result lines of `out` (at least one) and its config.json, if it has one.
fn load_folder(out: &Path) -> Result<(Vec<ResultLine>, Option<super::run::RunConfig>)> {
    if !out.is_dir() {
        bail!(
            "--out {}: expected an evaluation folder, found {}",
            out.display(),
            if out.exists() { "a file" } else { "none" }
        );
    }
    let lines = read_results(out)?;
    if lines.is_empty() {
        return Err(Error::Input(format!(
            "{}: expected results*.jsonl with at least one result line, found none",
            out.display()
        )));
    }
    Ok((lines, run_config(out)?))
}

/// The report of `lines`, with what the folder's configuration says (the run in words, the
/// hybrid settings, the categories' names).
fn report_of(lines: &[ResultLine], config: Option<super::run::RunConfig>) -> Report {
    let mut r = summarize(lines);
    r.run = config.as_ref().map(run_in_words);
    if let Some(h) = config.and_then(|c| c.hybrid) {
        r.hybrid_settings = Some(settings_in_words(&h));
        r.random_firing = h.ablations.random_firing;
        // A report still renders, with numbered categories, when the SAE file has moved.
        r.titles = crate::sae::Sae::load(&h.sae).ok().and_then(|s| s.titles);
    }
    r
}

/// OUT/config.json, if the folder has one (a folder of results copied without it still
/// reports).
pub(crate) fn run_config(out: &Path) -> Result<Option<super::run::RunConfig>> {
    let path = out.join("config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::files::read_text(&path)?;
    let config: super::run::RunConfig = serde_json::from_str(&text).map_err(|e| {
        Error::Input(format!(
            "{}: expected a thinksteer eval configuration, found unreadable JSON ({e})",
            path.display()
        ))
    })?;
    Ok(Some(config))
}

/// "`gsm8k_test.jsonl` (GSM8K grading), base `Qwen2.5-Math-1.5B`, thinking `…`, at most 2000 new
/// tokens; SAE `sae-15.safetensors`, vectors `v.safetensors`": file and folder names only (the
/// paths are in config.json).
fn run_in_words(c: &super::run::RunConfig) -> String {
    // A GGUF file's converted folder (`.<file>.thinksteer`) is named by the file.
    let name = |p: &str| {
        let n = Path::new(p)
            .file_name()
            .map_or(p.to_string(), |n| n.to_string_lossy().into_owned());
        match n
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".thinksteer"))
        {
            Some(file) => file.to_string(),
            None => n,
        }
    };
    let mut s = format!(
        "`{}` ({} grading{}), base `{}`, thinking `{}`, at most {} new tokens",
        name(&c.dataset.path),
        c.dataset.grading,
        if c.judge_cmd.is_some() {
            ", by the judge command"
        } else {
            ""
        },
        name(&c.base.model),
        name(&c.thinking.model),
        c.max_new_tokens
    );
    if let Some(h) = &c.hybrid {
        s += &format!("; SAE `{}`, vectors `{}`", name(&h.sae), name(&h.vectors));
    }
    s
}

/// "cached mode, coefficients 0.5, 1, windows -1 (preset P); ablations: only bias".
fn settings_in_words(h: &HybridConfig) -> String {
    let list = |v: Vec<String>| v.join(", ");
    let mut s = format!(
        "{} mode, coefficients {}, windows {}",
        h.mode,
        list(h.coefficients.iter().map(|c| c.to_string()).collect()),
        list(h.windows.iter().map(|w| w.to_string()).collect()),
    );
    if let Some(p) = &h.preset {
        s += &format!(" (preset {p})");
    }
    let ablations = h.ablations.names();
    s += &match ablations.is_empty() {
        true => "; no ablation".to_string(),
        false => format!("; ablations: {}", list(ablations)),
    };
    s
}

/// The report of a set of result lines (repeats of an (index, mode) pair count once).
pub fn summarize(all: &[ResultLine]) -> Report {
    let mut seen = HashSet::new();
    let lines: Vec<&ResultLine> = all
        .iter()
        .filter(|r| seen.insert((r.index, r.mode)))
        .collect();
    let mut by_mode: BTreeMap<EvalMode, Vec<&ResultLine>> = BTreeMap::new();
    for r in &lines {
        by_mode.entry(r.mode).or_default().push(r);
    }
    let modes: Vec<ModeStats> = by_mode.iter().map(|(m, rs)| mode_stats(*m, rs)).collect();

    // Gap recovered on the problems every mode answered and the judge decided, so the three
    // rates are comparable.
    let correct: HashMap<(usize, EvalMode), bool> = lines
        .iter()
        .filter_map(|r| Some(((r.index, r.mode), r.correct?)))
        .collect();
    let three = [EvalMode::Base, EvalMode::Thinking, EvalMode::Hybrid];
    let common: Vec<usize> = by_mode
        .get(&EvalMode::Base)
        .map(|rs| rs.iter().map(|r| r.index).collect())
        .unwrap_or_default();
    let common: Vec<usize> = common
        .into_iter()
        .filter(|i| three.iter().all(|m| correct.contains_key(&(*i, *m))))
        .collect();
    let gap = (!common.is_empty()).then(|| {
        let acc = |m: EvalMode| {
            common.iter().filter(|i| correct[&(**i, m)]).count() as f64 / common.len() as f64
        };
        let (b, t, h) = (
            acc(EvalMode::Base),
            acc(EvalMode::Thinking),
            acc(EvalMode::Hybrid),
        );
        Gap {
            problems: common.len(),
            base: b,
            thinking: t,
            hybrid: h,
            recovered: gap_recovered(b, t, h),
        }
    });

    let breakdowns = ["subject", "level"]
        .iter()
        .filter_map(|field| breakdown(field, &lines))
        .collect();
    let mut devices = BTreeMap::new();
    for d in lines.iter().filter_map(|r| r.device.as_ref()) {
        *devices.entry(d.clone()).or_insert(0) += 1;
    }
    let awaiting: Vec<&&ResultLine> = lines.iter().filter(|r| r.correct.is_none()).collect();
    Report {
        lines: lines.len(),
        duplicates: all.len() - lines.len(),
        modes,
        gap,
        breakdowns,
        titles: None,
        hybrid_settings: None,
        run: None,
        random_firing: false,
        devices,
        awaiting_judge: awaiting.len(),
        judge_error: awaiting.iter().find_map(|r| r.judge_error.clone()),
    }
}

fn mode_stats(mode: EvalMode, rs: &[&ResultLine]) -> ModeStats {
    let n = rs.len();
    let awaiting = rs.iter().filter(|r| r.correct.is_none()).count();
    let k = rs.iter().filter(|r| r.correct == Some(true)).count();
    let (lo, hi) = wilson(k, n - awaiting);
    let tokens: usize = rs.iter().map(|r| r.tokens).sum();
    let mut batches: HashMap<&str, f64> = HashMap::new();
    for r in rs {
        let w = batches.entry(r.batch.as_str()).or_insert(0.0);
        *w = w.max(r.seconds);
    }
    let wall: f64 = batches.values().sum();
    let hybrid: Vec<&&ResultLine> = rs.iter().filter(|r| r.steered_fraction.is_some()).collect();
    let (mut tw, mut mean, mut counts, mut wins, mut cw_wins) = (None, None, None, None, None);
    let mut changed_of = None;
    if !hybrid.is_empty() {
        let steered: usize = hybrid.iter().map(|r| r.steered_tokens.unwrap_or(0)).sum();
        let toks: usize = hybrid.iter().map(|r| r.tokens).sum();
        tw = Some(steered as f64 / toks.max(1) as f64);
        let known: Vec<_> = hybrid
            .iter()
            .filter(|r| r.changed_tokens.is_some())
            .collect();
        if !known.is_empty() {
            let changed: usize = known.iter().map(|r| r.changed_tokens.unwrap_or(0)).sum();
            let of: usize = known.iter().map(|r| r.steered_tokens.unwrap_or(0)).sum();
            changed_of = Some(changed as f64 / of.max(1) as f64);
        }
        mean = Some(
            hybrid
                .iter()
                .map(|r| r.steered_fraction.unwrap_or(0.0))
                .sum::<f64>()
                / hybrid.len() as f64,
        );
        let k = hybrid
            .iter()
            .filter_map(|r| r.category_counts.as_ref().map(Vec::len))
            .max()
            .unwrap_or(0);
        let mut c = vec![0; k];
        let (mut w, mut cw) = (BTreeMap::new(), BTreeMap::new());
        for r in &hybrid {
            for (i, x) in r.category_counts.iter().flatten().enumerate() {
                c[i] += x;
            }
            for (coef, x) in r.coef_wins.iter().flatten() {
                *w.entry(coef.clone()).or_insert(0) += x;
            }
            for (key, x) in r.cw_wins.iter().flatten() {
                *cw.entry(key.clone()).or_insert(0) += x;
            }
        }
        counts = Some(c);
        wins = Some(w);
        cw_wins = Some(cw);
    }
    let cw_missing = hybrid.iter().filter(|r| r.cw_wins.is_none()).count();
    let (mut fired, mut cat_cw) = (None, None);
    let full: Vec<&&&ResultLine> = hybrid
        .iter()
        .filter(|r| r.category_steps.is_some() && r.category_cw_wins.is_some())
        .collect();
    if !full.is_empty() {
        let k = counts.as_ref().map_or(0, Vec::len);
        let (mut f, mut per_cat) = (vec![0; k], vec![BTreeMap::new(); k]);
        for r in &full {
            for (i, x) in r.category_steps.iter().flatten().enumerate() {
                f[i] += x;
            }
            for (i, t) in r.category_cw_wins.iter().flatten().enumerate() {
                for (key, x) in t {
                    *per_cat[i].entry(key.clone()).or_insert(0) += x;
                }
            }
        }
        fired = Some(f);
        cat_cw = Some(per_cat);
    }
    ModeStats {
        mode,
        problems: n,
        awaiting_judge: awaiting,
        correct: k,
        accuracy: k as f64 / (n - awaiting).max(1) as f64,
        ci_low: lo,
        ci_high: hi,
        tokens,
        mean_tokens: tokens as f64 / n.max(1) as f64,
        wall_seconds: wall,
        tok_per_s: (wall > 0.0).then(|| tokens as f64 / wall),
        steered_token_weighted: tw,
        steered_mean: mean,
        changed_of_steered: changed_of,
        category_counts: counts,
        coef_wins: wins,
        cw_wins,
        cw_missing,
        category_steps: fired,
        category_cw_wins: cat_cw,
        category_missing: hybrid.len() - full.len(),
    }
}

fn breakdown(field: &str, lines: &[&ResultLine]) -> Option<Breakdown> {
    let mut rows: BTreeMap<String, ModeCells> = BTreeMap::new();
    for r in lines {
        let (Some(v), Some(correct)) = (r.meta.get(field), r.correct) else {
            continue;
        };
        let key = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let cell = rows.entry(key).or_default().entry(r.mode).or_insert((0, 0));
        cell.0 += correct as usize;
        cell.1 += 1;
    }
    (!rows.is_empty()).then(|| Breakdown {
        field: field.to_string(),
        rows: rows.into_iter().collect(),
    })
}

/// "12", or "10 judged, 2 awaiting the judge".
fn problems_cell(m: &ModeStats) -> String {
    match m.awaiting_judge {
        0 => m.problems.to_string(),
        a => format!("{} judged, {a} awaiting the judge", m.judged()),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// The report as Markdown.
pub fn render_markdown(r: &Report) -> String {
    let mut s = String::from("# Evaluation report\n\n");
    if let Some(run) = &r.run {
        s += &format!("Evaluated: {run}.\n\n");
    }
    s += &format!("{} result lines", r.lines);
    if r.duplicates > 0 {
        s += &format!(" ({} repeated lines ignored)", r.duplicates);
    }
    if let Some(h) = &r.hybrid_settings {
        s += &format!(". Hybrid: {h}");
    }
    s += ".\n";
    if r.awaiting_judge > 0 {
        s += &format!(
            "\n**Awaiting the judge**: {} result lines have no verdict: the judge failed on them ({}). Accuracy counts the judged lines only. To judge them, run the same `thinksteer eval` command again (same --out and flags): it judges them without generating them again, then goes on.\n",
            r.awaiting_judge,
            r.judge_error.as_deref().unwrap_or("no reason recorded")
        );
    }
    if r.devices.len() > 1 {
        let each: Vec<String> = r.devices.iter().map(|(d, n)| format!("{d} {n}")).collect();
        s += &format!(
            "\n**Mixed devices** (result lines: {}): the CPU runs in f32, the GPU in bf16, so greedy answers can differ between them; these lines are not one run.\n",
            each.join(", ")
        );
    }
    s += "\n## Accuracy\n\n| mode | problems | correct | accuracy | 95% CI (Wilson) | tokens | mean tokens | tok/s |\n|---|---|---|---|---|---|---|---|\n";
    for m in &r.modes {
        s += &format!(
            "| {} | {} | {} | {} | [{}, {}] | {} | {:.1} | {} |\n",
            m.mode.name(),
            problems_cell(m),
            m.correct,
            pct(m.accuracy),
            pct(m.ci_low),
            pct(m.ci_high),
            m.tokens,
            m.mean_tokens,
            m.tok_per_s.map_or("n/a".to_string(), |t| format!("{t:.1}")),
        );
    }
    if let Some(g) = &r.gap {
        s += &format!(
            "\n## Gap recovered\n\nOn the {} problems all three modes answered (with a verdict): base {}, thinking {}, hybrid {}; gap recovered = max(0, (hybrid − min(base, thinking)) / |thinking − base|) = {}.\n",
            g.problems,
            pct(g.base),
            pct(g.thinking),
            pct(g.hybrid),
            g.recovered.map_or("n/a (base and thinking score the same)".to_string(), pct),
        );
    }
    for m in r.modes.iter().filter(|m| m.steered_mean.is_some()) {
        s += &format!(
            "\n## Steering ({})\n\nSteered tokens: {} token-weighted, {} mean per problem.\n",
            m.mode.name(),
            pct(m.steered_token_weighted.unwrap_or(0.0)),
            pct(m.steered_mean.unwrap_or(0.0)),
        );
        if let Some(x) = m.changed_of_steered {
            s += &format!(
                "Of the steered tokens, {} differ from the base model's own (at the others, the winning candidate's token was the base model's).\n",
                pct(x)
            );
        }
        if let Some(c) = &m.category_counts {
            s += &category_table(m, c, r.titles.as_deref(), r.random_firing);
        }
        if let Some(w) = m.coef_wins.as_ref().filter(|w| !w.is_empty()) {
            s += "\n| winning coefficient | steps |\n|---|---|\n";
            for (c, x) in numeric_order(w) {
                s += &format!("| {c} | {x} |\n");
            }
        }
        // (c, w) pairs only where some window other than -1 won.
        let windowed = |w: &&BTreeMap<String, usize>| w.keys().any(|k| !k.ends_with(",-1"));
        if let Some(w) = m.cw_wins.as_ref().filter(windowed) {
            s += "\n| winning (coefficient, window) | steps |\n|---|---|\n";
            for (cw, x) in numeric_order(w) {
                s += &format!("| ({}) | {x} |\n", cw.replace(',', ", "));
            }
            if m.cw_missing > 0 {
                s += &format!(
                    "\n{} of the {} hybrid results predate these counts and are not in this table.\n",
                    m.cw_missing, m.problems
                );
            }
        }
    }
    for b in &r.breakdowns {
        let modes: Vec<EvalMode> = r.modes.iter().map(|m| m.mode).collect();
        s += &format!("\n## Accuracy by {}\n\n| {} |", b.field, b.field);
        for m in &modes {
            s += &format!(" {} |", m.name());
        }
        s += &format!("\n|---|{}\n", "---|".repeat(modes.len()));
        for (value, cells) in &b.rows {
            s += &format!("| {value} |");
            for m in &modes {
                s += &match cells.get(m) {
                    Some((k, n)) => format!(" {} ({k}/{n}) |", pct(*k as f64 / *n as f64)),
                    None => " – |".to_string(),
                };
            }
            s.push('\n');
        }
    }
    s
}

/// Writes each folder's report and returns `render_comparison` over them. A folder without base
/// or thinking results (an ablation run with `--modes hybrid`) takes them, in this table only,
/// from the first other folder of the same evaluation (dataset, models, prompts, length and
/// judge in config.json) that has them, so that its gap recovered is computed per problem
/// against them; its row names that folder.
pub fn comparison(outs: &[std::path::PathBuf]) -> Result<String> {
    let mut each = Vec::new();
    for out in outs {
        let (lines, config) = load_folder(out)?;
        let r = report_of(&lines, config.clone());
        write_report_files(out, &r)?;
        each.push((out, lines, config, r));
    }
    let has = |ls: &[ResultLine], m: EvalMode| ls.iter().any(|l| l.mode == m);
    let mut rows = Vec::new();
    for (i, (out, lines, config, r)) in each.iter().enumerate() {
        let missing: Vec<EvalMode> = [EvalMode::Base, EvalMode::Thinking]
            .into_iter()
            .filter(|&m| !has(lines, m))
            .collect();
        let donor = each.iter().enumerate().find(|(j, (_, ls, c, _))| {
            *j != i
                && !missing.is_empty()
                && same_evaluation(config.as_ref(), c.as_ref())
                && missing.iter().all(|&m| has(ls, m))
        });
        match donor {
            Some((_, (from, donor_lines, _, _))) => {
                let mut merged = lines.clone();
                merged.extend(
                    donor_lines
                        .iter()
                        .filter(|l| missing.contains(&l.mode))
                        .cloned(),
                );
                let name = format!(
                    "{} ({} from {})",
                    out.display(),
                    missing
                        .iter()
                        .map(|m| m.name())
                        .collect::<Vec<_>>()
                        .join(", "),
                    from.display()
                );
                rows.push((name, report_of(&merged, config.clone())));
            }
            None => rows.push((out.display().to_string(), r.clone())),
        }
    }
    Ok(render_comparison(&rows))
}

/// Whether two folders evaluate the same thing apart from the hybrid settings.
fn same_evaluation(a: Option<&super::run::RunConfig>, b: Option<&super::run::RunConfig>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            (
                &a.dataset,
                &a.base,
                &a.thinking,
                a.max_new_tokens,
                &a.judge_cmd,
            ) == (
                &b.dataset,
                &b.base,
                &b.thinking,
                b.max_new_tokens,
                &b.judge_cmd,
            )
        }
        _ => false,
    }
}

/// One table over several evaluation folders (e.g. one per ablation): per folder its hybrid
/// settings, each mode's accuracy, the gap recovered and the steered share.
pub fn render_comparison(reports: &[(String, Report)]) -> String {
    let mut s = String::from(
        "| folder | hybrid settings | base | thinking | hybrid | hybrid 95% CI | gap recovered | steered (mean per problem) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (name, r) in reports {
        let mode = |m: EvalMode| r.modes.iter().find(|s| s.mode == m);
        let acc = |m: EvalMode| {
            mode(m).map_or("–".to_string(), |s| {
                let awaiting = match s.awaiting_judge {
                    0 => String::new(),
                    a => format!(", {a} awaiting the judge"),
                };
                format!(
                    "{} ({}/{}{awaiting})",
                    pct(s.accuracy),
                    s.correct,
                    s.judged()
                )
            })
        };
        let hybrid = mode(EvalMode::Hybrid);
        s += &format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.hybrid_settings.as_deref().unwrap_or("–"),
            acc(EvalMode::Base),
            acc(EvalMode::Thinking),
            acc(EvalMode::Hybrid),
            hybrid.map_or("–".to_string(), |h| format!(
                "[{}, {}]",
                pct(h.ci_low),
                pct(h.ci_high)
            )),
            match &r.gap {
                Some(g) => g.recovered.map_or("n/a".to_string(), |x| format!(
                    "{} (on {} problems)",
                    pct(x),
                    g.problems
                )),
                None => "–".to_string(),
            },
            hybrid
                .and_then(|h| h.steered_mean)
                .map_or("–".to_string(), pct),
        );
    }
    s
}

/// Per category: its steered steps and, from the results that record them, the steps it was the
/// SAE's argmax (steered or not), the share of those steered, and its most frequent winning
/// (coefficient, window).
fn category_table(
    m: &ModeStats,
    steered: &[usize],
    titles: Option<&[String]>,
    random_firing: bool,
) -> String {
    let chosen = match random_firing {
        true => "steps it was drawn (--random-firing)",
        false => "steps as the SAE's argmax",
    };
    let mut s = format!(
        "\n| category | steered steps | {chosen} | steered of those | winning (coefficient, window), most frequent first |\n|---|---|---|---|---|\n",
    );
    for (i, x) in steered.iter().enumerate() {
        let name = match titles.and_then(|t| t.get(i)) {
            Some(t) => format!("{i}: {t}"),
            None => format!("{i}"),
        };
        let argmax = m.category_steps.as_ref().and_then(|f| f.get(i));
        let wins = m.category_cw_wins.as_ref().and_then(|w| w.get(i));
        // Every steered step has a winner, so the wins count the steered steps of these results.
        let (a, share) = match argmax {
            Some(&a) if a > 0 => {
                let won: usize = wins.map_or(0, |w| w.values().sum());
                (a.to_string(), pct(won as f64 / a as f64))
            }
            Some(_) => ("0".to_string(), "–".to_string()),
            None => ("–".to_string(), "–".to_string()),
        };
        s += &format!("| {name} | {x} | {a} | {share} | {} |\n", winners(wins));
    }
    if m.category_missing > 0 {
        s += &format!(
            "\n{} of the {} hybrid results predate the per-category counts: the last three columns leave them out.\n",
            m.category_missing, m.problems
        );
    }
    s
}

/// A category's winning (c, w) pairs as "(c, w) n", most frequent first (ties in numeric order),
/// the first three and how many more.
fn winners(wins: Option<&BTreeMap<String, usize>>) -> String {
    let Some(w) = wins.filter(|w| !w.is_empty()) else {
        return "–".to_string();
    };
    let mut v = numeric_order(w);
    v.sort_by(|a, b| b.1.cmp(a.1)); // stable: equal counts stay in numeric order
    let mut out: Vec<String> = v
        .iter()
        .take(3)
        .map(|(k, n)| format!("({}) {n}", k.replace(',', ", ")))
        .collect();
    if v.len() > 3 {
        out.push(format!("{} more", v.len() - 3));
    }
    out.join("; ")
}

/// The entries of a table keyed by numbers ("c" or "c,w") in numeric order of their parts
/// (−100 before −15 before −1, 0.5 before 10); a part that is not a number sorts last.
fn numeric_order(t: &BTreeMap<String, usize>) -> Vec<(&String, &usize)> {
    let parts = |k: &str| -> Vec<f64> {
        k.split(',')
            .map(|x| x.trim().parse().unwrap_or(f64::INFINITY))
            .collect()
    };
    let mut v: Vec<_> = t.iter().collect();
    v.sort_by(|a, b| {
        let (pa, pb) = (parts(a.0), parts(b.0));
        let by_part = pa.iter().zip(&pb).map(|(x, y)| x.total_cmp(y));
        by_part
            .chain([pa.len().cmp(&pb.len()), a.0.cmp(b.0)])
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    v
}

/// Writes OUT/report.md and OUT/report.json; returns the Markdown and the report.
pub fn write_report(out: &Path) -> Result<(String, Report)> {
    let r = load_report(out)?;
    let md = write_report_files(out, &r)?;
    Ok((md, r))
}

/// Writes `r` into `out` (report.md, report.svg, report.json); returns the Markdown.
fn write_report_files(out: &Path, r: &Report) -> Result<String> {
    let bars: Vec<crate::chart::Bar> = r
        .modes
        .iter()
        .map(|m| crate::chart::Bar {
            label: m.mode.name().to_string(),
            value: m.accuracy,
            interval: Some((m.ci_low, m.ci_high)),
        })
        .collect();
    let svg = crate::chart::bar_chart_svg(
        "Accuracy per mode (95% Wilson interval)",
        "accuracy",
        &bars,
        1.0,
        true,
    );
    let svg_path = out.join("report.svg");
    crate::files::write_atomic(&svg_path, svg)?;
    let md = render_markdown(r) + "\n![accuracy per mode](report.svg)\n";
    let md_path = out.join("report.md");
    crate::files::write_atomic(&md_path, &md)?;
    let json_path = out.join("report.json");
    let json = serde_json::to_string_pretty(r).expect("report serialises");
    crate::files::write_atomic(&json_path, json + "\n")?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_known_values() {
        // 8 of 10: the textbook Wilson interval is [0.490, 0.943].
        let (lo, hi) = wilson(8, 10);
        assert!(
            (lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(0, 5);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.4345).abs() < 1e-3, "{hi}");
    }

    #[test]
    fn wins_tables_are_in_numeric_order() {
        let t: BTreeMap<String, usize> = ["10,-1", "0.5,-1", "0.5,-15", "0.5,0", "0.5,-100", "2,x"]
            .iter()
            .enumerate()
            .map(|(i, k)| (k.to_string(), i))
            .collect();
        let keys: Vec<&str> = numeric_order(&t).iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["0.5,-100", "0.5,-15", "0.5,-1", "0.5,0", "2,x", "10,-1"]
        );
    }

    #[test]
    fn mixed_devices_are_named() {
        let line = |i: usize, device: Option<&str>| -> ResultLine {
            let mut v = serde_json::json!({
                "index": i, "mode": "base", "question": "q", "reference": "1", "response": "1",
                "extracted": "1", "correct": true, "tokens": 3, "seconds": 0.1, "batch": "0",
            });
            if let Some(d) = device {
                v["device"] = d.into();
            }
            serde_json::from_value(v).unwrap()
        };
        let md = |lines: &[ResultLine]| render_markdown(&summarize(lines));
        let mixed = md(&[line(0, Some("cpu")), line(1, Some("cuda")), line(2, None)]);
        assert!(
            mixed.contains("**Mixed devices** (result lines: cpu 1, cuda 1)"),
            "{mixed}"
        );
        for one in [
            md(&[line(0, Some("cuda")), line(1, Some("cuda"))]),
            md(&[line(0, Some("cpu")), line(1, None)]),
        ] {
            assert!(!one.contains("Mixed"), "{one}");
        }
    }

    #[test]
    fn gap_formula() {
        assert_eq!(
            gap_recovered(0.4, 0.8, 0.7),
            Some((0.7 - 0.4) / (0.8 - 0.4))
        );
        assert_eq!(gap_recovered(0.4, 0.8, 0.3), Some(0.0));
        assert_eq!(gap_recovered(0.5, 0.5, 0.6), None);
        // The thinking model worse than the base: the gap is measured from the lower one.
        assert_eq!(gap_recovered(0.8, 0.4, 0.6), Some((0.6 - 0.4) / 0.4));
    }
}
