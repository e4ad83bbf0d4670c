//! The hybrid loop on the tiny base/thinking pair (qwen2-f32 steered, thinking-qwen2-f32
//! deciding): exact mode against a deliberately naive re-implementation of hybrid.md §3
//! written here, cached against exact, batched against one at a time, and steering that
//! provably lands.

mod common;

use common::fixture;
use std::sync::Arc;
use thinksteer::cpu_ops::argmax;
use thinksteer::engine::{CpuEngine, Decoder, SteerRows};
use thinksteer::hybrid::{run, run_cached, Mode, Output, Pair, Prompts, Settings, StepRecord};
use thinksteer::model::{Hooks, Model, Slots, Step};
use thinksteer::sae::Sae;
use thinksteer::steering::SteeringSet;

struct Fx {
    base: Arc<Model>,
    thinking: Arc<Model>,
    sae: Sae,
    steering: SteeringSet,
}

impl Fx {
    fn pair(&self) -> Pair<'_> {
        Pair {
            base: &self.base,
            thinking: &self.thinking,
            sae: &self.sae,
            steering: &self.steering,
        }
    }
}

/// Steering of norm 12 at block 1: the residual there has RMS ≈ 2–4 over D = 64 (norm ≈ 16–32),
/// so candidates differ from the unsteered token at some coefficients but not all.
fn fx(norm: f32) -> Fx {
    let base = Arc::new(Model::load(&fixture("qwen2-f32")).unwrap());
    let thinking = Arc::new(Model::load(&fixture("thinking-qwen2-f32")).unwrap());
    let sae = Sae::random(64, 4, 2, 3, 7, "thinking-qwen2-f32");
    let mut steering = SteeringSet::random(64, 4, 1, norm, 11, "qwen2-f32");
    steering
        .bias
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = if i % 2 == 0 { 0.5 } else { -0.5 });
    Fx {
        base,
        thinking,
        sae,
        steering,
    }
}

fn problems() -> Vec<Prompts> {
    vec![
        Prompts {
            base: vec![84, 104, 101, 32, 115, 117, 109],
            thinking: vec![307, 117, 115, 101, 114, 10, 51, 43, 52],
        },
        Prompts {
            base: vec![83, 111, 32, 120, 32, 105, 115, 32, 53, 46, 10],
            thinking: vec![307, 88, 308, 10],
        },
    ]
}

/// Full forward of one sequence through the public Decoder API, adding `add` [T, D] at the
/// output of block `layer`; returns (last logits, block `capture` output at the last position).
fn forward(
    m: &Arc<Model>,
    ids: &[u32],
    add: Option<(usize, &[f32])>,
    capture: Option<usize>,
) -> (Vec<f32>, Vec<f32>) {
    let t = ids.len();
    let mut e = CpuEngine::new(m.clone(), 1, t);
    let mut hooks = Hooks {
        capture: capture.map(|l| (l + 1, vec![])).into_iter().collect(),
        steer: add.map(|(l, a)| (l + 1, a)),
    };
    let pos: Vec<usize> = (0..t).collect();
    let logits = e
        .forward(
            ids,
            &Step {
                slots: &vec![0; t],
                positions: &pos,
                n_write: t,
                run_start: &[],
            },
            &[t - 1],
            &mut hooks,
        )
        .unwrap()
        .to_vec();
    let d = m.config.hidden_size;
    let h = hooks
        .capture
        .first()
        .map(|(_, c)| c[(t - 1) * d..].to_vec())
        .unwrap_or_default();
    (logits, h)
}

/// hybrid.md §3 read literally, one step at a time, no caches. With `persist`, persistent
/// mode read the same way: each winner's steering stays added at its position in every later
/// base-model run.
fn naive(f: &Fx, p: &Prompts, coefs: &[f32], windows: &[i64], n: usize, persist: bool) -> Output {
    let d = 64;
    let (mut sb, mut stt) = (p.base.clone(), p.thinking.clone());
    let mut kept = vec![0f32; sb.len() * d]; // [len, D] steering kept by persistent mode
    let mut out = Output {
        ids: vec![],
        steps: vec![],
    };
    for _ in 0..n {
        let (lt, h) = forward(&f.thinking, &stt, None, Some(f.sae.layer));
        let z: Vec<f32> = (0..f.sae.latents)
            .map(|j| {
                (0..d)
                    .map(|i| f.sae.w_enc[i * f.sae.latents + j] * h[i])
                    .sum()
            })
            .collect();
        let cat = argmax(&z);
        let (lb, _) = forward(
            &f.base,
            &sb,
            persist.then_some((f.steering.layer, &kept)),
            None,
        );
        let (think_tok, base_tok) = (argmax(&lt) as u32, argmax(&lb) as u32);
        let (tok, rec) = if think_tok == base_tok {
            (
                base_tok,
                StepRecord {
                    category: cat,
                    steered: false,
                    changed: false,
                    coef: None,
                    window: None,
                },
            )
        } else {
            let mut best: Option<(u32, f32, i64)> = None;
            for &c in coefs {
                for &w in windows {
                    let len = sb.len();
                    let mut add = if persist {
                        kept.clone()
                    } else {
                        vec![0f32; len * d]
                    };
                    for pos in 0..len {
                        let inside = w == 0 || pos + (-w) as usize >= len;
                        if inside {
                            for i in 0..d {
                                add[pos * d + i] =
                                    c * (f.steering.bias[i] + f.steering.vectors[cat * d + i]);
                            }
                        }
                    }
                    let (l, _) = forward(&f.base, &sb, Some((f.steering.layer, &add)), None);
                    let cand = argmax(&l) as u32;
                    if best.is_none_or(|(b, _, _)| lt[cand as usize] > lt[b as usize]) {
                        best = Some((cand, c, w));
                    }
                }
            }
            let (tok, c, w) = best.unwrap();
            if persist {
                let last = (sb.len() - 1) * d;
                for i in 0..d {
                    kept[last + i] = c * (f.steering.bias[i] + f.steering.vectors[cat * d + i]);
                }
            }
            (
                tok,
                StepRecord {
                    category: cat,
                    steered: true,
                    coef: Some(c),
                    window: Some(w),
                    changed: tok != base_tok,
                },
            )
        };
        out.ids.push(tok);
        out.steps.push(rec);
        if f.base.config.eos_token_ids.contains(&tok) {
            break;
        }
        sb.push(tok);
        stt.push(tok);
        kept.resize(sb.len() * d, 0.0);
    }
    out
}

/// `problems()` and a third, so that batch 2 has a slot take the next problem (refill).
fn three_problems() -> Vec<Prompts> {
    let mut ps = problems();
    ps.push(Prompts {
        base: vec![50, 43, 50, 61],
        thinking: vec![307, 50, 43, 50, 308, 10, 307],
    });
    ps
}

fn settings(mode: Mode, coefs: &[f32], windows: &[i64], n: usize) -> Settings {
    Settings {
        mode,
        coefficients: coefs.to_vec(),
        windows: windows.to_vec(),
        max_new_tokens: n,
        ..Settings::default()
    }
}

fn hybrid(f: &Fx, ps: &[Prompts], s: &Settings) -> Vec<Output> {
    let pair = f.pair();
    run(&pair, ps, s, |_, _, _| {}).unwrap()
}

#[test]
fn exact_mode_equals_the_naive_recompute() {
    // The same checkpoint on both sides (with different prompts) agrees on some steps and not
    // on others, so both branches of the gate are compared.
    let mut f = fx(12.0);
    f.thinking = f.base.clone();
    let (coefs, windows) = ([0.5, 1.0, 2.0], [0, -1, -3]);
    let (mut steered, mut changed) = (0, 0);
    for p in problems() {
        let want = naive(&f, &p, &coefs, &windows, 12, false);
        let got = &hybrid(
            &f,
            std::slice::from_ref(&p),
            &settings(Mode::Exact, &coefs, &windows, 12),
        )[0];
        assert_eq!(got.ids, want.ids);
        assert_eq!(got.steps, want.steps);
        steered += want.steps.iter().filter(|s| s.steered).count();
        changed += want.steps.iter().filter(|s| s.changed).count();
    }
    // The comparison only means something if some steps were steered and some were not, and
    // if some steered steps changed the base model's token and some did not.
    assert!(
        steered > 0 && steered < 24,
        "steered {steered} of 24 steps: fixture not discriminating"
    );
    assert!(
        changed > 0 && changed < steered,
        "{changed} of {steered} steered steps changed the token: fixture not discriminating"
    );
}

#[test]
fn cached_equals_exact_for_the_newest_position_window() {
    let f = fx(12.0);
    let coefs: Vec<f32> = (1..=10).map(|i| i as f32 * 0.3).collect();
    for p in problems() {
        let exact = &hybrid(
            &f,
            std::slice::from_ref(&p),
            &settings(Mode::Exact, &coefs, &[-1], 16),
        )[0];
        let cached = &hybrid(
            &f,
            std::slice::from_ref(&p),
            &settings(Mode::Cached, &coefs, &[-1], 16),
        )[0];
        assert_eq!(cached.ids, exact.ids);
        assert_eq!(cached.steps, exact.steps);
        assert!(
            exact.steps.iter().any(|s| s.steered),
            "no steered step: test would be vacuous"
        );
    }
}

#[test]
fn batched_equals_one_at_a_time() {
    let f = fx(12.0);
    // A third problem, so batch 2 exercises a slot taking the next problem (refill), with
    // different lengths (max 16 tokens for some, eos possibly earlier for others).
    let ps = three_problems();
    for mode in [Mode::Cached, Mode::Persistent] {
        let alone: Vec<_> = ps
            .iter()
            .map(|p| {
                hybrid(
                    &f,
                    std::slice::from_ref(p),
                    &settings(mode, &[0.5, 1.0, 2.0], &[-1], 16),
                )[0]
                .clone()
            })
            .collect();
        for batch in [1, 2, 8] {
            let s = Settings {
                batch,
                ..settings(mode, &[0.5, 1.0, 2.0], &[-1], 16)
            };
            let together = hybrid(&f, &ps, &s);
            for (i, a) in alone.iter().enumerate() {
                assert_eq!(
                    &together[i].ids, &a.ids,
                    "{mode:?} batch {batch} problem {i}"
                );
                assert_eq!(
                    &together[i].steps, &a.steps,
                    "{mode:?} batch {batch} problem {i}"
                );
            }
        }
    }
}

#[test]
fn persistent_mode_equals_the_naive_recompute_with_the_winners_kept() {
    let f = fx(12.0);
    let coefs = [0.5, 1.0, 2.0];
    let mut steered = 0;
    for p in problems() {
        let want = naive(&f, &p, &coefs, &[-1], 16, true);
        let got = &hybrid(
            &f,
            std::slice::from_ref(&p),
            &settings(Mode::Persistent, &coefs, &[-1], 16),
        )[0];
        assert_eq!(got.ids, want.ids);
        assert_eq!(got.steps, want.steps);
        // A kept vector matters only for the steps after it.
        steered += want.steps[..want.steps.len() - 1]
            .iter()
            .filter(|s| s.steered)
            .count();
    }
    assert!(
        steered > 0,
        "no steered step before the last: test would be vacuous"
    );
}

#[test]
fn persistent_mode_differs_from_cached_once_steering_is_committed() {
    let f = fx(12.0);
    let coefs = [1.0, 2.0];
    let cached = hybrid(&f, &problems(), &settings(Mode::Cached, &coefs, &[-1], 16));
    let persistent = hybrid(
        &f,
        &problems(),
        &settings(Mode::Persistent, &coefs, &[-1], 16),
    );
    // Identical up to and including the first steered step (nothing committed before it)...
    for (c, p) in cached.iter().zip(&persistent) {
        let first = c
            .steps
            .iter()
            .position(|s| s.steered)
            .expect("a steered step");
        assert_eq!(c.ids[..=first], p.ids[..=first]);
    }
    // ...and the committed K/V change something afterwards in at least one problem.
    assert!(cached
        .iter()
        .zip(&persistent)
        .any(|(c, p)| c.ids != p.ids || c.steps != p.steps));
}

#[test]
fn a_huge_vector_forces_the_token_it_points_to() {
    let mut f = fx(12.0);
    f.steering.bias.fill(0.0);
    // Steering of norm 1e4 dominates the residual (sublayer outputs are bounded by their input
    // norms), so every candidate's token is the head's argmax on the vector direction itself.
    let dir = f.steering.vectors[..64].to_vec();
    for row in f.steering.vectors.chunks_mut(64) {
        row.iter_mut()
            .zip(&dir)
            .for_each(|(r, d)| *r = d * 1e4 / 12.0);
    }
    let mut ws = Default::default();
    let expected = argmax(f.base.head(&mut ws, &f.steering.vectors[..64], &[0])) as u32;
    let s = Settings {
        no_gating: true,
        ..settings(Mode::Cached, &[0.1, 1.0], &[-1], 8)
    };
    for out in hybrid(&f, &problems(), &s) {
        assert!(
            out.ids.iter().all(|&t| t == expected),
            "ids {:?}, expected all {expected}",
            out.ids
        );
        assert_eq!(out.steered_fraction(), 1.0, "--no-gating steers every step");
    }
}

#[test]
fn steered_steps_are_exactly_the_disagreements() {
    let f = fx(12.0);
    let s = settings(Mode::Cached, &[0.5, 1.0], &[-1], 16);
    for (p, out) in problems().iter().zip(hybrid(&f, &problems(), &s)) {
        let (mut sb, mut stt) = (p.base.clone(), p.thinking.clone());
        for (tok, rec) in out.ids.iter().zip(&out.steps) {
            let (lt, _) = forward(&f.thinking, &stt, None, None);
            let (lb, _) = forward(&f.base, &sb, None, None);
            assert_eq!(rec.steered, argmax(&lt) != argmax(&lb));
            sb.push(*tok);
            stt.push(*tok);
        }
        let disagreements = out.steps.iter().filter(|s| s.steered).count();
        assert_eq!(
            out.steered_fraction(),
            disagreements as f64 / out.steps.len() as f64
        );
    }
}

#[test]
fn cached_equals_exact_for_every_window() {
    // Windows past the prompt's start (-50 while sequences are shorter: the same run as 0)
    // and inside it, with several problems decoded together.
    let f = fx(12.0);
    let (coefs, windows) = ([0.5, 1.0, 2.0], [0, -1, -3, -9, -50]);
    let exact = hybrid(
        &f,
        &problems(),
        &settings(Mode::Exact, &coefs, &windows, 14),
    );
    let cached = hybrid(
        &f,
        &problems(),
        &settings(Mode::Cached, &coefs, &windows, 14),
    );
    for (e, c) in exact.iter().zip(&cached) {
        assert_eq!(c.ids, e.ids);
        assert_eq!(c.steps, e.steps);
    }
    // Vacuous unless some step was won by a window other than -1.
    assert!(
        exact
            .iter()
            .flat_map(|o| &o.steps)
            .any(|s| s.steered && s.window != Some(-1)),
        "no step won by a longer window"
    );
}

/// A steered step's candidate runs split over several calls of the base engine (7 rows each,
/// as a GPU engine's rows per call would split them) give what one call gives: exact mode's
/// tokens.
#[test]
fn candidate_runs_split_over_calls_equal_exact() {
    let f = fx(12.0);
    let pair = f.pair();
    let (coefs, windows) = ([0.5, 1.0, 2.0], [-1, -3, -5]);
    let mut s = settings(Mode::Exact, &coefs, &windows, 10);
    s.batch = 2;
    let exact = hybrid(&f, &problems(), &s);
    s.mode = Mode::Cached;
    let mut b = CpuEngine::new(f.base.clone(), 2, 64);
    let mut t = CpuEngine::new(f.thinking.clone(), 2, 64);
    b.max_rows = 7;
    let mut steered = 0;
    let cached = run_cached(
        pair.artifacts(),
        &mut b,
        &mut t,
        &problems(),
        &s,
        |_, _, r| {
            steered += usize::from(r.steered);
        },
    )
    .unwrap();
    for (e, c) in exact.iter().zip(&cached) {
        assert_eq!(c.ids, e.ids);
        assert_eq!(c.steps, e.steps);
    }
    // Each steered row has 3·(1 + 3 + 5) = 27 candidate rows: at least 4 calls of ≤ 7 rows.
    assert!(steered > 0, "no steered step: the split went unchecked");
    // A run longer than the engine's calls is refused, not truncated.
    b.max_rows = 4;
    let err = run_cached(
        pair.artifacts(),
        &mut b,
        &mut t,
        &problems(),
        &s,
        |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("exceeds the engine's 4 tokens per call"),
        "{err}"
    );
}

#[test]
fn cached_equals_exact_with_ablations_refills_and_a_full_context() {
    // Both models' context cut to 14 positions (problems stop when their sequence fills it,
    // the 11-token prompt after 3 tokens), three problems through two slots (refill).
    let mut f = fx(12.0);
    let short = |name: &str| {
        let mut m = Model::load(&fixture(name)).unwrap();
        m.config.max_position_embeddings = 14;
        Arc::new(m)
    };
    (f.base, f.thinking) = (short("qwen2-f32"), short("thinking-qwen2-f32"));
    let ps = three_problems();
    let windows = [0, -1, -3];
    type Variant = (&'static str, fn(&mut Settings));
    let variants: [Variant; 4] = [
        ("plain", |_| {}),
        ("--random-firing", |s| s.random_firing = Some(3)),
        ("--steer-at-block-input", |s| s.steer_at_block_input = true),
        ("--only-bias", |s| s.only_bias = true),
    ];
    for (name, set) in variants {
        let mut exact = settings(Mode::Exact, &[0.5, 1.0, 2.0], &windows, 16);
        set(&mut exact);
        let cached = Settings {
            mode: Mode::Cached,
            batch: 2,
            ..exact.clone()
        };
        let (want, got) = (hybrid(&f, &ps, &exact), hybrid(&f, &ps, &cached));
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(g.ids, w.ids, "{name}: problem {i}");
            assert_eq!(g.steps, w.steps, "{name}: problem {i}");
        }
        // The context, not max_new_tokens, ended the 11-token prompt's answer.
        assert_eq!(want[1].ids.len(), 3, "{name}");
    }
}

#[test]
fn persistent_mode_and_positive_windows_are_refused() {
    let f = fx(12.0);
    let pair = f.pair();
    let err = |mode, windows: &[i64]| {
        run(
            &pair,
            &problems(),
            &settings(mode, &[1.0], windows, 4),
            |_, _, _| {},
        )
        .unwrap_err()
        .to_string()
    };
    let e = err(Mode::Persistent, &[0, -1]);
    assert!(e.contains("windows must be [-1]"), "{e}");
    let e = err(Mode::Cached, &[-1, 3]);
    assert!(e.contains("found 3"), "{e}");
    // The loop on engines (the GPU's host-driven loop) checks the same, and empty inputs.
    let on_engines = |s: &Settings, ps: &[Prompts]| {
        let mut b = CpuEngine::new(f.base.clone(), 2, 32);
        let mut t = CpuEngine::new(f.thinking.clone(), 2, 32);
        run_cached(pair.artifacts(), &mut b, &mut t, ps, s, |_, _, _| {})
            .unwrap_err()
            .to_string()
    };
    let e = on_engines(
        &settings(Mode::Persistent, &[1.0], &[0, -1], 4),
        &problems(),
    );
    assert!(e.contains("windows must be [-1]"), "{e}");
    let e = on_engines(&settings(Mode::Cached, &[], &[-1], 4), &problems());
    assert!(e.contains("at least one coefficient"), "{e}");
    let caches = Settings {
        prefix_caches: Some(3),
        ..settings(Mode::Cached, &[1.0], &[-1, -5], 4)
    };
    let e = on_engines(&caches, &problems());
    assert!(
        e.contains(
            "expected --mode cached with window 0, found --mode cached and windows [-1, -5]"
        ),
        "{e}"
    );
    let empty = [Prompts {
        base: vec![],
        thinking: vec![5],
    }];
    let e = on_engines(&settings(Mode::Cached, &[1.0], &[-1], 4), &empty);
    assert!(e.contains("empty prompt"), "{e}");
}

#[test]
fn kept_residuals_give_what_a_rerun_of_the_window_gives() {
    let f = fx(12.0);
    let (d, n_layers) = (64, f.base.config.num_hidden_layers);
    for (point, dense) in [(0, true), (1, true), (n_layers, true), (1, false)] {
        let (vecs, idx, coef) = common::steer_rows(40, d, dense);
        let steer = SteerRows::own(&vecs, &idx, &coef);
        let mut e = CpuEngine::new(f.base.clone(), 2, 80);
        let (kept, rerun, ids) = common::kept_and_rerun(&mut e, point, &steer);
        // A position never written reads NaN, not a plausible zero.
        assert!(
            common::unwritten_kept_is_nan(&mut e, &vecs[..d]),
            "unwritten kept row"
        );
        // The blocks before the point see the same rows either way (one f32 computation per
        // row, whatever the call's other rows), so the logits are the same bits.
        assert_eq!(kept, rerun, "point {point}, dense {dense}");
        let v = f.base.config.vocab_size;
        let want: Vec<u32> = kept.chunks(v).map(|l| argmax(l) as u32).collect();
        assert_eq!(ids, want, "point {point}: greedy_kept");
    }
    let add = vec![0.5f32; d];
    let one = SteerRows::own(&add, &[0], &[1.0]);
    // Refusals: nothing kept, kept slots of the wrong count or outside the cache, a vector
    // index outside the vectors, a point past the last block.
    let mut e = CpuEngine::new(f.base.clone(), 2, 32);
    let run = Step {
        slots: &[0],
        positions: &[0],
        n_write: 0,
        run_start: &[],
    };
    let err = e.forward_kept(&run, &one, &[0]).unwrap_err().to_string();
    assert!(err.contains("keeps no residuals"), "{err}");
    e.keep_residuals(1, 1).unwrap();
    let two = SteerRows {
        from: &[0, 1],
        ..one
    };
    let err = e.forward_kept(&run, &two, &[0]).unwrap_err().to_string();
    assert!(
        err.contains("a kept slot for each of the 1 tokens"),
        "{err}"
    );
    // Slot 1 is the engine's but keeps no residuals: refused whether named in `from` or as the
    // row's own slot.
    let outside = SteerRows { from: &[1], ..one };
    let err = e
        .forward_kept(&run, &outside, &[0])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kept slot 1 is outside the 1 slots whose residuals are kept"),
        "{err}"
    );
    let own_1 = Step { slots: &[1], ..run };
    let err = e.forward_kept(&own_1, &one, &[0]).unwrap_err().to_string();
    assert!(err.contains("kept slot 1 is outside the 1 slots"), "{err}");
    let past = SteerRows { idx: &[1], ..one };
    let err = e.forward_kept(&run, &past, &[0]).unwrap_err().to_string();
    assert!(
        err.contains("vector index 1 is outside the 1 vectors"),
        "{err}"
    );
    let err = e.keep_residuals(n_layers + 1, 1).unwrap_err().to_string();
    assert!(err.contains(&format!("expected 0..={n_layers}")), "{err}");
    for bad in [0, 3] {
        let err = e.keep_residuals(1, bad).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "expected 1..=2 slots (the engine's slots in every block), found {bad}"
            )),
            "{err}"
        );
    }
}

#[test]
fn greedy_capture_gives_the_forward_s_ids_residuals_and_logits() {
    let f = fx(12.0);
    let (d, v) = (64, f.base.config.vocab_size);
    let mut e = CpuEngine::new(f.base.clone(), 2, 16);
    let (toks, h, at) = common::greedy_capture_of(&mut e, 2);
    // The same calls through `forward`, with the capture hooked.
    let mut r = CpuEngine::new(f.base.clone(), 2, 16);
    let prompt = Step {
        slots: &[0, 0, 0, 1],
        positions: &[0, 1, 2, 0],
        n_write: 4,
        run_start: &[],
    };
    r.forward(&[5, 77, 30, 8], &prompt, &[], &mut Hooks::default())
        .unwrap();
    let mut hooks = Hooks {
        capture: vec![(2, vec![])],
        steer: None,
    };
    let one = Step {
        slots: &[0, 1],
        positions: &[3, 1],
        n_write: 2,
        run_start: &[],
    };
    let logits = r
        .forward(&[12, 150], &one, &[0, 1], &mut hooks)
        .unwrap()
        .to_vec();
    let want: Vec<u32> = logits.chunks(v).map(|l| argmax(l) as u32).collect();
    assert_eq!(toks, want);
    assert_eq!(h, hooks.capture[0].1);
    assert_eq!(h.len(), 2 * d);
    let at_want = [
        logits[7],
        logits[0],
        f32::NEG_INFINITY,
        logits[v + 1],
        logits[v + 2],
        logits[v + 3],
    ];
    assert_eq!(at, at_want);
    // Another call drops the logits; ids that do not split evenly over the tokens are refused.
    let err = e.logits_at(&[1, 2, 3]).unwrap_err().to_string();
    assert!(err.contains("same number of ids"), "{err}");
    e.greedy(
        &[4, 4],
        &Step {
            positions: &[4, 2],
            ..one
        },
    )
    .unwrap();
    let err = e.logits_at(&[1, 2]).unwrap_err().to_string();
    assert!(err.contains("not a greedy_capture"), "{err}");
    common::finish_capture_needs_its_start(&mut e, 2);
}

/// A window-0 prefix written to a slot of its own (from another slot's kept residuals, in two
/// calls, the second beside a read-only run) gives the read-only run's logits bit for bit: the
/// same f32 rows, the written ones read back from the cache.
#[test]
fn a_window_0_prefix_in_its_own_slot_gives_what_a_read_only_run_gives() {
    let f = fx(12.0);
    let n_layers = f.base.config.num_hidden_layers;
    let vec: Vec<f32> = (0..64).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.3).collect();
    for (point, a) in [(0, 37), (1, 37), (1, 1), (n_layers, 69)] {
        let mut e = CpuEngine::new(f.base.clone(), 3, 80);
        let ([first, written, run], [want_a, want_n]) =
            common::prefix_in_own_slot(&mut e, point, a, &vec);
        assert_eq!(first, want_a, "point {point}, a {a}: first call");
        assert_eq!(written, want_n, "point {point}, a {a}: written rows");
        assert_eq!(
            run, want_n,
            "point {point}, a {a}: read-only run beside them"
        );
        assert!(want_n.iter().all(|x| x.is_finite()), "point {point}: NaN");
    }
}

/// Prefix-cache slots (`Slots::late`) exist only in the blocks from the steering point on: the
/// cache holds them there alone, a call through every block may not use them, a call from the
/// kept residuals at the point may write and read them, and one from an earlier point may not.
#[test]
fn prefix_cache_slots_exist_only_from_the_steering_point() {
    let f = fx(12.0);
    let c = &f.base.config;
    let (n, kv) = (c.num_hidden_layers, c.num_key_value_heads * c.head_dim);
    assert!(
        n >= 3,
        "the fixture needs blocks before and after the point"
    );
    let slots = Slots {
        all: 2,
        late: 3,
        from: 2,
    };
    let cache = thinksteer::model::KvCache::new(c, slots, 16);
    for l in 0..n {
        let want = if l < 2 { 2 } else { 5 };
        assert_eq!(cache.k[l].len(), want * 16 * kv, "K of block {l}");
        assert_eq!(cache.v[l].len(), want * 16 * kv, "V of block {l}");
    }
    let mut e = CpuEngine::new(f.base.clone(), slots, 16);
    assert_eq!(e.slots(), 5);
    let write = |slot: &'static [usize]| Step {
        slots: slot,
        positions: &[0],
        n_write: 1,
        run_start: &[],
    };
    e.greedy(&[3], &write(&[1])).unwrap();
    let err = e.greedy(&[3], &write(&[2])).unwrap_err().to_string();
    assert!(
        err.contains("slot 2 holds K/V only in blocks 2 on (a prefix cache)")
            && err.contains("starts at block 0: expected a slot below 2"),
        "{err}"
    );
    let err = e.greedy(&[3], &write(&[5])).unwrap_err().to_string();
    assert!(err.contains("expected slot < 2"), "{err}");
    // From the point: slot 4 (the last late one) written from slot 1's kept residual.
    e.keep_residuals(2, 2).unwrap();
    e.greedy(&[3], &write(&[1])).unwrap();
    let add = vec![0.5f32; 64];
    let from_1 = SteerRows {
        from: &[1],
        ..SteerRows::own(&add, &[0], &[1.0])
    };
    let kept = e
        .forward_kept(&write(&[4]), &from_1, &[0])
        .unwrap()
        .to_vec();
    assert!(kept.iter().all(|x| x.is_finite()));
    // From block 1, before the point, the late slots are not there.
    let mut e = CpuEngine::new(f.base.clone(), slots, 16);
    e.keep_residuals(1, 2).unwrap();
    e.greedy(&[3], &write(&[1])).unwrap();
    let err = e
        .forward_kept(&write(&[4]), &from_1, &[0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("starts at block 1"), "{err}");
}

/// The window-0 prefix caches change no token and no record (against exact mode), with room
/// for every (problem, category, coefficient), for 4 (evictions) and for 1 (most window-0 runs
/// read-only), with a refill; and they cut the window-0 rows: with room for all, every position
/// of a (problem, category, coefficient) runs once.
#[test]
fn prefix_caches_change_nothing_but_the_rows_run() {
    let f = fx(12.0);
    let pair = f.pair();
    let ps = three_problems();
    let mut s = settings(Mode::Exact, &[0.5, 1.0, 2.0], &[0, -1, -3], 12);
    s.no_gating = true; // every step steered: window-0 candidates at every step
    let exact = hybrid(&f, &ps, &s);
    s.mode = Mode::Cached;
    s.batch = 2;
    let (mut rows, mut resumed) = (vec![], vec![]);
    for caches in [0, 1, 4, 2 * 4 * 3] {
        s.prefix_caches = Some(caches);
        // The caches in the blocks from the steering point on only, as `hybrid::run` makes them.
        let slots = Slots {
            all: 2,
            late: caches,
            from: pair.artifacts().steer_point(&s),
        };
        let mut b = common::Counting::new(CpuEngine::new(f.base.clone(), slots, 40));
        let mut t = CpuEngine::new(f.thinking.clone(), 2, 40);
        let got = run_cached(pair.artifacts(), &mut b, &mut t, &ps, &s, |_, _, _| {}).unwrap();
        for (i, (e, g)) in exact.iter().zip(&got).enumerate() {
            assert_eq!(g.ids, e.ids, "{caches} caches: problem {i}");
            assert_eq!(g.steps, e.steps, "{caches} caches: problem {i}");
        }
        rows.push(b.rows);
        resumed.push(b.resumed);
    }
    // No cache, no written rows; each cache takes some runs off the read-only rows.
    assert_eq!(rows[0].0, 0);
    assert!(resumed[1..].iter().all(|&r| r > 0), "{resumed:?}");
    let total = |r: (usize, usize)| r.0 + r.1;
    assert!(
        total(rows[1]) < total(rows[0])
            && total(rows[2]) < total(rows[1])
            && total(rows[3]) < total(rows[2]),
        "rows (written, read-only) with 0, 1, 4 and 24 caches: {rows:?}"
    );
    // With room for all: the written rows are each (problem, category, coefficient)'s
    // positions, once.
    let mut longest = std::collections::HashMap::new();
    for (p, out) in exact.iter().enumerate() {
        for (i, st) in out.steps.iter().enumerate() {
            for c in [0.5f32, 1.0, 2.0] {
                // The sequence at step i: the prompt and i tokens.
                let n = ps[p].base.len() + i;
                let e = longest.entry((p, st.category, c.to_bits())).or_insert(0);
                *e = n.max(*e);
            }
        }
    }
    assert_eq!(rows[3].0, longest.values().sum::<usize>(), "{rows:?}");
}

#[test]
fn a_failing_hand_over_ends_the_loop_at_once() {
    // One problem at a time: the first problem's tokens are all the loop may decode once its
    // hand-over fails (a closed stdout, a full disk, a judge that went down).
    let f = fx(12.0);
    let pair = f.pair();
    let ps = three_problems();
    let eos = f.base.config.eos_token_ids.clone();
    for mode in [Mode::Exact, Mode::Cached] {
        let s = Settings {
            batch: 1,
            ..settings(mode, &[0.5, 1.0], &[-1], 5)
        };
        let all = hybrid(&f, &ps, &s);
        assert!(all.iter().all(|o| !o.ids.is_empty()), "{mode:?}");
        // Succeeding: every problem handed over once, as the loop returns it.
        let mut got = vec![None; ps.len()];
        thinksteer::hybrid::hand_over_as_they_finish(
            ps.len(),
            &eos,
            s.max_new_tokens,
            |on_step| run(&pair, &ps, &s, on_step),
            |i, o| {
                assert!(
                    got[i].replace(o.ids.clone()).is_none(),
                    "{mode:?}: {i} twice"
                );
                Ok::<(), thinksteer::Error>(())
            },
        )
        .unwrap();
        let want: Vec<_> = all.iter().map(|o| Some(o.ids.clone())).collect();
        assert_eq!(got, want, "{mode:?}");
        // Failing on the first: no other problem handed over, no token decoded after it.
        let (mut steps, mut handed) = (0, 0);
        let r = thinksteer::hybrid::hand_over_as_they_finish(
            ps.len(),
            &eos,
            s.max_new_tokens,
            |on_step| {
                run(&pair, &ps, &s, |i, t, rec| {
                    steps += 1;
                    on_step(i, t, rec)
                })
            },
            |_, _| {
                handed += 1;
                Err(thinksteer::Error::Input("stdout closed".into()))
            },
        );
        assert!(r.is_err(), "{mode:?}");
        assert_eq!(handed, 1, "{mode:?}");
        assert_eq!(steps, all[0].ids.len(), "{mode:?}");
    }
}
