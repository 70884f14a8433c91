//! The one place that says how nccl-sys's bindings are generated from `nccl.h`.
//!
//! Included (with `#[path]`) by `build.rs` for the `bindgen` feature and by `tests/bindings.rs`, which checks
//! that the checked-in `src/bindings.rs` and `src/functions.rs` equal a fresh run of [`generate`] on the same
//! header. Regenerate the checked-in files with
//! `NCCL_SYS_REGENERATE=1 cargo test -p nccl-sys --test bindings -- --nocapture`.
//!
//! Two outputs:
//! - `bindings.rs`: bindgen's types and constants (enums as integer aliases plus constants without the enum
//!   name prefix, so codes a newer library returns are never undefined behaviour);
//! - `functions.rs`: for every function, a function-pointer type `sig::<name>` (with the header's comment), the
//!   same declarations as a link-time `extern "C"` block (used only by the `link` feature), and one
//!   `nccl_functions!` line `name = "since"` from which the crate builds its lazy per-symbol loader.
//!
//! Needs `bindgen`, `syn` (feature `full`) and `prettyplease` in scope as crates.

#![allow(dead_code)] // Each includer uses a different part.

use std::path::{Path, PathBuf};

/// The NCCL version that introduced each function of `nccl.h`, as `"major.minor"`.
///
/// Derived from the history of `src/nccl.h.in` in github.com/NVIDIA/nccl (the first release commit whose
/// header declares the function) and, for the 2.32 additions that postdate that history, from the header's
/// versioned struct names (`ncclCollConfig_v23200`, `ncclEncryptionConfig_v23200`). NCCL 2 was published from
/// 2.3.5 on: functions already in NCCL 1 are given as 2.0 (the 2.x ABI), the others present in the first
/// published 2.x header (groups, `ncclBroadcast`, `ncclGetVersion`) as 2.3, which may be later than their
/// true first release but never earlier than a library that has them.
pub const SINCE: &[(&str, &str)] = &[
    ("ncclAllGather", "2.0"),
    ("ncclAllReduce", "2.0"),
    ("ncclBcast", "2.0"),
    ("ncclCommCount", "2.0"),
    ("ncclCommCuDevice", "2.0"),
    ("ncclCommDestroy", "2.0"),
    ("ncclCommInitAll", "2.0"),
    ("ncclCommInitRank", "2.0"),
    ("ncclCommUserRank", "2.0"),
    ("ncclGetErrorString", "2.0"),
    ("ncclGetUniqueId", "2.0"),
    ("ncclReduce", "2.0"),
    ("ncclReduceScatter", "2.0"),
    ("ncclBroadcast", "2.3"),
    ("ncclGetVersion", "2.3"),
    ("ncclGroupEnd", "2.3"),
    ("ncclGroupStart", "2.3"),
    ("ncclCommAbort", "2.4"),
    ("ncclCommGetAsyncError", "2.4"),
    ("ncclRecv", "2.7"),
    ("ncclSend", "2.7"),
    ("ncclRedOpCreatePreMulSum", "2.11"),
    ("ncclRedOpDestroy", "2.11"),
    ("ncclGetLastError", "2.13"),
    ("ncclCommFinalize", "2.14"),
    ("ncclCommInitRankConfig", "2.14"),
    ("ncclCommSplit", "2.18"),
    ("ncclCommDeregister", "2.19"),
    ("ncclCommRegister", "2.19"),
    ("ncclMemAlloc", "2.19"),
    ("ncclMemFree", "2.19"),
    ("ncclGroupSimulateEnd", "2.22"),
    ("ncclCommInitRankScalable", "2.23"),
    ("ncclCommShrink", "2.27"),
    ("ncclCommWindowDeregister", "2.27"),
    ("ncclCommWindowRegister", "2.27"),
    ("ncclAlltoAll", "2.28"),
    ("ncclGather", "2.28"),
    ("ncclScatter", "2.28"),
    ("ncclCommRevoke", "2.28"),
    ("ncclCommGetUniqueId", "2.29"),
    ("ncclCommGrow", "2.29"),
    ("ncclPutSignal", "2.29"),
    ("ncclSignal", "2.29"),
    ("ncclWaitSignal", "2.29"),
    ("ncclWinGetUserPtr", "2.29"),
    ("ncclCommMemStats", "2.29"),
    ("ncclCommResume", "2.29"),
    ("ncclCommSuspend", "2.29"),
    ("ncclParamBind", "2.30"),
    ("ncclParamDumpAll", "2.30"),
    ("ncclParamGet", "2.30"),
    ("ncclParamGetAllParameterKeys", "2.30"),
    ("ncclParamGetI8", "2.30"),
    ("ncclParamGetI16", "2.30"),
    ("ncclParamGetI32", "2.30"),
    ("ncclParamGetI64", "2.30"),
    ("ncclParamGetParameter", "2.30"),
    ("ncclParamGetStr", "2.30"),
    ("ncclParamGetU8", "2.30"),
    ("ncclParamGetU16", "2.30"),
    ("ncclParamGetU32", "2.30"),
    ("ncclParamGetU64", "2.30"),
    ("ncclAllGatherConfig", "2.32"),
    ("ncclAllReduceConfig", "2.32"),
    ("ncclAlltoAllConfig", "2.32"),
    ("ncclBroadcastConfig", "2.32"),
    ("ncclGatherConfig", "2.32"),
    ("ncclReduceConfig", "2.32"),
    ("ncclReduceScatterConfig", "2.32"),
    ("ncclScatterConfig", "2.32"),
    ("ncclSetEncryption", "2.32"),
];

/// Functions `nccl.h` mentions that are deliberately not bound, with the reason.
pub const NOT_BOUND: &[(&str, &str)] = &[(
    "ncclResetDebugInit",
    "declared only under `#ifdef NCCL_OS_LINUX` (otherwise an empty macro) and deprecated: \
     \"not supported as part of the NCCL API and will be removed in the future\"",
)];

/// The directory with the stand-in CUDA headers (`cuda_runtime.h` declaring the opaque `cudaStream_t` and
/// `cudaEvent_t`, and empty `cuda_fp16.h`/`cuda_bf16.h`/`cuda_fp8.h`), given the crate's manifest directory.
pub fn stubs_dir(manifest_dir: &Path) -> PathBuf {
    manifest_dir.join("cuda-stubs")
}

/// The bindgen configuration for `<include_dir>/nccl.h`.
pub fn builder(include_dir: &Path, stubs_dir: &Path) -> bindgen::Builder {
    bindgen::Builder::default()
        .header(include_dir.join("nccl.h").to_string_lossy().into_owned())
        // Our stubs first, so a real CUDA toolkit on the include path never changes the output.
        .clang_arg(format!("-I{}", stubs_dir.display()))
        .clang_arg(format!("-I{}", include_dir.display()))
        .clang_arg("-xc")
        // nccl.h documents with plain `/* */` comments: attach those too, so the header's docs carry over.
        .clang_arg("-fparse-all-comments")
        // The public `ncclX` API; the `pncclX` profiler aliases have the same signatures and are left out.
        .allowlist_function("nccl.*")
        .allowlist_type("nccl.*")
        .allowlist_var("NCCL_.*")
        // C enums stay integer aliases plus constants: a newer library may return values these bindings do
        // not know, and a Rust enum holding one would be undefined behaviour.
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .use_core()
        .ctypes_prefix("::core::ffi")
        .derive_debug(true)
        .derive_copy(true)
        .derive_eq(true)
        .derive_hash(false)
        // `Default` would be all-zero, which NCCL rejects for its versioned config structs: use the
        // initializer values instead (the safe layer does).
        .derive_default(false)
        .layout_tests(true)
        .merge_extern_blocks(true)
        .generate_comments(true)
        .parse_callbacks(Box::new(HeaderComments))
        .formatter(bindgen::Formatter::None)
}

/// Keeps the header's comments verbatim as plain text: C comments are not Markdown (indented parameter lists
/// would become Rust doctests, `nccl*Config` emphasis), so each is fenced as a `text` block.
#[derive(Debug)]
struct HeaderComments;

impl bindgen::callbacks::ParseCallbacks for HeaderComments {
    fn process_comment(&self, comment: &str) -> Option<String> {
        let lines: Vec<&str> = comment.lines().map(str::trim_end).collect();
        let first = lines.iter().position(|l| !l.trim().is_empty())?;
        let last = lines.iter().rposition(|l| !l.trim().is_empty())?;
        Some(format!("```text\n{}\n```", lines[first..=last].join("\n")))
    }
}

/// What [`generate`] produces: the contents of `bindings.rs` and `functions.rs`.
pub struct Generated {
    /// Types and constants.
    pub bindings: String,
    /// Function-pointer types, the `link` feature's extern block and the `nccl_functions!` list.
    pub functions: String,
    /// Bound functions missing from [`SINCE`] (given the header's own version instead).
    pub unknown_since: Vec<String>,
}

const GENERATED_NOTE: &str =
    "// @generated by nccl-sys/bindgen_config.rs from NCCL's nccl.h. Do not edit: regenerate with\n\
     // `NCCL_SYS_REGENERATE=1 cargo test -p nccl-sys --test bindings` (see nccl-sys/README.md).\n";

/// Runs bindgen on `<include_dir>/nccl.h` and splits the result into [`Generated`].
pub fn generate(include_dir: &Path, stubs_dir: &Path) -> Result<Generated, String> {
    let header = include_dir.join("nccl.h");
    if !header.is_file() {
        return Err(format!("{} does not exist", header.display()));
    }
    let raw = builder(include_dir, stubs_dir)
        .generate()
        .map_err(|e| format!("bindgen failed on {}: {e}", header.display()))?
        .to_string();
    let file: syn::File = syn::parse_str(&raw).map_err(|e| format!("bindgen output does not parse: {e}"))?;

    let mut type_items = Vec::new();
    let mut fns = Vec::new();
    let mut version: Option<(u32, u32)> = None;
    let (mut major, mut minor) = (None, None);
    for item in file.items {
        match item {
            syn::Item::ForeignMod(m) => {
                for fi in m.items {
                    match fi {
                        syn::ForeignItem::Fn(f) => fns.push(f),
                        other => return Err(format!("unexpected foreign item: {other:?}")),
                    }
                }
            }
            syn::Item::Const(c) => {
                let value = const_u32(&c.expr);
                match c.ident.to_string().as_str() {
                    "NCCL_MAJOR" => major = value,
                    "NCCL_MINOR" => minor = value,
                    _ => {}
                }
                type_items.push(syn::Item::Const(c));
            }
            other => type_items.push(other),
        }
    }
    if let (Some(a), Some(b)) = (major, minor) {
        version = Some((a, b));
    }
    let header_version = version
        .map(|(a, b)| format!("{a}.{b}"))
        .unwrap_or_else(|| "unknown".to_owned());
    fns.sort_by_key(|f| f.sig.ident.to_string());

    let bindings = format!(
        "{GENERATED_NOTE}\n{}",
        prettyplease::unparse(&syn::File {
            shebang: None,
            attrs: vec![],
            items: type_items
        })
    );

    // sig::<name> function-pointer types and the link-time extern block.
    let mut sig_items = Vec::new();
    let mut extern_fns = Vec::new();
    let mut list = String::new();
    let mut unknown_since = Vec::new();
    for f in &fns {
        let name = &f.sig.ident;
        let docs: Vec<&syn::Attribute> = f.attrs.iter().filter(|a| a.path().is_ident("doc")).collect();
        let inputs = &f.sig.inputs;
        let output = &f.sig.output;
        if f.sig.variadic.is_some() {
            return Err(format!(
                "{name} is variadic; nccl-sys cannot express it as a function-pointer type"
            ));
        }
        let since = match SINCE.iter().find(|(n, _)| name == n) {
            Some((_, s)) => (*s).to_owned(),
            None => {
                unknown_since.push(name.to_string());
                header_version.clone()
            }
        };
        let summary = format!(" Signature of `{name}` (NCCL {since} and newer).");
        let separator = (!docs.is_empty()).then(|| quote::quote! { #[doc = ""] });
        sig_items.push(quote::quote! {
            #[doc = #summary]
            #separator
            #(#docs)*
            pub type #name = unsafe extern "C" fn(#inputs) #output;
        });
        extern_fns.push(quote::quote! { pub fn #name(#inputs) #output; });
        list.push_str(&format!("    {name} = \"{since}\",\n"));
    }
    let tokens = quote::quote! {
        /// One function-pointer type per function of `nccl.h`, named after the function, with the header's
        /// own documentation. [`Library`](crate::Library)'s method of the same name returns a value of it.
        pub mod sig {
            #[allow(unused_imports)]
            use crate::*;
            #(#sig_items)*
        }
        /// The same functions as link-time declarations, for the `link` feature.
        #[cfg(feature = "link")]
        mod linked {
            #[allow(unused_imports)]
            use crate::*;
            extern "C" {
                #(#extern_fns)*
            }
        }
    };
    let items: syn::File = syn::parse2(tokens).map_err(|e| format!("generated functions do not parse: {e}"))?;
    let functions = format!(
        "{GENERATED_NOTE}\n{}\n// Every bound function with the NCCL version that introduced it.\nnccl_functions! {{\n{list}}}\n",
        prettyplease::unparse(&items)
    );
    Ok(Generated {
        bindings,
        functions,
        unknown_since,
    })
}

fn const_u32(expr: &syn::Expr) -> Option<u32> {
    match expr {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Int(i), ..
        }) => i.base10_parse().ok(),
        _ => None,
    }
}
