//! A `tokenizer.json` (HF tokenizers format) and the special-token part of
//! `tokenizer_config.json`, rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) are rebuilt; SentencePiece
//! ("llama") and other models are an `Error::Input` naming the model.
//!
//! What is built follows what transformers 4.57 builds for the same file (so encodings match it
//! id for id), with two deliberate differences that only matter for other files:
//! - a llama-architecture file whose `tokenizer.ggml.pre` names the Llama-3 or Qwen2 splitting
//!   regex gets that regex (transformers uses GPT-2's there, which the original tokenizers do not);
//! - user-defined tokens (token type 4) become non-special added tokens so that they are never
//!   split, as in the checkpoints' own tokenizer.json; transformers leaves them to BPE.
//!
//! The post-processor follows `tokenizer.ggml.add_bos_token` (transformers always prepends bos
//! for llama files); the runtime encodes without special tokens, so this never shows in its ids.
//! And one fix: bos/eos in tokenizer_config.json are `tokens[bos_token_id]` / `tokens[eos_token_id]`
//! (transformers 4.57's GGUF llama converter swaps the two).

use super::GgufFile;
use crate::{bail, Result};
use serde_json::{json, Map, Value};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// GPT-2's word splitting with digits grouped up to three, as Llama 3 writes it.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's splitting: as Llama 3 but one digit per piece.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The vocabulary and special tokens read from the metadata.
pub struct GgufVocab<'a> {
    pub tokens: Vec<&'a str>,
    /// One per token; 1 (normal) when the file has no `tokenizer.ggml.token_type`.
    pub token_types: Vec<i64>,
    pub merges: Vec<&'a str>,
    pub bos: Option<usize>,
    pub eos: Option<usize>,
    /// End of turn (Llama 3's <|eot_id|>), when the file names one.
    pub eot: Option<usize>,
    pub unk: Option<usize>,
    pub pad: Option<usize>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// `tokenizer.ggml.pre`, the pre-tokenizer llama.cpp uses ("smollm", "llama-bpe", ...).
    pub pre: Option<&'a str>,
}

impl<'a> GgufVocab<'a> {
    /// Ok(None) when the file carries no tokenizer at all (no `tokenizer.ggml.model`).
    pub fn read(g: &'a GgufFile) -> Result<Option<GgufVocab<'a>>> {
        let file = g.path().display();
        let Some(model) = g.metadata("tokenizer.ggml.model") else {
            return Ok(None);
        };
        match model.as_str() {
            Some("gpt2") => {}
            Some("llama") => bail!(
                "{file}: tokenizer.ggml.model \"llama\" (a SentencePiece vocabulary) is not supported: expected \"gpt2\" (byte-level BPE)"
            ),
            Some(other) => bail!(
                "{file}: tokenizer.ggml.model {other:?} is not supported: expected \"gpt2\" (byte-level BPE)"
            ),
            None => bail!(
                "{file}: tokenizer.ggml.model: expected a string, found a {}",
                model.type_name()
            ),
        }
        let Some(tokens) = g.get_str_array("tokenizer.ggml.tokens") else {
            bail!("{file}: tokenizer.ggml.tokens: expected an array of strings, found none")
        };
        let Some(merges) = g.get_str_array("tokenizer.ggml.merges") else {
            bail!("{file}: tokenizer.ggml.merges: expected an array of strings (BPE merges), found none")
        };
        let token_types = match g.metadata("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(_) => match g.get_i64_array("tokenizer.ggml.token_type") {
                Some(t) if t.len() == tokens.len() => t,
                Some(t) => bail!(
                    "{file}: tokenizer.ggml.token_type: expected {} entries (one per token), found {}",
                    tokens.len(),
                    t.len()
                ),
                None => bail!("{file}: tokenizer.ggml.token_type: expected an array of integers"),
            },
        };
        let id = |key: &str| -> Result<Option<usize>> {
            match g.metadata(key) {
                None => Ok(None),
                Some(_) => match g.get_usize(key) {
                    Some(i) if i < tokens.len() => Ok(Some(i)),
                    _ => bail!(
                        "{file}: {key}: expected a token id below the vocabulary size {}, found {:?}",
                        tokens.len(),
                        g.metadata(key).unwrap()
                    ),
                },
            }
        };
        Ok(Some(GgufVocab {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
            add_eos: g.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false),
            pre: g.get_str("tokenizer.ggml.pre"),
            tokens,
            token_types,
            merges,
        }))
    }

    fn token(&self, id: Option<usize>) -> Option<&'a str> {
        id.map(|i| self.tokens[i])
    }

    /// The eos ids generation stops on: eos, then end-of-turn when it differs.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos.iter().map(|&i| i as u32).collect();
        if let Some(e) = self.eot {
            if !ids.contains(&(e as u32)) {
                ids.push(e as u32);
            }
        }
        ids
    }

    /// tokenizer.json for architecture `arch` ("llama" or "qwen2").
    pub fn tokenizer_json(&self, arch: &str, file: &str) -> Result<Value> {
        let mut vocab = Map::new();
        for (i, t) in self.tokens.iter().enumerate() {
            vocab.insert(t.to_string(), json!(i));
        }
        let mut merges = Vec::with_capacity(self.merges.len());
        for (i, m) in self.merges.iter().enumerate() {
            let Some((a, b)) = m.split_once(' ') else {
                bail!("{file}: tokenizer.ggml.merges[{i}]: expected two tokens separated by a space, found {m:?}")
            };
            merges.push(json!([a, b]));
        }
        let added: Vec<Value> = self
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(i, &t)| {
                json!({"id": i, "content": self.tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": t == TOKEN_CONTROL})
            })
            .collect();
        let byte_level = |use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                   "use_regex": use_regex})
        };
        let split = |regex: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                byte_level(false)
            ]})
        };
        let qwen2_pre = matches!(self.pre, Some("qwen2" | "deepseek-r1-qwen"));
        let llama3_pre = matches!(self.pre, Some("llama-bpe" | "llama3"));
        let (normalizer, pre_tokenizer, model_opts, decoder) = if arch == "qwen2" {
            // transformers' Qwen2 converter: NFC, the Qwen2 regex, no unk, no byte fallback.
            (
                json!({"type": "NFC"}),
                split(QWEN2_REGEX),
                (Value::Null, false, false),
                byte_level(true),
            )
        } else {
            // transformers' GGUF llama converter for a gpt2 vocabulary ("llama-3 tokenizer"):
            // an empty normalizer, GPT-2's byte-level regex, unk + fuse_unk + byte fallback, and
            // a decoder sequence whose first three steps are no-ops on byte-level tokens.
            let pre = if qwen2_pre {
                split(QWEN2_REGEX)
            } else if llama3_pre {
                split(LLAMA3_REGEX)
            } else {
                byte_level(true)
            };
            let unk = self.token(self.unk).map_or(Value::Null, |t| json!(t));
            (
                json!({"type": "Sequence", "normalizers": []}),
                pre,
                (unk, true, true),
                json!({"type": "Sequence", "decoders": [
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}
                ]}),
            )
        };
        let post_processor = match (self.add_bos, self.token(self.bos)) {
            (true, Some(bos)) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [self.bos], "tokens": [bos]}}
            }),
            _ => byte_level(true),
        };
        let (unk, fuse_unk, byte_fallback) = model_opts;
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": decoder,
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": unk,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": fuse_unk,
                "byte_fallback": byte_fallback,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges
            }
        }))
    }

    /// tokenizer_config.json: special tokens, bos/eos flags and the chat template.
    pub fn tokenizer_config_json(&self, chat_template: Option<&str>, max_len: usize) -> Value {
        let s = |id: Option<usize>| self.token(id).map_or(Value::Null, |t| json!(t));
        let mut decoder = Map::new();
        for (i, &t) in self.token_types.iter().enumerate() {
            if t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED {
                decoder.insert(
                    i.to_string(),
                    json!({"content": self.tokens[i], "lstrip": false, "normalized": false,
                           "rstrip": false, "single_word": false, "special": t == TOKEN_CONTROL}),
                );
            }
        }
        let mut c = json!({
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "added_tokens_decoder": decoder,
            "bos_token": s(self.bos),
            "eos_token": s(self.eos),
            "unk_token": s(self.unk),
            "pad_token": s(self.pad),
            "clean_up_tokenization_spaces": false,
            "model_max_length": max_len,
            "tokenizer_class": "PreTrainedTokenizerFast"
        });
        if let Some(t) = chat_template {
            c["chat_template"] = json!(t);
        }
        c
    }
}
