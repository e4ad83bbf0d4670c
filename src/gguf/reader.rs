//! Parsing of a GGUF file's header, metadata and tensor infos from its bytes. Every length,
//! count and offset is checked against the bytes that remain before anything is read or
//! allocated, so a truncated or corrupt file gives an `Error::Input` naming the file, never a
//! panic or a huge allocation.

use super::dequant::GgmlType;
use super::value::{type_id, Value};
use super::TensorInfo;
use crate::{bail, Result};

/// Arrays nested deeper than this are rejected: real files nest at most one level, and the
/// limit keeps a hostile file from recursing the stack away.
const MAX_NESTING: usize = 16;
/// ggml tensors have at most 4 dims (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
pub(crate) const DEFAULT_ALIGNMENT: usize = 32;

/// Everything before the tensor data.
pub(crate) struct Parsed {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    /// Byte offset in the file of the (aligned) data section.
    pub data_start: usize,
}

/// A bounds-checked little-endian reader over the whole file.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "{}: truncated GGUF file: {} needs {n} bytes at offset {}, found {} bytes left (file is {} bytes)",
                self.file,
                what(),
                self.pos,
                self.remaining(),
                self.buf.len()
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A u64 count of items, each at least `min_item` bytes, checked to fit the rest of the file.
    fn count(&mut self, min_item: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_item))
            .is_some_and(|bytes| bytes <= self.remaining());
        if !fits {
            bail!(
                "{}: truncated GGUF file: {} gives a count of {n} (each at least {min_item} bytes), but only {} bytes remain after offset {}",
                self.file,
                what(),
                self.remaining(),
                self.pos
            );
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.count(1, &|| format!("the length of {}", what()))?;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => bail!(
                "{}: {} is not valid UTF-8 ({e}) at offset {}",
                self.file,
                what(),
                self.pos - len
            ),
        }
    }

    /// The smallest encoding of one value of type `ty`, for count checks.
    fn min_size(ty: u32) -> usize {
        match ty {
            type_id::U8 | type_id::I8 | type_id::BOOL => 1,
            type_id::U16 | type_id::I16 => 2,
            type_id::U32 | type_id::I32 | type_id::F32 => 4,
            type_id::STRING => 8,
            type_id::ARRAY => 12,
            _ => 8,
        }
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match ty {
            type_id::U8 => Value::U8(self.array::<1>(what)?[0]),
            type_id::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            type_id::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            type_id::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            type_id::U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            type_id::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            type_id::U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            type_id::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            type_id::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            type_id::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            type_id::BOOL => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!(
                    "{}: {}: expected a bool byte 0 or 1, found {b}",
                    self.file,
                    what()
                ),
            },
            type_id::STRING => Value::String(self.string(what)?),
            type_id::ARRAY => {
                if depth >= MAX_NESTING {
                    bail!(
                        "{}: {}: arrays nested more than {MAX_NESTING} deep",
                        self.file,
                        what()
                    );
                }
                let elem = self.u32(&|| format!("the element type of {}", what()))?;
                if elem > type_id::F64 {
                    bail!(
                        "{}: {}: expected an array element type 0..=12, found {elem}",
                        self.file,
                        what()
                    );
                }
                let n = self.count(Self::min_size(elem), &|| {
                    format!("the length of {}", what())
                })?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value(elem, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                Value::Array(items)
            }
            other => bail!(
                "{}: {}: expected a value type 0..=12, found {other}",
                self.file,
                what()
            ),
        })
    }
}

/// Parses everything up to the data section. `file` names the file in errors.
pub(crate) fn parse(buf: &[u8], file: &str) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0, file };
    let magic = c.array::<4>(&|| "the magic".into())?;
    if &magic != b"GGUF" {
        bail!(
            "{file}: not a GGUF file: expected magic \"GGUF\", found {:?}",
            String::from_utf8_lossy(&magic)
        );
    }
    let version = c.u32(&|| "the version".into())?;
    if version != 2 && version != 3 {
        bail!("{file}: unsupported GGUF version {version}, expected 2 or 3");
    }
    // A tensor info is at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes,
    // a metadata pair at least 8 (key len) + 4 (type) + 1 bytes.
    let n_tensors = c.count(24, &|| "the tensor count".into())?;
    let n_kv = c.count(13, &|| "the metadata count".into())?;

    let mut metadata = Vec::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let ty = c.u32(&|| format!("the type of metadata {key:?}"))?;
        let v = c.value(ty, 0, &|| format!("metadata {key:?}"))?;
        metadata.push((key, v));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_int() {
            Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= 1 << 30 => a as usize,
            _ => bail!("{file}: general.alignment: expected a power-of-two integer, found {v:?}"),
        },
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&|| format!("the name of tensor #{i}"))?;
        let n_dims = c.u32(&|| format!("the dim count of tensor {name:?}"))?;
        if n_dims > MAX_DIMS {
            bail!("{file}: tensor {name:?}: expected at most {MAX_DIMS} dims, found {n_dims}");
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&|| format!("the dims of tensor {name:?}"))?);
        }
        let ty = GgmlType(c.u32(&|| format!("the type of tensor {name:?}"))?);
        let offset = c.u64(&|| format!("the data offset of tensor {name:?}"))?;
        let n_elements = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?));
        let Some(n_elements) = n_elements else {
            bail!("{file}: tensor {name:?}: dims {dims:?} overflow the element count");
        };
        // GGUF lists dims fastest-varying first; row-major order is the reverse.
        let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        tensors.push(TensorInfo {
            name,
            shape,
            ggml_type: ty,
            offset,
            n_elements,
        });
    }

    let data_start = c.pos.div_ceil(alignment) * alignment;
    if data_start > buf.len() && n_tensors > 0 {
        bail!(
            "{file}: truncated GGUF file: the tensor data should start at offset {data_start}, but the file is {} bytes",
            buf.len()
        );
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}
