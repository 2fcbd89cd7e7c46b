//! The HTTP server: health, readiness, Prometheus metrics, the JSON API, snapshots and a
//! TensorFlow Serving compatible predict endpoint, over HTTP/1.1 or HTTPS (rustls).
//!
//! It runs its own small tokio runtime on its own threads (`vigil-http`), off the frame path.
//! `conn.rs` accepts and serves the connections (their cap and timeouts), `hosts.rs` checks
//! `Host` and `Origin`, `predict.rs` and `instances.rs` read predict requests, `teach.rs` serves
//! the heads, their inboxes and training. The health
//! checks answer on the async threads; every other call into the service ([`Api`]) runs on a
//! blocking thread, with a time limit, predicts at most `http.max_concurrent_predicts` at once.
//! Errors are JSON: `{"error": {"code": "...", "message": "..."}}`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, Request, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

use crate::config::{HttpConfig, HttpTlsConfig};
use crate::ops::api::{Api, ApiError, EventQuery};
use crate::shutdown::{Exit, Exits};

mod conn;
mod console;
mod hosts;
pub mod instances;
mod predict;
mod teach;

pub use instances::MAX_INSTANCES;
pub use predict::MAX_IMAGE_SIDE;

/// Time limit of the calls into the service other than predict (a reload loads a model).
const API_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit for receiving a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
const WORKER_THREADS: usize = 2;
const MAX_BLOCKING_THREADS: usize = 64;

/// Called with each predict request's outcome: "ok", "bad_request", "too_large",
/// "rate_limited", "busy", "not_found", "timeout" or "error".
pub type OnPredict = Arc<dyn Fn(&str) + Send + Sync>;

/// What the server needs to start.
#[derive(Clone)]
pub struct HttpSetup {
    /// `[http]`, with its paths already resolved.
    pub config: HttpConfig,
    /// The bearer token (resolved); `None`: no authentication.
    pub token: Option<String>,
    pub on_predict: Option<OnPredict>,
    /// Where the server reports an end before its stop (a panic of its accept loop).
    pub exits: Option<Exits>,
}

impl std::fmt::Debug for HttpSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSetup")
            .field("listen", &self.config.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("on_predict", &self.on_predict.is_some())
            .finish_non_exhaustive()
    }
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP server: cannot listen on {address}: {message}")]
    Bind { address: String, message: String },
    #[error("HTTP server TLS: {}: {message}", .file.display())]
    Tls { file: PathBuf, message: String },
    #[error("HTTP server: cannot start its runtime: {0}")]
    Runtime(String),
    /// A setting the server refuses (e.g. a network address without a token).
    #[error("HTTP server: {key}: {message}")]
    Config { key: &'static str, message: String },
}

/// The running server. Dropping it stops it at once; [`HttpServer::stop`] lets requests finish.
pub struct HttpServer {
    addr: SocketAddr,
    /// Set to true to stop.
    stop: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Binds `config.listen` (now: a taken port fails here) and serves `api` on a runtime of its
    /// own.
    pub fn start(setup: HttpSetup, api: Arc<dyn Api>) -> Result<HttpServer, HttpError> {
        let HttpSetup {
            config,
            token,
            on_predict,
            exits,
        } = setup;
        if let Some(message) = config.unauthenticated_network_listen(token.is_some()) {
            return Err(HttpError::Config {
                key: "http.listen",
                message,
            });
        }
        let tls = config.tls.as_ref().map(tls_server_config).transpose()?;
        let bind_error = |e: std::io::Error| HttpError::Bind {
            address: config.listen.clone(),
            message: e.to_string(),
        };
        let listener = std::net::TcpListener::bind(config.listen.as_str()).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let hosts =
            hosts::AllowedHosts::new(&config, addr).map_err(|message| HttpError::Config {
                key: "http.allowed_hosts",
                message,
            })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .thread_name("vigil-http")
            .enable_all()
            .build()
            .map_err(|e| HttpError::Runtime(e.to_string()))?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(bind_error)?
        };
        let auth = token.is_some();
        if !auth && !addr.ip().is_loopback() {
            tracing::warn!(address = %addr, "HTTP server: serving the network without a token (http.allow_unauthenticated)");
        }
        let shared = Arc::new(Shared::new(api, config, token, on_predict, hosts));
        let (stop, stopped) = watch::channel(false);
        let served = conn::Served {
            app: router(shared.clone()),
            tls: tls.clone().map(tokio_rustls::TlsAcceptor::from),
            limits: conn::Limits {
                header_timeout: shared.config.header_timeout,
                idle_timeout: shared.config.idle_timeout,
                max_connections: shared.config.max_connections,
            },
            stop: stopped,
        };
        let (done_tx, done) = mpsc::channel();
        let stopping = served.stop.clone();
        runtime.spawn(async move {
            let outcome = tokio::spawn(conn::serve(listener, served)).await;
            report_end(exits.as_ref(), outcome, *stopping.borrow());
            let _ = done_tx.send(());
        });
        forget_quiet_clients(&runtime, &shared);
        drop(shared);
        let is_tls = tls.is_some();
        tracing::info!(address = %addr, tls = is_tls, auth, "HTTP server listening on {addr}");
        Ok(HttpServer {
            addr,
            stop,
            done,
            runtime: Some(runtime),
        })
    }

    /// The address listened on (the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes the idle connections, lets the requests in progress finish
    /// until `deadline`, then closes what is left. Call it outside any tokio runtime.
    pub fn stop(mut self, deadline: Duration) {
        let _ = self.stop.send(true);
        let clean = self.done.recv_timeout(deadline).is_ok();
        if let Some(runtime) = self.runtime.take() {
            // Calls into the service still running (a stuck predict) are abandoned.
            runtime.shutdown_timeout(Duration::from_millis(100));
        }
        tracing::info!(address = %self.addr, clean, "HTTP server stopped");
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            let _ = self.stop.send(true);
            runtime.shutdown_background();
        }
    }
}

/// Forgets, every minute, the clients that have not asked for a while (the rate limiter's
/// memory), until the server's state is gone.
fn forget_quiet_clients(runtime: &tokio::runtime::Runtime, shared: &AppState) {
    let owner = Arc::downgrade(shared);
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            match owner.upgrade() {
                Some(shared) => shared.limiter.retain_recent(),
                None => break,
            }
        }
    });
}

/// Reports the accept loop's end unless it was asked to stop: a server gone is a failure, not a
/// quiet degradation.
fn report_end(exits: Option<&Exits>, outcome: Result<(), tokio::task::JoinError>, stopping: bool) {
    let why = match outcome {
        Err(e) if e.is_panic() => crate::shutdown::panic_message(e.into_panic().as_ref()),
        _ if stopping => return,
        Err(e) => format!("the accept loop was cancelled: {e}"),
        Ok(()) => "the accept loop ended".into(),
    };
    tracing::error!(error = %why, "HTTP server failed");
    if let Some(exits) = exits {
        exits.report(Exit {
            name: "http".into(),
            panic: Some(why),
        });
    }
}

/// What every handler shares.
struct Shared {
    api: Arc<dyn Api>,
    config: HttpConfig,
    token: Option<String>,
    on_predict: Option<OnPredict>,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// One permit per predict in progress (`http.max_concurrent_predicts`).
    predicts: Arc<Semaphore>,
    hosts: hosts::AllowedHosts,
    /// The console's signed-in browsers.
    sessions: console::Sessions,
    /// One permit per open live feed (`/api/stream`).
    streams: Arc<Semaphore>,
}

type AppState = Arc<Shared>;

impl Shared {
    fn new(
        api: Arc<dyn Api>,
        config: HttpConfig,
        token: Option<String>,
        on_predict: Option<OnPredict>,
        hosts: hosts::AllowedHosts,
    ) -> Shared {
        let quota =
            Quota::per_second(NonZeroU32::new(config.predict_rate).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(config.predict_burst).unwrap_or(NonZeroU32::MIN));
        Shared {
            api,
            predicts: Arc::new(Semaphore::new(config.max_concurrent_predicts.max(1))),
            config,
            token,
            on_predict,
            limiter: RateLimiter::keyed(quota),
            hosts,
            sessions: console::Sessions::default(),
            streams: Arc::new(Semaphore::new(console::MAX_STREAMS)),
        }
    }

    fn count(&self, outcome: &str) {
        if let Some(f) = &self.on_predict {
            f(outcome);
        }
    }
}

fn router(shared: AppState) -> Router {
    let max_body = shared.config.max_body_bytes;
    let (pages, console_api, console_open) = console::routes();
    let pages = pages
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            console::require_session,
        ))
        .route_layer(middleware::from_fn_with_state(shared.clone(), check_host));
    let console_open =
        console_open.route_layer(middleware::from_fn_with_state(shared.clone(), check_host));
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/cameras", get(cameras))
        .route("/api/cameras/{id}", get(camera))
        .route("/api/cameras/{id}/latest.jpg", get(latest_jpeg))
        .route("/api/events", get(events))
        .route("/api/events/{id}/snapshot.jpg", get(event_snapshot))
        .route("/api/reload", post(reload))
        .merge(teach::routes())
        .merge(console_api)
        .route(
            "/v1/models/{name}",
            get(model_status).post(predict::model_predict),
        )
        .route(
            "/v1/models/{name}/versions/{version}",
            get(version_status).post(predict::version_predict),
        )
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        .route_layer(middleware::from_fn_with_state(shared.clone(), check_host));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(protected)
        .merge(pages)
        .merge(console_open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(log_request))
        .with_state(shared)
}

// ---------------------------------------------------------------------------------------------
// Responses

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({"error": {"code": e.code, "message": e.message}});
    if !e.problems.is_empty() {
        body["error"]["problems"] = json!(e.problems);
    }
    (status, axum::Json(body)).into_response()
}

fn json_response(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

fn jpeg_response(result: Result<Vec<u8>, ApiError>) -> Response {
    match result {
        Ok(jpeg) => (
            [
                (CONTENT_TYPE, HeaderValue::from_static("image/jpeg")),
                (CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            jpeg,
        )
            .into_response(),
        Err(e) => error_response(&e),
    }
}

/// Runs a call into the service on a blocking thread, for at most `limit`.
async fn blocking<T: Send + 'static>(
    limit: Duration,
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::error!(call = what, error = %e, "HTTP request: the service's call failed");
            Err(ApiError::new(500, "internal", format!("{what} failed")))
        }
        Err(_) => Err(ApiError::new(
            504,
            "timeout",
            format!(
                "{what}: no answer within {}",
                humantime::format_duration(limit)
            ),
        )),
    }
}

/// A fallible `Api` call off the async threads, within the usual limit.
async fn call<T: Send + 'static>(
    s: &AppState,
    what: &'static str,
    f: impl FnOnce(&dyn Api) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let api = s.api.clone();
    blocking(API_CALL_TIMEOUT, what, move || f(api.as_ref()))
        .await
        .and_then(|r| r)
}

// ---------------------------------------------------------------------------------------------
// Middleware

async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let start = Instant::now();
    let response = next.run(req).await;
    tracing::debug!(
        %method,
        path,
        status = response.status().as_u16(),
        ms = start.elapsed().as_secs_f64() * 1e3,
        "HTTP request"
    );
    response
}

/// `Host` must be one of the server's names, and a state-changing request's `Origin` too.
async fn check_host(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match s.hosts.check(&req) {
        Ok(()) => next.run(req).await,
        Err(e) => error_response(&e),
    }
}

/// `Authorization: Bearer <token>` (or the console's session cookie) on every route it wraps,
/// when a token is configured.
async fn require_token(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(token) = &s.token else {
        return next.run(req).await;
    };
    if req.headers().get(AUTHORIZATION).is_none() && console::signed_in(&s, req.headers()) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let (message, challenge) = match given {
        Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => {
            return next.run(req).await;
        }
        Some(_) => (
            "invalid bearer token",
            r#"Bearer realm="vigil", error="invalid_token""#,
        ),
        None => (
            "this endpoint needs the header Authorization: Bearer <token>",
            r#"Bearer realm="vigil""#,
        ),
    };
    let mut response = error_response(&ApiError::new(401, "unauthorized", message));
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    response
}

/// Compares in a time that depends only on the length of `expected`.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ e;
    }
    std::hint::black_box(diff) == 0
}

/// `axum::extract::Path`, with its rejection as a JSON error.
struct PathParams<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(PathParams(v)),
            Err(e) => Err(error_response(&ApiError::bad_request(e.body_text()))),
        }
    }
}

/// `axum::extract::Query`, with its rejection as a JSON error.
struct QueryParams<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for QueryParams<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(QueryParams(v)),
            Err(e) => Err(error_response(&ApiError::bad_request(e.body_text()))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// On the async threads, never behind the blocking calls (predicts): `Api::ready` only reads.
async fn readyz(State(s): State<AppState>) -> Response {
    match s.api.ready() {
        Ok(v) => axum::Json(v).into_response(),
        Err(reason) => error_response(&ApiError::new(503, "not_ready", reason)),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let api = s.api.clone();
    match blocking(API_CALL_TIMEOUT, "metrics", move || api.metrics()).await {
        Ok(text) => (
            [(
                CONTENT_TYPE,
                HeaderValue::from_static(crate::ops::prometheus::CONTENT_TYPE),
            )],
            text,
        )
            .into_response(),
        Err(e) => error_response(&e),
    }
}

async fn cameras(State(s): State<AppState>) -> Response {
    let api = s.api.clone();
    json_response(blocking(API_CALL_TIMEOUT, "cameras", move || api.cameras()).await)
}

async fn camera(State(s): State<AppState>, PathParams(id): PathParams<String>) -> Response {
    json_response(call(&s, "camera", move |api| api.camera(&id)).await)
}

/// `?outline=false`: the frame alone (the zone editor draws its own outlines).
#[derive(serde::Deserialize)]
struct LatestQuery {
    #[serde(default = "yes")]
    outline: bool,
}

fn yes() -> bool {
    true
}

async fn latest_jpeg(
    State(s): State<AppState>,
    PathParams(id): PathParams<String>,
    QueryParams(q): QueryParams<LatestQuery>,
) -> Response {
    let outline = q.outline;
    jpeg_response(call(&s, "latest frame", move |api| api.latest_jpeg(&id, outline)).await)
}

async fn event_snapshot(State(s): State<AppState>, PathParams(id): PathParams<String>) -> Response {
    jpeg_response(call(&s, "snapshot", move |api| api.event_snapshot(&id)).await)
}

async fn events(State(s): State<AppState>, uri: Uri) -> Response {
    let query = match event_query(&uri, s.config.events_kept) {
        Ok(q) => q,
        Err(e) => return error_response(&e),
    };
    let api = s.api.clone();
    json_response(blocking(API_CALL_TIMEOUT, "events", move || api.events(&query)).await)
}

async fn reload(State(s): State<AppState>) -> Response {
    json_response(call(&s, "reload", |api| api.reload()).await)
}

async fn not_found(uri: Uri) -> Response {
    error_response(&ApiError::not_found(format!(
        "no such endpoint: {}",
        uri.path()
    )))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error_response(&ApiError::new(
        405,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    ))
}

// ---------------------------------------------------------------------------------------------
// TensorFlow Serving: model status (predict is in predict.rs)

async fn model_status(State(s): State<AppState>, PathParams(name): PathParams<String>) -> Response {
    status_of(s, name, None).await
}

async fn version_status(
    State(s): State<AppState>,
    PathParams((name, version)): PathParams<(String, String)>,
) -> Response {
    status_of(s, name, Some(version)).await
}

async fn status_of(s: AppState, name: String, version: Option<String>) -> Response {
    let last = version.as_deref().unwrap_or(&name);
    if let Some((_, verb)) = last.rsplit_once(':') {
        return error_response(&ApiError::new(
            405,
            "method_not_allowed",
            format!(":{verb} takes a POST"),
        ));
    }
    json_response(
        call(&s, "model status", move |api| {
            api.model_status(&name, version.as_deref())
        })
        .await,
    )
}

// ---------------------------------------------------------------------------------------------
// /api/events parameters

fn event_query(uri: &Uri, kept: usize) -> Result<EventQuery, ApiError> {
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|e| ApiError::bad_request(format!("bad query string: {e}")))?;
    let mut query = EventQuery {
        limit: 100.min(kept),
        ..EventQuery::default()
    };
    let mut seen: Vec<&str> = Vec::new();
    for (key, value) in &pairs {
        if seen.contains(&key.as_str()) {
            return Err(ApiError::bad_request(format!(
                "parameter {key} is given twice"
            )));
        }
        seen.push(key);
        let value = value.trim();
        let text = (!value.is_empty()).then(|| value.to_string());
        match key.as_str() {
            "camera" => query.camera = text,
            "zone" => query.zone = text,
            "label" => query.label = text,
            "since" => {
                query.since = Some(parse_since(value).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "since: {value:?} is neither an RFC 3339 timestamp \
                         (2024-05-01T12:00:00Z) nor unix seconds"
                    ))
                })?);
            }
            "limit" => {
                let n = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("limit: {value:?} is not a positive integer"))
                    })?;
                query.limit = n.min(kept);
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {other}; known: camera, zone, label, since, limit"
                )));
            }
        }
    }
    Ok(query)
}

/// Unix seconds, or an RFC 3339 timestamp (UTC when it has no offset).
fn parse_since(text: &str) -> Option<SystemTime> {
    if let Ok(secs) = text.parse::<f64>() {
        let since = Duration::try_from_secs_f64(secs).ok()?;
        return UNIX_EPOCH.checked_add(since);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Some(t);
    }
    // humantime takes only UTC: apply a "+02:00" offset here ('+' arrives as ' ' from a query
    // string that did not encode it).
    let split = text.len().checked_sub(6)?;
    let (base, offset) = (text.get(..split)?, text.get(split..)?.as_bytes());
    let sign = match offset[0] {
        b'+' | b' ' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits = |a: u8, b: u8| -> Option<u64> {
        (a.is_ascii_digit() && b.is_ascii_digit()).then(|| u64::from((a - b'0') * 10 + (b - b'0')))
    };
    if offset[3] != b':' {
        return None;
    }
    let (hours, minutes) = (digits(offset[1], offset[2])?, digits(offset[4], offset[5])?);
    if hours > 23 || minutes > 59 {
        return None;
    }
    let local = humantime::parse_rfc3339_weak(base).ok()?;
    let shift = Duration::from_secs(hours * 3600 + minutes * 60);
    if sign > 0 {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

/// The rustls configuration from the PEM certificate chain and key files (ring provider).
fn tls_server_config(tls: &HttpTlsConfig) -> Result<Arc<rustls::ServerConfig>, HttpError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let fail = |file: &Path, message: String| HttpError::Tls {
        file: file.to_path_buf(),
        message,
    };
    let (cert_file, key_file) = (&tls.cert_file, &tls.key_file);
    let cert_pem = std::fs::read(cert_file).map_err(|e| fail(cert_file, e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(cert_file, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(fail(cert_file, "holds no PEM certificate".into()));
    }
    let key_pem = std::fs::read(key_file).map_err(|e| fail(key_file, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| fail(key_file, format!("no PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(cert_file, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            fail(
                key_file,
                format!("unusable with {}: {e}", cert_file.display()),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Mutex;

    use base64::Engine as _;
    use opencv::core::{CV_8UC3, Mat, Scalar};

    use super::predict::{decode_base64, split_verb};
    use super::*;

    const TOKEN: &str = "s3cret-token";

    /// A predict call as the API saw it: name, version, images.
    type PredictCall = (String, Option<String>, Vec<Vec<u8>>);

    /// Canned answers; records what reaches it.
    #[derive(Default)]
    struct TestApi {
        not_ready: bool,
        predict_delay: Duration,
        predicts: Mutex<Vec<PredictCall>>,
        queries: Mutex<Vec<EventQuery>>,
    }

    impl Api for TestApi {
        fn ready(&self) -> Result<Value, String> {
            if self.not_ready {
                Err("no camera online".into())
            } else {
                Ok(json!({"model": "m"}))
            }
        }
        fn metrics(&self) -> String {
            "# TYPE up gauge\nup 1\n".into()
        }
        fn cameras(&self) -> Value {
            json!([{"name": "street"}])
        }
        fn camera(&self, id: &str) -> Result<Value, ApiError> {
            match id {
                "street" => Ok(json!({"name": "street"})),
                _ => Err(ApiError::not_found(format!("no camera {id}"))),
            }
        }
        fn events(&self, query: &EventQuery) -> Value {
            self.queries.lock().unwrap().push(query.clone());
            json!([])
        }
        fn latest_jpeg(&self, camera: &str, _outline: bool) -> Result<Vec<u8>, ApiError> {
            match camera {
                "street" => Ok(vec![0xff, 0xd8, 0xff, 0xd9]),
                _ => Err(ApiError::not_found("no such camera")),
            }
        }
        fn event_snapshot(&self, id: &str) -> Result<Vec<u8>, ApiError> {
            match id {
                "e1" => Ok(vec![0xff, 0xd8, 0xff, 0xd9]),
                _ => Err(ApiError::not_found("no such event")),
            }
        }
        fn model_status(&self, name: &str, version: Option<&str>) -> Result<Value, ApiError> {
            match name {
                "m" => Ok(json!({"model_version_status": [
                    {"version": version.unwrap_or("1"), "state": "AVAILABLE"}
                ]})),
                _ => Err(ApiError::not_found(format!("no model {name}"))),
            }
        }
        fn predict(
            &self,
            name: &str,
            version: Option<&str>,
            images: Vec<Vec<u8>>,
            _deadline: Instant,
        ) -> Result<Value, ApiError> {
            std::thread::sleep(self.predict_delay);
            if name != "m" {
                return Err(ApiError::not_found(format!("no model {name}")));
            }
            let sizes: Vec<usize> = images.iter().map(Vec::len).collect();
            let entry = (name.to_string(), version.map(str::to_string), images);
            self.predicts.lock().unwrap().push(entry);
            Ok(json!({"predictions": sizes}))
        }
        fn reload(&self) -> Result<Value, ApiError> {
            Err(ApiError::new(
                422,
                "config_rejected",
                "cameras.x.url: missing",
            ))
        }
    }

    struct Harness {
        server: Option<HttpServer>,
        api: Arc<TestApi>,
        outcomes: Arc<Mutex<Vec<String>>>,
        base: String,
        agent: ureq::Agent,
        token: Option<String>,
    }

    struct Reply {
        status: u16,
        headers: ureq::http::HeaderMap,
        body: Vec<u8>,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
        }
        fn code(&self) -> String {
            self.json()["error"]["code"]
                .as_str()
                .unwrap_or("")
                .to_string()
        }
        fn message(&self) -> String {
            self.json()["error"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string()
        }
        fn header(&self, name: &str) -> &str {
            self.headers.get(name).map_or("", |v| v.to_str().unwrap())
        }
    }

    fn start(api: TestApi, token: Option<&str>, edit: impl FnOnce(&mut HttpConfig)) -> Harness {
        let mut config = HttpConfig {
            listen: "127.0.0.1:0".into(),
            ..HttpConfig::default()
        };
        edit(&mut config);
        let api = Arc::new(api);
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let recorded = outcomes.clone();
        let setup = HttpSetup {
            config,
            token: token.map(str::to_string),
            on_predict: Some(Arc::new(move |o: &str| {
                recorded.lock().unwrap().push(o.to_string())
            })),
            exits: None,
        };
        let server = HttpServer::start(setup, api.clone()).unwrap();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Harness {
            base: format!("http://{}", server.local_addr()),
            server: Some(server),
            api,
            outcomes,
            agent,
            token: token.map(str::to_string),
        }
    }

    impl Harness {
        /// A request with the harness's token unless `headers` has an Authorization.
        fn send(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: Option<Vec<u8>>,
        ) -> Reply {
            let mut req = ureq::http::Request::builder()
                .method(method)
                .uri(format!("{}{path}", self.base));
            let explicit = headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
            if let (Some(t), false) = (&self.token, explicit) {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let response = match body {
                Some(body) => self.agent.run(req.body(body).unwrap()),
                None => self.agent.run(req.body(()).unwrap()),
            };
            let response = response.unwrap();
            Reply {
                status: response.status().as_u16(),
                headers: response.headers().clone(),
                body: response.into_body().read_to_vec().unwrap(),
            }
        }

        fn get(&self, path: &str) -> Reply {
            self.send("GET", path, &[], None)
        }

        fn post_json(&self, path: &str, body: &Value) -> Reply {
            let body = serde_json::to_vec(body).unwrap();
            self.send(
                "POST",
                path,
                &[("Content-Type", "application/json")],
                Some(body),
            )
        }

        fn predicts(&self) -> Vec<PredictCall> {
            self.api.predicts.lock().unwrap().clone()
        }

        fn outcomes(&self) -> Vec<String> {
            self.outcomes.lock().unwrap().clone()
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            if let Some(server) = self.server.take() {
                server.stop(Duration::from_secs(1));
            }
        }
    }

    fn encode(ext: &str, width: i32, height: i32) -> Vec<u8> {
        let image = Mat::new_rows_cols_with_default(
            height,
            width,
            CV_8UC3,
            Scalar::new(30.0, 120.0, 220.0, 0.0),
        )
        .unwrap();
        match ext {
            ".png" => crate::images::encode_png(&image).unwrap(),
            _ => crate::images::encode_jpeg(&image, 95).unwrap(),
        }
    }

    /// A PNG header that claims `width` x `height`; no pixel data.
    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend(width.to_be_bytes());
        png.extend(height.to_be_bytes());
        png.extend([8, 2, 0, 0, 0, 0, 0, 0, 0]);
        png
    }

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    #[test]
    fn health_is_open_and_the_rest_needs_the_token() {
        let h = start(TestApi::default(), Some(TOKEN), |_| {});
        let none = [("Authorization", "")];
        let r = h.send("GET", "/healthz", &none, None);
        assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
        let r = h.send("GET", "/readyz", &none, None);
        assert_eq!((r.status, r.json()), (200, json!({"model": "m"})));

        for path in ["/api/cameras", "/metrics", "/v1/models/m", "/api/events"] {
            let r = h.send("GET", path, &none, None);
            assert_eq!(
                (r.status, r.code().as_str()),
                (401, "unauthorized"),
                "{path}"
            );
            assert!(r.header("www-authenticate").starts_with("Bearer"), "{path}");
        }
        let wrong = [("Authorization", "Bearer s3cret-tokeN")];
        let r = h.send("GET", "/api/cameras", &wrong, None);
        assert_eq!(r.status, 401);
        assert!(r.header("www-authenticate").contains("invalid_token"));
        let r = h.send("GET", "/api/cameras", &[("Authorization", TOKEN)], None);
        assert_eq!(r.status, 401, "a token without its scheme");
        let r = h.send(
            "POST",
            "/v1/models/m:predict",
            &wrong,
            Some(encode(".png", 8, 8)),
        );
        assert_eq!(r.status, 401);
        assert!(h.predicts().is_empty());

        let r = h.get("/api/cameras");
        assert_eq!((r.status, r.json()), (200, json!([{"name": "street"}])));
        let lower = [("Authorization", "bearer s3cret-token")];
        assert_eq!(h.send("GET", "/api/cameras", &lower, None).status, 200);
        let r = h.get("/metrics");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-type"),
            crate::ops::prometheus::CONTENT_TYPE
        );
        assert_eq!(r.body, b"# TYPE up gauge\nup 1\n");
    }

    #[test]
    fn readyz_is_503_with_the_reason() {
        let api = TestApi {
            not_ready: true,
            ..TestApi::default()
        };
        let h = start(api, None, |_| {});
        let r = h.get("/readyz");
        assert_eq!((r.status, r.code().as_str()), (503, "not_ready"));
        assert_eq!(r.message(), "no camera online");
    }

    #[test]
    fn json_predict_hands_the_decoded_images_to_the_api() {
        let h = start(TestApi::default(), Some(TOKEN), |_| {});
        let (png, jpeg) = (encode(".png", 16, 8), encode(".jpg", 8, 16));
        let body = json!({
            "signature_name": "serving_default",
            "instances": [{"b64": b64(&png)}, {"image_bytes": {"b64": b64(&jpeg)}}],
        });
        let r = h.post_json("/v1/models/m:predict", &body);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json(), json!({"predictions": [png.len(), jpeg.len()]}));
        let body = json!({"inputs": {"image_bytes": [{"b64": b64(&jpeg)}]}});
        let r = h.post_json("/v1/models/m/versions/3:predict", &body);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let r = h.post_json(
            "/v1/models/m:predict",
            &json!({"inputs": {"b64": b64(&png)}}),
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            h.predicts(),
            vec![
                ("m".into(), None, vec![png.clone(), jpeg.clone()]),
                ("m".into(), Some("3".into()), vec![jpeg]),
                ("m".into(), None, vec![png]),
            ]
        );
        let r = h.post_json(
            "/v1/models/other:predict",
            &json!({"instances": [{"b64": b64(&encode(".png", 4, 4))}]}),
        );
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
        assert_eq!(h.outcomes(), ["ok", "ok", "ok", "not_found"]);
    }

    #[test]
    fn raw_image_body_is_one_instance() {
        let h = start(TestApi::default(), None, |_| {});
        let png = encode(".png", 8, 8);
        let r = h.send(
            "POST",
            "/v1/models/m:predict",
            &[("Content-Type", "image/png")],
            Some(png.clone()),
        );
        assert_eq!(
            (r.status, r.json()),
            (200, json!({"predictions": [png.len()]}))
        );
        let jpeg = encode(".jpg", 8, 8);
        let octets = [("Content-Type", "application/octet-stream")];
        let r = h.send(
            "POST",
            "/v1/models/m/versions/2:predict",
            &octets,
            Some(jpeg.clone()),
        );
        assert_eq!(r.status, 200);
        // curl --data-binary without a content type.
        let form = [("Content-Type", "application/x-www-form-urlencoded")];
        let r = h.send("POST", "/v1/models/m:predict", &form, Some(png.clone()));
        assert_eq!(r.status, 200);
        assert_eq!(
            h.predicts(),
            vec![
                ("m".into(), None, vec![png.clone()]),
                ("m".into(), Some("2".into()), vec![jpeg]),
                ("m".into(), None, vec![png]),
            ]
        );
    }

    #[test]
    fn bad_predict_requests_are_refused_before_the_api() {
        let h = start(TestApi::default(), None, |c| c.max_image_pixels = 1_000_000);
        let url = "/v1/models/m:predict";
        let png = b64(&encode(".png", 8, 8));
        let json_ct = [("Content-Type", "application/json")];
        let cases: Vec<(Vec<u8>, u16, &str, &str)> = vec![
            (
                b"{\"instances\": [".to_vec(),
                400,
                "bad_request",
                "malformed JSON",
            ),
            (b"{}".to_vec(), 400, "bad_request", "no instances"),
            (b"[1, 2]".to_vec(), 400, "bad_request", "JSON object"),
            (
                br#"{"instances": []}"#.to_vec(),
                400,
                "bad_request",
                "empty",
            ),
            (
                br#"{"instances": {"b64": "AAAA"}}"#.to_vec(),
                400,
                "bad_request",
                "list",
            ),
            (
                json!({"instances": [{"b64": png}, {"b64": "not base64!"}]})
                    .to_string()
                    .into_bytes(),
                400,
                "bad_request",
                "instance 1: invalid base64",
            ),
            (
                json!({"instances": [{"b64": png}, "plain"]})
                    .to_string()
                    .into_bytes(),
                400,
                "bad_request",
                "instance 1: expected",
            ),
            (
                json!({"instances": [{"b64": b64(b"hello, this is not an image at all")}]})
                    .to_string()
                    .into_bytes(),
                400,
                "bad_image",
                "instance 0: not an image",
            ),
            (
                json!({"instances": [{"b64": b64(&png_header(100_000, 100_000))}]})
                    .to_string()
                    .into_bytes(),
                413,
                "image_too_large",
                "100000x100000",
            ),
            (
                json!({"instances": [{"b64": b64(&png_header(2000, 1000))}]})
                    .to_string()
                    .into_bytes(),
                413,
                "image_too_large",
                "http.max_image_pixels",
            ),
            (
                json!({"instances": vec![json!({"b64": png}); MAX_INSTANCES + 1]})
                    .to_string()
                    .into_bytes(),
                400,
                "bad_request",
                "at most 64",
            ),
            (
                json!({"instances": [{"b64": png}], "inputs": [{"b64": png}]})
                    .to_string()
                    .into_bytes(),
                400,
                "bad_request",
                "not both",
            ),
        ];
        for (body, status, code, message) in cases {
            let text = String::from_utf8_lossy(&body[..body.len().min(80)]).to_string();
            let r = h.send("POST", url, &json_ct, Some(body));
            assert_eq!((r.status, r.code().as_str()), (status, code), "{text}");
            assert!(r.message().contains(message), "{text}: {}", r.message());
        }
        let raw = [("Content-Type", "image/jpeg")];
        let r = h.send(
            "POST",
            url,
            &raw,
            Some(b"GIF89a\x01\0\x01\0\0\0\0;".to_vec()),
        );
        assert_eq!((r.status, r.code().as_str()), (415, "bad_image"));
        let r = h.send(
            "POST",
            url,
            &raw,
            Some(b"\xff\xd8\xff\xe0 truncated".to_vec()),
        );
        assert_eq!((r.status, r.code().as_str()), (400, "bad_image"));
        let r = h.send("POST", url, &raw, Some(png_header(16385, 4)));
        assert_eq!((r.status, r.code().as_str()), (413, "image_too_large"));
        assert!(
            r.message().starts_with("the image is 16385x4"),
            "{}",
            r.message()
        );
        let r = h.send("POST", url, &raw, Some(Vec::new()));
        assert_eq!((r.status, r.code().as_str()), (400, "bad_request"));

        assert!(h.predicts().is_empty());
        let outcomes = h.outcomes();
        assert!(
            outcomes
                .iter()
                .all(|o| o == "bad_request" || o == "too_large"),
            "{outcomes:?}"
        );
        assert_eq!(outcomes.iter().filter(|o| *o == "too_large").count(), 3);
    }

    #[test]
    fn body_over_the_limit_is_413() {
        let h = start(TestApi::default(), None, |c| c.max_body_bytes = 4096);
        let raw = [("Content-Type", "image/png")];
        let r = h.send("POST", "/v1/models/m:predict", &raw, Some(vec![0; 10_000]));
        assert_eq!((r.status, r.code().as_str()), (413, "body_too_large"));
        // Chunked: no Content-Length to refuse it up front.
        let req = ureq::http::Request::builder()
            .method("POST")
            .uri(format!("{}/v1/models/m:predict", h.base))
            .header("Content-Type", "application/json")
            .body(ureq::SendBody::from_owned_reader(std::io::Cursor::new(
                vec![b' '; 10_000],
            )))
            .unwrap();
        let response = h.agent.run(req).unwrap();
        assert_eq!(response.status().as_u16(), 413);
        assert_eq!(h.outcomes(), ["too_large", "too_large"]);
    }

    #[test]
    fn predict_is_rate_limited_per_client() {
        let h = start(TestApi::default(), None, |c| {
            c.predict_rate = 1;
            c.predict_burst = 2;
        });
        let raw = [("Content-Type", "image/png")];
        let png = encode(".png", 8, 8);
        let statuses: Vec<u16> = (0..3)
            .map(|_| {
                h.send("POST", "/v1/models/m:predict", &raw, Some(png.clone()))
                    .status
            })
            .collect();
        assert_eq!(statuses, [200, 200, 429]);
        let r = h.send("POST", "/v1/models/m:predict", &raw, Some(png));
        assert_eq!((r.status, r.code().as_str()), (429, "rate_limited"));
        let retry: u64 = r.header("retry-after").parse().unwrap();
        assert!((1..=2).contains(&retry), "{retry}");
        assert_eq!(h.get("/api/cameras").status, 200, "only predict is limited");
        assert_eq!(h.outcomes(), ["ok", "ok", "rate_limited", "rate_limited"]);
    }

    #[test]
    fn slow_predict_is_504() {
        let api = TestApi {
            predict_delay: Duration::from_millis(1500),
            ..TestApi::default()
        };
        let h = start(api, None, |c| {
            c.predict_timeout = Duration::from_millis(200)
        });
        let raw = [("Content-Type", "image/png")];
        let r = h.send(
            "POST",
            "/v1/models/m:predict",
            &raw,
            Some(encode(".png", 8, 8)),
        );
        assert_eq!((r.status, r.code().as_str()), (504, "timeout"));
        assert!(
            r.message().contains("http.predict_timeout"),
            "{}",
            r.message()
        );
        assert_eq!(h.outcomes(), ["timeout"]);
    }

    #[test]
    fn unknown_routes_verbs_and_methods_are_json() {
        let h = start(TestApi::default(), Some(TOKEN), |_| {});
        let png = encode(".png", 8, 8);
        let raw = [("Content-Type", "image/png")];
        let r = h.send("POST", "/v1/models/m:classify", &raw, Some(png.clone()));
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
        assert!(r.message().contains(":classify"));
        let r = h.send("POST", "/v1/models/m", &raw, Some(png.clone()));
        assert_eq!(r.status, 404);
        let r = h.send("POST", "/v1/models/m/versions/1:regress", &raw, Some(png));
        assert_eq!(r.status, 404);
        let r = h.get("/v1/models/m:predict");
        assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
        let r = h.get("/nope");
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
        let r = h.send("GET", "/nope", &[("Authorization", "")], None);
        assert_eq!(r.status, 404);
        let r = h.send("DELETE", "/api/cameras", &[], None);
        assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
        let r = h.get("/api/reload");
        assert_eq!(r.status, 405);
        assert!(h.predicts().is_empty());

        let r = h.get("/v1/models/m");
        assert_eq!(r.json()["model_version_status"][0]["version"], "1");
        let r = h.get("/v1/models/m/versions/7");
        assert_eq!(r.json()["model_version_status"][0]["version"], "7");
        let r = h.get("/v1/models/x");
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    }

    #[test]
    fn api_routes() {
        let h = start(TestApi::default(), None, |c| c.events_kept = 50);
        assert_eq!(
            h.get("/api/cameras/street").json(),
            json!({"name": "street"})
        );
        let r = h.get("/api/cameras/nope");
        assert_eq!((r.status, r.message().as_str()), (404, "no camera nope"));
        for path in [
            "/api/cameras/street/latest.jpg",
            "/api/events/e1/snapshot.jpg",
        ] {
            let r = h.get(path);
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(r.header("content-type"), "image/jpeg");
            assert_eq!(r.header("cache-control"), "no-store");
            assert_eq!(r.body, [0xff, 0xd8, 0xff, 0xd9]);
        }
        assert_eq!(h.get("/api/events/e2/snapshot.jpg").code(), "not_found");

        assert_eq!(h.get("/api/events").status, 200);
        let r = h.get(
            "/api/events?camera=street&label=fox%20squirrel&since=2024-05-01T12:00:00Z&limit=7",
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            h.get("/api/events?since=1714564800.5&limit=5000").status,
            200
        );
        let queries = h.api.queries.lock().unwrap().clone();
        assert_eq!(
            (queries[0].limit, queries[0].since, &queries[0].camera),
            (50, None, &None)
        );
        assert_eq!(queries[1].camera.as_deref(), Some("street"));
        assert_eq!(queries[1].label.as_deref(), Some("fox squirrel"));
        assert_eq!(
            queries[1].since,
            Some(UNIX_EPOCH + Duration::from_secs(1_714_564_800))
        );
        assert_eq!(queries[1].limit, 7);
        assert_eq!(
            queries[2].since,
            Some(UNIX_EPOCH + Duration::from_millis(1_714_564_800_500))
        );
        assert_eq!(queries[2].limit, 50);
        for (query, names) in [
            ("since=yesterday", "since"),
            ("limit=ten", "limit"),
            ("limit=0", "limit"),
            ("limit=-1", "limit"),
            ("camera=a&camera=b", "camera"),
            ("cameras=a", "cameras"),
        ] {
            let r = h.get(&format!("/api/events?{query}"));
            assert_eq!(
                (r.status, r.code().as_str()),
                (400, "bad_request"),
                "{query}"
            );
            assert!(r.message().contains(names), "{query}: {}", r.message());
        }

        let r = h.send("POST", "/api/reload", &[], None);
        assert_eq!((r.status, r.code().as_str()), (422, "config_rejected"));
        assert_eq!(r.message(), "cameras.x.url: missing");
    }

    #[test]
    fn since_takes_rfc3339_with_offsets_or_unix_seconds() {
        let t = |s| parse_since(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64());
        assert_eq!(t("1714564800"), Some(1_714_564_800.0));
        assert_eq!(t("2024-05-01T12:00:00Z"), Some(1_714_564_800.0));
        assert_eq!(t("2024-05-01T12:00:00.25Z"), Some(1_714_564_800.25));
        assert_eq!(t("2024-05-01T14:00:00+02:00"), Some(1_714_564_800.0));
        assert_eq!(t("2024-05-01T14:00:00 02:00"), Some(1_714_564_800.0));
        assert_eq!(t("2024-05-01T10:30:00-01:30"), Some(1_714_564_800.0));
        assert_eq!(t("2024-05-01T12:00:00+00:00"), Some(1_714_564_800.0));
        for bad in [
            "",
            "-1",
            "NaN",
            "inf",
            "2024-05-01",
            "2024-05-01T14:00:00+25:00",
            "now",
            "é",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn base64_variants_and_token_comparison() {
        let data = [0xfb, 0xff, 0xfe, 0x00, 0x10];
        for text in ["+//+ABA=", "+//+ABA", "-__-ABA=", "+//+\nABA=\n"] {
            assert_eq!(decode_base64(text).unwrap(), data, "{text}");
        }
        assert!(decode_base64("not base64!").is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
        assert_eq!(
            split_verb("efficientnet-lite0:predict").unwrap(),
            "efficientnet-lite0"
        );
        assert_eq!(split_verb("a:b:predict").unwrap(), "a:b");
        assert!(split_verb(":predict").is_err());
        assert!(split_verb("m:classify").is_err());
    }

    #[test]
    fn a_taken_port_is_a_startup_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap().to_string();
        let config = HttpConfig {
            listen: address.clone(),
            ..HttpConfig::default()
        };
        let setup = HttpSetup {
            config,
            token: None,
            on_predict: None,
            exits: None,
        };
        let e = HttpServer::start(setup, Arc::new(TestApi::default())).unwrap_err();
        assert!(matches!(e, HttpError::Bind { .. }), "{e:?}");
        assert!(e.to_string().contains(&address), "{e}");
    }

    #[test]
    fn stop_closes_the_port() {
        let mut h = start(TestApi::default(), None, |_| {});
        let addr = h.server.as_ref().unwrap().local_addr();
        assert_eq!(h.get("/healthz").status, 200);
        let started = Instant::now();
        h.server.take().unwrap().stop(Duration::from_secs(2));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(std::net::TcpStream::connect(addr).is_err());
    }

    /// A self-signed certificate for localhost / 127.0.0.1.
    fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
        let conf = dir.join("openssl.cnf");
        std::fs::write(
            &conf,
            "[req]\ndistinguished_name = dn\nx509_extensions = v3\nprompt = no\n\
             [dn]\nCN = localhost\n\
             [v3]\nbasicConstraints = critical, CA:FALSE\n\
             subjectAltName = DNS:localhost, IP:127.0.0.1\n\
             keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n",
        )
        .unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-config"])
            .arg(&conf)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success());
        (cert, key)
    }

    /// GET over TLS with rustls, trusting `ca`; the raw HTTP/1.1 response.
    fn https_get(addr: SocketAddr, ca: &Path, path: &str, token: &str) -> String {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("localhost").unwrap();
        let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let socket = std::net::TcpStream::connect(addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut tls = rustls::StreamOwned::new(connection, socket);
        write!(
            tls,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn tls_serves_https_and_bad_files_fail_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let tls = HttpTlsConfig {
            cert_file: cert.clone(),
            key_file: key.clone(),
        };
        let h = start(TestApi::default(), Some(TOKEN), |c| c.tls = Some(tls));
        let addr = h.server.as_ref().unwrap().local_addr();
        let reply = https_get(addr, &cert, "/api/cameras", TOKEN);
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with(r#"[{"name":"street"}]"#), "{reply}");
        let reply = https_get(addr, &cert, "/api/cameras", "wrong");
        assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
        // Plain HTTP to the TLS port gets no HTTP answer.
        let plain = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .new_agent();
        assert!(plain.get(format!("http://{addr}/healthz")).call().is_err());

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let missing = dir.path().join("missing.pem");
        for (cert_file, key_file, named) in [
            (&garbage, &key, &garbage),
            (&missing, &key, &missing),
            (&cert, &garbage, &garbage),
            (&cert, &cert, &cert),
        ] {
            let config = HttpConfig {
                listen: "127.0.0.1:0".into(),
                tls: Some(HttpTlsConfig {
                    cert_file: cert_file.clone(),
                    key_file: key_file.clone(),
                }),
                ..HttpConfig::default()
            };
            let setup = HttpSetup {
                config,
                token: None,
                on_predict: None,
                exits: None,
            };
            let e = HttpServer::start(setup, Arc::new(TestApi::default())).unwrap_err();
            assert!(
                matches!(&e, HttpError::Tls { file, .. } if file == named),
                "{e:?}"
            );
            assert!(e.to_string().contains(&*named.to_string_lossy()), "{e}");
        }
    }
}
