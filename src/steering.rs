//! The steering-set file (safetensors) and the steering add of hybrid.md §3 step 4.
//!
//! File format: `bias` [D], `vectors` [K, D] (f32, bf16 or f16; held as f32); metadata `layer`
//! (0-based block of the base model at whose output the vectors are added), `model` (free
//! text, optional) and `trained_at` = `block_input` when they were trained at the input of that
//! block instead (`train-vectors --at-block-input`, the reference code's quirk; optional).

use std::collections::BTreeMap;
use std::path::Path;

use crate::bail;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::sae::{
    expect_shape, meta_usize, parse_safetensors, read_metadata, tensor_f32, write_f32_safetensors,
    Sae,
};

#[derive(Clone, Debug, PartialEq)]
pub struct SteeringSet {
    pub bias: Vec<f32>,    // [D]
    pub vectors: Vec<f32>, // [K, D]
    pub layer: usize,
    pub model: String,
    pub d: usize,
    pub count: usize, // K
    /// Trained at the input of block `layer`, though added at its output (the reference code's
    /// quirk, hybrid.md §3).
    pub trained_at_block_input: bool,
}

impl SteeringSet {
    pub fn load(path: impl AsRef<Path>) -> Result<SteeringSet> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = parse_safetensors(&bytes, &file)?;
        let meta = read_metadata(&bytes, &file)?;
        let (vs, vectors) = tensor_f32(&st, &file, "vectors", 2, "[K, D]")?;
        let (count, d) = (vs[0], vs[1]);
        if count == 0 || d == 0 {
            bail!("{file}: tensor `vectors` has shape {vs:?}, expected [K, D] with K, D >= 1");
        }
        let (bs, bias) = tensor_f32(&st, &file, "bias", 1, "[D]")?;
        expect_shape(&file, "bias", &bs, &[d], "[D] with D from `vectors`")?;
        let layer = meta_usize(&meta, &file, "layer")?;
        let model = meta.get("model").cloned().unwrap_or_default();
        let trained_at_block_input = match meta.get("trained_at").map(String::as_str) {
            None | Some("block_output") => false,
            Some("block_input") => true,
            Some(other) => bail!(
                "{file}: metadata `trained_at` is {other:?}, expected \"block_input\" or \"block_output\""
            ),
        };
        Ok(SteeringSet {
            bias,
            vectors,
            layer,
            model,
            d,
            count,
            trained_at_block_input,
        })
    }

    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("bias", vec![self.d], &self.bias),
            ("vectors", vec![self.count, self.d], &self.vectors),
        ];
        let mut meta = BTreeMap::new();
        meta.insert("layer".to_string(), self.layer.to_string());
        meta.insert("model".to_string(), self.model.clone());
        if self.trained_at_block_input {
            meta.insert("trained_at".to_string(), "block_input".to_string());
        }
        write_f32_safetensors(path.as_ref(), &tensors, &meta)
    }

    /// Checks the set against the base model it steers.
    pub fn validate_for(&self, d_model: usize, n_layers: usize) -> Result<()> {
        if self.d != d_model {
            bail!(
                "steering set (made for model '{}') has width D = {}, expected the base model's hidden size {d_model}",
                self.model,
                self.d
            );
        }
        if self.layer >= n_layers {
            bail!(
                "steering set (made for model '{}') targets block {}, expected a block in 0..{n_layers} (the base model has {n_layers} layers)",
                self.model,
                self.layer
            );
        }
        Ok(())
    }

    /// A line for the reader when the vectors are added at another point than they were
    /// trained at (`at_input`: `--steer-at-block-input`), None when the two agree.
    pub fn placement_note(&self, file: &Path, at_input: bool) -> Option<String> {
        let place = |input: bool| if input { "input" } else { "output" };
        (self.trained_at_block_input != at_input).then(|| {
            format!(
                "note: {} was trained at the {} of block {} and is added at its {}{}",
                file.display(),
                place(self.trained_at_block_input),
                self.layer,
                place(at_input),
                if at_input {
                    " (--steer-at-block-input)"
                } else {
                    ": the reference code's quirk (hybrid.md §3)"
                }
            )
        })
    }

    /// One vector per SAE category is required: the SAE's argmax indexes `vectors`.
    pub fn check_matches_sae(&self, sae: &Sae) -> Result<()> {
        if self.count != sae.latents {
            bail!(
                "steering set has {} category vectors, expected K = {} to match the SAE's latents",
                self.count,
                sae.latents
            );
        }
        Ok(())
    }

    /// Random set for trying the loop without trained vectors: each category vector is a
    /// uniformly random direction of norm `norm`; the bias is zero so that categories stay
    /// distinguishable (c·(b + V[i]) is then exactly c·V[i]).
    pub fn random(
        d: usize,
        count: usize,
        layer: usize,
        norm: f32,
        seed: u64,
        model: &str,
    ) -> SteeringSet {
        let mut rng = Rng::new(seed);
        let mut vectors = vec![0.0f32; count * d];
        for row in vectors.chunks_exact_mut(d.max(1)) {
            rng.direction(row, norm);
        }
        SteeringSet {
            bias: vec![0.0; d],
            vectors,
            layer,
            model: model.to_string(),
            d,
            count,
            trained_at_block_input: false,
        }
    }

    /// The `--random-vectors` ablation: the same set with every vector (bias included) replaced
    /// by a random direction of the same L2 norm, or of norm 1 (`unit_norm`, the reference
    /// code's quirk).
    pub fn randomized_like(&self, seed: u64, unit_norm: bool) -> SteeringSet {
        let mut rng = Rng::new(seed);
        let mut out = self.clone();
        let norm = |v: &[f32]| if unit_norm { 1.0 } else { l2(v) };
        rng.direction(&mut out.bias, norm(&self.bias));
        for row in out.vectors.chunks_exact_mut(self.d) {
            let n = norm(row);
            rng.direction(row, n);
        }
        out
    }

    /// The combined steering vector for `category` [D]: bias + V[category], or bias alone for
    /// the `--only-bias` ablation. `category` must be < count (guaranteed by
    /// `check_matches_sae`, since categories come from the SAE's argmax).
    pub fn combined_into(&self, category: usize, only_bias: bool, out: &mut [f32]) {
        out.copy_from_slice(&self.bias);
        if !only_bias {
            for (o, v) in out.iter_mut().zip(self.row(category)) {
                *o += v;
            }
        }
    }

    /// out [D] += coef·(bias + V[category]).
    pub fn add_to(&self, category: usize, coef: f32, out: &mut [f32]) {
        self.add_scaled(category, coef, false, out);
    }

    /// out [D] += coef·(bias + V[category]), or coef·bias with `only_bias`.
    pub fn add_scaled(&self, category: usize, coef: f32, only_bias: bool, out: &mut [f32]) {
        assert_eq!(out.len(), self.d, "steering add: out must have D entries");
        if only_bias {
            for (o, b) in out.iter_mut().zip(&self.bias) {
                *o += coef * b;
            }
        } else {
            for ((o, b), v) in out.iter_mut().zip(&self.bias).zip(self.row(category)) {
                // Sum first, then scale: the same rounding as adding c·combined_into(..).
                *o += coef * (b + v);
            }
        }
    }

    /// L2 norms of the category vectors [K] (reported, and used by `--random-vectors`).
    pub fn norms(&self) -> Vec<f32> {
        self.vectors.chunks_exact(self.d).map(l2).collect()
    }

    fn row(&self, category: usize) -> &[f32] {
        &self.vectors[category * self.d..(category + 1) * self.d]
    }
}

fn l2(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("steer-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("v.safetensors")
    }

    #[test]
    fn round_trip_add_and_only_bias() {
        let s = SteeringSet {
            bias: vec![1.0, 2.0],
            vectors: vec![10.0, 20.0, 30.0, 40.0],
            layer: 5,
            model: "m".into(),
            d: 2,
            count: 2,
            trained_at_block_input: false,
        };
        let p = tmp("rt");
        s.save(&p).unwrap();
        assert_eq!(SteeringSet::load(&p).unwrap(), s);
        let mut out = [0.5f32, 0.5];
        s.add_to(1, 0.5, &mut out);
        assert_eq!(out, [0.5 + 0.5 * 31.0, 0.5 + 0.5 * 42.0]);
        let mut c = [0.0f32; 2];
        s.combined_into(0, true, &mut c);
        assert_eq!(c, [1.0, 2.0]);
        s.combined_into(0, false, &mut c);
        assert_eq!(c, [11.0, 22.0]);
        let mut out = [0.0f32; 2];
        s.add_scaled(1, 2.0, true, &mut out);
        assert_eq!(out, [2.0, 4.0]);
        assert!(s.validate_for(2, 6).is_ok());
        assert!(s
            .validate_for(2, 5)
            .unwrap_err()
            .to_string()
            .contains("block 5"));
        assert!(s
            .validate_for(3, 6)
            .unwrap_err()
            .to_string()
            .contains("D = 2"));
    }

    #[test]
    fn random_sets_have_the_requested_norms() {
        let s = SteeringSet::random(32, 4, 1, 7.5, 9, "m");
        for n in s.norms() {
            assert!((n - 7.5).abs() < 1e-4 * 7.5, "{n}");
        }
        assert_eq!(SteeringSet::random(32, 4, 1, 7.5, 9, "m"), s);
        let mut t = s.clone();
        t.vectors[0..32].iter_mut().for_each(|v| *v *= 2.0);
        t.bias[0] = 3.0;
        let r = t.randomized_like(1, false);
        let (tn, rn) = (t.norms(), r.norms());
        for (a, b) in tn.iter().zip(&rn) {
            assert!((a - b).abs() < 1e-4 * a, "{a} vs {b}");
        }
        assert!((l2(&r.bias) - 3.0).abs() < 1e-4 * 3.0);
        assert_ne!(r.vectors, t.vectors);
        // The reference code's quirk: the same directions, of norm 1.
        let u = t.randomized_like(1, true);
        for n in u.norms().iter().chain([&l2(&u.bias)]) {
            assert!((n - 1.0).abs() < 1e-5, "{n}");
        }
        for (x, y) in u.vectors.iter().zip(&r.vectors).take(32) {
            assert!((x * tn[0] - y).abs() < 1e-4 * tn[0], "{x} vs {y}");
        }
    }
}
