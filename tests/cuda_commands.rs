//! The commands that compose the GPU parts, run with the CUDA engine on a random checkpoint the
//! kernels take (head_dim 64) carrying the qwen2-f32 fixture's tokenizer and chat template:
//! `traces` and `eval` (base, thinking and hybrid modes) must complete and write one well-formed
//! line per question (and per mode). Token-level agreement with the CPU is checked by
//! tests/cuda_model.rs and tests/cuda_hybrid.rs. Without a GPU every test prints "skipped".

mod common;

use clap::Parser;
use std::path::{Path, PathBuf};
use thinksteer::eval::cli::EvalArgs;
use thinksteer::taxonomy::traces::{read_traces, write_traces, TraceSettings};

fn have_gpu() -> bool {
    common::cuda_or_skip()
}

/// The fixture folder, found from the build's path or, where the tree was copied elsewhere (the
/// GPU machine), from the working directory.
fn fixture_dir(name: &str) -> PathBuf {
    let built = common::fixture(name);
    if built.exists() {
        built
    } else {
        PathBuf::from("tests/fixtures").join(name)
    }
}

/// A head_dim-64 random checkpoint with the qwen2-f32 tokenizer (309 ids < V = 512).
fn model(tag: &str, seed: u64, layers: usize) -> PathBuf {
    let dir = common::random_checkpoint(tag, seed, layers);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture_dir("qwen2-f32").join(f), dir.join(f)).unwrap();
    }
    dir
}

#[derive(Parser)]
struct Eval {
    #[command(flatten)]
    a: EvalArgs,
}

#[test]
fn traces_and_eval_run_on_the_gpu() {
    // THINKSTEER_TEST_ON_CPU=1 runs the same body on the CPU (to check the test itself on a
    // machine without a GPU).
    let on_gpu = std::env::var("THINKSTEER_TEST_ON_CPU").is_err();
    if on_gpu && !have_gpu() {
        return;
    }
    let base = model("cmd-base", 7, 3);
    let think = model("cmd-think", 8, 4);
    let tmp = std::env::temp_dir().join(format!("thinksteer-cmd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let questions: Vec<String> = ["What is 2 + 3?", "Add 10 and 4.", "Is 7 prime?"]
        .map(String::from)
        .to_vec();

    // traces: 3 questions through 2 slots on the GPU.
    let out = tmp.join("traces.jsonl");
    let s = TraceSettings {
        max_new_tokens: 12,
        batch: 2,
        cuda: on_gpu,
        whole_answer: false,
    };
    let written = write_traces(&think, &questions, &out, &s, |_| {})
        .unwrap()
        .written;
    assert_eq!(written, 3);
    let traces = read_traces(&out).unwrap();
    let mut idx: Vec<usize> = traces.iter().map(|t| t.index).collect();
    idx.sort();
    assert_eq!(idx, vec![0, 1, 2]);

    // eval: every mode on the GPU, hybrid with a random SAE and steering set.
    let sae = tmp.join("sae.safetensors");
    let vec = tmp.join("vectors.safetensors");
    thinksteer::sae::Sae::random(256, 6, 2, 3, 1, "think")
        .save(&sae)
        .unwrap();
    thinksteer::steering::SteeringSet::random(256, 6, 1, 40.0, 2, "base")
        .save(&vec)
        .unwrap();
    let data = tmp.join("data.jsonl");
    let lines: Vec<String> = questions
        .iter()
        .map(|q| serde_json::json!({"question": q, "answer": "5"}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    // `eval` of these questions into `out`, in `modes`, with `extra` flags.
    let run_eval = |out: &Path, modes: &str, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--dataset",
            data.to_str().unwrap(),
            "--modes",
            modes,
            "--base",
            base.to_str().unwrap(),
            "--thinking",
            think.to_str().unwrap(),
            "--sae",
            sae.to_str().unwrap(),
            "--vectors",
            vec.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--batch",
            "2",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        thinksteer::eval::cli::eval(Eval::try_parse_from(args).unwrap().a).unwrap();
    };
    let res = tmp.join("eval");
    let device = if on_gpu { "cuda" } else { "cpu" };
    run_eval(&res, "base,thinking,hybrid", &["--device", device]);
    let text = std::fs::read_to_string(res.join("results.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 9, "3 questions × 3 modes");
    for mode in ["base", "thinking", "hybrid"] {
        assert_eq!(
            rows.iter().filter(|r| r["mode"] == mode).count(),
            3,
            "{mode}"
        );
    }
    assert!(rows
        .iter()
        .filter(|r| r["mode"] == "hybrid")
        .all(|r| r["steered_fraction"].is_number()));
    println!(
        "traces and eval ran (GPU: {on_gpu}): {} trace lines, {} result lines",
        traces.len(),
        rows.len()
    );

    // The hybrid mode with the thinking model on a second device (`--thinking-gpu 1`) answers
    // as the same loop on one device (`--thinking-gpu 0`), where there are two devices.
    if !on_gpu || thinksteer::cuda::device_count().unwrap() < 2 {
        println!("--thinking-gpu: skipped (one device)");
        return;
    }
    let hybrid_on = |device: &str| {
        let out = tmp.join(format!("eval-thinking-gpu-{device}"));
        run_eval(
            &out,
            "hybrid",
            &["--device", "cuda", "--thinking-gpu", device],
        );
        let text = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
        let mut rows: Vec<(u64, String, u64)> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|r| {
                let i = r["index"].as_u64().unwrap();
                let steered = r["steered_tokens"].as_u64().unwrap();
                (i, r["response"].as_str().unwrap().to_string(), steered)
            })
            .collect();
        rows.sort();
        rows
    };
    let one = hybrid_on("0");
    assert_eq!(one.len(), 3);
    assert_eq!(hybrid_on("1"), one, "thinking model on device 1 vs 0");
}

#[test]
fn activations_on_the_gpu_match_the_cpu() {
    // `activations --device cuda` runs each trace through the CUDA engine in 512-token calls
    // capturing block L's output; the CPU runs blocks 0..=L in f32. Sentence means are centred
    // and unit-normalised, so the GPU's bf16 activations between blocks show as a small angle:
    // every row must keep cosine ≥ 0.99 with the CPU's (bf16 has 8 significant bits; the
    // residual stream of this 3-layer random model stays well conditioned).
    if !have_gpu() {
        return;
    }
    use thinksteer::taxonomy::activations::{compute_activations, Acts};
    let m = model("cmd-acts", 9, 3);
    let tmp = std::env::temp_dir().join(format!("thinksteer-acts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let texts = [
        "First we add the two numbers. Then we check the sum again. So the answer is five.",
        "Let me count on my fingers now. Two and three make five here. That is the final answer.",
        "We know that three plus two is five. Adding in the other order gives five too. Done with it.",
    ];
    let lines: Vec<String> = (0..3)
        .map(|i| {
            let text = texts[i];
            serde_json::json!({
                "index": i,
                "question": "What is 2 + 3?",
                "prompt": format!("Question {i}: what is 2 + 3?\n"),
                "text": text,
                "thinking": {"start": 0, "end": text.len()},
            })
            .to_string()
        })
        .collect();
    let tr = tmp.join("traces.jsonl");
    std::fs::write(&tr, lines.join("\n") + "\n").unwrap();
    let (gpu_out, cpu_out) = (tmp.join("gpu.safetensors"), tmp.join("cpu.safetensors"));
    compute_activations(&m, &tr, 1, &gpu_out, true).unwrap();
    compute_activations(&m, &tr, 1, &cpu_out, false).unwrap();
    let (g, c) = (Acts::load(&gpu_out).unwrap(), Acts::load(&cpu_out).unwrap());
    assert_eq!((g.n, g.d), (c.n, c.d));
    assert!(
        g.n >= 6,
        "expected 3 sentences per trace, found {} rows",
        g.n
    );
    for (i, (a, b)) in g
        .activations
        .chunks(g.d)
        .zip(c.activations.chunks(c.d))
        .enumerate()
    {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(
            dot >= 0.99,
            "row {i}: cosine {dot} between GPU and CPU sentence means"
        );
    }
}

/// Examples for the optimise test: ids random below V = 512; position sets that cover a frozen
/// prefix and none, active rows inside one 512-token call and across two, a const row in the
/// call before the active rows, a single position (no active rows), and sparse positions.
fn optimise_examples() -> Vec<thinksteer::vector_grad::Example> {
    use thinksteer::vector_grad::Example;
    let mut r = thinksteer::rng::Rng::new(5);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| 1 + r.below(511) as u32).collect() };
    vec![
        Example {
            ids: ids(40),
            positions: (12..30).collect(),
        },
        Example {
            ids: ids(600),
            positions: (500..530).collect(),
        },
        Example {
            ids: ids(560),
            positions: (520..556).collect(),
        },
        Example {
            ids: ids(12),
            positions: (0..10).collect(),
        },
        Example {
            ids: ids(25),
            positions: vec![20],
        },
        Example {
            ids: ids(80),
            positions: (30..70).step_by(3).collect(),
        },
    ]
}

#[test]
fn optimise_prefixes_and_training_on_the_gpu_match_the_cpu() {
    // `train-vectors --method optimise --device cuda`: the frozen prefixes come from the CUDA
    // engine (`prepare_on_gpu`) and the loss/gradient from CudaVectorGrad; the CPU runs both in
    // f32. Random 3-block head_dim-64 checkpoint, steering block 0 (so k_pre/v_pre hold blocks
    // 1 and 2).
    //
    // Tolerances. The GPU forward rounds each matrix-product input (normalised activations,
    // q/k/v, attention output, SiLU·up) and the KV cache to bf16: ≤ 2^-9 relative each, about 5
    // per block, so ≤ 5·(blocks)·2^-9 if every error lined up; this checkpoint's sublayer gains
    // are below 1 and the errors have random signs, so they stay far below that. As in
    // tests/cuda_model.rs (same checkpoint shape, 3 blocks) we allow TOL = 2^-5 of each
    // tensor's max |value| (rel_err) for h_l, k_pre, v_pre and the const-row logits.
    // A per-token cross-entropy of softmax(c·z) moves by at most 2·c·max|Δz| (log-sum-exp and
    // the target logit each move by ≤ c·max|Δz|), so losses agree to LOSS_TOL = 2·c·TOL·M with
    // M the largest |logit| of the CPU's const rows. The training curves use the same bound:
    // Adam's steps are ≤ lr per coordinate, and the coordinates where the two gradients'
    // signs differ are those with tiny gradients, which move the loss little (a CPU run on
    // prefixes perturbed by 2^-5 moved these curves by ~0.01, against a bound of ~0.6).
    if !have_gpu() {
        return;
    }
    use std::sync::Arc;
    use thinksteer::cuda::frozen::prepare_on_gpu;
    use thinksteer::cuda::model::{call_rows, CudaEngine};
    use thinksteer::cuda::vector_grad::CudaVectorGrad;
    use thinksteer::cuda::Gpu;
    use thinksteer::model::Model;
    use thinksteer::taxonomy::optimise::{train_on, train_with, Backend, OptimiseSettings};
    use thinksteer::vector_grad::{loss_grad, prepare};
    const TOL: f32 = 1.0 / 32.0;
    let (layer, cold) = (0, 0.7f32);
    let dir = common::random_checkpoint("optimise", 11, 3);
    let model = Model::load(&dir).unwrap();
    let exs = optimise_examples();
    // The engine as `optimise` makes it: one slot of the longest example, ≤ call_rows() a call.
    let ctx = exs.iter().map(|e| e.ids.len()).max().unwrap();
    let gpu = Arc::new(Gpu::new(0).unwrap());
    let mut engine = CudaEngine::load(gpu, &dir, 1, ctx, ctx.clamp(16, call_rows())).unwrap();
    let d = model.config.hidden_size;
    let mut r = thinksteer::rng::Rng::new(3);
    let extra: Vec<f32> = (0..d).map(|_| 0.1 * r.normal() as f32).collect(); // a frozen bias
    let zero = vec![0f32; d];

    let cpu: Vec<_> = exs
        .iter()
        .map(|e| prepare(&model, e, layer).unwrap())
        .collect();
    let m = cpu
        .iter()
        .filter_map(|f| f.const_row.as_ref())
        .flat_map(|(l, _)| l.iter())
        .fold(1f32, |a, x| a.max(x.abs()));
    let loss_tol = 2.0 * cold as f64 * TOL as f64 * m as f64;
    for (i, (ex, c)) in exs.iter().zip(&cpu).enumerate() {
        let g = prepare_on_gpu(&mut engine, ex, layer).unwrap();
        assert_eq!((g.layer, g.s0, g.ta), (c.layer, c.s0, c.ta), "example {i}");
        assert_eq!(g.steer_rows, c.steer_rows, "example {i}");
        assert_eq!(g.predict, c.predict, "example {i}");
        assert_eq!(
            (g.k_pre.len(), g.v_pre.len()),
            (c.k_pre.len(), c.v_pre.len()),
            "example {i}"
        );
        let mut pairs = vec![("h_l".to_string(), &g.h_l, &c.h_l)];
        for (b, (gk, ck)) in g.k_pre.iter().zip(&c.k_pre).enumerate() {
            pairs.push((format!("k_pre[{b}]"), gk, ck));
        }
        for (b, (gv, cv)) in g.v_pre.iter().zip(&c.v_pre).enumerate() {
            pairs.push((format!("v_pre[{b}]"), gv, cv));
        }
        match (&g.const_row, &c.const_row) {
            (Some((gl, gy)), Some((cl, cy))) => {
                assert_eq!(gy, cy, "example {i}: const-row target");
                pairs.push(("const-row logits".to_string(), gl, cl));
            }
            (None, None) => {}
            _ => panic!("example {i}: const row present on one side only"),
        }
        for (name, a, b) in pairs {
            assert_eq!(a.len(), b.len(), "example {i} {name}: length");
            let e = common::rel_err(a, b);
            assert!(e <= TOL, "example {i} {name}: relative error {e} > {TOL}");
        }
        // The loss at the zero vector (plus the frozen bias), each side on its own prefix.
        let lc = loss_grad::<f32>(&model, c, &zero, Some(&extra), cold, false);
        let mut vg =
            CudaVectorGrad::new(engine.gpu.clone(), &engine.config, engine.w.clone()).unwrap();
        let lg = vg.loss_grad(&g, &zero, Some(&extra), cold, false).unwrap();
        assert_eq!(lg.targets, lc.targets, "example {i}");
        let diff = (lg.loss_sum - lc.loss_sum).abs() / lc.targets.max(1) as f64;
        assert!(
            diff <= loss_tol,
            "example {i}: mean loss GPU {} CPU {} (tolerance {loss_tol})",
            lg.loss_sum / lg.targets.max(1) as f64,
            lc.loss_sum / lc.targets.max(1) as f64
        );
    }

    // Three epochs of training (the bias frozen): the curves agree and the GPU's goes down.
    // lr 0.3: this model's residual entries are O(1), and a CPU run drops ~1.9 nats in 3 epochs.
    let s = OptimiseSettings {
        layer,
        epochs: 3,
        lr: 0.3,
        batch: 2,
        coldness: cold,
        ..Default::default()
    };
    let (_, curve_cpu) = train_on(&model, &exs, Some(&extra), &s).unwrap();
    let (v, curve_gpu) =
        train_with(&mut Backend::Cuda(&mut engine), &exs, Some(&extra), &s).unwrap();
    println!("loss per epoch: CPU {curve_cpu:?}, GPU {curve_gpu:?} (tolerance {loss_tol})");
    assert_eq!(v.len(), d);
    for (e, (g, c)) in curve_gpu.iter().zip(&curve_cpu).enumerate() {
        assert!(
            (g - c).abs() <= loss_tol,
            "epoch {e}: GPU loss {g}, CPU {c} (tolerance {loss_tol})"
        );
    }
    assert!(
        curve_gpu[2] < curve_gpu[0] - loss_tol,
        "GPU training did not lower the loss beyond the CPU/GPU tolerance: {curve_gpu:?}"
    );
}

/// `thinksteer bench` on the GPU, plain and hybrid, on the `tiny` shape (random weights made on
/// the device): every row valid (the bench itself checks each step's ids), the floor at the copy
/// rate measured on the card, the hybrid rows with their ratio to plain decode and steered share.
#[test]
fn bench_rows_on_the_gpu() {
    if !have_gpu() {
        return;
    }
    let rows = thinksteer::bench::run_cuda("tiny", &common::bench_settings(vec![1, 3])).unwrap();
    let phases: Vec<(&str, usize)> = rows.iter().map(|r| (r.phase, r.batch)).collect();
    assert_eq!(phases, [("prefill", 1), ("decode", 1), ("decode", 3)]);
    common::check_bench_rows(&rows);
    // The one-graph step, then the host-driven loop with the paper's kind of windows.
    for windows in [vec![-1], vec![0, -1, -3]] {
        let s = thinksteer::bench::Settings {
            steered_share: Some(0.5),
            windows,
            ..common::bench_settings(vec![2])
        };
        let rows = thinksteer::bench::run_cuda_hybrid("tiny", &s).unwrap();
        assert_eq!(rows.len(), 1);
        common::check_bench_rows(&rows);
        let (ratio, share) = (rows[0].ratio_to_plain, rows[0].steered_fraction);
        assert!(ratio.is_some_and(|x| x > 0.0), "{:?}", rows[0]);
        assert!(
            share.is_some_and(|f| (0.0..=1.0).contains(&f)),
            "{:?}",
            rows[0]
        );
    }
}
