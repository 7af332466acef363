//! Builds the agent and the orchestrator (debug profile, like `cargo test`)
//! and finds their executables in cargo's own report of what it built, so
//! that `CARGO_TARGET_DIR` or a configured target directory just works.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::error::DemoError;

pub(crate) const AGENT: &str = "peaqos-agent";
pub(crate) const ORCHESTRATOR: &str = "peaqos-orchestrator";

/// The two executables the demo runs.
#[derive(Debug, Clone)]
pub(crate) struct Binaries {
    pub(crate) agent: PathBuf,
    pub(crate) orchestrator: PathBuf,
}

/// How to get the binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Build {
    /// `cargo build -p peaqos-agent -p peaqos-orchestrator`: what a user
    /// needs, and no more.
    Binaries,
    /// `cargo test --workspace --no-run`: the binaries as the test suite
    /// builds them. The suite's own run of the demo uses this: the test
    /// build has other features (dev-dependencies unify into it), so
    /// `cargo build` would compile about a hundred crates a second time
    /// (measured: 74 s in a fresh CI run), while this is a no-op there.
    AsTests,
}

/// Builds in `root` (cargo's progress and diagnostics go to our stderr)
/// and returns the two executables.
pub(crate) fn build(root: &Path, how: Build) -> Result<Binaries, DemoError> {
    let args: &[&str] = match how {
        Build::Binaries => &["build", "-p", AGENT, "-p", ORCHESTRATOR],
        Build::AsTests => &["test", "--workspace", "--no-run"],
    };
    let output = crate::cargo()
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| DemoError::Spawn {
            program: "cargo".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(DemoError::Failed {
            command: format!("cargo {}", args.join(" ")),
            status: output.status,
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(Binaries {
        agent: executable(&stdout, AGENT).ok_or(DemoError::NoExecutable(AGENT))?,
        orchestrator: executable(&stdout, ORCHESTRATOR)
            .ok_or(DemoError::NoExecutable(ORCHESTRATOR))?,
    })
}

/// The `executable` of the `compiler-artifact` message for binary `name`
/// (not for the unit tests of that binary, which `cargo test` also builds,
/// under the same target name).
fn executable(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .filter(|m| m["profile"]["test"] == false)
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_comes_from_the_bin_artifact() {
        // The shapes `cargo test --workspace --no-run` prints, in its order.
        let messages = [
            r#"{"reason":"compiler-artifact","target":{"name":"peaqos-agent","kind":["lib"]},"profile":{"test":false},"executable":null}"#,
            "not json: a line cargo would never print, skipped",
            r#"{"reason":"compiler-artifact","target":{"name":"peaqos-agent","kind":["bin"]},"profile":{"test":true},"executable":"/t/debug/deps/peaqos_agent-86178d224d3de0e5"}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"peaqos-agent","kind":["bin"]},"profile":{"test":false},"executable":"/t/debug/peaqos-agent"}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(
            executable(&messages, AGENT),
            Some(PathBuf::from("/t/debug/peaqos-agent"))
        );
        assert_eq!(executable(&messages, ORCHESTRATOR), None);
    }
}
