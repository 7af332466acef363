//! One line from an error and its causes, for logs and start-up failures:
//! the workspace's one helper (`peaqos_logging::error_chain`, which leaves
//! out a cause that the message before already ends with, as sqlx's errors
//! repeat theirs), re-exported where the orchestrator's modules look for it.

pub use peaqos_logging::error_chain;
