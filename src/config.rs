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
    /// Absent: the default; present (null included): checked. GGUF's NaN epsilon arrives as null.
    #[serde(default, deserialize_with = "present")]
    rms_norm_eps: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    rope_theta: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    eos_token_id: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<usize>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
}

/// A key that is present deserialises to `Some`, even when its value is null.
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// A present `field` as a finite number > 0 (`default` when absent).
fn positive(field: &str, v: Option<&serde_json::Value>, default: f64) -> Result<f64> {
    match v {
        None => Ok(default),
        Some(x) => match x.as_f64() {
            Some(f) if f.is_finite() && f > 0.0 => Ok(f),
            _ => bail!("{field}: expected a finite number > 0, found {x}"),
        },
    }
}

impl Config {
    /// Checks token ids against the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> crate::Result<()> {
        let v = self.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            crate::bail!(
                "token id {bad} is outside the vocabulary: expected ids below vocab_size {v}"
            );
        }
        Ok(())
    }

    pub fn from_file(path: &Path) -> Result<Config> {
        if !path.exists() {
            bail!(
                "{}: missing: expected a checkpoint folder holding config.json",
                path.display()
            );
        }
        let text = crate::files::read_text(path)?;
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
        for (field, n) in [
            ("num_hidden_layers", raw.num_hidden_layers),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("vocab_size", raw.vocab_size),
        ] {
            if n == 0 {
                bail!("{field}: expected at least 1, found 0");
            }
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            bail!("num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})");
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("head_dim must be even and positive, found {head_dim}");
        }
        let eps = positive("rms_norm_eps", raw.rms_norm_eps.as_ref(), 1e-6)?;
        // The norms run in f32: 1e-50 would become 0, 1e300 infinity.
        let rms_norm_eps = eps as f32;
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            bail!("rms_norm_eps: expected a finite number > 0 as f32, found {eps} (f32 {rms_norm_eps})");
        }
        // Newer transformers nest rope settings under `rope_parameters`.
        let rope = raw.rope_scaling.clone().or(raw.rope_parameters.clone());
        let rope_theta = match &raw.rope_theta {
            Some(t) => positive("rope_theta", Some(t), 10000.0)?,
            None => positive(
                "rope_parameters.rope_theta",
                rope.as_ref().and_then(|r| r.get("rope_theta")),
                10000.0,
            )?,
        };
        let rope_scaling = match &rope {
            None | Some(serde_json::Value::Null) => None,
            Some(r) => parse_rope_scaling(r)?,
        };
        check_unsupported(&raw, arch)?;
        let c = Config {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            eos_token_ids: id_list(raw.eos_token_id.as_ref(), "eos_token_id", raw.vocab_size)?,
            bos_token_id: id_list(raw.bos_token_id.as_ref(), "bos_token_id", raw.vocab_size)?
                .first()
                .copied(),
        };
        // Every size the loaders and caches compute from these must be representable.
        if c.checked_param_count().is_none() {
            bail!(
                "num_hidden_layers, hidden_size, intermediate_size, vocab_size: expected a weight count that fits in {} bits, found {} layers of hidden size {}, intermediate size {}, vocab {}",
                usize::BITS,
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.vocab_size
            );
        }
        Ok(c)
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
        // from_json refuses a config whose count overflows; saturate rather than panic anyway.
        self.checked_param_count().unwrap_or(usize::MAX)
    }

    fn checked_param_count(&self) -> Option<usize> {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        let qkv = q.checked_add(kv.checked_mul(2)?)?;
        let bias = if self.arch == Arch::Qwen2 { qkv } else { 0 };
        let layer = [
            d.checked_mul(qkv)?,
            bias,
            q.checked_mul(d)?,
            d.checked_mul(f)?.checked_mul(3)?,
            d.checked_mul(2)?,
        ]
        .into_iter()
        .try_fold(0usize, |a, x| a.checked_add(x))?;
        let embed = v.checked_mul(d)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed
            .checked_add(self.num_hidden_layers.checked_mul(layer)?)?
            .checked_add(d)?
            .checked_add(head)
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
    if !r.is_object() {
        bail!("rope_scaling: expected null or an object with a \"rope_type\", found {r}");
    }
    let kind = match r.get("rope_type").or_else(|| r.get("type")) {
        // transformers fails on an object without a type too; guessing "default" would drop
        // whatever scaling the object meant.
        None => bail!(
            "rope_scaling: expected a \"rope_type\" (\"default\" or \"llama3\"), found none in {r}"
        ),
        Some(v) => match v.as_str() {
            Some(k) => k,
            None => bail!("rope_scaling: rope_type: expected \"default\" or \"llama3\", found {v}"),
        },
    };
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let num = |key: &str| -> Result<f64> {
                match r.get(key) {
                    None => bail!("rope_scaling of type llama3: missing number {key:?}"),
                    Some(v) => match v.as_f64() {
                        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                        _ => bail!("rope_scaling: {key}: expected a finite number > 0, found {v}"),
                    },
                }
            };
            let s = Llama3Scaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            };
            // The band between the two wavelengths is interpolated over high − low.
            if s.low_freq_factor >= s.high_freq_factor {
                bail!(
                    "rope_scaling: low_freq_factor: expected less than high_freq_factor ({}), found {}",
                    s.high_freq_factor,
                    s.low_freq_factor
                );
            }
            Ok(Some(s))
        }
        other => bail!(
            "unsupported rope_scaling type: expected \"default\" or \"llama3\", found {other:?}"
        ),
    }
}

/// Settings the decoder does not implement, refused rather than run as if absent.
fn check_unsupported(raw: &RawConfig, arch: Arch) -> Result<()> {
    // transformers' "swish" is the same function as "silu".
    if let Some(act) = raw.hidden_act.as_deref() {
        if act != "silu" && act != "swish" {
            bail!("hidden_act: expected \"silu\" (the only activation implemented), found {act:?}");
        }
    }
    // Qwen2's q/k/v biases are part of the architecture (transformers ignores these keys for
    // it); a Llama with attention_bias also has an o_proj bias, and mlp_bias biases on the MLP.
    if arch == Arch::Llama {
        for (field, on, what) in [
            (
                "attention_bias",
                raw.attention_bias,
                "attention biases (q/k/v/o_proj.bias)",
            ),
            ("mlp_bias", raw.mlp_bias, "MLP biases"),
        ] {
            if on == Some(true) {
                bail!("{field}: expected false ({what} are not supported for llama), found true");
            }
        }
    }
    let layers = raw.num_hidden_layers;
    // A window as long as the context is full attention (transformers' Qwen2 default: 4096).
    let context = raw.max_position_embeddings.unwrap_or(4096);
    let window = raw.sliding_window.unwrap_or(4096);
    if let Some(types) = &raw.layer_types {
        if types.len() != layers {
            bail!(
                "layer_types: expected {layers} entries (num_hidden_layers), found {}",
                types.len()
            );
        }
        let other = types
            .iter()
            .enumerate()
            .find(|(_, t)| *t != "full_attention" && *t != "sliding_attention")
            .or_else(|| {
                let sliding = types.iter().position(|t| t == "sliding_attention");
                sliding.filter(|_| window < context).map(|i| (i, &types[i]))
            });
        if let Some((i, t)) = other {
            bail!("layer_types[{i}]: expected \"full_attention\", or \"sliding_attention\" with a sliding_window of at least max_position_embeddings ({context}), found {t:?} with sliding_window {window}: sliding-window attention is not implemented");
        }
    } else if arch == Arch::Qwen2 && raw.use_sliding_window == Some(true) {
        // transformers' Qwen2: blocks from max_window_layers (default 28) on attend within the
        // window. Llama has no such keys.
        let from = raw.max_window_layers.unwrap_or(28);
        if window < context && from < layers {
            bail!("use_sliding_window: expected false, or a sliding_window of at least max_position_embeddings ({context}), found true with sliding_window {window} from block {from}: sliding-window attention is not implemented");
        }
    }
    Ok(())
}

/// The token ids of config field `field` (one id or a list; absent or null: none), each checked
/// against the vocabulary.
fn id_list(v: Option<&serde_json::Value>, field: &str, vocab: usize) -> Result<Vec<u32>> {
    let ids: Vec<u64> = match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).collect(),
        _ => vec![],
    };
    if let Some(bad) = ids.iter().find(|&&i| i >= vocab as u64) {
        bail!("{field}: expected token ids below vocab_size {vocab}, found {bad}");
    }
    Ok(ids.into_iter().map(|i| i as u32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A Qwen2.5-style config.json as transformers writes it (sliding window off).
    fn qwen25() -> Value {
        json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": null,
            "max_position_embeddings": 32768, "use_sliding_window": false,
            "sliding_window": 4096, "max_window_layers": 2,
            "layer_types": ["full_attention", "full_attention", "full_attention"],
            "tie_word_embeddings": false, "eos_token_id": 1
        })
    }

    fn llama31() -> Value {
        json!({
            "model_type": "llama", "hidden_act": "silu", "hidden_size": 64,
            "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 320, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "attention_bias": false, "mlp_bias": false,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "max_position_embeddings": 131072, "eos_token_id": [1, 2]
        })
    }

    fn with(mut base: Value, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
        edit(base.as_object_mut().unwrap());
        base
    }

    fn load(v: &Value) -> Result<Config> {
        Config::from_json(&v.to_string())
    }

    /// The config is refused with one line holding every needle.
    fn refused(v: Value, needles: &[&str]) {
        let msg = match load(&v) {
            Ok(_) => panic!("expected an error, loaded: {v}"),
            Err(e) => e.to_string(),
        };
        assert!(!msg.contains('\n'), "not one line: {msg}");
        for n in needles {
            assert!(msg.contains(n), "expected {n:?} in: {msg}");
        }
    }

    #[test]
    fn real_shapes_load() {
        load(&qwen25()).unwrap();
        load(&llama31()).unwrap();
        // Qwen2's q/k/v biases are its architecture; the GGUF converter writes this key.
        load(&with(qwen25(), |c| {
            c.insert("attention_bias".into(), json!(true));
        }))
        .unwrap();
        // Sliding window switched on but covering the context, or no block from
        // max_window_layers on: full attention everywhere.
        load(&with(qwen25(), |c| {
            c.remove("layer_types");
            c.insert("use_sliding_window".into(), json!(true));
            c.insert("sliding_window".into(), json!(32768));
            c.insert("max_window_layers".into(), json!(0));
        }))
        .unwrap();
        load(&with(qwen25(), |c| {
            c.remove("layer_types");
            c.insert("use_sliding_window".into(), json!(true));
            c.insert("max_window_layers".into(), json!(3));
        }))
        .unwrap();
        let c = load(&with(llama31(), |c| {
            c.insert("rope_scaling".into(), json!({"rope_type": "default"}));
        }))
        .unwrap();
        assert!(c.rope_scaling.is_none());
        let c = load(&with(qwen25(), |c| {
            c.remove("rms_norm_eps");
            c.remove("rope_theta");
            c.remove("hidden_act");
        }))
        .unwrap();
        assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-6, 10000.0));
        for name in ["tiny", "qwen2.5-1.5b", "llama-3.1-8b"] {
            assert!(crate::bench::named_shape(name).is_some());
        }
    }

    #[test]
    fn rms_norm_eps_must_be_finite_and_positive() {
        for bad in [
            json!(null),
            json!(0.0),
            json!(-1e-6),
            json!(1e300),
            json!("1e-6"),
        ] {
            refused(
                with(qwen25(), |c| {
                    c.insert("rms_norm_eps".into(), bad.clone());
                }),
                &["rms_norm_eps", "expected a finite number > 0", "found"],
            );
        }
    }

    #[test]
    fn rope_theta_must_be_finite_and_positive() {
        for bad in [json!(null), json!(0), json!(-10000.0)] {
            refused(
                with(qwen25(), |c| {
                    c.insert("rope_theta".into(), bad.clone());
                }),
                &["rope_theta: expected a finite number > 0, found"],
            );
        }
        refused(
            with(qwen25(), |c| {
                c.remove("rope_theta");
                c.insert(
                    "rope_parameters".into(),
                    json!({"rope_type": "default", "rope_theta": 0}),
                );
            }),
            &["rope_parameters.rope_theta: expected a finite number > 0, found 0"],
        );
    }

    #[test]
    fn rope_scaling_must_be_a_supported_object() {
        let scaling = |edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
            with(llama31(), |c| {
                edit(c["rope_scaling"].as_object_mut().unwrap());
            })
        };
        for (key, bad) in [
            ("factor", json!(0.0)),
            ("factor", json!(-8.0)),
            ("factor", json!(null)),
            ("low_freq_factor", json!(0.0)),
            ("high_freq_factor", json!(-4.0)),
            ("original_max_position_embeddings", json!(0)),
        ] {
            refused(
                scaling(&|s| {
                    s.insert(key.into(), bad.clone());
                }),
                &[
                    "rope_scaling",
                    key,
                    "expected a finite number > 0",
                    &format!("found {bad}"),
                ],
            );
        }
        refused(
            scaling(&|s| {
                s.insert("low_freq_factor".into(), json!(4.0));
            }),
            &["low_freq_factor: expected less than high_freq_factor (4), found 4"],
        );
        refused(
            with(llama31(), |c| {
                c.insert("rope_scaling".into(), json!("linear"));
            }),
            &[
                "rope_scaling: expected null or an object",
                "found \"linear\"",
            ],
        );
        refused(
            with(llama31(), |c| {
                c.insert("rope_scaling".into(), json!({"factor": 8.0}));
            }),
            &["rope_scaling: expected a \"rope_type\"", "found none"],
        );
        refused(
            with(llama31(), |c| {
                c.insert(
                    "rope_scaling".into(),
                    json!({"type": "linear", "factor": 2.0}),
                );
            }),
            &["rope_scaling type", "found \"linear\""],
        );
    }

    #[test]
    fn only_silu_is_accepted() {
        refused(
            with(qwen25(), |c| {
                c.insert("hidden_act".into(), json!("gelu"));
            }),
            &["hidden_act: expected \"silu\"", "found \"gelu\""],
        );
        load(&with(qwen25(), |c| {
            c.insert("hidden_act".into(), json!("swish"));
        }))
        .unwrap();
    }

    #[test]
    fn sliding_window_attention_is_refused() {
        refused(
            with(qwen25(), |c| {
                c["layer_types"][2] = json!("sliding_attention");
            }),
            &[
                "layer_types[2]: expected \"full_attention\"",
                "sliding-window attention is not implemented",
                "found \"sliding_attention\"",
            ],
        );
        refused(
            with(qwen25(), |c| {
                c.insert("layer_types".into(), json!(["full_attention"]));
            }),
            &["layer_types: expected 3 entries", "found 1"],
        );
        // A sliding layer whose window covers the context is full attention (transformers
        // writes such entries from use_sliding_window, whatever the window).
        load(&with(qwen25(), |c| {
            c["layer_types"][2] = json!("sliding_attention");
            c.insert("sliding_window".into(), json!(32768));
        }))
        .unwrap();
        refused(
            with(qwen25(), |c| {
                c["layer_types"][1] = json!("chunked_attention");
                c.insert("sliding_window".into(), json!(32768));
            }),
            &["layer_types[1]", "found \"chunked_attention\""],
        );
        // No sliding_window key: transformers' default of 4096.
        refused(
            with(qwen25(), |c| {
                c.remove("layer_types");
                c.remove("sliding_window");
                c.insert("use_sliding_window".into(), json!(true));
            }),
            &["found true with sliding_window 4096"],
        );
        refused(
            with(qwen25(), |c| {
                c.remove("layer_types");
                c.insert("use_sliding_window".into(), json!(true));
            }),
            &[
                "use_sliding_window: expected false",
                "found true with sliding_window 4096 from block 2",
                "not implemented",
            ],
        );
    }

    #[test]
    fn llama_biases_are_refused() {
        for key in ["attention_bias", "mlp_bias"] {
            refused(
                with(llama31(), |c| {
                    c.insert(key.into(), json!(true));
                }),
                &[key, "expected false", "not supported", "found true"],
            );
        }
    }

    #[test]
    fn sizes_must_be_positive_and_representable() {
        for key in [
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "vocab_size",
        ] {
            refused(
                with(llama31(), |c| {
                    c.insert(key.into(), json!(0));
                }),
                &[key],
            );
        }
        refused(
            with(llama31(), |c| {
                c.insert("num_hidden_layers".into(), json!(1u64 << 62));
            }),
            &[
                "expected a weight count that fits in",
                "4611686018427387904 layers",
            ],
        );
        // Huge but representable: refused by the loader against the tensors, not here.
        load(&with(llama31(), |c| {
            c.insert("num_hidden_layers".into(), json!(1_000_000_000_000u64));
        }))
        .unwrap();
    }

    #[test]
    fn special_token_ids_past_the_vocabulary_are_refused() {
        let e = load(&with(qwen25(), |m| {
            m.insert("eos_token_id".into(), json!([1, 999999]));
        }))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("eos_token_id: expected token ids below vocab_size 320, found 999999"),
            "{e}"
        );
        let e = load(&with(llama31(), |m| {
            m.insert("bos_token_id".into(), json!(320));
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("bos_token_id") && e.contains("found 320"), "{e}");
        assert!(load(&with(qwen25(), |m| {
            m.insert("eos_token_id".into(), json!(319));
        }))
        .is_ok());
    }
}
