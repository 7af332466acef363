//! The agent's integration tests, one binary: the `peaqos-agent` command
//! line (`cli`), the registration loop against the real orchestrator
//! (`e2e`) and against a fake that misbehaves on purpose (`faults`), and a
//! gateway of many machines in one process (`gateway`; through MQTT with
//! 200 machines, some keys on a token: `gateway_mqtt`), and keys sealed
//! at rest as systemd credentials (`sealed`).

mod support;

mod cli;
mod console;
mod e2e;
mod faults;
mod gateway;
#[cfg(feature = "pkcs11")]
mod gateway_mqtt;
#[cfg(feature = "pkcs11")]
mod pkcs11;
#[cfg(feature = "pkcs11")]
mod pkcs11_pin;
mod rotation;
mod sealed;
