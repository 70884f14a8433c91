//! Every engine kernel (llm/kernels/engine.cu) compiles without a warning, a register spill or local memory:
//! with the full nvcc 13.0 for sm_80 and sm_90 (`-Werror all-warnings`, ptxas `-v` and its warnings on spills,
//! local memory and double precision), and through NVRTC 13.0 to PTX for compute_80 and compute_90, as the
//! CUDA backend does at run time (NVRTC is dlopen-ed here, as cudarc does). No GPU is needed: both compilers
//! run on the CPU. They come from scripts/setup.sh (.deps/cuda13); under CI a missing compiler fails the test.
//!
//! The checker itself is tested on sources with a deliberate warning and a deliberate local-memory array, so
//! that a checker that passes everything cannot go unnoticed.

#[path = "../../tests/support/prereq.rs"]
mod prereq;

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

use nccl_llm::kernels::{Kernel, SOURCE};

const CU13: &str = "cuda13/nvidia/cu13";

fn cuda13() -> Option<PathBuf> {
    let nvcc = prereq::deps_file(&format!("{CU13}/bin/nvcc"))?;
    Some(nvcc.parent()?.parent()?.to_path_buf())
}

/// What nvcc said about one compilation, or why it is refused.
#[derive(Debug)]
struct Report {
    /// ptxas's "Compiling entry function 'NAME'" lines.
    entries: Vec<String>,
}

/// Compiles `source` to a cubin for `sm` and refuses any warning, spill or stack frame.
fn nvcc_check(cuda: &Path, source: &str, sm: u32) -> Result<Report, String> {
    let dir = std::env::temp_dir().join(format!("nccl-llm-kernels-{}-{sm}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join("engine.cu");
    std::fs::write(&src, source).map_err(|e| e.to_string())?;
    let out = Command::new(cuda.join("bin/nvcc"))
        .arg("-cubin")
        .arg(format!("-arch=sm_{sm}"))
        .args(["-Werror", "all-warnings"])
        .args([
            "-Xptxas",
            "-v,--warn-on-spills,--warn-on-local-memory-usage,--warn-on-double-precision-use",
        ])
        .arg("-o")
        .arg(dir.join("engine.cubin"))
        .arg(&src)
        .output()
        .map_err(|e| format!("running nvcc: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("nvcc sm_{sm} failed ({}):\n{log}", out.status));
    }
    check_ptxas_log(&log).map_err(|e| format!("sm_{sm}: {e}\n{log}"))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Refuses a ptxas `-v` log that has a warning, a spill or a stack frame; returns the entries compiled.
fn check_ptxas_log(log: &str) -> Result<Report, String> {
    let mut entries = Vec::new();
    for line in log.lines() {
        let lower = line.to_ascii_lowercase();
        if lower.contains("warning") {
            return Err(format!("warning: {line}"));
        }
        // "ptxas info    : 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
        for what in ["bytes stack frame", "bytes spill stores", "bytes spill loads"] {
            for (i, _) in line.match_indices(what) {
                let before = line[..i].trim_end();
                let n: u64 = before
                    .rsplit(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|d| d.parse().ok())
                    .ok_or_else(|| format!("unreadable ptxas line: {line}"))?;
                if n != 0 {
                    return Err(format!("{n} {what}: {line}"));
                }
            }
        }
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            entries.push(rest.split('\'').next().unwrap_or_default().to_string());
        }
    }
    Ok(Report { entries })
}

// NVRTC's C API, the few calls needed (nvrtc.h; nvrtcResult is an int enum, 0 = success).
type Prog = *mut std::ffi::c_void;
type CreateFn = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
type GetFn = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Prog) -> c_int;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;

/// The PTX and the log of NVRTC compiling `source` for `arch`, or the log of its failure.
fn nvrtc_compile(lib: &libloading::Library, source: &str, arch: &str) -> Result<(String, String), String> {
    // SAFETY: the symbols are NVRTC's C functions with the signatures declared above (nvrtc.h of CUDA 13.0);
    // every pointer passed is valid for the call: C strings that outlive it, out-pointers to locals, and
    // buffers of the size NVRTC reported. The program is destroyed on every path.
    unsafe {
        let create: libloading::Symbol<CreateFn> = lib.get(b"nvrtcCreateProgram").map_err(|e| e.to_string())?;
        let compile: libloading::Symbol<CompileFn> = lib.get(b"nvrtcCompileProgram").map_err(|e| e.to_string())?;
        let log_size: libloading::Symbol<SizeFn> = lib.get(b"nvrtcGetProgramLogSize").map_err(|e| e.to_string())?;
        let get_log: libloading::Symbol<GetFn> = lib.get(b"nvrtcGetProgramLog").map_err(|e| e.to_string())?;
        let ptx_size: libloading::Symbol<SizeFn> = lib.get(b"nvrtcGetPTXSize").map_err(|e| e.to_string())?;
        let get_ptx: libloading::Symbol<GetFn> = lib.get(b"nvrtcGetPTX").map_err(|e| e.to_string())?;
        let destroy: libloading::Symbol<DestroyFn> = lib.get(b"nvrtcDestroyProgram").map_err(|e| e.to_string())?;
        let src = CString::new(source).map_err(|e| e.to_string())?;
        let name = CString::new("engine.cu").expect("no NUL");
        let mut prog: Prog = std::ptr::null_mut();
        let rc = create(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if rc != 0 {
            return Err(format!("nvrtcCreateProgram: error {rc}"));
        }
        let opts: Vec<CString> = [format!("--gpu-architecture={arch}"), "--std=c++17".to_string()]
            .into_iter()
            .map(|o| CString::new(o).expect("no NUL"))
            .collect();
        let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let rc = compile(prog, ptrs.len() as c_int, ptrs.as_ptr());
        let mut n = 0usize;
        log_size(prog, &mut n);
        let mut buf = vec![0 as c_char; n.max(1)];
        get_log(prog, buf.as_mut_ptr());
        let log = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
        if rc != 0 {
            destroy(&mut prog);
            return Err(format!("nvrtcCompileProgram {arch}: error {rc}\n{log}"));
        }
        let mut n = 0usize;
        ptx_size(prog, &mut n);
        let mut buf = vec![0 as c_char; n.max(1)];
        get_ptx(prog, buf.as_mut_ptr());
        let ptx = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
        destroy(&mut prog);
        Ok((ptx, log))
    }
}

/// NVRTC and its builtins library, loaded by path. NVRTC dlopens `libnvrtc-builtins.so.13.0` by name when
/// it compiles; loading it first by path makes that name resolve to it without touching LD_LIBRARY_PATH.
fn nvrtc_library(cuda: &Path) -> (libloading::Library, libloading::Library) {
    let builtins_path = cuda.join("lib/libnvrtc-builtins.so.13.0");
    // SAFETY: loading NVRTC's builtins runs its initializers, which have no preconditions.
    let builtins = unsafe { libloading::Library::new(&builtins_path) }
        .unwrap_or_else(|e| panic!("dlopen {}: {e}", builtins_path.display()));
    let path = cuda.join("lib/libnvrtc.so.13");
    // SAFETY: loading NVRTC runs its initializers, which have no preconditions.
    let lib = unsafe { libloading::Library::new(&path) }.unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
    // SAFETY: nvrtcVersion(int*, int*) writes two ints.
    unsafe {
        let version: libloading::Symbol<VersionFn> = lib.get(b"nvrtcVersion").expect("nvrtcVersion");
        let (mut major, mut minor) = (0, 0);
        assert_eq!(version(&mut major, &mut minor), 0);
        assert_eq!(
            (major, minor),
            (13, 0),
            "setup pins NVRTC 13.0 (PTX of a newer one does not load on a 13.0 driver)"
        );
    }
    (lib, builtins)
}

/// A log NVRTC printed: refused if it has a warning.
fn check_nvrtc_log(log: &str) -> Result<(), String> {
    match log.lines().find(|l| l.to_ascii_lowercase().contains("warning")) {
        Some(l) => Err(format!("NVRTC warning: {l}")),
        None => Ok(()),
    }
}

#[test]
fn every_kernel_compiles_with_nvcc_for_sm80_and_sm90_without_warnings_or_spills() {
    let Some(cuda) = cuda13() else { return };
    for sm in [80, 90] {
        let report = nvcc_check(&cuda, SOURCE, sm).unwrap_or_else(|e| panic!("{e}"));
        for k in Kernel::ALL {
            assert!(
                report.entries.iter().any(|e| e == k.name()),
                "sm_{sm}: ptxas compiled no entry {} (it compiled {:?})",
                k.name(),
                report.entries
            );
        }
        assert_eq!(
            report.entries.len(),
            Kernel::ALL.len(),
            "sm_{sm}: entries {:?}",
            report.entries
        );
    }
}

#[test]
fn every_kernel_compiles_with_nvrtc_to_ptx_as_at_run_time() {
    let Some(cuda) = cuda13() else { return };
    let (lib, _builtins) = nvrtc_library(&cuda);
    for arch in ["compute_80", "compute_90"] {
        let (ptx, log) = nvrtc_compile(&lib, SOURCE, arch).unwrap_or_else(|e| panic!("{e}"));
        check_nvrtc_log(&log).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let target = arch.replace("compute_", "sm_");
        assert!(
            ptx.contains(&format!(".target {target}")),
            "{arch}: PTX for another target"
        );
        for k in Kernel::ALL {
            assert!(
                ptx.contains(&format!(".entry {}(", k.name())),
                "{arch}: no .entry {} in the PTX",
                k.name()
            );
        }
    }
}

#[test]
fn the_checks_fail_on_a_deliberate_warning_and_on_local_memory() {
    let Some(cuda) = cuda13() else { return };
    // A variable declared but never used: nvcc warning #177-D, an error under -Werror all-warnings.
    let warned =
        format!("{SOURCE}\nextern \"C\" __global__ void deliberate(float* x) {{ int unused = 3; x[0] = 1.0f; }}\n");
    let err = nvcc_check(&cuda, &warned, 90).expect_err("a warning must fail the check");
    assert!(err.contains("177-D") || err.contains("never referenced"), "{err}");
    // A dynamically indexed local array lives in local memory (a stack frame): ptxas warns, so it fails.
    let local = format!(
        "{SOURCE}\nextern \"C\" __global__ void deliberate(float* x, int i) {{ float a[64] = {{}}; \
         for (int k = 0; k < 64; k++) a[(k * i) & 63] += x[k]; x[0] = a[i & 63]; }}\n"
    );
    let err = nvcc_check(&cuda, &local, 80).expect_err("local memory must fail the check");
    assert!(err.contains("local memory") || err.contains("stack frame"), "{err}");
    // NVRTC reports the same warning in its log, which the NVRTC check refuses.
    let (lib, _builtins) = nvrtc_library(&cuda);
    let (_, log) = nvrtc_compile(&lib, &warned, "compute_90").expect("a warning is not an NVRTC error");
    assert!(check_nvrtc_log(&log).is_err(), "NVRTC log: {log}");
    // The ptxas log reader refuses spills and stack frames it is shown.
    let spill = "ptxas info    : 8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads";
    assert!(check_ptxas_log(spill).unwrap_err().contains("8 bytes stack frame"));
    let clean = "ptxas info    : 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads";
    assert!(check_ptxas_log(clean).is_ok());
}
