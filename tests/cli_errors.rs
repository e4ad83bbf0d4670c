//! Bad input through the CLI: each case must exit with code 2 and print one line naming what
//! was expected and what was found — never a panic.

mod common;

use common::{fixture, rewrite_weights};
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_thinksteer"))
}

/// A copy of a fixture checkpoint in a fresh temporary folder.
fn copy_of(name: &str, case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("thinksteer-cli-{}-{case}", std::process::id()));
    common::copy_fixture(name, &dir)
}

/// Runs the CLI and checks exit code 2, a single stderr line containing every `needle`, no panic.
fn expect_error(args: &[&str], needles: &[&str]) {
    let out = bin().args(args).output().unwrap();
    common::one_line_error(&out, &format!("args {args:?}"), needles);
}

fn gen(dir: &Path, ids: &str) -> Vec<String> {
    [
        "generate",
        "--device",
        "cpu",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        ids,
        "--max-new-tokens",
        "2",
    ]
    .map(String::from)
    .to_vec()
}

fn run_gen(dir: &Path, ids: &str, needles: &[&str]) {
    let args = gen(dir, ids);
    expect_error(
        &args.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        needles,
    );
}

#[test]
fn missing_config() {
    let d = copy_of("qwen2-f32", "noconfig");
    std::fs::remove_file(d.join("config.json")).unwrap();
    run_gen(&d, "1,2", &["config.json", "missing"]);
}

#[test]
fn malformed_config() {
    let d = copy_of("qwen2-f32", "badjson");
    std::fs::write(d.join("config.json"), "{\"model_type\": \"qwen2\", ").unwrap();
    run_gen(&d, "1,2", &["config.json", "malformed"]);
}

#[test]
fn unknown_model_type() {
    let d = copy_of("qwen2-f32", "gpt2");
    let text = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"qwen2\"", "\"gpt2\"");
    std::fs::write(d.join("config.json"), text).unwrap();
    run_gen(&d, "1,2", &["config.json", "model_type", "gpt2"]);
}

#[test]
fn truncated_safetensors() {
    let d = copy_of("qwen2-f32", "truncated");
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    run_gen(&d, "1,2", &["model.safetensors", "not a valid safetensors"]);
}

#[test]
fn header_offsets_past_the_end_of_the_file() {
    let d = copy_of("qwen2-f32", "offsets");
    let header = r#"{"model.norm.weight":{"dtype":"F32","shape":[64],"data_offsets":[0,1000000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 256]);
    std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    run_gen(&d, "1,2", &["model.safetensors", "not a valid safetensors"]);
}

#[test]
fn missing_tensor() {
    let d = copy_of("qwen2-f32", "missing");
    rewrite_weights(&d, |ts| ts.retain(|t| t.0 != "model.norm.weight"));
    run_gen(
        &d,
        "1,2",
        &["model.safetensors", "missing tensor", "model.norm.weight"],
    );
}

#[test]
fn tensor_of_the_wrong_shape() {
    let d = copy_of("qwen2-f32", "shape");
    rewrite_weights(&d, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        t.2 = vec![63];
        t.3.truncate(63 * 4);
    });
    run_gen(&d, "1,2", &["model.norm.weight", "[63]", "expected [64]"]);
}

#[test]
fn tensor_of_the_wrong_dtype() {
    let d = copy_of("qwen2-f32", "dtype");
    rewrite_weights(&d, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        t.1 = Dtype::I32;
    });
    run_gen(
        &d,
        "1,2",
        &["model.norm.weight", "I32", "expected BF16, F16 or F32"],
    );
}

#[test]
fn token_id_outside_the_vocabulary() {
    run_gen(&fixture("qwen2-f32"), "1,2,320", &["320", "vocab_size 320"]);
}

#[test]
fn prompt_longer_than_the_context() {
    let d = copy_of("qwen2-f32", "context");
    let text = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace(
            "\"max_position_embeddings\": 512",
            "\"max_position_embeddings\": 4",
        );
    assert!(
        text.contains("\"max_position_embeddings\": 4"),
        "fixture config changed format"
    );
    std::fs::write(d.join("config.json"), text).unwrap();
    run_gen(&d, "1,2,3,4,5", &["5 tokens", "context of 4"]);
}

#[test]
fn capture_layer_out_of_range() {
    let m = fixture("qwen2-f32");
    let out = std::env::temp_dir().join(format!(
        "thinksteer-cli-{}-cap.safetensors",
        std::process::id()
    ));
    expect_error(
        &[
            "logits",
            "--device",
            "cpu",
            "--model",
            m.to_str().unwrap(),
            "--prompt-ids",
            "1,2",
            "--out",
            out.to_str().unwrap(),
            "--capture-layer",
            "3",
        ],
        &["--capture-layer 3", "below num_hidden_layers 3"],
    );
}

#[test]
fn text_prompt_without_a_tokenizer() {
    let m = fixture("llama-f32");
    assert!(
        !m.join("tokenizer.json").exists(),
        "fixture must have no tokenizer"
    );
    expect_error(
        &[
            "generate",
            "--device",
            "cpu",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        &["no tokenizer.json", "--prompt-ids"],
    );
}

#[test]
fn prompt_ids_work_without_a_tokenizer() {
    let m = fixture("llama-f32");
    let out = bin()
        .args([
            "generate",
            "--device",
            "cpu",
            "--model",
            m.to_str().unwrap(),
            "--prompt-ids",
            "5,6,7",
            "--max-new-tokens",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["prompt_ids"], serde_json::json!([5, 6, 7]));
    assert!(!j["ids"].as_array().unwrap().is_empty() && j["ids"].as_array().unwrap().len() <= 3);
}

#[test]
fn usage_errors_are_one_line_with_the_usage() {
    expect_error(
        &["generate", "--prompt", "hi"],
        &[
            "required arguments were not provided: --model <MODEL>",
            "Usage: thinksteer generate --model",
        ],
    );
    expect_error(
        &[
            "generate",
            "--model",
            "m",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "abc",
        ],
        &["invalid value 'abc' for '--max-new-tokens"],
    );
    expect_error(&["nosuch"], &["unrecognized subcommand 'nosuch'"]);
    // Help is not an error: clap's text on stdout, exit 0.
    let out = bin().args(["grade", "--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: thinksteer grade"));
}

#[test]
fn bench_switches_out_of_range() {
    expect_error(
        &[
            "bench",
            "--shape",
            "qwen2.5-1.5b",
            "--hybrid",
            "--steered-share",
            "1.5",
        ],
        &["--steered-share", "[0, 1]", "1.5"],
    );
    expect_error(
        &["bench", "--shape", "qwen2.5-1.5b", "--steered-share", "0.1"],
        &["--steered-share", "without --hybrid"],
    );
    expect_error(
        &[
            "bench",
            "--shape",
            "qwen2.5-1.5b",
            "--vector-grad",
            "--marginal",
        ],
        &["--marginal", "--vector-grad"],
    );
    expect_error(
        &["bench", "--shape", "tiny", "--hybrid", "--vector-grad"],
        &["--hybrid and --vector-grad", "found both"],
    );
    expect_error(
        &[
            "bench",
            "--shape",
            "qwen2.5-1.5b",
            "--device",
            "cpu",
            "--marginal",
        ],
        &["--marginal", "--device cuda"],
    );
    expect_error(
        &[
            "bench",
            "--shape",
            "qwen2.5-1.5b",
            "--hybrid",
            "--chunk",
            "2048",
        ],
        &["--chunk", "--hybrid"],
    );
    expect_error(
        &[
            "bench",
            "--shape",
            "qwen2.5-1.5b",
            "--hybrid",
            "--windows",
            "-1,-15",
            "--prefix-caches",
            "4",
        ],
        &["--prefix-caches", "window 0", "[-1, -15]"],
    );
    expect_error(
        &["kernels", "--arch", "75", "--cache", "/nonexistent/kc"],
        &["--arch", "from 80", "75"],
    );
}

/// Numbers a flag cannot mean (NaN, negative, zero counts, a layer twice) are refused before any
/// work, with one line naming the flag.
#[test]
fn numbers_the_flags_cannot_mean() {
    let m = fixture("qwen2-f32");
    let m = m.to_str().unwrap();
    let gen = |extra: &[&str], needles: &[&str]| {
        let mut args = vec![
            "generate",
            "--device",
            "cpu",
            "--model",
            m,
            "--prompt-ids",
            "1,2",
        ];
        args.extend_from_slice(extra);
        expect_error(&args, needles);
    };
    gen(&["--temperature", "NaN"], &["--temperature", "found NaN"]);
    gen(
        &["--temperature=-1"],
        &["--temperature", ">= 0", "found -1"],
    );
    gen(&["--top-p", "0"], &["--top-p", "(0, 1]", "found 0"]);
    gen(&["--top-p", "1.5"], &["--top-p", "found 1.5"]);
    gen(
        &["--max-new-tokens", "0"],
        &["--max-new-tokens", "at least 1"],
    );

    let dir = std::env::temp_dir().join(format!("thinksteer-cli-{}-numbers", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cap = dir.join("cap.safetensors");
    expect_error(
        &[
            "logits",
            "--device",
            "cpu",
            "--model",
            m,
            "--prompt-ids",
            "1,2",
            "--out",
        ]
        .into_iter()
        .chain([cap.to_str().unwrap()])
        .chain(["--capture-layer", "1", "--capture-layer", "1"])
        .collect::<Vec<_>>(),
        &["--capture-layer 1", "found it twice"],
    );
    assert!(!cap.exists(), "nothing written");

    let think = fixture("thinking-qwen2-f32");
    let think = think.to_str().unwrap();
    let (sae, vec) = (dir.join("sae.safetensors"), dir.join("vec.safetensors"));
    let (sae, vec) = (sae.to_str().unwrap(), vec.to_str().unwrap());
    let random_sae = |latents: &str, k: &str| -> Vec<String> {
        let a = [
            "random-sae",
            "--model",
            think,
            "--layer",
            "1",
            "--seed",
            "1",
            "--latents",
        ];
        owned(&a, &[latents, "--k", k, "--out", sae])
    };
    expect_error(
        &strs(&random_sae("0", "1")),
        &["'0' for '--latents", "at least 1"],
    );
    expect_error(
        &strs(&random_sae("3", "5")),
        &["1 <= --k <= --latents", "--latents 3 --k 5"],
    );
    let random_vectors = |count: &str, norm: &str| -> Vec<String> {
        let a = [
            "random-vectors",
            "--model",
            m,
            "--layer",
            "1",
            "--seed",
            "1",
            "--count",
        ];
        owned(&a, &[count, &format!("--norm={norm}"), "--out", vec])
    };
    expect_error(&strs(&random_vectors("0", "5")), &["--count", "at least 1"]);
    expect_error(&strs(&random_vectors("3", "NaN")), &["--norm", "found NaN"]);
    expect_error(
        &strs(&random_vectors("3", "-5")),
        &["--norm", "> 0", "found -5"],
    );

    // Valid files, then the hybrid loop's own numbers.
    let made = bin().args(random_sae("3", "2")).output().unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let made = bin().args(random_vectors("3", "5")).output().unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let hybrid = |extra: &[&str], needles: &[&str]| {
        let mut args = hybrid_args(m, think, sae, vec, "What is 1+1?");
        args.extend_from_slice(extra);
        expect_error(&args, needles);
    };
    hybrid(
        &["--coefficients", "0.5,NaN"],
        &["--coefficients", "finite", "found NaN"],
    );
    hybrid(&["--batch", "0"], &["--batch", "at least 1"]);
    // Refused from the flags alone, before any model is read (these folders do not exist).
    let mut args = hybrid_args("no-base", "no-thinking", sae, vec, "q");
    args.extend(["--coefficients", "NaN"]);
    expect_error(&args, &["--coefficients", "finite"]);
    expect_error(
        &hybrid_args(m, think, sae, vec, " "),
        &["--question", "empty string"],
    );
    hybrid(
        &["--max-new-tokens", "0"],
        &["--max-new-tokens", "at least 1"],
    );
    // A second GPU for the thinking model, on a CPU run.
    hybrid(
        &["--thinking-gpu", "1"],
        &[
            "--thinking-gpu 1",
            "expected a run on the GPU",
            "on the CPU",
        ],
    );

    expect_error(
        &[
            "train-sae",
            "--acts",
            "none.safetensors",
            "--latents",
            "3,5,3",
            "--out",
            "x",
        ],
        &["--latents", "found 3 twice"],
    );
    // A file that is not there: what was expected, what was found.
    let gone = dir.join("gone.safetensors");
    let gone = gone.to_str().unwrap();
    expect_error(
        &hybrid_args(m, think, gone, vec, "q"),
        &[
            gone,
            "expected the file, or the folder it is written to, found none",
        ],
    );

    expect_error(
        &[
            "train-sae",
            "--acts",
            "none.safetensors",
            "--latents",
            "3",
            "--out",
            "x",
            "--max-epochs",
            "0",
        ],
        &["--max-epochs", "at least 1"],
    );
}

fn owned(a: &[&str], b: &[&str]) -> Vec<String> {
    a.iter().chain(b).map(|s| s.to_string()).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn hybrid_args<'a>(
    base: &'a str,
    think: &'a str,
    sae: &'a str,
    vectors: &'a str,
    question: &'a str,
) -> Vec<&'a str> {
    vec![
        "hybrid",
        "--device",
        "cpu",
        "--base",
        base,
        "--thinking",
        think,
        "--sae",
        sae,
        "--vectors",
        vectors,
        "--question",
        question,
    ]
}

#[test]
fn inputs_that_would_waste_a_run_are_refused_first() {
    let dir = std::env::temp_dir().join(format!("thinksteer-cli-{}-waste", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (m, think) = (fixture("qwen2-f32"), fixture("thinking-qwen2-f32"));
    let (m, think) = (m.to_str().unwrap(), think.to_str().unwrap());
    let (sae, vec) = (dir.join("sae.safetensors"), dir.join("vec.safetensors"));
    let (sae, vec) = (sae.to_str().unwrap(), vec.to_str().unwrap());
    for args in [
        vec![
            "random-sae",
            "--model",
            think,
            "--layer",
            "1",
            "--latents",
            "3",
            "--k",
            "2",
        ],
        vec![
            "random-vectors",
            "--model",
            m,
            "--layer",
            "1",
            "--count",
            "3",
        ],
    ] {
        let out = if args[0] == "random-sae" { sae } else { vec };
        assert!(bin()
            .args(&args)
            .args(["--out", out])
            .status()
            .unwrap()
            .success());
    }
    // Sizes no memory holds: refused with a line, not the allocator's abort.
    let huge = "100000000000";
    let fits = "expected to fit in the";
    let out = dir.join("huge.safetensors");
    let out = out.to_str().unwrap();
    expect_error(
        &[
            "random-sae",
            "--model",
            think,
            "--layer",
            "1",
            "--latents",
            huge,
            "--out",
            out,
        ],
        &["--latents 100000000000", fits],
    );
    expect_error(
        &[
            "random-vectors",
            "--model",
            m,
            "--layer",
            "1",
            "--count",
            huge,
            "--out",
            out,
        ],
        &["--count 100000000000", fits],
    );
    expect_error(
        &["bench", "--shape", m, "--device", "cpu", "--batch", huge],
        &["--batch 100000000000", fits],
    );
    // A question longer than the fixture's 512-token context.
    let long = "a ".repeat(700);
    expect_error(
        &hybrid_args(m, think, sae, vec, &long),
        &[
            "problem 0",
            "expected fewer than the base model's context of 512",
        ],
    );
    // A base prompt that never shows the question.
    let mut args = hybrid_args(m, think, sae, vec, "1+1?");
    args.extend(["--base-prompt", "Answer:"]);
    expect_error(
        &args,
        &["expected a template holding {question}", "\"Answer:\""],
    );
    // A GSM8K reference that is not a number.
    expect_error(
        &[
            "grade",
            "--kind",
            "gsm8k",
            "--reference",
            "",
            "--response",
            "18",
        ],
        &["--reference", "expected a number"],
    );
    // A size below --k, refused before the sizes before it are trained.
    expect_error(
        &[
            "train-sae",
            "--acts",
            "none.safetensors",
            "--latents",
            "3,1",
            "--k",
            "2",
            "--out",
            "x",
        ],
        &["--latents 1", "at least --k 2"],
    );
    // An output in a folder that does not exist: said once, as expected and found.
    let nowhere = dir.join("no-folder/x.safetensors");
    let mut args = vec![
        "logits",
        "--device",
        "cpu",
        "--model",
        m,
        "--prompt-ids",
        "1,2",
        "--out",
    ];
    args.push(nowhere.to_str().unwrap());
    let out = bin().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert!(
        err.contains("expected the file, or the folder it is written to"),
        "{err}"
    );
}
