//! The agent's MQTT interface, one binary: the interface observed by
//! independent clients (`interface`), the broker-side protections
//! (`security`) and the real binary's last will (`will`).

mod support;

mod interface;
mod poison;
mod security;
mod will;
