//! GGUF file → checkpoint folder (config.json, model.safetensors in f32, tokenizer.json,
//! tokenizer_config.json; a Llama-3.1 `rope_freqs.weight` becomes config.json's llama3
//! `rope_scaling`, see rope.rs), and `checkpoint_dir`, which lets every command take a `.gguf`
//! file where it takes a folder by converting it once into a cache folder beside it.
//!
//! Why convert instead of loading GGUF directly: the runtime has one loading path (a folder),
//! tested against HF; a converted folder goes through exactly that path. The CPU backend is f32,
//! so the dequantised weights are written as f32 (the CUDA loader narrows them to bf16 itself).

use super::names::{hf_name, permuted_heads, unpermute_rows};
use super::rope::{llama3_from_factors, FACTOR_RTOL};
use super::tokenizer::GgufVocab;
use super::{GgufFile, TensorInfo, SUPPORTED};
use crate::config::{Config, Llama3Scaling};
use crate::{bail, Error, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bumped whenever the converter's output changes, so cached folders are rebuilt.
pub const CONVERTER_VERSION: u32 = 1;
/// The stamp file inside a cached folder: the GGUF's size and mtime and the converter version.
const STAMP: &str = "thinksteer-gguf.stamp";

/// What `convert` wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// "llama" or "qwen2".
    pub arch: String,
    pub out: PathBuf,
    /// Tensors written to model.safetensors.
    pub tensors: usize,
    /// Parameters written (all f32).
    pub params: usize,
    /// Stored ggml type name → tensor count, e.g. {"F32": 61, "Q4_1": 210, "Q8_0": 1}.
    pub types: BTreeMap<String, usize>,
    /// Whether tokenizer.json / tokenizer_config.json were written (the file had a tokenizer).
    pub tokenizer: bool,
    pub chat_template: bool,
}

/// Model hyperparameters from the `<arch>.*` metadata.
struct Hyper {
    d: usize,
    f: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    rope_theta: f32,
    ctx: usize,
}

fn read_hyper(g: &GgufFile, arch: &str) -> Result<Hyper> {
    let file = g.path().display();
    let k = |s: &str| format!("{arch}.{s}");
    let d = g.require_usize(&k("embedding_length"))?;
    let heads = g.require_usize(&k("attention.head_count"))?;
    let kv_heads = match g.metadata(&k("attention.head_count_kv")) {
        None => heads,
        Some(_) => g.require_usize(&k("attention.head_count_kv"))?,
    };
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        bail!("{file}: {arch}.attention.head_count ({heads}) must be a positive multiple of head_count_kv ({kv_heads})");
    }
    let head_dim = match g.metadata(&k("attention.key_length")) {
        None => d / heads,
        Some(_) => g.require_usize(&k("attention.key_length"))?,
    };
    if let Some(v) = g.get_usize(&k("attention.value_length")) {
        if v != head_dim {
            bail!(
                "{file}: {arch}.attention.value_length is {v}, expected the key length {head_dim}"
            );
        }
    }
    if let Some(r) = g.get_usize(&k("rope.dimension_count")) {
        if r != head_dim {
            bail!("{file}: {arch}.rope.dimension_count is {r}: partial rotary embeddings are not supported, expected the head dim {head_dim}");
        }
    }
    if let Some(t) = g.get_str(&k("rope.scaling.type")) {
        if t != "none" {
            bail!("{file}: {arch}.rope.scaling.type {t:?} is not supported, expected \"none\"");
        }
    }
    let Some(eps) = g.get_f32(&k("attention.layer_norm_rms_epsilon")) else {
        bail!("{file}: {arch}.attention.layer_norm_rms_epsilon: expected a float, found none")
    };
    let rope_theta = g.get_f32(&k("rope.freq_base")).unwrap_or(10000.0);
    // A NaN would reach config.json as null, an infinity as a number JSON cannot hold.
    for (key, x) in [
        ("attention.layer_norm_rms_epsilon", eps),
        ("rope.freq_base", rope_theta),
    ] {
        if !(x.is_finite() && x > 0.0) {
            bail!("{file}: {arch}.{key}: expected a finite number > 0, found {x}");
        }
    }
    let layers = g.require_usize(&k("block_count"))?;
    if layers == 0 {
        bail!("{file}: {arch}.block_count: expected at least 1, found 0");
    }
    Ok(Hyper {
        d,
        f: g.require_usize(&k("feed_forward_length"))?,
        layers,
        heads,
        kv_heads,
        head_dim,
        eps,
        rope_theta,
        ctx: g.get_usize(&k("context_length")).unwrap_or(4096),
    })
}

/// Checks that the file's `blk.N.*` tensors are those of exactly `block_count` blocks.
fn check_blocks(
    plan: &[(String, &TensorInfo, Option<usize>)],
    h: &Hyper,
    arch: &str,
    file: &str,
) -> Result<()> {
    let n = h.layers;
    let top = plan
        .iter()
        .filter_map(|(name, ..)| crate::weights::layer_of(name).map(|(l, _)| l))
        .max();
    crate::weights::block_count_found(n, top, "block", "blk.").map_err(|found| {
        Error::Input(format!(
            "{file}: {arch}.block_count: expected {n} blocks' tensors, {found}"
        ))
    })
}

/// Llama-3.1's per-frequency RoPE divisors, [Dh/2] f32.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The llama3 scaling encoded by a `rope_freqs.weight` tensor (see rope.rs), or None when the
/// file has none or all its factors are 1.
fn read_rope_scaling(g: &GgufFile, arch: &str, h: &Hyper) -> Result<Option<Llama3Scaling>> {
    let file = g.path().display();
    let Some(t) = g.tensor_info(ROPE_FREQS) else {
        return Ok(None);
    };
    if arch != "llama" {
        bail!("{file}: tensor \"{ROPE_FREQS}\" (llama3 RoPE scaling) in a {arch} model: expected it only in llama models");
    }
    if t.shape != [h.head_dim / 2] {
        bail!(
            "{file}: tensor \"{ROPE_FREQS}\" has shape {:?}, expected [{}] (head dim / 2)",
            t.shape,
            h.head_dim / 2
        );
    }
    let (_, factors) = g.tensor_f32(ROPE_FREQS)?;
    llama3_from_factors(&factors, f64::from(h.rope_theta), h.head_dim).map_err(|why| {
        Error::Input(format!(
            "{file}: tensor \"{ROPE_FREQS}\" is not a llama3 RoPE scaling: {why}"
        ))
    })
}

/// Checks that the runtime, reading `config`, divides each inverse frequency by the file's
/// factor: the parameters were fitted, so this guards the fit and its use together.
fn check_rope(g: &GgufFile, config: &serde_json::Value, file: &str) -> Result<()> {
    let cfg = Config::from_json(&config.to_string())?;
    let (_, factors) = g.tensor_f32(ROPE_FREQS)?;
    let got = cfg.rope_inv_freq();
    for (i, (&x, &f)) in got.iter().zip(&factors).enumerate() {
        let base = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64);
        let want = base / f64::from(f);
        if ((f64::from(x) - want) / want).abs() > FACTOR_RTOL {
            bail!("{file}: tensor \"{ROPE_FREQS}\": the recovered llama3 scaling gives inverse frequency {x} at dim pair {i}, expected {want} (base / factor {f})");
        }
    }
    Ok(())
}

/// The supported architecture named by `general.architecture`.
fn read_arch(g: &GgufFile) -> Result<String> {
    let arch = g.require_str("general.architecture")?;
    if arch != "llama" && arch != "qwen2" {
        bail!(
            "{}: general.architecture {arch:?} is not supported: expected \"llama\" or \"qwen2\"",
            g.path().display()
        );
    }
    Ok(arch.to_string())
}

/// Converts the GGUF file `gguf` into a checkpoint folder `out` (created if needed; files of
/// the same names are replaced). Everything is checked before the first byte is written.
pub fn convert(gguf: &Path, out: &Path) -> Result<ConvertReport> {
    convert_opened(&GgufFile::open(gguf)?, out)
}

/// `convert` of a file already opened (its header parsed and its tensors placed).
fn convert_opened(g: &GgufFile, out: &Path) -> Result<ConvertReport> {
    let gguf = g.path();
    let file = gguf.display().to_string();
    let arch = read_arch(g)?;
    let h = read_hyper(g, &arch)?;
    let vocab = GgufVocab::read(g)?;

    // Plan every tensor: its HF name and whether its rows need unpermuting.
    let mut plan: Vec<(String, &TensorInfo, Option<usize>)> = Vec::new();
    let mut types = BTreeMap::new();
    for t in g.tensors() {
        if t.name == ROPE_FREQS {
            // Not a weight: read below into config.json's rope_scaling.
            continue;
        }
        let Some(name) = hf_name(&t.name) else {
            bail!("{file}: tensor {:?} is not part of a {arch} decoder: expected token_embd, output_norm, output or blk.N.{{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down,attn_norm,ffn_norm}}", t.name)
        };
        if !t.ggml_type.is_supported() {
            bail!(
                "{file}: tensor {:?} has type {}, expected one of {SUPPORTED}",
                t.name,
                t.ggml_type
            );
        }
        if arch == "llama" && name.ends_with(".bias") {
            bail!("{file}: tensor {:?}: a llama model with biases is not supported (only qwen2 has q/k/v biases)", t.name);
        }
        // llama.cpp permutes q/k of llama models only; qwen2 uses the HF (NEOX) layout.
        let heads = if arch == "llama" {
            permuted_heads(&t.name, h.heads, h.kv_heads)
        } else {
            None
        };
        *types.entry(t.ggml_type.name().to_string()).or_insert(0) += 1;
        plan.push((name, t, heads));
    }
    let rope_scaling = read_rope_scaling(g, &arch, &h)?;
    let Some(embd) = g.tensor_info("token_embd.weight") else {
        bail!("{file}: missing tensor \"token_embd.weight\"")
    };
    if embd.shape.len() != 2 || embd.shape[1] != h.d {
        bail!(
            "{file}: tensor \"token_embd.weight\" has shape {:?}, expected [vocab, {}]",
            embd.shape,
            h.d
        );
    }
    let vocab_size = embd.shape[0];
    let tied = g.tensor_info("output.weight").is_none();
    check_blocks(&plan, &h, &arch, &file)?;
    plan.sort_by(|a, b| a.0.cmp(&b.0));

    let eos_ids = vocab.as_ref().map(|v| v.eos_ids()).unwrap_or_default();
    let bos_id = vocab.as_ref().and_then(|v| v.bos);
    let (architecture, bias) = if arch == "qwen2" {
        ("Qwen2ForCausalLM", true)
    } else {
        ("LlamaForCausalLM", false)
    };
    let config = json!({
        "architectures": [architecture],
        "model_type": arch,
        "hidden_size": h.d,
        "intermediate_size": h.f,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "num_key_value_heads": h.kv_heads,
        "head_dim": h.head_dim,
        "vocab_size": vocab_size,
        "rms_norm_eps": h.eps as f64,
        "rope_theta": h.rope_theta as f64,
        "rope_scaling": rope_scaling.map(|s| json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        })),
        "max_position_embeddings": h.ctx,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": bias,
        "bos_token_id": bos_id,
        "eos_token_id": match eos_ids.as_slice() { [one] => json!(one), many => json!(many) },
        "torch_dtype": "float32",
        "converted_from": gguf.file_name().map(|n| n.to_string_lossy().to_string()),
    });
    // The folder must load: the checks `Config` makes, before the first byte is written.
    Config::from_json(&config.to_string())
        .map_err(|e| Error::Input(format!("{file}: the converted config.json: {e}")))?;
    if rope_scaling.is_some() {
        check_rope(g, &config, &file)?;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let params = write_safetensors(g, &plan, &out.join("model.safetensors"), &file)?;
    write_json(&out.join("config.json"), &config)?;

    let chat_template = g.get_str("tokenizer.chat_template");
    if let Some(v) = &vocab {
        write_json(
            &out.join("tokenizer.json"),
            &v.tokenizer_json(&arch, &file)?,
        )?;
        write_json(
            &out.join("tokenizer_config.json"),
            &v.tokenizer_config_json(chat_template, h.ctx),
        )?;
    }
    Ok(ConvertReport {
        arch,
        out: out.to_path_buf(),
        tensors: plan.len(),
        params,
        types,
        tokenizer: vocab.is_some(),
        chat_template: vocab.is_some() && chat_template.is_some(),
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("a JSON value always serialises");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Writes the planned tensors as one f32 safetensors file, streaming one tensor at a time.
/// Returns the number of parameters written.
fn write_safetensors(
    g: &GgufFile,
    plan: &[(String, &TensorInfo, Option<usize>)],
    path: &Path,
    file: &str,
) -> Result<usize> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        json!({"format": "pt", "converted_from": file}),
    );
    let mut offset = 0usize;
    for (name, t, _) in plan {
        let bytes = t.n_elements * 4;
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_string(&header).expect("a JSON map always serialises");
    // safetensors readers expect the data to start 8-byte aligned; the format pads with spaces.
    while !(8 + head.len()).is_multiple_of(8) {
        head.push(' ');
    }
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let io = |e| Error::io(path, e);
    w.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(head.as_bytes()).map_err(io)?;
    let mut params = 0;
    for (_, t, heads) in plan {
        let (shape, mut values) = g.tensor_f32(&t.name)?;
        if let Some(heads) = heads {
            let rows = shape[0];
            let cols = values.len() / rows.max(1);
            values = match unpermute_rows(&values, rows, cols, *heads) {
                Some(v) => v,
                None => bail!(
                    "{file}: tensor {:?} has {rows} rows, expected {heads} heads of an even size",
                    t.name
                ),
            };
        }
        w.write_all(bytemuck::cast_slice(&values)).map_err(io)?;
        params += values.len();
    }
    w.flush().map_err(io)?;
    Ok(params)
}

/// The checkpoint folder for a model argument. A folder is returned unchanged. A GGUF file
/// (a `.gguf` name or the "GGUF" magic) is converted once into `<parent>/.<file name>.thinksteer/`
/// (or, when its folder is not writable, under `$XDG_CACHE_HOME/thinksteer/` or
/// `$HOME/.cache/thinksteer/`) and that folder returned; it is reconverted when the file's size
/// or mtime or the converter version changes. Any other file is refused (a model is a folder
/// or a GGUF file); a path that is not there is returned unchanged, so loading it reports the
/// usual "expected a checkpoint folder" error.
pub fn checkpoint_dir(path: &Path) -> Result<PathBuf> {
    if path.is_dir() || !path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_gguf(path) {
        bail!(
            "{}: expected a checkpoint folder or a GGUF file, found a file",
            path.display()
        );
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let stamp = format!(
        "size {}\nmtime_ns {mtime}\nconverter {CONVERTER_VERSION}\n",
        meta.len()
    );
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model.gguf".into());
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let beside = parent.join(format!(".{name}.thinksteer"));
    if stamp_matches(&beside, &stamp) {
        return Ok(beside);
    }
    match convert_into(path, &beside, &stamp) {
        Ok(()) => Ok(beside),
        Err(Error::Io { err, .. }) if is_unwritable(&err) => {
            let Some(base) = cache_base() else {
                bail!(
                    "{}: cannot write the converted checkpoint beside it ({err}) and neither $XDG_CACHE_HOME nor $HOME is set",
                    path.display()
                )
            };
            let canon = path.canonicalize().map_err(|e| Error::io(path, e))?;
            let dir = base.join(format!(
                "{name}-{:016x}",
                crate::rng::fnv1a(canon.to_string_lossy().as_bytes())
            ));
            if stamp_matches(&dir, &stamp) {
                return Ok(dir);
            }
            std::fs::create_dir_all(&base).map_err(|e| Error::io(&base, e))?;
            convert_into(path, &dir, &stamp)?;
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}

fn looks_like_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

fn stamp_matches(dir: &Path, stamp: &str) -> bool {
    std::fs::read_to_string(dir.join(STAMP)).is_ok_and(|s| s == stamp)
}

fn is_unwritable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
    )
}

fn cache_base() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    nonempty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| nonempty("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|b| b.join("thinksteer"))
}

/// Converts into a fresh temp folder beside `dir`, stamps it, then renames it into place, so a
/// killed conversion never leaves a half-written `dir`.
fn convert_into(gguf: &Path, dir: &Path, stamp: &str) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let base = dir.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!("{base}.tmp-{}", std::process::id()));
    // The header first: a file that is no GGUF model (a wrong magic, a truncated header, an
    // unsupported architecture) is refused before the note says it is being converted.
    let g = GgufFile::open(gguf)?;
    read_hyper(&g, &read_arch(&g)?)?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    eprintln!(
        "converting {} into the checkpoint folder {} (once; reused while the file is unchanged)",
        gguf.display(),
        dir.display()
    );
    let done = convert_opened(&g, &tmp).and_then(|_| {
        let s = tmp.join(STAMP);
        std::fs::write(&s, stamp).map_err(|e| Error::io(&s, e))
    });
    if let Err(e) = done {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process may have finished the same conversion first.
        if stamp_matches(dir, stamp) {
            return Ok(());
        }
        return Err(Error::io(dir, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_and_missing_paths_pass_through() {
        let d = std::env::temp_dir();
        assert_eq!(checkpoint_dir(&d).unwrap(), d);
        let missing = d.join("no-such-thinksteer-model.gguf");
        assert_eq!(checkpoint_dir(&missing).unwrap(), missing);
    }
}
