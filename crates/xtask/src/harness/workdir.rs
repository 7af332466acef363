//! A task's working directory (`target/demo`, `target/footprint`,
//! `target/arm` ...): locked while the task runs, emptied at start (only if
//! an xtask task made it), with the files the task writes into it and the
//! `pids` of the children it started.

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use super::error::HarnessError;
use super::process::PidFile;

/// Marks a directory as an xtask task's, and is locked while one runs in
/// it. Directories made before the tasks shared this module have
/// `demo.lock` instead.
const LOCK_FILE: &str = "xtask.lock";
const OLD_LOCK_FILE: &str = "demo.lock";

/// A locked, empty working directory.
#[derive(Debug)]
pub(crate) struct WorkDir {
    path: PathBuf,
    /// Held for the lifetime of the demo; the lock goes with the process.
    _lock: File,
}

impl WorkDir {
    /// Creates or takes over `path` for `cargo xtask {task}`: locks it,
    /// stops what a killed earlier run left running there (reported as
    /// `(name, pid)`), and removes everything else in it.
    pub(crate) fn prepare(
        path: &Path,
        task: &'static str,
    ) -> Result<(Self, Vec<(String, u32)>), HarnessError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| HarnessError::Io {
                action,
                path,
                source,
            }
        };
        if path.to_str().is_none() {
            return Err(HarnessError::NonUtf8Path(path.to_owned()));
        }
        std::fs::create_dir_all(path).map_err(io("create", path))?;
        let path = path.canonicalize().map_err(io("resolve", path))?;
        let lock_path = path.join(LOCK_FILE);
        let ours = lock_path.exists() || path.join(OLD_LOCK_FILE).exists();
        let empty = std::fs::read_dir(&path)
            .map_err(io("list", &path))?
            .next()
            .is_none();
        if !ours && !empty {
            return Err(HarnessError::ForeignDir { dir: path, task });
        }
        let lock = File::create(&lock_path).map_err(io("create", &lock_path))?;
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(HarnessError::Busy { dir: path, task });
        }
        let leftovers = PidFile::new(path.join("pids")).stop_leftovers();
        for entry in std::fs::read_dir(&path).map_err(io("list", &path))? {
            let entry = entry.map_err(io("list", &path))?;
            let file = entry.path();
            if entry.file_name() == LOCK_FILE {
                continue;
            }
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&file)
            } else {
                std::fs::remove_file(&file)
            };
            removed.map_err(io("remove", &file))?;
        }
        Ok((Self { path, _lock: lock }, leftovers))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub(crate) fn pids(&self) -> PidFile {
        PidFile::new(self.file("pids"))
    }

    pub(crate) fn write(&self, name: &str, text: &str) -> Result<PathBuf, HarnessError> {
        let path = self.file(name);
        std::fs::write(&path, text).map_err(|source| HarnessError::Io {
            action: "write",
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    pub(crate) fn create_dir(&self, name: &str) -> Result<PathBuf, HarnessError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let path = self.file(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| HarnessError::Io {
                action: "create",
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }
}

/// A TOML basic string. A JSON string is one: TOML accepts every escape
/// serde_json writes (`\"`, `\\`, `\n`, `\t`, `\u00XX` ...).
pub(crate) fn toml_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_survive_quotes_backslashes_and_controls() {
        assert_eq!(toml_string("plain/path"), r#""plain/path""#);
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("tab\there\u{1}"), r#""tab\there\u0001""#);
    }

    #[test]
    fn a_foreign_directory_is_never_emptied() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious.txt"), "keep me").unwrap();
        let err = WorkDir::prepare(dir.path(), "demo").unwrap_err();
        assert!(matches!(err, HarnessError::ForeignDir { .. }), "{err}");
        assert!(dir.path().join("precious.txt").exists());
    }

    #[test]
    fn our_directory_is_emptied_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let demo = dir.path().join("demo");
        let (work, leftovers) = WorkDir::prepare(&demo, "demo").unwrap();
        assert!(leftovers.is_empty());
        work.write("agent.toml", "old").unwrap();
        work.create_dir("agent-state").unwrap();
        assert!(matches!(
            WorkDir::prepare(&demo, "demo").unwrap_err(),
            HarnessError::Busy { .. }
        ));
        drop(work);

        let (work, _) = WorkDir::prepare(&demo, "demo").unwrap();
        let left: Vec<_> = std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![LOCK_FILE]);
    }
}
