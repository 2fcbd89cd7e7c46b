//! The deployment files: `scripts/install.sh` into a scratch prefix gives a layout whose config
//! passes `check-config` with the installed binary, models and ONNX Runtime library alone; the
//! systemd unit it writes passes `systemd-analyze verify`; the Kubernetes manifests pass
//! kubernetes-validate (offline, strict), and the config in their ConfigMap passes
//! `check-config` for each replica.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn ok(out: Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what}:\n{text}");
    text
}

/// Installs into `root` (usr/, etc/vigil, var/lib/vigil, etc/systemd/system).
fn install(root: &Path) {
    let out = Command::new(repo().join("scripts/install.sh"))
        .args(["--no-build", "--prefix"])
        .arg(root.join("usr"))
        .arg("--sysconfdir")
        .arg(root.join("etc/vigil"))
        .arg("--statedir")
        .arg(root.join("var/lib/vigil"))
        .arg("--unitdir")
        .arg(root.join("etc/systemd/system"))
        .current_dir(repo())
        .output()
        .unwrap();
    ok(out, "install.sh");
}

/// `vigil check-config` with the installed binary and library only (run from elsewhere, so
/// nothing of the repository is found by accident).
fn check(root: &Path, config: &Path, env: &[(&str, &str)]) -> String {
    let out = Command::new(root.join("usr/bin/vigil"))
        .arg("check-config")
        .arg(config)
        .envs(env.iter().copied())
        .env(
            "ORT_DYLIB_PATH",
            root.join("usr/lib/vigil/libonnxruntime.so"),
        )
        .current_dir(root)
        .output()
        .unwrap();
    ok(out, "check-config")
}

#[test]
fn the_installed_layout_runs_and_its_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    install(root);
    let text = check(root, &root.join("etc/vigil/config.toml"), &[]);
    assert!(text.contains("OK (1 cameras"), "{text}");
    // A second install keeps the config as the operator left it.
    let config = root.join("etc/vigil/config.toml");
    std::fs::write(
        &config,
        format!("# mine\n{}", std::fs::read_to_string(&config).unwrap()),
    )
    .unwrap();
    install(root);
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .starts_with("# mine\n")
    );

    let unit = root.join("etc/systemd/system/vigil.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(!text.contains('@'), "placeholders left:\n{text}");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian's systemd) is installed: run `make setup`");
    let said = ok(out, "systemd-analyze verify");
    assert!(!said.contains("vigil.service:"), "{said}");
}

#[test]
fn the_kubernetes_manifests_validate_and_their_config_checks_for_each_replica() {
    let validate = repo().join(".deps/tools-venv/bin/kubernetes-validate");
    let manifests: Vec<_> = std::fs::read_dir(repo().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(manifests.len() >= 4, "{manifests:?}");
    let out = Command::new(&validate)
        .arg("--strict")
        .args(&manifests)
        .output()
        .expect("kubernetes-validate is in .deps/tools-venv: run `make setup`");
    let said = ok(out, "kubernetes-validate");
    for kind in [
        "statefulset/vigil",
        "service/vigil",
        "configmap/vigil-config",
        "secret/vigil-secrets",
        "deployment/triton",
        "service/triton",
        "configmap/triton-model-config",
    ] {
        assert!(
            said.contains(&format!("passed for resource {kind}")),
            "{said}"
        );
    }

    // The ConfigMap's config.toml, read with the validator's own YAML parser, checked against an
    // install at a scratch prefix (the image's /usr/local made local).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    install(root);
    let python = repo().join(".deps/tools-venv/bin/python");
    let out = Command::new(python)
        .args([
            "-c",
            "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data']['config.toml'])",
        ])
        .arg(repo().join("deploy/kubernetes/configmap.yaml"))
        .output()
        .unwrap();
    let config = ok(out, "reading the ConfigMap");
    let local = config
        .replace("/usr/local/", &format!("{}/usr/", root.display()))
        .replace(
            "/var/lib/vigil",
            &root.join("var/lib/vigil").display().to_string(),
        );
    let path = root.join("k8s.toml");
    std::fs::write(&path, local).unwrap();
    // The Secret's values, as the StatefulSet passes them.
    let secrets = [("VIGIL_MQTT_PASSWORD", "x"), ("VIGIL_HTTP_TOKEN", "y")];
    let text = check(root, &path, &secrets);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("replica ")).collect();
    assert_eq!(lines.len(), 3, "{text}");
    let replicas: usize =
        std::fs::read_to_string(repo().join("deploy/kubernetes/statefulset.yaml"))
            .unwrap()
            .lines()
            .find_map(|l| l.trim().strip_prefix("replicas: ")?.parse().ok())
            .unwrap();
    assert_eq!(
        replicas, 3,
        "the StatefulSet's replicas equal [cluster] replicas"
    );
}
