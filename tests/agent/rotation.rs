//! Key rotation against our orchestrator (its registry file is the
//! identity source; rewriting it changes the controllers at run time):
//! two controllers at once with zero time out of `active`, counted from
//! the audit trail; kill -9 after each step with the key in SoftHSM2; and
//! a gateway that rotates one machine while the others take no challenge.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peaqos_protocol::Address;

use crate::support::orchestrator::{Orchestrator, SlowLink};
use crate::support::{FAST_RENEWAL, config_text, start, write_key};

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-agent");
const ID: &str = "did:peaq:8080";
const WAIT: Duration = Duration::from_secs(20);

/// `peaqos-agent key rotate` (`args` after it); the printed address.
fn rotate(command: &mut Command, args: &[&str]) -> Address {
    let out = command
        .args(["key", "rotate"])
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Address::parse(String::from_utf8(out.stdout).unwrap().trim()).unwrap()
}

/// `peaqos-agent key rotate --config config`.
fn rotate_config(config: &Path) -> Address {
    rotate(
        &mut Command::new(BIN),
        &["--config", config.to_str().unwrap()],
    )
}

/// Polls `done` every 20 ms until it holds; panics naming `what` after WAIT.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_on_our_orchestrator_zero_time_out_of_active_by_the_audit_trail() {
    let orch = Orchestrator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let (old, key_path) = write_key(dir.path(), "controller");
    let old = old.address();
    orch.set_controllers(ID, &[old]);
    let state = dir.path().join("state");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        config_text(&orch.url(), ID, &key_path, &state, FAST_RENEWAL),
    )
    .unwrap();
    let mut agent = start(peaqos_agent::config::Config::load(&path).unwrap());
    let active = agent
        .wait_state(peaqos_agent::status::AgentState::Active, WAIT)
        .await;
    let id = active.machine_id.unwrap();

    // A client reads the record all along: 200 and active every time.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (url, id, watching) = (orch.url(), id.clone(), watching.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut lapses = Vec::new();
            let mut looks = 0;
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                let r = client
                    .get(format!("{url}/api/v1/machines/{id}"))
                    .send()
                    .await
                    .unwrap();
                let code = r.status().as_u16();
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                if code != 200 || v["item"]["status"] != "active" {
                    lapses.push(v);
                }
                looks += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (looks, lapses)
        })
    };

    let next = rotate_config(&path);
    until("the running agent picks the successor up", async || {
        agent.status.borrow().next_controller_address.as_deref() == Some(&*next.checksummed())
    })
    .await;
    // The owner adds the successor; later removes the old key.
    orch.set_controllers(ID, &[old, next]);
    until("promoted", async || {
        let s = agent.status.borrow().clone();
        s.controller_address == next.checksummed() && s.next_controller_address.is_none()
    })
    .await;
    orch.set_controllers(ID, &[next]);
    for _ in 0..2 {
        agent.reregister(WAIT).await.unwrap();
    }
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let (looks, lapses) = watcher.await.unwrap();
    agent.stop(Duration::from_secs(5)).await;
    assert!(looks > 20, "{looks} looks");
    assert!(lapses.is_empty(), "the record left active: {lapses:#?}");

    // The audit trail: activated once, then only renewals; the renewal
    // after the promotion names the successor as signer, and no event ever
    // takes the record out of active.
    let events = orch.audit_events(&id).await;
    let types: Vec<&str> = events
        .iter()
        .filter_map(|e| e["type"].as_str().or(e["event_type"].as_str()))
        .collect();
    let first_active = types
        .iter()
        .position(|t| *t == "machine.activated")
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert!(
        types[first_active + 1..]
            .iter()
            .all(|t| *t == "machine.proof_renewed"),
        "{events:#?}"
    );
    let signers: Vec<String> = events[first_active + 1..]
        .iter()
        .map(|e| {
            e["payload"]["signer"]
                .as_str()
                .unwrap()
                .to_ascii_lowercase()
        })
        .collect();
    let successor = next.checksummed().to_ascii_lowercase();
    let from = signers
        .iter()
        .position(|s| *s == successor)
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert!(
        signers[from..].iter().all(|s| *s == successor),
        "the old key signed after: {signers:?}"
    );
}

/// A child agent whose log goes to a file the test reads.
struct Child9 {
    child: Child,
    log: PathBuf,
}

impl Child9 {
    fn start(command: &mut Command, config: &Path, log: PathBuf, hold: Option<&str>) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        command
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove(peaqos_agent::rotation::HOLD_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        if let Some(step) = hold {
            command.env(peaqos_agent::rotation::HOLD_ENV, step);
        }
        Self {
            child: command.spawn().unwrap(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_line(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(needle) {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "exited waiting for {needle:?}:\n{}",
                self.log()
            );
            assert!(Instant::now() < deadline, "no {needle:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Whether the orchestrator reads the machine in `state` active, proved
/// by `signer`.
async fn active_by(orch: &Orchestrator, state: &Path, signer: Address) -> bool {
    let Some(id) = crate::support::stored_machine_id(state) else {
        return false;
    };
    let (code, v) = orch.machine(&id).await;
    code == 200
        && v["item"]["status"] == "active"
        && v["item"]["identityProof"]["signerAddress"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case(&signer.checksummed()))
}

#[cfg(feature = "pkcs11")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_each_step_with_the_key_in_softhsm() {
    let test = "kill_9_after_each_step_with_the_key_in_softhsm";
    for step in ["prepared", "proven", "promoted", "retired"] {
        let Some(hsm) = peaqos_testkit::SoftHsm::start(test, "robot") else {
            return;
        };
        let uri = format!(
            "{}&pin-source={}",
            hsm.uri("controller"),
            hsm.pin_file().display()
        );
        let out = hsm
            .command(BIN)
            .args(["keygen", "--pkcs11", &uri])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let old = Address::parse(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
        let orch = Orchestrator::start(|_| {}).await;
        orch.set_controllers(ID, &[old]);
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let config = dir.path().join("agent.toml");
        let toml = config_text(&orch.url(), ID, Path::new("unused"), &state, FAST_RENEWAL)
            .replace("key_file = \"unused\"", &format!("key = \"{uri}\""));
        std::fs::write(&config, toml).unwrap();

        let mut agent = Child9::start(
            &mut hsm.command(BIN),
            &config,
            dir.path().join("1.log"),
            Some(step),
        );
        agent.wait_line("state=active").await;
        let next = rotate(
            &mut hsm.command(BIN),
            &["--config", config.to_str().unwrap()],
        );
        agent.wait_line("key rotation: prepared").await;
        // The owner replaces the controller in one step.
        orch.set_controllers(ID, &[next]);
        agent.wait_line("holding after this step").await;
        agent.kill();

        let mut again = Child9::start(
            &mut hsm.command(BIN),
            &config,
            dir.path().join("2.log"),
            None,
        );
        until(
            &format!("active, proved by the successor, after kill -9 at {step}"),
            async || active_by(&orch, &state, next).await,
        )
        .await;
        if step != "retired" {
            again.wait_line("key rotation: retired").await;
        }
        // The old key pair is gone from the token; the successor is sensitive
        // and never extractable, on the same token.
        let (ok, listing) = hsm.pkcs11_tool(&["--list-objects"]);
        assert!(ok, "{listing}");
        assert!(
            !listing.contains("label:      controller\n"),
            "{step}: {listing}"
        );
        assert!(
            listing.contains("label:      controller-next-"),
            "{step}: {listing}"
        );
        assert!(listing.contains("never extractable"), "{listing}");
        again.wait_line("state=active").await;
        again.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_rotates_one_machine_and_the_others_take_no_challenge() {
    let orch = Orchestrator::start(|_| {}).await;
    let link = SlowLink::start(&orch.url(), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let machines = dir.path().join("machines.d");
    std::fs::create_dir(&machines).unwrap();
    let mut registry = Vec::new();
    for n in 0..4 {
        let (key, key_path) = write_key(&machines, &format!("m{n}"));
        std::fs::write(
            machines.join(format!("m{n}.toml")),
            format!(
                "[identity]\nref = \"did:peaq:{}\"\nkey_file = \"{}\"\n\n[machine]\n\
                 display_name = \"M{n}\"\nowner_id = \"o\"\nmachine_type = \"plc\"\n\
                 runtime_profile = \"plc\"\n",
                8100 + n,
                key_path.display()
            ),
        )
        .unwrap();
        registry.push((format!("did:peaq:{}", 8100 + n), key.address()));
    }
    orch.set_registry(&registry);
    let state = dir.path().join("state");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[orchestrator]\nurl = \"{}\"\n\n[state]\ndir = \"{}\"\n{FAST_RENEWAL}",
            link.url(),
            state.display()
        ),
    )
    .unwrap();
    let mut agent = Child9::start(
        &mut Command::new(BIN),
        &config,
        dir.path().join("gw.log"),
        None,
    );
    for (n, (identity, signer)) in registry.clone().into_iter().enumerate() {
        let machine_state = state.join("machines").join(format!("m{n}"));
        until(&format!("{identity} active"), async || {
            active_by(&orch, &machine_state, signer).await
        })
        .await;
    }
    let challenges = |identity: &str| {
        link.exchanges
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                e.path.ends_with("/challenges")
                    && String::from_utf8_lossy(&e.request).contains(&format!("\"{identity}\""))
            })
            .count()
    };
    let before: Vec<usize> = registry.iter().map(|(i, _)| challenges(i)).collect();

    let next = rotate(
        &mut Command::new(BIN),
        &["--config", config.to_str().unwrap(), "--machine", "m2"],
    );
    agent.wait_line("key rotation: prepared").await;
    let mut changed = registry.clone();
    changed[2].1 = next;
    orch.set_registry(&changed);
    agent.wait_line("key rotation: retired").await;
    until("m2 active with its successor", async || {
        active_by(&orch, &state.join("machines/m2"), next).await
    })
    .await;
    let log = agent.log();
    let promoted = log
        .lines()
        .find(|l| l.contains("key rotation: promoted"))
        .unwrap();
    assert!(
        promoted.contains("m2"),
        "the machine's name on the step: {promoted}"
    );
    for (n, (identity, _)) in registry.iter().enumerate() {
        if n != 2 {
            assert_eq!(
                challenges(identity),
                before[n],
                "{identity} took a challenge"
            );
        }
    }
    assert!(challenges(&registry[2].0) > before[2]);
    agent.kill();
}

/// Runs a Python script on `arg`; what it printed.
fn run_python(python: &Path, script: &str, arg: &Path) -> String {
    let out = Command::new(python)
        .args(["-c", script])
        .arg(arg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A keystore's successor is a keystore with the same password and work
/// factors, and eth-account opens it; a plaintext key's keeps its mode.
#[test]
fn successors_keep_the_protection_and_eth_account_opens_the_keystore() {
    use std::os::unix::fs::PermissionsExt;
    let test = "successors_keep_the_protection_and_eth_account_opens_the_keystore";
    let Some(python) = peaqos_testkit::python_with(test, &["eth_account"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keystore = dir.path().join("keystore.json");
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret passphrase\n").unwrap();
    let make = r#"
import json, sys
from eth_account import Account
ks = Account.encrypt(Account.create().key, "s3cret passphrase", kdf="pbkdf2", iterations=2000)
open(sys.argv[1], "w").write(json.dumps(ks))
"#;
    run_python(&python, make, &keystore);
    std::fs::set_permissions(&keystore, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("agent.toml");
    let toml = config_text("http://127.0.0.1:9", ID, &keystore, &state, "").replace(
        "key_file =",
        &format!("key_password_file = \"{}\"\nkey_file =", password.display()),
    );
    std::fs::write(&config, toml).unwrap();
    let next = rotate_config(&config);
    let successor = state
        .join("keys")
        .join(format!("{}.json", next.checksummed()));
    let open = r#"
import json, sys
from eth_account import Account
ks = json.load(open(sys.argv[1]))
print(ks["crypto"]["kdf"], ks["crypto"]["kdfparams"]["c"], Account.from_key(Account.decrypt(ks, "s3cret passphrase")).address)
"#;
    assert_eq!(
        run_python(&python, open, &successor),
        format!("pbkdf2 2000 {}", next.checksummed())
    );
    // check shows the waiting successor (its orchestrator line fails here:
    // nothing listens).
    let check = Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&check.stdout);
    assert!(
        lines.contains(&format!("nextControllerAddress {}", next.checksummed())),
        "{lines}"
    );
    // A second rotation while one waits is refused, naming the successor.
    let again = Command::new(BIN)
        .args(["key", "rotate", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains(&*next.checksummed()),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // A plaintext key of mode 0400: its successor is 0400 too.
    let (_, plain) = write_key(dir.path(), "plain");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o400)).unwrap();
    let state = dir.path().join("state2");
    std::fs::write(
        &config,
        config_text("http://127.0.0.1:9", ID, &plain, &state, ""),
    )
    .unwrap();
    let next = rotate_config(&config);
    let file = state
        .join("keys")
        .join(format!("{}.key", next.checksummed()));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o400);
    let keys_mode = std::fs::metadata(state.join("keys"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(keys_mode, 0o700);
}
