//! The engine's CUDA compute backend (feature `cuda`): [`Cuda`] implements [`Compute`] with activations,
//! bf16 weights and an f32 KV cache on one device, the kernels of [`CudaKernels`] and cuBLAS on one stream,
//! and the tensor-parallel collectives as NCCL calls on that same stream ([`DeviceTp`]): nothing goes
//! through the host inside a stage except the logits (for sampling) and the positions of a step.
//!
//! Weights: [`upload`] takes a rank's already-sharded host model ([`RankModel`] on the CPU backend),
//! dequantizes every matrix to f32, rounds it to bf16 and copies it to the device; norms stay f32. Linear
//! layers cast their f32 input to bf16 and run `cublasGemmEx` with bf16 operands, f32 accumulation and an
//! f32 output ([`CudaKernels::linear_bf16_f32`]).
//!
//! A step may hold several sequences (the server's continuous batching): the linear layers, norms and
//! collectives run once over all rows, and the KV append and attention once per run of consecutive rows of
//! one sequence, on views of the step's buffers, each over its own cache. Limits of this first version:
//! pipeline stages hand their activations on through the host pipeline communicator (a copy to and from
//! the host per stage and step).
//!
//! Nothing here has run on a GPU yet: it is compiled (CI: `clippy --all-features`), its host-side logic is
//! unit-tested, and `llm/tests/engine_gpu.rs` holds the GPU checks (ignored without a device).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DriverError};
use half::bf16;
use nccl::{Collectives, ReduceOp};

use crate::comm::{Comm, SingleComm};
use crate::compute::{AttnDims, Compute, Cpu, GraphInputs, StepRows};
use crate::cuda::{CudaError, CudaKernels, Positions, PositionsBuf};
use crate::engine::RankModel;
use crate::error::{EngineError, Result};
use crate::kernels::{AttentionShape, EmbedShape, RmsNormShape, RopeShape, SiluMulShape};
use crate::math::{Rope, Weight};

fn drv<T>(r: std::result::Result<T, DriverError>) -> Result<T> {
    r.map_err(|e| EngineError::Cuda(CudaError::Driver(e)))
}

fn cuda<T>(r: std::result::Result<T, CudaError>) -> Result<T> {
    r.map_err(EngineError::Cuda)
}

/// The CUDA device of the rank with local rank `local_rank` when `local_ranks` ranks share this host and
/// `device_count` devices are visible: device `local_rank`, each rank on its own GPU. Fails with a clear
/// error when there are fewer GPUs than ranks (or none).
pub fn device_for_rank(local_rank: usize, local_ranks: usize, device_count: usize) -> Result<usize> {
    if device_count == 0 {
        return Err(EngineError::Config(
            "--device cuda: no CUDA device is visible (the CUDA driver is missing or reports 0 devices; check \
             nvidia-smi and CUDA_VISIBLE_DEVICES)"
                .into(),
        ));
    }
    if local_ranks > device_count || local_rank >= device_count {
        return Err(EngineError::Config(format!(
            "--device cuda: {local_ranks} rank(s) on this host need one GPU each, but only {device_count} \
             device(s) are visible"
        )));
    }
    Ok(local_rank)
}

/// A weight matrix on the device: `[rows, cols]` row-major bf16.
pub struct DeviceWeight {
    data: CudaSlice<bf16>,
    rows: usize,
    cols: usize,
}

impl DeviceWeight {
    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// A host weight as the device stores it: dequantized to f32 (a copy for block-quantized weights), then
/// rounded to bf16 (round to nearest even). Returns `(rows, cols, values)`.
pub fn weight_to_bf16(w: Weight) -> (usize, usize, Vec<bf16>) {
    let m = w.into_f32();
    let data = m.data.iter().map(|&v| bf16::from_f32(v)).collect();
    (m.rows, m.cols, data)
}

/// The KV cache of one sequence on the device: per layer, `[kv head][position][head_dim]` f32 keys and
/// values.
pub struct DeviceCache {
    k: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    max_seq: usize,
    len: usize,
}

impl DeviceCache {
    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when nothing was cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forgets every position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.max_seq
    }
}

/// The TP communicator of the CUDA backend: a group of one (collectives are identities, no NCCL needed) or
/// an NCCL communicator bound to the backend's stream, whose collectives run on device buffers. As a host
/// [`Comm`] (barriers, the server's host messages) the NCCL one stages through the device.
pub enum DeviceTp {
    /// TP = 1.
    Single,
    /// A communicator with an NCCL communicator behind it ([`Comm::nccl_communicator`]), e.g. a
    /// [`StagedNcclComm`](crate::comm::cuda::StagedNcclComm), whose stream is the kernels' stream.
    Nccl(Box<dyn Comm>),
}

impl DeviceTp {
    /// The TP communicator of the CUDA engine from a rank's TP communicator: a group of one needs no NCCL;
    /// a larger group must be an NCCL communicator (`--backend nccl`).
    pub fn from_comm(c: Box<dyn Comm>) -> Result<Self> {
        if c.size() == 1 {
            return Ok(DeviceTp::Single);
        }
        if c.nccl_communicator().is_none() {
            return Err(EngineError::Config(format!(
                "--device cuda with TP {}: the TP communicator must be NCCL (--backend nccl), not {}",
                c.size(),
                c.backend_name()
            )));
        }
        Ok(DeviceTp::Nccl(c))
    }

    /// The NCCL communicator's stream (the stream the rank's CUDA engine must run on), if any.
    pub fn stream(&self) -> Option<Arc<CudaStream>> {
        match self {
            DeviceTp::Single => None,
            DeviceTp::Nccl(c) => c.nccl_communicator().and_then(|n| n.stream().ok()).cloned(),
        }
    }
}

impl Comm for DeviceTp {
    fn rank(&self) -> usize {
        match self {
            DeviceTp::Single => 0,
            DeviceTp::Nccl(c) => c.rank(),
        }
    }
    fn size(&self) -> usize {
        match self {
            DeviceTp::Single => 1,
            DeviceTp::Nccl(c) => c.size(),
        }
    }
    fn backend_name(&self) -> &'static str {
        match self {
            DeviceTp::Single => "single",
            DeviceTp::Nccl(_) => "nccl",
        }
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> nccl::Result<()> {
        match self {
            DeviceTp::Single => SingleComm.all_reduce_sum(buf),
            DeviceTp::Nccl(c) => c.all_reduce_sum(buf),
        }
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> nccl::Result<()> {
        match self {
            DeviceTp::Single => SingleComm.all_gather(send, recv),
            DeviceTp::Nccl(c) => c.all_gather(send, recv),
        }
    }
    fn send(&self, buf: &[f32], peer: usize) -> nccl::Result<()> {
        match self {
            DeviceTp::Single => SingleComm.send(buf, peer),
            DeviceTp::Nccl(c) => c.send(buf, peer),
        }
    }
    fn recv(&self, buf: &mut [f32], peer: usize) -> nccl::Result<()> {
        match self {
            DeviceTp::Single => SingleComm.recv(buf, peer),
            DeviceTp::Nccl(c) => c.recv(buf, peer),
        }
    }
    fn barrier(&self) -> nccl::Result<()> {
        match self {
            DeviceTp::Single => Ok(()),
            DeviceTp::Nccl(c) => c.barrier(),
        }
    }
}

/// The CUDA compute backend of one rank: the kernels on one device and stream, the rotary tables on the
/// device, and reusable bf16 buffers for the linear layers' inputs.
pub struct Cuda {
    k: CudaKernels,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    max_pos: usize,
    /// bf16 copies of linear inputs, by length (stream order makes reusing one buffer safe).
    scratch: Mutex<HashMap<usize, CudaSlice<bf16>>>,
    /// The step being recorded into a CUDA graph, while [`Compute::graph_record`] runs.
    recording: Mutex<Option<Recording>>,
    /// The TP communicator runs on a stream of its own ([`Cuda::beside_stream`]), not on this one.
    comm_apart: bool,
    /// The communicator whose collectives this stream's work may wait for, and the bound on a wait for
    /// it ([`Cuda::watch`]).
    watch: Option<(nccl::AbortHandle, std::time::Duration)>,
}

/// The inputs of the step being recorded, on the device: made before the capture opens (a copy from the host
/// cannot be recorded), read by the recorded embedding and position-dependent kernels, and handed to the
/// [`CudaGraph`], which rewrites them before each launch.
struct Recording {
    inputs: GraphInputs,
    ids: Option<CudaSlice<u32>>,
    positions: PositionsBuf,
}

/// A decode step recorded into a CUDA graph ([`Compute::graph_record`] of [`Cuda`]): the graph, its input
/// buffers, and what it was recorded over.
pub struct CudaGraph {
    graph: nccl::graph::Graph,
    ids: Option<CudaSlice<u32>>,
    positions: PositionsBuf,
    shape: RecordedShape,
}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGraph")
            .field("graph", &self.graph)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// What a CUDA graph was recorded over, checked on the host before each launch: a launch runs the recorded
/// kernels on the recorded addresses, so it must get the same cache and output buffer, as many inputs, and
/// positions the cache and the rotary tables hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedShape {
    /// Token ids of the step (0 on a stage that receives its activations).
    pub tokens: usize,
    /// Rows of the step (one position each).
    pub rows: usize,
    /// The cache: device address of its first layer's keys (0 without layers) and its positions.
    pub cache: (u64, usize),
    /// The output buffer: device address and elements.
    pub out: (u64, usize),
    /// Positions of the rotary tables.
    pub max_pos: usize,
}

impl RecordedShape {
    /// Checks a launch on `inputs` over `cache` into `out` (`(address, length)` pairs as in the fields) and
    /// returns its positions as the kernels read them.
    pub fn check_launch(&self, inputs: &GraphInputs, cache: (u64, usize), out: (u64, usize)) -> Result<Vec<u32>> {
        if inputs.tokens.len() != self.tokens || inputs.positions.len() != self.rows {
            return Err(EngineError::Config(format!(
                "a CUDA graph recorded for {} token(s) and {} position(s) launched with {} and {}",
                self.tokens,
                self.rows,
                inputs.tokens.len(),
                inputs.positions.len()
            )));
        }
        if cache != self.cache {
            return Err(EngineError::Config(
                "a CUDA graph launched over another KV cache than the one it was recorded over".into(),
            ));
        }
        if out != self.out {
            return Err(EngineError::Config(
                "a CUDA graph launched into another output buffer than the one it was recorded with".into(),
            ));
        }
        let limit = self.cache.1.min(self.max_pos);
        inputs
            .positions
            .iter()
            .map(|&p| {
                if p >= limit {
                    return Err(EngineError::Config(format!(
                        "position {p} is past the KV cache ({} positions) or the rotary tables ({})",
                        self.cache.1, self.max_pos
                    )));
                }
                u32::try_from(p).map_err(|_| EngineError::Config(format!("position {p} exceeds u32")))
            })
            .collect()
    }
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("kernels", &self.k)
            .field("max_pos", &self.max_pos)
            .finish_non_exhaustive()
    }
}

/// What a CUDA step keeps: the positions of its rows, and its runs of consecutive rows of one sequence.
pub struct CudaStep {
    /// Uploaded once, read by every RoPE, KV-append and attention launch of the step; `None` while the step
    /// is recorded: the recording's input buffer is read instead.
    positions: Option<PositionsBuf>,
    runs: Vec<(usize, Range<usize>)>,
}

impl Cuda {
    /// The kernels on device `ordinal` (compiled by NVRTC for it) and the rotary tables of positions
    /// `0..max_pos`. Typed errors ([`CudaError`]) when the driver, NVRTC or cuBLAS is missing or the device
    /// does not exist.
    pub fn new(ordinal: usize, rope: &Rope, max_pos: usize) -> Result<Self> {
        Self::with_kernels(cuda(CudaKernels::new(ordinal))?, rope, max_pos)
    }

    /// [`Cuda::new`] on an existing stream: the stream an NCCL TP communicator is bound to
    /// ([`DeviceTp::stream`]), so that kernels and collectives share one stream order.
    pub fn on_stream(stream: Arc<CudaStream>, rope: &Rope, max_pos: usize) -> Result<Self> {
        Self::with_kernels(cuda(CudaKernels::on_stream(stream))?, rope, max_pos)
    }

    /// [`Cuda::new`] on a new stream of the context of `comm` (the stream an NCCL TP communicator is bound
    /// to), for `--overlap-comm`: kernels and cuBLAS run on the new stream, the collectives stay on `comm`,
    /// and cudarc's per-buffer events order the two (a collective waits for the kernel that wrote its
    /// buffer; the next kernel that reads it waits for the collective). Work enqueued on the compute stream
    /// after a collective, and not reading its buffer, runs while it is in flight: the next micro-batch of
    /// [`RankModel::forward_micro`].
    pub fn beside_stream(comm: &Arc<CudaStream>, rope: &Rope, max_pos: usize) -> Result<Self> {
        let ctx = comm.context();
        if !ctx.is_event_tracking() {
            return Err(EngineError::Config(
                "--overlap-comm: cudarc's event tracking is off in this context, so nothing would order the \
                 compute stream and the communicator's"
                    .into(),
            ));
        }
        let compute = drv(ctx.new_stream())?;
        let mut cuda = Self::with_kernels(cuda(CudaKernels::on_stream(compute))?, rope, max_pos)?;
        cuda.comm_apart = true;
        Ok(cuda)
    }

    /// Bounds every wait of this backend for its stream (reading logits or activations back) by `comm`'s
    /// `wait_timeout`, polling `comm` for a failed peer meanwhile: a collective whose peer never joins
    /// then fails the wait (and aborts `comm`, ending its kernels) instead of hanging it. Without it (TP 1,
    /// no NCCL) the waits are plain stream synchronizations.
    pub fn watch(&mut self, comm: &nccl::Communicator) {
        self.watch = Some((comm.abort_handle(), comm.wait_timeout()));
    }

    /// Waits for the work enqueued on this backend's stream ([`Cuda::watch`]).
    fn wait(&self) -> Result<()> {
        match &self.watch {
            Some((h, limit)) => Ok(h.synchronize_within(self.stream(), *limit)?),
            None => drv(self.stream().synchronize()),
        }
    }

    /// Whether the TP collectives run on a stream of their own ([`Cuda::beside_stream`]).
    pub fn comm_apart(&self) -> bool {
        self.comm_apart
    }

    fn with_kernels(k: CudaKernels, rope: &Rope, max_pos: usize) -> Result<Self> {
        let (cos, sin) = crate::kernels::rope_tables(rope, max_pos);
        let s = k.stream().clone();
        Ok(Cuda {
            cos: drv(s.clone_htod(&cos))?,
            sin: drv(s.clone_htod(&sin))?,
            k,
            max_pos,
            scratch: Mutex::new(HashMap::new()),
            recording: Mutex::new(None),
            comm_apart: false,
            watch: None,
        })
    }

    /// The stream every operation goes on; an NCCL TP communicator must be bound to it
    /// (`Communicator::init_rank_on(stream, ..)`).
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.k.stream()
    }

    /// Copies a host weight to the device as bf16 ([`weight_to_bf16`]).
    pub fn upload_weight(&self, w: Weight) -> Result<DeviceWeight> {
        let (rows, cols, data) = weight_to_bf16(w);
        Ok(DeviceWeight {
            data: drv(self.stream().clone_htod(&data))?,
            rows,
            cols,
        })
    }

    /// Copies a norm vector to the device (f32).
    pub fn upload_norm(&self, v: Vec<f32>) -> Result<CudaSlice<f32>> {
        drv(self.stream().clone_htod(&v))
    }

    /// The NCCL communicator of `tp`, checked to run on this backend's stream (`None` for a group of one).
    fn nccl<'a>(&self, tp: &'a DeviceTp) -> Result<Option<&'a nccl::Communicator>> {
        match tp {
            DeviceTp::Single => Ok(None),
            DeviceTp::Nccl(c) => {
                let c = c.nccl_communicator().ok_or_else(|| {
                    EngineError::Config("the CUDA engine's TP communicator is not an NCCL communicator".into())
                })?;
                check_comm_stream(self.comm_apart, c.stream()?, self.stream())?;
                Ok(Some(c))
            }
        }
    }

    /// `out[0..n * w.rows]` (rows `stride` apart) `= W · x` through a bf16 copy of `x`.
    fn gemm(
        &self,
        w: &DeviceWeight,
        x: &CudaSlice<f32>,
        n: usize,
        out: &mut CudaSlice<f32>,
        stride: usize,
    ) -> Result<()> {
        let len = x.len();
        let taken = self.scratch.lock().expect("scratch lock").remove(&len);
        let mut xb = match taken {
            Some(b) => b,
            // Made inside a recording, the buffer would be the graph's memory, yet kept here after it.
            None if self.is_recording() => {
                return Err(EngineError::Config(format!(
                    "a linear input of {len} values while recording a CUDA graph: no eager step of this shape \
                     ran before the recording"
                )))
            }
            None => drv(self.stream().alloc_zeros::<bf16>(len))?,
        };
        let r = cuda(self.k.cast_bf16(x, &mut xb))
            .and_then(|()| cuda(self.k.linear_bf16_f32(&xb, n, &w.data, w.rows, w.cols, out, stride)));
        self.scratch.lock().expect("scratch lock").insert(len, xb);
        r
    }

    fn is_recording(&self) -> bool {
        self.recording.lock().expect("recording lock").is_some()
    }

    /// Calls `f` with the positions of rows `rows` of `step` (all rows for `None`): the step's own, or those
    /// of the recording's input buffer while it is recorded.
    fn with_positions<R>(
        &self,
        step: &CudaStep,
        rows: Option<&Range<usize>>,
        f: impl FnOnce(Positions<'_>) -> Result<R>,
    ) -> Result<R> {
        fn pick<'p>(p: &'p PositionsBuf, rows: Option<&Range<usize>>) -> Result<Positions<'p>> {
            match rows {
                None => Ok(p.all()),
                Some(r) => p.rows(r.clone()).ok_or_else(|| run_error(r)),
            }
        }
        match &step.positions {
            Some(p) => f(pick(p, rows)?),
            None => {
                let rec = self.recording.lock().expect("recording lock");
                let rec = rec
                    .as_ref()
                    .ok_or_else(|| EngineError::Config("a recorded step used after its recording ended".into()))?;
                f(pick(&rec.positions, rows)?)
            }
        }
    }

    /// The `(device address, length)` of `x`, as [`RecordedShape`] compares them.
    fn address<T>(&self, x: &CudaSlice<T>) -> (u64, usize) {
        let (ptr, _sync) = x.device_ptr(self.stream());
        (ptr, x.len())
    }

    fn cache_address(&self, c: &DeviceCache) -> (u64, usize) {
        (c.k.first().map_or(0, |k| self.address(k).0), c.max_seq)
    }

    fn attention_shape(&self, d: &AttnDims, rows: usize, max_seq: usize) -> AttentionShape {
        AttentionShape {
            rows,
            row_stride: d.qkv_width(),
            q_heads: d.q_heads,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim,
            max_seq,
            group: d.group,
            q_start: d.q_start,
            kv_start: d.kv_start,
        }
    }
}

fn run_error(r: &Range<usize>) -> EngineError {
    EngineError::Config(format!("rows {r:?} lie outside the step"))
}

/// A step's rows as runs of consecutive rows of one segment, `(segment, rows)`, in row order: the KV append and
/// attention kernels work on one sequence's cache at a time. Fails on a row whose segment is not one of
/// `segments` or rows and positions of different lengths.
pub fn segment_runs(rows: &StepRows, segments: usize) -> Result<Vec<(usize, Range<usize>)>> {
    if rows.seg_of.len() != rows.pos_of.len() {
        return Err(EngineError::Config(format!(
            "a step has {} rows but {} positions",
            rows.seg_of.len(),
            rows.pos_of.len()
        )));
    }
    let mut runs: Vec<(usize, Range<usize>)> = Vec::new();
    for (t, &seg) in rows.seg_of.iter().enumerate() {
        if seg >= segments {
            return Err(EngineError::Config(format!(
                "row {t} belongs to segment {seg}, but the step has {segments} sequence(s)"
            )));
        }
        match runs.last_mut() {
            Some((s, r)) if *s == seg => r.end = t + 1,
            _ => runs.push((seg, t..t + 1)),
        }
    }
    Ok(runs)
}

impl Compute for Cuda {
    type Act = CudaSlice<f32>;
    type ActBuf = CudaSlice<f32>;
    type Weight = DeviceWeight;
    type Norm = CudaSlice<f32>;
    type Cache = DeviceCache;
    type Step = CudaStep;
    type Tp = DeviceTp;
    type Graph = CudaGraph;

    fn act_len(x: &CudaSlice<f32>) -> usize {
        x.len()
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        drv(self.stream().alloc_zeros::<f32>(len))
    }

    fn new_cache(&self, layers: usize, kv_heads: usize, head_dim: usize, max_seq: usize) -> Result<DeviceCache> {
        if max_seq > self.max_pos {
            return Err(EngineError::Config(format!(
                "a KV cache of {max_seq} positions exceeds the rotary tables of the CUDA engine ({} positions)",
                self.max_pos
            )));
        }
        let per = kv_heads * max_seq * head_dim;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(self.alloc(per)?);
            v.push(self.alloc(per)?);
        }
        Ok(DeviceCache { k, v, max_seq, len: 0 })
    }

    fn cache_len(c: &DeviceCache) -> usize {
        c.len
    }

    fn cache_capacity(c: &DeviceCache) -> usize {
        c.max_seq
    }

    fn cache_advance(c: &mut DeviceCache, n: usize) {
        c.len += n;
    }

    fn embed(&self, table: &DeviceWeight, tokens: &[u32], rows: Range<usize>, hidden: usize) -> Result<CudaSlice<f32>> {
        if table.rows != rows.len() || table.cols != hidden {
            return Err(EngineError::Config(format!(
                "embed: a table of {} × {} for vocabulary rows {rows:?} of width {hidden}",
                table.rows, table.cols
            )));
        }
        let shape = EmbedShape {
            tokens: tokens.len(),
            hidden,
            row_start: rows.start,
            rows: rows.len(),
        };
        let mut out = self.alloc(tokens.len() * hidden)?;
        let rec = self.recording.lock().expect("recording lock");
        match rec.as_ref() {
            // Recorded: the ids are the recording's input buffer, rewritten before each launch.
            Some(r) => {
                let ids = r.ids.as_ref().filter(|_| r.inputs.tokens == tokens).ok_or_else(|| {
                    EngineError::Config(format!(
                        "a recorded step embeds tokens {tokens:?}, but the recording was given {:?}",
                        r.inputs.tokens
                    ))
                })?;
                cuda(self.k.embed::<bf16>(&shape, &table.data, ids, &mut out))?;
            }
            None => {
                drop(rec);
                let ids = drv(self.stream().clone_htod(tokens))?;
                cuda(self.k.embed::<bf16>(&shape, &table.data, &ids, &mut out))?;
            }
        }
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, eps: f32, out: &mut CudaSlice<f32>) -> Result<()> {
        let dim = w.len();
        let shape = RmsNormShape {
            rows: x.len().checked_div(dim).unwrap_or(0),
            dim,
            eps,
        };
        cuda(self.k.rms_norm::<f32>(&shape, x, w, out))
    }

    fn rms_norm_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: &[usize],
        w: &CudaSlice<f32>,
        eps: f32,
        h: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let mut picked = self.alloc(rows.len() * h)?;
        for (i, &r) in rows.iter().enumerate() {
            let src = x.slice(r * h..(r + 1) * h);
            let mut dst = picked.slice_mut(i * h..(i + 1) * h);
            drv(self.stream().memcpy_dtod(&src, &mut dst))?;
        }
        self.rms_norm(&picked, w, eps, out)
    }

    fn linear(
        &self,
        w: &DeviceWeight,
        x: &CudaSlice<f32>,
        n: usize,
        out: &mut CudaSlice<f32>,
        _decode_rows: usize,
    ) -> Result<()> {
        // cuBLAS computes each output column independently of the others: batching changes no row's result
        // beyond what the chosen GEMM algorithm does, which is why there is one path here.
        self.gemm(w, x, n, out, w.rows)
    }

    fn begin_step(&self, _rope: &Rope, rows: &StepRows) -> Result<CudaStep> {
        // Segments are checked against the caches in rope_kv_append and attention.
        let runs = segment_runs(rows, usize::MAX)?;
        if let Some(r) = self.recording.lock().expect("recording lock").as_ref() {
            if r.inputs.positions != rows.pos_of {
                return Err(EngineError::Config(format!(
                    "a recorded step at positions {:?}, but the recording was given {:?}",
                    rows.pos_of, r.inputs.positions
                )));
            }
            return Ok(CudaStep { positions: None, runs });
        }
        let positions = positions_u32(&rows.pos_of)?;
        Ok(CudaStep {
            positions: Some(cuda(self.k.upload_positions(&positions))?),
            runs,
        })
    }

    fn rope_kv_append(
        &self,
        _rope: &Rope,
        step: &CudaStep,
        rows: &StepRows,
        d: &AttnDims,
        li: usize,
        qkv: &mut CudaSlice<f32>,
        segs: &mut [(usize, &mut DeviceCache)],
    ) -> Result<()> {
        let n = rows.pos_of.len();
        let rope = RopeShape {
            rows: n,
            row_stride: d.qkv_width(),
            heads: d.q_heads + d.kv_heads,
            half: d.head_dim / 2,
            max_pos: self.max_pos,
        };
        self.with_positions(step, None, |pos| {
            cuda(self.k.rope(&rope, qkv, &self.cos, &self.sin, &pos))
        })?;
        let w = d.qkv_width();
        for (seg, r) in &step.runs {
            let n_segs = segs.len();
            let cache = &mut *segs
                .get_mut(*seg)
                .ok_or_else(|| EngineError::Config(format!("segment {seg} of a step with {n_segs} cache(s)")))?
                .1;
            let shape = self.attention_shape(d, r.len(), cache.max_seq);
            let (k, v) = (&mut cache.k[li], &mut cache.v[li]);
            let rows_qkv = qkv.slice(r.start * w..r.end * w);
            self.with_positions(step, Some(r), |pos| {
                cuda(self.k.kv_append::<f32>(&shape, &rows_qkv, k, v, &pos))
            })?;
        }
        Ok(())
    }

    fn attention(
        &self,
        step: &mut CudaStep,
        rows: &StepRows,
        d: &AttnDims,
        li: usize,
        qkv: &CudaSlice<f32>,
        segs: &[(usize, &mut DeviceCache)],
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (w, ow) = (d.qkv_width(), d.q_heads * d.head_dim);
        if out.len() != rows.pos_of.len() * ow {
            return Err(EngineError::Config(format!(
                "attention output of {} values for {} rows of {ow}",
                out.len(),
                rows.pos_of.len()
            )));
        }
        for (seg, r) in &step.runs {
            let cache = &*segs
                .get(*seg)
                .ok_or_else(|| EngineError::Config(format!("segment {seg} of a step with {} cache(s)", segs.len())))?
                .1;
            let shape = self.attention_shape(d, r.len(), cache.max_seq);
            let rows_qkv = qkv.slice(r.start * w..r.end * w);
            let mut rows_out = out.slice_mut(r.start * ow..r.end * ow);
            self.with_positions(step, Some(r), |pos| {
                cuda(
                    self.k
                        .attention::<f32>(&shape, &rows_qkv, &cache.k[li], &cache.v[li], &pos, &mut rows_out),
                )
            })?;
        }
        Ok(())
    }

    fn silu_mul(&self, gu: &CudaSlice<f32>, rows: usize, ffn: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        cuda(self.k.silu_mul::<f32>(&SiluMulShape { rows, ffn }, gu, out))
    }

    fn residual_add(&self, x: &mut CudaSlice<f32>, delta: &CudaSlice<f32>) -> Result<()> {
        cuda(self.k.residual_add::<f32>(x, delta))
    }

    fn head(
        &self,
        w: &DeviceWeight,
        normed: &CudaSlice<f32>,
        m: usize,
        mine: usize,
        stride: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if w.rows != mine {
            return Err(EngineError::Config(format!(
                "LM head: {} rows on the device, {mine} expected",
                w.rows
            )));
        }
        self.gemm(w, normed, m, out, stride)
    }

    fn all_reduce_sum(&self, tp: &DeviceTp, buf: &mut CudaSlice<f32>) -> Result<()> {
        match self.nccl(tp)? {
            None => Ok(()),
            Some(c) => Ok(Collectives::all_reduce_in_place::<f32>(c, buf, ReduceOp::Sum)?),
        }
    }

    fn all_gather(&self, tp: &DeviceTp, send: &CudaSlice<f32>, recv: &mut CudaSlice<f32>) -> Result<()> {
        match self.nccl(tp)? {
            None => {
                if recv.len() != send.len() {
                    return Err(EngineError::Comm(nccl::Error::LengthMismatch {
                        op: "all_gather",
                        what: "recv buffer",
                        expected: send.len(),
                        actual: recv.len(),
                    }));
                }
                drv(self.stream().memcpy_dtod(send, recv))
            }
            Some(c) => Ok(Collectives::all_gather::<f32>(c, send, recv)?),
        }
    }

    fn with_host<R>(&self, x: &CudaSlice<f32>, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        // Bounded wait first: a copy back into pageable memory would block until the work before it is done.
        self.wait()?;
        let host = drv(self.stream().clone_dtoh(x))?;
        drv(self.stream().synchronize())?;
        Ok(f(&host))
    }

    fn send(&self, pp: &dyn Comm, x: &CudaSlice<f32>, peer: usize) -> Result<()> {
        let host = self.with_host(x, <[f32]>::to_vec)?;
        Ok(pp.send(&host, peer)?)
    }

    fn recv(&self, pp: &dyn Comm, len: usize, peer: usize) -> Result<CudaSlice<f32>> {
        let mut host = vec![0.0f32; len];
        pp.recv(&mut host, peer)?;
        drv(self.stream().clone_htod(&host))
    }

    fn records_graphs(&self) -> bool {
        true
    }

    /// Records `f` into a CUDA graph (stream capture in thread-local mode, NCCL collectives included). The
    /// inputs are copied to buffers of the graph first. Buffers `f` allocates and drops become the graph's
    /// own memory (stream-ordered allocation nodes, at fixed addresses for every launch), so the device must
    /// support `cuMemAllocAsync`; `cache` and `out`, made before, are used in place. A linear input of a
    /// shape no eager step has seen is refused (its bf16 scratch would outlive the graph's memory).
    fn graph_record(
        &self,
        inputs: &GraphInputs,
        cache: &mut DeviceCache,
        out: &mut CudaSlice<f32>,
        f: impl FnOnce(&mut DeviceCache, &mut CudaSlice<f32>) -> Result<()>,
    ) -> Result<CudaGraph> {
        if !self.stream().context().has_async_alloc() {
            return Err(EngineError::Config(
                "--cuda-graph: this device has no stream-ordered allocator (cuMemAllocAsync), which recording \
                 the decode step needs"
                    .into(),
            ));
        }
        if inputs.tokens.is_empty() && inputs.positions.is_empty() {
            return Err(EngineError::Config("a CUDA graph of a step without rows".into()));
        }
        if self.comm_apart {
            return Err(EngineError::Config(
                "--cuda-graph with the collectives on their own stream (--overlap-comm): the recording holds \
                 one stream's work"
                    .into(),
            ));
        }
        let positions = positions_u32(&inputs.positions)?;
        let shape = RecordedShape {
            tokens: inputs.tokens.len(),
            rows: inputs.positions.len(),
            cache: self.cache_address(cache),
            out: self.address(out),
            max_pos: self.max_pos,
        };
        shape.check_launch(inputs, shape.cache, shape.out)?;
        let ids = match inputs.tokens.is_empty() {
            true => None,
            false => Some(drv(self.stream().clone_htod(&inputs.tokens))?),
        };
        let rec = Recording {
            inputs: inputs.clone(),
            ids,
            positions: cuda(self.k.upload_positions(&positions))?,
        };
        // The copies above must not be in flight when the capture opens: it records only what follows.
        self.wait()?;
        *self.recording.lock().expect("recording lock") = Some(rec);
        // SAFETY: one thread drives this device (a rank per GPU, `device_for_rank`) and every buffer of the
        // engine is used on this one stream, so nothing relies on cudarc's event tracking while it is off.
        let captured =
            match unsafe { nccl::graph::Capture::begin(self.stream(), nccl::graph::CaptureMode::ThreadLocal) } {
                Ok(capture) => {
                    let r = f(cache, out);
                    // Ended (or, on an error, abandoned) before the recording's buffers are taken back.
                    match r {
                        Ok(()) => capture.end().map_err(EngineError::from),
                        Err(e) => {
                            drop(capture);
                            Err(e)
                        }
                    }
                }
                Err(e) => Err(EngineError::from(e)),
            };
        let rec = self
            .recording
            .lock()
            .expect("recording lock")
            .take()
            .expect("set above");
        Ok(CudaGraph {
            graph: captured?,
            ids: rec.ids,
            positions: rec.positions,
            shape,
        })
    }

    /// Rewrites the graph's inputs (stream order: after the previous launch has read them) and launches it.
    unsafe fn graph_replay(
        &self,
        g: &mut CudaGraph,
        inputs: &GraphInputs,
        cache: &mut DeviceCache,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let positions = g
            .shape
            .check_launch(inputs, self.cache_address(cache), self.address(out))?;
        if let Some(ids) = g.ids.as_mut() {
            drv(self.stream().memcpy_htod(&inputs.tokens, ids))?;
        }
        cuda(g.positions.rewrite(self.stream(), &positions))?;
        // SAFETY: the graph reads and writes `cache` and `out` (checked to be the recorded ones, borrowed
        // mutably for the launch, and the stream orders later uses after it), its own input buffers and
        // memory, this backend's scratch and tables (alive with `self`), and the weights and norms the
        // caller keeps alive (this function's contract). Every one of them is used on this stream only.
        unsafe { g.graph.launch() }?;
        Ok(())
    }
}

/// The TP communicator's stream `comm` against the engine's `compute` stream: the same one, or, with the
/// collectives apart ([`Cuda::beside_stream`]), another stream of the same context (the same device).
fn check_comm_stream(apart: bool, comm: &Arc<CudaStream>, compute: &Arc<CudaStream>) -> Result<()> {
    if !apart && !Arc::ptr_eq(comm, compute) {
        return Err(EngineError::Config(
            "the TP communicator's stream is not the CUDA engine's stream (bind it with \
             Communicator::init_rank_on(cuda.stream().clone(), ..))"
                .into(),
        ));
    }
    if apart && !Arc::ptr_eq(comm.context(), compute.context()) {
        return Err(EngineError::Config(
            "--overlap-comm: the TP communicator's stream belongs to another CUDA context than the engine's".into(),
        ));
    }
    Ok(())
}

/// Positions as the kernels read them.
fn positions_u32(pos: &[usize]) -> Result<Vec<u32>> {
    pos.iter()
        .map(|&p| u32::try_from(p).map_err(|_| EngineError::Config(format!("position {p} exceeds u32"))))
        .collect()
}

/// Moves a rank's host shard to device `ordinal`: the [`Cuda`] backend (kernels, rotary tables for the
/// model's context) and every weight uploaded as bf16 ([`Cuda::upload_weight`]), norms as f32. The shard's
/// layout is kept; the CPU decode path does not apply on the device.
pub fn upload(model: RankModel<Cpu>, ordinal: usize) -> Result<RankModel<Cuda>> {
    let backend = Cuda::new(ordinal, model.rope(), model.config().max_position_embeddings)?;
    upload_to(model, backend)
}

/// [`upload`] onto a backend made by the caller (e.g. [`Cuda::on_stream`]).
pub fn upload_to(model: RankModel<Cpu>, backend: Cuda) -> Result<RankModel<Cuda>> {
    model.to_backend(backend, |b, _, w| b.upload_weight(w), |b, v| b.upload_norm(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::Matrix;

    #[test]
    fn weights_round_to_bf16_with_their_shape() {
        let w = Weight::F32(Matrix::new(2, 3, vec![1.0, -2.5, 3.0e-3, 65504.0, 1.0 / 3.0, 0.0]));
        let (rows, cols, data) = weight_to_bf16(w);
        assert_eq!((rows, cols), (2, 3));
        let back: Vec<f32> = data.iter().map(|v| v.to_f32()).collect();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], -2.5);
        assert_eq!(back[5], 0.0);
        // bf16 keeps 8 significant bits: rounding to nearest is off by at most half an ulp, 2^-8 relative.
        for (a, b) in back.iter().zip([1.0f32, -2.5, 3.0e-3, 65504.0, 1.0 / 3.0, 0.0]) {
            assert!((a - b).abs() <= b.abs() / 256.0, "{a} vs {b}");
        }
    }

    #[test]
    fn one_gpu_per_rank() {
        assert_eq!(device_for_rank(1, 2, 2).unwrap(), 1);
        assert_eq!(device_for_rank(0, 1, 8).unwrap(), 0);
        let e = device_for_rank(0, 2, 1).unwrap_err().to_string();
        assert!(e.contains("2 rank(s)") && e.contains("only 1 device"), "{e}");
        let e = device_for_rank(0, 1, 0).unwrap_err().to_string();
        assert!(e.contains("no CUDA device"), "{e}");
    }

    #[test]
    fn a_step_splits_into_runs_of_one_sequence() {
        let rows = |seg_of: Vec<usize>| StepRows {
            pos_of: (0..seg_of.len()).collect(),
            seg_of,
        };
        assert_eq!(segment_runs(&rows(vec![0, 0, 0]), 1).unwrap(), [(0, 0..3)]);
        // The server's step: one decode row per running sequence, then prefill chunks.
        assert_eq!(
            segment_runs(&rows(vec![0, 1, 2, 2, 2, 3]), 4).unwrap(),
            [(0, 0..1), (1, 1..2), (2, 2..5), (3, 5..6)]
        );
        assert_eq!(
            segment_runs(&rows(vec![1, 0, 1]), 2).unwrap(),
            [(1, 0..1), (0, 1..2), (1, 2..3)]
        );
        assert!(segment_runs(&rows(vec![]), 0).unwrap().is_empty());
        let e = segment_runs(&rows(vec![0, 2]), 2).unwrap_err().to_string();
        assert!(e.contains("row 1 belongs to segment 2"), "{e}");
        let bad = StepRows {
            seg_of: vec![0, 0],
            pos_of: vec![3],
        };
        assert!(segment_runs(&bad, 1)
            .unwrap_err()
            .to_string()
            .contains("2 rows but 1 positions"));
    }

    /// The batched step as the CUDA backend runs it (KV append, then attention, once per run, on the rows of
    /// that run and the cache of its sequence), here through the kernels' CPU twins: each sequence's
    /// outputs equal those of the same sequence run alone, bit for bit.
    #[test]
    fn a_batched_step_by_runs_equals_each_sequence_alone() {
        use crate::kernels::{attention, kv_append};
        let (nq, nkv, hd, max_seq) = (4, 2, 8, 16);
        let w = (nq + 2 * nkv) * hd;
        let ow = nq * hd;
        let shape = |rows| AttentionShape {
            rows,
            row_stride: w,
            q_heads: nq,
            kv_heads: nkv,
            head_dim: hd,
            max_seq,
            group: nq / nkv,
            q_start: 0,
            kv_start: 0,
        };
        // Sequence 0 decodes at position 5 (5 positions cached), sequence 1 prefills positions 0..4,
        // sequence 2 decodes at position 2.
        let seg_of = vec![0, 1, 1, 1, 1, 2];
        let pos_of = vec![5, 0, 1, 2, 3, 2];
        let value = |i: usize| ((i * 7919 % 211) as f32 - 105.0) / 64.0;
        let qkv: Vec<f32> = (0..seg_of.len() * w).map(value).collect();
        let cached = |seg: usize| -> Vec<f32> { (0..nkv * max_seq * hd).map(|i| value(i * 3 + seg * 101)).collect() };
        let step = StepRows { seg_of, pos_of };
        let runs = segment_runs(&step, 3).unwrap();
        let positions: Vec<u32> = step.pos_of.iter().map(|&p| p as u32).collect();

        let mut caches: Vec<(Vec<f32>, Vec<f32>)> = (0..3).map(|s| (cached(s), cached(s + 7))).collect();
        let mut out = vec![0f32; step.pos_of.len() * ow];
        for (seg, r) in &runs {
            let (k, v) = &mut caches[*seg];
            kv_append(
                &shape(r.len()),
                &qkv[r.start * w..r.end * w],
                k,
                v,
                &positions[r.clone()],
            )
            .unwrap();
        }
        for (seg, r) in &runs {
            let (k, v) = &caches[*seg];
            let o = &mut out[r.start * ow..r.end * ow];
            attention(
                &shape(r.len()),
                &qkv[r.start * w..r.end * w],
                k,
                v,
                &positions[r.clone()],
                o,
            )
            .unwrap();
        }

        for (seg, done) in caches.iter().enumerate() {
            let mine: Vec<usize> = (0..step.seg_of.len()).filter(|&t| step.seg_of[t] == seg).collect();
            let rows_qkv: Vec<f32> = mine.iter().flat_map(|&t| qkv[t * w..(t + 1) * w].to_vec()).collect();
            let pos: Vec<u32> = mine.iter().map(|&t| positions[t]).collect();
            let (mut k, mut v) = (cached(seg), cached(seg + 7));
            let mut alone = vec![0f32; mine.len() * ow];
            kv_append(&shape(mine.len()), &rows_qkv, &mut k, &mut v, &pos).unwrap();
            attention(&shape(mine.len()), &rows_qkv, &k, &v, &pos, &mut alone).unwrap();
            let batched: Vec<f32> = mine.iter().flat_map(|&t| out[t * ow..(t + 1) * ow].to_vec()).collect();
            assert_eq!(batched, alone, "sequence {seg}");
            assert_eq!((&done.0, &done.1), (&k, &v), "sequence {seg}'s cache");
        }
    }

    #[test]
    fn strided_linear_shapes() {
        let g = crate::cuda::linear_strided(2, 3, 4, 8, 12, 2 * 5, 5).unwrap();
        assert_eq!((g.m, g.n, g.k, g.lda, g.ldb, g.ldc), (3, 2, 4, 4, 4, 5));
        assert!(g.transpose_a);
        // Too small a stride, a wrong output length.
        assert!(crate::cuda::linear_strided(2, 3, 4, 8, 12, 4, 2).is_err());
        assert!(crate::cuda::linear_strided(2, 3, 4, 8, 12, 9, 5).is_err());
        // The strided GEMM's meaning: rows 5 apart, the padding untouched.
        let w: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let x: Vec<f32> = (0..8).map(|v| (v as f32) * 0.5).collect();
        let mut y = vec![-1.0f32; 10];
        crate::kernels::gemm_reference(&g, &w, &x, &mut y);
        for t in 0..2 {
            for r in 0..3 {
                let want: f32 = (0..4).map(|c| w[r * 4 + c] * x[t * 4 + c]).sum();
                assert_eq!(y[t * 5 + r], want);
            }
            assert_eq!(y[t * 5 + 3..t * 5 + 5], [-1.0, -1.0]);
        }
    }

    /// The host-side checks before each launch of a recorded decode step: the recorded cache and output
    /// buffer only, as many inputs as recorded, and positions inside the cache and the rotary tables.
    #[test]
    fn a_recorded_step_launches_only_over_what_it_was_recorded_with() {
        let shape = RecordedShape {
            tokens: 1,
            rows: 1,
            cache: (0x1000, 8),
            out: (0x2000, 64),
            max_pos: 6,
        };
        let inputs = |tokens: Vec<u32>, positions: Vec<usize>| GraphInputs { tokens, positions };
        let (cache, out) = (shape.cache, shape.out);
        assert_eq!(shape.check_launch(&inputs(vec![7], vec![3]), cache, out).unwrap(), [3]);
        assert_eq!(shape.check_launch(&inputs(vec![7], vec![5]), cache, out).unwrap(), [5]);
        let err = |i: GraphInputs, c, o| shape.check_launch(&i, c, o).unwrap_err().to_string();
        // The rotary tables (6) end before the cache (8).
        let e = err(inputs(vec![7], vec![6]), cache, out);
        assert!(e.contains("position 6 is past"), "{e}");
        let e = err(inputs(vec![7, 8], vec![3, 4]), cache, out);
        assert!(
            e.contains("recorded for 1 token(s) and 1 position(s) launched with 2 and 2"),
            "{e}"
        );
        let e = err(inputs(vec![7], vec![3]), (0x1000, 9), out);
        assert!(e.contains("another KV cache"), "{e}");
        let e = err(inputs(vec![7], vec![3]), (0x3000, 8), out);
        assert!(e.contains("another KV cache"), "{e}");
        let e = err(inputs(vec![7], vec![3]), cache, (0x2000, 32));
        assert!(e.contains("another output buffer"), "{e}");
    }

    /// Without a GPU (this host, CI) the backend fails with a typed error, never a panic.
    #[test]
    fn no_device_is_a_typed_error() {
        let rope = Rope::new(vec![1.0, 0.5]);
        match Cuda::new(0, &rope, 16) {
            Ok(c) => say!("a CUDA device is present: {c:?}"),
            Err(EngineError::Cuda(CudaError::Library { .. } | CudaError::NoDevice { .. })) => {}
            Err(e) => panic!("unexpected error without a GPU: {e}"),
        }
    }
}
