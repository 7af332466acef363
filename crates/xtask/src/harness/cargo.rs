//! Builds with cargo and finds the executables in cargo's own report of
//! what it built (`--message-format=json`), so that `CARGO_TARGET_DIR`, a
//! configured target directory or `--target` just work.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::error::HarnessError;

pub(crate) const AGENT: &str = "peaqos-agent";
pub(crate) const ORCHESTRATOR: &str = "peaqos-orchestrator";

/// The build command of the shipped executables: `cargo auditable build`,
/// which embeds their dependency list (the `.dep-v0` section that `cargo
/// audit bin` reads on an installed robot), when cargo-auditable is
/// installed (.ci/install-tools installs it; `cargo xtask arm --debs`
/// requires it); plain `cargo build` elsewhere.
pub(crate) fn shipping_build() -> Vec<&'static str> {
    if auditable_installed() {
        vec!["auditable", "build"]
    } else {
        vec!["build"]
    }
}

/// Whether `cargo auditable` exists (its `--version` would print cargo's).
pub(crate) fn auditable_installed() -> bool {
    peaqos_testkit::find_program("cargo-auditable").is_some()
}

/// What one cargo call built: its `compiler-artifact` messages.
#[derive(Debug)]
pub(crate) struct Built {
    command: String,
    messages: Vec<serde_json::Value>,
}

/// `cargo ARGS` in `root` (`build ...`, `test --no-run ...`): cargo's
/// progress and diagnostics go to our stderr, its report is kept.
pub(crate) fn cargo(root: &Path, args: &[&str]) -> Result<Built, HarnessError> {
    cargo_with_env(root, args, &[])
}

/// [`cargo`] with variables set for it (a target's C compiler, say).
pub(crate) fn cargo_with_env(
    root: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Result<Built, HarnessError> {
    let command = args.join(" ");
    let output = crate::cargo()
        .args(args)
        .envs(envs.iter().copied())
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| HarnessError::Spawn {
            program: "cargo".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(HarnessError::Failed {
            command: format!("cargo {command}"),
            status: output.status,
        });
    }
    Ok(Built::parse(
        command,
        &String::from_utf8_lossy(&output.stdout),
    ))
}

impl Built {
    fn parse(command: String, stdout: &str) -> Self {
        let messages = stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact")
            .collect();
        Self { command, messages }
    }

    /// The executable of target `name` of kind `kind` (`bin`, `example`):
    /// not the unit tests of that target, which `cargo test` also builds
    /// under the same name.
    pub(crate) fn executable(
        &self,
        name: &'static str,
        kind: &'static str,
    ) -> Result<PathBuf, HarnessError> {
        self.executable_for(name, kind, None)
    }

    /// The same, of a build for the Rust target `target` (one cargo call
    /// may build for several `--target`s; each has its own directory).
    pub(crate) fn executable_for(
        &self,
        name: &'static str,
        kind: &'static str,
        target: Option<&str>,
    ) -> Result<PathBuf, HarnessError> {
        let in_target_dir = |path: &str| {
            target.is_none_or(|t| Path::new(path).components().any(|c| c.as_os_str() == t))
        };
        self.messages
            .iter()
            .filter(|m| m["target"]["name"] == name && m["profile"]["test"] == false)
            .filter(|m| {
                m["target"]["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|k| k == kind))
            })
            .filter_map(|m| m["executable"].as_str())
            .find(|path| in_target_dir(path))
            .map(PathBuf::from)
            .ok_or_else(|| HarnessError::NoArtifact {
                command: self.command.clone(),
                name,
                kind,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_come_from_their_artifacts() {
        // The shapes `cargo test --workspace --no-run` and `cargo build
        // --example` print, in their order.
        let messages = [
            r#"{"reason":"compiler-artifact","target":{"name":"peaqos-agent","kind":["lib"]},"profile":{"test":false},"executable":null}"#,
            "not json: a line cargo would never print, skipped",
            r#"{"reason":"compiler-artifact","target":{"name":"peaqos-agent","kind":["bin"]},"profile":{"test":true},"executable":"/t/debug/deps/peaqos_agent-86178d224d3de0e5"}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"peaqos-agent","kind":["bin"]},"profile":{"test":false},"executable":"/t/debug/peaqos-agent"}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"footprint_baseline","kind":["example"]},"profile":{"test":false},"executable":"/t/minsize/examples/footprint_baseline"}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        let built = Built::parse("test --no-run".into(), &messages);
        assert_eq!(
            built.executable(AGENT, "bin").unwrap(),
            Path::new("/t/debug/peaqos-agent")
        );
        assert_eq!(
            built.executable("footprint_baseline", "example").unwrap(),
            Path::new("/t/minsize/examples/footprint_baseline")
        );
        assert!(built.executable("footprint_baseline", "bin").is_err());
        let cross = Built::parse(
            "build --target a --target b".into(),
            &[
                r#"{"reason":"compiler-artifact","target":{"name":"peaqos-agent","kind":["bin"]},"profile":{"test":false},"executable":"/t/aarch64-unknown-linux-gnu/minsize/peaqos-agent"}"#,
                r#"{"reason":"compiler-artifact","target":{"name":"peaqos-agent","kind":["bin"]},"profile":{"test":false},"executable":"/t/armv7-unknown-linux-gnueabihf/minsize/peaqos-agent"}"#,
            ]
            .join("\n"),
        );
        assert_eq!(
            cross
                .executable_for(AGENT, "bin", Some("armv7-unknown-linux-gnueabihf"))
                .unwrap(),
            Path::new("/t/armv7-unknown-linux-gnueabihf/minsize/peaqos-agent")
        );
        assert!(
            cross
                .executable_for(AGENT, "bin", Some("x86_64-unknown-linux-gnu"))
                .is_err()
        );
        let err = built.executable(ORCHESTRATOR, "bin").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`cargo test --no-run` did not name the bin `peaqos-orchestrator` in its output"
        );
    }
}
