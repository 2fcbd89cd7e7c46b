//! Connections: the accept loop and its cap (`http.max_connections`), the TLS handshake,
//! hyper's HTTP/1.1 on each connection, its timeouts, and graceful shutdown.
//!
//! Each connection is watched by a small state machine ([`Activity`]) fed by its socket's reads
//! and writes and by its requests: waiting for a request's head (at most
//! `http.header_timeout`, counted from the connection's start, TLS handshake included, or from
//! the first byte of its next request), serving a request (no limit here: the handlers have
//! theirs), or idle between requests (at most `http.idle_timeout` after its last response was
//! written). A connection past its time is dropped, which closes its socket. hyper's own
//! header-read timer is set too, as a backstop at the sum of both.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::sync::lock;

/// After a failed accept (out of file descriptors), wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning about refused connections in this long.
const REFUSALS_WARNED_EVERY: Duration = Duration::from_secs(10);

/// The limits of every connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// What the accept loop and every connection need.
pub(super) struct Served {
    pub app: Router,
    pub tls: Option<TlsAcceptor>,
    pub limits: Limits,
    /// Turns true when the server stops.
    pub stop: watch::Receiver<bool>,
}

/// Accepts connections until `stop` turns true; then closes the port and waits for the open
/// connections to finish the requests they are serving (the caller gives up at its deadline).
pub(super) async fn serve(listener: TcpListener, served: Served) {
    let served = Arc::new(served);
    let max = served.limits.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let mut stop = served.stop.clone();
    let mut refusals = Refusals::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            accepted = listener.accept() => accepted,
        };
        fail::fail_point!("http-accept");
        match accepted {
            Ok((stream, peer)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    tokio::spawn(connection(stream, peer, served.clone(), slot));
                }
                Err(_) => refusals.refuse(stream, served.tls.is_some(), max),
            },
            Err(e) => {
                tracing::warn!(error = %e, "HTTP server: cannot accept a connection; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    drop(listener);
    // Every connection holds a slot until it ends.
    let _ = slots.acquire_many(max as u32).await;
}

/// Connections refused for the cap since the last warning.
#[derive(Default)]
struct Refusals {
    count: u64,
    warned: Option<Instant>,
}

impl Refusals {
    /// Closes a connection over the cap, with a 503 when it is plain HTTP (best effort: a fresh
    /// socket's send buffer has room, nothing waits).
    fn refuse(&mut self, stream: TcpStream, tls: bool, max: usize) {
        if !tls {
            let _ = stream.try_write(refused_response().as_bytes());
        }
        drop(stream);
        self.count += 1;
        if self
            .warned
            .is_none_or(|t| t.elapsed() >= REFUSALS_WARNED_EVERY)
        {
            tracing::warn!(
                refused = self.count,
                max_connections = max,
                "HTTP server: connections refused: {max} already open (http.max_connections)"
            );
            self.warned = Some(Instant::now());
            self.count = 0;
        }
    }
}

fn refused_response() -> String {
    let body = r#"{"error":{"code":"too_many_connections","message":"the server has as many connections open as it takes (http.max_connections); try again later"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One connection, from its TLS handshake (if any) to its end; it holds `_slot` all along.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    served: Arc<Served>,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new(Instant::now()));
    let io = Watched {
        inner: stream,
        activity: activity.clone(),
    };
    let Some(tls) = &served.tls else {
        return drive(io, peer, &served, activity).await;
    };
    let mut stop = served.stop.clone();
    let handshake = tokio::time::timeout(served.limits.header_timeout, tls.accept(io));
    let io = tokio::select! {
        _ = stop.wait_for(|stopped| *stopped) => return,
        done = handshake => match done {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "HTTP server: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "HTTP server: no TLS handshake within http.header_timeout");
                return;
            }
        },
    };
    drive(io, peer, &served, activity).await;
}

/// Serves HTTP/1.1 on `io` until the client or a timeout ends it, or the server stops (then the
/// request being served is finished, and an idle connection closed at once).
async fn drive<I>(io: I, peer: SocketAddr, served: &Served, activity: Arc<Activity>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = served.limits;
    let service = Service {
        app: served.app.clone(),
        peer,
        activity: activity.clone(),
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout + limits.idle_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut stop = served.stop.clone();
    let mut stopping = false;
    loop {
        let deadline = activity.deadline(&limits, Instant::now());
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = stop.wait_for(|stopped| *stopped), if !stopping => {
                if !activity.serving() {
                    return;
                }
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                if let Some(why) = activity.expired(&limits, Instant::now()) {
                    tracing::debug!(%peer, why, "HTTP connection closed");
                    return;
                }
            }
        }
    }
}

/// The router as hyper calls it on one connection: it knows its peer (`ConnectInfo`) and tells
/// the connection's [`Activity`] while a request is being served.
#[derive(Clone)]
struct Service {
    app: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Service {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        let serving = Serving::start(self.activity.clone());
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let mut app = self.app.clone();
        Box::pin(async move {
            let response = tower_service::Service::call(&mut app, req).await;
            drop(serving);
            response
        })
    }
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request's head since then.
    Head(Instant),
    /// Serving this many requests.
    Serving(usize),
    /// Idle since its last response.
    Idle(Instant),
}

/// A connection's phase and its last write, fed by its socket ([`Watched`]) and its requests
/// ([`Serving`]).
#[derive(Debug)]
struct Activity {
    state: Mutex<(Phase, Option<Instant>)>,
}

impl Activity {
    fn new(now: Instant) -> Activity {
        Activity {
            state: Mutex::new((Phase::Head(now), None)),
        }
    }

    /// Bytes came in: an idle connection starts a request.
    fn read(&self, now: Instant) {
        let mut state = lock(&self.state);
        if let Phase::Idle(_) = state.0 {
            state.0 = Phase::Head(now);
        }
    }

    fn wrote(&self, now: Instant) {
        lock(&self.state).1 = Some(now);
    }

    fn request_started(&self) {
        let mut state = lock(&self.state);
        state.0 = match state.0 {
            Phase::Serving(n) => Phase::Serving(n + 1),
            Phase::Head(_) | Phase::Idle(_) => Phase::Serving(1),
        };
    }

    fn request_done(&self, now: Instant) {
        let mut state = lock(&self.state);
        state.0 = match state.0 {
            Phase::Serving(n) if n > 1 => Phase::Serving(n - 1),
            _ => Phase::Idle(now),
        };
    }

    fn serving(&self) -> bool {
        matches!(lock(&self.state).0, Phase::Serving(_))
    }

    /// When to look again: the phase's deadline, or a while later when serving.
    fn deadline(&self, limits: &Limits, now: Instant) -> Instant {
        let (phase, last_write) = *lock(&self.state);
        match phase {
            Phase::Head(since) => since + limits.header_timeout,
            Phase::Idle(since) => since.max(last_write.unwrap_or(since)) + limits.idle_timeout,
            Phase::Serving(_) => now + limits.header_timeout.min(limits.idle_timeout),
        }
    }

    /// Why the connection is to be closed now, if it is.
    fn expired(&self, limits: &Limits, now: Instant) -> Option<&'static str> {
        let phase = lock(&self.state).0;
        match phase {
            Phase::Serving(_) => None,
            _ if now < self.deadline(limits, now) => None,
            Phase::Head(_) => Some("no complete request head within http.header_timeout"),
            Phase::Idle(_) => Some("idle for http.idle_timeout"),
        }
    }
}

/// Marks a request as being served until it is dropped (also when hyper drops the request's
/// future because the client went away).
struct Serving(Arc<Activity>);

impl Serving {
    fn start(activity: Arc<Activity>) -> Serving {
        activity.request_started();
        Serving(activity)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.request_done(Instant::now());
    }
}

/// A socket that tells its connection's [`Activity`] when bytes go in or out.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read(Instant::now());
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote(Instant::now());
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote(Instant::now());
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 1,
    };

    #[test]
    fn a_connection_has_header_timeout_for_its_head_and_idle_timeout_between_requests() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let a = Activity::new(t0);
        // A new connection: its head is due within the header timeout, bytes or not.
        a.read(s(1));
        assert_eq!(a.deadline(&LIMITS, s(1)), s(10));
        assert_eq!(a.expired(&LIMITS, s(9)), None);
        assert!(
            a.expired(&LIMITS, s(10))
                .unwrap()
                .contains("header_timeout")
        );
        // Serving: never expired.
        a.request_started();
        assert!(a.serving());
        assert_eq!(a.expired(&LIMITS, s(500)), None);
        assert_eq!(a.deadline(&LIMITS, s(500)), s(510));
        // Idle after the response, counted from its last byte out.
        a.request_done(s(20));
        a.wrote(s(22));
        assert!(!a.serving());
        assert_eq!(a.deadline(&LIMITS, s(23)), s(82));
        assert_eq!(a.expired(&LIMITS, s(81)), None);
        assert!(a.expired(&LIMITS, s(82)).unwrap().contains("idle_timeout"));
        // The next request's first byte: its head is due within the header timeout.
        a.read(s(30));
        assert_eq!(a.deadline(&LIMITS, s(30)), s(40));
        a.read(s(35));
        assert_eq!(a.deadline(&LIMITS, s(35)), s(40), "more bytes buy no time");
        // Two requests at once (a pipelined one): idle only when both are done.
        a.request_started();
        a.request_started();
        a.request_done(s(41));
        assert!(a.serving());
        a.request_done(s(42));
        assert_eq!(a.deadline(&LIMITS, s(42)), s(102));
    }

    #[test]
    fn the_refusal_is_a_whole_http_response() {
        let text = refused_response();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
        assert!(
            json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("http.max_connections")
        );
    }
}
