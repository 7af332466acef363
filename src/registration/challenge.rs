//! The signing policy: which challenges the controller key signs.
//!
//! The contract lets the server choose the challenge text, and the published
//! clients sign it as received. But the controller key may authorise other
//! things elsewhere (a login to a dapp, an off-chain order), so an agent that
//! signed whatever text arrives would lend its key to whoever controls the
//! orchestrator or the path to it. Two policies:
//!
//! - `standard` (the default) signs server-chosen text after the checks that
//!   need no knowledge of the server's format: the challenge is bound to us
//!   (identity, controller, method, an expiry minutes ahead), and the text is
//!   readable prose of bounded size, not an encoded payload, JSON or typed
//!   data, not transaction-sized hex (with or without `0x`), no long base64
//!   run, and not a Sign-In-With-Ethereum message for another host or port;
//! - `strict` applies every rule of `standard`, and signs only our own
//!   orchestrator's line format naming our identity and this challenge
//!   ([`ChallengeMessage`]), with an `Orchestrator:` name as our orchestrator
//!   allows it and the challenge's own expiry.
//!
//! Expiry is bounded on the server's clock, and also on the local clock
//! when that one is sane (after the floor of [`crate::clock`]): a server
//! that sends no `Date`, or a `Date` far ahead, cannot stretch a challenge
//! into a standing authorisation.
//!
//! Everything here is pure; the loop and `check` call [`vet`].

use std::fmt;
use std::time::Duration;

use peaqos_protocol::{Address, Challenge, ChallengeMessage, IdentityRef, ProofMethod, Timestamp};
use serde::Deserialize;

/// Longest text signed, in bytes. Challenge texts seen in practice (ours,
/// Sign-In-With-Ethereum, one-line nonce prompts) are 60 to 600 bytes; a
/// longer one is more likely a document or payload than a challenge, and an
/// operator auditing a signature must be able to read what was signed.
pub const MAX_TEXT: usize = 2048;
/// Farthest ahead a challenge may expire, on the server's clock. The
/// contract says challenges expire in minutes; a "challenge" valid for
/// hours is a standing authorisation, whose signature can be collected now
/// and used much later.
pub const MAX_VALIDITY: Duration = Duration::from_secs(3600);
/// An `0x` token longer than this many hex digits is more than a 32-byte
/// hash or nonce: calldata or a serialised transaction.
const MAX_HEX_TOKEN: usize = 64;
/// A text without whitespace at least this long made of hex or base64
/// characters only is an encoded payload, not something a person can read.
const MIN_ENCODED: usize = 16;
/// A base64 word in prose longer than this encodes more than 64 bytes:
/// more than a nonce or a signature, so a payload.
const MAX_BASE64_WORD: usize = 88;
/// Longest `Orchestrator:` name in our format (our orchestrator's own
/// bound on `orchestrator_name`).
const MAX_ORCHESTRATOR_NAME: usize = 200;

/// `[orchestrator] challenge_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChallengePolicy {
    /// Server-chosen text, vetted by rules that need no knowledge of its
    /// format (the contract's behaviour, with guards).
    #[default]
    Standard,
    /// Only our orchestrator's exact challenge format.
    Strict,
}

impl ChallengePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Strict => "strict",
        }
    }
}

impl fmt::Display for ChallengePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The policy in effect and why, as the loop uses it and `check` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub policy: ChallengePolicy,
    /// Why this policy: configured, default, or the plain-HTTP fallback.
    pub reason: String,
}

impl fmt::Display for EffectivePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.policy, self.reason)
    }
}

/// The policy for an orchestrator at `url`: `standard` over plain `http://`
/// to a host that is not loopback falls back to `strict`, because anyone on
/// the path could then choose the text the key signs; `plain_http_opt_in`
/// (`standard_over_plain_http = true`) accepts that risk.
pub fn effective(
    configured: Option<ChallengePolicy>,
    url: &reqwest::Url,
    plain_http_opt_in: bool,
) -> EffectivePolicy {
    let chosen = configured.unwrap_or_default();
    let source = if configured.is_some() {
        "configured"
    } else {
        "default"
    };
    if chosen == ChallengePolicy::Standard && url.scheme() == "http" && !is_loopback(url) {
        if plain_http_opt_in {
            return EffectivePolicy {
                policy: chosen,
                reason: format!("{source}; over plain http by standard_over_plain_http = true"),
            };
        }
        return EffectivePolicy {
            policy: ChallengePolicy::Strict,
            reason: format!(
                "standard is not used over plain http to {}: anyone on the path could choose \
                 the text; use https or set standard_over_plain_http = true",
                url.host_str().unwrap_or_default()
            ),
        };
    }
    EffectivePolicy {
        policy: chosen,
        reason: source.to_owned(),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The rule a challenge broke; its name appears in every refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Identity,
    Method,
    Expiry,
    Empty,
    Size,
    Printable,
    HexPayload,
    EncodedPayload,
    TypedData,
    Json,
    LongHex,
    SignInDomain,
    /// `strict`: our line format naming our identity and this challenge.
    Format,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Method => "method",
            Self::Expiry => "expiry",
            Self::Empty => "empty",
            Self::Size => "size",
            Self::Printable => "printable",
            Self::HexPayload => "hex-payload",
            Self::EncodedPayload => "encoded-payload",
            Self::TypedData => "typed-data",
            Self::Json => "json",
            Self::LongHex => "long-hex",
            Self::SignInDomain => "sign-in-domain",
            Self::Format => "format",
        }
    }
}

/// Why a challenge was not signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChallengeRefusal {
    /// Our address is not among the identity's controllers.
    NotController { controllers: Vec<Address> },
    /// The policy refuses the challenge.
    Refused { rule: Rule, detail: String },
}

impl fmt::Display for ChallengeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotController { .. } => f.write_str("our address is not among the controllers"),
            Self::Refused { rule, detail } => {
                write!(f, "refusing to sign (rule {}): {detail}", rule.as_str())
            }
        }
    }
}

/// What the challenge must be bound to.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub identity: &'a IdentityRef,
    pub ours: Address,
    /// The orchestrator's `host:port` ([`authority`]), for
    /// Sign-In-With-Ethereum domains.
    pub host: &'a str,
    /// The server's clock now, when known.
    pub server_now: Option<Timestamp>,
    /// The local clock now, when it is sane ([`crate::clock::sane_now`]).
    pub local_now: Option<Timestamp>,
}

/// The orchestrator's `host:port` as a Sign-In-With-Ethereum domain must
/// name it: the URL's port, or its scheme's default.
pub fn authority(url: &str) -> String {
    let Ok(url) = reqwest::Url::parse(url) else {
        return String::new();
    };
    let host = url.host_str().unwrap_or_default();
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// A challenge the policy accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vetted {
    /// `strict` only: the message's issue time, the server's "now" to the
    /// millisecond (other servers' texts carry no time we can trust).
    pub issued_at: Option<Timestamp>,
}

fn refuse(rule: Rule, detail: impl Into<String>) -> ChallengeRefusal {
    ChallengeRefusal::Refused {
        rule,
        detail: detail.into(),
    }
}

/// Checks a challenge before the key signs it.
pub fn vet(
    policy: ChallengePolicy,
    challenge: &Challenge,
    expected: &Expected<'_>,
) -> Result<Vetted, ChallengeRefusal> {
    if &challenge.identity_ref != expected.identity {
        return Err(refuse(
            Rule::Identity,
            format!(
                "the challenge is for {}, not for our identity {}",
                challenge.identity_ref, expected.identity
            ),
        ));
    }
    if challenge.verification_method != ProofMethod::Eip191 {
        return Err(refuse(
            Rule::Method,
            format!(
                "verificationMethod is {:?}; this agent signs only eip191 (personal_sign)",
                shorten(challenge.verification_method.as_str())
            ),
        ));
    }
    check_expiry(
        challenge.expires_at,
        expected.server_now,
        expected.local_now,
    )?;
    // `strict` is `standard` and the format: the format alone would let
    // its free fields carry what `standard` refuses.
    check_text(&challenge.message, expected.host)?;
    let vetted = match policy {
        ChallengePolicy::Strict => strict(challenge, expected.identity)?,
        ChallengePolicy::Standard => Vetted { issued_at: None },
    };
    if !challenge.controller_addresses.contains(&expected.ours) {
        return Err(ChallengeRefusal::NotController {
            controllers: challenge.controller_addresses.clone(),
        });
    }
    Ok(vetted)
}

fn check_expiry(
    expires_at: Timestamp,
    server_now: Option<Timestamp>,
    local_now: Option<Timestamp>,
) -> Result<(), ChallengeRefusal> {
    // Without a `Date` header there is no server clock to compare with;
    // the server's verdict decides whether it expired.
    if let Some(now) = server_now {
        if expires_at <= now {
            return Err(refuse(
                Rule::Expiry,
                format!("the challenge expired at {expires_at}, before the server's now ({now})"),
            ));
        }
        if expires_at.duration_since(&now) > MAX_VALIDITY {
            return Err(refuse(
                Rule::Expiry,
                format!(
                    "the challenge is valid until {expires_at}, more than {} min after the \
                     server's now ({now}); challenges expire in minutes",
                    MAX_VALIDITY.as_secs() / 60
                ),
            ));
        }
    }
    // The server's clock is the server's word: a sane local clock bounds
    // how far ahead it may put the expiry too. (Only the upper bound: a
    // local clock a little ahead must not refuse a fresh challenge.)
    if let Some(local) = local_now
        && expires_at > local
        && expires_at.duration_since(&local) > MAX_VALIDITY
    {
        return Err(refuse(
            Rule::Expiry,
            format!(
                "the challenge is valid until {expires_at}, more than {} min after this \
                 machine's clock ({local}); challenges expire in minutes (if this clock is \
                 behind, fix it: NTP)",
                MAX_VALIDITY.as_secs() / 60
            ),
        ));
    }
    Ok(())
}

fn strict(challenge: &Challenge, identity: &IdentityRef) -> Result<Vetted, ChallengeRefusal> {
    let message = ChallengeMessage::parse(&challenge.message)
        .map_err(|e| refuse(Rule::Format, format!("{e} (challenge_policy = \"strict\")")))?;
    if &message.identity != identity {
        return Err(refuse(Rule::Format, "the message names another identity"));
    }
    if message.challenge_id != challenge.challenge_id {
        return Err(refuse(Rule::Format, "the message names another challenge"));
    }
    if message.expires_at != challenge.expires_at {
        return Err(refuse(
            Rule::Format,
            format!(
                "the message's Expires At ({}) is not the challenge's expiry ({})",
                message.expires_at, challenge.expires_at
            ),
        ));
    }
    let name = &message.orchestrator;
    if name.chars().count() > MAX_ORCHESTRATOR_NAME || longest_hex_token(name).is_some() {
        return Err(refuse(
            Rule::Format,
            format!(
                "the message's Orchestrator field is not a name (at most \
                 {MAX_ORCHESTRATOR_NAME} characters, no 0x value): {:?}",
                shorten(name)
            ),
        ));
    }
    Ok(Vetted {
        issued_at: Some(message.issued_at),
    })
}

/// The `standard` text rules, in the order a reader would apply them.
pub fn check_text(text: &str, host: &str) -> Result<(), ChallengeRefusal> {
    if text.trim().is_empty() {
        return Err(refuse(Rule::Empty, "the challenge text is empty"));
    }
    if text.len() > MAX_TEXT {
        return Err(refuse(
            Rule::Size,
            format!(
                "the challenge text is {} bytes, more than {MAX_TEXT}",
                text.len()
            ),
        ));
    }
    if let Some((at, c)) = text.char_indices().find(|(_, c)| !printable(*c)) {
        return Err(refuse(
            Rule::Printable,
            format!(
                "the challenge text holds the non-printable character U+{:04X} at byte {at}",
                u32::from(c)
            ),
        ));
    }
    let trimmed = text.trim();
    check_payload(trimmed)?;
    if let Some(domain) = sign_in_domain(trimmed)
        && !same_host(domain, host)
    {
        return Err(refuse(
            Rule::SignInDomain,
            format!(
                "the challenge text is a Sign-In-With-Ethereum request for {:?}, not for the \
                 orchestrator's host and port {host:?}",
                shorten(domain)
            ),
        ));
    }
    Ok(())
}

/// The `standard` rules against encoded payloads: hex, base64, JSON and
/// typed data, transaction-sized hex.
fn check_payload(trimmed: &str) -> Result<(), ChallengeRefusal> {
    if let Some(hex) = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(refuse(
            Rule::HexPayload,
            format!(
                "the challenge text is a hex payload ({} hex digits), not readable text",
                hex.len()
            ),
        ));
    }
    if trimmed.len() >= MIN_ENCODED
        && !trimmed.contains(char::is_whitespace)
        && trimmed
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
    {
        return Err(refuse(
            Rule::EncodedPayload,
            "the challenge text is one word of hex or base64 characters: an encoded payload, \
             not readable text",
        ));
    }
    // From bytes, as the agent's other JSON: one copy of the parser.
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(trimmed.as_bytes()) {
        if let Some(map) = json.as_object()
            && ["types", "domain", "primaryType", "message"]
                .iter()
                .any(|k| map.contains_key(*k))
        {
            return Err(refuse(
                Rule::TypedData,
                "the challenge text is EIP-712 typed data (a JSON object with \
                 types/domain/primaryType/message)",
            ));
        }
        if json.is_object() || json.is_array() {
            return Err(refuse(
                Rule::Json,
                "the challenge text is a JSON document, not readable text",
            ));
        }
    }
    if let Some(len) = longest_hex_token(trimmed).max(longest_bare_hex(trimmed))
        && len > MAX_HEX_TOKEN
    {
        return Err(refuse(
            Rule::LongHex,
            format!(
                "the challenge text embeds {len} hex digits in one value, more than a \
                 32-byte hash or nonce: it looks like calldata or a transaction"
            ),
        ));
    }
    if let Some(len) = longest_base64_word(trimmed)
        && len > MAX_BASE64_WORD
    {
        return Err(refuse(
            Rule::EncodedPayload,
            format!(
                "the challenge text embeds a {len}-character base64 value, more than a nonce \
                 or signature ({MAX_BASE64_WORD}): an encoded payload"
            ),
        ));
    }
    Ok(())
}

/// Printable text: line breaks and tabs, and no character of the Unicode
/// general categories that do not show as themselves: controls (Cc),
/// formatting characters (Cf: bidirectional marks and overrides, zero-width
/// characters, the soft hyphen, tag characters), line and paragraph
/// separators (Zl, Zp), private use (Co), and unassigned code points (Cn).
/// Any of them can make a text read differently from what it says.
///
/// The categories are ICU's compiled data (`icu_properties`), which the
/// `url` crate links anyway for international domain names: a table of
/// our own would add some 41 KB to the executable (docs/performance.md).
fn printable(c: char) -> bool {
    use icu_properties::{CodePointMapData, props::GeneralCategory as G};
    if matches!(c, '\n' | '\r' | '\t') {
        return true;
    }
    !matches!(
        CodePointMapData::<G>::new().get(c),
        G::Control
            | G::Format
            | G::LineSeparator
            | G::ParagraphSeparator
            | G::PrivateUse
            | G::Surrogate
            | G::Unassigned
    )
}

/// The longest run of hex digits standing as a word of its own (no `0x`):
/// a transaction or calldata pasted into prose.
fn longest_bare_hex(text: &str) -> Option<usize> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| word.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::len)
        .max()
}

/// The longest whitespace-separated word of base64 (or base64url)
/// characters, surrounding punctuation aside.
fn longest_base64_word(text: &str) -> Option<usize> {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| matches!(c, '.' | ',' | ';' | ':' | '(' | ')' | '"' | '\''))
        })
        .filter(|w| {
            w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
        })
        .map(str::len)
        .max()
}

/// The number of hex digits of the longest `0x...` token.
fn longest_hex_token(text: &str) -> Option<usize> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter_map(|word| word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")))
        .map(|hex| hex.bytes().take_while(u8::is_ascii_hexdigit).count())
        .max()
}

/// EIP-4361: the first line is `[scheme://]<domain> wants you to sign in
/// with your Ethereum account:`. Returns the domain of any line of that form.
fn sign_in_domain(text: &str) -> Option<&str> {
    const PHRASE: &str = " wants you to sign in with your Ethereum account:";
    text.lines().find_map(|line| {
        let domain = line.trim().strip_suffix(PHRASE)?;
        Some(domain.split_once("://").map_or(domain, |(_, d)| d))
    })
}

/// Whether a Sign-In domain (an authority: host, maybe a port) names the
/// orchestrator's `authority` (`host:port`). A domain without a port means
/// the default port: it names an orchestrator on 443 or 80 only. Another
/// port on the same host is another service (a dapp beside the
/// orchestrator), so it is not ours.
fn same_host(domain: &str, authority: &str) -> bool {
    let (host, port) = split_authority(domain.rsplit_once('@').map_or(domain, |(_, d)| d));
    let (our_host, our_port) = split_authority(authority);
    let ports_match = match (port, our_port) {
        (Some(p), Some(q)) => p == q,
        (None, Some(q)) => q == "443" || q == "80",
        (_, None) => true,
    };
    ports_match && host.eq_ignore_ascii_case(our_host)
}

/// `host` and `port` of an authority; IPv6 hosts lose their brackets.
fn split_authority(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (host, after.strip_prefix(':'));
    }
    match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    }
}

/// Server text quoted in a refusal: cut, control characters removed.
fn shorten(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(80).collect()
}

#[cfg(test)]
#[path = "challenge_tests.rs"]
mod tests;
