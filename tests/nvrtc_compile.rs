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
                    println!("{stem}.cu {arch}: ok ({} bytes of PTX)", c.ptx.len());
                }
            }
            // The form the runtime loads: PTX for the virtual architecture.
            let virt = arch.replace("sm_", "compute_");
            if let Err(e) = sources::compile(&format!("{stem}.cu"), &src, &virt, &[]) {
                failures.push(e);
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
