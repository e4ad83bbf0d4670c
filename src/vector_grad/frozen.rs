//! One training example and the part of its forward pass that the steering vector cannot
//! change, computed once (f32, by the model's own forward) and reusable across epochs.
//!
//! An example is token ids [T] and a set P of *target positions* (sorted, distinct). The vector
//! is added to the residual after block L at every row p ∈ P; the loss is the mean over p ∈ P,
//! p ≥ 1, of the cross-entropy of softmax(coldness · logits[p − 1]) predicting ids[p] (the
//! logits at row p − 1 predict the token at p).
//!
//! By causality, with s0 = min P and pe = max P:
//! - rows < s0 never see the vector: their K/V in every block are constants, and so is the
//!   loss term of row s0 − 1 (it predicts ids[s0]) — the *frozen prefix*;
//! - rows ≥ pe affect no target (row pe's logits would predict ids[pe + 1], not a target), so
//!   they are never run, and the vector at row pe has no effect;
//! - the *active rows* s0..pe need blocks 0..=L once (unsteered, cached here as `h_l`) and
//!   blocks L+1..N−1 with the vector, which `grad` runs forward and backward.

use crate::bail;
use crate::config::Config;
use crate::error::Result;
use crate::model::{Hooks, KvCache, Model, Step, Workspace};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,         // [T]
    pub positions: Vec<usize>, // P, sorted, distinct, each < T
}

/// The vector-independent part of one example at steering block `layer`.
pub struct Frozen {
    pub layer: usize,  // L
    pub s0: usize,     // first active row = min P (absolute)
    pub ta: usize,     // active rows s0..s0+Ta, Ta = max P − min P
    pub h_l: Vec<f32>, // [Ta, D] residual after block L at the active rows, unsteered
    /// Per block L+1..N−1 (index l − L − 1): the frozen rows' post-RoPE keys and values.
    pub k_pre: Vec<Vec<f32>>, // [S0, Hkv·Dh] each
    pub v_pre: Vec<Vec<f32>>, // [S0, Hkv·Dh] each
    /// Active rows (relative to s0) where the vector is added: p − s0 for p ∈ P, p < max P.
    pub steer_rows: Vec<usize>,
    /// (active row r, target id ids[s0 + r + 1]) for every p ∈ P with p > s0.
    pub predict: Vec<(usize, u32)>,
    /// The loss term that no vector changes: logits [V] of row s0 − 1 and its target ids[s0]
    /// (None when s0 = 0: token 0 has nothing before it to be predicted from).
    pub const_row: Option<(Vec<f32>, u32)>,
}

impl Frozen {
    /// Target tokens in the loss.
    pub fn targets(&self) -> usize {
        self.predict.len() + usize::from(self.const_row.is_some())
    }
    /// Bytes held (for a cache budget).
    pub fn bytes(&self) -> usize {
        let f = self.h_l.len()
            + self
                .k_pre
                .iter()
                .chain(&self.v_pre)
                .map(Vec::len)
                .sum::<usize>()
            + self.const_row.as_ref().map_or(0, |r| r.0.len());
        4 * f + 16 * self.predict.len() + 8 * self.steer_rows.len()
    }
}

/// Checks an example against the model and the steering block.
pub fn check(model: &Model, ex: &Example, layer: usize) -> Result<()> {
    check_config(&model.config, ex, layer)
}

/// `check` against a model's config alone (the GPU path has no CPU `Model`).
pub fn check_config(c: &Config, ex: &Example, layer: usize) -> Result<()> {
    let n = c.num_hidden_layers;
    if layer >= n {
        bail!("steering block {layer}: expected a block below num_hidden_layers {n}");
    }
    let v = c.vocab_size;
    if let Some(&bad) = ex.ids.iter().find(|&&i| i as usize >= v) {
        bail!("token id {bad} is outside the vocabulary: expected ids below vocab_size {v}");
    }
    let t = ex.ids.len();
    if ex.positions.is_empty() {
        bail!("expected at least one target position, found none");
    }
    if ex.positions.windows(2).any(|w| w[0] >= w[1]) {
        bail!(
            "target positions must be sorted and distinct, found {:?}",
            ex.positions
        );
    }
    let last = *ex.positions.last().unwrap_or(&0);
    if last >= t {
        bail!("target position {last}: expected positions below the example's {t} tokens");
    }
    Ok(())
}

/// Runs what the vector cannot change: the prefix rows through every block (keeping the K/V of
/// blocks L+1.. and the logits of row s0 − 1) and the active rows through blocks 0..=L.
pub fn prepare(model: &Model, ex: &Example, layer: usize) -> Result<Frozen> {
    check(model, ex, layer)?;
    let c = &model.config;
    let n = c.num_hidden_layers;
    let kv = c.num_key_value_heads * c.head_dim;
    let (s0, pe) = (ex.positions[0], *ex.positions.last().unwrap_or(&0));
    let ta = pe - s0;
    let mut cache = KvCache::new(c, 1, pe.max(1));
    let mut ws = Workspace::default();
    let mut const_row = None;
    if s0 > 0 {
        // Rows 0..s0 through all blocks: their K/V at blocks L+1.. and the last row's logits.
        let mut h = Vec::new();
        model.embed(&ex.ids[..s0], &mut h); // [S0, D]
        let slots = vec![0; s0];
        let positions: Vec<usize> = (0..s0).collect();
        let step = Step {
            slots: &slots,
            positions: &positions,
            n_write: s0,
            run_start: &[],
        };
        model.layers(
            &mut ws,
            &mut cache,
            &mut h,
            0..n,
            &step,
            &mut Hooks::default(),
        );
        let logits = model.head(&mut ws, &h, &[s0 - 1]).to_vec(); // [V]
        const_row = Some((logits, ex.ids[s0]));
    }
    let mut h_l = Vec::new();
    if ta > 0 {
        model.embed(&ex.ids[s0..pe], &mut h_l); // [Ta, D]
        let slots = vec![0; ta];
        let positions: Vec<usize> = (s0..pe).collect();
        let step = Step {
            slots: &slots,
            positions: &positions,
            n_write: ta,
            run_start: &[],
        };
        model.layers(
            &mut ws,
            &mut cache,
            &mut h_l,
            0..layer + 1,
            &step,
            &mut Hooks::default(),
        );
    }
    let k_pre = (layer + 1..n)
        .map(|l| cache.k[l][..s0 * kv].to_vec())
        .collect();
    let v_pre = (layer + 1..n)
        .map(|l| cache.v[l][..s0 * kv].to_vec())
        .collect();
    Ok(assemble(ex, layer, h_l, k_pre, v_pre, const_row))
}

/// The `Frozen` of a checked example from its computed parts (shapes as in `Frozen`); the
/// steer rows and predicted targets follow from the positions alone. Shared by the CPU `prepare`
/// and the GPU one (`cuda::frozen`), so both index the same rows.
pub(crate) fn assemble(
    ex: &Example,
    layer: usize,
    h_l: Vec<f32>,
    k_pre: Vec<Vec<f32>>,
    v_pre: Vec<Vec<f32>>,
    const_row: Option<(Vec<f32>, u32)>,
) -> Frozen {
    let (s0, pe) = (ex.positions[0], *ex.positions.last().unwrap_or(&0));
    let steer_rows = ex
        .positions
        .iter()
        .filter(|&&p| p < pe)
        .map(|&p| p - s0)
        .collect();
    let predict = ex
        .positions
        .iter()
        .filter(|&&p| p > s0)
        .map(|&p| (p - 1 - s0, ex.ids[p]))
        .collect();
    Frozen {
        layer,
        s0,
        ta: pe - s0,
        h_l,
        k_pre,
        v_pre,
        steer_rows,
        predict,
        const_row,
    }
}
