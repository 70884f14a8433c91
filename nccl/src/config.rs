//! `ncclConfig_t` as a typed builder.
//!
//! [`Config::new`] starts from exactly what `NCCL_CONFIG_INITIALIZER` sets (size, magic, version, and every
//! attribute "undefined", `INT_MIN` or `NULL`, so NCCL picks its default). Each setter fills one field. Fields
//! newer than the loaded library are refused with [`Error::Unsupported`] instead of being silently ignored
//! (an older NCCL reads only the fields it knows).

use crate::error::{Error, Result};
use crate::result;
use crate::version::Version as V;
use std::ffi::CString;
use std::time::Duration;

/// `NCCL_CONFIG_UNDEF_INT`.
pub const UNDEF_INT: i32 = i32::MIN;
/// `NCCL_API_MAGIC`.
pub const API_MAGIC: u32 = 0xcafe_beef;

/// How long this crate waits, by default, for a call on a non-blocking communicator to leave
/// `ncclInProgress` (creation, split and shrink, every collective, `ncclGroupEnd`, registration, finalize)
/// before it aborts the communicator and returns [`Error::Timeout`]: 10 minutes. Set another bound with
/// [`Config::wait_timeout`].
pub const DEFAULT_WAIT: Duration = Duration::from_secs(600);

/// Integer attributes of `ncclConfig_t`, in struct order, with the NCCL version that introduced each.
const INT_FIELDS: [(&str, V); 21] = [
    ("blocking", V::new(2, 14, 0)),
    ("cgaClusterSize", V::new(2, 17, 0)),
    ("minCTAs", V::new(2, 17, 0)),
    ("maxCTAs", V::new(2, 17, 0)),
    ("splitShare", V::new(2, 18, 0)),
    ("trafficClass", V::new(2, 26, 0)),
    ("collnetEnable", V::new(2, 27, 0)),
    ("CTAPolicy", V::new(2, 27, 0)),
    ("shrinkShare", V::new(2, 27, 0)),
    ("nvlsCTAs", V::new(2, 27, 0)),
    ("nChannelsPerNetPeer", V::new(2, 28, 0)),
    ("nvlinkCentricSched", V::new(2, 28, 0)),
    ("graphUsageMode", V::new(2, 29, 0)),
    ("numRmaCtx", V::new(2, 29, 0)),
    ("maxP2pPeers", V::new(2, 30, 0)),
    ("graphStreamOrdering", V::new(2, 30, 5)),
    ("launchOrderImplicit", V::new(2, 31, 0)),
    ("numRmaSig", V::new(2, 31, 0)),
    ("rmaEagerInit", V::new(2, 31, 0)),
    ("hostCftMode", V::new(2, 31, 0)),
    ("nvlsHostMode", V::new(2, 31, 0)),
];

#[derive(Clone, Copy)]
#[repr(usize)]
enum F {
    Blocking,
    CgaClusterSize,
    MinCtas,
    MaxCtas,
    SplitShare,
    TrafficClass,
    CollnetEnable,
    CtaPolicy,
    ShrinkShare,
    NvlsCtas,
    NChannelsPerNetPeer,
    NvlinkCentricSched,
    GraphUsageMode,
    NumRmaCtx,
    MaxP2pPeers,
    GraphStreamOrdering,
    LaunchOrderImplicit,
    NumRmaSig,
    RmaEagerInit,
    HostCftMode,
    NvlsHostMode,
}

/// CTA policy flags for [`Config::cta_policy`] (`NCCL_CTA_POLICY_*`).
pub mod cta_policy {
    /// `NCCL_CTA_POLICY_DEFAULT`.
    pub const DEFAULT: i32 = 0x00;
    /// `NCCL_CTA_POLICY_EFFICIENCY`: fewer CTAs, leaving SMs to compute kernels.
    pub const EFFICIENCY: i32 = 0x01;
    /// `NCCL_CTA_POLICY_ZERO` (2.28+): use zero-CTA (copy engine) paths where possible.
    pub const ZERO: i32 = 0x02;
}

/// A communicator configuration (`ncclConfig_t`), built from NCCL's initializer values.
///
/// ```no_run
/// use nccl::{Communicator, Config, UniqueId};
/// let id = UniqueId::new()?;
/// let config = Config::new().blocking(false).comm_name("tp-group")?.max_ctas(16);
/// let comm = Communicator::init_rank_config(&id, 0, 1, &config)?;
/// # Ok::<(), nccl::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[doc(alias = "ncclConfig_t")]
#[doc(alias = "NCCL_CONFIG_INITIALIZER")]
pub struct Config {
    ints: [Option<i32>; 21],
    net_name: Option<CString>,
    comm_name: Option<CString>,
    /// Not an `ncclConfig_t` field: this crate's bound on non-blocking waits.
    wait: Option<Duration>,
}

fn c_string(op: &'static str, text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| Error::invalid(op, format!("{text:?} contains a NUL byte")))
}

impl Config {
    /// `NCCL_CONFIG_INITIALIZER`: every attribute undefined, so NCCL uses its defaults.
    pub fn new() -> Self {
        Self::default()
    }

    fn set(mut self, f: F, v: i32) -> Self {
        self.ints[f as usize] = Some(v);
        self
    }

    /// The value set for a field by its C name (`"maxCTAs"`), `None` when left to NCCL.
    pub fn get(&self, c_name: &str) -> Option<i32> {
        let i = INT_FIELDS.iter().position(|(n, _)| *n == c_name)?;
        self.ints[i]
    }

    /// `blocking`: `false` makes every call on the communicator return at once with `ncclInProgress`
    /// while NCCL works in the background; this crate then polls `ncclCommGetAsyncError` (see
    /// [`Communicator::init_rank_timeout`](crate::Communicator::init_rank_timeout)). NCCL 2.14+.
    ///
    /// Needed for an [`AbortHandle`](crate::AbortHandle) to interrupt calls that hang on the host: a
    /// blocking communicator (the default) keeps its lock for the whole of a call that blocks inside
    /// NCCL's host code, so a watchdog's `abort` waits until that call returns, which may be never.
    pub fn blocking(self, blocking: bool) -> Self {
        self.set(F::Blocking, blocking as i32)
    }
    /// `cgaClusterSize` (0..=8, sm90+): CUDA thread-block cluster size of NCCL's kernels. NCCL 2.17+.
    pub fn cga_cluster_size(self, size: u32) -> Self {
        self.set(F::CgaClusterSize, size.min(i32::MAX as u32) as i32)
    }
    /// `minCTAs`: the minimum number of CTAs (channels) per kernel; must be > 0. NCCL 2.17+.
    pub fn min_ctas(self, n: u32) -> Self {
        self.set(F::MinCtas, n.min(i32::MAX as u32) as i32)
    }
    /// `maxCTAs`: the maximum number of CTAs per kernel; must be > 0 and >= `minCTAs`. NCCL 2.17+.
    pub fn max_ctas(self, n: u32) -> Self {
        self.set(F::MaxCtas, n.min(i32::MAX as u32) as i32)
    }
    /// `netName`: the network plugin to use (`"IB"`, `"Socket"`, ...), like `NCCL_NET`. NCCL 2.17+.
    /// Fails on text with a NUL byte.
    pub fn net_name(mut self, name: &str) -> Result<Self> {
        self.net_name = Some(c_string("Config::net_name", name)?);
        Ok(self)
    }
    /// `splitShare`: child communicators from [`split`](crate::Communicator::split) share the parent's
    /// resources. NCCL 2.18+.
    pub fn split_share(self, share: bool) -> Self {
        self.set(F::SplitShare, share as i32)
    }
    /// `trafficClass`: network traffic class (QoS) for this communicator's connections. NCCL 2.26+.
    pub fn traffic_class(self, class: i32) -> Self {
        self.set(F::TrafficClass, class)
    }
    /// `commName`: a name shown in NCCL's logs and profiler. NCCL 2.27+. The string is kept alive for the
    /// communicator's lifetime (NCCL keeps the pointer). Fails on text with a NUL byte.
    pub fn comm_name(mut self, name: &str) -> Result<Self> {
        self.comm_name = Some(c_string("Config::comm_name", name)?);
        Ok(self)
    }
    /// `collnetEnable`: use CollNet (in-network reduction, e.g. SHARP) when available. NCCL 2.27+.
    pub fn collnet_enable(self, enable: bool) -> Self {
        self.set(F::CollnetEnable, enable as i32)
    }
    /// `CTAPolicy`: a combination of [`cta_policy`] flags. NCCL 2.27+.
    pub fn cta_policy(self, flags: i32) -> Self {
        self.set(F::CtaPolicy, flags)
    }
    /// `shrinkShare`: communicators from [`shrink`](crate::Communicator::shrink) share the parent's
    /// resources. NCCL 2.27+.
    pub fn shrink_share(self, share: bool) -> Self {
        self.set(F::ShrinkShare, share as i32)
    }
    /// `nvlsCTAs`: number of CTAs for NVLink SHARP (NVLS) kernels; must be > 0. NCCL 2.27+.
    pub fn nvls_ctas(self, n: u32) -> Self {
        self.set(F::NvlsCtas, n.min(i32::MAX as u32) as i32)
    }
    /// `nChannelsPerNetPeer`: channels per network peer for point-to-point; must be > 0. NCCL 2.28+.
    pub fn n_channels_per_net_peer(self, n: u32) -> Self {
        self.set(F::NChannelsPerNetPeer, n.min(i32::MAX as u32) as i32)
    }
    /// `nvlinkCentricSched`: NVLink-centric scheduling of point-to-point operations. NCCL 2.28+.
    pub fn nvlink_centric_sched(self, enable: bool) -> Self {
        self.set(F::NvlinkCentricSched, enable as i32)
    }
    /// `graphUsageMode` (0, 1 or 2): how the communicator is used with CUDA graphs (2, NCCL's default, allows
    /// mixing captured and eager launches). NCCL 2.29+.
    pub fn graph_usage_mode(self, mode: i32) -> Self {
        self.set(F::GraphUsageMode, mode)
    }
    /// `numRmaCtx`: number of RMA (put/signal) contexts; must be >= 0. NCCL 2.29+.
    pub fn num_rma_ctx(self, n: u32) -> Self {
        self.set(F::NumRmaCtx, n.min(i32::MAX as u32) as i32)
    }
    /// `maxP2pPeers`: the maximum number of point-to-point peers to set up resources for; must be > 0.
    /// NCCL 2.30+.
    pub fn max_p2p_peers(self, n: u32) -> Self {
        self.set(F::MaxP2pPeers, n.min(i32::MAX as u32) as i32)
    }
    /// `graphStreamOrdering`: serialize captured NCCL work with the capturing stream (1, the default) or not
    /// (0). NCCL 2.30.5+.
    pub fn graph_stream_ordering(self, ordered: bool) -> Self {
        self.set(F::GraphStreamOrdering, ordered as i32)
    }
    /// `launchOrderImplicit`: NCCL's implicit launch-order setting. NCCL 2.31+.
    pub fn launch_order_implicit(self, value: i32) -> Self {
        self.set(F::LaunchOrderImplicit, value)
    }
    /// `numRmaSig`: number of RMA signal slots. NCCL 2.31+.
    pub fn num_rma_sig(self, n: i32) -> Self {
        self.set(F::NumRmaSig, n)
    }
    /// `rmaEagerInit`: set up RMA resources at init instead of on first use. NCCL 2.31+.
    pub fn rma_eager_init(self, value: i32) -> Self {
        self.set(F::RmaEagerInit, value)
    }
    /// `hostCftMode` (`ncclHostCftMode_t`: 1 enable, 2 disable, 3 fallback). NCCL 2.31+.
    pub fn host_cft_mode(self, mode: i32) -> Self {
        self.set(F::HostCftMode, mode)
    }
    /// `nvlsHostMode` (`ncclNvlsHostMode_t` flags: 0 enable all, 1 disable transport, 2 disable symmetric
    /// multimem, `i32::MAX` disable all). NCCL 2.31+.
    pub fn nvls_host_mode(self, flags: i32) -> Self {
        self.set(F::NvlsHostMode, flags)
    }

    /// This crate's bound on every wait for a non-blocking call to complete (not an `ncclConfig_t` field;
    /// NCCL never sees it). While NCCL reports `ncclInProgress` this crate polls `ncclCommGetAsyncError`;
    /// when `timeout` passes first, the communicator is aborted and the call returns [`Error::Timeout`]
    /// (for a split or shrink, the parent is aborted: it is the one whose work did not finish). Applies to
    /// creation with [`init_rank_config`](crate::Communicator::init_rank_config) (an explicit timeout given
    /// to [`init_rank_timeout`](crate::Communicator::init_rank_timeout) takes precedence there),
    /// `ncclGroupEnd`, split, shrink, collectives, registration and finalize; a child communicator created
    /// by split or shrink inherits the config it was created with. Default [`DEFAULT_WAIT`] (10 minutes).
    /// Blocking communicators never wait this way (NCCL's own call blocks instead).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = nccl::Config::new().blocking(false).wait_timeout(Duration::from_secs(30));
    /// assert_eq!(config.wait(), Duration::from_secs(30));
    /// assert_eq!(nccl::Config::new().wait(), nccl::config::DEFAULT_WAIT);
    /// ```
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait = Some(timeout);
        self
    }

    /// The bound on non-blocking waits: the one set with [`wait_timeout`](Self::wait_timeout), else
    /// [`DEFAULT_WAIT`].
    pub fn wait(&self) -> Duration {
        self.wait.unwrap_or(DEFAULT_WAIT)
    }

    /// True when `blocking` is explicitly set to `false`.
    pub fn is_non_blocking(&self) -> bool {
        self.ints[F::Blocking as usize] == Some(0)
    }

    /// Checks the set values against NCCL's rules and against `loaded`, the loaded library's version: a field
    /// newer than the library gives [`Error::Unsupported`] naming the field.
    pub fn validate(&self, loaded: V) -> Result<()> {
        const OP: &str = "ncclConfig_t";
        for (i, v) in self.ints.iter().enumerate() {
            if v.is_some() {
                let (name, since) = INT_FIELDS[i];
                result::require(name, since, loaded)?;
            }
        }
        if self.net_name.is_some() {
            result::require("netName", V::new(2, 17, 0), loaded)?;
        }
        if self.comm_name.is_some() {
            result::require("commName", V::new(2, 27, 0), loaded)?;
        }
        let v = |f: F| self.ints[f as usize];
        let bad = |field: &str, value: i32, rule: &str| {
            Err(Error::invalid(OP, format!("{field} = {value} is invalid: {rule}")))
        };
        for f in [
            F::MinCtas,
            F::MaxCtas,
            F::NvlsCtas,
            F::NChannelsPerNetPeer,
            F::MaxP2pPeers,
        ] {
            if let Some(x) = v(f) {
                if x <= 0 {
                    return bad(INT_FIELDS[f as usize].0, x, "must be > 0");
                }
            }
        }
        if let (Some(lo), Some(hi)) = (v(F::MinCtas), v(F::MaxCtas)) {
            if lo > hi {
                return bad("minCTAs", lo, "must not exceed maxCTAs");
            }
        }
        if let Some(x) = v(F::GraphUsageMode) {
            if !(0..=2).contains(&x) {
                return bad("graphUsageMode", x, "must be 0, 1 or 2");
            }
        }
        if let Some(x) = v(F::HostCftMode) {
            if !(1..=3).contains(&x) {
                return bad("hostCftMode", x, "must be 1 (enable), 2 (disable) or 3 (fallback)");
            }
        }
        Ok(())
    }

    /// The C struct. Its string pointers borrow from `self`: keep `self` alive (and unmoved strings are
    /// heap-allocated, so moving `self` is fine) for as long as NCCL may read them.
    pub fn to_raw(&self) -> nccl_sys::ncclConfig_t {
        let i = |f: F| self.ints[f as usize].unwrap_or(UNDEF_INT);
        let s = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        nccl_sys::ncclConfig_t {
            size: std::mem::size_of::<nccl_sys::ncclConfig_t>(),
            magic: API_MAGIC as _,
            version: nccl_sys::NCCL_VERSION_CODE as _,
            blocking: i(F::Blocking),
            cgaClusterSize: i(F::CgaClusterSize),
            minCTAs: i(F::MinCtas),
            maxCTAs: i(F::MaxCtas),
            netName: s(&self.net_name),
            splitShare: i(F::SplitShare),
            trafficClass: i(F::TrafficClass),
            commName: s(&self.comm_name),
            collnetEnable: i(F::CollnetEnable),
            CTAPolicy: i(F::CtaPolicy),
            shrinkShare: i(F::ShrinkShare),
            nvlsCTAs: i(F::NvlsCtas),
            nChannelsPerNetPeer: i(F::NChannelsPerNetPeer),
            nvlinkCentricSched: i(F::NvlinkCentricSched),
            graphUsageMode: i(F::GraphUsageMode),
            numRmaCtx: i(F::NumRmaCtx),
            maxP2pPeers: i(F::MaxP2pPeers),
            graphStreamOrdering: i(F::GraphStreamOrdering),
            launchOrderImplicit: i(F::LaunchOrderImplicit),
            numRmaSig: i(F::NumRmaSig),
            rmaEagerInit: i(F::RmaEagerInit),
            hostCftMode: i(F::HostCftMode) as _,
            nvlsHostMode: i(F::NvlsHostMode) as _,
        }
    }

    /// The C field names and the version that introduced each, in struct order (for docs and tests).
    pub fn fields() -> impl Iterator<Item = (&'static str, V)> {
        INT_FIELDS
            .iter()
            .copied()
            .chain([("netName", V::new(2, 17, 0)), ("commName", V::new(2, 27, 0))])
    }
}
