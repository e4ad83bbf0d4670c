//! Shared test helpers: fixture paths, reading reference tensors, tolerance checks.
#![allow(dead_code)]

use half::bf16;
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

/// Whether the GPU tests can run here. Without CUDA they print "skipped: <reason>" and pass,
/// unless THINKSTEER_EXPECT_GPU=1 (scripts/cuda-emulate/gpu-tests.sh, the GPU check) says a
/// device must be there: then a missing one fails the test instead of passing it unseen.
pub fn cuda_or_skip() -> bool {
    match thinksteer::cuda::available() {
        Ok(()) => true,
        Err(why) if std::env::var("THINKSTEER_EXPECT_GPU").as_deref() == Ok("1") => {
            panic!("THINKSTEER_EXPECT_GPU=1, but CUDA cannot be used: {why}")
        }
        Err(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

/// A bad-input failure of the CLI, as the project promises one: exit code 2, no panic, one line
/// on stderr holding every needle. Returns that line; `case` names the run in a failure.
pub fn one_line_error(out: &std::process::Output, case: &str, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{case}: expected exit 2, stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{case}: panicked: {err}");
    assert_eq!(
        err.lines().count(),
        1,
        "{case}: expected one line, found: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{case}: expected {n:?} in: {err}");
    }
    err
}

/// A copy of fixture checkpoint `name` in a fresh folder `to` (replaced if there), to change.
pub fn copy_fixture(name: &str, to: &std::path::Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
    to.to_path_buf()
}

/// A checkpoint's tensors as (name, dtype, shape, bytes).
pub type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// Rewrites `dir/model.safetensors` with `edit` applied to its tensors.
pub fn rewrite_weights(dir: &std::path::Path, edit: impl FnOnce(&mut Tensors)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<(String, safetensors::tensor::TensorView)> = ts
        .iter()
        .map(|(n, d, s, b)| {
            let view = safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The HF reference tensors recorded by scripts/make_fixtures.py.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn load(model: &str) -> Reference {
        let path = fixture(model).join("reference.safetensors");
        Reference {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid reference file")
    }
    pub fn has(&self, name: &str) -> bool {
        self.st().names().contains(&name)
    }
    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("reference has no {name}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        (bytemuck::pod_collect_to_vec(t.data()), t.shape().to_vec())
    }
    pub fn ids(&self, name: &str) -> Vec<u32> {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("reference has no {name}"));
        match t.dtype() {
            Dtype::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(t.data())
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            Dtype::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(t.data())
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            d => panic!("{name}: unexpected dtype {d:?}"),
        }
    }
}

/// ‖ours − reference‖∞ / max(‖reference‖∞, 1): the relative error the issue bounds.
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "length mismatch");
    let scale = reference.iter().fold(1f32, |m, x| m.max(x.abs()));
    let (mut worst, mut at) = (0f32, 0);
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let e = (a - b).abs();
        if e > worst || e.is_nan() {
            worst = e;
            at = i;
        }
    }
    if worst / scale > 0.0 {
        eprintln!(
            "worst element {at}: ours {} reference {}",
            ours[at], reference[at]
        );
    }
    worst / scale
}

/// The checkpoints the HF fixture script writes.
pub const MODELS: [&str; 5] = [
    "qwen2-f32",
    "qwen2-bf16-tied",
    "llama-f32",
    "llama-bf16-tied",
    "thinking-qwen2-f32",
];

/// A random Qwen2 checkpoint in bf16 of a shape the CUDA kernels take (D 256, 4 heads of 64,
/// 2 kv heads, F 512, V 512), written to a temporary folder; the CPU loads the same bf16 values.
pub fn random_checkpoint(tag: &str, seed: u64, n_layers: usize) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("thinksteer-cuda-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (d, h, hkv, dh, f, v, n) = (
        256usize, 4usize, 2usize, 64usize, 512usize, 512usize, n_layers,
    );
    let config = serde_json::json!({
        "model_type": "qwen2", "hidden_size": d, "intermediate_size": f, "num_hidden_layers": n,
        "num_attention_heads": h, "num_key_value_heads": hkv, "vocab_size": v, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 1024, "tie_word_embeddings": false,
        "eos_token_id": 0
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut rng = thinksteer::rng::Rng::new(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
    let mut add = |name: String, shape: Vec<usize>, mean: f32, std: f32| {
        let n: usize = shape.iter().product();
        let vals: Vec<bf16> = (0..n)
            .map(|_| bf16::from_f32(mean + std * rng.normal() as f32))
            .collect();
        tensors.push((name, shape, bytemuck::cast_slice(&vals).to_vec()));
    };
    // Sublayer gains below 1 keep the random network smooth, so bf16 rounding is not amplified
    // into different greedy choices; a wide LM head keeps top-1 / top-2 well apart.
    let s = |k: usize| 0.6 / (k as f32).sqrt();
    add("model.embed_tokens.weight".into(), vec![v, d], 0.0, 1.0);
    add(
        "lm_head.weight".into(),
        vec![v, d],
        0.0,
        4.0 / (d as f32).sqrt(),
    );
    add("model.norm.weight".into(), vec![d], 1.0, 0.2);
    for l in 0..n {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![d], 1.0, 0.2);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            1.0,
            0.2,
        );
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![h * dh, d],
            0.0,
            s(d),
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![hkv * dh, d],
            0.0,
            s(d),
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![hkv * dh, d],
            0.0,
            s(d),
        );
        add(format!("{p}.self_attn.q_proj.bias"), vec![h * dh], 0.0, 0.1);
        add(
            format!("{p}.self_attn.k_proj.bias"),
            vec![hkv * dh],
            0.0,
            0.1,
        );
        add(
            format!("{p}.self_attn.v_proj.bias"),
            vec![hkv * dh],
            0.0,
            0.1,
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![d, h * dh],
            0.0,
            s(h * dh),
        );
        add(format!("{p}.mlp.gate_proj.weight"), vec![f, d], 0.0, s(d));
        add(format!("{p}.mlp.up_proj.weight"), vec![f, d], 0.0, s(d));
        add(format!("{p}.mlp.down_proj.weight"), vec![d, f], 0.0, s(f));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

/// `thinksteer bench` settings for a few short steps.
pub fn bench_settings(batches: Vec<usize>) -> thinksteer::bench::Settings {
    thinksteer::bench::Settings {
        batches,
        prompt_len: 6,
        new_tokens: 4,
        seed: 1,
        steered_share: None,
        windows: vec![-1],
        chunk: 512,
        marginal: false,
        prefix_caches: None,
    }
}

/// Decode rows: % of the floor = achieved GB/s / the row's copy rate; prefill rows: a share of
/// the tensor-core peak where the card is in the datasheet table, else NaN.
pub fn check_bench_rows(rows: &[thinksteer::bench::Row]) {
    for r in rows {
        assert!(!r.card.is_empty(), "{r:?}");
        assert!(
            r.floor_gb_per_s > 0.0 && r.floor_gb_per_s.is_finite(),
            "{r:?}"
        );
        assert!(r.ms_per_token > 0.0 && r.tok_per_s > 0.0, "{r:?}");
        if r.phase == "prefill" {
            let peak = thinksteer::bench::datasheet_bf16_tflops(&r.card);
            assert_eq!(r.pct_of_floor.is_finite(), peak.is_some(), "{r:?}");
        } else {
            let want = 100.0 * r.gb_per_s / r.floor_gb_per_s;
            assert!(
                (r.pct_of_floor - want).abs() <= 1e-9 * want.max(1.0),
                "{r:?}: % of floor {} is not GB/s / floor {want}",
                r.pct_of_floor
            );
            // tok/s counts every row of the step.
            let want = r.batch as f64 * 1e3 / r.ms_per_token;
            assert!((r.tok_per_s - want).abs() <= 1e-9 * want, "{r:?}");
        }
    }
}

/// Kept residuals against a rerun, on any engine (`Decoder::keep_residuals`, `forward_kept`).
/// Slot 0 takes a 70-token prompt and slot 1 a short one (all but the last token, each in a call
/// of its own: an engine with calls of 40 rows runs slot 0's in two chunks, the first a
/// prefill), then three greedy steps of both; slot 0's newest cached position is then
/// rewritten with steering at `point` (as persistent mode does: its kept residual must stay
/// unsteered). Returns the logits [n, V] of every row of a read-only run over slot 0's last
/// n = `steer.idx.len()` (≤ 72) cached positions, with `steer` added at `point`: (started from
/// the kept residuals, rerun from the ids with the same rows added by a hook at the point), and
/// the greedy ids of the first (`greedy_kept`, a second identical call).
pub fn kept_and_rerun(
    e: &mut dyn thinksteer::engine::Decoder,
    point: usize,
    steer: &thinksteer::engine::SteerRows,
) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    use thinksteer::model::{Hooks, Step};
    let d = e.config().hidden_size;
    let n = steer.idx.len();
    // The rerun's rows written out here (not by `SteerRows::add_to`, which the CPU engine uses).
    let mut add = vec![0f32; n * d];
    for (i, row) in add.chunks_mut(d).enumerate() {
        let j = steer.idx[i] as usize;
        for (a, v) in row.iter_mut().zip(&steer.vecs[j * d..(j + 1) * d]) {
            *a = steer.coef[i] * v;
        }
    }
    e.keep_residuals(point, e.slots()).unwrap();
    let long: Vec<u32> = (0..70u32).map(|i| (i * 37 + 5) % 300).collect();
    let mut seqs = [long, vec![8, 150, 2, 61]];
    for (s, q) in seqs.iter().enumerate() {
        let k = q.len() - 1;
        let (slots, pos): (Vec<usize>, Vec<usize>) = (vec![s; k], (0..k).collect());
        let prompt = Step {
            slots: &slots,
            positions: &pos,
            n_write: k,
            run_start: &[],
        };
        e.forward(&q[..k], &prompt, &[], &mut Hooks::default())
            .unwrap();
    }
    for _ in 0..3 {
        let last: Vec<u32> = seqs.iter().map(|q| q[q.len() - 1]).collect();
        let p: Vec<usize> = seqs.iter().map(|q| q.len() - 1).collect();
        let one = Step {
            slots: &[0, 1],
            positions: &p,
            n_write: 2,
            run_start: &[],
        };
        let next = e.greedy(&last, &one).unwrap();
        for (q, t) in seqs.iter_mut().zip(next) {
            q.push(t);
        }
    }
    // Slot 0 caches positions 0..m; rewrite m − 1 with steering (a different vector).
    let m = seqs[0].len() - 1;
    let other: Vec<f32> = (0..d).map(|i| ((i % 7) as f32 - 3.0) * 0.5).collect();
    let mut hooks = Hooks {
        capture: vec![],
        steer: Some((point, &other)),
    };
    let rewrite = Step {
        slots: &[0],
        positions: &[m - 1],
        n_write: 1,
        run_start: &[],
    };
    e.forward(&seqs[0][m - 1..m], &rewrite, &[], &mut hooks)
        .unwrap();
    let (rs, rp, starts) = (vec![0; n], (m - n..m).collect::<Vec<_>>(), vec![0; n]);
    let run = Step {
        slots: &rs,
        positions: &rp,
        n_write: 0,
        run_start: &starts,
    };
    let rows: Vec<usize> = (0..n).collect();
    let kept = e.forward_kept(&run, steer, &rows).unwrap().to_vec();
    let ids = e.greedy_kept(&run, steer, &rows).unwrap();
    let mut hooks = Hooks {
        capture: vec![],
        steer: Some((point, &add)),
    };
    let rerun = e
        .forward(&seqs[0][m - n..m], &run, &rows, &mut hooks)
        .unwrap()
        .to_vec();
    (kept, rerun, ids)
}

/// Whether a read-only run over a position never written (slot 1, position 60) steered by
/// `vec` [D] gives NaN logits only, on an engine that keeps residuals.
pub fn unwritten_kept_is_nan(e: &mut dyn thinksteer::engine::Decoder, vec: &[f32]) -> bool {
    let never = thinksteer::model::Step {
        slots: &[1],
        positions: &[60],
        n_write: 0,
        run_start: &[],
    };
    let one = thinksteer::engine::SteerRows::own(vec, &[0], &[1.0]);
    let logits = e.forward_kept(&never, &one, &[0]).unwrap();
    logits.iter().all(|x| x.is_nan())
}

/// A window-0 prefix written to a slot of its own, on an engine of ≥ 3 slots, ≥ 70 positions
/// and ≥ 70 + 70 − a rows per call: slot 0 takes a 70-token prompt (kept at `point`; slots 0
/// and 1 keep residuals), slot 2 another, unkept; rows that
/// start from slot 0's kept residuals plus 0.8 · `vec` [D] run in slot 2 and write their K/V
/// there, positions 0..a in one call, then a..70 in a call that also holds a read-only run of
/// all 70 positions in slot 0. Returns the logits [V] of (position a − 1 from the first call,
/// 69 from the second's written rows, 69 from its read-only run) and of one read-only run of
/// the 70 positions alone at (a − 1, 69).
pub fn prefix_in_own_slot(
    e: &mut dyn thinksteer::engine::Decoder,
    point: usize,
    a: usize,
    vec: &[f32],
) -> ([Vec<f32>; 3], [Vec<f32>; 2]) {
    use thinksteer::engine::SteerRows;
    use thinksteer::model::{Hooks, Step};
    const N: usize = 70;
    // Slots 0 and 1 keep residuals; slot 2, the prefix's, keeps none.
    e.keep_residuals(point, 2).unwrap();
    let prompt: Vec<u32> = (0..N as u32).map(|i| (i * 53 + 11) % 300).collect();
    let pos: Vec<usize> = (0..N).collect();
    let write = Step {
        slots: &[0; N],
        positions: &pos,
        n_write: N,
        run_start: &[],
    };
    e.forward(&prompt, &write, &[], &mut Hooks::default())
        .unwrap();
    // An unsteered call writing slot 2, which keeps no residuals: its rows are not kept (a
    // store there would fall outside the kept rows, or onto slot 0's). The calls below rewrite
    // every position of slot 2 it wrote.
    let other = Step {
        slots: &[2; N],
        ..write
    };
    let junk: Vec<u32> = prompt.iter().map(|&t| (t * 7 + 3) % 300).collect();
    e.forward(&junk, &other, &[], &mut Hooks::default())
        .unwrap();
    // Every row: 0.8 · vec, from slot 0's kept residual.
    let (idx, coef, from) = (vec![0u32; 2 * N], vec![0.8f32; 2 * N], vec![0usize; 2 * N]);
    let rows = |t: usize| SteerRows {
        vecs: vec,
        idx: &idx[..t],
        coef: &coef[..t],
        from: &from[..t],
    };
    let first = Step {
        slots: &[2; N][..a],
        positions: &pos[..a],
        n_write: a,
        run_start: &[],
    };
    let l1 = e.forward_kept(&first, &rows(a), &[a - 1]).unwrap().to_vec();
    // Rows a..N written to slot 2, then positions 0..N of slot 0 as one read-only run.
    let (slots, positions): (Vec<usize>, Vec<usize>) =
        (a..N).map(|p| (2, p)).chain((0..N).map(|p| (0, p))).unzip();
    let w = N - a;
    let mixed = Step {
        slots: &slots,
        positions: &positions,
        n_write: w,
        run_start: &[w; N],
    };
    let l2 = e
        .forward_kept(&mixed, &rows(w + N), &[w - 1, w + N - 1])
        .unwrap()
        .to_vec();
    let alone = Step {
        slots: &[0; N],
        positions: &pos,
        n_write: 0,
        run_start: &[0; N],
    };
    let l3 = e
        .forward_kept(&alone, &rows(N), &[a - 1, N - 1])
        .unwrap()
        .to_vec();
    let v = l1.len();
    (
        [l1, l2[..v].to_vec(), l2[v..].to_vec()],
        [l3[..v].to_vec(), l3[v..].to_vec()],
    )
}

/// Steering rows for `kept_and_rerun` over n rows of width d: with `dense`, n vectors, one per
/// row at coefficient 1; else 2 vectors taken in turn at coefficients −1, 0, 0.5, 1, 2, ….
pub fn steer_rows(n: usize, d: usize, dense: bool) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let j = if dense { n } else { 2 };
    let vecs: Vec<f32> = (0..j * d)
        .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.3)
        .collect();
    let idx: Vec<u32> = (0..n).map(|i| (i % j) as u32).collect();
    let coef: Vec<f32> = (0..n)
        .map(|i| {
            if dense {
                1.0
            } else {
                [-1.0, 0.0, 0.5, 1.0, 2.0][i % 5]
            }
        })
        .collect();
    (vecs, idx, coef)
}

/// `greedy_capture` then `logits_at` on any engine: slots 0 and 1 take short prompts (all but
/// the last token), then one decode step of both captures point `p`. Returns (greedy ids [2],
/// residuals [2, D], logits_at of ids [2, 3]: row 0 at 7, 0 and u32::MAX, row 1 at 1, 2, 3).
pub fn greedy_capture_of(
    e: &mut dyn thinksteer::engine::Decoder,
    p: usize,
) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    use thinksteer::model::{Hooks, Step};
    let prompt = Step {
        slots: &[0, 0, 0, 1],
        positions: &[0, 1, 2, 0],
        n_write: 4,
        run_start: &[],
    };
    e.forward(&[5, 77, 30, 8], &prompt, &[], &mut Hooks::default())
        .unwrap();
    let one = Step {
        slots: &[0, 1],
        positions: &[3, 1],
        n_write: 2,
        run_start: &[],
    };
    let (toks, h) = e.greedy_capture(&[12, 150], &one, p).unwrap();
    let at = e.logits_at(&[7, 0, u32::MAX, 1, 2, 3]).unwrap();
    (toks, h, at)
}

/// After `greedy_capture_of(e, p)`: a second `finish_capture` is refused, and so is one after
/// another call; a `start_capture` whose `finish_capture` comes after the engine's other work
/// (another step) is refused too, and the next pair gives what `greedy_capture` gives.
pub fn finish_capture_needs_its_start(e: &mut dyn thinksteer::engine::Decoder, p: usize) {
    use thinksteer::model::Step;
    let refused = |e: &mut dyn thinksteer::engine::Decoder| {
        let err = e.finish_capture().unwrap_err().to_string();
        assert!(
            err.contains("expected the engine's last call to be a start_capture"),
            "{err}"
        );
    };
    refused(e);
    let s42 = Step {
        slots: &[0, 1],
        positions: &[4, 2],
        n_write: 2,
        run_start: &[],
    };
    let s53 = Step {
        positions: &[5, 3],
        ..s42
    };
    e.start_capture(&[3, 9], &s42, p).unwrap();
    e.greedy(&[5, 6], &s53).unwrap();
    refused(e);
    // Positions 4 and 2 again (their K/V rewritten alike).
    e.start_capture(&[3, 9], &s42, p).unwrap();
    let got = e.finish_capture().unwrap();
    refused(e);
    let want = e.greedy_capture(&[3, 9], &s42, p).unwrap();
    assert_eq!(got.0, want.0, "start + finish vs greedy_capture: ids");
    assert_eq!(got.1, want.1, "start + finish vs greedy_capture: residuals");
}

/// A `Decoder` over another that counts the rows of its `forward_kept` calls, (written,
/// read-only), and the written chunks (consecutive positions of one slot) that continue a prefix
/// cache: those starting past position 0.
pub struct Counting<E> {
    pub e: E,
    pub rows: (usize, usize),
    pub resumed: usize,
}

impl<E> Counting<E> {
    pub fn new(e: E) -> Counting<E> {
        Counting {
            e,
            rows: (0, 0),
            resumed: 0,
        }
    }

    fn count(&mut self, step: &thinksteer::model::Step) {
        let w = step.n_write;
        self.rows.0 += w;
        self.rows.1 += step.positions.len() - w;
        self.resumed += (0..w)
            .filter(|&i| {
                let starts = i == 0
                    || step.slots[i] != step.slots[i - 1]
                    || step.positions[i] != step.positions[i - 1] + 1;
                starts && step.positions[i] > 0
            })
            .count();
    }
}

impl<E: thinksteer::engine::Decoder> thinksteer::engine::Decoder for Counting<E> {
    fn config(&self) -> &thinksteer::config::Config {
        self.e.config()
    }
    fn max_len(&self) -> usize {
        self.e.max_len()
    }
    fn slots(&self) -> usize {
        self.e.slots()
    }
    fn max_rows(&self) -> usize {
        self.e.max_rows()
    }
    fn forward(
        &mut self,
        ids: &[u32],
        step: &thinksteer::model::Step,
        logit_rows: &[usize],
        hooks: &mut thinksteer::model::Hooks,
    ) -> thinksteer::Result<&[f32]> {
        self.e.forward(ids, step, logit_rows, hooks)
    }
    fn greedy(
        &mut self,
        ids: &[u32],
        step: &thinksteer::model::Step,
    ) -> thinksteer::Result<Vec<u32>> {
        self.e.greedy(ids, step)
    }
    fn start_capture(
        &mut self,
        ids: &[u32],
        step: &thinksteer::model::Step,
        p: usize,
    ) -> thinksteer::Result<()> {
        self.e.start_capture(ids, step, p)
    }
    fn finish_capture(&mut self) -> thinksteer::Result<(Vec<u32>, Vec<f32>)> {
        self.e.finish_capture()
    }
    fn logits_at(&mut self, ids: &[u32]) -> thinksteer::Result<Vec<f32>> {
        self.e.logits_at(ids)
    }
    fn keep_residuals(&mut self, p: usize, slots: usize) -> thinksteer::Result<()> {
        self.e.keep_residuals(p, slots)
    }
    fn forward_kept(
        &mut self,
        step: &thinksteer::model::Step,
        steer: &thinksteer::engine::SteerRows,
        logit_rows: &[usize],
    ) -> thinksteer::Result<&[f32]> {
        self.count(step);
        self.e.forward_kept(step, steer, logit_rows)
    }
    fn greedy_kept(
        &mut self,
        step: &thinksteer::model::Step,
        steer: &thinksteer::engine::SteerRows,
        logit_rows: &[usize],
    ) -> thinksteer::Result<Vec<u32>> {
        self.count(step);
        self.e.greedy_kept(step, steer, logit_rows)
    }
}
