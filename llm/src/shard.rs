//! How a model is split over ranks: which heads, MLP rows, vocabulary rows and layers a rank owns.
//!
//! Pure functions of the configuration and the parallel layout, so they are tested on their own.
//!
//! * Attention is split by query heads, keeping whole KV-head groups together when the TP degree does not
//!   exceed the number of KV heads (no KV head is then computed twice). With more ranks than KV heads the
//!   query heads are split evenly and every rank holds (replicates) the KV heads its query heads read.
//! * The MLP's intermediate dimension and the vocabulary are split in contiguous, nearly equal ranges
//!   (uneven shards allowed). The vocabulary shards are padded to one size so the LM head can be gathered
//!   with one all-gather.
//! * Pipeline stages get contiguous, nearly equal ranges of layers.

use std::ops::Range;

/// The `i`-th of `parts` nearly equal contiguous ranges of `0..n` (earlier ranges are never larger).
pub fn even_range(n: usize, parts: usize, i: usize) -> Range<usize> {
    debug_assert!(parts > 0 && i < parts);
    (n * i / parts)..(n * (i + 1) / parts)
}

/// The attention heads one tensor-parallel rank owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadShard {
    /// Query heads (global indices), contiguous.
    pub q_heads: Range<usize>,
    /// KV heads (global indices) the query heads read, contiguous.
    pub kv_heads: Range<usize>,
}

/// The heads rank `rank` of `tp` owns, for `n_heads` query heads in groups over `n_kv_heads` KV heads.
///
/// Requires `1 <= tp <= n_heads`, `n_kv_heads >= 1` and `n_heads % n_kv_heads == 0`
/// (checked by [`check_tp`]).
pub fn head_shard(n_heads: usize, n_kv_heads: usize, tp: usize, rank: usize) -> HeadShard {
    let group = n_heads / n_kv_heads;
    if tp <= n_kv_heads {
        let kv = even_range(n_kv_heads, tp, rank);
        HeadShard {
            q_heads: kv.start * group..kv.end * group,
            kv_heads: kv,
        }
    } else {
        let q = even_range(n_heads, tp, rank);
        let kv = (q.start / group)..((q.end - 1) / group + 1);
        HeadShard {
            q_heads: q,
            kv_heads: kv,
        }
    }
}

/// Checks that a model with these head counts can be split over `tp` ranks.
pub fn check_tp(n_heads: usize, n_kv_heads: usize, tp: usize) -> Result<(), String> {
    if n_kv_heads == 0 || n_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(format!(
            "the model has {n_heads} query heads and {n_kv_heads} KV heads; the query heads must be a \
             non-zero multiple of the KV heads"
        ));
    }
    if tp == 0 || tp > n_heads {
        return Err(format!(
            "--tp {tp}: the tensor-parallel degree must be between 1 and the number of query heads ({n_heads})"
        ));
    }
    Ok(())
}

/// The vocabulary rows rank `rank` of `tp` owns, and the padded shard length every rank uses.
pub fn vocab_shard(vocab: usize, tp: usize, rank: usize) -> (Range<usize>, usize) {
    let per = vocab.div_ceil(tp);
    let start = (per * rank).min(vocab);
    let end = (per * (rank + 1)).min(vocab);
    (start..end, per)
}

/// The layers pipeline stage `stage` of `pp` runs.
pub fn stage_layers(n_layers: usize, pp: usize, stage: usize) -> Range<usize> {
    even_range(n_layers, pp, stage)
}

/// A rank's place in a `tp × pp` layout. World rank = `stage * tp + tp_rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Tensor-parallel degree.
    pub tp: usize,
    /// Pipeline-parallel degree.
    pub pp: usize,
}

impl Layout {
    /// Total ranks.
    pub fn world(&self) -> usize {
        self.tp * self.pp
    }
    /// `(stage, tp_rank)` of a world rank.
    pub fn coords(&self, world_rank: usize) -> (usize, usize) {
        (world_rank / self.tp, world_rank % self.tp)
    }
    /// World ranks of the tensor-parallel group of `stage` (consecutive).
    pub fn tp_group(&self, stage: usize) -> Vec<usize> {
        (0..self.tp).map(|t| stage * self.tp + t).collect()
    }
    /// World ranks of the pipeline group of `tp_rank` (one per stage, in stage order).
    pub fn pp_group(&self, tp_rank: usize) -> Vec<usize> {
        (0..self.pp).map(|s| s * self.tp + tp_rank).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_ranges_cover_exactly() {
        for n in 0..40 {
            for parts in 1..10 {
                let mut next = 0;
                for i in 0..parts {
                    let r = even_range(n, parts, i);
                    assert_eq!(r.start, next);
                    assert!(r.len() <= n.div_ceil(parts));
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn heads_cover_every_query_head_once_and_read_the_right_kv_heads() {
        for (h, kv) in [(9, 3), (4, 2), (8, 8), (32, 8), (6, 1), (12, 4)] {
            for tp in 1..=h {
                check_tp(h, kv, tp).unwrap();
                let group = h / kv;
                let mut next = 0;
                for r in 0..tp {
                    let s = head_shard(h, kv, tp, r);
                    assert_eq!(s.q_heads.start, next, "h={h} kv={kv} tp={tp} r={r}");
                    assert!(!s.q_heads.is_empty());
                    next = s.q_heads.end;
                    for q in s.q_heads.clone() {
                        assert!(s.kv_heads.contains(&(q / group)));
                    }
                    // No KV head held that none of the query heads reads.
                    assert_eq!(s.kv_heads.start, s.q_heads.start / group);
                    assert_eq!(s.kv_heads.end, (s.q_heads.end - 1) / group + 1);
                }
                assert_eq!(next, h);
            }
        }
        // SmolLM2: TP 2 keeps groups whole, TP 3 gives each rank one KV head.
        assert_eq!(
            head_shard(9, 3, 2, 0),
            HeadShard {
                q_heads: 0..3,
                kv_heads: 0..1
            }
        );
        assert_eq!(
            head_shard(9, 3, 2, 1),
            HeadShard {
                q_heads: 3..9,
                kv_heads: 1..3
            }
        );
        assert_eq!(
            head_shard(9, 3, 3, 2),
            HeadShard {
                q_heads: 6..9,
                kv_heads: 2..3
            }
        );
    }

    #[test]
    fn bad_tp_is_rejected() {
        assert!(check_tp(9, 3, 0).is_err());
        assert!(check_tp(9, 3, 10).is_err());
        assert!(check_tp(9, 2, 1).is_err());
        assert!(check_tp(9, 0, 1).is_err());
    }

    #[test]
    fn vocab_shards_are_padded_to_one_length() {
        for vocab in [1, 7, 49152, 100] {
            for tp in 1..6 {
                let mut next = 0;
                for r in 0..tp {
                    let (rows, per) = vocab_shard(vocab, tp, r);
                    assert_eq!(per, vocab.div_ceil(tp));
                    assert!(rows.len() <= per);
                    assert_eq!(rows.start, next);
                    next = rows.end;
                }
                assert_eq!(next, vocab);
            }
        }
    }

    #[test]
    fn layout_groups() {
        let l = Layout { tp: 2, pp: 3 };
        assert_eq!(l.world(), 6);
        assert_eq!(l.coords(5), (2, 1));
        assert_eq!(l.tp_group(1), vec![2, 3]);
        assert_eq!(l.pp_group(1), vec![1, 3, 5]);
    }
}
