//! GPU tests of the safe layer: every collective in and out of place, every data type, world sizes 1, 2 and
//! all visible GPUs (one thread per GPU sharing one `UniqueId`, and one thread driving all GPUs with
//! `init_all` + `group`), group send/recv rings, split, shrink, registration, abort from a watchdog during a
//! hung collective, and non-blocking init. Results are checked exactly: inputs are small integers that every
//! type (down to fp8) represents exactly, and so are their sums.
//!
//! Run them (they are `#[ignore]`d because CI has no GPU):
//!
//! ```text
//! cargo test -p nccl-rs --features cuda --test nccl_gpu -- --ignored --test-threads=1
//! ```
#![cfg(feature = "cuda")]

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use nccl::{Collectives, Communicator, Config, DataType, Elem, Error, ReduceOp, UniqueId};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn gpus() -> usize {
    nccl::cuda_device_count()
}

fn need(n: usize) {
    assert!(gpus() >= n, "this test needs {n} GPUs, {} visible", gpus());
}

/// Runs `f` on `n` threads, rank `r` on GPU `r`, all sharing one id; finalizes every communicator.
fn run_ranks<R: Send>(n: usize, f: impl Fn(&Communicator, &Arc<CudaStream>) -> R + Sync) -> Vec<R> {
    need(n);
    let id = UniqueId::new().unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let f = &f;
                s.spawn(move || {
                    let stream = CudaContext::new(rank).unwrap().new_stream().unwrap();
                    let comm = Communicator::init_rank_on(stream.clone(), &id, rank, n).unwrap();
                    assert_eq!((comm.rank(), comm.size(), comm.device()), (rank, n, rank));
                    let out = f(&comm, &stream);
                    comm.finalize().unwrap();
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

trait TestElem: Elem + DeviceRepr + ValidAsZeroBits {}
impl<T: Elem + DeviceRepr + ValidAsZeroBits> TestElem for T {}

/// The largest integer `T` and all smaller ones represent exactly.
fn max_exact(dt: DataType) -> f64 {
    match dt {
        DataType::Int8 => 127.0,
        DataType::Uint8 => 255.0,
        DataType::Float16 => 2048.0,
        DataType::Bfloat16 => 256.0,
        DataType::Float8e4m3 => 16.0,
        DataType::Float8e5m2 => 8.0,
        _ => 1e6,
    }
}

fn up<T: TestElem>(s: &Arc<CudaStream>, v: &[f64]) -> CudaSlice<T> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
    s.clone_htod(&host).unwrap()
}

fn down<T: TestElem>(s: &Arc<CudaStream>, b: &CudaSlice<T>) -> Vec<f64> {
    s.clone_dtoh(b).unwrap().into_iter().map(|x| x.to_f64()).collect()
}

/// Rank `r`'s input: small positive integers whose sum over `n` ranks (times 2 for PreMulSum) stays exact.
fn input(dt: DataType, n: usize, r: usize, len: usize) -> Vec<f64> {
    let k = ((max_exact(dt) / (2.0 * n as f64)).floor() as usize).clamp(1, 7);
    (0..len).map(|i| ((r + i) % k + 1) as f64).collect()
}

fn check_collectives<T: TestElem>(comm: &Communicator, s: &Arc<CudaStream>) {
    let dt = T::DATA_TYPE;
    let (n, r) = (comm.size(), comm.rank());
    let c = 37; // per-rank count, not a multiple of anything NCCL likes
    let mine = input(dt, n, r, c);
    let all: Vec<Vec<f64>> = (0..n).map(|q| input(dt, n, q, c)).collect();
    let sum: Vec<f64> = (0..c).map(|i| all.iter().map(|v| v[i]).sum()).collect();
    let max: Vec<f64> = (0..c)
        .map(|i| all.iter().map(|v| v[i]).fold(f64::MIN, f64::max))
        .collect();
    let min: Vec<f64> = (0..c)
        .map(|i| all.iter().map(|v| v[i]).fold(f64::MAX, f64::min))
        .collect();
    let ctx = |what: &str| format!("{dt:?} n={n} rank={r}: {what}");

    // all_reduce: sum, max, min out of place; sum in place; PreMulSum(2) both ways.
    let send = up::<T>(s, &mine);
    for (op, want) in [(ReduceOp::Sum, &sum), (ReduceOp::Max, &max), (ReduceOp::Min, &min)] {
        let mut recv = s.alloc_zeros::<T>(c).unwrap();
        comm.all_reduce(&send, &mut recv, op).unwrap();
        assert_eq!(&down(s, &recv), want, "{}", ctx(&format!("all_reduce {op:?}")));
    }
    let mut buf = up::<T>(s, &mine);
    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
    assert_eq!(down(s, &buf), sum, "{}", ctx("all_reduce_in_place"));
    let doubled: Vec<f64> = sum.iter().map(|x| 2.0 * x).collect();
    // NCCL may not offer PreMulSum/Avg for fp8; then it must say so with ncclInvalidArgument, and otherwise be
    // exact.
    let fp8 = matches!(dt, DataType::Float8e4m3 | DataType::Float8e5m2);
    let allowed = |res: nccl::Result<()>, what: &str| -> bool {
        match res {
            Ok(()) => true,
            Err(e) if fp8 && e.nccl_code() == Some(4) => false,
            Err(e) => panic!("{}: {e}", ctx(what)),
        }
    };
    let mut recv = s.alloc_zeros::<T>(c).unwrap();
    if allowed(
        comm.all_reduce(&send, &mut recv, ReduceOp::PreMulSum(2.0)),
        "PreMulSum(2)",
    ) {
        assert_eq!(down(s, &recv), doubled, "{}", ctx("PreMulSum(2)"));
    }
    // Avg of ones is 1. Floats average as a PreMulSum by 1/n, whose partial sums k/n are exact (down to fp8)
    // when n is a power of two; integers sum, then divide.
    if !dt.is_float() || n.is_power_of_two() {
        let mut ones = up::<T>(s, &vec![1.0; c]);
        if allowed(comm.all_reduce_in_place(&mut ones, ReduceOp::Avg), "Avg") {
            assert_eq!(down(s, &ones), vec![1.0; c], "{}", ctx("Avg"));
        }
    }

    // broadcast from the last rank, out of place (send only on the root) and in place.
    let root = n - 1;
    let mut recv = s.alloc_zeros::<T>(c).unwrap();
    let root_send = up::<T>(s, &all[root]);
    let send_opt: Option<&dyn cudarc::driver::DevicePtr<T>> = (r == root).then_some(&root_send);
    comm.broadcast(send_opt, &mut recv, root).unwrap();
    assert_eq!(down(s, &recv), all[root], "{}", ctx("broadcast"));
    let mut buf = up::<T>(s, &mine);
    comm.broadcast_in_place(&mut buf, root).unwrap();
    assert_eq!(down(s, &buf), all[root], "{}", ctx("broadcast_in_place"));

    // reduce to rank 0.
    let mut recv = s.alloc_zeros::<T>(c).unwrap();
    let recv_opt: Option<&mut dyn cudarc::driver::DevicePtrMut<T>> = if r == 0 { Some(&mut recv) } else { None };
    comm.reduce(&send, recv_opt, ReduceOp::Sum, 0).unwrap();
    if r == 0 {
        assert_eq!(down(s, &recv), sum, "{}", ctx("reduce"));
    }
    let mut buf = up::<T>(s, &mine);
    comm.reduce_in_place(&mut buf, ReduceOp::Sum, 0).unwrap();
    assert_eq!(
        down(s, &buf),
        if r == 0 { sum.clone() } else { mine.clone() },
        "{}",
        ctx("reduce_in_place")
    );

    // all_gather: concatenation in rank order.
    let gathered: Vec<f64> = all.concat();
    let mut recv = s.alloc_zeros::<T>(n * c).unwrap();
    comm.all_gather(&send, &mut recv).unwrap();
    assert_eq!(down(s, &recv), gathered, "{}", ctx("all_gather"));
    let mut host = vec![0.0; n * c];
    host[r * c..(r + 1) * c].copy_from_slice(&mine);
    let mut buf = up::<T>(s, &host);
    comm.all_gather_in_place(&mut buf).unwrap();
    assert_eq!(down(s, &buf), gathered, "{}", ctx("all_gather_in_place"));

    // reduce_scatter: rank q's send is input(q) repeated per block with a block offset; rank r gets block r.
    let block = |q: usize, b: usize| -> Vec<f64> { input(dt, n, q + b, c) };
    let send_rs: Vec<f64> = (0..n).flat_map(|b| block(r, b)).collect();
    let want_rs: Vec<f64> = (0..c).map(|i| (0..n).map(|q| block(q, r)[i]).sum()).collect();
    let send_buf = up::<T>(s, &send_rs);
    let mut recv = s.alloc_zeros::<T>(c).unwrap();
    comm.reduce_scatter(&send_buf, &mut recv, ReduceOp::Sum).unwrap();
    assert_eq!(down(s, &recv), want_rs, "{}", ctx("reduce_scatter"));
    let mut buf = up::<T>(s, &send_rs);
    comm.reduce_scatter_in_place(&mut buf, ReduceOp::Sum).unwrap();
    assert_eq!(
        down(s, &buf)[r * c..(r + 1) * c],
        want_rs[..],
        "{}",
        ctx("reduce_scatter_in_place")
    );

    {
        // all_to_all: block j of rank q's send (value 10*q + j, scaled to stay exact) lands in block q of rank j.
        let val = |q: usize, j: usize| ((q * n + j) % max_exact(dt).min(100.0) as usize) as f64;
        let send_a: Vec<f64> = (0..n).flat_map(|j| vec![val(r, j); c]).collect();
        let want_a: Vec<f64> = (0..n).flat_map(|q| vec![val(q, r); c]).collect();
        let send_buf = up::<T>(s, &send_a);
        let mut recv = s.alloc_zeros::<T>(n * c).unwrap();
        comm.all_to_all(&send_buf, &mut recv).unwrap();
        assert_eq!(down(s, &recv), want_a, "{}", ctx("all_to_all"));
        // gather to the last rank, scatter from rank 0.
        let mut recv = s.alloc_zeros::<T>(n * c).unwrap();
        let recv_opt: Option<&mut dyn cudarc::driver::DevicePtrMut<T>> = if r == root { Some(&mut recv) } else { None };
        comm.gather(&send, recv_opt, root).unwrap();
        if r == root {
            assert_eq!(down(s, &recv), gathered, "{}", ctx("gather"));
        }
        let scatter_src = up::<T>(s, &gathered);
        let mut recv = s.alloc_zeros::<T>(c).unwrap();
        let send_opt: Option<&dyn cudarc::driver::DevicePtr<T>> = (r == 0).then_some(&scatter_src);
        comm.scatter(send_opt, &mut recv, 0).unwrap();
        assert_eq!(down(s, &recv), all[r], "{}", ctx("scatter"));
    }

    // Ring through the group API: send to the next rank, receive from the previous one.
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    let mut recv = s.alloc_zeros::<T>(c).unwrap();
    nccl::group(|g| {
        g.send(comm, &send, next)?;
        g.recv(comm, &mut recv, prev)
    })
    .unwrap();
    assert_eq!(down(s, &recv), all[prev], "{}", ctx("group ring"));
    let mut recv = s.alloc_zeros::<T>(c).unwrap();
    comm.send_recv(&send, next, &mut recv, prev).unwrap();
    assert_eq!(down(s, &recv), all[prev], "{}", ctx("send_recv"));
}

#[test]
#[ignore = "needs 2 GPUs"]
fn all_to_all_gather_scatter_emulated_with_send_recv() {
    // The path taken on NCCL < 2.28, forced on a newer library.
    nccl::collective::force_p2p_emulation(true);
    run_ranks(2, |comm, s| {
        check_collectives::<f32>(comm, s);
        check_collectives::<i8>(comm, s);
    });
    nccl::collective::force_p2p_emulation(false);
}

fn check_all_types(comm: &Communicator, s: &Arc<CudaStream>) {
    check_collectives::<i8>(comm, s);
    check_collectives::<u8>(comm, s);
    check_collectives::<i32>(comm, s);
    check_collectives::<u32>(comm, s);
    check_collectives::<i64>(comm, s);
    check_collectives::<u64>(comm, s);
    check_collectives::<half::f16>(comm, s);
    check_collectives::<f32>(comm, s);
    check_collectives::<f64>(comm, s);
    check_collectives::<half::bf16>(comm, s);
    if nccl::version().unwrap().at_least(nccl::version::since::FP8) {
        check_collectives::<float8::F8E4M3>(comm, s);
        check_collectives::<float8::F8E5M2>(comm, s);
    }
}

#[test]
#[ignore = "needs 1 GPU"]
fn every_collective_every_type_world_1() {
    run_ranks(1, check_all_types);
}

#[test]
#[ignore = "needs 2 GPUs"]
fn every_collective_every_type_world_2() {
    run_ranks(2, check_all_types);
}

#[test]
#[ignore = "needs 2+ GPUs (uses all visible)"]
fn every_collective_every_type_all_gpus() {
    run_ranks(gpus().max(2), check_all_types);
}

#[test]
#[ignore = "needs 2+ GPUs (uses all visible)"]
fn one_thread_drives_all_gpus_with_init_all_and_group() {
    let n = gpus().max(2);
    need(n);
    let streams: Vec<_> = (0..n)
        .map(|d| CudaContext::new(d).unwrap().new_stream().unwrap())
        .collect();
    let comms = Communicator::init_all_on(streams.clone()).unwrap();
    let c = 1000;
    let sends: Vec<CudaSlice<f32>> = (0..n).map(|r| up(&streams[r], &vec![(r + 1) as f64; c])).collect();
    let mut recvs: Vec<CudaSlice<f32>> = (0..n).map(|r| streams[r].alloc_zeros(c).unwrap()).collect();
    nccl::group(|g| {
        for ((comm, send), recv) in comms.iter().zip(&sends).zip(recvs.iter_mut()) {
            g.all_reduce(comm, send, recv, ReduceOp::Sum)?;
        }
        Ok(())
    })
    .unwrap();
    let want = (n * (n + 1) / 2) as f64;
    for r in 0..n {
        assert_eq!(down(&streams[r], &recvs[r]), vec![want; c], "rank {r}");
    }
    // A typed non-group call inside a group is refused (its events would be recorded too early).
    let err = nccl::group(|_| comms[0].all_reduce(&sends[0], &mut recvs[0], ReduceOp::Sum)).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    // Teardown of communicators driven by one thread: abort them together.
    for c in comms {
        c.abort().unwrap();
    }
}

#[test]
#[ignore = "needs 2+ GPUs (uses all visible)"]
fn split_by_parity() {
    let n = gpus().max(2);
    run_ranks(n, |comm, s| {
        let r = comm.rank();
        let child = comm
            .split(Some((r % 2) as u32), r as i32, None)
            .unwrap()
            .expect("every rank has a color");
        let size = (0..n).filter(|q| q % 2 == r % 2).count();
        assert_eq!(child.size(), size);
        assert_eq!(child.rank(), r / 2);
        let mut buf = up::<i32>(s, &[r as f64; 16]);
        child.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
        let want: f64 = (0..n).filter(|q| q % 2 == r % 2).map(|q| q as f64).sum();
        assert_eq!(down(s, &buf), vec![want; 16]);
        child.finalize().unwrap();
        // NCCL_SPLIT_NOCOLOR: rank 0 takes part without joining.
        let color = if r == 0 { None } else { Some(0) };
        let child = comm.split(color, 0, None).unwrap();
        assert_eq!(child.is_none(), r == 0);
        if let Some(c) = child {
            assert_eq!(c.size(), n - 1);
            c.finalize().unwrap();
        }
    });
}

#[test]
#[ignore = "needs 3+ GPUs (uses all visible)"]
fn shrink_excludes_the_last_rank() {
    let n = gpus().max(3);
    if !nccl::version().unwrap().at_least(nccl::version::since::SHRINK) {
        return;
    }
    run_ranks(n, |comm, s| {
        let last = comm.size() - 1;
        if comm.rank() == last {
            return; // excluded ranks do not call shrink
        }
        let small = comm.shrink(&[last], None, nccl::ShrinkMode::Default).unwrap();
        assert_eq!(small.size(), n - 1);
        let mut buf = up::<f32>(s, &[1.0; 8]);
        small.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
        assert_eq!(down(s, &buf), vec![(n - 1) as f64; 8]);
        small.finalize().unwrap();
    });
}

/// `synchronize_within`: an all-reduce whose peer never joins is not waited for past the bound; the
/// communicator is aborted (its kernel ended) and the call says `Timeout`. Rank 1 joins the communicator,
/// then issues nothing until rank 0 has given up.
#[test]
#[ignore = "needs 2 GPUs"]
fn a_bounded_synchronize_gives_up_on_a_peer_that_never_joins() {
    need(2);
    let id = UniqueId::new().unwrap();
    let config = Config::new();
    let gave_up = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        for rank in 0..2 {
            let (id, config, gave_up) = (&id, &config, &gave_up);
            s.spawn(move || {
                let stream = CudaContext::new(rank).unwrap().new_stream().unwrap();
                let comm = Communicator::init_rank_config_on(stream.clone(), id, rank, 2, config).unwrap();
                if rank == 0 {
                    let mut buf = up::<f32>(&stream, &[1.0; 1 << 16]);
                    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
                    let start = Instant::now();
                    let err = comm.synchronize_within(Duration::from_secs(2)).unwrap_err();
                    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
                    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
                    assert!(comm.is_aborted());
                    let _ = stream.synchronize(); // the aborted kernel has exited
                }
                gave_up.wait();
                if rank == 1 {
                    comm.abort().unwrap(); // its peer is gone: abort, not destroy
                }
            });
        }
    });
}

#[test]
#[ignore = "needs 2 GPUs"]
fn watchdog_aborts_a_hung_all_reduce() {
    need(2);
    let id = UniqueId::new().unwrap();
    let config = Config::new();
    std::thread::scope(|s| {
        for rank in 0..2 {
            let (id, config) = (&id, &config);
            s.spawn(move || {
                let stream = CudaContext::new(rank).unwrap().new_stream().unwrap();
                // Non-blocking, so host calls return at once and the watchdog's abort gets in between polls.
                let comm =
                    Communicator::init_rank_timeout_on(stream.clone(), id, rank, 2, config, Duration::from_secs(120))
                        .unwrap();
                let handle = comm.abort_handle();
                let watchdog = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(3));
                    handle.abort().unwrap();
                    assert!(handle.is_aborted());
                });
                let start = Instant::now();
                if rank == 0 {
                    // Rank 1 never joins: this all_reduce cannot complete until the watchdog aborts it.
                    let send = up::<f32>(&stream, &[1.0; 1 << 20]);
                    let mut recv = stream.alloc_zeros::<f32>(1 << 20).unwrap();
                    let res = comm
                        .all_reduce(&send, &mut recv, ReduceOp::Sum)
                        .and_then(|()| comm.synchronize());
                    match res {
                        Err(Error::Aborted { .. }) | Err(Error::Nccl { .. }) | Ok(()) => {}
                        Err(e) => panic!("unexpected error after abort: {e}"),
                    }
                    let _ = stream.synchronize(); // the aborted kernel has exited
                }
                watchdog.join().unwrap();
                assert!(start.elapsed() < Duration::from_secs(60), "the abort released the hang");
                assert!(comm.is_aborted());
                let mut buf = stream.alloc_zeros::<f32>(4).unwrap();
                assert!(matches!(
                    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum),
                    Err(Error::Aborted { .. })
                ));
                comm.abort().unwrap(); // idempotent
            });
        }
    });
}

#[test]
#[ignore = "needs 2 GPUs"]
fn non_blocking_init_completes_and_collectives_poll() {
    need(2);
    let id = UniqueId::new().unwrap();
    std::thread::scope(|s| {
        for rank in 0..2 {
            let id = &id;
            s.spawn(move || {
                let stream = CudaContext::new(rank).unwrap().new_stream().unwrap();
                let cfg = Config::new().comm_name("nb-test").unwrap();
                let comm =
                    Communicator::init_rank_timeout_on(stream.clone(), id, rank, 2, &cfg, Duration::from_secs(120))
                        .unwrap();
                assert!(comm.is_non_blocking() && comm.is_ready().unwrap());
                let mut buf = up::<i64>(&stream, &[(rank + 1) as f64; 1000]);
                comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
                assert_eq!(down(&stream, &buf), vec![3.0; 1000]);
                assert!(comm.async_error().unwrap().is_none());
                comm.finalize().unwrap();
            });
        }
    });
}

#[test]
#[ignore = "needs 1 GPU"]
fn non_blocking_init_times_out_when_a_rank_never_arrives() {
    need(1);
    let id = UniqueId::new().unwrap();
    let stream = CudaContext::new(0).unwrap().new_stream().unwrap();
    let start = Instant::now();
    let err =
        Communicator::init_rank_timeout_on(stream, &id, 0, 2, &Config::new(), Duration::from_secs(3)).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
#[ignore = "needs 1 GPU"]
fn bad_input_is_refused_before_nccl_sees_it() {
    run_ranks(1, |comm, s| {
        let send = s.alloc_zeros::<f32>(10).unwrap();
        let mut recv = s.alloc_zeros::<f32>(9).unwrap();
        let err = comm.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LengthMismatch {
                    expected: 10,
                    actual: 9,
                    ..
                }
            ),
            "{err:?}"
        );
        let mut big = s.alloc_zeros::<f32>(11).unwrap();
        assert!(matches!(
            comm.all_gather(&send, &mut big),
            Err(Error::LengthMismatch { expected: 10, .. })
        ));
        assert!(matches!(
            comm.broadcast_in_place(&mut big, 1),
            Err(Error::InvalidRank { what: "root", .. })
        ));
        assert!(matches!(
            comm.send(&send, 5),
            Err(Error::InvalidRank { what: "peer", .. })
        ));
        // A PreMulSum is typed: one made for f64 cannot reduce f32.
        let op = comm.pre_mul_sum(2.0f64).unwrap();
        assert!(matches!(
            comm.all_reduce(&send, &mut big, &op),
            Err(Error::InvalidArgument { .. }) | Err(Error::LengthMismatch { .. })
        ));
        let mut ok = s.alloc_zeros::<f32>(10).unwrap();
        assert!(matches!(
            comm.all_reduce(&send, &mut ok, &op),
            Err(Error::InvalidArgument { .. })
        ));
        let op32 = comm.pre_mul_sum(3.0f32).unwrap();
        let mut b = up::<f32>(s, &[2.0; 10]);
        comm.all_reduce_in_place(&mut b, &op32).unwrap();
        assert_eq!(down(s, &b), vec![6.0; 10]);
    });
}

#[test]
#[ignore = "needs 2 GPUs"]
fn buffers_on_another_device_are_refused() {
    need(2);
    let other = CudaContext::new(1).unwrap().new_stream().unwrap();
    run_ranks(1, |comm, s| {
        let send = other.alloc_zeros::<f32>(4).unwrap();
        let mut recv = s.alloc_zeros::<f32>(4).unwrap();
        let err = comm.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap_err();
        assert!(err.to_string().contains("device 1"), "{err}");
    });
}

#[test]
#[ignore = "needs 2+ GPUs (uses all visible)"]
fn registered_buffers_and_nccl_memory() {
    let n = gpus().max(2);
    run_ranks(n, |comm, s| {
        let r = comm.rank();
        let sum = (n * (n + 1) / 2) as f64;
        // ncclMemAlloc memory, tracked with events like a CudaSlice.
        let mut mem = nccl::DeviceMemory::<f32>::alloc_zeros(s, 4096).unwrap();
        let mine = up::<f32>(s, &[(r + 1) as f64; 4096]);
        comm.all_reduce(&mine, &mut mem, ReduceOp::Sum).unwrap();
        // Registered (NCCL's recommended memory for registration), used in place through the registration.
        let mut reg = comm.register(mem).unwrap();
        comm.all_reduce_in_place(&mut reg, ReduceOp::Sum).unwrap();
        let mem = reg.into_inner();
        let mut out = s.alloc_zeros::<f32>(4096).unwrap();
        comm.all_reduce(&mem, &mut out, ReduceOp::Max).unwrap();
        assert_eq!(down(s, &out), vec![n as f64 * sum; 4096]);
        if nccl::version().unwrap().at_least(nccl::version::since::SHRINK) {
            let mem = nccl::DeviceMemory::<f32>::alloc_zeros(s, 1 << 20).unwrap();
            let mut win = comm
                .register_window(mem, nccl::register::window_flags::COLL_SYMMETRIC)
                .unwrap();
            comm.all_reduce_in_place(&mut win, ReduceOp::Sum).unwrap();
            comm.synchronize().unwrap();
        }
    });
}

/// Programs written against the backend trait run on NCCL unchanged.
fn generic_sum<C: Collectives<Buf<f32> = CudaSlice<f32>>>(c: &C, s: &Arc<CudaStream>) -> Vec<f64> {
    let send = up::<f32>(s, &[c.rank() as f64 + 1.0; 8]);
    let mut recv = s.alloc_zeros::<f32>(8).unwrap();
    c.all_reduce::<f32>(&send, &mut recv, ReduceOp::Sum).unwrap();
    c.barrier().unwrap();
    down(s, &recv)
}

#[test]
#[ignore = "needs 2 GPUs"]
fn collectives_trait_on_nccl() {
    let out = run_ranks(2, generic_sum::<Communicator>);
    assert_eq!(out, vec![vec![3.0; 8]; 2]);
}

/// The README's example, verbatim: one thread per GPU, an in-place all-reduce, exact check.
fn readme_example() -> Result<(), Box<dyn std::error::Error>> {
    use nccl::{cudarc::driver::CudaContext, Communicator, ReduceOp, UniqueId};
    let n = nccl::cuda_device_count();
    let id = UniqueId::new()?; // the same id on every rank (across processes: send id.as_bytes())
    std::thread::scope(|s| {
        let ranks: Vec<_> = (0..n)
            .map(|rank| {
                s.spawn(move || -> nccl::Result<f32> {
                    let stream = CudaContext::new(rank).unwrap().new_stream().unwrap();
                    let comm = Communicator::init_rank_on(stream.clone(), &id, rank, n)?;
                    let mut buf = stream.clone_htod(&vec![rank as f32; 1 << 20]).unwrap();
                    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)?;
                    let first = stream.clone_dtoh(&buf).unwrap()[0];
                    comm.finalize()?;
                    Ok(first)
                })
            })
            .collect();
        for r in ranks {
            assert_eq!(r.join().unwrap()?, (n * (n - 1) / 2) as f32);
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs 1+ GPUs (uses all visible)"]
fn readme_example_runs() {
    need(1);
    readme_example().unwrap();
}

/// Non-blocking rank threads: `f` gets the communicator (created with `init_rank_timeout_on`) and its stream.
fn run_non_blocking<R: Send>(n: usize, f: impl Fn(&Communicator, &Arc<CudaStream>) -> R + Sync) -> Vec<R> {
    need(n);
    let id = UniqueId::new().unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let (f, id) = (&f, &id);
                s.spawn(move || {
                    let stream = CudaContext::new(rank).unwrap().new_stream().unwrap();
                    let comm = Communicator::init_rank_timeout_on(
                        stream.clone(),
                        id,
                        rank,
                        n,
                        &Config::new(),
                        Duration::from_secs(120),
                    )
                    .unwrap();
                    assert!(comm.is_non_blocking());
                    let out = f(&comm, &stream);
                    comm.finalize().unwrap();
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

/// Issue 12 item 1: on a non-blocking parent NCCL fills the child's slot after `ncclCommSplit` /
/// `ncclCommShrink` returned `ncclInProgress`; the crate keeps the slot on the heap and reads it only once
/// the parent is done. The children must be usable (and NOCOLOR ranks get `None`).
#[test]
#[ignore = "needs 2+ GPUs (uses all visible)"]
fn split_and_shrink_of_a_non_blocking_parent() {
    let n = gpus().max(2);
    run_non_blocking(n, |comm, s| {
        let r = comm.rank();
        let child = comm
            .split(Some((r % 2) as u32), r as i32, None)
            .unwrap()
            .expect("a color");
        assert!(child.is_non_blocking(), "the child inherits the parent's config");
        let mut buf = up::<i32>(s, &[1.0; 64]);
        child.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
        assert_eq!(down(s, &buf), vec![child.size() as f64; 64]);
        child.finalize().unwrap();
        let none = comm.split(if r == 0 { None } else { Some(1) }, 0, None).unwrap();
        assert_eq!(none.is_none(), r == 0);
        if let Some(c) = none {
            c.finalize().unwrap();
        }
        if n >= 3 && nccl::version().unwrap().at_least(nccl::version::since::SHRINK) {
            let last = n - 1;
            if r != last {
                let small = comm.shrink(&[last], None, nccl::ShrinkMode::Default).unwrap();
                assert_eq!(small.size(), n - 1);
                small.finalize().unwrap();
            }
        }
    });
}

/// Issue 12 item 2 on a real communicator: split, finalize and abort inside a group are refused with
/// `InsideGroup` and leave the communicator working.
#[test]
#[ignore = "needs 1 GPU"]
fn teardown_and_split_are_refused_inside_a_group() {
    run_ranks(1, |comm, s| {
        let handle = comm.abort_handle();
        let err = nccl::group(|_| comm.split(Some(0), 0, None).map(drop)).unwrap_err();
        assert!(matches!(err, Error::InsideGroup { op: "ncclCommSplit" }), "{err:?}");
        let err = nccl::group(|_| handle.abort()).unwrap_err();
        assert!(matches!(err, Error::InsideGroup { op: "ncclCommAbort" }), "{err:?}");
        assert!(handle.is_live());
        let mut buf = up::<f32>(s, &[2.0; 8]);
        comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
        assert_eq!(down(s, &buf), vec![2.0; 8]);
    });
}

/// Issue 12 item 4: with a single stream (cudarc's events are then never recorded) dropping `DeviceMemory`
/// must still wait for the queued collectives before `ncclMemFree`; a free under a running kernel shows as
/// a CUDA error on the next synchronize.
#[test]
#[ignore = "needs 1 GPU"]
fn device_memory_free_waits_for_queued_work_in_single_stream_mode() {
    need(1);
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    let id = UniqueId::new().unwrap();
    let comm = Communicator::init_rank_on(stream.clone(), &id, 0, 1).unwrap();
    assert!(
        !ctx.is_managing_stream_synchronization(),
        "the test needs single-stream mode"
    );
    for _ in 0..4 {
        let mut mem = nccl::DeviceMemory::<f32>::alloc_zeros(&stream, 64 << 20).unwrap();
        for _ in 0..20 {
            comm.all_reduce_in_place(&mut mem, ReduceOp::Sum).unwrap();
        }
        drop(mem); // must wait for the 20 all-reduces
    }
    stream.synchronize().expect("no kernel ran on freed memory");
    comm.finalize().unwrap();
}

/// Issue 12 item 5: a panic inside a group of non-blocking communicators waits until NCCL launched the
/// work before the buffers are released by the unwind.
#[test]
#[ignore = "needs 1 GPU"]
fn panic_inside_a_group_of_non_blocking_comms_releases_buffers_safely() {
    run_non_blocking(1, |comm, s| {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let send = up::<f32>(s, &[1.0; 1 << 22]);
            let mut recv = s.alloc_zeros::<f32>(1 << 22).unwrap();
            let _ = nccl::group(|g| -> nccl::Result<()> {
                g.all_reduce(comm, &send, &mut recv, ReduceOp::Sum)?;
                panic!("user code panics after queueing");
            });
        }));
        assert!(caught.is_err());
        assert!(!nccl::group::in_group());
        s.synchronize().expect("the queued all-reduce ran on live buffers");
        // Either the wait completed (usable) or it failed and the communicator was aborted.
        if !comm.is_aborted() {
            assert!(comm.is_ready().unwrap());
            let mut buf = up::<f32>(s, &[3.0; 16]);
            comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
            assert_eq!(down(s, &buf), vec![3.0; 16]);
        }
    });
}

/// Issue 12 item 6: streams and buffers of a non-primary context on the communicator's own device are
/// refused (comparing ordinals let them through).
#[test]
#[ignore = "needs 1 GPU"]
fn non_primary_contexts_are_refused() {
    need(1);
    let foreign = CudaContext::new_non_primary(0, 0).unwrap();
    let fstream = foreign.default_stream();
    let id = UniqueId::new().unwrap();
    let err = Communicator::init_rank_on(fstream.clone(), &id, 0, 1).unwrap_err();
    assert!(err.to_string().contains("non-primary"), "{err}");
    run_ranks(1, |comm, s| {
        let send = fstream.alloc_zeros::<f32>(4).unwrap();
        let mut recv = s.alloc_zeros::<f32>(4).unwrap();
        let err = comm.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap_err();
        assert!(err.to_string().contains("another CUDA context"), "{err}");
    });
}

/// Issue 12 item 8: dropping a non-blocking communicator right after queueing work neither hangs nor
/// destroys it while NCCL still works on it (Drop waits, bounded, then destroys).
#[test]
#[ignore = "needs 1 GPU"]
fn dropping_a_busy_non_blocking_communicator_returns() {
    need(1);
    let stream = CudaContext::new(0).unwrap().new_stream().unwrap();
    let id = UniqueId::new().unwrap();
    let comm =
        Communicator::init_rank_timeout_on(stream.clone(), &id, 0, 1, &Config::new(), Duration::from_secs(60)).unwrap();
    let mut buf = up::<f32>(&stream, &[1.0; 1 << 22]);
    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
    let start = Instant::now();
    drop(comm);
    assert!(start.elapsed() < nccl::comm::DROP_WAIT + Duration::from_secs(5));
    stream.synchronize().unwrap();
    assert_eq!(down(&stream, &buf)[..4], [1.0; 4]);
}

/// Two non-blocking ranks where rank 0 runs `work` (bounded by a 3 s `Config::wait_timeout`) and rank 1 never
/// joins it: rank 1 only waits until rank 0 is done, then aborts. Returns rank 0's error and how long it took;
/// checks that rank 0's communicator was aborted.
fn lonely_rank_zero(work: impl Fn(&Communicator, &Arc<CudaStream>) -> Error + Sync) -> (Error, Duration) {
    need(2);
    let id = UniqueId::new().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let (id, work) = (&id, &work);
        let zero = s.spawn(move || {
            let stream = CudaContext::new(0).unwrap().new_stream().unwrap();
            let cfg = Config::new().wait_timeout(Duration::from_secs(3));
            let comm =
                Communicator::init_rank_timeout_on(stream.clone(), id, 0, 2, &cfg, Duration::from_secs(120)).unwrap();
            let start = Instant::now();
            let err = work(&comm, &stream);
            let took = start.elapsed();
            tx.send(()).unwrap();
            assert!(comm.is_aborted(), "the timeout aborted the communicator");
            (err, took)
        });
        let one = s.spawn(move || {
            let stream = CudaContext::new(1).unwrap().new_stream().unwrap();
            let comm =
                Communicator::init_rank_timeout_on(stream, id, 1, 2, &Config::new(), Duration::from_secs(120)).unwrap();
            let _ = rx.recv_timeout(Duration::from_secs(120));
            comm.abort().unwrap();
        });
        one.join().expect("rank 1");
        zero.join().expect("rank 0")
    })
}

/// Issue 12, remaining item 1: a split that a rank never joins kept the caller polling forever (only an
/// AbortHandle ended it). Now it returns `Error::Timeout` after the parent's `wait_timeout`, the parent aborted.
#[test]
#[ignore = "needs 2 GPUs"]
fn split_times_out_when_a_rank_never_joins() {
    let (err, took) = lonely_rank_zero(|comm, _| comm.split(Some(0), 0, None).map(drop).unwrap_err());
    assert!(
        matches!(
            err,
            Error::Timeout {
                op: "ncclCommSplit",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(60),
        "{took:?}"
    );
}

/// The same for `ncclGroupEnd`: a first send to a peer that never posts its receive makes NCCL connect to it in
/// the background (`ncclInProgress`); the group's wait is bounded by the communicator's `wait_timeout`.
#[test]
#[ignore = "needs 2 GPUs"]
fn group_end_times_out_when_the_peer_never_connects() {
    let (err, took) = lonely_rank_zero(|comm, s| {
        let buf = up::<f32>(s, &[1.0; 1024]);
        nccl::group(|g| g.send(comm, &buf, 1)).unwrap_err()
    });
    assert!(matches!(err, Error::Timeout { op: "ncclGroupEnd", .. }), "{err:?}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(60),
        "{took:?}"
    );
}

/// CUDA graphs (`nccl::graph`) at world size 1: an out-of-place all-reduce and an in-place doubling
/// (PreMulSum 2, so every launch shows) captured once and launched 3 times give what 3 eager rounds give; the
/// capture itself runs nothing.
#[test]
#[ignore = "needs 1 GPU"]
fn graph_all_reduce_world_1_launched_3_times_matches_eager() {
    use nccl::graph::{Capture, CaptureMode};
    run_ranks(1, |comm, s| {
        nccl::graph::require_nccl_capture().unwrap();
        let premul = nccl::version().unwrap().at_least(nccl::version::since::PREMULSUM);
        let input: Vec<f32> = (0..4096).map(|i| (i % 17) as f32).collect();
        let rounds = |acc: &mut CudaSlice<f32>, recv: &mut CudaSlice<f32>, send: &CudaSlice<f32>| {
            comm.all_reduce(send, recv, ReduceOp::Sum).unwrap();
            if premul {
                comm.all_reduce_in_place(acc, ReduceOp::PreMulSum(2.0)).unwrap();
            }
        };
        let send = s.clone_htod(&input).unwrap();

        let mut eager_acc = s.clone_htod(&input).unwrap();
        let mut eager_recv = s.alloc_zeros::<f32>(input.len()).unwrap();
        for _ in 0..3 {
            rounds(&mut eager_acc, &mut eager_recv, &send);
        }
        s.synchronize().unwrap();

        let mut acc = s.clone_htod(&input).unwrap();
        let mut recv = s.alloc_zeros::<f32>(input.len()).unwrap();
        s.synchronize().unwrap();
        assert!(s.context().is_event_tracking());
        // SAFETY: one thread, one stream, nothing else on this context.
        let capture = unsafe { Capture::begin(s, CaptureMode::ThreadLocal) }.unwrap();
        assert!(!s.context().is_event_tracking(), "tracking is off while capturing");
        rounds(&mut acc, &mut recv, &send);
        let graph = capture.end().unwrap();
        assert!(s.context().is_event_tracking(), "tracking is restored");
        assert_eq!(
            s.capture_status().unwrap(),
            cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        );
        s.synchronize().unwrap();
        assert!(
            s.clone_dtoh(&recv).unwrap().iter().all(|&x| x == 0.0),
            "capturing ran nothing"
        );
        assert_eq!(s.clone_dtoh(&acc).unwrap(), input, "capturing ran nothing");
        graph.upload().unwrap();
        for _ in 0..3 {
            // SAFETY: `acc`, `recv` and `send`, the buffers the capture used, are alive until the end.
            unsafe { graph.launch() }.unwrap();
        }
        s.synchronize().unwrap();
        let eager_acc = s.clone_dtoh(&eager_acc).unwrap();
        assert_eq!(s.clone_dtoh(&recv).unwrap(), s.clone_dtoh(&eager_recv).unwrap());
        assert_eq!(s.clone_dtoh(&recv).unwrap(), input);
        assert_eq!(s.clone_dtoh(&acc).unwrap(), eager_acc);
        if premul {
            let x8: Vec<f32> = input.iter().map(|x| x * 8.0).collect();
            assert_eq!(eager_acc, x8);
        }
        drop(graph);
        // The stream and the buffers still work eagerly after the graph is gone.
        comm.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap();
        assert_eq!(s.clone_dtoh(&recv).unwrap(), input);
    });
}

/// A capture abandoned on an error (`?`) or a panic ends: the stream leaves capture mode, event tracking is
/// back on, and eager collectives work again.
#[test]
#[ignore = "needs 1 GPU"]
fn graph_capture_abandoned_on_error_or_panic_leaves_the_stream_usable() {
    use cudarc::driver::sys::CUstreamCaptureStatus as Status;
    use nccl::graph::{Capture, CaptureMode};
    run_ranks(1, |comm, s| {
        let send = s.clone_htod(&[1.0f32; 64]).unwrap();
        let mut short = s.alloc_zeros::<f32>(63).unwrap();
        let mut captured = || -> nccl::Result<nccl::graph::Graph> {
            // SAFETY: one thread, one stream, nothing else on this context.
            let capture = unsafe { Capture::begin(s, CaptureMode::ThreadLocal) }?;
            assert_eq!(s.capture_status().unwrap(), Status::CU_STREAM_CAPTURE_STATUS_ACTIVE);
            comm.all_reduce(&send, &mut short, ReduceOp::Sum)?; // refused: 63 != 64
            capture.end()
        };
        let err = captured().unwrap_err();
        assert!(matches!(err, Error::LengthMismatch { .. }), "{err:?}");
        assert_eq!(s.capture_status().unwrap(), Status::CU_STREAM_CAPTURE_STATUS_NONE);
        assert!(s.context().is_event_tracking());

        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: as above.
            let _capture = unsafe { Capture::begin(s, CaptureMode::ThreadLocal) }.unwrap();
            panic!("boom while capturing");
        }));
        assert!(panicked.is_err());
        assert_eq!(s.capture_status().unwrap(), Status::CU_STREAM_CAPTURE_STATUS_NONE);
        assert!(s.context().is_event_tracking());

        let mut recv = s.alloc_zeros::<f32>(64).unwrap();
        comm.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap();
        assert_eq!(s.clone_dtoh(&recv).unwrap(), vec![1.0f32; 64]);
    });
}
