//! Checkpoint tensors: `model.safetensors` or a sharded `model.safetensors.index.json`,
//! memory-mapped, in bf16, f16 or f32, converted on request to f32 (CPU) or bf16 (GPU upload).
//! Every error names the file and the tensor.

use crate::config::Config;
use crate::{bail, Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct WeightFiles {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `files`
    index: HashMap<String, usize>,
}

/// A borrowed view of one tensor in its stored dtype.
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl WeightFiles {
    /// Opens `dir/model.safetensors`, or every shard listed by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<WeightFiles> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for name in shard_names(dir)? {
            let path = dir.join(&name);
            // The map lives as long as `WeightFiles`.
            let mmap = crate::files::map_file(&path, "a safetensors file")?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                Error::Input(format!(
                    "{}: not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
            for n in st.names() {
                index.insert(n.to_string(), files.len());
            }
            drop(st);
            files.push((path, mmap));
        }
        Ok(WeightFiles { files, index })
    }

    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The stored tensor, checked against the expected shape.
    pub fn raw(&self, name: &str, shape: &[usize]) -> Result<RawTensor<'_>> {
        let Some(&fi) = self.index.get(name) else {
            bail!("{}: missing tensor {name:?}", self.describe())
        };
        let (path, mmap) = &self.files[fi];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::Input(format!("{}: tensor {name:?}: {e}", path.display())))?;
        if view.shape() != shape {
            bail!(
                "{}: tensor {name:?} has shape {:?}, expected {:?}",
                path.display(),
                view.shape(),
                shape
            );
        }
        let dtype = view.dtype();
        if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            bail!(
                "{}: tensor {name:?} has dtype {dtype:?}, expected BF16, F16 or F32",
                path.display()
            );
        }
        // Re-borrow the bytes from the mmap (not from `st`) so they outlive this call.
        let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
        let data = &mmap[start..start + view.data().len()];
        Ok(RawTensor {
            dtype,
            shape: shape.to_vec(),
            data,
        })
    }

    /// The tensor as f32 (exact for bf16/f16 sources), every value checked finite.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.raw(name, shape)?;
        let (v, finite) = to_f32(t.dtype, t.data);
        if !finite {
            self.non_finite(name, v.iter().position(|x| !x.is_finite()))?;
        }
        Ok(v)
    }

    /// The tensor as bf16 (rounded to nearest even from f32/f16 sources), every value checked
    /// finite after rounding. The check rides on the conversion's pass, so it costs no extra
    /// read of the weights.
    pub fn bf16(&self, name: &str, shape: &[usize]) -> Result<Vec<bf16>> {
        let t = self.raw(name, shape)?;
        // Exponent bits all ones: infinity or NaN.
        let bad = |x: bf16| x.to_bits() & 0x7f80 == 0x7f80;
        let mut finite = true;
        let v: Vec<bf16> = match t.dtype {
            Dtype::BF16 => t
                .data
                .chunks_exact(2)
                .map(|b| {
                    let x = bf16::from_le_bytes([b[0], b[1]]);
                    finite &= !bad(x);
                    x
                })
                .collect(),
            _ => to_f32(t.dtype, t.data)
                .0
                .into_iter()
                .map(|f| {
                    let x = bf16::from_f32(f);
                    finite &= !bad(x);
                    x
                })
                .collect(),
        };
        if !finite {
            self.non_finite(name, v.iter().position(|&x| bad(x)))?;
        }
        Ok(v)
    }

    fn non_finite(&self, name: &str, at: Option<usize>) -> Result<()> {
        let path = match self.index.get(name) {
            Some(&fi) => self.files[fi].0.display().to_string(),
            None => self.describe(),
        };
        let at = at.unwrap_or(0);
        bail!("{path}: tensor {name:?}: expected finite values, found a NaN or infinity at element {at}")
    }

    /// Checks, before any per-layer buffer is allocated, that the checkpoint's
    /// `model.layers.N.*` tensors are those of exactly `c.num_hidden_layers` blocks (a config
    /// with fewer would silently skip blocks, one with absurdly many allocate before the first
    /// missing tensor), and that it holds no bias the decoder would ignore.
    pub fn check_against(&self, c: &Config) -> Result<()> {
        let n = c.num_hidden_layers;
        let mut top: Option<usize> = None;
        for name in self.index.keys() {
            let Some((layer, rest)) = layer_of(name) else {
                continue;
            };
            top = top.max(Some(layer));
            let qkv_bias = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .any(|p| rest == format!("self_attn.{p}.bias"));
            if rest.ends_with(".bias") && !qkv_bias {
                bail!(
                    "{}: tensor {name:?}: expected biases only on q/k/v_proj, found one the decoder does not implement",
                    self.describe()
                );
            }
        }
        block_count_found(n, top, "layer", "model.layers.").map_err(|found| {
            Error::Input(format!(
                "{}: expected {n} layers' tensors (num_hidden_layers in config.json), {found}",
                self.describe()
            ))
        })
    }

    /// The stored dtype of one tensor, if present.
    pub fn dtype_of(&self, name: &str) -> Option<Dtype> {
        let (_, mmap) = &self.files[*self.index.get(name)?];
        let st = SafeTensors::deserialize(mmap).ok()?;
        st.tensor(name).ok().map(|v| v.dtype())
    }

    fn describe(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            fs => format!("{} (and {} more shards)", fs[0].0.display(), fs.len() - 1),
        }
    }
}

/// The safetensors files of a checkpoint folder: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json` (sorted, each once).
fn shard_names(dir: &Path) -> Result<Vec<String>> {
    let single = dir.join("model.safetensors");
    let index_path = dir.join("model.safetensors.index.json");
    Ok(if single.exists() {
        vec!["model.safetensors".into()]
    } else if index_path.exists() {
        let text = crate::files::read_text(&index_path)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Input(format!("{}: malformed JSON: {e}", index_path.display())))?;
        let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
            bail!(
                "{}: expected an object \"weight_map\", found none",
                index_path.display()
            )
        };
        let mut names: Vec<String> = map
            .values()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        names.sort();
        names.dedup();
        names
    } else {
        bail!(
            "{}: expected model.safetensors or model.safetensors.index.json, found neither",
            dir.display()
        )
    })
}

/// What changed when a run recorded with `checkpoint_fingerprint` `was` is resumed on `now`:
/// "MODEL as it was then (checkpoint fingerprint A), now B", or None when they agree or either
/// side has none (settings written before fingerprints were kept).
pub fn checkpoint_changed(model: &str, was: Option<&str>, now: Option<&str>) -> Option<String> {
    match (was, now) {
        (Some(a), Some(b)) if a != b => Some(format!(
            "{model} as it was then (checkpoint fingerprint {a}), now {b}"
        )),
        _ => None,
    }
}

/// A fingerprint of the model a path names, in hex, so that a run resumed on a checkpoint
/// replaced under the same path is told apart: for a folder, the JSON files that thinksteer
/// reads (config, tokenizer, generation config) and its safetensors files, each through
/// `files::sampled_hash` (whole up to 4 MiB, sampled beyond); for a file (GGUF), the file.
pub fn checkpoint_fingerprint(path: &Path) -> Result<String> {
    use crate::rng::fnv1a_extend;
    if !path.is_dir() {
        return Ok(format!("{:016x}", crate::files::sampled_hash(path)?));
    }
    let small = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    let mut h = crate::rng::FNV1A_START;
    for name in small
        .iter()
        .map(|s| s.to_string())
        .chain(shard_names(path)?)
    {
        let p = path.join(&name);
        if !p.exists() {
            continue;
        }
        h = fnv1a_extend(h, name.as_bytes());
        h = fnv1a_extend(h, &crate::files::sampled_hash(&p)?.to_le_bytes());
    }
    Ok(format!("{h:016x}"))
}

/// Whether the highest block index among a checkpoint's tensors (`top`) makes exactly `n`
/// blocks; else what was found, for the caller's line ("found tensors of layer 7 (...)").
pub fn block_count_found(
    n: usize,
    top: Option<usize>,
    block: &str,
    prefix: &str,
) -> std::result::Result<(), String> {
    match top {
        Some(m) if m >= n => Err(format!("found tensors of {block} {m} ({prefix}{m}.*)")),
        Some(m) if m + 1 < n => Err(format!(
            "found tensors of {block}s 0..={m} only (no {prefix}{}.*)",
            m + 1
        )),
        None => Err(format!("found no {prefix}N.* tensor")),
        Some(_) => Ok(()),
    }
}

/// `model.layers.N.rest` → (N, rest).
pub fn layer_of(name: &str) -> Option<(usize, &str)> {
    let (n, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// The values as f32, and whether all are finite (checked in the same pass).
fn to_f32(dtype: Dtype, data: &[u8]) -> (Vec<f32>, bool) {
    let mut finite = true;
    let mut check = |x: f32| {
        finite &= x.is_finite();
        x
    };
    let v = match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| check(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| check(bf16::from_le_bytes([b[0], b[1]]).to_f32()))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| check(f16::from_le_bytes([b[0], b[1]]).to_f32()))
            .collect(),
        _ => unreachable!("dtype checked in raw()"),
    };
    (v, finite)
}
