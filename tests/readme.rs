//! The README's config reference gives every key's default; they must be the code's. For each
//! documented `key | default` pair, a config that sets the key to its documented default must
//! equal the config that leaves it out.

use std::path::{Path, PathBuf};

use vigil::config::Config;

/// (section as written in the heading, key, default as TOML), for every row whose defaults are
/// all written as code.
fn documented_defaults() -> Vec<(String, String, String)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let reference = readme
        .split("## Config reference")
        .nth(1)
        .expect("the README has a config reference")
        .split("\n## ")
        .next()
        .unwrap();
    let mut out = Vec::new();
    let mut section = None;
    for line in reference.lines() {
        if let Some(h) = line.strip_prefix("### `[") {
            section = h.strip_suffix("]`").map(str::to_string);
            continue;
        }
        let (Some(section), Some(row)) = (&section, line.strip_prefix("| `")) else {
            continue;
        };
        let cols: Vec<String> = format!("| `{row}")
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        // ["", keys, default, ...]
        let (keys, defaults) = (&cols[1], &cols[2]);
        let keys: Vec<&str> = keys.split(", ").map(|k| k.trim_matches('`')).collect();
        let defaults: Vec<&str> = defaults.split(", ").collect();
        if keys.len() != defaults.len()
            || !defaults
                .iter()
                .all(|d| d.starts_with('`') && d.ends_with('`') && d.len() > 2)
            || keys.iter().any(|k| k.contains(['.', '<', ' ']))
        {
            continue;
        }
        for (k, d) in keys.iter().zip(defaults) {
            let value = d.trim_matches('`');
            // A default that names another key (`mqtt.client_id`) is not a value.
            if format!("v = {value}").parse::<toml::Table>().is_ok() {
                out.push((section.clone(), k.to_string(), value.to_string()));
            }
        }
    }
    out
}

/// The section's table heading, and the keys a config needs in it to parse at all.
fn table(section: &str) -> String {
    match section.strip_prefix("cameras.<name>") {
        Some("") => "[cameras.documented]\nsource = \"test\"\n".into(),
        // A zone: it needs a rectangle.
        Some(".zones.<zone>") => "[cameras.documented]\nsource = \"test\"\n\
            [cameras.documented.zones.z]\nrect = [0.1, 0.1, 0.5, 0.5]\n"
            .into(),
        // Another of a camera's sub-tables (`.motion`).
        Some(sub) => {
            format!("[cameras.documented]\nsource = \"test\"\n[cameras.documented{sub}]\n")
        }
        None => format!("[{section}]\n"),
    }
}

fn parse(text: &str) -> Config {
    Config::parse(text, PathBuf::from("."))
        .unwrap_or_else(|problems| panic!("{text}\n{problems:?}"))
}

#[test]
fn every_default_the_readme_gives_is_the_codes() {
    let documented = documented_defaults();
    // The reference has well over 50 such keys: a parser that found few would check nothing.
    assert!(documented.len() >= 50, "{documented:?}");
    let mut wrong = Vec::new();
    for (section, key, default) in &documented {
        let base = table(section);
        let with = format!("{base}{key} = {default}\n");
        if parse(&with) != parse(&base) {
            wrong.push(format!("[{section}] {key}: the README says {default}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "README defaults that are not the code's:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn a_wrong_default_in_the_readme_would_be_caught() {
    let base = table("pipeline");
    let documented = parse(&format!("{base}max_frame_age = \"500ms\"\n"));
    assert_ne!(documented, parse(&base));
}
