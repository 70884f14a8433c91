//! Bandwidth factors, buffer counts and size parsing against nccl-tests' formulas.

use nccl_stack::perf::cli::{parse_size, Cli};
use nccl_stack::perf::CollOp;

#[test]
fn bus_factors_per_op_and_world_size() {
    for n in [1usize, 2, 3, 4, 8, 16] {
        let nf = n as f64;
        let expect = |op: CollOp| match op {
            CollOp::AllReduce => 2.0 * (nf - 1.0) / nf,
            CollOp::AllGather | CollOp::ReduceScatter | CollOp::AllToAll | CollOp::Gather | CollOp::Scatter => {
                (nf - 1.0) / nf
            }
            CollOp::Broadcast | CollOp::Reduce | CollOp::SendRecv => 1.0,
        };
        for op in CollOp::ALL {
            assert_eq!(op.bus_factor(n), expect(op), "{op} n={n}");
        }
    }
    assert_eq!(CollOp::AllReduce.bus_factor(8), 1.75);
    assert_eq!(CollOp::AllGather.bus_factor(4), 0.75);
}

#[test]
fn algbw_uses_nranks_for_per_rank_counts() {
    // 1 MB (262144 floats) all_reduce in 1 ms: 1.048576 GB/s; busbw × 2(n-1)/n.
    let (alg, bus) = CollOp::AllReduce.bandwidth(262144, 4, 1e-3, 4);
    assert!((alg - 1.048576).abs() < 1e-12);
    assert!((bus - 1.048576 * 1.5).abs() < 1e-12);
    // all_gather count is per rank: bytes = count × size × n.
    let (alg, bus) = CollOp::AllGather.bandwidth(1000, 4, 1e-3, 4);
    assert!((alg - 0.016).abs() < 1e-12);
    assert!((bus - 0.012).abs() < 1e-12);
    let (alg, bus) = CollOp::SendRecv.bandwidth(1000, 8, 1e-6, 2);
    assert!((alg - 8.0).abs() < 1e-9 && alg == bus);
}

#[test]
fn counts_follow_get_coll_byte_count() {
    // all_reduce: everything is the requested count.
    let c = CollOp::AllReduce.counts(1000, 4, 3);
    assert_eq!((c.send, c.recv, c.param), (1000, 1000, 1000));
    // all_gather: per-rank count rounded down to 16 bytes (4 floats): 1000/3 = 333 -> 332.
    let c = CollOp::AllGather.counts(1000, 4, 3);
    assert_eq!((c.send, c.recv, c.param), (332, 996, 332));
    assert_eq!(c.size_bytes(4), 996 * 4);
    let c = CollOp::ReduceScatter.counts(1000, 4, 3);
    assert_eq!((c.send, c.recv, c.param), (996, 332, 332));
    let c = CollOp::AllToAll.counts(1000, 8, 3);
    assert_eq!((c.send, c.recv, c.param), (996, 996, 332));
    // 8 bytes of floats over 2 ranks: 1 float per rank rounds down to 0 (nccl-tests prints size 0 rows too).
    assert_eq!(CollOp::Gather.counts(2, 4, 2).param, 0);
    // int8: 16-element blocks.
    assert_eq!(CollOp::Scatter.counts(100, 1, 2).param, 48);
}

#[test]
fn sizes_parse_like_nccl_tests() {
    assert_eq!(parse_size("8"), Ok(8));
    assert_eq!(parse_size("1K"), Ok(1024));
    assert_eq!(parse_size("1k"), Ok(1024));
    assert_eq!(parse_size("128M"), Ok(128 << 20));
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert_eq!(parse_size("0.5K"), Ok(512));
    for bad in ["", "K", "12Q", "-1", "1.2.3", "abc", "1 K B", "1e3"] {
        assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn op_names_and_binary_names() {
    assert_eq!(CollOp::parse("all_reduce"), Some(CollOp::AllReduce));
    assert_eq!(CollOp::parse("all_reduce_perf"), Some(CollOp::AllReduce));
    assert_eq!(CollOp::parse("alltoall_perf"), Some(CollOp::AllToAll));
    assert_eq!(CollOp::parse("all_to_all"), Some(CollOp::AllToAll));
    assert_eq!(CollOp::parse("sendrecv"), Some(CollOp::SendRecv));
    assert_eq!(CollOp::parse("hypercube"), None);
}

#[test]
fn defaults_match_nccl_tests() {
    let cli = Cli::parse_and_check(["nccl-perf", "all_reduce"]).unwrap();
    assert_eq!(
        (cli.min_bytes, cli.max_bytes, cli.step_bytes, cli.step_factor),
        (32 << 20, 32 << 20, 1 << 20, 1)
    );
    assert_eq!((cli.iters, cli.warmup_iters, cli.agg_iters, cli.check), (20, 1, 1, 1));
    assert_eq!((cli.nthreads, cli.ngpus, cli.average, cli.blocking), (1, 1, 1, 0));
    assert_eq!(cli.sizes(), vec![32 << 20]);
}

#[test]
fn bad_flags_are_usage_errors() {
    let err = |args: &[&str]| {
        let mut v = vec!["nccl-perf"];
        v.extend_from_slice(args);
        Cli::parse_and_check(v).unwrap_err()
    };
    for args in [
        &["all_reduce", "-b", "1M", "-e", "1K"][..],
        &["all_reduce", "-z", "7"],
        &["all_reduce", "-a", "4"],
        &["all_reduce", "-n", "0"],
        &["all_reduce", "-b", "0", "-e", "1K", "-f", "2"],
        &["all_reduce", "-b", "1", "-e", "1K", "-i", "0"],
        &["all_reduce", "--backend", "host", "-G", "1"],
        &["all_reduce", "-G", "1", "-z", "1"],
        &["all_reduce", "-G", "1", "-z", "2"],
        &["all_reduce", "-G", "1", "-z", "3"],
        &["all_reduce", "-d", "float128"],
        &["all_reduce", "-o", "xor"],
        &["all_reduce", "-X", "1"],
        &["not_an_op"],
    ] {
        let e = err(args);
        assert_eq!(e.exit_code(), 2, "{args:?}");
        assert!(e.render().to_string().contains("Usage"), "{args:?}: {}", e.render());
    }
}
