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
    vet_at(policy, c, now, None)
}

/// As [`vet_with`], with a sane local clock reading `local`.
fn vet_at(
    policy: ChallengePolicy,
    c: &Challenge,
    now: Option<i64>,
    local: Option<i64>,
) -> Result<Vetted, ChallengeRefusal> {
    let identity = ours();
    vet(
        policy,
        c,
        &Expected {
            identity: &identity,
            ours: key().address(),
            host: "orchestrator.example:443",
            server_now: now.map(ts),
            local_now: local.map(ts),
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
        "https://Orchestrator.Example:443 wants you to sign in with your Ethereum account:\n0x8e2e0a5a9dd8c4ad2ec4c3a8e6b0bbf3d3b3e5f1".to_owned(),
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
    assert!(standard(&siwe("orchestrator.example:443")).is_ok());
    assert!(same_host("[::1]:8080", "[::1]:8080"));
    assert!(same_host("[::1]", "[::1]:443"));
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

/// #22.14: `strict` applies every rule of `standard`, and its own format's
/// free fields cannot carry what `standard` refuses.
#[test]
fn strict_applies_every_rule_of_standard_to_our_own_format() {
    let ours_with = |orchestrator: &str, expires: i64| {
        let mut c = challenge("did:peaq:4242");
        let message = ChallengeMessage {
            orchestrator: orchestrator.into(),
            identity: ours(),
            challenge_id: "chl_1".into(),
            nonce: "ab".repeat(16),
            issued_at: ts(NOW),
            expires_at: ts(expires),
        };
        c.message = message.render();
        c.expires_at = ts(expires);
        c
    };
    let strict = |c: &Challenge| vet_with(ChallengePolicy::Strict, c, Some(NOW));
    let fine = NOW + 300_000;
    assert!(strict(&ours_with("peaqos-orchestrator", fine)).is_ok());
    assert!(strict(&ours_with("Fleet orchestrator (hall 3)", fine)).is_ok());
    refused_by(
        strict(&ours_with(&format!("tx 0x{}", "02f8".repeat(59)), fine)),
        Rule::LongHex,
    );
    refused_by(
        strict(&ours_with("fleet\u{202e}evil", fine)),
        Rule::Printable,
    );
    refused_by(strict(&ours_with("fleet\u{061c}", fine)), Rule::Printable);
    refused_by(strict(&ours_with(&"Pay ".repeat(1300), fine)), Rule::Size);
    let pay = "Transfer 500 USDC to 0x8e2e0a5a9dd8c4ad2ec4c3a8e6b0bbf3d3b3e5f1 and approve";
    let text = refused_by(strict(&ours_with(pay, fine)), Rule::Format);
    assert!(text.contains("Orchestrator"), "{text}");
    refused_by(strict(&ours_with(&"ab ".repeat(67), fine)), Rule::Format);
    // Expires At in 2099: the expiry rule, as for `standard`.
    let far = 4_070_908_800_000;
    refused_by(strict(&ours_with("peaqos-orchestrator", far)), Rule::Expiry);
    // The text's Expires At must be the challenge's.
    let mut lying = ours_with("peaqos-orchestrator", far);
    lying.expires_at = ts(fine);
    refused_by(strict(&lying), Rule::Format);
}

/// #22.15: invisible and bidirectional characters by Unicode category.
#[test]
fn invisible_characters_are_refused_by_their_unicode_category() {
    for bad in [
        '\u{061c}',   // Arabic letter mark (Cf)
        '\u{00ad}',   // soft hyphen (Cf)
        '\u{e0001}',  // language tag (Cf)
        '\u{e0041}',  // tag latin capital A (Cf)
        '\u{e0000}',  // unassigned in the tag block (Cn)
        '\u{2028}',   // line separator (Zl)
        '\u{2029}',   // paragraph separator (Zp)
        '\u{e000}',   // private use (Co)
        '\u{10ffff}', // noncharacter (Cn)
        '\u{2066}',   // left-to-right isolate (Cf)
        '\u{180e}',   // Mongolian vowel separator (Cf)
        '\u{85}',     // next line (Cc)
    ] {
        let text = refused_by(
            standard(&format!("Sign this nonce{bad}: 42")),
            Rule::Printable,
        );
        assert!(
            text.contains(&format!("U+{:04X}", u32::from(bad))),
            "{text}"
        );
    }
    // Letters, marks, symbols and spaces of every script are text.
    assert!(standard("Signez ceci · 署名 · עברית · नमस्ते · e\u{301} · 🤖 · a\u{00a0}b").is_ok());
}

/// #22.16: a sane local clock bounds the expiry too, whatever the server's
/// `Date` says; a clock before the floor is not used (`local_now` None).
#[test]
fn a_sane_local_clock_bounds_the_expiry_too() {
    let mut c = challenge("did:peaq:4242");
    c.expires_at = ts(NOW + 2 * 3_600_000);
    // No Date header: refused by the local clock.
    let text = refused_by(
        vet_at(ChallengePolicy::Standard, &c, None, Some(NOW)),
        Rule::Expiry,
    );
    assert!(text.contains("this machine's clock"), "{text}");
    // A Date 90 minutes ahead: the server's clock allows it, ours does not.
    refused_by(
        vet_at(
            ChallengePolicy::Standard,
            &c,
            Some(NOW + 5_400_000),
            Some(NOW),
        ),
        Rule::Expiry,
    );
    // What remains without a sane local clock: the server's word.
    assert!(vet_at(ChallengePolicy::Standard, &c, Some(NOW + 5_400_000), None).is_ok());
    assert!(vet_at(ChallengePolicy::Standard, &c, None, None).is_ok());
    // A local clock a little ahead never refuses a fresh challenge.
    let fresh = challenge("did:peaq:4242");
    assert!(
        vet_at(
            ChallengePolicy::Standard,
            &fresh,
            Some(NOW),
            Some(NOW + 600_000)
        )
        .is_ok()
    );
    assert!(vet_at(ChallengePolicy::Standard, &fresh, None, Some(NOW)).is_ok());
}

/// #22.17: the near misses of the text rules, each decided (docs/security.md).
#[test]
fn near_misses_of_the_text_rules_are_decided() {
    // Sign-In-With-Ethereum for our host on another port: another service
    // on the same host, so refused.
    let siwe = |domain: &str| {
        format!(
            "{domain} wants you to sign in with your Ethereum account:\n\
             0x8e2e0a5a9dd8c4ad2ec4c3a8e6b0bbf3d3b3e5f1\n\nNonce: 1"
        )
    };
    refused_by(
        standard(&siwe("orchestrator.example:8443")),
        Rule::SignInDomain,
    );
    refused_by(
        standard(&siwe("https://orchestrator.example:3000")),
        Rule::SignInDomain,
    );
    assert!(standard(&siwe("orchestrator.example:443")).is_ok());
    assert!(same_host(
        "orchestrator.example:8443",
        "orchestrator.example:8443"
    ));
    assert!(!same_host(
        "orchestrator.example",
        "orchestrator.example:8443"
    ));

    // A transaction's hex without 0x inside prose: refused past 64 digits.
    let tx = format!("Please sign {} to continue", "02f86c01".repeat(29) + "0a00");
    let text = refused_by(standard(&tx), Rule::LongHex);
    assert!(text.contains("236 hex digits"), "{text}");
    assert!(standard(&format!("Nonce {} ok", "ab".repeat(32))).is_ok());

    // Base64 inside prose: refused past 88 characters (64 bytes); a nonce
    // or a signature's length is fine.
    let payload = "eyJ0eXBlIjoidHJhbnNmZXIiLCJ0byI6IjB4YWIiLCJ2YWx1ZSI6IjEwMDAwMDAwMDAwMDAwMDAwMDAwIiwiZGF0YSI6IjB4In0=";
    let text = refused_by(
        standard(&format!("Sign to continue: {payload}.")),
        Rule::EncodedPayload,
    );
    assert!(text.contains("base64"), "{text}");
    assert!(standard("Nonce: q83vEjRWeJASNFZ4kBI0Vng= (base64)").is_ok());
}
