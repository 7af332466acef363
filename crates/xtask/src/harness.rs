//! What `cargo xtask demo`, `footprint` and `arm` share: building with
//! cargo and finding the executables in its report, a locked working
//! directory, child processes in process groups of their own (stopped on
//! every way out), the orchestrator on port 0, an MQTT broker, the agent's
//! one-shot commands (natively or under qemu-user), and one stream of
//! events (signals, the agent's published status).

pub(crate) mod agent;
pub(crate) mod agent_config;
pub(crate) mod broker;
pub(crate) mod cargo;
mod error;
pub(crate) mod events;
pub(crate) mod log;
pub(crate) mod orchestrator;
pub(crate) mod process;
pub(crate) mod workdir;

pub(crate) use self::error::HarnessError;

/// The last `lines` lines of a log, to stderr.
pub(crate) fn print_tail(path: &std::path::Path, lines: usize) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let all: Vec<&str> = text.lines().collect();
    eprintln!("--- last lines of {}:", path.display());
    for line in &all[all.len().saturating_sub(lines)..] {
        eprintln!("{line}");
    }
}
