//! Compiles every embedded kernel with NVRTC for sm_80 and sm_90a (the architecture the runtime
//! and build.rs compile compute capability 9.0 for; ptxas included, so register spills are
//! reported) — no GPU needed. Skips with a printed reason when libnvrtc cannot be
//! opened, unless THINKSTEER_REQUIRE_NVRTC=1 (CI), where that is a failure.

use thinksteer::cuda::sources;

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    if let Err(why) = sources::nvrtc_available() {
        if std::env::var("THINKSTEER_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("THINKSTEER_REQUIRE_NVRTC=1 but {why}");
        }
        println!("skipped: {why}");
        return;
    }
    let stems = sources::stems();
    // Every module the runtime loads must be embedded, and every embedded file loaded.
    let mut listed: Vec<&str> = sources::MODULES.iter().map(|(s, _)| *s).collect();
    let mut embedded = stems.clone();
    listed.sort();
    embedded.sort();
    assert_eq!(
        listed, embedded,
        "sources::MODULES and kernels/*.cu disagree"
    );

    let mut failures = Vec::new();
    for (stem, funcs) in sources::MODULES {
        let src = sources::source(stem).unwrap();
        assert!(
            !src.contains("#include \"common.cuh\""),
            "{stem}: header not inlined"
        );
        for arch in ["sm_80".to_string(), sources::nvrtc_arch(90)] {
            let arch = arch.as_str();
            // A real architecture runs ptxas, whose -v output lists spills per function.
            match sources::compile(&format!("{stem}.cu"), &src, arch, &["--ptxas-options=-v"]) {
                Err(e) => failures.push(e),
                Ok(c) => {
                    for f in funcs.iter() {
                        if !c.ptx.contains(&format!(".entry {f}(")) {
                            failures
                                .push(format!("{stem}.cu ({arch}): no entry point {f} in the PTX"));
                        }
                    }
                    // And the other way: an exported kernel missing from MODULES is never loaded.
                    for entry in c.ptx.split(".entry ").skip(1) {
                        let name = entry.split('(').next().unwrap_or("").trim();
                        if !funcs.contains(&name) {
                            failures.push(format!(
                                "{stem}.cu ({arch}): kernel {name} is not listed in sources::MODULES"
                            ));
                        }
                    }
                    for line in c.log.lines().filter(|l| l.contains("spill")) {
                        let spilled = line.contains("spill stores")
                            && !line.contains(" 0 bytes spill stores");
                        if spilled {
                            failures.push(format!(
                                "{stem}.cu ({arch}): register spill: {}",
                                line.trim()
                            ));
                        }
                    }
                    // gemm_wgmma.cu's products are real on sm_90a only (a trap elsewhere).
                    if *stem == "gemm_wgmma"
                        && c.ptx.contains("wgmma.mma_async") != (arch == "sm_90a")
                    {
                        failures.push(format!(
                            "{stem}.cu ({arch}): wgmma.mma_async expected on sm_90a only"
                        ));
                    }
                    // The form the runtime loads: the real architecture's cubin (an ELF file).
                    if !c.cubin.as_ref().is_some_and(|b| b.starts_with(b"\x7fELF")) {
                        failures.push(format!("{stem}.cu ({arch}): no cubin"));
                    }
                    println!("{stem}.cu {arch}: ok ({} bytes of PTX)", c.ptx.len());
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} kernel compile problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_broken_kernel_is_reported_with_its_log() {
    if sources::nvrtc_available().is_err() {
        println!("skipped: no NVRTC");
        return;
    }
    let err = match sources::compile(
        "broken.cu",
        "extern \"C\" __global__ void k() { undeclared(); }",
        "sm_90",
        &[],
    ) {
        Ok(_) => panic!("a kernel calling an undeclared function compiled"),
        Err(e) => e,
    };
    assert!(
        err.contains("broken.cu") && err.contains("undeclared"),
        "unhelpful error: {err}"
    );
}

/// Whether NVRTC is here; without it the test is skipped (a failure under
/// THINKSTEER_REQUIRE_NVRTC=1, as in CI).
fn nvrtc_or_skip() -> bool {
    match sources::nvrtc_available() {
        Ok(()) => true,
        Err(why) if std::env::var("THINKSTEER_REQUIRE_NVRTC").is_ok_and(|v| v == "1") => {
            panic!("THINKSTEER_REQUIRE_NVRTC=1 but {why}")
        }
        Err(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!("thinksteer-{tag}-{}-{nanos}", std::process::id()))
}

#[test]
fn compiled_kernels_are_cached_by_source_and_read_back() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = temp_dir("kc");
    let (first, origin) = sources::cubin("elementwise", 90, Some(&dir)).unwrap();
    assert_eq!(origin, sources::Origin::Compiled);
    assert!(sources::is_whole_elf(&first), "not a whole cubin");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one file per module and architecture");
    let (again, origin) = sources::cubin("elementwise", 90, Some(&dir)).unwrap();
    assert_eq!((origin, &again), (sources::Origin::Cache, &first));
    // A file that is not a whole cubin (foreign, or cut short) is never handed to the driver:
    // it is compiled again and replaced.
    for bad in [b"planted".to_vec(), first[..first.len() - 100].to_vec()] {
        assert!(!sources::is_whole_elf(&bad));
        std::fs::write(files[0].path(), &bad).unwrap();
        let (bin, origin) = sources::cubin("elementwise", 90, Some(&dir)).unwrap();
        assert_eq!((origin, &bin), (sources::Origin::Compiled, &first));
        assert_eq!(std::fs::read(files[0].path()).unwrap(), first, "replaced");
    }
    // Another architecture is another file; the cache is complete only with every module.
    let (_, origin) = sources::cubin("elementwise", 80, Some(&dir)).unwrap();
    assert_eq!(origin, sources::Origin::Compiled);
    assert!(!sources::cache_complete(&dir, 90));
    // A changed source gets another key, so a stale cubin is never read.
    let src = sources::source("elementwise").unwrap();
    assert_ne!(
        sources::source_key(&src),
        sources::source_key(&format!("{src} "))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_kernels_command_fills_a_complete_cache() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = temp_dir("kernels-cmd");
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinksteer"))
            .args(["kernels", "--arch", "90", "--cache"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let n = sources::MODULES.len();
    assert!(run().contains(&format!("{n} compiled, 0 already cached")));
    assert!(sources::cache_complete(&dir, 90));
    assert!(!sources::cache_complete(&dir, 80));
    assert!(run().contains(&format!("0 compiled, {n} already cached")));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where build.rs found NVRTC (as in CI, where THINKSTEER_REQUIRE_NVRTC=1 makes its absence a
/// failure), it embedded a whole cubin of every module for every architecture it built for, so a
/// GPU machine of those needs no NVRTC; the loader takes them for exactly those architectures.
#[test]
fn the_build_embeds_a_cubin_of_every_module_where_nvrtc_was_there() {
    if sources::has_embedded_ptx() {
        println!("skipped: nvcc was there at build time (its PTX is embedded instead)");
        return;
    }
    let archs = sources::nvrtc_built_archs();
    if archs.is_empty() {
        assert!(
            !std::env::var("THINKSTEER_REQUIRE_NVRTC").is_ok_and(|v| v == "1"),
            "THINKSTEER_REQUIRE_NVRTC=1 but build.rs embedded no cubins: was libnvrtc on LD_LIBRARY_PATH when this was built? (build.rs reruns when a kernel or build.rs changes)"
        );
        println!(
            "skipped: build.rs did not run NVRTC (no libnvrtc then, or THINKSTEER_BUILD_NVRTC=0)"
        );
        return;
    }
    for &cc in archs {
        for (stem, _) in sources::MODULES {
            let bin = sources::embedded_cubin(stem, cc)
                .unwrap_or_else(|| panic!("no embedded cubin of kernels/{stem}.cu for sm_{cc}"));
            assert!(
                sources::is_whole_elf(bin),
                "{stem}.cu sm_{cc}: not a whole cubin"
            );
        }
        assert!(sources::embedded_for(cc));
    }
    let other = (80..=120).find(|cc| !archs.contains(cc)).unwrap();
    assert!(
        !sources::embedded_for(other),
        "no code was built for sm_{other}"
    );
}
