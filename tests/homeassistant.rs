//! Against a real Home Assistant Core (`scripts/homeassistant.sh` installs it into
//! `.deps/homeassistant/`), set up through its REST onboarding and config-flow APIs, with its MQTT
//! integration on the test's own mosquitto: what Home Assistant shows across a crash of vigil and
//! a restart. Every state change it makes is recorded over its websocket API.
//!
//! The test fails when Home Assistant is not installed, unless `VIGIL_HA_REQUIRED=0` says it is
//! not required here (then it says why it skipped).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};

const REQUIRED_ENV: &str = "VIGIL_HA_REQUIRED";
const SQUIRREL: &str = "binary_sensor.vigil_photos_fox_squirrel";
const ORANGE: &str = "binary_sensor.vigil_photos_orange";

/// The Home Assistant installation, or None when it is missing and not required (said why).
fn home_assistant_venv() -> Option<PathBuf> {
    let venv = repo().join(".deps/homeassistant");
    if venv.join("bin/hass").is_file() {
        return Some(venv);
    }
    let why = format!(
        "Home Assistant is not installed in {}: run scripts/homeassistant.sh",
        venv.display()
    );
    if std::env::var(REQUIRED_ENV).is_ok_and(|v| v == "0") {
        eprintln!("SKIPPED: {why} ({REQUIRED_ENV}=0 says it is not required here)");
        return None;
    }
    panic!("{why} (or set {REQUIRED_ENV}=0 where it is not required)");
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn body(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>, what: &str) -> Value {
    let mut r = r.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    assert!(status < 300, "{what}: HTTP {status}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// A Home Assistant Core on a free port of 127.0.0.1, in a temporary config directory, onboarded
/// and with its MQTT integration set up on the broker at `mqtt_port`; stopped on drop.
struct HomeAssistant {
    child: Child,
    url: String,
    token: String,
    dir: tempfile::TempDir,
}

impl HomeAssistant {
    fn start(venv: &Path, mqtt_port: u16) -> HomeAssistant {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("configuration.yaml"),
            format!(
                "homeassistant:\n  name: vigil test\n  latitude: 0\n  longitude: 0\n  elevation: 0\n  unit_system: metric\n  time_zone: UTC\n  currency: EUR\n  country: NL\nhttp:\n  server_host: 127.0.0.1\n  server_port: {port}\napi:\nconfig:\nonboarding:\nlogger:\n  default: warning\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("hass.log")).unwrap();
        let child = Command::new(venv.join("bin/hass"))
            .arg("-c")
            .arg(dir.path())
            .arg("--skip-pip")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("Home Assistant starts");
        let mut ha = HomeAssistant {
            child,
            url: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            dir,
        };
        let url = ha.url.clone();
        wait_for(
            Duration::from_secs(180),
            "Home Assistant's HTTP API",
            || {
                let r = agent().get(format!("{url}/api/onboarding")).call().ok()?;
                (r.status().as_u16() == 200).then_some(())
            },
        );
        ha.onboard();
        ha.add_mqtt(mqtt_port);
        ha
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hass.log")).unwrap_or_default()
    }

    /// Creates the owner through the onboarding API and logs in with its authorisation code.
    fn onboard(&mut self) {
        let client_id = format!("{}/", self.url);
        let user = body(
            agent()
                .post(format!("{}/api/onboarding/users", self.url))
                .send_json(
                    json!({"client_id": client_id, "name": "test", "username": "test",
                    "password": "vigil-test-password", "language": "en"}),
                ),
            "onboarding",
        );
        let code = user["auth_code"].as_str().expect("an auth code");
        let token = body(
            agent().post(format!("{}/auth/token", self.url)).send_form([
                ("grant_type", "authorization_code"),
                ("code", code),
                ("client_id", &client_id),
            ]),
            "token",
        );
        self.token = token["access_token"].as_str().unwrap().to_string();
    }

    fn post(&self, path: &str, data: Value) -> Value {
        body(
            agent()
                .post(format!("{}{path}", self.url))
                .header("Authorization", format!("Bearer {}", self.token))
                .send_json(data),
            path,
        )
    }

    /// The MQTT integration through its config flow, on the broker at `port`.
    fn add_mqtt(&self, port: u16) {
        let flow = self.post(
            "/api/config/config_entries/flow",
            json!({"handler": "mqtt", "show_advanced_options": false}),
        );
        let id = flow["flow_id"].as_str().expect("a flow id");
        let done = self.post(
            &format!("/api/config/config_entries/flow/{id}"),
            json!({"broker": "127.0.0.1", "port": port}),
        );
        assert_eq!(done["type"], "create_entry", "{done}");
    }
}

impl Drop for HomeAssistant {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One state change as Home Assistant made it.
#[derive(Debug, Clone)]
struct Change {
    entity: String,
    old: Option<String>,
    new: Option<String>,
    /// Seconds since the epoch.
    at: f64,
}

/// Every state change of Home Assistant, from its websocket API (through a small client in
/// Home Assistant's own Python); stopped on drop.
struct Recorder {
    child: Child,
    changes: Arc<Mutex<Vec<Change>>>,
}

impl Recorder {
    fn start(venv: &Path, ha: &HomeAssistant) -> Recorder {
        let mut child = Command::new(venv.join("bin/python"))
            .arg(repo().join("tests/data/homeassistant_states.py"))
            .arg(format!("{}/api/websocket", ha.url.replace("http:", "ws:")))
            .arg(&ha.token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the recorder starts");
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let changes = Arc::new(Mutex::new(Vec::new()));
        let sink = changes.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if v["ready"] == true {
                    let _ = ready_tx.try_send(());
                } else if let Some(entity) = v["entity_id"].as_str() {
                    sink.lock().unwrap().push(Change {
                        entity: entity.to_string(),
                        old: v["old"].as_str().map(str::to_string),
                        new: v["new"].as_str().map(str::to_string),
                        at: v["at"].as_f64().unwrap_or(0.0),
                    });
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the recorder subscribed to state changes");
        Recorder { child, changes }
    }

    /// The state changes of `entity` so far (attribute-only updates left out).
    fn of(&self, entity: &str) -> Vec<Change> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.entity == entity && c.old != c.new)
            .cloned()
            .collect()
    }

    /// Waits for `entity` to change to `state` after `since` (seconds since the epoch).
    fn wait_for(&self, entity: &str, state: &str, since: f64, timeout: Duration) -> Change {
        wait_for(timeout, &format!("{entity} to turn {state}"), || {
            self.of(entity)
                .into_iter()
                .find(|c| c.at >= since && c.new.as_deref() == Some(state))
        })
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn config(port: u16, clip: &str) -> String {
    format!(
        "{MODEL}[events]\nwatch = [\"fox squirrel\", \"orange\"]\nmin_frames = 2\ncooldown = \"500ms\"\n[mqtt]\nport = {port}\nclient_id = \"vigil-ha\"\n[cameras.photos]\nsource = \"file\"\npath = \"{clip}\"\nloop = true\nrealtime = true\nanalyze_fps = 5\n"
    )
}

fn timeline(changes: &[Change], t0: f64) -> String {
    changes
        .iter()
        .map(|c| {
            format!(
                "{:+.1}s {} -> {}",
                c.at - t0,
                c.old.as_deref().unwrap_or("-"),
                c.new.as_deref().unwrap_or("-")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn after_a_crash_and_a_restart_home_assistant_shows_no_alert_the_clip_did_not_cause() {
    let Some(venv) = home_assistant_venv() else {
        return;
    };
    let started = Instant::now();
    let broker = Mosquitto::start();
    let ha = HomeAssistant::start(&venv, broker.port);
    let ha_ready = started.elapsed();
    let recorder = Recorder::start(&venv, &ha);
    let dir = tempfile::tempdir().unwrap();
    // The second run's clip: an orange, then a baboon; never a squirrel.
    let clip = make_clip(dir.path(), &[("orange.jpg", 75), ("baboon.jpg", 75)]);
    let t0 = now();

    // Run 1 on the photos clip: the squirrel is on screen for its first 3 s.
    let photos = fixture("photos.mp4").display().to_string();
    let mut first = run_vigil(dir.path(), &config(broker.port, &photos));
    recorder.wait_for(SQUIRREL, "on", t0, Duration::from_secs(90));
    let killed = now();
    first.child.kill().unwrap(); // SIGKILL while the squirrel is on
    first.wait(Duration::from_secs(10));
    recorder.wait_for(SQUIRREL, "unavailable", killed, Duration::from_secs(30));

    // Run 2 on a clip without a squirrel.
    let second_dir = tempfile::tempdir().unwrap();
    let restarted = now();
    let mut second = run_vigil(
        second_dir.path(),
        &config(broker.port, &clip.display().to_string()),
    );
    let orange = recorder.wait_for(ORANGE, "on", restarted, Duration::from_secs(60));
    // The squirrel's state settles: off, for as long as the orange is on screen.
    recorder.wait_for(SQUIRREL, "off", restarted, Duration::from_secs(30));
    wait_for(
        Duration::from_secs(10),
        "a few more seconds of run 2",
        || (now() >= orange.at + 3.0).then_some(()),
    );
    assert!(second.interrupt(Duration::from_secs(30)).success());

    let squirrel = recorder.of(SQUIRREL);
    let oranges = recorder.of(ORANGE);
    eprintln!(
        "Home Assistant ready in {ha_ready:?}; test ran {:?}\n{SQUIRREL}: {}\n{ORANGE}: {}\n\
         (killed at {:+.1}s, restarted at {:+.1}s)",
        started.elapsed(),
        timeline(&squirrel, t0),
        timeline(&oranges, t0),
        killed - t0,
        restarted - t0,
    );
    let after_restart: Vec<&Change> = squirrel.iter().filter(|c| c.at >= restarted).collect();
    assert!(
        after_restart.iter().all(|c| c.new.as_deref() != Some("on")),
        "the squirrel turned on after the restart, with none on screen: {}\n{}",
        timeline(&squirrel, t0),
        ha.log()
    );
    // No entity ever comes back from `unavailable` straight to `on`: an `on` always follows an
    // `off`, in a run whose frames caused it.
    for c in squirrel.iter().chain(&oranges) {
        assert!(
            !(c.old.as_deref() == Some("unavailable") && c.new.as_deref() == Some("on")),
            "{} went unavailable -> on at {:+.1}s",
            c.entity,
            c.at - t0
        );
    }
    // The orange's first `on` of run 2 came after the camera was back.
    assert_eq!(
        orange.old.as_deref(),
        Some("off"),
        "{}",
        timeline(&oranges, t0)
    );
    // Home Assistant took every payload (the cleared top label included) without complaint.
    let log = ha.log();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("Erroneous JSON")
                || l.contains("Template variable")
                || (l.contains("mqtt") && l.contains("vigil"))
        })
        .collect();
    assert!(complaints.is_empty(), "Home Assistant: {complaints:#?}");
}
