//! The agent's integration tests, one binary: the `peaqos-agent` command
//! line (`cli`), the registration loop against the real orchestrator
//! (`e2e`) and against a fake that misbehaves on purpose (`faults`).

mod support;

mod cli;
mod console;
mod e2e;
mod faults;
#[cfg(feature = "pkcs11")]
mod pkcs11;
