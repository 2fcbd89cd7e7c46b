//! The operator console: pages rendered from templates embedded in the binary (`console/`), its
//! own scripts and stylesheet, the live feed its pages listen to (`/api/stream`, server-sent
//! events), its figures (`/api/system`), the zone editor's save, and the login that trades the
//! token for a session cookie. Nothing is fetched from elsewhere: it works on an offline LAN.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use super::{
    AppState, PathParams, QueryParams, call, constant_time_eq, error_response, json_response,
};
use crate::ops::api::ApiError;
use crate::sync::lock;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "vigil_session";
/// How long a console session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (the oldest go first).
const MAX_SESSIONS: usize = 256;
/// Live feeds open at once at most (each holds a connection).
pub const MAX_STREAMS: usize = 32;
/// How often a live feed sends the cameras' state.
const CAMERAS_EVERY: Duration = Duration::from_secs(1);

/// The console's files, embedded.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("console/static/console.css"),
    ),
    (
        "common.js",
        "text/javascript; charset=utf-8",
        include_str!("console/static/common.js"),
    ),
    (
        "live.js",
        "text/javascript; charset=utf-8",
        include_str!("console/static/live.js"),
    ),
    (
        "events.js",
        "text/javascript; charset=utf-8",
        include_str!("console/static/events.js"),
    ),
    (
        "camera.js",
        "text/javascript; charset=utf-8",
        include_str!("console/static/camera.js"),
    ),
    (
        "teach.js",
        "text/javascript; charset=utf-8",
        include_str!("console/static/teach.js"),
    ),
    (
        "system.js",
        "text/javascript; charset=utf-8",
        include_str!("console/static/system.js"),
    ),
];

const TEMPLATES: &[(&str, &str)] = &[
    ("head.html", include_str!("console/head.html")),
    ("base.html", include_str!("console/base.html")),
    ("live.html", include_str!("console/live.html")),
    ("events.html", include_str!("console/events.html")),
    ("camera.html", include_str!("console/camera.html")),
    ("teach.html", include_str!("console/teach.html")),
    ("system.html", include_str!("console/system.html")),
    ("login.html", include_str!("console/login.html")),
];

/// Pages and scripts come from here only; images may be data URLs (none are, today).
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn templates() -> &'static minijinja::Environment<'static> {
    static ENV: OnceLock<minijinja::Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        for (name, text) in TEMPLATES {
            env.add_template(name, text)
                .expect("the console's templates parse (checked by a test)");
        }
        env
    })
}

/// The console's signed-in browsers: session id → when it was opened.
#[derive(Default)]
pub(super) struct Sessions(Mutex<HashMap<String, Instant>>);

impl Sessions {
    fn open(&self) -> String {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the system's random source");
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut map = lock(&self.0);
        map.retain(|_, since| since.elapsed() < SESSION_TTL);
        while map.len() >= MAX_SESSIONS {
            let oldest = map.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(id.clone(), Instant::now());
        id
    }

    fn valid(&self, id: &str) -> bool {
        let map = lock(&self.0);
        // Compared in constant time, like the token.
        map.iter().any(|(k, since)| {
            constant_time_eq(id.as_bytes(), k.as_bytes()) && since.elapsed() < SESSION_TTL
        })
    }

    fn close(&self, id: &str) {
        lock(&self.0).remove(id);
    }
}

/// The session id a request's cookies carry.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim())
}

/// Whether a request carries a live session (no token configured: every request does).
pub(super) fn signed_in(s: &AppState, headers: &HeaderMap) -> bool {
    s.token.is_none() || session_cookie(headers).is_some_and(|id| s.sessions.valid(id))
}

/// The console's routes: `pages` need a session when a token is configured (else the login
/// page), `api` joins the JSON API (bearer token or session), `open` are the login and the
/// static files.
pub(super) fn routes() -> (Router<AppState>, Router<AppState>, Router<AppState>) {
    let pages = Router::new()
        .route("/", get(live))
        .route("/events", get(events))
        .route("/cameras/{id}", get(camera))
        .route("/teach", get(teach))
        .route("/system", get(system));
    let api = Router::new()
        .route("/api/stream", get(stream))
        .route("/api/system", get(system_figures))
        .route("/api/cameras/{id}/zones", put(save_zones));
    let open = Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/console/static/{file}", get(asset));
    (pages, api, open)
}

/// Pages without a session go to the login page.
pub(super) async fn require_session(
    State(s): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if signed_in(&s, req.headers()) {
        return next.run(req).await;
    }
    let next_path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("next", &next_path)
        .finish();
    redirect(&format!("/login?{query}"))
}

fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(LOCATION, v);
    }
    r
}

fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    r
}

fn render(s: &AppState, template: &str, screen: &str, extra: Value) -> Response {
    let mut ctx = serde_json::json!({
        "title": format!("vigil · {screen}"),
        "screen": screen,
        "auth": s.token.is_some(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    if let (Some(ctx), Value::Object(extra)) = (ctx.as_object_mut(), extra) {
        ctx.extend(extra);
    }
    match templates()
        .get_template(template)
        .and_then(|t| t.render(&ctx))
    {
        Ok(body) => html(StatusCode::OK, body),
        Err(e) => {
            tracing::error!(template, error = %e, "console: a page failed to render");
            error_response(&ApiError::new(500, "internal", "the page failed to render"))
        }
    }
}

async fn live(State(s): State<AppState>) -> Response {
    render(&s, "live.html", "live", Value::Null)
}

async fn events(State(s): State<AppState>) -> Response {
    render(&s, "events.html", "events", Value::Null)
}

async fn teach(State(s): State<AppState>) -> Response {
    render(&s, "teach.html", "teach", Value::Null)
}

async fn system(State(s): State<AppState>) -> Response {
    render(&s, "system.html", "system", Value::Null)
}

async fn camera(State(s): State<AppState>, PathParams(id): PathParams<String>) -> Response {
    let name = id.clone();
    if let Err(e) = call(&s, "camera", move |api| api.camera(&name)).await {
        return error_response(&e);
    }
    render(
        &s,
        "camera.html",
        "camera",
        serde_json::json!({"camera": id}),
    )
}

async fn asset(PathParams(file): PathParams<String>) -> Response {
    let Some((_, mime, text)) = ASSETS.iter().find(|(name, _, _)| *name == file) else {
        return error_response(&ApiError::not_found(format!("no console file {file:?}")));
    };
    let mut r = (*text).into_response();
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(mime));
    // Fresh after an upgrade, cheap otherwise: they are small.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[derive(Deserialize, Default)]
struct LoginQuery {
    next: Option<String>,
}

/// Where to go after the login: a path of this server only (never another site).
fn local_path(next: Option<&str>) -> String {
    match next {
        Some(p) if p.starts_with('/') && !p.starts_with("//") && !p.contains('\\') => p.into(),
        _ => "/".into(),
    }
}

fn login_form(status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let ctx = serde_json::json!({
        "title": "vigil · log in",
        "next": next,
        "error": error,
        "version": env!("CARGO_PKG_VERSION"),
    });
    match templates()
        .get_template("login.html")
        .and_then(|t| t.render(&ctx))
    {
        Ok(body) => html(status, body),
        Err(e) => {
            tracing::error!(error = %e, "console: the login page failed to render");
            error_response(&ApiError::new(500, "internal", "the page failed to render"))
        }
    }
}

async fn login_page(
    State(s): State<AppState>,
    QueryParams(q): QueryParams<LoginQuery>,
) -> Response {
    let next = local_path(q.next.as_deref());
    if s.token.is_none() {
        return redirect(&next);
    }
    login_form(StatusCode::OK, &next, None)
}

/// `POST /login` (a form: `token`, `next`): the token for a session cookie (HttpOnly,
/// SameSite=Strict, Secure over HTTPS). Failures are rate limited per client like predicts.
async fn login(
    State(s): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    body: Bytes,
) -> Response {
    let mut token = None;
    let mut next = None;
    for (k, v) in url::form_urlencoded::parse(&body) {
        match &*k {
            "token" => token = Some(v.into_owned()),
            "next" => next = Some(v.into_owned()),
            _ => {}
        }
    }
    let next = local_path(next.as_deref());
    let Some(expected) = &s.token else {
        return redirect(&next);
    };
    if s.limiter.check_key(&peer.ip()).is_err() {
        return login_form(
            StatusCode::TOO_MANY_REQUESTS,
            &next,
            Some("Too many attempts: wait a moment and try again."),
        );
    }
    let given = token.unwrap_or_default();
    if !constant_time_eq(given.trim().as_bytes(), expected.as_bytes()) {
        tracing::warn!(client = %peer.ip(), "console: a login with a wrong token");
        return login_form(StatusCode::UNAUTHORIZED, &next, Some("Wrong token."));
    }
    let id = s.sessions.open();
    let secure = if s.config.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE_NAME}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    let mut r = redirect(&next);
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

async fn logout(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        s.sessions.close(id);
    }
    let mut r = redirect("/login");
    r.headers_mut().insert(
        SET_COOKIE,
        HeaderValue::from_static("vigil_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

async fn system_figures(State(s): State<AppState>) -> Response {
    json_response(call(&s, "system", |api| Ok(api.system())).await)
}

async fn save_zones(
    State(s): State<AppState>,
    PathParams(id): PathParams<String>,
    body: Bytes,
) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        zones: Value,
    }
    let body: Body = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error_response(&ApiError::bad_request(format!(
                "expected {{\"zones\": {{...}}}}: {e}"
            )));
        }
    };
    json_response(call(&s, "save zones", move |api| api.save_zones(&id, body.zones)).await)
}

/// `GET /api/stream`: server-sent events. `event` carries each event message as it is
/// published (the JSON of `<prefix>/events`), `cameras` the cameras' state every second
/// (`GET /api/cameras`), `lagged` how many event messages a slow reader missed.
async fn stream(State(s): State<AppState>) -> Response {
    let Some(events) = s.api.subscribe_events() else {
        return error_response(&ApiError::not_found("no live feed here"));
    };
    let Ok(permit) = s.streams.clone().try_acquire_owned() else {
        return error_response(&ApiError::new(
            503,
            "busy",
            format!("{MAX_STREAMS} live feeds are open already"),
        ));
    };
    let mut tick = tokio::time::interval(CAMERAS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = (events, tick, permit, s.api.clone());
    let feed = futures_util::stream::unfold(state, |(mut rx, mut tick, permit, api)| async move {
        let event = tokio::select! {
            r = rx.recv() => match r {
                Ok(json) => SseEvent::default().event("event").data(&*json),
                Err(RecvError::Lagged(n)) => SseEvent::default().event("lagged").data(n.to_string()),
                Err(RecvError::Closed) => return None,
            },
            _ = tick.tick() => {
                let a = api.clone();
                let cameras = tokio::task::spawn_blocking(move || a.cameras()).await.ok()?;
                SseEvent::default().event("cameras").data(cameras.to_string())
            }
        };
        Some((Ok::<_, Infallible>(event), (rx, tick, permit, api)))
    });
    let mut r = Sse::new(feed)
        .keep_alive(KeepAlive::default())
        .into_response();
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_renders_and_every_asset_is_small() {
        let env = templates();
        for (name, _) in TEMPLATES {
            let ctx = serde_json::json!({
                "title": "t", "screen": "live", "auth": true, "version": "0",
                "camera": "door", "next": "/", "error": "Wrong token.",
            });
            let page = env.get_template(name).unwrap().render(&ctx).unwrap();
            assert!(page.contains("<"), "{name} rendered nothing");
        }
        let total: usize = ASSETS.iter().map(|(_, _, t)| t.len()).sum::<usize>()
            + TEMPLATES.iter().map(|(_, t)| t.len()).sum::<usize>();
        // The first load's budget is 300 KB besides camera images; all of it together is less.
        assert!(total < 300 * 1024, "console files: {total} bytes");
    }

    #[test]
    fn names_are_escaped_in_pages() {
        let ctx = serde_json::json!({"title": "t", "screen": "camera", "auth": false,
                                     "version": "0", "camera": "<script>x</script>"});
        let page = templates()
            .get_template("camera.html")
            .unwrap()
            .render(&ctx)
            .unwrap();
        assert!(!page.contains("<script>x"), "{page}");
    }

    #[test]
    fn the_login_goes_back_only_to_a_path_of_this_server() {
        assert_eq!(
            local_path(Some("/events?camera=door")),
            "/events?camera=door"
        );
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil",
            "events",
        ] {
            assert_eq!(local_path(Some(bad)), "/", "{bad}");
        }
        assert_eq!(local_path(None), "/");
    }

    #[test]
    fn sessions_open_check_and_close() {
        let s = Sessions::default();
        let id = s.open();
        assert_eq!(id.len(), 64);
        assert!(s.valid(&id));
        assert!(!s.valid("0000"));
        assert_ne!(s.open(), id);
        s.close(&id);
        assert!(!s.valid(&id));
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_static("a=1; vigil_session=abc ; b=2"),
        );
        assert_eq!(session_cookie(&h), Some("abc"));
    }
}
