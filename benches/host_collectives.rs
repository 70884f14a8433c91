//! Host backend, 2 ranks as threads: all_reduce (f32 sum) and all_gather at 4 KiB, 1 MiB and 64 MiB, with a
//! single-thread memcpy of the same size as the reference measured in the same run.
//!
//! `cargo bench --bench host_collectives` (root package). Throughput is algbw: bytes of the (per-rank) all_reduce buffer,
//! bytes of the gathered output for all_gather.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nccl::host::{HostComm, HostOptions};
use nccl::{Collectives, ReduceOp};

#[derive(Clone, Copy)]
enum Job {
    AllReduce(usize),
    AllGather(usize),
}

/// Runs `job` `iters` times on rank 0 (this thread) while rank 1 runs it on a helper thread.
struct Pair {
    c0: HostComm,
    tx: mpsc::Sender<Option<(Job, u64)>>,
    done: mpsc::Receiver<()>,
    worker: Option<std::thread::JoinHandle<()>>,
}

fn run_job(c: &HostComm, job: Job, iters: u64, bufs: &mut (Vec<f32>, Vec<f32>)) {
    for _ in 0..iters {
        match job {
            Job::AllReduce(n) => c.all_reduce(&bufs.0[..n], &mut bufs.1[..n], ReduceOp::Sum).unwrap(),
            Job::AllGather(n) => c.all_gather(&bufs.0[..n / 2], &mut bufs.1[..n]).unwrap(),
        }
    }
}

impl Pair {
    fn new(max: usize) -> Pair {
        let mut cs = HostComm::threads(2, HostOptions::default()).unwrap();
        let c1 = cs.pop().unwrap();
        let c0 = cs.pop().unwrap();
        let (tx, rx) = mpsc::channel::<Option<(Job, u64)>>();
        let (dtx, done) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            let mut bufs = (vec![1f32; max], vec![0f32; max]);
            while let Ok(Some((job, iters))) = rx.recv() {
                run_job(&c1, job, iters, &mut bufs);
                dtx.send(()).unwrap();
            }
        });
        Pair {
            c0,
            tx,
            done,
            worker: Some(worker),
        }
    }

    fn time(&self, job: Job, iters: u64, bufs: &mut (Vec<f32>, Vec<f32>)) -> Duration {
        self.tx.send(Some((job, iters))).unwrap();
        let t = Instant::now();
        run_job(&self.c0, job, iters, bufs);
        let el = t.elapsed();
        self.done.recv().unwrap();
        el
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.tx.send(None);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn bench(c: &mut Criterion) {
    let sizes = [4usize << 10, 1 << 20, 64 << 20];
    let max = sizes[2] / 4;
    let pair = Pair::new(max);
    let mut bufs = (vec![1f32; max], vec![0f32; max]);
    let mut g = c.benchmark_group("host_2ranks");
    for bytes in sizes {
        let n = bytes / 4;
        if bytes >= 64 << 20 {
            g.sample_size(10).measurement_time(Duration::from_secs(4));
        } else {
            g.sample_size(30).measurement_time(Duration::from_secs(2));
        }
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(BenchmarkId::new("memcpy", bytes), &n, |b, &n| {
            b.iter(|| {
                bufs.1[..n].copy_from_slice(&bufs.0[..n]);
                std::hint::black_box(&bufs.1);
            })
        });
        g.bench_with_input(BenchmarkId::new("all_reduce_f32_sum", bytes), &n, |b, &n| {
            b.iter_custom(|iters| pair.time(Job::AllReduce(n), iters, &mut bufs))
        });
        g.bench_with_input(BenchmarkId::new("all_gather_f32", bytes), &n, |b, &n| {
            b.iter_custom(|iters| pair.time(Job::AllGather(n), iters, &mut bufs))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
