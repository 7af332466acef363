//! `peaqos-agent`: command dispatch, exit codes, error reporting. The work is
//! in the library (`peaqos_agent::run` and friends).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use peaqos_agent::cli::{Cli, Command, KeyCommand};
use peaqos_agent::config::Config;
use peaqos_agent::run::Agent;
use peaqos_agent::{check, key, status};
use tokio_util::sync::CancellationToken;

/// sysexits' EX_CONFIG: bad configuration or key. systemd units can list it
/// in `RestartPreventExitStatus=`, since restarting will not fix it.
const EX_CONFIG: u8 = 78;
/// sysexits' EX_UNAVAILABLE: the key's token is not there (yet); systemd's
/// `Restart=on-failure` tries again, as for any transient failure.
const EX_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let hardened = key::harden_process();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command, hardened));
    match result {
        Ok(code) => code,
        Err(failure) => {
            // `{:#}` prints the whole chain: "context: cause: cause".
            tracing::error!("{:#}", failure.error);
            if !failure.logged {
                eprintln!("error: {:#}", failure.error);
            }
            ExitCode::from(failure.code)
        }
    }
}

struct Failure {
    error: anyhow::Error,
    code: u8,
    /// Whether a logger was installed to carry the error (else stderr).
    logged: bool,
}

fn fail(code: u8, logged: bool) -> impl FnOnce(anyhow::Error) -> Failure {
    move |error| Failure {
        error,
        code,
        logged,
    }
}

async fn dispatch(command: Command, hardened: std::io::Result<()>) -> Result<ExitCode, Failure> {
    match command {
        Command::Run(args) => run(&args.config, hardened).await,
        Command::Keygen {
            out,
            sealed,
            with_key,
            pkcs11,
            pin_file,
        } => match (out, sealed, pkcs11) {
            (_, _, Some(uri)) => keygen_token(&uri, pin_file.as_deref()),
            (_, Some(cred), None) => keygen_sealed(&cred, with_key),
            (Some(out), None, None) => keygen(&out),
            (None, None, None) => unreachable!("clap requires --out, --sealed or --pkcs11"),
        },
        Command::Address {
            config,
            key,
            password_file,
            pkcs11,
            pin_file,
        } => match pkcs11 {
            Some(uri) => address_token(&uri, pin_file.as_deref()),
            None => address(config, key, password_file.as_deref()),
        },
        Command::Check(args) => {
            let lines = check::run(&args.config).await;
            for line in &lines {
                println!("{line}");
            }
            Ok(if check::all_ok(&lines) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Key(KeyCommand::Rotate { config, machine }) => {
            key_rotate(&config.config, machine.as_deref())
        }
        Command::Status {
            config,
            name,
            json,
            timeout,
        } => status_cmd(&config.config, name.as_deref(), json, timeout).await,
    }
}

async fn run(path: &Path, hardened: std::io::Result<()>) -> Result<ExitCode, Failure> {
    let config = Config::load(path);
    let level = config.as_ref().ok().and_then(|c| c.log.level.clone());
    let logged = peaqos_logging::init(level.as_deref()).is_ok();
    let config = config
        .with_context(|| format!("invalid configuration {}", path.display()))
        .map_err(fail(EX_CONFIG, logged))?;
    if let Err(e) = hardened {
        tracing::warn!("cannot disable core dumps: {e}");
    }
    let agent = Agent::new(config).map_err(|e| {
        let code = match &e {
            peaqos_agent::RunError::Key(open) if open.is_transient() => EX_UNAVAILABLE,
            _ => EX_CONFIG,
        };
        fail(code, logged)(anyhow::Error::new(e).context("cannot start"))
    })?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    tokio::spawn(reload_on_signal(agent.reloader()));
    agent
        .run(shutdown)
        .await
        .context("agent failed")
        .map_err(fail(1, logged))?;
    Ok(ExitCode::SUCCESS)
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    shutdown.cancel();
}

/// Reloads the machines directory on SIGHUP (`systemctl reload`).
async fn reload_on_signal(reloader: peaqos_agent::run::Reloader) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload by restarting");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reading the machines directory again");
        reloader.reload();
    }
}

fn keygen(out: &Path) -> Result<ExitCode, Failure> {
    let key = key::generate(out)
        .context("keygen failed")
        .map_err(fail(1, false))?;
    println!("{}", key.address().checksummed());
    Ok(ExitCode::SUCCESS)
}

fn keygen_sealed(out: &Path, with: peaqos_agent::sealed::WithKey) -> Result<ExitCode, Failure> {
    use peaqos_agent::sealed::{Sealing, WithKey};
    let (key, sealing) = key::generate_sealed(out, with)
        .context("keygen failed")
        .map_err(fail(1, false))?;
    // stdout is the address alone (scripts read it); how it was sealed,
    // and whether auto found no TPM 2.0, goes to stderr.
    let fallback = if with == WithKey::Auto && sealing == Sealing::Host {
        " (auto: no TPM 2.0 on this machine, so the host key only; a copy of this card \
         unseals it)"
    } else {
        ""
    };
    eprintln!(
        "{}: credential controller-key, {sealing}{fallback}",
        out.display()
    );
    println!("{}", key.address().checksummed());
    Ok(ExitCode::SUCCESS)
}

fn address(
    config: Option<PathBuf>,
    key_file: Option<PathBuf>,
    password_file: Option<&Path>,
) -> Result<ExitCode, Failure> {
    if let Some(path) = key_file {
        let (key, _) = key::load_path(&path, password_file)
            .context("cannot load the controller key")
            .map_err(fail(EX_CONFIG, false))?;
        println!("{}", key.address().checksummed());
        return Ok(ExitCode::SUCCESS);
    }
    let path = config.unwrap_or_else(|| PathBuf::from(peaqos_agent::config::DEFAULT_PATH));
    let config = Config::load(&path)
        .with_context(|| format!("invalid configuration {}", path.display()))
        .map_err(fail(EX_CONFIG, false))?;
    let Some(identity) = &config.identity else {
        return Err(fail(EX_CONFIG, false)(anyhow::anyhow!(
            "{} has no [identity] (a gateway's machines are in {}): give the machine's key \
             with --key FILE or --pkcs11 URI",
            path.display(),
            config.machines_dir.display()
        )));
    };
    // After a key rotation, the promoted key is the machine's.
    let signer =
        peaqos_agent::rotation::open_effective(identity, &config.state.dir, &config.state.dir)
            .map_err(open_failed)?;
    println!("{}", signer.address().checksummed());
    Ok(ExitCode::SUCCESS)
}

/// `key rotate`: a successor for the own machine's key, or for the named
/// machine's; its address on stdout.
fn key_rotate(path: &Path, machine: Option<&str>) -> Result<ExitCode, Failure> {
    use peaqos_agent::config::{MachineSpec, machines};
    let config = Config::load(path)
        .with_context(|| format!("invalid configuration {}", path.display()))
        .map_err(fail(EX_CONFIG, false))?;
    let spec = match machine {
        None => MachineSpec::own(&config).ok_or_else(|| {
            anyhow::anyhow!(
                "{} has no [identity]: name one of the machines in {} with --machine NAME",
                path.display(),
                config.machines_dir.display()
            )
        }),
        Some(name) => machines::read_all(&config)
            .map_err(anyhow::Error::new)
            .and_then(|entries| {
                let entry = entries
                    .into_iter()
                    .find(|e| e.name == name)
                    .ok_or_else(|| {
                        anyhow::anyhow!("no machine {name:?} in {}", config.machines_dir.display())
                    })?;
                entry.spec.map_err(anyhow::Error::new)
            }),
    }
    .map_err(fail(EX_CONFIG, false))?;
    let key =
        peaqos_agent::rotation::open_effective(&spec.identity, &spec.state_dir, &config.state.dir)
            .map_err(open_failed)?;
    let (next, unsealed) =
        peaqos_agent::rotation::prepare(&spec.identity, &spec.state_dir, key.address())
            .context("key rotation failed")
            .map_err(fail(1, false))?;
    if unsealed {
        eprintln!(
            "warning: the current key is a sealed credential; the successor is a plaintext file \
             (0600) in {} until you seal it (see docs/rotation.md)",
            peaqos_agent::rotation::keys_dir(&spec.state_dir).display()
        );
    }
    eprintln!(
        "successor of {} prepared: make its address a controller of {} (the owner: \
         set_machine_controller); the running agent picks it up at its next check",
        key.address().checksummed(),
        spec.identity.identity_ref
    );
    println!("{}", next.checksummed());
    Ok(ExitCode::SUCCESS)
}

fn open_failed(e: peaqos_agent::signer::OpenError) -> Failure {
    let code = if e.is_transient() {
        EX_UNAVAILABLE
    } else {
        EX_CONFIG
    };
    fail(code, false)(anyhow::Error::new(e))
}

/// A `--pkcs11` URI and `--pin-file` as the configuration would give them.
#[cfg(feature = "pkcs11")]
fn token_args(
    uri: &str,
    pin_file: Option<&Path>,
) -> Result<(peaqos_agent::pkcs11::Pkcs11Uri, Option<String>), Failure> {
    let uri: peaqos_agent::pkcs11::Pkcs11Uri = uri
        .parse()
        .context("invalid --pkcs11 URI")
        .map_err(fail(EX_CONFIG, false))?;
    if pin_file.is_some() && uri.pin_source.is_some() {
        return Err(fail(EX_CONFIG, false)(anyhow::anyhow!(
            "both --pin-file and the URI's pin-source name a PIN; keep one of them"
        )));
    }
    let pin = pin_file
        .map(|p| p.display().to_string())
        .or_else(|| uri.pin_location());
    Ok((uri, pin))
}

#[cfg(feature = "pkcs11")]
fn keygen_token(uri: &str, pin_file: Option<&Path>) -> Result<ExitCode, Failure> {
    let (uri, pin) = token_args(uri, pin_file)?;
    let address = peaqos_agent::pkcs11::generate(&uri, pin.as_deref()).map_err(|e| {
        let code = if matches!(e, peaqos_agent::pkcs11::TokenError::Exists { .. }) {
            1
        } else if e.is_transient() {
            EX_UNAVAILABLE
        } else {
            EX_CONFIG
        };
        fail(code, false)(anyhow::Error::new(e).context("keygen in the token failed"))
    })?;
    println!("{}", address.checksummed());
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "pkcs11")]
fn address_token(uri: &str, pin_file: Option<&Path>) -> Result<ExitCode, Failure> {
    let (uri, pin) = token_args(uri, pin_file)?;
    let key = peaqos_agent::pkcs11::TokenKey::open(uri, pin, None).map_err(|e| {
        let code = if e.is_transient() {
            EX_UNAVAILABLE
        } else {
            EX_CONFIG
        };
        fail(code, false)(anyhow::Error::new(e).context("cannot use the key in the token"))
    })?;
    println!("{}", key.address().checksummed());
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "pkcs11"))]
fn keygen_token(_: &str, _: Option<&Path>) -> Result<ExitCode, Failure> {
    Err(no_pkcs11())
}

#[cfg(not(feature = "pkcs11"))]
fn address_token(_: &str, _: Option<&Path>) -> Result<ExitCode, Failure> {
    Err(no_pkcs11())
}

#[cfg(not(feature = "pkcs11"))]
fn no_pkcs11() -> Failure {
    fail(EX_CONFIG, false)(anyhow::anyhow!(
        "this build of peaqos-agent has no PKCS#11 support (built without the `pkcs11` feature)"
    ))
}

async fn status_cmd(
    path: &Path,
    name: Option<&str>,
    json: bool,
    timeout: std::time::Duration,
) -> Result<ExitCode, Failure> {
    use peaqos_agent::mqtt::{self, MachineRef};
    let config = Config::load(path)
        .with_context(|| format!("invalid configuration {}", path.display()))
        .map_err(fail(EX_CONFIG, false))?;
    if !config.mqtt.enabled {
        return Err(fail(EX_CONFIG, false)(anyhow::anyhow!(
            "the MQTT interface is disabled in {}; `status` asks the agent over MQTT",
            path.display()
        )));
    }
    let gateway = config.machine_name();
    let mut machines: Vec<MachineRef> = Vec::new();
    if config.identity.is_some() {
        machines.push(MachineRef {
            name: gateway.to_owned(),
            topic_prefix: config.mqtt.topic_prefix.clone(),
        });
    }
    let files = peaqos_agent::config::machines::read_all(&config)
        .with_context(|| format!("cannot read {}", config.machines_dir.display()))
        .map_err(fail(EX_CONFIG, false))?;
    let robot = files.is_empty() && config.identity.is_some();
    // A machine whose file is broken still has topics (the default ones):
    // its status says what is wrong with it.
    machines.extend(files.into_iter().map(|entry| MachineRef {
        topic_prefix: entry.spec.ok().and_then(|spec| spec.topic_prefix),
        name: entry.name,
    }));
    let answer = match name {
        None if !robot => {
            let view = mqtt::read_machines(&config.mqtt, gateway, &machines, timeout)
                .await
                .context("cannot read the machines' status from the MQTT broker")
                .map_err(fail(1, false))?;
            if json {
                println!("{:#}", status::machines_json(&view));
            } else {
                print!("{}", status::render_machines(&view));
            }
            return Ok(ExitCode::SUCCESS);
        }
        None => mqtt::query_status(&config.mqtt, gateway, timeout).await,
        Some(name) => {
            let Some(machine) = machines.iter().find(|m| m.name == name) else {
                let known: Vec<&str> = machines.iter().map(|m| m.name.as_str()).collect();
                return Err(fail(EX_CONFIG, false)(anyhow::anyhow!(
                    "no machine named {name:?} in {} (machines: {})",
                    path.display(),
                    known.join(", ")
                )));
            };
            mqtt::query_machine(&config.mqtt, gateway, machine, timeout).await
        }
    }
    .context("no status from the agent")
    .map_err(fail(1, false))?;
    if json {
        let text = serde_json::to_string_pretty(&answer).unwrap_or_else(|_| answer.to_string());
        println!("{text}");
    } else {
        print!("{}", status::render_human(&answer));
    }
    Ok(ExitCode::SUCCESS)
}
