//! What the machines of one agent share: one HTTP client (one connection
//! pool) to the orchestrator, its signing policy, the renewal settings, the
//! pacing of their loops (one readiness probe, a bound on cycles in
//! flight), the watchdog's set of heartbeats, and the bound on keys being
//! opened at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::client::{Client, ClientBuildError};
use crate::config::{Config, RenewalConfig};
use crate::registration::Pacing;
use crate::registration::challenge::EffectivePolicy;
use crate::systemd::Heartbeats;

/// How many keys are opened at once (a keystore's scrypt, a token's login):
/// enough to start a large gateway quickly, few enough for a small board.
const CONCURRENT_OPENS: usize = 4;
/// A gateway's starts are spread over this long per machine, up to
/// [`MAX_START_SPREAD`]: 1,000 machines start over 10 s, not at once.
const START_SPREAD_PER_MACHINE: Duration = Duration::from_millis(10);
const MAX_START_SPREAD: Duration = Duration::from_secs(30);

/// Everything machines share. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Shared {
    pub client: Client,
    pub policy: EffectivePolicy,
    pub renewal: RenewalConfig,
    pub pacing: Pacing,
    pub heartbeats: Heartbeats,
    pub opens: Arc<Semaphore>,
    pub boot_id: String,
    /// `[state] dir`: where what the machines share is recorded (a PIN
    /// their token refused).
    pub state_root: Arc<std::path::Path>,
}

impl Shared {
    pub fn new(config: &Config) -> Result<Self, ClientBuildError> {
        Ok(Self {
            client: Client::new(&config.orchestrator)?,
            policy: config.orchestrator.effective_policy(),
            renewal: config.renewal.clone(),
            pacing: Pacing::new(&config.renewal),
            heartbeats: Heartbeats::default(),
            opens: Arc::new(Semaphore::new(CONCURRENT_OPENS)),
            boot_id: boot_id(),
            state_root: Arc::from(config.state.dir.as_path()),
        })
    }
}

/// How long to wait before a machine's first cycle when `count` machines
/// start together: none for one machine (a robot starts at once), else a
/// random point in a window that grows with the count.
pub fn start_delay(count: usize) -> Duration {
    if count <= 1 {
        return Duration::ZERO;
    }
    let window = START_SPREAD_PER_MACHINE
        .saturating_mul(u32::try_from(count).unwrap_or(u32::MAX))
        .min(MAX_START_SPREAD);
    window.mul_f64(crate::backoff::random_fraction())
}

/// `/proc/sys/kernel/random/boot_id`, which changes on every boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_machine_starts_at_once_and_many_are_spread_within_a_bound() {
        assert_eq!(start_delay(1), Duration::ZERO);
        assert!(start_delay(20) <= Duration::from_millis(200));
        assert!(start_delay(100_000) <= MAX_START_SPREAD);
        // Not all the same: 50 draws of a 10 s window.
        let draws: std::collections::BTreeSet<_> = (0..50).map(|_| start_delay(1000)).collect();
        assert!(draws.len() > 40, "{draws:?}");
    }
}
