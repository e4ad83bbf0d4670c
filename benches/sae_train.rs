//! Time per epoch of top-k SAE training on 100,000 × 1,536 random unit activations with K = 15
//! latents, k = 3 (the 1.5B pair's shape), so a full run's time can be projected: an epoch is
//! one pass over the 90% training split plus a forward pass over the 10% held out.
//!
//! Run: `cargo bench --bench sae_train`.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use std::time::Duration;

use thinksteer::rng::Rng;
use thinksteer::train_sae::{TrainConfig, Trainer};

const N: usize = 100_000;
const D: usize = 1536;
const K: usize = 15;

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let mut acts = vec![0.0f32; N * D]; // [N, D]
    for row in acts.chunks_exact_mut(D) {
        rng.direction(row, 1.0);
    }
    let cfg = TrainConfig {
        latents: K,
        k: 3,
        seed: 0,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&acts, N, D, &cfg).expect("valid config");

    // Check the output first: random unit vectors in 1,536 dims are nearly orthogonal to any
    // 3 directions, so the FVU must start close to 1 and stay finite.
    let (train, val) = trainer.epoch();
    assert!(
        train.is_finite() && val.is_finite() && val > 0.9,
        "fvu {train} / {val}"
    );

    // Napkin math per epoch, multiply-adds: encoder K·D for every row (train and val), decoder
    // k·D for every row, backward 3·k·D (dz, dW_dec, dW_enc) plus k·D (b_dec) for train rows.
    let n_train = N - N / 10;
    let flops = 2.0 * ((K + 3) * D * N + 4 * 3 * D * n_train) as f64;
    println!(
        "work per epoch: {:.2} GFLOP; threads: {}",
        flops / 1e9,
        rayon::current_num_threads()
    );

    let mut g = c.benchmark_group("sae_train");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    g.bench_function("epoch_100k_x_1536_K15", |b| {
        b.iter(|| trainer.epoch());
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
