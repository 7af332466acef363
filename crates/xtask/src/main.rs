//! `cargo xtask <task>`: project tasks that need more than one cargo call.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod arm;
mod demo;
mod footprint;
mod harness;
mod image;
mod man;
mod test;

const USAGE: &str = "usage: cargo xtask <task>\n\n\
    tasks:\n  \
    demo [OPTIONS] orchestrator + MQTT broker + agent on this machine, until Ctrl-C\n                 \
    (--help for the options)\n  \
    footprint [--idle 60s] [--runs 5]\n                 \
    the agent's size, memory, idle CPU and start-up time against a\n                 \
    baseline, as a markdown table (minutes; Linux only: reads /proc)\n  \
    arm [--debs]   cross-build the minsize agent for aarch64 and armv7, run each\n                 \
    under qemu-user to `active` against the x86-64 orchestrator; --debs\n                 \
    also makes every Debian package from those builds and lints them\n  \
    image [--tag T]\n                 \
    the orchestrator's container image with podman or buildah: FROM\n                 \
    scratch, offline, the static (musl) binary, a non-root user\n  \
    man            rewrite packaging/man/*.1 from the command lines (clap)\n  \
    test [ARGS]    run the whole test suite (cargo test --workspace ARGS), saying\n                 \
    which real servers it used; PEAQOS_TEST_REQUIRE=mosquitto,postgres,python\n                 \
    makes a missing one a failure";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    let result: Result<(), Box<dyn std::error::Error>> = match task.as_deref() {
        Some("test") => test::run(&rest).map_err(Into::into),
        Some("demo") => demo::run(&rest).map_err(Into::into),
        Some("footprint") => footprint::run(&rest).map_err(Into::into),
        Some("arm") => arm::run(&rest).map_err(Into::into),
        Some("image") => image::run(&rest).map_err(Into::into),
        Some("man") => man::run(&rest).map_err(Into::into),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain in one line: "what: why: detail".
            let mut text = e.to_string();
            let mut source = e.source();
            while let Some(cause) = source {
                let _ = write!(text, ": {cause}");
                source = cause.source();
            }
            eprintln!("xtask: {text}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `cargo xtask <task> <args>` again from an xtask built with the
/// embedded MQTT broker (`cargo run -p xtask --features embedded-broker`),
/// in place of this process: its output, exit status and signals are the
/// task's own. Returns only when that cannot start.
#[cfg(not(feature = "embedded-broker"))]
pub(crate) fn with_embedded_broker(task: &str, args: &[String]) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    /// Set for the xtask started here, so that a build that still lacks
    /// the broker fails instead of looping.
    const REEXEC_ENV: &str = "PEAQOS_XTASK_EMBEDDED_BROKER";
    if std::env::var_os(REEXEC_ENV).is_some() {
        return std::io::Error::other("xtask was rebuilt without its embedded broker");
    }
    eprintln!(
        "xtask: {task} needs the embedded MQTT broker; building xtask with it \
         (cargo feature embedded-broker, once)"
    );
    cargo()
        .args([
            "run",
            "--package",
            "xtask",
            "--features",
            "embedded-broker",
            "--",
        ])
        .arg(task)
        .args(args)
        .current_dir(workspace_root())
        .env(REEXEC_ENV, "1")
        .exec()
}

/// The workspace root (this crate is `crates/xtask`).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/xtask lies two levels below the workspace root")
        .to_path_buf()
}

/// The cargo that runs us (`$CARGO`), without the variables cargo set for
/// us as a crate (`CARGO_PKG_NAME=xtask` ...). Build scripts such as ring's
/// list some of them in `rerun-if-env-changed`; inherited, they would make
/// every nested build rebuild those crates, and the next build from a shell
/// rebuild them again.
pub(crate) fn cargo() -> Command {
    const SET_FOR_US: [&str; 5] = [
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let ours = name.to_str().is_some_and(|n| {
            ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"]
                .iter()
                .any(|prefix| n.starts_with(prefix))
                || SET_FOR_US.contains(&n)
        });
        if ours {
            command.env_remove(name);
        }
    }
    command
}
