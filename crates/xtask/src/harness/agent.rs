//! The agent's one-shot commands, run as a user runs them: `keygen`,
//! `address`, `check` and `status --json`, natively or under qemu-user
//! (an ARM agent on this x86-64 machine).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::error::HarnessError;
use super::process::child_command;

/// A `peaqos-agent` executable and how to run it here.
#[derive(Debug, Clone)]
pub(crate) struct Agent {
    binary: PathBuf,
    /// `qemu-<arch>` and its arguments, for an executable of another
    /// architecture.
    emulator: Option<(PathBuf, Vec<OsString>)>,
}

impl Agent {
    pub(crate) fn native(binary: &Path) -> Self {
        Self {
            binary: binary.to_owned(),
            emulator: None,
        }
    }

    /// Under qemu-user, with the target's C library from `sysroot`
    /// (`-L`: where its dynamic loader and libc are).
    pub(crate) fn emulated(binary: &Path, qemu: &Path, sysroot: &Path) -> Self {
        Self {
            binary: binary.to_owned(),
            emulator: Some((qemu.to_owned(), vec!["-L".into(), sysroot.into()])),
        }
    }

    pub(crate) fn binary(&self) -> &Path {
        &self.binary
    }

    /// A command running the agent with `args` (the task's environment
    /// stripped as for every child).
    pub(crate) fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut command = match &self.emulator {
            Some((qemu, qemu_args)) => {
                let mut command = child_command(qemu);
                command.args(qemu_args).arg(&self.binary);
                command
            }
            None => child_command(&self.binary),
        };
        command.args(args.into_iter().map(Into::into));
        command
    }

    /// How the command line reads, for messages.
    fn describe(&self, args: &[&str]) -> String {
        let mut text = match &self.emulator {
            Some((qemu, _)) => format!("{} {}", qemu.display(), self.binary.display()),
            None => "peaqos-agent".to_owned(),
        };
        for arg in args {
            text.push(' ');
            text.push_str(arg);
        }
        text
    }

    /// Runs `args` to the end (stderr to ours); its stdout if it succeeded.
    fn output(&self, args: &[&str]) -> Result<String, HarnessError> {
        let output: Output = self
            .command(args)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|source| HarnessError::Spawn {
                program: self.describe(&[]),
                source,
            })?;
        if !output.status.success() {
            return Err(HarnessError::Failed {
                command: self.describe(args),
                status: output.status,
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `keygen --out FILE`: the new key's address.
    pub(crate) fn keygen(&self, key_file: &Path) -> Result<String, HarnessError> {
        let args = ["keygen", "--out", &key_file.to_string_lossy()];
        self.address_from(&args)
    }

    /// `address --key FILE`.
    pub(crate) fn address(&self, key_file: &Path) -> Result<String, HarnessError> {
        let args = ["address", "--key", &key_file.to_string_lossy()];
        self.address_from(&args)
    }

    fn address_from(&self, args: &[&str]) -> Result<String, HarnessError> {
        let output = self.output(args)?;
        let address = output.trim();
        let hex = address.strip_prefix("0x").unwrap_or_default();
        if hex.len() != 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(HarnessError::BadAddress {
                command: self.describe(args),
                output: output.clone(),
            });
        }
        Ok(address.to_owned())
    }

    /// `check --config FILE`: the agent's own checks; what it printed.
    pub(crate) fn check(&self, config: &Path) -> Result<String, HarnessError> {
        self.output(&["check", "--config", &config.to_string_lossy()])
    }

    /// `status --config FILE [--json]`: the agent's answer to a
    /// `status/get` query over MQTT.
    pub(crate) fn status(&self, config: &Path, json: bool) -> Result<String, HarnessError> {
        let config = config.to_string_lossy();
        let mut args = vec!["status", "--timeout", "5s", "--config", &config];
        if json {
            args.push("--json");
        }
        self.output(&args)
    }
}

/// The JSON status answer must say `active`, for `identity` and the key
/// of `address`, with a machine id: the answer, parsed.
pub(crate) fn expect_active(
    text: &str,
    identity: &str,
    address: &str,
) -> Result<Value, HarnessError> {
    let answer: Value = serde_json::from_str(text)
        .map_err(|e| HarnessError::UnexpectedStatus(format!("not JSON ({e})")))?;
    let expect = [
        ("state", "active"),
        ("identity", identity),
        ("controllerAddress", address),
    ];
    for (field, want) in expect {
        if answer[field] != want {
            return Err(HarnessError::UnexpectedStatus(format!(
                "{field} is {}, not {want:?}",
                answer[field]
            )));
        }
    }
    if !answer["machineId"].is_string() {
        return Err(HarnessError::UnexpectedStatus("no machineId".into()));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_active_answer_is_checked_field_by_field() {
        let answer = r#"{"state":"active","identity":"did:peaq:1","controllerAddress":"0xab","machineId":"mach_1"}"#;
        assert!(expect_active(answer, "did:peaq:1", "0xab").is_ok());
        let err = expect_active(answer, "did:peaq:2", "0xab").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the agent's status answer over MQTT is not the expected one: identity is \"did:peaq:1\", not \"did:peaq:2\""
        );
        let backoff = answer.replace("\"active\"", "\"backoff\"");
        assert!(expect_active(&backoff, "did:peaq:1", "0xab").is_err());
        let no_id = r#"{"state":"active","identity":"did:peaq:1","controllerAddress":"0xab"}"#;
        assert!(expect_active(no_id, "did:peaq:1", "0xab").is_err());
        assert!(expect_active("offline", "did:peaq:1", "0xab").is_err());
    }

    #[test]
    fn an_emulated_agent_runs_under_its_emulator() {
        let agent = Agent::emulated(
            Path::new("/t/aarch64/peaqos-agent"),
            Path::new("/usr/bin/qemu-aarch64"),
            Path::new("/usr/aarch64-linux-gnu"),
        );
        let command = agent.command(["check"]);
        assert_eq!(command.get_program(), "/usr/bin/qemu-aarch64");
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(
            args,
            [
                "-L",
                "/usr/aarch64-linux-gnu",
                "/t/aarch64/peaqos-agent",
                "check"
            ]
        );
    }
}
