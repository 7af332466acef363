//! What a reload (`systemctl reload`, SIGHUP) does to a gateway's machines:
//! the machines directory read again, compared file by file with what runs.
//!
//! - a new file starts its machine (a bad one shows `config_error`);
//! - a removed file stops its machine (its record is left alone);
//! - a file whose text changed restarts that machine only;
//! - an unchanged file leaves its machine untouched: no new challenge, no
//!   reconnect;
//! - a changed file that is now bad leaves its running machine as it was,
//!   and the file is named in the log.
//!
//! `agent.toml` itself is not read again: what the machines share (the
//! orchestrator, the broker) changes with a restart.

use std::collections::BTreeMap;

use crate::config::MachineEntry;

/// What runs now, by machine name: its file's text when it was started,
/// and whether it runs a loop (a bad file's machine does not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub text: Option<String>,
    pub runs: bool,
}

/// What to do.
#[derive(Debug, Default)]
pub struct Plan {
    pub start: Vec<MachineEntry>,
    pub restart: Vec<MachineEntry>,
    pub stop: Vec<String>,
    /// Changed files that are now bad, their machines left running.
    pub refused: Vec<MachineEntry>,
    pub unchanged: usize,
}

/// Compares the files read now with what runs. Machines that are not
/// files (the agent's own) are not in `running`.
pub fn plan(running: &BTreeMap<String, Running>, entries: Vec<MachineEntry>) -> Plan {
    let mut plan = Plan::default();
    let mut seen = std::collections::BTreeSet::new();
    for entry in entries {
        seen.insert(entry.name.clone());
        match running.get(&entry.name) {
            None => plan.start.push(entry),
            Some(now) if now.text.is_some() && now.text == entry.text => plan.unchanged += 1,
            Some(now) if entry.spec.is_err() && now.runs => plan.refused.push(entry),
            Some(_) => plan.restart.push(entry),
        }
    }
    plan.stop = running
        .keys()
        .filter(|name| !seen.contains(*name))
        .cloned()
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::{MachineFile, MachineFileError, MachineSpec};

    fn entry(name: &str, text: &str, good: bool) -> MachineEntry {
        let path = PathBuf::from(format!("machines.d/{name}.toml"));
        let spec = if good {
            let file: MachineFile = toml::from_str(
                "[identity]\nref = \"did:peaq:1\"\nkey_file = \"k\"\n[machine]\n\
                 display_name = \"d\"\nowner_id = \"o\"\nmachine_type = \"t\"\n\
                 runtime_profile = \"r\"\n",
            )
            .unwrap();
            Ok(MachineSpec {
                name: name.to_owned(),
                identity: file.identity,
                machine: file.machine,
                topic_prefix: None,
                state_dir: PathBuf::from("state"),
                source: path.clone(),
                credentials_outside_systemd: Vec::new(),
                own: false,
            })
        } else {
            Err(MachineFileError::Read {
                path: path.clone(),
                source: std::io::Error::other("bad"),
            })
        };
        MachineEntry {
            name: name.to_owned(),
            path,
            text: Some(text.to_owned()),
            spec,
        }
    }

    fn running(text: &str, runs: bool) -> Running {
        Running {
            text: Some(text.to_owned()),
            runs,
        }
    }

    #[test]
    fn only_new_changed_and_removed_files_are_touched() {
        let now = BTreeMap::from([
            ("same".to_owned(), running("a", true)),
            ("changed".to_owned(), running("a", true)),
            ("gone".to_owned(), running("a", true)),
            ("now-bad".to_owned(), running("a", true)),
            ("was-bad".to_owned(), running("x", false)),
            ("still-bad".to_owned(), running("x", false)),
        ]);
        let files = vec![
            entry("same", "a", true),
            entry("changed", "b", true),
            entry("now-bad", "c", false),
            entry("was-bad", "y", false),
            entry("still-bad", "x", false),
            entry("new", "n", true),
        ];
        let p = plan(&now, files);
        let names = |v: &[MachineEntry]| v.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&p.start), ["new"]);
        assert_eq!(names(&p.restart), ["changed", "was-bad"]);
        assert_eq!(names(&p.refused), ["now-bad"]);
        assert_eq!(p.stop, ["gone"]);
        assert_eq!(p.unchanged, 2);
    }
}
