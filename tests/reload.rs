//! Changing a running vigil: config reloads (HTTP and SIGHUP) that add, remove and change cameras
//! and thresholds while another camera streams, refused configs, and model version switches under
//! load, against a real mosquitto and the real binary.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let mut r = agent().get(format!("http://{addr}{path}")).call().unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn post_reload(addr: SocketAddr) -> (u16, Value) {
    let mut r = agent()
        .post(format!("http://{addr}/api/reload"))
        .send_empty()
        .unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&body).unwrap())
}

fn camera_names(addr: SocketAddr) -> Vec<String> {
    let (_, v) = get(addr, "/api/cameras");
    let mut names: Vec<String> = v["cameras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["camera"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn test_camera(name: &str, pattern: &str) -> String {
    format!(
        "[cameras.{name}]\nsource = \"test\"\npattern = \"{pattern}\"\nwidth = 320\nheight = 240\nfps = 10\n"
    )
}

/// The config of the reload test: `steady` always, plus `extra` cameras, with `threshold`.
fn reload_config(port: u16, threshold: f32, extra: &str) -> String {
    format!(
        "{MODEL}[decide]\nthreshold = {threshold}\n[events]\nwatch = []\n\
         [mqtt]\nport = {port}\npublish_frames = true\nqos_results = 1\n\
         [http]\nlisten = \"127.0.0.1:0\"\n{}{extra}",
        test_camera("steady", "ball")
    )
}

#[test]
fn a_reload_adds_removes_and_rethresholds_cameras_while_another_keeps_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/#");
    // Threshold 1.0: no detection in any frame.
    let leaving = test_camera("leaving", "snow");
    let mut vigil = run_vigil(dir.path(), &reload_config(broker.port, 1.0, &leaving));
    let addr = vigil.http_addr(Duration::from_secs(60));
    wait_for(Duration::from_secs(60), "both cameras online", || {
        let (_, v) = get(addr, "/api/cameras");
        let cams = v["cameras"].as_array()?.clone();
        (cams.len() == 2 && cams.iter().all(|c| c["state"] == "online")).then_some(())
    });
    let steady_since = get(addr, "/api/cameras/steady").1["since"].clone();

    // Add `joining`, remove `leaving`, and lower the threshold so frames have detections.
    let joining = test_camera("joining", "smpte");
    write_config(dir.path(), &reload_config(broker.port, 0.0001, &joining));
    let reload_sent = Instant::now();
    let (status, body) = post_reload(addr);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cameras"]["added"], serde_json::json!(["joining"]));
    assert_eq!(body["cameras"]["removed"], serde_json::json!(["leaving"]));
    assert_eq!(body["thresholds_changed"], true);
    assert_eq!(body["restart_required"], serde_json::json!([]));
    wait_for(Duration::from_secs(30), "joining online", || {
        let (s, v) = get(addr, "/api/cameras/joining");
        (s == 200 && v["state"] == "online").then_some(())
    });
    assert_eq!(camera_names(addr), ["joining", "steady"]);
    assert_eq!(get(addr, "/api/cameras/leaving").0, 404);

    // An invalid config is refused with every problem listed, and nothing changes.
    write_config(
        dir.path(),
        &format!(
            "{}\n[cameras.broken]\nsource = \"rtsp\"\n",
            reload_config(broker.port, 2.0, "")
        ),
    );
    let (status, body) = post_reload(addr);
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    for expected in ["decide.threshold", "cameras.broken.url"] {
        assert!(message.contains(expected), "{expected} not in {message}");
    }
    assert_eq!(camera_names(addr), ["joining", "steady"]);

    // SIGHUP: `joining` goes away again.
    write_config(dir.path(), &reload_config(broker.port, 0.0001, ""));
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &vigil.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_for(Duration::from_secs(30), "joining removed by SIGHUP", || {
        (camera_names(addr) == ["steady"]).then_some(())
    });
    // Ten more frames of `steady` after the last change.
    let decoded = |v: &Value| v["frames"]["decoded"].as_u64().unwrap_or(0);
    let at_hup = decoded(&get(addr, "/api/cameras/steady").1);
    wait_for(
        Duration::from_secs(30),
        "steady to go on after SIGHUP",
        || (decoded(&get(addr, "/api/cameras/steady").1) >= at_hup + 10).then_some(()),
    );
    let hup_done = Instant::now();
    let (_, now) = get(addr, "/api/cameras/steady");
    assert_eq!(
        now["since"], steady_since,
        "steady changed state during the reloads"
    );
    assert_eq!(now["reconnects"], 0);
    vigil.interrupt(Duration::from_secs(30));
    let messages = sub.collect_until(Duration::from_secs(10), |got| {
        got.iter()
            .any(|m| m.topic == "vigil/status" && m.text() == "offline")
    });

    // `steady` was never restarted, and its frames never stalled.
    let steady: Vec<(Instant, Value)> = messages
        .iter()
        .filter(|m| m.topic == "vigil/steady/frames")
        .map(|m| (m.received, m.json()))
        .collect();
    let during: Vec<&(Instant, Value)> = steady
        .iter()
        .filter(|(t, _)| *t >= reload_sent && *t <= hup_done)
        .collect();
    assert!(
        during.len() >= 5,
        "{} steady frames during the reloads",
        during.len()
    );
    let longest = steady
        .windows(2)
        .filter(|w| w[1].0 >= reload_sent && w[0].0 <= hup_done)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap();
    // At 10 fps, analysed as they come: a stall would show as a gap of seconds.
    assert!(
        longest < Duration::from_millis(1500),
        "steady stalled {longest:?}"
    );
    let frames: Vec<u64> = steady
        .iter()
        .map(|(_, v)| v["frame"].as_u64().unwrap())
        .collect();
    assert!(
        frames.windows(2).all(|w| w[1] > w[0]),
        "steady's frame numbers restarted: it was rebuilt"
    );
    println!(
        "steady: {} frames, longest gap around the reloads {longest:?}",
        steady.len()
    );
    // The new threshold applied from the reload on: detections before none, after some.
    let before = steady
        .iter()
        .filter(|(t, _)| *t < reload_sent)
        .all(|(_, v)| v["detections"].as_array().unwrap().is_empty());
    assert!(before, "threshold 1.0 gave detections");
    let after = steady
        .iter()
        .filter(|(t, _)| *t > reload_sent + Duration::from_secs(1))
        .all(|(_, v)| !v["detections"].as_array().unwrap().is_empty());
    assert!(after, "threshold 0.0001 gave no detections");
    assert!(
        messages.iter().any(|m| m.topic == "vigil/joining/frames"),
        "the added camera published no frame"
    );
    // The removed camera says it is offline (retained).
    assert!(
        messages
            .iter()
            .any(|m| m.topic == "vigil/leaving/availability" && m.text() == "offline"),
    );
}

/// Copies the shipped manifest into `dir` with `version` and `file` for its fp32 variant, pointing
/// at the repository's labels and model files.
fn write_manifest(dir: &Path, version: &str, file: &Path) {
    let models = repo().join("models");
    let text = std::fs::read_to_string(models.join("efficientnet-lite0.toml")).unwrap();
    // The shipped version line, whatever the shipped version.
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("version = ") {
                format!("version = \"{version}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "labels = \"imagenet.labels.txt\"",
            &format!(
                "labels = \"{}\"",
                models.join("imagenet.labels.txt").display()
            ),
        )
        .replace(
            "file = \"efficientnet-lite0.onnx\"",
            &format!("file = \"{}\"", file.display()),
        )
        .replace(
            "file = \"efficientnet-lite0.int8.onnx\"",
            &format!(
                "file = \"{}\"",
                models.join("efficientnet-lite0.int8.onnx").display()
            ),
        )
        .replace(
            "file = \"efficientnet-lite0.fp16.onnx\"",
            &format!(
                "file = \"{}\"",
                models.join("efficientnet-lite0.fp16.onnx").display()
            ),
        );
    // Written whole then renamed: the watch never reads half a file.
    let tmp = dir.join(".manifest.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("efficientnet-lite0.toml")).unwrap();
}

/// Frame messages with the time they arrived.
type Frames = Vec<(Instant, Value)>;

#[test]
fn a_model_switch_under_load_classifies_every_frame_once_with_one_version() {
    let dir = tempfile::tempdir().unwrap();
    let models_dir = dir.path().join("models");
    std::fs::create_dir_all(&models_dir).unwrap();
    let models = repo().join("models");
    write_manifest(
        &models_dir,
        "1.0.0",
        &models.join("efficientnet-lite0.onnx"),
    );
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/+/frames");
    // A looping file analysed as fast as the machine goes: the switch happens under full load.
    let config = format!(
        "[model]\ndir = \"{}\"\nwatch = true\nwatch_interval = \"200ms\"\n\
         [mqtt]\nport = {}\npublish_frames = true\nqos_results = 1\n\
         [cameras.photos]\nsource = \"file\"\npath = \"{{fixtures}}/photos.mp4\"\nloop = true\n",
        models_dir.display(),
        broker.port
    );
    let mut vigil = run_vigil(dir.path(), &config);
    let messages = sub.messages.clone();
    let mut got: Frames = Vec::new();
    let collect_until = |got: &mut Frames, what: &str, done: &dyn Fn(&Frames) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done(got) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            if let Ok(m) = messages.recv_timeout(Duration::from_millis(200)) {
                got.push((m.received, m.json()));
            }
        }
    };
    collect_until(&mut got, "200 frames of version 1", &|g| g.len() >= 200);
    // Version 2: a different model file (the INT8 weights), announced by a new manifest.
    write_manifest(
        &models_dir,
        "2.0.0",
        &models.join("efficientnet-lite0.int8.onnx"),
    );
    collect_until(&mut got, "200 frames of version 2", &|g| {
        g.iter()
            .filter(|(_, v)| v["model"]["version"] == "2.0.0")
            .count()
            >= 200
    });
    // A broken version 3 (its input does not match the manifest) is refused; 2 keeps serving.
    write_manifest(
        &models_dir,
        "3.0.0",
        &repo().join("tests/data/small-input.onnx"),
    );
    vigil.wait_log(Duration::from_secs(60), "new model refused");
    let refused_at = got.len();
    collect_until(&mut got, "100 more frames", &|g| {
        g.len() >= refused_at + 100
    });
    vigil.interrupt(Duration::from_secs(30));
    let log = vigil.log_text();

    // Every frame once: the per-message sequence and the frame numbers have no gap and no repeat.
    let seqs: Vec<u64> = got
        .iter()
        .map(|(_, v)| v["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap or repeat in seq around {:?}",
        seqs.windows(2).find(|w| w[1] != w[0] + 1)
    );
    let frames: Vec<u64> = got
        .iter()
        .map(|(_, v)| v["frame"].as_u64().unwrap())
        .collect();
    assert!(
        frames.windows(2).all(|w| w[1] == w[0] + 1),
        "a frame was dropped or classified twice around {:?}",
        frames.windows(2).find(|w| w[1] != w[0] + 1)
    );
    // Versions: all 1.0.0, then all 2.0.0; never 3.0.0.
    let versions: Vec<&str> = got
        .iter()
        .map(|(_, v)| v["model"]["version"].as_str().unwrap())
        .collect();
    let switch = versions.iter().position(|v| *v == "2.0.0").unwrap();
    assert!(switch > 0);
    assert!(versions[..switch].iter().all(|v| *v == "1.0.0"));
    assert!(
        versions[switch..].iter().all(|v| *v == "2.0.0"),
        "{versions:?}"
    );
    // The old version's sessions were freed after the switch.
    assert!(
        log.contains(
            "model version unloaded; its sessions are freed model=efficientnet-lite0 version=1.0.0"
        ),
        "{log}"
    );
    assert!(
        !log.contains("version=3.0.0 variant"),
        "version 3 was loaded: {log}"
    );
    // The pause: the gap between the last result of 1.0.0 and the first of 2.0.0, against the
    // usual gap between results.
    let mut gaps: Vec<Duration> = got.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let at_switch = got[switch].0 - got[switch - 1].0;
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    let p99 = gaps[gaps.len() * 99 / 100];
    for line in log.lines().filter(|l| l.contains("model switch")) {
        println!("{line}");
    }
    println!(
        "model switch: {} frames, gap at the switch {at_switch:?}, median gap {median:?}, p99 gap {p99:?}",
        got.len()
    );
    assert!(
        at_switch < Duration::from_secs(1),
        "the switch paused results for {at_switch:?}"
    );
}
