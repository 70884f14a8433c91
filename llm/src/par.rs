//! A rank's compute threads: the calling thread and `threads - 1` helpers that wait for work spinning, so
//! that one matrix product can be split over them with no trip through the kernel.
//!
//! A decoded token takes about 200 matrix products of tens of microseconds each. Split over a pool that
//! sleeps between them (rayon's `par_chunks_mut` called from a rank thread outside the pool, before this
//! module), every product paid two wake-ups through the kernel, and TP=1 decoded slower on 2 threads than on
//! one. Here the thread that asks is one of the workers (it takes tasks like the helpers), and a helper polls
//! for the next job: a few microseconds spinning, then yielding its core to anyone else who wants it (a
//! peer rank on an oversubscribed machine), and after [`PARK_AFTER`] without work it sleeps on a condition
//! variable until the next job wakes it.
//!
//! Tasks are handed out from a shared counter in runs that shrink as the job drains (guided self-scheduling:
//! a claim takes the remaining tasks over twice the team, at least one), so a helper that is descheduled
//! or slow takes fewer, a job of many small tasks costs a few claims per thread instead of one per task,
//! and its end is balanced to one task; each run is one call of the job's function ([`for_each_span`]
//! gives it as one slice). The results are the same whatever thread runs a task. Each thread that calls
//! [`for_each_run`] with `threads > 1` gets its own team, created at its first call and ended (helpers
//! joined) when that thread exits; a call from inside a task runs on the calling thread.

use std::any::Any;
use std::cell::{Cell, RefCell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper polls (spinning, then yielding) before it sleeps until the next job.
pub const PARK_AFTER: Duration = Duration::from_millis(2);
/// How long it spins before it starts yielding its core between polls.
const SPIN_FOR: Duration = Duration::from_micros(50);

/// `state` bits: the job's epoch (high 32), whether helpers may still join it, and how many did (low 31).
const OPEN: u64 = 1 << 31;
const JOINED: u64 = OPEN - 1;

fn epoch(state: u64) -> u64 {
    state >> 32
}

/// A job's work: `f(start, end)` runs tasks `start..end` (one claimed run).
type Task = dyn Fn(usize, usize) + Sync;

fn noop(_: usize, _: usize) {}

/// The job of one epoch: run every task `i < tasks`, in claimed runs, on a team of `threads`.
#[derive(Clone, Copy)]
struct Job {
    f: *const Task,
    tasks: usize,
    threads: usize,
}

/// A value on a cache line of its own (the counters are written by different threads).
#[repr(align(128))]
struct Line<T>(T);

struct Shared {
    state: Line<AtomicU64>,
    next: Line<AtomicUsize>,
    done: Line<AtomicUsize>,
    /// Written by the leader only while no job is open and every helper that joined the last one is done;
    /// read by a helper only right after it joined an open job.
    job: UnsafeCell<Job>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: every field but `job` is Sync; `job` is accessed as its comment says: written by the leader while
// no helper can read it (no job open and every joined helper done, which the leader observed with Acquire),
// read by helpers after joining with an AcqRel CAS on `state`, which the leader published with SeqCst after
// writing it. `Job::f` points to a `Sync` closure.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer in `job` is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// The helpers of one leader thread.
struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

thread_local! {
    static TEAM: RefCell<Option<Team>> = const { RefCell::new(None) };
    static IS_HELPER: Cell<bool> = const { Cell::new(false) };
}

impl Team {
    /// A leader and `threads - 1` helpers; `None` when a thread cannot be started (the work then runs on the
    /// calling thread alone).
    fn new(threads: usize) -> Option<Team> {
        let shared = Arc::new(Shared {
            state: Line(AtomicU64::new(0)),
            next: Line(AtomicUsize::new(0)),
            done: Line(AtomicUsize::new(0)),
            job: UnsafeCell::new(Job {
                f: &noop as &Task,
                tasks: 0,
                threads,
            }),
            panic: Mutex::new(None),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut team = Team {
            shared,
            helpers: Vec::new(),
        };
        for i in 1..threads {
            let s = team.shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("compute{i}"))
                .spawn(move || helper(&s))
                .ok()?; // `team` drops here: the helpers started so far are stopped and joined
            team.helpers.push(h);
        }
        Some(team)
    }

    fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs every task `i < tasks`, `f(start, end)` for each claimed run, on the leader (the calling
    /// thread) and whichever helpers join, and returns when all are done. A panic in any task is resumed
    /// here, after every task ended.
    fn run<'a>(&self, tasks: usize, f: &'a (dyn Fn(usize, usize) + Sync + 'a)) {
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for the helpers' view of `f`: they dereference it only
        // between joining this epoch and counting themselves done, and this function does not return (nor
        // unwind: the leader's own tasks run under catch_unwind) before every helper that joined is done.
        let f_static: *const Task =
            unsafe { std::mem::transmute::<&'a (dyn Fn(usize, usize) + Sync + 'a), &'static Task>(f) };
        let threads = self.threads();
        // SAFETY: no job is open (the last `run` closed its job and waited for its helpers), so no helper
        // reads `job` now: see `Shared::job`.
        unsafe {
            *s.job.get() = Job {
                f: f_static,
                tasks,
                threads,
            }
        };
        s.next.0.store(0, Ordering::Relaxed);
        s.done.0.store(0, Ordering::Relaxed);
        let e = epoch(s.state.0.load(Ordering::Relaxed)).wrapping_add(1) & 0xFFFF_FFFF;
        s.state.0.store((e << 32) | OPEN, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| take_tasks(s, f, tasks, threads)));
        let joined = (s.state.0.fetch_and(!OPEN, Ordering::AcqRel) & JOINED) as usize;
        let mut polls = 0u32;
        while s.done.0.load(Ordering::Acquire) < joined {
            // A joined helper is finishing its last task (or was descheduled in it): bounded by that task.
            polls = polls.saturating_add(1);
            if polls < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(p) = mine {
            resume_unwind(p);
        }
        let theirs = s.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Claims and runs tasks of the open job until none is left: each claim takes the next
/// `max(1, remaining / (2 · threads))` tasks ([`guided_claim`]), run by one call `f(start, end)`.
fn take_tasks(s: &Shared, f: &(dyn Fn(usize, usize) + Sync + '_), tasks: usize, threads: usize) {
    let mut cur = s.next.0.load(Ordering::Relaxed);
    while cur < tasks {
        let end = guided_claim(cur, tasks, threads);
        match s
            .next
            .0
            .compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => {
                f(cur, end);
                cur = s.next.0.load(Ordering::Relaxed);
            }
            Err(now) => cur = now,
        }
    }
}

/// The end of the run of tasks a claim at `next` takes (`next < tasks`): the remaining tasks over twice the
/// team, at least one.
fn guided_claim(next: usize, tasks: usize, threads: usize) -> usize {
    next + ((tasks - next) / (2 * threads.max(1))).max(1)
}

/// A helper's life: wait for a new epoch, join it while it is open, run tasks, count itself done.
fn helper(s: &Shared) {
    IS_HELPER.with(|h| h.set(true));
    // A team starts at epoch 0 with no job; reading the epoch here instead would miss a job opened before
    // this thread got to run.
    let mut seen = 0;
    while let Some(mut cur) = wait_for_job(s, seen) {
        while cur & OPEN != 0 {
            match s
                .state
                .0
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // SAFETY: joined an open job: `job` is this epoch's and stays valid until we count
                    // ourselves done (see `Shared::job` and `Team::run`).
                    let job = unsafe { *s.job.get() };
                    // SAFETY: as above, `job.f` outlives this use.
                    let f = unsafe { &*job.f };
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| take_tasks(s, f, job.tasks, job.threads))) {
                        let mut slot = s.panic.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(p);
                    }
                    s.done.0.fetch_add(1, Ordering::Release);
                    break;
                }
                Err(now) => cur = now,
            }
        }
        seen = epoch(cur);
    }
}

/// The state once its epoch differs from `seen` (spinning, then yielding, then sleeping), or `None` when
/// the team stops.
fn wait_for_job(s: &Shared, seen: u64) -> Option<u64> {
    let mut since = Instant::now();
    let mut polls = 0u32;
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return None;
        }
        let cur = s.state.0.load(Ordering::Acquire);
        if epoch(cur) != seen {
            return Some(cur);
        }
        polls = polls.wrapping_add(1);
        if polls % 64 != 0 {
            std::hint::spin_loop();
            continue;
        }
        let idle = since.elapsed();
        if idle < SPIN_FOR {
            continue;
        }
        if idle < PARK_AFTER {
            std::thread::yield_now();
            continue;
        }
        let mut g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        while !s.stop.load(Ordering::SeqCst) && epoch(s.state.0.load(Ordering::SeqCst)) == seen {
            // The timeout only bounds the wait; `run` and `drop` notify under the lock.
            g = s
                .wake
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.sleepers.fetch_sub(1, Ordering::SeqCst);
        drop(g);
        since = Instant::now();
    }
}

/// Runs `f(start, end)` over runs of tasks that together cover `0..tasks` once, on `threads` threads:
/// this one and the helpers of its team (started at the first call, or again when `threads` changes).
/// As one call `f(0, tasks)` on the calling thread when `threads <= 1`, `tasks <= 1`, when called from
/// inside a task, or when no helper thread can be started. A panic in a task is resumed on the calling
/// thread once every task has ended.
pub fn for_each_run(threads: usize, tasks: usize, f: impl Fn(usize, usize) + Sync) {
    let alone = |f: &dyn Fn(usize, usize)| {
        if tasks > 0 {
            f(0, tasks)
        }
    };
    if threads <= 1 || tasks <= 1 || IS_HELPER.with(|h| h.get()) {
        return alone(&f);
    }
    let f = &f;
    let ran = TEAM.try_with(|t| {
        let Ok(mut t) = t.try_borrow_mut() else {
            return alone(f); // inside a task of this thread's own job
        };
        if t.as_ref().map(Team::threads) != Some(threads) {
            *t = None; // the old team's helpers are joined before new ones start
            *t = Team::new(threads);
        }
        match t.as_ref() {
            Some(team) => team.run(tasks, f),
            None => alone(f),
        }
    });
    if ran.is_err() {
        alone(f); // this thread is exiting and its team is gone
    }
}

/// Runs `f(i)` for every `i < tasks` on `threads` threads as [`for_each_run`] (in order on the calling
/// thread when it runs alone).
pub fn for_each_index(threads: usize, tasks: usize, f: impl Fn(usize) + Sync) {
    for_each_run(threads, tasks, |start, end| (start..end).for_each(&f));
}

/// Runs `f(i, chunk)` for each `chunk`-sized piece of `data` (the last may be shorter), piece `i` starting
/// at `i * chunk`, on `threads` threads as [`for_each_index`].
pub fn for_each_chunk<T: Send>(threads: usize, data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    for_each_span(threads, data, chunk, |first, span| {
        for (k, piece) in span.chunks_mut(chunk.max(1)).enumerate() {
            f(first + k, piece)
        }
    });
}

/// Runs `f(i, span)` for runs of consecutive `chunk`-sized pieces of `data` that together cover it once,
/// `span` being pieces `i..` (so it starts at `i * chunk` and is a whole number of pieces, but for the
/// last), on `threads` threads as [`for_each_run`]: the whole of `data` in one call when alone. For work
/// whose pieces are independent and cheap to start (a product's rows), where one call per piece would
/// cost more than the balance it buys.
pub fn for_each_span<T: Send>(threads: usize, data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let len = data.len();
    let tasks = len.div_ceil(chunk);
    let base = SendPtr(data.as_mut_ptr());
    for_each_run(threads, tasks, |first, last| {
        let start = first * chunk;
        let end = (last * chunk).min(len);
        // SAFETY: `data` is borrowed mutably for this whole call; the run first..last gets elements
        // start..end, and the runs' ranges are disjoint (they cover each index < tasks once) and inside
        // `data` (end ≤ len).
        let span = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
        f(first, span)
    });
}

/// A pointer that tasks on other threads may use, each to its own disjoint part (which the user of it
/// must ensure).
pub(crate) struct SendPtr<T>(*mut T);
// SAFETY: the pointee type is Send and every task touches a disjoint part (see `for_each_chunk`).
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn new(p: *mut T) -> Self {
        SendPtr(p)
    }

    /// The pointer `k` elements on (a method, so closures capture the wrapper, not the raw pointer).
    ///
    /// # Safety
    /// `k` must be within the allocation.
    pub(crate) unsafe fn at(&self, k: usize) -> *mut T {
        // SAFETY: the caller keeps `k` inside the allocation.
        unsafe { self.0.add(k) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::thread::ThreadId;

    /// Runs `tasks` tasks on `threads` threads, task 0 waiting (up to 10 s) until a second thread has run
    /// one, and returns the threads that ran tasks.
    fn threads_that_ran(threads: usize, tasks: usize) -> HashSet<ThreadId> {
        let ids = Mutex::new(HashSet::new());
        for_each_index(threads, tasks, |i| {
            ids.lock().unwrap().insert(std::thread::current().id());
            let t0 = Instant::now();
            while i == 0 && ids.lock().unwrap().len() < 2 && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        ids.into_inner().unwrap()
    }

    #[test]
    fn every_index_runs_once_on_any_team_size() {
        for threads in [1, 2, 3, 8] {
            for tasks in [0, 1, 2, 7, 64, 1000] {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                for_each_index(threads, tasks, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "threads {threads} tasks {tasks}"
                );
            }
        }
    }

    #[test]
    fn guided_claims_shrink_to_one_task_and_cost_few_claims() {
        for threads in [1, 2, 3, 8] {
            for tasks in [1, 2, 7, 36, 192, 10_000] {
                let (mut next, mut runs) = (0, Vec::new());
                while next < tasks {
                    let end = guided_claim(next, tasks, threads);
                    assert!(
                        end > next && end <= tasks,
                        "threads {threads} tasks {tasks}: {next}..{end}"
                    );
                    runs.push(end - next);
                    next = end;
                }
                assert!(runs.windows(2).all(|w| w[1] <= w[0]), "runs grow: {runs:?}");
                assert_eq!(*runs.last().unwrap(), 1, "the job does not end on one task: {runs:?}");
                // Claims in all: at most 2·threads·(ln(tasks / (2·threads)) + 2), far fewer than tasks once
                // there are many (2 threads, 10 000 tasks: 33).
                let team = (2 * threads) as f64;
                let bound = team * ((tasks as f64 / team).max(1.0).ln() + 2.0);
                assert!(
                    runs.len() as f64 <= bound.min(tasks as f64),
                    "threads {threads} tasks {tasks}: {} claims",
                    runs.len()
                );
            }
        }
    }

    #[test]
    fn spans_are_whole_pieces_that_cover_the_slice_once() {
        for threads in [1, 2, 3] {
            for len in [0, 1, 15, 16, 17, 576, 1000] {
                let mut v = vec![0u32; len];
                let calls = AtomicUsize::new(0);
                for_each_span(threads, &mut v, 16, |first, span| {
                    calls.fetch_add(1, Ordering::Relaxed);
                    assert!(!span.is_empty(), "an empty span");
                    for (k, x) in span.iter_mut().enumerate() {
                        *x += (first * 16 + k) as u32 + 1; // its index in `v`, plus one
                    }
                });
                assert!(
                    v.iter().enumerate().all(|(k, &x)| x == k as u32 + 1),
                    "threads {threads} len {len}"
                );
                if threads == 1 {
                    assert_eq!(
                        calls.into_inner(),
                        usize::from(len > 0),
                        "alone: one call for all of it"
                    );
                }
            }
        }
    }

    #[test]
    fn chunks_cover_the_slice_and_helpers_take_part() {
        let mut v = vec![0usize; 10_001];
        for _ in 0..100 {
            for_each_chunk(2, &mut v, 7, |i, c| {
                for (k, x) in c.iter_mut().enumerate() {
                    *x += i * 7 + k;
                }
            });
        }
        assert!(v.iter().enumerate().all(|(k, &x)| x == 100 * k));
        assert_eq!(threads_that_ran(2, 64).len(), 2, "the helper never ran a task");
    }

    #[test]
    fn a_panicking_task_is_resumed_on_the_caller_and_the_team_still_works() {
        for victim in [0usize, 5, 63] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                for_each_index(2, 64, |i| {
                    std::thread::sleep(Duration::from_micros(10));
                    assert!(i != victim, "task {i} fails");
                })
            }));
            let msg = r.expect_err("the panic reaches the caller");
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert_eq!(msg, format!("task {victim} fails"));
            let sum = AtomicUsize::new(0);
            for_each_index(2, 100, |i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 4950);
        }
    }

    #[test]
    fn nested_calls_run_inline_and_a_parked_helper_wakes() {
        let total = AtomicUsize::new(0);
        for_each_index(2, 4, |_| {
            for_each_index(2, 4, |j| {
                total.fetch_add(j, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 6);
        // Past PARK_AFTER the helper sleeps; the next job must still reach it.
        std::thread::sleep(PARK_AFTER * 5);
        assert_eq!(threads_that_ran(2, 8).len(), 2, "the parked helper did not wake");
    }

    #[test]
    fn changing_the_size_replaces_the_team() {
        for threads in [2, 4, 2, 3] {
            let n = threads_that_ran(threads, 256).len();
            assert!((2..=threads).contains(&n), "threads {threads}: {n} threads ran tasks");
        }
    }
}
