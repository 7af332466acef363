//! Boards without a real-time clock (#21.3): the agent under libfaketime,
//! its wall clock at 1970 or two years ahead, against the double over
//! `https://` with a private CA whose server certificate is valid from a
//! year ago to a month ahead. At 1970 the agent checks the certificate at
//! its clock's floor (its build time) and becomes active; two years ahead
//! the certificate has expired by its clock, which it reports as `CLOCK`
//! and retries every few seconds (not at `slow_retry`), so that it is
//! active within seconds of the clock being corrected. The clock is
//! corrected by rewriting the file libfaketime reads at every call.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use peaqos_testkit::{Service, available_or_skip};

use crate::agent::{AgentProcess, Device};
use crate::double::{Double, Quirks};
use crate::tls::{Ca, server_config_valid, write};

const ID: &str = "did:peaq:4344";
/// How soon after the clock is corrected the agent must be active.
const AFTER_CORRECTION: Duration = Duration::from_secs(15);

/// Where Debian's `libfaketime` puts the multithreaded library.
const LIBFAKETIME: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
];

struct Board {
    device: Device,
    double: Double,
    clock_file: PathBuf,
    config: PathBuf,
    library: PathBuf,
    /// The private CA's PEM file.
    ca_file: PathBuf,
    /// The CA is the "system's" (SSL_CERT_FILE), not `ca_file`.
    system_roots: bool,
}

impl Board {
    /// A device whose agent will read its time from `clock` (libfaketime's
    /// syntax), and an `https://` double it knows through `ca_file`.
    async fn new(test: &str, clock: &str) -> Option<Self> {
        Self::trusting(test, clock, false).await
    }

    /// As [`Board::new`]; with `system_roots` the agent has no `ca_file`
    /// and finds the CA among the system's roots (`SSL_CERT_FILE`, which
    /// the platform verifier reads on Linux).
    async fn trusting(test: &str, clock: &str, system_roots: bool) -> Option<Self> {
        let library = LIBFAKETIME.iter().map(PathBuf::from).find(|p| p.is_file());
        let library = available_or_skip(
            Service::Faketime,
            test,
            library,
            "needs libfaketime (apt-get install faketime)",
        )?;
        let ca = Ca::new("fleet private CA");
        let now = time::OffsetDateTime::now_utc();
        let tls = server_config_valid(
            &ca,
            now - time::Duration::days(365),
            now + time::Duration::days(30),
        );
        let double = Double::start_tls(Quirks::default(), tls).await;
        let device = Device::new(ID);
        double.set_controllers(ID, &[device.address()]);
        let ca_file = write(device.dir.path(), "orchestrator-ca.pem", &ca.pem());
        let trust = if system_roots {
            String::new()
        } else {
            format!("ca_file = \"{}\"", ca_file.display())
        };
        let config = device.write_config(&double.url(), &trust, "");
        // slow_retry far away: a CLOCK failure must not wait for it.
        let written = std::fs::read_to_string(&config).unwrap();
        assert!(written.contains("slow_retry = \"1s\""));
        std::fs::write(
            &config,
            written.replace("slow_retry = \"1s\"", "slow_retry = \"10m\""),
        )
        .unwrap();
        let clock_file = device.dir.path().join("faketime");
        std::fs::write(&clock_file, clock).unwrap();
        Some(Self {
            device,
            double,
            clock_file,
            config,
            library,
            ca_file,
            system_roots,
        })
    }

    /// The environment that gives a process this board's clock.
    fn clock_env(&self) -> Vec<(&'static str, &Path)> {
        let one = Path::new("1");
        let mut env: Vec<(&'static str, &Path)> = vec![
            ("LD_PRELOAD", &self.library),
            ("FAKETIME_TIMESTAMP_FILE", &self.clock_file),
            // Read the file at every call, so that rewriting it corrects
            // the clock of the running agent.
            ("FAKETIME_NO_CACHE", one),
            // The monotonic clock (timers, backoff) stays true, as on a
            // board whose wall clock NTP has not set yet.
            ("FAKETIME_DONT_FAKE_MONOTONIC", one),
        ];
        if self.system_roots {
            env.push(("SSL_CERT_FILE", self.ca_file.as_path()));
        }
        env
    }

    fn start(&self) -> AgentProcess {
        self.device.run(&self.config, &self.clock_env())
    }

    /// `peaqos-agent check` with this board's clock: its output.
    fn check(&self) -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_peaqos-agent"))
            .args(["check", "--config"])
            .arg(&self.config)
            .envs(self.clock_env())
            .env_remove("SSL_CERT_DIR")
            .env_remove("RUST_LOG")
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// NTP syncs: the agent's clock becomes the true one.
    fn correct_the_clock(&self) {
        std::fs::write(&self.clock_file, "+0\n").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_that_boots_in_1970_checks_the_certificate_at_its_floor_and_is_active() {
    let test = "a_board_that_boots_in_1970_checks_the_certificate_at_its_floor_and_is_active";
    let Some(board) = Board::new(test, "@1970-01-02 00:00:00\n").await else {
        return;
    };
    // `check` flags the clock, and reaches the orchestrator all the same.
    let report = board.check();
    assert!(
        report.contains("FAIL  clock") && report.contains("1970-01-02") && report.contains("NTP"),
        "{report}"
    );
    assert!(report.contains("ok    orchestrator"), "{report}");
    let mut agent = board.start();
    agent.wait_line(0, "state=active", AFTER_CORRECTION).await;
    let log = agent.log();
    assert!(!log.contains("not valid yet"), "{log}");
    // The server's Date says how wrong the clock is.
    let (_, warning) = agent
        .find(0, "error_code=\"CLOCK\"")
        .or_else(|| agent.find(0, "error_code=CLOCK"))
        .unwrap_or_else(|| panic!("no CLOCK warning:\n{log}"));
    assert!(warning.contains("NTP"), "{warning}");
    assert!(
        board
            .double
            .records()
            .iter()
            .any(|r| r.status == "active" && r.signer() == Some(board.device.address()))
    );
    board.correct_the_clock();
    let mark = agent.mark();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        agent.find(mark, "state=backoff").is_none(),
        "{}",
        agent.log()
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_two_years_ahead_shows_clock_and_is_active_soon_after_ntp() {
    let test = "a_board_two_years_ahead_shows_clock_and_is_active_soon_after_ntp";
    let Some(board) = Board::new(test, "+730d\n").await else {
        return;
    };
    let mut agent = board.start();
    let first = agent
        .wait_line(0, "error_code=CLOCK", AFTER_CORRECTION)
        .await;
    let log = agent.log();
    let (_, failure) = agent.find(first, "error_code=CLOCK").unwrap();
    assert!(
        failure.contains("state=backoff")
            && failure.contains("expired by this machine's clock")
            && failure.contains("NTP"),
        "{failure}"
    );
    assert!(!log.contains("state=active"), "{log}");
    // Retried within seconds, not at slow_retry (10 min).
    agent
        .wait_line(first + 1, "error_code=CLOCK", Duration::from_secs(8))
        .await;

    board.correct_the_clock();
    let corrected = Instant::now();
    let mark = agent.mark();
    agent
        .wait_line(mark, "state=active", AFTER_CORRECTION)
        .await;
    println!(
        "active {:?} after the clock was corrected",
        corrected.elapsed()
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_in_1970_trusting_the_systems_roots_is_active_too() {
    let test = "a_board_in_1970_trusting_the_systems_roots_is_active_too";
    let Some(board) = Board::trusting(test, "@1970-01-02 00:00:00\n", true).await else {
        return;
    };
    let mut agent = board.start();
    agent.wait_line(0, "state=active", AFTER_CORRECTION).await;
    assert!(!agent.log().contains("not valid yet"), "{}", agent.log());
    agent.stop().await;
}
