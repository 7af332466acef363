//! `peaqos-agent`: command dispatch, exit codes, error reporting. The work is
//! in the library (`peaqos_agent::run` and friends).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use peaqos_agent::cli::{Cli, Command};
use peaqos_agent::config::Config;
use peaqos_agent::run::Agent;
use peaqos_agent::{check, key, status};
use tokio_util::sync::CancellationToken;

/// sysexits' EX_CONFIG: bad configuration or key. systemd units can list it
/// in `RestartPreventExitStatus=`, since restarting will not fix it.
const EX_CONFIG: u8 = 78;

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
        Command::Keygen { out } => keygen(&out),
        Command::Address {
            config,
            key,
            password_file,
        } => address(config, key, password_file.as_deref()),
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
        Command::Status {
            config,
            json,
            timeout,
        } => status_cmd(&config.config, json, timeout).await,
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
    let agent = Agent::new(config)
        .context("cannot start")
        .map_err(fail(EX_CONFIG, logged))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
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

fn keygen(out: &Path) -> Result<ExitCode, Failure> {
    let key = key::generate(out)
        .context("keygen failed")
        .map_err(fail(1, false))?;
    println!("{}", key.address().checksummed());
    Ok(ExitCode::SUCCESS)
}

fn address(
    config: Option<PathBuf>,
    key_file: Option<PathBuf>,
    password_file: Option<&Path>,
) -> Result<ExitCode, Failure> {
    let loaded = if let Some(path) = key_file {
        key::load_path(&path, password_file)
    } else {
        let path = config.unwrap_or_else(|| PathBuf::from(peaqos_agent::config::DEFAULT_PATH));
        let config = Config::load(&path)
            .with_context(|| format!("invalid configuration {}", path.display()))
            .map_err(fail(EX_CONFIG, false))?;
        let identity = &config.identity;
        key::load(&identity.key_file, identity.key_password_file.as_deref())
    };
    let (key, _) = loaded
        .context("cannot load the controller key")
        .map_err(fail(EX_CONFIG, false))?;
    println!("{}", key.address().checksummed());
    Ok(ExitCode::SUCCESS)
}

async fn status_cmd(
    path: &Path,
    json: bool,
    timeout: std::time::Duration,
) -> Result<ExitCode, Failure> {
    let config = Config::load(path)
        .with_context(|| format!("invalid configuration {}", path.display()))
        .map_err(fail(EX_CONFIG, false))?;
    if !config.mqtt.enabled {
        return Err(fail(EX_CONFIG, false)(anyhow::anyhow!(
            "the MQTT interface is disabled in {}; `status` asks the agent over MQTT",
            path.display()
        )));
    }
    let answer = peaqos_agent::mqtt::query_status(&config.mqtt, config.machine_name(), timeout)
        .await
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
