//! One split's token sequences cut into fixed windows of `seq_len` inputs and `seq_len` next-token targets.
//!
//! Pretraining data is shards of contiguous tokens. Within a shard, window `i` is `tokens[i·T .. i·T + T + 1]`
//! (T = `seq_len`): windows do not overlap except that the last token of one is the first of the next, and a shard
//! of `n` tokens holds `(n − 1) / T` of them (its tail is not read). Windows never span two shards. Global window
//! indices run over the shards in order; a prefix sum of the per-shard counts finds the shard of an index.
//!
//! Fine-tuning data is [`Rows`]: one window per example, built ahead (padded, with masked targets), because its
//! targets are not simply its inputs shifted by one.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::data::IGNORE;
use crate::data::dataset::tokens::ShardTokens;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Windows {
    kind: Kind,
    seq_len: usize,
    /// Where the tokens come from, for messages.
    origin: PathBuf,
}

#[derive(Debug, Clone)]
enum Kind {
    Shards {
        shards: Arc<[ShardTokens]>,
        /// `ends[s]`: windows in shards `0..=s`.
        ends: Vec<u64>,
    },
    Rows(Arc<Rows>),
}

/// Windows built ahead: row `i` is `inputs[i·T .. (i+1)·T]` and `targets[i·T .. (i+1)·T]`, where a target of
/// [`IGNORE`] is not counted in the loss.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rows {
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// Counted targets (not [`IGNORE`]) per row.
    counted: Vec<u32>,
}

impl Rows {
    /// Appends one row of `seq_len` inputs and targets (the caller pads them).
    pub fn push(&mut self, inputs: &[u32], targets: &[u32]) {
        self.inputs.extend_from_slice(inputs);
        self.targets.extend_from_slice(targets);
        self.counted
            .push(targets.iter().filter(|&&t| t != IGNORE).count() as u32);
    }

    pub fn len(&self) -> usize {
        self.counted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counted.is_empty()
    }

    /// Counted targets over all rows.
    pub fn counted(&self) -> u64 {
        self.counted.iter().map(|&c| u64::from(c)).sum()
    }
}

impl Windows {
    /// The windows of `shards` (in order) for sequences of `seq_len` tokens (`seq_len ≥ 1`).
    pub fn new(shards: Vec<ShardTokens>, seq_len: usize, origin: &Path) -> Self {
        let seq_len = seq_len.max(1);
        let ends = shards
            .iter()
            .scan(0u64, |total, s| {
                *total += s.len().saturating_sub(1) / seq_len as u64;
                Some(*total)
            })
            .collect();
        Self {
            kind: Kind::Shards {
                shards: shards.into(),
                ends,
            },
            seq_len,
            origin: origin.to_path_buf(),
        }
    }

    /// The windows of `rows`, each `seq_len` inputs and targets (`seq_len ≥ 1`).
    pub fn rows(rows: Rows, seq_len: usize, origin: &Path) -> Self {
        Self {
            kind: Kind::Rows(Arc::new(rows)),
            seq_len: seq_len.max(1),
            origin: origin.to_path_buf(),
        }
    }

    /// Number of windows over all shards.
    pub fn len(&self) -> u64 {
        match &self.kind {
            Kind::Shards { ends, .. } => ends.last().copied().unwrap_or(0),
            Kind::Rows(rows) => rows.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens over all shards (read or not); for rows, the counted targets.
    pub fn tokens(&self) -> u64 {
        match &self.kind {
            Kind::Shards { shards, .. } => shards.iter().map(ShardTokens::len).sum(),
            Kind::Rows(rows) => rows.counted(),
        }
    }

    /// Targets of window `index` that count in the loss: all `seq_len` of a shard's window, a row's unmasked ones.
    pub fn counted(&self, index: u64) -> u64 {
        match &self.kind {
            Kind::Shards { .. } => self.seq_len as u64,
            Kind::Rows(rows) => rows.counted.get(index as usize).map_or(0, |&c| u64::from(c)),
        }
    }

    /// Feeds what identifies these tokens to `hasher`: the ids of in-memory shards and rows, the file name and token
    /// count of mapped ones (their contents are vouched for by the manifest's checksums, or by the coordinator's
    /// full pass).
    pub fn identify(&self, hasher: &mut sha2::Sha256) {
        use sha2::Digest;
        let shards = match &self.kind {
            Kind::Shards { shards, .. } => shards,
            Kind::Rows(rows) => {
                hasher.update(b"rows");
                for id in rows.inputs.iter().chain(&rows.targets) {
                    hasher.update(id.to_le_bytes());
                }
                return;
            }
        };
        for shard in shards.iter() {
            match shard {
                ShardTokens::Memory(ids) => {
                    hasher.update(b"memory");
                    for id in ids {
                        hasher.update(id.to_le_bytes());
                    }
                }
                ShardTokens::Mapped(m) => {
                    hasher.update(b"mapped");
                    let name = m
                        .path()
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    hasher.update(name.as_bytes());
                    hasher.update(m.header().tokens.to_le_bytes());
                }
            }
        }
    }

    /// Shards of token data; 0 for rows.
    pub fn num_shards(&self) -> usize {
        match &self.kind {
            Kind::Shards { shards, .. } => shards.len(),
            Kind::Rows(_) => 0,
        }
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The shard holding window `index` and the window's position in it.
    fn locate(ends: &[u64], index: u64) -> Option<(usize, u64)> {
        let shard = ends.partition_point(|&end| end <= index);
        let before = match shard {
            0 => 0,
            s => *ends.get(s - 1)?,
        };
        (shard < ends.len()).then(|| (shard, index - before))
    }

    /// Appends window `index`'s inputs (`seq_len` tokens) to `inputs` and its targets (for shards, the same shifted
    /// by one) to `targets`.
    pub fn extend_window(&self, index: u64, inputs: &mut Vec<u32>, targets: &mut Vec<u32>) -> Result<()> {
        let missing = || Error::Data {
            path: self.origin.clone(),
            message: format!(
                "window {index} requested but the split has {} windows of {} tokens; the data plan and the data \
                 disagree (was the directory changed during the run?)",
                self.len(),
                self.seq_len + 1
            ),
        };
        let t = self.seq_len;
        let (shards, ends) = match &self.kind {
            Kind::Shards { shards, ends } => (shards, ends),
            Kind::Rows(rows) => {
                let i = usize::try_from(index).map_err(|_| missing())?;
                let range = i
                    .checked_mul(t)
                    .filter(|_| i < rows.len())
                    .map(|s| s..s + t)
                    .ok_or_else(missing)?;
                inputs.extend_from_slice(&rows.inputs[range.clone()]);
                targets.extend_from_slice(&rows.targets[range]);
                return Ok(());
            }
        };
        let (shard, local) = Self::locate(ends, index).ok_or_else(missing)?;
        let start = local as usize * t;
        let base = inputs.len();
        // One read of the T + 1 tokens; the targets are the inputs shifted by one.
        shards[shard].extend(start..start + t + 1, inputs);
        let last = inputs.pop().unwrap_or_default();
        targets.extend_from_slice(&inputs[base + 1..]);
        targets.push(last);
        Ok(())
    }

    /// The `seq_len + 1` tokens of window `index`.
    pub fn window(&self, index: u64) -> Result<Vec<u32>> {
        let (mut inputs, mut targets) = (Vec::with_capacity(self.seq_len + 1), Vec::with_capacity(self.seq_len));
        self.extend_window(index, &mut inputs, &mut targets)?;
        inputs.extend(targets.last());
        Ok(inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(lens: &[u32]) -> Vec<ShardTokens> {
        let mut next = 0u32;
        lens.iter()
            .map(|&n| {
                let ids = (next..next + n).collect();
                next += n;
                ShardTokens::Memory(ids)
            })
            .collect()
    }

    #[test]
    fn windows_stay_inside_their_shard() {
        // Shards of 10, 3, 1, 0 and 9 tokens, T = 4: (10−1)/4 = 2, (3−1)/4 = 0, 0, 0, (9−1)/4 = 2 windows.
        let w = Windows::new(memory(&[10, 3, 1, 0, 9]), 4, Path::new("d"));
        assert_eq!(w.len(), 4);
        assert_eq!(w.tokens(), 23);
        let all: Vec<Vec<u32>> = (0..4).map(|i| w.window(i).unwrap()).collect();
        assert_eq!(
            all,
            vec![
                vec![0, 1, 2, 3, 4],
                vec![4, 5, 6, 7, 8],
                vec![14, 15, 16, 17, 18],
                vec![18, 19, 20, 21, 22]
            ]
        );
        let (mut x, mut y) = (vec![99], vec![]);
        w.extend_window(2, &mut x, &mut y).unwrap();
        assert_eq!((x, y), (vec![99, 14, 15, 16, 17], vec![15, 16, 17, 18]));
        let err = w.window(4).unwrap_err().to_string();
        assert!(err.contains("window 4") && err.contains("has 4 windows"), "{err}");
    }

    #[test]
    fn no_shards_no_windows() {
        let w = Windows::new(Vec::new(), 8, Path::new("d"));
        assert!(w.is_empty());
        assert!(w.window(0).is_err());
    }
}
