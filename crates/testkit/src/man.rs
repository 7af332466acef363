//! The packages' man pages (`packaging/man/*.1`), rendered from the clap
//! parsers with clap_mangen. They are generated files kept in the
//! repository, so that cargo-deb ships them as plain assets and neither
//! binary's build needs clap_mangen: a unit test in each crate compares the
//! committed pages with a fresh rendering and fails when the command line
//! changed without them; `cargo xtask man` (`PEAQOS_WRITE_MAN=1`) rewrites
//! them.

use std::path::Path;

/// Set to `1` to write the pages instead of comparing them.
pub const WRITE_VAR: &str = "PEAQOS_WRITE_MAN";

/// The pages of `command`: `<name>.1`, and `<name>-<sub>.1` for each
/// subcommand (clap's own `help` aside), as `(file name, roff)`.
pub fn pages(command: clap::Command) -> Vec<(String, Vec<u8>)> {
    let mut command = command;
    // Propagates the version and the generated arguments to subcommands.
    command.build();
    let name = command.get_name().to_owned();
    let mut pages = vec![(format!("{name}.1"), render(command.clone()))];
    for sub in command.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let full = format!("{name}-{}", sub.get_name());
        let file = format!("{full}.1");
        // clap takes owned names only with its `string` feature, which
        // would reach the agent's clap through feature unification; a few
        // leaked bytes in a test are cheaper.
        let page = sub
            .clone()
            .name(&*full.leak())
            .bin_name(format!("{name} {}", sub.get_name()));
        pages.push((file, render(page)));
    }
    pages
}

fn render(command: clap::Command) -> Vec<u8> {
    let mut out = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut out)
        .expect("rendering into memory does not fail");
    out
}

/// Asserts that `dir` holds exactly the pages of `command` (and no stale
/// page of a subcommand that is gone), or writes them when
/// `PEAQOS_WRITE_MAN=1`.
pub fn check_or_write(command: clap::Command, dir: &Path) {
    let pages = pages(command);
    let name = pages[0].0.trim_end_matches(".1").to_owned();
    let write = std::env::var(WRITE_VAR).is_ok_and(|v| v == "1");
    if write {
        std::fs::create_dir_all(dir).unwrap();
    }
    // This command's pages now in `dir`: `<name>.1`, `<name>-*.1`.
    let ours = |file: &str| {
        file.strip_suffix(".1")
            .is_some_and(|stem| stem == name || stem.starts_with(&format!("{name}-")))
    };
    let existing: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|f| ours(f))
                .collect()
        })
        .unwrap_or_default();
    for stale in existing
        .iter()
        .filter(|f| !pages.iter().any(|(page, _)| page == *f))
    {
        if write {
            std::fs::remove_file(dir.join(stale)).unwrap();
        } else {
            panic!(
                "{} documents a command that no longer exists; run `cargo xtask man`",
                dir.join(stale).display()
            );
        }
    }
    for (file, roff) in &pages {
        let path = dir.join(file);
        if write {
            std::fs::write(&path, roff).unwrap();
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == *roff,
            "{} is not what the command line renders (changed options or help text?); \
             run `cargo xtask man` and commit the result",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> clap::Command {
        clap::Command::new("tool")
            .version("1.2.3")
            .propagate_version(true)
            .about("Does things")
            .subcommand(
                clap::Command::new("run")
                    .about("Runs")
                    .arg(clap::arg!(--fast "Quickly")),
            )
    }

    #[test]
    fn one_page_per_command_and_subcommand() {
        let pages = pages(command());
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["tool.1", "tool-run.1"]);
        let run = String::from_utf8(pages[1].1.clone()).unwrap();
        assert!(run.contains(".TH tool-run 1"), "{run}");
        assert!(
            run.contains("1.2.3"),
            "the version reaches subcommands: {run}"
        );
        assert!(run.contains("fast"), "{run}");
    }

    #[test]
    fn a_page_that_differs_or_is_stale_fails() {
        let dir = tempfile::tempdir().unwrap();
        for (file, roff) in pages(command()) {
            std::fs::write(dir.path().join(file), roff).unwrap();
        }
        check_or_write(command(), dir.path());

        std::fs::write(dir.path().join("tool-gone.1"), "old").unwrap();
        let stale = std::panic::catch_unwind(|| check_or_write(command(), dir.path()));
        assert!(stale.is_err());
        std::fs::remove_file(dir.path().join("tool-gone.1")).unwrap();

        let result = std::panic::catch_unwind(|| {
            let changed = command().mut_subcommand("run", |run| run.about("Runs, now faster"));
            check_or_write(changed, dir.path());
        });
        assert!(result.is_err());
    }
}
