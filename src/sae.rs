//! The SAE file (safetensors) and the SAE encode of hybrid.md §3 step 1, plus the small
//! safetensors read/write helpers that the steering-set file shares.
//!
//! File format: `W_enc` [D, K], `b_enc` [K], `W_dec` [K, D], `b_dec` [D], optional
//! `activation_mean` [D] (f32, bf16 or f16; held as f32); metadata `layer` (0-based block of the
//! thinking model whose output the SAE reads), `k` (top-k used in training), `model` (free
//! text, optional), `titles` (optional JSON list of K category names).

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::bail;
use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct Sae {
    pub w_enc: Vec<f32>,                   // [D, K]
    pub b_enc: Vec<f32>,                   // [K]
    pub w_dec: Vec<f32>,                   // [K, D]
    pub b_dec: Vec<f32>,                   // [D]
    pub activation_mean: Option<Vec<f32>>, // [D]
    pub layer: usize,
    pub k: usize, // top-k used in training; encode/category ignore it (§3: all K latents)
    pub model: String,
    pub titles: Option<Vec<String>>, // [K]
    pub d: usize,
    pub latents: usize,
}

impl Sae {
    pub fn load(path: impl AsRef<Path>) -> Result<Sae> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = parse_safetensors(&bytes, &file)?;
        let meta = read_metadata(&bytes, &file)?;

        let (w_enc_shape, w_enc) = tensor_f32(&st, &file, "W_enc", 2, "[D, K]")?;
        let (d, latents) = (w_enc_shape[0], w_enc_shape[1]);
        if d == 0 || latents == 0 {
            bail!(
                "{file}: tensor `W_enc` has shape {w_enc_shape:?}, expected [D, K] with D, K >= 1"
            );
        }
        let (s, b_enc) = tensor_f32(&st, &file, "b_enc", 1, "[K]")?;
        expect_shape(&file, "b_enc", &s, &[latents], "[K] with K from W_enc")?;
        let (s, w_dec) = tensor_f32(&st, &file, "W_dec", 2, "[K, D]")?;
        expect_shape(
            &file,
            "W_dec",
            &s,
            &[latents, d],
            "[K, D] with D, K from W_enc",
        )?;
        let (s, b_dec) = tensor_f32(&st, &file, "b_dec", 1, "[D]")?;
        expect_shape(&file, "b_dec", &s, &[d], "[D] with D from W_enc")?;
        let activation_mean = if st.names().contains(&"activation_mean") {
            let (s, m) = tensor_f32(&st, &file, "activation_mean", 1, "[D]")?;
            expect_shape(&file, "activation_mean", &s, &[d], "[D] with D from W_enc")?;
            Some(m)
        } else {
            None
        };

        let layer = meta_usize(&meta, &file, "layer")?;
        let k = meta_usize(&meta, &file, "k")?;
        if k == 0 || k > latents {
            bail!("{file}: metadata `k` = {k}, expected 1..={latents} (the number of latents)");
        }
        let model = meta.get("model").cloned().unwrap_or_default();
        let titles = match meta.get("titles") {
            None => None,
            Some(s) => {
                let t: Vec<String> = serde_json::from_str(s).map_err(|e| {
                    Error::Input(format!(
                        "{file}: metadata `titles` must be a JSON list of strings: {e}"
                    ))
                })?;
                if t.len() != latents {
                    bail!(
                        "{file}: metadata `titles` has {} names, expected K = {latents} (one per latent)",
                        t.len()
                    );
                }
                Some(t)
            }
        };
        Ok(Sae {
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            activation_mean,
            layer,
            k,
            model,
            titles,
            d,
            latents,
        })
    }

    /// Writes f32 tensors; the bytes depend only on the contents (sorted header keys), so a
    /// fixed training seed gives a byte-identical file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let (d, kk) = (self.d, self.latents);
        let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("W_enc", vec![d, kk], &self.w_enc),
            ("b_enc", vec![kk], &self.b_enc),
            ("W_dec", vec![kk, d], &self.w_dec),
            ("b_dec", vec![d], &self.b_dec),
        ];
        if let Some(m) = &self.activation_mean {
            tensors.push(("activation_mean", vec![d], m));
        }
        let mut meta = BTreeMap::new();
        meta.insert("layer".to_string(), self.layer.to_string());
        meta.insert("k".to_string(), self.k.to_string());
        meta.insert("model".to_string(), self.model.clone());
        if let Some(t) = &self.titles {
            meta.insert(
                "titles".to_string(),
                serde_json::to_string(t).expect("a list of strings always serialises"),
            );
        }
        write_f32_safetensors(path.as_ref(), &tensors, &meta)
    }

    /// Checks the SAE against the thinking model it will read.
    pub fn validate_for(&self, d_model: usize, n_layers: usize) -> Result<()> {
        if self.d != d_model {
            bail!(
                "SAE (made for model '{}') has width D = {}, expected the thinking model's hidden size {d_model}",
                self.model,
                self.d
            );
        }
        if self.layer >= n_layers {
            bail!(
                "SAE (made for model '{}') reads block {}, expected a block in 0..{n_layers} (the thinking model has {n_layers} layers)",
                self.model,
                self.layer
            );
        }
        Ok(())
    }

    /// hybrid.md §3 step 1: x = (h − mean)/‖h − mean‖ when the SAE carries an activation mean
    /// (else x = h), then z = W_encᵀ(x − b_dec) + b_enc over all K latents (no top-k).
    /// h [D], z [K]. Allocates nothing. If h equals the mean exactly, x = 0 (not NaN); a device
    /// kernel must do the same.
    pub fn encode(&self, h: &[f32], z: &mut [f32]) {
        match &self.activation_mean {
            Some(mean) => {
                let ss: f32 = h.iter().zip(mean).map(|(a, m)| (a - m) * (a - m)).sum();
                let norm = ss.sqrt();
                let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
                self.encode_with(z, |i| (h[i] - mean[i]) * inv);
            }
            None => self.encode_with(z, |i| h[i]),
        }
    }

    /// The reference code's quirk (behind a flag): z = W_encᵀ(h − b_dec) + b_enc on the raw
    /// activation, ignoring `activation_mean` even when present.
    pub fn encode_raw(&self, h: &[f32], z: &mut [f32]) {
        self.encode_with(z, |i| h[i]);
    }

    /// z[j] = b_enc[j] + Σ_i W_enc[i, j]·(x(i) − b_dec[i]), accumulated over i in order.
    fn encode_with(&self, z: &mut [f32], x: impl Fn(usize) -> f32) {
        assert_eq!(z.len(), self.latents, "SAE encode: z must have K entries");
        z.copy_from_slice(&self.b_enc);
        for i in 0..self.d {
            let xi = x(i) - self.b_dec[i];
            let row = &self.w_enc[i * self.latents..(i + 1) * self.latents];
            for (zj, w) in z.iter_mut().zip(row) {
                *zj += w * xi;
            }
        }
    }

    /// The category of an activation h [D]: argmax of `encode` over all K (first max wins).
    pub fn category(&self, h: &[f32]) -> usize {
        let mut z = vec![0.0f32; self.latents];
        self.encode(h, &mut z);
        argmax(&z)
    }

    /// A random SAE for trying the hybrid loop without a trained one: decoder rows are random
    /// unit vectors, the encoder is the decoder's transpose, biases are zero, no activation mean.
    pub fn random(d: usize, latents: usize, layer: usize, k: usize, seed: u64, model: &str) -> Sae {
        let mut rng = Rng::new(seed);
        let mut w_dec = vec![0.0f32; latents * d];
        for row in w_dec.chunks_exact_mut(d.max(1)) {
            rng.direction(row, 1.0);
        }
        let w_enc = transpose(&w_dec, latents, d);
        Sae {
            w_enc,
            b_enc: vec![0.0; latents],
            w_dec,
            b_dec: vec![0.0; d],
            activation_mean: None,
            layer,
            k: k.min(latents),
            model: model.to_string(),
            titles: None,
            d,
            latents,
        }
    }
}

pub use crate::cpu_ops::argmax;

/// a [rows, cols] → [cols, rows].
pub(crate) fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

// ---- safetensors helpers shared with the steering-set file ----

pub(crate) fn parse_safetensors<'a>(bytes: &'a [u8], file: &str) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Input(format!("{file}: expected a safetensors file: {e}")))
}

pub(crate) fn read_metadata(bytes: &[u8], file: &str) -> Result<BTreeMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Input(format!("{file}: expected a safetensors file: {e}")))?;
    Ok(meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect())
}

pub(crate) fn meta_usize(meta: &BTreeMap<String, String>, file: &str, key: &str) -> Result<usize> {
    match meta.get(key) {
        None => bail!("{file}: missing metadata key `{key}` (expected a non-negative integer)"),
        Some(s) => s.trim().parse().map_err(|_| {
            Error::Input(format!(
                "{file}: metadata `{key}` = '{s}', expected a non-negative integer"
            ))
        }),
    }
}

/// Reads tensor `name` as f32 (from f32, bf16 or f16), checking its rank and that every value
/// is finite. Returns (shape, values).
pub(crate) fn tensor_f32(
    st: &SafeTensors,
    file: &str,
    name: &str,
    rank: usize,
    expected: &str,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let view = st.tensor(name).map_err(|_| {
        Error::Input(format!(
            "{file}: missing tensor `{name}` (expected {expected})"
        ))
    })?;
    let shape = view.shape().to_vec();
    if shape.len() != rank {
        bail!("{file}: tensor `{name}` has shape {shape:?}, expected rank {rank} {expected}");
    }
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("{file}: tensor `{name}` has dtype {other:?}, expected F32, BF16 or F16"),
    };
    check_finite(file, name, &values)?;
    Ok((shape, values))
}

pub(crate) fn check_finite(file: &str, name: &str, values: &[f32]) -> Result<()> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "{file}: tensor `{name}` has a non-finite value {} at flat index {i}, expected finite numbers",
            values[i]
        );
    }
    Ok(())
}

pub(crate) fn expect_shape(
    file: &str,
    name: &str,
    shape: &[usize],
    want: &[usize],
    what: &str,
) -> Result<()> {
    if shape != want {
        bail!("{file}: tensor `{name}` has shape {shape:?}, expected {want:?} ({what})");
    }
    Ok(())
}

/// Writes a safetensors file of f32 tensors in the given order with sorted, deterministic
/// header JSON (the safetensors crate's writer orders metadata by a randomly seeded HashMap,
/// which would break byte-identical output for a fixed seed).
pub(crate) fn write_f32_safetensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    meta: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = BTreeMap::<String, serde_json::Value>::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let n: usize = shape.iter().product();
        assert_eq!(
            n,
            data.len(),
            "tensor `{name}`: shape {shape:?} vs {} values",
            data.len()
        );
        let bytes = 4 * n;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    header.insert("__metadata__".to_string(), serde_json::json!(meta));
    let mut hjson = serde_json::to_string(&header).expect("a header always serialises");
    // Pad with spaces so the data starts 8-byte aligned (the 8-byte length prefix is
    // already aligned), as the reference writer does.
    while !hjson.len().is_multiple_of(8) {
        hjson.push(' ');
    }
    let mut out = Vec::with_capacity(8 + hjson.len() + offset);
    out.extend_from_slice(&(hjson.len() as u64).to_le_bytes());
    out.extend_from_slice(hjson.as_bytes());
    for (_, _, data) in tensors {
        for v in data.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    crate::files::write_atomic(path, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Sae {
        // D = 3, K = 2, with a mean so that encode normalises.
        Sae {
            w_enc: vec![1.0, 0.0, 0.0, 1.0, 0.5, -0.5], // [3, 2]
            b_enc: vec![0.1, -0.1],
            w_dec: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0], // [2, 3]
            b_dec: vec![0.0, 0.1, 0.0],
            activation_mean: Some(vec![1.0, 1.0, 1.0]),
            layer: 2,
            k: 1,
            model: "tiny".into(),
            titles: Some(vec!["a".into(), "b".into()]),
            d: 3,
            latents: 2,
        }
    }

    #[test]
    fn encode_follows_the_formula() {
        let s = tiny();
        let h = [4.0f32, 1.0, -3.0];
        // h − mean = [3, 0, −4], norm 5 → x = [0.6, 0, −0.8]; x − b_dec = [0.6, −0.1, −0.8].
        // z0 = 0.1 + 0.6·1 + (−0.1)·0 + (−0.8)·0.5 = 0.3; z1 = −0.1 + 0 + (−0.1)·1 + (−0.8)(−0.5) = 0.2.
        let mut z = [0.0f32; 2];
        s.encode(&h, &mut z);
        assert!(
            (z[0] - 0.3).abs() < 1e-6 && (z[1] - 0.2).abs() < 1e-6,
            "{z:?}"
        );
        assert_eq!(s.category(&h), 0);
        // Raw: h − b_dec = [4, 0.9, −3]; z0 = 0.1 + 4 − 1.5 = 2.6; z1 = −0.1 + 0.9 + 1.5 = 2.3.
        s.encode_raw(&h, &mut z);
        assert!(
            (z[0] - 2.6).abs() < 1e-5 && (z[1] - 2.3).abs() < 1e-5,
            "{z:?}"
        );
        // h == mean gives x = 0, not NaN.
        s.encode(&[1.0, 1.0, 1.0], &mut z);
        assert!(z.iter().all(|v| v.is_finite()), "{z:?}");
    }

    #[test]
    fn argmax_takes_the_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.0]), 1);
    }

    #[test]
    fn save_load_round_trip_and_bf16() {
        let dir = std::env::temp_dir().join(format!("sae-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.safetensors");
        let s = tiny();
        s.save(&p).unwrap();
        assert_eq!(Sae::load(&p).unwrap(), s);

        // A bf16 file written by the safetensors crate loads as f32.
        let bf = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect()
        };
        let (we, be, wd, bd) = (bf(&s.w_enc), bf(&s.b_enc), bf(&s.w_dec), bf(&s.b_dec));
        let views = vec![
            (
                "W_enc",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![3, 2], &we).unwrap(),
            ),
            (
                "b_enc",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![2], &be).unwrap(),
            ),
            (
                "W_dec",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![2, 3], &wd).unwrap(),
            ),
            (
                "b_dec",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![3], &bd).unwrap(),
            ),
        ];
        let meta: std::collections::HashMap<String, String> = [
            ("layer".to_string(), "1".to_string()),
            ("k".to_string(), "2".to_string()),
        ]
        .into();
        let p2 = dir.join("bf.safetensors");
        safetensors::serialize_to_file(views, Some(meta), &p2).unwrap();
        let l = Sae::load(&p2).unwrap();
        // These values are exact in bf16 (short binary fractions).
        assert_eq!(l.w_enc, s.w_enc);
        assert_eq!(
            (l.layer, l.k, l.model.as_str(), l.activation_mean),
            (1, 2, "", None)
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn random_sae_has_unit_rows_and_tied_encoder() {
        let s = Sae::random(16, 5, 3, 3, 42, "m");
        for j in 0..5 {
            let n: f32 = s.w_dec[j * 16..(j + 1) * 16].iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-5);
            for i in 0..16 {
                assert_eq!(s.w_enc[i * 5 + j], s.w_dec[j * 16 + i]);
            }
        }
        assert_eq!(Sae::random(16, 5, 3, 3, 42, "m"), s);
        assert_ne!(Sae::random(16, 5, 3, 3, 43, "m").w_dec, s.w_dec);
        assert!(s.validate_for(16, 4).is_ok());
        let e = s.validate_for(16, 3).unwrap_err().to_string();
        assert!(e.contains("block 3") && e.contains("0..3"), "{e}");
        let e = s.validate_for(32, 4).unwrap_err().to_string();
        assert!(e.contains("D = 16") && e.contains("32"), "{e}");
    }
}
