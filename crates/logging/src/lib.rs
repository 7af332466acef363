//! Logging set-up shared by `peaqos-agent` and `peaqos-orchestrator`.
//!
//! Under systemd, where stderr is connected to the journal, events go to
//! journald through `systemd-journal-logger` with their fields as journal
//! fields (`STATE=`, `MACHINE_ID=`, `ERROR_CODE=` ...; see
//! [`JournalLayer`]). Anywhere else they are written to stderr in a
//! human-readable format. Records from the `log` crate (used by rustls and
//! rumqttc) take the same path.

mod fields;
mod journal;

use std::io::IsTerminal;
use std::str::FromStr;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

pub use fields::error_chain;
pub use journal::JournalLayer;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter {filter:?} (expected e.g. `info` or `warn,peaqos_agent=debug`)")]
    Filter { filter: String },
    #[error("a global logger is already installed")]
    AlreadyInstalled,
    #[error("cannot connect to journald at /run/systemd/journal/socket")]
    Journal { source: std::io::Error },
}

/// Where log events go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Output {
    /// The journal when stderr is connected to it (`$JOURNAL_STREAM`
    /// names stderr's device and inode, as systemd sets it for services),
    /// otherwise stderr.
    #[default]
    Auto,
    /// The journal, with structured fields.
    Journal,
    /// Human-readable lines on stderr.
    Stderr,
}

/// Settings for [`init_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    /// The filter from the config file (e.g. `info` or
    /// `warn,peaqos_agent=debug`); `RUST_LOG` wins over it.
    pub level: Option<&'a str>,
    pub output: Output,
}

/// Installs the global subscriber, choosing the journal or stderr by
/// itself. `RUST_LOG` wins over `level` (from the config file), which wins
/// over `info`.
pub fn init(level: Option<&str>) -> Result<(), LogError> {
    init_with(&Options {
        level,
        output: Output::Auto,
    })
    .map(drop)
}

/// Installs the global subscriber and returns the output it chose
/// ([`Output::Journal`] or [`Output::Stderr`]).
///
/// With [`Output::Auto`], a journal that cannot be reached (its socket is
/// missing in a container) falls back to stderr with a warning; with
/// [`Output::Journal`] that is an error.
pub fn init_with(options: &Options<'_>) -> Result<Output, LogError> {
    let filter = filter(options.level)?;
    let max_level =
        <Targets as tracing_subscriber::Layer<tracing_subscriber::Registry>>::max_level_hint(
            &filter,
        )
        .unwrap_or(LevelFilter::TRACE);

    let want_journal = match options.output {
        Output::Auto => systemd_journal_logger::connected_to_journal(),
        Output::Journal => true,
        Output::Stderr => false,
    };
    let mut journal_error = None;
    let journal = if want_journal {
        match systemd_journal_logger::JournalLog::new() {
            Ok(sink) => Some(sink),
            Err(source) if options.output == Output::Journal => {
                return Err(LogError::Journal { source });
            }
            Err(source) => {
                journal_error = Some(source);
                None
            }
        }
    } else {
        None
    };

    let chosen = if let Some(sink) = journal {
        tracing_subscriber::registry()
            .with(JournalLayer::new(sink).with_filter(filter))
            .try_init()
            .map_err(|_| LogError::AlreadyInstalled)?;
        Output::Journal
    } else {
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter),
            )
            .try_init()
            .map_err(|_| LogError::AlreadyInstalled)?;
        Output::Stderr
    };
    // `try_init` bridged the `log` crate at TRACE; lower the bridge to what
    // the filter can let through, so that dependencies' disabled debug
    // records cost one comparison.
    log::set_max_level(log_level_filter(max_level));
    if let Some(error) = journal_error {
        tracing::warn!(%error, "stderr looks like the journal, but journald is not reachable; logging to stderr");
    }
    Ok(chosen)
}

fn filter(level: Option<&str>) -> Result<Targets, LogError> {
    let filter_text = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| level.map(str::to_owned))
        .unwrap_or_else(|| "info".to_owned());
    Targets::from_str(&filter_text).map_err(|_| LogError::Filter {
        filter: filter_text,
    })
}

fn log_level_filter(level: LevelFilter) -> log::LevelFilter {
    match level.into_level() {
        None => log::LevelFilter::Off,
        Some(tracing::Level::ERROR) => log::LevelFilter::Error,
        Some(tracing::Level::WARN) => log::LevelFilter::Warn,
        Some(tracing::Level::INFO) => log::LevelFilter::Info,
        Some(tracing::Level::DEBUG) => log::LevelFilter::Debug,
        Some(tracing::Level::TRACE) => log::LevelFilter::Trace,
    }
}
