//! GGUF files (versions 2 and 3), memory-mapped: metadata, tensor infos and tensors
//! dequantised to f32 (types in `SUPPORTED`: the float types, Q8_0, Q4_0/1, Q5_0/1 in
//! dequant.rs and the k-quants Q4_K, Q5_K, Q6_K in kquants.rs). Shapes are returned row-major
//! ([out, in] for a linear weight, as in safetensors), the reverse of the fastest-first dim
//! order GGUF stores.
//!
//! Layout read here: "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
//! pairs (string key, u32 type, value), the tensor infos (string name, u32 n_dims, u64 dims
//! fastest-first, u32 ggml type, u64 offset relative to the data section), then padding to
//! `general.alignment` (default 32) and the data section. Strings are a u64 length + UTF-8.
//!
//! `convert` turns a llama / qwen2 GGUF into a checkpoint folder (names.rs maps the tensor
//! names, tokenizer.rs rebuilds tokenizer.json, rope.rs turns Llama-3.1's `rope_freqs.weight`
//! into config.json's llama3 `rope_scaling`); `checkpoint_dir` does so once per file so that
//! every command accepts a `.gguf` file where it accepts a folder.

mod convert;
mod dequant;
mod kquants;
pub mod names;
mod reader;
mod rope;
mod tokenizer;
mod value;

pub use convert::{checkpoint_dir, convert, ConvertReport, CONVERTER_VERSION};
pub use dequant::{dequantize, GgmlType, SUPPORTED};
pub use tokenizer::GgufVocab;
pub use value::Value;

use crate::{bail, Error, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One tensor's description from the file's tensor-info table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (slowest dim first), e.g. [V, D] for `token_embd.weight`.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte offset of the tensor's data from the start of the data section.
    pub offset: u64,
    pub n_elements: usize,
}

impl TensorInfo {
    /// Bytes the tensor occupies, for types whose block layout is known.
    pub fn byte_len(&self) -> Option<usize> {
        let (block, bytes) = self.ggml_type.block_layout()?;
        Some(self.n_elements / block * bytes)
    }
}

pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, Value)>,
    /// metadata key → index into `metadata`
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    /// tensor name → index into `tensors`
    tensor_index: HashMap<String, usize>,
    alignment: usize,
    data_start: usize,
}

impl GgufFile {
    /// Maps and parses `path`, checking that every tensor of a known type lies inside the file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        // The map lives as long as `GgufFile`.
        let mmap = crate::files::map_file(path, "a GGUF file")?;
        let name = path.display().to_string();
        let p = reader::parse(&mmap, &name)?;

        let mut meta_index = HashMap::new();
        for (i, (k, _)) in p.metadata.iter().enumerate() {
            if meta_index.insert(k.clone(), i).is_some() {
                bail!("{name}: metadata key {k:?} appears twice");
            }
        }
        let data_len = mmap.len().saturating_sub(p.data_start);
        let mut tensor_index = HashMap::new();
        for (i, t) in p.tensors.iter().enumerate() {
            if tensor_index.insert(t.name.clone(), i).is_some() {
                bail!("{name}: tensor {:?} appears twice", t.name);
            }
            check_placement(&name, t, p.alignment, data_len)?;
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: p.version,
            metadata: p.metadata,
            meta_index,
            tensors: p.tensors,
            tensor_index,
            alignment: p.alignment,
            data_start: p.data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// File offset of the data section.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// All metadata pairs in file order.
    pub fn metadata_pairs(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        Some(&self.metadata[*self.meta_index.get(key)?].1)
    }

    /// A string value; None when missing or not a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.metadata(key)?.as_str()
    }

    /// Any integer value that fits in u32; None when missing, not an integer, or out of range.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        u32::try_from(self.metadata(key)?.as_int()?).ok()
    }

    /// Any integer value that fits in u64.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        u64::try_from(self.metadata(key)?.as_int()?).ok()
    }

    /// Any integer value that fits in usize.
    pub fn get_usize(&self, key: &str) -> Option<usize> {
        usize::try_from(self.metadata(key)?.as_int()?).ok()
    }

    /// Any integer value that fits in i64.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        i64::try_from(self.metadata(key)?.as_int()?).ok()
    }

    /// An f32 or f64 value as f32.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.metadata(key)?.as_f32()
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.metadata(key)?.as_bool()
    }

    /// An array of strings; None when missing, not an array, or any element is not a string.
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.metadata(key)?
            .as_array()?
            .iter()
            .map(Value::as_str)
            .collect()
    }

    /// An array of integers, each fitting in i64.
    pub fn get_i64_array(&self, key: &str) -> Option<Vec<i64>> {
        self.metadata(key)?
            .as_array()?
            .iter()
            .map(|v| i64::try_from(v.as_int()?).ok())
            .collect()
    }

    /// An array of f32 (or f64, narrowed) values.
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.metadata(key)?
            .as_array()?
            .iter()
            .map(Value::as_f32)
            .collect()
    }

    /// Like `get_usize`, but a missing or mistyped key is an `Error::Input` naming it.
    pub fn require_usize(&self, key: &str) -> Result<usize> {
        self.get_usize(key)
            .ok_or_else(|| self.missing(key, "a non-negative integer"))
    }

    /// Like `get_str`, but a missing or mistyped key is an `Error::Input` naming it.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)
            .ok_or_else(|| self.missing(key, "a string"))
    }

    fn missing(&self, key: &str, expected: &str) -> Error {
        let found = match self.metadata(key) {
            None => "no such key".to_string(),
            Some(v) => format!("a {} ({v:?})", v.type_name()),
        };
        let found: String = found.chars().take(120).collect();
        Error::Input(format!(
            "{}: metadata {key:?}: expected {expected}, found {found}",
            self.path.display()
        ))
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        Some(&self.tensors[*self.tensor_index.get(name)?])
    }

    /// A tensor's stored bytes (checked in `open` to lie inside the file).
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let Some(t) = self.tensor_info(name) else {
            bail!("{}: missing tensor {name:?}", self.path.display())
        };
        let Some(len) = t.byte_len() else {
            bail!(
                "{}: tensor {name:?} has type {}, whose size this reader does not know",
                self.path.display(),
                t.ggml_type
            )
        };
        let start = self.data_start + t.offset as usize;
        Ok((t, &self.mmap[start..start + len]))
    }

    /// The tensor dequantised to f32, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let Some(t) = self.tensor_info(name) else {
            bail!("{}: missing tensor {name:?}", self.path.display())
        };
        if !t.ggml_type.is_supported() {
            bail!(
                "{}: tensor {name:?} has type {}, expected one of {SUPPORTED}",
                self.path.display(),
                t.ggml_type
            );
        }
        let (t, bytes) = self.tensor_bytes(name)?;
        let Some(values) = dequantize(t.ggml_type, bytes) else {
            bail!(
                "{}: tensor {name:?}: cannot decode type {}",
                self.path.display(),
                t.ggml_type
            )
        };
        debug_assert_eq!(values.len(), t.n_elements);
        Ok((t.shape.clone(), values))
    }
}

/// Checks a tensor's offset alignment, block divisibility and that its bytes fit in the data
/// section (`data_len` bytes). Types of unknown size only get the offset checks.
fn check_placement(file: &str, t: &TensorInfo, alignment: usize, data_len: usize) -> Result<()> {
    let name = &t.name;
    if !t.offset.is_multiple_of(alignment as u64) {
        bail!(
            "{file}: tensor {name:?}: data offset {} is not a multiple of the alignment {alignment}",
            t.offset
        );
    }
    let Some((block, bytes)) = t.ggml_type.block_layout() else {
        if t.offset > data_len as u64 {
            bail!(
                "{file}: truncated GGUF file: tensor {name:?} starts at data offset {}, past the {data_len} data bytes",
                t.offset
            );
        }
        return Ok(());
    };
    // Blocks run along the fastest (last row-major) dim, so each row must be whole blocks.
    let row = t.shape.last().copied().unwrap_or(1);
    if !row.is_multiple_of(block) {
        bail!(
            "{file}: tensor {name:?} of type {} has rows of {row} elements, expected a multiple of its block size {block}",
            t.ggml_type
        );
    }
    let len = (t.n_elements / block) as u128 * bytes as u128;
    let end = t.offset as u128 + len;
    if end > data_len as u128 {
        bail!(
            "{file}: truncated GGUF file: tensor {name:?} ({} {:?}) needs data bytes {}..{end}, but the data section has {data_len} bytes",
            t.ggml_type.name(),
            t.shape,
            t.offset
        );
    }
    Ok(())
}
