//! Compiles every embedded kernel with NVRTC for sm_80 and sm_90 (ptxas included, so register
//! spills are reported) — no GPU needed. Skips with a printed reason when libnvrtc cannot be
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
        for arch in ["sm_80", "sm_90"] {
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

#[test]
fn compiled_kernels_are_cached_by_source_and_read_back() {
    if sources::nvrtc_available().is_err() {
        println!("skipped: no NVRTC");
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("thinksteer-kc-{}-{nanos}", std::process::id()));
    let (first, origin) = sources::cubin("elementwise", 90, Some(&dir)).unwrap();
    assert_eq!(origin, sources::Origin::Compiled);
    assert!(first.starts_with(b"\x7fELF"), "not a cubin");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one file per module and architecture");
    let (again, origin) = sources::cubin("elementwise", 90, Some(&dir)).unwrap();
    assert_eq!((origin, &again), (sources::Origin::Cache, &first));
    // What is read is the file itself (a planted one comes back as it is).
    std::fs::write(files[0].path(), b"planted").unwrap();
    let (planted, _) = sources::cubin("elementwise", 90, Some(&dir)).unwrap();
    assert_eq!(planted, b"planted");
    // Another architecture is another file; the cache is complete only with every module.
    let (_, origin) = sources::cubin("elementwise", 80, Some(&dir)).unwrap();
    assert_eq!(origin, sources::Origin::Compiled);
    assert!(!sources::cache_complete(&dir));
    // A changed source gets another key, so a stale cubin is never read.
    let src = sources::source("elementwise").unwrap();
    assert_ne!(
        sources::source_key(&src),
        sources::source_key(&format!("{src} "))
    );
    let _ = std::fs::remove_dir_all(&dir);
}
