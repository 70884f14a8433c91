//! The checked-in bindings against the real `nccl.h`: every declared function is bound (and nothing else), and
//! `src/bindings.rs` + `src/functions.rs` equal a fresh run of the generator (`bindgen_config.rs`, the same
//! code the `bindgen` feature's build script runs).
//!
//! The header is `$NCCL_INCLUDE_DIR/nccl.h`, else `$NCCL_HOME/include/nccl.h` (cargo's `[env]` points
//! NCCL_HOME at the project's pip wheel). Regenerate the checked-in files after changing the generator or the
//! header with `NCCL_SYS_REGENERATE=1 cargo test -p nccl-sys --test bindings`.

#[path = "../../tests/support/prereq.rs"]
mod prereq;

#[path = "../bindgen_config.rs"]
mod bindgen_config;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn include_dir() -> Option<PathBuf> {
    std::env::var_os("NCCL_INCLUDE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("NCCL_HOME").map(|h| PathBuf::from(h).join("include")))
        .filter(|d| d.join("nccl.h").is_file())
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Removes `/* */` and `//` comments.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |end| &after[end + 2..]);
            out.push(' ');
        } else if rest.starts_with("//") {
            rest = rest.find('\n').map_or("", |end| &rest[end..]);
        } else {
            let ch = rest.chars().next().unwrap_or(' ');
            out.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
    }
    out
}

/// Removes every `__attribute__((…))` (balanced parentheses).
fn strip_attributes(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("__attribute__") {
        out.push_str(&rest[..at]);
        rest = &rest[at + "__attribute__".len()..];
        let mut depth = 0usize;
        let mut end = rest.len();
        for (i, ch) in rest.char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                c if depth == 0 && !c.is_whitespace() => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Every `nccl*` function declared in the header text (preprocessor conditionals ignored, so functions in
/// `#ifdef` blocks are found too), excluding the `pnccl*` profiling aliases.
fn declared_functions(header: &str) -> BTreeSet<String> {
    let code = strip_attributes(&strip_comments(header));
    let mut body = String::new();
    let mut continued = false;
    for line in code.lines() {
        let is_directive = continued || line.trim_start().starts_with('#');
        continued = is_directive && line.trim_end().ends_with('\\');
        if !is_directive {
            body.push_str(line);
            body.push('\n');
        }
    }
    let mut names = BTreeSet::new();
    for stmt in body.split([';', '{', '}']) {
        let stmt = stmt.trim();
        let Some(open) = stmt.find('(') else { continue };
        let head = &stmt[..open];
        if head.contains('=') || head.trim_start().starts_with("typedef") {
            continue;
        }
        let idents: Vec<&str> = head
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|s| !s.is_empty())
            .collect();
        // A declaration is `<return type…> name(`: at least one identifier before the name.
        if let [_, .., name] = idents.as_slice() {
            if name.starts_with("nccl") {
                names.insert((*name).to_owned());
            }
        }
    }
    names
}

#[test]
fn the_parser_finds_declarations_and_nothing_else() {
    let text = "/* ncclNotThis(int) */\n#define ncclMacro(x) x\nncclResult_t  ncclA(int* v);\n\
                ncclResult_t pncclA(int* v);\nconst char*  ncclB(ncclResult_t r);\n\
                __attribute__ ((deprecated(\"no\"))) void ncclC();\n// ncclD(int);\n\
                typedef struct { int (*ncclE)(int); } s;\nx = ncclF(1);\n";
    let found: Vec<String> = declared_functions(text).into_iter().collect();
    assert_eq!(found, ["ncclA", "ncclB", "ncclC"]);
}

#[test]
fn every_function_in_the_header_is_bound_and_nothing_else() {
    let Some(dir) = include_dir() else {
        prereq::missing("nccl.h", "set NCCL_INCLUDE_DIR or NCCL_HOME; run scripts/setup.sh");
        return;
    };
    let header = std::fs::read_to_string(dir.join("nccl.h")).expect("read nccl.h");
    let declared = declared_functions(&header);
    let bound: BTreeSet<String> = nccl_sys::FUNCTIONS.iter().map(|(n, _)| (*n).to_owned()).collect();
    let excluded: BTreeSet<String> = bindgen_config::NOT_BOUND.iter().map(|(n, _)| (*n).to_owned()).collect();

    let unbound: Vec<_> = declared.difference(&bound).filter(|n| !excluded.contains(*n)).collect();
    let extra: Vec<_> = bound.difference(&declared).collect();
    let stale: Vec<_> = excluded.difference(&declared).collect();
    assert!(unbound.is_empty(), "declared in nccl.h but not bound: {unbound:?}");
    assert!(extra.is_empty(), "bound but not declared in nccl.h: {extra:?}");
    assert!(
        stale.is_empty(),
        "NOT_BOUND lists functions nccl.h no longer declares: {stale:?}"
    );
    assert!(bound.len() >= 70, "only {} functions bound", bound.len());
    println!(
        "{} functions declared, {} bound, {} excluded ({:?})",
        declared.len(),
        bound.len(),
        excluded.len(),
        excluded
    );
}

#[test]
fn every_bound_function_has_a_since_version() {
    for (name, since) in nccl_sys::FUNCTIONS {
        let listed = bindgen_config::SINCE.iter().find(|(n, _)| n == name).map(|(_, s)| *s);
        assert_eq!(
            listed,
            Some(*since),
            "{name}: bindgen_config.rs SINCE and the generated list disagree"
        );
        assert_eq!(nccl_sys::symbol_since(name), Some(*since));
        let (major, minor) = since.split_once('.').expect("major.minor");
        let code = major.parse::<i32>().unwrap() * 10000 + minor.parse::<i32>().unwrap() * 100;
        assert!(
            code <= nccl_sys::HEADER_VERSION_CODE,
            "{name} since {since} is newer than the header"
        );
    }
    assert_eq!(nccl_sys::symbol_since("ncclAlltoAll"), Some("2.28"));
    assert_eq!(nccl_sys::symbol_since("pncclAllReduce"), None);
    assert_eq!(nccl_sys::symbol_since("ncclNoSuchFunction"), None);
}

#[test]
fn checked_in_bindings_equal_a_fresh_generation() {
    let Some(dir) = include_dir() else {
        prereq::missing("nccl.h", "set NCCL_INCLUDE_DIR or NCCL_HOME; run scripts/setup.sh");
        return;
    };
    let header = std::fs::read_to_string(dir.join("nccl.h")).expect("read nccl.h");
    if !header.contains("#define NCCL_VERSION_CODE 23203") {
        prereq::missing(
            &format!("NCCL 2.32.3's nccl.h (the one in {} is another version)", dir.display()),
            "run scripts/setup.sh (it installs nvidia-nccl-cu12==2.32.3)",
        );
        return;
    }
    let probe = std::panic::catch_unwind(bindgen::clang_version);
    let Ok(clang) = probe else {
        prereq::missing(
            "libclang (for bindgen)",
            "apt-get install libclang-dev, or set LIBCLANG_PATH",
        );
        return;
    };
    let start = std::time::Instant::now();
    let generated = bindgen_config::generate(&dir, &bindgen_config::stubs_dir(manifest_dir())).expect("generate");
    println!(
        "generated from {} with {} in {:?}",
        dir.display(),
        clang.full,
        start.elapsed()
    );
    assert!(
        generated.unknown_since.is_empty(),
        "add to bindgen_config.rs SINCE: {:?}",
        generated.unknown_since
    );

    let regenerate = std::env::var_os("NCCL_SYS_REGENERATE").is_some_and(|v| v != "0");
    for (file, fresh) in [
        ("src/bindings.rs", &generated.bindings),
        ("src/functions.rs", &generated.functions),
    ] {
        let path = manifest_dir().join(file);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if &current == fresh {
            continue;
        }
        if regenerate {
            std::fs::write(&path, fresh).expect("write regenerated file");
            println!("REGENERATED {}", path.display());
            continue;
        }
        let line = current
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| current.lines().count().min(fresh.lines().count()));
        panic!(
            "{file} differs from a fresh generation from line {} on:\n  checked in: {:?}\n  fresh:      {:?}\n\
             Regenerate with NCCL_SYS_REGENERATE=1 cargo test -p nccl-sys --test bindings",
            line + 1,
            current.lines().nth(line),
            fresh.lines().nth(line)
        );
    }
}
