//! The loader's error paths, without touching the process-wide `library()`: explicit files that are missing
//! or not NCCL, an exhausted search, and a symbol absent from an older library (a stand-in libnccl built here
//! with the C compiler that cargo links with).

#[path = "../../tests/support/prereq.rs"]
mod prereq;

use std::path::{Path, PathBuf};
use std::process::Command;

use nccl_sys::{Candidate, Library, LoadError};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nccl-sys-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Builds a shared library from C `source` at `dir/file`; `None` when no C compiler works (a failure under CI,
/// a loud skip elsewhere: see `prereq`).
fn build_c_library(dir: &Path, file: &str, source: &str) -> Option<PathBuf> {
    let src = dir.join(format!("{file}.c"));
    std::fs::write(&src, source).unwrap();
    let out = dir.join(file);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    match Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
    {
        Ok(o) if o.status.success() => Some(out),
        Ok(o) => {
            prereq::missing(
                &format!(
                    "a working C compiler ({cc} failed: {})",
                    String::from_utf8_lossy(&o.stderr)
                ),
                "install gcc or set CC",
            );
            None
        }
        Err(e) => {
            prereq::missing(&format!("a C compiler ({cc}: {e})"), "install gcc or set CC");
            None
        }
    }
}

#[test]
fn a_missing_explicit_file_is_an_open_error_naming_it() {
    let missing = PathBuf::from("/nonexistent/nccl-sys-test/libnccl.so.2");
    let err = Library::open(&missing).unwrap_err();
    assert!(
        matches!(&err, LoadError::Open { path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("/nonexistent/nccl-sys-test/libnccl.so.2"),
        "{err}"
    );

    // An explicit candidate stops the search even when later candidates would work.
    let real = nccl_sys::library()
        .expect("the real libnccl (run scripts/setup.sh)")
        .path()
        .to_path_buf();
    let err = Library::load_from(&[Candidate::Explicit(missing.clone()), Candidate::File(real.clone())]).unwrap_err();
    assert!(
        matches!(&err, LoadError::Open { path, .. } if *path == missing),
        "{err:?}"
    );

    // A plain file candidate that is missing is skipped.
    let lib = Library::load_from(&[Candidate::File(missing), Candidate::File(real.clone())]).unwrap();
    assert_eq!(lib.path(), real.canonicalize().unwrap());
    assert_eq!(lib.version_code(), 23203);
}

#[test]
fn an_exhausted_search_lists_every_place_and_why() {
    let missing = PathBuf::from("/nonexistent/nccl-sys-test/lib/libnccl.so.2");
    let err = Library::load_from(&[
        Candidate::File(missing.clone()),
        Candidate::SystemName("libnccl-sys-test-does-not-exist.so.9".to_owned()),
    ])
    .unwrap_err();
    let LoadError::NotFound { searched } = &err else {
        panic!("expected NotFound, got {err:?}")
    };
    assert_eq!(searched.len(), 2, "{searched:?}");
    assert_eq!(searched[0], (missing.display().to_string(), "no such file".to_owned()));
    assert_eq!(searched[1].0, "libnccl-sys-test-does-not-exist.so.9");
    assert!(!searched[1].1.is_empty());
    let text = err.to_string();
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(text.contains("libnccl-sys-test-does-not-exist.so.9"), "{text}");
    assert!(
        text.contains("NCCL_LIBRARY"),
        "the message should say how to fix it: {text}"
    );
}

#[test]
fn a_file_that_is_not_a_library_or_not_nccl_is_rejected() {
    let dir = scratch("not-nccl");
    let text_file = dir.join("libnccl.so.2");
    std::fs::write(&text_file, "not a shared library").unwrap();
    let err = Library::open(&text_file).unwrap_err();
    assert!(
        matches!(&err, LoadError::Open { path, .. } if *path == text_file),
        "{err:?}"
    );

    if let Some(other) = build_c_library(&dir, "libother.so", "int not_nccl(void) { return 0; }\n") {
        let err = Library::open(&other).unwrap_err();
        assert!(err.to_string().contains("not an NCCL library"), "{err}");
    }
    if let Some(broken) = build_c_library(
        &dir,
        "libbroken.so",
        "int ncclGetVersion(int* v) { (void)v; return 3; }\n",
    ) {
        let err = Library::open(&broken).unwrap_err();
        assert!(
            err.to_string().contains("ncclGetVersion returned ncclResult_t 3"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_symbol_missing_from_an_older_library_names_the_version_that_introduced_it() {
    let dir = scratch("old-nccl");
    // An "NCCL 2.27.3": it reports that version and exports ncclGetUniqueId but not the 2.28 ncclAlltoAll.
    let source = "int ncclGetVersion(int* v) { *v = 22703; return 0; }\n\
                  int ncclGetUniqueId(void* id) { (void)id; return 5; }\n";
    let Some(path) = build_c_library(&dir, "libnccl.so.2", source) else {
        return;
    };
    let lib = Library::open(&path).unwrap();
    assert_eq!(lib.version_code(), 22703);

    let err = lib.ncclAlltoAll().unwrap_err();
    assert_eq!(
        err,
        LoadError::MissingSymbol {
            symbol: "ncclAlltoAll",
            needs: "2.28",
            loaded: 22703
        }
    );
    assert!(
        err.to_string().contains("NCCL 2.28") && err.to_string().contains("2.27.3"),
        "{err}"
    );
    // Asking again gives the same answer from the cache.
    assert_eq!(lib.ncclAlltoAll().unwrap_err(), err);

    // Present symbols resolve to the stand-in's own functions.
    let get_id = lib.ncclGetUniqueId().unwrap();
    let mut id = nccl_sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: the stand-in ignores its argument and returns 5.
    assert_eq!(unsafe { get_id(&mut id) }, 5);

    let missing: Vec<&str> = lib
        .resolve_all()
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(missing.len(), nccl_sys::FUNCTIONS.len() - 2, "{missing:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
