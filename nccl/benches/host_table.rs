//! Prints the host backend's all_reduce (f32 sum, 2 ranks) table from 8 B to 64 MiB: threads and processes,
//! next to a single-thread memcpy of the same size measured in the same run. Not a criterion bench:
//! `cargo bench -p nccl-rs --bench host_table [-- --procs-only|--threads-only]`.
//!
//! Processes mode re-executes this binary as rank 1 (environment `NCCL_RS_BENCH_RANK=1`), rendezvous over
//! loopback TCP through the bootstrap.

use std::time::{Duration, Instant};

use nccl::host::{HostComm, HostOptions};
use nccl::{Collectives, ReduceOp};

const MAX: usize = 64 << 20;

/// The same sizes as `bench/mpi/allreduce.c`.
fn sizes() -> Vec<usize> {
    vec![
        8,
        64,
        512,
        4 << 10,
        32 << 10,
        256 << 10,
        1 << 20,
        4 << 20,
        16 << 20,
        MAX,
    ]
}

/// Iterations for a size: enough for ~0.25 s, at least 5.
fn iters_for(bytes: usize) -> usize {
    (((256usize << 20) / bytes.max(1)).clamp(5, 20_000)).max(5)
}

/// Runs the table on one rank; returns rank 0's average time per op per size.
fn table_rank(c: &HostComm) -> Vec<(usize, Duration)> {
    let mut send = vec![1f32; MAX / 4];
    let mut recv = vec![0f32; MAX / 4];
    for (i, v) in send.iter_mut().enumerate() {
        *v = (i % 17) as f32;
    }
    let mut out = vec![];
    for bytes in sizes() {
        let n = bytes / 4;
        let iters = iters_for(bytes);
        // Warm up for ~1000 calls or 50 ms worth, whichever is less (the first sizes otherwise pay for
        // thread start-up and page faults).
        for _ in 0..iters.min(1000) {
            c.all_reduce(&send[..n], &mut recv[..n], ReduceOp::Sum).unwrap();
        }
        c.barrier().unwrap();
        let t = Instant::now();
        for _ in 0..iters {
            c.all_reduce(&send[..n], &mut recv[..n], ReduceOp::Sum).unwrap();
        }
        let el = t.elapsed() / iters as u32;
        assert_eq!(recv[n - 1], 2.0 * ((n - 1) % 17) as f32);
        c.barrier().unwrap();
        out.push((bytes, el));
    }
    out
}

fn memcpy_times() -> Vec<(usize, Duration)> {
    let src = vec![1u8; MAX];
    let mut dst = vec![0u8; MAX];
    sizes()
        .into_iter()
        .map(|bytes| {
            let iters = iters_for(bytes);
            for _ in 0..iters.min(50) {
                dst[..bytes].copy_from_slice(&src[..bytes]);
            }
            let t = Instant::now();
            for _ in 0..iters {
                dst[..bytes].copy_from_slice(std::hint::black_box(&src[..bytes]));
                std::hint::black_box(&dst);
            }
            (bytes, t.elapsed() / iters as u32)
        })
        .collect()
}

fn threads() -> Vec<(usize, Duration)> {
    let comms = HostComm::threads(2, HostOptions::default()).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(move || table_rank(&c))).collect();
        let mut res: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        res.swap_remove(0)
    })
}

/// Options of a processes-mode rank: staged (every byte through the shared segment) or the defaults
/// (cross-memory attach from 16 KiB where it works).
fn procs_opts(staged: bool) -> HostOptions {
    HostOptions {
        direct_min_bytes: if staged {
            usize::MAX
        } else {
            HostOptions::default().direct_min_bytes
        },
        ..HostOptions::default()
    }
}

fn procs_rank(rank: usize, port: u16, staged: bool) -> Vec<(usize, Duration)> {
    use nccl::bootstrap::{RankInfo, Rendezvous, RendezvousOptions};
    let mut vars = std::collections::HashMap::new();
    vars.insert("RANK", rank.to_string());
    vars.insert("WORLD_SIZE", "2".to_string());
    vars.insert("LOCAL_RANK", rank.to_string());
    vars.insert("LOCAL_WORLD_SIZE", "2".to_string());
    vars.insert("MASTER_ADDR", "127.0.0.1".to_string());
    vars.insert("MASTER_PORT", port.to_string());
    let info = RankInfo::from_vars(|k| vars.get(k).cloned()).unwrap();
    let rv = Rendezvous::new(&info, RendezvousOptions::default()).unwrap();
    let c = HostComm::from_rendezvous(&rv, procs_opts(staged)).unwrap();
    if rank == 0 {
        let min = c.options().direct_min_bytes;
        eprintln!(
            "# processes: cross-memory attach {}, direct from {}",
            if c.uses_cross_memory_attach() {
                "available"
            } else {
                "unavailable"
            },
            if min == usize::MAX || !c.uses_cross_memory_attach() {
                "never (staged)".to_string()
            } else {
                format!("{min} B")
            }
        );
    }
    table_rank(&c)
}

/// Processes mode, rank 1 re-executed from this binary; `staged` forces the shared-segment path.
fn procs(staged: bool) -> Vec<(usize, Duration)> {
    let port = nccl::bootstrap::launch::free_port("127.0.0.1".parse().unwrap()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let flag = if staged { "1" } else { "0" };
    let mut child = std::process::Command::new(exe)
        .env("NCCL_RS_BENCH_RANK", "1")
        .env("NCCL_RS_BENCH_PORT", port.to_string())
        .env("NCCL_RS_BENCH_STAGED", flag)
        .spawn()
        .unwrap();
    let r = procs_rank(0, port, staged);
    assert!(child.wait().unwrap().success());
    r
}

fn gbs(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() {
    if let Ok(r) = std::env::var("NCCL_RS_BENCH_RANK") {
        let port = std::env::var("NCCL_RS_BENCH_PORT").unwrap().parse().unwrap();
        let staged = std::env::var("NCCL_RS_BENCH_STAGED").is_ok_and(|v| v == "1");
        procs_rank(r.parse().unwrap(), port, staged);
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let want_t = !args.iter().any(|a| a == "--procs-only");
    let want_p = !args.iter().any(|a| a == "--threads-only");
    let mc = memcpy_times();
    let th = if want_t { Some(threads()) } else { None };
    let pr = if want_p { Some(procs(false)) } else { None };
    let st = if want_p { Some(procs(true)) } else { None };
    println!("# host backend all_reduce f32 sum, 2 ranks; memcpy = single-thread copy of the same size");
    println!("# proc = processes with the default options, staged = processes through the shared segment only");
    println!(
        "{:>10} {:>12} {:>12} {:>12} {:>12} {:>9} {:>8} {:>8} {:>8}",
        "bytes", "thr_us", "proc_us", "staged_us", "memcpy_us", "cpy_GB/s", "thr/cpy", "proc/cpy", "stg/cpy"
    );
    for (i, (bytes, m)) in mc.iter().enumerate() {
        let pick = |v: &Option<Vec<(usize, Duration)>>| v.as_ref().map(|v| v[i].1);
        let (t, p, g) = (pick(&th), pick(&pr), pick(&st));
        let f = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2}", d.as_secs_f64() * 1e6));
        let r = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2}", gbs(*bytes, d) / gbs(*bytes, *m)));
        println!(
            "{:>10} {:>12} {:>12} {:>12} {:>12.2} {:>9.2} {:>8} {:>8} {:>8}",
            bytes,
            f(t),
            f(p),
            f(g),
            m.as_secs_f64() * 1e6,
            gbs(*bytes, *m),
            r(t),
            r(p),
            r(g)
        );
    }
}
