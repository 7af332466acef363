//! The agent's integration tests, one binary: the `peaqos-agent` command
//! line (`cli`), the registration loop against the real orchestrator
//! (`e2e`) and against a fake that misbehaves on purpose (`faults`), and a
//! gateway of many machines in one process (`gateway`).

mod support;

mod cli;
mod e2e;
mod faults;
mod gateway;
#[cfg(feature = "pkcs11")]
mod pkcs11;
#[cfg(feature = "pkcs11")]
mod pkcs11_pin;
