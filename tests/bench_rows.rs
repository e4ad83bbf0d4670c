//! `thinksteer bench` on the CPU: its rows state the card and the copy rate their floor is taken
//! at, and their percentages follow from it (the GPU rows: tests/cuda_commands.rs).

mod common;

use common::{bench_settings, check_bench_rows};
use thinksteer::bench::{datasheet_bf16_tflops, run_cpu};

#[test]
fn cpu_rows_take_the_floor_at_the_measured_copy_rate() {
    let rows = run_cpu(
        common::fixture("qwen2-f32").to_str().unwrap(),
        &bench_settings(vec![1, 2]),
    )
    .unwrap();
    let phases: Vec<(&str, usize)> = rows.iter().map(|r| (r.phase, r.batch)).collect();
    assert_eq!(phases, [("prefill", 1), ("decode", 1), ("decode", 2)]);
    check_bench_rows(&rows);
    assert!(rows[0].card.starts_with("cpu"), "{:?}", rows[0]);
    // Weights are f32 on the CPU: a decode step streams 4 bytes per parameter.
    let c =
        thinksteer::config::Config::from_file(&common::fixture("qwen2-f32").join("config.json"))
            .unwrap();
    let want = (c.param_count() * 4) as f64 / (rows[1].ms_per_token * 1e-3) / 1e9;
    assert!(
        (rows[1].gb_per_s - want).abs() <= 1e-9 * want,
        "{:?}",
        rows[1]
    );
}

#[test]
fn datasheet_peaks_pick_the_most_specific_name() {
    assert_eq!(datasheet_bf16_tflops("NVIDIA H100 80GB HBM3"), Some(989.0));
    assert_eq!(datasheet_bf16_tflops("NVIDIA H100 PCIe"), Some(756.0));
    assert_eq!(datasheet_bf16_tflops("NVIDIA H200"), Some(989.0));
    assert_eq!(datasheet_bf16_tflops("NVIDIA H200 NVL"), Some(835.0));
    assert_eq!(datasheet_bf16_tflops("NVIDIA L40S"), Some(362.0));
    assert_eq!(datasheet_bf16_tflops("NVIDIA L40"), Some(181.0));
    assert_eq!(datasheet_bf16_tflops("NVIDIA L4"), Some(121.0));
    assert_eq!(datasheet_bf16_tflops("emulated CUDA device"), None);
}

/// The prefill's tensor-core work for the Qwen2.5-1.5B shape at 2,000 tokens, from its parts:
/// 28 blocks of 46,792,704 product weights (q|k|v 1536·2048, o 1536², gate|up|down 3·1536·8960)
/// at 2 FLOPs per token, causal attention 4·1536 per (query, key ≤ query) pair per block, one
/// LM-head row (2·151,936·1536). The embedding table (15% of the weights) is a lookup, not
/// counted.
#[test]
fn prefill_flops_count_the_products_attention_and_one_logit_row() {
    let c = thinksteer::bench::named_shape("qwen2.5-1.5b").unwrap();
    let (t, l) = (2000.0f64, 28.0);
    let want = l * 2.0 * 46_792_704.0 * t
        + l * 4.0 * 1536.0 * (t * (t + 1.0) / 2.0)
        + 2.0 * 151_936.0 * 1536.0;
    let got = c.prefill_flops(2000);
    assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    assert!(got < 2.0 * c.param_count() as f64 * t);
}
