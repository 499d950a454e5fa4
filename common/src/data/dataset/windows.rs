//! One split's shards cut into fixed windows of `seq_len + 1` tokens.
//!
//! Within a shard, window `i` is `tokens[i·T .. i·T + T + 1]` (T = `seq_len`): windows do not overlap except that
//! the last token of one is the first of the next, and a shard of `n` tokens holds `(n − 1) / T` of them (its tail
//! is not read). Windows never span two shards. Global window indices run over the shards in order; a prefix sum of
//! the per-shard counts finds the shard of an index.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::data::dataset::tokens::ShardTokens;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Windows {
    shards: Arc<[ShardTokens]>,
    seq_len: usize,
    /// `ends[s]`: windows in shards `0..=s`.
    ends: Vec<u64>,
    /// Where the tokens come from, for messages.
    origin: PathBuf,
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
            shards: shards.into(),
            seq_len,
            ends,
            origin: origin.to_path_buf(),
        }
    }

    /// Number of windows over all shards.
    pub fn len(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens over all shards (read or not).
    pub fn tokens(&self) -> u64 {
        self.shards.iter().map(ShardTokens::len).sum()
    }

    /// Feeds what identifies these tokens to `hasher`: the ids of in-memory shards, the file name and token count of
    /// mapped ones (their contents are vouched for by the manifest's checksums, or by the coordinator's full pass).
    pub fn identify(&self, hasher: &mut sha2::Sha256) {
        use sha2::Digest;
        for shard in self.shards.iter() {
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

    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The shard holding window `index` and the window's position in it.
    fn locate(&self, index: u64) -> Option<(usize, u64)> {
        let shard = self.ends.partition_point(|&end| end <= index);
        let before = match shard {
            0 => 0,
            s => *self.ends.get(s - 1)?,
        };
        (shard < self.ends.len()).then(|| (shard, index - before))
    }

    /// Appends window `index`'s inputs (`seq_len` tokens) to `inputs` and its targets (the same shifted by one) to
    /// `targets`.
    pub fn extend_window(&self, index: u64, inputs: &mut Vec<u32>, targets: &mut Vec<u32>) -> Result<()> {
        let (shard, local) = self.locate(index).ok_or_else(|| Error::Data {
            path: self.origin.clone(),
            message: format!(
                "window {index} requested but the split has {} windows of {} tokens; the data plan and the data \
                 disagree (was the directory changed during the run?)",
                self.len(),
                self.seq_len + 1
            ),
        })?;
        let t = self.seq_len;
        let start = local as usize * t;
        let base = inputs.len();
        // One read of the T + 1 tokens; the targets are the inputs shifted by one.
        self.shards[shard].extend(start..start + t + 1, inputs);
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
