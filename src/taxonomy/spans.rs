//! From a trace to per-sentence token spans, and the truncated forward that reads one block's
//! output: the pieces that the activations and the mean-diff vectors share, so that both
//! stages average exactly the same tokens.

use crate::config::Config;
use crate::cuda::model::{call_rows, CudaEngine};
use crate::cuda::Gpu;
use crate::engine::Decoder;
use crate::error::Result;
use crate::model::{Hooks, KvCache, Model, Step, Workspace};
use crate::sentences::split_sentences;
use crate::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::Arc;

use super::traces::Span;

/// Token span [a, b) of the tokens whose byte ranges overlap the byte range [s, e); None when
/// no token does. A token straddling a sentence boundary (e.g. " The" with the space before
/// it, or ".\n\n") counts for every sentence it touches: no text of the sentence is left out.
pub fn token_span(offsets: &[(usize, usize)], s: usize, e: usize) -> Option<(usize, usize)> {
    let a = offsets.iter().position(|&(o0, o1)| o0 < e && o1 > s)?;
    let b = offsets.iter().rposition(|&(o0, o1)| o0 < e && o1 > s)?;
    Some((a, b + 1))
}

/// One sentence of a thinking span.
#[derive(Clone, Debug, PartialEq)]
pub struct SentenceSpan {
    pub start: usize,           // byte range in the trace's `text`
    pub end: usize,             //
    pub tokens: (usize, usize), // token range in the tokenised `prefix + text`
}

/// A trace tokenised as `prefix + text` with its thinking sentences located.
pub struct Tokenised {
    pub ids: Vec<u32>, // [T]
    /// Sentences of at least three words, in order.
    pub sentences: Vec<SentenceSpan>,
    /// Tokens overlapping the thinking span; every other token is "non-thinking".
    pub thinking_tokens: Option<(usize, usize)>,
    /// Sentences that no token covers (cannot happen for a tokenizer with full offsets; counted
    /// rather than assumed).
    pub uncovered: usize,
}

/// Tokenises `prefix + text` and maps each sentence of `text[thinking]` to its token span.
pub fn tokenise_trace(
    tok: &Tokenizer,
    prefix: &str,
    text: &str,
    thinking: Option<Span>,
) -> Result<Tokenised> {
    let full = format!("{prefix}{text}");
    let (ids, offsets) = tok.encode_with_offsets(&full, false)?;
    let p = prefix.len();
    let mut sentences = Vec::new();
    let mut uncovered = 0;
    let mut thinking_tokens = None;
    if let Some(sp) = thinking {
        thinking_tokens = token_span(&offsets, p + sp.start, p + sp.end);
        for (a, b) in split_sentences(&text[sp.start..sp.end]) {
            let (start, end) = (sp.start + a, sp.start + b);
            match token_span(&offsets, p + start, p + end) {
                Some(tokens) => sentences.push(SentenceSpan { start, end, tokens }),
                None => uncovered += 1,
            }
        }
    }
    Ok(Tokenised {
        ids,
        sentences,
        thinking_tokens,
        uncovered,
    })
}

/// The output of decoder block `layer` (0-based) at every position of `ids`: h [T, D]. Runs
/// only blocks 0..=layer (the rest cannot change it), one sequence, no logits.
pub fn block_output(model: &Model, ids: &[u32], layer: usize) -> Result<Vec<f32>> {
    let c = &model.config;
    if layer >= c.num_hidden_layers {
        crate::bail!(
            "layer {layer}: expected a block index below num_hidden_layers {}",
            c.num_hidden_layers
        );
    }
    if ids.is_empty() {
        crate::bail!("expected at least one token to run, found none");
    }
    if ids.len() > c.max_position_embeddings {
        crate::bail!(
            "a sequence of {} tokens: expected at most the model's context of {} (max_position_embeddings)",
            ids.len(),
            c.max_position_embeddings
        );
    }
    model.check_ids(ids)?;
    let t = ids.len();
    let mut cache = KvCache::new(c, 1, t);
    let mut ws = Workspace::default();
    let mut h = Vec::new();
    model.embed(ids, &mut h);
    let slots = vec![0; t];
    let positions: Vec<usize> = (0..t).collect();
    let step = Step {
        slots: &slots,
        positions: &positions,
        n_write: t,
        run_start: &[],
    };
    model.layers(
        &mut ws,
        &mut cache,
        &mut h,
        0..layer + 1,
        &step,
        &mut Hooks::default(),
    );
    Ok(h)
}

/// The same as `block_output`, through any `Decoder` (the CUDA engine): `ids` run as one
/// sequence in slot 0, in calls of at most `chunk` tokens (each appends to the cache the next
/// reads), each capturing hook point layer + 1 (the residual after block `layer`).
pub fn block_output_on(
    dec: &mut dyn Decoder,
    ids: &[u32],
    layer: usize,
    chunk: usize,
) -> Result<Vec<f32>> {
    let (n, d) = (dec.config().num_hidden_layers, dec.config().hidden_size);
    if layer >= n {
        crate::bail!("layer {layer}: expected a block index below num_hidden_layers {n}");
    }
    if ids.is_empty() {
        crate::bail!("expected at least one token to run, found none");
    }
    if ids.len() > dec.max_len() {
        crate::bail!(
            "a sequence of {} tokens: expected at most the engine's context of {}",
            ids.len(),
            dec.max_len()
        );
    }
    let mut out = Vec::with_capacity(ids.len() * d);
    let mut start = 0;
    for piece in ids.chunks(chunk.max(1)) {
        let slots = vec![0; piece.len()];
        let positions: Vec<usize> = (start..start + piece.len()).collect();
        let step = Step {
            slots: &slots,
            positions: &positions,
            n_write: piece.len(),
            run_start: &[],
        };
        let mut hooks = Hooks {
            capture: vec![(layer + 1, Vec::new())],
            steer: None,
        };
        dec.forward(piece, &step, &[], &mut hooks)?;
        out.extend_from_slice(&hooks.capture[0].1);
        start += piece.len();
    }
    Ok(out)
}

/// Longest sequence (prompt + trace, in tokens) the GPU path of `block_runner` holds.
pub const CUDA_CONTEXT: usize = 16384;

/// Block output of block `layer`: [T, D] for a token sequence.
pub type BlockRunner = Box<dyn FnMut(&[u32]) -> Result<Vec<f32>>>;

/// `block_output` of the checkpoint in `model_dir` on the CPU (only blocks 0..=layer run), or
/// with `cuda` through the CUDA engine (`block_output_on`, all blocks, `call_rows()` tokens per call).
pub fn block_runner(model_dir: &Path, layer: usize, cuda: bool) -> Result<BlockRunner> {
    if cuda {
        let c = Config::from_file(&model_dir.join("config.json"))?;
        let gpu = Arc::new(Gpu::new(0)?);
        let ctx = c.max_position_embeddings.min(CUDA_CONTEXT);
        let rows = call_rows();
        let mut e = CudaEngine::load(gpu, model_dir, 1, ctx, rows)?;
        Ok(Box::new(move |ids: &[u32]| {
            block_output_on(&mut e, ids, layer, rows)
        }))
    } else {
        let model = Model::load(model_dir)?;
        Ok(Box::new(move |ids: &[u32]| {
            block_output(&model, ids, layer)
        }))
    }
}

/// out [D] = mean of h [T, D] over the rows of `span`, summed in f64 in row order.
pub fn span_mean(h: &[f32], d: usize, span: (usize, usize), out: &mut [f32]) {
    let mut acc = vec![0f64; d];
    for row in h[span.0 * d..span.1 * d].chunks_exact(d) {
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += x as f64;
        }
    }
    let n = (span.1 - span.0).max(1) as f64;
    for (o, a) in out.iter_mut().zip(acc) {
        *o = (a / n) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_overlapping_tokens() {
        // "ab cd. ef gh." tokens: "ab" " cd" "." " ef" " gh" "."
        let off = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 12), (12, 13)];
        assert_eq!(token_span(&off, 0, 6), Some((0, 3)));
        assert_eq!(token_span(&off, 7, 13), Some((3, 6)));
        assert_eq!(token_span(&off, 13, 13), None);
        // A range strictly inside one token maps to that token.
        assert_eq!(token_span(&off, 3, 4), Some((1, 2)));
    }

    #[test]
    fn span_mean_averages_rows() {
        let h = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [3, 2]
        let mut out = [0.0; 2];
        span_mean(&h, 2, (1, 3), &mut out);
        assert_eq!(out, [4.0, 5.0]);
    }
}
