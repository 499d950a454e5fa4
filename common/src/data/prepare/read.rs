//! The reader: input files in order → units of work, each a run of bytes of one file that belongs wholly to one
//! split. A unit of a text file is a chunk ([`super::chunk`]); a unit of a JSONL file is a run of whole lines
//! (records) of about the target size. Memory: one block being read plus the unit being built.
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};

use super::chunk::next_cut;
use super::inputs::InputFile;
use super::{InputFormat, PrepareOptions};
use crate::data::corpus::Split;
use crate::error::{Error, Result};

/// One unit of work.
#[derive(Debug)]
pub(super) struct Unit {
    /// Position in the stream: the writer puts units back in this order.
    pub seq: u64,
    pub split: Split,
    /// Index into the reader's files.
    pub file: usize,
    /// Byte offset of `bytes[0]` in the file.
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub kind: UnitKind,
}

#[derive(Debug)]
pub(super) enum UnitKind {
    /// A chunk of a text file; `doc_start` for its first chunk (an empty file is one empty chunk).
    Text { doc_start: bool },
    /// Whole lines of a JSONL file: line `first_line + i` (1-based) ends at `ends[i]` in `bytes`.
    Jsonl { first_line: u64, ends: Vec<usize> },
}

/// What [`Reader::run`] hands each unit to; `false` means stop.
pub(super) type Emit<'e> = dyn FnMut(Unit) -> bool + 'e;

/// Cuts the input files into units.
pub(super) struct Reader<'a> {
    pub files: &'a [InputFile],
    pub opts: &'a PrepareOptions,
    /// Units starting at or after this byte of the whole input (files end to end) go to the validation split.
    pub split_at: u64,
}

impl Reader<'_> {
    /// Reads every file, in order, handing each unit to `emit`, until the end, an error, `emit` returning false,
    /// or `stop`.
    pub fn run(&self, stop: &AtomicBool, emit: &mut Emit<'_>) -> Result<()> {
        let mut cursor = Cursor {
            seq: 0,
            base: 0,
            stop,
            emit,
        };
        for file in 0..self.files.len() {
            let going = match self.opts.format {
                InputFormat::Text => self.read_text(file, &mut cursor)?,
                InputFormat::Jsonl => self.read_jsonl(file, &mut cursor)?,
            };
            if !going {
                break;
            }
        }
        Ok(())
    }

    fn split_of(&self, global_offset: u64) -> Split {
        if global_offset >= self.split_at {
            Split::Val
        } else {
            Split::Train
        }
    }

    fn open(&self, file: usize) -> Result<File> {
        let path = &self.files[file].path;
        File::open(path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })
    }

    fn read_err(&self, file: usize) -> impl Fn(std::io::Error) -> Error + '_ {
        move |source| Error::Read {
            path: self.files[file].path.clone(),
            source,
        }
    }

    /// Cuts a text file into chunks; returns whether to go on.
    fn read_text(&self, file: usize, cursor: &mut Cursor<'_, '_>) -> Result<bool> {
        let limits = self.opts.chunk;
        let mut input = self.open(file)?;
        let mut buf: Vec<u8> = Vec::new();
        let (mut offset, mut eof, mut doc_start) = (0u64, false, true);
        loop {
            let start = cursor.base + offset;
            // A chunk that would contain the split's first byte ends there, or at the first cut point after it.
            let to_split = usize::try_from(self.split_at.saturating_sub(start)).unwrap_or(usize::MAX);
            let split = (to_split > 0).then_some(to_split);
            let min = split.map_or(limits.target, |at| at.min(limits.target));
            match next_cut(&buf, min, limits.max, eof, split) {
                Some(cut) => {
                    if cut == 0 && !doc_start {
                        break;
                    }
                    let rest = buf.split_off(cut);
                    let unit = Unit {
                        seq: 0,
                        split: self.split_of(start),
                        file,
                        offset,
                        bytes: std::mem::replace(&mut buf, rest),
                        kind: UnitKind::Text { doc_start },
                    };
                    if !cursor.emit(unit) {
                        return Ok(false);
                    }
                    offset += cut as u64;
                    doc_start = false;
                    if eof && buf.is_empty() {
                        break;
                    }
                }
                None => {
                    let n = (&mut input)
                        .take(limits.target as u64)
                        .read_to_end(&mut buf)
                        .map_err(self.read_err(file))?;
                    eof = n == 0;
                }
            }
        }
        cursor.base += offset;
        Ok(true)
    }

    /// Groups a JSONL file's lines into units; returns whether to go on.
    fn read_jsonl(&self, file: usize, cursor: &mut Cursor<'_, '_>) -> Result<bool> {
        let target = self.opts.chunk.target;
        let mut input = BufReader::with_capacity(target.clamp(1 << 10, 1 << 20), self.open(file)?);
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        let (mut unit_offset, mut offset, mut line) = (0u64, 0u64, 0u64);
        loop {
            // A record starting at or after the split starts a new unit.
            let base = cursor.base;
            let crosses = base + unit_offset < self.split_at && base + offset >= self.split_at;
            if !ends.is_empty() && (crosses || bytes.len() >= target) {
                let u = self.jsonl_unit(file, base + unit_offset, unit_offset, &mut bytes, &mut ends, line);
                if !cursor.emit(u) {
                    return Ok(false);
                }
                unit_offset = offset;
            }
            let n = input.read_until(b'\n', &mut bytes).map_err(self.read_err(file))?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            line += 1;
            ends.push(bytes.len());
        }
        if !ends.is_empty() {
            let u = self.jsonl_unit(
                file,
                cursor.base + unit_offset,
                unit_offset,
                &mut bytes,
                &mut ends,
                line,
            );
            if !cursor.emit(u) {
                return Ok(false);
            }
        }
        cursor.base += offset;
        Ok(true)
    }

    /// The lines read so far as a unit; `line` is the number of the last one.
    fn jsonl_unit(
        &self,
        file: usize,
        start: u64,
        offset: u64,
        bytes: &mut Vec<u8>,
        ends: &mut Vec<usize>,
        line: u64,
    ) -> Unit {
        Unit {
            seq: 0,
            split: self.split_of(start),
            file,
            offset,
            bytes: std::mem::take(bytes),
            kind: UnitKind::Jsonl {
                first_line: line + 1 - ends.len() as u64,
                ends: std::mem::take(ends),
            },
        }
    }
}

/// Numbers the units, tracks the offset of the current file in the whole input, and checks for a stop.
struct Cursor<'s, 'e> {
    seq: u64,
    /// Bytes of the files before the current one.
    base: u64,
    stop: &'s AtomicBool,
    emit: &'s mut Emit<'e>,
}

impl Cursor<'_, '_> {
    fn emit(&mut self, mut unit: Unit) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        unit.seq = self.seq;
        self.seq += 1;
        (self.emit)(unit)
    }
}
