//! SAE training over several dictionary sizes (hybrid.md §2.1: K = 5..50, k = 3): one SAE file
//! per size, carrying the activation mean so that `Sae::encode` centres and normalises raw
//! activations the way the training data was, and `fvu.md`, the table that picks one size.
//! Each size's settings and report are kept beside its SAE (`sae-K.run.json`), so a rerun after
//! a kill, or with more sizes, keeps the sizes already trained on the same data and settings
//! (training is deterministic: a kept SAE is the file a new run would write).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Error, Result};
use crate::train_sae::{train, TrainConfig, TrainReport};

use super::activations::Acts;

/// A size is picked when its validation FVU is within this much of the best size's: the
/// smallest such K wins (fewer categories are easier to name and to steer with).
pub const PICK_WITHIN: f32 = 0.01;

#[derive(Clone, Debug)]
pub struct SizeResult {
    pub latents: usize,
    pub path: PathBuf,
    pub report: TrainReport,
    /// Kept from an earlier run with the same activations and settings (not trained again).
    pub kept: bool,
}

/// What a size's SAE was trained from, and how training went: `sae-K.run.json`, written after
/// the SAE file, so that it exists only beside a whole SAE.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct SizeRun {
    /// `fnv1a` of the activation rows, their mean, layer and model, in hex.
    acts: String,
    config: TrainConfig,
    report: TrainReport,
}

fn acts_fingerprint(acts: &Acts) -> String {
    use crate::rng::{fnv1a_extend, FNV1A_START};
    let h = acts
        .activations
        .iter()
        .chain(&acts.mean)
        .fold(FNV1A_START, |h, x| fnv1a_extend(h, &x.to_le_bytes()));
    let h = fnv1a_extend(h, format!("{} {}", acts.layer, acts.model).as_bytes());
    format!("{h:016x}")
}

/// The report of `sae` when `run` records the same activations and settings; None when either
/// file is missing or unreadable (a kill before the run file was whole) or anything differs.
fn kept_report(sae: &Path, run: &Path, acts: &str, cfg: &TrainConfig) -> Option<TrainReport> {
    let text = std::fs::read_to_string(run).ok()?;
    let was: SizeRun = serde_json::from_str(&text).ok()?;
    let same = was.acts == acts && was.config == *cfg;
    // The SAE file must still load (it is written before the run file, so only a file changed
    // by hand since fails here).
    (same && crate::sae::Sae::load(sae).is_ok()).then_some(was.report)
}

/// The FVU a size is judged by: validation FVU, or the best epoch's train FVU when some size's
/// validation FVU is not finite (a held-out split of one row has no variance of its own).
fn judged_fvu(results: &[SizeResult]) -> (Vec<f32>, &'static str) {
    if results.iter().all(|r| r.report.final_val_fvu.is_finite()) {
        let v = results.iter().map(|r| r.report.final_val_fvu).collect();
        (v, "validation FVU")
    } else {
        let v = results
            .iter()
            .map(|r| {
                let rep = &r.report;
                rep.train_fvu
                    .get(rep.best_epoch)
                    .copied()
                    .unwrap_or(f32::INFINITY)
            })
            .collect();
        (
            v,
            "train FVU (some validation FVU is not finite: the held-out split is too small)",
        )
    }
}

/// The smallest K whose FVU ≤ best FVU + PICK_WITHIN (see `judged_fvu`), and what was judged;
/// None for no results.
pub fn pick_size(results: &[SizeResult]) -> Option<(usize, &'static str)> {
    let (fvu, what) = judged_fvu(results);
    let best = fvu.iter().copied().fold(f32::INFINITY, f32::min);
    results
        .iter()
        .zip(&fvu)
        .filter(|(_, &f)| f <= best + PICK_WITHIN)
        .map(|(r, _)| r.latents)
        .min()
        .map(|k| (k, what))
}

/// Trains one SAE per entry of `sizes` on `acts_path` into `out_dir/sae-K.safetensors` and
/// writes `out_dir/fvu.md`. `base` supplies k, seed and the other hyperparameters.
pub fn train_sizes(
    acts_path: &Path,
    sizes: &[usize],
    base: &TrainConfig,
    out_dir: &Path,
    mut progress: impl FnMut(usize, usize, f32, f32),
) -> Result<Vec<SizeResult>> {
    if sizes.is_empty() {
        bail!("expected at least one dictionary size in --latents, found none");
    }
    // Every size before the first is trained, not after it.
    if let Some(kk) = sizes.iter().find(|&&kk| base.k > kk) {
        bail!(
            "--latents {kk}: expected every size at least --k {}, found one below it",
            base.k
        );
    }
    let acts = Acts::load(acts_path)?;
    // Parameters θ = 2·K·D + K + D in f32, with Adam's two moments, the gradient, the best θ and
    // per-chunk gradients: at least eight copies of θ.
    let kk = sizes.iter().copied().max().unwrap_or(1);
    let theta = kk.saturating_mul(2 * acts.d + 1).saturating_add(acts.d);
    crate::memory::check_fits(theta.saturating_mul(32), &format!("--latents {kk}"))?;
    let fingerprint = acts_fingerprint(&acts);
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut results = Vec::new();
    for &kk in sizes {
        let cfg = TrainConfig {
            latents: kk,
            ..base.clone()
        };
        let path = out_dir.join(format!("sae-{kk}.safetensors"));
        let run_path = out_dir.join(format!("sae-{kk}.run.json"));
        if let Some(report) = kept_report(&path, &run_path, &fingerprint, &cfg) {
            results.push(SizeResult {
                latents: kk,
                path,
                report,
                kept: true,
            });
            continue;
        }
        // An old run file must not vouch for the SAE while it is rewritten.
        match std::fs::remove_file(&run_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(&run_path, e))
            }
            _ => {}
        }
        let (mut sae, report) = train(&acts.activations, acts.n, acts.d, &cfg, |e, tr, va| {
            progress(kk, e, tr, va)
        })?;
        sae.activation_mean = Some(acts.mean.clone());
        sae.layer = acts.layer;
        sae.model = acts.model.clone();
        sae.save(&path)?;
        let run = SizeRun {
            acts: fingerprint.clone(),
            config: cfg,
            report,
        };
        let text = serde_json::to_string_pretty(&run).expect("plain rows always serialise") + "\n";
        crate::files::write_atomic(&run_path, text.as_bytes())?;
        results.push(SizeResult {
            latents: kk,
            path,
            report: run.report,
            kept: false,
        });
    }
    let md = fvu_table(acts_path, &acts, base, &results);
    let p = out_dir.join("fvu.md");
    crate::files::write_atomic(&p, md)?;
    Ok(results)
}

fn fvu_table(acts_path: &Path, acts: &Acts, base: &TrainConfig, rs: &[SizeResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# SAE dictionary sizes\n");
    let _ = writeln!(
        s,
        "Activations: `{}` ({} sentences × D = {}, block {} of `{}`). Top-k = {}, batch {}, up to {} epochs, patience {}, seed {}, validation fraction {}.\n",
        acts_path.display(),
        acts.n,
        acts.d,
        acts.layer,
        acts.model,
        base.k,
        base.batch,
        base.max_epochs,
        base.patience,
        base.seed,
        base.val_fraction
    );
    let _ = writeln!(
        s,
        "| K | lr | epochs run | best epoch | train FVU | validation FVU | file |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in rs {
        let rep = &r.report;
        let _ = writeln!(
            s,
            "| {} | {:.3e} | {} | {} | {:.4} | {:.4} | `{}` |",
            r.latents,
            rep.lr,
            rep.val_fvu.len(),
            rep.best_epoch + 1,
            rep.train_fvu
                .get(rep.best_epoch)
                .copied()
                .unwrap_or(f32::NAN),
            rep.final_val_fvu,
            r.path.file_name().unwrap_or_default().to_string_lossy()
        );
    }
    if let Some((k, what)) = pick_size(rs) {
        let _ = writeln!(
            s,
            "\nRule: the smallest K whose {what} is within {PICK_WITHIN} of the best size's."
        );
        let _ = writeln!(s, "\nPicked: **K = {k}** (`sae-{k}.safetensors`).");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(latents: usize, fvu: f32) -> SizeResult {
        SizeResult {
            latents,
            path: PathBuf::new(),
            report: TrainReport {
                train_fvu: vec![fvu + 0.5],
                val_fvu: vec![],
                best_epoch: 0,
                final_val_fvu: fvu,
                lr: 0.0,
                n_train: 0,
                n_val: 0,
            },
            kept: false,
        }
    }

    #[test]
    fn picks_smallest_within_margin() {
        let k = |rs: &[SizeResult]| pick_size(rs).map(|p| p.0);
        assert_eq!(k(&[r(5, 0.50), r(10, 0.305), r(15, 0.30)]), Some(10));
        assert_eq!(k(&[r(15, 0.30), r(5, 0.20)]), Some(5));
        assert_eq!(k(&[]), None);
        // A non-finite validation FVU switches every size to train FVU (val + 0.5 here).
        let mut rs = vec![r(5, 0.40), r(10, 0.30)];
        rs[0].report.final_val_fvu = f32::INFINITY;
        assert_eq!(k(&rs), Some(10));
        assert!(pick_size(&rs).unwrap().1.starts_with("train FVU"));
    }
}
