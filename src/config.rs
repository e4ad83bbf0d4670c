//! `Config`: the model hyperparameters, read from a checkpoint's `config.json` as HF writes it.
//! Qwen2 (Qwen2.5, Qwen2.5-Math, R1-Distill-Qwen, QwQ) and Llama (Llama-3.1, R1-Distill-Llama)
//! share one decoder architecture; they differ in q/k/v biases and RoPE scaling.

use crate::{bail, Error, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// q/k/v projections carry biases.
    Qwen2,
    /// No biases; optional `llama3` RoPE scaling.
    Llama,
}

/// RoPE frequency scaling of type `llama3` (Llama-3.1): low frequencies are divided by `factor`,
/// high ones kept, and the band between them interpolated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub hidden_size: usize,       // D
    pub intermediate_size: usize, // F
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize, // H
    pub num_key_value_heads: usize, // Hkv
    pub head_dim: usize,            // Dh
    pub vocab_size: usize,          // V
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

/// `config.json` as written by HF; only the keys we read.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    eos_token_id: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config> {
        if !path.exists() {
            bail!(
                "{}: missing: expected a checkpoint folder holding config.json",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Config::from_json(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
    }

    pub fn from_json(text: &str) -> Result<Config> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| Error::Input(format!("malformed config.json: {e}")))?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        let arch = match model_type.as_str() {
            "qwen2" => Arch::Qwen2,
            "llama" => Arch::Llama,
            other => {
                let archs = raw.architectures.clone().unwrap_or_default().join(",");
                bail!("unsupported model_type: expected \"qwen2\" or \"llama\", found {other:?} (architectures [{archs}])")
            }
        };
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            bail!("num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})");
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("head_dim must be even and positive, found {head_dim}");
        }
        // Newer transformers nest rope settings under `rope_parameters`.
        let rope = raw.rope_scaling.clone().or(raw.rope_parameters.clone());
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                rope.as_ref()
                    .and_then(|r| r.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10000.0);
        let rope_scaling = match &rope {
            None | Some(serde_json::Value::Null) => None,
            Some(r) => parse_rope_scaling(r)?,
        };
        Ok(Config {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            eos_token_ids: id_list(raw.eos_token_id.as_ref()),
            bos_token_id: id_list(raw.bos_token_id.as_ref()).first().copied(),
        })
    }

    /// The tensor-core work of prefilling `tokens` tokens into an empty cache with one logit
    /// row: 2 FLOPs per weight of every block's products per token, causal attention (q·k and
    /// p·v: 2·2·Dh per query head per (query, key ≤ query) pair), and the LM head once. The
    /// embedding lookup, norms and elementwise work are not counted (no tensor-core FLOPs).
    pub fn prefill_flops(&self, tokens: usize) -> f64 {
        let (d, f, l) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
        );
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let products = (d * (q + 2 * kv) + q * d + 3 * d * f) as f64;
        let t = tokens as f64;
        let pairs = t * (t + 1.0) / 2.0;
        l as f64 * (2.0 * products * t + 4.0 * q as f64 * pairs)
            + 2.0 * (self.vocab_size * d) as f64
    }

    /// The number of weights (× bytes per weight: the bytes a decode step streams, for the
    /// bandwidth floor).
    pub fn param_count(&self) -> usize {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if self.arch == Arch::Qwen2 {
            q + 2 * kv
        } else {
            0
        };
        let layer = d * (q + 2 * kv) + bias + q * d + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_hidden_layers * layer + d + head
    }

    /// RoPE inverse frequencies, one per pair of dims: [Dh/2].
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64);
                match self.rope_scaling {
                    Some(s) => llama3_scale(f, s) as f32,
                    None => f as f32,
                }
            })
            .collect()
    }
}

fn llama3_scale(freq: f64, s: Llama3Scaling) -> f64 {
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

fn parse_rope_scaling(r: &serde_json::Value) -> Result<Option<Llama3Scaling>> {
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let num = |key: &str| -> Result<f64> {
                match r.get(key).and_then(|v| v.as_f64()) {
                    Some(x) => Ok(x),
                    None => bail!("rope_scaling of type llama3: missing number {key:?}"),
                }
            };
            Ok(Some(Llama3Scaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }))
        }
        other => bail!(
            "unsupported rope_scaling type: expected \"default\" or \"llama3\", found {other:?}"
        ),
    }
}

fn id_list(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}
