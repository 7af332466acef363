//! Remote commands (`<prefix>/command/<name>`): off by default; when on,
//! only the allowed names are subscribed to, and each message must pass
//! the gate here: live (not retained), small, well-formed, a new id, within
//! the rate limit, and nothing else in flight.
//!
//! The broker's ACL decides who may publish commands (see
//! `config/mosquitto-acl.conf`); MQTT gives a subscriber no trustworthy
//! sender identity, so the agent does not pretend to check one.

use std::collections::{HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use peaqos_protocol::Timestamp;

use super::client::Message;
use super::config::{CommandName, CommandsConfig};
use super::rate::TokenBucket;
use super::request::{self, Refusal, ReplyTo};
use super::topics::Topics;

/// How many recent command ids are remembered to drop repeats (QoS 1
/// redeliveries, a script run twice).
const REMEMBERED_IDS: usize = 64;
const MAX_ID_LEN: usize = 64;
const MAX_REQUESTER_LEN: usize = 64;

/// A command message body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommandBody {
    /// Unique per command; repeats are ignored.
    id: String,
    /// Free text for logs and the result ("technician laptop"); not trusted.
    #[serde(default)]
    requester: Option<String>,
    /// MQTT 3.1.1 clients: also send the result here (below the reply prefix).
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    correlation_id: Option<serde_json::Value>,
}

/// A command that passed parsing.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) name: CommandName,
    pub(crate) id: String,
    pub(crate) requester: Option<String>,
    /// Where to send the result besides `<prefix>/command/result`.
    pub(crate) reply: Option<ReplyTo>,
}

/// What to do with one command message.
#[derive(Debug)]
pub(crate) enum Decision {
    Run(Request),
    /// Well-formed but not run now; the reason goes on the result topic.
    Reject(Request, &'static str),
    /// Malformed, retained or repeated: dropped without a result.
    Ignore(Refusal),
    Duplicate(String),
}

/// A command's outcome as published on the result topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// Handed to the registration loop; a final result follows.
    Accepted,
    Ok,
    Error,
    Rejected,
    Timeout,
}

/// The JSON published on `<prefix>/command/result`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CommandResult<'a> {
    pub(crate) id: &'a str,
    pub(crate) command: &'static str,
    pub(crate) status: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) requester: Option<&'a str>,
    pub(crate) at: Timestamp,
}

impl Request {
    pub(crate) fn result<'a>(
        &'a self,
        status: Outcome,
        message: Option<&'a str>,
    ) -> CommandResult<'a> {
        CommandResult {
            id: &self.id,
            command: self.name.as_str(),
            status,
            message,
            requester: self.requester.as_deref(),
            at: Timestamp::now(),
        }
    }
}

/// Rate limit, repeat detection and the one-at-a-time rule.
#[derive(Debug)]
pub(crate) struct Gate {
    bucket: TokenBucket,
    recent: VecDeque<String>,
    seen: HashSet<String>,
    in_flight: bool,
}

impl Gate {
    pub(crate) fn new(config: &CommandsConfig) -> Self {
        Self {
            bucket: TokenBucket::new(config.burst, config.refill),
            // Grown as ids arrive, up to REMEMBERED_IDS: reserved up front
            // they took about 4.7 KB per machine of a gateway, most of
            // which never receive a command.
            recent: VecDeque::new(),
            seen: HashSet::new(),
            in_flight: false,
        }
    }

    pub(crate) fn decide(&mut self, msg: &Message, topics: &Topics) -> Decision {
        let request = match parse(msg, topics) {
            Ok(r) => r,
            Err(refusal) => return Decision::Ignore(refusal),
        };
        if !self.remember(&request.id) {
            return Decision::Duplicate(request.id);
        }
        if self.in_flight {
            return Decision::Reject(request, "busy: a command is still running");
        }
        if !self.bucket.try_take() {
            return Decision::Reject(request, "rate limited: try again later");
        }
        self.in_flight = true;
        Decision::Run(request)
    }

    /// The running command finished (or was given up on).
    pub(crate) fn finished(&mut self) {
        self.in_flight = false;
    }

    /// Records an id; false if it was seen recently.
    fn remember(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.recent.len() == REMEMBERED_IDS
            && let Some(old) = self.recent.pop_front()
        {
            self.seen.remove(&old);
        }
        self.recent.push_back(id.to_owned());
        self.seen.insert(id.to_owned());
        true
    }
}

fn parse(msg: &Message, topics: &Topics) -> Result<Request, Refusal> {
    request::check_envelope(msg)?;
    let name = topics
        .command_name(&msg.topic)
        .ok_or(Refusal::UnexpectedTopic)?;
    let body: CommandBody = serde_json::from_slice(&msg.payload).map_err(Refusal::BadJson)?;
    if body.id.is_empty() || body.id.len() > MAX_ID_LEN || body.id.chars().any(char::is_control) {
        return Err(Refusal::BadField(
            "id must be 1 to 64 bytes without control characters",
        ));
    }
    if body
        .requester
        .as_ref()
        .is_some_and(|r| r.len() > MAX_REQUESTER_LEN || r.chars().any(char::is_control))
    {
        return Err(Refusal::BadField(
            "requester must be at most 64 bytes without control characters",
        ));
    }
    let reply = match request::v5_reply(msg, topics)? {
        Some(reply) => Some(reply),
        None => body
            .reply_to
            .map(|to| request::json_reply(to, body.correlation_id, topics))
            .transpose()?,
    };
    Ok(Request {
        name,
        id: body.id,
        requester: body.requester,
        reply,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn topics() -> Topics {
        Topics::new("peaqos/r7")
    }

    fn msg(payload: &str) -> Message {
        Message {
            topic: "peaqos/r7/command/reregister".into(),
            payload: payload.as_bytes().to_vec(),
            retain: false,
            response_topic: None,
            correlation_data: None,
        }
    }

    fn gate(burst: u32) -> Gate {
        Gate::new(&CommandsConfig {
            enabled: true,
            allow: vec![CommandName::Reregister],
            burst,
            refill: Duration::from_secs(600),
            result_timeout: Duration::from_secs(10),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn runs_a_well_formed_command_once() {
        let mut g = gate(5);
        let Decision::Run(r) = g.decide(&msg(r#"{"id":"c1","requester":"laptop"}"#), &topics())
        else {
            panic!("not run")
        };
        assert_eq!((r.name, r.id.as_str()), (CommandName::Reregister, "c1"));
        assert_eq!(r.requester.as_deref(), Some("laptop"));
        g.finished();
        assert!(matches!(
            g.decide(&msg(r#"{"id":"c1"}"#), &topics()),
            Decision::Duplicate(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn one_at_a_time_and_rate_limited() {
        let mut g = gate(2);
        assert!(matches!(
            g.decide(&msg(r#"{"id":"a"}"#), &topics()),
            Decision::Run(_)
        ));
        assert!(matches!(
            g.decide(&msg(r#"{"id":"b"}"#), &topics()),
            Decision::Reject(_, reason) if reason.starts_with("busy")
        ));
        g.finished();
        assert!(matches!(
            g.decide(&msg(r#"{"id":"c"}"#), &topics()),
            Decision::Run(_)
        ));
        g.finished();
        assert!(matches!(
            g.decide(&msg(r#"{"id":"d"}"#), &topics()),
            Decision::Reject(_, reason) if reason.starts_with("rate")
        ));
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(matches!(
            g.decide(&msg(r#"{"id":"e"}"#), &topics()),
            Decision::Run(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_and_retained_commands_are_ignored() {
        let mut g = gate(100);
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"id":""}"#,
            r#"{"id":5}"#,
            r#"{"id":"a\nb"}"#,
            r#"{"id":"ok","replyTo":"peaqos/r7/status"}"#,
        ] {
            assert!(
                matches!(g.decide(&msg(bad), &topics()), Decision::Ignore(_)),
                "{bad}"
            );
        }
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(MAX_ID_LEN + 1));
        assert!(matches!(
            g.decide(&msg(&long), &topics()),
            Decision::Ignore(_)
        ));
        let mut retained = msg(r#"{"id":"r1"}"#);
        retained.retain = true;
        assert!(matches!(
            g.decide(&retained, &topics()),
            Decision::Ignore(Refusal::Retained)
        ));
        let huge = format!(r#"{{"id":"h","pad":"{}"}}"#, "x".repeat(10_000));
        assert!(matches!(
            g.decide(&msg(&huge), &topics()),
            Decision::Ignore(Refusal::TooLarge(_))
        ));
        // None of that used up the rate limit or blocked the next command.
        assert!(matches!(
            g.decide(&msg(r#"{"id":"fine"}"#), &topics()),
            Decision::Run(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn remembers_a_bounded_number_of_ids() {
        let mut g = gate(100);
        for i in 0..=REMEMBERED_IDS {
            assert!(g.remember(&format!("id{i}")));
        }
        assert!(g.recent.len() <= REMEMBERED_IDS && g.seen.len() <= REMEMBERED_IDS);
        // The oldest was forgotten, the newest is still known.
        assert!(g.remember("id0"));
        assert!(!g.remember(&format!("id{REMEMBERED_IDS}")));
    }

    #[tokio::test(start_paused = true)]
    async fn results_may_also_go_to_a_reply_topic() {
        let mut g = gate(5);
        let body = r#"{"id":"x","replyTo":"peaqos/r7/reply/adm","correlationId":7}"#;
        let Decision::Run(r) = g.decide(&msg(body), &topics()) else {
            panic!("not run")
        };
        let reply = r.reply.unwrap();
        assert_eq!(reply.topic, "peaqos/r7/reply/adm");
        assert_eq!(reply.correlation_id, Some(serde_json::json!(7)));
    }
}
