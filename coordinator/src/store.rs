//! The coordinator's run state on disk: `<cluster.state_dir>/run.redb`, an append-only log of [`Record`]s.
//!
//! Layout (format version [`FORMAT_VERSION`]):
//! - table `meta: &str -> u64`, key `format_version`. Its name and types never change, so any future coordinator can
//!   read it and refuse a file it does not understand before touching anything else.
//! - table `records: u64 -> &[u8]`: sequence number (0, 1, 2, … in append order) → serde_json of one `Record`.
//!   JSON because it is self-describing: a field added later with `#[serde(default)]` still reads old files.
//!
//! Durability: [`Store::append`] returns once its records are fsynced, except a batch of metric records only
//! (`Step`/`Eval`), which redb commits without fsync ([`Durability::None`]): ~8 µs instead of ~170 µs on the dev
//! machine, whose fsync is cheap; on a slow or networked disk an fsync per step would cost milliseconds. Those
//! records become durable with the next durable commit (any other record, every [`WEAK_COMMITS_PER_DURABLE`]th
//! metric batch, or closing the store). A crash therefore loses at most that many batches of loss-curve points,
//! never a checkpoint, generation, lost-worker record or outcome, nor a step recorded before one of those.
//!
//! Every open verifies the checksums of the whole file (redb's integrity check; ~10 ms for 100k records): a damaged
//! file is then an error naming it, where redb would otherwise panic on the first damaged page it reads.
//!
//! redb takes an exclusive lock on the file (Linux: an open-file-description lock, so a second open conflicts even
//! within one process); a second coordinator on the same `state_dir` is refused with [`Error::StateLocked`].
//! [`Store::read`] (`lockstep history --state-dir`) opens it read-only instead, beside other readers.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};
use crate::record::{Record, Saved};

/// The file inside `cluster.state_dir`.
pub const FILE_NAME: &str = "run.redb";
/// The layout this code writes; a file with a newer one is refused.
pub const FORMAT_VERSION: u64 = 1;
/// Every this-many metric-only batches in a row, one is committed durably anyway. Bounds the history a crash can
/// lose, and the pages redb cannot reuse until a durable commit (each non-durable commit pins the pages it freed).
pub const WEAK_COMMITS_PER_DURABLE: u32 = 64;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const FORMAT_VERSION_KEY: &str = "format_version";
/// redb's default is 1 GiB; the whole state of a long run is a few tens of MiB.
const CACHE_BYTES: usize = 64 << 20;

pub struct Store {
    db: Database,
    path: PathBuf,
    /// Metric-only batches committed without fsync since the last durable commit.
    weak_in_a_row: AtomicU32,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating dir and file) `<state_dir>/run.redb`. Errors name the file and what to do (e.g. another
    /// coordinator holds it: "is another lockstep-coordinator running with this cluster.state_dir?"; a damaged file).
    pub fn open(state_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(state_dir).map_err(|source| Error::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(&path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
                    Error::StateLocked { path: path.clone() }
                }
                source => Error::StateOpen {
                    path: path.clone(),
                    source,
                },
            })?;
        let store = Store {
            db,
            path,
            weak_in_a_row: AtomicU32::new(0),
        };
        store.check_format()?;
        Ok(store)
    }

    /// Reads the run state that `state_dir` already holds, without a coordinator (`lockstep history --state-dir`).
    /// It opens the file read-only: it writes nothing and needs no write permission, and readers do not exclude
    /// each other. A coordinator running on it holds the lock: [`Error::StateLocked`]. A file its coordinator did
    /// not close (killed, or its host went down) needs the repair any coordinator start does, which only a writer
    /// may run: then it is opened as [`Store::open`] does, which checks and repairs it.
    pub fn read(state_dir: &Path) -> Result<Saved> {
        let path = state_dir.join(FILE_NAME);
        let failed = |reason: String| Error::StateRead {
            path: path.clone(),
            reason,
        };
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NoState { path }),
            Err(e) => return Err(failed(e.to_string())),
            Ok(_) => {}
        }
        let db = match Database::builder().set_cache_size(CACHE_BYTES).open_read_only(&path) {
            Ok(db) => db,
            Err(DatabaseError::RepairAborted) => {
                return Self::open(state_dir)
                    .and_then(|store| store.load())
                    .map_err(|e| match e {
                        Error::StateOpen { source, .. } => failed(format!(
                            "{source}; it was not closed cleanly, and repairing it needs write permission \
                             (or resume the run: its coordinator repairs it)"
                        )),
                        e => e,
                    });
            }
            Err(DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch) => {
                return Err(Error::StateLocked { path });
            }
            Err(e) => {
                return Err(failed(format!(
                    "{e}; is it a lockstep run state (cluster.state_dir/{FILE_NAME})?"
                )));
            }
        };
        let redb = |e: redb::Error| Error::State {
            path: path.clone(),
            source: e,
        };
        // Without a writer there is no integrity check on open; redb panics on a damaged page where a checked
        // open would have refused the file, so such a panic becomes the same refusal here.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let txn = db.begin_read().map_err(|e| redb(e.into()))?;
            let meta = txn.open_table(META).map_err(|e| redb(e.into()))?;
            match meta
                .get(FORMAT_VERSION_KEY)
                .map_err(|e| redb(e.into()))?
                .map(|v| v.value())
            {
                Some(found) if found <= FORMAT_VERSION => {}
                Some(found) => {
                    return Err(Error::StateVersion {
                        path: path.clone(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                None => {
                    return Err(failed(format!(
                        "it has no {FORMAT_VERSION_KEY}: not a lockstep run state"
                    )));
                }
            }
            fold(&txn, &path)
        }));
        read.unwrap_or_else(|_| {
            Err(failed(
                "it is damaged (see the panic above); resume the run to have its coordinator check it".into(),
            ))
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything recorded so far, folded.
    pub fn load(&self) -> Result<Saved> {
        let txn = self.db.begin_read().map_err(self.redb())?;
        fold(&txn, &self.path)
    }

    /// Appends `records` in one write transaction. When it returns, they are durable (fsynced) — except that a
    /// transaction holding ONLY Step/Eval records may use weaker durability (see the module docs); they are then
    /// durable with the next durable commit.
    pub fn append(&self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let encoded = records
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::StateEncode {
                path: self.path.clone(),
                source,
            })?;
        let weak = records.iter().all(Record::is_metric)
            && self.weak_in_a_row.load(Ordering::Relaxed) + 1 < WEAK_COMMITS_PER_DURABLE;
        self.commit(&encoded, weak)?;
        if weak {
            self.weak_in_a_row.fetch_add(1, Ordering::Relaxed);
        } else {
            self.weak_in_a_row.store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    fn commit(&self, encoded: &[Vec<u8>], weak: bool) -> Result<()> {
        let mut txn = self.db.begin_write().map_err(self.redb())?;
        if weak {
            txn.set_durability(Durability::None).map_err(self.redb())?;
        }
        {
            let mut table = txn.open_table(RECORDS).map_err(self.redb())?;
            let next = table
                .last()
                .map_err(self.redb())?
                .map_or(0, |(last, _)| last.value() + 1);
            for (seq, bytes) in (next..).zip(encoded) {
                table.insert(seq, bytes.as_slice()).map_err(self.redb())?;
            }
        }
        txn.commit().map_err(self.redb())
    }

    /// Stamps a new file with [`FORMAT_VERSION`] and creates its tables; refuses a file of a newer format before
    /// opening any table whose types that format may have changed.
    fn check_format(&self) -> Result<()> {
        let txn = self.db.begin_write().map_err(self.redb())?;
        {
            let mut meta = txn.open_table(META).map_err(self.redb())?;
            let found = meta.get(FORMAT_VERSION_KEY).map_err(self.redb())?.map(|v| v.value());
            match found {
                Some(found) if found > FORMAT_VERSION => {
                    return Err(Error::StateVersion {
                        path: self.path.clone(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(FORMAT_VERSION_KEY, FORMAT_VERSION).map_err(self.redb())?;
                }
            }
            txn.open_table(RECORDS).map_err(self.redb())?;
        }
        txn.commit().map_err(self.redb())
    }

    fn redb<E: Into<redb::Error>>(&self) -> impl FnOnce(E) -> Error + '_ {
        |e| Error::State {
            path: self.path.clone(),
            source: e.into(),
        }
    }
}

/// Every record of `txn`'s file (`path`), folded in order.
fn fold(txn: &redb::ReadTransaction, path: &Path) -> Result<Saved> {
    let redb = |e: redb::Error| Error::State {
        path: path.to_path_buf(),
        source: e,
    };
    let table = txn.open_table(RECORDS).map_err(|e| redb(e.into()))?;
    let mut saved = Saved::default();
    for entry in table.iter().map_err(|e| redb(e.into()))? {
        let (seq, bytes) = entry.map_err(|e| redb(e.into()))?;
        let seq = seq.value();
        let record = serde_json::from_slice(bytes.value()).map_err(|source| Error::StateRecord {
            path: path.to_path_buf(),
            seq,
            source,
        })?;
        saved.apply(record);
    }
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use super::*;
    use crate::record::{LostRecord, Member, OUTCOME_STOPPED, StepRecord};

    /// Set in a child process of this test binary: the state dir `sigkill_child` writes to.
    const CHILD_DIR_ENV: &str = "LOCKSTEP_STORE_TEST_CHILD_DIR";
    /// How many extra Step records the child writes first (for the crash-repair figure of the benchmark).
    const CHILD_STEPS_ENV: &str = "LOCKSTEP_STORE_TEST_CHILD_STEPS";
    const CHILD_READY: &str = "lockstep-store-child: appended";

    fn step(step: u64) -> Record {
        #[allow(clippy::cast_precision_loss)]
        let loss = 10.0 / (step as f64 + 1.0);
        Record::Step(StepRecord {
            step,
            loss,
            lr: 6e-4,
            grad_norm: 0.9,
            tokens: 12 * 64,
            skipped: false,
        })
    }

    fn fold(records: &[Record]) -> Saved {
        let mut saved = Saved::default();
        for r in records {
            saved.apply(r.clone());
        }
        saved
    }

    fn a_run() -> Vec<Vec<Record>> {
        let member = |i: u32| Member {
            worker_id: format!("w{i}"),
            host: format!("h{i}"),
            rank: i,
        };
        vec![
            vec![
                Record::Run {
                    name: "shakespeare".into(),
                    spec_hash: "ab12".into(),
                    spec_json: r#"{"a":1}"#.into(),
                },
                Record::Generation {
                    generation: 0,
                    start_step: 0,
                    resume_from: String::new(),
                    members: vec![member(0)],
                },
            ],
            vec![step(1)],
            vec![
                step(2),
                Record::Eval {
                    step: 2,
                    val_loss: 4.25,
                    metrics: [("bleu".to_string(), 12.5)].into(),
                },
            ],
            vec![Record::Checkpoint {
                step: 2,
                path: "ck/step-00000002".into(),
            }],
            vec![step(3)],
            vec![Record::Lost(LostRecord {
                worker_id: "w1".into(),
                host: "h1".into(),
                rank: Some(1),
                generation: 0,
                last_step: 3,
                reason: "stream closed".into(),
                unix_ms: 1_764_000_000_000,
            })],
            vec![
                Record::Restart {
                    generation: 1,
                    reason: "w1 lost".into(),
                },
                Record::Generation {
                    generation: 1,
                    start_step: 2,
                    resume_from: "ck/step-00000002".into(),
                    members: vec![member(0), member(2)],
                },
            ],
            vec![step(3)],
            vec![Record::Step(StepRecord {
                step: 4,
                loss: f64::NAN,
                lr: 6e-4,
                grad_norm: f64::INFINITY,
                tokens: 0,
                skipped: true,
            })],
            vec![Record::Ended {
                outcome: OUTCOME_STOPPED.into(),
                message: "SIGTERM".into(),
            }],
            vec![Record::Resumed],
        ]
    }

    /// NaN != NaN, so compare the non-finite step by its bits and the rest structurally.
    fn assert_same(got: &Saved, want: &Saved) {
        let bits = |s: &Saved| {
            s.steps
                .iter()
                .map(|r| (r.step, r.loss.to_bits(), r.grad_norm.to_bits()))
                .collect()
        };
        let strip = |s: &Saved| Saved {
            steps: Vec::new(),
            ..s.clone()
        };
        assert_eq!(strip(got), strip(want));
        let (got_bits, want_bits): (Vec<_>, Vec<_>) = (bits(got), bits(want));
        assert_eq!(got_bits, want_bits);
    }

    #[test]
    fn a_store_can_be_shared_between_tasks() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Store>();
    }

    #[test]
    fn a_fresh_directory_is_created_and_loads_empty() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/b/state");
        let store = Store::open(&dir).expect("open creates the directory");
        assert_eq!(store.path(), dir.join(FILE_NAME));
        assert!(store.path().is_file());
        assert_eq!(store.load().expect("load"), Saved::default());
        store.append(&[]).expect("nothing to append is fine");
        assert_eq!(store.load().expect("load"), Saved::default());
    }

    #[test]
    fn round_trip_across_reopen_equals_the_fold() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let batches = a_run();
        let (first, second) = batches.split_at(5);
        {
            let store = Store::open(tmp.path()).expect("open");
            for batch in first {
                store.append(batch).expect("append");
            }
        }
        {
            let store = Store::open(tmp.path()).expect("reopen");
            for batch in second {
                store.append(batch).expect("append after reopen continues the sequence");
            }
        }
        let all: Vec<Record> = batches.concat();
        let saved = Store::open(tmp.path()).expect("reopen").load().expect("load");
        assert_same(&saved, &fold(&all));
        assert_eq!(saved.steps.iter().map(|s| s.step).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(saved.evals, vec![(2, 4.25)]);
        assert_eq!(saved.restarts, 1);
        assert_eq!(saved.ended, None, "Resumed cleared the stopped end");
    }

    #[test]
    fn many_metric_batches_in_a_row_all_load() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let n = u64::from(WEAK_COMMITS_PER_DURABLE) * 2 + 3;
        {
            let store = Store::open(tmp.path()).expect("open");
            for s in 1..=n {
                store.append(&[step(s)]).expect("append");
            }
        }
        let saved = Store::open(tmp.path()).expect("reopen").load().expect("load");
        assert_eq!(saved.steps.len() as u64, n, "a clean close makes weak commits durable");
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_refused_clearly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = Store::open(tmp.path()).expect("open");
        let err = Store::open(tmp.path()).expect_err("the file is held");
        assert!(matches!(err, Error::StateLocked { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("is another lockstep-coordinator running with this cluster.state_dir?"),
            "{msg}"
        );
        assert!(msg.contains(&first.path().display().to_string()), "{msg}");
        drop(first);
        Store::open(tmp.path()).expect("free again once the first is closed");
    }

    #[test]
    fn a_garbage_file_is_refused_naming_it() {
        for garbage in [b"not a database\n".repeat(1000), vec![0xff; 7], b"redb".repeat(2048)] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let path = tmp.path().join(FILE_NAME);
            std::fs::write(&path, &garbage).expect("write");
            let err = Store::open(tmp.path()).expect_err("garbage is not a run state");
            assert!(matches!(err, Error::StateOpen { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("move it away"), "{msg}");
        }
    }

    /// Writes 2000 checkpoint records, flips 512 bytes at each of several places of the file, and reads each damaged
    /// copy with `read`: every outcome is the full history or an error naming the file. Returns how many were errors.
    fn refusals_of_damaged_copies(read: impl Fn(&Path) -> Result<Saved>) -> usize {
        let mut refused = 0;
        for offset_percent in [10, 30, 50, 70, 90, 99] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let path = {
                let store = Store::open(tmp.path()).expect("open");
                for batch in 0..50u64 {
                    let records: Vec<Record> = (0..40)
                        .map(|i| Record::Checkpoint {
                            step: batch * 40 + i,
                            path: format!("ck/{batch}/{i}"),
                        })
                        .collect();
                    store.append(&records).expect("append");
                }
                store.path().to_path_buf()
            };
            let mut bytes = std::fs::read(&path).expect("read");
            let at = bytes.len() * offset_percent / 100;
            let end = (at + 512).min(bytes.len());
            bytes[at..end].iter_mut().for_each(|b| *b ^= 0x5a);
            std::fs::write(&path, &bytes).expect("write");
            match read(tmp.path()) {
                // The flip hit a page no committed tree uses.
                Ok(saved) => assert_eq!(saved.checkpoints.len(), 2000),
                Err(err) => {
                    refused += 1;
                    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
                }
            }
        }
        refused
    }

    /// Without redb's integrity check on open, some of these flips panic inside redb.
    #[test]
    fn a_damaged_file_is_an_error_naming_it_never_a_panic() {
        let refused = refusals_of_damaged_copies(|dir| Store::open(dir).and_then(|store| store.load()));
        assert!(refused > 0, "no flip hit live data: the test no longer tests anything");
    }

    /// A run state in `dir` that says it has the format after this code's.
    fn write_a_newer_format(dir: &Path) {
        let path = Store::open(dir).expect("open").path().to_path_buf();
        let db = Database::create(&path).expect("raw open");
        let txn = db.begin_write().expect("write");
        txn.open_table(META)
            .expect("meta")
            .insert(FORMAT_VERSION_KEY, FORMAT_VERSION + 1)
            .expect("insert");
        txn.commit().expect("commit");
    }

    #[test]
    fn a_newer_format_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write_a_newer_format(tmp.path());
        let err = Store::open(tmp.path()).expect_err("newer format");
        assert!(
            matches!(
                err,
                Error::StateVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("newer lockstep-coordinator"), "{err}");
    }

    #[test]
    fn an_undecodable_record_names_its_sequence_number() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        store.append(&[step(1)]).expect("append");
        store.commit(&[b"{\"Step\":42}".to_vec()], false).expect("raw append");
        let err = store.load().expect_err("record 1 is not a Record");
        assert!(matches!(err, Error::StateRecord { seq: 1, .. }), "{err:?}");
        assert!(err.to_string().contains(&store.path().display().to_string()), "{err}");
    }

    #[test]
    fn read_sees_the_fold_writes_nothing_and_is_refused_while_a_coordinator_holds_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = Store::read(&tmp.path().join("absent")).expect_err("no state there");
        assert!(matches!(err, Error::NoState { .. }), "{err:?}");
        let all: Vec<Record> = a_run().concat();
        let path = {
            let store = Store::open(tmp.path()).expect("open");
            for batch in a_run() {
                store.append(&batch).expect("append");
            }
            let err = Store::read(tmp.path()).expect_err("the coordinator holds it");
            assert!(matches!(err, Error::StateLocked { .. }), "{err:?}");
            store.path().to_path_buf()
        };
        let before = std::fs::read(&path).expect("read the file");
        assert_same(&Store::read(tmp.path()).expect("read"), &fold(&all));
        assert_same(&Store::read(tmp.path()).expect("read again"), &fold(&all));
        assert!(
            std::fs::read(&path).expect("read the file") == before,
            "reading changed the file"
        );
        Store::open(tmp.path()).expect("a coordinator opens it afterwards");
    }

    #[test]
    fn read_refuses_garbage_and_newer_formats_naming_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(FILE_NAME);
        std::fs::write(&path, b"not a database\n".repeat(1000)).expect("write");
        let err = Store::read(tmp.path()).expect_err("garbage is not a run state");
        assert!(matches!(err, Error::StateRead { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        std::fs::remove_file(&path).expect("remove");
        write_a_newer_format(tmp.path());
        let err = Store::read(tmp.path()).expect_err("newer format");
        assert!(matches!(err, Error::StateVersion { found: 2, .. }), "{err:?}");
    }

    /// A file whose coordinator was killed needs a repair that only a writer may do: read does it, and then reads.
    #[test]
    fn read_repairs_a_file_its_coordinator_did_not_close() {
        let tmp = tempfile::tempdir().expect("tempdir");
        run_child_and_kill(tmp.path(), 0);
        let saved = Store::read(tmp.path()).expect("read after SIGKILL");
        let durable = fold(&a_run().into_iter().take(6).flatten().collect::<Vec<_>>());
        assert_eq!(saved.checkpoints, durable.checkpoints);
        assert_eq!(saved.lost, durable.lost);
        assert!(saved.steps.len() >= durable.steps.len());
        // Repaired: a second read needs no writer.
        assert_eq!(Store::read(tmp.path()).expect("read again"), saved);
    }

    /// The read-only open has no integrity check: a damaged page may panic inside redb, which read turns into an
    /// error naming the file.
    #[test]
    fn read_of_a_damaged_file_is_an_error_naming_it_never_a_panic() {
        let refused = refusals_of_damaged_copies(Store::read);
        assert!(refused > 0, "no flip hit live data: the test no longer tests anything");
    }

    /// The child half of `append_survives_sigkill`; a no-op unless started by it.
    #[test]
    fn sigkill_child() {
        let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
            return;
        };
        let extra: u64 = std::env::var(CHILD_STEPS_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let store = Store::open(Path::new(&dir)).expect("child open");
        let base = 1_000_000;
        for chunk in (0..extra).collect::<Vec<_>>().chunks(1000) {
            let batch: Vec<Record> = chunk.iter().map(|s| step(base + s)).collect();
            store.append(&batch).expect("child append");
        }
        for batch in a_run().iter().take(6) {
            store.append(batch).expect("child append");
        }
        // Weak, after the last durable commit: may or may not survive, and must not break what did.
        store.append(&[step(4)]).expect("child append");
        let mut out = std::io::stdout().lock();
        // On a line of its own: libtest has already written "test …sigkill_child ... " without a newline.
        writeln!(out, "\n{CHILD_READY}").expect("stdout");
        out.flush().expect("stdout");
        // Wait for SIGKILL. Should the parent die first, stdin closes: exit without closing the store either way.
        let _ = std::io::stdin().read(&mut [0u8; 1]);
        std::process::exit(3);
    }

    /// Runs `sigkill_child` in a child process, kills it with SIGKILL once it says it appended, and returns.
    fn run_child_and_kill(dir: &Path, extra_steps: u64) {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args([
                "store::tests::sigkill_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir)
            .env(CHILD_STEPS_ENV, extra_steps.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the test binary");
        let stdout = child.stdout.take().expect("piped");
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains(CHILD_READY));
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("wait");
        assert!(ready, "the child never reported its appends ({status:?})");
        assert_eq!(
            status.signal(),
            Some(9),
            "the child died of SIGKILL, not of its own accord: {status:?}"
        );
    }

    #[test]
    fn append_survives_sigkill() {
        let tmp = tempfile::tempdir().expect("tempdir");
        run_child_and_kill(tmp.path(), 0);
        let saved = Store::open(tmp.path())
            .expect("reopen after SIGKILL")
            .load()
            .expect("load");
        let durable: Vec<Record> = a_run().into_iter().take(6).flatten().collect();
        let mut want = fold(&durable);
        let steps: Vec<u64> = saved.steps.iter().map(|s| s.step).collect();
        // Step 4 was committed without fsync after the last durable commit: allowed either way.
        let weak_survived = steps.last() == Some(&4);
        eprintln!("the weak commit after the last durable one survived SIGKILL: {weak_survived}");
        if weak_survived {
            want.apply(step(4));
        }
        assert_eq!(
            saved, want,
            "everything appended before the last durable commit returned is there"
        );
        assert!(saved.steps.len() >= 3 && saved.checkpoints.len() == 1 && saved.lost.len() == 1);
    }

    fn per_op_us(start: Instant, n: u32) -> f64 {
        start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    }

    /// Figures for the report: `cargo test --release -p lockstep-coordinator store_bench -- --ignored --nocapture`.
    /// Writes under the system temp dir, which must be a real disk for the fsync figures to mean anything.
    #[test]
    #[ignore = "benchmark; prints figures, asserts nothing about time"]
    fn store_bench() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        let one = vec![serde_json::to_vec(&step(1)).expect("encode")];

        let n = 200;
        let start = Instant::now();
        for _ in 0..n {
            store.commit(&one, false).expect("durable");
        }
        println!("append 1 Step, durable (fsync):        {:>9.1} us", per_op_us(start, n));

        let n = 5000;
        let start = Instant::now();
        for _ in 0..n {
            store.commit(&one, true).expect("weak");
        }
        println!("append 1 Step, Durability::None:       {:>9.1} us", per_op_us(start, n));

        let start = Instant::now();
        for s in 0..u64::from(n) {
            store.append(&[step(s)]).expect("append");
        }
        println!(
            "append 1 Step via append() (1/{WEAK_COMMITS_PER_DURABLE} durable): {:>6.1} us",
            per_op_us(start, n)
        );
        drop(store);

        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(tmp.path()).expect("open");
            for chunk in (0..100_000u64).collect::<Vec<_>>().chunks(1000) {
                let batch: Vec<Record> = chunk.iter().map(|s| step(*s)).collect();
                store.append(&batch).expect("append");
            }
            store
                .append(&[Record::Checkpoint {
                    step: 1,
                    path: "p".into(),
                }])
                .expect("durable");
        }
        let size = std::fs::metadata(tmp.path().join(FILE_NAME)).expect("stat").len();
        let start = Instant::now();
        let store = Store::open(tmp.path()).expect("reopen");
        let open_ms = start.elapsed().as_secs_f64() * 1e3;
        let start = Instant::now();
        let saved = store.load().expect("load");
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        assert_eq!(saved.steps.len(), 100_000);
        println!(
            "100k Step records: file {:.1} MiB, open {open_ms:.1} ms, load {load_ms:.1} ms",
            size as f64 / 1048576.0
        );
        drop(store);

        let tmp = tempfile::tempdir().expect("tempdir");
        run_child_and_kill(tmp.path(), 100_000);
        let start = Instant::now();
        let store = Store::open(tmp.path()).expect("reopen after SIGKILL");
        let open_ms = start.elapsed().as_secs_f64() * 1e3;
        let start = Instant::now();
        let saved = store.load().expect("load");
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        // The child's own steps 1.. replaced its 100k extra ones in the fold; its last durable record is there.
        assert_eq!(saved.lost.len(), 1);
        println!("after SIGKILL, 100k+ records: open (redb repair) {open_ms:.1} ms, load {load_ms:.1} ms");
    }
}
