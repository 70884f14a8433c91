//! Property test: random scripts of collectives and barriers on 2-4 ranks, as threads and as processes,
//! with at most one fault injected: a rank calling something else at one step (another count, type, root
//! or op, or a barrier), or a rank leaving (returning, panicking, or killed with SIGKILL). Every call
//! either succeeds with the exact result, or fails on every rank within the timeout, as the oracle of
//! `host_common::script` states; nothing hangs, and no buffer of a returned call is written afterwards.

mod host_common;

use std::time::Duration;

use host_common::procs::{assert_no_leak, child, spawn_world_env, CHILD};
use host_common::script::*;
use nccl::host::HostOptions;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

const TIMEOUT: Duration = Duration::from_secs(10);
const PLAN_ENV: &str = "NCCL_RS_CHAOS_PLAN";

/// Cases per run: `default`, or `NCCL_RS_CHAOS_CASES` (for longer soak runs).
fn cases(default: u32) -> u32 {
    std::env::var("NCCL_RS_CHAOS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Counts around the 16 KiB direct threshold (4096 f32), tiny ones, and one that takes several rounds.
fn count() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(5),
        Just(4095),
        Just(4096),
        Just(4100),
        Just(20_000)
    ]
}

fn call(n: usize) -> impl Strategy<Value = Call> {
    prop_oneof![
        2 => Just(Call::Barrier),
        3 => (count(), any::<bool>()).prop_map(|(count, int)| Call::AllReduce { count, int }),
        1 => (count(), 0..n).prop_map(|(count, root)| Call::Broadcast { count, root }),
        1 => (count(), 0..n).prop_map(|(count, root)| Call::Reduce { count, root }),
        1 => count().prop_map(|count| Call::AllGather { count }),
        1 => count().prop_map(|count| Call::ReduceScatter { count }),
        1 => count().prop_map(|count| Call::AllToAll { count }),
    ]
}

/// A call that differs from `c` in the way `how` picks.
fn perturb(c: Call, how: u8, n: usize) -> Call {
    use Call::*;
    let p = match (how % 4, c) {
        (0, Barrier) => AllReduce {
            count: 4096,
            int: false,
        },
        (0, AllReduce { count, int }) => AllReduce { count: count + 1, int },
        (0, Broadcast { count, root }) => Broadcast { count: count + 1, root },
        (0, Reduce { count, root }) => Reduce { count: count + 1, root },
        (0, AllGather { count }) => AllGather { count: count + 1 },
        (0, ReduceScatter { count }) => ReduceScatter { count: count + 1 },
        (0, AllToAll { count }) => AllToAll { count: count + 1 },
        (1, Barrier) => AllGather { count: 1 },
        (1, _) => Barrier,
        (2, AllReduce { count, int }) => AllReduce { count, int: !int },
        (2, Broadcast { count, root }) => Broadcast {
            count,
            root: (root + 1) % n,
        },
        (2, Reduce { count, root }) => Reduce {
            count,
            root: (root + 1) % n,
        },
        (2, other) => perturb(other, 0, n),
        (_, AllReduce { count, .. }) => ReduceScatter { count },
        (_, Broadcast { count, root }) => Reduce { count, root },
        (_, Reduce { count, root }) => Broadcast { count, root },
        (_, AllGather { count }) => AllToAll { count },
        (_, ReduceScatter { count }) => AllReduce { count, int: false },
        (_, AllToAll { count }) => AllGather { count },
        (_, Barrier) => AllReduce { count: 5, int: true },
    };
    assert_ne!(p, c);
    p
}

#[derive(Clone, Debug)]
enum Fault {
    None,
    Mismatch { rank: usize, step: usize, how: u8 },
    Leave { rank: usize, step: usize, crash: bool },
}

/// A world size, one plan per rank, and options.
fn case() -> impl Strategy<Value = (Vec<Plan>, HostOptions)> {
    (2usize..=4)
        .prop_flat_map(|n| {
            let fault = prop_oneof![
                1 => Just(Fault::None),
                2 => (0..n, 0usize..6, any::<u8>()).prop_map(|(rank, step, how)| Fault::Mismatch { rank, step, how }),
                1 => (0..n, 0usize..6, any::<bool>()).prop_map(|(rank, step, crash)| Fault::Leave { rank, step, crash }),
            ];
            let slot = prop_oneof![Just(None), Just(Some(1024usize))];
            let direct = prop_oneof![Just(16 * 1024usize), Just(0), Just(usize::MAX)];
            (Just(n), prop::collection::vec(call(n), 1..=6), fault, slot, direct)
        })
        .prop_map(|(n, calls, fault, slot_bytes, direct_min_bytes)| {
            let mut plans = vec![
                Plan {
                    calls: calls.clone(),
                    leave: None
                };
                n
            ];
            match fault {
                Fault::None => {}
                Fault::Mismatch { rank, step, how } => {
                    let k = step % calls.len();
                    plans[rank].calls[k] = perturb(calls[k], how, n);
                }
                Fault::Leave { rank, step, crash } => {
                    let how = if crash { Leave::Crash } else { Leave::Return };
                    plans[rank].leave = Some((step % calls.len(), how));
                }
            }
            let o = HostOptions {
                timeout: TIMEOUT,
                slot_bytes,
                direct_min_bytes,
                ..HostOptions::default()
            };
            (plans, o)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(128), ..ProptestConfig::default() })]

    #[test]
    fn threads_random_scripts((plans, o) in case()) {
        let recs = run_threads(&plans, o, Duration::from_secs(60));
        assert_oracle(&plans, &recs, TIMEOUT);
    }
}

/// The same on process ranks (a quarter of the cases: each starts 2-4 processes). A `Crash` is a SIGKILL.
#[test]
fn processes_random_scripts() {
    const T: &str = "processes_random_scripts";
    if std::env::var(CHILD).ok().as_deref() == Some(T) {
        let (plans, o) = decode(&std::env::var(PLAN_ENV).expect("the plan"));
        let c = child(T, o).unwrap();
        let plan = &plans[nccl::Collectives::rank(&c)];
        let mut recs = vec![];
        let leave = exec(&c, plan, &mut recs);
        for x in &recs {
            println!("{}", record_line(x));
        }
        use std::io::Write;
        std::io::stdout().flush().unwrap();
        if leave == Some(Leave::Crash) {
            // SAFETY: sending SIGKILL to ourselves; nothing after this runs (no destructor marks us gone).
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        return;
    }
    let mut runner = TestRunner::new(Config {
        cases: cases(128) / 4,
        ..Config::default()
    });
    runner
        .run(&case(), |(plans, o)| {
            let n = plans.len();
            let exits = spawn_world_env(T, n, &[(PLAN_ENV, encode(&plans, &o))]);
            let mut recs = vec![];
            for (r, (e, p)) in exits.iter().zip(&plans).enumerate() {
                if p.leave.is_some_and(|(_, how)| how == Leave::Crash) {
                    assert_eq!(e.signal, Some(libc::SIGKILL), "rank {r}:\n{}", e.out);
                } else {
                    assert_eq!(e.code, Some(0), "rank {r} failed:\n{}", e.out);
                    assert!(e.out.contains("1 passed"), "rank {r} did not run:\n{}", e.out);
                }
                recs.push(parse_records(&e.out));
            }
            assert_oracle(&plans, &recs, TIMEOUT);
            assert_no_leak(&exits);
            Ok(())
        })
        .unwrap();
}

#[test]
fn plans_survive_the_trip_to_a_child() {
    let mut runner = TestRunner::deterministic();
    for _ in 0..200 {
        let (plans, o) = case().new_tree(&mut runner).unwrap().current();
        let (back, o2) = decode(&encode(&plans, &o));
        assert_eq!(back, plans);
        assert_eq!(
            (o2.timeout, o2.slot_bytes, o2.direct_min_bytes),
            (o.timeout, o.slot_bytes, o.direct_min_bytes)
        );
    }
}
