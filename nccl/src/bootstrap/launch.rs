//! Launcher-less runs: `--nprocs N` re-executes the current program as N local worker processes with
//! torchrun-style variables, forwards their output, and stops them all when one fails.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::env::{Launcher, RankInfo, LOCAL_WORKER_VAR};
use super::error::{BootstrapError, Peer};

/// Explicit variables removed from the workers' environment (they would override the per-worker values).
const CLEARED: [&str; 6] = [
    "NCCL_RS_RANK",
    "NCCL_RS_WORLD_SIZE",
    "NCCL_RS_LOCAL_RANK",
    "NCCL_RS_LOCAL_WORLD_SIZE",
    "NCCL_RS_MASTER_ADDR",
    "NCCL_RS_MASTER_PORT",
];

/// If `nprocs` is `Some(n)` and this process is neither a spawned worker nor a rank of a multi-process launch by
/// another launcher (torchrun, mpirun, srun, explicit variables): re-executes the current program `n` times with the same
/// arguments and `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`,
/// `MASTER_PORT=<a free port>` and `NCCL_RS_LOCAL_WORKER=1` set, with their output going to this process's
/// output; waits for them; if one fails, gives the others 5 s to exit on their own (they report which rank
/// failed) and then kills them.
///
/// Returns `Ok(Some(code))` in the launching process (0 when all workers succeeded, else the first failing
/// worker's code; 128 + signal for a killed one): exit with it. Returns `Ok(None)` in a worker, in a process
/// started by another launcher, or when `nprocs` is `None`: continue normally, e.g. with
/// [`RankInfo::from_env`].
///
/// ```no_run
/// # fn main() -> Result<(), nccl::bootstrap::BootstrapError> {
/// let nprocs: Option<usize> = Some(2); // e.g. from a `--nprocs` flag
/// if let Some(code) = nccl::bootstrap::launch::spawn_local_if_requested(nprocs)? {
///     std::process::exit(code);
/// }
/// let info = nccl::bootstrap::RankInfo::from_env()?; // rank r of 2 in each worker
/// # Ok(()) }
/// ```
pub fn spawn_local_if_requested(nprocs: Option<usize>) -> Result<Option<i32>, BootstrapError> {
    let Some(n) = nprocs else { return Ok(None) };
    if std::env::var_os(LOCAL_WORKER_VAR).is_some() {
        return Ok(None);
    }
    // Already one rank of a multi-process launch: run as that rank. (A launch of one, e.g. `srun -n 1`, or an
    // environment that does not parse, is overridden: the workers' torchrun-style variables take precedence.)
    if let Ok(info) = RankInfo::from_env() {
        if info.launcher != Launcher::Single && info.world_size > 1 {
            if info.world_size != n {
                tracing::warn!(
                    nprocs = n,
                    world_size = info.world_size,
                    launcher = %info.launcher,
                    "--nprocs is ignored: this process was started by another launcher"
                );
            }
            return Ok(None);
        }
    }
    let exe = std::env::current_exe().map_err(|source| BootstrapError::Spawn {
        rank: 0,
        what: "finding the current executable",
        source,
    })?;
    let outcome = LocalLaunch::new(exe, n)
        .args(std::env::args_os().skip(1))
        .forward_sigterm(true)
        .run()?;
    Ok(Some(outcome.exit_code()))
}

/// A free TCP port on `host` right now (the OS picks it; another process could take it before it is used).
pub fn free_port(host: IpAddr) -> Result<u16, BootstrapError> {
    let io = |source| BootstrapError::Io {
        op: "picking a free port",
        peer: Peer::Unidentified { addr: None },
        source,
    };
    let l = TcpListener::bind((host, 0)).map_err(io)?;
    Ok(l.local_addr().map_err(io)?.port())
}

/// Starts `nprocs` local workers of a program with torchrun-style variables (the engine behind
/// [`spawn_local_if_requested`], usable directly, e.g. by tests).
#[derive(Debug, Clone)]
pub struct LocalLaunch {
    program: PathBuf,
    nprocs: usize,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    master_port: Option<u16>,
    capture: bool,
    kill_grace: Duration,
    forward_sigterm: bool,
    ranks: Option<Range<usize>>,
    death_signal: libc::c_int,
}

/// How one worker ended.
#[derive(Debug)]
pub struct WorkerExit {
    /// The worker's rank.
    pub rank: usize,
    /// Its exit status.
    pub status: ExitStatus,
    /// Whether the launcher killed it (after another worker failed).
    pub killed: bool,
    /// Its standard output, when captured ([`LocalLaunch::capture_output`]).
    pub stdout: Vec<u8>,
    /// Its standard error, when captured.
    pub stderr: Vec<u8>,
}

/// The result of [`LocalLaunch::run`].
#[derive(Debug)]
pub struct LaunchOutcome {
    /// Every worker started, in rank order.
    pub workers: Vec<WorkerExit>,
    /// The rank of the first worker seen failing, if any.
    pub first_failure: Option<usize>,
    /// The port rank 0 was told to listen on.
    pub master_port: u16,
}

/// An exit code for a status: the code, or 128 + the signal number for a killed process.
pub fn exit_code_of(status: &ExitStatus) -> i32 {
    if let Some(c) = status.code() {
        return c;
    }
    #[cfg(unix)]
    if let Some(sig) = std::os::unix::process::ExitStatusExt::signal(status) {
        return 128 + sig;
    }
    1
}

impl LaunchOutcome {
    /// 0 if every worker succeeded, else the exit code of the first failing worker.
    pub fn exit_code(&self) -> i32 {
        match self.first_failure {
            None => 0,
            Some(r) => match self
                .workers
                .iter()
                .find(|w| w.rank == r)
                .map(|w| exit_code_of(&w.status))
            {
                Some(0) | None => 1,
                Some(c) => c,
            },
        }
    }
}

impl LocalLaunch {
    /// `nprocs` workers of `program`.
    pub fn new(program: impl Into<PathBuf>, nprocs: usize) -> Self {
        LocalLaunch {
            program: program.into(),
            nprocs,
            args: Vec::new(),
            env: Vec::new(),
            master_port: None,
            capture: false,
            kill_grace: Duration::from_secs(5),
            forward_sigterm: false,
            ranks: None,
            death_signal: libc::SIGTERM,
        }
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an extra variable in every worker.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Uses this port for rank 0 instead of a free one.
    pub fn master_port(mut self, port: u16) -> Self {
        self.master_port = Some(port);
        self
    }

    /// Captures each worker's output into [`WorkerExit`] instead of passing it through.
    pub fn capture_output(mut self, capture: bool) -> Self {
        self.capture = capture;
        self
    }

    /// How long the other workers may take to exit on their own after one failed. Default 5 s.
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }

    /// While [`LocalLaunch::run`] waits, a SIGTERM to this process is passed on to every worker still
    /// running (as torchrun does) instead of ending the launcher at once: a supervisor that stops the
    /// launcher's PID gets the workers' own shutdown (a server drains its requests) and then their exit
    /// code. The previous SIGTERM disposition is restored when `run` returns. Off by default: the handler is
    /// process-wide, so only a program's own launcher (its main thread) should turn it on.
    pub fn forward_sigterm(mut self, forward: bool) -> Self {
        self.forward_sigterm = forward;
        self
    }

    /// The signal a worker gets when the thread that started it dies (Linux `PR_SET_PDEATHSIG`), so a killed
    /// launcher leaves no orphaned workers. Default `SIGTERM`, which lets a worker shut down cleanly;
    /// `SIGKILL` for workers that are of no use without their launcher (or ignore `SIGTERM`).
    pub fn parent_death_signal(mut self, signal: libc::c_int) -> Self {
        self.death_signal = signal;
        self
    }

    /// Starts only these ranks of the `nprocs`-rank world (default: all of them), for a program that is one
    /// of the ranks itself: e.g. `1..n` from rank 0, which then joins the rendezvous on
    /// [`LocalWorkers::master_port`] (give it a [`master_port`](Self::master_port) or read the chosen one).
    pub fn ranks(mut self, ranks: Range<usize>) -> Self {
        self.ranks = Some(ranks);
        self
    }

    /// Starts the workers and returns at once, with a handle that watches, signals and stops them (and
    /// kills those still running when dropped). [`forward_sigterm`](Self::forward_sigterm) applies to
    /// [`run`](Self::run) only.
    pub fn start(self) -> Result<LocalWorkers, BootstrapError> {
        let ranks = self.ranks.clone().unwrap_or(0..self.nprocs);
        if self.nprocs == 0 {
            return Err(BootstrapError::InvalidArgument {
                what: "nprocs",
                reason: "at least one process is needed".into(),
            });
        }
        if ranks.end > self.nprocs {
            return Err(BootstrapError::InvalidArgument {
                what: "ranks",
                reason: format!("ranks {ranks:?} are not all below nprocs {}", self.nprocs),
            });
        }
        let port = match self.master_port {
            Some(p) => p,
            None => free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?,
        };
        let mut workers = LocalWorkers {
            workers: Vec::with_capacity(ranks.len()),
            master_port: port,
        };
        for rank in ranks {
            let mut cmd = Command::new(&self.program);
            cmd.args(&self.args);
            for v in CLEARED {
                cmd.env_remove(v);
            }
            cmd.env("RANK", rank.to_string())
                .env("WORLD_SIZE", self.nprocs.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", self.nprocs.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env(LOCAL_WORKER_VAR, "1");
            for (k, v) in &self.env {
                cmd.env(k, v);
            }
            cmd.stdin(Stdio::null());
            #[cfg(target_os = "linux")]
            {
                use std::os::unix::process::CommandExt;
                let sig = self.death_signal;
                // SAFETY: the closure runs in the forked child before exec and only calls `prctl`, which is
                // async-signal-safe, allocates nothing and touches no lock. It asks the kernel to send `sig` to
                // the worker when the launching thread (which waits for the workers) dies, so a killed launcher
                // does not leave orphaned workers behind.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, sig) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            if self.capture {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            // On an error `workers` is dropped, which kills the ones already started.
            let mut child = cmd.spawn().map_err(|source| BootstrapError::Spawn {
                rank,
                what: "spawning the worker process",
                source,
            })?;
            let out = child.stdout.take().map(drain);
            let err = child.stderr.take().map(drain);
            workers.workers.push(Worker {
                rank,
                child,
                status: None,
                seen: false,
                out,
                err,
            });
        }
        Ok(workers)
    }

    /// Starts the workers and waits for all of them.
    pub fn run(self) -> Result<LaunchOutcome, BootstrapError> {
        let _sigterm = self.forward_sigterm.then(SigtermForward::install);
        let (grace, forward) = (self.kill_grace, self.forward_sigterm);
        let mut workers = self.start()?;
        let mut first_failure = None;
        let mut kill_at: Option<Instant> = None;
        while workers.running() > 0 {
            let mut progressed = false;
            while let Some((rank, status)) = workers.poll()? {
                progressed = true;
                if !status.success() && first_failure.is_none() {
                    first_failure = Some(rank);
                    kill_at = Some(Instant::now() + grace);
                    eprintln!(
                        "nccl-rs launch: rank {rank} exited with code {}; {} other worker(s) get {grace:?} to stop \
                         before being killed",
                        exit_code_of(&status),
                        workers.running()
                    );
                }
            }
            if forward && SIGTERM_SEEN.swap(false, Ordering::SeqCst) {
                workers.signal(libc::SIGTERM);
            }
            if kill_at.is_some_and(|t| Instant::now() >= t) {
                workers.kill_running();
            }
            if !progressed {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let master_port = workers.master_port;
        Ok(LaunchOutcome {
            workers: workers.collect(),
            first_failure,
            master_port,
        })
    }
}

/// One started worker.
struct Worker {
    rank: usize,
    child: Child,
    /// Its status once it exited, and whether this launcher killed it.
    status: Option<(ExitStatus, bool)>,
    /// Whether [`LocalWorkers::poll`] has reported its exit.
    seen: bool,
    out: Option<Drain>,
    err: Option<Drain>,
}

/// Workers started by [`LocalLaunch::start`], still owned by this process: it can watch them, signal them and
/// stop them. Dropping it kills and reaps every worker still running, so none outlives its handle.
pub struct LocalWorkers {
    workers: Vec<Worker>,
    master_port: u16,
}

impl std::fmt::Debug for LocalWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWorkers")
            .field("pids", &self.pids())
            .field("master_port", &self.master_port)
            .finish_non_exhaustive()
    }
}

impl LocalWorkers {
    /// The port rank 0 listens on (the workers were told it in `MASTER_PORT`).
    pub fn master_port(&self) -> u16 {
        self.master_port
    }

    /// `(rank, pid)` of every worker still running.
    pub fn pids(&self) -> Vec<(usize, u32)> {
        self.workers
            .iter()
            .filter(|w| w.status.is_none())
            .map(|w| (w.rank, w.child.id()))
            .collect()
    }

    /// How many workers are still running.
    pub fn running(&self) -> usize {
        self.workers.iter().filter(|w| w.status.is_none()).count()
    }

    /// A worker that has exited since the last call (its rank and status), without blocking; `None` when
    /// no new one has.
    pub fn poll(&mut self) -> Result<Option<(usize, ExitStatus)>, BootstrapError> {
        for w in &mut self.workers {
            if w.status.is_none() {
                let status = w.child.try_wait().map_err(|source| BootstrapError::Spawn {
                    rank: w.rank,
                    what: "waiting for the worker process",
                    source,
                })?;
                w.status = status.map(|s| (s, false));
            }
            if let (Some((status, _)), false) = (w.status, w.seen) {
                w.seen = true;
                return Ok(Some((w.rank, status)));
            }
        }
        Ok(None)
    }

    /// Sends `signal` to every worker still running.
    pub fn signal(&self, signal: libc::c_int) {
        for w in self.workers.iter().filter(|w| w.status.is_none()) {
            // SAFETY: kill(2) with a pid of our own child, which has not been waited for (its status is
            // unknown), so the pid still names it.
            unsafe { libc::kill(w.child.id() as libc::pid_t, signal) };
        }
    }

    /// Kills and reaps every worker still running.
    pub fn kill_running(&mut self) {
        for w in self.workers.iter_mut().filter(|w| w.status.is_none()) {
            let _ = w.child.kill();
            if let Ok(status) = w.child.wait() {
                w.status = Some((status, true));
            }
        }
    }

    /// Waits up to `grace` for every worker to exit on its own, kills the rest, and returns how each ended,
    /// in rank order.
    pub fn finish(mut self, grace: Duration) -> Result<Vec<WorkerExit>, BootstrapError> {
        let until = Instant::now() + grace;
        while self.running() > 0 && Instant::now() < until {
            if self.poll()?.is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill_running();
        Ok(self.collect())
    }

    /// Every worker's exit (all of them have exited).
    fn collect(mut self) -> Vec<WorkerExit> {
        std::mem::take(&mut self.workers)
            .into_iter()
            .filter_map(|mut w| {
                let (status, killed) = w.status?;
                Some(WorkerExit {
                    rank: w.rank,
                    status,
                    killed,
                    stdout: w.out.take().and_then(|h| h.join().ok()).unwrap_or_default(),
                    stderr: w.err.take().and_then(|h| h.join().ok()).unwrap_or_default(),
                })
            })
            .collect()
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        self.kill_running();
    }
}

/// Set by the SIGTERM handler of [`LocalLaunch::forward_sigterm`]; read by the wait loop.
static SIGTERM_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SIGTERM_SEEN.store(true, Ordering::SeqCst);
}

/// The SIGTERM handler while a launcher waits; the previous disposition comes back on drop.
struct SigtermForward {
    old: Option<libc::sigaction>,
}

impl SigtermForward {
    fn install() -> Self {
        SIGTERM_SEEN.store(false, Ordering::SeqCst);
        // SAFETY: `sigaction` structs are plain data (zeroed is a valid empty mask and no flags); the handler
        // only performs an atomic store, which is async-signal-safe; `old` receives the previous action.
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t;
            new.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            let ok = libc::sigaction(libc::SIGTERM, &new, &mut old) == 0;
            SigtermForward { old: ok.then_some(old) }
        }
    }
}

impl Drop for SigtermForward {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            // SAFETY: restores the action saved by `install`, a valid sigaction.
            unsafe { libc::sigaction(libc::SIGTERM, old, std::ptr::null_mut()) };
        }
    }
}

/// A thread collecting one pipe of a worker.
type Drain = JoinHandle<Vec<u8>>;

fn drain<R: std::io::Read + Send + 'static>(mut r: R) -> Drain {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}
