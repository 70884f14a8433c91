//! nccl-sys against the real libnccl found through the default search order (cargo's `[env]` points NCCL_HOME
//! at the project's pip wheel, so no exports are needed). Everything here runs on a CPU-only machine.

use std::ffi::CStr;

fn lib() -> &'static nccl_sys::Library {
    // Keep NCCL's bootstrap sockets (opened by ncclGetUniqueId / ncclCommInitRank) on loopback. Set once,
    // before any test calls into NCCL; `call_once` makes the other tests wait for it.
    static LOOPBACK: std::sync::Once = std::sync::Once::new();
    LOOPBACK.call_once(|| {
        if std::env::var_os("NCCL_SOCKET_IFNAME").is_none() {
            std::env::set_var("NCCL_SOCKET_IFNAME", "lo");
        }
    });
    match nccl_sys::library() {
        Ok(lib) => lib,
        Err(e) => panic!("libnccl must be loadable for these tests (run scripts/setup.sh): {e}"),
    }
}

#[test]
fn loads_the_real_library_with_the_header_version() {
    let lib = lib();
    assert!(nccl_sys::is_available());
    assert_eq!(lib.version_code(), 23203, "loaded {}", lib.path().display());
    assert_eq!(nccl_sys::library_version(), Ok(nccl_sys::HEADER_VERSION_CODE));
    assert_eq!(nccl_sys::HEADER_VERSION_CODE, 23203);
    assert_eq!(nccl_sys::version_string(lib.version_code()), "2.32.3");
    assert!(
        lib.path().is_file(),
        "path() must name the real file, got {}",
        lib.path().display()
    );
    assert!(
        lib.path().to_string_lossy().contains("libnccl"),
        "{}",
        lib.path().display()
    );

    // ncclGetVersion through the getter agrees with the cached version.
    let mut code = 0;
    // SAFETY: ncclGetVersion writes one int through a valid pointer.
    let rc = unsafe { lib.ncclGetVersion().unwrap()(&mut code) };
    assert_eq!((rc, code), (nccl_sys::ncclSuccess, 23203));
}

#[test]
fn every_bound_symbol_resolves_in_the_real_library() {
    let lib = lib();
    let results = lib.resolve_all();
    assert_eq!(results.len(), nccl_sys::FUNCTIONS.len());
    let missing: Vec<String> = results
        .iter()
        .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(
        missing.is_empty(),
        "missing from {}: {missing:#?}",
        lib.path().display()
    );
    // The getters cache: a second lookup returns the same pointer.
    assert_eq!(
        lib.ncclAllReduce().unwrap() as usize,
        lib.ncclAllReduce().unwrap() as usize
    );
}

#[test]
fn unique_ids_are_fresh_each_time() {
    let get = lib().ncclGetUniqueId().unwrap();
    let mut a = nccl_sys::ncclUniqueId { internal: [0; 128] };
    let mut b = nccl_sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: ncclGetUniqueId writes one ncclUniqueId through a valid pointer.
    assert_eq!(unsafe { get(&mut a) }, nccl_sys::ncclSuccess);
    // SAFETY: as above.
    assert_eq!(unsafe { get(&mut b) }, nccl_sys::ncclSuccess);
    assert_ne!(a.internal, [0; 128], "the id was not written");
    assert_ne!(a, b, "two ncclGetUniqueId calls returned the same id");
}

fn error_string(code: nccl_sys::ncclResult_t) -> String {
    let f = lib().ncclGetErrorString().unwrap();
    // SAFETY: ncclGetErrorString accepts any value and returns a static NUL-terminated string (checked non-null).
    let p = unsafe { f(code) };
    assert!(!p.is_null(), "ncclGetErrorString({code}) returned NULL");
    // SAFETY: non-null, NUL-terminated, static.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[test]
fn every_result_code_has_its_own_text() {
    let expected = [
        (nccl_sys::ncclSuccess, "no error"),
        (nccl_sys::ncclUnhandledCudaError, "cuda"),
        (nccl_sys::ncclSystemError, "system"),
        (nccl_sys::ncclInternalError, "internal"),
        (nccl_sys::ncclInvalidArgument, "invalid argument"),
        (nccl_sys::ncclInvalidUsage, "invalid usage"),
        (nccl_sys::ncclRemoteError, "remote"),
        (nccl_sys::ncclInProgress, "in progress"),
        (nccl_sys::ncclTimeout, "timeout"),
    ];
    assert_eq!(expected.len() as u32, nccl_sys::ncclNumResults);
    let mut texts = std::collections::BTreeSet::new();
    for (code, word) in expected {
        let text = error_string(code);
        println!("{code}: {text}");
        assert!(
            text.to_lowercase().contains(word),
            "ncclGetErrorString({code}) = {text:?}, expected {word:?}"
        );
        assert!(texts.insert(text.clone()), "{text:?} used for two codes");
    }
    let unknown = error_string(77);
    println!("77: {unknown}");
    assert!(!unknown.is_empty());
    assert!(
        !texts.contains(&unknown),
        "an unknown code must not read like a known one: {unknown:?}"
    );
}

/// Whether a CUDA driver could be loaded, i.e. NCCL might find a GPU here.
fn cuda_driver_present() -> bool {
    // SAFETY: loading libcuda runs the driver's own initialisers; we only probe and then leak the handle.
    unsafe { libloading::Library::new("libcuda.so.1") }
        .map(std::mem::forget)
        .is_ok()
}

#[test]
fn comm_init_without_a_gpu_is_a_clean_error_with_last_error_text() {
    if cuda_driver_present() {
        println!("SKIPPED: a CUDA driver is present, so ncclCommInitRank may succeed here");
        return;
    }
    let lib = lib();
    let mut id = nccl_sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: valid out-pointer.
    assert_eq!(
        unsafe { lib.ncclGetUniqueId().unwrap()(&mut id) },
        nccl_sys::ncclSuccess
    );
    let mut comm: nccl_sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: a one-rank communicator with a fresh id and a valid out-pointer; with no GPU NCCL fails before
    // using any device state.
    let rc = unsafe { lib.ncclCommInitRank().unwrap()(&mut comm, 1, id, 0) };
    assert_ne!(rc, nccl_sys::ncclSuccess, "ncclCommInitRank succeeded without a GPU");
    assert!(comm.is_null(), "a failed init must not hand out a communicator");
    // SAFETY: NULL asks for the last error of the calling thread; returns a NUL-terminated string.
    let p = unsafe { lib.ncclGetLastError().unwrap()(std::ptr::null_mut()) };
    assert!(!p.is_null());
    // SAFETY: non-null, NUL-terminated.
    let text = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    println!("ncclCommInitRank -> {rc} ({}); last error: {text}", error_string(rc));
    assert!(!text.trim().is_empty(), "ncclGetLastError is empty after a failed init");
    assert!(
        text.to_lowercase().contains("cuda"),
        "expected the CUDA failure to be explained: {text:?}"
    );
}
