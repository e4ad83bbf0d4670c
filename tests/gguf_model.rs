//! The demo GGUF (SmolLM2-135M-Instruct, Q4_1) converted by `thinksteer::gguf::convert` and run
//! on the CPU backend, against HF transformers reading the same file
//! (tests/fixtures/gguf-smollm2/reference.json, from scripts/make_gguf_fixture.py): logits at
//! every position of three prompts, the greedy continuation of a chat prompt, the encodings of
//! a set of strings, and the chat template's rendering. Skipped, with a message, when
//! models/SmolLM2-135M-Instruct.Q4_1.gguf is absent (models/fetch-demo-model.sh fetches it).

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thinksteer::chat::{ChatTemplate, Message};
use thinksteer::engine::{CpuEngine, Decoder};
use thinksteer::generate::{generate, GenParams};
use thinksteer::model::{Hooks, Model, Step};
use thinksteer::tokenizer::Tokenizer;

#[derive(Deserialize)]
struct Reference {
    eos_ids: Vec<u32>,
    logits: Vec<LogitsCase>,
    greedy: Greedy,
    encodings: Vec<Encoding>,
    chat: Chat,
}

#[derive(Deserialize)]
struct LogitsCase {
    prompt: String,
    ids: Vec<u32>,
    vocab_ids: Vec<usize>,
    /// [T][vocab_ids.len()]
    values: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Greedy {
    messages: Vec<Message>,
    prompt_ids: Vec<u32>,
    new_ids: Vec<u32>,
    text: String,
    min_gap: f32,
}

#[derive(Deserialize)]
struct Encoding {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<Message>,
    add_generation_prompt: bool,
    text: String,
}

/// Removes the converted folder (half a gigabyte of f32 weights) even when an assert fails.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn model_file() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        println!(
            "skipping: {} is absent (run models/fetch-demo-model.sh)",
            p.display()
        );
        None
    }
}

/// Logits at every position of `ids`, one full forward: [T, V].
fn forward(m: &Arc<Model>, ids: &[u32]) -> Vec<f32> {
    let t = ids.len();
    let mut e = CpuEngine::new(m.clone(), 1, t);
    let (slots, pos): (Vec<usize>, Vec<usize>) = (vec![0; t], (0..t).collect());
    let rows: Vec<usize> = (0..t).collect();
    let mut hooks = Hooks {
        capture: vec![],
        steer: None,
    };
    e.forward(
        ids,
        &Step {
            slots: &slots,
            positions: &pos,
            n_write: t,
            run_start: &[],
        },
        &rows,
        &mut hooks,
    )
    .unwrap()
    .to_vec()
}

// Both sides are f32 forwards over bit-identical dequantised weights (d·q + m in f32 without a
// fused multiply-add on both sides), so they differ only in summation order inside 30 blocks of
// matmuls, norms and softmaxes, plus the fixture's rounding to 1e-5 (ROUNDING). Those rounding
// errors scale with the activations, i.e. with the size of the position's logits, not with each
// logit: the bound is |Δ| ≤ ROUNDING + RTOL·s, s = max(1, max |logit| over the recorded ids of
// that position). Seen: worst |Δ| / s = 2.9e-6 (|Δ| ≤ 8e-5 at s ≈ 28), printed by the test.
const RTOL: f32 = 2e-5;
const ROUNDING: f32 = 5e-6;

#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(gguf) = model_file() else { return };
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf-smollm2/reference.json"),
    )
    .unwrap();
    let r: Reference = serde_json::from_str(&text).unwrap();

    let dir =
        TempDir(std::env::temp_dir().join(format!("thinksteer-gguf-model-{}", std::process::id())));
    let rep = thinksteer::gguf::convert(&gguf, &dir.0).unwrap();
    assert_eq!(rep.arch, "llama");
    assert!(rep.tokenizer && rep.chat_template);
    let m = Arc::new(Model::load(&dir.0).unwrap());
    assert_eq!(m.config.eos_token_ids, r.eos_ids, "eos ids in config.json");
    assert!(m.config.tie_word_embeddings, "SmolLM2 has no output.weight");

    // Logits at every position.
    let v = m.config.vocab_size;
    let mut worst = 0f32;
    for case in &r.logits {
        let got = forward(&m, &case.ids);
        assert_eq!(got.len(), case.ids.len() * v);
        for (t, row) in case.values.iter().enumerate() {
            let s = row.iter().fold(1f32, |a, x| a.max(x.abs()));
            for (&id, &want) in case.vocab_ids.iter().zip(row) {
                let ours = got[t * v + id];
                let err = (ours - want).abs();
                worst = worst.max(err / s);
                assert!(
                    err <= ROUNDING + RTOL * s,
                    "prompt {:?} position {t} token {id}: ours {ours}, transformers {want} (scale {s})",
                    case.prompt
                );
            }
        }
    }
    println!("logits: worst |Δ| / s = {worst:.2e}");

    // Tokenizer and chat template rebuilt from the GGUF metadata.
    let tok = Tokenizer::from_dir(&dir.0)
        .unwrap()
        .expect("tokenizer.json");
    for e in &r.encodings {
        assert_eq!(
            tok.encode(&e.text).unwrap(),
            e.ids,
            "encoding of {:?}",
            e.text
        );
    }
    let chat = ChatTemplate::from_dir(&dir.0)
        .unwrap()
        .expect("chat template");
    assert_eq!(chat.eos_token(), Some("<|im_end|>"));
    assert_eq!(
        chat.render(&r.chat.messages, r.chat.add_generation_prompt)
            .unwrap(),
        r.chat.text
    );
    let prompt = chat.render(&r.greedy.messages, true).unwrap();
    assert_eq!(tok.encode(&prompt).unwrap(), r.greedy.prompt_ids);

    // Greedy continuation: each step's top-2 gap must exceed twice the logit tolerance (at
    // s = 50, above this model's logits) for the ids to be required to agree exactly.
    let tol_at_50 = ROUNDING + RTOL * 50.0;
    assert!(
        r.greedy.min_gap > 2.0 * tol_at_50,
        "fixture gap {}",
        r.greedy.min_gap
    );
    let n = r.greedy.new_ids.len();
    let mut e = CpuEngine::new(m.clone(), 1, r.greedy.prompt_ids.len() + n + 1);
    let p = GenParams::greedy(n, m.config.eos_token_ids.clone());
    let out = generate(
        &mut e,
        Some(&tok),
        std::slice::from_ref(&r.greedy.prompt_ids),
        &p,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(out[0].ids, r.greedy.new_ids, "greedy ids");
    assert_eq!(out[0].text, r.greedy.text, "greedy text");
}
