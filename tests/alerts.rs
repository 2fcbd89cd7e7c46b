//! Alerts integrators can trust, against a real mosquitto: the event lifecycle, broker outages,
//! the outbox's overflow policy, TLS, passwords, Home Assistant discovery, the last will and the
//! command topics.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Everything still on its way to `sub`: vigil has exited, so a marker the test publishes on the
/// same topic arrives after all of it.
fn drain(sub: &Subscriber, topic: &str) -> Vec<Message> {
    sub.publish(topic, "{\"marker\":true}", false);
    let got = sub.collect_until(Duration::from_secs(30), |got| {
        got.iter().any(|m| m.json()["marker"] == true)
    });
    got.into_iter()
        .filter(|m| m.json()["marker"] != true)
        .collect()
}

const LIFECYCLE: &str = r#"
[events]
watch = ["fox squirrel", "orange", "baboon", "Pekinese"]
min_frames = 3
update_interval = "1s"
hysteresis = 0.1
cooldown = "500ms"
[decide]
threshold = 0.5
"#;

#[test]
fn an_object_present_for_a_known_stretch_makes_one_start_bounded_updates_and_one_end() {
    let dir = tempfile::tempdir().unwrap();
    // photos.mp4: 3 s each of squirrel, orange, baboon, Pekinese; analysed as fast as possible.
    let (messages, _) = run_to_end(dir.path(), |port| {
        format!(
            "{MODEL}{LIFECYCLE}[mqtt]\nport = {port}\n[cameras.photos]\nsource = \"file\"\npath = \"{{fixtures}}/photos.mp4\"\n"
        )
    });
    let all = events(&messages);
    for (label, from, to) in [
        ("fox squirrel", 0.0, 3.0),
        ("orange", 3.0, 6.0),
        ("baboon", 6.0, 9.0),
    ] {
        let of: Vec<&Value> = all.iter().filter(|e| e["label"] == label).collect();
        let kinds: Vec<&str> = of.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(kinds.first(), Some(&"start"), "{label}: {kinds:?}");
        assert_eq!(kinds.last(), Some(&"end"), "{label}: {kinds:?}");
        assert_eq!(
            kinds.iter().filter(|k| **k == "start").count(),
            1,
            "{label}: {kinds:?}"
        );
        assert_eq!(
            kinds.iter().filter(|k| **k == "end").count(),
            1,
            "{label}: {kinds:?}"
        );
        // At most one update a second while it lasts.
        assert!(
            kinds.iter().filter(|k| **k == "update").count() <= 3,
            "{label}: {kinds:?}"
        );
        let ids: HashSet<&str> = of.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 1, "one id through the event's life");
        let end = of.last().unwrap();
        assert_eq!(end["reason"], "cleared");
        let duration = end["duration"].as_f64().unwrap();
        assert!(
            (duration - (to - from)).abs() < 0.3,
            "{label} lasted {duration} s"
        );
        assert!(end["top_score"].as_f64().unwrap() >= end["threshold"].as_f64().unwrap());
        assert_eq!(end["model"]["name"], "efficientnet-lite0");
        assert_eq!(end["camera"], "photos");
        // The retained state went ON then OFF.
        let topic = format!("vigil/photos/{}/state", label.replace(' ', "_"));
        let states: Vec<String> = messages
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| m.text())
            .collect();
        assert_eq!(states, vec!["OFF", "ON", "OFF"], "{topic}");
    }
    // The last object is still there when the file ends: its event ends when the camera's last
    // frame has been analysed, the camera being offline from then on.
    let last = all.iter().rfind(|e| e["label"] == "Pekinese").unwrap();
    assert_eq!(
        (last["type"].as_str(), last["reason"].as_str()),
        (Some("end"), Some("camera offline"))
    );
    assert!(last["frames"].as_u64().unwrap() >= 70, "{last}");
    // Event sequence numbers have no gap.
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[test]
fn flicker_shorter_than_min_frames_makes_no_event() {
    let dir = tempfile::tempdir().unwrap();
    // Squirrel and orange swapping every 2 frames for 4 s.
    let segments: Vec<(&str, usize)> = (0..25)
        .flat_map(|_| [("squirrel_cls.jpg", 2), ("orange.jpg", 2)])
        .collect();
    let clip = make_clip(dir.path(), &segments);
    let (messages, _) = run_to_end(dir.path(), |port| {
        format!(
            "{MODEL}{LIFECYCLE}[mqtt]\nport = {port}\npublish_frames = true\n[cameras.flicker]\nsource = \"file\"\npath = \"{}\"\n",
            clip.display()
        )
    });
    // The squirrel was seen over its threshold in many frames (the orange, blurred by the
    // encoder at this pace, mostly reads as a lemon) ...
    let squirrel_frames = messages
        .iter()
        .filter(|m| m.topic == "vigil/flicker/frames")
        .filter(|m| {
            m.json()["detections"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["label"] == "fox squirrel"))
        })
        .count();
    assert!(
        squirrel_frames >= 20,
        "{squirrel_frames} frames with a squirrel"
    );
    // ... but never for 3 frames in a row: no event.
    assert!(events(&messages).is_empty(), "{:?}", events(&messages));
}

#[test]
fn events_made_while_the_broker_is_down_arrive_in_order_once_it_is_back() {
    let port = free_port();
    let persistent = "persistence true\npersistence_location {dir}/\nautosave_interval 1\n";
    let broker_dir = tempfile::tempdir().unwrap();
    let extra = persistent.replace("{dir}", &broker_dir.path().display().to_string());
    let broker = Mosquitto::start_with(port, broker_dir, &extra);
    // One subscriber throughout, with a persistent session: it reconnects by itself when the
    // broker is back, and keeps every message it already received.
    let sub = Subscriber::start_with(port, &["vigil/events"], move |o| {
        o.set_clean_session(false);
        o.set_client_id(format!("outage-{port}"));
    });
    let dir = tempfile::tempdir().unwrap();
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}{LIFECYCLE}[mqtt]\nport = {port}\nreconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n[cameras.photos]\nsource = \"file\"\npath = \"{{fixtures}}/photos.mp4\"\nloop = true\nrealtime = true\nanalyze_fps = 10\n"
        ),
    );
    let before = sub.collect_until(Duration::from_secs(30), |got| got.len() >= 2);
    assert!(before.len() >= 2, "{}", vigil.log_text());

    // The broker goes away for 7 s while the camera keeps making events.
    let outage_start = std::time::SystemTime::now();
    let broker_dir = broker.stop();
    vigil.wait_log(Duration::from_secs(10), "MQTT broker unreachable");
    std::thread::sleep(Duration::from_secs(7));
    let outage_end = std::time::SystemTime::now();
    let broker = Mosquitto::start_with(port, broker_dir, &extra);
    vigil.wait_log(
        Duration::from_secs(20),
        "connected to the MQTT broker again",
    );
    // A little more, then stop vigil: everything it made must be there.
    let after = sub.collect_until(Duration::from_secs(30), |got| got.len() >= 4);
    assert!(after.len() >= 4);
    assert!(vigil.interrupt(Duration::from_secs(30)).success());
    let rest = drain(&sub, "vigil/events");
    let received: Vec<Value> = before
        .iter()
        .chain(&after)
        .chain(&rest)
        .map(|m| m.json())
        .collect();
    // At least once, in order: without repeats, the sequence numbers are 1, 2, 3, ... N.
    let mut seen = HashSet::new();
    let unique: Vec<u64> = received
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .filter(|s| seen.insert(*s))
        .collect();
    assert_eq!(
        unique,
        (1..=unique.len() as u64).collect::<Vec<_>>(),
        "no gap, in order"
    );
    let made_during_outage = received
        .iter()
        .filter(|e| {
            let t = humantime::parse_rfc3339(e["start"].as_str().unwrap()).unwrap();
            e["type"] == "start" && t >= outage_start && t <= outage_end
        })
        .count();
    let duplicates = received.len() - unique.len();
    eprintln!(
        "broker outage of 7 s: {made_during_outage} events started during it, all delivered after it; \
         {} event messages in all, {duplicates} delivered twice, 0 lost",
        unique.len()
    );
    assert!(made_during_outage >= 1, "events happened during the outage");
    let log = vigil.log_text();
    assert!(log.contains("MQTT outbox totals"), "{log}");
    drop(broker);
}

#[test]
fn a_tiny_outbox_drops_per_frame_results_first_and_keeps_the_events() {
    // The broker and the test's subscriber are up from the start; vigil's way to the broker
    // (a forwarder on its own port) opens only after the outage.
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/events");
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // Meanwhile everything waits in an outbox of 60 messages: room for the outage's state and
    // events (about 40), not for its ~70 per-frame results.
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}{LIFECYCLE}[mqtt]\nport = {port}\nreconnect_min = \"200ms\"\nreconnect_max = \"500ms\"\noutbox = 60\npublish_frames = true\n[homeassistant]\ndiscovery = false\n[cameras.photos]\nsource = \"file\"\npath = \"{{fixtures}}/photos.mp4\"\nrealtime = true\nanalyze_fps = 10\n"
        ),
    );
    vigil.wait_log(Duration::from_secs(30), "MQTT broker unreachable");
    // 7 s of photos at 10 frames/s: ~70 per-frame results, a few events.
    vigil.wait_log(Duration::from_secs(30), "receiving frames");
    std::thread::sleep(Duration::from_secs(7));
    let _way_to_the_broker = Forward::start(port, broker.port);
    assert!(vigil.wait(Duration::from_secs(60)).success());
    let got = drain(&sub, "vigil/events");
    let log = vigil.log_text();
    let totals = log
        .lines()
        .find(|l| l.contains("MQTT outbox totals"))
        .expect("totals logged");
    // dropped=[results, state, events]
    let dropped = totals
        .split("dropped=[")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    let dropped: Vec<u64> = dropped.split(", ").map(|n| n.parse().unwrap()).collect();
    eprintln!("outbox of 60 during a 7 s outage: dropped [results, state, events] = {dropped:?}");
    assert!(dropped[0] > 0, "results were dropped: {totals}");
    assert_eq!(dropped[2], 0, "no event was dropped: {totals}");
    let seqs: Vec<u64> = got
        .iter()
        .map(|m| m.json()["seq"].as_u64().unwrap())
        .collect();
    let mut seen = HashSet::new();
    let unique: Vec<u64> = seqs.into_iter().filter(|s| seen.insert(*s)).collect();
    assert_eq!(
        unique,
        (1..=unique.len() as u64).collect::<Vec<_>>(),
        "every event arrived"
    );
    assert!(unique.len() >= 4);
}

fn openssl(dir: &std::path::Path, args: &str) {
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("openssl {args}"))
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed (make setup)");
    assert!(status.success(), "openssl {args}");
}

/// A test CA, a server certificate for localhost and a client certificate, made with openssl.
fn make_certificates(dir: &std::path::Path) {
    openssl(
        dir,
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=vigil-test-ca",
    );
    for (name, san) in [
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "subjectAltName=DNS:vigil"),
    ] {
        openssl(
            dir,
            &format!(
                "req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name}"
            ),
        );
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("{san}\nbasicConstraints=CA:FALSE\n"),
        )
        .unwrap();
        openssl(
            dir,
            &format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 2 -extfile {name}.ext"
            ),
        );
    }
    // Another CA that signed nothing here.
    openssl(
        dir,
        "req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other.pem -days 2 -subj /CN=other-ca",
    );
}

#[test]
fn tls_with_a_client_certificate_works_and_a_wrong_ca_is_a_clear_error() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let c = certs.path().display().to_string();
    let plain = free_port();
    let tls = free_port();
    let broker = Mosquitto::start_with(
        plain,
        tempfile::tempdir().unwrap(),
        &format!(
            "listener {tls} 127.0.0.1\nallow_anonymous true\ncafile {c}/ca.pem\ncertfile {c}/server.pem\nkeyfile {c}/server.key\nrequire_certificate true\n"
        ),
    );
    // The test listens on the plain listener; vigil publishes over TLS.
    let sub = Subscriber::start(broker.port, "vigil/+/frames");
    let dir = tempfile::tempdir().unwrap();
    let camera = "[cameras.gate]\nsource = \"test\"\nanalyze_fps = 5\n";
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nhost = \"localhost\"\nport = {tls}\npublish_frames = true\n[mqtt.tls]\nca_file = \"{c}/ca.pem\"\ncert_file = \"{c}/client.pem\"\nkey_file = \"{c}/client.key\"\n{camera}"
        ),
    );
    let got = sub.collect_until(Duration::from_secs(30), |got| got.len() >= 3);
    assert!(got.len() >= 3, "frames over TLS\n{}", vigil.log_text());
    assert!(vigil.interrupt(Duration::from_secs(20)).success());

    // insecure = true: no CA, any certificate accepted (for testing).
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(broker.port, "vigil/+/frames");
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nhost = \"localhost\"\nport = {tls}\npublish_frames = true\n[mqtt.tls]\ninsecure = true\ncert_file = \"{c}/client.pem\"\nkey_file = \"{c}/client.key\"\n{camera}"
        ),
    );
    let got = sub.collect_until(Duration::from_secs(30), |got| got.len() >= 3);
    assert!(
        got.len() >= 3,
        "frames over TLS without verification\n{}",
        vigil.log_text()
    );
    assert!(vigil.log_text().contains("NOT verified"));
    assert!(vigil.interrupt(Duration::from_secs(20)).success());

    // The wrong CA: refused, said clearly, retried, no crash.
    let dir = tempfile::tempdir().unwrap();
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nhost = \"localhost\"\nport = {tls}\nreconnect_min = \"200ms\"\nreconnect_max = \"500ms\"\n[mqtt.tls]\nca_file = \"{c}/other.pem\"\ncert_file = \"{c}/client.pem\"\nkey_file = \"{c}/client.key\"\n{camera}"
        ),
    );
    vigil.wait_log(Duration::from_secs(20), "MQTT broker unreachable");
    let log = vigil.log_text();
    assert!(
        log.contains("TLS") && log.to_lowercase().contains("certificate"),
        "{log}"
    );
    assert!(vigil.child.try_wait().unwrap().is_none(), "still running");
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}

#[test]
fn a_password_file_logs_in_and_a_wrong_password_is_a_clear_error_that_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let status = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["vigil", "correct-horse"])
        .status()
        .unwrap();
    assert!(status.success());
    let plain = free_port();
    let secured = free_port();
    let broker = Mosquitto::start_with(
        plain,
        tempfile::tempdir().unwrap(),
        &format!(
            "listener {secured} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            passwd.display()
        ),
    );
    let sub = Subscriber::start(broker.port, "vigil/+/frames");
    let secret = dir.path().join("mqtt-password");
    std::fs::write(&secret, "correct-horse\n").unwrap();
    let body = |file: &std::path::Path| {
        format!(
            "{MODEL}[mqtt]\nport = {secured}\nusername = \"vigil\"\npassword_file = \"{}\"\npublish_frames = true\nreconnect_min = \"200ms\"\nreconnect_max = \"400ms\"\n[cameras.gate]\nsource = \"test\"\nanalyze_fps = 5\n",
            file.display()
        )
    };
    let mut vigil = run_vigil(dir.path(), &body(&secret));
    let got = sub.collect_until(Duration::from_secs(30), |got| got.len() >= 3);
    assert!(got.len() >= 3, "{}", vigil.log_text());
    assert!(vigil.interrupt(Duration::from_secs(20)).success());

    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "tr0ub4dor\n").unwrap();
    let mut vigil = run_vigil(dir.path(), &body(&wrong));
    vigil.wait_log(Duration::from_secs(20), "refused the connection");
    let c = vigil.child.id();
    // Retries go on (logged at debug), vigil keeps running.
    wait_for(Duration::from_secs(10), "vigil to keep running", || {
        std::fs::metadata(format!("/proc/{c}")).ok()
    });
    assert!(vigil.child.try_wait().unwrap().is_none());
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
    let log = vigil.log_text();
    assert!(
        !log.contains("tr0ub4dor") && !log.contains("correct-horse"),
        "{log}"
    );
    assert_eq!(
        log.matches("refused the connection").count(),
        1,
        "said once, not per retry:\n{log}"
    );
}

const HA_BINARY_SENSOR_KEYS: &[&str] = &[
    "name",
    "unique_id",
    "state_topic",
    "payload_on",
    "payload_off",
    "device_class",
    "availability",
    "availability_mode",
    "device",
    "origin",
];
const HA_SENSOR_KEYS: &[&str] = &[
    "name",
    "unique_id",
    "state_topic",
    "value_template",
    "json_attributes_topic",
    "icon",
    "availability",
    "availability_mode",
    "device",
    "origin",
];
const HA_DEVICE_KEYS: &[&str] = &["identifiers", "name", "manufacturer", "model", "sw_version"];

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

fn sorted(k: &[&str]) -> Vec<String> {
    let mut k: Vec<String> = k.iter().map(|s| s.to_string()).collect();
    k.sort();
    k
}

#[test]
fn home_assistant_discovery_is_retained_complete_and_cleaned_up() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let body = |cameras: &[&str]| {
        let mut b = format!(
            "{MODEL}[decide.groups.cat]\nclasses = [\"tabby\", \"tiger cat\"]\n[events]\nwatch = [\"cat\", \"fox squirrel\"]\n[mqtt]\nport = {}\nclient_id = \"vigil-ha\"\n",
            broker.port
        );
        for c in cameras {
            b.push_str(&format!(
                "[cameras.{c}]\nsource = \"test\"\nanalyze_fps = 1\n"
            ));
        }
        b
    };
    let mut vigil = run_vigil(dir.path(), &body(&["front", "back"]));
    vigil.wait_log(Duration::from_secs(30), "camera online");
    let state = retained(broker.port, "vigil/#");
    assert!(
        state
            .iter()
            .any(|m| m.topic == "vigil/status" && m.text() == "online")
    );
    assert!(
        state
            .iter()
            .any(|m| m.topic == "vigil/front/fox_squirrel/state" && m.text() == "OFF")
    );
    assert!(
        state
            .iter()
            .any(|m| m.topic == "vigil/back/enabled" && m.text() == "ON")
    );
    let configs = retained(broker.port, "homeassistant/#");
    assert_eq!(
        configs.len(),
        6,
        "2 cameras x (2 binary sensors + 1 sensor)"
    );
    let mut unique_ids = HashSet::new();
    for m in &configs {
        let parts: Vec<&str> = m.topic.split('/').collect();
        assert_eq!(
            (parts[0], parts[2], parts[4]),
            ("homeassistant", "vigil-ha", "config"),
            "{}",
            m.topic
        );
        let c = m.json();
        match parts[1] {
            "binary_sensor" => {
                assert_eq!(keys(&c), sorted(HA_BINARY_SENSOR_KEYS), "{}", m.topic);
                assert_eq!(
                    (c["payload_on"].as_str(), c["payload_off"].as_str()),
                    (Some("ON"), Some("OFF"))
                );
                assert_eq!(c["device_class"], "occupancy");
                assert!(c["state_topic"].as_str().unwrap().ends_with("/state"));
            }
            "sensor" => {
                assert_eq!(keys(&c), sorted(HA_SENSOR_KEYS), "{}", m.topic);
                assert_eq!(c["value_template"], "{{ value_json.label }}");
            }
            other => panic!("unexpected component {other}"),
        }
        assert_eq!(keys(&c["device"]), sorted(HA_DEVICE_KEYS));
        assert_eq!(c["availability_mode"], "all");
        let availability: Vec<&str> = c["availability"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                assert_eq!(
                    keys(a),
                    sorted(&["topic", "payload_available", "payload_not_available"])
                );
                a["topic"].as_str().unwrap()
            })
            .collect();
        assert!(
            availability.contains(&"vigil/status"),
            "linked to vigil's own availability"
        );
        assert!(
            unique_ids.insert(c["unique_id"].as_str().unwrap().to_string()),
            "unique ids"
        );
    }
    assert!(vigil.interrupt(Duration::from_secs(20)).success());

    // Without the camera "back", its entities are removed (empty retained configs).
    let mut vigil = run_vigil(dir.path(), &body(&["front"]));
    vigil.wait_log(Duration::from_secs(30), "removing a Home Assistant entity");
    let cleared = wait_for(
        Duration::from_secs(10),
        "back's entities to be removed",
        || {
            let configs = retained(broker.port, "homeassistant/#");
            (configs.len() == 3).then_some(configs)
        },
    );
    assert!(
        cleared.iter().all(|m| !m.topic.contains("/back_")),
        "{:?}",
        cleared.iter().map(|m| &m.topic).collect::<Vec<_>>()
    );
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}

#[test]
fn a_killed_vigil_is_declared_offline_by_its_last_will() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/status");
    let dir = tempfile::tempdir().unwrap();
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {}\n[cameras.gate]\nsource = \"test\"\n",
            broker.port
        ),
    );
    let online = sub.collect_until(Duration::from_secs(30), |got| {
        got.iter().any(|m| m.text() == "online")
    });
    assert!(online.iter().any(|m| m.text() == "online"));
    vigil.child.kill().unwrap(); // SIGKILL: no goodbye
    let will = sub.collect_until(Duration::from_secs(30), |got| {
        got.iter().any(|m| m.text() == "offline")
    });
    assert!(
        will.iter().any(|m| m.text() == "offline"),
        "the broker published the last will"
    );
}

#[test]
fn commands_pause_and_resume_a_camera_and_garbage_is_rejected() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start_with(broker.port, &["vigil/#"], |_| {});
    let dir = tempfile::tempdir().unwrap();
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {}\npublish_frames = true\n[cameras.gate]\nsource = \"test\"\nanalyze_fps = 10\n[cameras.yard]\nsource = \"test\"\nanalyze_fps = 10\n",
            broker.port
        ),
    );
    let frames_of = |got: &[Message], cam: &str| {
        got.iter()
            .filter(|m| m.topic == format!("vigil/{cam}/frames"))
            .count()
    };
    sub.collect_until(Duration::from_secs(30), |got| frames_of(got, "gate") >= 5);

    sub.publish("vigil/gate/set/enabled", "OFF", false);
    let got = sub.collect_until(Duration::from_secs(10), |got| {
        got.iter()
            .any(|m| m.topic == "vigil/gate/enabled" && m.text() == "OFF")
    });
    assert!(
        got.iter()
            .any(|m| m.topic == "vigil/gate/enabled" && m.text() == "OFF")
    );
    // Frames already past the camera may still come out; after that, nothing from gate while
    // yard goes on.
    sub.collect_until(Duration::from_millis(600), |_| false);
    let paused = sub.collect_until(Duration::from_secs(2), |_| false);
    assert_eq!(frames_of(&paused, "gate"), 0, "gate is paused");
    assert!(frames_of(&paused, "yard") >= 10, "yard is not");

    // Garbage and unknown cameras: an error message, nothing changes.
    sub.publish("vigil/gate/set/enabled", "MAYBE", false);
    sub.publish("vigil/nosuch/set/enabled", "ON", false);
    let errors = sub.collect_until(Duration::from_secs(10), |got| {
        got.iter().filter(|m| m.topic == "vigil/errors").count() >= 2
    });
    let texts: Vec<String> = errors
        .iter()
        .filter(|m| m.topic == "vigil/errors")
        .map(|m| m.json()["error"].as_str().unwrap().to_string())
        .collect();
    assert!(texts.iter().any(|t| t.contains("ON or OFF")), "{texts:?}");
    assert!(
        texts
            .iter()
            .any(|t| t.contains("no camera named \"nosuch\"")),
        "{texts:?}"
    );
    assert_eq!(frames_of(&errors, "gate"), 0, "still paused");
    let enabled = retained(broker.port, "vigil/gate/enabled");
    assert_eq!(
        enabled.iter().map(|m| m.text()).collect::<Vec<_>>(),
        vec!["OFF"]
    );

    sub.publish("vigil/gate/set/enabled", "ON", false);
    let resumed = sub.collect_until(Duration::from_secs(10), |got| frames_of(got, "gate") >= 3);
    assert!(frames_of(&resumed, "gate") >= 3, "gate resumed");
    assert!(vigil.child.try_wait().unwrap().is_none());
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
    assert!(vigil.log_text().contains("MQTT command rejected"));
}
