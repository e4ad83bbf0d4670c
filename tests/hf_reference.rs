//! The CPU backend against HF transformers on the tiny random checkpoints of
//! scripts/make_fixtures.py: logits and block outputs at every prompt position, greedy
//! continuations, batches of rows, and cached decode against full recompute.

mod common;

use common::{fixture, rel_err, Reference, MODELS};
use std::sync::Arc;
use thinksteer::engine::{CpuEngine, Decoder};
use thinksteer::generate::{generate, GenParams};
use thinksteer::model::{Hooks, Model, Step};

// The references are f32 forwards (bf16 checkpoints are upcast exactly first), so both sides
// do f32 arithmetic over identical weights and differ only in summation order: errors of a
// few f32 ulps per op, far below 1e-4 of the logit scale.
const TOL: f32 = 1e-4;

fn full_forward(m: &Arc<Model>, ids: &[u32], capture: &[usize]) -> (Vec<f32>, Hooks<'static>) {
    let t = ids.len();
    let mut e = CpuEngine::new(m.clone(), 1, t);
    let (slots, pos): (Vec<usize>, Vec<usize>) = ((0..t).map(|_| 0).collect(), (0..t).collect());
    let rows: Vec<usize> = (0..t).collect();
    let mut hooks = Hooks {
        capture: capture.iter().map(|&l| (l + 1, vec![])).collect(),
        steer: None,
    };
    let logits = e
        .forward(
            ids,
            &Step {
                slots: &slots,
                positions: &pos,
                n_write: t,
                run_start: &[],
            },
            &rows,
            &mut hooks,
        )
        .unwrap()
        .to_vec();
    (logits, hooks)
}

fn greedy(m: &Arc<Model>, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let ctx = prompts.iter().map(|p| p.len()).max().unwrap() + n;
    let mut e = CpuEngine::new(m.clone(), prompts.len(), ctx);
    let p = GenParams::greedy(n, vec![]);
    generate(&mut e, None, prompts, &p, |_, _| {})
        .unwrap()
        .into_iter()
        .map(|g| g.ids)
        .collect()
}

#[test]
fn logits_and_block_outputs_match_hf() {
    for name in MODELS {
        let m = Arc::new(Model::load(&fixture(name)).unwrap());
        let r = Reference::load(name);
        let ids = r.ids("prompt_ids");
        let layers: Vec<usize> = (0..m.config.num_hidden_layers).collect();
        let (logits, hooks) = full_forward(&m, &ids, &layers);
        let (want, shape) = r.f32("logits");
        assert_eq!(
            shape,
            vec![ids.len(), m.config.vocab_size],
            "{name}: logits shape"
        );
        let e = rel_err(&logits, &want);
        assert!(e <= TOL, "{name}: logits relative error {e} > {TOL}");
        for (point, got) in &hooks.capture {
            let (want, _) = r.f32(&format!("resid.{}", point - 1));
            let e = rel_err(got, &want);
            assert!(
                e <= TOL,
                "{name}: resid.{} relative error {e} > {TOL}",
                point - 1
            );
        }
    }
}

#[test]
fn greedy_continuations_match_hf() {
    for name in MODELS {
        let m = Arc::new(Model::load(&fixture(name)).unwrap());
        let r = Reference::load(name);
        let want = r.ids("greedy_ids");
        let got = greedy(&m, &[r.ids("prompt_ids")], want.len());
        assert_eq!(got[0], want, "{name}: greedy ids");
    }
}

#[test]
fn a_batch_of_rows_equals_each_row_alone() {
    for name in MODELS {
        let m = Arc::new(Model::load(&fixture(name)).unwrap());
        let r = Reference::load(name);
        let (a, b) = (r.ids("prompt_ids"), r.ids("prompt2_ids"));
        let (wa, wb) = (r.ids("greedy_ids"), r.ids("greedy2_ids"));
        let got = greedy(&m, &[a.clone(), b.clone()], wa.len());
        assert_eq!(got[0], wa, "{name}: row 0 in a batch");
        assert_eq!(got[1], wb, "{name}: row 1 in a batch");
        // And the other order, so slot assignment cannot hide a bug.
        let got = greedy(&m, &[b, a], wa.len());
        assert_eq!(got[0], wb, "{name}: row 0 (swapped)");
        assert_eq!(got[1], wa, "{name}: row 1 (swapped)");
    }
}

#[test]
fn cached_decode_equals_full_recompute() {
    for name in ["qwen2-f32", "llama-f32"] {
        let m = Arc::new(Model::load(&fixture(name)).unwrap());
        let r = Reference::load(name);
        let mut seq = r.ids("prompt_ids");
        let n = 8;
        let mut e = CpuEngine::new(m.clone(), 1, seq.len() + n);
        let t = seq.len();
        let (slots, pos): (Vec<usize>, Vec<usize>) = (vec![0; t], (0..t).collect());
        let mut last = e
            .forward(
                &seq,
                &Step {
                    slots: &slots,
                    positions: &pos,
                    n_write: t,
                    run_start: &[],
                },
                &[t - 1],
                &mut Hooks::default(),
            )
            .unwrap()
            .to_vec();
        for _ in 0..n {
            let (full, _) = full_forward(&m, &seq, &[]);
            let v = m.config.vocab_size;
            let full_last = &full[(seq.len() - 1) * v..];
            // Same arithmetic except attention over a cache vs over fresh K/V: bitwise equal
            // values are expected, 1e-6 allows for a different summation split.
            let err = rel_err(&last, full_last);
            assert!(
                err <= 1e-6,
                "{name}: cached vs recompute at length {}: {err}",
                seq.len()
            );
            let next = thinksteer::cpu_ops::argmax(&last) as u32;
            let p = seq.len();
            seq.push(next);
            last = e
                .forward(
                    &[next],
                    &Step {
                        slots: &[0],
                        positions: &[p],
                        n_write: 1,
                        run_start: &[],
                    },
                    &[0],
                    &mut Hooks::default(),
                )
                .unwrap()
                .to_vec();
        }
    }
}

#[test]
fn llama3_rope_scaling_beyond_the_original_context() {
    let name = "llama-f32";
    let m = Arc::new(Model::load(&fixture(name)).unwrap());
    assert!(
        m.config.rope_scaling.is_some(),
        "fixture must exercise llama3 scaling"
    );
    let r = Reference::load(name);
    let ids = r.ids("prompt_long_ids");
    let (logits, _) = full_forward(&m, &ids, &[]);
    let v = m.config.vocab_size;
    let (want, _) = r.f32("logits_long_last");
    let e = rel_err(&logits[(ids.len() - 1) * v..], &want);
    assert!(e <= TOL, "long-prompt logits relative error {e}");
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    use safetensors::tensor::TensorView;
    use safetensors::SafeTensors;
    // Split qwen2-f32 into two shards with an index, as HF writes large checkpoints.
    let src = fixture("qwen2-f32");
    let dir = std::env::temp_dir().join(format!("thinksteer-sharded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in part {
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let single = Arc::new(Model::load(&src).unwrap());
    let sharded = Arc::new(Model::load(&dir).unwrap());
    let ids = Reference::load("qwen2-f32").ids("prompt_ids");
    let (a, _) = full_forward(&single, &ids, &[]);
    let (b, _) = full_forward(&sharded, &ids, &[]);
    assert_eq!(a, b, "the same tensors must give bitwise the same logits");
}

#[test]
fn more_prompts_than_slots_take_turns() {
    for name in ["qwen2-f32", "llama-f32"] {
        let m = Arc::new(Model::load(&fixture(name)).unwrap());
        let r = Reference::load(name);
        let (a, b) = (r.ids("prompt_ids"), r.ids("prompt2_ids"));
        let (wa, wb) = (r.ids("greedy_ids"), r.ids("greedy2_ids"));
        // One slot for three prompts: each takes the slot its predecessor left.
        let mut e = CpuEngine::new(m.clone(), 1, a.len().max(b.len()) + wa.len());
        let p = GenParams::greedy(wa.len(), vec![]);
        let mut done = vec![];
        let outs = thinksteer::generate::generate_each(
            &mut e,
            None,
            &[a.clone(), b, a],
            &p,
            |_, _| {},
            |r, _| {
                done.push(r);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(outs[0].ids, wa, "{name}: first prompt");
        assert_eq!(outs[1].ids, wb, "{name}: second prompt, in the reused slot");
        assert_eq!(outs[2].ids, wa, "{name}: third prompt, in the reused slot");
        assert_eq!(done, vec![0, 1, 2], "{name}: rows reported as they finish");
    }
}
