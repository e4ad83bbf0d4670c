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

/// A copy of `name` with one `"key": value` of its config.json replaced.
fn with_config(name: &str, case: &str, key: &str, from: &str, to: &str) -> PathBuf {
    let d = copy_of(name, case);
    let (old, new) = (format!("\"{key}\": {from}"), format!("\"{key}\": {to}"));
    let text = std::fs::read_to_string(d.join("config.json")).unwrap();
    assert!(text.contains(&old), "fixture config changed format");
    std::fs::write(d.join("config.json"), text.replace(&old, &new)).unwrap();
    d
}

/// A bench longer than the model's context is refused before anything runs, for a folder and
/// for a named shape on any device; the memory line names the flags that size the cache.
#[test]
fn bench_within_the_context() {
    let d = with_config(
        "qwen2-f32",
        "bench-ctx",
        "max_position_embeddings",
        "512",
        "8",
    );
    let d = d.to_str().unwrap();
    let args = [
        "bench",
        "--shape",
        d,
        "--device",
        "cpu",
        "--prompt-len",
        "16",
    ];
    expect_error(
        &[&args[..], &["--new-tokens", "2"]].concat(),
        &[
            "--prompt-len 16 + --new-tokens 2 = 18 positions",
            "context of 8",
        ],
    );
    expect_error(
        &[
            "bench",
            "--shape",
            "qwen2.5-1.5b",
            "--device",
            "cpu",
            "--prompt-len",
            "32768",
        ],
        &["--prompt-len 32768 + --new-tokens 256", "context of 32768"],
    );
    let d = with_config(
        "qwen2-f32",
        "bench-mem",
        "max_position_embeddings",
        "512",
        "1000000000000",
    );
    expect_error(
        &[
            "bench",
            "--shape",
            d.to_str().unwrap(),
            "--device",
            "cpu",
            "--prompt-len",
            "100000000000",
        ],
        &[
            "--batch 1 with --prompt-len 100000000000 + --new-tokens 256",
            "expected to fit in the",
        ],
    );
}

/// --limit and --question-field read --questions: beside --question they are refused, not
/// ignored.
#[test]
fn hybrid_flags_of_a_questions_file_without_one() {
    for extra in [["--limit", "2"], ["--question-field", "q"]] {
        let mut args = hybrid_args("b", "t", "s", "v", "1+1?");
        args.extend(extra);
        expect_error(
            &args,
            &["'--question <QUESTION>' cannot be used with", extra[0]],
        );
    }
}

/// random-sae and random-vectors check the config against the weight files, as every command
/// that opens a model does.
#[test]
fn random_artifacts_of_a_config_that_disagrees_with_its_weights() {
    let d = with_config("llama-f32", "layers", "num_hidden_layers", "3", "4");
    let d = d.to_str().unwrap();
    let out = std::env::temp_dir().join(format!("thinksteer-cli-{}-r.st", std::process::id()));
    let out = out.to_str().unwrap();
    for cmd in ["random-sae", "random-vectors"] {
        expect_error(
            &[cmd, "--model", d, "--layer", "1", "--out", out],
            &["expected 4 layers' tensors", "num_hidden_layers"],
        );
    }
}

/// A file, a folder and a GGUF file mistaken for one another: one line naming what was
/// expected and what was found, before any note or step header.
#[test]
fn files_and_folders_mistaken_for_one_another() {
    let dir = std::env::temp_dir().join(format!("thinksteer-cli-{}-mixups", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("folder.gguf")).unwrap();
    let (file, bad) = (dir.join("fake.bin"), dir.join("bad.gguf"));
    std::fs::write(&file, "not a model").unwrap();
    std::fs::write(&bad, "XXXX and no header").unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let (folder, file, bad, out) = (
        p(&dir.join("folder.gguf")),
        p(&file),
        p(&bad),
        p(&dir.join("out")),
    );
    // No "converting ..." note before the reader's error.
    expect_error(
        &["generate", "--model", &bad, "--prompt-ids", "1"],
        &["bad.gguf", "expected magic \"GGUF\""],
    );
    assert!(!dir.join(".bad.gguf.thinksteer").exists());
    expect_error(
        &["convert", "--gguf", &folder, "--out", &out],
        &["folder.gguf: expected a GGUF file, found a folder"],
    );
    expect_error(
        &["generate", "--model", &file, "--prompt-ids", "1"],
        &["fake.bin: expected a checkpoint folder or a GGUF file, found a file"],
    );
    expect_error(
        &["report", "--out", &file],
        &["--out", "expected an evaluation folder, found a file"],
    );
    let m = fixture("qwen2-f32");
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
            &folder,
        ],
        &["expected a safetensors file, found a folder"],
    );
    expect_error(
        &["kernels", "--arch", "80", "--cache", &file],
        &["kernel cache", "expected a folder, found a file"],
    );
    expect_error(
        &["kernels", "--arch", "999", "--cache", &out],
        &["--arch", "from 80 to 200", "999"],
    );
}

/// The demo's dataset and output folder are checked before the first step header.
#[test]
fn demo_inputs_refused_before_the_first_step() {
    let dir = std::env::temp_dir().join(format!("thinksteer-cli-{}-demo", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rows: String = (0..3)
        .map(|i| {
            format!(
                "{{\"question\": \"What is {i}+1?\", \"answer\": \"#### {}\"}}\n",
                i + 1
            )
        })
        .collect();
    let data = dir.join("g3.jsonl");
    // With a byte-order mark, which is not part of the first row.
    std::fs::write(&data, format!("\u{feff}{rows}")).unwrap();
    let notutf8 = dir.join("utf16.jsonl");
    std::fs::write(
        &notutf8,
        b"{\"question\": \"x\", \"answer\": \"#### 1\"}\n\xff\xfe{\n",
    )
    .unwrap();
    let file = dir.join("file");
    std::fs::write(&file, "").unwrap();
    let m = fixture("thinking-qwen2-f32");
    let demo = |data: &Path, out: &Path, questions: &str| -> Vec<String> {
        [
            "demo",
            "--model",
            m.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--questions",
            questions,
            "--problems",
            "1",
        ]
        .map(String::from)
        .to_vec()
    };
    expect_error(
        &strs(&demo(&data, &dir.join("out"), "10")),
        &["--questions 10", "expected at most the 3 rows"],
    );
    expect_error(
        &strs(&demo(&notutf8, &dir.join("out"), "1")),
        &["utf16.jsonl:2: expected UTF-8 text, found the byte 0xff"],
    );
    expect_error(
        &strs(&demo(&data, &file, "1")),
        &["--out", "expected a folder, found a file"],
    );
}

/// A negative number for a flag is the flag's bad value, named as such; hyphen-valued lists,
/// help and version are as before.
#[test]
fn negative_numbers_name_their_flag() {
    let m = fixture("qwen2-f32");
    let m = m.to_str().unwrap();
    let gen = [
        "generate",
        "--device",
        "cpu",
        "--model",
        m,
        "--prompt-ids",
        "1",
    ];
    for flag in ["--seed", "--max-new-tokens", "--top-k"] {
        expect_error(
            &[&gen[..], &[flag, "-1"]].concat(),
            &[&format!("invalid value '-1' for '{flag} <")],
        );
    }
    expect_error(
        &[&gen[..], &["--temperature", "-1"]].concat(),
        &["--temperature", ">= 0", "found -1"],
    );
    expect_error(
        &["random-sae", "--model", m, "--layer", "-1", "--out", "x"],
        &["invalid value '-1' for '--layer <LAYER>'"],
    );
    expect_error(
        &["kernels", "--arch", "-80"],
        &["invalid value '-80' for '--arch <ARCH>'"],
    );
    expect_error(
        &[
            "grade",
            "--kind",
            "foo",
            "--reference",
            "1",
            "--response",
            "1",
        ],
        &["expected gsm8k, math or math500", "\"foo\""],
    );
    let version = bin().arg("--version").output().unwrap();
    assert_eq!(version.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("thinksteer "));
    let bare = bin().output().unwrap();
    assert_eq!(bare.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bare.stderr).contains("Usage: thinksteer <COMMAND>"));
}
