//! The agent's MQTT interface, one binary: the interface observed by
//! independent clients (`interface`), the broker-side protections
//! (`security`), the real binary's last will (`will`), and a gateway's
//! many machines on one connection (`gateway`, driven through `host`).

mod host;
mod support;

mod gateway;
mod interface;
mod poison;
mod security;
mod will;
