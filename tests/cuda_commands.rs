//! The commands that compose the GPU parts, run with the CUDA engine on a random checkpoint the
//! kernels take (head_dim 64) carrying the qwen2-f32 fixture's tokenizer and chat template:
//! `traces` and `eval` (base, thinking and hybrid modes) must complete and write one well-formed
//! line per question (and per mode). Token-level agreement with the CPU is checked by
//! tests/cuda_model.rs and tests/cuda_hybrid.rs. Without a GPU every test prints "skipped".

mod common;

use clap::Parser;
use std::path::PathBuf;
use thinksteer::eval::cli::EvalArgs;
use thinksteer::taxonomy::traces::{read_traces, write_traces, TraceSettings};

fn have_gpu() -> bool {
    match thinksteer::cuda::available() {
        Err(why) => {
            println!("skipped: {why}");
            false
        }
        Ok(()) => true,
    }
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
    };
    let (written, _) = write_traces(&think, &questions, &out, &s, |_| {}).unwrap();
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
    let res = tmp.join("eval");
    let args = Eval::try_parse_from([
        "eval",
        "--dataset",
        data.to_str().unwrap(),
        "--modes",
        "base,thinking,hybrid",
        "--base",
        base.to_str().unwrap(),
        "--thinking",
        think.to_str().unwrap(),
        "--sae",
        sae.to_str().unwrap(),
        "--vectors",
        vec.to_str().unwrap(),
        "--out",
        res.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--batch",
        "2",
        "--device",
        if on_gpu { "cuda" } else { "cpu" },
        "--quiet",
    ])
    .unwrap();
    thinksteer::eval::cli::eval(args.a).unwrap();
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
