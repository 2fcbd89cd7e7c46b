//! Live RTSP cameras against a real RTSP server (gst-rtsp-server, in its own process): H.264 and
//! H.265, server restarts, frozen streams, bad credentials/paths/hosts, many cameras, garbage.

mod common;
#[path = "common/rtsp.rs"]
mod rtsp_server;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use rtsp_server::{PASSWORD, PASSWORD_ENCODED, RtspServer, USER};

/// Not a test: the RTSP server process the other tests start (see common/rtsp.rs).
#[test]
#[ignore = "helper process for the RTSP tests"]
fn rtsp_server_process() {
    rtsp_server::serve_if_asked();
}

fn start_vigil(broker: &Mosquitto, cameras: &str) -> Running {
    start_vigil_with(broker, "", cameras)
}

/// `pipeline` is added to the `[pipeline]` table.
fn start_vigil_with(broker: &Mosquitto, pipeline: &str, cameras: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let running = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[pipeline]\nlog_interval = \"1s\"\n{pipeline}\n[mqtt]\nport = {}\npublish_frames = true\n{cameras}",
            broker.port
        ),
    );
    // The config file must outlive the start-up.
    std::mem::forget(dir);
    running
}

/// The camera of a `vigil/<camera>/<leaf>` topic.
fn camera_of<'a>(topic: &'a str, leaf: &str) -> Option<&'a str> {
    topic
        .strip_prefix("vigil/")?
        .strip_suffix(leaf)?
        .strip_suffix('/')
}

fn camera(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[cameras.{name}]\nsource = \"rtsp\"\nurl = \"{url}\"\nretry_min = \"300ms\"\nretry_max = \"2s\"\nstall_timeout = \"2s\"\nstart_timeout = \"10s\"\n{extra}\n"
    )
}

/// Reads messages until `done` says so, keeping them all.
struct Watch {
    sub: Subscriber,
    seen: Vec<(Instant, Message)>,
}

impl Watch {
    fn new(port: u16) -> Watch {
        Watch {
            sub: Subscriber::start(port, "vigil/#"),
            seen: Vec::new(),
        }
    }

    /// Waits until `pred` holds on a new message; returns when it arrived.
    fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Message) -> bool,
    ) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self
                .sub
                .messages
                .recv_deadline(deadline)
                .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for {what}"));
            let now = Instant::now();
            let hit = pred(&m);
            self.seen.push((now, m));
            if hit {
                return now;
            }
        }
    }

    fn availability(&mut self, timeout: Duration, camera: &str, value: &str) -> Instant {
        let topic = format!("vigil/{camera}/availability");
        self.until(timeout, &format!("{camera} {value}"), |m| {
            m.topic == topic && m.text() == value
        })
    }

    fn frames_of(&self, camera: &str, since: Instant) -> usize {
        let topic = format!("vigil/{camera}/frames");
        self.seen
            .iter()
            .filter(|(t, m)| *t >= since && m.topic == topic)
            .count()
    }
}

#[test]
fn h264_h265_and_a_real_clip_are_classified_over_rtsp() {
    let broker = Mosquitto::start();
    let server = RtspServer::start(free_port());
    let mut watch = Watch::new(broker.port);
    let mut vigil = start_vigil(
        &broker,
        &[
            camera("cam264", &server.url("/h264"), "analyze_fps = 5"),
            camera(
                "cam265",
                &server.url("/h265"),
                "codec = \"h265\"\ntransport = \"udp\"",
            ),
            camera("clip", &server.url("/clip"), ""),
        ]
        .concat(),
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut squirrels = 0;
    watch.until(
        Duration::from_secs(60),
        "frames from every camera and a squirrel",
        |m| {
            if let Some(cam) = camera_of(&m.topic, "frames") {
                *counts.entry(cam.to_string()).or_default() += 1;
                if cam == "clip" && m.json()["top"][0]["label"] == "fox squirrel" {
                    squirrels += 1;
                }
            }
            ["cam264", "cam265", "clip"]
                .iter()
                .all(|c| counts.get(*c).copied().unwrap_or(0) >= 10)
                && squirrels >= 10
        },
    );
    for cam in ["cam264", "cam265", "clip"] {
        let online = watch
            .seen
            .iter()
            .any(|(_, m)| m.topic == format!("vigil/{cam}/availability") && m.text() == "online");
        assert!(online, "{cam} announced online");
    }
    let status = watch
        .seen
        .iter()
        .rev()
        .find(|(_, m)| m.topic == "vigil/cam264/status" && m.json()["state"] == "online")
        .map(|(_, m)| m.json())
        .expect("a status for cam264");
    assert!(
        status["frames"]["received"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert!(
        status["frames"]["decoded"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert_eq!(status["source"], server.url("/h264"));
    assert!(
        vigil.interrupt(Duration::from_secs(20)).success(),
        "{}",
        vigil.log_text()
    );
    // Stopping marks every camera offline.
    watch.availability(Duration::from_secs(10), "cam264", "offline");
}

#[test]
fn key_frames_of_live_cameras_share_one_decoder_and_each_frame_stays_with_its_camera() {
    let broker = Mosquitto::start();
    let server = RtspServer::start(free_port());
    let mut watch = Watch::new(broker.port);
    let keys = "decode = \"keyframes\"";
    // One shared decoder slot for four cameras: two codecs, three sizes, one damaged stream.
    let mut vigil = start_vigil_with(
        &broker,
        "key_frame_decoders = 1",
        &[
            camera("clip", &server.url("/clip"), keys),
            camera("small", &server.url("/small"), keys),
            camera(
                "hevc",
                &server.url("/h265"),
                &format!("{keys}\ncodec = \"h265\""),
            ),
            camera("noisy", &server.url("/garbage"), keys),
        ]
        .concat(),
    );
    let cameras = ["clip", "small", "hevc", "noisy"];
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut squirrels: HashMap<String, usize> = HashMap::new();
    watch.until(
        Duration::from_secs(90),
        "key frames from every camera, squirrels from the clip",
        |m| {
            if let Some(cam) = camera_of(&m.topic, "frames") {
                *counts.entry(cam.to_string()).or_default() += 1;
                if m.json()["top"][0]["label"] == "fox squirrel" {
                    *squirrels.entry(cam.to_string()).or_default() += 1;
                }
            }
            cameras
                .iter()
                .all(|c| counts.get(*c).copied().unwrap_or(0) >= 4)
                && squirrels.get("clip").copied().unwrap_or(0) >= 3
        },
    );
    // A frame decoded for one camera and handed to another would show here.
    for cam in ["small", "hevc", "noisy"] {
        assert_eq!(
            squirrels.get(cam),
            None,
            "{cam} was given the clip's frames: {squirrels:?}"
        );
    }
    for cam in cameras {
        let status = watch
            .seen
            .iter()
            .rev()
            .find(|(_, m)| {
                m.topic == format!("vigil/{cam}/status") && m.json()["state"] == "online"
            })
            .map(|(_, m)| m.json())
            .unwrap_or_else(|| panic!("a status for {cam}"));
        assert!(
            status["frames"]["skipped_delta"].as_u64().unwrap() > 0,
            "{cam}: {status}"
        );
    }
    let log = vigil.log_text();
    for decoder in ["avdec_h264", "avdec_h265"] {
        let started = log
            .lines()
            .any(|l| l.contains("shared key-frame decoder started") && l.contains(decoder));
        assert!(started, "a shared {decoder}\n{log}");
    }
    assert!(
        vigil.interrupt(Duration::from_secs(20)).success(),
        "{}",
        vigil.log_text()
    );
}

#[test]
fn a_restarted_server_brings_the_camera_back() {
    let broker = Mosquitto::start();
    let port = free_port();
    let server = RtspServer::start(port);
    let mut watch = Watch::new(broker.port);
    let _vigil = start_vigil(
        &broker,
        &camera("door", &server.url("/h264"), "analyze_fps = 5"),
    );
    watch.availability(Duration::from_secs(60), "door", "online");

    server.kill();
    let killed = Instant::now();
    let lost = watch.availability(Duration::from_secs(30), "door", "offline");
    watch.until(Duration::from_secs(10), "status reconnecting", |m| {
        m.topic == "vigil/door/status" && m.json()["state"] == "reconnecting"
    });
    // Stay down for a while: several retries, each failing.
    std::thread::sleep(Duration::from_secs(3));
    let restarted = Instant::now();
    let server = RtspServer::start(port);
    let back = watch.availability(Duration::from_secs(30), "door", "online");
    let recovery = back - restarted;
    eprintln!(
        "RTSP server restart: loss detected {:.2?} after the kill, camera online {:.2?} after the server came back",
        lost - killed,
        recovery
    );
    // retry_max is 2 s: at most one backoff plus connection and first key frame.
    assert!(
        recovery < Duration::from_secs(2 + 4),
        "recovery took {recovery:?}"
    );
    let resumed = Instant::now();
    watch.until(Duration::from_secs(20), "frames after the restart", |m| {
        m.topic == "vigil/door/frames"
    });
    assert!(watch.frames_of("door", resumed) >= 1);
    let reconnects = watch
        .seen
        .iter()
        .rev()
        .find(|(_, m)| m.topic == "vigil/door/status")
        .map(|(_, m)| m.json()["reconnects"].as_u64().unwrap())
        .unwrap();
    assert!(reconnects >= 1);
    drop(server);
}

#[test]
fn a_frozen_stream_is_caught_by_the_watchdog() {
    let broker = Mosquitto::start();
    let server = RtspServer::start(free_port());
    let mut watch = Watch::new(broker.port);
    let vigil = start_vigil(&broker, &camera("frozen", &server.url("/frozen"), ""));
    watch.availability(Duration::from_secs(60), "frozen", "online");
    let mut quiet = 0.0;
    watch.until(Duration::from_secs(20), "the watchdog", |m| {
        let j = m.json_opt();
        let hit = m.topic == "vigil/frozen/status"
            && j["state"] == "reconnecting"
            && j["last_error"].as_str().unwrap_or("").contains("stalled");
        if hit {
            quiet = j["seconds_since_last_frame"].as_f64().unwrap();
        }
        hit
    });
    eprintln!(
        "frozen stream: the watchdog fired {quiet:.2} s after the last frame (stall_timeout 2 s)"
    );
    assert!((2.0..3.0).contains(&quiet), "{quiet}");
    // And it reconnects (the new session sends a frame again).
    watch.availability(Duration::from_secs(20), "frozen", "online");
    assert!(vigil.log_text().contains("stalled"));
}

#[test]
fn bad_credentials_paths_and_hosts_are_per_camera_errors_that_never_show_a_password() {
    let broker = Mosquitto::start();
    let server = RtspServer::start_with_auth(free_port());
    let mut watch = Watch::new(broker.port);
    let closed = free_port();
    let wrong = "wrong-pw-123";
    let cams = [
        camera(
            "wrongpw",
            &format!("rtsp://{USER}:{wrong}@127.0.0.1:{}/small", server.port),
            "",
        ),
        camera(
            "nopath",
            &format!(
                "rtsp://{USER}:{PASSWORD_ENCODED}@127.0.0.1:{}/nope",
                server.port
            ),
            "",
        ),
        // The password in the URL, percent-encoded.
        camera(
            "encoded",
            &format!(
                "rtsp://{USER}:{PASSWORD_ENCODED}@127.0.0.1:{}/small",
                server.port
            ),
            "",
        ),
        camera("nohost", &format!("rtsp://127.0.0.1:{closed}/x"), ""),
        camera(
            "good",
            &server.url("/small"),
            &format!("username = \"{USER}\"\npassword = \"{PASSWORD}\""),
        ),
    ]
    .concat();
    let mut vigil = start_vigil(&broker, &cams);
    let mut errors: HashMap<String, (u64, String)> = HashMap::new();
    let mut online = std::collections::HashSet::new();
    watch.until(
        Duration::from_secs(60),
        "every bad camera retrying twice, the good ones online",
        |m| {
            if m.text() == "online"
                && let Some(cam) = camera_of(&m.topic, "availability")
            {
                online.insert(cam.to_string());
            }
            if let Some(cam) = camera_of(&m.topic, "status") {
                let j = m.json();
                if j["state"] == "reconnecting" {
                    errors.insert(
                        cam.to_string(),
                        (
                            j["attempt"].as_u64().unwrap(),
                            j["last_error"].as_str().unwrap().to_string(),
                        ),
                    );
                }
            }
            online.contains("good")
                && online.contains("encoded")
                && ["wrongpw", "nopath", "nohost"]
                    .iter()
                    .all(|c| errors.get(*c).is_some_and(|e| e.0 >= 2))
        },
    );
    let text = |c: &str| errors[c].1.to_lowercase();
    assert!(
        text("wrongpw").contains("unauthorized"),
        "{}",
        text("wrongpw")
    );
    assert!(text("nopath").contains("not found"), "{}", text("nopath"));
    assert!(
        text("nohost").contains("could not open") || text("nohost").contains("refused"),
        "{}",
        text("nohost")
    );
    assert!(
        vigil.child.try_wait().unwrap().is_none(),
        "vigil still runs"
    );
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
    let log = vigil.log_text();
    let payloads: String = watch
        .seen
        .iter()
        .map(|(_, m)| m.text())
        .collect::<Vec<_>>()
        .join("\n");
    for secret in [wrong, PASSWORD, PASSWORD_ENCODED] {
        assert!(!log.contains(secret), "the log shows a password:\n{log}");
        assert!(
            !payloads.contains(secret),
            "an MQTT payload shows a password"
        );
    }
    assert!(
        log.contains("rtsp://***@127.0.0.1"),
        "URLs are shown redacted:\n{log}"
    );
    // One WARN per camera for the loss, not one per retry.
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("nohost"))
        .count();
    assert_eq!(warnings, 1, "{log}");
}

/// CPU time (user + system) of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn eight_cameras_stream_and_one_dying_does_not_disturb_the_others() {
    let broker = Mosquitto::start();
    let server = RtspServer::start(free_port());
    let lone = RtspServer::start(free_port());
    let mut watch = Watch::new(broker.port);
    let mut cams: String = (0..7)
        .map(|i| camera(&format!("c{i}"), &server.url("/small"), "analyze_fps = 2"))
        .collect();
    cams.push_str(&camera("lone", &lone.url("/small"), "analyze_fps = 2"));
    let vigil = start_vigil(&broker, &cams);
    let mut online = std::collections::HashSet::new();
    watch.until(Duration::from_secs(90), "all 8 cameras online", |m| {
        if let Some(cam) = camera_of(&m.topic, "availability")
            && m.text() == "online"
        {
            online.insert(cam.to_string());
        }
        online.len() == 8
    });
    let measure = |watch: &mut Watch, secs: u64| {
        let from = Instant::now();
        let cpu0 = cpu_seconds(vigil.child.id());
        let end = from + Duration::from_secs(secs);
        while Instant::now() < end {
            let _ = watch
                .sub
                .messages
                .recv_deadline(end)
                .map(|m| watch.seen.push((Instant::now(), m)));
        }
        let cpu = (cpu_seconds(vigil.child.id()) - cpu0) / secs as f64;
        let rates: Vec<f64> = (0..7)
            .map(|i| watch.frames_of(&format!("c{i}"), from) as f64 / secs as f64)
            .collect();
        (rates, cpu)
    };
    let (before, cpu) = measure(&mut watch, 6);
    eprintln!(
        "8 RTSP cameras (320x240, 10 fps, analyze_fps 2): vigil uses {:.0}% of one core; analysed fps per camera {before:?}",
        cpu * 100.0
    );
    lone.kill();
    watch.availability(Duration::from_secs(15), "lone", "offline");
    let (after, _) = measure(&mut watch, 6);
    eprintln!("after one camera died: {after:?}");
    for (b, a) in before.iter().zip(&after) {
        assert!(*b >= 1.5, "each camera analyses about 2 fps: {before:?}");
        assert!(
            *a >= b * 0.8,
            "the others keep their rate: before {before:?}, after {after:?}"
        );
    }
}

#[test]
fn garbage_in_a_stream_is_contained_and_the_camera_keeps_going() {
    let broker = Mosquitto::start();
    let server = RtspServer::start(free_port());
    let mut watch = Watch::new(broker.port);
    let mut vigil = start_vigil(
        &broker,
        &camera("noisy", &server.url("/garbage"), "analyze_fps = 5"),
    );
    watch.availability(Duration::from_secs(60), "noisy", "online");
    let start = Instant::now();
    // Keep watching for 8 s: frames keep coming (through decoder errors and, if need be,
    // reconnects), and vigil stays up.
    let end = start + Duration::from_secs(8);
    while Instant::now() < end {
        if let Ok(m) = watch.sub.messages.recv_deadline(end) {
            watch.seen.push((Instant::now(), m));
        }
    }
    let frames = watch.frames_of("noisy", start);
    assert!(frames >= 10, "{frames} frames in 8 s\n{}", vigil.log_text());
    assert!(
        vigil.child.try_wait().unwrap().is_none(),
        "vigil still runs"
    );
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}

#[test]
fn a_udp_only_server_is_reached_over_udp_and_the_status_says_so() {
    let broker = Mosquitto::start();
    let server = RtspServer::start(free_port());
    let mut watch = Watch::new(broker.port);
    // Both with the default transport ("auto"): TCP is tried first.
    let mut vigil = start_vigil(
        &broker,
        &[
            camera("udponly", &server.url("/udp-only"), ""),
            camera("both", &server.url("/small"), ""),
        ]
        .concat(),
    );
    let mut transports: HashMap<String, String> = HashMap::new();
    watch.until(
        Duration::from_secs(60),
        "both cameras online, with their transport",
        |m| {
            if let Some(cam) = camera_of(&m.topic, "status")
                && m.json()["state"] == "online"
            {
                transports.insert(
                    cam.to_string(),
                    m.json()["transport"].as_str().unwrap_or("").to_string(),
                );
            }
            transports.len() == 2
        },
    );
    assert_eq!(transports["udponly"], "udp", "{}", vigil.log_text());
    assert_eq!(transports["both"], "tcp");
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
    assert!(
        vigil
            .log_text()
            .contains("no frame over this RTSP transport; trying the other"),
        "{}",
        vigil.log_text()
    );
}
