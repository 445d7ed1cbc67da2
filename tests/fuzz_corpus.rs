//! Replays every committed fuzz seed and regression (crash) file through the fuzz targets'
//! own checks, on stable, so CI exercises them without nightly or libFuzzer.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_support;

use std::path::Path;

use fuzz_support::check;

/// Runs `check` on every file for `target`; fails if there are none.
fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).unwrap();
            if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
                eprintln!("failing input: {}", file.display());
                std::panic::resume_unwind(panic);
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no corpus for {target}");
}

#[test]
fn head_corpus() {
    replay("head", check::head);
}

#[test]
fn body_corpus() {
    replay("body", check::body);
}

#[test]
fn connection_corpus() {
    replay("connection", check::connection);
}

#[test]
fn differential_corpus() {
    replay("differential", check::differential);
}
