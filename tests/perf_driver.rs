//! The generic driver against a test double: `SoloCommDouble`, a world-size-1 `Collectives` implementation
//! written here (not a backend), so the driver's loop, checks and table can be tested on their own.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use nccl::{Collectives, Elem, ReduceOp, Result};
use nccl_stack::perf::cli::{Cli, RootSel};
use nccl_stack::perf::device::{DeviceInfo, PerfComm};
use nccl_stack::perf::{run::make_plan, run_rank, CollOp};

/// TEST DOUBLE: one rank, host slices. With a single rank every collective is a copy (avg and mulsum scale).
/// `sabotage` makes all_reduce write a wrong first element, to prove the driver notices.
/// Its "graphs" (`-G`) are host bookkeeping only: a capture runs the operations as they are issued (no device
/// to defer them to) and remembers how many there were; a launch only counts. That is enough to check the
/// driver's graph accounting (what is captured, how often it is launched), not CUDA graphs.
struct SoloCommDouble {
    calls: AtomicUsize,
    sabotage: bool,
    /// Operations issued inside each capture, in order.
    captures: Mutex<Vec<usize>>,
    /// Graph launches, and the operations they stand for.
    launches: AtomicUsize,
    launched_ops: AtomicUsize,
}

/// TEST DOUBLE graph: how many operations its capture recorded.
struct CountedGraph {
    ops: usize,
}

impl SoloCommDouble {
    fn new(sabotage: bool) -> Self {
        SoloCommDouble {
            calls: AtomicUsize::new(0),
            sabotage,
            captures: Mutex::new(Vec::new()),
            launches: AtomicUsize::new(0),
            launched_ops: AtomicUsize::new(0),
        }
    }
    fn copy<T: Elem>(&self, src: &[T], dst: &mut [T], op: Option<ReduceOp>) -> Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if src.len() != dst.len() {
            return Err(nccl::Error::invalid("double", "length mismatch"));
        }
        for (d, s) in dst.iter_mut().zip(src) {
            *d = match op {
                Some(ReduceOp::PreMulSum(k)) => T::from_f64(s.to_f64() * k),
                _ => *s,
            };
        }
        Ok(())
    }
    fn scale<T: Elem>(&self, buf: &mut [T], op: ReduceOp) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let ReduceOp::PreMulSum(k) = op {
            buf.iter_mut().for_each(|x| *x = T::from_f64(x.to_f64() * k));
        }
    }
}

impl Collectives for SoloCommDouble {
    type Buf<T: Elem> = [T];
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn backend_name(&self) -> &'static str {
        "solo-test-double"
    }
    fn buf_len<T: Elem>(buf: &[T]) -> usize {
        buf.len()
    }
    fn all_reduce<T: Elem>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        self.copy(send, recv, Some(op))?;
        if self.sabotage && !recv.is_empty() {
            recv[0] = T::from_f64(recv[0].to_f64() + 1.0);
        }
        Ok(())
    }
    fn all_reduce_in_place<T: Elem>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.scale(buf, op);
        Ok(())
    }
    fn broadcast<T: Elem>(&self, send: Option<&[T]>, recv: &mut [T], _root: usize) -> Result<()> {
        self.copy(send.unwrap(), recv, None)
    }
    fn broadcast_in_place<T: Elem>(&self, _buf: &mut [T], _root: usize) -> Result<()> {
        Ok(())
    }
    fn reduce<T: Elem>(&self, send: &[T], recv: Option<&mut [T]>, op: ReduceOp, _root: usize) -> Result<()> {
        self.copy(send, recv.unwrap(), Some(op))
    }
    fn reduce_in_place<T: Elem>(&self, buf: &mut [T], op: ReduceOp, _root: usize) -> Result<()> {
        self.scale(buf, op);
        Ok(())
    }
    fn all_gather<T: Elem>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.copy(send, recv, None)
    }
    fn all_gather_in_place<T: Elem>(&self, _buf: &mut [T]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter<T: Elem>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        self.copy(send, recv, Some(op))
    }
    fn reduce_scatter_in_place<T: Elem>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.scale(buf, op);
        Ok(())
    }
    fn all_to_all<T: Elem>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.copy(send, recv, None)
    }
    fn gather<T: Elem>(&self, send: &[T], recv: Option<&mut [T]>, _root: usize) -> Result<()> {
        self.copy(send, recv.unwrap(), None)
    }
    fn scatter<T: Elem>(&self, send: Option<&[T]>, recv: &mut [T], _root: usize) -> Result<()> {
        self.copy(send.unwrap(), recv, None)
    }
    fn send<T: Elem>(&self, _buf: &[T], _peer: usize) -> Result<()> {
        unimplemented!("not used by nccl-perf")
    }
    fn recv<T: Elem>(&self, _buf: &mut [T], _peer: usize) -> Result<()> {
        unimplemented!("not used by nccl-perf")
    }
    fn send_recv<T: Elem>(&self, send: &[T], _dst: usize, recv: &mut [T], _src: usize) -> Result<()> {
        self.copy(send, recv, None)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

impl PerfComm for SoloCommDouble {
    type Mem<T: Elem> = Vec<T>;
    fn alloc<T: Elem>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); len])
    }
    fn fill<T: Elem, F: Fn(usize) -> T>(&self, mem: &mut Vec<T>, f: F) -> Result<()> {
        mem.iter_mut().enumerate().for_each(|(i, x)| *x = f(i));
        Ok(())
    }
    fn read<'a, T: Elem>(&self, mem: &'a Vec<T>) -> Result<Cow<'a, [T]>> {
        Ok(Cow::Borrowed(mem))
    }
    fn buf<T: Elem>(mem: &Vec<T>) -> &[T] {
        mem
    }
    fn buf_mut<T: Elem>(mem: &mut Vec<T>) -> &mut [T] {
        mem
    }
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            index: 0,
            pci: (0, 0, 0),
            name: "test double".into(),
        }
    }
    fn library_version(&self) -> String {
        "test".into()
    }
    type Graph = CountedGraph;
    fn capture(&self, issue: &mut dyn FnMut() -> Result<()>) -> Result<CountedGraph> {
        let before = self.calls.load(Ordering::Relaxed);
        issue()?;
        let ops = self.calls.load(Ordering::Relaxed) - before;
        self.captures.lock().unwrap().push(ops);
        Ok(CountedGraph { ops })
    }
    unsafe fn launch(&self, graph: &CountedGraph) -> Result<()> {
        self.launches.fetch_add(1, Ordering::Relaxed);
        self.launched_ops.fetch_add(graph.ops, Ordering::Relaxed);
        Ok(())
    }
}

fn run(args: &[&str], comm: &SoloCommDouble) -> (String, nccl_stack::perf::Summary) {
    let mut v = vec!["nccl-perf"];
    v.extend_from_slice(args);
    let cli = Cli::parse_and_check(v).unwrap();
    let plan = make_plan(&cli, comm, 1, "test", "double");
    let mut out: Vec<u8> = Vec::new();
    let summary = run_rank(comm, &plan, 0, Some(&mut out)).unwrap();
    (String::from_utf8(out).unwrap(), summary)
}

fn data_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn every_op_type_and_redop_checks_clean() {
    for op in CollOp::ALL {
        let comm = SoloCommDouble::new(false);
        let (text, sum) = run(
            &[
                op.name(),
                "-b",
                "64",
                "-e",
                "256",
                "-f",
                "2",
                "-n",
                "2",
                "-d",
                "all",
                "-o",
                "all",
            ],
            &comm,
        );
        assert_eq!(sum.wrong_total, 0, "{op}\n{text}");
        let rows = data_rows(&text);
        let per_type = if op.is_reduction() { 6 } else { 1 };
        assert_eq!(rows.len(), 3 * 12 * per_type, "{op}\n{text}");
        for r in &rows {
            assert_eq!(r.len(), 13, "{op}: {r:?}");
            assert_eq!(r[8], "0", "{op}: {r:?}");
            if op.has_in_place() {
                assert_eq!(r[12], "0", "{op}: {r:?}");
            } else {
                assert_eq!(&r[9..], ["N/A", "N/A", "N/A", "N/A"], "{op}: {r:?}");
            }
            assert_eq!(r[4], if op.has_root() { "0" } else { "-1" });
            if !op.is_reduction() {
                assert_eq!(r[3], "none");
            }
        }
        // The operation ran: warm-up + sync + timed + check per column at least.
        assert!(comm.calls.load(Ordering::Relaxed) > rows.len() * 4);
    }
}

#[test]
fn wrong_results_are_counted_per_row() {
    let comm = SoloCommDouble::new(true);
    let (text, sum) = run(&["all_reduce", "-b", "64", "-e", "128", "-f", "2", "-n", "1"], &comm);
    let rows = data_rows(&text);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r[8], "1", "{text}");
        assert_eq!(r[12], "0", "{text}");
    }
    assert_eq!(sum.wrong_total, 2);
}

#[test]
fn check_off_prints_na() {
    let comm = SoloCommDouble::new(true);
    let (text, sum) = run(&["all_reduce", "-b", "64", "-e", "64", "-n", "1", "-c", "0"], &comm);
    let rows = data_rows(&text);
    assert_eq!(rows[0][8], "N/A");
    assert_eq!(sum.wrong_total, 0);
}

#[test]
fn header_and_rows_shape() {
    let comm = SoloCommDouble::new(false);
    let (text, sum) = run(
        &[
            "broadcast",
            "-b",
            "8",
            "-e",
            "1K",
            "-f",
            "4",
            "-n",
            "1",
            "-r",
            "all",
            "-z",
            "1",
        ],
        &comm,
    );
    assert!(text.contains("# Collective test starting: broadcast_perf\n"), "{text}");
    assert!(
        text.contains("# nThread 1 nGpus 1 minBytes 8 maxBytes 1024 step: 4(factor)"),
        "{text}"
    );
    assert!(text.contains("# Blocking Enabled: wait and barrier after each inner iteration (-m) \n"));
    assert!(text.contains("#  Rank  0 Group  0 Pid "), "{text}");
    let sizes: Vec<_> = data_rows(&text).iter().map(|r| r[0].clone()).collect();
    assert_eq!(sizes, ["8", "32", "128", "512"]);
    assert_eq!(sum.rows.len(), 4);
    assert!(sum
        .rows
        .iter()
        .all(|r| r.root == 0 && r.redop == "none" && r.dtype == "float"));
    assert!(sum.avg_busbw > 0.0);
}

#[test]
fn root_out_of_range_is_an_error() {
    let comm = SoloCommDouble::new(false);
    let cli = Cli::parse_and_check(["nccl-perf", "reduce", "-r", "3", "-b", "8", "-e", "8"]).unwrap();
    assert_eq!(cli.root, RootSel::One(3));
    let plan = make_plan(&cli, &comm, 1, "test", "double");
    let err = run_rank(&comm, &plan, 0, None).unwrap_err();
    assert!(err.to_string().contains("root 3"), "{err}");
}

/// `-G N` as nccl-tests: per column, the timed loop's `-n × -m` operations are captured once and the graph is
/// launched `N` times; each check iteration captures its one operation and launches it once; the warm-up and
/// the untimed call before the loop are issued directly. Without `-G` nothing is captured.
#[test]
fn graph_mode_captures_the_timed_loop_once_and_launches_it_g_times() {
    let comm = SoloCommDouble::new(false);
    let (text, sum) = run(
        &[
            "all_reduce",
            "-b",
            "64",
            "-e",
            "64",
            "-n",
            "3",
            "-m",
            "2",
            "-G",
            "4",
            "-c",
            "2",
        ],
        &comm,
    );
    assert!(text.contains(" graph: 4 "), "{text}");
    assert_eq!(sum.wrong_total, 0, "{text}");
    let rows = data_rows(&text);
    assert_eq!(rows.len(), 1, "{text}");
    assert_eq!((rows[0][8].as_str(), rows[0][12].as_str()), ("0", "0"), "{text}");
    // Out of place then in place: the timed capture (3 × 2 ops), then both check iterations (-c 2 stops early
    // only on wrong values), one captured op each.
    assert_eq!(*comm.captures.lock().unwrap(), [6, 1, 1, 6, 1, 1]);
    assert_eq!(comm.launches.load(Ordering::Relaxed), 2 * (4 + 1 + 1));
    assert_eq!(comm.launched_ops.load(Ordering::Relaxed), 2 * (6 * 4 + 1 + 1));

    let eager = SoloCommDouble::new(false);
    let (text, _) = run(&["all_reduce", "-b", "64", "-e", "64", "-n", "3", "-m", "2"], &eager);
    assert!(text.contains(" graph: 0 "), "{text}");
    assert!(eager.captures.lock().unwrap().is_empty());
    assert_eq!(eager.launches.load(Ordering::Relaxed), 0);
}

/// A wrong result of the operation run through the check graph is still counted.
#[test]
fn graph_mode_still_counts_wrong_values() {
    let comm = SoloCommDouble::new(true);
    let (text, sum) = run(&["all_reduce", "-b", "64", "-e", "64", "-n", "1", "-G", "2"], &comm);
    assert_eq!(data_rows(&text)[0][8], "1", "{text}");
    assert_eq!(sum.wrong_total, 1);
}

/// The host backend's backstop for `-G` (the command line refuses it first): capture errors without issuing.
#[test]
fn host_backend_capture_is_refused_without_issuing() {
    let comms = nccl::host::HostComm::threads(1, nccl::host::HostOptions::default()).unwrap();
    let mut issued = 0;
    let err = comms[0]
        .capture(&mut || {
            issued += 1;
            Ok(())
        })
        .unwrap_err();
    assert!(err.to_string().contains("the host backend has no graphs"), "{err}");
    assert_eq!(issued, 0);
}
