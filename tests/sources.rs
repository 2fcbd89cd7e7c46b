//! File sources with damaged or changing streams: truncated data, garbage, a resolution change
//! mid-stream. Encoded here with real GStreamer pipelines.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Encodes `frames` frames of a test pattern as H.264 with a key frame every 10 frames: a raw
/// byte stream, or MP4 when the path ends in `.mp4`.
fn encode_h264(path: &Path, width: u32, height: u32, frames: u32) {
    let container = if path.extension().is_some_and(|e| e == "mp4") {
        "h264parse ! mp4mux"
    } else {
        "video/x-h264,stream-format=byte-stream"
    };
    gst_run(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width={width},height={height},framerate=25/1 \
         ! x264enc speed-preset=ultrafast key-int-max=10 ! {container} ! filesink location=\"{}\"",
        path.display()
    ));
}

fn classify(path: &Path) -> (std::process::Output, Vec<serde_json::Value>) {
    let out = vigil().arg("classify").arg(path).output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out, lines)
}

#[test]
fn a_resolution_change_mid_stream_keeps_every_frame_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.h264"), dir.path().join("b.h264"));
    encode_h264(&a, 640, 480, 50);
    encode_h264(&b, 320, 240, 50);
    let joined = dir.path().join("joined.h264");
    let mut bytes = std::fs::read(&a).unwrap();
    bytes.extend(std::fs::read(&b).unwrap());
    std::fs::write(&joined, bytes).unwrap();
    let (out, lines) = classify(&joined);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(lines.len(), 100, "{log}");
    assert!(
        log.contains("resolution changed")
            && log.contains("from=640x480")
            && log.contains("to=320x240"),
        "{log}"
    );
}

#[test]
fn truncated_and_corrupted_data_is_contained() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.h264");
    encode_h264(&clean, 320, 240, 100);
    let bytes = std::fs::read(&clean).unwrap();
    // Garbage in the middle, then the stream cut off.
    let mut damaged = bytes[..bytes.len() / 3].to_vec();
    damaged.extend((0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    damaged.extend(&bytes[bytes.len() / 2..bytes.len() * 3 / 4]);
    let path = dir.path().join("damaged.h264");
    std::fs::write(&path, damaged).unwrap();
    let (out, lines) = classify(&path);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("panicked"), "{log}");
    // The intact parts are classified; what is lost is lost, not a crash.
    assert!(lines.len() >= 40, "{} frames\n{log}", lines.len());
    let frames: Vec<u64> = lines.iter().map(|l| l["frame"].as_u64().unwrap()).collect();
    assert!(
        frames.windows(2).all(|w| w[0] < w[1]),
        "frames stay in order"
    );
}

/// Runs vigil on `cameras` until every file ended; returns every message on `vigil/#`.
fn run_until_done(cameras: &str) -> (Vec<Message>, String) {
    let dir = tempfile::tempdir().unwrap();
    run_to_end(dir.path(), |port| {
        format!("{MODEL}[mqtt]\nport = {port}\npublish_frames = true\n{cameras}")
    })
}

fn frames_of(messages: &[Message], camera: &str) -> Vec<serde_json::Value> {
    let topic = format!("vigil/{camera}/frames");
    messages
        .iter()
        .filter(|m| m.topic == topic)
        .map(|m| m.json())
        .collect()
}

fn last_status(messages: &[Message], camera: &str) -> serde_json::Value {
    let topic = format!("vigil/{camera}/status");
    messages
        .iter()
        .rev()
        .find(|m| m.topic == topic)
        .expect("a status")
        .json()
}

#[test]
fn analyze_fps_holds_on_a_25_fps_file() {
    // 12 s at 25 fps, analysed at 5 and at 2 frames per second (by stream time).
    let (messages, log) = run_until_done(
        "[cameras.five]\nsource = \"file\"\npath = \"{fixtures}/photos.mp4\"\nanalyze_fps = 5\n\
         [cameras.two]\nsource = \"file\"\npath = \"{fixtures}/photos.mp4\"\nanalyze_fps = 2\n",
    );
    for (camera, expected) in [("five", 60.0), ("two", 24.0)] {
        let n = frames_of(&messages, camera).len() as f64;
        assert!(
            (n - expected).abs() <= expected * 0.1,
            "{camera}: {n} frames analysed, expected {expected}\n{log}"
        );
        let status = last_status(&messages, camera);
        assert_eq!(status["frames"]["decoded"], 300);
        assert_eq!(
            status["frames"]["skipped_rate"].as_f64().unwrap(),
            300.0 - n
        );
    }
}

#[test]
fn keyframes_mode_only_ever_passes_key_frames() {
    let dir = tempfile::tempdir().unwrap();
    // 100 frames with a key frame every 10: frames 0, 10, 20, ... are the key frames.
    let clip = dir.path().join("gop10.mp4");
    encode_h264(&clip, 320, 240, 100);
    let (messages, log) = run_until_done(&format!(
        "[cameras.keys]\nsource = \"file\"\npath = \"{}\"\ndecode = \"keyframes\"\n",
        clip.display()
    ));
    let frames = frames_of(&messages, "keys");
    assert_eq!(frames.len(), 10, "{log}");
    // Every analysed frame sits on the key frame grid (every 0.4 s at 25 fps).
    for f in &frames {
        let pts = f["pts"].as_f64().unwrap();
        let slot = pts / 0.4;
        assert!(
            (slot - slot.round()).abs() < 0.01,
            "a non-key frame at {pts} s"
        );
    }
    let status = last_status(&messages, "keys");
    assert_eq!(status["frames"]["skipped_delta"], 90, "{status}");
    assert!(!log.contains("CRITICAL"), "{log}");
    assert_eq!(status["frames"]["decoded"], 10);
}

#[test]
fn a_flooding_camera_does_not_starve_the_slow_ones() {
    // One live camera at 200 fps (more than this machine classifies) and three at 5 fps.
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/#");
    let dir = tempfile::tempdir().unwrap();
    let mut cameras =
        String::from("[cameras.flood]\nsource = \"test\"\nwidth = 320\nheight = 240\nfps = 200\n");
    for i in 0..3 {
        cameras.push_str(&format!(
            "[cameras.slow{i}]\nsource = \"test\"\nwidth = 320\nheight = 240\nfps = 5\n"
        ));
    }
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[pipeline]\nlog_interval = \"1s\"\n[mqtt]\nport = {}\npublish_frames = true\n{cameras}",
            broker.port
        ),
    );
    vigil.wait_log(Duration::from_secs(30), "camera online");
    // Let it settle, then count 6 s.
    sub.collect_until(Duration::from_secs(2), |_| false);
    let window = sub.collect_until(Duration::from_secs(6), |_| false);
    let status = last_status(&window, "flood");
    assert!(
        status["frames"]["dropped_behind"].as_u64().unwrap() > 0,
        "overloaded: {status}"
    );
    for i in 0..3 {
        let n = frames_of(&window, &format!("slow{i}")).len();
        // 5 fps for 6 s: 30 frames; each slow camera gets at least 80% analysed.
        assert!(
            n >= 24,
            "slow{i}: {n} frames analysed in 6 s\n{}",
            vigil.log_text()
        );
    }
    let flood = frames_of(&window, "flood").len();
    eprintln!("under overload, 6 s: flood analysed {flood} frames, each slow camera about 30");
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}

/// The `frames.decoded` of the status messages in `got`, last one.
fn decoded(got: &[Message]) -> Option<u64> {
    got.iter()
        .rev()
        .find(|m| m.topic == "vigil/clip/status")
        .and_then(|m| m.json()["frames"]["decoded"].as_u64())
}

#[test]
fn a_paused_paced_file_decodes_nothing_and_resumes_at_its_pace_without_tripping_the_watchdog() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/clip/#");
    let dir = tempfile::tempdir().unwrap();
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {}\n[pipeline]\nlog_interval = \"1s\"\n\
             [cameras.clip]\nsource = \"file\"\npath = \"{{fixtures}}/photos.mp4\"\n\
             realtime = true\nloop = true\nanalyze_fps = 5\nstall_timeout = \"2s\"\n",
            broker.port
        ),
    );
    sub.collect_until(Duration::from_secs(30), |got| {
        got.iter()
            .any(|m| m.topic == "vigil/clip/availability" && m.text() == "online")
    });
    sub.publish("vigil/clip/set/enabled", "OFF", false);
    let got = sub.collect_until(Duration::from_secs(10), |got| {
        got.iter()
            .any(|m| m.topic == "vigil/clip/enabled" && m.text() == "OFF")
    });
    assert!(!got.is_empty(), "the pause was acknowledged");
    // Four seconds paused (twice the stall timeout), measured by the status every second.
    let paused = sub.collect_until(Duration::from_secs(4), |_| false);
    let statuses: Vec<u64> = paused
        .iter()
        .filter(|m| m.topic == "vigil/clip/status")
        .filter_map(|m| m.json()["frames"]["decoded"].as_u64())
        .collect();
    assert!(statuses.len() >= 3, "{statuses:?}");
    let while_paused = statuses[statuses.len() - 1] - statuses[0];
    assert!(
        while_paused <= 5,
        "{while_paused} frames decoded while paused (a paced file would decode ~25/s, an unpaced one hundreds)"
    );
    sub.publish("vigil/clip/set/enabled", "ON", false);
    let resumed = sub.collect_until(Duration::from_secs(4), |_| false);
    let offline = resumed.iter().any(|m| {
        (m.topic == "vigil/clip/availability" && m.text() == "offline")
            || (m.topic == "vigil/clip/status" && m.json()["state"] != "online")
    });
    assert!(
        !offline,
        "the resume tripped the watchdog:\n{}",
        vigil.log_text()
    );
    let (before, after) = (statuses[statuses.len() - 1], decoded(&resumed).unwrap());
    // Paced: about 25 frames a second, so well under 4 s x 25 x 2 after the resume.
    assert!(
        (30..200).contains(&(after - before)),
        "{} frames in the 4 s after the resume",
        after - before
    );
    assert!(
        !vigil.log_text().contains("stalled"),
        "{}",
        vigil.log_text()
    );
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}
