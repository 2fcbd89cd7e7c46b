//! The HTTP server against hostile clients, on the real `vigil` binary with a real mosquitto:
//! slow request heads and idle keep-alive connections are closed after their timeouts while
//! others are served, and connections beyond the cap are refused.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

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
