//! Root build script: stamps the `nccl-perf` binary with the commit it was built from, as nccl-tests'
//! header names its build. `NCCL_STACK_GIT` is `git describe --always --dirty` of this checkout, or
//! `unknown` where there is no git or no repository (e.g. a source tarball).

use std::process::Command;

fn main() {
    let describe = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=NCCL_STACK_GIT={describe}");
    // Rebuild when the checked-out commit or the index (dirty state) changes.
    if let Ok(o) = Command::new("git").args(["rev-parse", "--git-dir"]).output() {
        if o.status.success() {
            let dir = String::from_utf8_lossy(&o.stdout).trim().to_string();
            for f in ["HEAD", "index"] {
                println!("cargo:rerun-if-changed={dir}/{f}");
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
