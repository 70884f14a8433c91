//! Finding and loading libnccl at run time: the search order, [`Library`] and [`LoadError`].

use std::ffi::c_int;
use std::fmt;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::functions::Symbols;

/// The file name the system loader and pip wheels use for NCCL 2.
pub const SONAME: &str = "libnccl.so.2";

/// Why libnccl, or one of its functions, could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadError {
    /// No candidate in the search order could be loaded.
    NotFound {
        /// Every place tried (a path, or a name given to the system loader) and why it failed.
        searched: Vec<(String, String)>,
    },
    /// One specific file could not be loaded as NCCL (missing, not a library, or not NCCL). This is the
    /// error when `NCCL_LIBRARY` is set and its file fails: an explicit choice is never silently skipped.
    Open {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The loaded library does not export a function these bindings declare (it is older than the header).
    MissingSymbol {
        /// The C function, e.g. `"ncclAlltoAll"`.
        symbol: &'static str,
        /// The NCCL version that introduced it, e.g. `"2.28"`.
        needs: &'static str,
        /// `NCCL_VERSION_CODE` of the loaded library, e.g. `22703`.
        loaded: i32,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotFound { searched } => {
                write!(f, "libnccl could not be loaded; searched")?;
                if searched.is_empty() {
                    write!(f, " nothing")?;
                }
                for (place, why) in searched {
                    write!(f, "\n  - {place}: {why}")?;
                }
                write!(
                    f,
                    "\nSet NCCL_LIBRARY to the libnccl.so.2 file, or NCCL_HOME to the folder holding lib/libnccl.so.2 \
                     (the pip wheel `nvidia-nccl-cu12` installs one: see scripts/setup.sh)"
                )
            }
            LoadError::Open { path, message } => write!(f, "cannot load {} as libnccl: {message}", path.display()),
            LoadError::MissingSymbol { symbol, needs, loaded } => write!(
                f,
                "{symbol} is not exported by the loaded libnccl (NCCL {}); it was introduced in NCCL {needs}",
                version_string(*loaded)
            ),
        }
    }
}

impl std::error::Error for LoadError {}

/// Splits an `NCCL_VERSION_CODE` into `(major, minor, patch)`, using NCCL's two encodings
/// (`X*1000+Y*100+Z` up to 2.8, `X*10000+Y*100+Z` from 2.9 on).
pub fn version_triple(code: i32) -> (i32, i32, i32) {
    if code >= 10000 {
        (code / 10000, (code % 10000) / 100, code % 100)
    } else {
        (code / 1000, (code % 1000) / 100, code % 100)
    }
}

/// `NCCL_VERSION_CODE` as text, e.g. `23203` → `"2.32.3"`.
pub fn version_string(code: i32) -> String {
    let (a, b, c) = version_triple(code);
    format!("{a}.{b}.{c}")
}

/// One place in the search order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Candidate {
    /// A file chosen explicitly (`NCCL_LIBRARY`): if it fails, loading stops with [`LoadError::Open`].
    Explicit(PathBuf),
    /// A file tried if it exists (`$NCCL_HOME/lib/libnccl.so.2`, pip wheel folders).
    File(PathBuf),
    /// A name handed to the system loader (`dlopen`), which searches `LD_LIBRARY_PATH`, the ld cache, etc.
    SystemName(String),
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Candidate::Explicit(p) => write!(f, "{} (NCCL_LIBRARY)", p.display()),
            Candidate::File(p) => write!(f, "{}", p.display()),
            Candidate::SystemName(n) => write!(f, "{n} (system loader)"),
        }
    }
}

/// The search order, read from the environment now:
/// 1. `NCCL_LIBRARY` (a file; if set, it is the only candidate);
/// 2. `$NCCL_HOME/lib/libnccl.so.2`;
/// 3. the system loader: `libnccl.so.2`, then `libnccl.so`;
/// 4. pip wheels: `nvidia/nccl/lib/libnccl.so.2` under each `PYTHONPATH` entry, `$VIRTUAL_ENV` and
///    `$CONDA_PREFIX` `lib/python3*/site-packages`, `~/.local/lib/python3*/site-packages`,
///    `/usr/local/lib/python3*/{dist,site}-packages` and `/usr/lib/python3/dist-packages`.
pub fn search_order() -> Vec<Candidate> {
    search_order_with(|name| std::env::var_os(name))
}

/// [`search_order`] with the environment given as a lookup function (empty values count as unset).
fn search_order_with(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Vec<Candidate> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(path) = var("NCCL_LIBRARY") {
        return vec![Candidate::Explicit(PathBuf::from(path))];
    }
    let mut order = Vec::new();
    if let Some(home) = var("NCCL_HOME") {
        order.push(Candidate::File(PathBuf::from(home).join("lib").join(SONAME)));
    }
    order.push(Candidate::SystemName(SONAME.to_owned()));
    order.push(Candidate::SystemName("libnccl.so".to_owned()));

    let mut site_dirs: Vec<PathBuf> = Vec::new();
    if let Some(pp) = var("PYTHONPATH") {
        site_dirs.extend(std::env::split_paths(&pp).filter(|p| !p.as_os_str().is_empty()));
    }
    for prefix in ["VIRTUAL_ENV", "CONDA_PREFIX"].into_iter().filter_map(var) {
        site_dirs.extend(python_dirs(&PathBuf::from(prefix).join("lib"), "site-packages"));
    }
    if let Some(home) = var("HOME") {
        site_dirs.extend(python_dirs(&PathBuf::from(home).join(".local/lib"), "site-packages"));
    }
    site_dirs.extend(python_dirs(Path::new("/usr/local/lib"), "dist-packages"));
    site_dirs.extend(python_dirs(Path::new("/usr/local/lib"), "site-packages"));
    site_dirs.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    for dir in site_dirs {
        let c = Candidate::File(dir.join("nvidia/nccl/lib").join(SONAME));
        if !order.contains(&c) {
            order.push(c);
        }
    }
    order
}

/// `<lib>/python3*/<leaf>` for every `python3*` folder in `lib`, sorted so the order is stable.
fn python_dirs(lib: &Path, leaf: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(lib) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join(leaf))
        .collect();
    dirs.sort();
    dirs
}

enum Backing {
    /// Opened with `dlopen`; never closed (NCCL's threads and the function pointers we hand out must stay
    /// valid for the whole process).
    Loaded(ManuallyDrop<libloading::Library>),
    /// The library linked at build time (feature `link`).
    #[cfg(feature = "link")]
    Linked,
}

/// A loaded libnccl: where it is, its version, and one method per C function of `nccl.h` returning that
/// function's pointer (resolved on first use, cached). Get the process-wide one with [`library`].
pub struct Library {
    backing: Backing,
    path: PathBuf,
    version_code: i32,
    pub(crate) symbols: Symbols,
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("version", &version_string(self.version_code))
            .finish_non_exhaustive()
    }
}

impl Library {
    /// Loads the library at `path` (a file). The library is never unloaded, even when the returned value
    /// is dropped, so function pointers obtained from it stay valid.
    ///
    /// # Errors
    /// [`LoadError::Open`] naming `path` if the file is missing, cannot be loaded, or is not NCCL (it has no
    /// working `ncclGetVersion`).
    pub fn open(path: impl AsRef<Path>) -> Result<Library, LoadError> {
        let path = path.as_ref();
        let open_err = |message: String| LoadError::Open {
            path: path.to_path_buf(),
            message,
        };
        if !path.exists() {
            return Err(open_err("no such file".to_owned()));
        }
        // SAFETY: loading a shared library runs its initialisers. libnccl's are NCCL's own (they only set up
        // internal state); that is the premise of using NCCL at all.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| open_err(e.to_string()))?;
        Self::from_loaded(lib, path.to_path_buf()).map_err(open_err)
    }

    /// Loads through the system loader by file name (e.g. `"libnccl.so.2"`), which searches
    /// `LD_LIBRARY_PATH`, the ld cache and the default folders.
    ///
    /// # Errors
    /// [`LoadError::Open`] (with the name as path) if the loader finds nothing or the library is not NCCL.
    pub fn open_system(name: &str) -> Result<Library, LoadError> {
        let open_err = |message: String| LoadError::Open {
            path: PathBuf::from(name),
            message,
        };
        // SAFETY: as in `open`: runs libnccl's own initialisers.
        let lib = unsafe { libloading::Library::new(name) }.map_err(|e| open_err(e.to_string()))?;
        Self::from_loaded(lib, PathBuf::from(name)).map_err(open_err)
    }

    /// Tries `candidates` in order and returns the first library that loads. Does not touch the
    /// process-wide [`library`].
    ///
    /// # Errors
    /// The [`Candidate::Explicit`] error as is ([`LoadError::Open`]); otherwise [`LoadError::NotFound`] listing
    /// every candidate with the reason it failed.
    pub fn load_from(candidates: &[Candidate]) -> Result<Library, LoadError> {
        let mut searched = Vec::new();
        for candidate in candidates {
            let result = match candidate {
                Candidate::Explicit(path) => return Self::open(path),
                Candidate::File(path) if !path.exists() => Err(LoadError::Open {
                    path: path.clone(),
                    message: "no such file".to_owned(),
                }),
                Candidate::File(path) => Self::open(path),
                Candidate::SystemName(name) => Self::open_system(name),
            };
            match result {
                Ok(lib) => return Ok(lib),
                Err(LoadError::Open { path, message }) => searched.push((path.display().to_string(), message)),
                Err(other) => searched.push((candidate.to_string(), other.to_string())),
            }
        }
        Err(LoadError::NotFound { searched })
    }

    /// Loads with the [`search_order`] read from the environment now (a fresh load; see [`library`] for the
    /// cached process-wide one). With the `link` feature, returns the linked library instead.
    ///
    /// # Errors
    /// As [`Library::load_from`].
    pub fn load() -> Result<Library, LoadError> {
        #[cfg(feature = "link")]
        {
            Self::linked()
        }
        #[cfg(not(feature = "link"))]
        {
            Self::load_from(&search_order())
        }
    }

    /// The library linked at build time (feature `link`).
    ///
    /// # Errors
    /// [`LoadError::Open`] if its `ncclGetVersion` fails.
    #[cfg(feature = "link")]
    pub fn linked() -> Result<Library, LoadError> {
        let get_version: crate::sig::ncclGetVersion = crate::functions::linked_get_version();
        let path = symbol_file(get_version as *const std::ffi::c_void).unwrap_or_else(|| PathBuf::from(SONAME));
        let version_code = call_get_version(get_version).map_err(|message| LoadError::Open {
            path: path.clone(),
            message,
        })?;
        Ok(Library {
            backing: Backing::Linked,
            path,
            version_code,
            symbols: Symbols::default(),
        })
    }

    fn from_loaded(lib: libloading::Library, fallback_path: PathBuf) -> Result<Library, String> {
        // SAFETY: `ncclGetVersion` has had the signature `ncclResult_t (int*)` since it was introduced.
        let get_version: crate::sig::ncclGetVersion =
            unsafe { lib.get::<crate::sig::ncclGetVersion>(b"ncclGetVersion\0") }
                .map(|s| *s)
                .map_err(|e| format!("not an NCCL library (no ncclGetVersion: {e})"))?;
        let version_code = call_get_version(get_version)?;
        let path = symbol_file(get_version as *const std::ffi::c_void).unwrap_or(fallback_path);
        Ok(Library {
            backing: Backing::Loaded(ManuallyDrop::new(lib)),
            path,
            version_code,
            symbols: Symbols::default(),
        })
    }

    /// The file the library was loaded from (resolved through the dynamic loader, so a name like
    /// `libnccl.so.2` becomes the real path).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `NCCL_VERSION_CODE` of the loaded library, from its `ncclGetVersion` (e.g. `23203` for 2.32.3).
    #[doc(alias = "ncclGetVersion")]
    pub fn version_code(&self) -> i32 {
        self.version_code
    }

    /// Whether this is the library linked at build time (feature `link`).
    pub fn is_linked(&self) -> bool {
        match self.backing {
            Backing::Loaded(_) => false,
            #[cfg(feature = "link")]
            Backing::Linked => true,
        }
    }

    /// Looks `name` (NUL-terminated) up in a `dlopen`ed library; `None` when absent or when linked.
    ///
    /// # Safety
    /// `T` must be the function-pointer type matching the symbol's C declaration.
    pub(crate) unsafe fn raw_symbol<T: Copy>(&self, name: &[u8]) -> Option<T> {
        match &self.backing {
            // SAFETY: the caller guarantees `T` matches the symbol; the library is never unloaded, so the
            // copied pointer does not outlive it.
            Backing::Loaded(lib) => unsafe { lib.get::<T>(name) }.ok().map(|s| *s),
            #[cfg(feature = "link")]
            Backing::Linked => None,
        }
    }
}

fn call_get_version(get_version: crate::sig::ncclGetVersion) -> Result<i32, String> {
    let mut code: c_int = 0;
    // SAFETY: ncclGetVersion writes one int through a valid pointer and has no other precondition.
    let rc = unsafe { get_version(&mut code) };
    if rc != crate::ncclSuccess {
        return Err(format!("ncclGetVersion returned ncclResult_t {rc}"));
    }
    Ok(code)
}

/// The file that contains `addr`, via `dladdr`.
#[cfg(unix)]
fn symbol_file(addr: *const std::ffi::c_void) -> Option<PathBuf> {
    // SAFETY: `Dl_info` is plain data; dladdr only fills it in and accepts any address.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable Dl_info.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr returned success, so dli_fname is a NUL-terminated string owned by the loader, valid
    // while the library stays loaded (forever, here).
    let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
    use std::os::unix::ffi::OsStrExt;
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes()));
    Some(path.canonicalize().unwrap_or(path))
}

#[cfg(not(unix))]
fn symbol_file(_addr: *const std::ffi::c_void) -> Option<PathBuf> {
    None
}

static LIBRARY: OnceLock<Result<Library, LoadError>> = OnceLock::new();

/// The process-wide libnccl, loaded on first call with [`search_order`] (or, with the `link` feature, the
/// linked one) and cached, including a failure. Never panics.
///
/// # Errors
/// The [`LoadError`] of that first attempt, every time.
pub fn library() -> Result<&'static Library, LoadError> {
    LIBRARY.get_or_init(Library::load).as_ref().map_err(Clone::clone)
}

/// Whether libnccl can be loaded (see [`library`]).
pub fn is_available() -> bool {
    library().is_ok()
}

/// `NCCL_VERSION_CODE` of the process-wide library (e.g. `23203`), from `ncclGetVersion`.
///
/// # Errors
/// The [`LoadError`] of [`library`].
#[doc(alias = "ncclGetVersion")]
pub fn library_version() -> Result<i32, LoadError> {
    library().map(Library::version_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn nccl_library_is_the_only_candidate_when_set() {
        let order = search_order_with(env(&[("NCCL_LIBRARY", "/x/libnccl.so.2"), ("NCCL_HOME", "/h")]));
        assert_eq!(order, [Candidate::Explicit(PathBuf::from("/x/libnccl.so.2"))]);
    }

    #[test]
    fn order_is_home_then_system_loader_then_wheels() {
        let tmp = std::env::temp_dir().join(format!("nccl-sys-order-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("venv/lib/python3.11")).unwrap();
        std::fs::create_dir_all(tmp.join("venv/lib/not-python")).unwrap();
        let venv = tmp.join("venv").display().to_string();
        let order = search_order_with(env(&[
            ("NCCL_LIBRARY", ""),
            ("NCCL_HOME", "/opt/nccl"),
            ("PYTHONPATH", "/p1:/p2"),
            ("VIRTUAL_ENV", &venv),
        ]));
        std::fs::remove_dir_all(&tmp).unwrap();
        let wheel = |dir: &str| Candidate::File(PathBuf::from(dir).join("nvidia/nccl/lib/libnccl.so.2"));
        assert_eq!(order[0], Candidate::File(PathBuf::from("/opt/nccl/lib/libnccl.so.2")));
        assert_eq!(order[1], Candidate::SystemName("libnccl.so.2".into()));
        assert_eq!(order[2], Candidate::SystemName("libnccl.so".into()));
        assert_eq!(order[3], wheel("/p1"));
        assert_eq!(order[4], wheel("/p2"));
        assert_eq!(order[5], wheel(&format!("{venv}/lib/python3.11/site-packages")));
        assert_eq!(order.last(), Some(&wheel("/usr/lib/python3/dist-packages")));
        assert!(!order.iter().any(|c| c.to_string().contains("not-python")));
        let unique: std::collections::HashSet<_> = order.iter().collect();
        assert_eq!(unique.len(), order.len(), "duplicates in {order:?}");
    }

    #[test]
    fn without_nccl_home_the_system_loader_comes_first() {
        let order = search_order_with(env(&[]));
        assert_eq!(order[0], Candidate::SystemName("libnccl.so.2".into()));
    }

    #[test]
    fn version_codes_decode_in_both_encodings() {
        assert_eq!(version_triple(23203), (2, 32, 3));
        assert_eq!(version_triple(2708), (2, 7, 8));
        assert_eq!(version_string(21003), "2.10.3");
    }

    #[test]
    fn errors_say_what_was_searched_and_what_is_missing() {
        let e = LoadError::NotFound {
            searched: vec![
                ("/a/libnccl.so.2".into(), "no such file".into()),
                ("libnccl.so".into(), "nope".into()),
            ],
        };
        let text = e.to_string();
        assert!(
            text.contains("/a/libnccl.so.2: no such file") && text.contains("libnccl.so: nope"),
            "{text}"
        );
        let e = LoadError::MissingSymbol {
            symbol: "ncclAlltoAll",
            needs: "2.28",
            loaded: 22703,
        };
        assert_eq!(
            e.to_string(),
            "ncclAlltoAll is not exported by the loaded libnccl (NCCL 2.27.3); it was introduced in NCCL 2.28"
        );
        fn assert_error<E: std::error::Error + Send + Sync + Clone + 'static>() {}
        assert_error::<LoadError>();
        // The process-wide library is shared by every thread.
        fn assert_shared<T: Send + Sync + 'static>() {}
        assert_shared::<Library>();
    }
}
