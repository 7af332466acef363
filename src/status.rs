//! What the agent is doing, as one snapshot that the registration loop
//! publishes and the local interfaces (MQTT, systemd STATUS=, `check`) read.
//!
//! The registration loop owns a `tokio::sync::watch::Sender<StatusSnapshot>`;
//! readers hold receivers and never block it: a slow reader only ever sees
//! the newest snapshot.

use peaqos_protocol::{ErrorCode, MachineStatus, Timestamp};
use serde::Serialize;

/// The registration loop's states. These names are part of the MQTT status
/// contract (`state` field), so renaming one is a breaking change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Loading config and key, before the first request.
    Starting,
    /// No machine record known: asking for a challenge, creating the record.
    Registering,
    /// A record exists (new, taken back, or degraded): submitting a proof
    /// with `status: active`.
    Activating,
    /// The record is active and its proof is not near expiry.
    Active,
    /// Active, and proactively replacing a proof that nears its expiry.
    Renewing,
    /// Waiting before retrying after a transient failure (orchestrator
    /// unreachable, 5xx, 429, identity source unavailable).
    Backoff,
    /// Our key is not among the identity's controllers: retried slowly,
    /// because an operator may fix the controller record.
    NotController,
    /// The signing policy refused the orchestrator's challenge (lastError
    /// `BAD_CHALLENGE` says which rule): retried slowly, because only an
    /// operator can change the policy or the orchestrator.
    ChallengeRefused,
    /// The controller key's PKCS#11 token does not answer or refuses to
    /// sign (lastError `KEY_UNAVAILABLE` says why): looked for again with
    /// backoff, or every `slow_retry` when an operator must act. The agent
    /// never signs with another key meanwhile.
    KeyUnavailable,
    /// A gateway's machine file cannot be used (lastError `CONFIG` names
    /// the file and the problem): the machine has no loop until the file
    /// is fixed and the agent reloaded; the others carry on.
    ConfigError,
    /// An operator blocked the record; reported, not fought.
    Blocked,
    /// An operator archived the record; reported, not fought.
    Archived,
    /// Shutting down.
    Stopping,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Registering => "registering",
            Self::Activating => "activating",
            Self::Active => "active",
            Self::Renewing => "renewing",
            Self::Backoff => "backoff",
            Self::NotController => "not_controller",
            Self::ChallengeRefused => "challenge_refused",
            Self::KeyUnavailable => "key_unavailable",
            Self::ConfigError => "config_error",
            Self::Blocked => "blocked",
            Self::Archived => "archived",
            Self::Stopping => "stopping",
        }
    }
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last error the loop met, as reported to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    /// The orchestrator's error code, or a local one such as `NETWORK`,
    /// `TIMEOUT`, `BAD_RESPONSE`.
    pub code: String,
    pub message: String,
    pub at: Timestamp,
}

impl LastError {
    pub fn from_code(code: &ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.as_str().to_owned(),
            message: message.into(),
            at: Timestamp::now(),
        }
    }
}

/// Everything the status interfaces publish. Serialised as the MQTT
/// `<prefix>/status` payload (see docs/mqtt.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusSnapshot {
    /// Payload schema version; bumped on any incompatible change.
    pub schema: u32,
    pub state: AgentState,
    pub machine_id: Option<String>,
    /// Canonical identity reference.
    pub identity: String,
    /// Our controller address (EIP-55).
    pub controller_address: String,
    /// A successor key's address while it waits to become a controller
    /// (key rotation): what the owner makes a controller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_controller_address: Option<String>,
    /// The record's status as the orchestrator last reported it.
    pub record_status: Option<MachineStatus>,
    pub proof_verified_at: Option<Timestamp>,
    pub proof_expires_at: Option<Timestamp>,
    pub last_error: Option<LastError>,
    pub next_attempt_at: Option<Timestamp>,
    /// Server clock minus local clock, in milliseconds, as last measured.
    pub clock_skew_ms: Option<i64>,
    pub agent_version: &'static str,
    /// `/proc/sys/kernel/random/boot_id`: tells readers the machine rebooted.
    pub boot_id: String,
    /// Increases with every published change, per process lifetime.
    pub seq: u64,
    /// When this snapshot was made (local clock).
    pub timestamp: Timestamp,
}

/// Current payload schema version.
pub const STATUS_SCHEMA: u32 = 1;

impl StatusSnapshot {
    pub fn new(identity: String, controller_address: String, boot_id: String) -> Self {
        Self {
            schema: STATUS_SCHEMA,
            state: AgentState::Starting,
            machine_id: None,
            identity,
            controller_address,
            next_controller_address: None,
            record_status: None,
            proof_verified_at: None,
            proof_expires_at: None,
            last_error: None,
            next_attempt_at: None,
            clock_skew_ms: None,
            agent_version: env!("CARGO_PKG_VERSION"),
            boot_id,
            seq: 0,
            timestamp: Timestamp::now(),
        }
    }
}

/// What became of the status queries received over MQTT since the agent
/// started, so that a dashboard can tell a rate limit from a dead agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryCounters {
    pub answered: u64,
    /// Malformed, retained, oversized or with a reply topic outside the
    /// prefix: never answered.
    pub refused: u64,
    /// Over the rate limit (`[mqtt] query_burst`, `query_rate`): dropped.
    pub rate_limited: u64,
    /// Valid, but the reply could not be queued (broker gone or slow).
    pub dropped: u64,
}

/// The MQTT status payload: the snapshot, plus the MQTT interface's own
/// counters. `seq` numbers the snapshot; the counters are not part of it
/// (they change with every query, and ride along whenever the status is
/// published).
#[derive(Debug, Serialize)]
pub struct StatusPayload<'a> {
    #[serde(flatten)]
    pub snapshot: &'a StatusSnapshot,
    pub queries: QueryCounters,
}

/// The one-line summary for systemd's `STATUS=` and the log.
pub fn status_line(s: &StatusSnapshot) -> String {
    use std::fmt::Write as _;
    let mut line = format!("{}", s.state);
    if let Some(id) = &s.machine_id {
        let _ = write!(line, " machine {id}");
    }
    if let (
        Some(e),
        AgentState::Backoff
        | AgentState::NotController
        | AgentState::ChallengeRefused
        | AgentState::KeyUnavailable
        | AgentState::ConfigError,
    ) = (&s.last_error, s.state)
    {
        let _ = write!(line, " ({})", e.code);
    }
    line
}

/// How many machine names a [`summary_line`] lists per state.
const SUMMARY_NAMES: usize = 3;

/// The one-line summary of a gateway's machines for systemd's `STATUS=`,
/// e.g. `40 machines: 39 active, 1 not_controller (dock-7)`: a count per
/// state, `active` first, and the names of those that need a look.
pub fn summary_line<'a>(machines: impl IntoIterator<Item = (&'a str, AgentState)>) -> String {
    use std::fmt::Write as _;
    let mut by_state: Vec<(AgentState, Vec<&str>)> = Vec::new();
    let mut total = 0;
    for (name, machine_state) in machines {
        total += 1;
        match by_state
            .iter_mut()
            .find(|(state, _)| *state == machine_state)
        {
            Some((_, names)) => names.push(name),
            None => by_state.push((machine_state, vec![name])),
        }
    }
    // `active` first, then the others in the order of the enum.
    by_state.sort_by_key(|(state, _)| (*state != AgentState::Active, *state as u8));
    let mut line = format!("{total} machine{}", if total == 1 { "" } else { "s" });
    for (i, (state, names)) in by_state.iter().enumerate() {
        let _ = write!(
            line,
            "{}{} {state}",
            if i == 0 { ": " } else { ", " },
            names.len()
        );
        let needs_a_look = matches!(
            state,
            AgentState::Backoff
                | AgentState::NotController
                | AgentState::ChallengeRefused
                | AgentState::KeyUnavailable
                | AgentState::ConfigError
                | AgentState::Blocked
                | AgentState::Archived
        );
        if needs_a_look {
            let shown: Vec<&str> = names.iter().take(SUMMARY_NAMES).copied().collect();
            let more = names.len().saturating_sub(SUMMARY_NAMES);
            let _ = write!(line, " ({}", shown.join(", "));
            if more > 0 {
                let _ = write!(line, ", +{more} more");
            }
            line.push(')');
        }
    }
    line
}

/// Requests from local interfaces to the registration loop.
#[derive(Debug)]
pub enum Command {
    /// Renew the identity proof now (MQTT `command/reregister`). The loop
    /// answers on `reply` once the renewal has succeeded or failed.
    Reregister {
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Make a successor key (MQTT `command/rotate_key`); the answer is its
    /// address.
    RotateKey {
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
}

impl Command {
    /// Answers the command with why it cannot run now.
    pub fn refuse(self, why: String) {
        match self {
            Self::Reregister { reply } => drop(reply.send(Err(why))),
            Self::RotateKey { reply } => drop(reply.send(Err(why))),
        }
    }
}

/// Renders a status payload (as published, possibly by another agent
/// version) as `label: value` lines for people. Unknown fields are shown
/// too, after the known ones, so that a newer agent's additions are seen.
pub fn render_human(value: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    const FIELDS: [(&str, &str); 16] = [
        ("state", "state"),
        ("machineId", "machine id"),
        ("identity", "identity"),
        ("controllerAddress", "controller"),
        ("nextControllerAddress", "next controller"),
        ("recordStatus", "record status"),
        ("proofVerifiedAt", "proof verified"),
        ("proofExpiresAt", "proof expires"),
        ("lastError", "last error"),
        ("nextAttemptAt", "next attempt"),
        ("clockSkewMs", "clock skew"),
        ("agentVersion", "agent version"),
        ("bootId", "boot id"),
        ("seq", "sequence"),
        ("timestamp", "as of"),
        ("queries", "queries"),
    ];
    let Some(map) = value.as_object() else {
        return format!("{value}\n");
    };
    let show = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = String::new();
    for (key, label) in FIELDS {
        let Some(v) = map.get(key) else { continue };
        let text = match (key, v) {
            (_, serde_json::Value::Null) => "-".to_owned(),
            ("lastError", serde_json::Value::Object(e)) => format!(
                "{} {} (at {})",
                e.get("code").map(show).unwrap_or_default(),
                e.get("message").map(show).unwrap_or_default(),
                e.get("at").map(show).unwrap_or_default()
            ),
            ("clockSkewMs", serde_json::Value::Number(n)) => {
                format!("{n} ms (orchestrator minus local clock)")
            }
            ("queries", serde_json::Value::Object(q)) => format!(
                "{} answered, {} rate-limited, {} refused, {} dropped",
                q.get("answered").map(show).unwrap_or_default(),
                q.get("rateLimited").map(show).unwrap_or_default(),
                q.get("refused").map(show).unwrap_or_default(),
                q.get("dropped").map(show).unwrap_or_default()
            ),
            (_, v) => show(v),
        };
        let _ = writeln!(out, "{label:<15} {text}");
    }
    for (key, v) in map {
        if key != "schema" && !FIELDS.iter().any(|(k, _)| k == key) {
            let _ = writeln!(out, "{key:<15} {}", show(v));
        }
    }
    out
}

/// `peaqos-agent status` on a gateway: one line per machine (name, state,
/// machine id, online, last error), after the gateway's own line.
pub fn render_machines(view: &crate::mqtt::GatewayView) -> String {
    use std::fmt::Write as _;
    let field = |status: Option<&serde_json::Value>, key: &str| {
        status
            .and_then(|s| s.get(key))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("-")
            .to_owned()
    };
    let mut rows = vec![[
        "NAME".to_owned(),
        "STATE".to_owned(),
        "MACHINE ID".to_owned(),
        "ONLINE".to_owned(),
        "LAST ERROR".to_owned(),
    ]];
    for m in &view.machines {
        let status = m.status.as_ref();
        let error = status
            .and_then(|s| s.get("lastError"))
            .and_then(|e| e.get("code"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("-");
        rows.push([
            m.name.clone(),
            if status.is_some() {
                field(status, "state")
            } else {
                "unknown (no retained status)".to_owned()
            },
            field(status, "machineId"),
            if m.online(view) { "yes" } else { "no" }.to_owned(),
            error.to_owned(),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!(
        "gateway {}: {}, {} machines\n",
        view.name,
        view.availability.as_deref().unwrap_or("unknown"),
        view.machines.len()
    );
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// `peaqos-agent status --json` on a gateway.
pub fn machines_json(view: &crate::mqtt::GatewayView) -> serde_json::Value {
    serde_json::json!({
        "gateway": {"name": view.name, "availability": view.availability},
        "machines": view.machines.iter().map(|m| serde_json::json!({
            "name": m.name,
            "topicPrefix": m.prefix,
            "availability": m.availability,
            "online": m.online(view),
            "status": m.status,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT_DOC: &str = include_str!("../docs/agent.md");
    const MQTT_DOC: &str = include_str!("../docs/mqtt.md");

    /// The section of `doc` under `## heading`, up to the next `## `.
    fn doc_section(doc: &'static str, heading: &str) -> &'static str {
        doc.split(&format!("\n## {heading}\n"))
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .unwrap_or_else(|| panic!("no \"## {heading}\" section"))
    }

    /// Whether a documented table has a row for `name` (alone or listed with
    /// others in the first cell).
    fn has_row(table: &str, name: &str) -> bool {
        table.contains(&format!("| `{name}`")) || table.contains(&format!(", `{name}`"))
    }

    /// The status payload table (docs/mqtt.md) is the contract readers code
    /// against: every field the agent publishes must be in it.
    #[test]
    fn the_readme_documents_every_status_field() {
        let table = doc_section(MQTT_DOC, "The status payload");
        for counter in ["answered", "refused", "rateLimited", "dropped"] {
            assert!(
                table.contains(&format!("`{counter}`")),
                "docs/mqtt.md's status payload table does not describe queries.{counter}"
            );
        }
        let s = StatusSnapshot::new("did:peaq:1".into(), "0xAb".into(), "boot".into());
        let v = serde_json::to_value(StatusPayload {
            snapshot: &s,
            queries: QueryCounters::default(),
        })
        .unwrap();
        assert!(v["queries"]["rateLimited"].is_u64(), "{v}");
        for key in v.as_object().unwrap().keys() {
            assert!(
                has_row(table, key),
                "docs/mqtt.md's status payload table does not describe `{key}`"
            );
        }
    }

    /// Every state the `state` field can take has a row in the registration
    /// loop table (docs/agent.md).
    #[test]
    fn the_readme_documents_every_state() {
        use AgentState::{
            Activating, Active, Archived, Backoff, Blocked, ChallengeRefused, ConfigError,
            KeyUnavailable, NotController, Registering, Renewing, Starting, Stopping,
        };
        let all = [
            Starting,
            Registering,
            Activating,
            Active,
            Renewing,
            Backoff,
            NotController,
            ChallengeRefused,
            KeyUnavailable,
            ConfigError,
            Blocked,
            Archived,
            Stopping,
        ];
        // No wildcard: a new state does not compile until it is listed above.
        match all[0] {
            Starting | Registering | Activating | Active | Renewing | Backoff | NotController
            | ChallengeRefused | KeyUnavailable | ConfigError | Blocked | Archived | Stopping => {}
        }
        let table = doc_section(AGENT_DOC, "The registration loop");
        for state in all {
            assert!(
                has_row(table, state.as_str()),
                "docs/agent.md's registration loop table lacks state `{state}`"
            );
        }
    }

    #[test]
    fn the_summary_counts_states_active_first_and_names_the_troubled() {
        let status = |state| {
            let mut s = StatusSnapshot::new("did:peaq:1".into(), "0xAb".into(), "b".into());
            s.state = state;
            s
        };
        let mut all = vec![("dock-7".to_owned(), status(AgentState::NotController))];
        for i in 0..39 {
            all.push((format!("m{i}"), status(AgentState::Active)));
        }
        let line = summary_line(all.iter().map(|(n, s)| (n.as_str(), s.state)));
        assert_eq!(line, "40 machines: 39 active, 1 not_controller (dock-7)");
        let mut few = vec![("a".to_owned(), status(AgentState::Backoff))];
        for name in ["b", "c", "d", "e"] {
            few.push((name.to_owned(), status(AgentState::ConfigError)));
        }
        few.push(("f".to_owned(), status(AgentState::Registering)));
        let line = summary_line(few.iter().map(|(n, s)| (n.as_str(), s.state)));
        assert_eq!(
            line,
            "6 machines: 1 registering, 1 backoff (a), 4 config_error (b, c, d, +1 more)"
        );
        let one = status(AgentState::Active);
        assert_eq!(summary_line([("x", one.state)]), "1 machine: 1 active");
        assert_eq!(summary_line(std::iter::empty()), "0 machines");
    }

    #[test]
    fn human_rendering_shows_every_field_and_newer_ones() {
        let mut s = StatusSnapshot::new("did:peaq:1".into(), "0xAb".into(), "boot".into());
        s.state = AgentState::Backoff;
        s.last_error = Some(LastError::from_code(
            &ErrorCode::IdentityUnavailable,
            "MCR down",
        ));
        s.clock_skew_ms = Some(-42);
        let mut v = serde_json::to_value(&s).unwrap();
        v["fromTheFuture"] = serde_json::json!(1);
        let text = render_human(&v);
        assert!(text.contains("state           backoff\n"), "{text}");
        assert!(text.contains("machine id      -\n"), "{text}");
        assert!(
            text.contains("last error      PEAQOS_IDENTITY_UNAVAILABLE MCR down"),
            "{text}"
        );
        assert!(text.contains("clock skew      -42 ms"), "{text}");
        assert!(text.contains("fromTheFuture   1\n"), "{text}");
        assert!(!text.contains("schema"), "{text}");
    }

    #[test]
    fn a_gateway_lists_each_machine_offline_when_the_gateway_is() {
        use crate::mqtt::{GatewayView, MachineView};
        let machine = |name: &str, state: Option<&str>| MachineView {
            name: name.to_owned(),
            prefix: format!("peaqos/{name}"),
            availability: Some("online".to_owned()),
            status: state.map(|s| {
                serde_json::json!({"state": s, "machineId": format!("mach_{name}"),
                    "lastError": if s == "active" { serde_json::Value::Null }
                                 else { serde_json::json!({"code": "NOT_CONTROLLER"}) }})
            }),
        };
        let mut view = GatewayView {
            name: "gw".to_owned(),
            availability: Some("online".to_owned()),
            machines: vec![
                machine("dock-1", Some("active")),
                machine("dock-7", Some("not_controller")),
                machine("gone", None),
            ],
        };
        let text = render_machines(&view);
        assert!(
            text.starts_with("gateway gw: online, 3 machines\n"),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[2].starts_with("dock-1") && lines[2].contains("mach_dock-1"));
        assert!(lines[2].contains("yes"), "{text}");
        assert!(lines[3].ends_with("NOT_CONTROLLER"), "{text}");
        assert!(lines[4].contains("unknown (no retained status)"), "{text}");
        view.availability = Some("offline".to_owned());
        let json = machines_json(&view);
        assert!(
            json["machines"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["online"] == false)
        );
        assert!(
            !render_machines(&view)
                .lines()
                .skip(2)
                .any(|l| l.contains("yes"))
        );
    }
}
