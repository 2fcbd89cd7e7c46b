//! The HTTP server against hostile clients, on the real `vigil` binary with a real mosquitto:
//! slow request heads and idle keep-alive connections are closed after their timeouts while
//! others are served, connections beyond the cap are refused, a huge JSON body is refused
//! without memory growth, predicts beyond the cap get 503 while /readyz answers, and a foreign
//! Host or Origin is refused.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use opencv::core::Size;
use opencv::imgproc;
use serde_json::{Value, json};

const PREDICT: &str = "/v1/models/efficientnet-lite0:predict";

/// A live camera that keeps vigil running and ready, analysed slowly.
const LIVE_CAMERA: &str =
    "[cameras.live]\nsource = \"test\"\nwidth = 160\nheight = 120\nfps = 5\nanalyze_fps = 1\n";

/// A broker and vigil with `http` lines in its `[http]` section; vigil's HTTP address.
fn start(dir: &Path, http: &str) -> (Mosquitto, Running, SocketAddr) {
    let broker = Mosquitto::start();
    let vigil = run_vigil(
        dir,
        &format!(
            "{MODEL}[mqtt]\nport = {}\n[snapshots]\ndir = \"{}\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\n{http}\n{LIVE_CAMERA}",
            broker.port,
            dir.join("snapshots").display()
        ),
    );
    let addr = vigil.http_addr(Duration::from_secs(30));
    (broker, vigil, addr)
}

/// One HTTP answer: status, and body as JSON (Null when it is not JSON).
#[derive(Debug)]
struct Answer {
    status: u16,
    json: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or_default()
    }
    fn message(&self) -> &str {
        self.json["error"]["message"].as_str().unwrap_or_default()
    }
}

/// A whole answer (its body as long as its Content-Length says), or None while incomplete.
fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    let body = raw.get(end + 4..end + 4 + length)?;
    let json = serde_json::from_slice(body).unwrap_or(Value::Null);
    Some(Answer { status, json })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn get_status(agent: &ureq::Agent, addr: SocketAddr, path: &str) -> u16 {
    agent
        .get(format!("http://{addr}{path}"))
        .call()
        .unwrap()
        .status()
        .as_u16()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A connection of hyper's client, and the task driving it (it ends when the server closes the
/// connection).
type KeptAlive = (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
);

/// Opens a connection, makes one request on it with hyper's client and keeps it open; the
/// returned task ends when the server closes the connection.
async fn keep_alive(addr: SocketAddr) -> KeptAlive {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get("/healthz")
        .header("host", addr.to_string())
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    (sender, task)
}

/// Opens a connection and sends part of a request head; the task ends (with the time since
/// `t0`) when the server closes the connection.
async fn slow_head(addr: SocketAddr, i: usize, t0: Instant) -> tokio::task::JoinHandle<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Slow-{i}: ");
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return t0.elapsed(),
                Ok(_) => {}
            }
        }
    })
}

#[test]
fn slow_heads_and_idle_connections_are_closed_after_their_timeouts_while_others_are_served() {
    const SLOW: usize = 200;
    const IDLE: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let (_broker, mut vigil, addr) = start(
        dir.path(),
        "header_timeout = \"1s\"\nidle_timeout = \"3s\"\nmax_connections = 400\n",
    );
    let rt = runtime();
    let (slow_closed, idle_open) = rt.block_on(async {
        let t0 = Instant::now();
        let mut slow = Vec::new();
        for i in 0..SLOW {
            slow.push(slow_head(addr, i, t0).await);
        }
        let mut idle = Vec::new();
        for _ in 0..IDLE {
            idle.push(keep_alive(addr).await);
        }
        let idle_since = Instant::now();
        eprintln!(
            "{SLOW} slow heads and {IDLE} idle connections in {:?}",
            t0.elapsed()
        );
        // Meanwhile a normal client is served at once.
        let (mut sender, _task) = keep_alive(addr).await;
        let started = Instant::now();
        let req = hyper::Request::get("/readyz")
            .header("host", addr.to_string())
            .body(Empty::new())
            .unwrap();
        // hyper's client takes a request only once the connection is ready again after the
        // last response; sending before that fails with "connection was not ready".
        sender.ready().await.unwrap();
        let status = sender.send_request(req).await.unwrap().status();
        assert!([200, 503].contains(&status.as_u16()), "{status}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // Every slow head gone after the header timeout, every idle connection after the idle
        // timeout (plus a margin for a loaded machine).
        let deadline = idle_since + Duration::from_secs(3 + 4);
        let open = |slow: &[tokio::task::JoinHandle<Duration>], idle: &[KeptAlive]| {
            let slow_open = slow.iter().filter(|t| !t.is_finished()).count();
            slow_open + idle.iter().filter(|(_, t)| !t.is_finished()).count()
        };
        while open(&slow, &idle) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let idle_open = idle.iter().filter(|(_, t)| !t.is_finished()).count();
        let mut slow_closed = Vec::new();
        for t in slow {
            if t.is_finished() {
                slow_closed.push(t.await.unwrap());
            }
        }
        (slow_closed, idle_open)
    });
    let open = SLOW - slow_closed.len() + idle_open;
    eprintln!(
        "still open: {open} of {}; slow heads closed after {:?} .. {:?}",
        SLOW + IDLE,
        slow_closed.iter().min(),
        slow_closed.iter().max()
    );
    assert!(
        open * 10 <= SLOW + IDLE,
        "{open} of {} connections still open\n{}",
        SLOW + IDLE,
        vigil.log_text()
    );
    // Slow heads went at the header timeout, not before.
    assert!(
        slow_closed.iter().all(|d| *d >= Duration::from_millis(900)),
        "{slow_closed:?}"
    );
    assert!(
        vigil.child.try_wait().unwrap().is_none(),
        "{}",
        vigil.log_text()
    );
    assert_eq!(get_status(&agent(), addr, "/healthz"), 200);
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}

#[test]
fn idle_connections_stay_open_until_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, _vigil, addr) = start(
        dir.path(),
        "header_timeout = \"500ms\"\nidle_timeout = \"3s\"\n",
    );
    let rt = runtime();
    rt.block_on(async {
        let (mut sender, task) = keep_alive(addr).await;
        let idle_since = Instant::now();
        // Past the header timeout (which a waiting keep-alive connection is not under), the
        // connection still serves a second request ...
        while idle_since.elapsed() < Duration::from_millis(1500) {
            assert!(
                !task.is_finished(),
                "closed after {:?}",
                idle_since.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let req = hyper::Request::get("/healthz")
            .header("host", addr.to_string())
            .body(Empty::new())
            .unwrap();
        sender.ready().await.unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        // ... and is closed once idle for the idle timeout after it.
        let idle_since = Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert!(closed.is_ok(), "still open after 10 s");
        let after = idle_since.elapsed();
        assert!(
            after >= Duration::from_millis(2800),
            "closed after {after:?}"
        );
    });
}

#[test]
fn connections_beyond_the_cap_are_refused_and_served_again_once_there_is_room() {
    const CAP: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let (_broker, mut vigil, addr) = start(
        dir.path(),
        &format!("max_connections = {CAP}\nheader_timeout = \"2s\"\n"),
    );
    // CAP connections that hold their slot (a head that never ends).
    let holders: Vec<TcpStream> = (0..CAP)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            write!(s, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Hold-{i}: ").unwrap();
            s
        })
        .collect();
    // One more: refused with a 503, or closed.
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = write!(extra, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut got = Vec::new();
    let _ = extra.read_to_end(&mut got);
    match parse_answer(&got) {
        Some(a) => {
            assert_eq!((a.status, a.code()), (503, "too_many_connections"), "{a:?}");
            assert!(a.message().contains("http.max_connections"), "{a:?}");
        }
        None => assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got)),
    }
    vigil.wait_log(Duration::from_secs(5), "http.max_connections");
    // Once the holders time out, new clients are served.
    let agent = agent();
    wait_for(Duration::from_secs(10), "a slot for a new client", || {
        let r = agent.get(format!("http://{addr}/healthz")).call().ok()?;
        (r.status() == 200).then_some(())
    });
    drop(holders);
    assert!(
        vigil.child.try_wait().unwrap().is_none(),
        "{}",
        vigil.log_text()
    );
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}

/// Sends `head` (request line and headers, without the blank line) and `body` on a socket of
/// its own, with `Connection: close`, and reads the answer. The body is written by a thread of
/// its own: a server may answer (and close) before reading it all, as it does for a request it
/// refuses at once.
fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let length = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    write!(s, "{head}\r\n{length}Connection: close\r\n\r\n").unwrap();
    let mut writer = s.try_clone().unwrap();
    let body = body.to_vec();
    let sending = std::thread::spawn(move || {
        let _ = writer.write_all(&body);
    });
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let answer = loop {
        if let Some(a) = parse_answer(&got) {
            break Some(a);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break parse_answer(&got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    };
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = sending.join();
    answer.unwrap_or_else(|| panic!("no answer to {head:?}: {:?}", String::from_utf8_lossy(&got)))
}

/// POSTs a predict body.
fn post(addr: SocketAddr, content_type: &str, body: &[u8]) -> Answer {
    raw(
        addr,
        &format!("POST {PREDICT} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}"),
        body,
    )
}

/// vigil's peak resident memory so far, MiB.
fn vm_hwm_mib(vigil: &Running) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", vigil.child.id())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

/// A fixture photo as a `side` x `side` JPEG.
fn jpeg(fixture_name: &str, side: i32) -> Vec<u8> {
    let bytes = std::fs::read(fixture(fixture_name)).unwrap();
    let img = vigil::images::decode(&bytes).unwrap();
    let mut out = opencv::core::Mat::default();
    imgproc::resize(
        &img,
        &mut out,
        Size::new(side, side),
        0.0,
        0.0,
        imgproc::INTER_AREA,
    )
    .unwrap();
    vigil::images::encode_jpeg(&out, 95).unwrap()
}

fn instances(image: &[u8], n: usize) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(image);
    json!({"instances": vec![json!({"b64": b64}); n]})
        .to_string()
        .into_bytes()
}

#[test]
fn a_16_mib_json_body_of_one_huge_list_is_refused_at_once_without_memory_growth() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, mut vigil, addr) = start(dir.path(), "predict_timeout = \"30s\"\n");
    let image = jpeg("baboon.jpg", 128);
    // Warm up: the model's first predict.
    let r = post(addr, "application/json", &instances(&image, 1));
    assert_eq!(r.status, 200, "{r:?}");
    let before = vm_hwm_mib(&vigil);
    let zeros = |open: &str, close: &str| {
        let mut body = open.as_bytes().to_vec();
        let room = (16 << 20) - open.len() - close.len() - 1;
        body.extend(std::iter::repeat_n(*b"0,", room / 2).flatten());
        body.push(b'0');
        body.extend(close.as_bytes());
        body
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    for (what, body, status, cause) in [
        (
            "a list of zeros",
            zeros("{\"instances\": [", "]}"),
            400,
            "instance 0",
        ),
        (
            "a list in a list",
            zeros("{\"instances\": [[", "]]}"),
            400,
            "instance 0",
        ),
        ("a top-level list", zeros("[", "]"), 400, "JSON object"),
        (
            "a huge key of ours",
            zeros("{\"inputs\": {\"a\": [", "]}}"),
            400,
            "instance 0",
        ),
        (
            "a huge key not ours",
            zeros(
                "{\"signature_name\": [",
                &format!("], \"instances\": [{{\"b64\": \"{b64}\"}}]}}"),
            ),
            200,
            "",
        ),
    ] {
        let started = Instant::now();
        let r = post(addr, "application/json", &body);
        let took = started.elapsed();
        let peak = vm_hwm_mib(&vigil);
        eprintln!(
            "{what}: {} in {took:?}, VmHWM {before} -> {peak} MiB: {}",
            r.status,
            r.message()
        );
        assert_eq!(r.status, status, "{what}: {r:?}");
        assert!(
            peak < before + 100 && peak < 400,
            "{what}: VmHWM grew from {before} to {peak} MiB"
        );
        assert!(took < Duration::from_secs(5), "{what}: {took:?}");
        assert!(r.message().contains(cause), "{what}: {r:?}");
    }
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}

#[test]
fn predicts_beyond_the_cap_get_503_and_readyz_answers_during_a_flood() {
    const CLIENTS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let (_broker, mut vigil, addr) = start(
        dir.path(),
        "max_concurrent_predicts = 2\npredict_rate = 100000\npredict_burst = 100000\n\
         predict_timeout = \"60s\"\n",
    );
    let agent = agent();
    wait_for(Duration::from_secs(30), "/readyz 200", || {
        (get_status(&agent, addr, "/readyz") == 200).then_some(())
    });
    // Each request: 64 images, a second or more of work.
    let body = Arc::new(instances(&jpeg("baboon.jpg", 256), 64));
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let answers: Vec<(Answer, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (body, barrier) = (body.clone(), barrier.clone());
                scope.spawn(move || {
                    barrier.wait();
                    let started = Instant::now();
                    (post(addr, "application/json", &body), started.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<_> = answers.iter().filter(|(a, _)| a.status == 200).collect();
    let busy: Vec<_> = answers.iter().filter(|(a, _)| a.status == 503).collect();
    eprintln!(
        "{} ok (in {:?}), {} busy (in {:?})",
        ok.len(),
        ok.iter().map(|(_, d)| d).collect::<Vec<_>>(),
        busy.len(),
        busy.iter().map(|(_, d)| d).max()
    );
    assert_eq!(ok.len() + busy.len(), CLIENTS, "{answers:?}");
    assert_eq!(ok.len(), 2, "the cap admits 2 at once: {answers:?}");
    for (a, took) in &busy {
        assert_eq!(a.code(), "busy", "{a:?}");
        assert!(
            a.message().contains("http.max_concurrent_predicts"),
            "{a:?}"
        );
        assert!(
            *took < Duration::from_secs(2),
            "a 503 must be quick: {took:?}"
        );
    }
    for (a, _) in &ok {
        assert_eq!(a.json["predictions"].as_array().map(Vec::len), Some(64));
    }

    // A flood for a few seconds; /readyz answers promptly all along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        for _ in 0..CLIENTS {
            let (body, stop, sent) = (body.clone(), stop.clone(), sent.clone());
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = post(addr, "application/json", &body);
                    assert!([200, 503].contains(&r.status), "{r:?}");
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let flood_end = Instant::now() + Duration::from_secs(6);
        while Instant::now() < flood_end {
            let started = Instant::now();
            let status = get_status(&agent, addr, "/readyz");
            latencies.lock().unwrap().push((status, started.elapsed()));
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let latencies = latencies.lock().unwrap().clone();
    let worst = latencies.iter().map(|(_, d)| *d).max().unwrap();
    eprintln!(
        "{} predicts sent; /readyz {} times, worst {worst:?}",
        sent.load(Ordering::Relaxed),
        latencies.len()
    );
    assert!(latencies.iter().all(|(s, _)| *s == 200), "{latencies:?}");
    assert!(worst < Duration::from_secs(1), "{latencies:?}");
    assert!(vigil.interrupt(Duration::from_secs(30)).success());
}

#[test]
fn a_foreign_host_or_origin_is_refused_and_local_names_work() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, mut vigil, addr) = start(dir.path(), "");
    let port = addr.port();
    let get =
        |path: &str, host: &str| raw(addr, &format!("GET {path} HTTP/1.1\r\nHost: {host}"), b"");
    // A page that rebinds its own name to vigil's address sends that name: refused.
    for path in [
        "/api/cameras",
        "/api/events",
        "/api/events/x/snapshot.jpg",
        "/metrics",
    ] {
        let a = get(path, &format!("evil.example:{port}"));
        assert_eq!(
            (a.status, a.code()),
            (421, "host_not_allowed"),
            "{path}: {a:?}"
        );
        assert!(a.message().contains("http.allowed_hosts"), "{a:?}");
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "localhost".into(),
    ] {
        assert_eq!(get("/api/cameras", &host).status, 200, "{host}");
    }
    // Health checks answer whatever the name (probes use the pod's address).
    assert_eq!(get("/healthz", "evil.example").status, 200);
    // A page elsewhere that posts to vigil: refused by its Origin.
    let reload = |origin: &str| {
        raw(
            addr,
            &format!("POST /api/reload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {origin}"),
            b"",
        )
    };
    for origin in [
        "http://evil.example",
        &format!("http://evil.example:{port}"),
        "null",
    ] {
        let a = reload(origin);
        assert_eq!(
            (a.status, a.code()),
            (403, "origin_not_allowed"),
            "{origin}: {a:?}"
        );
        assert!(a.message().contains(origin), "{a:?}");
    }
    let metrics = {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    };
    for counter in [
        "vigil_config_reloads_total",
        "vigil_config_reloads_failed_total",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("{counter} ")));
        assert_eq!(
            line,
            Some(format!("{counter} 0").as_str()),
            "a refused reload ran"
        );
    }
    // The same from vigil's own page is fine.
    let a = reload(&format!("http://localhost:{port}"));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json["applied"], true, "{a:?}");
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
}
