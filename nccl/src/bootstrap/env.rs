//! Rank discovery from the environment of the launchers people already use.
//!
//! | launcher | rank, world size | local rank, local world size | rank 0's address | port |
//! | --- | --- | --- | --- | --- |
//! | explicit | `NCCL_RS_RANK`, `NCCL_RS_WORLD_SIZE` | `NCCL_RS_LOCAL_RANK`, `NCCL_RS_LOCAL_WORLD_SIZE` | `NCCL_RS_MASTER_ADDR` (else `MASTER_ADDR`) | `NCCL_RS_MASTER_PORT` (else `MASTER_PORT`) |
//! | `--nprocs` workers, torchrun | `RANK`, `WORLD_SIZE` | `LOCAL_RANK`, `LOCAL_WORLD_SIZE` | `MASTER_ADDR` | `MASTER_PORT` |
//! | OpenMPI `mpirun` | `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK`, `OMPI_COMM_WORLD_LOCAL_SIZE` | `MASTER_ADDR` | `MASTER_PORT`, else derived from the job id |
//! | Slurm `srun` | `SLURM_PROCID`, `SLURM_NTASKS` | `SLURM_LOCALID`, `SLURM_STEP_TASKS_PER_NODE` at `SLURM_NODEID` | `MASTER_ADDR`, else the first host of `SLURM_STEP_NODELIST`/`SLURM_JOB_NODELIST` | `MASTER_PORT`, else derived from `SLURM_JOB_ID` and `SLURM_STEP_ID` |
//!
//! The first launcher in this order whose rank variable is set wins (torchrun started inside a Slurm job is a
//! torchrun launch). When the local variables are both absent, all ranks are assumed to share one host; a local
//! rank without a local world size (PyTorch's `env://` needs none) leaves the local size unknown. When the
//! address is absent and all ranks share one host, rank 0 is at `127.0.0.1`. The default port is 29500,
//! as in PyTorch. A launcher's variables that are present but unparsable, inconsistent (rank ≥ world size) or
//! missing while their siblings are set give an error naming the variable.

use std::fmt;

use super::error::BootstrapError;

/// The port used when no launcher gives one (PyTorch's default).
pub const DEFAULT_PORT: u16 = 29500;

/// The environment variable [`launch`](super::launch) sets in the worker processes it spawns.
pub const LOCAL_WORKER_VAR: &str = "NCCL_RS_LOCAL_WORKER";

/// Which launcher started this process (decides which environment variables were read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Launcher {
    /// `torchrun` (or anything setting `RANK`, `WORLD_SIZE`, ... the same way).
    Torchrun,
    /// OpenMPI's `mpirun` (`OMPI_COMM_WORLD_*`).
    OpenMpi,
    /// Slurm's `srun` (`SLURM_PROCID`, ...).
    Slurm,
    /// Explicit `NCCL_RS_*` variables.
    Explicit,
    /// Nothing set: one process, rank 0 of 1.
    Single,
    /// A worker spawned by [`launch::spawn_local_if_requested`](super::launch::spawn_local_if_requested)
    /// (torchrun-style variables plus [`LOCAL_WORKER_VAR`]).
    Local,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Torchrun => "torchrun-style",
            Launcher::OpenMpi => "OpenMPI",
            Launcher::Slurm => "Slurm",
            Launcher::Explicit => "explicit NCCL_RS_*",
            Launcher::Single => "single-process",
            Launcher::Local => "--nprocs local",
        })
    }
}

/// Where this process sits among the ranks, and where rank 0 listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    /// This process's rank, in `0..world_size`.
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
    /// The rank among the processes of this host (selects the GPU), below `local_world_size` when known.
    pub local_rank: usize,
    /// The number of ranks on this host.
    /// `None` when the launcher gave a local rank but no local world size (`LOCAL_RANK` alone, as
    /// hand-written launch scripts often do): nothing here needs it, so it is left unknown.
    pub local_world_size: Option<usize>,
    /// Host name or address of rank 0 (IPv4, IPv6 with or without brackets, or a name).
    pub master_addr: String,
    /// The TCP port rank 0 listens on.
    pub master_port: u16,
    /// The launcher the values came from.
    pub launcher: Launcher,
}

struct VarNames {
    rank: &'static str,
    world: &'static str,
    local_rank: &'static str,
    local_world: &'static str,
}

const EXPLICIT: VarNames = VarNames {
    rank: "NCCL_RS_RANK",
    world: "NCCL_RS_WORLD_SIZE",
    local_rank: "NCCL_RS_LOCAL_RANK",
    local_world: "NCCL_RS_LOCAL_WORLD_SIZE",
};
const TORCHRUN: VarNames = VarNames {
    rank: "RANK",
    world: "WORLD_SIZE",
    local_rank: "LOCAL_RANK",
    local_world: "LOCAL_WORLD_SIZE",
};
const OPENMPI: VarNames = VarNames {
    rank: "OMPI_COMM_WORLD_RANK",
    world: "OMPI_COMM_WORLD_SIZE",
    local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
    local_world: "OMPI_COMM_WORLD_LOCAL_SIZE",
};

impl RankInfo {
    /// Rank 0 of a world of 1 (no rendezvous needed).
    pub fn single() -> RankInfo {
        RankInfo {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: Some(1),
            master_addr: "127.0.0.1".to_string(),
            master_port: DEFAULT_PORT,
            launcher: Launcher::Single,
        }
    }

    /// Reads this process's rank from the environment (see the [module docs](self) for the variables).
    ///
    /// Returns [`RankInfo::single`] when no launcher variable is set.
    pub fn from_env() -> Result<RankInfo, BootstrapError> {
        RankInfo::from_vars(|name| match std::env::var(name) {
            Ok(v) => Some(v),
            Err(std::env::VarError::NotPresent) => None,
            // Keep non-UTF-8 values visible so the error can show them.
            Err(std::env::VarError::NotUnicode(os)) => Some(os.to_string_lossy().into_owned()),
        })
    }

    /// [`from_env`](Self::from_env) over any variable source (for tests and embedding).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<RankInfo, BootstrapError> {
        let get = |name: &str| get(name);
        if get(EXPLICIT.rank).is_some() || get(EXPLICIT.world).is_some() {
            return generic(&get, Launcher::Explicit, &EXPLICIT);
        }
        if get(TORCHRUN.rank).is_some() || get(TORCHRUN.world).is_some() {
            let launcher = if get(LOCAL_WORKER_VAR).is_some() {
                Launcher::Local
            } else {
                Launcher::Torchrun
            };
            return generic(&get, launcher, &TORCHRUN);
        }
        if get(OPENMPI.rank).is_some() || get(OPENMPI.world).is_some() {
            return generic(&get, Launcher::OpenMpi, &OPENMPI);
        }
        if get("SLURM_PROCID").is_some() {
            return slurm(&get);
        }
        Ok(RankInfo::single())
    }

    /// Checks the invariants (`rank < world_size`, `local_rank < local_world_size <= world_size`, port set).
    pub fn validate(&self) -> Result<(), BootstrapError> {
        let bad = |var, value: usize, reason: String| {
            Err(BootstrapError::InvalidVar {
                var,
                value: value.to_string(),
                reason,
            })
        };
        if self.world_size == 0 {
            return bad("world_size", 0, "must be at least 1".into());
        }
        if self.rank >= self.world_size {
            return bad(
                "rank",
                self.rank,
                format!("must be below the world size {}", self.world_size),
            );
        }
        let local_limit = match self.local_world_size {
            Some(lw) if lw == 0 || lw > self.world_size => {
                return bad(
                    "local_world_size",
                    lw,
                    format!("must be in 1..={} (the world size)", self.world_size),
                )
            }
            Some(lw) => lw,
            None => self.world_size,
        };
        if self.local_rank >= local_limit {
            return bad(
                "local_rank",
                self.local_rank,
                format!("must be below the local world size {local_limit}"),
            );
        }
        if self.world_size > 1 && self.master_port == 0 {
            return bad("master_port", 0, "port 0 cannot be found by the other ranks".into());
        }
        Ok(())
    }
}

type Get<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// Parses a non-negative integer variable.
fn parse_usize(var: &'static str, value: &str) -> Result<usize, BootstrapError> {
    value.trim().parse::<usize>().map_err(|e| BootstrapError::InvalidVar {
        var,
        value: value.to_string(),
        reason: format!("expected a non-negative integer ({e})"),
    })
}

fn required(get: &Get<'_>, var: &'static str, launcher: Launcher, context: &str) -> Result<String, BootstrapError> {
    get(var).ok_or_else(|| BootstrapError::MissingVar {
        var,
        launcher,
        context: context.to_string(),
    })
}

fn parse_port(var: &'static str, value: &str) -> Result<u16, BootstrapError> {
    let invalid = |reason: String| BootstrapError::InvalidVar {
        var,
        value: value.to_string(),
        reason,
    };
    let port: u16 = value
        .trim()
        .parse()
        .map_err(|e| invalid(format!("expected a TCP port in 1..=65535 ({e})")))?;
    if port == 0 {
        return Err(invalid("port 0 cannot be found by the other ranks".into()));
    }
    Ok(port)
}

fn check_addr(var: &'static str, value: String) -> Result<String, BootstrapError> {
    let trimmed = value.trim();
    if trimmed.is_empty() || trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(BootstrapError::InvalidVar {
            var,
            value,
            reason: "expected a host name or an IP address".into(),
        });
    }
    Ok(trimmed.to_string())
}

/// Rank, world size and local values from one launcher's four variables, checked for consistency.
fn counts(
    get: &Get<'_>,
    launcher: Launcher,
    names: &VarNames,
) -> Result<(usize, usize, usize, Option<usize>), BootstrapError> {
    let world_raw = required(get, names.world, launcher, &format!("{} is set", names.rank))?;
    let rank_raw = required(get, names.rank, launcher, &format!("{} is set", names.world))?;
    let world = parse_usize(names.world, &world_raw)?;
    if world == 0 {
        return Err(BootstrapError::InvalidVar {
            var: names.world,
            value: world_raw,
            reason: "the world size must be at least 1".into(),
        });
    }
    let rank = parse_usize(names.rank, &rank_raw)?;
    if rank >= world {
        return Err(BootstrapError::InvalidVar {
            var: names.rank,
            value: rank_raw,
            reason: format!("must be below {}={world}", names.world),
        });
    }
    let (local_rank, local_world) = match (get(names.local_rank), get(names.local_world)) {
        (None, None) => (rank, Some(world)),
        (Some(lr), None) => {
            // PyTorch's env:// needs no local world size; a local rank alone is enough to pick a device.
            let lr_n = parse_usize(names.local_rank, &lr)?;
            if lr_n >= world {
                return Err(BootstrapError::InvalidVar {
                    var: names.local_rank,
                    value: lr,
                    reason: format!("must be below {}={world}", names.world),
                });
            }
            (lr_n, None)
        }
        (None, Some(_)) => {
            return Err(BootstrapError::MissingVar {
                var: names.local_rank,
                launcher,
                context: format!("{} is set", names.local_world),
            })
        }
        (Some(lr), Some(lw)) => {
            let lw_n = parse_usize(names.local_world, &lw)?;
            if lw_n == 0 || lw_n > world {
                return Err(BootstrapError::InvalidVar {
                    var: names.local_world,
                    value: lw,
                    reason: format!("must be in 1..={world} ({}={world})", names.world),
                });
            }
            let lr_n = parse_usize(names.local_rank, &lr)?;
            if lr_n >= lw_n {
                return Err(BootstrapError::InvalidVar {
                    var: names.local_rank,
                    value: lr,
                    reason: format!("must be below {}={lw_n}", names.local_world),
                });
            }
            (lr_n, Some(lw_n))
        }
    };
    Ok((rank, world, local_rank, local_world))
}

/// Explicit, torchrun-style and OpenMPI launches: four counts, then address and port.
fn generic(get: &Get<'_>, launcher: Launcher, names: &VarNames) -> Result<RankInfo, BootstrapError> {
    let (rank, world_size, local_rank, local_world_size) = counts(get, launcher, names)?;
    // Explicit launches prefer NCCL_RS_MASTER_*, and fall back to the usual MASTER_*.
    let pick = |ours: &'static str, usual: &'static str| match launcher {
        Launcher::Explicit if get(ours).is_some() => ours,
        _ => usual,
    };
    let addr_var = pick("NCCL_RS_MASTER_ADDR", "MASTER_ADDR");
    let port_var = pick("NCCL_RS_MASTER_PORT", "MASTER_PORT");
    let master_addr = match get(addr_var) {
        Some(v) => check_addr(addr_var, v)?,
        None if local_world_size == Some(world_size) => "127.0.0.1".to_string(),
        None => {
            let context = match launcher {
                Launcher::OpenMpi => "the ranks span several hosts; pass `-x MASTER_ADDR=<host of rank 0>` to mpirun",
                _ => "the ranks span several hosts; set it to the host of rank 0",
            };
            return Err(BootstrapError::MissingVar {
                var: addr_var,
                launcher,
                context: context.into(),
            });
        }
    };
    let master_port = match get(port_var) {
        Some(v) => parse_port(port_var, &v)?,
        None if launcher == Launcher::OpenMpi => openmpi_job_seed(get).map_or(DEFAULT_PORT, |s| derive_port(&s)),
        None => DEFAULT_PORT,
    };
    Ok(RankInfo {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        launcher,
    })
}

/// A string identifying the current mpirun job, the same in all its ranks (OpenMPI 4 and 5).
fn openmpi_job_seed(get: &Get<'_>) -> Option<String> {
    ["OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE"]
        .iter()
        .find_map(|v| get(v).map(|value| format!("ompi:{value}")))
}

/// A port in 15000..30000 (below Linux's ephemeral range) derived from a job identifier, so that concurrent
/// jobs on one host rarely collide and all ranks of one job agree. FNV-1a, stable across builds.
pub fn derive_port(seed: &str) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // The remainder is below 15000, so the sum fits in u16.
    15000 + (h % 15000) as u16
}

fn slurm(get: &Get<'_>) -> Result<RankInfo, BootstrapError> {
    const L: Launcher = Launcher::Slurm;
    let procid = required(get, "SLURM_PROCID", L, "always set by srun")?;
    let ntasks = required(get, "SLURM_NTASKS", L, "SLURM_PROCID is set")?;
    let world_size = parse_usize("SLURM_NTASKS", &ntasks)?;
    if world_size == 0 {
        return Err(BootstrapError::InvalidVar {
            var: "SLURM_NTASKS",
            value: ntasks,
            reason: "the number of tasks must be at least 1".into(),
        });
    }
    let rank = parse_usize("SLURM_PROCID", &procid)?;
    if rank >= world_size {
        return Err(BootstrapError::InvalidVar {
            var: "SLURM_PROCID",
            value: procid,
            reason: format!("must be below SLURM_NTASKS={world_size}"),
        });
    }
    let localid = required(get, "SLURM_LOCALID", L, "SLURM_PROCID is set")?;
    let local_rank = parse_usize("SLURM_LOCALID", &localid)?;
    let (tpn_var, tpn) = match get("SLURM_STEP_TASKS_PER_NODE") {
        Some(v) => ("SLURM_STEP_TASKS_PER_NODE", Some(v)),
        None => ("SLURM_TASKS_PER_NODE", get("SLURM_TASKS_PER_NODE")),
    };
    let local_world_size = match tpn {
        Some(tpn) => {
            let per_node = parse_tasks_per_node(tpn_var, &tpn)?;
            let node = match get("SLURM_NODEID") {
                Some(v) => parse_usize("SLURM_NODEID", &v)?,
                None if per_node.len() == 1 => 0,
                None => {
                    return Err(BootstrapError::MissingVar {
                        var: "SLURM_NODEID",
                        launcher: L,
                        context: format!("{tpn_var} lists several nodes"),
                    })
                }
            };
            *per_node.get(node).ok_or_else(|| BootstrapError::InvalidVar {
                var: "SLURM_NODEID",
                value: node.to_string(),
                reason: format!("{tpn_var}={tpn:?} lists only {} nodes", per_node.len()),
            })?
        }
        None => world_size,
    };
    if local_world_size == 0 || local_world_size > world_size {
        return Err(BootstrapError::InvalidVar {
            var: tpn_var,
            value: local_world_size.to_string(),
            reason: format!("tasks on this node must be in 1..={world_size} (SLURM_NTASKS)"),
        });
    }
    if local_rank >= local_world_size {
        return Err(BootstrapError::InvalidVar {
            var: "SLURM_LOCALID",
            value: localid,
            reason: format!("must be below the {local_world_size} tasks of this node ({tpn_var})"),
        });
    }
    let master_addr = match get("MASTER_ADDR") {
        Some(v) => check_addr("MASTER_ADDR", v)?,
        None => {
            let (var, list) = ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"]
                .iter()
                .find_map(|v| get(v).map(|value| (*v, value)))
                .ok_or_else(|| BootstrapError::MissingVar {
                    var: "SLURM_JOB_NODELIST",
                    launcher: L,
                    context: "MASTER_ADDR is not set, so rank 0's host is taken from the node list".into(),
                })?;
            first_host(var, &list)?
        }
    };
    let master_port = match get("MASTER_PORT") {
        Some(v) => parse_port("MASTER_PORT", &v)?,
        None => {
            let job = required(
                get,
                "SLURM_JOB_ID",
                L,
                "MASTER_PORT is not set, so the port is derived from the job id",
            )?;
            let job_id = job.trim().parse::<u64>().map_err(|e| BootstrapError::InvalidVar {
                var: "SLURM_JOB_ID",
                value: job.clone(),
                reason: format!("expected a job number ({e})"),
            })?;
            let step = match get("SLURM_STEP_ID") {
                Some(s) => s.trim().parse::<u64>().map_err(|e| BootstrapError::InvalidVar {
                    var: "SLURM_STEP_ID",
                    value: s.clone(),
                    reason: format!("expected a step number ({e})"),
                })?,
                None => 0,
            };
            derive_port(&format!("slurm:{job_id}:{step}"))
        }
    };
    Ok(RankInfo {
        rank,
        world_size,
        local_rank,
        local_world_size: Some(local_world_size),
        master_addr,
        master_port,
        launcher: L,
    })
}

/// Parses Slurm's compressed tasks-per-node list, e.g. `"2(x3),1"` → `[2, 2, 2, 1]`.
pub fn parse_tasks_per_node(var: &'static str, value: &str) -> Result<Vec<usize>, BootstrapError> {
    let invalid = |reason: String| BootstrapError::InvalidVar {
        var,
        value: value.to_string(),
        reason,
    };
    let mut out = Vec::new();
    for item in value.trim().split(',') {
        let (count, repeat) = match item.split_once("(x") {
            Some((c, rest)) => {
                let r = rest
                    .strip_suffix(')')
                    .ok_or_else(|| invalid(format!("{item:?} lacks its closing parenthesis")))?;
                (
                    c,
                    r.parse::<usize>()
                        .map_err(|e| invalid(format!("bad repeat in {item:?}: {e}")))?,
                )
            }
            None => (item, 1),
        };
        let count = count
            .parse::<usize>()
            .map_err(|e| invalid(format!("bad task count {item:?}: {e}")))?;
        if repeat == 0 || repeat > 1 << 20 || out.len() + repeat > 1 << 20 {
            return Err(invalid(format!("implausible repeat in {item:?}")));
        }
        out.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(out)
}

/// One piece of a host pattern: literal text or a bracketed set of zero-padded numeric ranges.
enum Piece<'a> {
    Text(&'a str),
    Ranges(Vec<(u64, u64, usize)>),
}

/// Splits a node list at the commas that are outside brackets and parses each host pattern.
fn parse_nodelist<'a>(var: &'static str, value: &'a str) -> Result<Vec<Vec<Piece<'a>>>, BootstrapError> {
    let invalid = |reason: String| BootstrapError::InvalidVar {
        var,
        value: value.to_string(),
        reason,
    };
    let s = value.trim();
    if s.is_empty() {
        return Err(invalid("the node list is empty".into()));
    }
    let mut hosts = Vec::new();
    let mut pieces = Vec::new();
    let mut start = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'[' => {
                if start < i {
                    pieces.push(Piece::Text(&s[start..i]));
                }
                let close = s[i..]
                    .find(']')
                    .map(|p| p + i)
                    .ok_or_else(|| invalid(format!("unclosed '[' at byte {i}")))?;
                let inner = &s[i + 1..close];
                let mut ranges = Vec::new();
                for part in inner.split(',') {
                    let (lo, hi) = part.split_once('-').unwrap_or((part, part));
                    let num = |t: &str| {
                        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                            return Err(invalid(format!("{part:?} in [{inner}] is not a number or a range a-b")));
                        }
                        t.parse::<u64>().map_err(|e| invalid(format!("{t:?}: {e}")))
                    };
                    let (l, h) = (num(lo)?, num(hi)?);
                    if l > h {
                        return Err(invalid(format!("range {part:?} runs backwards")));
                    }
                    ranges.push((l, h, lo.len()));
                }
                pieces.push(Piece::Ranges(ranges));
                i = close + 1;
                start = i;
                continue;
            }
            b']' => return Err(invalid(format!("unexpected ']' at byte {i}"))),
            b',' => {
                if start < i {
                    pieces.push(Piece::Text(&s[start..i]));
                }
                if pieces.is_empty() {
                    return Err(invalid(format!("empty host name at byte {i}")));
                }
                hosts.push(std::mem::take(&mut pieces));
                start = i + 1;
            }
            c if c.is_ascii_whitespace() || c.is_ascii_control() => {
                return Err(invalid(format!("unexpected whitespace at byte {i}")))
            }
            _ => {}
        }
        i += 1;
    }
    if start < bytes.len() {
        pieces.push(Piece::Text(&s[start..]));
    }
    if pieces.is_empty() {
        return Err(invalid("the node list ends with an empty host name".into()));
    }
    hosts.push(pieces);
    Ok(hosts)
}

/// The first host of a Slurm node list, e.g. `"node[01-04,07],gpu5"` → `"node01"`.
pub fn first_host(var: &'static str, value: &str) -> Result<String, BootstrapError> {
    let hosts = parse_nodelist(var, value)?;
    let mut out = String::new();
    for piece in &hosts[0] {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Ranges(r) => {
                let (lo, _, width) = r[0];
                out.push_str(&format!("{lo:0width$}"));
            }
        }
    }
    Ok(out)
}

/// Every host of a Slurm node list, in order, e.g. `"node[01-02],gpu5"` → `["node01", "node02", "gpu5"]`.
///
/// Fails with [`BootstrapError::InvalidVar`] naming `var` when the list is malformed or expands to more than
/// `limit` hosts.
pub fn expand_nodelist(var: &'static str, value: &str, limit: usize) -> Result<Vec<String>, BootstrapError> {
    let hosts = parse_nodelist(var, value)?;
    let mut out = Vec::new();
    for host in &hosts {
        let mut partial = vec![String::new()];
        for piece in host {
            match piece {
                Piece::Text(t) => partial.iter_mut().for_each(|p| p.push_str(t)),
                Piece::Ranges(ranges) => {
                    let mut next = Vec::new();
                    for p in &partial {
                        for &(lo, hi, width) in ranges {
                            if (hi - lo) as usize >= limit.saturating_sub(out.len() + next.len()) {
                                return Err(too_many(var, value, limit));
                            }
                            for n in lo..=hi {
                                next.push(format!("{p}{n:0width$}"));
                            }
                        }
                    }
                    partial = next;
                }
            }
        }
        if out.len() + partial.len() > limit {
            return Err(too_many(var, value, limit));
        }
        out.extend(partial);
    }
    Ok(out)
}

fn too_many(var: &'static str, value: &str, limit: usize) -> BootstrapError {
    BootstrapError::InvalidVar {
        var,
        value: value.to_string(),
        reason: format!("expands to more than {limit} hosts"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn info(vars: &[(&str, &str)]) -> Result<RankInfo, BootstrapError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        RankInfo::from_vars(|k| map.get(k).cloned())
    }

    fn invalid_var(e: BootstrapError) -> (&'static str, String) {
        match e {
            BootstrapError::InvalidVar { var, value, .. } => (var, value),
            other => panic!("expected InvalidVar, got {other:?}"),
        }
    }

    #[test]
    fn nothing_set_is_single() {
        assert_eq!(info(&[]).unwrap(), RankInfo::single());
    }

    #[test]
    fn torchrun() {
        let i = info(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.1.2.3"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!(
            (i.rank, i.world_size, i.local_rank, i.local_world_size),
            (5, 8, 1, Some(4))
        );
        assert_eq!(
            (i.master_addr.as_str(), i.master_port, i.launcher),
            ("10.1.2.3", 29400, Launcher::Torchrun)
        );
        let local = info(&[("RANK", "1"), ("WORLD_SIZE", "2"), (LOCAL_WORKER_VAR, "1")]).unwrap();
        assert_eq!(local.launcher, Launcher::Local);
        assert_eq!((local.local_rank, local.local_world_size), (1, Some(2)));
        // LOCAL_RANK alone (PyTorch's env:// needs no LOCAL_WORLD_SIZE): accepted, local size unknown.
        let lr = info(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!((lr.local_rank, lr.local_world_size), (1, None));
        lr.validate().unwrap();
        // Without the local size the ranks may span hosts, so rank 0's address must be given.
        let e = info(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")]).unwrap_err();
        assert!(
            matches!(e, BootstrapError::MissingVar { var: "MASTER_ADDR", .. }),
            "{e:?}"
        );
        assert_eq!(
            invalid_var(info(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "2")]).unwrap_err()),
            ("LOCAL_RANK", "2".to_string())
        );
        assert_eq!(
            (local.master_addr.as_str(), local.master_port),
            ("127.0.0.1", DEFAULT_PORT)
        );
    }

    #[test]
    fn missing_and_inconsistent_vars_are_named() {
        match info(&[("RANK", "0")]).unwrap_err() {
            BootstrapError::MissingVar { var, launcher, .. } => {
                assert_eq!((var, launcher), ("WORLD_SIZE", Launcher::Torchrun))
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(
            invalid_var(info(&[("RANK", "4"), ("WORLD_SIZE", "4")]).unwrap_err()),
            ("RANK", "4".into())
        );
        assert_eq!(
            invalid_var(info(&[("RANK", "x1"), ("WORLD_SIZE", "4")]).unwrap_err()),
            ("RANK", "x1".into())
        );
        assert_eq!(
            invalid_var(info(&[("RANK", "0"), ("WORLD_SIZE", "-2")]).unwrap_err()).0,
            "WORLD_SIZE"
        );
        assert_eq!(
            invalid_var(info(&[("RANK", "0"), ("WORLD_SIZE", "0")]).unwrap_err()).0,
            "WORLD_SIZE"
        );
        let e = info(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")]).unwrap_err();
        assert_eq!(invalid_var(e), ("MASTER_PORT", "70000".into()));
        let e = info(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "")]).unwrap_err();
        assert_eq!(invalid_var(e).0, "MASTER_ADDR");
        // LOCAL_WORLD_SIZE without LOCAL_RANK cannot place the rank: named.
        let e = info(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            matches!(e, BootstrapError::MissingVar { var: "LOCAL_RANK", .. }),
            "{e:?}"
        );
        let e = info(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
        ]);
        assert_eq!(invalid_var(e.unwrap_err()).0, "LOCAL_RANK");
        // Several hosts but no address: the variable to set is named.
        let e = info(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "2"),
        ]);
        assert!(matches!(
            e.unwrap_err(),
            BootstrapError::MissingVar { var: "MASTER_ADDR", .. }
        ));
    }

    #[test]
    fn openmpi() {
        let base = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ];
        let i = info(&base).unwrap();
        assert_eq!((i.rank, i.world_size, i.launcher), (1, 2, Launcher::OpenMpi));
        assert_eq!((i.master_addr.as_str(), i.master_port), ("127.0.0.1", DEFAULT_PORT));
        let mut with_job = base.to_vec();
        with_job.push(("OMPI_MCA_ess_base_jobid", "3918856193"));
        let j = info(&with_job).unwrap();
        assert_eq!(j.master_port, derive_port("ompi:3918856193"));
        assert!((15000..30000).contains(&j.master_port));
        let mut bad = base.to_vec();
        bad[1] = ("OMPI_COMM_WORLD_SIZE", "two");
        assert_eq!(
            invalid_var(info(&bad).unwrap_err()),
            ("OMPI_COMM_WORLD_SIZE", "two".into())
        );
        // torchrun variables win over OpenMPI's.
        let mut both = base.to_vec();
        both.extend([("RANK", "0"), ("WORLD_SIZE", "1")]);
        assert_eq!(info(&both).unwrap().launcher, Launcher::Torchrun);
    }

    #[test]
    fn slurm() {
        let base = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "7"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "2"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x3),1"),
            ("SLURM_JOB_NODELIST", "gpu[007-009,012],cpu1"),
            ("SLURM_JOB_ID", "424242"),
            ("SLURM_STEP_ID", "3"),
        ];
        let i = info(&base).unwrap();
        assert_eq!(
            (i.rank, i.world_size, i.local_rank, i.local_world_size),
            (5, 7, 1, Some(2))
        );
        assert_eq!(i.master_addr, "gpu007");
        assert_eq!(i.master_port, derive_port("slurm:424242:3"));
        assert_eq!(i.launcher, Launcher::Slurm);
        let mut explicit = base.to_vec();
        explicit.extend([("MASTER_ADDR", "[::1]"), ("MASTER_PORT", "1234")]);
        let j = info(&explicit).unwrap();
        assert_eq!((j.master_addr.as_str(), j.master_port), ("[::1]", 1234));
        let mut bad = base.to_vec();
        bad[5] = ("SLURM_JOB_NODELIST", "gpu[007-");
        assert_eq!(invalid_var(info(&bad).unwrap_err()).0, "SLURM_JOB_NODELIST");
        let mut bad = base.to_vec();
        bad[6] = ("SLURM_JOB_ID", "12ab");
        assert_eq!(invalid_var(info(&bad).unwrap_err()), ("SLURM_JOB_ID", "12ab".into()));
        let mut bad = base.to_vec();
        bad[4] = ("SLURM_STEP_TASKS_PER_NODE", "2(x3");
        assert_eq!(invalid_var(info(&bad).unwrap_err()).0, "SLURM_STEP_TASKS_PER_NODE");
        let mut bad = base.to_vec();
        bad[3] = ("SLURM_NODEID", "4");
        assert_eq!(invalid_var(info(&bad).unwrap_err()).0, "SLURM_NODEID");
    }

    #[test]
    fn explicit_wins_and_names_its_vars() {
        let i = info(&[
            ("NCCL_RS_RANK", "2"),
            ("NCCL_RS_WORLD_SIZE", "3"),
            ("NCCL_RS_MASTER_ADDR", "::1"),
            ("NCCL_RS_MASTER_PORT", "4000"),
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
        ])
        .unwrap();
        assert_eq!((i.rank, i.world_size, i.launcher), (2, 3, Launcher::Explicit));
        assert_eq!((i.master_addr.as_str(), i.master_port), ("::1", 4000));
        let e = info(&[
            ("NCCL_RS_RANK", "2"),
            ("NCCL_RS_WORLD_SIZE", "3"),
            ("NCCL_RS_MASTER_PORT", "0"),
        ]);
        assert_eq!(invalid_var(e.unwrap_err()).0, "NCCL_RS_MASTER_PORT");
    }

    #[test]
    fn nodelists() {
        let v = "SLURM_JOB_NODELIST";
        assert_eq!(first_host(v, "node[01-04,07],gpu5").unwrap(), "node01");
        assert_eq!(first_host(v, "gpu5,node[01-04]").unwrap(), "gpu5");
        assert_eq!(first_host(v, "rack[3-4]-n[008-010]").unwrap(), "rack3-n008");
        assert_eq!(
            expand_nodelist(v, "node[01-03,07],gpu5", 100).unwrap(),
            ["node01", "node02", "node03", "node07", "gpu5"]
        );
        assert_eq!(
            expand_nodelist(v, "r[1-2]n[09-10]", 100).unwrap(),
            ["r1n09", "r1n10", "r2n09", "r2n10"]
        );
        for bad in [
            "",
            "node[",
            "node[3-1]",
            "node[a-b]",
            "a,,b",
            "a]",
            "node[1-2",
            "a b",
            ",",
        ] {
            assert_eq!(
                invalid_var(first_host(v, bad).unwrap_err()),
                (v, bad.to_string()),
                "{bad:?}"
            );
        }
        assert!(expand_nodelist(v, "n[0-99999999999]", 1000).is_err());
        assert_eq!(parse_tasks_per_node("T", "4").unwrap(), [4]);
        assert_eq!(parse_tasks_per_node("T", "1,2(x2)").unwrap(), [1, 2, 2]);
        assert!(parse_tasks_per_node("T", "1(x99999999999)").is_err());
    }

    #[test]
    fn validate_checks_invariants() {
        let mut i = RankInfo::single();
        assert!(i.validate().is_ok());
        i.rank = 1;
        assert!(i.validate().is_err());
        i.world_size = 2;
        i.local_world_size = Some(2);
        assert!(i.validate().is_ok());
        i.master_port = 0;
        assert!(i.validate().is_err());
    }
}
