//! Shared test helpers: fixture paths, reading reference tensors, tolerance checks.
#![allow(dead_code)]

use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The HF reference tensors recorded by scripts/make_fixtures.py.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn load(model: &str) -> Reference {
        let path = fixture(model).join("reference.safetensors");
        Reference { bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid reference file")
    }
    pub fn has(&self, name: &str) -> bool {
        self.st().names().contains(&name)
    }
    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("reference has no {name}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        (bytemuck::pod_collect_to_vec(t.data()), t.shape().to_vec())
    }
    pub fn ids(&self, name: &str) -> Vec<u32> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("reference has no {name}"));
        match t.dtype() {
            Dtype::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(t.data()).into_iter().map(|x| x as u32).collect(),
            Dtype::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(t.data()).into_iter().map(|x| x as u32).collect(),
            d => panic!("{name}: unexpected dtype {d:?}"),
        }
    }
}

/// ‖ours − reference‖∞ / max(‖reference‖∞, 1): the relative error the issue bounds.
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "length mismatch");
    let scale = reference.iter().fold(1f32, |m, x| m.max(x.abs()));
    let (mut worst, mut at) = (0f32, 0);
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let e = (a - b).abs();
        if e > worst || e.is_nan() {
            worst = e;
            at = i;
        }
    }
    if worst / scale > 0.0 {
        eprintln!("worst element {at}: ours {} reference {}", ours[at], reference[at]);
    }
    worst / scale
}

/// The checkpoints the HF fixture script writes.
pub const MODELS: [&str; 5] = ["qwen2-f32", "qwen2-bf16-tied", "llama-f32", "llama-bf16-tied", "thinking-qwen2-f32"];
