//! Categories of sentences (hybrid.md §2.1: argmax of the SAE encoder output over all K
//! latents) and the report a person reads to name them: per category the count, the share and
//! the 20 most activating sentences, and a table of which category follows which in a trace.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Error, Result};
use crate::sae::{argmax, Sae};

use super::activations::{read_index, read_jsonl, write_jsonl, Acts};

/// Sentences listed per category in the report.
pub const TOP_SENTENCES: usize = 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Annotation {
    pub trace: usize,
    pub sentence: String,
    /// Byte range of the sentence in the trace's `text`.
    pub start: usize,
    pub end: usize,
    /// Token range in the thinking model's tokenisation of `prompt + text`.
    pub tokens: (usize, usize),
    pub category: usize,
    /// The winning latent's encoder output.
    pub activation: f32,
    /// K, the SAE's number of latents (so that consumers know empty categories exist).
    pub latents: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

pub fn read_annotations(path: &Path) -> Result<Vec<Annotation>> {
    read_jsonl(
        path,
        "an annotation {\"trace\", \"sentence\", \"start\", \"end\", \"tokens\", \"category\", \"activation\", \"latents\"}",
    )
}

/// Titles from a JSON list of strings or from one name per non-empty line; exactly K of them.
pub fn read_titles(path: &Path, latents: usize) -> Result<Vec<String>> {
    let text = crate::files::read_text(path)?;
    let titles: Vec<String> = match serde_json::from_str::<Vec<String>>(&text) {
        Ok(t) => t,
        Err(_) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
    };
    if titles.len() != latents {
        bail!(
            "{}: expected {latents} titles (one per SAE latent, as a JSON list or one per line), found {}",
            path.display(),
            titles.len()
        );
    }
    Ok(titles)
}

/// Encodes every activation row: (categories, encoder outputs [N, K]). Errors when the widths
/// or the block differ.
pub fn categorise(sae: &Sae, acts: &Acts) -> Result<(Vec<usize>, Vec<f32>)> {
    if acts.d != sae.d {
        bail!(
            "activations have width D = {}, expected the SAE's width {} (SAE of model '{}')",
            acts.d,
            sae.d,
            sae.model
        );
    }
    if acts.layer != sae.layer {
        bail!(
            "activations come from block {}, expected the SAE's block {}",
            acts.layer,
            sae.layer
        );
    }
    let kk = sae.latents;
    let mut zs = vec![0f32; acts.n * kk];
    let mut cats = Vec::with_capacity(acts.n);
    for (i, z) in zs.chunks_exact_mut(kk).enumerate() {
        // The stored rows are already the centred unit-norm x that `Sae::encode` would make
        // from a raw activation, so they go through the encoder as they are.
        sae.encode_raw(acts.row(i), z);
        cats.push(argmax(z));
    }
    Ok((cats, zs))
}

/// The `annotate` command: writes `out_dir/annotations.jsonl` and `out_dir/report.md`, and
/// with `titles_path` the SAE named by them (`out_dir/sae.safetensors`: the same weights with
/// `titles` metadata, so that `hybrid` and `eval` reports name the categories). Returns the count
/// per category.
pub fn annotate(
    sae_path: &Path,
    acts_path: &Path,
    index_path: &Path,
    titles_path: Option<&Path>,
    out_dir: &Path,
) -> Result<Vec<usize>> {
    let sae = Sae::load(sae_path)?;
    let acts = Acts::load(acts_path)?;
    let index = read_index(index_path)?;
    if index.len() != acts.n {
        bail!(
            "{}: {} index rows, expected one per activation row of {} ({})",
            index_path.display(),
            index.len(),
            acts_path.display(),
            acts.n
        );
    }
    let titles = match titles_path {
        Some(p) => Some(read_titles(p, sae.latents)?),
        None => sae.titles.clone(),
    };
    let (cats, zs) = categorise(&sae, &acts)?;
    let kk = sae.latents;
    let rows: Vec<Annotation> = index
        .into_iter()
        .enumerate()
        .map(|(i, r)| Annotation {
            trace: r.trace,
            sentence: r.sentence,
            start: r.start,
            end: r.end,
            tokens: r.tokens,
            category: cats[i],
            activation: zs[i * kk + cats[i]],
            latents: kk,
            title: titles.as_ref().map(|t| t[cats[i]].clone()),
        })
        .collect();
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    write_jsonl(&out_dir.join("annotations.jsonl"), &rows)?;
    if titles_path.is_some() {
        let named = Sae {
            titles: titles.clone(),
            ..sae.clone()
        };
        named.save(titled_sae_path(out_dir))?;
    }
    let mut counts = vec![0; kk];
    rows.iter().for_each(|r| counts[r.category] += 1);
    let bars: Vec<crate::chart::Bar> = counts
        .iter()
        .enumerate()
        .map(|(c, &n)| crate::chart::Bar {
            label: titles.as_ref().map_or(format!("{c}"), |t| t[c].clone()),
            value: n as f64 / rows.len().max(1) as f64,
            interval: None,
        })
        .collect();
    let svg =
        crate::chart::bar_chart_svg("Share of sentences per category", "share", &bars, 1.0, true);
    let svg_path = out_dir.join("categories.svg");
    crate::files::write_atomic(&svg_path, svg)?;
    let md = report(sae_path, &rows, &zs, kk, titles.as_deref())
        + "\n![share per category](categories.svg)\n";
    let p = out_dir.join("report.md");
    crate::files::write_atomic(&p, md)?;
    Ok(counts)
}

/// Where `annotate --titles` writes the SAE named by its titles.
pub fn titled_sae_path(out_dir: &Path) -> std::path::PathBuf {
    out_dir.join("sae.safetensors")
}

/// transitions[a][b] = how often a sentence of category b directly follows one of category a
/// in the same trace (rows are in trace order, as the index writes them).
pub fn transitions(rows: &[Annotation], kk: usize) -> Vec<Vec<usize>> {
    let mut t = vec![vec![0; kk]; kk];
    for w in rows.windows(2) {
        if w[0].trace == w[1].trace {
            t[w[0].category][w[1].category] += 1;
        }
    }
    t
}

fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn report(
    sae_path: &Path,
    rows: &[Annotation],
    zs: &[f32],
    kk: usize,
    titles: Option<&[String]>,
) -> String {
    let n = rows.len();
    let name = |c: usize| match titles {
        Some(t) => format!("{c}: {}", t[c]),
        None => format!("{c}"),
    };
    let mut counts = vec![0usize; kk];
    rows.iter().for_each(|r| counts[r.category] += 1);
    let mut s = String::new();
    let _ = writeln!(s, "# Reasoning categories\n");
    let _ = writeln!(
        s,
        "SAE `{}`: K = {kk} latents; {n} sentences. A sentence's category is the argmax of the encoder output over all latents.\n",
        sae_path.display()
    );
    let _ = writeln!(s, "| category | sentences | share |");
    let _ = writeln!(s, "|---|---|---|");
    for (c, &cnt) in counts.iter().enumerate() {
        let share = 100.0 * cnt as f64 / n.max(1) as f64;
        let _ = writeln!(s, "| {} | {cnt} | {share:.1}% |", name(c));
    }
    for c in 0..kk {
        let _ = writeln!(s, "\n## Category {}\n", name(c));
        let mut mine: Vec<usize> = (0..n).filter(|&i| rows[i].category == c).collect();
        if mine.is_empty() {
            let _ = writeln!(s, "No sentence has this category.");
            continue;
        }
        // Most activating first; the stable sort keeps file order on ties.
        mine.sort_by(|&a, &b| zs[b * kk + c].total_cmp(&zs[a * kk + c]));
        let _ = writeln!(
            s,
            "{} sentence{} ({:.1}%). The {} most activating:\n",
            mine.len(),
            if mine.len() == 1 { "" } else { "s" },
            100.0 * mine.len() as f64 / n.max(1) as f64,
            mine.len().min(TOP_SENTENCES)
        );
        for &i in mine.iter().take(TOP_SENTENCES) {
            let _ = writeln!(
                s,
                "1. ({:.3}, trace {}) {}",
                zs[i * kk + c],
                rows[i].trace,
                one_line(&rows[i].sentence)
            );
        }
    }
    let t = transitions(rows, kk);
    let _ = writeln!(
        s,
        "\n## Transitions\n\nRow: category of a sentence; column: category of the next sentence in the same trace; entries are counts.\n"
    );
    let head: Vec<String> = (0..kk).map(|c| c.to_string()).collect();
    let _ = writeln!(s, "| from \\ to | {} |", head.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(kk));
    for (a, row) in t.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        let _ = writeln!(s, "| {} | {} |", name(a), cells.join(" | "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(trace: usize, category: usize) -> Annotation {
        Annotation {
            trace,
            sentence: String::new(),
            start: 0,
            end: 0,
            tokens: (0, 0),
            category,
            activation: 0.0,
            latents: 3,
            title: None,
        }
    }

    #[test]
    fn transitions_stay_within_a_trace() {
        let rows = [a(0, 0), a(0, 2), a(0, 2), a(1, 1), a(1, 0)];
        let t = transitions(&rows, 3);
        assert_eq!(t, vec![vec![0, 0, 1], vec![1, 0, 0], vec![0, 0, 1]]);
    }
}
