//! Loading settings: defaults, file, environment, and the errors that name
//! the setting.

use std::collections::HashMap;
use std::io::Write;

use super::*;

/// Settings from `file` and the variables `vars` (shared with `env_files`).
pub(super) fn from(file: Option<&Path>, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_sources(file, |k| map.get(k).cloned())
}

#[test]
fn defaults_are_the_documented_ones() {
    let c = from(None, &[]).unwrap();
    assert_eq!(c.listen_addr.to_string(), "127.0.0.1:8080");
    assert_eq!(c.challenge_ttl, Duration::from_mins(5));
    assert_eq!(c.proof_max_age, None);
    assert_eq!(c.verification, VerificationMode::Required);
    assert!(!c.require_api_auth);
    assert_eq!(
        c.database_url,
        "sqlite:///var/lib/peaqos-orchestrator/orchestrator.db"
    );
    let c = from(None, &[("STATE_DIRECTORY", "/run/x:/run/y")]).unwrap();
    assert_eq!(c.database_url, "sqlite:///run/x/orchestrator.db");
}

#[test]
fn environment_overrides_the_file() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        f,
        "challenge_ttl_secs = 60\nproof_max_age_secs = 86400\nlisten_addr = \"0.0.0.0:9000\""
    )
    .unwrap();
    let c = from(Some(f.path()), &[("PEAQOS_CHALLENGE_TTL_SECS", "120")]).unwrap();
    assert_eq!(c.challenge_ttl, Duration::from_mins(2));
    assert_eq!(c.proof_max_age, Some(Duration::from_hours(24)));
    assert_eq!(c.listen_addr.port(), 9000);
}

#[test]
fn bad_values_name_the_setting_in_one_line() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("PEAQOS_CHALLENGE_TTL_SECS", "5m")],
            "PEAQOS_CHALLENGE_TTL_SECS",
        ),
        (
            &[("PEAQOS_CHALLENGE_TTL_SECS", "0")],
            "PEAQOS_CHALLENGE_TTL_SECS",
        ),
        (&[("PEAQOS_LISTEN_ADDR", "localhost")], "PEAQOS_LISTEN_ADDR"),
        (
            &[
                ("PEAQOS_MAX_CONNECTIONS", "100"),
                ("PEAQOS_MAX_STREAMS", "100"),
            ],
            "PEAQOS_MAX_STREAMS",
        ),
        (
            &[("PEAQOS_MAX_STREAMS_PER_CLIENT", "0")],
            "PEAQOS_MAX_STREAMS_PER_CLIENT",
        ),
        (
            &[("PEAQOS_WRITE_TIMEOUT_SECS", "0")],
            "PEAQOS_WRITE_TIMEOUT_SECS",
        ),
        (
            &[("PEAQOS_MACHINE_IDENTITY_VERIFICATION", "maybe")],
            "PEAQOS_MACHINE_IDENTITY_VERIFICATION",
        ),
        (
            &[("PEAQOS_REQUIRE_API_AUTH", "true")],
            "PEAQOS_API_KEYS_FILE",
        ),
        (
            &[("PEAQOS_REQUIRE_API_AUTH", "yes please")],
            "PEAQOS_REQUIRE_API_AUTH",
        ),
        (&[("PEAQOS_MCR_API_URL", "ftp://x")], "PEAQOS_MCR_API_URL"),
        (&[("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
        (
            &[("DATABASE_URL", "postgres://u:secret@h:99999/db")],
            "DATABASE_URL",
        ),
        (
            &[("PEAQOS_DB_MAX_CONNECTIONS", "0")],
            "PEAQOS_DB_MAX_CONNECTIONS",
        ),
        (
            &[("PEAQOS_DB_MAX_CONNECTIONS", "many")],
            "PEAQOS_DB_MAX_CONNECTIONS",
        ),
        (
            &[("PEAQOS_DB_ACQUIRE_TIMEOUT_MS", "0")],
            "PEAQOS_DB_ACQUIRE_TIMEOUT_MS",
        ),
        (
            &[
                ("PEAQOS_DB_ACQUIRE_TIMEOUT_MS", "5000"),
                ("PEAQOS_REQUEST_TIMEOUT_SECS", "5"),
            ],
            "PEAQOS_DB_ACQUIRE_TIMEOUT_MS",
        ),
        (
            &[("PEAQOS_DB_STATEMENT_TIMEOUT_MS", "5s")],
            "PEAQOS_DB_STATEMENT_TIMEOUT_MS",
        ),
        (
            &[("PEAQOS_DB_STATEMENT_TIMEOUT_MS", "0")],
            "PEAQOS_DB_STATEMENT_TIMEOUT_MS",
        ),
        (
            &[("PEAQOS_PROOF_MAX_AGE_SECS", "0")],
            "PEAQOS_PROOF_MAX_AGE_SECS",
        ),
        (
            &[("PEAQOS_ORCHESTRATOR_NAME", "a\nb")],
            "PEAQOS_ORCHESTRATOR_NAME",
        ),
        (
            &[
                ("PEAQOS_MCR_API_URL", "https://mcr.example"),
                ("PEAQOS_MCR_REGISTRY_FILE", "/etc/r.toml"),
            ],
            "PEAQOS_MCR_API_URL",
        ),
    ];
    for (vars, setting) in cases {
        let err = from(None, vars).unwrap_err().to_string();
        assert!(err.starts_with(setting), "{vars:?}: {err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }
}

#[test]
fn postgres_settings_and_a_password_that_never_shows() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        f,
        "database_url = \"postgres://fleet:s3cret@db.internal:5432/fleet?sslmode=require\"\n\
             db_max_connections = 40\ndb_acquire_timeout_ms = 2000\ndb_statement_timeout_ms = 8000"
    )
    .unwrap();
    let c = from(Some(f.path()), &[("PEAQOS_DB_MAX_CONNECTIONS", "24")]).unwrap();
    assert_eq!(
        c.pool_settings(),
        PoolSettings {
            max_connections: 24,
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(8),
        }
    );
    let shown = format!("{c:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(
        shown.contains("postgres://fleet:***@db.internal:5432/fleet"),
        "{shown}"
    );
    for url in ["postgresql://db/fleet", "postgres://u@127.0.0.1/test"] {
        assert!(from(None, &[("DATABASE_URL", url)]).is_ok(), "{url}");
    }
    assert_eq!(
        redact_password("postgres://u:p@h/d"),
        "postgres://u:***@h/d"
    );
    assert_eq!(
        redact_password("sqlite:///var/lib/o.db"),
        "sqlite:///var/lib/o.db"
    );
}

#[test]
fn file_errors_name_file_line_and_key() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(
        f,
        "# comment\nchallenge_ttl_secs = 60\nlisten_adr = \"x\"\n"
    )
    .unwrap();
    let err = from(Some(f.path()), &[]).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ConfigError::FileSyntax { line: 3, .. }),
        "{text}"
    );
    assert!(text.contains("listen_adr"), "{text}");

    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(f, "\n\nmachine_identity_verification = \"off\"\n").unwrap();
    let text = from(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(
        text.contains("line 3: machine_identity_verification"),
        "{text}"
    );

    let err = from(Some(Path::new("/nonexistent/x.toml")), &[]).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x.toml"), "{err}");
}

#[test]
fn every_setting_has_an_env_var_and_a_file_key() {
    // Adding a setting is adding its row; the docs test asks for its line
    // in docs/orchestrator.md. Here: no name is used twice, and every
    // variable is in our namespace but the conventional DATABASE_URL.
    let mut names: Vec<&str> = ENV_VARS.to_vec();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names.len(),
        ENV_VARS.len(),
        "an environment variable is used twice"
    );
    assert!(
        ENV_VARS
            .iter()
            .all(|v| v.starts_with("PEAQOS_") || *v == "DATABASE_URL"),
        "{ENV_VARS:?}"
    );
    assert!(ENV_VARS.contains(&"PEAQOS_DB_STATEMENT_TIMEOUT_MS"));
}

#[test]
fn file_keys_are_the_variables_in_lower_case_without_the_prefix() {
    for s in ALL {
        let expected = s
            .env
            .strip_prefix("PEAQOS_")
            .unwrap_or(s.env)
            .to_lowercase();
        assert_eq!(s.key, expected, "{}", s.env);
    }
    assert_eq!(ALL.len(), ENV_VARS.len());
}

#[test]
fn the_readme_documents_every_setting() {
    const DOC: &str = include_str!("../../../../docs/orchestrator.md");
    for var in ENV_VARS {
        assert!(
            DOC.contains(&format!("| `{var}` |")),
            "docs/orchestrator.md has no configuration row for {var}"
        );
    }
}

mod example_file {
    use super::super::*;

    const EXAMPLE: &str = include_str!("../../../../config/orchestrator.example.toml");

    /// The example with every `# key = value` line uncommented.
    fn uncommented() -> String {
        EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_example_starts_with_defaults_and_documents_real_keys() {
        let mut c = Config::default();
        c.apply_file(Path::new("example"), EXAMPLE).unwrap();
        assert_eq!(
            c,
            Config::default(),
            "everything in the example is commented out"
        );

        let text = uncommented();
        let mut c = Config::default();
        c.apply_file(Path::new("example"), &text).unwrap();
        let d = Config::default();
        // The values shown are the defaults, except where the example shows
        // a typical setting.
        assert_eq!(c.listen_addr, d.listen_addr);
        assert_eq!(c.mcr_timeout, d.mcr_timeout);
        assert_eq!(c.mcr_cache_ttl, d.mcr_cache_ttl);
        assert_eq!(c.verification, d.verification);
        assert_eq!(c.require_api_auth, d.require_api_auth);
        assert_eq!(c.challenge_ttl, d.challenge_ttl);
        assert_eq!(c.challenge_rate_per_minute, d.challenge_rate_per_minute);
        assert_eq!(c.challenge_burst, d.challenge_burst);
        assert_eq!(c.max_pending_challenges, d.max_pending_challenges);
        assert_eq!(c.orchestrator_name, d.orchestrator_name);
        assert_eq!(c.body_limit_bytes, d.body_limit_bytes);
        assert_eq!(c.request_timeout, d.request_timeout);
        assert_eq!(c.db_max_connections, d.db_max_connections);
        assert_eq!(c.db_acquire_timeout, d.db_acquire_timeout);
        assert_eq!(c.db_statement_timeout, d.db_statement_timeout);
        let keys = text
            .lines()
            .filter(|l| l.contains(" = ") && !l.starts_with('#'))
            .count();
        assert_eq!(keys, ENV_VARS.len(), "every setting appears in the example");
    }
}
