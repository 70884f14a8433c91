//! What a test does when something it needs (a data file, a tool) is missing: under CI (the `CI` variable is
//! set, as `.ci/run` does) the test fails, naming what is missing and how to get it; elsewhere it is skipped,
//! saying so loudly on stderr. Shared by the workspace's test crates (`#[path]`-included), so that no test can
//! pass by skipping in CI.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Reports a missing prerequisite: panics under CI, otherwise prints a loud skip notice. Callers return
/// right after it.
pub fn missing(what: &str, how: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("prerequisite missing (CI is set, so this fails instead of skipping): {what}; {how}");
    }
    eprintln!("SKIPPED (prerequisite missing): {what}; {how}. Under CI this test fails.");
}

/// The project's `.deps` folder (scripts/setup.sh fills it): `NCCL_STACK_DEPS` as `.cargo/config.toml` sets it
/// under cargo, else the one beside the workspace root.
pub fn deps_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NCCL_STACK_DEPS") {
        return PathBuf::from(d);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .map(|a| a.join(".deps"))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| here.join(".deps"))
}

/// A file under `.deps`, or `None` after reporting it missing.
pub fn deps_file(rel: &str) -> Option<PathBuf> {
    let p = deps_dir().join(rel);
    if p.exists() {
        Some(p)
    } else {
        missing(&format!("{} (.deps/{rel})", p.display()), "run scripts/setup.sh");
        None
    }
}

/// A program on `PATH`, or `None` after reporting it missing.
pub fn program(name: &str, how: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        missing(&format!("the program `{name}` on PATH"), how);
    }
    found
}

/// The path of example `name` built next to the running test binary (`cargo test` builds the examples;
/// `--test X` alone does not). Panics naming the command when it is missing: a build step, not a data file.
pub fn built_example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target profile dir");
    let p = dir.join("examples").join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo test` (it builds the examples) or `cargo build --examples`",
        p.display()
    );
    p
}
