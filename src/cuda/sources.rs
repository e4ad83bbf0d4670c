//! The embedded CUDA kernels and how they become loadable PTX: build.rs embeds `kernels/*.cu`
//! (and nvcc-built PTX when nvcc was there); otherwise the sources are compiled here with NVRTC at
//! first use. Also the discovery of NVRTC and of a CUDA include directory.
//!
//! The kernels include no CUDA headers (see kernels/common.cuh), so NVRTC needs no include
//! directory; one is still passed when found, so a kernel may start using `cuda_bf16.h` later.

use std::ffi::CString;
use std::path::{Path, PathBuf};

mod gen {
    include!(concat!(env!("OUT_DIR"), "/kernels_gen.rs"));
}

/// Every kernel module (a `kernels/<stem>.cu` file) and the `extern "C"` functions it exports.
pub const MODULES: &[(&str, &[&str])] = &[
    (
        "attention",
        &[
            "attention_decode_bf16",
            "attention_decode_u1_bf16",
            "attention_decode_g2_bf16",
            "attention_decode_g3_bf16",
            "attention_decode_g4_bf16",
            "attention_decode_g5_bf16",
            "attention_decode_g6_bf16",
            "attention_decode_g7_bf16",
            "attention_decode_g8_bf16",
        ],
    ),
    ("prefill_attention", &["attention_prefill_bf16"]),
    ("elementwise", &["silu_mul_bf16"]),
    ("embed", &["embed_bf16"]),
    ("gemm", &["gemm_bf16", "gemm_bf16_n128"]),
    (
        "grad",
        &[
            "vg_mm_f32",
            "vg_mm_tc_f32",
            "vg_mm_reduce_f32",
            "vg_rmsnorm_fwd_f32",
            "vg_rmsnorm_bwd_f32",
            "vg_rope_f32",
            "vg_attn_scores_f32",
            "vg_attn_softmax_f32",
            "vg_attn_dsoftmax_f32",
            "vg_attn_apply_f32",
            "vg_attn_kv_grad_f32",
            "vg_silu_mul_fwd_f32",
            "vg_silu_mul_bwd_f32",
            "vg_xent_f32",
            "vg_rows_f32",
            "vg_steer_rows_f32",
        ],
    ),
    (
        "hybrid",
        &[
            "hybrid_expand_f32",
            "hybrid_select_i32",
            "hybrid_gather_f32",
            "hybrid_gate_i32",
            "hybrid_expand_compact_f32",
            "hybrid_select_compact_i32",
        ],
    ),
    (
        "gemv",
        &[
            "gemv_bf16_b1",
            "gemv_glu_bf16_b1",
            "gemv_bf16_b1_k2",
            "gemv_glu_bf16_b1_k2",
            "gemv_bf16_b1_k4",
            "gemv_glu_bf16_b1_k4",
            "gemv_bf16_b1_k8",
            "gemv_glu_bf16_b1_k8",
            "gemv_bf16_b2",
            "gemv_bf16_b4",
            "gemv_bf16_b8",
            "gemv_bf16_b16",
            "gemv_bf16_b32",
            "gemv_glu_bf16_b2",
            "gemv_glu_bf16_b4",
            "gemv_glu_bf16_b8",
            "gemv_glu_bf16_b16",
            "gemv_glu_bf16_b32",
            "gemv_bf16_b16_w8",
            "gemv_bf16_b32_w8",
            "gemv_glu_bf16_b16_w8",
            "gemv_glu_bf16_b32_w8",
            "gemv_bf16_b64",
            "gemv_glu_bf16_b64",
        ],
    ),
    ("random", &["fill_random_bf16"]),
    ("residual_norm", &["residual_norm_f32"]),
    ("rope", &["qkv_rope_bf16"]),
    ("sampling", &["argmax_f32", "logits_at_f32"]),
];

/// The stems of all embedded `kernels/*.cu` files.
pub fn stems() -> Vec<&'static str> {
    gen::SOURCES.iter().map(|(s, _)| *s).collect()
}

/// The source of `kernels/<stem>.cu` with each `#include "x.cuh"` replaced by that header's text
/// (NVRTC, as cudarc drives it, is given no header files).
pub fn source(stem: &str) -> Option<String> {
    let (_, src) = gen::SOURCES.iter().find(|(s, _)| *s == stem)?;
    let mut out = String::with_capacity(src.len() + 4096);
    for line in src.lines() {
        let inc = line
            .trim()
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'));
        match inc.and_then(|name| gen::HEADERS.iter().find(|(h, _)| *h == name)) {
            Some((_, text)) => out.push_str(text),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    Some(out)
}

/// PTX that nvcc built at build time for the largest architecture ≤ `cc` (e.g. 90), if any.
pub fn embedded_ptx(stem: &str, cc: u32) -> Option<&'static str> {
    gen::PTX
        .iter()
        .filter(|(s, a, _)| *s == stem && *a <= cc)
        .max_by_key(|(_, a, _)| *a)
        .map(|(_, _, p)| *p)
}

/// Whether build.rs embedded nvcc-built PTX (then NVRTC is not needed at run time).
pub fn has_embedded_ptx() -> bool {
    !gen::PTX.is_empty()
}

/// Ok when libnvrtc can be opened (cudarc panics on a missing library, so ask first).
pub fn nvrtc_available() -> Result<(), String> {
    // SAFETY: only tries to dlopen the NVRTC library names and closes them again.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("NVRTC not found (libnvrtc.so.13): put the CUDA library folder (/usr/local/cuda/lib64, or \
             pip's site-packages/nvidia/cu13/lib after `pip install nvidia-cuda-nvrtc==13.0.88`) on LD_LIBRARY_PATH"
            .into())
    }
}

/// A CUDA include directory (one holding `cuda_bf16.h`): `THINKSTEER_CUDA_INCLUDE`, `CUDA_HOME`,
/// `CUDA_PATH`, `/usr/local/cuda`, or a pip-installed `nvidia/cu13/include` under the usual Python
/// prefixes (`$VIRTUAL_ENV`, `$CONDA_PREFIX`, /usr/local, /usr, ~/.local, ~/.pyenv/versions/*).
pub fn include_dir() -> Option<PathBuf> {
    let has_header = |d: &Path| d.join("cuda_bf16.h").is_file();
    if let Ok(v) = std::env::var("THINKSTEER_CUDA_INCLUDE") {
        return Some(PathBuf::from(v));
    }
    let mut cands: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = std::env::var(var) {
            cands.push(Path::new(&v).join("include"));
        }
    }
    cands.push("/usr/local/cuda/include".into());
    if let Some(d) = cands.iter().find(|d| has_header(d)) {
        return Some(d.clone());
    }
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Ok(v) = std::env::var(var) {
            prefixes.push(v.into());
        }
    }
    prefixes.push("/usr/local".into());
    prefixes.push("/usr".into());
    if let Ok(home) = std::env::var("HOME") {
        let home = PathBuf::from(home);
        prefixes.push(home.join(".local"));
        if let Ok(rd) = std::fs::read_dir(home.join(".pyenv/versions")) {
            prefixes.extend(rd.flatten().map(|e| e.path()));
        }
    }
    for prefix in prefixes {
        let Ok(rd) = std::fs::read_dir(prefix.join("lib")) else {
            continue;
        };
        for e in rd.flatten() {
            if !e.file_name().to_string_lossy().starts_with("python3") {
                continue;
            }
            for pkgs in ["site-packages", "dist-packages"] {
                let d = e.path().join(pkgs).join("nvidia/cu13/include");
                if has_header(&d) {
                    return Some(d);
                }
            }
        }
    }
    None
}

/// One NVRTC compilation's result.
pub struct Compiled {
    pub ptx: String,
    /// NVRTC's log (warnings; with `--ptxas-options=-v` and a real `sm_XX` arch, register and
    /// spill counts).
    pub log: String,
}

/// Compiles `src` (named `name` in messages) with NVRTC for `arch` ("compute_90" for loadable PTX,
/// "sm_90" to run ptxas too), `-std=c++17`, the include directory when found, and `extra` options.
/// No `--use_fast_math`: the kernels promise precise expf/sinf/cosf (see their banners).
pub fn compile(name: &str, src: &str, arch: &str, extra: &[&str]) -> Result<Compiled, String> {
    nvrtc_available()?;
    use cudarc::nvrtc::result as nv;
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
    ];
    if let Some(inc) = include_dir() {
        opts.push(format!("--include-path={}", inc.display()));
    }
    opts.extend(extra.iter().map(|s| s.to_string()));
    let csrc = CString::new(src).map_err(|_| format!("{name}: source holds a NUL byte"))?;
    let cname = CString::new(name).map_err(|_| format!("{name}: name holds a NUL byte"))?;
    let prog = nv::create_program(&csrc, Some(&cname))
        .map_err(|e| format!("{name}: nvrtcCreateProgram: {e:?}"))?;
    // SAFETY: `prog` was just created and is destroyed exactly once, below, after its last use.
    let compiled = unsafe { nv::compile_program(prog, &opts) };
    // SAFETY: as above; the log exists after a successful or failed compilation.
    let log = unsafe { nv::get_program_log(prog) }
        .map(|l| c_chars_to_string(&l))
        .unwrap_or_default();
    let result = match compiled {
        // SAFETY: as above; PTX exists after a successful compilation.
        Ok(()) => unsafe { nv::get_ptx(prog) }
            .map(|p| Compiled {
                ptx: c_chars_to_string(&p),
                log: log.clone(),
            })
            .map_err(|e| format!("{name} ({arch}): nvrtcGetPTX: {e:?}")),
        Err(e) => Err(format!("{name} ({arch}) failed to compile: {e:?}\n{log}")),
    };
    // SAFETY: `prog` is not used after this.
    let _ = unsafe { nv::destroy_program(prog) };
    result
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
