//! The agent's build time, the first floor under its wall clock
//! (src/clock.rs): a board that boots in 1970 is known to be wrong. Taken
//! from `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.

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
}
