//! Ranks as child processes of the test binary: each child re-executes the binary with `--exact <test>` and
//! an environment marker, joins through the bootstrap's TCP rendezvous on loopback and maps the `/dev/shm`
//! segment. The parent collects exit codes and output, and checks that no segment is left behind.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nccl::bootstrap::{RankInfo, Rendezvous, RendezvousOptions};
use nccl::host::{HostComm, HostOptions};

pub const CHILD: &str = "NCCL_RS_HOST_TEST_CHILD";
/// Exit code of a rank 0 that could not bind the rendezvous port.
pub const PORT_TAKEN: i32 = 75;

/// In a child: this test's communicator. `None` in the parent.
pub fn child(test: &str, o: HostOptions) -> Option<HostComm> {
    if std::env::var(CHILD).ok()? != test {
        return None;
    }
    let info = RankInfo::from_env().expect("rank info from the environment");
    let rv = match Rendezvous::new(&info, RendezvousOptions::default()) {
        Ok(rv) => rv,
        // Another test took the port between `free_port` and the bind: tell the parent to retry.
        Err(e) if info.rank == 0 && format!("{e:?}").contains("PortInUse") => std::process::exit(PORT_TAKEN),
        Err(e) => panic!("rendezvous: {e:?}"),
    };
    Some(HostComm::from_rendezvous(&rv, o).expect("host communicator"))
}

pub struct Exit {
    pub pid: u32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub out: String,
}

/// Runs `test` as `n` child processes (ranks 0..n) and waits for all of them (killing them after 120 s);
/// retries with a new port when another test took the one picked.
pub fn spawn_world(test: &str, n: usize) -> Vec<Exit> {
    spawn_world_env(test, n, &[])
}

/// As [`spawn_world`], with extra environment variables for every rank.
pub fn spawn_world_env(test: &str, n: usize, env: &[(&str, String)]) -> Vec<Exit> {
    for _ in 0..5 {
        if let Some(exits) = try_spawn_world(test, n, env) {
            return exits;
        }
    }
    panic!("could not find a free rendezvous port in 5 attempts");
}

fn try_spawn_world(test: &str, n: usize, env: &[(&str, String)]) -> Option<Vec<Exit>> {
    use std::os::unix::process::ExitStatusExt;
    let port = nccl::bootstrap::launch::free_port("127.0.0.1".parse().unwrap()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut kids: Vec<_> = (0..n)
        .map(|r| {
            Command::new(&exe)
                .args(["--exact", test, "--nocapture", "--test-threads=1"])
                .env(CHILD, test)
                .env("NCCL_RS_RANK", r.to_string())
                .env("NCCL_RS_WORLD_SIZE", n.to_string())
                .env("NCCL_RS_LOCAL_RANK", r.to_string())
                .env("NCCL_RS_LOCAL_WORLD_SIZE", n.to_string())
                .env("NCCL_RS_MASTER_ADDR", "127.0.0.1")
                .env("NCCL_RS_MASTER_PORT", port.to_string())
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a rank")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut exits = vec![];
    let first = loop {
        if let Some(st) = kids[0].try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Some(st) = first {
        if st.code() == Some(PORT_TAKEN) {
            for k in kids.iter_mut() {
                let _ = k.kill();
                let _ = k.wait();
            }
            return None;
        }
    }
    for k in kids.iter_mut() {
        while k.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = k.kill();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for k in kids {
        let pid = k.id();
        let o = k.wait_with_output().unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        exits.push(Exit {
            pid,
            code: o.status.code(),
            signal: o.status.signal(),
            out,
        });
    }
    Some(exits)
}

/// No segment created by rank 0 (named after its pid) is left in /dev/shm.
pub fn assert_no_leak(exits: &[Exit]) {
    let prefix = format!("nccl-rs-{}-", exits[0].pid);
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "leftover shared memory: {left:?}");
}

pub fn assert_all_ok(exits: &[Exit]) {
    for (r, e) in exits.iter().enumerate() {
        assert_eq!(e.code, Some(0), "rank {r} failed:\n{}", e.out);
        assert!(e.out.contains("1 passed"), "rank {r} did not run the test:\n{}", e.out);
    }
    assert_no_leak(exits);
}
