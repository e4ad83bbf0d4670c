//! Dequantisation of llama.cpp's k-quants Q4_K, Q5_K and Q6_K: super-blocks of 256 values in
//! sub-blocks that each carry a small integer scale (and, for Q4_K / Q5_K, a min), themselves
//! scaled by one f16 per super-block. These are what Q4_K_M / Q5_K_M / Q6_K files mostly hold.
//!
//! Super-block layouts (all little-endian):
//! - Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales/mins (8 pairs), 128 bytes of
//!   4-bit q. Sub-block j (32 values): value = (d·sc_j)·q − (dmin·m_j).
//! - Q5_K (176 bytes): as Q4_K, then 32 bytes qh before the 128 bytes of low nibbles; bit j of
//!   qh[l] is bit 4 of value l of sub-block j. Same formula with a 5-bit q.
//! - Q6_K (210 bytes): 128 bytes ql (low 4 bits), 64 bytes qh (2 high bits), 16 × i8 scales,
//!   f16 d. Sub-block s (16 values): value = (d·sc_s)·(q − 32), q 6-bit.
//!
//! The arithmetic is f32 with the same two roundings as ggml's reference and gguf-py: first the
//! sub-block's scale (d·sc), then scale·q (and the subtraction of dmin·m), never fused.

use half::f16;

/// Values per super-block (ggml's QK_K).
pub const QK_K: usize = 256;
pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit (scale, min) of sub-block j (0..8) from Q4_K / Q5_K's 12 packed bytes: bytes 0..4
/// hold scales 0..4 in their low 6 bits, bytes 4..8 mins 0..4; scales/mins 4..8 keep their low
/// 4 bits in the nibbles of bytes 8..12 and their top 2 bits in the spare top bits of bytes 0..8.
fn scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K super-blocks → f32; `data.len()` must be a multiple of 144.
pub fn dequantize_q4_k(data: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len() / Q4_K_BYTES * QK_K);
    for b in data.chunks_exact(Q4_K_BYTES) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let scales = &b[4..16];
        let qs = &b[16..144]; // 4 chunks of 32 bytes: sub-block 2c in low nibbles, 2c + 1 high
        for j in 0..8 {
            let (sc, m) = scale_min(scales, j);
            let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
            let chunk = &qs[j / 2 * 32..j / 2 * 32 + 32];
            let shift = 4 * (j % 2);
            out.extend(
                chunk
                    .iter()
                    .map(|&q| dl * f32::from((q >> shift) & 0x0f) - ml),
            );
        }
    }
    out
}

/// Q5_K super-blocks → f32; `data.len()` must be a multiple of 176.
pub fn dequantize_q5_k(data: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len() / Q5_K_BYTES * QK_K);
    for b in data.chunks_exact(Q5_K_BYTES) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let scales = &b[4..16];
        let qh = &b[16..48]; // [32]: bit j of qh[l] belongs to sub-block j
        let qs = &b[48..176];
        for j in 0..8 {
            let (sc, m) = scale_min(scales, j);
            let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
            let chunk = &qs[j / 2 * 32..j / 2 * 32 + 32];
            let shift = 4 * (j % 2);
            out.extend(chunk.iter().zip(qh).map(|(&q, &h)| {
                let q = ((q >> shift) & 0x0f) | (((h >> j) & 1) << 4);
                dl * f32::from(q) - ml
            }));
        }
    }
    out
}

/// Q6_K super-blocks → f32; `data.len()` must be a multiple of 210.
pub fn dequantize_q6_k(data: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len() / Q6_K_BYTES * QK_K);
    for b in data.chunks_exact(Q6_K_BYTES) {
        let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208);
        // Two halves of 128 values; in half h, value e takes its low 4 bits from the low
        // (e < 64) or high (e ≥ 64) nibble of ql[64h + e % 64] and its top 2 bits from bits
        // 2·(e / 32) of qh[32h + e % 32].
        for h in 0..2 {
            for e in 0..128 {
                let lo = (ql[64 * h + e % 64] >> (4 * (e / 64))) & 0x0f;
                let hi = (qh[32 * h + e % 32] >> (2 * (e / 32))) & 3;
                let q = i16::from(lo | (hi << 4)) - 32;
                let sc = scales[(128 * h + e) / 16] as i8;
                out.push(d * f32::from(sc) * f32::from(q));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-packed scales: sub-block j has scale 10 + j and min 40 + j (both need 6 bits for
    /// j ≥ 4 when the top bits are set), so the split low/high packing of 4..8 is exercised.
    #[test]
    fn scale_min_unpacks_the_split_6_bit_fields() {
        let (sc, mn): (Vec<u8>, Vec<u8>) = (0..8).map(|j| (10 + j * 7, 40 + j * 3)).unzip();
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
        }
        for j in 0..8 {
            assert_eq!(scale_min(&s, j), (sc[j], mn[j]), "sub-block {j}");
        }
    }

    /// One Q6_K super-block with d = 1, all scales 1: ql/qh chosen so that value e is e % 64
    /// (every 6-bit q appears), checking where each of the 256 values takes its bits from.
    #[test]
    fn q6_k_bit_positions() {
        let mut b = vec![0u8; Q6_K_BYTES];
        for h in 0..2 {
            for e in 0..128usize {
                let q = (e % 64) as u8;
                b[64 * h + e % 64] |= (q & 0x0f) << (4 * (e / 64));
                b[128 + 32 * h + e % 32] |= (q >> 4) << (2 * (e / 32));
            }
        }
        b[192..208].fill(1);
        b[208..210].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        let v = dequantize_q6_k(&b);
        let want: Vec<f32> = (0..256).map(|i| (i % 64) as f32 - 32.0).collect();
        assert_eq!(v, want);
    }
}
