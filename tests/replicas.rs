//! Replicas: three vigil processes share one config of twelve cameras on one mosquitto. Each
//! camera is analysed by exactly one of them (the split `check-config` shows), Home Assistant
//! sees twelve devices, and a replica killed takes only its own cameras' entities down.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;

const CAMERAS: usize = 12;

fn body(port: u16) -> String {
    let mut body = format!(
        "{MODEL}[cluster]\nreplicas = 3\n[mqtt]\nport = {port}\n[snapshots]\nenabled = false\n"
    );
    for i in 0..CAMERAS {
        body.push_str(&format!(
            "[cameras.cam{i:02}]\nsource = \"test\"\npattern = \"ball\"\nwidth = 160\n\
             height = 120\nfps = 4\nanalyze_fps = 1\n"
        ));
    }
    body
}

/// `check-config`'s split: replica → its cameras.
fn split(config: &std::path::Path, replica: Option<u32>) -> BTreeMap<u32, Vec<String>> {
    let mut c = vigil();
    c.arg("check-config").arg(config);
    if let Some(r) = replica {
        c.args(["--replica", &r.to_string()]);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("replica ")?;
            let (i, rest) = rest.split_once(" of 3: ")?;
            let names = rest.rsplit_once(" (")?.0;
            Some((
                i.parse().ok()?,
                names
                    .split(", ")
                    .filter(|n| !n.is_empty())
                    .map(String::from)
                    .collect(),
            ))
        })
        .collect()
}

#[test]
fn three_replicas_split_twelve_cameras_and_a_lost_one_takes_only_its_own_down() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &body(broker.port));

    let shares = split(&config, None);
    assert_eq!(shares.len(), 3, "{shares:?}");
    let all: BTreeSet<&String> = shares.values().flatten().collect();
    assert_eq!(all.len(), CAMERAS, "each camera once: {shares:?}");
    assert_eq!(
        split(&config, Some(1)),
        BTreeMap::from([(1, shares[&1].clone())])
    );

    // Replica 0 by flag, 1 by VIGIL_REPLICA, 2 by flag.
    let start = |i: u32| {
        let mut c = vigil();
        c.args(["run", "--config"]).arg(&config);
        if i == 1 {
            c.env("VIGIL_REPLICA", "1");
        } else {
            c.args(["--replica", &i.to_string()]);
        }
        Running::spawn(c)
    };
    let mut replicas: Vec<Running> = (0..3).map(start).collect();

    // Each replica analyses its share, and only it.
    for (i, r) in replicas.iter().enumerate() {
        let addr = r.http_addr(Duration::from_secs(60));
        let listed = wait_for(
            Duration::from_secs(60),
            "the replica's cameras online",
            || {
                let v: serde_json::Value = ureq::get(&format!("http://{addr}/api/cameras"))
                    .call()
                    .ok()?
                    .body_mut()
                    .read_json()
                    .ok()?;
                let cams = v["cameras"].as_array()?;
                let online = cams
                    .iter()
                    .all(|c| c["state"] == "online" && c["latest"].is_object());
                online.then(|| {
                    cams.iter()
                        .map(|c| c["camera"].as_str().unwrap().to_string())
                        .collect::<Vec<_>>()
                })
            },
        );
        assert_eq!(listed, shares[&(i as u32)], "replica {i}\n{}", r.log_text());
    }

    // Home Assistant: twelve devices, each camera's entities available through its replica's
    // status; every replica online.
    let owner_of = |camera: &str| {
        *shares
            .iter()
            .find(|(_, c)| c.iter().any(|n| n == camera))
            .unwrap()
            .0
    };
    let configs = wait_for(
        Duration::from_secs(30),
        "discovery configs of 12 cameras",
        || {
            let configs: Vec<serde_json::Value> = retained(broker.port, "homeassistant/#")
                .iter()
                .filter(|m| m.topic.ends_with("/config"))
                .map(|m| m.json())
                .collect();
            let devices: BTreeSet<String> = configs
                .iter()
                .map(|c| c["device"]["identifiers"][0].as_str().unwrap().to_string())
                .collect();
            (devices.len() == CAMERAS).then_some(configs)
        },
    );
    for c in &configs {
        let camera = c["state_topic"]
            .as_str()
            .unwrap()
            .split('/')
            .nth(1)
            .unwrap();
        let status = format!("vigil/status/{}", owner_of(camera));
        assert!(
            c["availability"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["topic"] == status.as_str()),
            "{c}"
        );
    }
    let statuses = |port| -> BTreeMap<String, String> {
        retained(port, "vigil/status/#")
            .into_iter()
            .map(|m| (m.topic.clone(), m.text()))
            .collect()
    };
    let online = BTreeMap::from(
        ["vigil/status/0", "vigil/status/1", "vigil/status/2"]
            .map(|t| (t.to_string(), "online".to_string())),
    );
    assert_eq!(statuses(broker.port), online);

    // Replica 1 dies (SIGKILL): its last will marks it offline; the others stay online, and
    // so only its cameras' entities go unavailable.
    replicas[1].child.kill().unwrap();
    replicas[1].child.wait().unwrap();
    wait_for(Duration::from_secs(90), "replica 1's last will", || {
        let s = statuses(broker.port);
        (s.get("vigil/status/1").map(String::as_str) == Some("offline")).then_some(())
    });
    let s = statuses(broker.port);
    assert_eq!(s["vigil/status/0"], "online");
    assert_eq!(s["vigil/status/2"], "online");
    for i in [0, 2] {
        let r = &mut replicas[i];
        assert!(r.child.try_wait().unwrap().is_none(), "{}", r.log_text());
        assert!(r.interrupt(Duration::from_secs(30)).success());
    }
}
