//! End to end: GStreamer sources → ONNX Runtime → a real mosquitto, read by a real subscriber.

mod common;

use std::time::Duration;

use common::*;

fn top1(m: &Message) -> String {
    m.json()["top"][0]["label"].as_str().unwrap().to_string()
}

#[test]
fn a_file_camera_publishes_the_right_labels_for_each_segment() {
    let dir = tempfile::tempdir().unwrap();
    // A file that does not loop ends; vigil drains, says offline and exits.
    let (messages, _) = run_to_end(dir.path(), |port| {
        format!(
            r#"{MODEL}
[pipeline]
max_batch = 8
[decide.thresholds]
"fox squirrel" = 0.5
[decide.groups.primate]
classes = ["baboon", "macaque", "guenon"]
mode = "sum"
[mqtt]
port = {port}
publish_frames = true
publish_detections = true
qos_results = 1
[cameras.photos]
source = "file"
path = "{{fixtures}}/photos.mp4"
"#
        )
    });

    let frames: Vec<&Message> = messages
        .iter()
        .filter(|m| m.topic == "vigil/photos/frames")
        .collect();
    assert_eq!(frames.len(), 300, "one frames message per frame");
    for (segment, expected) in ["fox squirrel", "orange", "baboon", "Pekinese"]
        .iter()
        .enumerate()
    {
        for m in &frames[segment * 75 + 3..segment * 75 + 72] {
            assert_eq!(&top1(m), expected, "{}", m.text());
        }
    }
    // Every payload is complete and the sequence numbers only grow.
    let mut last_seq = 0;
    let results = messages
        .iter()
        .filter(|m| m.topic.contains("/detection/") || m.topic.ends_with("/frames"));
    for m in results {
        let j = m.json();
        let seq = j["seq"].as_u64().expect("seq");
        assert!(seq > last_seq, "seq {seq} after {last_seq}");
        last_seq = seq;
        assert_eq!(j["camera"], "photos");
        assert_eq!(j["model"]["name"], "efficientnet-lite0");
        assert!(j["model"]["version"].is_string());
        assert!(j["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(j["frame"].is_u64() && j["pts"].is_f64());
    }
    // Detections: per camera and label, with the score over the threshold.
    let squirrels: Vec<_> = messages
        .iter()
        .filter(|m| m.topic == "vigil/photos/detection/fox_squirrel")
        .map(|m| m.json())
        .collect();
    assert!(
        squirrels.len() >= 60,
        "{} squirrel detections",
        squirrels.len()
    );
    for j in &squirrels {
        assert_eq!(j["label"], "fox squirrel");
        assert_eq!(j["kind"], "class");
        assert_eq!(j["threshold"].as_f64().unwrap(), 0.5);
        assert!(j["score"].as_f64().unwrap() >= 0.5);
        let frame = j["frame"].as_u64().unwrap();
        assert!(frame < 78, "a squirrel in frame {frame}");
    }
    let primates = messages
        .iter()
        .filter(|m| m.topic == "vigil/photos/detection/primate")
        .map(|m| m.json())
        .collect::<Vec<_>>();
    assert!(
        primates.len() >= 60,
        "{} primate group detections",
        primates.len()
    );
    assert!(
        primates
            .iter()
            .all(|j| j["kind"] == "group" && (150..228).contains(&j["frame"].as_u64().unwrap()))
    );
    // The camera's status: it ended (file) after decoding every frame.
    let last_status = messages
        .iter()
        .rev()
        .find(|m| m.topic == "vigil/photos/status")
        .expect("a camera status")
        .json();
    assert_eq!(last_status["state"], "offline");
    assert_eq!(last_status["frames"]["decoded"], 300);
    assert_eq!(
        last_status["frames"]["dropped_behind"], 0,
        "a file that is not realtime drops nothing"
    );
    // The status topic went online then offline, retained.
    let status: Vec<_> = messages
        .iter()
        .filter(|m| m.topic == "vigil/status")
        .map(|m| m.text())
        .collect();
    assert_eq!(status.first().map(String::as_str), Some("online"));
    assert_eq!(status.last().map(String::as_str), Some("offline"));
}

#[test]
fn a_test_source_streams_until_interrupted_and_exits_cleanly() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/#");
    let dir = tempfile::tempdir().unwrap();
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {}\npublish_frames = true\n[cameras.gate]\nsource = \"test\"\npattern = \"ball\"\nfps = 25\nanalyze_fps = 10\n",
            broker.port
        ),
    );
    let got = sub.collect_until(Duration::from_secs(60), |got| {
        got.iter()
            .filter(|m| m.topic == "vigil/gate/frames")
            .count()
            >= 20
    });
    let frames: Vec<_> = got
        .iter()
        .filter(|m| m.topic == "vigil/gate/frames")
        .collect();
    assert!(
        frames.len() >= 20,
        "{} frames\n{}",
        frames.len(),
        vigil.log_text()
    );
    // analyze_fps = 10 on a 25 fps camera: frame indices step by 2 or 3.
    let idx: Vec<u64> = frames
        .iter()
        .map(|m| m.json()["frame"].as_u64().unwrap())
        .collect();
    assert!(
        idx.windows(2).all(|w| (2..=3).contains(&(w[1] - w[0]))),
        "{idx:?}"
    );

    let status = vigil.interrupt(Duration::from_secs(20));
    assert!(status.success(), "{}", vigil.log_text());
    let log = vigil.log_text();
    assert!(log.contains("execution provider: cpu"), "{log}");
    // Skipping frames for analyze_fps is silent: no GStreamer warning per skipped frame.
    assert!(!log.contains("CRITICAL") && !log.contains("WARN"), "{log}");
    let rest = sub.collect_until(Duration::from_secs(5), |got| {
        got.iter()
            .any(|m| m.topic == "vigil/status" && m.text() == "offline")
    });
    assert!(
        rest.iter().any(|m| m.text() == "offline"),
        "offline published on exit"
    );
}

#[test]
fn vigil_keeps_running_without_a_broker_and_publishes_once_one_appears() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {port}\nreconnect_min = \"200ms\"\nreconnect_max = \"1s\"\npublish_frames = true\n[cameras.gate]\nsource = \"test\"\nanalyze_fps = 5\n"
        ),
    );
    vigil.wait_log(Duration::from_secs(30), "MQTT broker unreachable");
    vigil.wait_log(Duration::from_secs(30), "receiving frames");
    assert!(vigil.child.try_wait().unwrap().is_none(), "still running");

    let broker = Mosquitto::start_on(port);
    let sub = Subscriber::start(broker.port, "vigil/gate/frames");
    let got = sub.collect_until(Duration::from_secs(30), |got| got.len() >= 3);
    assert!(
        got.len() >= 3,
        "messages flow once the broker is up\n{}",
        vigil.log_text()
    );
    // The log is read on its own thread: the line may trail the messages a little.
    vigil.wait_log(Duration::from_secs(10), "connected to the MQTT broker");
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}
