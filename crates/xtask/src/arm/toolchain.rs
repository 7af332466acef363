//! What cross-building and emulating each board needs on this machine, and
//! a clear list of what is missing: `.ci/install-tools` installs all of it
//! (its `APT_PACKAGES` is the list of Debian packages).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use peaqos_testkit::find_program;

/// A board architecture the agent ships for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Board {
    /// The Rust target.
    pub(crate) target: &'static str,
    /// Debian's name for the architecture (the package's `_<arch>.deb`).
    pub(crate) deb_arch: &'static str,
    /// Short name for files and topics.
    pub(crate) short: &'static str,
    /// The cross C compiler, also the linker (.cargo/config.toml).
    gcc: &'static str,
    gcc_package: &'static str,
    /// The target's C library (`-L` for qemu-user) and its package.
    sysroot: &'static str,
    libc_package: &'static str,
    qemu: &'static str,
}

pub(crate) const BOARDS: [Board; 2] = [
    Board {
        target: "aarch64-unknown-linux-gnu",
        deb_arch: "arm64",
        short: "aarch64",
        gcc: "aarch64-linux-gnu-gcc",
        gcc_package: "gcc-aarch64-linux-gnu",
        sysroot: "/usr/aarch64-linux-gnu",
        libc_package: "libc6-dev-arm64-cross",
        qemu: "qemu-aarch64",
    },
    Board {
        target: "armv7-unknown-linux-gnueabihf",
        deb_arch: "armhf",
        short: "armv7",
        gcc: "arm-linux-gnueabihf-gcc",
        gcc_package: "gcc-arm-linux-gnueabihf",
        sysroot: "/usr/arm-linux-gnueabihf",
        libc_package: "libc6-dev-armhf-cross",
        qemu: "qemu-arm",
    },
];

impl Board {
    pub(crate) fn by_target(target: &str) -> Option<Self> {
        BOARDS.iter().copied().find(|b| b.target == target)
    }

    pub(crate) fn sysroot(&self) -> &Path {
        Path::new(self.sysroot)
    }
}

/// The programs a run uses, once found.
#[derive(Debug)]
pub(crate) struct Tools {
    /// `qemu-<arch>` per board, in the order asked for.
    pub(crate) qemu: Vec<PathBuf>,
}

/// Finds what cross-building `boards` (and with `debs`, packaging and
/// linting) needs; an error lists everything missing at once.
pub(crate) fn find(boards: &[Board], debs: bool) -> Result<Tools, Vec<String>> {
    let mut missing = Vec::new();
    let mut qemu = Vec::new();
    let installed_targets = rust_targets();
    for board in boards {
        if !installed_targets.iter().any(|t| t == board.target) {
            missing.push(format!(
                "the Rust target {} (rustup target add {})",
                board.target, board.target
            ));
        }
        if find_program(board.gcc).is_none() {
            missing.push(format!("{} (apt: {})", board.gcc, board.gcc_package));
        }
        let loader = board.sysroot().join("lib");
        if !loader.is_dir() {
            missing.push(format!(
                "the {} C library in {} (apt: {})",
                board.short, board.sysroot, board.libc_package
            ));
        }
        match find_program(board.qemu) {
            Some(path) => qemu.push(path),
            None => missing.push(format!("{} (apt: qemu-user)", board.qemu)),
        }
    }
    if debs {
        if find_program("lintian").is_none() {
            missing.push("lintian (apt: lintian)".to_owned());
        }
        if find_program("dpkg-deb").is_none() {
            missing.push("dpkg-deb (apt: dpkg)".to_owned());
        }
        let cargo_deb = crate::cargo()
            .args(["deb", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !cargo_deb {
            missing.push("cargo-deb (cargo install --locked cargo-deb@3.8.0)".to_owned());
        }
        // The packaged executables must carry their dependency list.
        if !crate::harness::cargo::auditable_installed() {
            missing
                .push("cargo-auditable (cargo install --locked cargo-auditable@0.7.7)".to_owned());
        }
        if find_program("readelf").is_none() {
            missing.push("readelf (apt: binutils)".to_owned());
        }
    }
    if missing.is_empty() {
        Ok(Tools { qemu })
    } else {
        Err(missing)
    }
}

/// The Rust targets whose standard library is installed: the directories
/// in `<sysroot>/lib/rustlib/` (what `rustup target add` adds), so that a
/// toolchain not managed by rustup is judged the same way.
fn rust_targets() -> Vec<String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(output) = Command::new(rustc)
        .args(["--print", "sysroot"])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    std::fs::read_dir(sysroot.join("lib/rustlib"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().join("lib").is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boards_are_found_by_their_rust_target() {
        let arm64 = Board::by_target("aarch64-unknown-linux-gnu").unwrap();
        assert_eq!((arm64.deb_arch, arm64.qemu), ("arm64", "qemu-aarch64"));
        let armhf = Board::by_target("armv7-unknown-linux-gnueabihf").unwrap();
        assert_eq!((armhf.deb_arch, armhf.qemu), ("armhf", "qemu-arm"));
        assert_eq!(Board::by_target("riscv64gc-unknown-linux-gnu"), None);
    }

    #[test]
    fn the_linkers_are_the_ones_cargo_is_configured_with() {
        let config =
            std::fs::read_to_string(crate::workspace_root().join(".cargo/config.toml")).unwrap();
        for board in BOARDS {
            let section = format!("[target.{}]\nlinker = \"{}\"", board.target, board.gcc);
            assert!(config.contains(&section), "{section} in .cargo/config.toml");
        }
    }

    #[test]
    fn the_packages_named_here_are_the_ones_ci_installs() {
        let install =
            std::fs::read_to_string(crate::workspace_root().join(".ci/install-tools")).unwrap();
        for board in BOARDS {
            for package in [board.gcc_package, board.libc_package] {
                assert!(install.contains(package), "{package} in .ci/install-tools");
            }
            assert!(
                install.contains(board.target),
                "{} in .ci/install-tools",
                board.target
            );
        }
        assert!(install.contains("qemu-user") && install.contains("lintian"));
    }
}
