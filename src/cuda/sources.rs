//! The embedded CUDA kernels and how they become loadable code: build.rs embeds `kernels/*.cu`
//! and nvcc-built PTX when nvcc was there, or NVRTC-built cubins (sm_80 and sm_90 by default)
//! when libnvrtc was; for a device none of those serves, the sources are compiled here with
//! NVRTC into cubins, kept in a cache folder (`cache_dir`) that later processes read instead of
//! compiling again. Also the discovery of NVRTC and of a CUDA include directory.
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
    (
        "prefill_attention",
        &["attention_prefill_bf16", "attention_runs_bf16"],
    ),
    (
        "gemm_wgmma",
        &[
            "gemm_wg_bf16",
            "gemm_wg_bf16_m256",
            "gemm_glu_wg_bf16",
            "gemm_glu_wg_bf16_m256",
        ],
    ),
    ("elementwise", &["silu_mul_bf16"]),
    ("embed", &["embed_bf16"]),
    (
        "gemm",
        &[
            "gemm_bf16",
            "gemm_bf16_n128",
            "gemm_glu_bf16",
            "gemm_glu_bf16_n128",
        ],
    ),
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
            "hybrid_keep_f32",
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

/// The cubin NVRTC built at build time for exactly compute capability `cc`, if any.
pub fn embedded_cubin(stem: &str, cc: u32) -> Option<&'static [u8]> {
    gen::CUBIN
        .iter()
        .find(|(s, a, _)| *s == stem && *a == cc)
        .map(|(_, _, b)| *b)
}

/// The architectures build.rs compiled cubins for with NVRTC (empty where it did not: nvcc was
/// there, NVRTC was not, or THINKSTEER_BUILD_NVRTC=0).
pub fn nvrtc_built_archs() -> &'static [u32] {
    gen::NVRTC_ARCHS
}

/// Whether build.rs embedded PTX built by nvcc.
pub fn has_embedded_ptx() -> bool {
    !gen::PTX.is_empty()
}

/// Whether build.rs embedded loadable code for every module on a device of compute capability
/// `cc` (nvcc's PTX, or NVRTC's cubins for that architecture): then NVRTC is not needed at run
/// time.
pub fn embedded_for(cc: u32) -> bool {
    MODULES
        .iter()
        .all(|(stem, _)| embedded_ptx(stem, cc).is_some() || embedded_cubin(stem, cc).is_some())
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
    /// The cubin, for a real `sm_XX` arch (None for a virtual `compute_XX` one).
    pub cubin: Option<Vec<u8>>,
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
            .map_err(|e| format!("{name} ({arch}): nvrtcGetPTX: {e:?}"))
            .and_then(|p| {
                let cubin = if arch.starts_with("sm_") {
                    // SAFETY: as above; a cubin exists after compiling for a real architecture.
                    Some(unsafe { get_cubin(prog) }.map_err(|e| format!("{name} ({arch}): {e}"))?)
                } else {
                    None
                };
                Ok(Compiled {
                    ptx: c_chars_to_string(&p),
                    cubin,
                    log: log.clone(),
                })
            }),
        Err(e) => Err(format!("{name} ({arch}) failed to compile: {e:?}\n{log}")),
    };
    // SAFETY: `prog` is not used after this.
    let _ = unsafe { nv::destroy_program(prog) };
    result
}

/// The cubin of a program compiled for a real architecture.
///
/// # Safety
/// `prog` must be a live program whose compilation for an `sm_XX` architecture succeeded.
unsafe fn get_cubin(prog: cudarc::nvrtc::sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::sys;
    let mut size = 0usize;
    // SAFETY: the caller's guarantee; `size` is a valid out-pointer.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBINSize: {e:?}"))?;
    let mut bin = vec![0u8; size];
    // SAFETY: `bin` holds the `size` bytes NVRTC said the cubin takes.
    unsafe { sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut std::ffi::c_char) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))?;
    Ok(bin)
}

/// Names what the kernel cache holds; changed when a cached file's meaning changes.
const CACHE_FORMAT: &str = "thinksteer kernel cache 2: NVRTC cubin, sm_90a for 9.0";

/// The architecture NVRTC compiles compute capability `cc` for: `sm_90a` for 9.0 (Hopper's
/// architecture-specific features, wgmma among them, which gemm_wgmma.cu needs; its cubins run
/// on 9.0 devices only, as any sm_90 cubin does), else `sm_<cc>`. build.rs follows the same rule.
pub fn nvrtc_arch(cc: u32) -> String {
    if cc == 90 {
        "sm_90a".into()
    } else {
        format!("sm_{cc}")
    }
}

/// Options of every runtime compilation besides the architecture and the include directory
/// (which the kernels do not use: they include no CUDA header).
const RUNTIME_OPTIONS: &[&str] = &[];

/// The folder of compiled kernels (cubins NVRTC made at run time, reused by later processes):
/// `THINKSTEER_KERNEL_CACHE` (empty or `0`: no cache), else `$XDG_CACHE_HOME/thinksteer/kernels`,
/// else `~/.cache/thinksteer/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var("THINKSTEER_KERNEL_CACHE") {
        Ok(v) if v.is_empty() || v == "0" => None,
        Ok(v) => Some(v.into()),
        Err(_) => std::env::var("XDG_CACHE_HOME")
            .ok()
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var("HOME")
                    .ok()
                    .map(|h| Path::new(&h).join(".cache"))
            })
            .map(|d| d.join("thinksteer/kernels")),
    }
}

/// FNV-1a (64-bit) of the cache format, the compile options and a module's source (headers
/// inlined): a changed kernel, header or option gets new file names, so a stale cubin is never
/// read. The NVRTC version is left out on purpose: a cubin of the same source and options from
/// another NVRTC computes the same function, and a machine without NVRTC (reading a cache filled
/// elsewhere) could not know its own; the driver refuses a cubin it cannot run, and that one is
/// compiled again.
pub fn source_key(src: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let parts = [CACHE_FORMAT]
        .into_iter()
        .chain(RUNTIME_OPTIONS.iter().copied())
        .chain([src]);
    for part in parts {
        for b in part.bytes().chain([0]) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn cache_file(dir: &Path, stem: &str, cc: u32, key: u64) -> PathBuf {
    dir.join(format!("{stem}.sm_{cc}.{key:016x}.cubin"))
}

/// Whether `b` is a whole 64-bit little-endian ELF file as far as its headers tell: the program
/// and section header tables and every section with file contents end inside it. The driver's
/// cuModuleLoadData takes no length, so a truncated or foreign cache file must not reach it.
pub fn is_whole_elf(b: &[u8]) -> bool {
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as u64)
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0xff; 8])))
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let len = b.len() as u64;
    let table = |off: Option<u64>, size: Option<u64>, n: Option<u64>| match (off, size, n) {
        (Some(o), Some(s), Some(n)) => o.checked_add(s * n).is_some_and(|end| end <= len),
        _ => false,
    };
    let (phoff, shoff) = (u64_at(0x20), u64_at(0x28));
    let (phsize, phnum, shsize, shnum) = (u16_at(0x36), u16_at(0x38), u16_at(0x3a), u16_at(0x3c));
    if !table(phoff, phsize, phnum) || !table(shoff, shsize, shnum) {
        return false;
    }
    let (shoff, shsize) = (shoff.unwrap_or(0) as usize, shsize.unwrap_or(0) as usize);
    (0..shnum.unwrap_or(0) as usize).all(|i| {
        let h = shoff + i * shsize;
        const NOBITS: u64 = 8;
        match (u32_at(h + 4), u64_at(h + 0x18), u64_at(h + 0x20)) {
            (Some(NOBITS), _, _) => true,
            (Some(_), Some(o), Some(sz)) => o.checked_add(sz).is_some_and(|end| end <= len),
            _ => false,
        }
    })
}

/// Where a cubin came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled by NVRTC at build time, in the binary.
    Embedded,
    Cache,
    Compiled,
}

/// The cubin of `kernels/<stem>.cu` for compute capability `cc` (×10, e.g. 90): read from the
/// `cache` folder when it holds a whole one for this source, else compiled by NVRTC for
/// `nvrtc_arch(cc)` and written there (a folder that cannot be written is passed over: the cache only
/// saves time).
pub fn cubin(stem: &str, cc: u32, cache: Option<&Path>) -> Result<(Vec<u8>, Origin), String> {
    let (src, path) = source_and_file(stem, cc, cache)?;
    if let Some(bin) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        if is_whole_elf(&bin) {
            return Ok((bin, Origin::Cache));
        }
    }
    compile_into(stem, &src, cc, path.as_deref()).map(|b| (b, Origin::Compiled))
}

/// `kernels/<stem>.cu` compiled by NVRTC for `sm_<cc>`, replacing what the `cache` folder held
/// for it (e.g. a cubin the driver refused).
pub fn compile_cubin(stem: &str, cc: u32, cache: Option<&Path>) -> Result<Vec<u8>, String> {
    let (src, path) = source_and_file(stem, cc, cache)?;
    compile_into(stem, &src, cc, path.as_deref())
}

/// A module's source and its cubin's file in `cache`.
fn source_and_file(
    stem: &str,
    cc: u32,
    cache: Option<&Path>,
) -> Result<(String, Option<PathBuf>), String> {
    let src =
        source(stem).ok_or_else(|| format!("kernel file kernels/{stem}.cu was not embedded"))?;
    let path = cache.map(|d| cache_file(d, stem, cc, source_key(&src)));
    Ok((src, path))
}

/// Compiles `src` (module `stem`) for `sm_<cc>` and writes the cubin to `path` when given.
fn compile_into(stem: &str, src: &str, cc: u32, path: Option<&Path>) -> Result<Vec<u8>, String> {
    let arch = nvrtc_arch(cc);
    let c = compile(&format!("{stem}.cu"), src, &arch, RUNTIME_OPTIONS)?;
    let bin = c
        .cubin
        .ok_or_else(|| format!("{stem}.cu ({arch}): NVRTC gave no cubin"))?;
    if let Some(p) = path {
        // Written under a name of this process and thread and renamed, so a reader never sees
        // half a file.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = p.with_extension(format!("tmp.{}.{n}", std::process::id()));
        let stored = std::fs::create_dir_all(p.parent().unwrap_or(Path::new(".")))
            .and_then(|_| std::fs::write(&tmp, &bin))
            .and_then(|_| std::fs::rename(&tmp, p));
        if stored.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(bin)
}

/// `f` for every module, side by side on threads of their own (NVRTC compiles distinct programs
/// concurrently), in `MODULES` order.
pub fn per_module<T: Send>(f: impl Fn(&'static str) -> T + Sync) -> Vec<T> {
    std::thread::scope(|sc| {
        let jobs: Vec<_> = MODULES
            .iter()
            .map(|(stem, _)| {
                let f = &f;
                sc.spawn(move || f(stem))
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Whether `dir` holds a cubin of the current source of every module for compute capability
/// `cc` (then a machine without NVRTC can still load the kernels).
pub fn cache_complete(dir: &Path, cc: u32) -> bool {
    MODULES.iter().all(|(stem, _)| {
        source(stem).is_some_and(|src| {
            std::fs::read(cache_file(dir, stem, cc, source_key(&src)))
                .is_ok_and(|b| is_whole_elf(&b))
        })
    })
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
