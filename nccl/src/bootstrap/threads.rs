//! The one-process-many-GPUs case: N ranks as N threads sharing one `UniqueId` by reference.

use super::error::BootstrapError;

/// Runs `f(rank)` for ranks `0..n` on `n` threads (named `rank-<r>`), joins them all, and returns the results
/// in rank order. A thread that panics becomes [`BootstrapError::RankPanicked`] naming the lowest panicking
/// rank (the panic does not propagate).
///
/// The ranks run concurrently, as NCCL requires when every rank of a communicator calls `ncclCommInitRank`.
/// If a rank panics while the others wait for it in a collective, those must fail on their own (the host
/// backend does; NCCL needs an abort or a timeout), or this call waits for them.
///
/// ```
/// let sums = nccl::bootstrap::run_threads(4, |rank| rank * 10).unwrap();
/// assert_eq!(sums, [0, 10, 20, 30]);
/// let err = nccl::bootstrap::run_threads(3, |rank| if rank == 2 { panic!("boom") } else { rank });
/// assert!(matches!(err, Err(nccl::bootstrap::BootstrapError::RankPanicked { rank: 2, .. })));
/// ```
pub fn run_threads<R, F>(n: usize, f: F) -> Result<Vec<R>, BootstrapError>
where
    R: Send,
    F: Fn(usize) -> R + Sync,
{
    if n == 0 {
        return Err(BootstrapError::InvalidArgument {
            what: "run_threads",
            reason: "at least one rank is needed".into(),
        });
    }
    let f = &f;
    std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(n);
        for rank in 0..n {
            let h = std::thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn_scoped(s, move || f(rank))
                .map_err(|source| BootstrapError::Spawn {
                    rank,
                    what: "spawning the rank thread",
                    source,
                })?;
            handles.push(h);
        }
        let mut out = Vec::with_capacity(n);
        let mut first_panic = None;
        for (rank, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(r) => out.push(r),
                Err(payload) => {
                    if first_panic.is_none() {
                        first_panic = Some(BootstrapError::RankPanicked {
                            rank,
                            message: panic_message(payload.as_ref()),
                        });
                    }
                }
            }
        }
        match first_panic {
            Some(e) => Err(e),
            None => Ok(out),
        }
    })
}

/// The text of a panic payload (`&str` or `String`), or a placeholder.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}
