//! The packaged executables, audited as an operator would audit an
//! installed robot: each must carry its dependency list (the `.dep-v0`
//! section that `cargo auditable` writes), and `cargo audit bin` reads that
//! list and checks it against the RustSec snapshot in ../shared/advisory-db
//! (`--no-fetch`), with deny.toml's exceptions. Without the snapshot, that check is skipped with one line;
//! the section is required all the same.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::ArmError;
use super::say;
use crate::harness::HarnessError;
use crate::harness::workdir::WorkDir;

/// The section cargo auditable adds (zlib-compressed JSON of the crates).
const SECTION: &str = ".dep-v0";

/// Audits the executable of every package in `debs`, except the x86-64
/// ones when `skip_amd64` (they carry the test build, which is not
/// shipped).
pub(crate) fn audit_packages(
    root: &Path,
    work: &WorkDir,
    debs: &[PathBuf],
    skip_amd64: bool,
) -> Result<(), ArmError> {
    let db = advisory_db(root);
    if db.is_none() {
        say(
            "cargo audit bin: skipped, no RustSec snapshot at ../shared/advisory-db (each executable's dependency list is still checked)",
        );
    }
    let ignored = ignored_advisories(root)?;
    let out = work.create_dir("audit")?;
    for deb in debs {
        let Some((package, arch)) = package_and_arch(deb) else {
            continue;
        };
        if skip_amd64 && arch == "amd64" {
            say(&format!(
                "{}: the test build, not audited (the shipped x86-64 build is: packaging/build-debs.sh)",
                deb.display()
            ));
            continue;
        }
        let dir = out.join(format!("{package}_{arch}"));
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir))?;
        let binary = dir.join("usr/bin").join(package);
        let sections = run(Command::new("readelf").args(["-S", "-W"]).arg(&binary))?;
        if !has_dependency_list(&sections) {
            return Err(ArmError::NoDependencyList(deb.clone()));
        }
        let Some(db) = &db else {
            say(&format!(
                "{}: carries its dependency list ({SECTION})",
                deb.display()
            ));
            continue;
        };
        // cargo-audit's options come before `bin`. Without the section it
        // would only warn and guess from panic messages: hence the check
        // above.
        let mut command = crate::cargo();
        command.args(["audit", "--no-fetch", "--db"]).arg(db);
        for id in &ignored {
            command.args(["--ignore", id]);
        }
        command.arg("bin");
        say(&format!(
            "cargo audit bin {} (from {}; exceptions from deny.toml: {})",
            binary.display(),
            deb.display(),
            ignored.join(", ")
        ));
        let status = command
            .arg(&binary)
            .stdin(Stdio::null())
            .status()
            .map_err(|source| HarnessError::Spawn {
                program: "cargo audit".into(),
                source,
            })?;
        if !status.success() {
            return Err(ArmError::Audit(deb.clone()));
        }
    }
    Ok(())
}

/// The RustSec snapshot: `PEAQOS_ADVISORY_DB`, or `../shared/advisory-db`
/// beside the clone (as `.ci/deny` finds it); cargo-audit reads the folder
/// as it is. `None` when there is none.
fn advisory_db(root: &Path) -> Option<PathBuf> {
    let db = std::env::var_os("PEAQOS_ADVISORY_DB")
        .map_or_else(|| root.join("../shared/advisory-db"), PathBuf::from);
    db.join("SNAPSHOT").is_file().then_some(db)
}

/// The advisory ids deny.toml excepts (`[advisories] ignore`), each with its
/// reason there.
fn ignored_advisories(root: &Path) -> Result<Vec<String>, ArmError> {
    let path = root.join("deny.toml");
    let text = std::fs::read_to_string(&path).map_err(|source| HarnessError::Io {
        action: "read",
        path: path.clone(),
        source,
    })?;
    let config: toml::Table =
        toml::from_str(&text).map_err(|source| ArmError::DenyToml { path, source })?;
    Ok(config
        .get("advisories")
        .and_then(|a| a.get("ignore"))
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.get("id").and_then(toml::Value::as_str))
        .map(str::to_owned)
        .collect())
}

/// `peaqos-agent_0.1.0-1_arm64.deb` → (`peaqos-agent`, `arm64`).
fn package_and_arch(deb: &Path) -> Option<(&str, &str)> {
    let stem = deb.file_stem()?.to_str()?;
    let mut parts = stem.split('_');
    let package = parts.next()?;
    let arch = parts.nth(1)?;
    Some((package, arch))
}

/// Whether `readelf -S -W` lists the section.
fn has_dependency_list(readelf_sections: &str) -> bool {
    readelf_sections
        .split_whitespace()
        .any(|word| word == SECTION)
}

/// Runs `command`, returns its stdout; a failure names the command.
fn run(command: &mut Command) -> Result<String, ArmError> {
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| HarnessError::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(HarnessError::Failed {
            command: format!("{command:?}"),
            status: output.status,
        }
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_and_architecture_come_from_the_file_name() {
        assert_eq!(
            package_and_arch(Path::new("/x/peaqos-agent_0.1.0-1_arm64.deb")),
            Some(("peaqos-agent", "arm64"))
        );
        assert_eq!(
            package_and_arch(Path::new("peaqos-orchestrator_0.1.0-1_amd64.deb")),
            Some(("peaqos-orchestrator", "amd64"))
        );
        assert_eq!(package_and_arch(Path::new("notes.deb")), None);
    }

    #[test]
    fn the_section_is_found_by_name_not_by_prefix() {
        let with = "  [27] .dep-v0           PROGBITS        0000000000000000 3c5f28 0004e1 00      0   0  1\n";
        let without = "  [27] .dep-v0.old       PROGBITS        0000000000000000 3c5f28 0004e1 00      0   0  1\n";
        assert!(has_dependency_list(with));
        assert!(!has_dependency_list(without));
    }
}
