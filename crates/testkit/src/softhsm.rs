//! A private SoftHSM2 token per test: its own `softhsm2.conf` and token
//! directory in a temp dir, handed to child processes through
//! `SOFTHSM2_CONF` (the module reads it at `C_Initialize`), so that tests
//! running in parallel never share a token.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::{Service, available_or_skip, find_program};

/// Where Debian's `softhsm2` package puts the module.
const MODULES: [&str; 3] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
];

/// The user PIN of every test token.
pub const USER_PIN: &str = "4711-test-pin";
const SO_PIN: &str = "0815-so-pin";

/// One initialised token (label `label`) in a private SoftHSM2 store.
#[derive(Debug)]
pub struct SoftHsm {
    dir: tempfile::TempDir,
    module: PathBuf,
    pkcs11_tool: PathBuf,
    label: String,
}

fn run(command: &mut Command) -> Output {
    let output = command.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl SoftHsm {
    /// Makes a store with one token labelled `label` and a PIN file (mode
    /// 0600). `None` (with a skip line) when SoftHSM2 or `pkcs11-tool` is
    /// missing, unless `PEAQOS_TEST_REQUIRE` names `softhsm`.
    pub fn start(test: &str, label: &str) -> Option<Self> {
        let found = MODULES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .zip(find_program("softhsm2-util"))
            .zip(find_program("pkcs11-tool"));
        let ((module, util), pkcs11_tool) = available_or_skip(
            Service::Softhsm,
            test,
            found,
            "needs libsofthsm2.so, softhsm2-util and pkcs11-tool (apt-get install softhsm2 opensc)",
        )?;
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let pin = dir.path().join("user.pin");
        std::fs::write(&pin, format!("{USER_PIN}\n")).unwrap();
        std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let me = Self {
            dir,
            module,
            pkcs11_tool,
            label: label.to_owned(),
        };
        run(me
            .command(&util)
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", USER_PIN, "--so-pin", SO_PIN]));
        Some(me)
    }

    /// The `softhsm2.conf` to put in `SOFTHSM2_CONF`.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    /// The directory holding the token files.
    pub fn token_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    pub fn module(&self) -> &Path {
        &self.module
    }

    /// A file (mode 0600) holding the user PIN.
    pub fn pin_file(&self) -> PathBuf {
        self.dir.path().join("user.pin")
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// `pkcs11:token=LABEL;object=OBJECT?module-path=...` (no PIN).
    pub fn uri(&self, object: &str) -> String {
        format!(
            "pkcs11:token={};object={object}?module-path={}",
            self.label,
            self.module.display()
        )
    }

    /// A command with `SOFTHSM2_CONF` pointing at this store.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env("SOFTHSM2_CONF", self.conf());
        command
    }

    /// Runs OpenSC's `pkcs11-tool` on this token, logged in, and returns
    /// what it printed (stdout and stderr) and whether it succeeded.
    pub fn pkcs11_tool(&self, args: &[&str]) -> (bool, String) {
        let output = self
            .command(&self.pkcs11_tool)
            .arg("--module")
            .arg(&self.module)
            .args(["--token-label", &self.label, "--login", "--pin", USER_PIN])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn pkcs11-tool");
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    }
}
