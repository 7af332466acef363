//! The agent's build time, the first floor under its wall clock
//! (src/clock.rs): a board that boots in 1970 is known to be wrong. Taken
//! from `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.
//!
//! And, for the shipped build (`--profile minsize`, the only one at
//! opt-level "z") on x86-64 Linux with glibc: packed relative relocations
//! (`-z pack-relative-relocs`, DT_RELR). A position-independent executable
//! carries one 24-byte relocation for each pointer in its read-only data
//! (vtables, static strings in tables); packed, they take a few KB instead
//! of about 180 KB, on disk and in the pages read at start. The code is
//! unchanged; the loader must know DT_RELR: glibc 2.36 or later (Debian 12
//! and later; the package's libc6 dependency says so). Debian 12's ARM
//! cross linkers ignore the option, so boards are linked as before.

use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=PEAQOS_BUILD_TIME={secs}");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("OPT_LEVEL") == "z"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
    {
        println!("cargo:rustc-link-arg=-Wl,-z,pack-relative-relocs");
    }
}
