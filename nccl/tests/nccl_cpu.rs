//! CPU-only tests of the safe layer against the real libnccl (found through `NCCL_HOME`, which
//! `.cargo/config.toml` points at the project's pip wheel). No GPU is needed: where NCCL needs one, the test
//! asserts the typed error NCCL's failure turns into.
//!
//! Run: `cargo test -p nccl-rs --test nccl_cpu` (add `--features cuda` for the cudarc parts).

use nccl::error::{ErrorKind, NcclCode};
use nccl::result::{check_code, load_error, require};
use nccl::version::since;
use nccl::Version;
use nccl::{AbortHandle, Communicator, Config, DataType, Error, UniqueId};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn header() -> String {
    let home = std::env::var("NCCL_HOME").expect("NCCL_HOME (set by .cargo/config.toml) points at the NCCL wheel");
    let path = PathBuf::from(home).join("include/nccl.h");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn define(h: &str, name: &str) -> String {
    let prefix = format!("#define {name} ");
    h.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("#define {name} not in nccl.h"))
        .trim()
        .to_string()
}

/// Every field of `ncclConfig_t` by C name, as integers (pointers as addresses).
fn raw_fields(c: &nccl::sys::ncclConfig_t) -> Vec<(&'static str, i64)> {
    vec![
        ("size", c.size as i64),
        ("magic", c.magic as i64),
        ("version", c.version as i64),
        ("blocking", c.blocking as i64),
        ("cgaClusterSize", c.cgaClusterSize as i64),
        ("minCTAs", c.minCTAs as i64),
        ("maxCTAs", c.maxCTAs as i64),
        ("netName", c.netName as usize as i64),
        ("splitShare", c.splitShare as i64),
        ("trafficClass", c.trafficClass as i64),
        ("commName", c.commName as usize as i64),
        ("collnetEnable", c.collnetEnable as i64),
        ("CTAPolicy", c.CTAPolicy as i64),
        ("shrinkShare", c.shrinkShare as i64),
        ("nvlsCTAs", c.nvlsCTAs as i64),
        ("nChannelsPerNetPeer", c.nChannelsPerNetPeer as i64),
        ("nvlinkCentricSched", c.nvlinkCentricSched as i64),
        ("graphUsageMode", c.graphUsageMode as i64),
        ("numRmaCtx", c.numRmaCtx as i64),
        ("maxP2pPeers", c.maxP2pPeers as i64),
        ("graphStreamOrdering", c.graphStreamOrdering as i64),
        ("launchOrderImplicit", c.launchOrderImplicit as i64),
        ("numRmaSig", c.numRmaSig as i64),
        ("rmaEagerInit", c.rmaEagerInit as i64),
        ("hostCftMode", c.hostCftMode as i64),
        ("nvlsHostMode", c.nvlsHostMode as i64),
    ]
}

/// `NCCL_CONFIG_INITIALIZER` from the header: (field name from the trailing comment, value expression).
fn initializer(h: &str) -> Vec<(String, String)> {
    let start = h
        .find("#define NCCL_CONFIG_INITIALIZER {")
        .expect("NCCL_CONFIG_INITIALIZER in nccl.h");
    let body = &h[start..];
    let end = body.find("\n}").expect("end of the initializer");
    body[..end]
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (value, rest) = l.split_once("/*")?;
            let name = rest.split("*/").next()?.trim().to_string();
            Some((name, value.trim().trim_end_matches(',').trim().to_string()))
        })
        .collect()
}

#[test]
fn config_new_equals_nccl_config_initializer() {
    let h = header();
    let init = initializer(&h);
    let magic = i64::from_str_radix(define(&h, "NCCL_API_MAGIC").trim_start_matches("0x"), 16).unwrap();
    let version: i64 = define(&h, "NCCL_VERSION_CODE").parse().unwrap();
    let raw = Config::new().to_raw();
    let ours = raw_fields(&raw);
    let names: Vec<&str> = ours.iter().map(|(n, _)| *n).collect();
    let theirs: Vec<&str> = init.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names, theirs,
        "ncclConfig_t fields (in order) differ from NCCL_CONFIG_INITIALIZER"
    );
    for ((name, value), (_, expr)) in ours.iter().zip(&init) {
        let want = match expr.as_str() {
            "sizeof(ncclConfig_t)" => std::mem::size_of::<nccl::sys::ncclConfig_t>() as i64,
            "NCCL_API_MAGIC" => magic,
            "NCCL_VERSION_CODE" => version,
            "NCCL_CONFIG_UNDEF_INT" => i32::MIN as i64,
            "NCCL_CONFIG_UNDEF_PTR" => 0,
            other => panic!("initializer value {other:?} for {name} is new: teach Config about it"),
        };
        assert_eq!(*value, want, "field {name}: initializer says {expr}");
    }
    assert_eq!(version, nccl::header_version().code() as i64);
}

#[test]
fn every_setter_writes_exactly_its_field() {
    let base: BTreeMap<_, _> = raw_fields(&Config::new().to_raw()).into_iter().collect();
    let cases: Vec<(&str, Config, i64)> = vec![
        ("blocking", Config::new().blocking(false), 0),
        ("cgaClusterSize", Config::new().cga_cluster_size(2), 2),
        ("minCTAs", Config::new().min_ctas(3), 3),
        ("maxCTAs", Config::new().max_ctas(4), 4),
        ("splitShare", Config::new().split_share(true), 1),
        ("trafficClass", Config::new().traffic_class(5), 5),
        ("collnetEnable", Config::new().collnet_enable(true), 1),
        ("CTAPolicy", Config::new().cta_policy(nccl::config::cta_policy::ZERO), 2),
        ("shrinkShare", Config::new().shrink_share(false), 0),
        ("nvlsCTAs", Config::new().nvls_ctas(6), 6),
        ("nChannelsPerNetPeer", Config::new().n_channels_per_net_peer(7), 7),
        ("nvlinkCentricSched", Config::new().nvlink_centric_sched(true), 1),
        ("graphUsageMode", Config::new().graph_usage_mode(1), 1),
        ("numRmaCtx", Config::new().num_rma_ctx(8), 8),
        ("maxP2pPeers", Config::new().max_p2p_peers(9), 9),
        ("graphStreamOrdering", Config::new().graph_stream_ordering(false), 0),
        ("launchOrderImplicit", Config::new().launch_order_implicit(10), 10),
        ("numRmaSig", Config::new().num_rma_sig(11), 11),
        ("rmaEagerInit", Config::new().rma_eager_init(12), 12),
        ("hostCftMode", Config::new().host_cft_mode(3), 3),
        ("nvlsHostMode", Config::new().nvls_host_mode(2), 2),
    ];
    assert_eq!(
        cases.len(),
        Config::fields().count() - 2,
        "a setter without a test case"
    );
    for (field, config, value) in cases {
        let raw: BTreeMap<_, _> = raw_fields(&config.to_raw()).into_iter().collect();
        for (name, v) in &raw {
            let want = if *name == field { value } else { base[name] };
            assert_eq!(*v, want, "setting {field} changed {name}");
        }
        assert_eq!(config.get(field), Some(value as i32));
        config
            .validate(Version::new(2, 32, 3))
            .unwrap_or_else(|e| panic!("{field}: {e}"));
    }
    // Strings point at NUL-terminated copies.
    let c = Config::new().comm_name("tp").unwrap().net_name("Socket").unwrap();
    let raw = c.to_raw();
    // SAFETY: the pointers borrow from `c`, alive here, and are NUL-terminated.
    unsafe {
        assert_eq!(std::ffi::CStr::from_ptr(raw.commName).to_str().unwrap(), "tp");
        assert_eq!(std::ffi::CStr::from_ptr(raw.netName).to_str().unwrap(), "Socket");
    }
    assert!(matches!(
        Config::new().comm_name("a\0b"),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn config_fields_newer_than_the_library_are_refused() {
    let old = Version::new(2, 18, 0);
    let now = Version::new(2, 32, 3);
    let err = Config::new().nvls_host_mode(0).validate(old).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { op: "nvlsHostMode", needs, loaded }
            if *needs == Version::new(2, 31, 0) && *loaded == old),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let err = Config::new()
        .comm_name("x")
        .unwrap()
        .validate(Version::new(2, 26, 0))
        .unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { op: "commName", needs, .. } if needs == Version::new(2, 27, 0)),
        "{err:?}"
    );
    Config::new().split_share(true).blocking(false).validate(old).unwrap();
    // graphStreamOrdering arrived in a patch release.
    assert!(Config::new()
        .graph_stream_ordering(true)
        .validate(Version::new(2, 30, 4))
        .is_err());
    assert!(Config::new()
        .graph_stream_ordering(true)
        .validate(Version::new(2, 30, 5))
        .is_ok());
    // Values NCCL would reject are refused up front, naming the field.
    let err = Config::new().min_ctas(8).max_ctas(4).validate(now).unwrap_err();
    assert!(err.to_string().contains("minCTAs"), "{err}");
    assert!(Config::new()
        .nvls_ctas(0)
        .validate(now)
        .unwrap_err()
        .to_string()
        .contains("nvlsCTAs"));
    assert!(Config::new().graph_usage_mode(3).validate(now).is_err());
}

#[test]
fn datatype_mapping_matches_nccl_h() {
    use nccl::sys as s;
    let pairs: [(DataType, u64, usize); 12] = [
        (DataType::Int8, s::ncclInt8 as u64, 1),
        (DataType::Uint8, s::ncclUint8 as u64, 1),
        (DataType::Int32, s::ncclInt32 as u64, 4),
        (DataType::Uint32, s::ncclUint32 as u64, 4),
        (DataType::Int64, s::ncclInt64 as u64, 8),
        (DataType::Uint64, s::ncclUint64 as u64, 8),
        (DataType::Float16, s::ncclFloat16 as u64, 2),
        (DataType::Float32, s::ncclFloat32 as u64, 4),
        (DataType::Float64, s::ncclFloat64 as u64, 8),
        (DataType::Bfloat16, s::ncclBfloat16 as u64, 2),
        (DataType::Float8e4m3, s::ncclFloat8e4m3 as u64, 1),
        (DataType::Float8e5m2, s::ncclFloat8e5m2 as u64, 1),
    ];
    for (dt, raw, c_size) in pairs {
        assert_eq!(dt.raw() as u64, raw, "{dt:?}");
        assert_eq!(dt.size(), c_size, "{dt:?}");
    }
    fn rust_size<T: nccl::Elem>() -> (DataType, usize) {
        (T::DATA_TYPE, std::mem::size_of::<T>())
    }
    for (dt, size) in [
        rust_size::<i8>(),
        rust_size::<u8>(),
        rust_size::<i32>(),
        rust_size::<u32>(),
        rust_size::<i64>(),
        rust_size::<u64>(),
        rust_size::<half::f16>(),
        rust_size::<f32>(),
        rust_size::<f64>(),
        rust_size::<half::bf16>(),
        rust_size::<float8::F8E4M3>(),
        rust_size::<float8::F8E5M2>(),
    ] {
        assert_eq!(size, dt.size(), "{dt:?}");
    }
    assert_eq!(s::ncclNumTypes as u64, 12);
    assert_eq!(s::ncclSum as u64, nccl::ReduceOp::Sum.builtin_raw().unwrap() as u64);
    assert_eq!(s::ncclAvg as u64, nccl::ReduceOp::Avg.builtin_raw().unwrap() as u64);
    assert_eq!(s::ncclMin as u64, nccl::ReduceOp::Min.builtin_raw().unwrap() as u64);
}

#[test]
fn result_codes_map_to_typed_errors() {
    assert!(check_code("ncclAllReduce", 0, None).is_ok());
    let names = [
        "ncclUnhandledCudaError",
        "ncclSystemError",
        "ncclInternalError",
        "ncclInvalidArgument",
        "ncclInvalidUsage",
        "ncclRemoteError",
        "ncclInProgress",
        "ncclTimeout",
    ];
    for (i, name) in names.iter().enumerate() {
        let code = i as i32 + 1;
        let err = check_code("ncclAllReduce", code, Some(format!("detail {code}"))).unwrap_err();
        assert_eq!(err.nccl_code(), Some(code));
        let text = err.to_string();
        assert!(text.contains("ncclAllReduce") && text.contains(name), "{text}");
        assert!(
            text.contains(&format!("detail {code}")),
            "last-error text missing: {text}"
        );
        assert!(text.contains(&format!("ncclResult_t {code}")), "{text}");
    }
    for unknown in [9, 42, -1] {
        let err = check_code("ncclSend", unknown, None).unwrap_err();
        assert_eq!(err.nccl_code(), Some(unknown));
        assert_eq!(err.code(), Some(NcclCode::Unknown(unknown)));
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(err.to_string().contains("unknown result"), "{err}");
    }
    // Typed codes next to the raw ones, and the kinds callers match on.
    use nccl::sys as s;
    for (raw, code, kind) in [
        (s::ncclUnhandledCudaError, NcclCode::UnhandledCudaError, ErrorKind::Cuda),
        (s::ncclSystemError, NcclCode::SystemError, ErrorKind::Io),
        (s::ncclInternalError, NcclCode::InternalError, ErrorKind::Internal),
        (
            s::ncclInvalidArgument,
            NcclCode::InvalidArgument,
            ErrorKind::InvalidArgument,
        ),
        (s::ncclInvalidUsage, NcclCode::InvalidUsage, ErrorKind::InvalidUsage),
        (s::ncclRemoteError, NcclCode::RemoteError, ErrorKind::PeerFailed),
        (s::ncclInProgress, NcclCode::InProgress, ErrorKind::Internal),
        (s::ncclTimeout, NcclCode::Timeout, ErrorKind::Timeout),
    ] {
        let err = check_code("ncclAllReduce", raw as i32, None).unwrap_err();
        assert_eq!(err.code(), Some(code), "{err}");
        assert_eq!(code.raw(), raw as i32);
        assert_eq!(NcclCode::from_raw(raw as i32), code);
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(code.name()), "{err}");
    }
    // The bindings agree with the names.
    assert_eq!(nccl::sys::ncclTimeout as i32, 8);
    assert_eq!(nccl::sys::ncclInProgress as i32, 7);
}

#[test]
fn loader_errors_map_to_unsupported_and_library() {
    let missing = nccl::sys::LoadError::MissingSymbol {
        symbol: "ncclCommShrink",
        needs: "2.27",
        loaded: 21805,
    };
    let err = load_error("shrink", missing);
    assert!(
        matches!(&err, Error::Unsupported { op: "shrink", needs, loaded }
            if *needs == since::SHRINK && *loaded == Version::new(2, 18, 5)),
        "{err:?}"
    );
    let not_found = nccl::sys::LoadError::NotFound {
        searched: vec![("libnccl.so.2".into(), "no such file".into())],
    };
    assert!(matches!(
        load_error("init", not_found),
        Error::Library { op: "init", .. }
    ));
}

#[test]
fn version_gate_against_an_older_library() {
    // Simulate NCCL 2.18.0 loaded: everything newer is refused with the version that has it.
    let loaded = Version::from_code(21800);
    assert_eq!(loaded, Version::new(2, 18, 0));
    for (op, needs) in [
        ("ncclCommShrink", since::SHRINK),
        ("ncclAlltoAll", since::ALLTOALL),
        ("ncclCommWindowRegister", since::WINDOW),
    ] {
        let err = require(op, needs, loaded).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{op} needs NCCL {} or newer, but the loaded library is NCCL 2.18.0",
                needs.short()
            )
        );
    }
    for needs in [since::CONFIG, since::SPLIT, Version::new(2, 18, 0)] {
        require("x", needs, loaded).unwrap();
    }
    assert!(require("x", Version::new(2, 18, 1), loaded).is_err());
    // The functions the safe layer gates agree with the bindings' own table: one fact, two places that
    // must not drift.
    for (f, needs) in [
        ("ncclCommShrink", since::SHRINK),
        ("ncclAlltoAll", since::ALLTOALL),
        ("ncclGather", since::ALLTOALL),
        ("ncclScatter", since::ALLTOALL),
        ("ncclCommSplit", since::SPLIT),
        ("ncclCommRegister", since::REGISTER),
        ("ncclMemAlloc", since::REGISTER),
        ("ncclCommWindowRegister", since::WINDOW),
        ("ncclCommInitRankConfig", since::CONFIG),
        ("ncclCommFinalize", since::CONFIG),
        ("ncclRedOpCreatePreMulSum", since::PREMULSUM),
    ] {
        let table = nccl::sys::symbol_since(f).and_then(Version::parse);
        assert_eq!(table, Some(needs), "{f}");
    }
}

#[test]
fn version_encoding_and_order() {
    for v in [
        Version::new(2, 8, 4),
        Version::new(2, 9, 6),
        Version::new(2, 18, 5),
        Version::new(2, 32, 3),
        Version::new(3, 0, 1),
    ] {
        assert_eq!(Version::from_code(v.code()), v, "{v}");
    }
    assert_eq!(Version::new(2, 32, 3).code(), 23203);
    assert_eq!(Version::new(2, 8, 4).code(), 2804);
    assert!(Version::new(2, 10, 0) > Version::new(2, 9, 9));
    assert!(Version::new(3, 0, 0) > Version::new(2, 32, 3));
    assert!(Version::new(2, 30, 5).at_least(Version::new(2, 30, 5)));
    assert!(!Version::new(2, 30, 4).at_least(Version::new(2, 30, 5)));
    assert_eq!(Version::parse("2.30.5"), Some(Version::new(2, 30, 5)));
    assert_eq!(Version::parse("2.27"), Some(since::SHRINK));
    for bad in ["2.x", "2", "2.1.2.3", "", "two"] {
        assert_eq!(Version::parse(bad), None, "{bad:?}");
    }
}

/// bf16 needs one version everywhere: the type's minimum, the collectives' gate (`check_dtype`) and what
/// `nccl-perf -d all` schedules all read `DataType::min_version`, which is `since::BF16` (2.10: NCCL 2.10.3's
/// release notes, "Added support for bfloat16 type"; `ncclBfloat16 = 9` in `ncclDataType_t`). Before this
/// was one constant, the type said 2.9 and the gate 2.10.
#[test]
fn data_type_minimum_versions_are_the_gate_constants() {
    assert_eq!(DataType::Bfloat16.min_version(), since::BF16);
    assert_eq!(since::BF16, Version::new(2, 10, 0));
    assert_eq!(DataType::Float8e4m3.min_version(), since::FP8);
    assert_eq!(DataType::Float8e5m2.min_version(), since::FP8);
    assert_eq!(nccl::sys::ncclBfloat16 as i32, 9);
    // A 2.9 library has no bf16: the gate refuses it, naming 2.10.
    let err = require("all_reduce", DataType::Bfloat16.min_version(), Version::new(2, 9, 9)).unwrap_err();
    assert!(err.to_string().contains("needs NCCL 2.10 or newer"), "{err}");
    for dt in [DataType::Float32, DataType::Float16, DataType::Int8, DataType::Uint64] {
        assert!(Version::new(2, 0, 0).at_least(dt.min_version()), "{dt:?}");
    }
}

#[test]
fn loaded_version_is_reported() {
    let v = nccl::version().expect("libnccl loads from NCCL_HOME");
    assert_eq!(v.code(), nccl::sys::library_version().unwrap());
    assert!(v.at_least(since::SPLIT), "{v}");
    assert_eq!(v.to_string(), format!("{}.{}.{}", v.major, v.minor, v.patch));
    assert!(nccl::nccl_available());
}

#[test]
fn unique_id_round_trips_through_bytes() {
    let id = UniqueId::new().expect("ncclGetUniqueId works without a GPU");
    let bytes = *id.as_bytes();
    assert!(bytes.iter().any(|&b| b != 0), "NCCL filled the id");
    let back = UniqueId::from_bytes(bytes);
    assert_eq!(back, id);
    assert_eq!(UniqueId::try_from_slice(&bytes).unwrap(), id);
    assert_eq!(UniqueId::from_raw(&id.to_raw()), id);
    // Bytes above 127 survive the c_char conversion whatever its signedness.
    let mut all = [0u8; 128];
    for (i, b) in all.iter_mut().enumerate() {
        *b = (i * 2) as u8;
    }
    let wide = UniqueId::from_bytes(all);
    assert_eq!(UniqueId::from_raw(&wide.to_raw()).as_bytes(), &all);
    // Debug is a short hash, never the bytes.
    let dbg = format!("{id:?}");
    assert!(dbg.starts_with("UniqueId(") && dbg.len() < 40, "{dbg}");
    assert_ne!(format!("{wide:?}"), dbg);
    assert!(matches!(
        UniqueId::try_from_slice(&bytes[..100]),
        Err(Error::LengthMismatch {
            expected: 128,
            actual: 100,
            ..
        })
    ));
    assert_ne!(UniqueId::new().unwrap(), id, "two ids differ");
}

#[test]
fn init_rank_without_a_gpu_fails_with_ncclerror_and_its_message() {
    let id = UniqueId::new().unwrap();
    let err = Communicator::init_rank(&id, 0, 1).unwrap_err();
    match &err {
        Error::Nccl { op, code, last_error } => {
            assert_eq!(*op, "ncclCommInitRank");
            assert_eq!(*code, 1, "ncclUnhandledCudaError on a machine without a driver: {err}");
            let text = last_error.as_deref().unwrap_or_default();
            assert!(
                text.to_lowercase().contains("cuda"),
                "NCCL's last error explains the failure: {text:?}"
            );
        }
        other => panic!("expected Error::Nccl, got {other:?}"),
    }
    assert!(err.to_string().contains("ncclUnhandledCudaError"), "{err}");
}

#[test]
fn init_rank_checks_ranks_before_calling_nccl() {
    let id = UniqueId::from_bytes([0; 128]); // never reaches NCCL
    assert!(matches!(
        Communicator::init_rank(&id, 4, 4),
        Err(Error::InvalidRank {
            what: "rank",
            value: 4,
            size: 4,
            ..
        })
    ));
    assert!(matches!(
        Communicator::init_rank(&id, 0, 0),
        Err(Error::InvalidArgument { .. })
    ));
    let cfg = Config::new();
    assert!(matches!(
        Communicator::init_rank_config(&id, 2, 1, &cfg),
        Err(Error::InvalidRank { .. })
    ));
    assert!(matches!(
        Communicator::init_all(&[]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Communicator::init_all(&[0, 1, 0]),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn init_rank_config_and_timeout_fail_typed_and_promptly_without_a_gpu() {
    let id = UniqueId::new().unwrap();
    let cfg = Config::new().comm_name("cpu-test").unwrap();
    let err = Communicator::init_rank_config(&id, 0, 1, &cfg).unwrap_err();
    assert_eq!(err.nccl_code(), Some(1), "{err}");
    let start = Instant::now();
    let err = Communicator::init_rank_timeout(&id, 0, 2, &Config::new(), Duration::from_secs(20)).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "the CUDA failure is reported, not waited out"
    );
    assert!(matches!(err, Error::Nccl { .. } | Error::Timeout { .. }), "{err:?}");
    let err = Communicator::init_all(&[0]).unwrap_err();
    assert!(err.nccl_code().is_some(), "{err:?}");
}

#[test]
fn handles_are_send_and_sync_as_documented() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<AbortHandle>();
    send::<Communicator>();
    send_sync::<UniqueId>();
    send_sync::<Config>();
    send_sync::<Error>();
    send_sync::<nccl::NcclMemory>();
}

#[test]
fn groups_do_not_nest_and_always_end() {
    // ncclGroupStart/End need no GPU when nothing is issued.
    let out = nccl::group(|_| Ok(5));
    assert_eq!(out.unwrap(), 5);
    assert!(!nccl::group::in_group());
    let err = nccl::group(|_| nccl::group(|_| Ok(()))).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                op: "ncclGroupStart",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!nccl::group::in_group(), "the group ended although the closure failed");
    // A failing closure's error comes back, and the group is closed.
    let err = nccl::group(|_| -> nccl::Result<()> { Err(Error::invalid("user", "boom")) }).unwrap_err();
    assert!(err.to_string().contains("boom"));
    // A panicking closure still ends the group.
    let panicked = std::panic::catch_unwind(|| nccl::group(|_| -> nccl::Result<()> { panic!("inside") }));
    assert!(panicked.is_err());
    assert!(!nccl::group::in_group());
    nccl::group(|_| Ok(())).expect("a new group works after the panic");
}

/// NCCL defers communicator creation issued inside ncclGroupStart/End to the group's end and fills the
/// handle then, after our frame returned; every creating call refuses to run inside `nccl::group`, before
/// any C call. Without the refusal, `init_rank` here reaches NCCL (and returns its deferred, not yet
/// initialised handle, or NCCL's error), never `InsideGroup`.
#[test]
fn creation_is_refused_inside_a_group() {
    let id = UniqueId::new().unwrap();
    let cfg = Config::new();
    let mut seen = Vec::new();
    nccl::group(|_| {
        let calls: [(&str, Error); 4] = [
            ("ncclCommInitRank", Communicator::init_rank(&id, 0, 1).unwrap_err()),
            (
                "ncclCommInitRankConfig",
                Communicator::init_rank_config(&id, 0, 1, &cfg).unwrap_err(),
            ),
            (
                "ncclCommInitRankConfig",
                Communicator::init_rank_timeout(&id, 0, 1, &cfg, Duration::from_secs(1)).unwrap_err(),
            ),
            ("ncclCommInitAll", Communicator::init_all(&[0]).unwrap_err()),
        ];
        for (want, err) in calls {
            assert!(
                matches!(&err, Error::InsideGroup { op } if *op == want),
                "{want}: {err:?}"
            );
            assert_eq!(err.kind(), ErrorKind::InvalidUsage);
            assert!(err.to_string().contains("inside nccl::group"), "{err}");
            seen.push(want);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(seen.len(), 4);
    // Outside the group the same call reaches NCCL again (and fails there without a GPU).
    let err = Communicator::init_rank(&id, 0, 1).unwrap_err();
    assert!(err.nccl_code().is_some(), "{err:?}");
}

#[test]
fn every_error_has_a_kind_shared_across_backends() {
    use std::time::Duration;
    let timeout = Error::Timeout {
        op: "all_reduce",
        elapsed: Duration::from_secs(1),
        detail: None,
    };
    assert_eq!(timeout.kind(), ErrorKind::Timeout);
    let peer = Error::PeerFailed {
        op: "barrier",
        rank: 2,
        reason: "exited".into(),
    };
    assert_eq!(peer.kind(), ErrorKind::PeerFailed);
    assert_eq!(Error::Aborted { op: "x" }.kind(), ErrorKind::Aborted);
    assert_eq!(Error::invalid("x", "y").kind(), ErrorKind::InvalidArgument);
    assert_eq!(
        nccl::counts::check_rank("bcast", "root", 5, 2).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    // The same kinds from NCCL's own codes.
    let remote = check_code("ncclAllReduce", nccl::sys::ncclRemoteError as i32, None).unwrap_err();
    assert_eq!(remote.kind(), peer.kind());
    let nccl_timeout = check_code("ncclAllReduce", nccl::sys::ncclTimeout as i32, None).unwrap_err();
    assert_eq!(nccl_timeout.kind(), timeout.kind());
}

/// CUDA driver failures keep cudarc's error as their source (not a string). Display is not used here: it asks
/// the driver for the error string, and there is none on this machine.
#[cfg(feature = "cuda")]
#[test]
fn cuda_driver_errors_keep_cudarcs_error_as_source() {
    use nccl::cudarc::driver::{sys::CUresult, DriverError};
    use std::error::Error as _;
    let err = Error::cuda("synchronize")(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
    assert_eq!(err.kind(), ErrorKind::Cuda);
    let source = err.source().expect("the driver error is the source");
    let driver = source.downcast_ref::<DriverError>().expect("a cudarc DriverError");
    assert_eq!(driver.0, CUresult::CUDA_ERROR_INVALID_VALUE);
    assert!(matches!(err, Error::CudaDriver { op: "synchronize", .. }));
}

/// cudarc's `CudaContext::new` panics without a driver; the probes must not.
#[cfg(feature = "cuda")]
#[test]
fn cuda_probes_never_panic() {
    let present = nccl::cuda_available();
    let count = nccl::cuda_device_count();
    if !present {
        assert_eq!(count, 0, "no driver, no devices");
    }
    // The driver library exists exactly when the loader finds one of its names.
    let on_disk = ["libcuda.so.1", "libcuda.so"].iter().any(|n| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ldconfig -p 2>/dev/null | grep -q '{n}'"))
            .status()
            .is_ok_and(|s| s.success())
    });
    if !on_disk && std::env::var_os("LD_LIBRARY_PATH").is_none() {
        assert!(!present, "cuda_available() claims a driver the loader cannot see");
    }
}
