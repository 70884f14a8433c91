//! The benchmark loop, written once over [`PerfComm`] so the host and NCCL backends share it.
//!
//! Every rank runs [`run_rank`] on its own thread (`-t` × `-g` threads per process, as nccl-tests' `-t` mode
//! does). Rank 0 prints the table. Times and wrong-value counts are combined over ranks with the communicator
//! itself (an `f64` all-reduce), so the same code covers threads and processes.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nccl::{DataType, Elem, Error, ReduceOp, Result};

use super::cli::RootSel;
use super::data::{count_wrong, Recipe};
use super::device::PerfComm;
use super::format;
use super::ops::{CollOp, Counts};

/// Everything a rank needs to know to run the benchmark (the same on every rank).
#[derive(Clone, Debug)]
pub struct Plan {
    /// The operation.
    pub op: CollOp,
    /// Data types to run (already resolved from `-d all`).
    pub types: Vec<DataType>,
    /// Reductions to run (ignored by non-reducing operations).
    pub redops: Vec<ReduceOp>,
    /// `-r`.
    pub root: RootSel,
    /// The table's sizes in bytes.
    pub sizes: Vec<usize>,
    /// The warm-up sizes in bytes.
    pub warmup_sizes: Vec<usize>,
    /// `-n`.
    pub iters: usize,
    /// `-m`.
    pub agg_iters: usize,
    /// `-w`.
    pub warmup_iters: usize,
    /// `-G`: capture each timed loop (`-n × -m` operations) in a CUDA graph and launch it this many times
    /// (0: issue the operations directly).
    pub graph_launches: usize,
    /// `-c`.
    pub check: usize,
    /// `-z`.
    pub blocking: u32,
    /// `-C 1`.
    pub cputime: bool,
    /// `-a`.
    pub average: u32,
    /// Test hook: flip one element of one rank's out-of-place result before checking it (hidden; set by the
    /// binary from `NCCL_PERF_TEST_CORRUPT=1`).
    pub corrupt: bool,
    /// The header lines printed before the device lines (version, parameters); rank 0 prints them.
    pub preamble: String,
    /// `-T`: per-rank watch of in-flight operations (see [`Progress`]).
    pub progress: Option<std::sync::Arc<Progress>>,
}

/// One measured column group.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Measure {
    /// Time per operation in microseconds (host time per call with `-C 1`).
    pub time_us: f64,
    /// Algorithm bandwidth, GB/s.
    pub algbw: f64,
    /// Bus bandwidth, GB/s.
    pub busbw: f64,
    /// Wrong elements summed over ranks (`None` when the check is off).
    pub wrong: Option<u64>,
}

/// One table row.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Row {
    /// `size` column (bytes).
    pub size: usize,
    /// `count` column (elements).
    pub count: usize,
    /// `type` column.
    pub dtype: &'static str,
    /// `redop` column (`none` for data movement).
    pub redop: &'static str,
    /// `root` column (-1 for rootless operations).
    pub root: i64,
    /// Out-of-place measurement.
    pub out_of_place: Measure,
    /// In-place measurement, `None` when the operation has no in-place form.
    pub in_place: Option<Measure>,
}

/// What a rank returns: the rows (filled on rank 0) and the totals for the footer.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// The table, on rank 0 (other ranks keep it empty).
    pub rows: Vec<Row>,
    /// Wrong elements over every row, column and rank.
    pub wrong_total: u64,
    /// Mean bus bandwidth over every measured column.
    pub avg_busbw: f64,
    /// The `# Using devices` lines (rank 0).
    pub device_lines: Vec<String>,
}

/// In-flight watch for `-T`: each local rank records when its current operation started.
#[derive(Debug)]
pub struct Progress {
    epoch: Instant,
    busy_since_ms: Vec<AtomicU64>,
}

impl Progress {
    /// A watch for `slots` local ranks.
    pub fn new(slots: usize) -> Progress {
        Progress {
            epoch: Instant::now(),
            busy_since_ms: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn start(&self, slot: usize) {
        if let Some(s) = self.busy_since_ms.get(slot) {
            s.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn stop(&self, slot: usize) {
        if let Some(s) = self.busy_since_ms.get(slot) {
            s.store(0, Ordering::Relaxed);
        }
    }

    /// The longest time any local rank has been inside one operation (and which one), if any is busy.
    pub fn longest_busy(&self) -> Option<(usize, Duration)> {
        let now = self.now_ms();
        self.busy_since_ms
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let since = s.load(Ordering::Relaxed);
                (since != 0).then(|| (i, Duration::from_millis(now.saturating_sub(since))))
            })
            .max_by_key(|(_, d)| *d)
    }
}

const MODE_SUM: u32 = 4;

/// Combines `v` over ranks: 0 rank 0's value, 1 average, 2 minimum, 3 maximum, 4 sum.
pub fn combine<C: PerfComm>(comm: &C, v: f64, mode: u32) -> Result<f64> {
    let op = match mode {
        0 => return Ok(v),
        1 | MODE_SUM => ReduceOp::Sum,
        2 => ReduceOp::Min,
        _ => ReduceOp::Max,
    };
    let mut m = comm.alloc::<f64>(1)?;
    comm.fill(&mut m, |_| v)?;
    comm.all_reduce_in_place(C::buf_mut(&mut m), op)?;
    comm.synchronize()?;
    let r = comm.read(&m)?.first().copied().unwrap_or(v);
    Ok(if mode == 1 { r / comm.size() as f64 } else { r })
}

const LINE: usize = 256;

/// Gathers every rank's device line on every rank (an all-gather of fixed 256-byte records).
fn gather_device_lines<C: PerfComm>(comm: &C, pid: u32, host: &str) -> Result<Vec<String>> {
    let info = comm.device_info();
    let line = format::device_line(comm.rank(), pid, host, info.index, info.pci, &info.name);
    let mut bytes = line.into_bytes();
    bytes.truncate(LINE - 1);
    let mut send = comm.alloc::<u8>(LINE)?;
    comm.fill(&mut send, |i| bytes.get(i).copied().unwrap_or(0))?;
    let mut recv = comm.alloc::<u8>(LINE * comm.size())?;
    comm.all_gather(C::buf(&send), C::buf_mut(&mut recv))?;
    comm.synchronize()?;
    let all = comm.read(&recv)?;
    Ok(all
        .chunks(LINE)
        .map(|c| {
            let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
            String::from_utf8_lossy(&c[..end]).into_owned()
        })
        .collect())
}

/// This machine's host name (for the device lines).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn out_err(e: std::io::Error) -> Error {
    Error::io("nccl-perf output", e)
}

/// Runs the whole benchmark on one rank. Rank 0 writes the table to `out` (the header first, rows as they
/// complete, no footer: see [`format::footer`]). Every rank must call this with the same plan.
pub fn run_rank<C: PerfComm>(
    comm: &C,
    plan: &Plan,
    slot: usize,
    mut out: Option<&mut (dyn Write + 'static)>,
) -> Result<Summary> {
    let lines = gather_device_lines(comm, std::process::id(), &hostname())?;
    let mut summary = Summary::default();
    if comm.rank() == 0 {
        if let Some(w) = out.as_deref_mut() {
            let mut text = plan.preamble.clone();
            text += "# Using devices\n";
            text.extend(lines.iter().map(String::as_str));
            text += &format::result_header(plan.cputime);
            w.write_all(text.as_bytes()).map_err(out_err)?;
            w.flush().map_err(out_err)?;
        }
        summary.device_lines = lines;
    }
    let mut state = RankState {
        slot,
        rep: 0,
        bw_sum: 0.0,
        bw_count: 0,
    };
    for &dt in &plan.types {
        let redops: Vec<Option<ReduceOp>> = if plan.op.is_reduction() {
            plan.redops.iter().copied().map(Some).collect()
        } else {
            vec![None]
        };
        let roots: Vec<i64> = if !plan.op.has_root() {
            vec![-1]
        } else {
            match plan.root {
                RootSel::All => (0..comm.size() as i64).collect(),
                RootSel::One(r) => {
                    nccl::counts::check_rank(plan.op.name(), "root", r, comm.size())?;
                    vec![r as i64]
                }
            }
        };
        for &redop in &redops {
            for &root in &roots {
                let rows = dispatch(comm, plan, dt, redop, root, &mut state, out.as_deref_mut())?;
                for row in rows {
                    summary.wrong_total += row.out_of_place.wrong.unwrap_or(0);
                    summary.wrong_total += row.in_place.and_then(|m| m.wrong).unwrap_or(0);
                    if comm.rank() == 0 {
                        summary.rows.push(row);
                    }
                }
            }
        }
    }
    summary.avg_busbw = if state.bw_count > 0 {
        state.bw_sum / state.bw_count as f64
    } else {
        0.0
    };
    Ok(summary)
}

struct RankState {
    slot: usize,
    rep: u64,
    bw_sum: f64,
    bw_count: usize,
}

fn dispatch<C: PerfComm>(
    comm: &C,
    plan: &Plan,
    dt: DataType,
    redop: Option<ReduceOp>,
    root: i64,
    st: &mut RankState,
    out: Option<&mut (dyn Write + 'static)>,
) -> Result<Vec<Row>> {
    macro_rules! go {
        ($t:ty) => {
            run_type::<C, $t>(comm, plan, redop, root, st, out)
        };
    }
    match dt {
        DataType::Int8 => go!(i8),
        DataType::Uint8 => go!(u8),
        DataType::Int32 => go!(i32),
        DataType::Uint32 => go!(u32),
        DataType::Int64 => go!(i64),
        DataType::Uint64 => go!(u64),
        DataType::Float16 => go!(half::f16),
        DataType::Float32 => go!(f32),
        DataType::Float64 => go!(f64),
        DataType::Bfloat16 => go!(half::bf16),
        DataType::Float8e4m3 => go!(float8::F8E4M3),
        DataType::Float8e5m2 => go!(float8::F8E5M2),
        other => Err(Error::invalid(
            "nccl-perf",
            format!("data type {other:?} is not supported"),
        )),
    }
}

/// The buffers of one rank for one size.
struct Bufs<C: PerfComm, T: Elem> {
    send: Option<C::Mem<T>>,
    recv: Option<C::Mem<T>>,
    inplace: Option<C::Mem<T>>,
}

fn run_type<C: PerfComm, T: Elem>(
    comm: &C,
    plan: &Plan,
    redop: Option<ReduceOp>,
    root: i64,
    st: &mut RankState,
    mut out: Option<&mut (dyn Write + 'static)>,
) -> Result<Vec<Row>> {
    let n = comm.size();
    let elt = T::DATA_TYPE.size();
    let op = plan.op;
    let root_u = root.max(0) as usize;
    let redop_v = redop.unwrap_or(ReduceOp::Sum);
    comm.barrier()?;
    // Warm-up: every size from -b to -e doubling, out of place.
    for &size in plan.warmup_sizes.iter().filter(|_| plan.warmup_iters > 0) {
        let counts = op.counts(size / elt, elt, n);
        let mut bufs = alloc_bufs::<C, T>(comm, op, counts, root_u, false)?;
        for _ in 0..plan.warmup_iters {
            issue(comm, op, &mut bufs, false, redop_v, root_u)?;
        }
        sync(comm, plan, st.slot)?;
    }
    let recipe = Recipe::new(T::DATA_TYPE, redop, n);
    let mut rows = Vec::new();
    for &size in &plan.sizes {
        let counts = op.counts(size / elt, elt, n);
        let mut line = format::row_preamble(
            counts.size_bytes(elt),
            counts.param,
            T::DATA_TYPE.nccl_tests_name(),
            redop.map_or("none", ReduceOp::nccl_tests_name),
            root,
        );
        let oop = bench::<C, T>(comm, plan, st, counts, false, redop_v, root_u, &recipe)?;
        line += &body(&oop);
        let ip = if op.has_in_place() {
            let m = bench::<C, T>(comm, plan, st, counts, true, redop_v, root_u, &recipe)?;
            line += &body(&m);
            Some(m)
        } else {
            line += &format::row_body_not_applicable();
            None
        };
        if comm.rank() == 0 {
            if let Some(w) = out.as_deref_mut() {
                writeln!(w, "{line}").map_err(out_err)?;
                w.flush().map_err(out_err)?;
            }
        }
        rows.push(Row {
            size: counts.size_bytes(elt),
            count: counts.param,
            dtype: T::DATA_TYPE.nccl_tests_name(),
            redop: redop.map_or("none", ReduceOp::nccl_tests_name),
            root,
            out_of_place: oop,
            in_place: ip,
        });
    }
    Ok(rows)
}

fn body(m: &Measure) -> String {
    format::row_body(m.time_us, m.algbw, m.busbw, m.wrong)
}

fn sync<C: PerfComm>(comm: &C, plan: &Plan, slot: usize) -> Result<()> {
    let r = comm.synchronize();
    if let Some(p) = &plan.progress {
        p.stop(slot);
    }
    r
}

fn mark(plan: &Plan, slot: usize) {
    if let Some(p) = &plan.progress {
        p.start(slot);
    }
}

/// Which ranks pass a send / receive buffer out of place (NCCL ignores the others).
fn has_send(op: CollOp, rank: usize, root: usize) -> bool {
    !matches!(op, CollOp::Broadcast | CollOp::Scatter) || rank == root
}

fn has_recv(op: CollOp, rank: usize, root: usize) -> bool {
    !matches!(op, CollOp::Reduce | CollOp::Gather) || rank == root
}

fn inplace_len(op: CollOp, c: Counts) -> usize {
    match op {
        CollOp::AllGather => c.recv,
        CollOp::ReduceScatter => c.send,
        _ => c.send,
    }
}

fn alloc_bufs<C: PerfComm, T: Elem>(
    comm: &C,
    op: CollOp,
    c: Counts,
    root: usize,
    in_place: bool,
) -> Result<Bufs<C, T>> {
    let r = comm.rank();
    if in_place {
        return Ok(Bufs {
            send: None,
            recv: None,
            inplace: Some(comm.alloc::<T>(inplace_len(op, c))?),
        });
    }
    Ok(Bufs {
        send: if has_send(op, r, root) {
            Some(comm.alloc::<T>(c.send)?)
        } else {
            None
        },
        recv: if has_recv(op, r, root) {
            Some(comm.alloc::<T>(c.recv)?)
        } else {
            None
        },
        inplace: None,
    })
}

fn missing(what: &str) -> Error {
    Error::invalid("nccl-perf", format!("internal: {what} buffer missing"))
}

/// Issues one operation on this rank's buffers.
fn issue<C: PerfComm, T: Elem>(
    comm: &C,
    op: CollOp,
    b: &mut Bufs<C, T>,
    in_place: bool,
    redop: ReduceOp,
    root: usize,
) -> Result<()> {
    let (r, n) = (comm.rank(), comm.size());
    if in_place {
        let buf = C::buf_mut(b.inplace.as_mut().ok_or_else(|| missing("in-place"))?);
        return match op {
            CollOp::AllReduce => comm.all_reduce_in_place(buf, redop),
            CollOp::Broadcast => comm.broadcast_in_place(buf, root),
            CollOp::Reduce => comm.reduce_in_place(buf, redop, root),
            CollOp::AllGather => comm.all_gather_in_place(buf),
            CollOp::ReduceScatter => comm.reduce_scatter_in_place(buf, redop),
            other => Err(Error::invalid(other.name(), "has no in-place form")),
        };
    }
    let send = b.send.as_ref().map(|m| C::buf(m));
    let recv = b.recv.as_mut().map(|m| C::buf_mut(m));
    let need_send = || missing("send");
    match op {
        CollOp::AllReduce => comm.all_reduce(send.ok_or_else(need_send)?, recv.ok_or_else(|| missing("recv"))?, redop),
        CollOp::Broadcast => comm.broadcast(send, recv.ok_or_else(|| missing("recv"))?, root),
        CollOp::Reduce => comm.reduce(send.ok_or_else(need_send)?, recv, redop, root),
        CollOp::AllGather => comm.all_gather(send.ok_or_else(need_send)?, recv.ok_or_else(|| missing("recv"))?),
        CollOp::ReduceScatter => {
            comm.reduce_scatter(send.ok_or_else(need_send)?, recv.ok_or_else(|| missing("recv"))?, redop)
        }
        CollOp::AllToAll => comm.all_to_all(send.ok_or_else(need_send)?, recv.ok_or_else(|| missing("recv"))?),
        CollOp::Gather => comm.gather(send.ok_or_else(need_send)?, recv, root),
        CollOp::Scatter => comm.scatter(send, recv.ok_or_else(|| missing("recv"))?, root),
        CollOp::SendRecv => comm.send_recv(
            send.ok_or_else(need_send)?,
            (r + 1) % n,
            recv.ok_or_else(|| missing("recv"))?,
            (r + n - 1) % n,
        ),
    }
}

/// Fills inputs with `seed` and zeroes outputs, as nccl-tests' `*InitData`.
fn init_data<C: PerfComm, T: Elem>(
    comm: &C,
    op: CollOp,
    b: &mut Bufs<C, T>,
    c: Counts,
    recipe: &Recipe,
    root: usize,
    seed: u64,
) -> Result<()> {
    let r = comm.rank();
    if let Some(s) = b.send.as_mut() {
        comm.fill(s, |i| recipe.input::<T>(r, i, seed))?;
    }
    if let Some(v) = b.recv.as_mut() {
        comm.fill(v, |_| T::default())?;
    }
    if let Some(buf) = b.inplace.as_mut() {
        let own = c.param;
        match op {
            CollOp::Broadcast if r != root => comm.fill(buf, |_| T::default())?,
            CollOp::AllGather => comm.fill(buf, |i| {
                if i >= r * own && i < (r + 1) * own {
                    recipe.input::<T>(r, i - r * own, seed)
                } else {
                    T::default()
                }
            })?,
            _ => comm.fill(buf, |i| recipe.input::<T>(r, i, seed))?,
        }
    }
    Ok(())
}

/// Counts wrong elements in this rank's result. `corrupt` flips the first checked element first (test hook).
#[allow(clippy::too_many_arguments)]
fn verify<C: PerfComm, T: Elem>(
    comm: &C,
    op: CollOp,
    b: &Bufs<C, T>,
    c: Counts,
    in_place: bool,
    recipe: &Recipe,
    root: usize,
    seed: u64,
    corrupt: bool,
) -> Result<u64> {
    let (r, n) = (comm.rank(), comm.size());
    let per = c.param.max(1);
    let prev = (r + n - 1) % n;
    let want = |i: usize| -> f64 {
        match op {
            CollOp::AllReduce => recipe.reduced(i, seed),
            CollOp::Reduce if r == root => recipe.reduced(i, seed),
            CollOp::Reduce => recipe.value(r, i, seed),
            CollOp::Broadcast => recipe.value(root, i, seed),
            CollOp::AllGather | CollOp::Gather => recipe.value(i / per, i % per, seed),
            CollOp::ReduceScatter => recipe.reduced(r * c.param + i, seed),
            CollOp::AllToAll => recipe.value(i / per, r * c.param + i % per, seed),
            CollOp::Scatter => recipe.value(root, r * c.param + i, seed),
            CollOp::SendRecv => recipe.value(prev, i, seed),
        }
    };
    let (mem, range) = if in_place {
        let m = b.inplace.as_ref().ok_or_else(|| missing("in-place"))?;
        let range = match op {
            CollOp::ReduceScatter => r * c.param..(r + 1) * c.param,
            _ => 0..inplace_len(op, c),
        };
        (m, range)
    } else {
        match b.recv.as_ref() {
            Some(m) => (m, 0..c.recv),
            None => return Ok(0),
        }
    };
    let data = comm.read(mem)?;
    let mut data = data;
    if corrupt && !range.is_empty() {
        let w = want(0);
        data.to_mut()[range.start] = T::from_f64(if w == 0.0 { 1.0 } else { 0.0 });
    }
    let part = data.get(range.clone()).ok_or_else(|| missing("result"))?;
    Ok(count_wrong(recipe, part, want))
}

/// The timed loop's accounting, as nccl-tests' `BenchTime` does it: one pass issues `-n × -m` operations
/// (directly, or captured once into a graph); with `-G N` the graph runs `N` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timed {
    /// `-n`.
    pub iters: usize,
    /// `-m`.
    pub agg_iters: usize,
    /// `-G` (0: no graph).
    pub graph_launches: usize,
}

impl Timed {
    /// Operations in one pass of the loop: `-n × -m` (also the operations captured in the graph).
    pub fn ops_per_pass(&self) -> usize {
        self.iters * self.agg_iters
    }

    /// How many times the pass runs: the graph's launches with `-G`, else once.
    pub fn passes(&self) -> usize {
        self.graph_launches.max(1)
    }

    /// Operations the timed loop runs in all: `-n × -m × max(1, -G)`.
    pub fn ops_run(&self) -> usize {
        self.ops_per_pass() * self.passes()
    }

    /// Seconds per operation from the loop's completion time (first issue or launch until the stream is
    /// done): over every operation run, `-G` launches included.
    pub fn per_op(&self, elapsed_sec: f64) -> f64 {
        elapsed_sec / self.ops_run() as f64
    }

    /// The `-C 1` time: host seconds spent issuing (the calls, or with `-G` the `N` graph launches) over the
    /// operations of *one pass*. nccl-tests divides this by `-n × -m` only, not by the launches, so with
    /// `-G N` it is the host cost of all `N` launches per captured operation; kept as nccl-tests reports it.
    pub fn cpu_per_op(&self, host_sec: f64) -> f64 {
        host_sec / self.ops_per_pass() as f64
    }
}

/// The timed loop issuing the operations directly: returns (seconds per operation, `-C` host seconds per
/// operation), this rank's values.
fn timed_eager<C: PerfComm>(
    comm: &C,
    plan: &Plan,
    st: &RankState,
    timed: &Timed,
    issue: &mut dyn FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    let start = Instant::now();
    let mut coll_only = 0.0f64;
    mark(plan, st.slot);
    for _ in 0..plan.iters {
        let t0 = start.elapsed().as_secs_f64();
        for _ in 0..plan.agg_iters {
            issue()?;
            if plan.blocking != 0 {
                comm.synchronize()?;
            }
            if plan.blocking == 1 {
                comm.barrier()?;
            }
        }
        if plan.blocking == 3 {
            comm.synchronize()?;
            coll_only += start.elapsed().as_secs_f64() - t0;
            comm.barrier()?;
        }
    }
    let host = if plan.blocking == 3 {
        coll_only
    } else {
        start.elapsed().as_secs_f64()
    };
    sync(comm, plan, st.slot)?;
    let done = if plan.blocking == 3 {
        coll_only
    } else {
        start.elapsed().as_secs_f64()
    };
    Ok((timed.per_op(done), timed.cpu_per_op(host)))
}

/// The timed loop with `-G N`, as nccl-tests: capture one pass (`-n × -m` operations) into a graph on this
/// rank's stream, line every rank up, then time `N` launches of it until the stream is done. `-z` is 0 here
/// (the command line refuses the others with `-G`: a capturing stream cannot be waited for).
fn timed_graph<C: PerfComm>(
    comm: &C,
    plan: &Plan,
    st: &RankState,
    timed: &Timed,
    issue: &mut dyn FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    mark(plan, st.slot);
    let graph = comm.capture(&mut || {
        for _ in 0..timed.ops_per_pass() {
            issue()?;
        }
        Ok(())
    })?;
    comm.barrier()?;
    let start = Instant::now();
    for _ in 0..timed.graph_launches {
        // SAFETY: the buffers `issue` captured are borrowed by `issue`, which outlives `graph` (dropped below,
        // after `sync` waited for every launch).
        unsafe { comm.launch(&graph)? };
    }
    let host = start.elapsed().as_secs_f64();
    sync(comm, plan, st.slot)?;
    let done = start.elapsed().as_secs_f64();
    drop(graph);
    Ok((timed.per_op(done), timed.cpu_per_op(host)))
}

/// Measures one column (out-of-place or in-place) of one row.
#[allow(clippy::too_many_arguments)]
fn bench<C: PerfComm, T: Elem>(
    comm: &C,
    plan: &Plan,
    st: &mut RankState,
    counts: Counts,
    in_place: bool,
    redop: ReduceOp,
    root: usize,
    recipe: &Recipe,
) -> Result<Measure> {
    let op = plan.op;
    let n = comm.size();
    let elt = T::DATA_TYPE.size();
    let mut bufs = alloc_bufs::<C, T>(comm, op, counts, root, in_place)?;
    init_data(comm, op, &mut bufs, counts, recipe, root, 99)?;
    // One untimed call, then line everyone up.
    mark(plan, st.slot);
    issue(comm, op, &mut bufs, in_place, redop, root)?;
    sync(comm, plan, st.slot)?;
    comm.barrier()?;

    let timed = Timed {
        iters: plan.iters,
        agg_iters: plan.agg_iters,
        graph_launches: plan.graph_launches,
    };
    let (delta, cpu_sec) = if timed.graph_launches > 0 {
        timed_graph(comm, plan, st, &timed, &mut || {
            issue(comm, op, &mut bufs, in_place, redop, root)
        })?
    } else {
        timed_eager(comm, plan, st, &timed, &mut || {
            issue(comm, op, &mut bufs, in_place, redop, root)
        })?
    };
    let delta = combine(comm, delta, plan.average)?;
    let cpu_sec = if plan.cputime {
        combine(comm, cpu_sec, plan.average)?
    } else {
        cpu_sec
    };
    let (algbw, busbw) = op.bandwidth(counts.param, elt, delta, n);

    let mut wrong = None;
    if plan.check > 0 {
        let corrupt_rank = if matches!(op, CollOp::Reduce | CollOp::Gather) {
            root
        } else {
            n - 1
        };
        let mut total_wrong = 0.0;
        for _ in 0..plan.check {
            st.rep += 1;
            init_data(comm, op, &mut bufs, counts, recipe, root, st.rep)?;
            mark(plan, st.slot);
            if plan.graph_launches > 0 {
                // As nccl-tests: with -G the checked operation runs from a graph of its own, launched once.
                let graph = comm.capture(&mut || issue(comm, op, &mut bufs, in_place, redop, root))?;
                // SAFETY: the captured operation uses `bufs`, alive and untouched until `sync` below has
                // waited for it; `graph` is dropped at the end of this block.
                unsafe { comm.launch(&graph)? };
                sync(comm, plan, st.slot)?;
            } else {
                issue(comm, op, &mut bufs, in_place, redop, root)?;
                sync(comm, plan, st.slot)?;
            }
            let corrupt = plan.corrupt && !in_place && comm.rank() == corrupt_rank;
            let local = verify(comm, op, &bufs, counts, in_place, recipe, root, st.rep, corrupt)?;
            total_wrong = combine(comm, local as f64, MODE_SUM)?;
            if total_wrong > 0.0 {
                break;
            }
        }
        wrong = Some(total_wrong as u64);
    }
    st.bw_sum += busbw;
    st.bw_count += 1;
    let time_us = if plan.cputime { cpu_sec } else { delta } * 1.0e6;
    Ok(Measure {
        time_us,
        algbw,
        busbw,
        wrong,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-30)
    }

    #[test]
    fn eager_loop_accounting_is_per_issued_operation() {
        let t = Timed {
            iters: 20,
            agg_iters: 1,
            graph_launches: 0,
        };
        assert_eq!((t.ops_per_pass(), t.passes(), t.ops_run()), (20, 1, 20));
        assert!(close(t.per_op(0.002), 1.0e-4));
        assert!(close(t.cpu_per_op(0.001), 5.0e-5));
        let t = Timed { agg_iters: 4, ..t };
        assert_eq!(t.ops_run(), 80);
        assert!(close(t.per_op(0.008), 1.0e-4));
    }

    #[test]
    fn graph_loop_time_is_over_every_launch_and_cputime_over_one_graph() {
        // -n 20 -m 2 -G 5: 40 operations in the graph, launched 5 times: 200 operations timed.
        let t = Timed {
            iters: 20,
            agg_iters: 2,
            graph_launches: 5,
        };
        assert_eq!((t.ops_per_pass(), t.passes(), t.ops_run()), (40, 5, 200));
        assert!(close(t.per_op(0.02), 1.0e-4));
        // nccl-tests' -C with -G: the host time of the 5 launches over the 40 captured operations.
        assert!(close(t.cpu_per_op(0.0004), 1.0e-5));
        // -G 1 times the same number of operations as no graph.
        let one = Timed { graph_launches: 1, ..t };
        let none = Timed { graph_launches: 0, ..t };
        assert_eq!(one.ops_run(), none.ops_run());
        assert!(close(one.per_op(0.3), none.per_op(0.3)));
    }

    #[test]
    fn graph_mode_bandwidth_is_the_per_operation_formula() {
        // The same per-operation time gives the same algbw/busbw whether it came from a graph or not: 1 MiB
        // float all-reduce on 8 ranks, 5 launches of 10 operations in 0.05 s = 1 ms each.
        let t = Timed {
            iters: 10,
            agg_iters: 1,
            graph_launches: 5,
        };
        let per_op = t.per_op(0.05);
        assert!(close(per_op, 1.0e-3));
        let (alg, bus) = CollOp::AllReduce.bandwidth(262_144, 4, per_op, 8);
        assert!(close(alg, 1_048_576.0 / 1.0e-3 / 1.0e9), "{alg}");
        assert!(close(bus, alg * 2.0 * 7.0 / 8.0), "{bus}");
        let eager = Timed { graph_launches: 0, ..t };
        let (alg2, bus2) = CollOp::AllReduce.bandwidth(262_144, 4, eager.per_op(0.01), 8);
        assert!(close(alg2, alg) && close(bus2, bus), "{alg2} {bus2}");
    }

    #[test]
    fn progress_reports_the_longest_busy_rank() {
        let p = Progress::new(3);
        assert_eq!(p.longest_busy(), None);
        p.start(1);
        std::thread::sleep(Duration::from_millis(20));
        p.start(2);
        let (slot, busy) = p.longest_busy().unwrap();
        assert_eq!(slot, 1);
        assert!(busy >= Duration::from_millis(15), "{busy:?}");
        p.stop(1);
        p.stop(2);
        assert_eq!(p.longest_busy(), None);
        p.start(7); // out of range: ignored, never panics
    }
}
