//! Creating each rank's communicators: ranks as threads of this process, or as processes (one per rank)
//! started by `--nprocs`, torchrun, mpirun or srun.
//!
//! A rank of a `tp × pp` layout (world rank `stage * tp + tp_rank`) gets a communicator over its TP group
//! (the ranks of its stage) and one over its pipeline group (the ranks with its `tp_rank`, one per stage). A
//! group of one rank gets [`SingleComm`].

use std::net::{IpAddr, Ipv4Addr};

use nccl::bootstrap::{launch, CancelToken, Launcher, RankInfo, Rendezvous, RendezvousOptions};
use nccl::host::{HostComm, HostOptions};

use crate::comm::{Comm, HostCollComm, SingleComm};
use crate::error::{EngineError, Result};
use crate::shard::Layout;

/// The two communicators of one rank.
pub struct RankComms {
    /// World rank (`stage * tp + tp_rank`).
    pub world_rank: usize,
    /// Over the ranks of this rank's stage; its rank is `tp_rank`.
    pub tp: Box<dyn Comm>,
    /// Over this rank's pipeline (one rank per stage); its rank is the stage.
    pub pp: Box<dyn Comm>,
}

impl std::fmt::Debug for RankComms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankComms")
            .field("world_rank", &self.world_rank)
            .finish_non_exhaustive()
    }
}

fn boxed(c: HostComm) -> Box<dyn Comm> {
    Box::new(HostCollComm(c))
}

/// Host communicators for every rank of `layout`, ranks as threads: element `w` is world rank `w`'s.
pub fn host_threads(layout: Layout) -> Result<Vec<RankComms>> {
    let (tp, pp) = (layout.tp, layout.pp);
    let mut tp_comms: Vec<Option<Box<dyn Comm>>> = (0..layout.world()).map(|_| None).collect();
    let mut pp_comms: Vec<Option<Box<dyn Comm>>> = (0..layout.world()).map(|_| None).collect();
    for stage in 0..pp {
        let group = layout.tp_group(stage);
        if tp == 1 {
            tp_comms[group[0]] = Some(Box::new(SingleComm));
        } else {
            for (w, c) in group.into_iter().zip(HostComm::threads(tp, HostOptions::default())?) {
                tp_comms[w] = Some(boxed(c));
            }
        }
    }
    for t in 0..tp {
        let group = layout.pp_group(t);
        if pp == 1 {
            pp_comms[group[0]] = Some(Box::new(SingleComm));
        } else {
            for (w, c) in group.into_iter().zip(HostComm::threads(pp, HostOptions::default())?) {
                pp_comms[w] = Some(boxed(c));
            }
        }
    }
    Ok(tp_comms
        .into_iter()
        .zip(pp_comms)
        .enumerate()
        .map(|(w, (t, p))| RankComms {
            world_rank: w,
            tp: t.expect("every rank is in a TP group"),
            pp: p.expect("every rank is in a pipeline"),
        })
        .collect())
}

/// In the parent of `--nprocs N`: starts the workers and returns their exit code. Returns `None` in a
/// worker (or when `nprocs` is `None`): continue with [`host_process`].
pub fn spawn_workers(nprocs: Option<usize>) -> Result<Option<i32>> {
    launch::spawn_local_if_requested(nprocs).map_err(|e| EngineError::Comm(e.into()))
}

/// True when this process is one rank of several (started by `--nprocs` or an outside launcher).
pub fn is_worker() -> Result<bool> {
    let info = RankInfo::from_env().map_err(|e| EngineError::Comm(e.into()))?;
    Ok(info.launcher != Launcher::Single || info.world_size > 1)
}

/// True in the one process that prints notices for the job: a single process, or rank 0 of launched ranks.
pub fn reports_notices() -> Result<bool> {
    let info = RankInfo::from_env().map_err(|e| EngineError::Comm(e.into()))?;
    Ok(info.rank == 0)
}

/// This process's place among launched ranks, checked against the layout, and the world rendezvous (shared
/// by the host and NCCL process modes).
fn world_rendezvous(layout: Layout) -> Result<(RankInfo, Rendezvous)> {
    let info = RankInfo::from_env().map_err(|e| EngineError::Comm(e.into()))?;
    world_rendezvous_as(layout, info, None)
}

/// The rendezvous options from the environment (as [`Rendezvous::for_rank`] takes them), with `cancel`.
fn rendezvous_options(info: &RankInfo, cancel: Option<&CancelToken>) -> Result<RendezvousOptions> {
    let mut opts = RendezvousOptions::from_env().map_err(|e| EngineError::Comm(e.into()))?;
    if info.launcher != Launcher::Torchrun {
        opts.torch_store = None;
    }
    opts.cancel = cancel.cloned();
    Ok(opts)
}

/// [`world_rendezvous`] for a given place instead of the environment's, breakable through `cancel`.
fn world_rendezvous_as(layout: Layout, info: RankInfo, cancel: Option<&CancelToken>) -> Result<(RankInfo, Rendezvous)> {
    let comm_err = |e: nccl::bootstrap::BootstrapError| EngineError::Comm(e.into());
    if info.world_size != layout.world() {
        return Err(EngineError::Config(format!(
            "{} processes were started, but --tp {} × --pp {} needs {}",
            info.world_size,
            layout.tp,
            layout.pp,
            layout.world()
        )));
    }
    let rv = Rendezvous::new(&info, rendezvous_options(&info, cancel)?).map_err(comm_err)?;
    Ok((info, rv))
}

/// This process's communicators, ranks as processes: a rendezvous over the world, then (for 2-D layouts) one
/// sub-rendezvous per group on ports chosen by each group's first rank and shared through the world.
pub fn host_process(layout: Layout) -> Result<RankComms> {
    let (info, rv) = world_rendezvous(layout)?;
    host_comms(layout, info, rv, None)
}

/// [`host_process`] in the given place instead of the environment's (e.g. world rank 0 of ranks this process
/// started itself: [`ChildRanks`]). Cancelling `cancel` breaks the rendezvous (and a 2-D layout's group
/// rendezvous) while it waits.
pub fn host_process_as(layout: Layout, info: RankInfo, cancel: Option<&CancelToken>) -> Result<RankComms> {
    let (info, rv) = world_rendezvous_as(layout, info, cancel)?;
    host_comms(layout, info, rv, cancel)
}

fn host_comms(layout: Layout, info: RankInfo, rv: Rendezvous, cancel: Option<&CancelToken>) -> Result<RankComms> {
    let comm_err = |e: nccl::bootstrap::BootstrapError| EngineError::Comm(e.into());
    let w = info.rank;
    if layout.pp == 1 {
        let c = HostComm::from_rendezvous(&rv, HostOptions::default())?;
        return Ok(RankComms {
            world_rank: w,
            tp: boxed(c),
            pp: Box::new(SingleComm),
        });
    }
    if layout.tp == 1 {
        let c = HostComm::from_rendezvous(&rv, HostOptions::default())?;
        return Ok(RankComms {
            world_rank: w,
            tp: Box::new(SingleComm),
            pp: boxed(c),
        });
    }
    // 2-D: every rank offers a free port; group g's leader's port hosts the group's rendezvous.
    let (stage, t) = layout.coords(w);
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mine = [
        launch::free_port(local).map_err(comm_err)?,
        launch::free_port(local).map_err(comm_err)?,
    ];
    let ports = rv
        .all_gather(&[mine[0].to_le_bytes(), mine[1].to_le_bytes()].concat())
        .map_err(comm_err)?;
    let port_of = |rank: usize, which: usize| -> Result<u16> {
        let b = ports
            .get(rank)
            .filter(|b| b.len() == 4)
            .ok_or_else(|| EngineError::Config("bad port exchange".into()))?;
        Ok(u16::from_le_bytes([b[2 * which], b[2 * which + 1]]))
    };
    let sub = |rank: usize, size: usize, leader: usize, which: usize| -> Result<HostComm> {
        let sub_info = RankInfo {
            rank,
            world_size: size,
            local_rank: rank,
            local_world_size: Some(size),
            master_addr: "127.0.0.1".to_string(),
            master_port: port_of(leader, which)?,
            launcher: info.launcher,
        };
        let srv = Rendezvous::new(&sub_info, rendezvous_options(&sub_info, cancel)?).map_err(comm_err)?;
        Ok(HostComm::from_rendezvous(&srv, HostOptions::default())?)
    };
    let tp = sub(t, layout.tp, layout.tp_group(stage)[0], 0)?;
    rv.barrier().map_err(comm_err)?;
    let pp = sub(stage, layout.pp, layout.pp_group(t)[0], 1)?;
    Ok(RankComms {
        world_rank: w,
        tp: boxed(tp),
        pp: boxed(pp),
    })
}

/// World ranks `1..tp×pp` of one replica as child processes of this one, which is world rank 0, started
/// again on demand: `serve --nprocs N`, whose rank 0 keeps serving while a replica whose rank process died
/// is rebuilt. The children run the current program with its arguments and torchrun-style variables
/// ([`launch::LocalLaunch`]); dropping this kills those still running, and so does the exit of the thread
/// that called [`ChildRanks::start`] (`PR_SET_PDEATHSIG`): start them from a thread that outlives them.
pub struct ChildRanks {
    program: std::path::PathBuf,
    args: Vec<std::ffi::OsString>,
    layout: Layout,
    workers: Option<launch::LocalWorkers>,
}

impl std::fmt::Debug for ChildRanks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildRanks")
            .field("layout", &self.layout)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl ChildRanks {
    /// Children that run `program args` (started by [`ChildRanks::start`]).
    pub fn new(program: std::path::PathBuf, args: Vec<std::ffi::OsString>, layout: Layout) -> ChildRanks {
        ChildRanks {
            program,
            args,
            layout,
            workers: None,
        }
    }

    /// The current program with its arguments.
    pub fn of_this_program(layout: Layout) -> Result<ChildRanks> {
        let exe =
            std::env::current_exe().map_err(|e| EngineError::Config(format!("finding the current executable: {e}")))?;
        Ok(ChildRanks::new(exe, std::env::args_os().skip(1).collect(), layout))
    }

    /// Stops the children started before (if any), starts ranks `1..world` afresh on a new port and
    /// returns world rank 0's communicators once every rank has joined. A child that exits first fails
    /// this at once, naming its rank; otherwise the wait is bounded by the rendezvous timeout
    /// (`NCCL_RS_BOOTSTRAP_TIMEOUT`).
    pub fn start(&mut self) -> Result<RankComms> {
        self.start_unless(&|| false)
    }

    /// [`start`](Self::start) that also gives up, within milliseconds, once `stop` returns true (a server
    /// shutting down while a rebuild waits for its ranks).
    pub fn start_unless(&mut self, stop: &dyn Fn() -> bool) -> Result<RankComms> {
        let comm_err = |e: nccl::bootstrap::BootstrapError| EngineError::Comm(e.into());
        if let Some(old) = self.workers.take() {
            old.finish(std::time::Duration::ZERO).map_err(comm_err)?;
        }
        let world = self.layout.world();
        let mut workers = launch::LocalLaunch::new(&self.program, world)
            .args(self.args.iter().cloned())
            .ranks(1..world)
            // A rank process ignores SIGTERM (only rank 0 drains) and is of no use without rank 0.
            .parent_death_signal(libc::SIGKILL)
            .start()
            .map_err(comm_err)?;
        let info = RankInfo {
            rank: 0,
            world_size: world,
            local_rank: 0,
            local_world_size: Some(world),
            master_addr: "127.0.0.1".to_string(),
            master_port: workers.master_port(),
            launcher: Launcher::Local,
        };
        let layout = self.layout;
        let cancel = CancelToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let rendezvous = {
            let cancel = cancel.clone();
            std::thread::Builder::new()
                .name("rank0-rendezvous".into())
                .spawn(move || {
                    let _ = tx.send(host_process_as(layout, info, Some(&cancel)));
                })
                .map_err(|e| EngineError::Config(format!("spawning the rendezvous thread: {e}")))?
        };
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(20)) {
                Ok(r) => {
                    self.workers = Some(workers);
                    return r;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(EngineError::Config(
                        "the rendezvous thread ended without an answer".into(),
                    ))
                }
            }
            // A child that is gone will never join: fail now. Dropping `workers` kills the others, and the
            // cancelled rendezvous thread returns within milliseconds, freeing its port (without the
            // cancel it waited out the rendezvous timeout, 300 s by default).
            let why = if let Some((rank, status)) = workers.poll().map_err(comm_err)? {
                format!(
                    "rank {rank}'s process exited with code {} before joining its replica",
                    launch::exit_code_of(&status)
                )
            } else if stop() {
                "stopped while the rank processes were starting".to_string()
            } else {
                continue;
            };
            cancel.cancel();
            // Bounded all the same: a thread that does not answer is left to its own timeout.
            if rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok() {
                let _ = rendezvous.join();
            }
            return Err(EngineError::Config(why));
        }
    }

    /// The first child that exited since the last start, waiting up to `within` for one (a rank that
    /// failed while the replica was being built may still be exiting): "rank R's process exited with code C".
    pub fn exited_within(&mut self, within: std::time::Duration) -> Option<String> {
        let workers = self.workers.as_mut()?;
        let until = std::time::Instant::now() + within;
        loop {
            if let Ok(Some((rank, status))) = workers.poll() {
                return Some(format!(
                    "rank {rank}'s process exited with code {}",
                    launch::exit_code_of(&status)
                ));
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// `(world rank, pid)` of every child still running.
    pub fn pids(&self) -> Vec<(usize, u32)> {
        self.workers.as_ref().map_or_else(Vec::new, launch::LocalWorkers::pids)
    }

    /// Waits up to `grace` for the children to exit on their own (after a stop plan), then kills the rest.
    pub fn finish(&mut self, grace: std::time::Duration) {
        if let Some(w) = self.workers.take() {
            let _ = w.finish(grace);
        }
    }
}

/// Loads world rank `comms.world_rank`'s shard of `src` for `layout` (its place from the layout's coordinates,
/// no progress reporting), sets its decode path (see [`crate::engine::RankModel::set_decode_path`]) and wraps
/// it in a [`crate::engine::Rank`] over `comms`.
pub(crate) fn load_rank(
    src: &dyn crate::model::WeightSource,
    layout: Layout,
    threads: usize,
    path: crate::math::DecodePath,
    comms: RankComms,
) -> Result<crate::engine::Rank> {
    let model = load_model(src, layout, threads, path, comms.world_rank)?;
    crate::engine::Rank::new(model, comms.tp, comms.pp)
}

/// World rank `world_rank`'s shard of `layout`, on the CPU, decoding on `path`.
pub(crate) fn load_model(
    src: &dyn crate::model::WeightSource,
    layout: Layout,
    threads: usize,
    path: crate::math::DecodePath,
    world_rank: usize,
) -> Result<crate::engine::RankModel> {
    use crate::engine::{RankModel, RankPlace};
    let (stage, tp_rank) = layout.coords(world_rank);
    let place = RankPlace {
        tp: layout.tp,
        tp_rank,
        pp: layout.pp,
        stage,
        threads,
    };
    let mut model = RankModel::load(src, place, &mut |_, _| {})?;
    model.set_decode_path(path);
    Ok(model)
}

/// The rank's shard moved to its GPU: the CUDA engine on the stream of its NCCL communicator (TP, else
/// pipeline), its TP collectives on device buffers; with `overlap_comm`, the kernels on a stream of their
/// own beside the communicator's ([`Cuda::beside_stream`](crate::cuda_engine::Cuda::beside_stream)).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_rank(
    model: crate::engine::RankModel,
    comms: RankComms,
    overlap_comm: bool,
) -> Result<crate::engine::Rank<crate::cuda_engine::Cuda>> {
    use crate::cuda_engine::{upload_to, Cuda, DeviceTp};
    let stream = comms
        .tp
        .nccl_communicator()
        .or(comms.pp.nccl_communicator())
        .map(|c| c.stream().cloned())
        .transpose()?
        .ok_or_else(|| {
            EngineError::Config("--device cuda: the rank has no NCCL communicator (use --backend nccl)".into())
        })?;
    let (rope, max_pos) = (model.rope(), model.config().max_position_embeddings);
    let mut backend = if overlap_comm {
        if comms.pp.size() != 1 {
            return Err(EngineError::Config(format!(
                "--overlap-comm needs one pipeline stage, not {}: it overlaps one stage's interleaved prefill chunks",
                comms.pp.size()
            )));
        }
        Cuda::beside_stream(&stream, rope, max_pos)?
    } else {
        Cuda::on_stream(stream, rope, max_pos)?
    };
    // The stream's work waits for the TP collectives: bound the waits by them. A TP group of one keeps no
    // NCCL communicator (`DeviceTp::Single` drops it), so then the pipeline's, which the rank keeps.
    let watched = match comms.tp.size() {
        1 => comms.pp.nccl_communicator(),
        _ => comms.tp.nccl_communicator(),
    };
    if let Some(c) = watched {
        backend.watch(c);
    }
    let tp = DeviceTp::from_comm(comms.tp)?;
    let model = upload_to(model, backend)?;
    crate::engine::Rank::new(model, Box::new(tp), comms.pp)
}

/// Loads and runs a whole `layout` on threads of this process (host backend) and returns every rank's
/// output, indexed by world rank. `threads` is each rank's compute threads.
pub fn generate_in_threads(
    src: &dyn crate::model::WeightSource,
    layout: Layout,
    threads: usize,
    prompt: &[u32],
    params: &crate::engine::GenerateParams,
) -> Result<Vec<crate::engine::GenerateOutput>> {
    crate::engine::check_layout(src.config(), layout.tp, layout.pp)?;
    let comms = host_threads(layout)?;
    let results: Vec<Result<crate::engine::GenerateOutput>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    load_rank(src, layout, threads, crate::math::DecodePath::Exact, c)?.generate(
                        prompt,
                        params,
                        &mut |_| {},
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(EngineError::Config("a rank thread panicked".into())))
            })
            .collect()
    });
    first_error(results)
}

/// All ranks' outputs, or the error of the rank that failed first: an error of its own is preferred over the
/// "peer failed" errors it caused on the others.
pub fn first_error<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    let mut outs = Vec::with_capacity(results.len());
    let mut err: Option<(bool, usize, EngineError)> = None;
    for (w, r) in results.into_iter().enumerate() {
        match r {
            Ok(o) => outs.push(o),
            Err(e) => {
                let is_peer = matches!(e, EngineError::Comm(nccl::Error::PeerFailed { .. }));
                if err.as_ref().is_none_or(|(p, _, _)| *p && !is_peer) {
                    err = Some((is_peer, w, e));
                }
            }
        }
    }
    match err {
        Some((_, rank, e)) => Err(EngineError::Rank {
            rank,
            source: Box::new(e),
        }),
        None => Ok(outs),
    }
}

/// The CUDA device of each world rank when `world` ranks run as threads of one process with `--backend nccl`:
/// rank `r` on device `r % device_count`. Fails (no panic) when no device is visible.
///
/// Several ranks share a GPU only when there are fewer devices than ranks (each then gets its own stream).
pub fn nccl_thread_devices(world: usize, device_count: usize) -> Result<Vec<usize>> {
    nccl_thread_devices_from(world, 0, device_count)
}

/// [`nccl_thread_devices`] for ranks numbered from `first` (e.g. `serve`'s replica `r` of `world` ranks
/// starts at `r * world`, so replicas take different GPUs while there are enough): rank `r` on device
/// `(first + r) % device_count`.
pub fn nccl_thread_devices_from(world: usize, first: usize, device_count: usize) -> Result<Vec<usize>> {
    if device_count == 0 {
        return Err(no_cuda_device());
    }
    Ok((0..world).map(|r| (first + r) % device_count).collect())
}

/// The error of `--backend nccl` on a host where the CUDA driver reports no device.
pub fn no_cuda_device() -> EngineError {
    EngineError::Config(
        "--backend nccl: no CUDA device was found (the CUDA driver is missing or reports 0 devices; check \
         nvidia-smi and CUDA_VISIBLE_DEVICES); use --backend host on this machine"
            .into(),
    )
}

/// The process's device for `--backend nccl` with ranks as processes: `local_rank`, checked against the
/// visible devices.
pub fn nccl_process_device(local_rank: usize, device_count: usize) -> Result<usize> {
    if device_count == 0 {
        return Err(no_cuda_device());
    }
    if local_rank >= device_count {
        return Err(EngineError::Config(format!(
            "--backend nccl: local rank {local_rank} needs CUDA device {local_rank}, but only {device_count} \
             device(s) are visible (start at most {device_count} rank(s) per host)"
        )));
    }
    Ok(local_rank)
}

#[cfg(feature = "cuda")]
pub use nccl_launch::{nccl_process, NcclThreads};

/// NCCL communicators for the CPU engine (`--backend nccl`): one world communicator per rank, split into the
/// TP and pipeline groups; each is wrapped in [`StagedNcclComm`](crate::comm::cuda::StagedNcclComm).
#[cfg(feature = "cuda")]
mod nccl_launch {
    use std::sync::Arc;

    use nccl::cudarc::driver::{CudaContext, CudaStream, DriverError};
    use nccl::{Communicator, UniqueId};

    use super::{nccl_process_device, nccl_thread_devices_from, world_rendezvous, RankComms};
    use crate::comm::cuda::StagedNcclComm;
    use crate::comm::{Comm, SingleComm};
    use crate::error::{EngineError, Result};
    use crate::shard::Layout;

    /// A failed CUDA call `op` for `device`, as [`EngineError::Device`] over [`nccl::Error::CudaDriver`], which
    /// keeps cudarc's error as its source.
    pub(super) fn cuda_on(device: usize, op: &'static str) -> impl Fn(DriverError) -> EngineError {
        move |e| EngineError::Device {
            device,
            source: nccl::Error::cuda(op)(e),
        }
    }

    fn stream_on(device: usize) -> Result<Arc<CudaStream>> {
        let ctx = CudaContext::new(device).map_err(cuda_on(device, "CudaContext::new"))?;
        ctx.new_stream().map_err(cuda_on(device, "CudaContext::new_stream"))
    }

    fn staged(c: Communicator) -> Box<dyn Comm> {
        Box::new(StagedNcclComm(c))
    }

    /// Turns world rank `w`'s world communicator into its TP and pipeline communicators. 1-D layouts use the
    /// world communicator itself; 2-D layouts split it (TP groups: color = stage, key = tp_rank; pipelines:
    /// color = tp_rank, key = stage), then finalize it. Collective over the world: every rank calls it.
    fn split_world(world: Communicator, layout: Layout, w: usize) -> Result<RankComms> {
        if layout.pp == 1 {
            return Ok(RankComms {
                world_rank: w,
                tp: staged(world),
                pp: Box::new(SingleComm),
            });
        }
        if layout.tp == 1 {
            return Ok(RankComms {
                world_rank: w,
                tp: Box::new(SingleComm),
                pp: staged(world),
            });
        }
        let (stage, t) = layout.coords(w);
        let split = |color: usize, key: usize, what: &str| -> Result<Communicator> {
            let color = u32::try_from(color).map_err(|_| EngineError::Config(format!("{what} color {color}")))?;
            let key = i32::try_from(key).map_err(|_| EngineError::Config(format!("{what} key {key}")))?;
            world
                .split(Some(color), key, None)?
                .ok_or_else(|| EngineError::Config(format!("ncclCommSplit gave rank {w} no {what} communicator")))
        };
        let tp = split(stage, t, "TP")?;
        let pp = split(t, stage, "pipeline")?;
        for (c, size, rank, what) in [(&tp, layout.tp, t, "TP"), (&pp, layout.pp, stage, "pipeline")] {
            if c.size() != size || c.rank() != rank {
                return Err(EngineError::Config(format!(
                    "rank {w}: the {what} communicator is rank {} of {}, expected {rank} of {size}",
                    c.rank(),
                    c.size()
                )));
            }
        }
        world.finalize()?;
        Ok(RankComms {
            world_rank: w,
            tp: staged(tp),
            pp: staged(pp),
        })
    }

    /// Ranks as threads of this process with NCCL: one stream per rank (rank `r` on device
    /// `r % device_count`) and one shared [`UniqueId`], all made before any rank thread starts, so a failure
    /// there cannot leave other ranks waiting in `ncclCommInitRank`.
    pub struct NcclThreads {
        layout: Layout,
        id: UniqueId,
        streams: Vec<Arc<CudaStream>>,
    }

    impl NcclThreads {
        /// Checks the devices (an error names a host without any), creates the streams and the unique id.
        pub fn new(layout: Layout) -> Result<Self> {
            Self::new_from(layout, 0)
        }

        /// [`NcclThreads::new`] with world rank `w` on device `(first + w) % device count`
        /// ([`nccl_thread_devices_from`]).
        pub fn new_from(layout: Layout, first: usize) -> Result<Self> {
            let devices = nccl_thread_devices_from(layout.world(), first, nccl::cuda_device_count())?;
            let mut contexts: Vec<(usize, Arc<CudaStream>)> = Vec::new();
            let mut streams = Vec::with_capacity(devices.len());
            for d in devices {
                // One context per device (CudaContext::new retains the primary context), a stream per rank.
                let s = match contexts.iter().find(|(dev, _)| *dev == d) {
                    Some((_, first)) => first
                        .context()
                        .new_stream()
                        .map_err(cuda_on(d, "CudaContext::new_stream"))?,
                    None => stream_on(d)?,
                };
                contexts.push((d, s.clone()));
                streams.push(s);
            }
            Ok(NcclThreads {
                layout,
                id: UniqueId::new()?,
                streams,
            })
        }

        /// The CUDA device of world rank `w`.
        pub fn device(&self, w: usize) -> Option<usize> {
            self.streams.get(w).map(|s| s.context().ordinal())
        }

        /// World rank `w`'s communicators (`ncclCommInitRank` on its stream, then the splits). Call it on
        /// rank `w`'s own thread, for every rank concurrently: it blocks until all have joined.
        pub fn rank(&self, w: usize) -> Result<RankComms> {
            let stream = self.streams.get(w).cloned().ok_or_else(|| {
                EngineError::Config(format!("world rank {w} out of range (world {})", self.streams.len()))
            })?;
            let world = Communicator::init_rank_on(stream, &self.id, w, self.layout.world())?;
            split_world(world, self.layout, w)
        }
    }

    /// This process's communicators with NCCL, ranks as processes (`--nprocs`, torchrun, mpirun, srun):
    /// device `LOCAL_RANK`, a rendezvous, then `ncclCommInitRank` with an id from rank 0 and the splits.
    /// Every rank first shares whether it got its device, so a rank without one fails them all at once
    /// instead of leaving them waiting.
    pub fn nccl_process(layout: Layout) -> Result<RankComms> {
        let comm_err = |e: nccl::bootstrap::BootstrapError| EngineError::Comm(e.into());
        let (info, rv) = world_rendezvous(layout)?;
        let stream = nccl_process_device(info.local_rank, nccl::cuda_device_count()).and_then(stream_on);
        let status = match &stream {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().into_bytes(),
        };
        let all = rv.all_gather(&status).map_err(comm_err)?;
        if let Some((r, text)) = all.iter().enumerate().find(|(_, s)| !s.is_empty()) {
            return match stream {
                Err(e) if r == info.rank => Err(e),
                _ => Err(EngineError::Config(format!(
                    "rank {r} could not use its CUDA device: {}",
                    String::from_utf8_lossy(text)
                ))),
            };
        }
        let world = Communicator::from_rendezvous_on(&rv, stream?)?;
        split_world(world, layout, info.rank)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use nccl::cudarc::driver::sys::CUresult;
        use std::error::Error as _;

        /// A CUDA failure while setting up a device names the device and the call, and keeps cudarc's error
        /// as the source at the end of the chain (it used to be flattened into a string). (Not displayed here:
        /// cudarc's `Display` asks libcuda for the text, and this machine may have none.)
        #[test]
        fn device_errors_keep_cudarc_error_as_source() {
            let e = cuda_on(3, "CudaContext::new")(DriverError(CUresult::CUDA_ERROR_INVALID_DEVICE));
            assert!(matches!(e, EngineError::Device { device: 3, .. }), "{e:?}");
            let inner = e.source().expect("the nccl error");
            assert!(matches!(
                inner.downcast_ref::<nccl::Error>(),
                Some(nccl::Error::CudaDriver {
                    op: "CudaContext::new",
                    ..
                })
            ));
            assert_eq!(
                inner.downcast_ref::<nccl::Error>().unwrap().kind(),
                nccl::error::ErrorKind::Cuda
            );
            let driver = inner.source().and_then(|s| s.downcast_ref::<DriverError>());
            assert_eq!(driver.map(|d| d.0), Some(CUresult::CUDA_ERROR_INVALID_DEVICE));
        }
    }
}
