//! `peaqos-orchestrator`: settings from `--config FILE` (TOML) and the
//! environment, logs to stderr/journald, stops gracefully on SIGTERM/SIGINT.
//! Once it listens, it prints `listening on http://<address>` on stdout.
//! `healthcheck` asks a running one for `/ready` instead (the image's
//! health check).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use peaqos_orchestrator::Config;
use peaqos_orchestrator::cli::{Args, Command};

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::from_env(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("peaqos-orchestrator: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Healthcheck) = args.command {
        return healthcheck(&config);
    }
    if let Err(e) = peaqos_logging::init(config.log_level.as_deref()) {
        eprintln!("peaqos-orchestrator: {e}");
        return ExitCode::from(2);
    }
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole chain ("what: why: detail").
            let chain = peaqos_orchestrator::error_chain(e.as_ref());
            eprintln!("peaqos-orchestrator: {chain}");
            ExitCode::FAILURE
        }
    }
}

/// One line on failure, for `podman healthcheck run` and `inspect`.
fn healthcheck(config: &Config) -> ExitCode {
    match peaqos_orchestrator::healthcheck::check(config.listen_addr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "peaqos-orchestrator healthcheck: {}",
                peaqos_orchestrator::error_chain(&e)
            );
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let addr = config.listen_addr;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (PEAQOS_LISTEN_ADDR)"))?;
        peaqos_orchestrator::Server::new(config)
            .on_ready(|addr| {
                // One machine-readable line on stdout: how a script (or a
                // test) that asked for port 0 learns the port.
                println!("listening on http://{addr}");
                // Type=notify units wait for this; outside systemd it is a no-op.
                notify(&[sd_notify::NotifyState::Ready]);
            })
            .run(listener, shutdown_signal())
            .await?;
        Ok(())
    })
}

/// Completes on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
    notify(&[sd_notify::NotifyState::Stopping]);
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
