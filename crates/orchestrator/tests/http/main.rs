//! The orchestrator over real HTTP: the server runs in this process on
//! 127.0.0.1:0 and is driven with reqwest, the Python SDK, and fakes of the
//! MCR API.

// Tests read best with the short names they use throughout: s(erver),
// k(ey), c(hallenge), m(achine), r(esponse), e(rror).
#![allow(clippy::many_single_char_names)]

mod support;

#[path = "../common/pg.rs"]
mod pg;

mod abuse;
mod audit;
mod binary;
mod cli;
mod concurrency;
mod connections;
mod console;
mod contract;
mod deploy;
mod docs;
mod exactly_once;
mod lifetime;
mod mcr;
mod outage;
mod replicas;
mod row_cache;
mod schema;
mod sdk;
mod streams;
