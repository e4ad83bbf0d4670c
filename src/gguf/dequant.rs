//! ggml tensor types: their ids, names and block layouts, and dequantisation to f32 of the
//! types this crate reads (`SUPPORTED`). All data is little-endian. The 256-value k-quants
//! (Q4_K, Q5_K, Q6_K) live in kquants.rs.
//!
//! Block layouts (32 elements per block for the Q types):
//! - Q8_0: f16 scale d, then 32 × i8 q;               value = d·q                  (34 bytes)
//! - Q4_0: f16 d, then 16 bytes of 4-bit q;           value = d·(q − 8)            (18 bytes)
//! - Q4_1: f16 d, f16 min m, then 16 bytes of q;      value = d·q + m              (20 bytes)
//! - Q5_0: f16 d, u32 qh, 16 bytes of low nibbles;    value = d·(q − 16)           (22 bytes)
//! - Q5_1: f16 d, f16 m, u32 qh, 16 bytes;            value = d·q + m              (24 bytes)
//!
//! In the 4- and 5-bit types byte j holds element j in its low nibble and element j + 16 in its
//! high nibble; in Q5_0 / Q5_1 bit i of qh is bit 4 of element i. (llama.cpp's Q4_K_M / Q5_K_M
//! fall back to Q5_0 / Q5_1 for rows that are not whole 256-value super-blocks, e.g. D = 576 or
//! 896.) The arithmetic is done in f32 after widening d and m, as ggml's reference does.

use super::kquants::{dequantize_q4_k, dequantize_q5_k, dequantize_q6_k};
use half::{bf16, f16};

/// The types `dequantize` decodes, as listed in error messages.
pub const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K";

/// A ggml type id as stored in a GGUF tensor info.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const BF16: GgmlType = GgmlType(30);

    /// The ggml name, or "unknown" for ids this table does not list.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            _ => "unknown",
        }
    }

    /// (elements per block, bytes per block) for the types whose size this module knows;
    /// used to check that every tensor's bytes lie inside the file, even those we cannot decode.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self.0 {
            0 => (1, 4),
            1 => (1, 2),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            9 => (32, 36),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            15 => (256, 292),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 => (1, 8),
            28 => (1, 8),
            30 => (1, 2),
            _ => return None,
        })
    }

    /// Whether `dequantize` handles this type (the list in `SUPPORTED`).
    pub fn is_supported(self) -> bool {
        matches!(self.0, 0 | 1 | 2 | 3 | 6 | 7 | 8 | 12 | 13 | 14 | 30)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (type id {})", self.name(), self.0)
    }
}

/// Decodes `data` (exactly the tensor's bytes) of a supported type to f32.
/// Returns None for an unsupported type; the caller checked the byte length.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    Some(match ty {
        GgmlType::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => data.chunks_exact(2).map(|b| f16_at(b, 0)).collect(),
        GgmlType::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(data.len() / 34 * 32);
            for block in data.chunks_exact(34) {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
            out
        }
        GgmlType::Q4_0 => {
            let mut out = Vec::with_capacity(data.len() / 18 * 32);
            for block in data.chunks_exact(18) {
                let d = f16_at(block, 0);
                let qs = &block[2..];
                out.extend(qs.iter().map(|&b| d * (f32::from(b & 0x0f) - 8.0)));
                out.extend(qs.iter().map(|&b| d * (f32::from(b >> 4) - 8.0)));
            }
            out
        }
        GgmlType::Q4_1 => {
            let mut out = Vec::with_capacity(data.len() / 20 * 32);
            for block in data.chunks_exact(20) {
                let d = f16_at(block, 0);
                let m = f16_at(block, 2);
                let qs = &block[4..];
                out.extend(qs.iter().map(|&b| d * f32::from(b & 0x0f) + m));
                out.extend(qs.iter().map(|&b| d * f32::from(b >> 4) + m));
            }
            out
        }
        GgmlType::Q5_0 => {
            let mut out = Vec::with_capacity(data.len() / 22 * 32);
            for block in data.chunks_exact(22) {
                let d = f16_at(block, 0);
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let qs = &block[6..];
                out.extend(q5_values(qs, qh).map(|q| d * (f32::from(q) - 16.0)));
            }
            out
        }
        GgmlType::Q5_1 => {
            let mut out = Vec::with_capacity(data.len() / 24 * 32);
            for block in data.chunks_exact(24) {
                let d = f16_at(block, 0);
                let m = f16_at(block, 2);
                let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
                let qs = &block[8..];
                out.extend(q5_values(qs, qh).map(|q| d * f32::from(q) + m));
            }
            out
        }
        GgmlType::Q4_K => dequantize_q4_k(data),
        GgmlType::Q5_K => dequantize_q5_k(data),
        GgmlType::Q6_K => dequantize_q6_k(data),
        _ => return None,
    })
}

/// The 32 unsigned 5-bit q of a Q5_0 / Q5_1 block: low nibbles of `qs` (16 bytes) then high
/// nibbles, bit 4 of element i from bit i of `qh`.
fn q5_values(qs: &[u8], qh: u32) -> impl Iterator<Item = u8> + '_ {
    let lo = qs.iter().map(|&b| b & 0x0f);
    let hi = qs.iter().map(|&b| b >> 4);
    lo.chain(hi)
        .enumerate()
        .map(move |(i, q)| q | ((((qh >> i) & 1) as u8) << 4))
}
