//! The orchestrator's fleet console in a real browser: headless Chromium
//! driven through chromedriver's WebDriver protocol (plain HTTP, with
//! reqwest). An operator logs in, sees the fleet, watches a machine that a
//! real agent registers appear and turn active without a reload, blocks it,
//! and the agent reports `blocked`.
//!
//! Without `chromium` and `chromedriver` (Debian's `chromium`,
//! `chromium-driver`) the test prints one skip line, unless
//! `PEAQOS_TEST_REQUIRE` names `chromium`. `PEAQOS_CONSOLE_SCREENSHOT=<path>`
//! writes the screenshot the docs show (docs/console.png).

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use peaqos_agent::config::Config;
use peaqos_agent::status::AgentState;
use peaqos_testkit::Service;
use serde_json::{Value, json};

use crate::support::orchestrator::Orchestrator;
use crate::support::{FAST_RENEWAL, Running, config_text, start, write_key};

const OPS_KEY: &str = "console-ops-0123456789abcdef";
const AGENT_KEY: &str = "console-agent-0123456789abcdef";
/// Any one wait: generous for a loaded CI machine, yet bounded.
const WAIT: Duration = Duration::from_secs(30);
/// The whole test.
const WHOLE: Duration = Duration::from_secs(150);
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A machine with its own key and an address-form identity.
struct Robot {
    dir: tempfile::TempDir,
    identity: String,
}

impl Robot {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = write_key(dir.path(), "controller");
        let hex = key.address().to_lower_hex();
        let identity = format!("did:peaq:0x{}", hex.trim_start_matches("0x"));
        std::fs::write(dir.path().join("api-key"), format!("{AGENT_KEY}\n")).unwrap();
        Self { dir, identity }
    }

    fn start(&self, url: &str, name: &str) -> Running {
        let dir = self.dir.path();
        let base = config_text(
            url,
            &self.identity,
            &dir.join("controller.key"),
            &dir.join("state"),
            FAST_RENEWAL,
        )
        .replace("\"test robot\"", &format!("\"{name}\""));
        let drop_in = format!(
            "[orchestrator]\napi_key_file = \"{}\"\n",
            dir.join("api-key").display()
        );
        start(
            Config::from_texts(vec![
                ("agent.toml".into(), base),
                ("agent.d/90-key.toml".into(), drop_in),
            ])
            .unwrap(),
        )
    }
}

/// The chromedriver process, in a process group of its own with the
/// browser it starts: however the test ends, the group is stopped.
struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.wait();
    }
}

/// A WebDriver session on a chromedriver child process.
struct Browser {
    http: reqwest::Client,
    session: String,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(chromium: &Path, chromedriver: &Path) -> Self {
        let port = peaqos_testkit::free_port();
        let driver = Driver(
            std::process::Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let up = tokio::task::spawn_blocking(move || peaqos_testkit::wait_for_port(addr, WAIT));
        assert!(up.await.unwrap(), "chromedriver listens");
        let profile = tempfile::tempdir().unwrap();
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .no_proxy()
            .build()
            .unwrap();
        let base = format!("http://{addr}");
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-breakpad".to_owned(),
            "--disable-crash-reporter".to_owned(),
            "--hide-scrollbars".to_owned(),
            "--window-size=1440,800".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let r = json_of(http.post(format!("{base}/session")).json(&caps)).await;
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_owned();
        Self {
            http,
            session: format!("{base}/session/{session}"),
            _driver: driver,
            _profile: profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: &Value) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if !body.is_null() {
            request = request.json(body);
        }
        let r = json_of(request).await;
        assert!(r["value"]["error"].is_null(), "WebDriver {path}: {r}");
        r["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", &json!({"url": url}))
            .await;
    }

    /// The first element `css` matches, waiting for it.
    async fn find(&self, css: &str) -> String {
        let b = self;
        self.until(&format!("find {css}"), move || async move {
            let r: Value = b
                .http
                .post(format!("{}/element", b.session))
                .json(&json!({"using": "css selector", "value": css}))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            r["value"][ELEMENT].as_str().map(str::to_owned)
        })
        .await
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            &json!({}),
        )
        .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            &json!({"text": text}),
        )
        .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            &json!({"script": script, "args": []}),
        )
        .await
    }

    /// The table's rows as the page shows them: `[identity, status]`.
    async fn rows(&self) -> Vec<(String, String)> {
        let v = self
            .script(
                "return [...document.querySelectorAll('#rows .row')]\
                 .map(r => [r.querySelector('.c-identity').textContent, r.dataset.status]);",
            )
            .await;
        serde_json::from_value(v).unwrap_or_default()
    }

    async fn until<T, F, Fut>(&self, what: &str, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(found) = probe().await {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; rows: {:?}",
                self.rows().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_rows(&self, what: &str, pred: impl Fn(&[(String, String)]) -> bool) {
        let (b, pred) = (self, &pred);
        self.until(what, move || async move {
            let rows = b.rows().await;
            pred(&rows).then_some(())
        })
        .await;
    }

    /// Waits until the element `id` reads `text`.
    async fn wait_text(&self, id: &str, text: &str) {
        let script = format!("return document.getElementById('{id}').textContent;");
        let (b, script) = (self, &script);
        self.until(&format!("#{id} to read {text}"), move || async move {
            (b.script(script).await == text).then_some(())
        })
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self
            .call(reqwest::Method::GET, "/screenshot", &Value::Null)
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }

    async fn quit(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

fn status_of<'a>(rows: &'a [(String, String)], identity: &str) -> Option<&'a str> {
    rows.iter()
        .find(|(id, _)| id == identity)
        .map(|(_, s)| s.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_a_machine_register_live_and_blocks_it() {
    const TEST: &str = "console in chromium";
    let programs =
        peaqos_testkit::find_program("chromium").zip(peaqos_testkit::find_program("chromedriver"));
    let Some((chromium, chromedriver)) = peaqos_testkit::available_or_skip(
        Service::Chromium,
        TEST,
        programs,
        "chromium and chromedriver (Debian: chromium, chromium-driver)",
    ) else {
        return;
    };
    tokio::time::timeout(WHOLE, watch_and_block(&chromium, &chromedriver))
        .await
        .expect("the whole story ends in time");
}

async fn watch_and_block(chromium: &Path, chromedriver: &Path) {
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        keys.path(),
        format!("ops {OPS_KEY} operator\nrobots {AGENT_KEY} agent\n"),
    )
    .unwrap();
    let orch = Orchestrator::start(|c| {
        c.require_api_auth = true;
        c.api_keys_file = Some(keys.path().to_owned());
        c.proof_max_age = Some(Duration::from_secs(30 * 86_400));
    })
    .await;
    let url = orch.url();

    // Three machines registered by their agents before anyone looks.
    let fleet: Vec<Robot> = (0..4).map(|_| Robot::new()).collect();
    for (i, robot) in fleet[..3].iter().enumerate() {
        let mut agent = robot.start(&url, &format!("AMR {}", i + 1));
        agent.wait_state(AgentState::Active, WAIT).await;
        agent.stop(WAIT).await;
    }

    let browser = Browser::start(chromium, chromedriver).await;
    browser.goto(&format!("{url}/console")).await;
    browser.type_into("#api-key", OPS_KEY).await;
    browser.click("#login-form button[type=submit]").await;
    browser
        .wait_rows("3 active machines", |rows| {
            rows.len() == 3 && rows.iter().all(|(_, s)| s == "active")
        })
        .await;
    // Marks this page load: a reload would lose it.
    browser.script("window.notReloaded = true;").await;
    browser.wait_text("count-active", "3").await;

    // A fourth registers: its row appears and turns active, live.
    let newcomer = &fleet[3].identity;
    let mut agent = fleet[3].start(&url, "AMR 4");
    browser
        .wait_rows("the 4th machine active", |rows| {
            rows.len() == 4 && status_of(rows, newcomer) == Some("active")
        })
        .await;
    agent.wait_state(AgentState::Active, WAIT).await;

    // Blocked from the page, with a confirmation.
    let row = format!(
        "#rows .row[title='{}']",
        agent.status.borrow().machine_id.clone().unwrap()
    );
    browser.click(&row).await;
    browser.click("#act-block").await;
    browser.click("#confirm-ok").await;
    agent.wait_state(AgentState::Blocked, WAIT).await;
    browser
        .wait_rows("the 4th machine blocked", |rows| {
            status_of(rows, newcomer) == Some("blocked")
        })
        .await;
    browser.wait_text("count-blocked", "1").await;
    browser
        .until("the block in the history", || async {
            let b = &browser;
            let text = b
                .script("return document.getElementById('history').textContent;")
                .await;
            text.as_str()
                .is_some_and(|t| t.contains("blocked by ops"))
                .then_some(())
        })
        .await;
    assert_eq!(
        browser.script("return window.notReloaded === true;").await,
        true,
        "no reload"
    );
    let id = agent.status.borrow().machine_id.clone().unwrap();
    let record = json_of(
        reqwest::Client::new()
            .get(format!("{url}/api/v1/machines/{id}"))
            .header("x-api-key", OPS_KEY),
    )
    .await;
    assert_eq!(record["item"]["status"], "blocked");

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    if let Some(path) = std::env::var_os("PEAQOS_CONSOLE_SCREENSHOT") {
        std::fs::write(path, &png).unwrap();
    }
    browser.quit().await;
    agent.stop(WAIT).await;
}
