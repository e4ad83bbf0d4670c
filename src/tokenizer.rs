//! Text <-> token ids through a checkpoint's `tokenizer.json` (the HF `tokenizers` crate), and a
//! streaming decoder that turns ids into text one token at a time without splitting UTF-8
//! characters that byte-level tokens cut in half.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A checkpoint's tokenizer. Special-token strings inside the text (e.g. `<|im_end|>`) map to
/// their ids. `encode` adds no special tokens of its own (a chat template already writes bos
/// where the model wants it); `encode_plain` adds those of the tokenizer's post-processor, as
/// transformers' `tokenizer(text)` does for a prompt given as plain text (Llama 3 prepends
/// `<|begin_of_text|>`; Qwen2.5 adds nothing).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Load `dir/tokenizer.json`; Ok(None) when the checkpoint ships without one (the model is
    /// then driven with raw ids).
    pub fn from_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        Self::from_file(&path).map(Some)
    }

    /// Load a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let text = crate::files::read_text(path)?;
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| {
            Error::Input(format!(
                "{}: expected a tokenizer.json in the HF tokenizers format, found one that does not parse: {e}",
                path.display()
            ))
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// The file this tokenizer was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Text rendered by a chat template (or any continuation) -> ids, without automatic special
    /// tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, false)?.0)
    }

    /// A plain-text prompt -> ids, with the special tokens the tokenizer's post-processor adds.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, true)?.0)
    }

    /// Text -> (ids, byte range of `text` that each id covers), with the post-processor's special
    /// tokens (`plain`, empty ranges) or without; a plain text that already starts with the
    /// tokens it prepends (a template written with bos) keeps one copy. Ranges of byte-level
    /// tokens that cut a character in half cover the whole character.
    // The (ids, offsets) pair is the tokenizers crate's own shape; a named type would hide it.
    #[allow(clippy::type_complexity)]
    pub fn encode_with_offsets(
        &self,
        text: &str,
        plain: bool,
    ) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let encode = |special: bool| -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
            let enc = self.inner.encode(text, special).map_err(|e| {
                Error::Input(format!(
                    "{}: could not encode text: {e}",
                    self.path.display()
                ))
            })?;
            Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
        };
        let without = encode(false)?;
        if !plain {
            return Ok(without);
        }
        let with = encode(true)?;
        let added = with.0.len().saturating_sub(without.0.len());
        let only_prepended = added > 0 && with.0.ends_with(&without.0);
        if only_prepended && without.0.starts_with(&with.0[..added]) {
            return Ok(without);
        }
        Ok(with)
    }

    /// Ids -> text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        // Checkpoints pad the embedding past the tokenizer (Qwen2.5: 151,936 rows for 151,665
        // tokens); ids in the padding have no text and are skipped, as HF's decode does.
        self.inner.decode(ids, false).map_err(|e| {
            Error::Input(format!(
                "{}: could not decode ids: {e}",
                self.path.display()
            ))
        })
    }

    /// Number of distinct tokens, added tokens included (may be below the model's padded V).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Checks that `other` maps the same ids to the same tokens over the range both base
    /// vocabularies cover. Added (special) tokens are left out: checkpoints of one family
    /// redefine them (R1-Distill-Qwen vs Qwen2.5-Math) while sharing every ordinary token.
    pub fn check_same_ids(&self, other: &Tokenizer) -> Result<()> {
        let by_id = |t: &Tokenizer| {
            let mut v: Vec<(u32, String)> = t
                .inner
                .get_vocab(false)
                .into_iter()
                .map(|(s, i)| (i, s))
                .collect();
            v.sort();
            v
        };
        let (a, b) = (by_id(self), by_id(other));
        for (x, y) in a.iter().zip(&b) {
            if x != y {
                let (id, _) = x.min(y);
                crate::bail!(
                    "{} and {} do not share token ids: expected the same token at id {id}, found {:?} and {:?}",
                    self.path.display(),
                    other.path.display(),
                    a.iter().find(|p| p.0 == *id).map(|p| &p.1),
                    b.iter().find(|p| p.0 == *id).map(|p| &p.1)
                );
            }
        }
        Ok(())
    }

    /// A fresh streaming decoder over this tokenizer.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}

/// Turns ids into text incrementally. `push` returns the text completed by the new id; text
/// is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD). After
/// `finish`, the concatenation of everything returned equals `decode(all ids)`.
///
/// Each step decodes only the ids since the last emitted boundary (`prefix..`) and compares it
/// with the decoding of the already-emitted part (`prefix..read`); decoding both from the same
/// start keeps decoders that treat the first token specially (leading-space stripping)
/// consistent, and keeps the cost per token constant.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded at each step.
    prefix: usize,
    /// End of the ids whose text has been emitted.
    read: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Add one id; returns the newly completed text (often empty mid-character).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        self.step(false)
    }

    /// Emit whatever is still held back (an incomplete character at the end of the ids becomes
    /// U+FFFD, exactly as `decode` renders it).
    pub fn finish(&mut self) -> Result<String> {
        self.step(true)
    }

    fn step(&mut self, flush: bool) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let done = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        let complete = !now.ends_with('\u{FFFD}');
        if now.len() > done.len() && now.starts_with(&done) && (complete || flush) {
            let piece = now[done.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(piece);
        }
        if flush {
            // The window's text did not simply grow (a decoder rewrote earlier text): fall back
            // to decoding everything so the concatenation still equals decode(all).
            let emitted_ids = self.read;
            let before = self.tok.decode(&self.ids[..emitted_ids])?;
            let all = self.tok.decode(&self.ids)?;
            self.prefix = self.ids.len();
            self.read = self.ids.len();
            return Ok(all.get(before.len()..).unwrap_or("").to_string());
        }
        Ok(String::new())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// GPT-2's byte -> printable char table (printable Latin-1 bytes map to themselves, the
    /// rest to U+0100 upwards), which byte-level BPE vocabularies are written in.
    pub fn byte_chars() -> Vec<char> {
        let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
        printable.extend(0xA1..=0xAC);
        printable.extend(0xAE..=0xFF);
        let mut out = vec!['\0'; 256];
        let mut next = 256u32;
        for b in 0..256u32 {
            out[b as usize] = if printable.contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                let c = char::from_u32(next).unwrap();
                next += 1;
                c
            };
        }
        out
    }

    /// A tiny byte-level BPE tokenizer.json: 256 byte tokens, two merges ("h e" and "he llo"
    /// need "l l", "ll o"), and two special tokens.
    pub fn tiny_tokenizer_json() -> String {
        let bc = byte_chars();
        let mut vocab = serde_json::Map::new();
        for (i, c) in bc.iter().enumerate() {
            vocab.insert(c.to_string(), serde_json::json!(i));
        }
        for (i, t) in ["he", "ll", "llo", "hello"].iter().enumerate() {
            vocab.insert(t.to_string(), serde_json::json!(256 + i));
        }
        let v = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": 260, "content": "<|im_start|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true},
                {"id": 261, "content": "<|im_end|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                              "use_regex": true},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                               "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab,
                      "merges": ["h e", "l l", "ll o", "he llo"]}
        });
        serde_json::to_string_pretty(&v).unwrap()
    }

    /// A new, empty directory for one call: a directory left by an earlier run whose
    /// process had the same id (CI machines reuse ids) must not leak files into this one.
    pub fn temp_dir(name: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("thinksteer-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn tiny() -> Tokenizer {
        let d = temp_dir("tok-tiny");
        std::fs::write(d.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
        Tokenizer::from_dir(&d)
            .unwrap()
            .expect("tokenizer.json was written")
    }

    #[test]
    fn missing_tokenizer_is_none_and_malformed_is_input_error() {
        let d = temp_dir("tok-missing");
        assert!(Tokenizer::from_dir(&d).unwrap().is_none());
        std::fs::write(d.join("tokenizer.json"), "{\"model\": 3").unwrap();
        match Tokenizer::from_dir(&d) {
            Err(Error::Input(m)) => assert!(m.contains("tokenizer.json"), "{m}"),
            other => panic!("expected Error::Input, got {other:?}"),
        }
    }

    #[test]
    fn plain_prompts_get_the_post_processors_special_tokens() {
        // Qwen-style (ByteLevel post-processor): nothing added either way.
        let t = tiny();
        assert_eq!(t.encode_plain("hello").unwrap(), t.encode("hello").unwrap());
        // Llama-3-style: a TemplateProcessing post-processor prepends bos (here <|im_start|>).
        let mut v: serde_json::Value = serde_json::from_str(&tiny_tokenizer_json()).unwrap();
        v["post_processor"] = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [260],
                                                "tokens": ["<|im_start|>"]}}
        });
        let d = temp_dir("tok-bos");
        std::fs::write(d.join("tokenizer.json"), v.to_string()).unwrap();
        let t = Tokenizer::from_dir(&d).unwrap().unwrap();
        assert_eq!(t.encode("hello").unwrap(), vec![259]);
        assert_eq!(t.encode_plain("hello").unwrap(), vec![260, 259]);
        // A text that starts with bos already keeps one.
        assert_eq!(t.encode_plain("<|im_start|>hello").unwrap(), vec![260, 259]);
        let (ids, offsets) = t.encode_with_offsets("hello", true).unwrap();
        assert_eq!(ids, vec![260, 259]);
        assert_eq!(offsets, vec![(0, 0), (0, 5)], "bos covers no text");
    }

    #[test]
    fn encode_merges_and_maps_special_tokens() {
        let t = tiny();
        assert_eq!(t.vocab_size(), 262);
        assert_eq!(t.encode("hello").unwrap(), vec![259]);
        // No bos/eos added; special strings inside the text become their ids.
        assert_eq!(
            t.encode("<|im_start|>he<|im_end|>").unwrap(),
            vec![260, 256, 261]
        );
        assert_eq!(t.token_to_id("<|im_end|>"), Some(261));
        assert_eq!(t.id_to_token(256).as_deref(), Some("he"));
        let s = "<|im_start|>hello wörld ✓<|im_end|>";
        assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), s);
        // An id past the tokenizer (the model's padded rows) has no text.
        let hello = t.encode(s).unwrap();
        let padded: Vec<u32> = hello.iter().copied().chain([5000]).collect();
        assert_eq!(t.decode(&padded).unwrap(), s);
    }

    #[test]
    fn stream_decoder_holds_split_chars_and_matches_full_decode() {
        let t = tiny();
        // "✓" is 3 bytes and "é" 2: both arrive as several byte tokens.
        let text = "hello é✓ x<|im_end|>ok";
        let ids = t.encode(text).unwrap();
        let mut sd = t.stream_decoder();
        let mut pieces = Vec::new();
        for &id in &ids {
            let p = sd.push(id).unwrap();
            assert!(!p.contains('\u{FFFD}'), "emitted a partial char: {p:?}");
            pieces.push(p);
        }
        pieces.push(sd.finish().unwrap());
        assert_eq!(pieces.concat(), t.decode(&ids).unwrap());
        assert_eq!(pieces.concat(), text);
        // At least one push returned nothing because it ended mid-character.
        assert!(pieces[..ids.len()].iter().any(|p| p.is_empty()));

        // Ending mid-character: finish emits the replacement char, like decode.
        let cut = &ids[..ids.len() - 1];
        let check = t.encode("a✓").unwrap();
        let cut2 = &check[..check.len() - 1];
        for ids in [cut, cut2] {
            let mut sd = t.stream_decoder();
            let mut s = String::new();
            for &id in ids {
                s += &sd.push(id).unwrap();
            }
            s += &sd.finish().unwrap();
            assert_eq!(s, t.decode(ids).unwrap());
        }
    }
}
