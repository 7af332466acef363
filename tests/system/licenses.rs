//! The licenses the packages declare and the ones CI lets crates have are
//! one list: each package's copyright file (packaging/debian/*/copyright,
//! which cargo-deb installs as /usr/share/doc/<package>/copyright) names
//! the licenses of the crates its executable links, and deny.toml's
//! `[licenses] allow` (what `cargo deny check licenses` enforces) must be
//! exactly their union. A crate under a new license fails cargo-deny until
//! both say it; a license dropped from one side fails here.

use std::collections::BTreeSet;
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The DEP-5 paragraphs of a copyright file, each as (field, value) pairs
/// (continuation lines dropped: only first-line values matter here).
fn paragraphs(text: &str) -> Vec<Vec<(String, String)>> {
    text.split("\n\n")
        .map(|paragraph| {
            paragraph
                .lines()
                .filter(|line| !line.starts_with(' '))
                .filter_map(|line| line.split_once(':'))
                .map(|(field, value)| (field.to_owned(), value.trim().to_owned()))
                .collect()
        })
        .collect()
}

fn field<'a>(paragraph: &'a [(String, String)], name: &str) -> Option<&'a str> {
    paragraph
        .iter()
        .find(|(field, _)| field == name)
        .map(|(_, value)| value.as_str())
}

/// What one copyright file declares for `/usr/bin/<binary>`: the license
/// expression of its `Files:` paragraph, checked against the stand-alone
/// `License:` paragraphs (each license there must have its text).
fn declared(package: &str) -> BTreeSet<String> {
    let text = read(&format!("packaging/debian/{package}/copyright"));
    let paragraphs = paragraphs(&text);
    let binary = format!("usr/bin/{package}");
    let for_binary: BTreeSet<String> = paragraphs
        .iter()
        .find(|p| field(p, "Files") == Some(binary.as_str()))
        .and_then(|p| field(p, "License"))
        .unwrap_or_else(|| panic!("{package}: no `Files: {binary}` paragraph with a License"))
        .split(" and ")
        .map(str::to_owned)
        .collect();
    let with_text: BTreeSet<String> = paragraphs
        .iter()
        .filter(|p| field(p, "Files").is_none() && field(p, "Format").is_none())
        .filter_map(|p| field(p, "License"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        for_binary, with_text,
        "{package}: every license of /{binary} has its own License paragraph, and no other"
    );
    for_binary
}

#[test]
fn deny_toml_allows_exactly_the_licenses_the_packages_declare() {
    let deny: toml::Table = toml::from_str(&read("deny.toml")).unwrap();
    let allowed: BTreeSet<String> = deny["licenses"]["allow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect();
    let mut declared_by_packages = BTreeSet::new();
    for package in ["peaqos-agent", "peaqos-orchestrator"] {
        declared_by_packages.extend(declared(package));
    }
    assert_eq!(
        allowed, declared_by_packages,
        "deny.toml's [licenses] allow and the packages' copyright files"
    );
}

#[test]
fn the_packages_ship_these_copyright_files() {
    for (manifest, file) in [
        ("Cargo.toml", "packaging/debian/peaqos-agent/copyright"),
        (
            "crates/orchestrator/Cargo.toml",
            "../../packaging/debian/peaqos-orchestrator/copyright",
        ),
    ] {
        let manifest_toml: toml::Table = toml::from_str(&read(manifest)).unwrap();
        let deb = &manifest_toml["package"]["metadata"]["deb"];
        assert_eq!(
            deb.get("license-file").and_then(toml::Value::as_str),
            Some(file),
            "{manifest}: cargo-deb's license-file"
        );
    }
}
