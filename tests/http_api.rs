//! The HTTP API against the real `vigil` binary, a real mosquitto and real files: /metrics agrees
//! with the frames fed in and with MQTT, events carry snapshots that retention deletes, predict
//! matches `vigil classify`, bad requests get the right 4xx, the token guards all but health, and
//! /readyz says why vigil is not ready.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use opencv::core::{Mat, Size};
use opencv::imgproc;
use opencv::prelude::*;
use prometheus_parse::{LineInfo, Sample, Scrape, Value as PromValue};
use serde_json::{Value, json};

const MODEL_NAME: &str = "efficientnet-lite0";
const PREDICT: &str = "/v1/models/efficientnet-lite0:predict";

// ---------------------------------------------------------------------------------------------
// HTTP helpers

/// One HTTP answer, read whole.
struct Reply {
    status: u16,
    content_type: String,
    www_authenticate: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }

    /// Asserts a JSON error `{"error": {"code", "message"}}` with this status; returns the code.
    fn error(&self, status: u16, what: &str) -> String {
        assert_eq!(self.status, status, "{what}: {}", self.text());
        assert!(
            self.content_type.starts_with("application/json"),
            "{what}: content type {:?}",
            self.content_type
        );
        let j = self.json();
        let code = j["error"]["code"].as_str().unwrap_or_default();
        let message = j["error"]["message"].as_str().unwrap_or_default();
        assert!(!code.is_empty(), "{what}: no error.code in {j}");
        assert!(!message.is_empty(), "{what}: no error.message in {j}");
        code.to_string()
    }
}

/// A client of one vigil's HTTP server; 4xx and 5xx are answers, not errors.
struct Http {
    agent: ureq::Agent,
    base: String,
    /// Sent as `Authorization: Bearer <token>` unless a call says otherwise.
    token: Option<String>,
}

impl Http {
    fn new(vigil: &Running) -> Http {
        let addr = vigil.http_addr(Duration::from_secs(30));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Http {
            agent,
            base: format!("http://{addr}"),
            token: None,
        }
    }

    fn reply(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>, what: &str) -> Reply {
        let mut response = result.unwrap_or_else(|e| panic!("{what}: {e}"));
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type").unwrap_or_default();
        let www_authenticate = header("www-authenticate");
        let body = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .unwrap_or_else(|e| panic!("{what}: reading the body: {e}"));
        Reply {
            status: response.status().as_u16(),
            content_type,
            www_authenticate,
            body,
        }
    }

    /// GET with the default token.
    fn get(&self, path: &str) -> Reply {
        self.get_as(path, self.token.as_deref().map(bearer).as_deref())
    }

    /// GET with this `Authorization` header (or none).
    fn get_as(&self, path: &str, authorization: Option<&str>) -> Reply {
        let url = self.url(path);
        let mut req = self.agent.get(&url);
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        Self::reply(req.call(), &format!("GET {path}"))
    }

    /// POST a body of this content type, with the default token.
    fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Reply {
        self.post_as(
            path,
            content_type,
            body,
            self.token.as_deref().map(bearer).as_deref(),
        )
    }

    fn post_as(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
        authorization: Option<&str>,
    ) -> Reply {
        let url = self.url(path);
        let mut req = self.agent.post(&url).content_type(content_type);
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        Self::reply(req.send(body), &format!("POST {path}"))
    }

    fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post(path, "application/json", body.to_string().as_bytes())
    }

    fn url(&self, path: &str) -> String {
        assert!(path.starts_with('/'), "{path} is not a path");
        format!("{}{path}", self.base)
    }

    /// GET that must answer 200 with JSON.
    fn get_json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
    }

    fn metrics(&self) -> Metrics {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        Metrics::parse(&r.text())
    }
}

/// POSTs `body` on a plain socket and reads the answer even when the server answers before
/// reading the whole body and closes (ureq gives up with a broken pipe then, as the server is
/// right to do for a body over its limit).
fn raw_post(
    http: &Http,
    path: &str,
    content_type: &str,
    body: &[u8],
    authorization: Option<&str>,
) -> Reply {
    use std::io::{Read, Write};
    let addr = http.base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let body = body.to_vec();
    // The server may stop reading: the rest of the body is the writer's problem, not the test's.
    let sending = std::thread::spawn(move || {
        let _ = writer.write_all(&body);
    });
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
        if let Some(reply) = parse_response(&got) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = sending.join();
            return reply;
        }
    }
    let _ = sending.join();
    parse_response(&got).unwrap_or_else(|| {
        panic!(
            "POST {path}: no complete answer: {:?}",
            String::from_utf8_lossy(&got)
        )
    })
}

/// A whole HTTP/1.1 response with a Content-Length, or None while it is incomplete.
fn parse_response(raw: &[u8]) -> Option<Reply> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let length: usize = header("content-length")?.parse().ok()?;
    let body = raw.get(end + 4..end + 4 + length)?.to_vec();
    Some(Reply {
        status,
        content_type: header("content-type").unwrap_or_default(),
        www_authenticate: header("www-authenticate"),
        body,
    })
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decodes a JPEG (or any image); panics when it is not one.
fn decode(bytes: &[u8], what: &str) -> Mat {
    let m = vigil::images::decode(bytes).unwrap_or_else(|e| panic!("{what}: not an image: {e}"));
    assert!(!m.empty(), "{what}: an empty image");
    m
}

fn encode(ext: &str, image: &Mat) -> Vec<u8> {
    match ext {
        ".png" => vigil::images::encode_png(image).unwrap(),
        ".jpg" => vigil::images::encode_jpeg(image, 95).unwrap(),
        other => panic!("no encoder for {other}"),
    }
}

/// A fixture photo resized to `w`x`h` and encoded as `ext`.
fn resized(fixture_name: &str, w: i32, h: i32, ext: &str) -> Vec<u8> {
    let bytes = std::fs::read(fixture(fixture_name)).unwrap();
    let img = decode(&bytes, fixture_name);
    let mut out = Mat::default();
    imgproc::resize(
        &img,
        &mut out,
        Size::new(w, h),
        0.0,
        0.0,
        imgproc::INTER_AREA,
    )
    .unwrap();
    encode(ext, &out)
}

// ---------------------------------------------------------------------------------------------
// Metrics helpers

struct Metrics {
    text: String,
    scrape: Scrape,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("/metrics does not parse ({e}):\n{text}"));
        Metrics {
            text: text.to_string(),
            scrape,
        }
    }

    fn samples(&self, metric: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect()
    }

    /// The value of the one sample named `metric` whose labels include `labels`.
    /// A histogram's buckets.
    fn histogram(&self, metric: &str) -> Vec<prometheus_parse::HistogramCount> {
        match self.samples(metric, &[]).first().map(|s| s.value.clone()) {
            Some(PromValue::Histogram(buckets)) => buckets,
            _ => panic!("no {metric} histogram in\n{}", self.text),
        }
    }

    fn value(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.samples(metric, labels);
        assert!(found.len() <= 1, "{metric} {labels:?} matches {found:?}");
        found.first().map(|s| number(s))
    }

    fn get(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(metric, labels)
            .unwrap_or_else(|| panic!("no {metric} {labels:?} in\n{}", self.text))
    }
}

fn number(s: &Sample) -> f64 {
    match &s.value {
        PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v) => *v,
        other => panic!("{} is not a number: {other:?}", s.metric),
    }
}

// ---------------------------------------------------------------------------------------------
// Set-up helpers

/// A broker and vigil on `config` (with `{port}` standing for the broker's port).
fn start(dir: &Path, config: &str) -> (Mosquitto, Running, Http) {
    let broker = Mosquitto::start();
    let vigil = run_vigil(dir, &config.replace("{port}", &broker.port.to_string()));
    let http = Http::new(&vigil);
    (broker, vigil, http)
}

/// A live camera that keeps vigil running (it exits once every source has ended), analysed
/// slowly so that it adds little to the figures.
const LIVE_CAMERA: &str =
    "[cameras.live]\nsource = \"test\"\nwidth = 160\nheight = 120\nfps = 5\nanalyze_fps = 1\n";

fn camera_state(m: &Metrics, camera: &str) -> Option<String> {
    m.samples("vigil_camera_state", &[("camera", camera)])
        .into_iter()
        .find(|s| number(s) == 1.0)
        .and_then(|s| s.labels.get("state").map(str::to_string))
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn metrics_counters_agree_with_the_frames_fed_in() {
    const FRAMES: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(dir.path(), &[("baboon.jpg", 30), ("orange.jpg", 30)]);
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/clip/frames");
    let mut vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {}\npublish_frames = true\nqos_results = 1\n\
             [cameras.clip]\nsource = \"file\"\npath = \"{}\"\nloop = false\nrealtime = false\nanalyze_fps = 0\n\
             {LIVE_CAMERA}",
            broker.port,
            clip.display()
        ),
    );
    let http = Http::new(&vigil);

    // The file ends: its camera goes offline (the live one keeps vigil running).
    wait_for(
        Duration::from_secs(60),
        "the file camera's state gauge to say offline",
        || (camera_state(&http.metrics(), "clip").as_deref() == Some("offline")).then_some(()),
    );
    assert!(
        vigil.child.try_wait().unwrap().is_none(),
        "the live camera keeps vigil running\n{}",
        vigil.log_text()
    );

    // Every frame is on MQTT, once.
    let messages = sub.collect_until(Duration::from_secs(30), |got| got.len() >= FRAMES);
    let frames: Vec<u64> = messages
        .iter()
        .map(|m| m.json()["frame"].as_u64().expect("a frame number"))
        .collect();
    assert_eq!(
        frames.len(),
        FRAMES,
        "one message on vigil/clip/frames per frame\n{}",
        vigil.log_text()
    );
    let distinct: BTreeSet<u64> = frames.iter().copied().collect();
    assert_eq!(distinct.len(), FRAMES, "no frame twice: {frames:?}");

    // A scrape at a quiet moment (the live camera's frame is not between two counters): the
    // pipeline's counters are the same in two scrapes in a row.
    let key = |m: &Metrics| {
        [
            m.get("vigil_stage_items_received_total", &[("stage", "infer")]),
            m.get("vigil_stage_items_sent_total", &[("stage", "sink")]),
            m.get("vigil_latency_seconds_count", &[]),
            m.get("vigil_batch_size_sum", &[]),
        ]
    };
    let m = wait_for(Duration::from_secs(20), "two identical scrapes", || {
        let a = http.metrics();
        let b = http.metrics();
        (key(&a) == key(&b)).then_some(b)
    });
    eprintln!("quiet scrape: {:?}", key(&m));

    // The exposition: every metric has a HELP line, every sample line parses.
    for line in m.text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Sample { value, .. } => assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "{line}"
            ),
            LineInfo::Doc { .. } | LineInfo::Type { .. } => {}
            LineInfo::Empty | LineInfo::Ignored => assert!(
                line.starts_with('#'),
                "a line that is neither a sample nor a comment: {line:?}"
            ),
        }
    }
    let typed: Vec<&str> = m
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(typed.len() >= 20, "{} metric families", typed.len());
    for name in &typed {
        assert!(
            m.scrape
                .docs
                .get(*name)
                .is_some_and(|d| !d.trim().is_empty()),
            "{name} has no HELP line"
        );
    }
    for name in [
        "vigil_camera_frames_decoded",
        "vigil_camera_frames_dropped",
        "vigil_camera_state",
        "vigil_stage_items_sent",
        "vigil_batch_size",
        "vigil_latency_seconds",
        "vigil_execution_provider",
    ] {
        assert!(m.scrape.docs.contains_key(name), "no HELP for {name}");
    }

    // The file camera decoded every frame of the clip and dropped none.
    assert_eq!(
        m.get("vigil_camera_frames_decoded_total", &[("camera", "clip")]),
        FRAMES as f64
    );
    let dropped = m.samples("vigil_camera_frames_dropped_total", &[("camera", "clip")]);
    let reasons: BTreeSet<&str> = dropped
        .iter()
        .filter_map(|s| s.labels.get("reason"))
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(["behind", "disabled", "keyframes", "motion", "rate", "still"])
    );
    for s in &dropped {
        assert_eq!(number(s), 0.0, "{s:?}");
    }
    // The stages and histograms agree with one another.
    let sink_sent = m.get("vigil_stage_items_sent_total", &[("stage", "sink")]);
    let infer_received = m.get("vigil_stage_items_received_total", &[("stage", "infer")]);
    assert!(
        sink_sent >= FRAMES as f64,
        "{sink_sent} frames through the sink"
    );
    assert_eq!(
        m.get("vigil_latency_seconds_count", &[]),
        sink_sent,
        "one latency per published frame"
    );
    assert_eq!(
        m.get("vigil_batch_size_sum", &[]),
        infer_received,
        "the batches add up to the frames inferred"
    );
    assert!(
        m.get("vigil_batch_size_count", &[]) >= 1.0
            && m.get("vigil_batch_size_count", &[]) <= infer_received
    );
    let buckets = m.histogram("vigil_latency_seconds");
    let inf = buckets
        .iter()
        .find(|b| b.less_than.is_infinite())
        .expect("a +Inf bucket");
    assert_eq!(inf.count, sink_sent, "the +Inf bucket counts every frame");
    assert_eq!(
        m.get("vigil_execution_provider", &[("provider", "cpu")]),
        1.0
    );
    assert_eq!(
        m.samples("vigil_execution_provider", &[]).len(),
        1,
        "one provider"
    );
    // The batch limit measured at start: one of the sizes measured (1, 2, 4, 8), the one the
    // log names, and no batch was larger.
    let limit = m.get("vigil_batch_limit", &[]);
    let measured: Vec<f64> = [1, 2, 4, 8]
        .iter()
        .map(|b| {
            m.get(
                "vigil_batch_measured_images_per_second",
                &[("batch", &b.to_string())],
            )
        })
        .collect();
    assert!(measured.iter().all(|ips| *ips > 0.0), "{measured:?}");
    assert!([1.0, 2.0, 4.0, 8.0].contains(&limit), "{limit}");
    assert!(
        vigil
            .log_text()
            .contains(&format!("batch limit {limit} measured")),
        "{}",
        vigil.log_text()
    );
    let sizes = m.histogram("vigil_batch_size");
    let count = |le: f64| sizes.iter().find(|b| b.less_than == le).map(|b| b.count);
    assert_eq!(count(limit), count(f64::INFINITY), "a batch over the limit");
}

const WATCHED: &str = "[decide]\nthreshold = 0.4\n\
    [events]\nwatch = [\"fox squirrel\", \"orange\", \"baboon\", \"Pekinese\"]\nmin_frames = 2\ncooldown = \"200ms\"\n";

/// The photos clip: 4 subjects, 75 frames each.
const PHOTOS_FRAMES: usize = 300;

/// vigil on photos.mp4 (not paced, not looping) and the live camera, with `extra` config; returns
/// once the file ended and every one of its frames went through the sink (its results are on
/// MQTT, published before the sink records the frame's events). `sub` also holds the retained
/// ON/OFF states of the photos camera's labels.
struct PhotosRun {
    _broker: Mosquitto,
    sub: Subscriber,
    vigil: Running,
    http: Http,
    states: Vec<Message>,
}

fn play_photos(dir: &Path, extra: &str) -> PhotosRun {
    let broker = Mosquitto::start();
    let sub = Subscriber::start_with(
        broker.port,
        &["vigil/photos/frames", "vigil/photos/+/state"],
        |_| {},
    );
    let vigil = run_vigil(
        dir,
        &format!(
            "{MODEL}{WATCHED}{extra}\
             [mqtt]\nport = {}\npublish_frames = true\nqos_results = 1\n\
             [cameras.photos]\nsource = \"file\"\npath = \"{{fixtures}}/photos.mp4\"\nrealtime = false\nloop = false\n\
             {LIVE_CAMERA}",
            broker.port
        ),
    );
    let http = Http::new(&vigil);
    let got = sub.collect_until(Duration::from_secs(60), |got| {
        got.iter()
            .filter(|m| m.topic == "vigil/photos/frames")
            .count()
            >= PHOTOS_FRAMES
    });
    let frames = got
        .iter()
        .filter(|m| m.topic == "vigil/photos/frames")
        .count();
    assert_eq!(
        frames,
        PHOTOS_FRAMES,
        "every frame of photos.mp4 analysed\n{}",
        vigil.log_text()
    );
    wait_for(Duration::from_secs(20), "the photos camera offline", || {
        (http.get_json("/api/cameras/photos")["state"] == "offline").then_some(())
    });
    let states = got
        .into_iter()
        .filter(|m| m.topic.ends_with("/state"))
        .collect();
    PhotosRun {
        _broker: broker,
        sub,
        vigil,
        http,
        states,
    }
}

/// Checks that the photos clip made one event per subject, newest first.
fn assert_one_event_per_subject(events: &[Value]) {
    let labels: Vec<&str> = events
        .iter()
        .map(|e| e["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        ["Pekinese", "baboon", "orange", "fox squirrel"],
        "one event per subject, newest first: {events:#?}"
    );
}

fn photos_events(http: &Http) -> Vec<Value> {
    http.get_json("/api/events?camera=photos")["events"]
        .as_array()
        .cloned()
        .expect("a list of events")
}

#[test]
fn events_have_jpeg_snapshots_and_old_ones_are_deleted_beyond_retention() {
    let dir = tempfile::tempdir().unwrap();
    let snaps = dir.path().join("snaps");
    let run = play_photos(
        dir.path(),
        &format!("[snapshots]\ndir = \"{}\"\nkeep = 2\n", snaps.display()),
    );
    let http = &run.http;

    // The file is over: its 4 subjects made one event each, newest first.
    let events = photos_events(http);
    assert_one_event_per_subject(&events);
    // Every event had its snapshot made.
    let started = http.metrics();
    assert_eq!(
        started.get("vigil_snapshots_written_total", &[]),
        events.len() as f64,
        "one snapshot per event"
    );
    assert_eq!(started.get("vigil_snapshots_failed_total", &[]), 0.0);
    for (i, e) in events.iter().enumerate() {
        let id = e["id"].as_str().unwrap();
        let url = format!("/api/events/{id}/snapshot.jpg");
        assert_eq!(
            e["snapshot"].as_str(),
            Some(url.as_str()),
            "the event's JSON has its snapshot's URL: {e}"
        );
        let r = http.get(&url);
        if i < 2 {
            assert_eq!(r.status, 200, "{url}: {}", r.text());
            assert_eq!(r.content_type, "image/jpeg");
            let img = decode(&r.body, &url);
            assert_eq!(
                (img.cols(), img.rows()),
                (640, 480),
                "{url}: the clip's size"
            );
        } else {
            assert_eq!(
                r.error(404, &format!("{url} (beyond keep = 2)")),
                "not_found"
            );
        }
    }
    // On disk: the 2 newest, by their ids.
    let mut on_disk: Vec<String> = std::fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jpg"))
        .collect();
    on_disk.sort();
    let mut newest: Vec<String> = events[..2]
        .iter()
        .map(|e| format!("{}.jpg", e["id"].as_str().unwrap()))
        .collect();
    newest.sort();
    assert_eq!(on_disk, newest, "the snapshot dir holds the 2 newest");

    // The latest analysed frame of the camera.
    let r = http.get("/api/cameras/photos/latest.jpg");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.content_type, "image/jpeg");
    let img = decode(&r.body, "latest.jpg");
    assert_eq!((img.cols(), img.rows()), (640, 480));

    // Cameras.
    let cameras = http.get_json("/api/cameras");
    let names: BTreeSet<&str> = cameras["cameras"]
        .as_array()
        .expect("a list of cameras")
        .iter()
        .map(|c| c["camera"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["live", "photos"]));
    let code = http
        .get("/api/cameras/nope")
        .error(404, "an unknown camera");
    assert_eq!(code, "not_found");
    let r = http.get("/api/cameras/nope/latest.jpg");
    assert_eq!(r.error(404, "latest.jpg of an unknown camera"), "not_found");

    // Event queries.
    let baboons = http.get_json("/api/events?camera=photos&label=baboon")["events"]
        .as_array()
        .unwrap()
        .clone();
    let expected = events.iter().filter(|e| e["label"] == "baboon").count();
    assert!(expected >= 1);
    assert_eq!(baboons.len(), expected, "{baboons:#?}");
    assert!(
        baboons
            .iter()
            .all(|e| e["label"] == "baboon" && e["camera"] == "photos")
    );
    let one = http.get_json("/api/events?limit=1")["events"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(one.len(), 1);
    let none = http.get_json("/api/events?camera=nope")["events"]
        .as_array()
        .unwrap()
        .clone();
    assert!(none.is_empty(), "{none:?}");
    let code = http
        .get("/api/events?since=garbage")
        .error(400, "since=garbage");
    assert_eq!(code, "bad_request");
    let code = http.get("/api/events?limit=0").error(400, "limit=0");
    assert_eq!(code, "bad_request");
    let all = photos_events(http).len();
    let since_long_ago = http.get_json("/api/events?camera=photos&since=1")["events"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(since_long_ago, all);
    let since_2100 = http.get_json("/api/events?since=2100-01-01T00:00:00Z")["events"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(since_2100, 0);
    assert!(run.vigil.log_text().contains("end of file"));
}

/// Polls `f` until `done` holds for its value or `timeout` passes; returns the last value either
/// way (for an assertion that shows it).
fn poll<T>(timeout: Duration, mut f: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let v = f();
        if done(&v) || Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file camera's source says "offline" when it reaches the end of the file, while its last
/// frames are still in the pipeline: its events must end only once those frames are out (ending
/// them at the notice would let the frames after it start a new event that never ends).
#[test]
fn a_file_cameras_events_all_end_after_its_last_frame() {
    let dir = tempfile::tempdir().unwrap();
    // A batcher that waits up to 1 s to fill batches of 32: the file's last frames are still
    // in the pipeline when its source ends.
    let run = play_photos(
        dir.path(),
        "[pipeline]\nmax_batch = 32\nmax_wait = \"1s\"\n",
    );
    let ended = |events: &Vec<Value>| events.iter().all(|e| e["type"] == "end");
    let events = poll(Duration::from_secs(10), || photos_events(&run.http), ended);
    assert_one_event_per_subject(&events);
    assert!(
        ended(&events),
        "every event of a camera that went offline has ended: {events:#?}"
    );
    let last = &events[0];
    assert_eq!(last["reason"], "camera offline", "{last:#}");
    assert!(
        last["frames"].as_u64().unwrap() >= 70,
        "the last subject's event counts its frames to the end of the file: {last:#}"
    );
    for e in &events[1..] {
        assert_eq!(e["reason"], "cleared", "{e:#}");
    }
    // The retained states end OFF.
    let mut states = run.states.clone();
    let last_state = |states: &[Message], topic: &str| {
        states.iter().rfind(|m| m.topic == topic).map(|m| m.text())
    };
    let topic = "vigil/photos/pekinese/state";
    if last_state(&states, topic).as_deref() != Some("OFF") {
        states.extend(run.sub.collect_until(Duration::from_secs(5), |got| {
            last_state(got, topic).as_deref() == Some("OFF")
        }));
    }
    for label in ["fox_squirrel", "orange", "baboon", "pekinese"] {
        let topic = format!("vigil/photos/{label}/state");
        assert_eq!(
            last_state(&states, &topic).as_deref(),
            Some("OFF"),
            "{topic}"
        );
    }
}

/// `vigil classify`'s JSON line for each of `images` (its output is not in their order).
fn classify(config: &Path, images: &[&str]) -> Vec<Value> {
    let paths: Vec<_> = images.iter().map(|i| fixture(i)).collect();
    let out = vigil()
        .arg("classify")
        .arg("-c")
        .arg(config)
        .args(&paths)
        .output()
        .expect("vigil classify runs");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), images.len(), "one line per image: {lines:?}");
    paths
        .iter()
        .map(|p| {
            lines
                .iter()
                .find(|l| l["camera"] == p.display().to_string())
                .unwrap_or_else(|| panic!("no line for {}: {lines:?}", p.display()))
                .clone()
        })
        .collect()
}

fn top1(v: &Value) -> (String, f64) {
    (
        v["label"].as_str().expect("a label").to_string(),
        v["score"].as_f64().expect("a score"),
    )
}

#[test]
fn predict_gives_the_same_top_1_as_vigil_classify() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, vigil, http) = start(
        dir.path(),
        &format!("{MODEL}[mqtt]\nport = {{port}}\n{LIVE_CAMERA}"),
    );
    let lines = classify(
        &dir.path().join("vigil.toml"),
        &["baboon.jpg", "orange.jpg"],
    );
    let expected: Vec<(String, f64)> = lines.iter().map(|l| top1(&l["top"][0])).collect();
    assert_eq!(expected[0].0, "baboon");
    assert_eq!(expected[1].0, "orange");
    let baboon = std::fs::read(fixture("baboon.jpg")).unwrap();
    let orange = std::fs::read(fixture("orange.jpg")).unwrap();

    let same = |got: &Value, want: &(String, f64), what: &str| {
        let (label, score) = top1(got);
        assert_eq!(&label, &want.0, "{what}: {got}");
        assert!(
            (score - want.1).abs() < 1e-4,
            "{what}: score {score} against classify's {}",
            want.1
        );
        assert_eq!(got["top"][0]["label"], want.0.as_str(), "{what}: {got}");
    };

    // JSON with base64.
    let r = http.post_json(PREDICT, &json!({"instances": [{"b64": b64(&baboon)}]}));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let predictions = j["predictions"].as_array().expect("predictions");
    assert_eq!(predictions.len(), 1);
    same(&predictions[0], &expected[0], "b64 instance");
    let version = predictions[0]["model_version"].clone();
    assert!(version.is_string(), "{j}");

    // The raw image as the body.
    let r = http.post(PREDICT, "image/jpeg", &baboon);
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["predictions"].as_array().unwrap().len(), 1);
    same(&j["predictions"][0], &expected[0], "raw JPEG body");

    // Two instances: two predictions, in order.
    let r = http.post_json(
        PREDICT,
        &json!({"instances": [{"b64": b64(&baboon)}, {"b64": b64(&orange)}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let predictions = j["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 2, "{j}");
    same(&predictions[0], &expected[0], "instance 0 of 2");
    same(&predictions[1], &expected[1], "instance 1 of 2");

    // The model's status, TensorFlow Serving style.
    let status = http.get_json(&format!("/v1/models/{MODEL_NAME}"));
    let versions = status["model_version_status"]
        .as_array()
        .expect("model_version_status");
    assert_eq!(versions.len(), 1, "{status}");
    assert_eq!(versions[0]["state"], "AVAILABLE", "{status}");
    assert_eq!(versions[0]["version"], version, "{status}");
    assert_eq!(versions[0]["status"]["error_code"], "OK");
    let v = version.as_str().unwrap();
    let status = http.get_json(&format!("/v1/models/{MODEL_NAME}/versions/{v}"));
    assert_eq!(status["model_version_status"][0]["state"], "AVAILABLE");
    // ... and the predict requests were counted.
    let m = http.metrics();
    assert_eq!(
        m.get("vigil_predict_requests_total", &[("outcome", "ok")]),
        3.0
    );
    drop(vigil);
}

/// A PNG whose header declares `w`x`h` (no pixel data follows).
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    v.extend_from_slice(&w.to_be_bytes());
    v.extend_from_slice(&h.to_be_bytes());
    v.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    v
}

#[test]
fn bad_predict_requests_get_the_right_4xx_and_vigil_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, mut vigil, http) = start(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {{port}}\n\
             [http]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 200000\nmax_image_pixels = 10000\n\
             {LIVE_CAMERA}"
        ),
    );
    // 96x96 = 9216 pixels: within max_image_pixels.
    let small = resized("baboon.jpg", 96, 96, ".jpg");
    let instance = |bytes: &[u8]| json!({"instances": [{"b64": b64(bytes)}]});

    let cases: Vec<(&str, Reply, u16, &[&str])> = vec![
        (
            "a body that is not JSON",
            http.post(PREDICT, "application/json", b"this is { not json"),
            400,
            &["bad_request"],
        ),
        (
            "invalid base64",
            http.post_json(PREDICT, &json!({"instances": [{"b64": "!!not base64!!"}]})),
            400,
            &["bad_request"],
        ),
        (
            "base64 of text",
            http.post_json(PREDICT, &instance(b"just some text, not an image at all")),
            400,
            &["bad_image"],
        ),
        (
            "a PNG header declaring 100000x100000",
            http.post_json(PREDICT, &instance(&png_header(100_000, 100_000))),
            413,
            &["image_too_large"],
        ),
        (
            "a real 200x200 PNG over max_image_pixels = 10000",
            http.post_json(PREDICT, &instance(&resized("baboon.jpg", 200, 200, ".png"))),
            413,
            &["image_too_large"],
        ),
        (
            "a raw body over max_body_bytes",
            raw_post(&http, PREDICT, "image/jpeg", &vec![0xffu8; 300_000], None),
            413,
            &["body_too_large"],
        ),
        (
            "an unknown model",
            http.post_json("/v1/models/nope:predict", &instance(&small)),
            404,
            &["not_found"],
        ),
    ];
    for (what, reply, status, codes) in &cases {
        // A non-image may also be "unsupported media type".
        let status = if *what == "base64 of text" && reply.status == 415 {
            415
        } else {
            *status
        };
        let code = reply.error(status, what);
        assert!(codes.contains(&code.as_str()), "{what}: code {code}");
    }
    // A JSON body over the limit too (the common case: a big base64 image).
    let big = json!({"instances": [{"b64": b64(&vec![7u8; 250_000])}]});
    let code = raw_post(
        &http,
        PREDICT,
        "application/json",
        big.to_string().as_bytes(),
        None,
    )
    .error(413, "a JSON body over max_body_bytes");
    assert_eq!(code, "body_too_large");

    // vigil is unharmed.
    assert!(
        vigil.child.try_wait().unwrap().is_none(),
        "{}",
        vigil.log_text()
    );
    assert_eq!(http.get("/healthz").status, 200);
    let r = http.post_json(PREDICT, &instance(&small));
    assert_eq!(r.status, 200, "{}", r.text());
    let p = &r.json()["predictions"][0];
    assert!(p["label"].is_string(), "{p}");
    let score = p["score"].as_f64().unwrap();
    assert!(score > 0.0 && score <= 1.0, "{p}");
    // The outcomes were counted.
    let m = http.metrics();
    let outcome = |o: &str| {
        m.value("vigil_predict_requests_total", &[("outcome", o)])
            .unwrap_or(0.0)
    };
    assert_eq!(outcome("ok"), 1.0);
    assert_eq!(outcome("bad_request"), 3.0);
    assert_eq!(outcome("too_large"), 4.0);
    assert_eq!(outcome("not_found"), 1.0);
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}

#[test]
fn a_token_protects_everything_but_health() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, vigil, mut http) = start(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {{port}}\n[http]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n{LIVE_CAMERA}"
        ),
    );
    // Health and readiness are open.
    assert_eq!(http.get("/healthz").status, 200);
    let r = http.get("/readyz");
    assert!([200, 503].contains(&r.status), "{} {}", r.status, r.text());
    let image = std::fs::read(fixture("baboon.jpg")).unwrap();

    let protected: [(&str, bool); 5] = [
        ("/metrics", false),
        ("/api/cameras", false),
        ("/api/events", false),
        ("/v1/models/efficientnet-lite0", false),
        (PREDICT, true),
    ];
    let call = |path: &str, post: bool, authorization: Option<&str>| {
        if post {
            // Refused before the body is read: the answer may come before it is all sent.
            raw_post(&http, path, "image/jpeg", &image, authorization)
        } else {
            http.get_as(path, authorization)
        }
    };
    for (path, post) in protected {
        for (authorization, what) in [
            (None, "no token"),
            (Some("Bearer wrong-token"), "a wrong token"),
            (Some("s3cret"), "the token without its scheme"),
            (Some("Basic czNjcmV0"), "another scheme"),
        ] {
            let r = call(path, post, authorization);
            let code = r.error(401, &format!("{path} with {what}"));
            assert_eq!(code, "unauthorized");
            let challenge = r.www_authenticate.as_deref().unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer"),
                "{path} with {what}: WWW-Authenticate {challenge:?}"
            );
            assert!(!r.text().contains("s3cret"), "{}", r.text());
        }
        let r = call(path, post, Some("Bearer s3cret"));
        assert_eq!(r.status, 200, "{path} with the token: {}", r.text());
    }
    http.token = Some("s3cret".into());
    assert_eq!(
        http.get_json(PREDICT.trim_end_matches(":predict"))["model_version_status"][0]["state"],
        "AVAILABLE"
    );
    let log = vigil.log_text();
    assert!(log.contains("HTTP server listening"), "{log}");
    assert!(!log.contains("s3cret"), "the token is in the log:\n{log}");
}

#[test]
fn readyz_says_why_it_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let closed = free_port();
    let (_broker, vigil, http) = start(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {{port}}\n\
             [cameras.door]\nsource = \"rtsp\"\nurl = \"rtsp://127.0.0.1:{closed}/x\"\n\
             retry_min = \"300ms\"\nretry_max = \"1s\"\nstart_timeout = \"5s\"\n"
        ),
    );
    assert_eq!(http.get("/healthz").status, 200);
    // Starting, then reconnecting: never ready, and the reason names the camera and its state.
    let reason = wait_for(
        Duration::from_secs(30),
        "/readyz to say the camera is reconnecting",
        || {
            let r = http.get("/readyz");
            let code = r.error(503, "/readyz with no camera online");
            assert_eq!(code, "not_ready");
            let message = r.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(message.contains("door"), "{message}");
            message.contains("reconnecting").then_some(message)
        },
    );
    eprintln!("/readyz: {reason}");
    assert_eq!(http.get("/healthz").status, 200);
    let r = http.get("/healthz");
    assert_eq!(r.json()["status"], "ok");
    assert!(vigil.log_text().contains("HTTP server listening"));
}
