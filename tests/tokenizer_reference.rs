//! Tokenizer and chat-template output against HF transformers' own, recorded in
//! tests/fixtures/tokenizer_reference.json for the tiny checkpoints in tests/fixtures/
//! (encodings without special tokens, decodings with defaults, and apply_chat_template of
//! one user turn with the generation prompt).

use std::path::{Path, PathBuf};

use serde_json::Value;
use thinksteer::chat::{ChatTemplate, Message};
use thinksteer::tokenizer::Tokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The reference JSON written by scripts/make_fixtures.py (committed, so never skipped).
fn reference() -> Option<Value> {
    let path = fixtures().join("tokenizer_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Each checkpoint entry of the reference with its loaded tokenizer.
fn entries(refj: &Value) -> Vec<(String, Value, Tokenizer)> {
    let toks = refj["tokenizers"]
        .as_object()
        .expect("\"tokenizers\" object");
    assert!(!toks.is_empty(), "reference lists no tokenizers");
    toks.iter()
        .map(|(name, e)| {
            let dir = fixtures().join(e["dir"].as_str().expect("dir"));
            let tok = Tokenizer::from_dir(&dir)
                .unwrap_or_else(|err| panic!("{name}: {err}"))
                .unwrap_or_else(|| panic!("{name}: no tokenizer.json in {}", dir.display()));
            (name.clone(), e.clone(), tok)
        })
        .collect()
}

#[test]
fn vocab_and_special_tokens_match_hf() {
    let Some(r) = reference() else { return };
    for (name, e, tok) in entries(&r) {
        assert_eq!(
            tok.vocab_size() as u64,
            e["vocab_size_with_added"].as_u64().unwrap(),
            "{name}: vocab size"
        );
        for (s, id) in e["added_tokens"].as_object().unwrap() {
            let id = id.as_u64().unwrap() as u32;
            assert_eq!(tok.token_to_id(s), Some(id), "{name}: id of {s}");
            assert_eq!(tok.id_to_token(id).as_deref(), Some(s.as_str()), "{name}");
        }
        let eos = e["eos_token"].as_str().unwrap();
        assert_eq!(
            tok.token_to_id(eos).map(u64::from),
            e["eos_token_id"].as_u64(),
            "{name}: eos id"
        );
    }
}

#[test]
fn encode_and_decode_match_hf() {
    let Some(r) = reference() else { return };
    for (name, e, tok) in entries(&r) {
        for case in e["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids = ids_of(&case["ids"]);
            let decoded = case["decoded"].as_str().unwrap();
            assert_eq!(tok.encode(text).unwrap(), ids, "{name}: encode {text:?}");
            assert_eq!(
                tok.decode(&ids).unwrap(),
                decoded,
                "{name}: decode {text:?}"
            );

            // Streaming gives the same text, and never a torn character mid-stream.
            let mut sd = tok.stream_decoder();
            let mut out = String::new();
            for &id in &ids {
                let piece = sd.push(id).unwrap();
                assert!(
                    !piece.contains('\u{FFFD}') || decoded.contains('\u{FFFD}'),
                    "{name}: partial char streamed for {text:?}: {piece:?}"
                );
                out += &piece;
            }
            out += &sd.finish().unwrap();
            assert_eq!(out, decoded, "{name}: streamed decode of {text:?}");
        }
    }
}

#[test]
fn chat_template_renders_and_encodes_like_hf() {
    let Some(r) = reference() else { return };
    for (name, e, tok) in entries(&r) {
        let dir = fixtures().join(e["dir"].as_str().unwrap());
        let tmpl = ChatTemplate::from_dir(&dir)
            .unwrap_or_else(|err| panic!("{name}: {err}"))
            .unwrap_or_else(|| panic!("{name}: no chat template"));
        assert_eq!(tmpl.bos_token(), e["bos_token"].as_str(), "{name}: bos");
        assert_eq!(tmpl.eos_token(), e["eos_token"].as_str(), "{name}: eos");
        let cases = e["chat"].as_array().unwrap();
        assert!(!cases.is_empty(), "{name}: no chat cases");
        for case in cases {
            let q = case["question"].as_str().unwrap();
            let text = tmpl.render(&[Message::user(q)], true).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{name}: render {q:?}");
            assert_eq!(
                tok.encode(&text).unwrap(),
                ids_of(&case["ids"]),
                "{name}: ids of {q:?}"
            );
        }
    }
}
