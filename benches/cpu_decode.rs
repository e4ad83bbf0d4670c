//! Criterion benchmark of one CPU decode step (batch 1 and 4) on the qwen2-f32 fixture shape,
//! reported as tokens/s (criterion's throughput in elements = tokens).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::Path;
use std::sync::Arc;
use thinksteer::engine::{CpuEngine, Decoder};
use thinksteer::model::{Hooks, Model, Step};

fn decode(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2-f32");
    let model = Arc::new(Model::load(&dir).expect("fixture"));
    let mut g = c.benchmark_group("cpu_decode_step");
    for b in [1usize, 4] {
        let ctx = 256;
        let mut e = CpuEngine::new(model.clone(), b, ctx);
        let slots: Vec<usize> = (0..b).collect();
        // Prefill 64 tokens per row so attention reads a realistic cache.
        for s in 0..b {
            let ids: Vec<u32> = (0..64).map(|i| (i * 7 + s as u32) % 300).collect();
            let pos: Vec<usize> = (0..64).collect();
            e.forward(
                &ids,
                &Step {
                    slots: &vec![s; 64],
                    positions: &pos,
                    n_write: 64,
                    run_start: &[],
                },
                &[63],
                &mut Hooks::default(),
            )
            .unwrap();
        }
        let ids = vec![5u32; b];
        let pos = vec![64usize; b];
        g.throughput(Throughput::Elements(b as u64));
        g.bench_function(format!("batch{b}"), |bench| {
            bench.iter(|| {
                // Rewrites position 64 each time: the same step, repeatable.
                let l = e
                    .forward(
                        &ids,
                        &Step {
                            slots: &slots,
                            positions: &pos,
                            n_write: b,
                            run_start: &[],
                        },
                        &slots,
                        &mut Hooks::default(),
                    )
                    .unwrap();
                std::hint::black_box(l[0])
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
