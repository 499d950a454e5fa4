//! The output directory's commit protocol: everything is written into a sibling `<out>.partial-<pid>`, which is
//! renamed to `<out>` only when complete (the manifest is its last file). On an error — or a panic — the partial
//! directory is removed, so a directory named `<out>` is always a complete one. An existing `<out>` is refused
//! unless `force`, and then replaced only once the new one is complete.
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The directory being written; removed on drop unless committed.
#[derive(Debug)]
pub(super) struct Staging {
    partial: PathBuf,
    out: PathBuf,
    force: bool,
    committed: bool,
}

impl Staging {
    /// Refuses an existing `out` (unless `force`) and creates the empty partial directory next to it.
    pub fn create(out: &Path, force: bool) -> Result<Self> {
        let invalid = |message: &str| Error::Data {
            path: out.to_path_buf(),
            message: message.to_string(),
        };
        if out.file_name().is_none() {
            return Err(invalid("--out must name a new directory (not `.`, `..` or `/`)"));
        }
        if !force && exists(out) {
            return Err(invalid(
                "already exists; choose another --out, or pass --force to replace it once the new data is complete",
            ));
        }
        let partial = sibling(out, "partial");
        if exists(&partial) {
            // Left by an earlier run that had this process id and was killed: never a complete directory.
            std::fs::remove_dir_all(&partial).map_err(|source| Error::Write {
                path: partial.clone(),
                source,
            })?;
        }
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| Error::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        std::fs::create_dir(&partial).map_err(|source| Error::Write {
            path: partial.clone(),
            source,
        })?;
        Ok(Staging {
            partial,
            out: out.to_path_buf(),
            force,
            committed: false,
        })
    }

    /// Where to write.
    pub fn dir(&self) -> &Path {
        &self.partial
    }

    /// Renames the complete partial directory to `out` (moving an old `out` aside first and then deleting it, with
    /// `force`).
    pub fn commit(mut self) -> Result<()> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Write { path, source }
        };
        sync_dir(&self.partial).map_err(write_err(&self.partial))?;
        let mut old = None;
        if exists(&self.out) {
            if !self.force {
                return Err(Error::Data {
                    path: self.out.clone(),
                    message: "appeared while the data was being prepared; choose another --out, or pass --force".into(),
                });
            }
            let aside = sibling(&self.out, "old");
            std::fs::rename(&self.out, &aside).map_err(write_err(&self.out))?;
            old = Some(aside);
        }
        if let Err(e) = std::fs::rename(&self.partial, &self.out) {
            if let Some(aside) = &old {
                // Put the old directory back: the user keeps what they had.
                let _ = std::fs::rename(aside, &self.out);
            }
            return Err(write_err(&self.out)(e));
        }
        self.committed = true;
        if let Some(parent) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).map_err(write_err(parent))?;
        }
        if let Some(old) = old {
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            removed.map_err(|source| Error::Data {
                path: old.clone(),
                message: format!(
                    "the new data is complete in {}, but the old one moved here could not be deleted ({source}); \
                     delete it by hand",
                    self.out.display()
                ),
            })?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: an error is already on its way, and a leftover directory is named `.partial-<pid>`.
            let _ = std::fs::remove_dir_all(&self.partial);
        }
    }
}

/// `<out>.<what>-<pid>` next to `out`.
fn sibling(out: &Path, what: &str) -> PathBuf {
    let mut name = OsString::from(out.file_name().unwrap_or_default());
    name.push(format!(".{what}-{}", std::process::id()));
    out.with_file_name(name)
}

fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// Fsyncs a directory so that the entries created in it survive a crash; refused by some file systems, where the
/// files themselves are synced already.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if e.kind() != std::io::ErrorKind::InvalidInput && e.kind() != std::io::ErrorKind::PermissionDenied => {
            Err(e)
        }
        _ => Ok(()),
    }
}
