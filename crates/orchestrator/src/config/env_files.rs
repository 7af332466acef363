//! The `*_FILE` convention of container platforms: any setting's
//! environment variable `NAME` may instead be given as `NAME_FILE`, the path
//! of a file holding the value (a compose or Kubernetes secret, so that a
//! password in `DATABASE_URL` never sits in the container's environment).
//! One trailing newline is dropped: secret files are usually written with
//! one.

use std::collections::HashMap;

use super::{ConfigError, ENV_VARS};

/// The suffix that turns a setting's variable into its file's.
const FILE_SUFFIX: &str = "_FILE";

/// The values the `*_FILE` variables point at, by setting variable.
/// A setting given both ways is refused: which one wins would be a guess.
pub(super) fn read(
    env: &impl Fn(&str) -> Option<String>,
) -> Result<HashMap<&'static str, String>, ConfigError> {
    let mut values = HashMap::new();
    for &name in ENV_VARS {
        let file_var = format!("{name}{FILE_SUFFIX}");
        let Some(path) = env(&file_var) else {
            continue;
        };
        if env(name).is_some() {
            return Err(ConfigError::Invalid {
                setting: file_var,
                message: format!("set either {name} or {name}{FILE_SUFFIX}, not both"),
            });
        }
        let path = path.trim();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
            setting: file_var.clone(),
            message: format!("cannot read {path}: {e}"),
        })?;
        let value = text
            .strip_suffix('\n')
            .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
        values.insert(name, value.to_owned());
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn load(vars: &[(&str, &str)]) -> Result<Config, crate::ConfigError> {
        super::super::tests::from(None, vars)
    }

    #[test]
    fn a_setting_comes_from_the_file_its_file_variable_names() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("database-url");
        std::fs::write(&secret, "postgres://app:s3cret@db:5432/fleet\n").unwrap();
        let port = dir.path().join("listen");
        std::fs::write(&port, "0.0.0.0:9090").unwrap();
        let c = load(&[
            ("DATABASE_URL_FILE", secret.to_str().unwrap()),
            ("PEAQOS_LISTEN_ADDR_FILE", port.to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!(c.database_url, "postgres://app:s3cret@db:5432/fleet");
        assert_eq!(c.listen_addr.to_string(), "0.0.0.0:9090");
        // The value read is checked like the variable's own.
        std::fs::write(&port, "nine thousand\n").unwrap();
        let e = load(&[("PEAQOS_LISTEN_ADDR_FILE", port.to_str().unwrap())]).unwrap_err();
        assert!(e.to_string().starts_with("PEAQOS_LISTEN_ADDR: "), "{e}");
    }

    #[test]
    fn a_missing_file_or_both_ways_at_once_is_an_error_naming_the_variable() {
        let e = load(&[("DATABASE_URL_FILE", "/nonexistent/db-url")]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("DATABASE_URL_FILE: cannot read /nonexistent/db-url: "),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("url");
        std::fs::write(&secret, "sqlite::memory:").unwrap();
        let e = load(&[
            ("DATABASE_URL", "sqlite::memory:"),
            ("DATABASE_URL_FILE", secret.to_str().unwrap()),
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "DATABASE_URL_FILE: set either DATABASE_URL or DATABASE_URL_FILE, not both"
        );
    }
}
