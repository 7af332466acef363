//! The Debian packages, made from the executables `cargo xtask arm` has
//! just built (`cargo deb --no-build`: nothing is compiled twice), and
//! lintian over every one of them.
//!
//! With `--test-build` (CI), the x86-64 packages carry the test suite's
//! executables: the same metadata, files, units and maintainer scripts as
//! the shipped ones, which is what lintian judges, without the minutes of
//! a second x86-64 build; `packaging/build-debs.sh` makes the shipped ones.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::ArmError;
use super::toolchain::Board;
use super::{Native as NativeBinaries, say};
use crate::harness::HarnessError;
use crate::harness::workdir::WorkDir;

/// Where the x86-64 executables come from.
#[derive(Debug)]
pub(crate) enum Native<'a> {
    /// The shipping profiles, in the workspace's target directory.
    Shipping,
    /// The test build's: staged where `cargo deb --no-build` looks.
    TestBuild(&'a NativeBinaries),
}

/// x86-64: the agent and the orchestrator; each board: the agent (the
/// orchestrator is a server, built for x86-64 only).
pub(crate) fn build_and_lint(
    root: &Path,
    work: &WorkDir,
    boards: &[Board],
    native: &Native<'_>,
) -> Result<(), ArmError> {
    let out = work.create_dir("debs")?;
    let out_arg = out.to_string_lossy().into_owned();
    // `--no-build` leaves stripping to us: the orchestrator's release
    // profile keeps its symbols, and the test build keeps debug info.
    let x86_args = ["--no-build", "--strip", "--output", &out_arg];
    match native {
        Native::Shipping => build_debs(root, &x86_args, None)?,
        Native::TestBuild(binaries) => {
            let staged = stage(work, binaries)?;
            // Compression level is no concern of lintian's; xz -6 of the
            // test build's executables took minutes.
            let mut args = x86_args.to_vec();
            args.push("--fast");
            build_debs(root, &args, Some(&staged))?;
        }
    }
    for board in boards {
        build_debs(
            root,
            &[
                "--only",
                "peaqos-agent",
                "--target",
                board.target,
                "--no-build",
                "--output",
                &out_arg,
            ],
            None,
        )?;
    }
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&out)
        .map_err(|source| HarnessError::Io {
            action: "list",
            path: out.clone(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort();
    if debs.is_empty() {
        return Err(ArmError::NoPackages(out));
    }
    for deb in &debs {
        say(&format!("package {}", deb.display()));
    }
    say(
        "lintian (errors and warnings fail; the overrides, each with its reason, are in packaging/debian/<package>/lintian-overrides)",
    );
    let status = Command::new("lintian")
        // Not `--show-overrides`: with it, lintian 2.116 exits 2 on overridden
        // tags alone.
        .args(["--fail-on", "error,warning"])
        .args(&debs)
        .status()
        .map_err(|source| HarnessError::Spawn {
            program: "lintian".into(),
            source,
        })?;
    if !status.success() {
        return Err(ArmError::Lintian);
    }
    say(&format!("lintian: {} packages clean", debs.len()));
    let test_build = matches!(native, Native::TestBuild(_));
    super::audit::audit_packages(root, work, &debs, test_build)
}

/// A target directory with the test build's executables where
/// `cargo deb --no-build` takes them: `minsize/` for the agent, `release/`
/// for the orchestrator (their packages' profiles).
fn stage(work: &WorkDir, binaries: &NativeBinaries) -> Result<PathBuf, ArmError> {
    let staged = work.create_dir("x86-64-target")?;
    for (binary, profile, name) in [
        (&binaries.agent, "minsize", "peaqos-agent"),
        (&binaries.orchestrator, "release", "peaqos-orchestrator"),
    ] {
        let dir = staged.join(profile);
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| HarnessError::Io {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        std::fs::copy(binary, dir.join(name)).map_err(io("copy", binary))?;
    }
    Ok(staged)
}

/// `packaging/build-debs.sh ARGS`, with `CARGO_TARGET_DIR=target_dir` if
/// given.
fn build_debs(root: &Path, args: &[&str], target_dir: Option<&Path>) -> Result<(), ArmError> {
    let script = root.join("packaging/build-debs.sh");
    say(&format!("packaging/build-debs.sh {}", args.join(" ")));
    let mut command = Command::new(&script);
    if let Some(dir) = target_dir {
        command.env("CARGO_TARGET_DIR", dir);
    }
    let status = command
        .args(args)
        .current_dir(root)
        .status()
        .map_err(|source| HarnessError::Spawn {
            program: script.display().to_string(),
            source,
        })?;
    if !status.success() {
        return Err(HarnessError::Failed {
            command: format!("packaging/build-debs.sh {}", args.join(" ")),
            status,
        }
        .into());
    }
    Ok(())
}
