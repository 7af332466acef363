use std::path::Path;

use super::*;

pub(super) const MAIN: &str = r#"
[identity]
ref = "peaqos:machine:4242"
key_file = "/etc/peaqos-agent/controller.key"

[orchestrator]
url = "http://127.0.0.1:8080"

[machine]
display_name = "robot 7"
owner_id = "owner-1"
machine_type = "robot"
runtime_profile = "ros2"
labels = { site = "berlin" }
"#;

fn load(files: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_texts(
        files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
            .collect(),
    )
}

fn invalid(err: ConfigError) -> (Location, String, String) {
    match err {
        ConfigError::Invalid {
            location,
            key,
            message,
        } => (location, key, message),
        other => panic!("expected Invalid, got {other}"),
    }
}

#[test]
fn minimal_file_gets_defaults_and_canonical_identity() {
    let c = load(&[("agent.toml", MAIN)]).unwrap();
    assert_eq!(
        c.identity.as_ref().unwrap().identity_ref.canonical(),
        "did:peaq:4242"
    );
    assert_eq!(c.state.dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(c.renewal.check_interval, Duration::from_secs(300));
    assert_eq!(c.renewal.renew_before, None);
    assert!(!c.mqtt.enabled);
    assert_eq!(c.machine.as_ref().unwrap().capabilities, None);
    assert_eq!(c.files, vec![PathBuf::from("agent.toml")]);
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = MAIN.replace("[machine]\n", "[machine]\ncolour = \"red\"\n");
    let (loc, key, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
    assert_eq!(loc.file, PathBuf::from("agent.toml"));
    assert_eq!(loc.line, 10, "{loc}");
    assert!(key.starts_with("machine"), "{key}");
    assert!(message.contains("colour"), "{message}");
}

#[test]
fn bad_value_in_a_drop_in_is_reported_against_the_drop_in() {
    let drop_in = "# tune\n[renewal]\ncheck_interval = \"soon\"\n";
    let err = load(&[("agent.toml", MAIN), ("agent.d/10-renew.toml", drop_in)]).unwrap_err();
    let text = err.to_string();
    let (loc, key, message) = invalid(err);
    assert_eq!(loc.file, PathBuf::from("agent.d/10-renew.toml"));
    assert_eq!((loc.line, loc.column), (3, 18), "{text}");
    assert_eq!(key, "renewal.check_interval");
    assert!(message.contains("invalid duration"), "{message}");
    assert!(
        text.starts_with("agent.d/10-renew.toml:3:18: `renewal.check_interval`"),
        "{text}"
    );
}

#[test]
fn drop_ins_merge_tables_and_later_files_win() {
    let a = "[machine]\ndisplay_name = \"renamed\"\nlabels = { zone = \"a\" }\n[renewal]\nbackoff_max = 60\n";
    let b = "[renewal]\nbackoff_max = \"2m\"\nslow_retry = \"90s\"\n";
    let c = load(&[("agent.toml", MAIN), ("a.toml", a), ("b.toml", b)]).unwrap();
    assert_eq!(c.machine.as_ref().unwrap().display_name, "renamed");
    assert_eq!(
        c.machine.as_ref().unwrap().owner_id,
        "owner-1",
        "untouched keys survive"
    );
    // Maps are tables: merged key by key.
    let labels = c.machine.unwrap().labels.unwrap();
    assert_eq!(labels.get("site").map(String::as_str), Some("berlin"));
    assert_eq!(labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(c.renewal.backoff_max, Duration::from_secs(120));
    assert_eq!(c.renewal.slow_retry, Duration::from_secs(90));
    assert_eq!(c.files.len(), 3);
}

#[test]
fn challenge_policy_defaults_to_standard_and_refuses_unknown_names() {
    use crate::registration::challenge::ChallengePolicy;
    let c = load(&[("agent.toml", MAIN)]).unwrap();
    assert_eq!(c.orchestrator.challenge_policy, None);
    assert!(!c.orchestrator.standard_over_plain_http);
    let strict = "[orchestrator]\nchallenge_policy = \"strict\"\n";
    let c = load(&[("agent.toml", MAIN), ("s.toml", strict)]).unwrap();
    assert_eq!(
        c.orchestrator.challenge_policy,
        Some(ChallengePolicy::Strict)
    );
    assert_eq!(
        c.orchestrator.effective_policy().to_string(),
        "strict (configured)"
    );
    let bad = "[orchestrator]\nchallenge_policy = \"lax\"\n";
    let (loc, key, message) = invalid(load(&[("agent.toml", MAIN), ("b.toml", bad)]).unwrap_err());
    assert_eq!(
        (loc.line, key.as_str()),
        (2, "orchestrator.challenge_policy")
    );
    assert!(
        message.contains("standard") && message.contains("strict"),
        "{message}"
    );
}

#[test]
fn syntax_error_names_the_line() {
    let err = load(&[("agent.toml", MAIN), ("z.toml", "\n\n[state\n")]).unwrap_err();
    match err {
        ConfigError::Syntax { location, .. } => {
            assert_eq!(location.file, PathBuf::from("z.toml"));
            assert_eq!(location.line, 3);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn bad_identity_url_and_empty_fields_are_refused_where_they_are() {
    let cases = [
        (
            "ref = \"peaqos:machine:4242\"",
            "ref = \"did:peaq:007\"",
            "identity.ref",
            3,
        ),
        (
            "url = \"http://127.0.0.1:8080\"",
            "url = \"ftp://x\"",
            "orchestrator.url",
            7,
        ),
        (
            "owner_id = \"owner-1\"",
            "owner_id = \" \"",
            "machine.owner_id",
            11,
        ),
        (
            "url = \"http://127.0.0.1:8080\"",
            "url = \"http://u:p@h/\"",
            "orchestrator.url",
            7,
        ),
    ];
    for (from, to, want_key, want_line) in cases {
        let text = MAIN.replace(from, to);
        let (loc, key, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
        assert_eq!(key, want_key, "{message}");
        assert_eq!(loc.line, want_line, "{key}: {message}");
    }
}

#[test]
fn missing_section_and_zero_durations_are_refused() {
    let text = MAIN.replace("[orchestrator]\nurl = \"http://127.0.0.1:8080\"\n", "");
    let (_, _, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
    assert!(message.contains("orchestrator"), "{message}");
    let text = format!("{MAIN}\n[renewal]\nbackoff_initial = \"0s\"\n");
    let (_, key, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
    assert_eq!(key, "renewal.backoff_initial");
    assert!(message.contains("longer than zero"), "{message}");
}

#[test]
fn cross_key_rules_name_the_key_and_its_file() {
    let drop_in = "[renewal]\nbackoff_max = \"1s\"\nbackoff_initial = \"5s\"\n";
    let (loc, key, message) =
        invalid(load(&[("agent.toml", MAIN), ("d.toml", drop_in)]).unwrap_err());
    assert_eq!(key, "renewal.backoff_initial");
    assert_eq!((loc.file.to_str(), loc.line), (Some("d.toml"), 3));
    assert!(message.contains("backoff_max (1s)"), "{message}");
}

#[test]
fn the_shipped_example_is_valid() {
    let text = include_str!("../../config/agent.example.toml");
    let c = load(&[("agent.example.toml", text)]).unwrap();
    assert_eq!(
        c.identity.as_ref().unwrap().key_file.as_deref(),
        Some("credential:controller-key")
    );
    assert_eq!(c.renewal.backoff_max, Duration::from_secs(300));
    assert!(!c.mqtt.enabled);
}

#[test]
fn orchestrator_tls_files_are_checked_together() {
    let https = MAIN.replace(
        "url = \"http://127.0.0.1:8080\"",
        "url = \"https://orchestrator.fleet.example\"",
    );
    let with = |keys: &str| {
        https.replace(
            "url = \"https://orchestrator.fleet.example\"",
            &format!("url = \"https://orchestrator.fleet.example\"\n{keys}"),
        )
    };
    let ok = load(&[(
        "agent.toml",
        &with(
            "ca_file = \"/etc/peaqos-agent/orchestrator-ca.pem\"\n\
             client_cert_file = \"/etc/peaqos-agent/client.pem\"\n\
             client_key_file = \"credential:orchestrator-client-key\"",
        ),
    )]);
    if cfg!(feature = "tls") {
        let c = ok.unwrap();
        let o = &c.orchestrator;
        assert_eq!(
            o.ca_file.as_deref(),
            Some(Path::new("/etc/peaqos-agent/orchestrator-ca.pem"))
        );
        assert_eq!(
            o.client_key_file.as_deref(),
            Some("credential:orchestrator-client-key")
        );
    } else {
        let (_, key, message) = invalid(ok.unwrap_err());
        assert_eq!(key, "orchestrator.url", "{message}");
    }

    let cases = [
        (
            with("client_cert_file = \"/c.pem\"\nca_file = \"/ca.pem\""),
            "orchestrator.client_key_file",
            "client_key_file is needed",
        ),
        (
            with("client_key_file = \"/k.pem\"\nca_file = \"/ca.pem\""),
            "orchestrator.client_cert_file",
            "client_cert_file is needed",
        ),
        (
            with("client_cert_file = \"/c.pem\"\nclient_key_file = \"/k.pem\""),
            "orchestrator.ca_file",
            "needs ca_file",
        ),
        (
            MAIN.replace(
                "url = \"http://127.0.0.1:8080\"",
                "url = \"http://127.0.0.1:8080\"\nca_file = \"/ca.pem\"",
            ),
            "orchestrator.ca_file",
            if cfg!(feature = "tls") {
                "only used with an https:// url"
            } else {
                "built without the `tls` feature"
            },
        ),
        (
            with("ca_file = \"\""),
            "orchestrator.ca_file",
            "must not be empty",
        ),
    ];
    for (text, want_key, want) in cases {
        if !cfg!(feature = "tls") && text.contains("https://") {
            // Such a build refuses the https url itself first.
            continue;
        }
        let (loc, key, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
        assert_eq!(key, want_key, "{message}");
        assert!(message.contains(want), "{key}: {message}");
        assert_eq!(loc.file, PathBuf::from("agent.toml"));
    }
}

#[test]
fn secrets_are_not_accepted_inline() {
    let text = MAIN.replace(
        "url = \"http://127.0.0.1:8080\"",
        "url = \"http://127.0.0.1:8080\"\napi_key = \"hunter2\"",
    );
    let err = load(&[("agent.toml", &text)]).unwrap_err();
    let (_, _, message) = invalid(err);
    assert!(message.contains("api_key"), "{message}");
}

#[test]
fn a_key_in_a_token_sits_beside_key_file_and_wins() {
    const URI: &str =
        "pkcs11:token=robot;object=controller?module-path=/usr/lib/softhsm/libsofthsm2.so";
    // A drop-in moves the packaged configuration to a token.
    let drop_in = format!("[identity]\nkey = \"{URI}\"\nkey_pin_file = \"credential:token-pin\"\n");
    let c = load(&[("agent.toml", MAIN), ("agent.d/50-token.toml", &drop_in)]).unwrap();
    match c.identity.as_ref().unwrap().key_source() {
        KeySource::Token { uri, pin } => {
            assert_eq!(uri.token.as_deref(), Some("robot"));
            assert_eq!(pin.as_deref(), Some("credential:token-pin"));
        }
        other @ KeySource::File { .. } => panic!("{other:?}"),
    }
    // Without it, the key file as before.
    let c = load(&[("agent.toml", MAIN)]).unwrap();
    assert!(matches!(
        c.identity.as_ref().unwrap().key_source(),
        KeySource::File {
            location: "/etc/peaqos-agent/controller.key",
            password: None
        }
    ));
}

#[test]
fn token_key_mistakes_are_refused_at_load_with_the_key_named() {
    const URI: &str =
        "pkcs11:token=robot;object=controller?module-path=/usr/lib/softhsm/libsofthsm2.so";
    let with = |identity: &str| {
        MAIN.replace(
            "key_file = \"/etc/peaqos-agent/controller.key\"\n",
            identity,
        )
    };
    let cases = [
        (with(""), "identity.key_file", "set key_file"),
        (
            with(&format!("key_file = \"{URI}\"\n")),
            "identity.key_file",
            "goes in [identity] key",
        ),
        (
            with(&format!("key = \"{URI}\"\n")),
            "identity.key",
            "needs a PIN",
        ),
        (
            with(&format!(
                "key = \"{URI}&pin-source=/p\"\nkey_pin_file = \"/q\"\n"
            )),
            "identity.key_pin_file",
            "keep one",
        ),
        (
            with(&format!("key = \"{URI}&pin-value=1234\"\n")),
            "identity.key",
            "pin-value would put the PIN",
        ),
        (
            with("key_file = \"/k\"\nkey_pin_file = \"/q\"\n"),
            "identity.key_pin_file",
            "only used with a key in a token",
        ),
    ];
    for (text, want_key, want) in cases {
        let (loc, key, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
        assert_eq!(key, want_key, "{text}");
        // A missing key is reported at its table's header (line 2), the
        // others at their own line.
        let line = text
            .lines()
            .position(|l| l.starts_with(want_key.trim_start_matches("identity.")))
            .map_or(2, |i| i + 1);
        assert_eq!(loc.line, line, "{loc}: {text}");
        assert!(message.contains(want), "{message}");
        assert!(!message.contains("1234"), "{message}");
    }
}
