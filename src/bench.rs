//! `thinksteer bench`: prefill and decode throughput of a model shape, with achieved bandwidth
//! next to the floor (weight bytes / HBM bandwidth). Named shapes get random weights of the real
//! shape generated on the device; a checkpoint folder is loaded as is. Every timed decode step
//! is checked for valid ids before its time counts.

use crate::config::Config;
use crate::cuda::model::{CudaEngine, CudaWeights};
use crate::cuda::Gpu;
use crate::engine::{CpuEngine, Decoder};
use crate::model::{Hooks, Step};
use crate::rng::Rng;
use crate::{bail, Result};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The card a benchmark ran on, and the two rates its percentages are taken against.
#[derive(Debug, Clone, Serialize)]
pub struct Card {
    pub name: String,
    /// Copy rate measured at the start of the run (bytes read + written, best of several
    /// timings of a buffer larger than any cache; on the CPU by every thread at once): the
    /// bandwidth of the floor.
    pub copy_gb_per_s: f64,
    /// Dense bf16 tensor-core peak (f32 accumulation) from the vendor's datasheet, by card name;
    /// None for a card not in [`datasheet_bf16_tflops`] (the CPU, the emulated driver).
    pub bf16_tflops: Option<f64>,
}

/// Bytes per copy of [`Card`]'s copy rate: 256 MiB, 5× the L2 of an H100 or H200.
const COPY_BYTES: usize = 256 << 20;
/// Timings taken (the best counts), and on the GPU copies per timing: ~0.9 ms of copying at
/// 4.8 TB/s, against which the launch and the synchronisation (a few µs) are under 1%.
const COPY_REPS: usize = 5;
const COPIES_PER_TIMING: usize = 8;

/// Dense bf16 tensor-core TFLOP/s with f32 accumulation, from NVIDIA's datasheets, by the name
/// the driver reports (more specific names first).
pub fn datasheet_bf16_tflops(name: &str) -> Option<f64> {
    const TABLE: &[(&str, f64)] = &[
        ("H100 PCIe", 756.0),
        ("H100 NVL", 835.0),
        ("H200 NVL", 835.0),
        ("GH200", 989.0),
        ("H100", 989.0),
        ("H200", 989.0),
        ("H800", 989.0),
        ("A100", 312.0),
        ("A800", 312.0),
        ("L40S", 362.0),
        ("L40", 181.0),
        ("L4", 121.0),
        ("B200", 2250.0),
    ];
    TABLE
        .iter()
        .find(|(k, _)| name.contains(k))
        .map(|&(_, t)| t)
}

impl Card {
    /// The GPU of `gpu`, its copy rate measured on its stream now.
    pub fn cuda(gpu: &Gpu) -> Result<Card> {
        use crate::cuda::cuda_err as err;
        let name = gpu.ctx.name().map_err(err("reading the device name"))?;
        let src = gpu
            .stream
            .alloc_zeros::<u8>(COPY_BYTES)
            .map_err(err("allocating the copy benchmark's buffers"))?;
        let mut dst = gpu
            .stream
            .alloc_zeros::<u8>(COPY_BYTES)
            .map_err(err("allocating the copy benchmark's buffers"))?;
        let mut best = f64::INFINITY;
        for i in 0..=COPY_REPS {
            gpu.stream.synchronize().map_err(err("synchronising"))?;
            let t0 = Instant::now();
            for _ in 0..COPIES_PER_TIMING {
                gpu.stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(err("timing a device-to-device copy"))?;
            }
            gpu.stream.synchronize().map_err(err("synchronising"))?;
            if i > 0 {
                best = best.min(t0.elapsed().as_secs_f64() / COPIES_PER_TIMING as f64);
            }
        }
        Ok(Card {
            bf16_tflops: datasheet_bf16_tflops(&name),
            name,
            copy_gb_per_s: 2.0 * COPY_BYTES as f64 / best / 1e9,
        })
    }

    /// This machine's CPU, its memory copy rate measured now with every thread of the pool the
    /// CPU engine decodes on.
    pub fn cpu() -> Card {
        use rayon::prelude::*;
        let src = vec![1u8; COPY_BYTES];
        let mut dst = vec![0u8; COPY_BYTES];
        let threads = rayon::current_num_threads();
        let chunk = COPY_BYTES.div_ceil(threads);
        let mut best = f64::INFINITY;
        for i in 0..=COPY_REPS {
            let t0 = Instant::now();
            dst.par_chunks_mut(chunk)
                .zip(std::hint::black_box(&src).par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            std::hint::black_box(&dst);
            if i > 0 {
                best = best.min(t0.elapsed().as_secs_f64());
            }
        }
        Card {
            name: format!("cpu ({threads} threads)"),
            copy_gb_per_s: 2.0 * COPY_BYTES as f64 / best / 1e9,
            bf16_tflops: None,
        }
    }

    /// One line saying what the percentages of a run are taken against (printed to stderr).
    pub fn describe(&self) -> String {
        let peak = self.bf16_tflops.map_or(
            "bf16 tensor-core peak unknown (not in the datasheet table)".to_string(),
            |t| format!("bf16 tensor-core peak {t:.0} TFLOP/s (datasheet)"),
        );
        format!(
            "card: {}; copy {:.0} GB/s measured (the floor's bandwidth); {peak}",
            self.name, self.copy_gb_per_s
        )
    }
}

/// The real configurations of the named benchmark shapes, and `tiny`: 12 small Qwen2-style
/// layers (head_dim 64, enough blocks for the hybrid bench's SAE and steering points) for
/// running the benchmarks' code paths where time means nothing, e.g. on the emulated CUDA
/// driver (`scripts/cuda-emulate/`).
pub fn named_shape(name: &str) -> Option<Config> {
    let json = match name {
        "tiny" => serde_json::json!({
            "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 12,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": true,
            "eos_token_id": 0
        }),
        "qwen2.5-1.5b" => serde_json::json!({
            "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": true,
            "eos_token_id": 151643
        }),
        "llama-3.1-8b" => serde_json::json!({
            "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": false,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "eos_token_id": [128001, 128008, 128009]
        }),
        _ => return None,
    };
    Some(Config::from_json(&json.to_string()).expect("named shapes are valid configs"))
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub shape: String,
    pub device: String,
    /// The card's name (`Card::name`).
    pub card: String,
    /// The bandwidth the floor is taken at: the card's measured copy rate (`Card`).
    pub floor_gb_per_s: f64,
    pub phase: &'static str,
    pub batch: usize,
    pub tokens: usize,
    /// Milliseconds per decode step (all rows) or per prefill token.
    pub ms_per_token: f64,
    pub tok_per_s: f64,
    /// Weight bytes streamed per step / step time (decode).
    pub gb_per_s: f64,
    /// Floor time / measured time (decode), or achieved / peak FLOP rate (prefill; NaN, written
    /// as null, where the card's peak is not known).
    pub pct_of_floor: f64,
    /// Hybrid rows: step time / (thinking decode step + base decode step), same batch, same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_plain: Option<f64>,
    /// Hybrid rows: steered steps / all steps of the timed run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steered_fraction: Option<f64>,
}

pub struct Settings {
    pub batches: Vec<usize>,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub seed: u64,
    /// Hybrid only: the thinking model shares the base model's weights and this share of the
    /// problems gets a thinking prompt of its own; the others agree with the base model at every
    /// step, so about this share of the steps is steered. None: two independent random models
    /// (nearly every step steered).
    pub steered_share: Option<f64>,
    /// Hybrid only: steering windows; other than [-1], the host-driven loop is timed.
    pub windows: Vec<i64>,
    /// Hybrid with window 0: the base engine's window-0 prefix caches (`hybrid::prefix`; None:
    /// as many as useful and fit).
    pub prefix_caches: Option<usize>,
    /// Rows per forward call (the prefill chunk; at least the largest batch): 512 in generate,
    /// eval and the other commands.
    pub chunk: usize,
    /// GPU decode: also time each batch with each kind of launch of its step left out in turn
    /// (`marginal_costs`), printed to stderr.
    pub marginal: bool,
}

fn random_ids(n: usize, v: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.below(v) as u32).collect()
}

/// Prefills `b` random prompts, then times `new_tokens` greedy steps of all rows.
fn decode_rows<E: Decoder>(
    e: &mut E,
    mut greedy: impl FnMut(&mut E, &[u32], &Step) -> Result<Vec<u32>>,
    b: usize,
    s: &Settings,
) -> Result<f64> {
    let v = e.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..b)
        .map(|i| random_ids(s.prompt_len, v, s.seed + i as u64))
        .collect();
    let mut next = vec![0u32; b];
    for (i, p) in prompts.iter().enumerate() {
        let slots = vec![i; p.len()];
        let pos: Vec<usize> = (0..p.len()).collect();
        let l = e.forward(
            p,
            &Step {
                slots: &slots,
                positions: &pos,
                n_write: p.len(),
                run_start: &[],
            },
            &[p.len() - 1],
            &mut Hooks::default(),
        )?;
        next[i] = crate::cpu_ops::argmax(l) as u32;
    }
    let slots: Vec<usize> = (0..b).collect();
    let mut pos = vec![s.prompt_len; b];
    let warm = 2.min(s.new_tokens);
    let mut t0 = Instant::now();
    for i in 0..s.new_tokens {
        if i == warm {
            t0 = Instant::now();
        }
        let ids = greedy(
            e,
            &next,
            &Step {
                slots: &slots,
                positions: &pos,
                n_write: b,
                run_start: &[],
            },
        )?;
        if let Some(bad) = ids.iter().find(|&&x| x as usize >= v) {
            bail!("decode produced id {bad} outside the vocabulary {v}: the timing is not of a valid run");
        }
        next = ids;
        pos.iter_mut().for_each(|p| *p += 1);
    }
    Ok(t0.elapsed().as_secs_f64() / (s.new_tokens - warm).max(1) as f64)
}

fn prefill_time(e: &mut impl Decoder, s: &Settings) -> Result<f64> {
    prefill_once(e, s)?; // warm-up
    let reps = 3;
    let t0 = Instant::now();
    for _ in 0..reps {
        prefill_once(e, s)?;
    }
    Ok(t0.elapsed().as_secs_f64() / reps as f64)
}

/// One prefill of the bench's prompt (slot 0, logits of the last row).
fn prefill_once(e: &mut impl Decoder, s: &Settings) -> Result<()> {
    let ids = random_ids(s.prompt_len, e.config().vocab_size, s.seed);
    let slots = vec![0; ids.len()];
    let pos: Vec<usize> = (0..ids.len()).collect();
    let step = Step {
        slots: &slots,
        positions: &pos,
        n_write: ids.len(),
        run_start: &[],
    };
    e.forward(&ids, &step, &[ids.len() - 1], &mut Hooks::default())?;
    Ok(())
}

/// The rows of a plain run: weights of `bytes_per_param` bytes (bf16 on the GPU, f32 on the CPU)
/// streamed once per decode step; the prefill's tensor-core FLOPs (`Config::prefill_flops`:
/// the blocks' products, causal attention, one LM-head row) against the card's peak.
fn rows_for(
    shape: &str,
    device: &str,
    card: &Card,
    (c, bytes_per_param): (&Config, usize),
    s: &Settings,
    prefill: f64,
    decode: &[(usize, f64)],
) -> Vec<Row> {
    let bytes = (c.param_count() * bytes_per_param) as f64;
    let flops = c.prefill_flops(s.prompt_len);
    let row = |phase, batch, tokens, secs_per_token: f64| Row {
        shape: shape.into(),
        device: device.into(),
        card: card.name.clone(),
        floor_gb_per_s: card.copy_gb_per_s,
        phase,
        batch,
        tokens,
        ms_per_token: secs_per_token * 1e3,
        tok_per_s: batch as f64 / secs_per_token,
        gb_per_s: 0.0,
        pct_of_floor: f64::NAN,
        ratio_to_plain: None,
        steered_fraction: None,
    };
    let mut rows = vec![Row {
        pct_of_floor: card
            .bf16_tflops
            .map_or(f64::NAN, |t| 100.0 * flops / prefill / (t * 1e12)),
        ..row("prefill", 1, s.prompt_len, prefill / s.prompt_len as f64)
    }];
    for &(b, t) in decode {
        rows.push(Row {
            gb_per_s: bytes / t / 1e9,
            pct_of_floor: 100.0 * bytes / (card.copy_gb_per_s * 1e9) / t,
            ..row("decode", b, s.new_tokens, t)
        });
    }
    rows
}

/// Runs the benchmark on the GPU.
pub fn run_cuda(shape: &str, s: &Settings) -> Result<Vec<Row>> {
    // The config before the GPU: a run past its context is refused before any device work.
    let named = named_shape(shape);
    let dir = Path::new(shape);
    let config = match &named {
        Some(c) => c.clone(),
        None => Config::from_file(&dir.join("config.json"))?,
    };
    check_context(&config, s.prompt_len, s.new_tokens)?;
    let gpu = Arc::new(Gpu::new(0)?);
    let card = Card::cuda(&gpu)?;
    eprintln!("{}", card.describe());
    let max_b = s.batches.iter().copied().max().unwrap_or(1);
    let max_len = s.prompt_len + s.new_tokens + 1;
    let max_t = max_b.max(s.chunk);
    let c = &config;
    CudaEngine::check_fits(&gpu, c, max_b, max_len, max_t, c.param_count() * 2)?;
    let weights = match named {
        Some(_) => CudaWeights::random(&gpu, c, s.seed)?,
        None => CudaWeights::load(&gpu, &crate::weights::WeightFiles::open(dir)?, c)?,
    };
    let mut e = CudaEngine::new(gpu, config.clone(), weights, max_b, max_len, max_t)?;
    let prefill = prefill_time(&mut e, s)?;
    if profile_requested() {
        let gpu = e.gpu.clone();
        let r = profiled(&gpu, 1, || prefill_once(&mut e, s))?;
        print_profile(shape, "prefill", 1, &r);
    }
    let mut decode = vec![];
    for &b in &s.batches {
        decode.push((
            b,
            decode_rows(&mut e, |e, ids, st| e.decode_greedy(ids, st), b, s)?,
        ));
        if profile_requested() {
            let gpu = e.gpu.clone();
            let r = profiled(&gpu, 1, || eager_step(&mut e, b, s))?;
            print_profile(shape, "decode", b, &r);
        }
        if s.marginal {
            let t = decode.last().map_or(0.0, |d| d.1);
            marginal_costs(&mut e, shape, b, s, t)?;
        }
    }
    Ok(rows_for(
        shape,
        "cuda",
        &card,
        (&config, 2),
        s,
        prefill,
        &decode,
    ))
}

/// One more greedy step of batch `b` after the prompts, launched eagerly (a graph replay is one
/// launch), for the per-launch breakdowns.
fn eager_step(e: &mut CudaEngine, b: usize, s: &Settings) -> Result<()> {
    let graphs = e.use_graphs;
    e.use_graphs = false;
    let slots: Vec<usize> = (0..b).collect();
    let step = Step {
        slots: &slots,
        positions: &vec![s.prompt_len; b],
        n_write: b,
        run_start: &[],
    };
    let ran = e.decode_greedy(&vec![1; b], &step).map(|_| ());
    e.use_graphs = graphs;
    ran
}

/// What each kind of launch of a batch-`b` decode step (one kernel at one grid shape and tag,
/// e.g. the down product of every block) costs inside the replayed step: the step is timed again
/// (CUDA graph, programmatic dependent launch, as in `decode_rows`) with every launch of that kind
/// left out, and the difference from `base` (seconds per step) is its cost. Left-out kernels leave
/// their outputs stale, so only the times mean anything; ids are still checked to be in the
/// vocabulary. The step is timed once more at the end to show the drift. Each line goes to
/// stderr as soon as it is measured (a run cut short keeps what it had).
fn marginal_costs(
    e: &mut CudaEngine,
    shape: &str,
    b: usize,
    s: &Settings,
    base: f64,
) -> Result<()> {
    let gpu = e.gpu.clone();
    // The step's launches, in order.
    gpu.record_launches(true);
    let ran = eager_step(e, b, s);
    let launches = gpu.record_launches(false);
    ran?;
    let kinds = launch_kinds(&gpu, launches, |_| false);
    eprintln!(
        "marginal {shape} decode batch {b}: {:.3} ms per step; each kind of launch left out in turn (kernel, grid, K of a product, launches per step, ms per step saved, µs per launch):",
        base * 1e3
    );
    let mut time = || {
        e.clear_graphs(); // captured with the previous choice of launches
        decode_rows(e, |e, ids, st| e.decode_greedy(ids, st), b, s).map(|t| (t, ()))
    };
    leave_each_out(&[&gpu], &kinds, base, &mut time, |line, ()| line);
    Ok(())
}

/// A recorded step's launches grouped by kind (first-seen order) with their counts, leaving out
/// the kinds whose kernel name `skip` accepts.
fn launch_kinds(
    gpu: &Gpu,
    launches: Vec<crate::cuda::LaunchKind>,
    skip: impl Fn(&str) -> bool,
) -> Vec<(crate::cuda::LaunchKind, usize)> {
    let mut kinds: Vec<(crate::cuda::LaunchKind, usize)> = vec![];
    for k in launches.into_iter().filter(|&k| !skip(gpu.kernel_name(k))) {
        match kinds.iter_mut().find(|(x, _)| *x == k) {
            Some((_, n)) => *n += 1,
            None => kinds.push((k, 1)),
        }
    }
    kinds
}

/// Times `time` (seconds per step, plus what else it reports) with each kind of launch left
/// out in turn on every handle of `gpus`, and prints a line per kind to stderr as it is measured
/// (`line` finishes it with the extra): kernel, grid, tag, launches per step, time saved against
/// `base`. A kind whose run fails (stale inputs may make a step invalid, e.g. ids outside the
/// vocabulary) gets a line saying so and the others go on. Last, the sum of the savings and the
/// whole step timed again (its drift; a failure there is said, the table stands).
fn leave_each_out<T>(
    gpus: &[&Gpu],
    kinds: &[(crate::cuda::LaunchKind, usize)],
    base: f64,
    time: &mut impl FnMut() -> Result<(f64, T)>,
    line: impl Fn(String, T) -> String,
) {
    let mut total = 0.0;
    for &(kind, n) in kinds {
        gpus.iter().for_each(|g| g.leave_out(Some(kind)));
        let t = time();
        gpus.iter().for_each(|g| g.leave_out(None));
        let name = gpus[0].kernel_name(kind);
        match t {
            Ok((t, extra)) => {
                total += base - t;
                eprintln!("{}", line(marginal_line(name, kind, n, base - t), extra));
            }
            Err(err) => eprintln!("  {name} {:?}: not timed ({err})", kind.grid),
        }
    }
    let again = match time() {
        Ok((t, _)) => format!("{:.3} ms", t * 1e3),
        Err(e) => format!("not timed ({e})"),
    };
    eprintln!(
        "  sum of the savings {:.3} ms of {:.3} ms; the whole step again: {again}",
        total * 1e3,
        base * 1e3
    );
}

/// One row of a `--marginal` table: kernel, grid, K of a product (its tag), launches per step,
/// ms saved per step, µs per launch.
fn marginal_line(name: &str, kind: crate::cuda::LaunchKind, n: usize, saved: f64) -> String {
    let (x, y, z) = kind.grid;
    let grid = format!("({x},{y},{z})");
    let tag = if kind.tag > 0 {
        format!("K {}", kind.tag)
    } else {
        String::new()
    };
    format!(
        "  {name:<30} {grid:<16} {tag:<7} {n:>4} {:>8.3} ms {:>7.2} µs",
        saved * 1e3,
        saved * 1e6 / n as f64
    )
}

/// THINKSTEER_CUDA_PROFILE=1: the benches also print a per-kernel breakdown (to stderr) of one
/// extra, eagerly launched prefill / decode step / hybrid step (`Gpu::set_profile`).
fn profile_requested() -> bool {
    std::env::var("THINKSTEER_CUDA_PROFILE").is_ok_and(|v| v == "1")
}

/// (kernel, launches, ms per unit) of `f`, which runs `units` steps, synchronised per launch.
fn profiled(
    gpu: &Gpu,
    units: usize,
    f: impl FnOnce() -> Result<()>,
) -> Result<Vec<(String, usize, f64)>> {
    gpu.set_profile(true)?;
    let ran = f();
    let report = gpu.profile_report();
    gpu.set_profile(false)?;
    ran?;
    let u = units.max(1) as f64;
    Ok(report
        .into_iter()
        .map(|(k, n, secs)| (k, n, secs * 1e3 / u))
        .collect())
}

fn print_profile(shape: &str, phase: &str, batch: usize, r: &[(String, usize, f64)]) {
    let total: f64 = r.iter().map(|x| x.2).sum();
    eprintln!("profile {shape} {phase} batch {batch}: {total:.3} ms, synchronised per launch");
    for (k, n, ms) in r.iter().take(12) {
        eprintln!("  {k:<28} {n:>6} launches {ms:>9.3} ms");
    }
}

/// Refuses a benchmark whose positions (the `--prompt-len` prompt, then `new_tokens` decode
/// steps; 0 for the vector-grad bench, which decodes none) run past the shape's context, before
/// any weights are read or made: past it, RoPE and the cache would be timed at positions the
/// model never saw.
pub fn check_context(c: &Config, prompt_len: usize, new_tokens: usize) -> Result<()> {
    let (ctx, used) = (
        c.max_position_embeddings,
        prompt_len.saturating_add(new_tokens),
    );
    if used > ctx {
        let flags = if new_tokens == 0 {
            format!("--prompt-len {prompt_len}")
        } else {
            format!("--prompt-len {prompt_len} + --new-tokens {new_tokens} = {used} positions")
        };
        bail!("{flags}: expected at most the model's context of {ctx} (max_position_embeddings)");
    }
    Ok(())
}

/// Runs the benchmark on the CPU (a checkpoint folder; named shapes are far too large for it).
pub fn run_cpu(shape: &str, s: &Settings) -> Result<Vec<Row>> {
    if named_shape(shape).is_some() {
        bail!("--shape {shape} on the CPU: the named shapes need gigabytes of f32 weights; pass a checkpoint folder");
    }
    // The config (checked against the weight files) first: the context and the cache are
    // refused before the f32 weights are read.
    let mut ckpt = crate::engine::Checkpoint::open(Path::new(shape))?;
    let config = ckpt.config.clone();
    check_context(&config, s.prompt_len, s.new_tokens)?;
    let max_b = s.batches.iter().copied().max().unwrap_or(1);
    let len = s.prompt_len + s.new_tokens + 1;
    let cache = crate::hybrid::prefix::slot_bytes(&config, 0, len, 4);
    crate::memory::check_fits(
        max_b.saturating_mul(cache),
        &format!(
            "--batch {max_b} with --prompt-len {} + --new-tokens {} (their f32 KV cache)",
            s.prompt_len, s.new_tokens
        ),
    )?;
    let model = ckpt.cpu_model()?;
    let mut e = CpuEngine::new(model, max_b, len);
    let prefill = prefill_time(&mut e, s)?;
    let mut decode = vec![];
    for &b in &s.batches {
        let greedy = |e: &mut CpuEngine, ids: &[u32], st: &Step| -> Result<Vec<u32>> {
            let rows: Vec<usize> = (0..ids.len()).collect();
            let v = e.config().vocab_size;
            let l = e.forward(ids, st, &rows, &mut Hooks::default())?;
            Ok(l.chunks(v)
                .map(|r| crate::cpu_ops::argmax(r) as u32)
                .collect())
        };
        decode.push((b, decode_rows(&mut e, greedy, b, s)?));
    }
    let card = Card::cpu();
    eprintln!("{}", card.describe());
    Ok(rows_for(
        shape,
        "cpu",
        &card,
        (&config, 4),
        s,
        prefill,
        &decode,
    ))
}

/// The hybrid step for a pair of the named shape (thinking and base both of that shape, random
/// weights; a random SAE at block 4 with 15 latents, random steering at block 10, C = 10
/// coefficients), against plain greedy decode of each model at the same batch and contexts, in
/// one run. Each problem's prompts are `prompt_len` random tokens, prefilled before the timed
/// steps. With `steered_share`, the thinking model is the base model's weights (see [`Settings`]).
/// With windows other than [-1], the host-driven loop (`GpuHybrid::Engines`) with those windows.
pub fn run_cuda_hybrid(shape: &str, s: &Settings) -> Result<Vec<Row>> {
    use crate::cuda::hybrid::{CudaHybrid, GpuHybrid};
    use crate::hybrid::{Mode, Prompts, Settings as HySettings};
    let Some(mut c) = named_shape(shape) else {
        bail!("--hybrid needs a named shape (qwen2.5-1.5b, llama-3.1-8b or tiny), found {shape:?}");
    };
    c.eos_token_ids.clear(); // random weights: never stop early
    check_context(&c, s.prompt_len, s.new_tokens)?;
    let gpu = Arc::new(Gpu::new(0)?);
    let card = Card::cuda(&gpu)?;
    eprintln!("{}", card.describe());
    let hy = HySettings {
        mode: Mode::Cached,
        max_new_tokens: s.new_tokens,
        windows: s.windows.clone(),
        prefix_caches: s.prefix_caches,
        ..HySettings::default()
    };
    let nc = hy.coefficients.len();
    const LATENTS: usize = 15; // the paper's K for the 1.5B and 8B pairs
    let max_b = s.batches.iter().copied().max().unwrap_or(1);
    // Prompts of prompt_len tokens (prefilled per problem), then new_tokens steps.
    let plen = s.prompt_len.max(1);
    let max_len = plen + s.new_tokens + 8;
    // The host loop's base engine takes a window's whole run in one call.
    let windowed = !CudaHybrid::supports(&hy);
    let rows = (max_b * (1 + nc))
        .max(64)
        .max(if windowed { max_len } else { 0 });
    // The SAE and steering blocks.
    let (lt, lb) = (
        4.min(c.num_hidden_layers - 1),
        10.min(c.num_hidden_layers - 1),
    );
    let sae = crate::sae::Sae::random(c.hidden_size, LATENTS, lt, 3, s.seed, shape);
    let steering =
        crate::steering::SteeringSet::random(c.hidden_size, LATENTS, lb, 8.0, s.seed, shape);
    let art = crate::hybrid::Artifacts {
        sae: &sae,
        steering: &steering,
    };
    // The host loop's window-0 prefix caches: extra base-engine slots in the blocks after the
    // steering point, as many as fit.
    let slots = match windowed {
        true => crate::cuda::hybrid::base_slots(
            &gpu,
            &c,
            &hy,
            max_b,
            LATENTS,
            art.steer_point(&hy),
            max_len,
            rows,
            // Both models' weights, and the thinking engine's cache and activations (loaded
            // after this).
            2 * c.param_count() * 2
                + crate::cuda::model::cache_and_activation_bytes(&c, max_b, max_len, max_b.max(64)),
        )?,
        false => max_b.into(),
    };
    CudaEngine::check_fits(&gpu, &c, slots, max_len, rows, 2 * c.param_count() * 2)?;
    let bw = Arc::new(CudaWeights::random(&gpu, &c, s.seed + 2)?);
    let tw = match s.steered_share {
        Some(_) => bw.clone(),
        None => Arc::new(CudaWeights::random(&gpu, &c, s.seed + 1)?),
    };
    let tgpu = crate::cuda::hybrid::think_gpu(&gpu)?;
    let think = CudaEngine::new(tgpu.clone(), c.clone(), tw, max_b, max_len, max_b.max(64))?;
    let base = CudaEngine::new(gpu.clone(), c.clone(), bw, slots, max_len, rows)?;
    let mut h = if windowed {
        GpuHybrid::Engines {
            base: Box::new(base),
            think: Box::new(think),
        }
    } else {
        GpuHybrid::Step(Box::new(CudaHybrid::new(
            think, base, &sae, &steering, &hy, max_b,
        )?))
    };
    let v = c.vocab_size as u64;
    let bytes = (2 * c.param_count() * 2) as f64;
    let mut out = vec![];
    for &b in &s.batches {
        // With a steered share, the first ⌈share·b⌉ problems get a thinking prompt of their own.
        let own = s
            .steered_share
            .map_or(b, |f| (f * b as f64).ceil() as usize);
        let problems: Vec<Prompts> = (0..b as u64)
            .map(|i| {
                let base = random_ids(plen, v as usize, s.seed + 7919 * i);
                Prompts {
                    thinking: if (i as usize) < own {
                        random_ids(plen, v as usize, s.seed + 104729 * (i + 1))
                    } else {
                        base.clone()
                    },
                    base,
                }
            })
            .collect();
        let (step, steps, steered, all) = time_hybrid(&mut h, art, &hy, &problems, v)?;
        // Plain greedy decode of each model alone, same batch, same contexts, same number of steps.
        let mut plain = 0.0;
        let (think, base) = h.engines_mut();
        for e in [think, base] {
            let ids: Vec<u32> = (0..b as u32).collect();
            let slots: Vec<usize> = (0..b).collect();
            let mut next = ids;
            e.decode_greedy(
                &next,
                &Step {
                    slots: &slots,
                    positions: &vec![plen - 1; b],
                    n_write: b,
                    run_start: &[],
                },
            )?;
            let t0 = Instant::now();
            for i in 0..steps {
                next = e.decode_greedy(
                    &next,
                    &Step {
                        slots: &slots,
                        positions: &vec![plen + i; b],
                        n_write: b,
                        run_start: &[],
                    },
                )?;
            }
            plain += t0.elapsed().as_secs_f64() / steps as f64;
        }
        out.push(Row {
            shape: format!("{shape} pair"),
            device: "cuda".into(),
            card: card.name.clone(),
            floor_gb_per_s: card.copy_gb_per_s,
            // The host-driven loop with windows: its own rows beside the one-graph step's.
            phase: if windowed { "hybrid-w" } else { "hybrid" },
            batch: b,
            tokens: steps,
            ms_per_token: step * 1e3,
            tok_per_s: b as f64 / step,
            gb_per_s: bytes / step / 1e9,
            pct_of_floor: 100.0 * bytes / (card.copy_gb_per_s * 1e9) / step,
            ratio_to_plain: Some(step / plain),
            steered_fraction: Some(steered as f64 / all.max(1) as f64),
        });
        if let (GpuHybrid::Step(h), true) = (&mut h, profile_requested()) {
            // Two more steps, launched eagerly; the profile is per step (the problems' one-token
            // prompts included).
            let graphs = h.use_graphs;
            h.use_graphs = false;
            h.set_max_new_tokens(2);
            let gpu = h.gpu.clone();
            // Both streams' launches (each synchronised, so they do not overlap here).
            tgpu.set_profile(true)?;
            let r = profiled(&gpu, 2, || h.run(&problems, |_, _, _| {}).map(|_| ()));
            let mut think = tgpu.profile_report();
            tgpu.set_profile(false)?;
            let mut r = r?;
            if !Arc::ptr_eq(&tgpu, &gpu) {
                for (k, n, secs) in think.drain(..) {
                    match r.iter_mut().find(|x| x.0 == k) {
                        Some(x) => {
                            x.1 += n;
                            x.2 += secs * 1e3 / 2.0;
                        }
                        None => r.push((k, n, secs * 1e3 / 2.0)),
                    }
                }
                r.sort_by(|a, b| b.2.total_cmp(&a.2));
            }
            h.use_graphs = graphs;
            print_profile(&format!("{shape} pair"), "hybrid", b, &r);
        }
        if s.marginal {
            marginal_hybrid(&mut h, art, &tgpu, &problems, shape, &hy, step)?;
        }
    }
    Ok(out)
}

/// One timed hybrid run of `new_tokens` steps (after a warm-up run that captures the step graph):
/// (seconds per step, steps, steered steps, all steps). Timed from the end of the first step to
/// the end of the last (the run prefills the prompts first): every problem runs every step, so
/// the step count is exact.
fn time_hybrid(
    h: &mut crate::cuda::hybrid::GpuHybrid,
    art: crate::hybrid::Artifacts,
    hy: &crate::hybrid::Settings,
    problems: &[crate::hybrid::Prompts],
    v: u64,
) -> Result<(f64, usize, usize, usize)> {
    // Every problem in one batch (the host-driven loop decodes `batch` problems at a time).
    let hy = &crate::hybrid::Settings {
        batch: problems.len(),
        ..hy.clone()
    };
    let warm = crate::hybrid::Settings {
        max_new_tokens: 3,
        ..hy.clone()
    };
    h.run(art, problems, &warm, |_, _, _| {})?;
    let (mut first, mut last) = (None, Instant::now());
    let outs = h.run(art, problems, hy, |_, _, _| {
        last = Instant::now();
        first.get_or_insert(last);
    })?;
    let steps = outs[0].ids.len();
    if steps < 2 {
        bail!("--hybrid needs --new-tokens ≥ 2 to time a step, found {steps} steps");
    }
    let all: usize = outs.iter().map(|o| o.steps.len()).sum();
    let steered: usize = outs
        .iter()
        .map(|o| o.steps.iter().filter(|r| r.steered).count())
        .sum();
    let step = first.map_or(0.0, |f| (last - f).as_secs_f64()) / (steps - 1) as f64;
    if outs.iter().any(|o| o.ids.iter().any(|&x| x as u64 >= v)) {
        bail!(
            "the hybrid step produced ids outside the vocabulary: the timing is not of a valid run"
        );
    }
    Ok((step, steps, steered, all))
}

/// `marginal_costs` for the hybrid step: each kind of launch of the model kernels (both models,
/// both streams; the hybrid's own small kernels stay, their indices steer the step) left out in
/// turn. Left-out kernels make the steered share drift where the step's work depends on it (gate
/// first), so each line also gives the share of that run. Lines to stderr as they are measured.
fn marginal_hybrid(
    hybrid: &mut crate::cuda::hybrid::GpuHybrid,
    art: crate::hybrid::Artifacts,
    tgpu: &Arc<Gpu>,
    problems: &[crate::hybrid::Prompts],
    shape: &str,
    hy: &crate::hybrid::Settings,
    base: f64,
) -> Result<()> {
    use crate::cuda::hybrid::GpuHybrid;
    let GpuHybrid::Step(h) = hybrid else {
        bail!("--marginal times the one-graph hybrid step (windows -1)");
    };
    let (gpu, b) = (h.gpu.clone(), problems.len());
    let v = h.base.config.vocab_size as u64;
    let gpus: Vec<&Arc<Gpu>> = if Arc::ptr_eq(tgpu, &gpu) {
        vec![&gpu]
    } else {
        vec![&gpu, tgpu]
    };
    // One eager run of two steps; the launches of both models in its second step, in order
    // (recording starts when the first step has ended: the prompts' prefill is not listed).
    let graphs = h.use_graphs;
    h.use_graphs = false;
    h.set_max_new_tokens(2);
    let mut started = false;
    let ran = h.run(problems, |_, _, _| {
        if !started {
            for g in &gpus {
                g.record_launches(true);
            }
            started = true;
        }
    });
    let mut launches = vec![];
    for g in &gpus {
        launches.extend(g.record_launches(false));
    }
    h.use_graphs = graphs;
    ran?;
    let kinds = launch_kinds(&gpu, launches, |name| name.starts_with("hybrid_"));
    eprintln!(
        "marginal {shape} pair hybrid batch {b}: {:.3} ms per step; each kind of model launch left out in turn (kernel, grid, K of a product, launches per step, ms per step saved, µs per launch, steered share):",
        base * 1e3
    );
    let mut time = || {
        if let GpuHybrid::Step(h) = hybrid {
            h.clear_graphs(); // captured with the previous choice of launches
        }
        time_hybrid(hybrid, art, hy, problems, v)
            .map(|(t, _, steered, all)| (t, steered as f64 / all.max(1) as f64))
    };
    let gpus: Vec<&Gpu> = gpus.iter().map(|g| g.as_ref()).collect();
    leave_each_out(&gpus, &kinds, base, &mut time, |line, share| {
        format!("{line}  steered {:.0}%", 100.0 * share)
    });
    Ok(())
}

/// One timing of the steering-vector gradient (`bench --vector-grad`).
#[derive(Debug, Clone, Serialize)]
pub struct VectorGradRow {
    pub shape: String,
    /// Where the target positions sit: "at the end" (the last 100, as a category sentence),
    /// "spread" (100 evenly over the prompt) or "at every position" (as a bias example over a
    /// whole thinking span).
    pub targets_at: &'static str,
    pub prompt_len: usize,
    pub layer: usize,
    pub active_rows: usize,
    pub targets: usize,
    /// Forward + backward of one example (loss and dL/dv), uploads and downloads included.
    pub ms_per_example: f64,
    /// ms_per_example × 2,048 examples × 50 epochs, in hours.
    pub projected_hours: f64,
    /// The loss alone (the forward; held-out examples cost this).
    pub ms_forward: f64,
    /// With THINKSTEER_CUDA_PROFILE=1: (kernel, launches, ms) of one more loss-and-gradient
    /// call with a synchronisation after every launch, slowest first; else empty.
    pub profile: Vec<(String, usize, f64)>,
}

/// A synthetic prepared example of the real shape: random h_L and prefix K/V (the values do not
/// change the work done), `n_targets` target positions ending at the prompt's end or spread.
fn synthetic_frozen(
    c: &Config,
    prompt_len: usize,
    n_targets: usize,
    spread: bool,
    seed: u64,
) -> crate::vector_grad::Frozen {
    let mut r = Rng::new(seed);
    let n = n_targets.clamp(2, prompt_len.max(2));
    let positions: Vec<usize> = if spread {
        let step = (prompt_len / n).max(1);
        (1..=n)
            .map(|i| (i * step).min(prompt_len - 1))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    } else {
        (prompt_len.saturating_sub(n)..prompt_len).collect()
    };
    let (s0, pe) = (positions[0], *positions.last().unwrap_or(&0));
    let ta = pe - s0;
    let layer = c.num_hidden_layers / 2;
    let kvd = c.num_key_value_heads * c.head_dim;
    let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| r.normal() as f32).collect() };
    let h_l = rand(ta * c.hidden_size);
    let nl = c.num_hidden_layers - layer - 1;
    let k_pre = (0..nl).map(|_| rand(s0 * kvd)).collect();
    let v_pre = (0..nl).map(|_| rand(s0 * kvd)).collect();
    let const_logits = rand(c.vocab_size);
    let ids = random_ids(prompt_len + 1, c.vocab_size, seed);
    crate::vector_grad::Frozen {
        layer,
        s0,
        ta,
        h_l,
        k_pre,
        v_pre,
        steer_rows: positions
            .iter()
            .filter(|&&p| p < pe)
            .map(|&p| p - s0)
            .collect(),
        predict: positions
            .iter()
            .filter(|&&p| p > s0)
            .map(|&p| (p - s0 - 1, ids[p]))
            .collect(),
        const_row: (s0 > 0).then(|| (const_logits, ids[s0])),
    }
}

/// Times the GPU loss-and-gradient of the steering vector for one example of `prompt_len`
/// tokens with ~100 target positions at the middle block, for targets at the end and spread.
pub fn run_cuda_vector_grad(
    shape: &str,
    prompt_len: usize,
    seed: u64,
) -> Result<Vec<VectorGradRow>> {
    let Some(c) = named_shape(shape) else {
        bail!("--vector-grad needs a named shape (qwen2.5-1.5b, llama-3.1-8b or tiny), found {shape:?}");
    };
    if prompt_len < 3 {
        bail!("--vector-grad needs --prompt-len of at least 3, found {prompt_len}");
    }
    check_context(&c, prompt_len, 0)?;
    let gpu = Arc::new(Gpu::new(0)?);
    let w = Arc::new(CudaWeights::random(&gpu, &c, seed)?);
    let mut vg = crate::cuda::vector_grad::CudaVectorGrad::new(gpu.clone(), &c, w)?;
    let mut rows = vec![];
    let cases = [
        (100, false, "at the end"),
        (100, true, "spread"),
        (prompt_len - 1, true, "at every position"),
    ];
    for (n_targets, spread, at) in cases {
        let fz = synthetic_frozen(&c, prompt_len, n_targets, spread, seed);
        let v: Vec<f32> = (0..c.hidden_size)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
            .collect();
        let first = vg.loss_grad(&fz, &v, None, 1.0, true)?; // warm-up: buffers, module load
        if !first.loss_sum.is_finite() || first.grad_sum.iter().any(|x| !x.is_finite()) {
            bail!(
                "--vector-grad: the loss or gradient is not finite (loss {})",
                first.loss_sum
            );
        }
        const REPS: usize = 3;
        let t0 = Instant::now();
        for _ in 0..REPS {
            vg.loss_grad(&fz, &v, None, 1.0, true)?;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / REPS as f64;
        let t0 = Instant::now();
        for _ in 0..REPS {
            vg.loss_grad(&fz, &v, None, 1.0, false)?;
        }
        let ms_forward = t0.elapsed().as_secs_f64() * 1e3 / REPS as f64;
        let mut profile = vec![];
        if profile_requested() {
            profile = profiled(&gpu, 1, || {
                vg.loss_grad(&fz, &v, None, 1.0, true).map(|_| ())
            })?;
        }
        rows.push(VectorGradRow {
            shape: shape.into(),
            targets_at: at,
            prompt_len,
            layer: fz.layer,
            active_rows: fz.ta,
            targets: fz.targets(),
            ms_per_example: ms,
            projected_hours: ms * 2048.0 * 50.0 / 3.6e6,
            ms_forward,
            profile,
        });
    }
    Ok(rows)
}
