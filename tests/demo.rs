//! `thinksteer demo` on the tiny thinking fixture: every step's artifact exists and parses, the
//! summary names each step, a second run skips every step and changes nothing, a removed
//! artifact reruns its step and the later ones with the same results, other settings are
//! refused; through the binary: progress on stderr, the summary on stdout, and the one-line
//! error (exit 2) naming the fetch script when the model file is missing.

mod common;

use common::fixture;
use std::path::{Path, PathBuf};
use std::process::Command;
use thinksteer::demo::{run, DemoOptions, DemoSummary, NOT_THE_PAPER, STEPS};
use thinksteer::eval::cli::EvalDevice;
use thinksteer::eval::run::{read_results, EvalMode, RunConfig};
use thinksteer::taxonomy::activations::{read_index, Acts};
use thinksteer::taxonomy::annotate::read_annotations;
use thinksteer::taxonomy::traces::read_traces;

const MODEL: &str = "thinking-qwen2-f32";
const QUESTIONS: usize = 5;
const PROBLEMS: usize = 2;
const LATENTS: usize = 3;

/// A fresh temporary folder for one test.
fn tmp(case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("thinksteer-demo-{}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A GSM8K-format file of 7 short questions the fixture's tokenizer can encode.
fn dataset(dir: &Path) -> PathBuf {
    let rows = [
        ("What is 2+3?", "5"),
        ("How many legs do two cats have?", "8"),
        ("Tom has 4 apples and eats 1. How many are left?", "3"),
        ("A box holds 6 eggs. How many eggs are in 2 boxes?", "12"),
        ("Name three colours of the sky please.", "3"),
        ("What is 10 minus 7?", "3"),
        ("Sara reads 5 pages a day for 3 days. How many pages?", "15"),
    ];
    let text: String = rows
        .iter()
        .map(|(q, a)| {
            serde_json::json!({ "question": q, "answer": format!("so {a}\n#### {a}") }).to_string()
                + "\n"
        })
        .collect();
    let p = dir.join("gsm8k.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn options(dir: &Path) -> DemoOptions {
    DemoOptions {
        out: dir.join("out"),
        dataset: Some(dataset(dir)),
        questions: QUESTIONS,
        problems: PROBLEMS,
        max_new_tokens: 60,
        layer: None,
        latents: LATENTS,
        k: 2,
        coefficients: vec![0.5, 1.0],
        seed: 1,
        device: EvalDevice::Cpu,
    }
}

/// (index, mode, response, correct (None: awaiting the judge), steered steps per category) of
/// one result line.
type Answer = (usize, EvalMode, String, Option<bool>, Option<Vec<usize>>);

/// Every result line without its timing fields (wall time differs between runs).
fn answers(eval: &Path) -> Vec<Answer> {
    let mut v: Vec<_> = read_results(eval)
        .unwrap()
        .into_iter()
        .map(|r| (r.index, r.mode, r.response, r.correct, r.category_counts))
        .collect();
    v.sort_by_key(|a| (a.0, a.1));
    v
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Checks that every artifact of a finished demo exists and parses.
fn check_artifacts(out: &Path, s: &DemoSummary) {
    for st in &s.steps {
        for a in &st.artifacts {
            assert!(a.exists(), "step {}: {} missing", st.name, a.display());
        }
    }
    let mut traces = read_traces(&out.join("traces.jsonl")).unwrap();
    traces.sort_by_key(|t| t.index);
    assert_eq!(traces.len(), QUESTIONS);
    assert!(traces.iter().all(|t| t.thinking.is_some()));
    // Traces come from the last rows (2..7 of 7); the evaluated problems are the first ones.
    assert!(
        traces[0].question.starts_with("Tom has 4 apples"),
        "{traces:?}"
    );
    assert!(traces[4].question.starts_with("Sara reads"), "{traces:?}");

    let acts = Acts::load(&out.join("acts.safetensors")).unwrap();
    let index = read_index(&out.join("acts.index.jsonl")).unwrap();
    // The fixture has 4 blocks: the middle one is 2.
    assert_eq!((acts.n, acts.d, acts.layer), (index.len(), 64, 2));

    let sae =
        thinksteer::sae::Sae::load(out.join(format!("sae/sae-{LATENTS}.safetensors"))).unwrap();
    assert_eq!((sae.latents, sae.k, sae.layer), (LATENTS, 2, 2));
    let fvu = std::fs::read_to_string(out.join("sae/fvu.md")).unwrap();
    assert!(fvu.contains(&format!("| {LATENTS} |")), "{fvu}");

    let ann = read_annotations(&out.join("categories/annotations.jsonl")).unwrap();
    assert_eq!(ann.len(), acts.n);
    assert!(ann.iter().all(|a| a.category < LATENTS));
    let rep = std::fs::read_to_string(out.join("categories/report.md")).unwrap();
    assert!(rep.contains("# Reasoning categories"), "{rep}");

    let set = thinksteer::steering::SteeringSet::load(out.join("vectors.safetensors")).unwrap();
    assert_eq!((set.count, set.layer, set.d), (LATENTS, 2, 64));

    let eval = out.join("eval");
    let cfg: RunConfig =
        serde_json::from_str(&std::fs::read_to_string(eval.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg.base.model, cfg.thinking.model,
        "one model plays both roles"
    );
    assert!(cfg.thinking.prompt.ends_with("<think>\n"), "chat template");
    assert!(cfg.base.prompt.starts_with("Task: Answer"), "plain prompt");
    let lines = answers(&eval);
    assert_eq!(lines.len(), 3 * PROBLEMS);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["modes"].as_array().unwrap().len(), 3);
    assert!(std::fs::read_to_string(eval.join("report.svg"))
        .unwrap()
        .starts_with("<svg"));
    assert_eq!(s.report.modes.len(), 3);
    assert!(s.report.modes.iter().all(|m| m.problems == PROBLEMS));
    assert!(out.join("summary.md").exists());
}

#[test]
fn demo_runs_every_step_and_resumes() {
    let dir = tmp("resume");
    let o = options(&dir);
    let out = o.out.clone();
    let first = run(&fixture(MODEL), &o).unwrap();
    let names: Vec<&str> = first.steps.iter().map(|s| s.name.as_str()).collect();
    let want: Vec<&str> = STEPS.iter().map(|s| s.0).collect();
    assert_eq!(names, want);
    assert!(first.steps.iter().all(|s| !s.resumed));
    check_artifacts(&out, &first);

    let text = first.render();
    for (i, (name, _)) in STEPS.iter().enumerate() {
        assert!(
            text.contains(&format!("[{}/7] {name}", i + 1)),
            "{name}: {text}"
        );
    }
    assert!(text.contains(NOT_THE_PAPER), "{text}");
    let facts = |s: &DemoSummary, step: usize| s.steps[step - 1].facts.join("\n");
    assert!(facts(&first, 3).contains("validation FVU"), "{text}");
    assert!(facts(&first, 4).contains("category 0:"), "{text}");
    assert!(facts(&first, 7).contains("95% CI"), "{text}");
    assert!(facts(&first, 7).contains("steered"), "{text}");

    // A second run skips every step and rewrites nothing.
    let kept = [
        "traces.jsonl",
        "acts.safetensors",
        "sae/sae-3.safetensors",
        "categories/annotations.jsonl",
        "vectors.safetensors",
        "eval/results.jsonl",
        "eval/report.json",
    ];
    let before: Vec<Vec<u8>> = kept.iter().map(|f| bytes(&out.join(f))).collect();
    let second = run(&fixture(MODEL), &o).unwrap();
    assert!(second.steps.iter().all(|s| s.resumed));
    for (a, b) in first.steps.iter().zip(&second.steps) {
        assert_eq!(
            (&a.facts, &a.artifacts, a.seconds),
            (&b.facts, &b.artifacts, b.seconds)
        );
    }
    for (f, b) in kept.iter().zip(&before) {
        assert_eq!(&bytes(&out.join(f)), b, "{f} changed on resume");
    }
    assert!(second.render().contains("in an earlier run; skipped now"));

    // A removed artifact reruns its step and every later one, to the same results.
    let answers_before = answers(&out.join("eval"));
    std::fs::remove_file(out.join("vectors.safetensors")).unwrap();
    let third = run(&fixture(MODEL), &o).unwrap();
    let resumed: Vec<bool> = third.steps.iter().map(|s| s.resumed).collect();
    assert_eq!(resumed, [true, true, true, true, false, false, false]);
    assert_eq!(bytes(&out.join("vectors.safetensors")), before[4]);
    assert_eq!(answers(&out.join("eval")), answers_before);
    assert_eq!(facts(&third, 7), facts(&first, 7));

    // A copy of the folder checks its own files: the copy's SAE removed reruns from step 3
    // (the original's is still there).
    let copy = dir.join("copy");
    copy_dir(&out, &copy);
    std::fs::remove_file(copy.join("sae/sae-3.safetensors")).unwrap();
    let moved = DemoOptions {
        out: copy.clone(),
        ..o.clone()
    };
    let fourth = run(&fixture(MODEL), &moved).unwrap();
    let resumed: Vec<bool> = fourth.steps.iter().map(|s| s.resumed).collect();
    assert_eq!(resumed, [true, true, false, false, false, false, false]);
    assert!(copy.join("sae/sae-3.safetensors").exists());
    assert_eq!(answers(&copy.join("eval")), answers_before);
    // A copy made while the evaluation ran (its results incomplete): the evaluation, whose
    // configuration names the original folder's SAE, runs again in the copy.
    let copy = dir.join("copy2");
    copy_dir(&out, &copy);
    std::fs::remove_file(copy.join("eval/results.jsonl")).unwrap();
    let moved = DemoOptions {
        out: copy.clone(),
        ..o.clone()
    };
    let fifth = run(&fixture(MODEL), &moved).unwrap();
    let resumed: Vec<bool> = fifth.steps.iter().map(|s| s.resumed).collect();
    assert_eq!(resumed, [true, true, true, true, true, false, false]);
    assert_eq!(answers(&copy.join("eval")), answers_before);
    let _ = std::fs::remove_dir_all(&dir);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        match p.is_dir() {
            true => copy_dir(&p, &dest),
            false => drop(std::fs::copy(&p, &dest).unwrap()),
        }
    }
}

#[test]
fn other_settings_in_the_same_folder_are_refused() {
    let dir = tmp("settings");
    let o = options(&dir);
    let mut o2 = o.clone();
    o2.problems = PROBLEMS + 1;
    run(&fixture(MODEL), &o).unwrap();
    let e = run(&fixture(MODEL), &o2).unwrap_err().to_string();
    assert!(
        e.contains("other settings") && e.contains("problems"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the binary in `cwd`: (exit code, stdout, stderr).
fn demo_bin(cwd: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_thinksteer"))
        .arg("demo")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_model_names_the_fetch_script() {
    let dir = tmp("missing");
    // (The default path is the working folder's models/ file, else the checkout's, which CI
    // has fetched: so only a --model that is missing can be tested here.)
    let (code, _, err) = demo_bin(&dir, &["--model", "nowhere/model.gguf"]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("nowhere/model.gguf") && err.contains("bash models/fetch-demo-model.sh"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn binary_shows_progress_and_prints_the_summary() {
    let dir = tmp("bin");
    let data = dataset(&dir);
    let model = fixture(MODEL);
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--out",
        "out",
        "--questions",
        "4",
        "--problems",
        "1",
        "--max-new-tokens",
        "40",
        "--latents",
        "3",
        "--device",
        "cpu",
    ];
    let (code, stdout, stderr) = demo_bin(&dir, &args);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("[3/7] training the SAE"), "{stderr}");
    assert!(stderr.contains("[hybrid]"), "eval progress: {stderr}");
    assert!(stdout.starts_with("# thinksteer demo: summary"), "{stdout}");
    assert!(stdout.contains("[7/7] report") && stdout.contains(NOT_THE_PAPER));
    assert_eq!(
        std::fs::read_to_string(dir.join("out/summary.md")).unwrap(),
        stdout
    );
    let _ = std::fs::remove_dir_all(&dir);
}
