//! The input files of `lockstep prepare`: files as given, directories walked recursively in path order.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One file to read, with its size when the inputs were listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct InputFile {
    pub path: PathBuf,
    pub bytes: u64,
}

/// The files of `inputs`, in order: each file as given; each directory's files recursively, sorted by path.
/// Hidden entries of a directory (names starting with `.`) are skipped, as are symbolic links to directories (no
/// cycles) and entries that are not regular files (sockets, pipes).
pub(super) fn resolve(inputs: &[PathBuf]) -> Result<Vec<InputFile>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|source| Error::Read {
            path: input.clone(),
            source,
        })?;
        if meta.is_dir() {
            walk(input, &mut files)?;
        } else if meta.is_file() {
            files.push(InputFile {
                path: input.clone(),
                bytes: meta.len(),
            });
        } else {
            return Err(Error::Data {
                path: input.clone(),
                message: "not a regular file or a directory; give text or JSONL files, or directories of them".into(),
            });
        }
    }
    if files.is_empty() {
        return Err(Error::Data {
            path: label(inputs),
            message: "no input files: the directories hold no files (hidden ones, whose names start with '.', are \
                      skipped); check --input"
                .into(),
        });
    }
    Ok(files)
}

/// The inputs as one path-like label for messages about all of them: `a.txt, b/`.
pub(super) fn label(inputs: &[PathBuf]) -> PathBuf {
    let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    PathBuf::from(names.join(", "))
}

fn walk(dir: &Path, files: &mut Vec<InputFile>) -> Result<()> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Read { path, source }
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(read_err(dir))?
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(read_err(dir))?;
    entries.retain(|e| !e.file_name().as_encoded_bytes().starts_with(b"."));
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type().map_err(read_err(&path))?;
        if kind.is_dir() {
            walk(&path, files)?;
        } else if kind.is_file() || kind.is_symlink() {
            let meta = std::fs::metadata(&path).map_err(read_err(&path))?;
            if meta.is_file() {
                files.push(InputFile {
                    path,
                    bytes: meta.len(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_walked_in_path_order_without_hidden_entries() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, text) in [
            ("b.txt", "bb"),
            ("a/z.txt", "z"),
            ("a/c/d.txt", "ddd"),
            ("a/.hidden.txt", "h"),
            (".git/config", "g"),
            ("A.txt", "A"),
        ] {
            let path = d.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let single = d.join("b.txt");
        let files = resolve(&[d.to_path_buf(), single.clone()]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.path.strip_prefix(d).unwrap().to_path_buf())
            .collect();
        let expected: Vec<PathBuf> = ["A.txt", "a/c/d.txt", "a/z.txt", "b.txt", "b.txt"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(names, expected);
        assert_eq!(files.iter().map(|f| f.bytes).collect::<Vec<_>>(), vec![1, 3, 1, 2, 2]);
    }

    #[test]
    fn a_missing_input_or_an_empty_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.txt");
        let err = resolve(std::slice::from_ref(&missing)).unwrap_err().to_string();
        assert!(err.contains("nope.txt"), "{err}");
        std::fs::write(dir.path().join(".hidden"), "x").unwrap();
        let err = resolve(&[dir.path().to_path_buf()]).unwrap_err().to_string();
        assert!(
            err.contains("no input files") && err.contains(&dir.path().display().to_string()),
            "{err}"
        );
    }
}
