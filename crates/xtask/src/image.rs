//! `cargo xtask image`: the orchestrator's container image, offline.
//!
//! Builds the orchestrator statically linked (`x86_64-unknown-linux-musl`,
//! profile `image`: release, stripped; ring's and SQLite's C code through
//! Debian's `musl-gcc`), stages a build context in `target/image/context/`
//! (the binary, Debian's CA bundle, packaging/oci's passwd and group, an
//! empty data directory) and builds packaging/oci/Containerfile `FROM
//! scratch` with podman (or buildah): no base image, no registry. Tags
//! `localhost/peaqos-orchestrator:<version>` and `:latest`, and prints the
//! image's size. Unchanged inputs reuse the cached layers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Parser;
use peaqos_testkit::find_program;

use crate::harness::HarnessError;
use crate::harness::cargo::{ORCHESTRATOR, cargo_with_env};

/// The Rust target of the image's binary: musl links statically, so the
/// image needs no C library.
const TARGET: &str = "x86_64-unknown-linux-musl";
/// Cargo's environment variable for that target's C compiler.
const CC_VAR: &str = "CC_x86_64_unknown_linux_musl";
const MUSL_GCC: &str = "musl-gcc";
/// Debian's CA bundle (package ca-certificates), at the path the image
/// keeps it (`SSL_CERT_FILE`).
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
/// The repository of the tags made.
const REPOSITORY: &str = "localhost/peaqos-orchestrator";

/// Builds the orchestrator's container image (FROM scratch, offline):
/// the static musl binary, CA certificates, a non-root user.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask image")]
struct Options {
    /// Tag to give the image besides `<version>` and `latest`.
    #[arg(long, value_name = "TAG")]
    tag: Vec<String>,
}

/// Why the image could not be built. Each message names the tool or file;
/// the cause is in `source()`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImageError {
    #[error(transparent)]
    Harness(#[from] HarnessError),
    #[error("missing on this machine: {}; .ci/install-tools installs all of it", .0.join(", "))]
    Missing(Vec<String>),
    #[error(
        "{0} is dynamically linked (it has an ELF interpreter); a FROM scratch image cannot run it"
    )]
    NotStatic(PathBuf),
}

pub(crate) fn run(args: &[String]) -> Result<(), ImageError> {
    let options = Options::try_parse_from(
        std::iter::once("cargo xtask image").chain(args.iter().map(String::as_str)),
    )
    .unwrap_or_else(|e| e.exit());
    let root = crate::workspace_root();
    let builder = tools()?;
    let binary = build_binary(&root)?;
    let context = stage(&root, &binary)?;
    let version = env!("CARGO_PKG_VERSION");
    let mut tags = vec![
        format!("{REPOSITORY}:{version}"),
        format!("{REPOSITORY}:latest"),
    ];
    tags.extend(options.tag.iter().map(|t| format!("{REPOSITORY}:{t}")));
    say(&format!(
        "building {} with {} (FROM scratch, offline)",
        tags[0],
        builder.display()
    ));
    // `podman build` and `buildah build` take the same options.
    let mut command = Command::new(&builder);
    command
        .arg("build")
        // The OCI format has no HEALTHCHECK; docker's keeps it.
        .args(["--format", "docker", "--pull=never"])
        .arg("--file")
        .arg(root.join("packaging/oci/Containerfile"))
        .arg("--build-arg")
        .arg(format!("VERSION={version}"))
        .arg("--build-arg")
        .arg(format!("REVISION={}", revision(&root)));
    for tag in &tags {
        command.args(["--tag", tag]);
    }
    command.arg(&context);
    run_tool(&mut command)?;
    let size = image_size(&builder, &tags[0]);
    say(&format!(
        "built {} ({}; binary {})",
        tags.join(", "),
        size.map_or_else(|| "size unknown".to_owned(), mib),
        mib(file_len(&binary)?)
    ));
    Ok(())
}

/// podman (or buildah) to build with, when musl-gcc and the Rust target
/// are there too; else the list of what is missing.
fn tools() -> Result<PathBuf, ImageError> {
    let mut missing = Vec::new();
    let builder = find_program("podman").or_else(|| find_program("buildah"));
    if builder.is_none() {
        missing.push("podman or buildah (apt-get install podman)".to_owned());
    }
    if std::env::var_os(CC_VAR).is_none() && find_program(MUSL_GCC).is_none() {
        missing.push(format!("{MUSL_GCC} (apt-get install musl-tools)"));
    }
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == TARGET)
        });
    // Without rustup (a distribution's Rust), cargo says what is missing.
    if installed.is_ok_and(|yes| !yes) {
        missing.push(format!(
            "the Rust target {TARGET} (rustup target add {TARGET})"
        ));
    }
    match builder {
        Some(builder) if missing.is_empty() => Ok(builder),
        _ => Err(ImageError::Missing(missing)),
    }
}

/// `cargo build --profile image --target x86_64-unknown-linux-musl -p
/// peaqos-orchestrator`, checked to be static.
fn build_binary(root: &Path) -> Result<PathBuf, ImageError> {
    say(&format!(
        "building {ORCHESTRATOR} (--profile image --target {TARGET}, statically linked)"
    ));
    // ring's and SQLite's C code; cc-rs would guess musl-gcc too, but a
    // missing one should fail here by name, not deep in a build script.
    let cc = std::env::var(CC_VAR).unwrap_or_else(|_| MUSL_GCC.to_owned());
    let binary = cargo_with_env(
        root,
        &[
            "build",
            "--locked",
            "--profile",
            "image",
            "--target",
            TARGET,
            "-p",
            ORCHESTRATOR,
        ],
        &[(CC_VAR, &cc)],
    )?
    .executable_for(ORCHESTRATOR, "bin", Some(TARGET))?;
    let bytes = std::fs::read(&binary).map_err(|source| HarnessError::Io {
        action: "read",
        path: binary.clone(),
        source,
    })?;
    if has_interpreter(&bytes) {
        return Err(ImageError::NotStatic(binary));
    }
    Ok(binary)
}

/// Whether an ELF file asks for a dynamic loader (`PT_INTERP`): a FROM
/// scratch image has none. Anything that is not a 64-bit little-endian ELF
/// counts as dynamic, to be safe.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return true;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return true;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return true;
    };
    (0..usize::from(phnum))
        .any(|i| u32_at(phoff + i * usize::from(phentsize)).is_none_or(|kind| kind == PT_INTERP))
}

/// `target/image/context/`: what the Containerfile copies, made afresh.
fn stage(root: &Path, binary: &Path) -> Result<PathBuf, ImageError> {
    let context = root.join("target/image/context");
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| HarnessError::Io {
            action,
            path,
            source,
        }
    };
    if context.exists() {
        std::fs::remove_dir_all(&context).map_err(io("remove", &context))?;
    }
    let rootfs = context.join("rootfs");
    for dir in ["usr/bin", "etc/ssl/certs", "var/lib"] {
        let dir = rootfs.join(dir);
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    }
    let data = context.join("data");
    std::fs::create_dir_all(&data).map_err(io("create", &data))?;
    let copies = [
        (binary.to_owned(), rootfs.join("usr/bin").join(ORCHESTRATOR)),
        (Path::new("/").join(CA_BUNDLE), rootfs.join(CA_BUNDLE)),
        (
            root.join("packaging/oci/rootfs/etc/passwd"),
            rootfs.join("etc/passwd"),
        ),
        (
            root.join("packaging/oci/rootfs/etc/group"),
            rootfs.join("etc/group"),
        ),
    ];
    for (from, to) in copies {
        std::fs::copy(&from, &to).map_err(io("copy", &from))?;
    }
    Ok(context)
}

/// The commit built from, for the image's label (`unknown` outside git).
fn revision(root: &Path) -> String {
    Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

fn run_tool(command: &mut Command) -> Result<(), HarnessError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command
        .stdin(Stdio::null())
        .status()
        .map_err(|source| HarnessError::Spawn {
            program: program.clone(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(HarnessError::Failed {
            command: format!("{command:?}"),
            status,
        })
    }
}

/// The image's size as the builder's store counts it (uncompressed).
fn image_size(program: &Path, image: &str) -> Option<u64> {
    let out = Command::new(program)
        .args(["image", "inspect", "--format", "{{.Size}}", image])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn file_len(path: &Path) -> Result<u64, HarnessError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| HarnessError::Io {
            action: "stat",
            path: path.to_owned(),
            source,
        })
}

fn mib(bytes: u64) -> String {
    format!("{bytes} B, {:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}

fn say(line: &str) {
    eprintln!("image: {line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_executable_has_no_interpreter_and_a_dynamic_one_has() {
        // This test's own executable is dynamically linked (glibc).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me));
        assert!(has_interpreter(b"#!/bin/sh\n"));
        // A minimal static ELF64 header: no program header is PT_INTERP.
        let mut elf = vec![0u8; 0x40 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[0x40..0x44].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        assert!(!has_interpreter(&elf));
        elf[0x40..0x44].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
        assert!(has_interpreter(&elf));
    }
}
