//! The CUDA engine end to end against the CPU f32 reference, on a random bf16 checkpoint of a
//! shape the attention kernels take (head_dim 64, GQA, Qwen2 biases) written to a temporary
//! folder and loaded by both backends through the normal loading path. Without a GPU every test
//! prints "skipped: <reason>" and passes.
//!
//! Tolerance: the GPU rounds every matrix-product input (normalised activations, attention
//! output, SiLU·up) and the K/V cache to bf16, a relative error of ≤ 2^-9 each; through a few
//! sublayers these stay uncorrelated, so logits agree to a few times 2^-9 of their scale. We
//! allow 2^-5 (3%) of max|logit| and require identical greedy ids wherever the CPU's top-1 beats
//! its top-2 by more than twice that.

mod common;

use common::rel_err;
use std::path::PathBuf;
use std::sync::Arc;
use thinksteer::cpu_ops::argmax;
use thinksteer::cuda::model::CudaEngine;
use thinksteer::cuda::Gpu;
use thinksteer::engine::{CpuEngine, Decoder};
use thinksteer::model::{Hooks, Model, Step};
use thinksteer::rng::Rng;

const TOL: f32 = 1.0 / 32.0;

fn gpu() -> Option<Gpu> {
    common::cuda_or_skip().then(|| Gpu::new(0).expect("CUDA is available but Gpu::new failed"))
}

fn checkpoint(tag: &str) -> PathBuf {
    common::random_checkpoint(&format!("model-{tag}"), 42, 3)
}

fn prompt(len: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..len).map(|_| 1 + r.below(511) as u32).collect()
}

#[test]
fn prefill_logits_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let dir = checkpoint("prefill");
    let cpu_model = Arc::new(Model::load(&dir).unwrap());
    // 300 tokens: more than one 256-position attention split, and max_t 128 forces chunking.
    let ids = prompt(300, 1);
    let t = ids.len();
    let (slots, pos): (Vec<usize>, Vec<usize>) = (vec![0; t], (0..t).collect());
    let rows = [t - 3, t - 2, t - 1];
    let step = Step {
        slots: &slots,
        positions: &pos,
        n_write: t,
        run_start: &[],
    };
    let mut cpu = CpuEngine::new(cpu_model, 1, 512);
    let want = cpu
        .forward(&ids, &step, &rows, &mut Hooks::default())
        .unwrap()
        .to_vec();
    let mut gpu = CudaEngine::load(Arc::new(g), &dir, 1, 512, 128).unwrap();
    let got = gpu
        .forward(&ids, &step, &rows, &mut Hooks::default())
        .unwrap()
        .to_vec();
    let e = rel_err(&got, &want);
    assert!(e <= TOL, "prefill logits relative error {e} > {TOL}");
}

#[test]
fn single_row_decode_matches_the_cpu() {
    // One row per step (the single-row product kernels): the CPU's logits within TOL at every
    // step.
    let Some(g) = gpu() else { return };
    let dir = checkpoint("row1");
    let m = Arc::new(Model::load(&dir).unwrap());
    let mut gpu = CudaEngine::load(Arc::new(g), &dir, 1, 128, 64).unwrap();
    let p = prompt(30, 5);
    let mut cpu = CpuEngine::new(m.clone(), 1, 128);
    let slots = vec![0usize; p.len()];
    let pos: Vec<usize> = (0..p.len()).collect();
    let step = Step {
        slots: &slots,
        positions: &pos,
        n_write: p.len(),
        run_start: &[],
    };
    let last = [p.len() - 1];
    let lc = cpu
        .forward(&p, &step, &last, &mut Hooks::default())
        .unwrap()
        .to_vec();
    gpu.forward(&p, &step, &last, &mut Hooks::default())
        .unwrap();
    let mut next = argmax(&lc) as u32;
    for i in 0..16 {
        let position = [p.len() + i];
        let step = Step {
            slots: &[0],
            positions: &position,
            n_write: 1,
            run_start: &[],
        };
        let lc = cpu
            .forward(&[next], &step, &[0], &mut Hooks::default())
            .unwrap()
            .to_vec();
        let lg = gpu
            .forward(&[next], &step, &[0], &mut Hooks::default())
            .unwrap()
            .to_vec();
        let e = rel_err(&lg, &lc);
        assert!(e <= TOL, "step {i}: rel. error {e} > {TOL}");
        next = argmax(&lc) as u32;
    }
}

#[test]
fn decode_with_rope_in_attention_gives_the_same_logits_bit_for_bit() {
    // THINKSTEER_ROPE=attn changes which kernel rotates and appends K/V, not a single bit of
    // what is computed: the same prefill, then 12 one-row steps and 6 three-row steps (the
    // decode graphs), both ways.
    let Some(g) = gpu() else { return };
    let g = Arc::new(g);
    let dir = checkpoint("rope");
    let prompts = [prompt(21, 7), prompt(9, 8), prompt(40, 9)];
    let run = |rope: bool| -> (Vec<f32>, Vec<u32>, usize) {
        let mut e = CudaEngine::load(g.clone(), &dir, 3, 128, 64).unwrap();
        e.rope_in_attention = rope;
        let mut logits = vec![];
        let mut ids = vec![];
        let mut next = vec![0u32; 3];
        for (i, p) in prompts.iter().enumerate() {
            let slots = vec![i; p.len()];
            let pos: Vec<usize> = (0..p.len()).collect();
            let step = Step {
                slots: &slots,
                positions: &pos,
                n_write: p.len(),
                run_start: &[],
            };
            let l = e
                .forward(p, &step, &[p.len() - 1], &mut Hooks::default())
                .unwrap();
            next[i] = argmax(l) as u32;
        }
        let mut len: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let mut rope_launches = 0;
        for i in 0..12 {
            let step = Step {
                slots: &[0],
                positions: &len[..1],
                n_write: 1,
                run_start: &[],
            };
            g.record_launches(i == 0);
            let l = e
                .forward(&next[..1], &step, &[0], &mut Hooks::default())
                .unwrap();
            rope_launches += g
                .record_launches(false)
                .into_iter()
                .filter(|&k| g.kernel_name(k) == "qkv_rope_bf16")
                .count();
            logits.extend_from_slice(l);
            next[0] = argmax(l) as u32;
            len[0] += 1;
        }
        let s: Vec<usize> = (0..3).collect();
        for _ in 0..6 {
            let step = Step {
                slots: &s,
                positions: &len,
                n_write: 3,
                run_start: &[],
            };
            next = e.decode_greedy(&next, &step).unwrap();
            ids.extend_from_slice(&next);
            len.iter_mut().for_each(|p| *p += 1);
        }
        (logits, ids, rope_launches)
    };
    let (sep, fused) = (run(false), run(true));
    // The two runs really took the two paths (a step's qkv_rope launches, one per block).
    assert!(sep.2 > 0, "the separate path launched no qkv_rope_bf16");
    assert_eq!(fused.2, 0, "the fused path launched qkv_rope_bf16");
    let differ = sep
        .0
        .iter()
        .zip(&fused.0)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differ, 0, "{differ} of {} logits differ", sep.0.len());
    assert_eq!(sep.1, fused.1, "greedy ids of the three-row steps");
}

#[test]
fn greedy_decode_matches_the_cpu_with_and_without_graphs() {
    let Some(g) = gpu() else { return };
    let dir = checkpoint("greedy");
    let m = Arc::new(Model::load(&dir).unwrap());
    let prompts = [prompt(21, 2), prompt(9, 3), prompt(40, 4)];
    let mut gpu = CudaEngine::load(Arc::new(g), &dir, prompts.len(), 128, 64).unwrap();
    for use_graphs in [true, false] {
        gpu.use_graphs = use_graphs;
        greedy_matches(
            &mut gpu,
            &m,
            &prompts,
            24,
            2,
            &format!("graphs {use_graphs}"),
        );
    }
}

/// The demo checkpoint (SmolLM2-135M-Instruct: 30 Llama blocks, 9 query heads over 3 K/V heads,
/// tied embeddings), converted from its GGUF, on both backends: a real model's shapes and
/// weights rather than a random one's. Skipped when models/SmolLM2-135M-Instruct.Q4_1.gguf is
/// absent (models/fetch-demo-model.sh; the GPU machine has no copy).
#[test]
fn smollm2_greedy_decode_matches_the_cpu() {
    let gguf =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        println!(
            "skipped: {} is absent (run models/fetch-demo-model.sh)",
            gguf.display()
        );
        return;
    }
    let Some(g) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("thinksteer-cuda-smollm2-{}", std::process::id()));
    thinksteer::gguf::convert(&gguf, &dir).unwrap();
    let m = Arc::new(Model::load(&dir).unwrap());
    // The chat prompt of tests/fixtures/gguf-smollm2 (HF's greedy continuation of it is checked
    // on the CPU by tests/gguf_model.rs) and a plain one.
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("gguf-smollm2/reference.json")).unwrap(),
    )
    .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let prompts = [ids(&r["greedy"]["prompt_ids"]), ids(&r["logits"][0]["ids"])];
    let mut gpu = CudaEngine::load(Arc::new(g), &dir, prompts.len(), 96, 64).unwrap();
    // Real text has many close continuations: a quarter of the decisions must be clear of ties
    // (a random checkpoint with a wide LM head gives half).
    greedy_matches(&mut gpu, &m, &prompts, 24, 4, "smollm2");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prefills `prompts` (one row each, in one call) on both backends, then decodes `steps` greedy
/// steps on the GPU, the CPU reading the same tokens. The prefill logits must agree within TOL,
/// and each greedy choice wherever the CPU's top-1 leads its top-2 by more than four times the
/// largest prefill discrepancy between the backends (a near tie is skipped and counted); at
/// least 1/`clear` of all decisions must be compared.
fn greedy_matches(
    gpu: &mut CudaEngine,
    m: &Arc<Model>,
    prompts: &[Vec<u32>],
    steps: usize,
    clear: usize,
    what: &str,
) {
    let (b, v) = (prompts.len(), m.config.vocab_size);
    let mut cpu = CpuEngine::new(m.clone(), b, gpu.max_len());
    let ids: Vec<u32> = prompts.concat();
    let slots: Vec<usize> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| vec![i; p.len()])
        .collect();
    let pos: Vec<usize> = prompts.iter().flat_map(|p| 0..p.len()).collect();
    let last: Vec<usize> = prompts
        .iter()
        .scan(0, |a, p| {
            *a += p.len();
            Some(*a - 1)
        })
        .collect();
    let step = Step {
        slots: &slots,
        positions: &pos,
        n_write: ids.len(),
        run_start: &[],
    };
    let lc = cpu
        .forward(&ids, &step, &last, &mut Hooks::default())
        .unwrap()
        .to_vec();
    let lg = gpu
        .forward(&ids, &step, &last, &mut Hooks::default())
        .unwrap()
        .to_vec();
    assert!(rel_err(&lg, &lc) <= TOL, "{what}: prefill logits");
    let e_abs = lg
        .iter()
        .zip(&lc)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("{what}: prefill max |gpu - cpu| = {e_abs}");
    let mut next: Vec<u32> = lc.chunks(v).map(|l| argmax(l) as u32).collect();
    let mut len: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    // Both backends consume the GPU's tokens, so a skipped near tie does not desynchronise the
    // rows that follow.
    let (mut compared, mut ties) = (0, 0);
    for _ in 0..steps {
        let s: Vec<usize> = (0..b).collect();
        let step = Step {
            slots: &s,
            positions: &len,
            n_write: b,
            run_start: &[],
        };
        let lc = cpu
            .forward(&next, &step, &s, &mut Hooks::default())
            .unwrap()
            .to_vec();
        let got = gpu.decode_greedy(&next, &step).unwrap();
        for (row, l) in lc.chunks(v).enumerate() {
            let top = argmax(l);
            let second = l
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != top)
                .map(|(_, x)| *x)
                .fold(f32::MIN, f32::max);
            if l[top] - second <= 4.0 * e_abs {
                ties += 1;
                continue;
            }
            assert_eq!(
                got[row], top as u32,
                "{what}: row {row} after {compared} decisions"
            );
            compared += 1;
        }
        next = got;
        len.iter_mut().for_each(|p| *p += 1);
    }
    println!("{what}: {compared} greedy decisions compared, {ties} near ties skipped");
    assert!(
        compared >= steps * b / clear,
        "{what}: only {compared} of {} decisions compared: too many near ties",
        steps * b
    );
}

#[test]
fn no_gpu_gives_a_clear_error_not_a_panic() {
    if thinksteer::cuda::available().is_ok() {
        println!("skipped: a GPU is present");
        return;
    }
    let err = Gpu::new(0).err().expect("Gpu::new must fail without CUDA");
    assert!(
        err.to_string().contains("CUDA") || err.to_string().contains("cuda"),
        "{err}"
    );
}
