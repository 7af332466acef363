//! The command line (clap). `--help` on each command is the reference.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::DEFAULT_PATH;

/// The on-device peaqOS identity agent: holds the machine's controller key
/// and keeps its identity registered and active with the orchestrator.
#[derive(Debug, Parser)]
#[command(name = "peaqos-agent", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: register the machine, activate it, and keep it
    /// registered and active (renewing its identity proof) until stopped
    /// with SIGTERM or SIGINT.
    Run(ConfigArg),
    /// Generate a new secp256k1 controller key and print its controller
    /// address: from the OS random source into FILE (mode 0600; an existing
    /// file is never overwritten), or sealed as a systemd encrypted
    /// credential with --sealed, or inside a PKCS#11 token with --pkcs11
    /// (CKA_SENSITIVE, not CKA_EXTRACTABLE: it never leaves the token).
    Keygen {
        /// Where to write the key (64 hex digits and a newline).
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with_all = ["pkcs11", "sealed"],
            required_unless_present_any = ["pkcs11", "sealed"]
        )]
        out: Option<PathBuf>,
        /// Write the key sealed as the systemd credential `controller-key`
        /// (`systemd-creds encrypt`; the key reaches it through a pipe and no
        /// plaintext copy touches the disk), for the unit's
        /// `LoadCredentialEncrypted=`, e.g.
        /// /etc/peaqos-agent/controller.key.cred (an existing file is never
        /// overwritten).
        #[arg(long, value_name = "FILE.cred", conflicts_with = "pkcs11")]
        sealed: Option<PathBuf>,
        /// With --sealed: what seals it, as `systemd-creds --with-key=`
        /// (auto: the TPM 2.0 when present, else the host key; which one was
        /// used is printed).
        #[arg(long, value_name = "KEY", requires = "sealed", default_value = "auto")]
        with_key: crate::sealed::WithKey,
        /// Generate the key pair in the token this RFC 7512 URI names, under
        /// its object= label and id= (random when absent), e.g.
        /// "pkcs11:token=robot;object=controller?module-path=/usr/lib/softhsm/libsofthsm2.so".
        /// An existing key of that name is never replaced.
        #[arg(long, value_name = "URI")]
        pkcs11: Option<String>,
        /// The file holding the token's user PIN (instead of the URI's
        /// pin-source).
        #[arg(long, value_name = "FILE", requires = "pkcs11")]
        pin_file: Option<PathBuf>,
    },
    /// Print the controller address of the configured key (or of --key, or
    /// of the key in the token --pkcs11 names).
    Address {
        /// Read the key named in this configuration.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["key", "pkcs11"])]
        config: Option<PathBuf>,
        /// Read this key file directly.
        #[arg(long, value_name = "FILE", conflicts_with = "pkcs11")]
        key: Option<PathBuf>,
        /// With --key naming an Ethereum V3 keystore: the file holding its
        /// password.
        #[arg(long, value_name = "FILE", requires = "key")]
        password_file: Option<PathBuf>,
        /// The key in the PKCS#11 token this RFC 7512 URI names.
        #[arg(long, value_name = "URI")]
        pkcs11: Option<String>,
        /// With --pkcs11: the file holding the token's user PIN (instead of
        /// the URI's pin-source).
        #[arg(long, value_name = "FILE", requires = "pkcs11")]
        pin_file: Option<PathBuf>,
    },
    /// Check the configuration, the key (file, or token: which token, whether
    /// the key is non-extractable, a test signature), the state directory, the
    /// orchestrator (reachable, and our address among the identity's
    /// controllers) and the MQTT broker; one line per check, non-zero exit
    /// status if any fails.
    Check(ConfigArg),
    /// Manage the controller key over the machine's lifetime.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Ask the running agent for its status over MQTT and print it; on a
    /// gateway, list every machine, or show the one named.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// One machine of a gateway (its file's stem); default: all of them.
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// Print the status JSON as the agent publishes it.
        #[arg(long)]
        json: bool,
        /// How long to wait for the answer, e.g. "5s".
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
}

/// `peaqos-agent key ...`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Make a successor controller key under the same protection as the
    /// current one (a file with the same mode, a keystore with the same
    /// password, a new non-extractable key pair on the same token) in the
    /// machine's state directory (keys/), and print its address. Works while
    /// the agent runs: at its next check it starts watching for the
    /// successor to become a controller, then proves with it, promotes it
    /// and retires the old key (`[identity] retire_old_key`).
    Rotate {
        #[command(flatten)]
        config: ConfigArg,
        /// One machine of a gateway (its file's stem); default: the machine
        /// agent.toml describes.
        #[arg(long, value_name = "NAME")]
        machine: Option<String>,
    },
}

/// `--config FILE`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// Configuration file; drop-ins in `agent.d/*.toml` beside it are merged
    /// in lexical order.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_PATH)]
    pub config: PathBuf,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_packaged_man_pages_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/man");
        peaqos_testkit::man::check_or_write(Cli::command(), &dir);
    }

    #[test]
    fn address_takes_config_or_key_not_both() {
        assert!(Cli::try_parse_from(["peaqos-agent", "address", "--key", "k"]).is_ok());
        assert!(
            Cli::try_parse_from(["peaqos-agent", "address", "--key", "k", "--config", "c"])
                .is_err()
        );
        let cli = Cli::try_parse_from(["peaqos-agent", "run"]).unwrap();
        match cli.command {
            Command::Run(c) => assert_eq!(c.config, PathBuf::from(DEFAULT_PATH)),
            other => panic!("{other:?}"),
        }
    }
}
