//! The command line (clap): the orchestrator takes its settings from the
//! environment and an optional file. In the library so that a test can
//! render the package's man page from it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Serves the peaqOS Machine Markets machines & identity API. Settings come
/// from the environment (`PEAQOS_*`, `DATABASE_URL`; `NAME_FILE` gives
/// `NAME` from a file), over an optional TOML file; once it listens it
/// prints `listening on http://<address>` on stdout.
#[derive(Debug, Parser)]
#[command(
    name = "peaqos-orchestrator",
    version,
    about = "peaqOS orchestrator: machines & identity API"
)]
pub struct Args {
    /// TOML settings file; environment variables override it.
    #[arg(
        long,
        value_name = "FILE",
        env = "PEAQOS_ORCHESTRATOR_CONFIG",
        global = true
    )]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What to do instead of serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Asks the orchestrator these settings describe, on loopback at the
    /// port of PEAQOS_LISTEN_ADDR, for GET /ready; exits 0 when it answers
    /// 200, else 1 (the container image's HEALTHCHECK: it has no shell).
    Healthcheck,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_packaged_man_page_is_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/man");
        peaqos_testkit::man::check_or_write(Args::command(), &dir);
    }
}
