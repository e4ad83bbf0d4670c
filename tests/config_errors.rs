//! Configs and checkpoints the decoder would otherwise run wrongly (exit 0, wrong output): each
//! must be refused at load time with exit code 2 and one line naming the field or tensor, what
//! was expected and what was found — never a panic or an allocation abort.

mod common;

use common::{fixture, rewrite_weights};
use half::bf16;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A copy of a fixture checkpoint in a fresh temporary folder.
fn copy_of(name: &str, case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("thinksteer-config-{}-{case}", std::process::id()));
    common::copy_fixture(name, &dir)
}

/// Rewrites config.json with `edit` applied to its top-level object.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// `thinksteer generate` on the CPU: checks exit 2, one stderr line holding every needle, and
/// no panic.
fn refused(dir: &Path, needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_thinksteer"))
        .args(["generate", "--device", "cpu", "--model"])
        .arg(dir)
        .args(["--prompt-ids", "1,2", "--max-new-tokens", "2"])
        .output()
        .unwrap();
    common::one_line_error(&out, &dir.display().to_string(), needles);
}

fn config_refused(
    fixture: &str,
    case: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
    needles: &[&str],
) {
    let d = copy_of(fixture, case);
    edit_config(&d, edit);
    let mut all = vec!["config.json"];
    all.extend_from_slice(needles);
    refused(&d, &all);
}

#[test]
fn rms_norm_eps_null_zero_or_negative() {
    // A GGUF layer_norm_rms_epsilon of NaN became `null` in config.json.
    for (case, bad) in [("eps-null", json!(null)), ("eps-zero", json!(0.0))] {
        config_refused(
            "qwen2-f32",
            case,
            |c| {
                c.insert("rms_norm_eps".into(), bad.clone());
            },
            &[
                "rms_norm_eps: expected a finite number > 0",
                &format!("found {bad}"),
            ],
        );
    }
}

#[test]
fn rope_theta_zero() {
    config_refused(
        "qwen2-f32",
        "theta-zero",
        |c| {
            c.insert("rope_theta".into(), json!(-1.0));
        },
        &["rope_theta: expected a finite number > 0, found -1"],
    );
}

#[test]
fn rope_scaling_bad_llama3_or_not_an_object() {
    config_refused(
        "llama-f32",
        "llama3-factor",
        |c| {
            c["rope_scaling"]["factor"] = json!(0.0);
        },
        &["rope_scaling: factor: expected a finite number > 0, found 0"],
    );
    config_refused(
        "llama-f32",
        "llama3-band",
        |c| {
            c["rope_scaling"]["low_freq_factor"] = json!(8.0);
        },
        &["low_freq_factor: expected less than high_freq_factor (4), found 8"],
    );
    config_refused(
        "llama-f32",
        "rope-string",
        |c| {
            c.insert("rope_scaling".into(), json!("linear"));
        },
        &[
            "rope_scaling: expected null or an object",
            "found \"linear\"",
        ],
    );
}

#[test]
fn hidden_act_other_than_silu() {
    config_refused(
        "qwen2-f32",
        "gelu",
        |c| {
            c.insert("hidden_act".into(), json!("gelu"));
        },
        &["hidden_act: expected \"silu\"", "found \"gelu\""],
    );
}

#[test]
fn sliding_window_attention() {
    config_refused(
        "qwen2-f32",
        "sliding-types",
        |c| {
            c["layer_types"][0] = json!("sliding_attention");
            c.insert("sliding_window".into(), json!(16));
        },
        &[
            "layer_types[0]: expected \"full_attention\"",
            "sliding-window attention is not implemented",
            "found \"sliding_attention\"",
        ],
    );
    config_refused(
        "qwen2-f32",
        "sliding-window",
        |c| {
            c.remove("layer_types");
            c.insert("use_sliding_window".into(), json!(true));
            c.insert("sliding_window".into(), json!(16));
            c.insert("max_window_layers".into(), json!(1));
        },
        &[
            "use_sliding_window: expected false",
            "found true with sliding_window 16 from block 1",
            "not implemented",
        ],
    );
}

#[test]
fn llama_biases_the_checkpoint_lacks() {
    for key in ["attention_bias", "mlp_bias"] {
        config_refused(
            "llama-f32",
            key,
            |c| {
                c.insert(key.into(), json!(true));
            },
            &[key, "expected false", "not supported", "found true"],
        );
    }
    // An o_proj bias the decoder would skip.
    let d = copy_of("qwen2-f32", "o-bias");
    rewrite_weights(&d, |ts| {
        ts.push((
            "model.layers.1.self_attn.o_proj.bias".into(),
            Dtype::F32,
            vec![64],
            vec![0; 256],
        ))
    });
    refused(
        &d,
        &[
            "model.safetensors",
            "model.layers.1.self_attn.o_proj.bias",
            "expected biases only on q/k/v_proj",
        ],
    );
}

#[test]
fn num_hidden_layers_against_the_checkpoint() {
    // Layer 2's tensors would be skipped.
    let d = copy_of("qwen2-f32", "fewer-layers");
    edit_config(&d, |c| {
        c.insert("num_hidden_layers".into(), json!(2));
        c.remove("layer_types");
    });
    refused(
        &d,
        &[
            "model.safetensors",
            "expected 2 layers' tensors",
            "found tensors of layer 2",
        ],
    );
    config_refused(
        "llama-f32",
        "zero-layers",
        |c| {
            c.insert("num_hidden_layers".into(), json!(0));
        },
        &["num_hidden_layers: expected at least 1, found 0"],
    );
    // Allocating per-layer arrays first aborted with "memory allocation of N bytes failed".
    let d = copy_of("llama-f32", "huge-layers");
    edit_config(&d, |c| {
        c.insert("num_hidden_layers".into(), json!(1_000_000_000_000u64));
    });
    refused(
        &d,
        &[
            "model.safetensors",
            "expected 1000000000000 layers' tensors",
            "found tensors of layers 0..=2 only",
        ],
    );
}

#[test]
fn non_finite_weights_name_the_tensor() {
    // f32 checkpoint: the CPU load's conversion.
    let d = copy_of("qwen2-f32", "nan-f32");
    rewrite_weights(&d, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "model.layers.1.mlp.up_proj.weight")
            .unwrap();
        t.3[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    refused(
        &d,
        &[
            "model.layers.1.mlp.up_proj.weight",
            "expected finite values, found a NaN or infinity at element 10",
        ],
    );
    // bf16 checkpoint, infinity in the embeddings.
    let d = copy_of("llama-bf16-tied", "inf-bf16");
    rewrite_weights(&d, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "model.embed_tokens.weight")
            .unwrap();
        t.3[6..8].copy_from_slice(&bf16::INFINITY.to_le_bytes());
    });
    refused(
        &d,
        &[
            "model.embed_tokens.weight",
            "expected finite values",
            "element 3",
        ],
    );
    // The GPU upload's bf16 conversion checks too (no device needed to call it): an f32 value
    // beyond bf16's range rounds to infinity.
    let d = copy_of("qwen2-f32", "big-f32");
    rewrite_weights(&d, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        t.3[0..4].copy_from_slice(&f32::MAX.to_le_bytes());
    });
    let files = thinksteer::weights::WeightFiles::open(&d).unwrap();
    assert!(files.f32("model.norm.weight", &[64]).is_ok());
    let e = files
        .bf16("model.norm.weight", &[64])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains("element 0"),
        "{e}"
    );
    let e = files
        .bf16("model.embed_tokens.weight", &[320, 64])
        .map(|_| ());
    assert!(e.is_ok(), "{e:?}");
}

#[test]
fn fixtures_still_load() {
    for name in [
        "qwen2-f32",
        "qwen2-bf16-tied",
        "llama-f32",
        "llama-bf16-tied",
        "thinking-qwen2-f32",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_thinksteer"))
            .args(["generate", "--device", "cpu", "--model"])
            .arg(fixture(name))
            .args(["--prompt-ids", "1,2", "--max-new-tokens", "2"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
