//! One split's shards: tokens are appended to `<split>_<index>.bin` until it holds `--shard-tokens`, then the next
//! one is started. Shards are opened on demand, so a split has no empty shard.
use std::path::PathBuf;

use crate::data::manifest::{ShardEntry, SplitEntry};
use crate::data::shard::{ShardWriter, TokenWidth};
use crate::error::Result;

pub(super) struct SplitSink {
    dir: PathBuf,
    /// `train` or `val`: the shards' file name prefix.
    name: &'static str,
    width: TokenWidth,
    shard_tokens: u64,
    current: Option<ShardWriter>,
    entry: SplitEntry,
}

impl SplitSink {
    pub fn new(dir: PathBuf, name: &'static str, width: TokenWidth, shard_tokens: u64) -> Self {
        SplitSink {
            dir,
            name,
            width,
            shard_tokens,
            current: None,
            entry: SplitEntry::default(),
        }
    }

    /// Appends tokens, starting new shards as they fill.
    pub fn push(&mut self, mut ids: &[u32]) -> Result<()> {
        while !ids.is_empty() {
            let writer = match self.current.as_mut() {
                Some(w) => w,
                None => {
                    let path = self.dir.join(self.file_name(self.entry.shards.len()));
                    self.current
                        .insert(ShardWriter::create(&path, self.width, self.shard_tokens)?)
                }
            };
            let room = (self.shard_tokens - writer.tokens()).min(ids.len() as u64) as usize;
            writer.push(&ids[..room])?;
            self.entry.tokens += room as u64;
            ids = &ids[room..];
            if writer.tokens() == self.shard_tokens {
                self.close_shard()?;
            }
        }
        Ok(())
    }

    /// Counts a document that starts in this split.
    pub fn count_document(&mut self) {
        self.entry.documents += 1;
    }

    pub fn tokens(&self) -> u64 {
        self.entry.tokens
    }

    /// Finishes the last shard.
    pub fn finish(mut self) -> Result<SplitEntry> {
        self.close_shard()?;
        Ok(std::mem::take(&mut self.entry))
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some(writer) = self.current.take() {
            let written = writer.finish()?;
            let file = self.file_name(self.entry.shards.len());
            self.entry.shards.push(ShardEntry {
                file,
                tokens: written.tokens,
                sha256: written.sha256,
            });
        }
        Ok(())
    }

    fn file_name(&self, index: usize) -> String {
        format!("{}_{index:06}.bin", self.name)
    }
}
