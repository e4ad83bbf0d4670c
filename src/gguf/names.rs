//! llama.cpp tensor names → the HF checkpoint names `Model::load` reads, and the undoing of the
//! row permutation llama.cpp's converter applies to the q and k projections of llama models.
//!
//! Why the permutation: HF's Llama rotates the two halves of each head (dims i and i + Dh/2
//! form a RoPE pair), llama.cpp's "normal" RoPE rotates adjacent dims (2i, 2i + 1). Its converter
//! therefore reorders the rows of q_proj and k_proj within each head so that HF row
//! `half·Dh/2 + i` lands at row `2i + half`. Qwen2 files use llama.cpp's NEOX RoPE (the HF
//! layout) and are stored unpermuted.

/// The HF name of a llama.cpp tensor, or None for a name outside the decoder's weights.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Which heads count a permuted tensor uses: q rows are H heads, k rows Hkv heads.
pub fn permuted_heads(gguf: &str, heads: usize, kv_heads: usize) -> Option<usize> {
    let module = gguf.strip_prefix("blk.")?.split('.').nth(1)?;
    match module {
        "attn_q" => Some(heads),
        "attn_k" => Some(kv_heads),
        _ => None,
    }
}

/// llama.cpp row index of HF row `r` in a [heads·Dh, cols] projection (Dh = rows / heads).
fn gguf_row(r: usize, dh: usize) -> usize {
    let (head, within) = (r / dh, r % dh);
    let (half, i) = (within / (dh / 2), within % (dh / 2));
    head * dh + 2 * i + half
}

/// Checks that `rows` splits into `heads` heads of an even Dh.
fn head_dim(rows: usize, heads: usize) -> Option<usize> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    Some(rows / heads)
}

/// Undoes llama.cpp's permutation of a [rows, cols] q or k weight (or a [rows] bias, cols = 1).
/// None when `rows` is not `heads` heads of an even size.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Option<Vec<f32>> {
    let dh = head_dim(rows, heads)?;
    let mut out = vec![0.0; w.len()];
    for r in 0..rows {
        let src = gguf_row(r, dh) * cols;
        out[r * cols..(r + 1) * cols].copy_from_slice(&w[src..src + cols]);
    }
    Some(out)
}

/// What llama.cpp's converter does to an HF q or k weight (the inverse of `unpermute_rows`);
/// used by tests and by tools that write GGUF files.
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Option<Vec<f32>> {
    let dh = head_dim(rows, heads)?;
    let mut out = vec![0.0; w.len()];
    for r in 0..rows {
        let dst = gguf_row(r, dh) * cols;
        out[dst..dst + cols].copy_from_slice(&w[r * cols..(r + 1) * cols]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(
            hf_name("blk.11.attn_q.bias").as_deref(),
            Some("model.layers.11.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight").as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_q.scale"), None);
        assert_eq!(permuted_heads("blk.2.attn_k.weight", 9, 3), Some(3));
        assert_eq!(permuted_heads("blk.2.attn_q.bias", 9, 3), Some(9));
        assert_eq!(permuted_heads("blk.2.attn_v.weight", 9, 3), None);
    }

    /// Two heads of Dh = 4, one column: HF rows [a0 a1 b0 b1 | c0 c1 d0 d1] (pairs (a0, b0),
    /// (a1, b1) rotate together) are stored by llama.cpp as [a0 b0 a1 b1 | c0 d0 c1 d1].
    #[test]
    fn permutation_row_order_by_hand() {
        let hf = [10.0, 11.0, 20.0, 21.0, 30.0, 31.0, 40.0, 41.0];
        let stored = [10.0, 20.0, 11.0, 21.0, 30.0, 40.0, 31.0, 41.0];
        assert_eq!(permute_rows(&hf, 8, 1, 2).unwrap(), stored);
        assert_eq!(unpermute_rows(&stored, 8, 1, 2).unwrap(), hf);
    }

    #[test]
    fn permute_then_unpermute_is_identity() {
        // [rows = 3 heads × Dh 6, cols = 5], distinct values so any misplaced row shows.
        let (rows, cols, heads) = (18, 5, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 7.0).collect();
        let p = permute_rows(&w, rows, cols, heads).unwrap();
        assert_ne!(p, w, "the permutation must move rows");
        assert_eq!(unpermute_rows(&p, rows, cols, heads).unwrap(), w);
        assert_eq!(
            permute_rows(
                &unpermute_rows(&w, rows, cols, heads).unwrap(),
                rows,
                cols,
                heads
            )
            .unwrap(),
            w
        );
        // Rows stay whole: each output row is some input row.
        for r in p.chunks(cols) {
            assert!(w.chunks(cols).any(|x| x == r));
        }
    }

    #[test]
    fn bad_head_split_is_none() {
        assert!(unpermute_rows(&[0.0; 6], 6, 1, 4).is_none());
        assert!(unpermute_rows(&[0.0; 6], 6, 1, 2).is_none()); // Dh = 3 is odd
        assert!(unpermute_rows(&[0.0; 6], 6, 1, 0).is_none());
    }
}
