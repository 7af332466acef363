//! `peaqos-agent check`: what `aziotctl check` does for Azure devices. Each
//! check prints one line; a failed one makes the command exit non-zero.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use peaqos_logging::error_chain;
use peaqos_protocol::{Address, Challenge, Timestamp};

use crate::client::Client;
use crate::clock::ServerClock;
use crate::config::{Config, IdentityConfig, machines};
use crate::registration::challenge::{self, ChallengeRefusal, Expected};
use crate::state;

mod key;
mod rotation;

/// How long the broker check may take.
const MQTT_TIMEOUT: Duration = Duration::from_secs(5);

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Fail,
    /// Works, but something needs an operator's attention; does not make
    /// the command fail.
    Warn,
    /// Not run: disabled, or an earlier check it needs failed.
    Skip,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub outcome: Outcome,
    pub name: &'static str,
    pub detail: String,
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.outcome {
            Outcome::Ok => "ok",
            Outcome::Fail => "FAIL",
            Outcome::Warn => "WARN",
            Outcome::Skip => "skip",
        };
        write!(f, "{tag:<5} {:<13} {}", self.name, self.detail)
    }
}

struct Report {
    lines: Vec<CheckLine>,
}

impl Report {
    fn push(&mut self, outcome: Outcome, name: &'static str, detail: impl Into<String>) {
        self.lines.push(CheckLine {
            outcome,
            name,
            detail: detail.into(),
        });
    }
}

/// Runs every check in order and returns the lines; `all_ok` tells whether
/// none failed.
pub async fn run(config_path: &Path) -> Vec<CheckLine> {
    let mut r = Report { lines: Vec::new() };
    let config = match Config::load(config_path) {
        Ok(c) => {
            let extra = c.files.len() - 1;
            r.push(
                Outcome::Ok,
                "config",
                format!(
                    "{}{}",
                    config_path.display(),
                    match extra {
                        0 => String::new(),
                        1 => " (+1 drop-in)".to_owned(),
                        n => format!(" (+{n} drop-ins)"),
                    }
                ),
            );
            c
        }
        Err(e) => {
            r.push(Outcome::Fail, "config", error_chain(&e));
            for name in key::LINES.into_iter().chain([
                "state dir",
                "clock",
                "orchestrator",
                "controller",
                "challenge",
                "mqtt",
            ]) {
                r.push(Outcome::Skip, name, "needs a valid config");
            }
            return r.lines;
        }
    };

    credential_lines(&mut r, &config.credentials_outside_systemd);
    // One clock for every machine; its floor is read from the state
    // directory (build time, or the last server time saved).
    match crate::clock::check_line(&config.state.dir) {
        Ok(line) => r.push(Outcome::Ok, "clock", line),
        Err(line) => r.push(Outcome::Fail, "clock", line),
    }
    if let Some(identity) = &config.identity {
        check_machine(&mut r, &config, identity, &config.state.dir).await;
    }
    check_machine_files(&mut r, &config).await;
    check_mqtt(&mut r, &config).await;
    r.lines
}

fn credential_lines(r: &mut Report, credentials: &[(String, std::path::PathBuf)]) {
    for (configured, path) in credentials {
        // Not under systemd: the unit's LoadCredential= source stands in.
        let directive = if crate::secrets::sealed_name(path).is_some() {
            "LoadCredentialEncrypted="
        } else {
            "LoadCredential="
        };
        r.push(
            Outcome::Ok,
            "credential",
            format!(
                "{configured}: {} (the unit's {directive} source; $CREDENTIALS_DIRECTORY is not set)",
                path.display()
            ),
        );
    }
}

/// One machine's lines: its key, state directory, and what the
/// orchestrator says about its identity and our key.
async fn check_machine(r: &mut Report, config: &Config, identity: &IdentityConfig, state: &Path) {
    let record = rotation::record(state);
    let key = match record.as_ref().filter(|rec| rec.current.is_some()) {
        Some(rec) => rotation::check_promoted(r, identity, &config.state.dir, rec),
        None => key::check_key(r, identity, &config.state.dir),
    };
    if let Some(rec) = &record {
        rotation::check_steps(r, identity, rec);
    }
    check_state_dir(r, state);
    check_orchestrator(r, config, identity, key).await;
}

/// Every file of the machines directory, each line of a machine named
/// with its machine and the problems with its file.
async fn check_machine_files(r: &mut Report, config: &Config) {
    let entries = match machines::read_all(config) {
        Ok(entries) => entries,
        Err(e) => {
            r.push(Outcome::Fail, "machines", error_chain(&e));
            return;
        }
    };
    if entries.is_empty() {
        return;
    }
    r.push(
        Outcome::Ok,
        "machines",
        format!(
            "{}: {} machine file{}",
            config.machines_dir.display(),
            entries.len(),
            if entries.len() == 1 { "" } else { "s" }
        ),
    );
    for entry in entries {
        let from = r.lines.len();
        match &entry.spec {
            Err(e) => r.push(Outcome::Fail, "machine", error_chain(e)),
            Ok(spec) => {
                r.push(Outcome::Ok, "machine", entry.path.display().to_string());
                credential_lines(r, &spec.credentials_outside_systemd);
                check_machine(r, config, &spec.identity, &spec.state_dir).await;
            }
        }
        for line in &mut r.lines[from..] {
            line.detail = format!("[{}] {}", entry.name, line.detail);
        }
    }
}

/// Whether no line failed.
pub fn all_ok(lines: &[CheckLine]) -> bool {
    lines.iter().all(|l| l.outcome != Outcome::Fail)
}

fn check_state_dir(r: &mut Report, dir: &Path) {
    if !dir.exists() {
        r.push(
            Outcome::Ok,
            "state dir",
            format!(
                "{}: does not exist yet; created at first save",
                dir.display()
            ),
        );
        return;
    }
    match state::probe_writable(dir) {
        Ok(()) => r.push(
            Outcome::Ok,
            "state dir",
            format!("{}: writable", dir.display()),
        ),
        Err(e) => r.push(
            Outcome::Fail,
            "state dir",
            format!("{}: not writable: {e}", dir.display()),
        ),
    }
}

async fn check_orchestrator(
    r: &mut Report,
    config: &Config,
    identity: &IdentityConfig,
    key: Option<Address>,
) {
    let policy = config.orchestrator.effective_policy();
    let client = match Client::new(&config.orchestrator) {
        Ok(c) => c,
        Err(e) => {
            r.push(Outcome::Fail, "orchestrator", error_chain(&e));
            r.push(Outcome::Skip, "controller", "needs the orchestrator");
            r.push(
                Outcome::Skip,
                "challenge",
                format!("policy {policy}; needs the orchestrator"),
            );
            return;
        }
    };
    // The contract promises the API, not a health endpoint: reachability is
    // the challenge request itself (which registers nothing and is what the
    // agent needs anyway); health, when served, is extra information.
    let identity_config = identity;
    let identity = &identity.identity_ref;
    let started = Instant::now();
    let response = match client.create_challenge(identity).await {
        Ok(c) => c,
        Err(e) => {
            r.push(
                Outcome::Fail,
                "orchestrator",
                format!(
                    "{}: challenge for {identity}: {}",
                    client.base(),
                    error_chain(&e)
                ),
            );
            r.push(Outcome::Skip, "controller", "needs the orchestrator");
            r.push(
                Outcome::Skip,
                "challenge",
                format!("policy {policy}; needs the orchestrator"),
            );
            return;
        }
    };
    let elapsed = started.elapsed();
    let mut clock = ServerClock::new();
    let received = response.received;
    if let Some(date) = received.date {
        clock.observe_date(date, received.at, received.local);
    }
    let challenge = response.value;
    let skew = clock.skew_ms().map_or_else(
        || ", no Date header".to_owned(),
        |ms| {
            let off = ms.unsigned_abs() > crate::clock::CLOCK_SKEW_BOUND.as_secs() * 1000;
            let flag = if off {
                " (CLOCK: this machine's clock is off; fix NTP)"
            } else {
                ""
            };
            format!(", clock skew {}{flag}", format_skew(ms))
        },
    );
    let health = match client.health().await {
        Ok(_) => "; health ok",
        Err(_) => "",
    };
    r.push(
        Outcome::Ok,
        "orchestrator",
        format!(
            "{}: answered a challenge request ({} ms{skew}){health}",
            client.base(),
            elapsed.as_millis()
        ),
    );
    let server_now = clock.server_now();
    check_challenge(
        r,
        config,
        identity_config,
        key,
        &challenge,
        server_now,
        client.base(),
    );
}

/// Whether our key is a controller, and whether the policy in effect would
/// sign this challenge (nothing is signed).
fn check_challenge(
    r: &mut Report,
    config: &Config,
    identity: &IdentityConfig,
    key: Option<Address>,
    challenge: &Challenge,
    server_now: Option<Timestamp>,
    base: &str,
) {
    let policy = config.orchestrator.effective_policy();
    let identity = &identity.identity_ref;
    let controllers = list(&challenge.controller_addresses);
    let Some(key) = key else {
        r.push(
            Outcome::Skip,
            "controller",
            format!("{identity} controllers: {controllers}; no usable key to compare"),
        );
        r.push(
            Outcome::Skip,
            "challenge",
            format!("policy {policy}; no usable key"),
        );
        return;
    };
    let ours = key.checksummed();
    if challenge.controller_addresses.contains(&key) {
        r.push(
            Outcome::Ok,
            "controller",
            format!("{identity}: our address {ours} is among the controllers ({controllers})"),
        );
    } else {
        r.push(
            Outcome::Fail,
            "controller",
            format!(
                "{identity}: our address {ours} is NOT among the controllers ({controllers}); \
                 add it to the identity's controller record"
            ),
        );
    }
    let host = challenge::authority(base);
    let expected = Expected {
        identity,
        ours: key,
        host: &host,
        server_now,
        local_now: crate::clock::sane_now(),
    };
    let id = &challenge.challenge_id;
    match challenge::vet(policy.policy, challenge, &expected) {
        Ok(_) => r.push(
            Outcome::Ok,
            "challenge",
            format!("policy {policy} would sign challenge {id} (check signs nothing)"),
        ),
        Err(ChallengeRefusal::NotController { .. }) => r.push(
            Outcome::Ok,
            "challenge",
            format!(
                "policy {policy} accepts challenge {id}; it is signed once our key is a \
                 controller (check signs nothing)"
            ),
        ),
        Err(refusal) => r.push(
            Outcome::Fail,
            "challenge",
            format!("policy {policy} would not sign challenge {id}: {refusal}"),
        ),
    }
}

async fn check_mqtt(r: &mut Report, config: &Config) {
    if !config.mqtt.enabled {
        r.push(Outcome::Skip, "mqtt", "disabled in config");
        return;
    }
    match crate::mqtt::check_broker(&config.mqtt, MQTT_TIMEOUT).await {
        Ok(detail) => r.push(Outcome::Ok, "mqtt", detail),
        Err(e) => r.push(Outcome::Fail, "mqtt", error_chain(&e)),
    }
}

fn list(addresses: &[Address]) -> String {
    if addresses.is_empty() {
        return "none".to_owned();
    }
    addresses
        .iter()
        .map(Address::checksummed)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `+1.250 s` / `-0.003 s`.
pub fn format_skew(ms: i64) -> String {
    let sign = if ms < 0 { '-' } else { '+' };
    let abs = ms.unsigned_abs();
    format!("{sign}{}.{:03} s", abs / 1000, abs % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_aligned_and_tagged() {
        let line = CheckLine {
            outcome: Outcome::Fail,
            name: "key file",
            detail: "x".into(),
        };
        assert_eq!(line.to_string(), "FAIL  key file      x");
        assert!(!all_ok(&[line]));
        assert_eq!(format_skew(-3), "-0.003 s");
        assert_eq!(format_skew(1250), "+1.250 s");
    }
}
