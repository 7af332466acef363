//! `cargo xtask man`: rewrites the packages' man pages
//! (`packaging/man/*.1`) from the clap parsers. The unit tests that keep
//! them current render them (peaqos-testkit's `man`); run with
//! `PEAQOS_WRITE_MAN=1`, the same tests write them instead.

use std::process::Stdio;

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    if !args.is_empty() {
        return Err(format!(
            "`cargo xtask man` takes no arguments, not {args:?}"
        ));
    }
    let root = crate::workspace_root();
    for (package, test) in [
        (
            "peaqos-agent",
            "cli::tests::the_packaged_man_pages_are_current",
        ),
        (
            "peaqos-orchestrator",
            "cli::tests::the_packaged_man_page_is_current",
        ),
    ] {
        let status = crate::cargo()
            .args([
                "test", "--quiet", "-p", package, "--lib", test, "--", "--exact",
            ])
            .env(peaqos_testkit::man::WRITE_VAR, "1")
            .current_dir(&root)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!(
                "writing the man pages of {package} failed ({status})"
            ));
        }
    }
    println!(
        "man pages written to {}",
        root.join("packaging/man").display()
    );
    Ok(())
}
