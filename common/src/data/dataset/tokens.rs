//! The tokens of one shard, in memory (a corpus tokenised at start-up) or memory-mapped from an llm.c `.bin` file.
//!
//! A mapped shard is read in place: the page cache holds it once for every process on the host, and reading a
//! window costs a copy of its bytes. The file must not be modified or truncated while it is mapped (for the whole
//! run): the header and size are checked when it is opened, and a shard that shrinks afterwards would fault the
//! process on the next read of the missing pages.
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::data::shard::{self, HEADER_BYTES, ShardHeader, TokenWidth};
use crate::error::{Error, Result};

/// One shard's tokens.
#[derive(Debug)]
pub enum ShardTokens {
    Memory(Vec<u32>),
    Mapped(MappedShard),
}

impl ShardTokens {
    pub fn len(&self) -> u64 {
        match self {
            ShardTokens::Memory(ids) => ids.len() as u64,
            ShardTokens::Mapped(m) => m.header.tokens,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends tokens `range` (in range: callers index within [`ShardTokens::len`]) to `out`, widened to `u32`.
    pub fn extend(&self, range: Range<usize>, out: &mut Vec<u32>) {
        match self {
            ShardTokens::Memory(ids) => out.extend_from_slice(&ids[range]),
            ShardTokens::Mapped(m) => m.extend(range, out),
        }
    }
}

/// A `.bin` shard mapped read-only, its header checked against the file's size.
#[derive(Debug)]
pub struct MappedShard {
    path: PathBuf,
    header: ShardHeader,
    map: Mmap,
}

impl MappedShard {
    /// Checks the header of `path` (magic, version, size = header) and maps the file.
    pub fn open(path: &Path) -> Result<Self> {
        let header = shard::read_header(path)?;
        let read_err = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        // SAFETY: the map is read-only and Lockstep never writes a shard it reads. A shard modified by another
        // process while mapped would change the tokens read (or, if truncated, fault the process); the data
        // directory must stay unchanged during a run, as `data.path`'s documentation says.
        let map = unsafe { Mmap::map(&file) }.map_err(read_err)?;
        if map.len() as u64 != header.file_bytes() {
            return Err(Error::Data {
                path: path.to_path_buf(),
                message: format!(
                    "changed while being opened: the header says {} bytes, the mapped file has {}; do not modify \
                     shards during a run",
                    header.file_bytes(),
                    map.len()
                ),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            header,
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> ShardHeader {
        self.header
    }

    /// The whole file, header included (for checksums).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    fn extend(&self, range: Range<usize>, out: &mut Vec<u32>) {
        let w = self.header.width.bytes() as usize;
        let body = &self.map[HEADER_BYTES + range.start * w..HEADER_BYTES + range.end * w];
        match self.header.width {
            TokenWidth::U16 => out.extend(
                body.chunks_exact(2)
                    .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
            ),
            TokenWidth::U32 => out.extend(
                body.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_reads_equal_written_tokens() {
        let dir = tempfile::tempdir().unwrap();
        for (width, top) in [(TokenWidth::U16, 65_535u32), (TokenWidth::U32, 1 << 20)] {
            let path = dir.path().join("s.bin");
            let tokens: Vec<u32> = (0..3000u32).map(|i| (i * 7919) % top).collect();
            shard::write_shard(&path, &tokens, width).unwrap();
            let m = ShardTokens::Mapped(MappedShard::open(&path).unwrap());
            assert_eq!(m.len(), 3000);
            let mut out = Vec::new();
            m.extend(10..2000, &mut out);
            assert_eq!(out, &tokens[10..2000]);
        }
    }

    #[test]
    fn a_bad_header_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.bin");
        std::fs::write(&path, vec![0u8; 2000]).unwrap();
        let err = MappedShard::open(&path).unwrap_err().to_string();
        assert!(err.contains("bad.bin") && err.contains("bad magic"), "{err}");
    }
}
