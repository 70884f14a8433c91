//! Scripted runs of the host backend for the fault tests: each rank executes its own list of calls, every
//! result is checked exactly, and a script-level oracle says which calls must succeed and which must fail.
//!
//! The oracle: let `d` be the first step at which the ranks' calls differ (a mismatch) or some rank has
//! left (dropped, panicked, killed). Every call before `d` succeeds with the exact result on every rank;
//! every call from `d` on fails on every rank that makes it, within the timeout (plus a slack for a loaded
//! machine); at `d` a mismatch gives `InvalidArgument` on every rank and a departure gives `PeerFailed`
//! naming the rank that left. Buffers of calls that have returned are never written again.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use nccl::host::{HostComm, HostOptions};
use nccl::{Collectives, Error, ReduceOp};

/// One collective call of a script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Barrier,
    /// `all_reduce` (sum) of `count` elements, `f32` or (`int`) `i32`.
    AllReduce {
        count: usize,
        int: bool,
    },
    Broadcast {
        count: usize,
        root: usize,
    },
    Reduce {
        count: usize,
        root: usize,
    },
    AllGather {
        count: usize,
    },
    ReduceScatter {
        count: usize,
    },
    AllToAll {
        count: usize,
    },
}

/// How a rank leaves the script early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// Returns, dropping its communicator.
    Return,
    /// Panics (threads) or is killed with SIGKILL (processes).
    Crash,
}

/// One rank's part: its calls, and optionally the step before which it leaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub calls: Vec<Call>,
    pub leave: Option<(usize, Leave)>,
}

/// What one call gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The error's variant name and its text.
    Err {
        kind: String,
        text: String,
    },
    /// The call succeeded but the result was wrong (always a defect).
    Wrong(String),
}

/// The outcome of step `k` and how long the call took.
#[derive(Clone, Debug)]
pub struct Record {
    pub step: usize,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

fn kind_of(e: &Error) -> String {
    let dbg = format!("{e:?}");
    dbg.split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("")
        .to_string()
}

/// Input element `i` of rank `r` at step `k`: small integers, so every sum over 4 ranks is exact in f32.
fn v(k: usize, r: usize, i: usize) -> f32 {
    ((k * 31 + r * 7 + i) % 50) as f32
}

fn check(what: &str, got: &[f32], want: impl Fn(usize) -> f32) -> Outcome {
    match got.iter().enumerate().find(|(i, g)| **g != want(*i)) {
        None => Outcome::Ok,
        Some((i, g)) => Outcome::Wrong(format!("{what}: element {i} is {g}, want {}", want(i))),
    }
}

/// Buffers of a returned call (`(contents when it returned, the buffer itself)`).
struct Kept {
    step: usize,
    bufs: Vec<(Vec<f32>, Vec<f32>)>,
    ints: Vec<(Vec<i32>, Vec<i32>)>,
}

/// Runs step `k`'s call on `c`, checking the result exactly on success.
fn exec_one(c: &HostComm, k: usize, call: Call, kept: &mut Vec<Kept>) -> Outcome {
    let (r, n) = (c.rank(), c.size());
    let sum = |i: usize| (0..n).map(|j| v(k, j, i)).sum::<f32>();
    let mut keep = Kept {
        step: k,
        bufs: vec![],
        ints: vec![],
    };
    let res = match call {
        Call::Barrier => c.barrier().map(|_| Outcome::Ok),
        Call::AllReduce { count, int: false } => {
            let x: Vec<f32> = (0..count).map(|i| v(k, r, i)).collect();
            let mut out = vec![-1f32; count];
            let res = c.all_reduce(&x, &mut out, ReduceOp::Sum);
            let o = res.map(|_| check("all_reduce", &out, sum));
            keep.bufs.push((out.clone(), out));
            keep.bufs.push((x.clone(), x));
            o
        }
        Call::AllReduce { count, int: true } => {
            let x: Vec<i32> = (0..count).map(|i| v(k, r, i) as i32).collect();
            let mut out = vec![-1i32; count];
            let res = c.all_reduce(&x, &mut out, ReduceOp::Sum);
            let o = res.map(|_| {
                let got: Vec<f32> = out.iter().map(|&x| x as f32).collect();
                check("all_reduce(i32)", &got, sum)
            });
            keep.ints.push((out.clone(), out));
            keep.ints.push((x.clone(), x));
            o
        }
        Call::Broadcast { count, root } => {
            let x: Vec<f32> = (0..count).map(|i| v(k, r, i)).collect();
            let mut out = vec![-1f32; count];
            let res = c.broadcast((r == root).then_some(&x[..]), &mut out, root);
            let o = res.map(|_| check("broadcast", &out, |i| v(k, root, i)));
            keep.bufs.push((out.clone(), out));
            o
        }
        Call::Reduce { count, root } => {
            let x: Vec<f32> = (0..count).map(|i| v(k, r, i)).collect();
            let mut out = vec![-1f32; count];
            let res = c.reduce(&x, (r == root).then_some(&mut out[..]), ReduceOp::Sum, root);
            let o = res.map(|_| {
                if r == root {
                    check("reduce", &out, sum)
                } else {
                    check("reduce (non-root buffer)", &out, |_| -1.0)
                }
            });
            keep.bufs.push((out.clone(), out));
            o
        }
        Call::AllGather { count } => {
            let x: Vec<f32> = (0..count).map(|i| v(k, r, i)).collect();
            let mut out = vec![-1f32; n * count];
            let res = c.all_gather(&x, &mut out);
            let o = res.map(|_| check("all_gather", &out, |e| v(k, e / count, e % count)));
            keep.bufs.push((out.clone(), out));
            o
        }
        Call::ReduceScatter { count } => {
            let x: Vec<f32> = (0..n * count).map(|i| v(k, r, i)).collect();
            let mut out = vec![-1f32; count];
            let res = c.reduce_scatter(&x, &mut out, ReduceOp::Sum);
            let o = res.map(|_| check("reduce_scatter", &out, |i| sum(r * count + i)));
            keep.bufs.push((out.clone(), out));
            o
        }
        Call::AllToAll { count } => {
            let x: Vec<f32> = (0..n * count).map(|i| v(k, r, i)).collect();
            let mut out = vec![-1f32; n * count];
            let res = c.all_to_all(&x, &mut out);
            let o = res.map(|_| check("all_to_all", &out, |e| v(k, e / count, r * count + e % count)));
            keep.bufs.push((out.clone(), out));
            o
        }
    };
    kept.push(keep);
    match res {
        Ok(o) => o,
        Err(e) => Outcome::Err {
            kind: kind_of(&e),
            text: e.to_string(),
        },
    }
}

/// Runs `plan` on `c`, appending one record per call made. Returns how the rank leaves (if it does), with
/// `c` still alive so the caller decides how (drop, panic, kill). A buffer of an earlier call that changed
/// after that call returned is reported as a `Wrong` record with step `usize::MAX`.
pub fn exec(c: &HostComm, plan: &Plan, out: &mut Vec<Record>) -> Option<Leave> {
    let mut kept = vec![];
    let mut leave = None;
    for (k, call) in plan.calls.iter().enumerate() {
        if let Some((at, how)) = plan.leave {
            if at == k {
                leave = Some(how);
                break;
            }
        }
        let t = Instant::now();
        let outcome = exec_one(c, k, *call, &mut kept);
        out.push(Record {
            step: k,
            outcome,
            elapsed: t.elapsed(),
        });
    }
    for kp in &kept {
        let f = kp.bufs.iter().position(|(snap, buf)| buf != snap);
        let i = kp.ints.iter().position(|(snap, buf)| buf != snap);
        if f.is_some() || i.is_some() {
            out.push(Record {
                step: usize::MAX,
                outcome: Outcome::Wrong(format!("a buffer of step {} changed after the call returned", kp.step)),
                elapsed: Duration::ZERO,
            });
        }
    }
    leave
}

/// Threads mode: runs every rank's plan on its own thread; a `Crash` is a panic of that thread (its
/// communicator is dropped while unwinding). Fails the test, instead of hanging it, when the ranks have not
/// all returned after `limit`.
pub fn run_threads(plans: &[Plan], o: HostOptions, limit: Duration) -> Vec<Vec<Record>> {
    let shown = format!("{plans:?}");
    let plans = plans.to_vec();
    let n = plans.len();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let comms = HostComm::threads(n, o).expect("create communicator");
        let res = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .zip(&plans)
                .map(|(c, plan)| {
                    s.spawn(move || {
                        let mut recs = vec![];
                        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            let c = c;
                            match exec(&c, plan, &mut recs) {
                                Some(Leave::Crash) => panic!("rank {} crashes on purpose", c.rank()),
                                Some(Leave::Return) | None => drop(c),
                            }
                        }));
                        if let Err(p) = r {
                            let crash = plan.leave.is_some_and(|(_, how)| how == Leave::Crash);
                            let msg = p
                                .downcast_ref::<String>()
                                .is_some_and(|m| m.contains("crashes on purpose"));
                            if !(crash && msg) {
                                std::panic::resume_unwind(p);
                            }
                        }
                        recs
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Vec<_>>()
        });
        let _ = tx.send(res);
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("HANG: the ranks had not all returned after {limit:?}; plans: {shown}"),
    }
}

/// The first step at which the ranks' calls differ or some rank has left.
pub fn divergence(plans: &[Plan]) -> usize {
    let len = plans.iter().map(|p| p.calls.len()).max().unwrap_or(0);
    (0..len)
        .find(|&k| {
            plans.iter().any(|p| p.leave.is_some_and(|(at, _)| at <= k))
                || plans.iter().any(|p| p.calls.get(k) != plans[0].calls.get(k))
        })
        .unwrap_or(len)
}

/// Checks the oracle (module docs) on the records of every rank; `timeout` is the communicators'.
pub fn assert_oracle(plans: &[Plan], recs: &[Vec<Record>], timeout: Duration) {
    let d = divergence(plans);
    let slack = Duration::from_secs(5);
    let ctx = || format!("plans {plans:?}\nrecords {recs:?}");
    let left = plans.iter().position(|p| p.leave.is_some_and(|(at, _)| at == d));
    for (r, (plan, rs)) in plans.iter().zip(recs).enumerate() {
        let made = plan.leave.map_or(plan.calls.len(), |(at, _)| at.min(plan.calls.len()));
        let steps: Vec<usize> = rs.iter().filter(|x| x.step != usize::MAX).map(|x| x.step).collect();
        assert_eq!(
            steps,
            (0..made).collect::<Vec<_>>(),
            "rank {r} made the wrong calls\n{}",
            ctx()
        );
        for x in rs {
            if let Outcome::Wrong(w) = &x.outcome {
                panic!("rank {r} step {}: {w}\n{}", x.step, ctx());
            }
            if x.step < d {
                assert_eq!(
                    x.outcome,
                    Outcome::Ok,
                    "rank {r} step {} must succeed\n{}",
                    x.step,
                    ctx()
                );
                continue;
            }
            let Outcome::Err { kind, text } = &x.outcome else {
                panic!("rank {r} step {} must fail (divergence at step {d})\n{}", x.step, ctx());
            };
            assert!(
                x.elapsed <= timeout + slack,
                "rank {r} step {} failed only after {:?} (timeout {timeout:?}): {text}\n{}",
                x.step,
                x.elapsed,
                ctx()
            );
            if x.step == d {
                match left {
                    Some(gone) => assert!(
                        kind == "PeerFailed" && text.contains(&format!("rank {gone}")),
                        "rank {r} step {d}: want PeerFailed naming rank {gone}, got {kind}: {text}\n{}",
                        ctx()
                    ),
                    None => assert_eq!(kind, "InvalidArgument", "rank {r} step {d}: {text}\n{}", ctx()),
                }
            }
        }
    }
}

/// Encodes plans (and options) for a child process: `timeout_ms;slot;direct|call,call,..;leave|...`.
pub fn encode(plans: &[Plan], o: &HostOptions) -> String {
    let mut s = format!(
        "{};{};{}",
        o.timeout.as_millis(),
        o.slot_bytes.map_or(0, |b| b),
        o.direct_min_bytes
    );
    for p in plans {
        s.push('|');
        let calls: Vec<String> = p
            .calls
            .iter()
            .map(|c| match *c {
                Call::Barrier => "b".to_string(),
                Call::AllReduce { count, int } => format!("ar{count}{}", if int { 'i' } else { 'f' }),
                Call::Broadcast { count, root } => format!("bc{count}r{root}"),
                Call::Reduce { count, root } => format!("rd{count}r{root}"),
                Call::AllGather { count } => format!("ag{count}"),
                Call::ReduceScatter { count } => format!("rs{count}"),
                Call::AllToAll { count } => format!("aa{count}"),
            })
            .collect();
        s.push_str(&calls.join(","));
        match p.leave {
            Some((at, Leave::Return)) => s.push_str(&format!(";R{at}")),
            Some((at, Leave::Crash)) => s.push_str(&format!(";C{at}")),
            None => {}
        }
    }
    s
}

/// Inverse of [`encode`].
pub fn decode(s: &str) -> (Vec<Plan>, HostOptions) {
    let mut parts = s.split('|');
    let head: Vec<usize> = parts.next().unwrap().split(';').map(|x| x.parse().unwrap()).collect();
    let o = HostOptions {
        timeout: Duration::from_millis(head[0] as u64),
        slot_bytes: (head[1] != 0).then_some(head[1]),
        direct_min_bytes: head[2],
        ..HostOptions::default()
    };
    let num = |t: &str| -> usize { t.parse().unwrap() };
    let plans = parts
        .map(|p| {
            let (calls, leave) = p.split_once(';').map_or((p, None), |(c, l)| (c, Some(l)));
            let calls = calls
                .split(',')
                .filter(|t| !t.is_empty())
                .map(|t| {
                    let (tag, rest) = t.split_at(2.min(t.len()));
                    let count_root = |rest: &str| {
                        let (c, r) = rest.split_once('r').unwrap();
                        (num(c), num(r))
                    };
                    match tag {
                        "b" => Call::Barrier,
                        "ar" => Call::AllReduce {
                            count: num(&rest[..rest.len() - 1]),
                            int: rest.ends_with('i'),
                        },
                        "bc" => {
                            let (count, root) = count_root(rest);
                            Call::Broadcast { count, root }
                        }
                        "rd" => {
                            let (count, root) = count_root(rest);
                            Call::Reduce { count, root }
                        }
                        "ag" => Call::AllGather { count: num(rest) },
                        "rs" => Call::ReduceScatter { count: num(rest) },
                        "aa" => Call::AllToAll { count: num(rest) },
                        other => panic!("bad call {other:?}"),
                    }
                })
                .collect();
            let leave = leave.map(|l| {
                let how = if l.starts_with('C') {
                    Leave::Crash
                } else {
                    Leave::Return
                };
                (num(&l[1..]), how)
            });
            Plan { calls, leave }
        })
        .collect();
    (plans, o)
}

/// One record as a line of a child's output.
pub fn record_line(x: &Record) -> String {
    let (o, rest) = match &x.outcome {
        Outcome::Ok => ("ok", String::new()),
        Outcome::Err { kind, text } => ("err", format!("{kind} {}", text.replace('\n', " "))),
        Outcome::Wrong(w) => ("wrong", w.replace('\n', " ")),
    };
    let step = if x.step == usize::MAX { -1 } else { x.step as i64 };
    format!("RECORD {step} {} {o} {rest}", x.elapsed.as_micros())
}

/// The records in a child's output.
pub fn parse_records(out: &str) -> Vec<Record> {
    out.lines()
        // The test harness may print its own text before the first record on the same line.
        .filter_map(|l| l.find("RECORD ").map(|i| &l[i + "RECORD ".len()..]))
        .map(|l| {
            let mut f = l.splitn(4, ' ');
            let step: i64 = f.next().unwrap().parse().unwrap();
            let us: u64 = f.next().unwrap().parse().unwrap();
            let o = f.next().unwrap();
            let rest = f.next().unwrap_or("").to_string();
            let outcome = match o {
                "ok" => Outcome::Ok,
                "err" => {
                    let (kind, text) = rest.split_once(' ').unwrap_or((&rest, ""));
                    Outcome::Err {
                        kind: kind.to_string(),
                        text: text.to_string(),
                    }
                }
                _ => Outcome::Wrong(rest),
            };
            Record {
                step: if step < 0 { usize::MAX } else { step as usize },
                outcome,
                elapsed: Duration::from_micros(us),
            }
        })
        .collect()
}
