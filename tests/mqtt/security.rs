//! The broker-side protections: the shipped ACL (`config/mosquitto-acl.conf`,
//! loaded verbatim by Mosquitto with a password file, plus a test-only
//! observer that may read everything) and TLS to the broker (certificates
//! made with the `openssl` command).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::{Agent, Answer, Tools, WAIT, broker, config, publish, request, wait_retained};
use peaqos_agent::mqtt::{self, CommandName, MqttConfig, MqttError, Protocol};
use peaqos_testkit::{Mosquitto, Service, available_or_skip, find_program};

const USERS: [&str; 4] = ["peaqos-agent", "peaqos-reader", "peaqos-admin", OBSERVER];
/// Not in the shipped ACL: appended for the tests, to see what the shipped
/// users must not be able to write.
const OBSERVER: &str = "test-observer";

fn password(user: &str) -> String {
    format!("pw-of-{user}")
}

fn shipped_acl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mosquitto-acl.conf")
}

/// The shipped ACL unchanged, then the observer's rules.
fn acl_file(dir: &Path) -> PathBuf {
    let shipped = std::fs::read_to_string(shipped_acl()).unwrap();
    let path = dir.join("acl.conf");
    std::fs::write(
        &path,
        format!("{shipped}\nuser {OBSERVER}\ntopic read #\ntopic readwrite test-sync/#\n"),
    )
    .unwrap();
    path
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A broker that loads the shipped ACL verbatim, with a password file made
/// by `mosquitto_passwd`, and an agent for machine "robot-7" logged in as
/// `peaqos-agent` (commands enabled).
struct AclSetup {
    dir: tempfile::TempDir,
    broker: Mosquitto,
    tools: Tools,
    cfg: MqttConfig,
    agent: Agent,
}

impl AclSetup {
    fn start(test: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let mosquitto_passwd = available_or_skip(
            Service::Mosquitto,
            test,
            find_program("mosquitto_passwd"),
            "no mosquitto_passwd",
        )?;
        for (i, user) in USERS.iter().enumerate() {
            let mut cmd = Command::new(&mosquitto_passwd);
            if i == 0 {
                cmd.arg("-c");
            }
            let ok = cmd
                .arg("-b")
                .arg(&passwd)
                .args([*user, password(user).as_str()])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success();
            assert!(ok, "mosquitto_passwd failed");
        }
        let extra = format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\n",
            passwd.display(),
            acl_file(dir.path()).display()
        );
        let (broker, tools) = broker(test, &extra)?;
        let secret = dir.path().join("mqtt-password");
        std::fs::write(&secret, format!("{}\n", password("peaqos-agent"))).unwrap();
        let mut cfg = config(&broker, Protocol::V5);
        cfg.username = Some("peaqos-agent".into());
        cfg.password_file = Some(secret.display().to_string());
        cfg.commands.enabled = true;
        cfg.commands.allow = vec![CommandName::Reregister];
        let agent = Agent::start(&cfg, "robot-7", Answer::Ok);
        let setup = Self {
            dir,
            broker,
            tools,
            cfg,
            agent,
        };
        let reader = setup.user("peaqos-reader");
        wait_retained(&setup.broker, &reader, "peaqos/robot-7/availability", |p| {
            p == "online"
        });
        Some(setup)
    }

    fn user(&self, name: &str) -> Tools {
        self.tools.as_user(name, &password(name))
    }

    /// A status query as `tools`; true if answered. Also an ordering
    /// barrier: what the same broker got before has reached the agent.
    fn ask(&self, tools: &Tools, reply: &str) -> bool {
        request(
            self.broker.port(),
            tools,
            "peaqos/robot-7/status/get",
            &format!("peaqos/robot-7/reply/{reply}"),
            &["-m", ""],
            5,
        )
        .is_some()
    }
}

#[test]
fn the_shipped_acl_lets_readers_ask_but_only_the_admin_command() {
    let Some(setup) = AclSetup::start("acl_readers_admin") else {
        return;
    };
    let port = setup.broker.port();
    let reader = setup.user("peaqos-reader");
    let admin = setup.user("peaqos-admin");

    // Readers see availability and status, and may ask.
    let status = wait_retained(&setup.broker, &reader, "peaqos/robot-7/status", |p| {
        !p.is_empty()
    });
    assert!(
        setup.ask(&reader, "reader-1"),
        "a reader's query was not answered"
    );
    // `peaqos-agent status` runs with the agent's own credentials.
    let answer = runtime()
        .block_on(mqtt::query_status(&setup.cfg, "robot-7", WAIT))
        .unwrap_or_else(|e| panic!("{}", crate::support::error_chain(&e)));
    assert_eq!(answer["identity"], "did:peaq:4242");

    // A reader can neither command nor forge the status.
    publish(
        port,
        &reader,
        &[
            "-t",
            "peaqos/robot-7/command/reregister",
            "-m",
            r#"{"id":"r1"}"#,
        ],
    );
    publish(
        port,
        &reader,
        &["-r", "-t", "peaqos/robot-7/status", "-m", "{}"],
    );
    assert!(setup.ask(&reader, "reader-2"));
    assert_eq!(setup.agent.commands(), 0, "a reader's command got through");
    assert_eq!(
        wait_retained(&setup.broker, &reader, "peaqos/robot-7/status", |_| true),
        status
    );

    // The admin can command, and sees the result.
    let result = request(
        port,
        &admin,
        "peaqos/robot-7/command/reregister",
        "peaqos/robot-7/reply/admin-1",
        &["-m", r#"{"id":"a1"}"#],
        5,
    );
    assert!(result.is_some_and(|r| r.contains("accepted")));
    assert_eq!(setup.agent.commands(), 1);
}

#[test]
fn the_shipped_acl_confines_the_agent_user_and_wants_its_password() {
    let Some(setup) = AclSetup::start("acl_agent_user") else {
        return;
    };
    let port = setup.broker.port();
    let agent_user = setup.user("peaqos-agent");

    // The agent's user cannot write another machine's topics, nor command.
    publish(
        port,
        &agent_user,
        &["-r", "-t", "peaqos/robot-8/status", "-m", "forged"],
    );
    publish(
        port,
        &agent_user,
        &[
            "-t",
            "peaqos/robot-7/command/reregister",
            "-m",
            r#"{"id":"x1"}"#,
        ],
    );
    // The observer may read robot-8's status. Retained messages come in the
    // order of the subscriptions, so the first message answers whether a
    // forged status was kept, with the marker retained after it as proof
    // that the answer is complete.
    let observer = setup.user(OBSERVER);
    publish(
        port,
        &observer,
        &["-r", "-t", "test-sync/acl", "-m", "marker"],
    );
    let found = Command::new(&setup.tools.sub)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(&observer.auth)
        .args(["-t", "peaqos/robot-8/status", "-t", "test-sync/acl"])
        .args(["-C", "1", "-W", "10", "-F", "%t %p"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&found.stdout).trim_end(),
        "test-sync/acl marker",
        "the agent user wrote robot-8's status"
    );
    assert!(setup.ask(&setup.user("peaqos-reader"), "reader-3"));
    assert_eq!(
        setup.agent.commands(),
        0,
        "the agent user's command got through"
    );

    // Wrong password, and no password: refused, with a clear error.
    let rt = runtime();
    let mut wrong = setup.cfg.clone();
    let bad_secret = setup.dir.path().join("bad-password");
    std::fs::write(&bad_secret, "nope").unwrap();
    wrong.password_file = Some(bad_secret.display().to_string());
    let err = rt.block_on(mqtt::check_broker(&wrong, WAIT)).unwrap_err();
    assert!(matches!(err, MqttError::Refused { .. }), "{err}");
    let mut anonymous = setup.cfg.clone();
    anonymous.username = None;
    anonymous.password_file = None;
    let err = rt
        .block_on(mqtt::check_broker(&anonymous, WAIT))
        .unwrap_err();
    assert!(matches!(err, MqttError::Refused { .. }), "{err}");
    let found = rt.block_on(mqtt::check_broker(&setup.cfg, WAIT)).unwrap();
    assert!(found.contains(r#"as user "peaqos-agent""#), "{found}");
}

/// CA, server and client certificates made with the openssl command.
#[cfg(feature = "tls")]
struct Pki {
    dir: tempfile::TempDir,
}

#[cfg(feature = "tls")]
impl Pki {
    fn make(test: &str) -> Option<Self> {
        let openssl = available_or_skip(
            Service::Mosquitto,
            test,
            find_program("openssl"),
            "no openssl command to make test certificates",
        )?;
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new(&openssl)
                .current_dir(dir.path())
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let key = format!("{ca}.key");
            let pem = format!("{ca}.pem");
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend([
                "-keyout", &key, "-out", &pem, "-days", "2", "-subj", "/CN=test",
            ]);
            run(&args);
        }
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        // Any extension makes a version 3 certificate; webpki refuses v1.
        std::fs::write(
            dir.path().join("client.ext"),
            "extendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let pem = format!("{name}.pem");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=peaqos-agent"]);
            run(&args);
            let args = [
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                ext,
            ];
            run(&args);
        }
        // Mosquitto started as root drops to its own user before it loads
        // certificates: these throwaway files must be readable by it.
        let readable = |p: &Path, mode| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        readable(dir.path(), 0o755);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            readable(&entry.unwrap().path(), 0o644);
        }
        Some(Self { dir })
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[cfg(feature = "tls")]
#[test]
fn mqtts_with_a_ca_file_and_optional_client_certificate() {
    let Some(pki) = Pki::make("mqtts") else {
        return;
    };
    let tls_port = peaqos_testkit::free_port();
    let mtls_port = peaqos_testkit::free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
         listener {mtls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
         require_certificate true\n",
        ca = pki.path("ca.pem"),
        cert = pki.path("server.pem"),
        key = pki.path("server.key"),
    );
    let Some((broker, tools)) = broker("mqtts", &extra) else {
        return;
    };
    for port in [tls_port, mtls_port] {
        assert!(peaqos_testkit::wait_for_port(
            ([127, 0, 0, 1], port).into(),
            std::time::Duration::from_secs(5)
        ));
    }
    let rt = runtime();
    let mut cfg = config(&broker, Protocol::V5);
    cfg.url = format!("mqtts://127.0.0.1:{tls_port}");
    cfg.ca_file = Some(pki.path("ca.pem").into());
    cfg.check().unwrap();

    let found = rt.block_on(mqtt::check_broker(&cfg, WAIT)).unwrap();
    assert!(found.contains("over TLS"), "{found}");
    {
        // The whole interface over TLS; observed on the plain listener.
        let _agent = Agent::start(&cfg, "r1", Answer::Ok);
        wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
    }

    // A broker whose certificate our CA did not sign is refused.
    let mut other = cfg.clone();
    other.ca_file = Some(pki.path("other-ca.pem").into());
    let err = rt.block_on(mqtt::check_broker(&other, WAIT)).unwrap_err();
    let chain = crate::support::error_chain(&err);
    assert!(matches!(err, MqttError::Connect { .. }), "{chain}");
    assert!(chain.to_lowercase().contains("certificate"), "{chain}");

    // A broker that requires a client certificate: refused without one,
    // accepted with ours (the key may come from a systemd credential).
    let mut mtls = cfg.clone();
    mtls.url = format!("mqtts://127.0.0.1:{mtls_port}");
    assert!(rt.block_on(mqtt::check_broker(&mtls, WAIT)).is_err());
    mtls.client_cert_file = Some(pki.path("client.pem").into());
    mtls.client_key_file = Some(pki.path("client.key"));
    let found = rt.block_on(mqtt::check_broker(&mtls, WAIT)).unwrap();
    assert!(found.contains("over TLS"), "{found}");

    // A CA file that is not PEM is a clear setup error, before connecting.
    let mut not_pem = cfg;
    let junk = pki.path("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    not_pem.ca_file = Some(junk.into());
    let err = rt.block_on(mqtt::check_broker(&not_pem, WAIT)).unwrap_err();
    assert!(matches!(err, MqttError::Tls(_)), "{err}");
}
