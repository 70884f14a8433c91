//! Build script: nothing to do by default (the checked-in bindings are used and libnccl is loaded at run time).
//! Feature `bindgen`: regenerate the bindings from `$NCCL_INCLUDE_DIR/nccl.h` (else `$NCCL_HOME/include`) into
//! `OUT_DIR`. Feature `link`: link libnccl from `$NCCL_LIB_DIR` (else `$NCCL_HOME/lib`, else the system paths).

use std::env;
use std::path::PathBuf;

#[cfg(feature = "bindgen")]
#[path = "bindgen_config.rs"]
mod bindgen_config;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=bindgen_config.rs");
    println!("cargo:rerun-if-changed=cuda-stubs");
    for var in ["NCCL_INCLUDE_DIR", "NCCL_HOME", "NCCL_LIB_DIR"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    #[cfg(feature = "bindgen")]
    regenerate();
    if env::var_os("CARGO_FEATURE_LINK").is_some() {
        link();
    }
}

fn nccl_home_sub(sub: &str) -> Option<PathBuf> {
    env::var_os("NCCL_HOME").map(|h| PathBuf::from(h).join(sub))
}

#[cfg(feature = "bindgen")]
fn regenerate() {
    let include = env::var_os("NCCL_INCLUDE_DIR")
        .map(PathBuf::from)
        .or_else(|| nccl_home_sub("include"));
    let Some(include) = include else {
        panic!("nccl-sys feature `bindgen`: set NCCL_INCLUDE_DIR (or NCCL_HOME) to the folder holding nccl.h");
    };
    println!("cargo:rerun-if-changed={}", include.join("nccl.h").display());
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let generated = bindgen_config::generate(&include, &bindgen_config::stubs_dir(&manifest)).unwrap_or_else(|e| {
        panic!("nccl-sys feature `bindgen`: {e} (is libclang installed? apt-get install libclang-dev)")
    });
    for name in &generated.unknown_since {
        println!("cargo:warning=nccl-sys: {name} is not in bindgen_config.rs SINCE; reporting the header's version");
    }
    std::fs::write(out.join("bindings.rs"), generated.bindings).expect("write OUT_DIR/bindings.rs");
    std::fs::write(out.join("functions.rs"), generated.functions).expect("write OUT_DIR/functions.rs");
}

fn link() {
    let dir = env::var_os("NCCL_LIB_DIR")
        .map(PathBuf::from)
        .or_else(|| nccl_home_sub("lib"));
    match dir {
        Some(dir) => {
            println!("cargo:rustc-link-search=native={}", dir.display());
            // This package's own tests and examples find the library at run time without LD_LIBRARY_PATH.
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            if dir.join("libnccl.so").exists() || !dir.join("libnccl.so.2").exists() {
                println!("cargo:rustc-link-lib=dylib=nccl");
            } else {
                // pip wheels ship only the versioned name.
                println!("cargo:rustc-link-lib=dylib:+verbatim=libnccl.so.2");
            }
        }
        None => println!("cargo:rustc-link-lib=dylib=nccl"),
    }
}
