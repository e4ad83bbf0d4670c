//! Top-k SAE training (hybrid.md §2.1) on sentence activations [N, D] that are already centred
//! and unit-norm: hand-written forward and backward, Adam, early stopping on a held-out split.
//!
//! Choices the spec leaves open (stated once here):
//! - kept latents use their pre-activation values as they are (no ReLU) unless `relu` is set;
//!   ties in the top-k go to the lower latent index;
//! - init: decoder rows random unit vectors, encoder = decoder transpose, b_enc = 0,
//!   b_dec = mean of the training split (≈ 0 for centred data, but exact for uncentred data);
//! - the held-out split is `val_fraction` (default 0.1) of the rows, drawn by the seed; early
//!   stopping watches its FVU (over the whole split, with the split's own mean) and the best
//!   epoch's weights are returned;
//! - a batch's FVU uses that batch's mean in the denominator; the epoch's train FVU is the mean
//!   over batches; a batch whose rows are all equal (zero variance) is skipped;
//! - determinism: a batch is cut into fixed chunks of `CHUNK` rows whatever the thread count,
//!   each chunk writes its own gradient buffer, and the buffers are summed in chunk order.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::Result;
use crate::rng::Rng;
use crate::sae::{transpose, Sae};

/// Rows per gradient chunk: the unit of parallel work and of the fixed reduction order.
const CHUNK: usize = 64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub latents: usize,
    pub k: usize,
    /// None: the spec's 2e-4 / sqrt(K / 2^14).
    pub lr: Option<f32>,
    pub batch: usize,
    pub max_epochs: usize,
    pub patience: usize,
    pub seed: u64,
    pub val_fraction: f32,
    /// Apply ReLU to the kept latents (off by default: values are used as they are).
    pub relu: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            latents: 15,
            k: 3,
            lr: None,
            batch: 512,
            max_epochs: 300,
            patience: 10,
            seed: 0,
            val_fraction: 0.1,
            relu: false,
        }
    }
}

impl TrainConfig {
    pub fn learning_rate(&self) -> f32 {
        self.lr
            .unwrap_or_else(|| 2e-4 / (self.latents as f32 / 16384.0).sqrt())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    pub train_fvu: Vec<f32>, // per epoch
    pub val_fvu: Vec<f32>,   // per epoch
    pub best_epoch: usize,   // 0-based
    pub final_val_fvu: f32,  // val FVU of the returned (best) weights
    pub lr: f32,
    pub n_train: usize,
    pub n_val: usize,
}

/// Flat parameter vector θ = [enc (K·D) | dec (K·D) | b_enc (K) | b_dec (D)]. The encoder is
/// held transposed ([K, D], one latent's weights contiguous) for contiguous dot products; it
/// becomes the file's [D, K] at the end.
#[derive(Clone, Copy, Debug)]
struct Layout {
    d: usize,
    kk: usize,
}

impl Layout {
    fn enc(&self) -> std::ops::Range<usize> {
        0..self.kk * self.d
    }
    fn dec(&self) -> std::ops::Range<usize> {
        self.kk * self.d..2 * self.kk * self.d
    }
    fn b_enc(&self) -> std::ops::Range<usize> {
        2 * self.kk * self.d..2 * self.kk * self.d + self.kk
    }
    fn b_dec(&self) -> std::ops::Range<usize> {
        let s = 2 * self.kk * self.d + self.kk;
        s..s + self.d
    }
    fn len(&self) -> usize {
        2 * self.kk * self.d + self.kk + self.d
    }
}

/// Per-chunk scratch: x − b_dec [D], pre-activations [K], residual [D], kept latents [k].
struct Scratch {
    xc: Vec<f32>,
    pre: Vec<f32>,
    r: Vec<f32>,
    top: Vec<usize>,
}

impl Scratch {
    fn new(lay: Layout) -> Self {
        Scratch {
            xc: vec![0.0; lay.d],
            pre: vec![0.0; lay.kk],
            r: vec![0.0; lay.d],
            top: Vec::new(),
        }
    }
}

/// Dot product with 8 independent accumulators so that it vectorises; the summation order is
/// fixed, so results do not depend on threads.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Indices of the k largest entries of `pre`, ties to the lower index, into `top`.
fn top_k(pre: &[f32], k: usize, top: &mut Vec<usize>) {
    top.clear();
    for j in 0..pre.len() {
        // Insert j if it beats the current k-th; strict > keeps earlier indices on ties.
        let pos = top
            .iter()
            .position(|&t| pre[j] > pre[t])
            .unwrap_or(top.len());
        if pos < k {
            top.insert(pos, j);
            top.truncate(k);
        }
    }
}

/// Forward of one row x [D]: fills s.xc, s.pre, s.top and the residual s.r = x̂ − x; returns Σr².
fn forward_row(
    theta: &[f32],
    lay: Layout,
    k: usize,
    relu: bool,
    x: &[f32],
    s: &mut Scratch,
) -> f64 {
    let d = lay.d;
    let enc = &theta[lay.enc()];
    let dec = &theta[lay.dec()];
    let b_enc = &theta[lay.b_enc()];
    let b_dec = &theta[lay.b_dec()];
    for i in 0..d {
        s.xc[i] = x[i] - b_dec[i];
    }
    for j in 0..lay.kk {
        s.pre[j] = dot(&enc[j * d..(j + 1) * d], &s.xc) + b_enc[j];
    }
    top_k(&s.pre, k, &mut s.top);
    for i in 0..d {
        s.r[i] = b_dec[i] - x[i];
    }
    for &j in &s.top {
        let zj = if relu { s.pre[j].max(0.0) } else { s.pre[j] };
        axpy(&mut s.r, zj, &dec[j * d..(j + 1) * d]);
    }
    s.r.iter().map(|&v| v as f64 * v as f64).sum()
}

/// Forward and backward over `rows`, adding ∂(Σ‖x̂ − x‖²)/∂θ (the loss numerator; the caller
/// divides by the batch's denominator) into `grad` [θ]. Returns the numerator. Gradient flows
/// only through the kept latents.
fn grad_rows<'a>(
    theta: &[f32],
    lay: Layout,
    k: usize,
    relu: bool,
    rows: impl Iterator<Item = &'a [f32]>,
    grad: &mut [f32],
    s: &mut Scratch,
) -> f64 {
    let d = lay.d;
    let mut num = 0.0f64;
    for x in rows {
        num += forward_row(theta, lay, k, relu, x, s);
        // g = ∂/∂x̂ Σr² = 2r; reuse s.r in place.
        for v in s.r.iter_mut() {
            *v *= 2.0;
        }
        let (g_head, g_tail) = grad.split_at_mut(lay.b_enc().start);
        let (g_enc, g_dec) = g_head.split_at_mut(lay.kk * d);
        let (g_benc, g_bdec) = g_tail.split_at_mut(lay.kk);
        // x̂ = b_dec + Σ z_j dec_j: ∂/∂b_dec += g.
        axpy(g_bdec, 1.0, &s.r);
        for &j in &s.top {
            let dec_j = &theta[lay.dec()][j * d..(j + 1) * d];
            let enc_j = &theta[lay.enc()][j * d..(j + 1) * d];
            let zj = if relu { s.pre[j].max(0.0) } else { s.pre[j] };
            // ∂/∂dec_j = z_j g; ∂/∂pre_j = dec_j · g (zero where ReLU clips).
            axpy(&mut g_dec[j * d..(j + 1) * d], zj, &s.r);
            let gz = if relu && s.pre[j] <= 0.0 {
                0.0
            } else {
                dot(dec_j, &s.r)
            };
            // pre_j = enc_j · (x − b_dec) + b_enc_j.
            axpy(&mut g_enc[j * d..(j + 1) * d], gz, &s.xc);
            g_benc[j] += gz;
            axpy(g_bdec, -gz, enc_j);
        }
    }
    num
}

/// Σ‖x − mean‖² over rows, in f64 (the FVU denominator).
fn variance_sum<'a>(rows: impl Iterator<Item = &'a [f32]> + Clone, d: usize) -> f64 {
    let mut mean = vec![0.0f64; d];
    let mut n = 0usize;
    for x in rows.clone() {
        for (m, v) in mean.iter_mut().zip(x) {
            *m += *v as f64;
        }
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    rows.map(|x| {
        x.iter()
            .zip(&mean)
            .map(|(v, m)| (*v as f64 - m) * (*v as f64 - m))
            .sum::<f64>()
    })
    .sum()
}

/// The rows of acts [N, D] listed in `ix`.
fn rows_of<'a, 'b>(
    acts: &'a [f32],
    d: usize,
    ix: &'b [usize],
) -> impl Iterator<Item = &'a [f32]> + Clone + 'b
where
    'a: 'b,
{
    ix.iter().map(move |&r| &acts[r * d..(r + 1) * d])
}

/// Holds the data, the split, θ and Adam's state; one call of `epoch` is one pass over the
/// training split plus a validation pass.
pub struct Trainer<'a> {
    acts: &'a [f32], // [N, D]
    lay: Layout,
    cfg: TrainConfig,
    lr: f32,
    train_idx: Vec<usize>,
    val_idx: Vec<usize>,
    val_denom: f64,
    rng: Rng,
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    step: u64,
    chunk_grads: Vec<Vec<f32>>, // [batch / CHUNK][θ]
    grad: Vec<f32>,             // [θ]
    best_theta: Vec<f32>,
    report: TrainReport,
    epochs_done: usize,
}

impl<'a> Trainer<'a> {
    pub fn new(acts: &'a [f32], n: usize, d: usize, cfg: &TrainConfig) -> Result<Self> {
        if d == 0 || acts.len() != n * d {
            bail!(
                "SAE training: activations hold {} values, expected N·D = {n}·{d} with D >= 1",
                acts.len()
            );
        }
        if cfg.latents == 0 || cfg.k == 0 || cfg.k > cfg.latents {
            bail!(
                "SAE training: top-k = {} with {} latents, expected 1 <= k <= latents",
                cfg.k,
                cfg.latents
            );
        }
        if cfg.batch == 0 {
            bail!("SAE training: batch size 0, expected >= 1");
        }
        if !(0.0..1.0).contains(&cfg.val_fraction) {
            bail!(
                "SAE training: validation fraction {}, expected a value in [0, 1)",
                cfg.val_fraction
            );
        }
        if let Some(i) = acts.iter().position(|v| !v.is_finite()) {
            bail!(
                "SAE training: activation row {} column {} is {}, expected finite values",
                i / d,
                i % d,
                acts[i]
            );
        }
        if variance_sum(acts.chunks_exact(d), d) == 0.0 {
            bail!(
                "SAE training: all {n} activation rows are equal: expected rows that differ (the fraction of variance unexplained has no variance to divide by)"
            );
        }
        let n_val = ((n as f64) * cfg.val_fraction as f64).round() as usize;
        let n_val = if cfg.val_fraction > 0.0 {
            n_val.max(1)
        } else {
            0
        };
        if n < n_val + 2 {
            bail!(
                "SAE training: {n} activation rows, expected at least {} (2 to train on plus {n_val} held out)",
                n_val + 2
            );
        }
        let mut rng = Rng::new(cfg.seed);
        let mut idx: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut idx);
        let mut val_idx = idx.split_off(n - n_val);
        let mut train_idx = idx;
        // A held-out split without variance around its own mean (one row, or equal rows) has no
        // FVU: early stopping would keep the first epoch's weights. Its rows train instead, and
        // training stops on the train FVU, as with no split.
        let val_denom = variance_sum(val_idx.iter().map(|&r| &acts[r * d..(r + 1) * d]), d);
        if val_denom == 0.0 {
            train_idx.append(&mut val_idx);
        }

        let lay = Layout { d, kk: cfg.latents };
        let mut theta = vec![0.0f32; lay.len()];
        for row in theta[lay.dec()].chunks_exact_mut(d) {
            rng.direction(row, 1.0);
        }
        let dec = theta[lay.dec()].to_vec();
        theta[lay.enc()].copy_from_slice(&dec);
        let mut mean = vec![0.0f64; d];
        for &r in &train_idx {
            for (m, v) in mean.iter_mut().zip(&acts[r * d..(r + 1) * d]) {
                *m += *v as f64;
            }
        }
        for (t, m) in theta[lay.b_dec()].iter_mut().zip(&mean) {
            *t = (m / train_idx.len() as f64) as f32;
        }

        // A batch holds at most every training row, whatever --batch says.
        let n_chunks = cfg.batch.min(train_idx.len()).div_ceil(CHUNK);
        let lr = cfg.learning_rate();
        Ok(Trainer {
            acts,
            lay,
            cfg: cfg.clone(),
            lr,
            report: TrainReport {
                train_fvu: vec![],
                val_fvu: vec![],
                best_epoch: 0,
                final_val_fvu: f32::INFINITY,
                lr,
                n_train: train_idx.len(),
                n_val: val_idx.len(),
            },
            train_idx,
            val_idx,
            val_denom,
            rng,
            m: vec![0.0; lay.len()],
            v: vec![0.0; lay.len()],
            step: 0,
            chunk_grads: vec![vec![0.0; lay.len()]; n_chunks],
            grad: vec![0.0; lay.len()],
            best_theta: theta.clone(),
            theta,
            epochs_done: 0,
        })
    }

    fn row(&self, r: usize) -> &'a [f32] {
        &self.acts[r * self.lay.d..(r + 1) * self.lay.d]
    }

    /// One Adam step on the rows `batch` (indices into acts); returns the batch FVU, or None
    /// for a zero-variance batch (skipped).
    fn train_step(&mut self, batch: &[usize]) -> Option<f32> {
        let (lay, k, relu) = (self.lay, self.cfg.k, self.cfg.relu);
        let acts = self.acts;
        let d = lay.d;
        let denom = variance_sum(rows_of(acts, d, batch), d);
        if denom <= 0.0 {
            return None;
        }
        let theta = &self.theta;
        let n_chunks = batch.len().div_ceil(CHUNK);
        let nums: Vec<f64> = self.chunk_grads[..n_chunks]
            .par_iter_mut()
            .zip(batch.par_chunks(CHUNK))
            .map(|(g, ix)| {
                g.iter_mut().for_each(|x| *x = 0.0);
                let mut s = Scratch::new(lay);
                grad_rows(theta, lay, k, relu, rows_of(acts, d, ix), g, &mut s)
            })
            .collect();
        let num: f64 = nums.iter().sum();
        // Reduce chunk gradients in chunk order, parallel over disjoint parameter ranges.
        let scale = (1.0 / denom) as f32;
        let cg = &self.chunk_grads[..n_chunks];
        self.grad
            .par_chunks_mut(4096)
            .enumerate()
            .for_each(|(p, out)| {
                let off = p * 4096;
                out.copy_from_slice(&cg[0][off..off + out.len()]);
                for c in &cg[1..] {
                    axpy(out, 1.0, &c[off..off + out.len()]);
                }
                out.iter_mut().for_each(|x| *x *= scale);
            });
        self.adam();
        self.renorm_decoder();
        Some((num / denom) as f32)
    }

    fn adam(&mut self) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        const EPS: f32 = 1e-8;
        self.step += 1;
        let c1 = (1.0 - B1.powi(self.step as i32)) as f32;
        let c2 = (1.0 - B2.powi(self.step as i32)) as f32;
        let lr = self.lr;
        let (b1, b2) = (B1 as f32, B2 as f32);
        self.theta
            .par_chunks_mut(4096)
            .zip(self.m.par_chunks_mut(4096))
            .zip(self.v.par_chunks_mut(4096))
            .zip(self.grad.par_chunks(4096))
            .for_each(|(((t, m), v), g)| {
                for i in 0..t.len() {
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    let mh = m[i] / c1;
                    let vh = v[i] / c2;
                    t[i] -= lr * mh / (vh.sqrt() + EPS);
                }
            });
    }

    fn renorm_decoder(&mut self) {
        let d = self.lay.d;
        let r = self.lay.dec();
        for row in self.theta[r].chunks_exact_mut(d) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            // A row that collapsed to zero keeps its direction undefined; leave it (it then
            // contributes nothing, and Adam can regrow it).
            if n > 0.0 {
                row.iter_mut().for_each(|x| *x /= n);
            }
        }
    }

    /// FVU of θ over a split (its own mean in the denominator), chunked for determinism.
    fn fvu_of(&self, theta: &[f32], idx: &[usize], denom: f64) -> f32 {
        let (lay, k, relu, acts, d) = (self.lay, self.cfg.k, self.cfg.relu, self.acts, self.lay.d);
        let nums: Vec<f64> = idx
            .par_chunks(CHUNK)
            .map(|ix| {
                let mut s = Scratch::new(lay);
                ix.iter()
                    .map(|&r| forward_row(theta, lay, k, relu, &acts[r * d..(r + 1) * d], &mut s))
                    .sum()
            })
            .collect();
        (nums.iter().sum::<f64>() / denom) as f32
    }

    /// One epoch: shuffle, train over all batches, evaluate. Returns (train FVU, val FVU);
    /// with no held-out split, val FVU is the FVU over the whole training split.
    pub fn epoch(&mut self) -> (f32, f32) {
        let mut order = std::mem::take(&mut self.train_idx);
        self.rng.shuffle(&mut order);
        let mut sum = 0.0f64;
        let mut cnt = 0usize;
        for b in order.chunks(self.cfg.batch) {
            if let Some(f) = self.train_step(b) {
                sum += f as f64;
                cnt += 1;
            }
        }
        self.train_idx = order;
        let train = if cnt > 0 {
            (sum / cnt as f64) as f32
        } else {
            f32::NAN
        };
        let val = if self.val_idx.is_empty() {
            let dn = variance_sum(self.train_idx.iter().map(|&r| self.row(r)), self.lay.d);
            self.fvu_of(&self.theta, &self.train_idx, dn)
        } else {
            self.fvu_of(&self.theta, &self.val_idx, self.val_denom)
        };
        let e = self.epochs_done;
        self.epochs_done += 1;
        self.report.train_fvu.push(train);
        self.report.val_fvu.push(val);
        if val < self.report.final_val_fvu || e == 0 {
            self.report.final_val_fvu = val;
            self.report.best_epoch = e;
            self.best_theta.copy_from_slice(&self.theta);
        }
        (train, val)
    }

    /// True once `patience` epochs have passed without a new best validation FVU.
    pub fn should_stop(&self) -> bool {
        self.epochs_done >= self.cfg.max_epochs
            || self.epochs_done > 0
                && self.epochs_done - 1 - self.report.best_epoch >= self.cfg.patience
    }

    /// The best epoch's weights as an SAE (layer 0, empty model name, no activation mean: the
    /// caller fills those in), and the report.
    pub fn finish(self) -> (Sae, TrainReport) {
        let (lay, t) = (self.lay, &self.best_theta);
        let sae = Sae {
            w_enc: transpose(&t[lay.enc()], lay.kk, lay.d),
            b_enc: t[lay.b_enc()].to_vec(),
            w_dec: t[lay.dec()].to_vec(),
            b_dec: t[lay.b_dec()].to_vec(),
            activation_mean: None,
            layer: 0,
            k: self.cfg.k,
            model: String::new(),
            titles: None,
            d: lay.d,
            latents: lay.kk,
        };
        (sae, self.report)
    }
}

/// Trains a top-k SAE on acts [N, D]; `progress(epoch, train_fvu, val_fvu)` after each epoch.
pub fn train(
    acts: &[f32],
    n: usize,
    d: usize,
    cfg: &TrainConfig,
    mut progress: impl FnMut(usize, f32, f32),
) -> Result<(Sae, TrainReport)> {
    let mut t = Trainer::new(acts, n, d, cfg)?;
    while !t.should_stop() {
        let e = t.epochs_done;
        let (tr, va) = t.epoch();
        progress(e, tr, va);
    }
    Ok(t.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss numerator Σ‖x̂ − x‖² in f64 from θ (f64), with a fixed set of kept latents per
    /// row — an independent oracle for finite differences.
    fn loss_f64(theta: &[f64], lay: Layout, xs: &[Vec<f32>], tops: &[Vec<usize>]) -> f64 {
        let d = lay.d;
        let (enc, dec) = (&theta[lay.enc()], &theta[lay.dec()]);
        let (b_enc, b_dec) = (&theta[lay.b_enc()], &theta[lay.b_dec()]);
        let mut total = 0.0;
        for (x, top) in xs.iter().zip(tops) {
            let mut xh: Vec<f64> = b_dec.to_vec();
            for &j in top {
                let z: f64 = (0..d)
                    .map(|i| enc[j * d + i] * (x[i] as f64 - b_dec[i]))
                    .sum::<f64>()
                    + b_enc[j];
                for i in 0..d {
                    xh[i] += z * dec[j * d + i];
                }
            }
            total += (0..d).map(|i| (xh[i] - x[i] as f64).powi(2)).sum::<f64>();
        }
        total
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let lay = Layout { d: 5, kk: 4 };
        let k = 2;
        let mut rng = Rng::new(3);
        let theta: Vec<f32> = (0..lay.len()).map(|_| rng.normal() as f32 * 0.7).collect();
        let xs: Vec<Vec<f32>> = (0..6)
            .map(|_| (0..lay.d).map(|_| rng.normal() as f32).collect())
            .collect();
        let mut grad = vec![0.0f32; lay.len()];
        let mut s = Scratch::new(lay);
        grad_rows(
            &theta,
            lay,
            k,
            false,
            xs.iter().map(|x| x.as_slice()),
            &mut grad,
            &mut s,
        );
        // The kept sets at θ; finite differences keep them fixed (the loss is piecewise smooth
        // and the gradient is that of the current piece).
        let tops: Vec<Vec<usize>> = xs
            .iter()
            .map(|x| {
                forward_row(&theta, lay, k, false, x, &mut s);
                s.top.clone()
            })
            .collect();
        let th64: Vec<f64> = theta.iter().map(|&v| v as f64).collect();
        let h = 1e-5;
        let mut worst = (0.0f64, 0usize, 0.0f64, 0.0f64);
        for p in 0..lay.len() {
            let mut a = th64.clone();
            a[p] += h;
            let mut b = th64.clone();
            b[p] -= h;
            let fd = (loss_f64(&a, lay, &xs, &tops) - loss_f64(&b, lay, &xs, &tops)) / (2.0 * h);
            // f32 analytic gradient: products of O(1) terms summed over 6 rows × 5 dims carry
            // relative rounding ~1e-6 of the summed magnitudes (≤ ~100 here); central-difference
            // truncation is O(h²) ≈ 1e-10. So 1e-3 absolute + 1e-4 relative is ~10× the error.
            let err = (grad[p] as f64 - fd).abs();
            let tol = 1e-3 + 1e-4 * fd.abs();
            if err / tol > worst.0 {
                worst = (err / tol, p, grad[p] as f64, fd);
            }
        }
        assert!(
            worst.0 <= 1.0,
            "worst param {} analytic {} fd {}",
            worst.1,
            worst.2,
            worst.3
        );
        // The check has teeth: the b_dec gradient's encoder path is non-negligible here.
        assert!(grad[lay.b_dec()].iter().any(|g| g.abs() > 0.01));
    }

    #[test]
    fn top_k_prefers_large_then_low_index() {
        let mut t = vec![];
        top_k(&[0.5, 2.0, -1.0, 2.0, 1.0], 3, &mut t);
        assert_eq!(t, vec![1, 3, 4]);
        top_k(&[-3.0, -1.0, -2.0], 2, &mut t);
        assert_eq!(t, vec![1, 2]);
    }

    #[test]
    fn bad_config_is_an_input_error() {
        let acts = vec![0.0f32; 40];
        let mut cfg = TrainConfig {
            latents: 4,
            k: 5,
            ..Default::default()
        };
        assert!(Trainer::new(&acts, 10, 4, &cfg).is_err());
        cfg.k = 2;
        assert!(Trainer::new(&acts, 10, 3, &cfg).is_err());
        let mut bad = acts.clone();
        bad[7] = f32::NAN;
        let e = Trainer::new(&bad, 10, 4, &cfg).err().unwrap().to_string();
        assert!(e.contains("row 1 column 3"), "{e}");
        // Equal rows: no variance for the FVU to divide by.
        let e = Trainer::new(&acts, 10, 4, &cfg).err().unwrap().to_string();
        assert!(e.contains("all 10 activation rows are equal"), "{e}");
        let mut varied = acts.clone();
        varied[0] = 1.0;
        assert!(Trainer::new(&varied, 10, 4, &cfg).is_ok());
    }

    /// Eight rows hold out one (10%), whose FVU has no variance to divide by: the row trains
    /// instead and training stops on the train FVU, so the weights kept are not the first
    /// epoch's.
    #[test]
    fn a_held_out_split_without_variance_trains_instead() {
        let (n, d) = (8, 6);
        let mut rng = Rng::new(3);
        let mut acts = vec![0f32; n * d];
        for row in acts.chunks_exact_mut(d) {
            rng.direction(row, 1.0);
        }
        let cfg = TrainConfig {
            latents: 4,
            k: 2,
            lr: Some(1e-2),
            max_epochs: 40,
            ..Default::default()
        };
        let (_, rep) = train(&acts, n, d, &cfg, |_, _, _| {}).unwrap();
        assert_eq!((rep.n_train, rep.n_val), (8, 0));
        assert!(rep.final_val_fvu.is_finite(), "{rep:?}");
        assert!(rep.best_epoch > 0, "{rep:?}");
        assert!(rep.final_val_fvu < rep.val_fvu[0], "{rep:?}");
    }

    /// A --batch far above the rows (the audit's 10^11 aborted allocating per-chunk gradients
    /// for it) trains as one batch of every row.
    #[test]
    fn a_batch_above_the_rows_is_one_batch_of_them() {
        let (n, d) = (20, 6);
        let mut rng = Rng::new(5);
        let mut acts = vec![0f32; n * d];
        for row in acts.chunks_exact_mut(d) {
            rng.direction(row, 1.0);
        }
        let cfg = |batch| TrainConfig {
            latents: 4,
            k: 2,
            lr: Some(1e-2),
            max_epochs: 3,
            batch,
            ..Default::default()
        };
        let (whole, _) = train(&acts, n, d, &cfg(n), |_, _, _| {}).unwrap();
        let (huge, _) = train(&acts, n, d, &cfg(100_000_000_000), |_, _, _| {}).unwrap();
        assert_eq!(whole, huge);
    }
}
