//! Criterion benchmarks of the matrix kernels on the real decode/prefill shapes (needs a GPU;
//! prints why it skips otherwise): gemv GB/s next to the card's copy rate measured first
//! (`bench::Card`), gemm TFLOP/s next to its datasheet peak, for each of its kernels (64- and
//! 128-row tiles, cuBLASLt) on prefill and hybrid-step shapes, and the gate|up product with
//! SiLU·mul fused (`gemm_glu`) against gemm then silu_mul.
//! Each timed sample is a CUDA-event-free batch of launches followed by one stream sync.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::time::Instant;
use thinksteer::cuda::kernels::{self as k, GemmTile};
use thinksteer::cuda::Gpu;

/// (name, M, K) of the decode matrices: fused q|k|v, o, fused gate|up, down, LM head.
const SHAPES: &[(&str, usize, usize)] = &[
    ("qwen1.5b qkv", 2048, 1536),
    ("qwen1.5b o", 1536, 1536),
    ("qwen1.5b gate_up", 17920, 1536),
    ("qwen1.5b down", 1536, 8960),
    ("qwen1.5b lm_head", 151936, 1536),
    ("llama8b qkv", 6144, 4096),
    ("llama8b o", 4096, 4096),
    ("llama8b gate_up", 28672, 4096),
    ("llama8b down", 4096, 14336),
    ("llama8b lm_head", 128256, 4096),
];

fn benches(c: &mut Criterion) {
    if let Err(why) = thinksteer::cuda::available() {
        println!("skipped: {why}");
        return;
    }
    let g = Gpu::new(0).expect("Gpu::new");
    let card = thinksteer::bench::Card::cuda(&g).expect("timing a device copy");
    println!("{}", card.describe());
    let (copy, peak) = (
        card.copy_gb_per_s,
        card.bf16_tflops
            .map_or("unknown".into(), |t| format!("{t:.0}")),
    );
    let s = g.stream.clone();
    let mut group = c.benchmark_group("gemv");
    for &(name, m, kd) in SHAPES {
        for &b in &[1usize, 16] {
            let w = s.clone_htod(&vec![bf16::from_f32(0.01); m * kd]).unwrap();
            let x = s.clone_htod(&vec![bf16::from_f32(1.0); b * kd]).unwrap();
            let mut out = s.alloc_zeros::<f32>(b * m).unwrap();
            // Check first: every output is Σ 0.01 · 1 over K (bf16(0.01) exactly).
            k::gemv(
                &g,
                &mut out.as_view_mut(),
                &x.as_view(),
                &w.as_view(),
                b,
                m,
                kd,
            )
            .unwrap();
            let got = s.clone_dtoh(&out).unwrap();
            let want = bf16::from_f32(0.01).to_f32() * kd as f32;
            assert!(
                got.iter().all(|v| (v - want).abs() <= 1e-3 * want),
                "gemv {name}: wrong output"
            );
            let bytes = (m * kd * 2 + b * kd * 2 + b * m * 4) as u64;
            group.throughput(Throughput::Bytes(bytes));
            group.bench_function(format!("{name} B={b}"), |bch| {
                bch.iter_custom(|iters| {
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        k::gemv(
                            &g,
                            &mut out.as_view_mut(),
                            &x.as_view(),
                            &w.as_view(),
                            b,
                            m,
                            kd,
                        )
                        .unwrap();
                    }
                    s.synchronize().unwrap();
                    t0.elapsed()
                })
            });
            let t0 = Instant::now();
            let reps = 50;
            for _ in 0..reps {
                k::gemv(
                    &g,
                    &mut out.as_view_mut(),
                    &x.as_view(),
                    &w.as_view(),
                    b,
                    m,
                    kd,
                )
                .unwrap();
            }
            s.synchronize().unwrap();
            let secs = t0.elapsed().as_secs_f64() / reps as f64;
            println!(
                "gemv {name} B={b}: {:.1} µs, {:.0} GB/s (copy {copy:.0} GB/s)",
                secs * 1e6,
                bytes as f64 / secs / 1e9
            );
        }
    }
    group.finish();

    // The large products with each kernel of `gemm` (ours with 64- or 128-row tiles, the
    // warpgroup kernels of 128 or 256 columns, cuBLASLt), and two 64-row decode products (split
    // K in ours).
    let mut group = c.benchmark_group("gemm");
    for &(n, m, kd) in &[
        (2048usize, 8960usize, 1536usize),
        (2048, 1536, 8960),
        (704, 17920, 1536),
        (64, 1536, 8960),
        (64, 17920, 1536),
        (2000, 28672, 4096),
    ] {
        let w = s.clone_htod(&vec![bf16::from_f32(0.01); m * kd]).unwrap();
        let x = s.clone_htod(&vec![bf16::from_f32(1.0); n * kd]).unwrap();
        let mut out = s.alloc_zeros::<f32>(n * m).unwrap();
        for tile in [
            GemmTile::N64,
            GemmTile::N128,
            GemmTile::Wg,
            GemmTile::Wg256,
            GemmTile::Lt,
        ] {
            if no_wgmma(&g, tile) {
                println!("gemm {tile:?} N={n} M={m} K={kd}: skipped: no wgmma on this device");
                continue;
            }
            let run = |out: &mut cudarc::driver::CudaSlice<f32>| {
                k::gemm_with(
                    &g,
                    &mut out.as_view_mut(),
                    &x.as_view(),
                    &w.as_view(),
                    n,
                    m,
                    kd,
                    tile,
                    None,
                )
            };
            if let Err(e) = run(&mut out) {
                println!("gemm {tile:?} N={n} M={m} K={kd}: skipped: {e}");
                continue;
            }
            let got = s.clone_dtoh(&out).unwrap();
            let want = bf16::from_f32(0.01).to_f32() * kd as f32;
            assert!(
                got.iter().all(|v| (v - want).abs() <= 1e-3 * want),
                "gemm {tile:?} {n}x{m}x{kd}: wrong output"
            );
            let flops = 2.0 * (n * m * kd) as f64;
            group.throughput(Throughput::Elements((n * m * kd) as u64));
            group.bench_function(format!("{tile:?} N={n} M={m} K={kd}"), |bch| {
                bch.iter_custom(|iters| {
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        run(&mut out).unwrap();
                    }
                    s.synchronize().unwrap();
                    t0.elapsed()
                })
            });
            let reps = 10;
            let t0 = Instant::now();
            for _ in 0..reps {
                run(&mut out).unwrap();
            }
            s.synchronize().unwrap();
            let secs = t0.elapsed().as_secs_f64() / reps as f64;
            // Decode batches are bound by the weight bytes, prefill by the tensor cores.
            println!(
                "gemm {tile:?} N={n} M={m} K={kd}: {:.3} ms, {:.0} TFLOP/s (bf16 peak {peak}), weights {:.0} GB/s (copy {copy:.0})",
                secs * 1e3,
                flops / secs / 1e12,
                (2 * m * kd) as f64 / secs / 1e9
            );
        }
    }
    group.finish();

    // The MLP's gate|up product with SiLU·mul in the epilogue (`gemm_glu`) against gemm then
    // silu_mul, on the prefill shapes (F = 8960 and 14,336).
    for &(n, f, kd) in &[(2048usize, 8960usize, 1536usize), (2000, 14336, 4096)] {
        let w = s
            .clone_htod(&vec![bf16::from_f32(0.01); 2 * f * kd])
            .unwrap();
        let x = s.clone_htod(&vec![bf16::from_f32(1.0); n * kd]).unwrap();
        let mut act = s.alloc_zeros::<bf16>(n * f).unwrap();
        let mut gu = s.alloc_zeros::<f32>(n * 2 * f).unwrap();
        let flops = 2.0 * (n * 2 * f * kd) as f64;
        for tile in [GemmTile::N64, GemmTile::N128, GemmTile::Wg, GemmTile::Wg256] {
            if no_wgmma(&g, tile) {
                continue;
            }
            let (xv, wv) = (x.as_view(), w.as_view());
            let mut fused = || {
                let ran = k::gemm_glu(&g, &mut act.as_view_mut(), &xv, &wv, (n, f, kd), tile, None);
                assert!(ran.unwrap(), "gemm_glu declined a prefill shape");
            };
            let tf = seconds(&s, &mut fused);
            let mut unfused = || {
                let (a, gv) = (&mut act.as_view_mut(), &mut gu.as_view_mut());
                k::gemm_then_silu_mul(&g, a, gv, &xv, &wv, (n, f, kd), tile, None).unwrap();
            };
            let tu = seconds(&s, &mut unfused);
            println!(
                "gemm_glu {tile:?} N={n} F={f} K={kd}: {:.3} ms, {:.0} TFLOP/s (bf16 peak {peak}); gemm then silu_mul {:.3} ms",
                tf * 1e3,
                flops / tf / 1e12,
                tu * 1e3
            );
        }
    }
}

/// Whether `tile` is a warpgroup kernel this device cannot run (it would fall back to the 64-row
/// tile, and its line would time that).
fn no_wgmma(g: &Gpu, tile: GemmTile) -> bool {
    matches!(tile, GemmTile::Wg | GemmTile::Wg256) && !g.has_wgmma()
}

/// Seconds per call of `f` (launches only), over 10 calls after one warm-up, synchronised once.
fn seconds(s: &cudarc::driver::CudaStream, f: &mut impl FnMut()) -> f64 {
    f();
    let reps = 10;
    let t0 = Instant::now();
    for _ in 0..reps {
        f();
    }
    s.synchronize().unwrap();
    t0.elapsed().as_secs_f64() / reps as f64
}

criterion_group! {
    name = kernels;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = benches
}
criterion_main!(kernels);
