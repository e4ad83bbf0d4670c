//! The hybrid step on the GPU against the CPU loop, on two random bf16 checkpoints of a shape
//! the kernels take (base: 3 layers, thinking: 4 layers, one vocabulary), a random SAE and a
//! random steering set. Without a GPU every test prints "skipped: <reason>" and passes.
//!
//! The GPU rounds activations to bf16 (see tests/cuda_model.rs), so a decision can flip where
//! the CPU's choice is a near tie; the checkpoints' logits are well separated and the tests
//! compare the first tokens, where no such tie occurs for these seeds (the CPU margins are
//! printed so a failure can be told apart from a tie).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use thinksteer::cpu_ops::argmax;
use thinksteer::cuda::hybrid::{CudaHybrid, GpuHybrid};
use thinksteer::cuda::model::CudaEngine;
use thinksteer::cuda::Gpu;
use thinksteer::engine::{CpuEngine, Decoder, SteerRows};
use thinksteer::hybrid::{run, run_cached, Mode, Output, Pair, Prompts, Settings, StepRecord};
use thinksteer::model::{Model, Slots, Step};
use thinksteer::sae::Sae;
use thinksteer::steering::SteeringSet;

fn gpu() -> Option<Arc<Gpu>> {
    common::cuda_or_skip()
        .then(|| Arc::new(Gpu::new(0).expect("CUDA is available but Gpu::new failed")))
}

fn problems() -> Vec<Prompts> {
    vec![
        Prompts {
            base: vec![5, 77, 301, 12, 9, 44],
            thinking: vec![7, 8, 9, 100, 200],
        },
        Prompts {
            base: vec![400, 3, 3, 17],
            thinking: vec![11, 250, 480, 2, 90, 91, 92, 93],
        },
        Prompts {
            base: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
            thinking: vec![42],
        },
    ]
}

/// The GPU's outputs against the CPU loop's over each problem's first 6 tokens: the same ids,
/// and at each step the same category, gate and change of the base model's token. The winning coefficient and window are printed
/// where they differ (two candidates can yield the same emitted token; which of them wins then
/// hinges on a candidate's own greedy token, which bf16 rounding may flip at a near tie without
/// changing the output). Returns the CPU's compared steered steps that `count` accepts.
fn same_start(
    got: &[Output],
    want: &[Output],
    what: &str,
    count: impl Fn(&StepRecord) -> bool,
) -> usize {
    let mut n = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let k = 6.min(w.ids.len());
        assert_eq!(g.ids[..k], w.ids[..k], "{what}: problem {i} ids");
        for (j, (gs, ws)) in g.steps[..k].iter().zip(&w.steps[..k]).enumerate() {
            assert_eq!(
                (gs.category, gs.steered, gs.changed),
                (ws.category, ws.steered, ws.changed),
                "{what}: problem {i} step {j}"
            );
            if (gs.coef, gs.window) != (ws.coef, ws.window) {
                println!(
                    "{what}: problem {i} step {j}: winner {:?} {:?} on the GPU, {:?} {:?} on the CPU (same token)",
                    gs.coef, gs.window, ws.coef, ws.window
                );
            }
        }
        n += w.steps[..k]
            .iter()
            .filter(|s| s.steered && count(s))
            .count();
    }
    n
}

/// Two random bf16 checkpoints (base: 3 layers, thinking: 4), a random SAE and steering set.
struct Fixture {
    base_dir: PathBuf,
    think_dir: PathBuf,
    base: Arc<Model>,
    think: Arc<Model>,
    sae: Sae,
    steering: SteeringSet,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let base_dir = common::random_checkpoint(&format!("hy-base-{tag}"), 7, 3);
        let think_dir = common::random_checkpoint(&format!("hy-think-{tag}"), 8, 4);
        Fixture {
            base: Arc::new(Model::load(&base_dir).unwrap()),
            think: Arc::new(Model::load(&think_dir).unwrap()),
            base_dir,
            think_dir,
            sae: Sae::random(256, 6, 2, 3, 3, "think"),
            steering: SteeringSet::random(256, 6, 1, 40.0, 4, "base"),
        }
    }

    fn pair(&self) -> Pair<'_> {
        Pair {
            base: &self.base,
            thinking: &self.think,
            sae: &self.sae,
            steering: &self.steering,
        }
    }
}

fn compare(mode: Mode, no_gating: bool) {
    let Some(g) = gpu() else { return };
    let f = Fixture::new(&format!("{mode:?}-{no_gating}"));
    let (base_dir, think_dir) = (f.base_dir.as_path(), f.think_dir.as_path());
    let (sae, steering) = (&f.sae, &f.steering);
    let n = 12;
    let s = Settings {
        mode,
        coefficients: vec![0.25, 0.5, 1.0, 2.0],
        windows: vec![-1],
        max_new_tokens: n,
        no_gating,
        ..Settings::default()
    };
    let pair = f.pair();
    let ps = problems();
    let want = run(&pair, &ps, &s, |_, _, _| {}).unwrap();
    let b = ps.len();
    let c = s.coefficients.len();
    // The thinking model on the base model's stream, then on a sibling stream (concurrent).
    for two_streams in [false, true] {
        let tg = if two_streams {
            Arc::new(g.sibling().unwrap())
        } else {
            g.clone()
        };
        let te = CudaEngine::load(tg, think_dir, b, 64, 64).unwrap();
        let be = CudaEngine::load(g.clone(), base_dir, b, 64, 64.max(b * (1 + c))).unwrap();
        let mut hy = CudaHybrid::new(te, be, sae, steering, &s, b).unwrap();
        // Both ways of running a step (single pass, gate first), eagerly and from CUDA graphs;
        // then from graphs with RoPE inside decode attention (both models).
        for (gate_first, use_graphs, rope) in [
            (false, false, false),
            (false, true, false),
            (true, false, false),
            (true, true, false),
            (false, true, true),
            (true, true, true),
        ] {
            // Later runs reuse the caches: every step writes its position before any later step
            // reads it, so no reset is needed.
            hy.use_graphs = use_graphs;
            hy.gate_first = Some(gate_first);
            hy.base.rope_in_attention = rope;
            hy.think.rope_in_attention = rope;
            let got = hy.run(&ps, |_, _, _| {}).unwrap();
            let what = format!("{mode:?} two streams {two_streams} gate first {gate_first} graphs {use_graphs} rope in attention {rope}");
            let steered = same_start(&got, &want, &what, |_| true);
            assert!(
                steered > 0,
                "no steered step compared: the test would not check the candidates"
            );
        }
    }
    // Two slots for three problems: the third takes the first slot that frees up.
    let te = CudaEngine::load(Arc::new(g.sibling().unwrap()), think_dir, 2, 64, 64).unwrap();
    let be = CudaEngine::load(g, base_dir, 2, 64, 64.max(2 * (1 + c))).unwrap();
    let mut hy2 = CudaHybrid::new(te, be, sae, steering, &s, 2).unwrap();
    for gate_first in [false, true] {
        hy2.gate_first = Some(gate_first);
        let got = hy2.run(&ps, |_, _, _| {}).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let k = 6.min(w.ids.len());
            assert_eq!(
                g.ids[..k],
                w.ids[..k],
                "{mode:?} two slots, gate first {gate_first}: problem {i} ids"
            );
        }
    }
    // A callback that asks to stop (a hand-over that failed) ends the loop at that token,
    // in the middle of a step of two problems.
    if mode == Mode::Cached && !no_gating {
        let mut seen = 0;
        let got = hy2
            .run(&ps, |_, _, _| {
                seen += 1;
                match seen {
                    5 => std::ops::ControlFlow::Break(()),
                    _ => std::ops::ControlFlow::Continue(()),
                }
            })
            .unwrap();
        assert_eq!(seen, 5);
        assert_eq!(got.iter().map(|o| o.ids.len()).sum::<usize>(), 5);
    }
}

#[test]
fn cached_gpu_step_matches_the_cpu_loop() {
    compare(Mode::Cached, false);
}

#[test]
fn persistent_gpu_step_matches_the_cpu_loop() {
    compare(Mode::Persistent, false);
}

#[test]
fn ungated_gpu_step_matches_the_cpu_loop() {
    compare(Mode::Cached, true);
}

/// The one-graph step with each ablation that changes it (only the bias vector, the steering at
/// the input of the block, the SAE on raw activations) against the CPU loop with the same flag.
/// Each flag must change the CPU's tokens or categories, so a GPU step that ignored it fails.
#[test]
fn ablations_on_the_gpu_step_match_the_cpu_loop() {
    let Some(g) = gpu() else { return };
    let mut f = Fixture::new("ablations");
    // An activation mean (without one the SAE's input is the raw activation anyway, and the
    // random SAE's zero biases make its argmax blind to the unit-norm scaling).
    let d = f.sae.d;
    f.sae.activation_mean = Some(
        (0..d)
            .map(|i| ((i * 7919 % 13) as f32 - 6.0) * 0.3)
            .collect(),
    );
    let pair = f.pair();
    let ps = problems();
    let plain = Settings {
        coefficients: vec![0.5, 2.0],
        max_new_tokens: 8,
        ..Settings::default()
    };
    let unablated = run(&pair, &ps, &plain, |_, _, _| {}).unwrap();
    let cases = [
        (
            "only bias",
            Settings {
                only_bias: true,
                ..plain.clone()
            },
        ),
        (
            "steering at the block input",
            Settings {
                steer_at_block_input: true,
                ..plain.clone()
            },
        ),
        (
            "raw SAE activations",
            Settings {
                sae_raw_activations: true,
                ..plain.clone()
            },
        ),
    ];
    for (what, s) in cases {
        let want = run(&pair, &ps, &s, |_, _, _| {}).unwrap();
        let changed = want.iter().zip(&unablated).any(|(w, u)| {
            let k = 6.min(w.ids.len()).min(u.ids.len());
            let cats = |o: &Output| o.steps[..k].iter().map(|s| s.category).collect::<Vec<_>>();
            w.ids[..k] != u.ids[..k] || cats(w) != cats(u)
        });
        assert!(
            changed,
            "{what}: the flag changes nothing on the CPU, so the test would not check it"
        );
        let b = ps.len();
        let te = CudaEngine::load(Arc::new(g.sibling().unwrap()), &f.think_dir, b, 64, 64).unwrap();
        let be = CudaEngine::load(g.clone(), &f.base_dir, b, 64, 64.max(b * 3)).unwrap();
        let mut hy = CudaHybrid::new(te, be, &f.sae, &f.steering, &s, b).unwrap();
        hy.use_graphs = true;
        let got = hy.run(&ps, |_, _, _| {}).unwrap();
        let steered = same_start(&got, &want, what, |_| true);
        assert!(steered > 0, "{what}: no steered step compared");
    }
}

/// The host-driven loop on two CUDA engines (`GpuHybrid::Engines`: windows other than -1, and
/// --random-firing) against the CPU loop: the candidates of windows 0 and -3 are read-only runs,
/// or window 0's continue prefix caches (calls of written chunks in several slots, beside
/// read-only runs or alone; every step steered, and some chunk must continue a cache past
/// position 0). Each case also checks that some step was won by a window other than -1 on the
/// CPU, so the runs decided something.
#[test]
fn windowed_gpu_loop_matches_the_cpu_loop() {
    let Some(g) = gpu() else { return };
    let f = Fixture::new("windows");
    let (base_dir, think_dir) = (f.base_dir.as_path(), f.think_dir.as_path());
    let pair = f.pair();
    let ps = problems();
    // (windows, --random-firing, window-0 prefix caches: none, 4 (fewer than the 6 window-0
    // candidates of a step), one per (slot, category, coefficient))
    let all = 2 * pair.sae.latents * 3;
    let cases = [
        (vec![0, -1, -3], None, 0),
        (vec![0, -1, -3], None, 4),
        (vec![0], None, all),
        (vec![-1], Some(5), 0),
    ];
    for (i, (windows, random_firing, caches)) in cases.into_iter().enumerate() {
        // The thinking engine on the base engine's stream, or on a sibling stream (as
        // `GpuHybrid::load` puts it): its step then runs while the base model's does.
        let two_streams = i % 2 == 1;
        let s = Settings {
            mode: Mode::Cached,
            coefficients: vec![0.25, 1.0, 2.0],
            windows: windows.clone(),
            max_new_tokens: 8,
            random_firing,
            batch: 2,
            no_gating: caches > 0,
            ..Settings::default()
        };
        let want = run(&pair, &ps, &s, |_, _, _| {}).unwrap();
        // Two slots for three problems. Calls of 2 rows in the thinking engine (each prompt is
        // fed in several calls before the one-token-per-row greedy_capture) and 20 in the base
        // engine, which takes a whole sequence (window 0) in one call; its slots past the
        // first two hold the prefix caches, in the blocks from the steering point on only (as
        // `GpuHybrid::load` makes them).
        let tg = match two_streams {
            true => Arc::new(g.sibling().unwrap()),
            false => g.clone(),
        };
        let te = CudaEngine::load(tg, think_dir, 2, 64, 2).unwrap();
        let slots = Slots {
            all: 2,
            late: caches,
            from: pair.artifacts().steer_point(&s),
        };
        let be = CudaEngine::load(g.clone(), base_dir, slots, 64, 20).unwrap();
        // The loop GpuHybrid::Engines runs, with the base engine's candidate rows counted.
        let (mut be, mut te) = (common::Counting::new(be), te);
        let got = run_cached(pair.artifacts(), &mut be, &mut te, &ps, &s, |_, _, _| {}).unwrap();
        let what =
            format!("windows {windows:?}, {caches} prefix caches, two streams {two_streams}");
        let longer = same_start(&got, &want, &what, |s| s.window != Some(-1));
        if windows != [-1] {
            assert!(
                longer > 0,
                "no step won by a longer window: the runs decided nothing"
            );
        }
        if caches > 0 {
            assert!(be.resumed > 0, "{what}: no prefix cache continued");
        }
    }
}

/// The kept residuals of a CUDA engine (stored by prefill chunks and the decode graph, loaded by
/// a read-only run) against a rerun of the window on the same engine and against the CPU
/// engine's kept residuals, before the first block, in the middle and after the last (base: 3
/// blocks); a 40-row window (its attention on the prefill tiles, and on the decode kernels), and a
/// 1-row one with RoPE inside decode attention. Logits within
/// 2^-5 of their scale: the tolerance of tests/cuda_model.rs (bf16 rounding of the products'
/// inputs and the cache).
#[test]
fn kept_residuals_on_the_gpu_match_a_rerun_and_the_cpu() {
    let Some(g) = gpu() else { return };
    const TOL: f32 = 1.0 / 32.0;
    let f = Fixture::new("kept");
    let d = f.base.config.hidden_size;
    // (point, rows, dense, RoPE in attention, runs on the decode kernels instead of the tiles,
    // rows per call: 40 stores the prompt in two chunks, 80 in one and runs 70 rows in two
    // query tiles)
    let cases = [
        (0, 40, true, false, false, 40),
        (1, 40, true, false, false, 40),
        (3, 40, true, false, false, 40),
        (1, 40, false, false, false, 40),
        (1, 40, true, false, true, 40),
        (1, 1, true, true, false, 40),
        (1, 70, false, false, false, 80),
    ];
    for (point, rows, dense, rope, decode, max_t) in cases {
        let (vecs, idx, coef) = common::steer_rows(rows, d, dense);
        let steer = SteerRows::own(&vecs, &idx, &coef);
        let what = format!(
            "point {point}, {rows} rows, dense {dense}, RoPE in attention {rope}, decode kernels {decode}"
        );
        let mut cpu = CpuEngine::new(f.base.clone(), 2, 80);
        let (want, _, _) = common::kept_and_rerun(&mut cpu, point, &steer);
        let mut e = CudaEngine::load(g.clone(), &f.base_dir, 2, 80, max_t).unwrap();
        e.rope_in_attention = rope;
        e.run_attn = !decode;
        // A decode graph captured before keep_residuals must not be replayed after it.
        let warm = Step {
            slots: &[0, 1],
            positions: &[0, 0],
            n_write: 2,
            run_start: &[],
        };
        e.greedy(&[1, 2], &warm).unwrap();
        let (kept, rerun, ids) = common::kept_and_rerun(&mut e, point, &steer);
        // A position never written reads NaN, not a plausible zero.
        assert!(
            common::unwritten_kept_is_nan(&mut e, &vecs[..d]),
            "{what}: unwritten kept row"
        );
        // The device's argmax of the same launches: the host's argmax of the logits.
        let v = f.base.config.vocab_size;
        let want_ids: Vec<u32> = kept.chunks(v).map(|l| argmax(l) as u32).collect();
        assert_eq!(ids, want_ids, "{what}: greedy_kept");
        // Row by row: each row's logits follow its own kept residual most closely.
        let v = f.base.config.vocab_size;
        for (i, ((k, r), w)) in kept
            .chunks(v)
            .zip(rerun.chunks(v))
            .zip(want.chunks(v))
            .enumerate()
        {
            let e1 = common::rel_err(k, r);
            assert!(
                e1 <= TOL,
                "{what}: row {i}, kept vs rerun on the GPU, rel. error {e1}"
            );
            let e2 = common::rel_err(k, w);
            assert!(e2 <= TOL, "{what}: row {i}, GPU vs CPU, rel. error {e2}");
        }
    }
}

/// A window-0 prefix written to a slot of its own on the GPU (`common::prefix_in_own_slot`:
/// from slot 0's kept residuals; a 37-row first call on the prefill kernel, or a 1-row one;
/// then the rest beside a 70-row read-only run, on the run tiles or the decode kernels) against
/// the read-only run alone and against the CPU, within the tolerance of the kept test above.
#[test]
fn a_window_0_prefix_in_its_own_slot_on_the_gpu_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    const TOL: f32 = 1.0 / 32.0;
    let f = Fixture::new("prefix");
    let d = f.base.config.hidden_size;
    let vec: Vec<f32> = (0..d).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.3).collect();
    for (point, a, decode) in [(1, 37, false), (0, 37, true), (3, 1, false)] {
        let what = format!("point {point}, first call {a} rows, decode kernels {decode}");
        let mut cpu = CpuEngine::new(f.base.clone(), 3, 80);
        let (want, _) = common::prefix_in_own_slot(&mut cpu, point, a, &vec);
        let mut e = CudaEngine::load(g.clone(), &f.base_dir, 3, 80, 160).unwrap();
        e.run_attn = !decode;
        let (got, alone) = common::prefix_in_own_slot(&mut e, point, a, &vec);
        let names = ["first call", "written rows", "read-only run beside them"];
        for (i, (x, w)) in got.iter().zip(&want).enumerate() {
            let e1 = common::rel_err(x, w);
            assert!(
                e1 <= TOL,
                "{what}: {}, GPU vs CPU, rel. error {e1}",
                names[i]
            );
            let e2 = common::rel_err(x, &alone[[0, 1, 1][i]]);
            assert!(
                e2 <= TOL,
                "{what}: {}, vs the run alone, rel. error {e2}",
                names[i]
            );
        }
    }
}

/// A prompt that fills the base model's context gets an empty output and the other problems
/// go on, in the one-graph step and in the host-driven loop alike, as on the CPU; a prompt one
/// short of the context gets one token.
#[test]
fn a_prompt_that_fills_the_context_gets_an_empty_output_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let f = Fixture::new("full");
    let (base_dir, think_dir) = (f.base_dir.as_path(), f.think_dir.as_path());
    let pair = f.pair();
    let mut ps = problems();
    ps.push(Prompts {
        base: (1..=12).collect(),
        thinking: vec![3, 4],
    });
    let ctx = 12; // problem 2 (11 tokens) has room for one token, problem 3 for none
    for windows in [vec![-1], vec![0, -1]] {
        let s = Settings {
            mode: Mode::Cached,
            coefficients: vec![0.5, 2.0],
            windows: windows.clone(),
            max_new_tokens: 6,
            batch: 2,
            ..Settings::default()
        };
        let mut cb = CpuEngine::new(f.base.clone(), 2, ctx);
        let mut ct = CpuEngine::new(f.think.clone(), 2, 64);
        let want = run_cached(pair.artifacts(), &mut cb, &mut ct, &ps, &s, |_, _, _| {}).unwrap();
        assert_eq!(want[2].ids.len(), 1, "the CPU loop: one token of room");
        assert!(want[3].ids.is_empty(), "the CPU loop: no room");
        let te = CudaEngine::load(g.clone(), think_dir, 2, 64, 64).unwrap();
        let be = CudaEngine::load(g.clone(), base_dir, 2, ctx, 16).unwrap();
        let mut hy = if windows == [-1] {
            GpuHybrid::Step(Box::new(
                CudaHybrid::new(te, be, &f.sae, &f.steering, &s, 2).unwrap(),
            ))
        } else {
            GpuHybrid::Engines {
                base: Box::new(be),
                think: Box::new(te),
            }
        };
        let got = hy.run(pair.artifacts(), &ps, &s, |_, _, _| {}).unwrap();
        let what = format!("windows {windows:?}, context {ctx}");
        same_start(&got, &want, &what, |_| true);
        let lens: Vec<usize> = got.iter().map(|o| o.ids.len()).collect();
        let want_lens: Vec<usize> = want.iter().map(|o| o.ids.len()).collect();
        assert_eq!(lens, want_lens, "{what}: output lengths");
    }
}

/// `greedy_capture` (from a decode graph, replayed on the second call; one engine for both
/// points, so the stash point is part of the graph's key) and `logits_at` on the GPU against the
/// CPU engine: the same ids, residuals and logits within 2^-5 of their scale (the tolerance of
/// tests/cuda_model.rs); a plain decode step in between drops the logits `logits_at` reads.
#[test]
fn greedy_capture_and_logits_at_match_the_cpu() {
    let Some(g) = gpu() else { return };
    const TOL: f32 = 1.0 / 32.0;
    let f = Fixture::new("capture");
    let mut e = CudaEngine::load(g.clone(), &f.base_dir, 2, 16, 8).unwrap();
    for p in [1, 3] {
        let mut cpu = CpuEngine::new(f.base.clone(), 2, 16);
        let (want_t, want_h, want_at) = common::greedy_capture_of(&mut cpu, p);
        for call in 0..2 {
            let (toks, h, at) = common::greedy_capture_of(&mut e, p);
            let what = format!("point {p}, call {call}");
            assert_eq!(toks, want_t, "{what}: ids");
            let eh = common::rel_err(&h, &want_h);
            assert!(eh <= TOL, "{what}: residuals, rel. error {eh}");
            // The same entries finite (u32::MAX: −inf), then the values.
            let finite = |x: &[f32]| x.iter().map(|v| v.is_finite()).collect::<Vec<_>>();
            assert_eq!(finite(&at), finite(&want_at), "{what}: {at:?}");
            assert_eq!(finite(&at), [true, true, false, true, true, true]);
            let keep = |x: &[f32]| {
                x.iter()
                    .copied()
                    .filter(|v| v.is_finite())
                    .collect::<Vec<_>>()
            };
            let ea = common::rel_err(&keep(&at), &keep(&want_at));
            assert!(ea <= TOL, "{what}: logits_at, rel. error {ea}");
        }
        let step = Step {
            slots: &[0, 1],
            positions: &[4, 2],
            n_write: 2,
            run_start: &[],
        };
        e.decode_greedy(&[4, 4], &step).unwrap();
        let err = e.logits_at(&[1, 2]).unwrap_err().to_string();
        assert!(err.contains("not a greedy_capture"), "{err}");
        common::finish_capture_needs_its_start(&mut e, p);
    }
}

/// Prefix-cache slots on the GPU exist only in the blocks from the steering point on (base: 3
/// blocks, the late slot from block 2): a decode step through every block may not use it, its
/// K/V can be read in blocks 2.. only, and a write from the kept residuals at the point reaches
/// it there.
#[test]
fn prefix_cache_slots_on_the_gpu_exist_only_from_the_steering_point() {
    let Some(g) = gpu() else { return };
    let f = Fixture::new("late");
    let slots = Slots {
        all: 2,
        late: 1,
        from: 2,
    };
    let mut e = CudaEngine::load(g, &f.base_dir, slots, 16, 8).unwrap();
    assert_eq!(e.slots(), 3);
    let write = |slot: &'static [usize]| Step {
        slots: slot,
        positions: &[0],
        n_write: 1,
        run_start: &[],
    };
    let err = e.greedy(&[3], &write(&[2])).unwrap_err().to_string();
    assert!(
        err.contains("slot 2 holds K/V only in blocks 2 on (a prefix cache)"),
        "{err}"
    );
    e.keep_residuals(2, 2).unwrap();
    e.greedy(&[3], &write(&[1])).unwrap();
    let add = vec![0.5f32; f.base.config.hidden_size];
    let from_1 = SteerRows {
        from: &[1],
        ..SteerRows::own(&add, &[0], &[1.0])
    };
    e.forward_kept(&write(&[2]), &from_1, &[0]).unwrap();
    for l in 0..2 {
        let err = e.kv_rows(l, 2, 0..1).unwrap_err().to_string();
        assert!(err.contains("slot < 2 (in that block)"), "block {l}: {err}");
    }
    let (k, v) = e.kv_rows(2, 2, 0..1).unwrap();
    assert!(k.iter().chain(&v).all(|x| x.is_finite()) && k.iter().any(|&x| x != 0.0));
}

/// The thinking model on a second GPU (`--thinking-gpu 1`): the host-driven loop with its two
/// engines on two devices gives the ids and steps of the same loop on one device
/// (`thinking_gpu: Some(0)`) bit for bit — the same kernels on the same inputs — and the CPU
/// loop's first tokens; with the paper's windows too. Skipped with fewer than two devices (the
/// emulated driver has two, and refuses a kernel launched in the other device's context or
/// given the other device's memory).
#[test]
fn the_thinking_model_on_a_second_gpu_changes_nothing() {
    let Some(_) = gpu() else { return };
    let count = thinksteer::cuda::device_count().unwrap();
    if count < 2 {
        println!("skipped: {count} CUDA device, the test needs two");
        return;
    }
    let f = Fixture::new("two-gpus");
    let pair = f.pair();
    let ps = problems();
    for windows in [vec![-1], vec![0, -1, -3]] {
        let one = Settings {
            mode: Mode::Cached,
            coefficients: vec![0.25, 1.0, 2.0],
            windows: windows.clone(),
            max_new_tokens: 8,
            batch: 2,
            thinking_gpu: Some(0),
            ..Settings::default()
        };
        let two = Settings {
            thinking_gpu: Some(1),
            ..one.clone()
        };
        let want = run(&pair, &ps, &one, |_, _, _| {}).unwrap();
        let mut outs = vec![];
        for (s, device) in [(&one, 0), (&two, 1)] {
            let mut h =
                GpuHybrid::load(&f.base_dir, &f.think_dir, &f.sae, &f.steering, s, 2, 64, 64)
                    .unwrap();
            assert!(
                matches!(h, GpuHybrid::Engines { .. }),
                "the host-driven loop"
            );
            let (think, base) = h.engines_mut();
            assert_eq!(
                (think.gpu.ctx.ordinal(), base.gpu.ctx.ordinal()),
                (device, 0)
            );
            outs.push(h.run(pair.artifacts(), &ps, s, |_, _, _| {}).unwrap());
        }
        let what = format!("windows {windows:?}");
        for (i, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
            assert_eq!(a.ids, b.ids, "{what}: problem {i} ids, one device vs two");
            assert_eq!(
                a.steps, b.steps,
                "{what}: problem {i} steps, one device vs two"
            );
        }
        same_start(&outs[1], &want, &format!("{what}, two devices"), |_| true);
    }
}
