//! The rendezvous through PyTorch's c10d `TCPStore`, against the real server: PyTorch (the PyPI wheel that
//! scripts/setup.sh installs into `.deps/torch`) serves the store in a Python child process, as torchrun's
//! agent does, and our ranks are its clients. A Python client then reads what our ranks published, under the
//! keys a PyTorch worker's `PrefixStore` would use.
//!
//! Without the wheel these tests fail under CI (naming it) and skip loudly elsewhere.

#[path = "../../tests/support/prereq.rs"]
mod prereq;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nccl::bootstrap::store::torchrun_prefix;
use nccl::bootstrap::{BootstrapError, CancelToken, Launcher, RankInfo, Rendezvous, RendezvousOptions};

/// `.deps/torch` (a `pip install --target` of torch), or `None` after reporting it missing.
fn torch_dir() -> Option<PathBuf> {
    prereq::deps_file("torch/torch/__init__.py")?;
    Some(prereq::deps_dir().join("torch"))
}

/// A Python process serving a `TCPStore` (as torchrun's agent does) and running `then` once it is up: the
/// store's port is the first line it prints; the child lives until its stdin closes.
struct PyStore {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    port: u16,
}

impl PyStore {
    fn start(torch: &PathBuf, then: &str) -> PyStore {
        let script = format!(
            r#"
import sys
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
print(store.port, flush=True)
{then}
sys.stdin.read()
"#
        );
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .env("PYTHONPATH", torch)
            .env("PYTHONWARNINGS", "ignore")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3");
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(120))
            .expect("the Python TCPStore printed its port");
        let port = first.trim().parse().expect("a port number");
        PyStore {
            child,
            stdin,
            lines,
            port,
        }
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .expect("a line from the Python client")
    }
}

impl Drop for PyStore {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn info(rank: usize, world: usize, port: u16) -> RankInfo {
    RankInfo {
        rank,
        world_size: world,
        local_rank: rank,
        local_world_size: Some(world),
        master_addr: "127.0.0.1".into(),
        master_port: port,
        launcher: Launcher::Torchrun,
    }
}

fn opts(prefix: &str, timeout_ms: u64) -> RendezvousOptions {
    RendezvousOptions {
        torch_store: Some(prefix.to_string()),
        ..RendezvousOptions::default()
    }
    .with_timeout(Duration::from_millis(timeout_ms))
    .with_op_timeout(Duration::from_millis(timeout_ms))
}

#[test]
fn ranks_rendezvous_through_a_real_tcpstore_and_python_reads_their_keys() {
    let Some(torch) = torch_dir() else { return };
    // A PyTorch worker of attempt 0 reads rank 1's all-gather blob (operation #2) through its PrefixStore.
    let py = PyStore::start(
        &torch,
        r#"ps = dist.PrefixStore("/worker/attempt_0", store)
print(ps.get("nccl_rs/op/2/1").hex(), flush=True)"#,
    );
    let prefix = torchrun_prefix("0");
    let world = 3;
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|r| {
                let (i, o) = (info(r, world, py.port), opts(&prefix, 30_000));
                s.spawn(move || -> Result<_, BootstrapError> {
                    let rv = Rendezvous::new(&i, o)?;
                    let b = rv.broadcast(format!("from {r}").as_bytes())?;
                    let g = rv.all_gather(&[r as u8; 3][..r + 1])?;
                    rv.barrier()?;
                    Ok((b, g))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, res) in results.into_iter().enumerate() {
        let (b, g) = res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!(b, b"from 0", "rank {r}: the broadcast carries rank 0's bytes");
        assert_eq!(g, vec![vec![0u8], vec![1, 1], vec![2, 2, 2]], "rank {r}");
    }
    // op byte 3 (all_gather) then rank 1's two bytes.
    assert_eq!(py.line(), "030101");
}

#[test]
fn mismatched_operations_missing_ranks_and_world_sizes_are_named() {
    let Some(torch) = torch_dir() else { return };
    let py = PyStore::start(&torch, "");
    // Rank 0 broadcasts while rank 1 gathers: both fail, naming the other's operation.
    let prefix = "//worker/attempt_7/nccl_rs";
    let errs: Vec<BootstrapError> = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let rv = Rendezvous::new(&info(0, 2, py.port), opts(prefix, 20_000)).unwrap();
            rv.broadcast(b"x").unwrap_err()
        });
        let b = s.spawn(|| {
            let rv = Rendezvous::new(&info(1, 2, py.port), opts(prefix, 20_000)).unwrap();
            rv.all_gather(b"y").unwrap_err()
        });
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    for e in &errs {
        assert!(matches!(e, BootstrapError::OpMismatch { .. }), "{e:?}");
    }
    assert!(errs[0].to_string().contains("all_gather #1"), "{}", errs[0]);
    assert!(errs[1].to_string().contains("broadcast #1"), "{}", errs[1]);

    // Rank 1 of 2 never comes: rank 0 gives up at its deadline, naming rank 1.
    let t0 = Instant::now();
    let e = Rendezvous::new(&info(0, 2, py.port), opts("//worker/attempt_8/nccl_rs", 1500)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(15), "bounded by the timeout");
    match &e {
        BootstrapError::RanksMissing {
            missing, world_size, ..
        } => assert_eq!((missing.clone(), *world_size), (vec![1], 2)),
        other => panic!("{other:?}"),
    }

    // Rank 0 is cancelled while it waits for rank 1: it returns at once and tells the store, so rank 1,
    // arriving later, fails at once too instead of waiting out its 20 s: in the join (rank 0's join key is
    // already there, so the join itself may complete) or at the first operation.
    let cancel = CancelToken::new();
    let t0 = Instant::now();
    let e = std::thread::scope(|s| {
        let h = s.spawn(|| {
            Rendezvous::new(
                &info(0, 2, py.port),
                opts("//worker/attempt_10/nccl_rs", 20_000).with_cancel(cancel.clone()),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        cancel.cancel();
        h.join().unwrap().unwrap_err()
    });
    assert!(matches!(e, BootstrapError::Cancelled { rank: 0, .. }), "{e:?}");
    let late = Rendezvous::new(&info(1, 2, py.port), opts("//worker/attempt_10/nccl_rs", 20_000))
        .and_then(|rv| rv.barrier())
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(
        matches!(&late, BootstrapError::Aborted { reason, .. } if reason.contains("cancelled")),
        "{late:?}"
    );

    // Two ranks disagree on the world size.
    let errs: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| Rendezvous::new(&info(0, 2, py.port), opts("//worker/attempt_9/nccl_rs", 10_000)));
        let b = s.spawn(|| {
            let mut i = info(1, 2, py.port);
            i.world_size = 3;
            Rendezvous::new(&i, opts("//worker/attempt_9/nccl_rs", 3_000))
        });
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert!(
        errs.iter()
            .any(|r| matches!(r, Err(BootstrapError::WorldSizeMismatch { .. }))),
        "{errs:?}"
    );
}

#[test]
fn no_store_listening_is_a_bounded_error() {
    // Nothing serves this port: the client retries until its deadline, then names the store's address.
    let port = nccl::bootstrap::launch::free_port("127.0.0.1".parse().unwrap()).unwrap();
    let t0 = Instant::now();
    let e = Rendezvous::new(&info(1, 2, port), opts("//worker/attempt_0/nccl_rs", 700)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(matches!(e, BootstrapError::RootUnreachable { .. }), "{e:?}");
    assert!(e.to_string().contains("TCPStore"), "{e}");
}

#[test]
fn a_store_that_hangs_up_before_answering_is_retried_until_the_deadline() {
    // A listener that accepts and at once closes (an agent restarting, a listener shutting down, or the kernel's
    // own socket in a TCP self-connection): the client retries and ends with the bounded "unreachable" error,
    // not with the first connection's EOF or reset. Before the retry this returned `PeerFailed` at once (and
    // under load a `ConnectionReset` `Io` error, which is how CI met it).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = accepted.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(s);
        }
    });
    let t0 = Instant::now();
    let e = Rendezvous::new(&info(1, 2, port), opts("//worker/attempt_0/nccl_rs", 700)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(matches!(e, BootstrapError::RootUnreachable { .. }), "{e:?}");
    assert!(accepted.load(std::sync::atomic::Ordering::Relaxed) >= 2, "it retried");
}

#[test]
fn torchrun_environment_selects_the_agent_store() {
    let vars = |extra: &[(&'static str, &'static str)]| {
        let m: std::collections::HashMap<&str, &str> = extra.iter().copied().collect();
        RendezvousOptions::from_vars(|k| m.get(k).map(|v| v.to_string()))
    };
    assert_eq!(vars(&[]).unwrap().torch_store, None);
    let o = vars(&[
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ])
    .unwrap();
    assert_eq!(o.torch_store.as_deref(), Some("//worker/attempt_2/nccl_rs"));
    assert_eq!(
        vars(&[("TORCHELASTIC_USE_AGENT_STORE", "False")]).unwrap().torch_store,
        None
    );
    let e = vars(&[("TORCHELASTIC_USE_AGENT_STORE", "maybe")]).unwrap_err();
    assert!(e.to_string().contains("TORCHELASTIC_USE_AGENT_STORE"), "{e}");
    let e = vars(&[
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "x"),
    ])
    .unwrap_err();
    assert!(e.to_string().contains("TORCHELASTIC_RESTART_COUNT"), "{e}");
    let o = vars(&[
        ("NCCL_RS_BOOTSTRAP_TIMEOUT", "5"),
        ("NCCL_RS_BOOTSTRAP_OP_TIMEOUT", "7.5"),
    ])
    .unwrap();
    assert_eq!(
        (o.timeout, o.op_timeout),
        (Duration::from_secs(5), Duration::from_millis(7500))
    );
    let e = vars(&[("NCCL_RS_BOOTSTRAP_TIMEOUT", "soon")]).unwrap_err();
    assert!(e.to_string().contains("NCCL_RS_BOOTSTRAP_TIMEOUT"), "{e}");
}
