//! `--backend nccl` for the CPU engine: device placement, the clear errors of a host without a GPU (or a
//! build without the `cuda` feature), and, on GPUs, NCCL ranks giving the host backend's tokens and logits.
//!
//! The GPU tests are ignored here (no GPU on CI). On a machine with at least 4 GPUs run them with:
//!
//! ```text
//! cargo test -p nccl-llm --features cuda --test engine_nccl -- --ignored
//! ```

use nccl_llm::cli::{self, Args, Example};
use nccl_llm::launch::{nccl_process_device, nccl_thread_devices, nccl_thread_devices_from};
#[cfg(feature = "cuda")]
use nccl_llm::shard::Layout;

use clap::Parser;

#[test]
fn thread_ranks_go_round_robin_over_the_devices() {
    assert_eq!(nccl_thread_devices(4, 8).unwrap(), [0, 1, 2, 3]);
    assert_eq!(nccl_thread_devices(8, 8).unwrap(), (0..8).collect::<Vec<_>>());
    assert_eq!(nccl_thread_devices(5, 2).unwrap(), [0, 1, 0, 1, 0]);
    let err = nccl_thread_devices(2, 0).unwrap_err().to_string();
    assert!(err.contains("no CUDA device was found"), "{err}");
    // serve's replica r of w ranks starts at r × w: replicas take different GPUs while there are enough.
    assert_eq!(nccl_thread_devices_from(2, 2, 8).unwrap(), [2, 3]);
    assert_eq!(nccl_thread_devices_from(2, 6, 8).unwrap(), [6, 7]);
    assert_eq!(nccl_thread_devices_from(4, 2, 4).unwrap(), [2, 3, 0, 1]);
    assert!(nccl_thread_devices_from(1, 3, 0).is_err());
}

#[test]
fn process_ranks_use_their_local_rank_as_device() {
    assert_eq!(nccl_process_device(3, 8).unwrap(), 3);
    let err = nccl_process_device(2, 2).unwrap_err().to_string();
    assert!(err.contains("local rank 2") && err.contains("2 device(s)"), "{err}");
    let err = nccl_process_device(0, 0).unwrap_err().to_string();
    assert!(err.contains("no CUDA device was found"), "{err}");
}

fn nccl_args(extra: &[&str]) -> Args {
    let base = [
        "tp_llama",
        "--tiny",
        "--backend",
        "nccl",
        "--max-new-tokens",
        "2",
        "--json",
    ];
    Args::try_parse_from(base.iter().chain(extra)).expect("valid arguments")
}

/// Without the `cuda` feature `--backend nccl` says how to rebuild, before loading anything.
#[cfg(not(feature = "cuda"))]
#[test]
fn without_the_cuda_feature_nccl_says_rebuild() {
    for extra in [&[][..], &["--nprocs", "2"][..]] {
        let err = cli::run(Example::Tp, nccl_args(extra)).unwrap_err().to_string();
        assert!(err.contains("rebuild with --features cuda"), "{extra:?}: {err}");
    }
}

/// With the `cuda` feature on a host without a CUDA device (this CI machine), `--backend nccl` fails with an
/// error naming that, as threads and before `--nprocs` starts any worker; no panic. Skips (saying so) where a
/// device is visible: there the GPU tests below cover the backend.
#[cfg(feature = "cuda")]
#[test]
fn with_cuda_but_no_device_nccl_is_a_clear_error() {
    if nccl::cuda_device_count() > 0 {
        eprintln!("skipped: a CUDA device is visible (run the ignored GPU tests instead)");
        return;
    }
    for extra in [&[][..], &["--nprocs", "2"][..], &["--tp", "2", "--pp", "2"][..]] {
        let err = cli::run(Example::Tp, nccl_args(extra)).unwrap_err().to_string();
        assert!(err.contains("no CUDA device was found"), "{extra:?}: {err}");
    }
    let err = nccl_llm::launch::NcclThreads::new(Layout { tp: 2, pp: 1 })
        .err()
        .expect("no device: NcclThreads::new fails")
        .to_string();
    assert!(err.contains("no CUDA device was found"), "{err}");
}

/// NCCL ranks as threads (layout `tp × pp`, split from one world communicator) give the host backend's
/// greedy tokens and logits on the tiny model.
#[cfg(feature = "cuda")]
fn nccl_matches_host(layout: Layout) {
    use nccl_llm::engine::{GenerateOutput, GenerateParams, Rank, RankModel, RankPlace};
    use nccl_llm::launch::{generate_in_threads, NcclThreads};
    use nccl_llm::model;
    use nccl_llm::sample::SamplingParams;

    let src = model::tiny_random(7);
    let vocab = src.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..11).map(|i| (i * 37 + 5) % vocab).collect();
    let params = GenerateParams {
        max_new_tokens: 8,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        micro_batches: 0,
    };
    let host = generate_in_threads(&*src, layout, 1, &prompt, &params).expect("host backend");

    let nt = NcclThreads::new(layout).expect("NCCL ranks");
    let results: Vec<nccl_llm::error::Result<GenerateOutput>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..layout.world())
            .map(|w| {
                let (nt, src, prompt, params) = (&nt, &*src, &prompt, &params);
                s.spawn(move || {
                    let c = nt.rank(w)?;
                    assert_eq!(c.tp.backend_name(), if layout.tp > 1 { "nccl" } else { "single" });
                    assert_eq!(c.pp.backend_name(), if layout.pp > 1 { "nccl" } else { "single" });
                    let (stage, tp_rank) = layout.coords(w);
                    assert_eq!((c.tp.rank(), c.tp.size()), (tp_rank, layout.tp), "rank {w} TP group");
                    assert_eq!((c.pp.rank(), c.pp.size()), (stage, layout.pp), "rank {w} pipeline");
                    let place = RankPlace {
                        tp: layout.tp,
                        tp_rank,
                        pp: layout.pp,
                        stage,
                        threads: 1,
                    };
                    let model = RankModel::load(src, place, &mut |_, _| {})?;
                    Rank::new(model, c.tp, c.pp)?.generate(prompt, params, &mut |_| {})
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    let outs = nccl_llm::launch::first_error(results).expect("NCCL backend");
    for (w, (n, h)) in outs.iter().zip(&host).enumerate() {
        assert_eq!(n.generated, h.generated, "rank {w}: tokens, NCCL vs host");
        assert_eq!(
            n.prompt_logits.is_some(),
            h.prompt_logits.is_some(),
            "rank {w}: logits presence"
        );
        if let (Some(a), Some(b)) = (&n.prompt_logits, &h.prompt_logits) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(
                diff <= 1e-4 * scale,
                "rank {w}: logits differ by {diff} (scale {scale})"
            );
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs 2 GPUs"]
fn nccl_tp2_matches_host() {
    nccl_matches_host(Layout { tp: 2, pp: 1 });
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs 2 GPUs"]
fn nccl_pp2_matches_host() {
    nccl_matches_host(Layout { tp: 1, pp: 2 });
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs 4 GPUs"]
fn nccl_tp2_pp2_split_matches_host() {
    nccl_matches_host(Layout { tp: 2, pp: 2 });
}
