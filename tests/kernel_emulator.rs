//! The kernels of kernels/grad.cu, prefill_attention.cu and gemm.cu run on the CPU in the emulator
//! of scripts/cuda-emulate (blocks of real threads, shared memory, warp shuffles and tensor-core
//! mma emulated) against double-precision references written from the formulas, so their
//! indexing, masking and tiling are checked on machines without a GPU (CI included). Bounds and
//! cases are in scripts/cuda-emulate/check.cpp. Without a C++20 compiler the test prints
//! "skipped: <reason>" and passes; the GPU tests remain the check on real hardware.

use std::process::Command;

#[test]
fn emulated_kernels_match_double_references() {
    if Command::new("g++").arg("--version").output().is_err() {
        println!("skipped: no g++ to build the CUDA emulator");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/cuda-emulate/run.sh"))
        .output()
        .expect("running bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "the emulated kernels failed:\n{text}");
    // Every case reported and none failed (the script exits 1 on a failure; this also catches a
    // run that printed nothing).
    assert!(
        text.matches(" ok").count() >= 22,
        "expected ≥ 22 checked outputs:\n{text}"
    );
    assert!(!text.contains("FAIL"), "{text}");
}
