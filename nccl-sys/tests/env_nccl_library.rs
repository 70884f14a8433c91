//! `NCCL_LIBRARY` through the environment, as users set it. This file is its own test process with a single
//! test, so changing the environment here cannot race with other tests or affect their `library()`.

use nccl_sys::{Library, LoadError};

#[test]
fn nccl_library_decides_and_its_failure_names_the_path() {
    if cfg!(feature = "link") {
        // Linked at build time: the environment does not choose the library.
        std::env::set_var("NCCL_LIBRARY", "/nonexistent/libnccl.so.2");
        let lib = nccl_sys::library().expect("the linked libnccl");
        assert!(lib.is_linked());
        assert_eq!(lib.version_code(), nccl_sys::HEADER_VERSION_CODE);
        return;
    }
    let real = Library::load().expect("the real libnccl via NCCL_HOME (run scripts/setup.sh)");
    let real_path = real.path().to_path_buf();

    // Pointing at the real file loads it.
    std::env::set_var("NCCL_LIBRARY", &real_path);
    assert_eq!(Library::load().unwrap().path(), real_path);

    // Pointing at a missing file is an error naming that file, even though NCCL_HOME would work.
    let missing = std::env::temp_dir().join("nccl-sys-no-such-dir/libnccl.so.2");
    std::env::set_var("NCCL_LIBRARY", &missing);
    let err = Library::load().unwrap_err();
    assert!(
        matches!(&err, LoadError::Open { path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains(&missing.display().to_string()), "{err}");

    // The process-wide library sees the same environment on its first use, caches the failure, and
    // reports without panicking.
    assert!(!nccl_sys::is_available());
    assert_eq!(nccl_sys::library().unwrap_err(), err);
    assert_eq!(nccl_sys::library_version().unwrap_err(), err);
    std::env::set_var("NCCL_LIBRARY", &real_path);
    assert_eq!(
        nccl_sys::library().unwrap_err(),
        err,
        "library() must cache its first result"
    );
}
