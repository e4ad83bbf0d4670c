//! Taxonomy discovery end to end on the tiny fixtures through the CLI: traces → activations →
//! train-sae → annotate → train-vectors → `hybrid` accepting the outputs; sentence means
//! recomputed from `logits --capture-layer`; resume of traces and activations; bad input.

mod common;

use common::fixture;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;
use thinksteer::taxonomy::activations::{read_index, Acts};
use thinksteer::taxonomy::traces::{read_traces, Span, Trace};
use thinksteer::tokenizer::Tokenizer;

const THINKING: &str = "thinking-qwen2-f32";
const BASE: &str = "qwen2-f32";
const LAYER: usize = 2;

/// A fresh temporary folder for one test.
fn tmp(case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("thinksteer-taxo-{}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Runs the CLI: (exit code, stdout, stderr).
fn run(args: &[String]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_thinksteer"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let (code, out, err) = run(&args);
    assert_eq!(code, Some(0), "args {args:?}: stderr {err}");
    out
}

/// Exit code 2, one line on stderr containing every needle, no panic.
fn fails(args: &[&str], needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_thinksteer"))
        .args(args)
        .output()
        .unwrap();
    common::one_line_error(&out, &format!("args {args:?}"), needles);
}

fn questions(dir: &Path) -> PathBuf {
    let q = dir.join("questions.jsonl");
    std::fs::write(
        &q,
        "{\"question\": \"What is 2+3?\"}\n{\"question\": \"Name three colours of the sky please.\"}\n{\"question\": \"How many legs do two cats have?\"}\n",
    )
    .unwrap();
    q
}

fn traces(dir: &Path, out: &Path, extra: &[&str]) -> String {
    let q = questions(dir);
    let (model, q, out) = (s(&fixture(THINKING)), s(&q), s(out));
    let mut args = vec!["traces", "--model", &model, "--questions", &q];
    args.extend(["--out", &out, "--max-new-tokens", "60", "--batch", "2"]);
    args.extend(extra);
    ok(&args)
}

fn activations(traces: &Path, out: &Path) -> String {
    ok(&[
        "activations",
        "--model",
        &s(&fixture(THINKING)),
        "--traces",
        &s(traces),
        "--layer",
        &LAYER.to_string(),
        "--out",
        &s(out),
    ])
}

#[test]
fn pipeline_outputs_drive_the_hybrid_loop() {
    let dir = tmp("pipeline");
    let tr = dir.join("traces.jsonl");
    traces(&dir, &tr, &[]);
    let ts = read_traces(&tr).unwrap();
    assert_eq!(
        ts.iter().map(|t| t.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for t in &ts {
        assert!(t.prompt.ends_with("<think>\n"), "{:?}", t.prompt);
        // The prompt opened the span: without `</think>` the whole text is thinking.
        let want = match t.text.find("</think>") {
            Some(e) => Span { start: 0, end: e },
            None => Span {
                start: 0,
                end: t.text.len(),
            },
        };
        assert_eq!(t.thinking, Some(want), "trace {}", t.index);
    }

    let acts = dir.join("acts.safetensors");
    let out = activations(&tr, &acts);
    assert!(out.contains("0 traces without a thinking span"), "{out}");
    let a = Acts::load(&acts).unwrap();
    let index = read_index(&dir.join("acts.index.jsonl")).unwrap();
    assert_eq!((a.n, a.d, a.layer), (index.len(), 64, LAYER));
    assert!(
        a.n >= 3,
        "expected a sentence per trace at least, found {}",
        a.n
    );

    let sae_dir = dir.join("sae");
    ok(&[
        "train-sae",
        "--acts",
        &s(&acts),
        "--latents",
        "3,4",
        "--k",
        "2",
        "--out",
        &s(&sae_dir),
        "--max-epochs",
        "5",
        "--seed",
        "1",
    ]);
    let fvu = std::fs::read_to_string(sae_dir.join("fvu.md")).unwrap();
    assert!(
        fvu.contains("| 3 |") && fvu.contains("| 4 |") && fvu.contains("Rule: the smallest K"),
        "{fvu}"
    );
    let sae_path = sae_dir.join("sae-3.safetensors");
    let sae = thinksteer::sae::Sae::load(&sae_path).unwrap();
    assert_eq!((sae.latents, sae.k, sae.layer), (3, 2, LAYER));
    assert_eq!(sae.activation_mean.as_deref(), Some(a.mean.as_slice()));
    // Deterministic for a seed: a second run writes the same bytes.
    let again = dir.join("sae-again");
    ok(&[
        "train-sae",
        "--acts",
        &s(&acts),
        "--latents",
        "3",
        "--k",
        "2",
        "--out",
        &s(&again),
        "--max-epochs",
        "5",
        "--seed",
        "1",
    ]);
    assert_eq!(
        std::fs::read(&sae_path).unwrap(),
        std::fs::read(again.join("sae-3.safetensors")).unwrap()
    );

    let ann = dir.join("ann");
    let titles = dir.join("titles.txt");
    std::fs::write(&titles, "adding up\nchecking\nwondering\n").unwrap();
    ok(&[
        "annotate",
        "--sae",
        &s(&sae_path),
        "--acts",
        &s(&acts),
        "--index",
        &s(&dir.join("acts.index.jsonl")),
        "--out",
        &s(&ann),
        "--titles",
        &s(&titles),
    ]);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(ann.join("annotations.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), a.n);
    for (i, r) in rows.iter().enumerate() {
        let c = r["category"].as_u64().unwrap() as usize;
        assert_eq!(c, sae.category_of_normalised(a.row(i)), "row {i}");
        assert_eq!(r["sentence"], index[i].sentence.as_str());
    }
    let report = std::fs::read_to_string(ann.join("report.md")).unwrap();
    let svg = std::fs::read_to_string(ann.join("categories.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && report.contains("categories.svg"),
        "category chart missing"
    );
    assert!(
        report.contains("## Transitions") && report.contains("1: checking"),
        "{report}"
    );
    // The SAE named by the titles: the same weights, the titles in its metadata.
    let named = thinksteer::sae::Sae::load(ann.join("sae.safetensors")).unwrap();
    let titled = thinksteer::sae::Sae {
        titles: Some(vec![
            "adding up".into(),
            "checking".into(),
            "wondering".into(),
        ]),
        ..sae.clone()
    };
    assert_eq!(named, titled);

    let vec_path = dir.join("vectors.safetensors");
    ok(&[
        "train-vectors",
        "--base",
        &s(&fixture(BASE)),
        "--traces",
        &s(&tr),
        "--annotations",
        &s(&ann.join("annotations.jsonl")),
        "--layer",
        "1",
        "--method",
        "mean-diff",
        "--out",
        &s(&vec_path),
    ]);
    let set = thinksteer::steering::SteeringSet::load(&vec_path).unwrap();
    assert_eq!((set.count, set.d, set.layer), (3, 64, 1));
    assert!(set.bias.iter().any(|&x| x != 0.0));
    // Category means minus the mean of all sentences, weighted by the category sizes, sum to
    // zero: Σ_c n_c·V[c] = Σ sentences − N·mean = 0. Each V[c] is an f32 rounding of an f64
    // difference (2^-24 relative), so the sum's error is below 1e-6 of Σ n_c·|V[c]|; 1e-5 of it
    // leaves room and still catches a wrong mean (an O(1) fraction of that sum).
    let mut n_c = [0f64; 3];
    rows.iter()
        .for_each(|r| n_c[r["category"].as_u64().unwrap() as usize] += 1.0);
    for i in 0..64 {
        let (sum, mag) = (0..3).fold((0f64, 0f64), |(s, m), c| {
            let v = set.vectors[c * 64 + i] as f64;
            (s + n_c[c] * v, m + n_c[c] * v.abs())
        });
        assert!(
            sum.abs() <= 1e-5 * mag + 1e-9,
            "dim {i}: Σ n_c·V[c] = {sum} (scale {mag})"
        );
    }

    let (base, think, sae_s, vec_s) = (
        s(&fixture(BASE)),
        s(&fixture(THINKING)),
        s(&sae_path),
        s(&vec_path),
    );
    let hybrid = |input: &[&str]| {
        let mut args = vec![
            "hybrid",
            "--base",
            &base,
            "--thinking",
            &think,
            "--sae",
            &sae_s,
            "--vectors",
            &vec_s,
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--json",
        ];
        args.extend_from_slice(input);
        ok(&args)
    };
    let out = hybrid(&["--question", "What is 1+1?"]);
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        j["steps"].as_array().unwrap().len(),
        j["ids"].as_array().unwrap().len()
    );
    // A questions file, the first two of three, decoded together: a line each as it finishes,
    // with its row and question; the first is the single question's run.
    let qs = dir.join("hybrid-questions.jsonl");
    std::fs::write(
        &qs,
        "{\"question\":\"What is 1+1?\"}\n{\"question\":\"Name a prime.\"}\n{\"question\":\"unused\"}\n",
    )
    .unwrap();
    let out = hybrid(&["--questions", &s(&qs), "--limit", "2", "--batch", "2"]);
    let mut lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.sort_by_key(|l| l["index"].as_u64());
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[1]["question"], "Name a prime.");
    assert_eq!(
        (&lines[0]["question"], &lines[0]["ids"], &lines[0]["steps"]),
        (&serde_json::json!("What is 1+1?"), &j["ids"], &j["steps"])
    );

    // Gradient-trained vectors on the same traces and annotations (two epochs).
    let (base, trs, anns) = (s(&fixture(BASE)), s(&tr), s(&ann.join("annotations.jsonl")));
    let optimise = |out: &Path, extra: &[&str]| -> Vec<String> {
        let out = s(out);
        let mut args = vec![
            "train-vectors",
            "--base",
            &base,
            "--traces",
            &trs,
            "--annotations",
            &anns,
            "--layer",
            "1",
            "--method",
            "optimise",
            "--epochs",
            "2",
            "--out",
            &out,
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect()
    };
    let opt_path = dir.join("optimised.safetensors");
    let args = optimise(&opt_path, &[]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let opt = thinksteer::steering::SteeringSet::load(&opt_path).unwrap();
    assert_eq!(opt.layer, 1);
    assert!(
        opt.bias.iter().any(|x| *x != 0.0),
        "the bias was not trained"
    );
    // --resume with no checkpoint yet starts the run (one command starts and restarts it),
    // and gives the vectors of a run without --resume.
    let fresh = s(&dir.join("fresh.ckpt.json"));
    let resumed = dir.join("resumed.safetensors");
    let args = optimise(&resumed, &["--checkpoint", &fresh, "--resume"]);
    let (code, _, err) = run(&args);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("no checkpoint") && err.contains("starting"),
        "{err}"
    );
    let again = thinksteer::steering::SteeringSet::load(&resumed).unwrap();
    assert_eq!((again.bias, again.vectors), (opt.bias, opt.vectors));
}

/// Small helper trait so the test reads as the spec: the category of an already centred,
/// unit-norm row is the argmax of W_encᵀ(x − b_dec) + b_enc, computed here independently.
trait Categorise {
    fn category_of_normalised(&self, x: &[f32]) -> usize;
}

impl Categorise for thinksteer::sae::Sae {
    fn category_of_normalised(&self, x: &[f32]) -> usize {
        let z: Vec<f64> = (0..self.latents)
            .map(|j| {
                self.b_enc[j] as f64
                    + (0..self.d)
                        .map(|i| {
                            self.w_enc[i * self.latents + j] as f64 * (x[i] - self.b_dec[i]) as f64
                        })
                        .sum::<f64>()
            })
            .collect();
        (0..z.len()).fold(0, |b, j| if z[j] > z[b] { j } else { b })
    }
}

#[test]
fn sentence_means_match_logits_capture() {
    let dir = tmp("means");
    let tr = dir.join("traces.jsonl");
    traces(&dir, &tr, &[]);
    let acts = dir.join("acts.safetensors");
    activations(&tr, &acts);
    let a = Acts::load(&acts).unwrap();
    let index = read_index(&dir.join("acts.index.jsonl")).unwrap();
    let ts = read_traces(&tr).unwrap();
    let tok = Tokenizer::from_dir(&fixture(THINKING)).unwrap().unwrap();
    let d = a.d;
    assert!(
        a.n >= 2,
        "need two sentences for a non-trivial mean, found {}",
        a.n
    );

    // Raw sentence means from the logits command's capture of block LAYER, one run per trace.
    let mut raw = vec![0f64; a.n * d];
    for t in &ts {
        let ids = tok.encode(&format!("{}{}", t.prompt, t.text)).unwrap();
        let ids_arg: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let out = dir.join(format!("logits-{}.safetensors", t.index));
        ok(&[
            "logits",
            "--model",
            &s(&fixture(THINKING)),
            "--prompt-ids",
            &ids_arg.join(","),
            "--capture-layer",
            &LAYER.to_string(),
            "--out",
            &s(&out),
            "--device",
            "cpu",
        ]);
        let bytes = std::fs::read(&out).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let h: Vec<f32> =
            bytemuck::pod_collect_to_vec(st.tensor(&format!("resid.{LAYER}")).unwrap().data());
        assert_eq!(h.len(), ids.len() * d);
        for (r, row) in index.iter().enumerate().filter(|(_, r)| r.trace == t.index) {
            let (s0, s1) = row.tokens;
            assert!(
                s0 < s1 && s1 <= ids.len(),
                "span {s0}..{s1} of {} tokens",
                ids.len()
            );
            // The span holds the sentence: its tokens decode to text containing it.
            let text = tok.decode(&ids[s0..s1]).unwrap();
            assert!(
                text.contains(row.sentence.trim()),
                "{text:?} vs {:?}",
                row.sentence
            );
            for p in s0..s1 {
                for i in 0..d {
                    raw[r * d + i] += h[p * d + i] as f64 / (s1 - s0) as f64;
                }
            }
        }
    }
    let mean: Vec<f64> = (0..d)
        .map(|i| (0..a.n).map(|r| raw[r * d + i]).sum::<f64>() / a.n as f64)
        .collect();
    // Both sides sum the same f32 residuals in f64 and round once; the truncated forward and
    // the full one run the same blocks, so only the final f32 roundings (2^-24 relative) and the
    // normalisation's f32 sum of squares (≈ D·2^-24) can differ: 1e-5 absolute + relative is
    // well above both and far below any real mismatch (values are O(1)).
    let tol = |x: f64| 1e-5 + 1e-5 * x.abs();
    let mut worst = (0.0f64, 0usize);
    for (i, (&got, &want)) in a.mean.iter().zip(&mean).enumerate() {
        let e = (got as f64 - want).abs() / tol(want);
        if e > worst.0 {
            worst = (e, i);
        }
    }
    assert!(
        worst.0 <= 1.0,
        "activation_mean[{}] = {} vs recomputed {}",
        worst.1,
        a.mean[worst.1],
        mean[worst.1]
    );
    for r in 0..a.n {
        let c: Vec<f64> = (0..d).map(|i| raw[r * d + i] - mean[i]).collect();
        let norm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (i, &ci) in c.iter().enumerate() {
            let want = if norm > 0.0 { ci / norm } else { 0.0 };
            let got = a.activations[r * d + i] as f64;
            assert!(
                (got - want).abs() <= 1e-4,
                "row {r} dim {i}: {got} vs {want}"
            ); // unit vectors: 1e-4 covers f32 centring of O(1) values
        }
    }
}

#[test]
fn traces_resume_without_duplicates() {
    let dir = tmp("resume");
    let tr = dir.join("traces.jsonl");
    let out = traces(&dir, &tr, &["--limit", "2"]);
    assert!(out.contains("wrote 2 traces, skipped 0"), "{out}");
    let first = std::fs::read_to_string(&tr).unwrap();
    // A run killed mid-write leaves a partial line: it is cut, not kept or duplicated.
    std::fs::write(&tr, format!("{first}{{\"index\": 2, \"quest")).unwrap();
    let out = traces(&dir, &tr, &[]);
    assert!(out.contains("wrote 1 traces, skipped 2"), "{out}");
    let out = traces(&dir, &tr, &[]);
    assert!(out.contains("wrote 0 traces, skipped 3"), "{out}");
    let all = std::fs::read_to_string(&tr).unwrap();
    assert!(
        all.starts_with(&first),
        "earlier lines must stay as they were"
    );
    let idx: Vec<usize> = read_traces(&tr).unwrap().iter().map(|t| t.index).collect();
    assert_eq!(idx, vec![0, 1, 2]);
    assert_eq!(all.lines().count(), 3);

    // Other settings, or another questions file, into the same --out: refused, nothing appended.
    let (model, tr_s) = (s(&fixture(THINKING)), s(&tr));
    let q = s(&questions(&dir));
    let args = |q: &str, n: &str| -> Vec<String> {
        [
            "traces",
            "--model",
            &model,
            "--questions",
            q,
            "--out",
            &tr_s,
            "--max-new-tokens",
            n,
        ]
        .map(String::from)
        .to_vec()
    };
    let longer = args(&q, "61");
    fails(
        &longer.iter().map(String::as_str).collect::<Vec<_>>(),
        &["--max-new-tokens 60, now", "with 61", "use another --out"],
    );
    let other = dir.join("other.jsonl");
    std::fs::write(&other, "{\"question\": \"What is 9+9?\"}\n").unwrap();
    let moved = args(&s(&other), "60");
    fails(
        &moved.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            "trace 0 answers another question than row 0",
            "use another --out",
        ],
    );
    assert_eq!(std::fs::read_to_string(&tr).unwrap(), all);

    // --whole-answer: a model without <think> spans (the base fixture's template opens none)
    // gets its whole answer as each trace's span, so the taxonomy chain can read it.
    let plain = dir.join("plain/traces.jsonl");
    let (base, plain_s) = (s(&fixture(BASE)), s(&plain));
    let out = ok(&[
        "traces",
        "--model",
        &base,
        "--questions",
        &q,
        "--out",
        &plain_s,
        "--limit",
        "2",
        "--max-new-tokens",
        "12",
        "--whole-answer",
    ]);
    assert!(
        out.contains("0 traces with a <think> span from the model, 2 given their whole answer"),
        "{out}"
    );
    for t in read_traces(&plain).unwrap() {
        assert_eq!(
            t.thinking,
            Some(Span {
                start: 0,
                end: t.text.len()
            }),
            "{t:?}"
        );
    }

    // A run that failed before its first trace left an empty file and its settings: a retry
    // with other settings is not refused.
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    std::fs::write(
        thinksteer::taxonomy::traces::settings_path(&empty),
        "{\"model\": \"elsewhere\", \"max_new_tokens\": 999}",
    )
    .unwrap();
    let out = traces(&dir, &empty, &["--limit", "1"]);
    assert!(out.contains("wrote 1 traces, skipped 0"), "{out}");

    // A new --out in a folder that does not exist yet is made.
    let deep = dir.join("new/sub/traces.jsonl");
    let out = traces(&dir, &deep, &["--limit", "1"]);
    assert!(out.contains("wrote 1 traces"), "{out}");
}

fn hand_trace(index: usize, prompt: &str, text: &str, thinking: Option<Span>) -> String {
    let t = Trace {
        index,
        question: "q".into(),
        prompt: prompt.into(),
        text: text.into(),
        thinking,
        unknown_ids: 0,
    };
    serde_json::to_string(&t).unwrap()
}

#[test]
fn traces_without_thinking_are_counted() {
    let dir = tmp("nothink");
    let tr = dir.join("traces.jsonl");
    let text = "First we add the two numbers. Then we check the sum once more.\nSo it is five.";
    let lines = [
        hand_trace(
            0,
            "<|im_start|>assistant\n<think>\n",
            text,
            Some(Span {
                start: 0,
                end: text.len(),
            }),
        ),
        hand_trace(1, "<|im_start|>assistant\n", "The answer is five.", None),
        hand_trace(
            2,
            "<|im_start|>assistant\n<think>\n",
            "ok",
            Some(Span { start: 0, end: 2 }),
        ),
    ];
    std::fs::write(&tr, lines.join("\n") + "\n").unwrap();
    let acts = dir.join("acts.safetensors");
    let out = activations(&tr, &acts);
    assert!(out.contains("3 sentences from 3 traces"), "{out}");
    assert!(out.contains("1 traces without a thinking span: 1"), "{out}");
    assert!(out.contains("1 with no sentence of 3+ words: 2"), "{out}");
    let index = read_index(&dir.join("acts.index.jsonl")).unwrap();
    let sents: Vec<&str> = index.iter().map(|r| r.sentence.as_str()).collect();
    assert_eq!(
        sents,
        vec![
            "First we add the two numbers.",
            "Then we check the sum once more.",
            "So it is five."
        ]
    );
}

/// Six hand traces: sentences, none (no span), sentences, sentences, none (too short),
/// sentences. `changed` rewrites trace 2's text.
fn resume_traces(path: &Path, changed: bool) {
    let think = "<|im_start|>assistant\n<think>\n";
    let span = |t: &str| {
        Some(Span {
            start: 0,
            end: t.len(),
        })
    };
    let two = if changed {
        "We multiply the two prices first. Then we round the total down."
    } else {
        "Two cats have four legs each. So eight legs in all."
    };
    let texts = [
        "First we add the two numbers. Then we check the sum once more.",
        "",
        two,
        "The sky is blue at noon. It turns red and orange at dusk.",
        "ok",
        "Let me try another way here. Subtracting gives the same answer again.",
    ];
    let lines: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| match i {
            1 => hand_trace(i, "<|im_start|>assistant\n", "The answer is five.", None),
            _ => hand_trace(i, think, t, span(t)),
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// `write_activations` on the fixture's CPU forward, counting the forwards and failing the
/// `kill_at`-th (1-based) as a killed process would stop there.
fn acts_run(traces: &Path, out: &Path, kill_at: Option<usize>) -> (Result<(), String>, usize) {
    acts_run_of(traces, out, kill_at, None)
}

/// `acts_run` with the checkpoint `fingerprint` recorded.
fn acts_run_of(
    traces: &Path,
    out: &Path,
    kill_at: Option<usize>,
    fingerprint: Option<&str>,
) -> (Result<(), String>, usize) {
    use thinksteer::taxonomy::activations::{write_activations, ActsRun};
    let model = fixture(THINKING);
    let tok = Tokenizer::from_dir(&model).unwrap().unwrap();
    let settings = ActsRun {
        model: std::fs::canonicalize(&model).unwrap().display().to_string(),
        layer: LAYER,
        d: thinksteer::config::Config::from_file(&model.join("config.json"))
            .unwrap()
            .hidden_size,
        device: "cpu".into(),
        fingerprint: fingerprint.map(String::from),
    };
    let mut forward = thinksteer::taxonomy::spans::block_runner(&model, LAYER, false).unwrap();
    let mut calls = 0;
    let mut run = |ids: &[u32]| {
        calls += 1;
        if Some(calls) == kill_at {
            return Err(thinksteer::error::Error::Input("killed".into()));
        }
        forward(ids)
    };
    let r = write_activations(&tok, traces, &settings, out, &mut run);
    (r.map(|_| ()).map_err(|e| e.to_string()), calls)
}

#[test]
fn activations_resume_after_a_kill() {
    let dir = tmp("acts-resume");
    let (tr, changed) = (dir.join("traces.jsonl"), dir.join("changed.jsonl"));
    resume_traces(&tr, false);
    resume_traces(&changed, true);
    let (full, full_changed) = (dir.join("full.safetensors"), dir.join("full2.safetensors"));
    activations(&tr, &full);
    activations(&changed, &full_changed);
    let same = |a: &Path, b: &Path| {
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        let (ia, ib) = (
            a.with_extension("index.jsonl"),
            b.with_extension("index.jsonl"),
        );
        assert_eq!(std::fs::read(ia).unwrap(), std::fs::read(ib).unwrap());
    };

    // Killed at the third forward (trace 3): traces 0, 1 and 2 are kept, no output yet.
    let out = dir.join("acts.safetensors");
    let (partial, progress) = (
        dir.join("acts.safetensors.partial.f32"),
        dir.join("acts.safetensors.progress.jsonl"),
    );
    let (r, _) = acts_run(&tr, &out, Some(3));
    assert!(r.unwrap_err().contains("killed"));
    assert!(!out.exists() && partial.exists() && progress.exists());
    // Another layer may not mix its rows in.
    let (model, trs, outs) = (s(&fixture(THINKING)), s(&tr), s(&out));
    let args = [
        "activations",
        "--model",
        &model,
        "--traces",
        &trs,
        "--layer",
        "1",
    ];
    fails(
        &[&args[..], &["--out", &outs]].concat(),
        &[
            "at layer 2",
            "at layer 1",
            "expected the same settings to resume",
        ],
    );
    // A kill in the middle of a write: rows of an unfinished trace, half a line.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&partial)
        .unwrap();
    std::io::Write::write_all(&mut f, &[7u8; 37]).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&progress)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"fingerprint\": \"00").unwrap();
    // Resumed and killed again after trace 3: its line must not be glued to the torn one.
    let (r, _) = acts_run(&tr, &out, Some(2));
    assert!(r.unwrap_err().contains("killed"));
    // Files named as before they took the output's whole name are taken over.
    let older = (
        dir.join("acts.partial.f32"),
        dir.join("acts.progress.jsonl"),
    );
    std::fs::rename(&partial, &older.0).unwrap();
    std::fs::rename(&progress, &older.1).unwrap();
    // Resumed: only trace 5 runs, and the files equal the uninterrupted run's.
    let (r, calls) = acts_run(&tr, &out, None);
    r.unwrap();
    assert_eq!(calls, 1, "forwards after the last resume");
    same(&out, &full);
    assert!(
        !partial.exists() && !progress.exists() && !older.0.exists() && !older.1.exists(),
        "partial files left"
    );

    // A trace changed after the kill is run again; the others are kept.
    let (r, _) = acts_run(&tr, &out, Some(3));
    assert!(r.is_err());
    let (r, calls) = acts_run(&changed, &out, None);
    r.unwrap();
    assert_eq!(calls, 3, "forwards: the changed trace 2, then 3 and 5");
    same(&out, &full_changed);
    // The CLI says what it kept.
    let (r, _) = acts_run(&tr, &out, Some(2));
    assert!(r.is_err());
    let said = activations(&tr, &out);
    assert!(
        said.contains("2 traces' means were kept from a killed run"),
        "{said}"
    );
    same(&out, &full);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tmp("bad");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let acts = dir.join("acts.safetensors");
    fails(
        &[
            "activations",
            "--model",
            &s(&fixture(THINKING)),
            "--traces",
            &s(&empty),
            "--layer",
            "1",
            "--out",
            &s(&acts),
        ],
        &["expected at least one trace", "empty"],
    );

    // An SAE of width 64 against activations of width 32.
    let sae = dir.join("sae.safetensors");
    let mut sae_v = thinksteer::sae::Sae::random(64, 3, 1, 2, 0, "m");
    sae_v.activation_mean = Some(vec![0.0; 64]);
    sae_v.save(&sae).unwrap();
    let narrow = Acts {
        activations: vec![0.5; 4 * 32],
        mean: vec![0.0; 32],
        n: 4,
        d: 32,
        layer: 1,
        model: "m".into(),
    };
    narrow.save(&acts).unwrap();
    let index = dir.join("acts.index.jsonl");
    let row = "{\"trace\":0,\"sentence\":\"a b c\",\"start\":0,\"end\":5,\"tokens\":[0,1]}\n";
    std::fs::write(&index, row.repeat(4)).unwrap();
    fails(
        &[
            "annotate",
            "--sae",
            &s(&sae),
            "--acts",
            &s(&acts),
            "--index",
            &s(&index),
            "--out",
            &s(&dir.join("ann")),
        ],
        &["width D = 32", "expected the SAE's width 64"],
    );

    // Not a safetensors file, and one without `activation_mean`.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a tensor file").unwrap();
    fails(
        &[
            "train-sae",
            "--acts",
            &s(&junk),
            "--latents",
            "3",
            "--out",
            &s(&dir.join("o")),
        ],
        &["expected a safetensors file"],
    );
    let no_mean = dir.join("nomean.safetensors");
    sae_v.save(&no_mean).unwrap();
    fails(
        &[
            "train-sae",
            "--acts",
            &s(&no_mean),
            "--latents",
            "3",
            "--out",
            &s(&dir.join("o")),
        ],
        &["missing tensor `activations`"],
    );
}

#[test]
fn block_output_through_a_decoder_in_chunks_equals_the_direct_forward() {
    // The GPU path of `activations` runs a trace through a Decoder in calls of at most 512
    // tokens, capturing hook point layer + 1 in each; here the same function drives the CPU
    // engine in chunks of 7 and must reproduce the direct (blocks 0..=layer) forward.
    use std::sync::Arc;
    use thinksteer::engine::CpuEngine;
    use thinksteer::model::Model;
    use thinksteer::taxonomy::spans::{block_output, block_output_on};
    let m = Arc::new(Model::load(&fixture(THINKING)).unwrap());
    let v = m.config.vocab_size as u32;
    let ids: Vec<u32> = (0..20u32).map(|i| (i * 37 + 5) % v).collect();
    for layer in [0, LAYER] {
        let want = block_output(&m, &ids, layer).unwrap();
        let mut e = CpuEngine::new(m.clone(), 1, 64);
        let got = block_output_on(&mut e, &ids, layer, 7).unwrap();
        assert_eq!(got.len(), want.len());
        // Same arithmetic in the same order per row: only chunking differs, which the cache
        // hides; allow f32 noise at the scale of the activations anyway.
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(
            worst <= 1e-5 * scale.max(1.0),
            "layer {layer}: max |chunked − direct| = {worst} at scale {scale}"
        );
    }
    // Too long for the engine's context: a clear error, not a panic.
    let mut small = CpuEngine::new(m.clone(), 1, 8);
    let e = block_output_on(&mut small, &ids, 0, 7).unwrap_err();
    assert!(e.to_string().contains("context of 8"), "{e}");
}

/// Two hand-written traces with their thinking sentences annotated (categories 0 and 1 of
/// K = 2): the smallest input `train-vectors --method optimise` takes.
fn optimise_data(dir: &Path) -> (PathBuf, PathBuf) {
    let texts = [
        "We add two and three first. That gives five as the sum.\n</think>\n5",
        "Each cat has four legs here. So two cats have eight legs.\n</think>\n8",
    ];
    let (mut traces, mut ann) = (String::new(), String::new());
    for (i, text) in texts.iter().enumerate() {
        let end = text.find("</think>").unwrap();
        let span = Span { start: 0, end };
        traces += &hand_trace(i, &format!("Question {i}?\n<think>\n"), text, Some(span));
        traces += "\n";
        let mut start = 0;
        for (k, piece) in text[..end].split_inclusive(". ").enumerate() {
            let sentence = piece.trim_end();
            let a = serde_json::json!({
                "trace": i, "sentence": sentence, "start": start, "end": start + sentence.len(),
                "tokens": [0, 0], "category": k % 2, "activation": 1.0, "latents": 2,
            });
            ann += &format!("{a}\n");
            start += piece.len();
        }
    }
    let (tp, ap) = (dir.join("traces.jsonl"), dir.join("annotations.jsonl"));
    std::fs::write(&tp, traces).unwrap();
    std::fs::write(&ap, ann).unwrap();
    (tp, ap)
}

#[test]
fn a_cpu_checkpoint_does_not_resume_on_the_gpu() {
    // CPU and GPU training differ by the bf16 rounding of the GPU's frozen prefixes, so a
    // checkpoint records its device and a run resumes only where it started. The refusal
    // comes before any GPU is touched, so this runs anywhere.
    use thinksteer::taxonomy::optimise::{optimise, OptimiseSettings};
    use thinksteer::taxonomy::vectors::BasePrefix;
    let dir = tmp("opt-device");
    let (tp, ap) = optimise_data(&dir);
    let ckpt = dir.join("ckpt.json");
    let cpu = OptimiseSettings {
        layer: 1,
        epochs: 2,
        batch: 2,
        lr: 0.05,
        stop_after: Some(1),
        ..Default::default()
    };
    let base = fixture(BASE);
    let go = |s: &OptimiseSettings, resume: bool| {
        optimise(&base, &tp, &ap, BasePrefix::SameAsTrace, s, &ckpt, resume)
    };
    let (rep, _) = go(&cpu, false).unwrap();
    assert!(rep.set.is_none(), "stopped after one epoch");
    let gpu = OptimiseSettings {
        cuda: true,
        ..cpu.clone()
    };
    let e = go(&gpu, true)
        .err()
        .expect("a CPU checkpoint resumed on the GPU");
    let msg = e.to_string();
    assert!(
        msg.contains("different run") && msg.contains("device=cuda"),
        "{msg}"
    );
    // The same checkpoint resumes on the CPU (the refusal was the device's).
    let (rep, _) = go(&cpu, true).unwrap();
    assert_eq!(rep.epochs_run, 1);
}

#[test]
fn a_checkpoint_resumes_only_on_the_same_examples() {
    use thinksteer::taxonomy::optimise::{optimise, OptimiseSettings};
    use thinksteer::taxonomy::vectors::BasePrefix;
    let dir = tmp("opt-examples");
    let (tp, ap) = optimise_data(&dir);
    let ckpt = dir.join("ckpt.json");
    let s = OptimiseSettings {
        layer: 1,
        epochs: 3,
        batch: 2,
        lr: 0.05,
        stop_after: Some(1),
        ..Default::default()
    };
    let base = fixture(BASE);
    let go = |base: &Path, traces: &Path, prefix: BasePrefix| {
        optimise(base, traces, &ap, prefix, &s, &ckpt, true)
    };
    optimise(&base, &tp, &ap, BasePrefix::SameAsTrace, &s, &ckpt, false).unwrap();
    // Another --prefix, or another prompt in the traces (same counts), is another run.
    let e = go(&base, &tp, BasePrefix::Plain)
        .err()
        .expect("--prefix plain resumed");
    assert!(e.to_string().contains("different run"), "{e}");
    let edited = dir.join("edited.jsonl");
    let text = std::fs::read_to_string(&tp).unwrap();
    std::fs::write(&edited, text.replace("Question 0?", "Question zero?")).unwrap();
    let e = go(&base, &edited, BasePrefix::SameAsTrace)
        .err()
        .expect("edited traces resumed");
    assert!(e.to_string().contains("different run"), "{e}");
    // The same folder written another way is the same run.
    let slash = PathBuf::from(format!("{}/", base.display()));
    let (rep, _) = go(&slash, &tp, BasePrefix::SameAsTrace).unwrap();
    assert_eq!(rep.epochs_run, 1);
    // Finished: started again without --resume it is refused (the checkpoint is not
    // overwritten); with --resume it gives the finished vectors without training.
    let all = OptimiseSettings {
        stop_after: None,
        ..s.clone()
    };
    let run = |resume| {
        optimise(
            &base,
            &tp,
            &ap,
            BasePrefix::SameAsTrace,
            &all,
            &ckpt,
            resume,
        )
    };
    let (done, _) = run(true).unwrap();
    assert!(done.set.is_some());
    let e = run(false).err().expect("a checkpoint overwritten");
    assert!(e.to_string().contains("expected --resume"), "{e}");
    let (again, _) = run(true).unwrap();
    assert_eq!(again.epochs_run, 0);
    assert_eq!(again.set, done.set);
}

#[test]
fn optimise_with_device_cuda_reaches_the_gpu_path() {
    // `--device cuda` no longer refuses --method optimise: without a GPU it says why CUDA
    // cannot be used; with one, the tiny fixture (head_dim 16) is refused by the CUDA engine.
    let dir = tmp("opt-cuda");
    let (tp, ap) = optimise_data(&dir);
    let out = dir.join("v.safetensors");
    let why = match thinksteer::cuda::available() {
        Err(why) => format!("--device cuda: {why}"),
        Ok(()) => "head_dim 64 or 128".to_string(),
    };
    fails(
        &[
            "train-vectors",
            "--base",
            &s(&fixture(BASE)),
            "--traces",
            &s(&tp),
            "--annotations",
            &s(&ap),
            "--layer",
            "1",
            "--method",
            "optimise",
            "--epochs",
            "1",
            "--device",
            "cuda",
            "--out",
            &s(&out),
        ],
        &[&why],
    );
}

#[test]
fn optimise_refuses_a_negative_prefix_cache() {
    let dir = tmp("opt-cache");
    let (tp, ap) = optimise_data(&dir);
    let out = dir.join("v.safetensors");
    fails(
        &[
            "train-vectors",
            "--base",
            &s(&fixture(BASE)),
            "--traces",
            &s(&tp),
            "--annotations",
            &s(&ap),
            "--layer",
            "1",
            "--method",
            "optimise",
            "--device",
            "cpu",
            "--prefix-cache-gb=-1",
            "--out",
            &s(&out),
        ],
        &["--prefix-cache-gb", "non-negative", "-1"],
    );
}

#[test]
fn optimise_without_a_prefix_cache_gives_the_same_vectors() {
    // The prefix cache only saves recomputation: with a budget of 0 bytes every epoch prepares
    // every example again, and the trained vectors and curves must be bit-identical.
    use thinksteer::taxonomy::optimise::{optimise, OptimiseSettings};
    use thinksteer::taxonomy::vectors::BasePrefix;
    let dir = tmp("opt-nocache");
    let (tp, ap) = optimise_data(&dir);
    let base = fixture(BASE);
    let run = |cache: Option<usize>, name: &str| {
        let s = OptimiseSettings {
            layer: 1,
            epochs: 2,
            batch: 2,
            lr: 0.05,
            prefix_cache_bytes: cache,
            ..Default::default()
        };
        optimise(
            &base,
            &tp,
            &ap,
            BasePrefix::SameAsTrace,
            &s,
            &dir.join(name),
            false,
        )
        .unwrap()
    };
    let (cached, curves_cached) = run(None, "a.ckpt.json");
    let (uncached, curves_uncached) = run(Some(0), "b.ckpt.json");
    let (a, b) = (cached.set.unwrap(), uncached.set.unwrap());
    assert_eq!(a.bias, b.bias);
    assert_eq!(a.vectors, b.vectors);
    assert!(a.bias.iter().any(|&x| x != 0.0), "the bias was trained");
    let bits = |c: &[thinksteer::taxonomy::optimise::CurvePoint]| -> Vec<u64> {
        c.iter().map(|p| p.loss.to_bits()).collect()
    };
    assert_eq!(bits(&curves_cached), bits(&curves_uncached));
}

#[test]
fn vectors_trained_at_the_block_input_are_the_previous_blocks_and_are_named() {
    // The reference code's quirk (hybrid.md §3): trained at the input of block L, added at its
    // output. The input of block 2 is the output of block 1, so the vectors are those of
    // --layer 1, labelled 2.
    let dir = tmp("at-input");
    let (tp, ap) = optimise_data(&dir);
    let (base, trs, anns) = (s(&fixture(BASE)), s(&tp), s(&ap));
    let train = |out: &Path, extra: &[&str]| {
        let out = s(out);
        let mut args = vec![
            "train-vectors",
            "--base",
            &base,
            "--traces",
            &trs,
            "--annotations",
            &anns,
            "--out",
            &out,
            "--device",
            "cpu",
        ];
        args.extend(extra);
        ok(&args)
    };
    let (at_input, below) = (dir.join("input.safetensors"), dir.join("below.safetensors"));
    let said = train(&at_input, &["--layer", "2", "--at-block-input"]);
    assert!(said.contains("at block 2 (trained at its input)"), "{said}");
    train(&below, &["--layer", "1"]);
    let (a, b) = (
        thinksteer::steering::SteeringSet::load(&at_input).unwrap(),
        thinksteer::steering::SteeringSet::load(&below).unwrap(),
    );
    assert_eq!((a.layer, a.trained_at_block_input), (2, true));
    assert_eq!((b.layer, b.trained_at_block_input), (1, false));
    assert_eq!((&a.bias, &a.vectors), (&b.bias, &b.vectors));
    fails(
        &[
            "train-vectors",
            "--base",
            &base,
            "--traces",
            &trs,
            "--annotations",
            &anns,
            "--out",
            &s(&dir.join("x.safetensors")),
            "--layer",
            "0",
            "--at-block-input",
        ],
        &["--at-block-input", "found 0"],
    );
    // `hybrid` names the mismatch, and --steer-at-block-input adds them where they were trained.
    let sae = dir.join("sae.safetensors");
    let think = s(&fixture(THINKING));
    ok(&[
        "random-sae",
        "--model",
        &think,
        "--layer",
        "1",
        "--latents",
        "2",
        "--k",
        "1",
        "--out",
        &s(&sae),
    ]);
    let hybrid = |vectors: &Path, extra: &[&str]| {
        let mut args: Vec<String> = [
            "hybrid",
            "--base",
            &base,
            "--thinking",
            &think,
            "--sae",
            &s(&sae),
            "--vectors",
            &s(vectors),
            "--question",
            "1+1?",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        let (code, _, err) = run(&args);
        assert_eq!(code, Some(0), "{err}");
        err
    };
    let quirk = "was trained at the input of block 2 and is added at its output: the reference code's quirk";
    assert!(hybrid(&at_input, &[]).contains(quirk));
    assert!(!hybrid(&at_input, &["--steer-at-block-input"]).contains("note:"));
    assert!(hybrid(&below, &["--steer-at-block-input"])
        .contains("was trained at the output of block 1 and is added at its input"));
    assert!(!hybrid(&below, &[]).contains("note:"));
}

#[test]
fn bad_traces_and_vector_settings_are_refused_before_work() {
    let dir = tmp("bad-traces");
    let text = "Let me add the two numbers. Then I check the sum again. So it is five.";
    let acts = |traces: &str, needles: &[&str]| {
        let p = dir.join("t.jsonl");
        std::fs::write(&p, format!("{traces}\n")).unwrap();
        fails(
            &[
                "activations",
                "--model",
                &s(&fixture(THINKING)),
                "--traces",
                &s(&p),
                "--layer",
                "1",
                "--out",
                &s(&dir.join("a.safetensors")),
                "--device",
                "cpu",
            ],
            needles,
        );
    };
    // Thinking spans past the text, reversed, and inside a character.
    let span = "expected a thinking span within the text";
    acts(
        &hand_trace(
            0,
            "p",
            text,
            Some(Span {
                start: 0,
                end: 1000,
            }),
        ),
        &[span, "0..1000"],
    );
    acts(
        &hand_trace(0, "p", text, Some(Span { start: 9, end: 3 })),
        &[span, "9..3"],
    );
    acts(
        &hand_trace(
            0,
            "p",
            "é and more words here",
            Some(Span { start: 1, end: 8 }),
        ),
        &[span],
    );
    // A trace longer than the model's 512-token context.
    let long = text.repeat(80);
    let t = hand_trace(
        3,
        "p",
        &long,
        Some(Span {
            start: 0,
            end: long.len(),
        }),
    );
    acts(
        &t,
        &["trace 3", "expected at most the model's context of 512"],
    );

    let (tp, ap) = optimise_data(&dir);
    let train = |extra: &[&str], needles: &[&str]| {
        let (base, tp, ap) = (s(&fixture(BASE)), s(&tp), s(&ap));
        let mut args = vec![
            "train-vectors",
            "--base",
            &base,
            "--traces",
            &tp,
            "--annotations",
            &ap,
            "--layer",
            "1",
            "--device",
            "cpu",
            "--method",
            "optimise",
        ];
        args.extend(extra);
        fails(&args, needles);
    };
    let out = s(&dir.join("v.safetensors"));
    let nowhere = s(&dir.join("none/v.safetensors"));
    train(
        &["--out", &nowhere],
        &["--out", "expected an existing folder"],
    );
    let curves = s(&dir.join("none/c.csv"));
    train(
        &["--out", &out, "--curves", &curves],
        &["--curves", "expected an existing folder"],
    );
    train(
        &["--out", &out, "--coldness", "0"],
        &["--coldness", "finite number > 0", "found 0"],
    );
    train(&["--out", &out, "--stop-after", "0"], &["--stop-after"]);
    // The curves file given as a folder: refused before training, not after it.
    train(
        &["--out", &out, "--curves", &s(&dir)],
        &["--curves", "expected a file to write, found a folder"],
    );
    assert!(
        !dir.join("v.ckpt.json").exists(),
        "refused before any epoch"
    );
    let q = s(&questions(&dir));
    let (model, tr) = (s(&fixture(THINKING)), s(&dir.join("tr.jsonl")));
    fails(
        &[
            "traces",
            "--model",
            &model,
            "--questions",
            &q,
            "--out",
            &tr,
            "--limit",
            "0",
        ],
        &["--limit"],
    );
    assert!(!dir.join("tr.jsonl").exists());
    let folder = s(&dir);
    let args = [
        "traces",
        "--model",
        &model,
        "--questions",
        &q,
        "--out",
        &folder,
    ];
    fails(
        &args,
        &["--out", "expected a traces file to write, found a folder"],
    );
}

/// Bad input to `activations` is refused before any partial file is written, and a run that
/// fails on its first trace leaves none behind: the corrected command then runs.
#[test]
fn a_failed_activations_run_leaves_nothing_that_blocks_the_corrected_one() {
    let dir = tmp("acts-bad");
    let tr = dir.join("traces.jsonl");
    resume_traces(&tr, false);
    let out = dir.join("acts.safetensors");
    let (partial, progress) = (
        dir.join("acts.safetensors.partial.f32"),
        dir.join("acts.safetensors.progress.jsonl"),
    );
    let (model, trs, outs) = (s(&fixture(THINKING)), s(&tr), s(&out));
    let args = ["activations", "--model", &model, "--traces", &trs];
    fails(
        &[&args[..], &["--layer", "99", "--out", &outs]].concat(),
        &["--layer 99", "expected a block index below"],
    );
    assert!(!partial.exists() && !progress.exists());
    let layer = LAYER.to_string();
    fails(
        &[&args[..], &["--layer", &layer, "--out", &s(&dir)]].concat(),
        &["--out", "expected a file to write, found a folder"],
    );
    // The first forward fails (as a trace too long for the model's context does).
    let (r, calls) = acts_run(&tr, &out, Some(1));
    assert!(r.unwrap_err().contains("killed"));
    assert_eq!(calls, 1);
    assert!(
        !partial.exists() && !progress.exists(),
        "partial files left"
    );
    // A second run on the same --out while one holds it is refused, and touches nothing of
    // the first's (whose first trace is recorded here).
    let (r, _) = acts_run(&tr, &out, Some(2));
    assert!(r.unwrap_err().contains("killed"));
    let held = thinksteer::files::lock_output(&out, "--out").unwrap();
    let (r, calls) = acts_run(&tr, &out, Some(1));
    assert!(r.unwrap_err().contains("expected no other run writing it"));
    assert_eq!(calls, 0);
    assert!(
        partial.exists() && progress.exists(),
        "the first run's files removed"
    );
    drop(held);
    activations(&tr, &out);
    assert!(out.exists());
}

/// A checkpoint replaced under the same path is another model: `traces` and `activations`
/// refuse to resume on it, and traces without their settings file are not resumed blind.
#[test]
fn traces_and_activations_refuse_a_checkpoint_changed_under_its_path() {
    let dir = tmp("changed-ckpt");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(fixture(THINKING)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    let tr = dir.join("traces.jsonl");
    let (m, q, tr_s) = (s(&model), s(&questions(&dir)), s(&tr));
    let args = [
        "traces",
        "--model",
        &m,
        "--questions",
        &q,
        "--out",
        &tr_s,
        "--max-new-tokens",
        "20",
    ];
    ok(&[&args[..], &["--limit", "2"]].concat());
    let settings = thinksteer::taxonomy::traces::settings_path(&tr);
    let kept = std::fs::read(&settings).unwrap();
    // Another tokenizer config under the same path (a new download, say).
    let cfg = model.join("tokenizer_config.json");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push('\n');
    std::fs::write(&cfg, &text).unwrap();
    fails(
        &args,
        &[
            "as it was then (checkpoint fingerprint",
            "use another --out",
        ],
    );
    // No settings file beside traces: refused, not resumed with whatever is asked now.
    std::fs::remove_file(&settings).unwrap();
    fails(
        &args,
        &["holds 2 traces but no settings file", "use another --out"],
    );
    std::fs::write(&settings, kept).unwrap();
    assert_eq!(read_traces(&tr).unwrap().len(), 2, "nothing appended");
    // Another run writing the same file.
    let held = thinksteer::files::lock_output(&tr, "--out").unwrap();
    fails(
        &args,
        &["expected no other run writing it", "use another --out"],
    );
    drop(held);

    // activations: a killed run of one checkpoint is not resumed on another.
    let tr = dir.join("acts-traces.jsonl");
    resume_traces(&tr, false);
    let out = dir.join("acts.safetensors");
    let (r, _) = acts_run_of(&tr, &out, Some(2), Some("0123"));
    assert!(r.unwrap_err().contains("killed"));
    let (r, _) = acts_run_of(&tr, &out, None, Some("4567"));
    let e = r.unwrap_err();
    assert!(
        e.contains("fingerprint 0123), now 4567") && e.contains("expected the same checkpoint"),
        "{e}"
    );
    let (r, _) = acts_run_of(&tr, &out, None, Some("0123"));
    r.unwrap();
}
