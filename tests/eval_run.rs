//! `thinksteer eval` / `report` end to end on the tiny fixtures (qwen2-f32 as the base model,
//! thinking-qwen2-f32 as the thinking model, a random SAE and steering set): all three modes,
//! the result-line schema, report numbers recomputed here from the JSONL, resuming after
//! --limit and after a torn last line, shards, and bad input (exit code 2, one line).

mod common;

use common::{copy_fixture, fixture};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_thinksteer"))
}

fn tmp(case: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("thinksteer-evalrun-{}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A bad-input failure: exit code 2 and one line on stderr; returns that line.
fn fails(out: Output) -> String {
    common::one_line_error(&out, "eval", &[])
}

/// The SAE, the steering set and a 4-problem dataset, made once per test binary.
struct Artifacts {
    sae: PathBuf,
    vectors: PathBuf,
    data: PathBuf,
}

fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let dir = tmp("artifacts");
        let (sae, vectors, data) = (
            dir.join("sae.safetensors"),
            dir.join("vec.safetensors"),
            dir.join("four.jsonl"),
        );
        ok(bin()
            .args(["random-sae", "--model"])
            .arg(fixture("thinking-qwen2-f32"))
            .args(["--layer", "2", "--latents", "4", "--out"])
            .arg(&sae)
            .output()
            .unwrap());
        ok(bin()
            .args(["random-vectors", "--model"])
            .arg(fixture("qwen2-f32"))
            .args(["--layer", "1", "--count", "4", "--norm", "12", "--out"])
            .arg(&vectors)
            .output()
            .unwrap());
        let rows = [
            ("What is 2+3?", "5", "Algebra", "Level 1"),
            ("So x is 7. What is x?", "7", "Algebra", "Level 2"),
            (
                "Compute \\frac{1}{2}+\\frac{1}{2}.",
                "1",
                "Prealgebra",
                "Level 1",
            ),
            ("The sum 4+4 equals what?", "8", "Number Theory", "Level 3"),
        ];
        let body: String = rows
            .iter()
            .map(|(q, a, s, l)| {
                serde_json::json!({"question": q, "answer": a, "subject": s, "level": l})
                    .to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(&data, body).unwrap();
        Artifacts { sae, vectors, data }
    })
}

/// `thinksteer eval` on the fixtures with 6 new tokens, batches of 3 (so 4 problems make one
/// full and one partial batch), plus `extra` flags.
fn eval(out: &Path, extra: &[&str]) -> Output {
    eval_cmd(out, extra).output().unwrap()
}

/// The command `eval` runs.
fn eval_cmd(out: &Path, extra: &[&str]) -> Command {
    let a = artifacts();
    let mut c = bin();
    c.arg("eval")
        .arg("--dataset")
        .arg(&a.data)
        .args(["--modes", "base,thinking,hybrid", "--base"])
        .arg(fixture("qwen2-f32"))
        .arg("--thinking")
        .arg(fixture("thinking-qwen2-f32"))
        .arg("--sae")
        .arg(&a.sae)
        .arg("--vectors")
        .arg(&a.vectors)
        .arg("--out")
        .arg(out)
        .args(["--max-new-tokens", "6", "--device", "cpu", "--quiet"])
        .args(if extra.contains(&"--batch") {
            &[][..]
        } else {
            &["--batch", "3"][..]
        })
        .args(extra);
    c
}

fn lines_of(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// The content of a result line that must not depend on batching or resuming.
fn key(v: &Value) -> String {
    let mut v = v.clone();
    let m = v.as_object_mut().unwrap();
    m.remove("seconds");
    m.remove("batch");
    serde_json::to_string(m).unwrap()
}

fn keys(vs: &[Value]) -> BTreeSet<String> {
    vs.iter().map(key).collect()
}

/// The uninterrupted reference run, shared by the tests that compare against it.
fn reference_run() -> &'static (PathBuf, Vec<Value>) {
    static R: OnceLock<(PathBuf, Vec<Value>)> = OnceLock::new();
    R.get_or_init(|| {
        let out = tmp("reference");
        ok(eval(&out, &[]));
        let lines = lines_of(&out.join("results.jsonl"));
        (out, lines)
    })
}

#[test]
fn all_modes_write_the_schema() {
    let (out, lines) = reference_run();
    assert_eq!(lines.len(), 12, "4 problems × 3 modes");
    let pairs: BTreeSet<(u64, String)> = lines
        .iter()
        .map(|l| {
            (
                l["index"].as_u64().unwrap(),
                l["mode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(pairs.len(), 12, "no (index, mode) pair twice");
    for l in lines {
        let mode = l["mode"].as_str().unwrap();
        for f in [
            "index",
            "mode",
            "question",
            "reference",
            "response",
            "extracted",
            "correct",
            "tokens",
            "seconds",
        ] {
            assert!(l.get(f).is_some(), "{mode} line lacks {f}: {l}");
        }
        assert!(
            l["correct"].is_boolean()
                && l["response"].is_string()
                && l["seconds"].as_f64().unwrap() >= 0.0
        );
        let tokens = l["tokens"].as_u64().unwrap();
        assert!(
            (1..=6).contains(&tokens),
            "1..=6 new tokens, found {tokens}"
        );
        assert!(l["meta"]["subject"].is_string(), "meta kept: {l}");
        if mode == "hybrid" {
            let sf = l["steered_fraction"].as_f64().unwrap();
            let counts: Vec<u64> = serde_json::from_value(l["category_counts"].clone()).unwrap();
            assert_eq!(counts.len(), 4, "K = 4 categories");
            let steered: u64 = counts.iter().sum();
            assert_eq!(steered, l["steered_tokens"].as_u64().unwrap());
            assert!((sf - steered as f64 / tokens as f64).abs() < 1e-12);
            assert!(l["changed_tokens"].as_u64().unwrap() <= steered, "{l}");
        } else {
            assert!(
                l.get("steered_fraction").is_none() && l.get("category_counts").is_none(),
                "{l}"
            );
        }
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["max_new_tokens"], 6);
    assert_eq!(config["hybrid"]["mode"], "cached");
    assert_eq!(config["hybrid"]["windows"], serde_json::json!([-1]));
    assert!(
        config["thinking"]["prompt"]
            .as_str()
            .unwrap()
            .ends_with("<think>\n"),
        "chat template recorded"
    );
    // eval ends by writing the folder's report.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| hybrid | 4 |"), "{md}");
    // A rerun finds everything done: nothing is appended.
    ok(eval(out, &[]));
    assert_eq!(lines_of(&out.join("results.jsonl")).len(), 12);
}

fn wilson(k: f64, n: f64) -> (f64, f64) {
    if n == 0.0 {
        return (0.0, 1.0);
    }
    let z = 1.959963984540054f64;
    let p = k / n;
    let c = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let h = z / (1.0 + z * z / n) * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    ((c - h).max(0.0), (c + h).min(1.0))
}

/// Recomputes per-mode numbers from result lines and checks report.json and report.md agree.
/// Lines awaiting the judge (`correct: null`) count as answered, not in the accuracy.
fn check_report(out: &Path, lines: &[Value]) -> Value {
    let printed =
        String::from_utf8(ok(bin().arg("report").arg("--out").arg(out).output().unwrap()).stdout)
            .unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && md.contains("report.svg"),
        "report chart missing"
    );
    assert_eq!(printed, md);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // Exact formulas on both sides; 1e-12 only absorbs summation order.
    let close = |a: f64, b: f64, what: &str| {
        assert!((a - b).abs() < 1e-12, "{what}: report {a}, recomputed {b}")
    };
    let mut by_mode: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for l in lines {
        by_mode
            .entry(l["mode"].as_str().unwrap().to_string())
            .or_default()
            .push(l);
    }
    let stats = r["modes"].as_array().unwrap();
    assert_eq!(stats.len(), by_mode.len());
    for s in stats {
        let mode = s["mode"].as_str().unwrap();
        let ls = &by_mode[mode];
        let awaiting = ls.iter().filter(|l| l["correct"].is_null()).count();
        let n = (ls.len() - awaiting) as f64;
        let k = ls.iter().filter(|l| l["correct"] == true).count() as f64;
        assert_eq!(s["problems"].as_u64().unwrap() as usize, ls.len());
        assert_eq!(s["awaiting_judge"].as_u64().unwrap() as usize, awaiting);
        close(s["accuracy"].as_f64().unwrap(), k / n.max(1.0), "accuracy");
        let (lo, hi) = wilson(k, n);
        close(s["ci_low"].as_f64().unwrap(), lo, "ci_low");
        close(s["ci_high"].as_f64().unwrap(), hi, "ci_high");
        let tokens: u64 = ls.iter().map(|l| l["tokens"].as_u64().unwrap()).sum();
        assert_eq!(s["tokens"].as_u64().unwrap(), tokens);
        let problems = match awaiting {
            0 => format!("{n}"),
            a => format!("{n} judged, {a} awaiting the judge"),
        };
        let row = format!(
            "| {mode} | {problems} | {} | {:.1}% | [{:.1}%, {:.1}%] | {tokens} |",
            k,
            100.0 * k / n.max(1.0),
            100.0 * lo,
            100.0 * hi
        );
        assert!(md.contains(&row), "report.md lacks {row:?}:\n{md}");
        if mode == "hybrid" {
            let steered: f64 = ls
                .iter()
                .map(|l| l["steered_tokens"].as_f64().unwrap())
                .sum();
            close(
                s["steered_token_weighted"].as_f64().unwrap(),
                steered / tokens as f64,
                "token-weighted",
            );
            let changed: f64 = ls.iter().filter_map(|l| l["changed_tokens"].as_f64()).sum();
            if ls.iter().all(|l| l["changed_tokens"].is_u64()) {
                close(
                    s["changed_of_steered"].as_f64().unwrap(),
                    changed / steered.max(1.0),
                    "changed of steered",
                );
            }
            let mean = ls
                .iter()
                .map(|l| l["steered_fraction"].as_f64().unwrap())
                .sum::<f64>()
                / ls.len() as f64;
            close(
                s["steered_mean"].as_f64().unwrap(),
                mean,
                "mean per problem",
            );
            let k = ls
                .iter()
                .map(|l| l["category_counts"].as_array().unwrap().len())
                .max()
                .unwrap();
            let mut counts = vec![0u64; k];
            for l in ls {
                for (i, c) in l["category_counts"].as_array().unwrap().iter().enumerate() {
                    counts[i] += c.as_u64().unwrap();
                }
            }
            assert_eq!(s["category_counts"], serde_json::json!(counts));
        } else {
            assert!(s["steered_mean"].is_null());
        }
    }
    r
}

#[test]
fn report_matches_the_jsonl() {
    let (_, lines) = reference_run();
    // A copy, so report files do not race with the other tests reading the reference folder.
    let out = tmp("report-e2e");
    std::fs::copy(
        reference_run().0.join("results.jsonl"),
        out.join("results.jsonl"),
    )
    .unwrap();
    let r = check_report(&out, lines);
    assert_eq!(r["breakdowns"][0]["field"], "subject");
    assert_eq!(r["breakdowns"][1]["field"], "level");
}

/// Synthetic lines with a known answer: base 1/4, thinking 3/4, hybrid 2/4 → gap recovered
/// (0.5 − 0.25) / (0.75 − 0.25) = 0.5; one line repeated (ignored), one torn at the end.
#[test]
fn report_known_numbers() {
    let out = tmp("report-known");
    let mut body = String::new();
    let correct = [
        ("base", [true, false, false, false]),
        ("thinking", [true, true, true, false]),
        ("hybrid", [true, false, true, false]),
    ];
    for (mode, cs) in correct {
        for (i, c) in cs.iter().enumerate() {
            let mut l = serde_json::json!({
                "index": i, "mode": mode, "question": "q", "reference": "1", "response": "r",
                "extracted": null, "correct": c, "tokens": 10 * (i + 1), "seconds": 1.0 + i as f64,
                "batch": format!("{mode}-{}", i / 2),
                "meta": {"subject": if i < 2 { "Algebra" } else { "Geometry" }, "level": "Level 1"}
            });
            if mode == "hybrid" {
                l["steered_fraction"] = serde_json::json!(i as f64 / (10.0 * (i + 1) as f64));
                l["steered_tokens"] = serde_json::json!(i);
                l["category_counts"] = serde_json::json!([i, 0]);
            }
            body += &(l.to_string() + "\n");
        }
    }
    let first = body.lines().next().unwrap().to_string();
    std::fs::write(out.join("results.shard-0-of-2.jsonl"), &body).unwrap();
    std::fs::write(
        out.join("results.shard-1-of-2.jsonl"),
        first + "\n{\"index\": 9, \"mo",
    )
    .unwrap();
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let r = check_report(&out, &lines);
    assert_eq!(r["duplicates"], 1);
    let g = &r["gap"];
    assert_eq!(g["problems"], 4);
    assert!(
        (g["recovered"].as_f64().unwrap() - 0.5).abs() < 1e-12,
        "{g}"
    );
    // tok/s: 100 tokens over batch walls max(1,2) + max(3,4) = 6 s.
    assert!((r["modes"][0]["tok_per_s"].as_f64().unwrap() - 100.0 / 6.0).abs() < 1e-9);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("= 50.0%"), "{md}");
    assert!(
        md.contains("| Geometry | 0.0% (0/2) | 50.0% (1/2) | 50.0% (1/2) |"),
        "{md}"
    );
}

#[test]
fn resume_after_limit_equals_uninterrupted() {
    let (_, reference) = reference_run();
    let out = tmp("resume");
    ok(eval(&out, &["--limit", "2"]));
    let partial = lines_of(&out.join("results.jsonl"));
    assert_eq!(partial.len(), 6, "2 problems × 3 modes");
    ok(eval(&out, &[]));
    let full = lines_of(&out.join("results.jsonl"));
    assert_eq!(full.len(), 12);
    assert_eq!(keys(&full), keys(reference));
}

#[test]
fn torn_last_line_resumes_without_duplicates() {
    let (ref_out, reference) = reference_run();
    let out = tmp("torn");
    let text = std::fs::read_to_string(ref_out.join("results.jsonl")).unwrap();
    // Keep 7 whole lines and half of the 8th, as if killed inside a write, there inside a
    // two-byte character (the first byte of "×").
    let ends: Vec<usize> = text.match_indices('\n').map(|(i, _)| i + 1).collect();
    let cut = ends[6] + (ends[7] - ends[6]) / 2;
    let torn = [&text.as_bytes()[..cut], &[0xC3]].concat();
    std::fs::write(out.join("results.jsonl"), torn).unwrap();
    std::fs::copy(ref_out.join("config.json"), out.join("config.json")).unwrap();
    ok(eval(&out, &[]));
    let lines = lines_of(&out.join("results.jsonl"));
    assert_eq!(lines.len(), 12, "no duplicates, nothing lost");
    assert_eq!(keys(&lines), keys(reference));
}

#[test]
fn shards_merge_to_the_full_set() {
    let (_, reference) = reference_run();
    let out = tmp("shards");
    ok(eval(&out, &["--shard", "0/2"]));
    ok(eval(&out, &["--shard", "1/2", "--batch", "1"]));
    let a = lines_of(&out.join("results.shard-0-of-2.jsonl"));
    let b = lines_of(&out.join("results.shard-1-of-2.jsonl"));
    assert!(a.iter().all(|l| l["index"].as_u64().unwrap() % 2 == 0));
    let merged: Vec<Value> = a.into_iter().chain(b).collect();
    assert_eq!(merged.len(), 12);
    assert_eq!(
        keys(&merged),
        keys(reference),
        "sharded and batch-1 runs give the same greedy answers"
    );
    check_report(&out, &merged);
}

#[test]
fn bad_input_is_refused() {
    let dir = tmp("bad");
    let data = dir.join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"question\":\"q\",\"answer\":\"1\"}\n{\"question\": oops\n",
    )
    .unwrap();
    let mut c = bin();
    let run = |c: &mut Command, data: &Path, out: &Path, tokens: &str, extra: &[&str]| {
        c.arg("eval")
            .arg("--dataset")
            .arg(data)
            .args(["--modes", "base", "--base"])
            .arg(fixture("qwen2-f32"))
            .arg("--thinking")
            .arg(fixture("thinking-qwen2-f32"))
            .arg("--out")
            .arg(out)
            .args(["--max-new-tokens", tokens, "--device", "cpu", "--quiet"])
            .args(extra)
            .output()
            .unwrap()
    };
    let e = fails(run(&mut c, &data, &dir.join("o1"), "2", &[]));
    assert!(
        e.contains("bad.jsonl:2") && e.contains("malformed JSON"),
        "{e}"
    );
    // A file of GSM8K-style answers given by its path is graded as GSM8K, with a note saying
    // so; with --kind custom as MATH, with a note too.
    let gsm = dir.join("mine.jsonl");
    std::fs::write(
        &gsm,
        "{\"question\":\"1+1?\",\"answer\":\"one and one #### 2\"}\n",
    )
    .unwrap();
    let grading = |out: &Path| -> String {
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        c["dataset"]["grading"].as_str().unwrap().to_string()
    };
    let out = ok(run(&mut bin(), &gsm, &dir.join("o10"), "2", &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("graded as GSM8K (the number after ####)"),
        "{err}"
    );
    assert_eq!(grading(&dir.join("o10")), "gsm8k");
    // Read as GSM8K: the reference is the number, as with --dataset gsm8k.
    assert_eq!(
        lines_of(&dir.join("o10/results.jsonl"))[0]["reference"],
        "2"
    );
    let out = ok(run(
        &mut bin(),
        &gsm,
        &dir.join("o11"),
        "2",
        &["--kind", "custom"],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("yet --kind custom grades it as MATH"), "{err}");
    assert_eq!(grading(&dir.join("o11")), "math");
    // Bad input with such a file: the error is the only line (the note comes after the checks).
    let e = fails(run(
        &mut bin(),
        &gsm,
        &dir.join("o12"),
        "2",
        &["--thinking-gpu", "1"],
    ));
    assert!(e.contains("--thinking-gpu"), "{e}");
    let e = fails(run(
        &mut bin(),
        &gsm,
        &dir.join("o13"),
        "2",
        &["--offset", "5"],
    ));
    assert!(e.contains("offset 5"), "{e}");
    // A folder given as the dataset.
    let e = fails(run(&mut bin(), &dir, &dir.join("o14"), "2", &[]));
    assert!(e.contains("found a folder"), "{e}");
    let e = fails(run(
        &mut bin(),
        &gsm,
        &dir.join("o15"),
        "2",
        &["--shard", "-1/2"],
    ));
    assert!(e.contains("--shard"), "{e}");
    // Files saved with a UTF-8 byte-order mark (Windows editors) are read: the dataset, and
    // the results `report` reads.
    let bom = dir.join("bom.jsonl");
    std::fs::write(
        &bom,
        format!("\u{feff}{}", std::fs::read_to_string(&gsm).unwrap()),
    )
    .unwrap();
    ok(run(&mut bin(), &bom, &dir.join("o16"), "2", &[]));
    let results = dir.join("o16/results.jsonl");
    let text = std::fs::read_to_string(&results).unwrap();
    std::fs::write(&results, format!("\u{feff}{text}")).unwrap();
    ok(bin()
        .arg("report")
        .arg("--out")
        .arg(dir.join("o16"))
        .output()
        .unwrap());

    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let e = fails(run(&mut bin(), &empty, &dir.join("o2"), "2", &[]));
    assert!(e.contains("empty dataset"), "{e}");

    let e = fails(run(
        &mut bin(),
        &dir.join("missing.jsonl"),
        &dir.join("o3"),
        "2",
        &[],
    ));
    assert!(
        e.contains("missing.jsonl") && e.contains("gsm8k, math500"),
        "{e}"
    );

    let e = fails(run(
        &mut bin(),
        &artifacts().data,
        &dir.join("o4"),
        "2",
        &["--preset", "r1-distill-qwen-7b"],
    ));
    assert!(
        e.contains("r1-distill-qwen-1.5b") && e.contains("qwq-32b"),
        "{e}"
    );

    let e = fails(run(
        &mut bin(),
        &artifacts().data,
        &dir.join("o5"),
        "2",
        &["--modes", "hybrid"],
    ));
    assert!(e.contains("--sae"), "{e}");

    // A preset whose layers the random SAE (layer 2, K 4) does not have.
    let e = fails(eval(
        &dir.join("o6"),
        &[
            "--preset",
            "r1-distill-qwen-1.5b",
            "--modes",
            "hybrid",
            "--limit",
            "1",
        ],
    ));
    assert!(
        e.contains("layer 4") && e.contains("found SAE layer 2"),
        "{e}"
    );

    // --prefix-caches without the hybrid mode, or with it but without window 0: refused before
    // any mode runs (no results file).
    for (flags, said) in [
        (&["--prefix-caches", "4"][..], "--prefix-caches"),
        (
            &["--random-firing"][..],
            "the ablation random firing (seed 0)",
        ),
        (&["--thinking-gpu", "1"][..], "--thinking-gpu"),
    ] {
        let e = fails(run(
            &mut bin(),
            &artifacts().data,
            &dir.join("o8"),
            "2",
            flags,
        ));
        assert!(
            e.contains(&format!(
                "{said} goes with --modes hybrid, found --modes base"
            )),
            "{e}"
        );
    }
    let out = dir.join("o9");
    let e = fails(eval(&out, &["--thinking-gpu", "1"]));
    assert!(
        e.contains("--thinking-gpu 1: expected a run on the GPU"),
        "{e}"
    );
    let e = fails(eval(&out, &["--windows", "-1,-15", "--prefix-caches", "4"]));
    assert!(
        e.contains("--prefix-caches") && e.contains("window 0"),
        "{e}"
    );
    assert!(!out.join("results.jsonl").exists());

    // --out holding results of another configuration: refused, and nothing appended.
    let out = dir.join("o7");
    ok(run(
        &mut bin(),
        &artifacts().data,
        &out,
        "2",
        &["--limit", "1"],
    ));
    let before = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let e = fails(run(&mut bin(), &artifacts().data, &out, "3", &[]));
    assert!(
        e.contains("different configuration") && e.contains("max_new_tokens: 2 there, 3 now"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("results.jsonl")).unwrap(),
        before
    );
}

/// --judge-cmd decides `correct`: this judge (reading the JSON on stdin) accepts the two
/// questions that start with "What is" / contain "What is", whatever the response.
#[test]
fn judge_cmd_decides_correct() {
    let out = tmp("judge");
    ok(eval(
        &out,
        &[
            "--modes",
            "base",
            "--judge-cmd",
            "grep -q 'What is' && echo true || echo false",
        ],
    ));
    let lines = lines_of(&out.join("results.jsonl"));
    // --modes is repeatable, so base,thinking,hybrid + base is still every mode once.
    assert_eq!(lines.len(), 12);
    for l in &lines {
        let want = l["question"].as_str().unwrap().contains("What is");
        assert_eq!(l["correct"].as_bool().unwrap(), want, "{l}");
    }
    let r = check_report(&out, &lines);
    assert_eq!(r["modes"][0]["correct"], 2);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(config["judge_cmd"].as_str().unwrap().contains("grep"));
}

/// A judge for the tests: it fails ("judge offline", exit 5) while `marker` exists and its input
/// (the JSON of question, reference and response) matches the grep pattern `failing`, else says
/// whether the question contains "What is".
fn flaky_judge(marker: &Path, failing: &str) -> String {
    format!(
        "q=$(cat); if [ -e '{}' ] && printf %s \"$q\" | grep -q '{failing}'; then echo 'judge offline' >&2; exit 5; fi; printf %s \"$q\" | grep -q 'What is' && echo true || echo false",
        marker.display()
    )
}

/// A line without its verdict: what a rerun may change and nothing else.
fn without_verdict(v: &Value) -> Value {
    let mut v = v.clone();
    let m = v.as_object_mut().unwrap();
    m.remove("correct");
    m.remove("judge_error");
    v
}

/// `eval` stderr lines that report the judge failing on one problem.
fn judge_failures(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("judge: problem "))
        .map(str::to_string)
        .collect()
}

/// A judge that fails on one question leaves that question's answers awaiting it (`correct:
/// null`, `judge_error`), says so once per failure, and the run goes on; the report counts them
/// apart. The same eval run again judges them without generating them again: while the judge
/// still fails they stay as they were, once it works they are decided in place.
#[test]
fn a_failing_judge_leaves_answers_awaiting_and_a_rerun_judges_them() {
    let out = tmp("judge-flaky");
    let marker = out.join("judge-offline");
    std::fs::write(&marker, "").unwrap();
    let judge = flaky_judge(&marker, "x is 7");
    let run = || eval(&out, &["--judge-cmd", &judge]);
    let first = ok(run());
    let path = out.join("results.jsonl");
    let lines = lines_of(&path);
    assert_eq!(lines.len(), 12, "every answer written");
    for l in &lines {
        let question = l["question"].as_str().unwrap();
        if question.contains("x is 7") {
            assert!(l["correct"].is_null(), "{l}");
            let why = l["judge_error"].as_str().unwrap();
            assert!(
                why.contains("exit status: 5") && why.contains("judge offline"),
                "{why}"
            );
            assert!(
                l["response"].is_string() && l.get("extracted").is_some(),
                "{l}"
            );
        } else {
            assert_eq!(l["correct"], question.contains("What is"), "{l}");
            assert!(l.get("judge_error").is_none(), "{l}");
        }
    }
    let said = judge_failures(&first);
    assert_eq!(said.len(), 3, "once per failure: {said:?}");
    for mode in ["base", "thinking", "hybrid"] {
        let at = format!("judge: problem 1 ({mode}): ");
        assert!(
            said.iter()
                .any(|l| l.starts_with(&at) && l.contains("judge offline")),
            "{said:?}"
        );
    }
    let r = check_report(&out, &lines);
    assert_eq!(r["awaiting_judge"], 3);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("**Awaiting the judge**: 3 result lines")
            && md.contains("run the same `thinksteer eval` command again"),
        "{md}"
    );

    // Still failing: judged again, left as they were; nothing generated.
    let before = std::fs::read_to_string(&path).unwrap();
    let second = ok(run());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    let said = judge_failures(&second);
    assert!(
        said.len() == 3 && said.iter().all(|l| l.ends_with("still awaiting the judge")),
        "{said:?}"
    );

    // Working again: decided in place, every other field (response, seconds, batch) as it was.
    std::fs::remove_file(&marker).unwrap();
    let third = ok(run());
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(
        err.contains("0 result lines written, 12 already present (3 of them judged now"),
        "{err}"
    );
    let judged = lines_of(&path);
    assert_eq!(judged.len(), 12, "no line added");
    for (old, new) in lines.iter().zip(&judged) {
        assert_eq!(without_verdict(old), without_verdict(new));
        let question = new["question"].as_str().unwrap();
        assert_eq!(new["correct"], question.contains("What is"), "{new}");
        assert!(new.get("judge_error").is_none(), "{new}");
    }
    let r = check_report(&out, &judged);
    assert_eq!(r["awaiting_judge"], 0);
    assert_eq!(r["modes"][0]["correct"], 2);
    assert!(!std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("Awaiting"));
}

/// A judge that fails 3 times in a row is down: the run stops with one error line, after
/// writing every answer generated so far (those finished in the same step as the third
/// failure, and in the hybrid loop, which cannot stop, every later one) awaiting the judge.
/// The same eval, once the judge works, judges them and generates the rest.
#[test]
fn a_judge_that_goes_down_stops_the_run_losing_no_answer() {
    // In the base mode, 4 problems decoded together: every one fails (the references are 5, 7,
    // 1 and 8; the sample tried before generating has 2).
    let out = tmp("judge-down-base");
    let marker = out.join("judge-offline");
    std::fs::write(&marker, "").unwrap();
    let judge = flaky_judge(&marker, "\"reference\":\"[1578]\"");
    let run = || eval(&out, &["--judge-cmd", &judge, "--batch", "4"]);
    let down = run();
    assert_eq!(down.status.code(), Some(2), "{down:?}");
    let err = String::from_utf8_lossy(&down.stderr);
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("3 failures in a row") && last.contains("judge offline"),
        "{err}"
    );
    assert_eq!(judge_failures(&down).len(), 3, "{err}");
    let path = out.join("results.jsonl");
    let lines = lines_of(&path);
    // The fixtures stop at the token limit, so the 4 finish in one step.
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines
        .iter()
        .all(|l| l["mode"] == "base" && l["correct"].is_null()));
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["judge_error"].as_str().unwrap().starts_with("not judged"))
            .count(),
        1,
        "the answer after the third failure is written unjudged"
    );
    let r = check_report(&out, &lines);
    assert_eq!(r["awaiting_judge"], 4);
    std::fs::remove_file(&marker).unwrap();
    ok(run());
    let all = lines_of(&path);
    assert_eq!(all.len(), 12);
    for (old, new) in lines.iter().zip(&all) {
        assert_eq!(
            without_verdict(old),
            without_verdict(new),
            "base answers kept"
        );
    }
    assert!(all.iter().all(|l| l["correct"].is_boolean()));

    // In the hybrid mode (the last): its judge calls fail from the 10th on (a sample, then 4
    // base and 4 thinking answers). The 3 problems decoded together fail, and the loop ends
    // there: the fourth is decoded by the rerun.
    let out = tmp("judge-down-hybrid");
    let (marker, calls) = (out.join("judge-offline"), out.join("calls"));
    std::fs::write(&marker, "").unwrap();
    let judge = format!(
        "n=$(cat '{c}' 2>/dev/null || echo 0); echo $((n + 1)) > '{c}'; if [ -e '{m}' ] && [ $n -ge 9 ]; then echo 'judge offline' >&2; exit 5; fi; echo true",
        c = calls.display(),
        m = marker.display()
    );
    let run = || eval(&out, &["--judge-cmd", &judge]);
    let down = run();
    assert_eq!(down.status.code(), Some(2), "{down:?}");
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(
        err.lines().last().unwrap().contains("3 failures in a row"),
        "{err}"
    );
    let lines = lines_of(&out.join("results.jsonl"));
    assert_eq!(lines.len(), 11, "every answer finished written");
    let hybrid: Vec<&Value> = lines.iter().filter(|l| l["mode"] == "hybrid").collect();
    assert_eq!(hybrid.len(), 3, "{hybrid:?}");
    assert!(hybrid.iter().all(|l| l["correct"].is_null()), "{hybrid:?}");
    assert!(
        hybrid
            .iter()
            .all(|l| l["judge_error"].as_str().unwrap().contains("judge offline")),
        "{hybrid:?}"
    );
    assert!(lines
        .iter()
        .filter(|l| l["mode"] != "hybrid")
        .all(|l| l["correct"] == true));
    std::fs::remove_file(&marker).unwrap();
    let judged = ok(run());
    assert!(
        String::from_utf8_lossy(&judged.stderr)
            .contains("1 result lines written, 11 already present (3 of them judged now"),
        "{judged:?}"
    );
    let all = lines_of(&out.join("results.jsonl"));
    for (old, new) in lines.iter().zip(&all) {
        assert_eq!(without_verdict(old), without_verdict(new));
        assert_eq!(new["correct"], true);
    }
}

/// With windows, each hybrid line counts its steered steps per winning (coefficient, window),
/// matching its per-coefficient counts, and the report sums them into a table where a window
/// other than -1 won.
#[test]
fn windowed_hybrid_counts_the_winning_coefficient_and_window() {
    let out = tmp("windows");
    ok(eval(
        &out,
        &["--windows", "0,-1,-3", "--coefficients", "0.5,2"],
    ));
    let lines = lines_of(&out.join("results.jsonl"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["hybrid"]["windows"], serde_json::json!([0, -1, -3]));
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    let (mut cat_total, mut argmax_total) = (vec![BTreeMap::new(); 4], vec![0u64; 4]);
    for l in lines.iter().filter(|l| l["mode"] == "hybrid") {
        let cw: BTreeMap<String, u64> = serde_json::from_value(l["cw_wins"].clone()).unwrap();
        let coef: BTreeMap<String, u64> = serde_json::from_value(l["coef_wins"].clone()).unwrap();
        let steered = l["steered_tokens"].as_u64().unwrap();
        assert_eq!(cw.values().sum::<u64>(), steered, "{l}");
        // Summed over windows, the pairs give the per-coefficient counts.
        let mut by_coef: BTreeMap<String, u64> = BTreeMap::new();
        for (k, x) in &cw {
            let (c, w) = k.split_once(',').unwrap();
            assert!(["0", "-1", "-3"].contains(&w), "{k}");
            *by_coef.entry(c.to_string()).or_insert(0) += x;
            *total.entry(k.clone()).or_insert(0) += x;
        }
        assert_eq!(by_coef, coef, "{l}");
        // Per category: every step at its argmax, and the steered ones by winner, which add up
        // to the line's per-category and per-(c, w) counts.
        let argmax: Vec<u64> = serde_json::from_value(l["category_steps"].clone()).unwrap();
        assert_eq!(
            argmax.iter().sum::<u64>(),
            l["tokens"].as_u64().unwrap(),
            "{l}"
        );
        let per_cat: Vec<BTreeMap<String, u64>> =
            serde_json::from_value(l["category_cw_wins"].clone()).unwrap();
        let counts: Vec<u64> = serde_json::from_value(l["category_counts"].clone()).unwrap();
        assert_eq!(per_cat.len(), counts.len());
        let mut merged: BTreeMap<String, u64> = BTreeMap::new();
        for (i, t) in per_cat.iter().enumerate() {
            assert_eq!(t.values().sum::<u64>(), counts[i], "{l}");
            assert!(counts[i] <= argmax[i], "{l}");
            for (k, x) in t {
                *merged.entry(k.clone()).or_insert(0) += x;
                *cat_total[i].entry(k.clone()).or_insert(0) += x;
            }
            argmax_total[i] += argmax[i];
        }
        assert_eq!(merged, cw, "{l}");
    }
    let r = check_report(&out, &lines);
    let hybrid = r["modes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mode"] == "hybrid")
        .unwrap();
    let reported: BTreeMap<String, u64> =
        serde_json::from_value(hybrid["cw_wins"].clone()).unwrap();
    assert_eq!(reported, total);
    let reported: Vec<BTreeMap<String, u64>> =
        serde_json::from_value(hybrid["category_cw_wins"].clone()).unwrap();
    assert_eq!(reported, cat_total);
    assert_eq!(hybrid["category_steps"], serde_json::json!(argmax_total));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    // One row per category: steered steps, steps at the argmax, the steered share, and the most
    // frequent winner first.
    for (i, t) in cat_total.iter().enumerate() {
        let steered: u64 = t.values().sum();
        let mut row = format!("| {i} | {steered} | {} |", argmax_total[i]);
        if steered > 0 {
            let share = 100.0 * steered as f64 / argmax_total[i] as f64;
            let top = t.values().max().unwrap();
            let first = t.iter().find(|(_, x)| *x == top).unwrap().0;
            let first = first.replace(',', ", ");
            row += &format!(" {share:.1}% | ({first}) {top}");
        }
        assert!(md.contains(&row), "report.md lacks {row:?}:\n{md}");
    }
    assert!(
        cat_total.iter().filter(|t| !t.is_empty()).count() >= 2,
        "fewer than two categories steered: the per-category rows went unchecked"
    );
    let longer = total.keys().any(|k| !k.ends_with(",-1"));
    assert_eq!(
        md.contains("| winning (coefficient, window) |"),
        longer,
        "{md}"
    );
    assert!(
        longer,
        "no step won by a window other than -1: the table went unchecked"
    );
    assert!(!md.contains("predate these counts"), "{md}");
    // A result line written before the counts existed (another problem, no cw_wins) is named
    // under the table, which it does not enter.
    let mut old = lines
        .iter()
        .find(|l| l["mode"] == "hybrid")
        .unwrap()
        .clone();
    old["index"] = 999.into();
    for f in ["cw_wins", "category_steps", "category_cw_wins"] {
        old.as_object_mut().unwrap().remove(f);
    }
    let results = out.join("results.jsonl");
    let mut text = std::fs::read_to_string(&results).unwrap();
    text += &format!("{old}\n");
    std::fs::write(&results, text).unwrap();
    ok(bin().arg("report").arg("--out").arg(&out).output().unwrap());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let n = lines.iter().filter(|l| l["mode"] == "hybrid").count() + 1;
    assert!(
        md.contains(&format!("1 of the {n} hybrid results predate these counts")),
        "{md}"
    );
    assert!(
        md.contains(&format!(
            "1 of the {n} hybrid results predate the per-category counts"
        )),
        "{md}"
    );
    // Categories take their names from the titles of the SAE that config.json names.
    let mut sae = thinksteer::sae::Sae::load(&artifacts().sae).unwrap();
    sae.titles = Some(
        ["alpha", "beta", "gamma", "delta"]
            .map(String::from)
            .to_vec(),
    );
    let titled = out.join("titled-sae.safetensors");
    sae.save(&titled).unwrap();
    let config_path = out.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["hybrid"]["sae"] = titled.to_str().unwrap().into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    ok(bin().arg("report").arg("--out").arg(&out).output().unwrap());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| 0: alpha | ") && md.contains("| 3: delta | "),
        "{md}"
    );
}

/// Ablations reach the hybrid loop, are recorded in config.json (absent when none is set, as in
/// folders written before they were recorded), name themselves in the report, and a rerun with
/// other ablations is refused.
#[test]
fn ablations_are_recorded_and_must_match_to_resume() {
    let (plain, _) = reference_run();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(plain.join("config.json")).unwrap()).unwrap();
    assert!(config["hybrid"].get("ablations").is_none(), "{config}");

    let out = tmp("ablations");
    ok(eval(&out, &["--only-bias", "--no-gating", "--seed", "4"]));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let a = &config["hybrid"]["ablations"];
    assert_eq!(a["only_bias"], true, "{config}");
    assert_eq!(a["no_gating"], true, "{config}");
    assert_eq!(a["random_firing"], false, "{config}");
    assert_eq!(
        a["seed"], 0,
        "no random ablation: the seed is not part of the run: {config}"
    );
    let lines = lines_of(&out.join("results.jsonl"));
    assert_eq!(lines.len(), 12);
    for l in lines.iter().filter(|l| l["mode"] == "hybrid") {
        // --no-gating: every step is steered.
        assert_eq!(l["steered_fraction"], 1.0, "{l}");
    }
    ok(bin().arg("report").arg("--out").arg(&out).output().unwrap());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("Hybrid: cached mode, coefficients 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, windows -1; ablations: only bias, no gating."),
        "{md}"
    );
    let e = fails(eval(&out, &["--only-bias"]));
    assert!(
        e.contains("holds results of a different configuration") && e.contains("ablations"),
        "{e}"
    );
    // The same flags resume, whatever the seed that no flag uses: nothing is appended.
    ok(eval(&out, &["--only-bias", "--no-gating", "--seed", "7"]));
    assert_eq!(lines_of(&out.join("results.jsonl")).len(), 12);

    // Both folders in one table: a row each, with its settings and numbers.
    let copy = tmp("ablations-plain");
    for f in ["results.jsonl", "config.json"] {
        std::fs::copy(plain.join(f), copy.join(f)).unwrap();
    }
    let printed = String::from_utf8(
        ok(bin()
            .arg("report")
            .arg("--out")
            .arg(&copy)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap())
        .stdout,
    )
    .unwrap();
    let rows: Vec<&str> = printed.lines().filter(|l| l.starts_with("| /")).collect();
    assert_eq!(rows.len(), 2, "{printed}");
    assert!(rows[0].contains("windows -1; no ablation |"), "{printed}");
    assert!(
        rows[1].contains("ablations: only bias, no gating |"),
        "{printed}"
    );
    // Each row's hybrid cell and steered share are its own report's.
    for (row, dir) in rows.iter().zip([&copy, &out]) {
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        let h = r["modes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mode"] == "hybrid")
            .unwrap();
        let cell = format!(
            "| {:.1}% ({}/{}) | [{:.1}%, {:.1}%] |",
            100.0 * h["accuracy"].as_f64().unwrap(),
            h["correct"],
            h["problems"],
            100.0 * h["ci_low"].as_f64().unwrap(),
            100.0 * h["ci_high"].as_f64().unwrap()
        );
        assert!(row.contains(&cell), "{row} lacks {cell}");
        let steered = format!("| {:.1}% |", 100.0 * h["steered_mean"].as_f64().unwrap());
        assert!(row.ends_with(&steered), "{row} lacks {steered}");
    }
    assert!(
        rows[1].ends_with("| 100.0% |"),
        "--no-gating steers every step: {printed}"
    );
    // An ablation folder of hybrid results only takes base and thinking from the folder of the
    // same evaluation, in the table only: the same cells, and a gap recovered of its own.
    let hybrid_only = tmp("ablations-hybrid-only");
    std::fs::copy(out.join("config.json"), hybrid_only.join("config.json")).unwrap();
    let kept: Vec<String> = lines_of(&out.join("results.jsonl"))
        .iter()
        .filter(|l| l["mode"] == "hybrid")
        .map(|l| l.to_string())
        .collect();
    std::fs::write(hybrid_only.join("results.jsonl"), kept.join("\n") + "\n").unwrap();
    let printed = String::from_utf8(
        ok(bin()
            .arg("report")
            .arg("--out")
            .arg(&copy)
            .arg("--out")
            .arg(&hybrid_only)
            .output()
            .unwrap())
        .stdout,
    )
    .unwrap();
    let rows: Vec<Vec<&str>> = printed
        .lines()
        .filter(|l| l.starts_with("| /"))
        .map(|l| l.split(" | ").collect())
        .collect();
    assert!(
        rows[1][0].ends_with(&format!("(base, thinking from {})", copy.display())),
        "{printed}"
    );
    assert_eq!(
        rows[1][2..4],
        rows[0][2..4],
        "base and thinking cells: {printed}"
    );
    assert_ne!(rows[1][6], "–", "a gap recovered: {printed}");
    // Its own report knows only its own results.
    let own = std::fs::read_to_string(hybrid_only.join("report.md")).unwrap();
    assert!(!own.contains("| base |"), "{own}");

    // Each ablation reaches the loop: alone, it changes some hybrid answer of the plain run.
    let plain_lines = lines_of(&plain.join("results.jsonl"));
    let hybrid_text = |ls: &[Value]| -> BTreeMap<u64, String> {
        ls.iter()
            .filter(|l| l["mode"] == "hybrid")
            .map(|l| (l["index"].as_u64().unwrap(), l["response"].to_string()))
            .collect()
    };
    for (flag, case) in [
        ("--only-bias", "ablation-bias"),
        ("--random-vectors", "ablation-vectors"),
        ("--random-firing", "ablation-firing"),
    ] {
        let o = tmp(case);
        ok(eval(&o, &[flag, "--seed", "1"]));
        let got = hybrid_text(&lines_of(&o.join("results.jsonl")));
        assert_ne!(
            got,
            hybrid_text(&plain_lines),
            "{flag} changed no hybrid answer"
        );
        let md = std::fs::read_to_string(o.join("report.md")).unwrap();
        assert_eq!(
            md.contains("| steps it was drawn (--random-firing) |"),
            flag == "--random-firing",
            "{md}"
        );
    }
}

#[test]
fn a_steering_file_changed_in_place_is_another_run() {
    let a = artifacts();
    let dir = tmp("retrained");
    let (sae, vectors, out) = (
        dir.join("sae.safetensors"),
        dir.join("vec.safetensors"),
        dir.join("out"),
    );
    std::fs::copy(&a.sae, &sae).unwrap();
    std::fs::copy(&a.vectors, &vectors).unwrap();
    let run = || {
        bin()
            .arg("eval")
            .arg("--dataset")
            .arg(&a.data)
            .args(["--modes", "hybrid", "--limit", "1", "--base"])
            .arg(fixture("qwen2-f32"))
            .arg("--thinking")
            .arg(fixture("thinking-qwen2-f32"))
            .arg("--sae")
            .arg(&sae)
            .arg("--vectors")
            .arg(&vectors)
            .arg("--out")
            .arg(&out)
            .args(["--max-new-tokens", "3", "--device", "cpu", "--quiet"])
            .output()
            .unwrap()
    };
    ok(run());
    ok(run()); // the same files: resumed
    let config = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
    };
    assert!(config()["hybrid"]["file_hashes"].is_string());
    // Either file retrained in place (another seed, same path): refused.
    let refused = || {
        let e = fails(run());
        assert!(
            e.contains("different configuration") && e.contains("file_hashes"),
            "{e}"
        );
    };
    let model = |name: &str| fixture(name).display().to_string();
    let retrain = |args: &[&str], path: &Path| {
        ok(bin().args(args).arg("--out").arg(path).output().unwrap());
    };
    let think = model("thinking-qwen2-f32");
    let sae_args = [
        "random-sae",
        "--model",
        &think,
        "--layer",
        "2",
        "--latents",
        "4",
    ];
    retrain(&[&sae_args[..], &["--seed", "9"]].concat(), &sae);
    refused();
    std::fs::copy(&a.sae, &sae).unwrap();
    ok(run()); // the SAE as it was: resumed
    let base = model("qwen2-f32");
    let vec_args = [
        "random-vectors",
        "--model",
        &base,
        "--layer",
        "1",
        "--count",
        "4",
    ];
    retrain(
        &[&vec_args[..], &["--norm", "12", "--seed", "9"]].concat(),
        &vectors,
    );
    refused();
    std::fs::copy(&a.vectors, &vectors).unwrap();
    // A configuration written before the files were hashed resumes on their paths, and is
    // then given the hashes.
    let mut old = config();
    old["hybrid"].as_object_mut().unwrap().remove("file_hashes");
    std::fs::write(out.join("config.json"), old.to_string()).unwrap();
    ok(run());
    assert!(config()["hybrid"]["file_hashes"].is_string());
    assert_eq!(lines_of(&out.join("results.jsonl")).len(), 1);
}

#[test]
fn a_refusal_shows_the_coefficients_as_written() {
    let out = tmp("coefficients");
    ok(eval(&out, &["--coefficients", "0.5,0.9", "--limit", "1"]));
    let e = fails(eval(&out, &["--coefficients", "0.5", "--limit", "1"]));
    assert!(
        e.contains("hybrid.coefficients: [0.5,0.9] there, [0.5] now"),
        "{e}"
    );
}

#[test]
fn a_checkpoint_replaced_in_place_is_another_run() {
    let dir = tmp("replaced");
    let (model, out) = (
        copy_fixture("qwen2-f32", &dir.join("base")),
        dir.join("out"),
    );
    let run = || eval_base(&model, &out);
    ok(run());
    let config = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
    };
    let recorded = config()["base"]["fingerprint"].clone();
    assert!(recorded.is_string(), "{}", config());
    assert!(config()["thinking"]["fingerprint"].is_string());
    // The last weight's last byte changed under the same path (fine-tuned in place): refused.
    let weights = model.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let mut changed = original.clone();
    *changed.last_mut().unwrap() ^= 1;
    std::fs::write(&weights, &changed).unwrap();
    let e = fails(run());
    assert!(
        e.contains("different configuration") && e.contains("base.fingerprint"),
        "{e}"
    );
    // So is another tokenizer.
    std::fs::write(&weights, &original).unwrap();
    let tokenizer = model.join("tokenizer.json");
    let text = std::fs::read_to_string(&tokenizer).unwrap();
    std::fs::write(&tokenizer, format!("{text}\n")).unwrap();
    assert!(fails(run()).contains("base.fingerprint"));
    std::fs::write(&tokenizer, text).unwrap();
    ok(run()); // the checkpoint as it was: resumed
               // A configuration written before models were fingerprinted resumes on their paths, and is
               // then given the fingerprints.
    let mut old = config();
    for side in ["base", "thinking"] {
        old[side].as_object_mut().unwrap().remove("fingerprint");
        // Written before plain prompts got special tokens: this tokenizer adds none.
        old[side].as_object_mut().unwrap().remove("added_ids");
    }
    std::fs::write(out.join("config.json"), old.to_string()).unwrap();
    ok(run());
    assert_eq!(config()["base"]["fingerprint"], recorded);
    assert_eq!(lines_of(&out.join("results.jsonl")).len(), 1);
}

/// `eval --modes base` of the first problem with `base` as the base model, two new tokens.
fn eval_base(base: &Path, out: &Path) -> Output {
    bin()
        .arg("eval")
        .arg("--dataset")
        .arg(&artifacts().data)
        .args(["--modes", "base", "--limit", "1", "--base"])
        .arg(base)
        .arg("--thinking")
        .arg(fixture("thinking-qwen2-f32"))
        .arg("--out")
        .arg(out)
        .args(["--max-new-tokens", "2", "--device", "cpu", "--quiet"])
        .output()
        .unwrap()
}

#[test]
fn plain_prompts_get_the_base_tokenizers_bos() {
    // A base model whose tokenizer prepends bos to plain text (as Llama 3's does), here
    // <|endoftext|> (306).
    let base = copy_fixture("qwen2-f32", &tmp("bos").join("base"));
    let path = base.join("tokenizer.json");
    let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tok["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [306],
                                             "tokens": ["<|endoftext|>"]}}
    });
    std::fs::write(&path, tok.to_string()).unwrap();
    let builder = |dir: &Path, plain: bool| {
        thinksteer::eval::run::PromptBuilder::load(&base, dir, plain, None).unwrap()
    };
    // The base model's plain prompt starts with bos, once; the thinking model's chat prompt is
    // the template's text alone.
    let p = builder(&fixture("thinking-qwen2-f32"), false)
        .hybrid("1+1?")
        .unwrap();
    assert_eq!(p.base[0], 306);
    assert_ne!(p.base[1], 306);
    let b = builder(&fixture("thinking-qwen2-f32"), false);
    let rendered = b.thinking_text("1+1?").unwrap();
    assert_eq!(p.thinking, b.think_tok.encode(&rendered).unwrap());
    // --thinking-plain: a plain prompt for the thinking model too, with its tokenizer's own
    // special tokens (this one's adds none).
    let p = builder(&base, true).hybrid("1+1?").unwrap();
    assert_eq!((p.base[0], p.thinking[0]), (306, 306));
    // `generate`: bos before a plain prompt, none added to a chat-rendered one.
    let first_id = |chat: bool| {
        let out = ok(bin()
            .arg("generate")
            .arg("--model")
            .arg(&base)
            .args([
                "--prompt",
                "hi",
                "--max-new-tokens",
                "1",
                "--json",
                "--device",
                "cpu",
            ])
            .args(if chat { &["--chat"][..] } else { &[][..] })
            .output()
            .unwrap());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["prompt_ids"][0].as_u64().unwrap()
    };
    assert_eq!(first_id(false), 306);
    assert_eq!(
        first_id(true),
        307,
        "the chat template's <|im_start|>, no bos added"
    );
    // `eval` records what each side's encoding adds, and refuses to continue a folder whose
    // base prompts were encoded before they got the bos.
    let out = tmp("bos-eval").join("out");
    let eval = || eval_base(&base, &out);
    ok(eval());
    let path = out.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(config["base"]["added_ids"], serde_json::json!([306]));
    assert_eq!(config["thinking"]["added_ids"], serde_json::json!([]));
    for key in ["added_ids", "fingerprint"] {
        config["base"].as_object_mut().unwrap().remove(key);
    }
    std::fs::write(&path, config.to_string()).unwrap();
    let e = fails(eval());
    assert!(
        e.contains("base prompts were encoded without special tokens") && e.contains("[306]"),
        "{e}"
    );
}

#[test]
fn a_folder_that_cannot_be_trusted_is_refused_before_generating() {
    // A judge that cannot run: refused on a sample, before any answer is generated.
    let out = tmp("judge-fails");
    let e = fails(eval(&out, &["--modes", "base", "--judge-cmd", "exit 3"]));
    assert!(
        e.contains("--judge-cmd, tried on a sample") && e.contains("exit"),
        "{e}"
    );
    assert!(read_lines_or_none(&out).is_none(), "nothing generated");
    // A judge time limit that is not a number of seconds: refused, not replaced by the default.
    let e = fails(
        eval_cmd(&out, &["--modes", "base", "--judge-cmd", "echo true"])
            .env("THINKSTEER_JUDGE_TIMEOUT", "abc")
            .output()
            .unwrap(),
    );
    assert!(
        e.starts_with("error: THINKSTEER_JUDGE_TIMEOUT: expected seconds above 0, found \"abc\""),
        "{e}"
    );

    // Results of another dataset file under the same index: refused.
    let out = tmp("other-questions");
    ok(eval(&out, &["--modes", "base", "--limit", "2"]));
    let path = out.join("results.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let q = first["question"].as_str().unwrap();
    std::fs::write(&path, text.replacen(q, "Another question?", 1)).unwrap();
    let e = fails(eval(&out, &["--modes", "base", "--limit", "3"]));
    assert!(
        e.contains("holds another question than the dataset's"),
        "{e}"
    );

    // Results without the configuration they were made with: refused; `report` still reads
    // them, but not an unreadable configuration.
    std::fs::write(&path, &text).unwrap();
    std::fs::remove_file(out.join("config.json")).unwrap();
    let e = fails(eval(&out, &["--modes", "base", "--limit", "3"]));
    assert!(e.contains("holds results but no config.json"), "{e}");
    let report = || bin().arg("report").arg("--out").arg(&out).output().unwrap();
    ok(report());
    std::fs::write(out.join("config.json"), "{bad").unwrap();
    assert!(fails(report()).contains("unreadable JSON"));

    // A preset whose thinking prompt is neither chat nor plain.
    let preset = tmp("preset").join("p.json");
    let mut p: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/presets/r1-distill-qwen-1.5b.json"
        ))
        .unwrap(),
    )
    .unwrap();
    p["thinking_prompt"] = "weird".into();
    std::fs::write(&preset, p.to_string()).unwrap();
    let e = fails(eval(&tmp("weird"), &["--preset", preset.to_str().unwrap()]));
    assert!(
        e.contains("thinking_prompt") && e.contains("\"weird\""),
        "{e}"
    );
}

/// The result lines of a folder, None when it has no results file.
fn read_lines_or_none(out: &Path) -> Option<Vec<Value>> {
    let path = out.join("results.jsonl");
    let lines = path.exists().then(|| lines_of(&path))?;
    (!lines.is_empty()).then_some(lines)
}

#[test]
fn a_prompt_past_the_context_names_its_dataset_row() {
    // Row 2 of three is longer than the fixtures' 512-token context; --offset 1 makes it the
    // second problem of the run, but the error names row 2.
    let dir = tmp("long-row");
    let data = dir.join("three.jsonl");
    let rows: String = ["1+1?", "2+2?", &"a ".repeat(700)]
        .iter()
        .map(|q| serde_json::json!({"question": q, "answer": "2"}).to_string() + "\n")
        .collect();
    std::fs::write(&data, rows).unwrap();
    for mode in ["base", "hybrid"] {
        let a = artifacts();
        let out = bin()
            .arg("eval")
            .arg("--dataset")
            .arg(&data)
            .args(["--modes", mode, "--offset", "1", "--base"])
            .arg(fixture("qwen2-f32"))
            .arg("--thinking")
            .arg(fixture("thinking-qwen2-f32"))
            .arg("--sae")
            .arg(&a.sae)
            .arg("--vectors")
            .arg(&a.vectors)
            .arg("--out")
            .arg(dir.join(mode))
            .args(["--max-new-tokens", "2", "--device", "cpu", "--quiet"])
            .output()
            .unwrap();
        let e = fails(out);
        assert!(e.contains("problem 2: the base prompt has"), "{mode}: {e}");
        assert!(e.contains("expected fewer than the"), "{mode}: {e}");
    }
}

/// Bad input found in any mode's checkpoint, artifacts or prompts is refused before the folder
/// is written (no config.json to block the corrected command), and before the first mode runs;
/// a second eval on a folder and shard that one is writing is refused.
#[test]
fn bad_input_is_refused_before_the_folder_is_written() {
    let dir = tmp("before-writing");
    let a = artifacts();
    // `eval` with these thinking model and vectors.
    let run = |out: &Path, thinking: &Path, vectors: &Path, extra: &[&str]| {
        bin()
            .arg("eval")
            .arg("--dataset")
            .arg(&a.data)
            .arg("--base")
            .arg(fixture("qwen2-f32"))
            .arg("--thinking")
            .arg(thinking)
            .arg("--sae")
            .arg(&a.sae)
            .arg("--vectors")
            .arg(vectors)
            .arg("--out")
            .arg(out)
            .args(["--max-new-tokens", "4", "--device", "cpu", "--quiet"])
            .args(extra)
            .output()
            .unwrap()
    };
    let thinking = fixture("thinking-qwen2-f32");
    // Steering vectors for 5 categories, the SAE has 4.
    let five = dir.join("five.safetensors");
    ok(bin()
        .args(["random-vectors", "--model"])
        .arg(fixture("qwen2-f32"))
        .args(["--layer", "1", "--count", "5", "--norm", "12", "--out"])
        .arg(&five)
        .output()
        .unwrap());
    let out = dir.join("k");
    let hybrid = ["--modes", "hybrid", "--limit", "1"];
    let e = fails(run(&out, &thinking, &five, &hybrid));
    assert!(e.contains("5 category vectors"), "{e}");
    assert!(!out.join("config.json").exists(), "config.json written");
    ok(run(&out, &thinking, &a.vectors, &hybrid));

    // A thinking model whose config disagrees with its weights: found before base mode runs.
    let broken = copy_fixture("thinking-qwen2-f32", &dir.join("broken"));
    let cfg = broken.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["intermediate_size"] = (c["intermediate_size"].as_u64().unwrap() + 8).into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let out = dir.join("broken-out");
    let e = fails(run(
        &out,
        &broken,
        &a.vectors,
        &["--modes", "base,thinking"],
    ));
    assert!(e.contains("gate_proj.weight\" has shape"), "{e}");
    assert!(read_lines_or_none(&out).is_none(), "base answers generated");
    assert!(!out.join("config.json").exists(), "config.json written");

    // Another eval holding the folder's results file; another shard is not held.
    let out = dir.join("busy");
    std::fs::create_dir_all(&out).unwrap();
    let _held = thinksteer::files::lock_output(&out.join("results.jsonl"), "--out").unwrap();
    let base = ["--modes", "base", "--limit", "1"];
    let e = fails(run(&out, &thinking, &a.vectors, &base));
    assert!(e.contains("expected no other run writing it"), "{e}");
    ok(run(
        &out,
        &thinking,
        &a.vectors,
        &[&base[..], &["--shard", "0/2"]].concat(),
    ));
}
