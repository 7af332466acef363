//! The controller key in a real PKCS#11 token (SoftHSM2, a private token
//! store per test through `SOFTHSM2_CONF`): `keygen --pkcs11` makes a key
//! that OpenSC's `pkcs11-tool` reports sensitive and never extractable;
//! the agent registers with it against the real orchestrator, and
//! eth-account recovers the token's address from the signatures it sent;
//! a token that goes away (its directory moved off and back) is shown in
//! the status and survived. Each agent is a child process, since the
//! module reads `SOFTHSM2_CONF` from its process's environment.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use peaqos_protocol::Address;
use peaqos_testkit::SoftHsm;
use tokio::net::UnixDatagram;

use crate::support::orchestrator::{Orchestrator, SlowLink};

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-agent");
const ID: &str = "did:peaq:4242";
const WAIT: Duration = Duration::from_secs(20);

fn agent(hsm: &SoftHsm, args: &[&str]) -> Output {
    hsm.command(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The URI with the PIN file as its pin-source.
fn uri_with_pin(hsm: &SoftHsm, object: &str) -> String {
    format!(
        "{}&pin-source={}",
        hsm.uri(object),
        hsm.pin_file().display()
    )
}

/// `keygen --pkcs11` in the token; returns the printed address.
pub(crate) fn keygen(hsm: &SoftHsm, object: &str) -> Address {
    let out = agent(hsm, &["keygen", "--pkcs11", &uri_with_pin(hsm, object)]);
    assert!(out.status.success(), "{}", text(&out));
    Address::parse(String::from_utf8(out.stdout).unwrap().trim()).unwrap()
}

#[test]
fn keygen_makes_a_secp256k1_key_the_token_never_hands_out() {
    let test = "keygen_makes_a_secp256k1_key_the_token_never_hands_out";
    let Some(hsm) = SoftHsm::start(test, "robot") else {
        return;
    };
    let address = keygen(&hsm, "controller");

    // `address` reads it back, with the PIN from --pin-file this time.
    let pin = hsm.pin_file();
    let out = agent(
        &hsm,
        &[
            "address",
            "--pkcs11",
            &hsm.uri("controller"),
            "--pin-file",
            pin.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        address.checksummed()
    );

    // A second keygen under the same name never replaces the key.
    let again = agent(
        &hsm,
        &["keygen", "--pkcs11", &uri_with_pin(&hsm, "controller")],
    );
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(text(&again).contains("already holds"), "{}", text(&again));

    // OpenSC's view of the objects: the private key is sensitive and was
    // never extractable; the public key is on secp256k1, and its point is
    // the address we printed.
    let (ok, listing) = hsm.pkcs11_tool(&["--list-objects", "--type", "privkey"]);
    assert!(ok, "{listing}");
    assert!(listing.contains("label:      controller"), "{listing}");
    assert!(
        listing.contains("sensitive, always sensitive, never extractable"),
        "{listing}"
    );
    let (ok, listing) = hsm.pkcs11_tool(&["--list-objects", "--type", "pubkey"]);
    assert!(ok, "{listing}");
    assert!(
        listing.contains("EC_PARAMS:  06052b8104000a"),
        "secp256k1: {listing}"
    );
    let point = listing
        .lines()
        .find_map(|l| l.trim().strip_prefix("EC_POINT:"))
        .map_or_else(|| panic!("no EC_POINT: {listing}"), str::trim);
    let (sec1, from_tool) =
        peaqos_agent::pkcs11::decode_ec_point(&hex::decode(point).unwrap()).unwrap();
    assert_eq!(sec1.len(), 65);
    assert_eq!(from_tool, address);

    // Asking the token for the private key's value (CKA_VALUE) itself is
    // refused: CKR_ATTRIBUTE_SENSITIVE. Asked from a child process of this
    // test binary, the only way to give the module its SOFTHSM2_CONF.
    let out = hsm
        .command(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "pkcs11::reads_the_private_value_when_run_as_a_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, hsm.module())
        .env("PEAQOS_TEST_PIN_FILE", hsm.pin_file())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("CKA_VALUE of the controller key: Sensitive"),
        "{}",
        text(&out)
    );
}

/// Set (to the module path) for the child that reads the key's value.
const CHILD: &str = "PEAQOS_TEST_PKCS11_CHILD";

/// Only does something in the child process the test above starts.
#[test]
fn reads_the_private_value_when_run_as_a_child() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use cryptoki::session::UserType;

    let Some(module) = std::env::var_os(CHILD) else {
        return;
    };
    let pin = std::fs::read_to_string(std::env::var_os("PEAQOS_TEST_PIN_FILE").unwrap()).unwrap();
    let context = Pkcs11::new(module).unwrap();
    context
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = context.get_slots_with_token().unwrap()[0];
    let session = context.open_ro_session(slot).unwrap();
    session
        .login(UserType::User, Some(&pin.trim().into()))
        .unwrap();
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"controller".to_vec()),
        ])
        .unwrap();
    assert_eq!(keys.len(), 1);
    let info = session
        .get_attribute_info(keys[0], &[AttributeType::Value])
        .unwrap();
    println!("CKA_VALUE of the controller key: {:?}", info[0]);
}

#[test]
fn token_mistakes_are_named_with_the_fix() {
    let test = "token_mistakes_are_named_with_the_fix";
    let Some(hsm) = SoftHsm::start(test, "robot") else {
        return;
    };
    keygen(&hsm, "controller");
    let dir = tempfile::tempdir().unwrap();
    let wrong_pin = dir.path().join("wrong.pin");
    std::fs::write(&wrong_pin, "0000\n").unwrap();
    let module = hsm.module().display().to_string();
    let pin = hsm.pin_file().display().to_string();
    let cases: [(String, i32, &str); 5] = [
        (
            format!(
                "{}&pin-source={}",
                hsm.uri("controller"),
                wrong_pin.display()
            ),
            78,
            "rejected the PIN",
        ),
        (uri_with_pin(&hsm, "nothing-here"), 78, "keygen --pkcs11"),
        (
            format!(
                "pkcs11:token=robot;object=controller?module-path=/nonexistent/libp11.so\
                 &pin-source={pin}"
            ),
            78,
            "fix module-path",
        ),
        (
            format!(
                "pkcs11:token=unplugged;object=controller?module-path={module}&pin-source={pin}"
            ),
            69,
            "plug the token in",
        ),
        (
            format!("{}&pin-value=4711", hsm.uri("controller")),
            78,
            "pin-value would put the PIN in the configuration",
        ),
    ];
    for (uri, code, fix) in cases {
        let out = agent(&hsm, &["address", "--pkcs11", &uri]);
        assert_eq!(out.status.code(), Some(code), "{uri}: {}", text(&out));
        assert!(text(&out).contains(fix), "{uri}: {}", text(&out));
    }

    // The same through `run`: a configuration naming a token without any
    // PIN is a configuration error (78), and so is a wrong PIN.
    let no_pin = config_text("http://127.0.0.1:9", &hsm.uri("controller"), dir.path(), "");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, no_pin).unwrap();
    let out = agent(&hsm, &["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("needs a PIN"), "{}", text(&out));
    let wrong = config_text(
        "http://127.0.0.1:9",
        &format!(
            "{}&pin-source={}",
            hsm.uri("controller"),
            wrong_pin.display()
        ),
        dir.path(),
        "",
    );
    std::fs::write(&path, wrong).unwrap();
    let out = agent(&hsm, &["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("rejected the PIN"), "{}", text(&out));
}

fn config_text(url: &str, uri: &str, dir: &Path, extra: &str) -> String {
    format!(
        r#"
[identity]
ref = "{ID}"
key = "{uri}"

[orchestrator]
url = "{url}"
connect_timeout = "1s"
request_timeout = "3s"

[machine]
display_name = "hsm robot"
owner_id = "owner-1"
machine_type = "amr"
runtime_profile = "ros2"

[state]
dir = "{state}"

[renewal]
check_interval = "200ms"
backoff_initial = "50ms"
backoff_max = "300ms"
slow_retry = "300ms"
{extra}
"#,
        state = dir.join("state").display(),
    )
}

/// An agent child process whose `STATUS=` lines arrive on our own
/// `$NOTIFY_SOCKET`, as systemd would receive them.
struct RunningAgent {
    child: Child,
    socket: UnixDatagram,
    /// Every STATUS= line seen, in order.
    statuses: Vec<String>,
}

impl RunningAgent {
    fn start(hsm: &SoftHsm, config: &Path, dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let child = hsm
            .command(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &path)
            .env("RUST_LOG", "info")
            .env_remove("WATCHDOG_USEC")
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            child,
            socket,
            statuses: Vec::new(),
        }
    }

    /// Waits for a STATUS= line starting with `prefix`; panics with what was
    /// seen after `timeout`.
    async fn wait_status(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            let received = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await;
            let Ok(Ok(n)) = received else {
                let _ = self.child.kill();
                panic!(
                    "no STATUS={prefix}.. within {timeout:?}; seen: {:#?}; exit: {:?}",
                    self.statuses,
                    self.child.try_wait()
                );
            };
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                if let Some(status) = line.strip_prefix("STATUS=") {
                    self.statuses.push(status.to_owned());
                    if status.starts_with(prefix) {
                        return status.to_owned();
                    }
                }
            }
        }
    }

    /// SIGTERM, and the exit status and log.
    fn stop(self) -> (std::process::ExitStatus, String) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let output = self.child.wait_with_output().unwrap();
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// A machine whose key is in a token, an orchestrator that knows it as
/// controller, and a link between them that records what passes.
struct Setup {
    hsm: SoftHsm,
    dir: tempfile::TempDir,
    address: Address,
    orch: Orchestrator,
    link: SlowLink,
    config: PathBuf,
}

impl Setup {
    async fn new(test: &str, tune: impl FnOnce(&mut peaqos_orchestrator::Config)) -> Option<Self> {
        let hsm = SoftHsm::start(test, "robot")?;
        let address = keygen(&hsm, "controller");
        let orch = Orchestrator::start(tune).await;
        orch.set_controllers(ID, &[address]);
        let link = SlowLink::start(&orch.url(), Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        // The PIN through key_pin_file this time (pin-source is the other way).
        let config_toml = config_text(&link.url(), &hsm.uri("controller"), dir.path(), "").replace(
            "key = ",
            &format!("key_pin_file = \"{}\"\nkey = ", hsm.pin_file().display()),
        );
        std::fs::write(&config, config_toml).unwrap();
        Some(Self {
            hsm,
            dir,
            address,
            orch,
            link,
            config,
        })
    }

    fn start(&self) -> RunningAgent {
        RunningAgent::start(&self.hsm, &self.config, self.dir.path())
    }

    /// (challenge text, signature) of every proof the agent submitted.
    fn signed_challenges(&self) -> Vec<(String, String)> {
        let exchanges = self.link.exchanges.lock().unwrap().clone();
        let mut texts = std::collections::BTreeMap::new();
        let mut proofs = Vec::new();
        for e in &exchanges {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&e.response)
                && e.path.ends_with("/challenges")
                && let (Some(id), Some(text)) = (
                    v["item"]["challengeId"].as_str(),
                    v["item"]["message"].as_str(),
                )
            {
                texts.insert(id.to_owned(), text.to_owned());
            }
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&e.request)
                && let (Some(id), Some(sig)) = (
                    v["identityProof"]["challengeId"].as_str(),
                    v["identityProof"]["signature"].as_str(),
                )
            {
                proofs.push((id.to_owned(), sig.to_owned()));
            }
        }
        proofs
            .into_iter()
            .map(|(id, sig)| (texts[&id].clone(), sig))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_its_key_in_the_token_registers_and_eth_account_agrees() {
    let test = "an_agent_with_its_key_in_the_token_registers_and_eth_account_agrees";
    let Some(setup) = Setup::new(test, |_| {}).await else {
        return;
    };
    let mut agent = setup.start();
    let active = agent.wait_status("active machine", WAIT).await;
    let id = active.split_whitespace().nth(2).unwrap().to_owned();
    let (status, body) = setup.orch.machine(&id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["item"]["status"], "active");
    assert_eq!(
        body["item"]["identityProof"]["signerAddress"],
        setup.address.checksummed()
    );

    // `check` while the agent runs: the token, the key's protection and a
    // test signature, and the orchestrator sees our address as controller.
    let config = setup.config.to_str().unwrap().to_owned();
    let hsm_conf = setup.hsm.conf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["check", "--config", &config])
            .env("SOFTHSM2_CONF", hsm_conf)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    for line in [
        "ok    key token     token \"robot\" (SoftHSM project SoftHSM v2",
        "ok    key guarded   CKA_SENSITIVE=true, CKA_EXTRACTABLE=false, \
         CKA_ALWAYS_SENSITIVE=true, CKA_NEVER_EXTRACTABLE=true",
        "ok    key signature the token signed a test text; it recovers to",
        "ok    controller",
    ] {
        assert!(report.contains(line), "missing {line:?} in:\n{report}");
    }

    let (exit, log) = agent.stop();
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(
        log.contains("key=\"pkcs11\"") || log.contains("key=pkcs11"),
        "{log}"
    );

    // Every signature the agent sent recovers, in eth-account, to the
    // token key's address.
    let signed = setup.signed_challenges();
    assert!(!signed.is_empty(), "no proof passed the link");
    let Some(python) = peaqos_testkit::python_with(test, &["eth_account"]) else {
        return;
    };
    let script = r"
import json, sys
from eth_account import Account
from eth_account.messages import encode_defunct
for text, sig in json.load(sys.stdin):
    print(Account.recover_message(encode_defunct(text=text), signature=sig))
";
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        serde_json::to_string(&signed).unwrap().as_bytes(),
    )
    .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let recovered: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(recovered.len(), signed.len());
    for r in recovered {
        assert_eq!(r, setup.address.checksummed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_goes_away_is_shown_and_waited_for_never_replaced() {
    let test = "a_token_that_goes_away_is_shown_and_waited_for_never_replaced";
    // Proofs live 3 s, so renewals (signatures) keep coming.
    let Some(setup) = Setup::new(test, |c| {
        c.proof_max_age = Some(Duration::from_secs(3));
    })
    .await
    else {
        return;
    };
    let mut agent = setup.start();
    agent.wait_status("active machine", WAIT).await;

    // The token's files go away (as a token that is unplugged, or a
    // SoftHSM2 store being restored): the status says so, the agent lives.
    let tokens = setup.hsm.token_dir();
    let away = setup.dir.path().join("tokens-away");
    std::fs::rename(&tokens, &away).unwrap();
    let shown = agent.wait_status("key_unavailable", WAIT).await;
    assert!(shown.contains("(KEY_UNAVAILABLE)"), "{shown}");
    let proofs_while_away = setup.signed_challenges().len();

    // Back again: found again, signing again, active again.
    std::fs::rename(&away, &tokens).unwrap();
    agent.wait_status("active machine", WAIT).await;
    let renewed = setup
        .link
        .wait_until(WAIT, || setup.signed_challenges().len() > proofs_while_away)
        .await;
    assert!(renewed, "no new proof after the token came back");
    assert!(agent.child.try_wait().unwrap().is_none(), "agent exited");
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(log.contains("KEY_UNAVAILABLE"), "{log}");
    assert!(log.contains("token session opened again"), "{log}");
    assert!(
        !log.contains(peaqos_testkit::softhsm::USER_PIN),
        "the PIN never reaches the log"
    );
}

/// A gateway whose machines' keys are objects on one token: one module
/// load for all of them, so that a machine removed by a reload (its
/// session closed) does not end the others' sessions; `STATUS=` sums the
/// machines up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_keys_share_one_token_and_removing_one_leaves_the_others_signing() {
    let Some(hsm) = SoftHsm::start(
        "a_gateways_keys_share_one_token_and_removing_one_leaves_the_others_signing",
        "gateway",
    ) else {
        return;
    };
    let orch = Orchestrator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let machines = dir.path().join("machines.d");
    std::fs::create_dir(&machines).unwrap();
    let mut registry = Vec::new();
    for (n, name) in ["m-a", "m-b", "m-c"].into_iter().enumerate() {
        let address = keygen(&hsm, name);
        let identity = format!("did:peaq:{}", 7000 + n);
        let text = format!(
            "[identity]\nref = \"{identity}\"\nkey = \"{}\"\n\n[machine]\n\
             display_name = \"{name}\"\nowner_id = \"o\"\nmachine_type = \"t\"\n\
             runtime_profile = \"r\"\n",
            uri_with_pin(&hsm, name)
        );
        std::fs::write(machines.join(format!("{name}.toml")), text).unwrap();
        registry.push((identity, address));
    }
    orch.set_registry(&registry);
    let config = dir.path().join("agent.toml");
    let gateway = config_text(&orch.url(), "unused", dir.path(), "");
    // agent.toml without [identity] and [machine]: a gateway only.
    let gateway: String = gateway
        .split("\n[")
        .filter(|table| !table.starts_with("identity]") && !table.starts_with("machine]"))
        .collect::<Vec<_>>()
        .join("\n[");
    std::fs::write(&config, gateway).unwrap();
    let mut agent = RunningAgent::start(&hsm, &config, dir.path());
    agent.wait_status("3 machines: 3 active", WAIT).await;

    let hup = |agent: &RunningAgent| {
        let sent = Command::new("kill")
            .args(["-HUP", &agent.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    // Each machine restarted in turn (its file changed): whichever loaded
    // the module first closes its session while the others keep theirs.
    for name in ["m-a", "m-b", "m-c"] {
        let file = machines.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{text}# changed\n")).unwrap();
        hup(&agent);
        // Each loop probes its key at every check (200 ms): five each.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    std::fs::remove_file(machines.join("m-a.toml")).unwrap();
    hup(&agent);
    agent.wait_status("2 machines: 2 active", WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let statuses = agent.statuses.clone();
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{exit}\n{log}");
    assert_eq!(
        log.matches("0 started, 0 stopped, 1 restarted").count(),
        3,
        "{log}"
    );
    assert!(
        !log.contains("key_unavailable") && !log.contains("token session opened again"),
        "the remaining machines lost their token session:\n{log}"
    );
    assert!(
        statuses.iter().all(|s| !s.contains("key_unavailable")),
        "{statuses:#?}"
    );
}
