//! llm.c's `.bin` token shard format: a header of 256 little-endian `i32` — `[0]` magic, `[1]` version, `[2]` token
//! count, the rest 0 — followed by the tokens, little-endian.
//!
//! | magic      | version | token type | vocabularies        |
//! |------------|---------|------------|---------------------|
//! | `20240520` | 1       | `u16`      | up to 65,536 ids    |
//! | `20240801` | 7       | `u32`      | larger              |
//!
//! Writers are atomic (temporary file, fsync, rename) and stream ([`ShardWriter`]: memory does not grow with the
//! shard); readers check magic, version and that the file size equals `1024 + tokens × width`, and say what was
//! found, what was expected and what to do. (llm.c `dataloader.h`.)
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Number of `i32` in the header.
const HEADER_INTS: usize = 256;
/// Size of the header in bytes.
pub const HEADER_BYTES: usize = HEADER_INTS * 4;
/// Magic and version of shards of `u16` tokens (llm.c's GPT-2 shards).
const MAGIC_U16: i32 = 20240520;
const VERSION_U16: i32 = 1;
/// Magic and version of shards of `u32` tokens (llm.c's Llama 3 shards).
const MAGIC_U32: i32 = 20240801;
const VERSION_U32: i32 = 7;
/// What to do about a shard that fails a check.
const REMEDY: &str = "re-run lockstep prepare";

/// How many bytes each token takes in a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenWidth {
    U16,
    U32,
}

impl TokenWidth {
    /// The narrowest width that holds every id of a vocabulary (ids `0..vocab_size`): `U16` up to 65,536 ids.
    pub fn for_vocab(vocab_size: usize) -> TokenWidth {
        if vocab_size <= usize::from(u16::MAX) + 1 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    /// Bytes per token.
    pub fn bytes(self) -> u64 {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    /// The largest id this width holds.
    pub fn max_id(self) -> u32 {
        match self {
            TokenWidth::U16 => u32::from(u16::MAX),
            TokenWidth::U32 => u32::MAX,
        }
    }

    fn magic(self) -> i32 {
        match self {
            TokenWidth::U16 => MAGIC_U16,
            TokenWidth::U32 => MAGIC_U32,
        }
    }

    fn version(self) -> i32 {
        match self {
            TokenWidth::U16 => VERSION_U16,
            TokenWidth::U32 => VERSION_U32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            TokenWidth::U16 => "u16",
            TokenWidth::U32 => "u32",
        }
    }
}

/// What a shard's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    pub width: TokenWidth,
    pub tokens: u64,
}

impl ShardHeader {
    /// The size the whole file must have.
    pub fn file_bytes(&self) -> u64 {
        HEADER_BYTES as u64 + self.tokens * self.width.bytes()
    }
}

/// Writes a shard to `path` atomically: to `<path>.tmp`, fsynced, then renamed over `path`. An id that does not fit
/// `width` is an error naming it, and nothing is left behind.
pub fn write_shard(path: &Path, tokens: &[u32], width: TokenWidth) -> Result<()> {
    let mut writer = ShardWriter::create(path, width, tokens.len() as u64)?;
    writer.push(tokens)?;
    writer.finish().map(drop)
}

/// What a finished [`ShardWriter`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenShard {
    pub tokens: u64,
    /// SHA-256 of the whole file, header included, in lowercase hex.
    pub sha256: String,
}

/// Streams a shard to disk: a placeholder header, then tokens as they are pushed, then [`ShardWriter::finish`]
/// patches the header's count, fsyncs and renames `<path>.tmp` to `path`. Dropped unfinished (an error, a panic),
/// it removes the temporary file, so `path` holds a complete shard or nothing.
///
/// The SHA-256 is computed while writing, assuming the header will say `expected_tokens`; a shard that ends with
/// another count (a split's last one) is read back once to hash it.
#[derive(Debug)]
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    width: TokenWidth,
    tokens: u64,
    expected: u64,
    hasher: Sha256,
    scratch: Vec<u8>,
    done: bool,
}

impl ShardWriter {
    /// Starts `<path>.tmp`. `expected_tokens` (at most `i32::MAX`, the header's limit) is the count the shard will
    /// most likely end with; any count works, that one saves a read-back.
    pub fn create(path: &Path, width: TokenWidth, expected_tokens: u64) -> Result<Self> {
        let expected_count = header_count(path, expected_tokens)?;
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(|source| Error::Write {
            path: tmp.clone(),
            source,
        })?;
        let mut writer = ShardWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            width,
            tokens: 0,
            expected: expected_tokens,
            hasher: Sha256::new(),
            scratch: Vec::new(),
            done: false,
        };
        writer.hasher.update(header_bytes(width, expected_count));
        // The real count is patched in by `finish`.
        writer.write(&header_bytes(width, 0))?;
        Ok(writer)
    }

    /// Appends tokens. An id that does not fit the width is an error naming it and its position in the shard.
    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        let width = self.width;
        if let Some((i, &id)) = ids.iter().enumerate().find(|&(_, &id)| id > width.max_id()) {
            return Err(Error::Data {
                path: self.path.clone(),
                message: format!(
                    "token {id} at position {} does not fit a {} shard (largest id {}); use TokenWidth::U32",
                    thousands(self.tokens + i as u64),
                    width.name(),
                    thousands(u64::from(width.max_id()))
                ),
            });
        }
        let total = self.tokens + ids.len() as u64;
        header_count(&self.path, total)?;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        match width {
            // Every id was checked against the width, so the narrowing cannot lose bits.
            TokenWidth::U16 => scratch.extend(ids.iter().flat_map(|&id| (id as u16).to_le_bytes())),
            TokenWidth::U32 => scratch.extend(ids.iter().flat_map(|&id| id.to_le_bytes())),
        }
        self.hasher.update(&scratch);
        let written = self.write(&scratch);
        self.scratch = scratch;
        written?;
        self.tokens = total;
        Ok(())
    }

    /// Tokens pushed so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Patches the header, fsyncs, and renames the shard into place.
    pub fn finish(mut self) -> Result<WrittenShard> {
        let write_err = |source| Error::Write {
            path: self.tmp.clone(),
            source,
        };
        let out = self
            .out
            .take()
            .ok_or_else(|| write_err(std::io::Error::other("writer already finished")))?;
        let mut file = out.into_inner().map_err(|e| write_err(e.into_error()))?;
        // `push` keeps the count within the header's range.
        let count = self.tokens as i32;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header_bytes(self.width, count)))
            .and_then(|()| file.sync_all())
            .map_err(write_err)?;
        drop(file);
        let sha256 = if self.tokens == self.expected {
            hex::encode(std::mem::take(&mut self.hasher).finalize())
        } else {
            sha256_file(&self.tmp)?
        };
        std::fs::rename(&self.tmp, &self.path).map_err(|source| Error::Write {
            path: self.path.clone(),
            source,
        })?;
        self.done = true;
        sync_parent(&self.path)?;
        Ok(WrittenShard {
            tokens: self.tokens,
            sha256,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let result = match self.out.as_mut() {
            Some(out) => out.write_all(bytes),
            None => Err(std::io::Error::other("writer already finished")),
        };
        result.map_err(|source| Error::Write {
            path: self.tmp.clone(),
            source,
        })
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if !self.done {
            drop(self.out.take());
            // Best effort: the shard was abandoned, and a leftover temporary file is harmless.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// SHA-256 of a file in lowercase hex, read in blocks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let read_err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block).map_err(read_err)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&block[..n]);
    }
}

/// `tokens` as the header's `i32` count; more is an error naming the shard.
fn header_count(path: &Path, tokens: u64) -> Result<i32> {
    i32::try_from(tokens).map_err(|_| Error::Data {
        path: path.to_path_buf(),
        message: format!(
            "{} tokens do not fit one shard (at most {}); split them over several shards",
            thousands(tokens),
            thousands(i32::MAX as u64)
        ),
    })
}

/// The 1024-byte header of a shard of `count` tokens.
fn header_bytes(width: TokenWidth, count: i32) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&width.magic().to_le_bytes());
    header[4..8].copy_from_slice(&width.version().to_le_bytes());
    header[8..12].copy_from_slice(&count.to_le_bytes());
    header
}

/// Reads and checks a shard's header against the file's size.
pub fn read_header(path: &Path) -> Result<ShardHeader> {
    let read_err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let file_bytes = file.metadata().map_err(read_err)?.len();
    let mut head = Vec::with_capacity(HEADER_BYTES);
    (&mut file)
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    parse_header(path, &head, file_bytes)
}

/// Reads all tokens of a shard, widened to `u32`, after checking its header.
pub fn read_shard(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let header = parse_header(path, &bytes, bytes.len() as u64)?;
    let body = &bytes[HEADER_BYTES..];
    let tokens = match header.width {
        TokenWidth::U16 => body
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        TokenWidth::U32 => body
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    Ok(tokens)
}

/// Checks a header (`head`: the file's first bytes, at most all of them) against the file's size.
fn parse_header(path: &Path, head: &[u8], file_bytes: u64) -> Result<ShardHeader> {
    let data_err = |message: String| Error::Data {
        path: path.to_path_buf(),
        message,
    };
    if file_bytes == 0 {
        return Err(data_err(format!(
            "empty file: expected a token shard with a {HEADER_BYTES}-byte header; {REMEDY}"
        )));
    }
    if file_bytes < HEADER_BYTES as u64 || head.len() < HEADER_BYTES {
        return Err(data_err(format!(
            "truncated header: the file has {} bytes but a shard header alone is {} bytes; {REMEDY}",
            thousands(file_bytes),
            thousands(HEADER_BYTES as u64)
        )));
    }
    let int = |i: usize| i32::from_le_bytes([head[4 * i], head[4 * i + 1], head[4 * i + 2], head[4 * i + 3]]);
    let (magic, version, count) = (int(0), int(1), int(2));

    let width = match magic {
        MAGIC_U16 => TokenWidth::U16,
        MAGIC_U32 => TokenWidth::U32,
        _ => {
            return Err(data_err(format!(
                "bad magic {magic}: expected {MAGIC_U16} (u16 tokens) or {MAGIC_U32} (u32 tokens); \
                 this is not a token shard — check the path, or {REMEDY}"
            )));
        }
    };
    if version != width.version() {
        return Err(data_err(format!(
            "unknown version {version} for magic {magic}: expected {}; the shard was written by another tool or \
             version — {REMEDY}",
            width.version()
        )));
    }
    let tokens = u64::try_from(count).map_err(|_| {
        data_err(format!(
            "negative token count {count} in the header; the header is corrupt — {REMEDY}"
        ))
    })?;

    let header = ShardHeader { width, tokens };
    let body = file_bytes - HEADER_BYTES as u64;
    let expected = tokens * width.bytes();
    if body != expected {
        let what = if body < expected { "truncated" } else { "too long" };
        return Err(data_err(format!(
            "{what}: header says {} {} tokens ({} bytes) but the file has {} bytes after the header; {REMEDY}",
            thousands(tokens),
            width.name(),
            thousands(expected),
            thousands(body)
        )));
    }
    Ok(header)
}

/// `<path>.tmp`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".tmp");
    PathBuf::from(name)
}

/// Fsyncs the directory holding `path`, so the rename itself survives a crash (a no-op where directories cannot be
/// opened, as on Windows).
fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match File::open(dir) {
        Ok(d) => d.sync_all().or_else(|e| {
            // Some platforms and file systems refuse to fsync a directory; the file itself is already synced.
            if e.kind() == std::io::ErrorKind::InvalidInput || e.kind() == std::io::ErrorKind::PermissionDenied {
                Ok(())
            } else {
                Err(Error::Write {
                    path: dir.to_path_buf(),
                    source: e,
                })
            }
        }),
        Err(_) => Ok(()),
    }
}

/// `1234567` → `"1,234,567"`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_text(r: Result<impl std::fmt::Debug>) -> String {
        r.unwrap_err().to_string()
    }

    /// A 1024-byte header built by hand, independent of the writer.
    fn hand_header(magic: i32, version: i32, count: i32) -> Vec<u8> {
        let mut h = vec![0u8; 1024];
        h[0..4].copy_from_slice(&magic.to_le_bytes());
        h[4..8].copy_from_slice(&version.to_le_bytes());
        h[8..12].copy_from_slice(&count.to_le_bytes());
        h
    }

    #[test]
    fn round_trip_u16() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train_000.bin");
        let tokens: Vec<u32> = (0..5000u32).map(|i| i % 65536).collect();
        write_shard(&path, &tokens, TokenWidth::U16).unwrap();
        assert_eq!(
            read_header(&path).unwrap(),
            ShardHeader {
                width: TokenWidth::U16,
                tokens: 5000
            }
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024 + 2 * 5000);
        assert_eq!(read_shard(&path).unwrap(), tokens);
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn round_trip_u16_full_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.bin");
        let tokens: Vec<u32> = (0..70_000u32).map(|i| i % 65536).collect();
        write_shard(&path, &tokens, TokenWidth::U16).unwrap();
        assert_eq!(read_shard(&path).unwrap(), tokens);
    }

    #[test]
    fn round_trip_u32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train_000.bin");
        let mut tokens: Vec<u32> = (0..70_000).collect();
        tokens.push(u32::MAX);
        write_shard(&path, &tokens, TokenWidth::U32).unwrap();
        assert_eq!(
            read_header(&path).unwrap(),
            ShardHeader {
                width: TokenWidth::U32,
                tokens: 70_001
            }
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024 + 4 * 70_001);
        assert_eq!(read_shard(&path).unwrap(), tokens);
    }

    #[test]
    fn round_trip_empty_shard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.bin");
        write_shard(&path, &[], TokenWidth::U16).unwrap();
        assert_eq!(read_header(&path).unwrap().tokens, 0);
        assert_eq!(read_shard(&path).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn rewrite_replaces_the_old_shard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        write_shard(&path, &[1, 2, 3], TokenWidth::U32).unwrap();
        write_shard(&path, &[4, 5], TokenWidth::U16).unwrap();
        assert_eq!(read_shard(&path).unwrap(), vec![4, 5]);
    }

    #[test]
    fn for_vocab_boundaries() {
        assert_eq!(TokenWidth::for_vocab(0), TokenWidth::U16);
        assert_eq!(TokenWidth::for_vocab(50_257), TokenWidth::U16);
        assert_eq!(TokenWidth::for_vocab(65_535), TokenWidth::U16);
        // Ids 0..=65_535 all fit u16.
        assert_eq!(TokenWidth::for_vocab(65_536), TokenWidth::U16);
        assert_eq!(TokenWidth::for_vocab(65_537), TokenWidth::U32);
        assert_eq!(TokenWidth::for_vocab(128_256), TokenWidth::U32);
    }

    #[test]
    fn id_too_large_for_u16_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        let msg = err_text(write_shard(&path, &[1, 65_535, 65_536, 7], TokenWidth::U16));
        assert!(msg.contains("65536"), "{msg}");
        assert!(msg.contains("position 2"), "{msg}");
        assert!(msg.contains("s.bin"), "{msg}");
        assert!(!path.exists());
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.bin");
        let mut bytes = hand_header(MAGIC_U16, VERSION_U16, 1000);
        bytes.extend(std::iter::repeat_n(0u8, 1500));
        std::fs::write(&path, &bytes).unwrap();
        for msg in [err_text(read_header(&path)), err_text(read_shard(&path))] {
            assert!(msg.contains("cut.bin"), "{msg}");
            assert!(msg.contains("truncated"), "{msg}");
            assert!(msg.contains("1,000 u16 tokens (2,000 bytes)"), "{msg}");
            assert!(msg.contains("1,500 bytes after the header"), "{msg}");
            assert!(msg.contains("lockstep prepare"), "{msg}");
        }
    }

    #[test]
    fn truncated_written_shard_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        write_shard(&path, &(0..100).collect::<Vec<_>>(), TokenWidth::U32).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let msg = err_text(read_shard(&path));
        assert!(msg.contains("truncated"), "{msg}");
        assert!(msg.contains("399 bytes after the header"), "{msg}");
    }

    #[test]
    fn too_long_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.bin");
        let mut bytes = hand_header(MAGIC_U32, VERSION_U32, 2);
        bytes.extend([0u8; 12]);
        std::fs::write(&path, &bytes).unwrap();
        let msg = err_text(read_header(&path));
        assert!(msg.contains("too long"), "{msg}");
        assert!(msg.contains("(8 bytes)"), "{msg}");
        assert!(msg.contains("12 bytes after the header"), "{msg}");
    }

    #[test]
    fn truncated_header_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.bin");
        std::fs::write(&path, &hand_header(MAGIC_U16, VERSION_U16, 0)[..100]).unwrap();
        let msg = err_text(read_header(&path));
        assert!(msg.contains("short.bin"), "{msg}");
        assert!(msg.contains("truncated header"), "{msg}");
        assert!(msg.contains("100 bytes"), "{msg}");
    }

    #[test]
    fn bad_magic_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("magic.bin");
        std::fs::write(&path, hand_header(12345, 1, 0)).unwrap();
        for msg in [err_text(read_header(&path)), err_text(read_shard(&path))] {
            assert!(msg.contains("magic.bin"), "{msg}");
            assert!(msg.contains("bad magic 12345"), "{msg}");
            assert!(msg.contains("20240520") && msg.contains("20240801"), "{msg}");
        }
    }

    #[test]
    fn unknown_version_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("version.bin");
        // The u32 shards' version under the u16 shards' magic.
        std::fs::write(&path, hand_header(MAGIC_U16, 7, 0)).unwrap();
        let msg = err_text(read_header(&path));
        assert!(msg.contains("version.bin"), "{msg}");
        assert!(msg.contains("unknown version 7"), "{msg}");
        assert!(msg.contains("expected 1"), "{msg}");
    }

    #[test]
    fn negative_count_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("neg.bin");
        std::fs::write(&path, hand_header(MAGIC_U16, VERSION_U16, -1)).unwrap();
        let msg = err_text(read_header(&path));
        assert!(msg.contains("negative token count -1"), "{msg}");
    }

    #[test]
    fn empty_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.bin");
        std::fs::write(&path, b"").unwrap();
        for msg in [err_text(read_header(&path)), err_text(read_shard(&path))] {
            assert!(msg.contains("empty.bin"), "{msg}");
            assert!(msg.contains("empty file"), "{msg}");
        }
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.bin");
        let err = read_header(&path).unwrap_err();
        assert!(matches!(err, Error::Read { .. }), "{err}");
        assert!(err.to_string().contains("absent.bin"), "{err}");
    }

    #[test]
    fn hand_written_u16_shard_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hand16.bin");
        let mut bytes = hand_header(20240520, 1, 3);
        bytes.extend([0x01, 0x00, 0x34, 0x12, 0xff, 0xff]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            read_header(&path).unwrap(),
            ShardHeader {
                width: TokenWidth::U16,
                tokens: 3
            }
        );
        assert_eq!(read_shard(&path).unwrap(), vec![1, 0x1234, 65_535]);
    }

    #[test]
    fn hand_written_u32_shard_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hand32.bin");
        let mut bytes = hand_header(20240801, 7, 2);
        bytes.extend([0x78, 0x56, 0x34, 0x12, 0x00, 0x00, 0x01, 0x00]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            read_header(&path).unwrap(),
            ShardHeader {
                width: TokenWidth::U32,
                tokens: 2
            }
        );
        assert_eq!(read_shard(&path).unwrap(), vec![0x1234_5678, 65_536]);
    }

    /// llm.c's format built byte by byte from its spec: 256 little-endian i32 `[magic, version, n, 0, ...]`, then
    /// the n tokens little-endian, `u16` for magic 20240520 / version 1 and `u32` for 20240801 / 7.
    fn llm_c_bytes(tokens: &[u32], width: TokenWidth) -> Vec<u8> {
        let (magic, version) = match width {
            TokenWidth::U16 => (20240520i32, 1i32),
            TokenWidth::U32 => (20240801, 7),
        };
        let mut bytes = hand_header(magic, version, tokens.len() as i32);
        for &t in tokens {
            match width {
                TokenWidth::U16 => bytes.extend(u16::try_from(t).unwrap().to_le_bytes()),
                TokenWidth::U32 => bytes.extend(t.to_le_bytes()),
            }
        }
        bytes
    }

    fn sha_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn streaming_writer_is_byte_for_byte_llm_c() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(TokenWidth, Vec<u32>); 2] = [
            (TokenWidth::U16, (0..3000u32).map(|i| (i * 7919) % 65_536).collect()),
            (
                TokenWidth::U32,
                (0..3000u32).map(|i| i.wrapping_mul(2_654_435_761)).collect(),
            ),
        ];
        for (width, tokens) in cases {
            // The count the header ends with equals the expected one (hashed while writing), or not (read back).
            for expected in [tokens.len() as u64, 100_000] {
                let path = dir.path().join(format!("{}_{expected}.bin", width.name()));
                let mut w = ShardWriter::create(&path, width, expected).unwrap();
                for part in tokens.chunks(777) {
                    w.push(part).unwrap();
                }
                assert_eq!(w.tokens(), tokens.len() as u64);
                assert!(!path.exists(), "visible before finish");
                let written = w.finish().unwrap();
                let bytes = std::fs::read(&path).unwrap();
                let expected_bytes = llm_c_bytes(&tokens, width);
                assert_eq!(bytes, expected_bytes, "{width:?}");
                assert_eq!(written.tokens, tokens.len() as u64);
                assert_eq!(written.sha256, sha_hex(&expected_bytes));
                assert_eq!(sha256_file(&path).unwrap(), written.sha256);
                assert!(!tmp_path(&path).exists());
                assert_eq!(read_shard(&path).unwrap(), tokens);
            }
        }
    }

    #[test]
    fn write_shard_is_byte_for_byte_llm_c() {
        let dir = tempfile::tempdir().unwrap();
        for (width, tokens) in [
            (TokenWidth::U16, vec![0, 1, 0x1234, 65_535]),
            (TokenWidth::U32, vec![65_536, 7]),
        ] {
            let path = dir.path().join("s.bin");
            write_shard(&path, &tokens, width).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), llm_c_bytes(&tokens, width));
        }
    }

    #[test]
    fn abandoned_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        let mut w = ShardWriter::create(&path, TokenWidth::U16, 10).unwrap();
        w.push(&[1, 2, 3]).unwrap();
        assert!(tmp_path(&path).exists());
        drop(w);
        assert!(!tmp_path(&path).exists());
        assert!(!path.exists());
    }

    #[test]
    fn streaming_writer_names_a_bad_id_by_its_position_in_the_shard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        let mut w = ShardWriter::create(&path, TokenWidth::U16, 10).unwrap();
        w.push(&[1, 2, 3]).unwrap();
        let msg = err_text(w.push(&[4, 70_000]));
        assert!(msg.contains("token 70000 at position 4"), "{msg}");
        assert!(msg.contains("s.bin"), "{msg}");
    }

    #[test]
    fn a_count_beyond_the_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        let msg = err_text(ShardWriter::create(&path, TokenWidth::U16, 1 << 31));
        assert!(msg.contains("2,147,483,648 tokens do not fit one shard"), "{msg}");
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
