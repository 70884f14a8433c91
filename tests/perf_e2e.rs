//! End to end: the built `nccl-perf` binary on the real host backend (ranks as threads, and as processes).

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_nccl-perf");

fn perf(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("NCCL_PERF_TEST_CORRUPT");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run nccl-perf")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The table's data rows, split on whitespace.
fn rows(o: &Output) -> Vec<Vec<String>> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

const OPS: [&str; 9] = [
    "all_reduce",
    "all_gather",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "alltoall",
    "gather",
    "scatter",
    "sendrecv",
];

fn has_in_place(op: &str) -> bool {
    matches!(
        op,
        "all_reduce" | "all_gather" | "broadcast" | "reduce" | "reduce_scatter"
    )
}

#[test]
fn every_op_on_2_and_3_host_ranks_is_correct() {
    for g in ["2", "3"] {
        for op in OPS {
            let o = perf(
                &[
                    op,
                    "--backend",
                    "host",
                    "-g",
                    g,
                    "-b",
                    "64",
                    "-e",
                    "4K",
                    "-f",
                    "4",
                    "-n",
                    "2",
                    "-c",
                    "1",
                ],
                &[],
            );
            let t = text(&o);
            assert_eq!(o.status.code(), Some(0), "{op} -g {g}\n{t}");
            let r = rows(&o);
            assert_eq!(r.len(), 4, "{op} -g {g}: sizes 64, 256, 1K, 4K\n{t}");
            for row in &r {
                assert_eq!(row.len(), 13, "{op}: {row:?}");
                assert_eq!(row[8], "0", "{op} -g {g} out-of-place #wrong\n{t}");
                if has_in_place(op) {
                    assert_eq!(row[12], "0", "{op} -g {g} in-place #wrong\n{t}");
                } else {
                    assert_eq!(row[12], "N/A", "{op}: {row:?}");
                }
            }
            // The largest row moved data (non-zero count), and every rank has a device line.
            assert_ne!(r[3][1], "0", "{t}");
            let devices = t.lines().filter(|l| l.starts_with("#  Rank ")).count();
            assert_eq!(devices.to_string(), g, "{t}");
            assert!(t.contains("# Out of bounds values : 0 OK"), "{t}");
        }
    }
}

#[test]
fn every_type_and_reduction_on_3_ranks() {
    for op in ["all_reduce", "reduce_scatter", "reduce"] {
        let o = perf(
            &[
                op,
                "--backend",
                "host",
                "-g",
                "3",
                "-b",
                "1K",
                "-e",
                "1K",
                "-n",
                "1",
                "-w",
                "0",
                "-d",
                "all",
                "-o",
                "all",
                "-r",
                "all",
            ],
            &[],
        );
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{t}");
        let r = rows(&o);
        let roots = if op == "reduce" { 3 } else { 1 };
        assert_eq!(r.len(), 12 * 6 * roots, "{t}");
        assert!(r.iter().all(|row| row[8] == "0" && row[12] == "0"), "{t}");
    }
}

#[test]
fn corrupted_result_is_reported_and_fails() {
    for op in ["all_reduce", "gather", "sendrecv"] {
        let o = perf(
            &[
                op,
                "--backend",
                "host",
                "-g",
                "2",
                "-b",
                "256",
                "-e",
                "1K",
                "-f",
                "2",
                "-n",
                "1",
            ],
            &[("NCCL_PERF_TEST_CORRUPT", "1")],
        );
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{op}\n{t}");
        let r = rows(&o);
        assert_eq!(r.len(), 3, "{t}");
        assert!(r.iter().all(|row| row[8] == "1"), "one flipped element per row\n{t}");
        assert!(t.contains("# Out of bounds values : 3 FAILED"), "{t}");
    }
}

#[test]
fn json_output_has_every_row_and_column() {
    let dir = std::env::temp_dir().join(format!("nccl-perf-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("out.json");
    let p = path.to_str().unwrap();
    let o = perf(
        &[
            "all_gather",
            "--backend",
            "host",
            "-g",
            "2",
            "-b",
            "64",
            "-e",
            "256",
            "-f",
            "2",
            "-n",
            "1",
            "-J",
            p,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["backend"], "host");
    assert_eq!(v["program"], "all_gather_perf");
    assert!(v["command_line"].as_str().unwrap().contains("-J"));
    assert!(v["library_version"].as_str().unwrap().contains("0.1.0"));
    assert!(v["date"].as_str().unwrap().ends_with('Z'));
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let table = rows(&o);
    for (row, obj) in table.iter().zip(results) {
        assert_eq!(obj["size"].to_string(), row[0]);
        assert_eq!(obj["count"].to_string(), row[1]);
        assert_eq!(obj["type"], "float");
        assert_eq!(obj["redop"], "none");
        assert_eq!(obj["root"], -1);
        for key in ["out_of_place", "in_place"] {
            for col in ["time", "alg_bw", "bus_bw", "nwrong"] {
                assert!(obj[key][col].is_number(), "{key}.{col} in {obj}");
            }
        }
    }
    assert_eq!(v["out_of_bounds"]["okay"], true);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn flags_modes_and_aggregation_run() {
    for extra in [
        &["-z", "1"][..],
        &["-z", "2", "-m", "2"],
        &["-z", "3"],
        &["-a", "0"],
        &["-a", "2"],
        &["-a", "3", "-C", "1"],
        &["-t", "2", "-g", "1"],
        &["-i", "512", "-f", "1", "-T", "60"],
    ] {
        let mut args = vec![
            "all_reduce",
            "--backend",
            "host",
            "-g",
            "2",
            "-b",
            "512",
            "-e",
            "1K",
            "-n",
            "2",
        ];
        args.extend_from_slice(extra);
        let o = perf(&args, &[]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{extra:?}\n{t}");
        assert!(!rows(&o).is_empty(), "{t}");
        if extra.contains(&"-C") {
            assert!(t.contains("cputime"), "{t}");
        }
    }
}

#[test]
fn usage_errors_exit_2_with_usage() {
    for args in [
        &["all_reduce", "--bogus"][..],
        &["all_reduce", "-b", "1M", "-e", "1K"],
        &["all_reduce", "--backend", "host", "-G", "2"],
        &[
            "reduce",
            "--backend",
            "host",
            "-g",
            "2",
            "-r",
            "2",
            "-b",
            "1K",
            "-e",
            "1K",
        ],
        &["nope"],
    ] {
        let o = perf(args, &[]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}\n{t}");
        assert!(t.contains("Usage:"), "{args:?}\n{t}");
    }
}

#[test]
fn multi_process_nprocs_2() {
    let o = perf(
        &[
            "all_reduce",
            "--backend",
            "host",
            "--nprocs",
            "2",
            "-b",
            "256",
            "-e",
            "1K",
            "-f",
            "2",
            "-n",
            "2",
        ],
        &[],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let r = rows(&o);
    assert_eq!(r.len(), 3, "rank 0 alone prints the table\n{t}");
    assert!(r.iter().all(|row| row[8] == "0" && row[12] == "0"), "{t}");
    assert_eq!(t.lines().filter(|l| l.starts_with("#  Rank ")).count(), 2, "{t}");
    assert_eq!(t.matches("# Out of bounds values").count(), 1, "{t}");
}

/// The NCCL path end to end: every operation on 2 GPUs of one process, checked.
/// Run with: `cargo test --release --features cuda --test perf_e2e -- --ignored`
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs 2 GPUs"]
fn nccl_backend_every_op_on_2_gpus() {
    for op in OPS {
        let o = perf(
            &[
                op,
                "--backend",
                "nccl",
                "-g",
                "2",
                "-b",
                "8",
                "-e",
                "8M",
                "-f",
                "8",
                "-n",
                "5",
            ],
            &[],
        );
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{op}\n{t}");
        assert!(t.contains("backend: nccl library: NCCL 2."), "{t}");
        for row in rows(&o) {
            assert_eq!(row[8], "0", "{op}\n{t}");
        }
    }
    let o = perf(
        &[
            "all_reduce",
            "--backend",
            "nccl",
            "-g",
            "2",
            "-b",
            "1M",
            "-e",
            "1M",
            "-d",
            "all",
            "-o",
            "all",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// `-G 2` on one GPU: the timed loops and the checks run from CUDA graphs, every value right, exit 0; `-C 1`
/// with it prints the cputime header. Run with: `cargo test --release --features cuda --test perf_e2e --
/// --ignored nccl_backend_graph`
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs 1 GPU"]
fn nccl_backend_graph_launches_on_1_gpu() {
    for (op, extra) in [
        ("all_reduce", &[][..]),
        ("all_gather", &[][..]),
        ("sendrecv", &[][..]),
        ("all_reduce", &["-C", "1", "-m", "2"][..]),
    ] {
        let mut args = vec![
            op,
            "--backend",
            "nccl",
            "-g",
            "1",
            "-G",
            "2",
            "-b",
            "8",
            "-e",
            "1M",
            "-f",
            "8",
            "-n",
            "5",
        ];
        args.extend_from_slice(extra);
        let o = perf(&args, &[]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{args:?}\n{t}");
        assert!(t.contains(" graph: 2 "), "{t}");
        let rows = rows(&o);
        assert_eq!(rows.len(), 6, "{t}"); // 8 B to 256 KiB, factor 8
        for row in rows {
            assert_eq!(row[8], "0", "{args:?}\n{t}");
        }
        if extra.contains(&"-C") {
            assert!(t.contains("cputime"), "{t}");
        }
    }
}

/// nccl-perf takes its rendezvous options from the environment like every binary: a rank whose peers never
/// come gives up after `NCCL_RS_BOOTSTRAP_TIMEOUT`, says who it waited for on the way (the tracing warning,
/// on by default), and prints the failure once (not once per error layer).
#[test]
fn bootstrap_timeout_from_the_environment_and_who_is_missing() {
    let port = nccl::bootstrap::launch::free_port("127.0.0.1".parse().unwrap()).unwrap();
    let port = port.to_string();
    let env = |rank: &'static str, secs: &'static str| {
        [
            ("RANK", rank),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("NCCL_RS_BOOTSTRAP_TIMEOUT", secs),
        ]
    };
    // Rank 1 alone: rank 0 is unreachable; 2 s, not the 300 s default.
    let t0 = std::time::Instant::now();
    let mut e1 = env("1", "2").to_vec();
    e1.push(("MASTER_PORT", &port));
    let o = perf(&["all_reduce", "--backend", "host"], &e1);
    assert!(t0.elapsed() < std::time::Duration::from_secs(30), "{:?}", t0.elapsed());
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert_eq!(err.matches("could not reach rank 0").count(), 1, "{err}");
    // Rank 0 alone for 11 s: at 10 s it names rank 1 as missing, then fails naming it once.
    let mut e0 = env("0", "11").to_vec();
    e0.push(("MASTER_PORT", &port));
    let o = perf(&["all_reduce", "--backend", "host"], &e0);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("WARN") && err.contains("[1]"),
        "a warning names the missing rank: {err}"
    );
    assert_eq!(err.matches("never arrived").count(), 1, "{err}");
}

/// The header names the build, as nccl-tests' does: the version and the commit (root build.rs).
#[test]
fn header_names_version_and_commit() {
    let o = perf(&["all_reduce", "-g", "1", "-b", "8", "-e", "8"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let first = out.lines().next().unwrap_or_default();
    let git = first
        .strip_prefix(concat!("# nccl-perf version ", env!("CARGO_PKG_VERSION"), " (git "))
        .and_then(|r| r.split_once(')'))
        .map(|(g, _)| g)
        .unwrap_or_else(|| panic!("header: {first}"));
    assert!(
        !git.is_empty() && git != "unknown",
        "built in a git checkout, so the commit is known: {first}"
    );
    assert_eq!(git, env!("NCCL_STACK_GIT"));
}
