//! The frozen prefix of a steering-vector example (`vector_grad::Frozen`) computed by the CUDA
//! engine: the GPU twin of `vector_grad::prepare`, for training on a model whose CPU f32 forward
//! over thousands of examples would take hours.
//!
//! One pass of ids[0..pe] through the engine in slot 0 (calls of at most `max_t` tokens, each
//! appending to the cache that the next reads), with pe = max P (or s0 when P has one position):
//! - rows s0..pe: the residual after block L, captured at hook point L + 1 → `h_l` [Ta, D]
//!   (these rows also run blocks L+1..N−1, which the CPU skips: the engine has no partial pass,
//!   and by causality the extra blocks change nothing captured);
//! - rows 0..s0: the K/V cache of blocks L+1..N−1 downloaded → `k_pre`, `v_pre` [S0, Hkv·Dh];
//! - row s0 − 1: its logits [V] → `const_row`.
//!
//! Precision: the GPU forward rounds every matrix-product input and the KV cache to bf16 (see
//! `cuda::model`), so `h_l` and the logits carry a few bf16 roundings per block, and `k_pre` /
//! `v_pre` *are* bf16 values (the cache's), widened to f32. The CPU `prepare` stays f32 throughout;
//! tests/cuda_commands.rs bounds the difference.

use super::model::CudaEngine;
use crate::bail;
use crate::engine::Decoder;
use crate::error::Result;
use crate::model::{Hooks, Step};
use crate::vector_grad::frozen::{assemble, check_config};
use crate::vector_grad::{Example, Frozen};

/// `vector_grad::prepare` on the CUDA engine (slot 0 of `engine` is overwritten up to max P).
pub fn prepare_on_gpu(engine: &mut CudaEngine, ex: &Example, layer: usize) -> Result<Frozen> {
    check_config(&engine.config, ex, layer)?;
    let (n, d) = (engine.config.num_hidden_layers, engine.config.hidden_size);
    let (s0, pe) = (ex.positions[0], *ex.positions.last().unwrap_or(&0));
    let ta = pe - s0;
    // Rows run: through the last active row, or the prefix alone when there is none.
    let run = if ta > 0 { pe } else { s0 };
    if run > engine.max_len() {
        bail!(
            "an example of {run} rows before its last target: expected at most the engine's context of {}",
            engine.max_len()
        );
    }
    let chunk = engine.max_t.max(1);
    let mut h_l = Vec::with_capacity(ta * d); // [Ta, D]
    let mut const_row = None;
    let mut start = 0;
    while start < run {
        let end = (start + chunk).min(run);
        let slots = vec![0; end - start];
        let positions: Vec<usize> = (start..end).collect();
        let step = Step {
            slots: &slots,
            positions: &positions,
            n_write: end - start,
            run_start: &[],
        };
        // Row s0 − 1's logits when it falls in this call; block L's output when active rows do.
        let last_frozen = s0.checked_sub(1).filter(|r| (start..end).contains(r));
        let logit_rows: Vec<usize> = last_frozen.map(|r| r - start).into_iter().collect();
        let active = ta > 0 && end > s0;
        let mut hooks = Hooks {
            capture: if active {
                vec![(layer + 1, Vec::new())]
            } else {
                vec![]
            },
            steer: None,
        };
        let logits = engine.forward(&ex.ids[start..end], &step, &logit_rows, &mut hooks)?;
        if last_frozen.is_some() {
            const_row = Some((logits.to_vec(), ex.ids[s0]));
        }
        if active {
            let rows = &hooks.capture[0].1; // [end − start, D]
            let from = s0.max(start) - start;
            h_l.extend_from_slice(&rows[from * d..]);
        }
        start = end;
    }
    let mut k_pre = Vec::with_capacity(n - layer - 1);
    let mut v_pre = Vec::with_capacity(n - layer - 1);
    for l in layer + 1..n {
        let (k, v) = engine.kv_rows(l, 0, 0..s0)?;
        k_pre.push(k);
        v_pre.push(v);
    }
    Ok(assemble(ex, layer, h_l, k_pre, v_pre, const_row))
}
