//! The data plan: which training window every global sequence index reads — a pure function of
//! (seed, epoch, index), so it does not depend on the world size or on which process asks.
//!
//! Step `s` consumes global indices `[s·G, (s+1)·G)` (G = global batch); the run's cursor is one number, the
//! sequences consumed. Each epoch is a seeded permutation of all windows; the last partial global batch of an
//! epoch is dropped. A step's G indices are split among ranks in contiguous shares whose sizes differ by at most
//! one ([`rank_share`]). The permutation is a keyed Feistel network with cycle walking: O(1) memory, any size.
use std::ops::Range;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPlan {
    seed: u64,
    num_windows: u64,
    global_batch: u64,
}

impl DataPlan {
    pub fn new(seed: u64, num_windows: u64, global_batch: u64) -> Result<Self> {
        if global_batch == 0 || num_windows < global_batch {
            return Err(Error::Invalid {
                field: "train.global_batch",
                value: global_batch.to_string(),
                reason: format!(
                    "the training data has only {num_windows} windows; use a smaller global batch or sequence length, or more data"
                ),
            });
        }
        Ok(Self {
            seed,
            num_windows,
            global_batch,
        })
    }

    pub fn num_windows(&self) -> u64 {
        self.num_windows
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.num_windows / self.global_batch
    }

    /// Windows of each epoch that no step reads (the last partial global batch).
    pub fn dropped_per_epoch(&self) -> u64 {
        self.num_windows % self.global_batch
    }

    /// Sequences each epoch reads: every window but the dropped ones.
    pub fn sequences_per_epoch(&self) -> u64 {
        self.steps_per_epoch() * self.global_batch
    }

    /// The epoch (0-based) that global sequence index `index` belongs to.
    pub fn epoch(&self, index: u64) -> u64 {
        index / self.sequences_per_epoch()
    }

    /// How many epochs `steps` optimizer steps amount to (fractional).
    pub fn epochs_in(&self, steps: u64) -> f64 {
        steps as f64 / self.steps_per_epoch() as f64
    }

    /// The window read by global sequence index `index`.
    pub fn window(&self, index: u64) -> u64 {
        let per_epoch = self.sequences_per_epoch();
        let (epoch, pos) = (index / per_epoch, index % per_epoch);
        permute(pos, self.num_windows, mix(self.seed, epoch))
    }

    /// The windows that `rank` of `world` reads in step `step` (0-based), in order.
    pub fn rank_windows(&self, step: u64, rank: u32, world: u32) -> Vec<u64> {
        let base = step * self.global_batch;
        rank_share(self.global_batch, world, rank)
            .map(|j| self.window(base + j))
            .collect()
    }
}

/// The offsets within one global batch of `total` sequences that `rank` of `world` handles: contiguous, disjoint,
/// covering, sizes differing by at most one (the first `total % world` ranks take one more).
pub fn rank_share(total: u64, world: u32, rank: u32) -> Range<u64> {
    let (world, rank) = (u64::from(world.max(1)), u64::from(rank));
    let (base, extra) = (total / world, total % world);
    let start = rank * base + rank.min(extra);
    let len = base + u64::from(rank < extra);
    start..(start + len).min(total)
}

/// SplitMix64 finaliser: a cheap, well-mixed 64-bit hash.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x6A09_E667_F3BC_C909);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A keyed bijection on `[0, n)`: a 4-round Feistel network on the smallest even power of two ≥ n, cycle-walked
/// back into range (each walk step stays a bijection, and the domain is < 4n, so few steps are needed).
fn permute(index: u64, n: u64, key: u64) -> u64 {
    debug_assert!(index < n);
    let bits = (64 - (n.max(2) - 1).leading_zeros()).max(2);
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut x = index;
    loop {
        let (mut l, mut r) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f = mix(r, key.wrapping_add(round)) & mask;
            (l, r) = (r, l ^ f);
        }
        x = (l << half) | r;
        if x < n {
            return x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn permutation_is_a_bijection_for_many_sizes() {
        for n in [1u64, 2, 3, 5, 16, 17, 100, 1000, 4097] {
            let seen: HashSet<u64> = (0..n).map(|i| permute(i, n, 42)).collect();
            assert_eq!(seen.len() as u64, n, "n = {n}");
            assert!(seen.iter().all(|&w| w < n));
        }
    }

    #[test]
    fn epochs_reshuffle_and_seed_matters() {
        let plan = DataPlan::new(1, 1000, 10).unwrap();
        let e0: Vec<u64> = (0..1000).map(|i| plan.window(i)).collect();
        let e1: Vec<u64> = (1000..2000).map(|i| plan.window(i)).collect();
        assert_ne!(e0, e1);
        let other = DataPlan::new(2, 1000, 10).unwrap();
        assert_ne!(e0, (0..1000).map(|i| other.window(i)).collect::<Vec<_>>());
        assert_eq!(e0, (0..1000).map(|i| plan.window(i)).collect::<Vec<_>>());
    }

    #[test]
    fn last_partial_batch_is_dropped_and_epoch_covers_the_rest() {
        let plan = DataPlan::new(7, 103, 10).unwrap();
        assert_eq!(plan.steps_per_epoch(), 10);
        assert_eq!(plan.dropped_per_epoch(), 3);
        assert_eq!(plan.sequences_per_epoch(), 100);
        assert_eq!((plan.epoch(99), plan.epoch(100)), (0, 1));
        assert_eq!(plan.epochs_in(25), 2.5);
        let epoch: HashSet<u64> = (0..100).map(|i| plan.window(i)).collect();
        assert_eq!(epoch.len(), 100, "no window twice in an epoch");
    }

    #[test]
    fn shares_are_disjoint_and_cover_for_every_world_size() {
        for total in [1u64, 7, 12, 32] {
            for world in 1..=total as u32 {
                let mut all = Vec::new();
                for rank in 0..world {
                    let r = rank_share(total, world, rank);
                    assert!(!r.is_empty(), "total {total} world {world} rank {rank}");
                    all.extend(r);
                }
                assert_eq!(all, (0..total).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn a_step_reads_the_same_windows_whatever_the_world_size() {
        let plan = DataPlan::new(3, 500, 12).unwrap();
        for step in [0u64, 5, 41, 42, 100] {
            let single = plan.rank_windows(step, 0, 1);
            for world in [2u32, 3, 5, 12] {
                let joined: Vec<u64> = (0..world).flat_map(|r| plan.rank_windows(step, r, world)).collect();
                assert_eq!(joined, single, "step {step} world {world}");
            }
        }
    }

    #[test]
    fn too_little_data_is_an_error() {
        assert!(
            DataPlan::new(1, 5, 10)
                .unwrap_err()
                .to_string()
                .contains("only 5 windows")
        );
    }
}
