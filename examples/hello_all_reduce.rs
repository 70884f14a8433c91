//! The smallest use of the host backend: N ranks (threads, or processes with `--nprocs N`) each contribute
//! a vector filled with `rank + 1`; after one all-reduce every rank holds `1 + 2 + … + N` everywhere.
//!
//! ```text
//! cargo run --example hello_all_reduce            # 4 threads
//! cargo run --example hello_all_reduce -- 3       # 3 threads
//! cargo run --example hello_all_reduce -- --nprocs 2
//! ```

use nccl::host::{HostComm, HostOptions};
use nccl::{Collectives, ReduceOp};

fn rank_main(comm: &HostComm) -> nccl::Result<()> {
    let n = comm.size();
    let mut buf = [(comm.rank() + 1) as f32; 8];
    comm.all_reduce_in_place(&mut buf[..], ReduceOp::Sum)?;
    let expected = (n * (n + 1) / 2) as f32;
    let ok = buf.iter().all(|&v| v == expected);
    println!(
        "rank {}/{n}: {:?} ({})",
        comm.rank(),
        &buf[..4],
        if ok { "ok" } else { "WRONG" }
    );
    if ok {
        Ok(())
    } else {
        Err(nccl::Error::invalid(
            "hello_all_reduce",
            format!("expected {expected} everywhere"),
        ))
    }
}

fn run() -> Result<i32, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nprocs = match args.iter().position(|a| a == "--nprocs") {
        Some(i) => Some(args.get(i + 1).ok_or("--nprocs needs a number")?.parse::<usize>()?),
        None => None,
    };
    if let Some(code) = nccl::bootstrap::launch::spawn_local_if_requested(nprocs)? {
        return Ok(code);
    }
    if nprocs.is_some() {
        let rv = nccl::bootstrap::Rendezvous::from_env()?;
        rank_main(&HostComm::from_rendezvous(&rv, HostOptions::default())?)?;
        return Ok(0);
    }
    let n: usize = match args.first() {
        Some(a) => a.parse()?,
        None => 4,
    };
    let comms = HostComm::threads(n, HostOptions::default())?;
    let results: Vec<nccl::Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(move || rank_main(&c))).collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(0)
}

fn main() {
    nccl_stack::init_logging();
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", nccl::report::chain(&*e));
            std::process::exit(1);
        }
    }
}
