//! The demo directory: locked while a demo runs, emptied at start (only if
//! an earlier demo made it), and the files the demo writes into it.

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use super::error::DemoError;
use super::process::PidFile;

/// Marks a directory as the demo's, and is locked while a demo runs in it.
const LOCK_FILE: &str = "demo.lock";

/// The demo identity: a plain `did:peaq:<decimal>`, so that its controller
/// must come from the registry file (an address-form identity controls
/// itself and would need none).
pub(crate) const IDENTITY: &str = "did:peaq:4242";
/// The machine's display name; its MQTT topics are below [`TOPIC_PREFIX`].
pub(crate) const MACHINE_NAME: &str = "demo-robot";
pub(crate) const TOPIC_PREFIX: &str = "peaqos/demo-robot";

/// A locked, empty demo directory.
#[derive(Debug)]
pub(crate) struct WorkDir {
    path: PathBuf,
    /// Held for the lifetime of the demo; the lock goes with the process.
    _lock: File,
}

impl WorkDir {
    /// Creates or takes over `path`: locks it, stops what a killed earlier
    /// demo left running there (reported as `(name, pid)`), and removes
    /// everything else in it.
    pub(crate) fn prepare(path: &Path) -> Result<(Self, Vec<(String, u32)>), DemoError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| DemoError::Io {
                action,
                path,
                source,
            }
        };
        if path.to_str().is_none() {
            return Err(DemoError::NonUtf8Path(path.to_owned()));
        }
        std::fs::create_dir_all(path).map_err(io("create", path))?;
        let path = path.canonicalize().map_err(io("resolve", path))?;
        let lock_path = path.join(LOCK_FILE);
        let ours = lock_path.exists();
        let empty = std::fs::read_dir(&path)
            .map_err(io("list", &path))?
            .next()
            .is_none();
        if !ours && !empty {
            return Err(DemoError::ForeignDir(path));
        }
        let lock = File::create(&lock_path).map_err(io("create", &lock_path))?;
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(DemoError::Busy(path));
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

    pub(crate) fn write(&self, name: &str, text: &str) -> Result<PathBuf, DemoError> {
        let path = self.file(name);
        std::fs::write(&path, text).map_err(|source| DemoError::Io {
            action: "write",
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    pub(crate) fn create_dir(&self, name: &str) -> Result<PathBuf, DemoError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let path = self.file(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| DemoError::Io {
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

/// The controller registry: the demo identity, controlled by `address`.
pub(crate) fn registry_toml(address: &str) -> String {
    format!(
        "# Written by `cargo xtask demo`: which addresses control which identity\n\
         # (the orchestrator's PEAQOS_MCR_REGISTRY_FILE; re-read when it changes).\n\
         [identities]\n\
         {} = [{}]\n",
        toml_string(IDENTITY),
        toml_string(address)
    )
}

/// Where the agent finds its key, orchestrator, broker and state.
#[derive(Debug)]
pub(crate) struct AgentSettings<'a> {
    pub(crate) key_file: &'a Path,
    pub(crate) state_dir: &'a Path,
    pub(crate) orchestrator_url: &'a str,
    pub(crate) broker_url: &'a str,
}

/// The agent's configuration: the example's keys, with intervals short
/// enough that a person watching sees every step.
pub(crate) fn agent_toml(s: &AgentSettings<'_>) -> String {
    let path = |p: &Path| toml_string(&p.to_string_lossy());
    format!(
        r#"# Written by `cargo xtask demo`. Every key: config/agent.example.toml.

[identity]
ref = {identity}
key_file = {key_file}

[orchestrator]
url = {orchestrator}
connect_timeout = "2s"
request_timeout = "5s"

[machine]
display_name = {name}
owner_id = "demo"
machine_type = "amr"
runtime_profile = "demo"

[state]
dir = {state_dir}

[renewal]
check_interval = "30s"
backoff_initial = "200ms"
backoff_max = "5s"
slow_retry = "5s"

[mqtt]
enabled = true
url = {broker}
topic_prefix = {prefix}
reconnect_min = "200ms"
reconnect_max = "5s"
"#,
        identity = toml_string(IDENTITY),
        key_file = path(s.key_file),
        orchestrator = toml_string(s.orchestrator_url),
        name = toml_string(MACHINE_NAME),
        state_dir = path(s.state_dir),
        broker = toml_string(s.broker_url),
        prefix = toml_string(TOPIC_PREFIX),
    )
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
        let err = WorkDir::prepare(dir.path()).unwrap_err();
        assert!(matches!(err, DemoError::ForeignDir(_)), "{err}");
        assert!(dir.path().join("precious.txt").exists());
    }

    #[test]
    fn our_directory_is_emptied_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let demo = dir.path().join("demo");
        let (work, leftovers) = WorkDir::prepare(&demo).unwrap();
        assert!(leftovers.is_empty());
        work.write("agent.toml", "old").unwrap();
        work.create_dir("agent-state").unwrap();
        assert!(matches!(
            WorkDir::prepare(&demo).unwrap_err(),
            DemoError::Busy(_)
        ));
        drop(work);

        let (work, _) = WorkDir::prepare(&demo).unwrap();
        let left: Vec<_> = std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![LOCK_FILE]);
    }
}
