//! Signing latency of a key in a PKCS#11 token against the key file, in one
//! run: the same EIP-191 `personal_sign` of a challenge-sized text, N times
//! each, through what the agent uses (`TokenKey::sign_prehash`: the token's
//! `CKM_ECDSA`, then low-s and the recovery id against `CKA_EC_POINT`;
//! `SecretKey::sign_personal` for the file key). Prints the median, p90 and
//! p99 of each and their ratio (docs/performance.md).
//!
//! With no argument it makes a private SoftHSM2 store in a temp dir (token
//! `bench`, a fresh key made with `keygen`'s own code), and runs itself
//! again with `SOFTHSM2_CONF` pointing there (the module reads it at
//! `C_Initialize`). With a URI (with `pin-source`) it uses that token.
//!
//! ```sh
//! cargo run --profile minsize --example pkcs11_sign            # SoftHSM2, 2000 each
//! cargo run --profile minsize --example pkcs11_sign -- 'pkcs11:token=robot;object=controller?module-path=...&pin-source=/path/pin' 500
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use peaqos_agent::pkcs11::{Pkcs11Uri, TokenKey};
use peaqos_protocol::{SecretKey, personal_message_hash};

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
const DEFAULT_COUNT: usize = 2000;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let uri = args.next();
    let count = args
        .next()
        .map(|n| n.parse())
        .transpose()
        .context("COUNT must be a number")?
        .unwrap_or(DEFAULT_COUNT);
    match uri {
        Some(uri) => measure(&uri, count),
        None => with_softhsm(count),
    }
}

/// Makes a SoftHSM2 store and runs this example again against it.
fn with_softhsm(count: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens)?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "1234\n")?;
    let status = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            "1234",
        ])
        .args(["--so-pin", "5678"])
        .env("SOFTHSM2_CONF", &conf)
        .stdout(std::process::Stdio::null())
        .status()
        .context("softhsm2-util (apt-get install softhsm2)")?;
    if !status.success() {
        bail!("softhsm2-util --init-token failed");
    }
    let uri = format!(
        "pkcs11:token=bench;object=controller?module-path={SOFTHSM}&pin-source={}",
        pin.display()
    );
    let status = Command::new(std::env::current_exe()?)
        .args([&uri, &count.to_string()])
        .env("SOFTHSM2_CONF", &conf)
        .env("PEAQOS_BENCH_KEYGEN", "1")
        .status()?;
    if !status.success() {
        bail!("the measurement failed");
    }
    Ok(())
}

fn measure(uri: &str, count: usize) -> anyhow::Result<()> {
    let uri: Pkcs11Uri = uri.parse()?;
    let pin = uri.pin_location();
    if std::env::var_os("PEAQOS_BENCH_KEYGEN").is_some() {
        peaqos_agent::pkcs11::generate(&uri, pin.as_deref())?;
    }
    let token = TokenKey::open(uri, pin, None)?;
    let file = SecretKey::generate()?;
    // A challenge of the size our orchestrator sends (about 300 bytes).
    let text = "peaqos.example wants you to prove control of machine identity did:peaq:4242 \
                with controller 0x0000000000000000000000000000000000000000.\n\nChallenge: \
                chl_0123456789abcdefghijklmnop\nIssued At: 2026-12-02T10:00:00.000Z\n\
                Expiration Time: 2026-12-02T10:05:00.000Z\nPurpose: machine identity proof";
    let mut token_times = Vec::with_capacity(count);
    let mut file_times = Vec::with_capacity(count);
    // Interleaved, so that a slow moment of the machine hits both alike.
    for _ in 0..count {
        let start = Instant::now();
        let signature = token.sign_prehash(&personal_message_hash(text.as_bytes()))?;
        token_times.push(start.elapsed());
        debug_assert_eq!(
            signature.recover_personal(text.as_bytes()).ok(),
            Some(token.address())
        );
        let start = Instant::now();
        let signature = file.sign_personal(text.as_bytes());
        file_times.push(start.elapsed());
        std::hint::black_box(signature);
    }
    let last = token.sign_prehash(&personal_message_hash(text.as_bytes()))?;
    if last.recover_personal(text.as_bytes())? != token.address() {
        bail!("the token's signature does not recover to its address");
    }
    let (t, f) = (stats(&mut token_times), stats(&mut file_times));
    println!(
        "{count} EIP-191 signatures of a {}-byte text each",
        text.len()
    );
    println!(
        "| key | median | p90 | p99 |\n|---|---:|---:|---:|\n| PKCS#11 ({}) | {} | {} | {} |\n\
         | key file (k256, in process) | {} | {} | {} |\n| ratio token / file | {:.1} | {:.1} | {:.1} |",
        token.uri().module_path.display(),
        us(t[0]),
        us(t[1]),
        us(t[2]),
        us(f[0]),
        us(f[1]),
        us(f[2]),
        ratio(t[0], f[0]),
        ratio(t[1], f[1]),
        ratio(t[2], f[2]),
    );
    Ok(())
}

/// Median, p90, p99.
fn stats(times: &mut [Duration]) -> [Duration; 3] {
    times.sort();
    let at = |permille: usize| times[(times.len() - 1) * permille / 1000];
    [at(500), at(900), at(990)]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
