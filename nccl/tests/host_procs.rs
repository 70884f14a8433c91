//! Processes mode: ranks are child processes of this test binary (re-executed with `--exact <test>` and an
//! environment marker), set up through the bootstrap's TCP rendezvous on loopback and a `/dev/shm` segment.
//! Checks results, failure of a killed rank, and that no segment is left in `/dev/shm`.

mod host_common;

use std::time::{Duration, Instant};

use host_common::procs::*;
use host_common::*;
use nccl::host::HostOptions;
use nccl::{Collectives, Error, ReduceOp};

/// A 3-rank world where rank 1 killed itself (SIGKILL) and ranks 0 and 2 reported "rank 1 failed" and exited
/// cleanly, leaving nothing in /dev/shm.
fn assert_rank_1_killed(exits: &[Exit]) {
    assert_eq!(exits[1].signal, Some(libc::SIGKILL), "{}", exits[1].out);
    for r in [0, 2] {
        assert_eq!(exits[r].code, Some(0), "rank {r}:\n{}", exits[r].out);
        assert!(exits[r].out.contains("rank 1 failed"), "rank {r}:\n{}", exits[r].out);
    }
    assert_no_leak(exits);
}

fn procs_opts() -> HostOptions {
    HostOptions {
        timeout: Duration::from_secs(30),
        ..HostOptions::default()
    }
}

#[test]
fn processes_every_collective_and_type() {
    const T: &str = "processes_every_collective_and_type";
    if let Some(c) = child(T, procs_opts()) {
        rank_body::<i8>(&c, 37, "procs");
        rank_body::<u32>(&c, 37, "procs");
        rank_body::<i64>(&c, 37, "procs");
        rank_body::<half::f16>(&c, 37, "procs");
        rank_body::<half::bf16>(&c, 37, "procs");
        rank_body::<f32>(&c, 37, "procs");
        rank_body::<f64>(&c, 37, "procs");
        rank_body::<float8::F8E4M3>(&c, 37, "procs");
        rank_body::<float8::F8E5M2>(&c, 37, "procs");
        rank_body::<u8>(&c, 0, "procs");
        return;
    }
    for n in [1, 2, 3, 4] {
        assert_all_ok(&spawn_world(T, n));
    }
}

/// The direct path between processes (cross-memory attach) for every collective and type, every message
/// size (direct_min_bytes 0), in and out of place: the same exact checks as the staged path.
#[test]
fn processes_cross_memory_attach_every_collective_and_type() {
    const T: &str = "processes_cross_memory_attach_every_collective_and_type";
    if let Some(c) = child(
        T,
        HostOptions {
            direct_min_bytes: 0,
            ..procs_opts()
        },
    ) {
        assert!(
            c.uses_cross_memory_attach() || c.size() == 1,
            "rank {}: cross-memory attach (process_vm_readv) is not usable between these processes; \
             is ptrace restricted (/proc/sys/kernel/yama/ptrace_scope) or process_vm_readv filtered?",
            c.rank()
        );
        rank_body::<i8>(&c, 37, "procs-cma");
        rank_body::<u32>(&c, 101, "procs-cma");
        rank_body::<half::bf16>(&c, 101, "procs-cma");
        rank_body::<f32>(&c, 101, "procs-cma");
        rank_body::<f64>(&c, 37, "procs-cma");
        rank_body::<float8::F8E5M2>(&c, 37, "procs-cma");
        rank_body::<u8>(&c, 0, "procs-cma");
        // Larger than one reduction block (64 KiB) and one copy piece (256 KiB), with a ragged end.
        rank_body::<f32>(&c, (300 << 10) / 4 + 3, "procs-cma-large");
        return;
    }
    for n in [1, 2, 3, 4] {
        assert_all_ok(&spawn_world(T, n));
    }
}

/// A rank process killed while the others move data by cross-memory attach (4 MiB all-reduces back to back,
/// so the kill lands in a data phase or its barriers): the others fail naming it, well before the timeout, instead of
/// waiting for a rank that can never arrive at the closing barrier.
#[test]
fn processes_killed_during_cross_memory_attach_is_detected() {
    const T: &str = "processes_killed_during_cross_memory_attach_is_detected";
    if let Some(c) = child(T, procs_opts()) {
        let r = c.rank();
        let mut b = vec![1f32; (4 << 20) / 4];
        c.all_reduce_in_place(&mut b, ReduceOp::Sum).unwrap();
        assert!(
            c.uses_cross_memory_attach(),
            "rank {r}: cross-memory attach is not in use"
        );
        if r == 1 {
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                // SAFETY: sending SIGKILL to ourselves; nothing after this runs.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            });
        }
        let t = Instant::now();
        let e = loop {
            if let Err(e) = c.all_reduce_in_place(&mut b, ReduceOp::Sum) {
                break e;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "rank {r}: no failure after {:?}",
                t.elapsed()
            );
        };
        assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
        match &e {
            Error::PeerFailed { rank: 1, .. } => {}
            other => panic!("expected PeerFailed naming rank 1, got {other}"),
        }
        println!("rank {r} saw: {e}");
        return;
    }
    assert_rank_1_killed(&spawn_world(T, 3));
}

#[test]
fn processes_pipelined_rounds() {
    const T: &str = "processes_pipelined_rounds";
    if let Some(c) = child(
        T,
        HostOptions {
            slot_bytes: Some(64),
            ..procs_opts()
        },
    ) {
        rank_body::<f32>(&c, 83, "procs-rounds");
        rank_body::<i32>(&c, 83, "procs-rounds");
        rank_body::<half::bf16>(&c, 83, "procs-rounds");
        rank_body::<u64>(&c, 83, "procs-rounds");
        return;
    }
    for n in [2, 3, 7] {
        assert_all_ok(&spawn_world(T, n));
    }
}

#[test]
fn processes_large_messages() {
    const T: &str = "processes_large_messages";
    if let Some(c) = child(T, procs_opts()) {
        let (r, n) = (c.rank(), c.size());
        let count = (3 << 20) / 4 + 5;
        let x: Vec<f32> = (0..count).map(|i| ((i + r) % 100) as f32).collect();
        let mut out = vec![0f32; count];
        c.all_reduce(&x, &mut out, ReduceOp::Sum).unwrap();
        for (i, v) in out.iter().enumerate() {
            let want: usize = (0..n).map(|k| (i + k) % 100).sum();
            assert_eq!(*v, want as f32, "element {i}");
        }
        // A large point-to-point message in a ring (more than the channel buffers).
        let mut got = vec![0f32; count];
        c.send_recv(&x, (r + 1) % n, &mut got, (r + n - 1) % n).unwrap();
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, v)| *v == ((i + (r + n - 1) % n) % 100) as f32));
        return;
    }
    assert_all_ok(&spawn_world(T, 3));
}

#[test]
fn processes_sixteen_ranks() {
    const T: &str = "processes_sixteen_ranks";
    if let Some(c) = child(T, procs_opts()) {
        let (r, n) = (c.rank(), c.size());
        let mut b = vec![r as u32; 7];
        c.all_reduce_in_place(&mut b, ReduceOp::Sum).unwrap();
        assert_eq!(b, vec![(n * (n - 1) / 2) as u32; 7]);
        let mut g = vec![0u8; n];
        c.all_gather(&[r as u8], &mut g).unwrap();
        assert!(g.iter().enumerate().all(|(i, v)| *v == i as u8));
        c.barrier().unwrap();
        return;
    }
    assert_all_ok(&spawn_world(T, 16));
}

/// A rank killed (SIGKILL: no destructor runs) mid-run: the others fail naming it, well before the timeout;
/// nothing is left in /dev/shm.
#[test]
fn processes_killed_rank_is_detected() {
    const T: &str = "processes_killed_rank_is_detected";
    if let Some(c) = child(T, procs_opts()) {
        let r = c.rank();
        let mut b = vec![1f32; 1000];
        c.all_reduce_in_place(&mut b, ReduceOp::Sum).unwrap();
        if r == 1 {
            // SAFETY: sending SIGKILL to ourselves; nothing after this runs.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        let t = Instant::now();
        let e = c.all_reduce_in_place(&mut b, ReduceOp::Sum).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
        match &e {
            Error::PeerFailed { rank: 1, reason, .. } => assert!(reason.contains("exited"), "{e}"),
            other => panic!("expected PeerFailed naming rank 1, got {other}"),
        }
        println!("rank {r} saw: {e}");
        return;
    }
    assert_rank_1_killed(&spawn_world(T, 3));
}

/// A rank that exits normally without joining the collective (its communicator is dropped).
#[test]
fn processes_early_exit_is_detected() {
    const T: &str = "processes_early_exit_is_detected";
    if let Some(c) = child(T, procs_opts()) {
        if c.rank() == 0 {
            return; // drops the communicator: rank 0 leaves first
        }
        let e = c.barrier().unwrap_err();
        assert!(matches!(e, Error::PeerFailed { rank: 0, .. }), "{e}");
        return;
    }
    assert_all_ok(&spawn_world(T, 3));
}
