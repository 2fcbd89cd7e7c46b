//! Shared helpers for the integration tests: the repository's paths, a real mosquitto on a free
//! port, an MQTT subscriber, and running the `vigil` binary. Waiting is always a poll or an
//! event with a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture made by `make setup` (scripts/setup.sh).
pub fn fixture(name: &str) -> PathBuf {
    let p = repo().join("fixtures").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `make setup` first",
        p.display()
    );
    p
}

/// Points ONNX Runtime at the library `make setup` fetched, unless the environment already does.
pub fn ort_library() -> PathBuf {
    let p = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".deps/onnxruntime/libonnxruntime.so"));
    assert!(
        p.is_file(),
        "{} is missing: run `make setup` first",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real mosquitto broker on a free port, stopped on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Mosquitto {
        Self::start_with(port, tempfile::tempdir().unwrap(), "")
    }

    /// A broker with `extra` config lines after its plain listener on `port`; `dir` holds its
    /// files (config, persistence) and lives as long as the broker.
    pub fn start_with(port: u16, dir: tempfile::TempDir, extra: &str) -> Mosquitto {
        let conf = dir.path().join("mosquitto.conf");
        let persistence = if extra.contains("persistence ") {
            ""
        } else {
            "persistence false\n"
        };
        std::fs::write(
            &conf,
            format!("user root\nper_listener_settings true\nlistener {port} 127.0.0.1\nallow_anonymous true\n{persistence}{extra}\n"),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (make setup)");
        wait_for(Duration::from_secs(10), "mosquitto to listen", || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Mosquitto {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Mosquitto {
    /// Stops the broker cleanly (SIGTERM: a persistent one saves its state) and returns its
    /// directory, to start it again.
    pub fn stop(mut self) -> tempfile::TempDir {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let child = &mut self.child;
        wait_for(Duration::from_secs(10), "mosquitto to stop", || {
            child.try_wait().unwrap()
        });
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self._dir, dir)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// When the subscriber got it.
    pub received: std::time::Instant,
}

impl Message {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "payload on {} is not JSON ({e}): {}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
    /// The payload as JSON, or null when it is not JSON (e.g. `online`).
    pub fn json_opt(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// An MQTT subscriber (rumqttc) collecting every message it receives.
pub struct Subscriber {
    pub messages: Receiver<Message>,
    client: Client,
}

impl Subscriber {
    /// Connects and subscribes; returns once the broker acknowledged every subscription.
    pub fn start(port: u16, filter: &str) -> Subscriber {
        Self::start_with(port, &[filter], |_| {})
    }

    /// Like `start`, with several filters and options of one's own (credentials, session).
    pub fn start_with(
        port: u16,
        filters: &[&str],
        setup: impl FnOnce(&mut MqttOptions),
    ) -> Subscriber {
        let mut opts = MqttOptions::new(format!("test-{}", free_port()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        setup(&mut opts);
        let (client, mut connection) = Client::new(opts, 100);
        for f in filters {
            client.subscribe(*f, QoS::AtLeastOnce).unwrap();
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        // One SUBACK per filter: a marker's subscription must be in force before a sync.
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(filters.len());
        let (resubscribe, wanted) = (
            client.clone(),
            filters.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
        );
        std::thread::spawn(move || {
            let mut connections = 0;
            for event in connection.iter() {
                match event {
                    // A clean session forgets the subscriptions: after a reconnection (a missed
                    // ping on a loaded machine) they are made again, or a sync would wait for
                    // a marker nobody forwards.
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connections += 1;
                        if connections > 1 {
                            for f in &wanted {
                                let _ = resubscribe.try_subscribe(f.as_str(), QoS::AtLeastOnce);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ack_tx.try_send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let m = Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            received: std::time::Instant::now(),
                        };
                        if tx.send(m).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        for _ in filters {
            ack_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the broker acknowledges each subscription");
        }
        Subscriber {
            messages: rx,
            client,
        }
    }

    /// Publishes a message (e.g. a command to vigil).
    pub fn publish(&self, topic: &str, payload: &str, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.as_bytes().to_vec())
            .unwrap();
    }

    /// Collects messages until `done` holds for what was collected, or the deadline passes.
    pub fn collect_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Message]) -> bool,
    ) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            if done(&got) {
                return got;
            }
            match self.messages.recv_deadline(deadline) {
                Ok(m) => got.push(m),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return got,
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

pub fn vigil() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vigil"));
    c.env("ORT_DYLIB_PATH", ort_library())
        .env("RUST_LOG", "info")
        .current_dir(repo());
    c
}

/// A running `vigil`, its stderr (the log) collected line by line.
pub struct Running {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vigil starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Running { child, log }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The address vigil's HTTP server listens on, from its log.
    pub fn http_addr(&self, timeout: Duration) -> std::net::SocketAddr {
        const NEEDLE: &str = "HTTP server listening on ";
        wait_for(timeout, "vigil's HTTP server address in its log", || {
            let log = self.log_text();
            let at = log.find(NEEDLE)? + NEEDLE.len();
            log[at..]
                .split(|c: char| c.is_whitespace())
                .next()?
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        })
    }

    pub fn wait_log(&self, timeout: Duration, needle: &str) {
        wait_for(timeout, &format!("log line containing {needle:?}"), || {
            self.log_text().contains(needle).then_some(())
        });
    }

    /// Sends SIGINT (Ctrl-C) and waits for the exit, with a deadline.
    pub fn interrupt(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        self.wait(timeout)
    }

    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = &mut self.child;
        let status = wait_for(timeout, "vigil to exit", || child.try_wait().unwrap());
        // Let the log reader catch up with the last lines.
        std::thread::sleep(Duration::from_millis(50));
        status
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vigil run` on `body` written as a config file into `dir`.
pub fn run_vigil(dir: &Path, body: &str) -> Running {
    let config = write_config(dir, body);
    let mut c = vigil();
    c.args(["run", "--config"]).arg(&config);
    Running::spawn(c)
}

/// Runs vigil on finite file cameras against its own broker until it exits by itself; returns
/// every message published under `vigil/#` (through vigil's final `offline`) and vigil's log.
/// `body` gets the broker's port.
pub fn run_to_end(dir: &Path, body: impl FnOnce(u16) -> String) -> (Vec<Message>, String) {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/#");
    let mut vigil = run_vigil(dir, &body(broker.port));
    let status = vigil.wait(Duration::from_secs(120));
    assert!(status.success(), "{}", vigil.log_text());
    let messages = sub.collect_until(Duration::from_secs(10), |got| {
        got.iter()
            .any(|m| m.topic == "vigil/status" && m.text() == "offline")
    });
    (messages, vigil.log_text())
}

/// Writes `body` as a config file into `dir`, with `{repo}` standing for the repository and
/// `{fixtures}` for its fixtures.
pub fn write_config(dir: &Path, body: &str) -> PathBuf {
    let repo = repo();
    let text = body
        .replace("{repo}", &repo.display().to_string())
        .replace("{fixtures}", &repo.join("fixtures").display().to_string());
    // Tests run side by side: each vigil's HTTP server takes a free port (see `http_addr`).
    let text = if text.contains("[http]") {
        text
    } else {
        format!("{text}\n[http]\nlisten = \"127.0.0.1:0\"\n")
    };
    let path = dir.join("vigil.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The `[model]` section pointing at the repository's models.
pub const MODEL: &str = "[model]\ndir = \"{repo}/models\"\n";

/// Runs a gst-launch description to its end (EOS), with a deadline.
pub fn gst_run(description: &str) {
    use gstreamer as gst;
    use gstreamer::prelude::*;
    gst::init().unwrap();
    let pipeline = gst::parse::launch(description).unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(120),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("the pipeline finishes");
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(
        matches!(msg.view(), gst::MessageView::Eos(_)),
        "{description}: {msg:?}"
    );
}

/// The event messages (`vigil/events`) among `messages`, as JSON.
pub fn events(messages: &[Message]) -> Vec<serde_json::Value> {
    messages
        .iter()
        .filter(|m| m.topic == "vigil/events")
        .map(|m| m.json())
        .collect()
}

/// A command's stdout as one JSON value per line, once it is known to have succeeded.
pub fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
        .collect()
}

/// The retained messages under `filter` now (a marker topic tells when the broker has sent them
/// all).
pub fn retained(port: u16, filter: &str) -> Vec<Message> {
    let marker = format!("test/marker/{}", free_port());
    let sub = Subscriber::start_with(port, &[filter, &marker], |o| {
        o.set_max_packet_size(8 << 20, 8 << 20);
    });
    sub.sync(&marker, Duration::from_secs(30))
        .into_iter()
        .filter(|m| m.retain)
        .collect()
}

/// Makes a 25 fps H.264 clip of fixture photos, each shown for its number of frames, in order.
pub fn make_clip(dir: &Path, segments: &[(&str, usize)]) -> PathBuf {
    let frames = make_frames(dir, segments);
    let clip = dir.join("clip.mp4");
    encode_clip(&frames, 25, &clip);
    clip
}

/// The frames of such a clip as JPEGs `frames/00000.jpg`, `00001.jpg`... under `dir`.
pub fn make_frames(dir: &Path, segments: &[(&str, usize)]) -> PathBuf {
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let mut n = 0;
    for (image, count) in segments {
        let scaled = dir.join(format!("{image}.jpg"));
        if !scaled.exists() {
            gst_run(&format!(
                "filesrc location=\"{}\" ! decodebin ! videoconvert ! videoscale \
                 ! video/x-raw,width=640,height=480,pixel-aspect-ratio=1/1 ! jpegenc quality=95 \
                 ! filesink location=\"{}\"",
                fixture(image).display(),
                scaled.display()
            ));
        }
        for _ in 0..*count {
            std::os::unix::fs::symlink(&scaled, frames.join(format!("{n:05}.jpg"))).unwrap();
            n += 1;
        }
    }
    frames
}

/// Encodes the JPEGs `frames/00000.jpg`, `00001.jpg`... as an H.264 MP4 at `fps`, a key frame
/// every second.
pub fn encode_clip(frames: &Path, fps: u32, clip: &Path) {
    gst_run(&format!(
        "multifilesrc location=\"{}/%05d.jpg\" index=0 caps=image/jpeg,framerate={fps}/1 ! jpegdec \
         ! videoconvert ! x264enc speed-preset=ultrafast key-int-max={fps} ! mp4mux ! filesink location=\"{}\"",
        frames.display(),
        clip.display()
    ));
}

/// A TCP forwarder on `listen` to `to` on 127.0.0.1: a broker that "comes back" for a client
/// while the test's own subscriber stays connected to the real one all along.
pub struct Forward {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Forward {
    pub fn start(listen: u16, to: u16) -> Forward {
        let listener = TcpListener::bind(("127.0.0.1", listen)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let upstream = TcpStream::connect(("127.0.0.1", to)).unwrap();
                        for (mut from, mut into) in [
                            (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                            (upstream, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut into);
                                let _ = into.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Forward { stop }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Subscriber {
    /// Publishes raw bytes at QoS 1 (e.g. an oversized command).
    pub fn publish_bytes(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .unwrap();
    }

    /// Returns once the broker has everything this client published before: a marker published
    /// after it comes back (the client must be subscribed to `marker`). Returns what arrived
    /// meanwhile, the marker left out.
    pub fn sync(&self, marker: &str, timeout: Duration) -> Vec<Message> {
        let token = format!("sync-{}", free_port());
        self.publish(marker, &token, false);
        let mut got = self.collect_until(timeout, |got| {
            got.last()
                .is_some_and(|m| m.topic == marker && m.text() == token)
        });
        assert!(
            got.pop().is_some_and(|m| m.text() == token),
            "the broker echoed {marker} within {timeout:?}"
        );
        got
    }
}

/// One value of a Prometheus text exposition: `name` or `name{labels}` as written (labels in
/// their exposition order), None when absent.
pub fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// vigil's `/metrics`, read over HTTP.
pub fn metrics(addr: std::net::SocketAddr) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    agent
        .get(format!("http://{addr}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// A TCP forwarder on `listen` to `to` on 127.0.0.1 that the test controls: it can hold back
/// what the broker sends to the client (its acknowledgements: the client's messages pile up in
/// flight) and cut every connection (the client reconnects), while the broker stays up.
pub struct Gate {
    hold: Arc<std::sync::atomic::AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    pub fn start(listen: u16, to: u16) -> Gate {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        let listener = TcpListener::bind(("127.0.0.1", listen)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let gate = Gate {
            hold: Arc::new(AtomicBool::new(false)),
            streams: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (hold, streams, stop) = (gate.hold.clone(), gate.streams.clone(), gate.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let upstream = TcpStream::connect(("127.0.0.1", to)).unwrap();
                {
                    let mut s = streams.lock().unwrap();
                    s.push(client.try_clone().unwrap());
                    s.push(upstream.try_clone().unwrap());
                }
                let (mut c_in, mut u_out) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut u_out);
                    let _ = u_out.shutdown(std::net::Shutdown::Both);
                });
                let hold = hold.clone();
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let (mut from, mut into) = (upstream, client);
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        while hold.load(Relaxed) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        if into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = into.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        gate
    }

    /// Holds back (true) or lets through (false) what the broker sends.
    pub fn hold(&self, hold: bool) {
        self.hold.store(hold, std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes every connection made so far.
    pub fn cut(&self) {
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
    }
}

/// A graph on the bundled model (batch limit `cfg.max_batch`) with one camera, "cam", whose full
/// queue does `policy`: its queue, the camera's stop handle (kept while the camera runs) and
/// the indices of the frames analysed, in the order they come out.
pub fn one_camera_graph(
    cfg: &vigil::pipeline::GraphConfig,
    policy: vigil::source::FullPolicy,
) -> (
    vigil::pipeline::Graph,
    Arc<vigil::source::FrameQueue>,
    vigil::shutdown::Shutdown,
    Receiver<u64>,
) {
    let mut config = vigil::config::Config::parse(
        &format!("[model]\ndir = \"{}/models\"\n", repo().display()),
        repo(),
    )
    .unwrap();
    config.inference.library = Some(ort_library());
    let model = vigil::app::load_model(&config).unwrap();
    let slot = Arc::new(vigil::serving::ModelSlot::new(model, cfg.max_batch));
    let (tx, analysed) = crossbeam_channel::unbounded();
    let graph = vigil::pipeline::Graph::start(
        cfg,
        slot,
        config.decide_settings([]),
        move |results, _, recycler| {
            for r in results {
                let _ = tx.send(r.meta.index);
                recycler.recycle(r);
            }
        },
    );
    let (queue, stop) = graph
        .control
        .add_camera(vigil::pipeline::CameraInput {
            name: "cam".into(),
            policy,
            source: "test".into(),
            regions: Arc::new(vigil::source::zones::Regions::whole()),
        })
        .unwrap();
    (graph, queue, stop, analysed)
}
