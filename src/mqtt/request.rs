//! Incoming requests (`status/get` queries and commands): size limits, the
//! reply address, and what gets refused.
//!
//! A reply goes to the MQTT 5 Response Topic (Correlation Data echoed) or,
//! for MQTT 3.1.1 clients, to the `replyTo` of a JSON body (its
//! `correlationId` echoed). Either way the reply topic must lie below
//! `<prefix>/reply/`: the agent never publishes where a requester points it,
//! so a client that may only ask cannot make the agent write to the status,
//! availability or any other topic, whatever the broker's ACL says.

use std::fmt;

use serde::Deserialize;

use super::client::{Message, PublishProps};
use super::topics::Topics;

/// Largest request payload the agent reads.
pub(crate) const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// Largest correlation data (MQTT 5) or `correlationId` (JSON) echoed back.
pub(crate) const MAX_CORRELATION_BYTES: usize = 256;
/// Replies expire at the broker if the requester is gone (MQTT 5 only).
const REPLY_EXPIRY_SECS: u32 = 60;

/// Where and how to answer one request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReplyTo {
    pub(crate) topic: String,
    /// MQTT 5 Correlation Data, echoed in the reply's properties.
    pub(crate) correlation_data: Option<Vec<u8>>,
    /// JSON `correlationId`, echoed in the reply body.
    pub(crate) correlation_id: Option<serde_json::Value>,
}

impl ReplyTo {
    pub(crate) fn props(&self) -> PublishProps {
        PublishProps {
            correlation_data: self.correlation_data.clone(),
            message_expiry: Some(REPLY_EXPIRY_SECS),
            json: true,
            ..PublishProps::default()
        }
    }

    /// The reply body: `object` (serialised JSON object) with
    /// `correlationId` appended when the request carried one. Appended to
    /// the text rather than rebuilt through `serde_json::Value`, which
    /// would reorder the fields alphabetically.
    pub(crate) fn body(&self, mut object: Vec<u8>) -> Vec<u8> {
        let Some(id) = &self.correlation_id else {
            return object;
        };
        if object.last() != Some(&b'}') {
            return object;
        }
        object.pop();
        if object.len() > 1 {
            object.push(b',');
        }
        object.extend_from_slice(b"\"correlationId\":");
        object.extend_from_slice(&serde_json::to_vec(id).unwrap_or_default());
        object.push(b'}');
        object
    }
}

/// Why a request was ignored. Logged at debug and counted, never answered:
/// answering malformed input would hand a misbehaving client an amplifier.
#[derive(Debug)]
pub(crate) enum Refusal {
    TooLarge(usize),
    Retained,
    BadJson(serde_json::Error),
    NoReplyTopic,
    ReplyOutsidePrefix,
    CorrelationTooLarge,
    BadField(&'static str),
    UnexpectedTopic,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge(n) => write!(f, "payload of {n} bytes exceeds {MAX_REQUEST_BYTES}"),
            Self::Retained => f.write_str("retained message (requests must be live)"),
            Self::BadJson(e) => write!(f, "payload is not the expected JSON: {e}"),
            Self::NoReplyTopic => {
                f.write_str("no Response Topic and no JSON replyTo: nowhere to answer")
            }
            Self::ReplyOutsidePrefix => f.write_str("reply topic is not below <prefix>/reply/"),
            Self::CorrelationTooLarge => {
                write!(f, "correlation data exceeds {MAX_CORRELATION_BYTES} bytes")
            }
            Self::BadField(why) => f.write_str(why),
            Self::UnexpectedTopic => f.write_str("not a topic the agent serves"),
        }
    }
}

/// The MQTT 3.1.1 fallback body of a query.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonQuery {
    reply_to: String,
    #[serde(default)]
    correlation_id: Option<serde_json::Value>,
}

/// Checks what every request must pass: live (not retained), small.
pub(crate) fn check_envelope(msg: &Message) -> Result<(), Refusal> {
    if msg.payload.len() > MAX_REQUEST_BYTES {
        return Err(Refusal::TooLarge(msg.payload.len()));
    }
    // A retained request would be replayed to the agent on every reconnect.
    if msg.retain {
        return Err(Refusal::Retained);
    }
    Ok(())
}

/// Parses a `status/get` query into its reply address.
pub(crate) fn parse_query(msg: &Message, topics: &Topics) -> Result<ReplyTo, Refusal> {
    check_envelope(msg)?;
    if let Some(reply) = v5_reply(msg, topics)? {
        return Ok(reply);
    }
    let query: JsonQuery = serde_json::from_slice(&msg.payload).map_err(|e| {
        if msg.payload.iter().all(u8::is_ascii_whitespace) {
            Refusal::NoReplyTopic
        } else {
            Refusal::BadJson(e)
        }
    })?;
    json_reply(query.reply_to, query.correlation_id, topics)
}

/// The MQTT 5 reply address, if the message has a Response Topic.
pub(crate) fn v5_reply(msg: &Message, topics: &Topics) -> Result<Option<ReplyTo>, Refusal> {
    let Some(topic) = &msg.response_topic else {
        return Ok(None);
    };
    if !topics.is_reply_topic(topic) {
        return Err(Refusal::ReplyOutsidePrefix);
    }
    if msg
        .correlation_data
        .as_ref()
        .is_some_and(|c| c.len() > MAX_CORRELATION_BYTES)
    {
        return Err(Refusal::CorrelationTooLarge);
    }
    Ok(Some(ReplyTo {
        topic: topic.clone(),
        correlation_data: msg.correlation_data.clone(),
        correlation_id: None,
    }))
}

/// The JSON (`replyTo`, `correlationId`) reply address.
pub(crate) fn json_reply(
    reply_to: String,
    correlation_id: Option<serde_json::Value>,
    topics: &Topics,
) -> Result<ReplyTo, Refusal> {
    if !topics.is_reply_topic(&reply_to) {
        return Err(Refusal::ReplyOutsidePrefix);
    }
    if correlation_id
        .as_ref()
        .is_some_and(|id| id.to_string().len() > MAX_CORRELATION_BYTES)
    {
        return Err(Refusal::CorrelationTooLarge);
    }
    Ok(ReplyTo {
        topic: reply_to,
        correlation_data: None,
        correlation_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::new("peaqos/r7")
    }

    fn msg(payload: &str) -> Message {
        Message {
            topic: "peaqos/r7/status/get".into(),
            payload: payload.as_bytes().to_vec(),
            retain: false,
            response_topic: None,
            correlation_data: None,
        }
    }

    #[test]
    fn v5_requests_reply_on_their_response_topic() {
        let mut m = msg("");
        m.response_topic = Some("peaqos/r7/reply/x1".into());
        m.correlation_data = Some(vec![1, 2, 3]);
        let reply = parse_query(&m, &topics()).unwrap();
        assert_eq!(reply.topic, "peaqos/r7/reply/x1");
        assert_eq!(reply.props().correlation_data, Some(vec![1, 2, 3]));
        assert_eq!(reply.correlation_id, None);
    }

    #[test]
    fn json_requests_reply_on_reply_to_with_the_id_echoed() {
        let m = msg(r#"{"replyTo":"peaqos/r7/reply/cli","correlationId":"abc-1"}"#);
        let reply = parse_query(&m, &topics()).unwrap();
        assert_eq!(reply.topic, "peaqos/r7/reply/cli");
        let body = reply.body(br#"{"state":"active","seq":3}"#.to_vec());
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"state":"active","seq":3,"correlationId":"abc-1"}"#
        );
        let empty = reply.body(b"{}".to_vec());
        assert_eq!(empty, br#"{"correlationId":"abc-1"}"#);
        let v5 = ReplyTo {
            correlation_id: None,
            ..reply
        };
        assert_eq!(v5.body(b"{}".to_vec()), b"{}");
    }

    #[test]
    fn reply_topics_outside_the_prefix_are_refused() {
        let mut m = msg("");
        m.response_topic = Some("peaqos/r7/status".into());
        assert!(matches!(
            parse_query(&m, &topics()),
            Err(Refusal::ReplyOutsidePrefix)
        ));
        for body in [
            r#"{"replyTo":"peaqos/r7/availability"}"#,
            r#"{"replyTo":"elsewhere/x"}"#,
            r#"{"replyTo":"peaqos/r7/reply/#"}"#,
        ] {
            assert!(
                matches!(
                    parse_query(&msg(body), &topics()),
                    Err(Refusal::ReplyOutsidePrefix)
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn malformed_large_and_retained_requests_are_refused() {
        assert!(matches!(
            parse_query(&msg("{not json"), &topics()),
            Err(Refusal::BadJson(_))
        ));
        assert!(matches!(
            parse_query(&msg("{}"), &topics()),
            Err(Refusal::BadJson(_))
        ));
        assert!(matches!(
            parse_query(&msg(r#"{"replyTo": 5}"#), &topics()),
            Err(Refusal::BadJson(_))
        ));
        assert!(matches!(
            parse_query(&msg(""), &topics()),
            Err(Refusal::NoReplyTopic)
        ));
        let big = format!(
            r#"{{"replyTo":"peaqos/r7/reply/a","pad":"{}"}}"#,
            "x".repeat(MAX_REQUEST_BYTES)
        );
        assert!(matches!(
            parse_query(&msg(&big), &topics()),
            Err(Refusal::TooLarge(_))
        ));
        let mut retained = msg(r#"{"replyTo":"peaqos/r7/reply/a"}"#);
        retained.retain = true;
        assert!(matches!(
            parse_query(&retained, &topics()),
            Err(Refusal::Retained)
        ));
        let long_id = format!(
            r#"{{"replyTo":"peaqos/r7/reply/a","correlationId":"{}"}}"#,
            "x".repeat(MAX_CORRELATION_BYTES)
        );
        assert!(matches!(
            parse_query(&msg(&long_id), &topics()),
            Err(Refusal::CorrelationTooLarge)
        ));
    }
}
