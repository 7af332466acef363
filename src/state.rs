//! What the agent remembers across restarts and power loss: its machine id
//! and the last confirmed proof, in `state.json` under the state directory.
//!
//! Writes are atomic (temp file in the same directory, fsync, rename, fsync
//! the directory): after a power cut the file is either the old or the new
//! version, never a mix. Losing the file is not fatal either: the agent finds
//! its record again through `MACHINE_IDENTITY_EXISTS` and takes it back.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use peaqos_protocol::{Address, Timestamp};
use serde::{Deserialize, Serialize};

/// File name inside the state directory.
pub const FILE_NAME: &str = "state.json";
const VERSION: u32 = 1;
/// What `check` writes to prove the state directory takes a save: more
/// than a state file needs (about 1 KiB).
const PROBE_BYTES: usize = 4096;

/// The last proof the orchestrator confirmed for our record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProofFacts {
    pub challenge_id: String,
    pub signer_address: Address,
    /// Server time.
    pub verified_at: Timestamp,
    /// Server time; `None` when the deployment sets no proof lifetime.
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
    /// Server minus local clock when the proof was confirmed.
    #[serde(default)]
    pub clock_skew_ms: Option<i64>,
}

/// The persisted state. `identity` and `orchestrator` say whose record
/// `machine_id` is: a changed identity or orchestrator in the config makes a
/// stored id meaningless, and it is then ignored rather than confused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    /// Canonical identity reference.
    pub identity: String,
    pub orchestrator: String,
    pub machine_id: Option<String>,
    pub proof: Option<ProofFacts>,
    /// Local wall clock, for people reading the file.
    pub saved_at: Timestamp,
}

impl State {
    pub fn new(identity: String, orchestrator: String) -> Self {
        Self {
            version: VERSION,
            identity,
            orchestrator,
            machine_id: None,
            proof: None,
            saved_at: Timestamp::now(),
        }
    }
}

/// What [`StateStore::load`] found.
#[derive(Debug)]
pub enum Loaded {
    /// No file (first start, or deleted).
    Missing,
    /// A usable state for this identity and orchestrator.
    Found(State),
    /// A state for another identity or orchestrator; ignored.
    Foreign(State),
    /// Unreadable or not valid JSON: moved aside to the given path.
    Corrupt {
        moved_to: Option<PathBuf>,
        reason: String,
    },
}

/// Why the state could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot write state file {path}")]
    Write { path: PathBuf, source: io::Error },
}

/// The state file of one agent.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Reads the state, setting aside a corrupt file so that it is neither
    /// fatal nor silently overwritten (it may help someone debug).
    pub fn load(&self, identity: &str, orchestrator: &str) -> Loaded {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded::Missing,
            Err(e) => {
                return Loaded::Corrupt {
                    moved_to: None,
                    reason: format!("cannot read {}: {e}", path.display()),
                };
            }
        };
        let parsed = serde_json::from_slice::<State>(&bytes);
        if let Ok(State {
            proof: Some(proof), ..
        }) = &parsed
        {
            // Server time: the wall clock cannot truly be earlier.
            crate::clock::raise_floor(proof.verified_at.to_system_time());
        }
        match parsed {
            Ok(state) if state.version != VERSION => self.set_aside(format!(
                "unsupported state version {} (expected {VERSION})",
                state.version
            )),
            Ok(state) if state.identity == identity && state.orchestrator == orchestrator => {
                Loaded::Found(state)
            }
            Ok(state) => Loaded::Foreign(state),
            Err(e) => self.set_aside(format!("not a valid state file: {e}")),
        }
    }

    fn set_aside(&self, reason: String) -> Loaded {
        let path = self.path();
        let aside = self.dir.join(format!(
            "{FILE_NAME}.corrupt-{}",
            Timestamp::now().unix_millis()
        ));
        let moved_to = fs::rename(&path, &aside).ok().map(|()| aside);
        Loaded::Corrupt { moved_to, reason }
    }

    /// Writes `state` atomically.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        if !self.dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|source| StateError::CreateDir {
                    path: self.dir.clone(),
                    source,
                })?;
        }
        let path = self.path();
        let mut json = serde_json::to_vec_pretty(state).map_err(io::Error::other);
        if let Ok(json) = &mut json {
            json.push(b'\n');
        }
        json.and_then(|json| write_atomically(&self.dir, FILE_NAME, &json, 0o600))
            .map_err(|source| StateError::Write { path, source })
    }

    /// Removes the temporary files of saves that never finished (a crash
    /// or power cut between create and rename). Ours only: the name is
    /// `.state.json.tmp-<pid>`; one of a live process (a `check` writing
    /// at this moment) is left alone unless it is older than a save takes.
    /// Returns the files removed.
    pub fn remove_stale_temps(&self) -> Vec<PathBuf> {
        let prefix = format!(".{FILE_NAME}.tmp-");
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP_AGE);
            let alive = pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists();
            if (pid == std::process::id() || !alive || old) && fs::remove_file(entry.path()).is_ok()
            {
                removed.push(entry.path());
            }
        }
        removed
    }
}

/// How old a temporary file of another live process must be to count as
/// abandoned: a save takes milliseconds.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Writes `bytes` to `dir/name` atomically: a temporary file beside it,
/// fsync, rename, fsync of the directory. After a power cut the file is the
/// old or the new version, never a mix.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// The latest server time the state in `dir` records (its proof's
/// `verifiedAt`), read without changing anything (for `check`).
pub fn saved_server_time(dir: &Path) -> Option<Timestamp> {
    let bytes = fs::read(dir.join(FILE_NAME)).ok()?;
    let state: State = serde_json::from_slice(&bytes).ok()?;
    state.proof.map(|p| p.verified_at)
}

/// Whether the state directory can be created and written (for `check`).
pub fn probe_writable(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    // Creating an empty file succeeds on a full file system (it takes an
    // inode, no block): write as much as a state file holds, and sync, as
    // a save does, so that "no space" shows here and not at the first save.
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .and_then(|mut f| {
            f.write_all(&[b' '; PROBE_BYTES])?;
            f.sync_all()
        });
    let _ = fs::remove_file(&probe);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "did:peaq:4242";
    const ORCH: &str = "http://127.0.0.1:8080/";

    fn sample() -> State {
        let mut s = State::new(ID.into(), ORCH.into());
        s.machine_id = Some("mach_abc".into());
        s.proof = Some(ProofFacts {
            challenge_id: "chl_1".into(),
            signer_address: Address::parse("0x5ce9454909639D2D17A3F753ce7d93fa0b9aB12E").unwrap(),
            verified_at: Timestamp::from_unix_millis(1_000).unwrap(),
            expires_at: Timestamp::from_unix_millis(61_000),
            clock_skew_ms: Some(-250),
        });
        s
    }

    #[test]
    fn round_trips_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("nested"));
        assert!(matches!(store.load(ID, ORCH), Loaded::Missing));
        store.save(&sample()).unwrap();
        let mut second = sample();
        second.machine_id = Some("mach_def".into());
        store.save(&second).unwrap();
        match store.load(ID, ORCH) {
            Loaded::Found(s) => assert_eq!(s, second),
            other => panic!("{other:?}"),
        }
        let names: Vec<_> = fs::read_dir(dir.path().join("nested"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }

    #[test]
    fn stale_temp_files_of_our_own_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        store.save(&sample()).unwrap();
        // A crashed save of an earlier process (pid 2^22 + 1 is above
        // Linux's pid_max limit, so no live process has it).
        let crashed = dir.path().join(".state.json.tmp-4194305");
        fs::write(&crashed, b"{\"version\": 1, \"mach").unwrap();
        // A live process's save in progress (our parent's pid), and files
        // that are not ours.
        let live = dir.path().join(format!(
            ".state.json.tmp-{}",
            std::os::unix::process::parent_id()
        ));
        fs::write(&live, b"{").unwrap();
        let foreign = dir.path().join(".other.tmp-4194305");
        fs::write(&foreign, b"x").unwrap();
        assert_eq!(store.remove_stale_temps(), std::slice::from_ref(&crashed));
        assert!(!crashed.exists());
        assert!(live.exists() && foreign.exists() && store.path().exists());
        assert!(matches!(store.load(ID, ORCH), Loaded::Found(_)));
    }

    #[test]
    fn corrupt_file_is_set_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        fs::write(store.path(), b"{\"version\": 1, \"machineId\": tru").unwrap();
        match store.load(ID, ORCH) {
            Loaded::Corrupt {
                moved_to: Some(p), ..
            } => {
                assert!(
                    p.file_name()
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .starts_with("state.json.corrupt-")
                );
                assert!(p.exists());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(store.load(ID, ORCH), Loaded::Missing));
        store.save(&sample()).unwrap();
        assert!(matches!(store.load(ID, ORCH), Loaded::Found(_)));
    }

    #[test]
    fn another_identity_or_orchestrator_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        store.save(&sample()).unwrap();
        assert!(matches!(store.load("did:peaq:7", ORCH), Loaded::Foreign(_)));
        assert!(matches!(
            store.load(ID, "http://elsewhere/"),
            Loaded::Foreign(_)
        ));
    }
}
