use peaqos_protocol::SecretKey;

use super::*;

const DOC_KEY: &str = "b25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364";
const NOW: i64 = 1_780_000_000_000;

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(ms).unwrap()
}

fn key() -> SecretKey {
    SecretKey::from_hex(DOC_KEY).unwrap()
}

fn ours() -> IdentityRef {
    IdentityRef::parse("did:peaq:4242").unwrap()
}

/// A challenge in our own format for `identity`, expiring in 5 minutes.
fn challenge(identity: &str) -> Challenge {
    let identity = IdentityRef::parse(identity).unwrap();
    let message = ChallengeMessage {
        orchestrator: "test".into(),
        identity: identity.clone(),
        challenge_id: "chl_1".into(),
        nonce: "ab".repeat(16),
        issued_at: ts(NOW),
        expires_at: ts(NOW + 300_000),
    };
    Challenge {
        challenge_id: "chl_1".into(),
        identity_ref: identity,
        message: message.render(),
        expires_at: ts(NOW + 300_000),
        verification_method: ProofMethod::Eip191,
        controller_addresses: vec![key().address()],
    }
}

fn with_text(text: &str) -> Challenge {
    let mut c = challenge("did:peaq:4242");
    c.message = text.to_owned();
    c
}

fn vet_with(
    policy: ChallengePolicy,
    c: &Challenge,
    now: Option<i64>,
) -> Result<Vetted, ChallengeRefusal> {
    let identity = ours();
    vet(
        policy,
        c,
        &Expected {
            identity: &identity,
            ours: key().address(),
            host: "orchestrator.example",
            server_now: now.map(ts),
        },
    )
}

fn standard(text: &str) -> Result<Vetted, ChallengeRefusal> {
    vet_with(ChallengePolicy::Standard, &with_text(text), Some(NOW))
}

#[track_caller]
fn refused_by(r: Result<Vetted, ChallengeRefusal>, want: Rule) -> String {
    match r {
        Err(ChallengeRefusal::Refused { rule, detail }) => {
            assert_eq!(rule, want, "{detail}");
            let text = refuse(rule, detail).to_string();
            assert!(text.contains(want.as_str()), "{text}");
            text
        }
        other => panic!("expected a refusal by {want:?}, got {other:?}"),
    }
}

#[test]
fn texts_real_orchestrators_send_are_signed_by_default() {
    let id = "did:peaq:4242";
    let texts = [
        "Sign this nonce: 8f14e45fceea167a5a36dedd4bea2543".to_owned(),
        format!("Sign in to Fleet Manager\nIdentity: {id}\nNonce: 7f1e0c\nIssued: 2026-12-02T06:00:00Z"),
        "Welcome to peaqOS!\r\n\r\nClick to sign in and accept the Terms of Service.\r\n\r\nThis request will not trigger a blockchain transaction or cost any gas fees.\r\n\r\nWallet address:\r\n0x8e2e0a5a9dd8c4ad2ec4c3a8e6b0bbf3d3b3e5f1\r\n\r\nNonce:\r\n3f2b0c1e-6a4e-4bd0-9c8a-2a8f3c1e9d77".to_owned(),
        "orchestrator.example wants you to sign in with your Ethereum account:\n0x8e2e0a5a9dd8c4ad2ec4c3a8e6b0bbf3d3b3e5f1\n\nURI: https://orchestrator.example\nVersion: 1\nChain ID: 3338\nNonce: 32891756\nIssued At: 2026-12-02T06:00:00Z".to_owned(),
        "https://Orchestrator.Example:8443 wants you to sign in with your Ethereum account:\n0x8e2e0a5a9dd8c4ad2ec4c3a8e6b0bbf3d3b3e5f1".to_owned(),
        "Prove control of machine did:peaq:4242, challenge 0x9c22ff5f21f0b81b113e63f7db6da94fedef11b2119b4088b89664fb9a3cb658\tthanks".to_owned(),
        "Anmeldung bestätigen · 署名してください · nonce 42".to_owned(),
        challenge(id).message,
    ];
    for text in &texts {
        assert_eq!(standard(text), Ok(Vetted { issued_at: None }), "{text}");
    }
}

#[test]
fn the_challenge_must_be_bound_to_us() {
    let mut other = challenge("did:peaq:7");
    let text = refused_by(
        vet_with(ChallengePolicy::Standard, &other, Some(NOW)),
        Rule::Identity,
    );
    assert!(
        text.contains("did:peaq:7") && text.contains("did:peaq:4242"),
        "{text}"
    );
    // Any accepted spelling of our identity is ours.
    other.identity_ref = IdentityRef::parse("peaqos:machine:4242").unwrap();
    assert!(vet_with(ChallengePolicy::Standard, &other, Some(NOW)).is_ok());

    let mut method = challenge("did:peaq:4242");
    method.verification_method = ProofMethod::Other("eip712".into());
    let text = refused_by(
        vet_with(ChallengePolicy::Standard, &method, Some(NOW)),
        Rule::Method,
    );
    assert!(text.contains("eip712"), "{text}");

    let mut not_ours = challenge("did:peaq:4242");
    not_ours.controller_addresses =
        vec![Address::parse("0x0000000000000000000000000000000000000001").unwrap()];
    for policy in [ChallengePolicy::Standard, ChallengePolicy::Strict] {
        assert!(matches!(
            vet_with(policy, &not_ours, Some(NOW)),
            Err(ChallengeRefusal::NotController { .. })
        ));
    }
}

#[test]
fn the_challenge_expires_minutes_ahead_on_the_servers_clock() {
    let c = challenge("did:peaq:4242");
    let at = |expires: i64, now: Option<i64>| {
        let mut c = c.clone();
        c.expires_at = ts(expires);
        vet_with(ChallengePolicy::Standard, &c, now)
    };
    assert!(at(NOW + 1_000, Some(NOW)).is_ok());
    assert!(
        at(NOW + 3_600_000, Some(NOW)).is_ok(),
        "an hour is the limit"
    );
    refused_by(at(NOW, Some(NOW)), Rule::Expiry);
    refused_by(at(NOW - 60_000, Some(NOW)), Rule::Expiry);
    let text = refused_by(at(NOW + 3_600_001, Some(NOW)), Rule::Expiry);
    assert!(text.contains("60 min"), "{text}");
    // No server clock (no Date header): the server's verdict decides.
    assert!(at(NOW - 60_000, None).is_ok());
    assert!(at(NOW + 86_400_000, None).is_ok());
}

#[test]
fn text_must_be_printable_non_empty_and_bounded() {
    refused_by(standard(""), Rule::Empty);
    refused_by(standard(" \n\t "), Rule::Empty);
    let long = "Sign this. ".repeat(180);
    assert!(long.len() <= MAX_TEXT && standard(&long).is_ok());
    let text = refused_by(
        standard(&format!("{long}{}", "x".repeat(MAX_TEXT))),
        Rule::Size,
    );
    assert!(text.contains("2048"), "{text}");
    for bad in [
        "nonce\u{0}42",
        "a\u{1b}[31m red",
        "pay\u{202e}evil",
        "zero\u{200b}width",
        "del\u{7f}",
    ] {
        refused_by(standard(&format!("Sign this: {bad}")), Rule::Printable);
    }
    assert!(standard("line one\r\nline two\ttabbed").is_ok());
}

#[test]
fn encoded_payloads_are_refused() {
    let text = refused_by(standard("0xdeadbeef"), Rule::HexPayload);
    assert!(text.contains("8 hex digits"), "{text}");
    refused_by(standard(" 0X02f86c0180843b9aca00 \n"), Rule::HexPayload);
    refused_by(standard("0x"), Rule::HexPayload);
    refused_by(
        standard("9c22ff5f21f0b81b113e63f7db6da94fedef11b2119b4088b89664fb9a3cb658"),
        Rule::EncodedPayload,
    );
    refused_by(
        standard("eyJ0eXBlIjoidHJhbnNmZXIiLCJ0byI6IjB4YWIifQ=="),
        Rule::EncodedPayload,
    );
    // Short words and words with other characters are text.
    assert!(standard("hello-world").is_ok());
    assert!(standard("nonce:8f14e45fceea167a5a36dedd4bea2543").is_ok());
}

#[test]
fn json_and_typed_data_are_refused() {
    let permit = r#"{"types":{"EIP712Domain":[]},"domain":{"name":"USDC"},"primaryType":"Permit","message":{"spender":"0xdead","value":"1000000"}}"#;
    refused_by(standard(permit), Rule::TypedData);
    refused_by(standard(&format!("\n  {permit}\n")), Rule::TypedData);
    refused_by(standard(r#"{"to":"0xdead","value":"0x1"}"#), Rule::Json);
    refused_by(standard("[1, 2, 3]"), Rule::Json);
    // A JSON string or number is text; braces in prose are not JSON.
    assert!(standard(r#""sign me please""#).is_ok());
    assert!(standard("Sign {this} nonce: 42").is_ok());
}

#[test]
fn transaction_sized_hex_is_refused() {
    let hash = format!("Challenge 0x{}", "ab".repeat(32));
    assert!(standard(&hash).is_ok(), "a 32-byte nonce or hash is fine");
    let calldata = format!(
        "Approve call data=0xa9059cbb{}{} now",
        "0".repeat(24) + &"de".repeat(20),
        "0".repeat(64)
    );
    let text = refused_by(standard(&calldata), Rule::LongHex);
    assert!(text.contains("136 hex digits"), "{text}");
}

#[test]
fn sign_in_for_another_domain_is_refused() {
    let siwe = |domain: &str| {
        format!(
            "{domain} wants you to sign in with your Ethereum account:\n\
             0x8e2e0a5a9dd8c4ad2ec4c3a8e6b0bbf3d3b3e5f1\n\nURI: https://{domain}\nNonce: 1"
        )
    };
    let text = refused_by(standard(&siwe("app.uniswap.org")), Rule::SignInDomain);
    assert!(
        text.contains("app.uniswap.org") && text.contains("orchestrator.example"),
        "{text}"
    );
    refused_by(
        standard(&siwe("orchestrator.example.evil.io")),
        Rule::SignInDomain,
    );
    refused_by(standard(&siwe("https://evil.io")), Rule::SignInDomain);
    assert!(standard(&siwe("orchestrator.example")).is_ok());
    assert!(standard(&siwe("orchestrator.example:8443")).is_ok());
    assert!(same_host("[::1]:8080", "[::1]"));
    assert!(!same_host(
        "orchestrator.example@evil.io",
        "orchestrator.example"
    ));
}

#[test]
fn strict_accepts_only_our_format_for_this_challenge() {
    let good = challenge("did:peaq:4242");
    assert_eq!(
        vet_with(ChallengePolicy::Strict, &good, Some(NOW)),
        Ok(Vetted {
            issued_at: Some(ts(NOW))
        })
    );
    let text = refused_by(
        vet_with(
            ChallengePolicy::Strict,
            &with_text("Sign this nonce: 8f14e45fceea167a5a36dedd4bea2543"),
            Some(NOW),
        ),
        Rule::Format,
    );
    assert!(text.contains("strict"), "{text}");

    let mut other_identity = challenge("did:peaq:7");
    other_identity.identity_ref = ours();
    refused_by(
        vet_with(ChallengePolicy::Strict, &other_identity, Some(NOW)),
        Rule::Format,
    );
    let mut other_id = good;
    other_id.challenge_id = "chl_2".into();
    refused_by(
        vet_with(ChallengePolicy::Strict, &other_id, Some(NOW)),
        Rule::Format,
    );
}

#[test]
fn standard_falls_back_to_strict_over_plain_http_to_another_host() {
    let url = |u: &str| reqwest::Url::parse(u).unwrap();
    let lan = url("http://10.0.0.5:8080");
    let e = effective(None, &lan, false);
    assert_eq!(e.policy, ChallengePolicy::Strict);
    assert!(e.reason.contains("10.0.0.5") && e.reason.contains("standard_over_plain_http"));
    assert_eq!(
        effective(Some(ChallengePolicy::Standard), &lan, false).policy,
        ChallengePolicy::Strict
    );
    assert_eq!(
        effective(None, &lan, true).policy,
        ChallengePolicy::Standard
    );
    for local in ["http://127.0.0.1:1", "http://localhost/", "http://[::1]:80"] {
        let e = effective(None, &url(local), false);
        assert_eq!(
            (e.policy, e.reason.as_str()),
            (ChallengePolicy::Standard, "default"),
            "{local}"
        );
    }
    let tls = effective(None, &url("https://orchestrator.example"), false);
    assert_eq!(tls.policy, ChallengePolicy::Standard);
    let strict = effective(
        Some(ChallengePolicy::Strict),
        &url("https://o.example"),
        true,
    );
    assert_eq!(
        (strict.policy, strict.reason.as_str()),
        (ChallengePolicy::Strict, "configured")
    );
    assert_eq!(strict.to_string(), "strict (configured)");
}
