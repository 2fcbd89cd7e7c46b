//! What vigil reads from the broker, judged without touching the network: the command topics
//! (`<prefix>/<camera>/set/enabled`), Home Assistant's status and the discovery configs under
//! vigil's node id. Anyone on the broker can publish there, so nothing in here trusts a topic or a
//! payload: sizes are checked before anything is read, what is shown of them is bounded and
//! escaped, and the logs and replies they cause are rate limited (`connection.rs` acts on the
//! verdicts).

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

/// Characters of an untrusted topic or payload shown in a log line or an error reply.
pub const SHOWN_CHARS: usize = 48;

/// Discovery configs larger than this are not parsed (vigil's own are about 1 KiB).
const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// Why a command was rejected. Its text names the cause; it is what the log and the reply on
/// `<prefix>/errors` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The payload is over `mqtt.max_command_bytes`: dropped unread.
    TooLarge { bytes: usize, limit: usize },
    /// The cameras are not running yet.
    Starting,
    /// No camera of that name (shown bounded and escaped).
    UnknownCamera(String),
    /// Not `ON` / `OFF`.
    BadPayload,
}

impl Rejection {
    /// The cause in a word, e.g. for a metric label or a test.
    pub fn cause(&self) -> &'static str {
        match self {
            Rejection::TooLarge { .. } => "too_large",
            Rejection::Starting => "starting",
            Rejection::UnknownCamera(_) => "unknown_camera",
            Rejection::BadPayload => "bad_payload",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::TooLarge { bytes, limit } => write!(
                f,
                "payload too large: {bytes} bytes, over mqtt.max_command_bytes ({limit}); dropped unread"
            ),
            Rejection::Starting => write!(f, "vigil is still starting"),
            Rejection::UnknownCamera(name) => write!(f, "no camera named \"{name}\""),
            Rejection::BadPayload => write!(f, "payload must be ON or OFF"),
        }
    }
}

/// Judges `<prefix>/<camera>/set/enabled`: the camera's new `enabled`, or why not. The size is
/// checked first, before the payload is looked at; `known` is None while vigil is starting.
pub fn enable_command(
    camera: &str,
    payload: &[u8],
    max_bytes: usize,
    known: Option<&dyn Fn(&str) -> bool>,
) -> Result<bool, Rejection> {
    if payload.len() > max_bytes {
        return Err(Rejection::TooLarge {
            bytes: payload.len(),
            limit: max_bytes,
        });
    }
    let Some(known) = known else {
        return Err(Rejection::Starting);
    };
    if !known(camera) {
        return Err(Rejection::UnknownCamera(shown(camera.as_bytes())));
    }
    match payload {
        b"ON" | b"on" => Ok(true),
        b"OFF" | b"off" => Ok(false),
        _ => Err(Rejection::BadPayload),
    }
}

/// What an incoming message is, from its topic alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// `<discovery prefix>/status`: Home Assistant (re)started or stopped.
    HomeAssistantStatus,
    /// `<discovery prefix>/<component>/<node>/<object>/config`.
    DiscoveryConfig,
    /// `<prefix>/<camera>/set/enabled`.
    EnableCommand { camera: &'a str },
    /// `<prefix>/<camera>/set/wrong`: an operator says the camera's answer is wrong.
    WrongCommand { camera: &'a str },
    /// Nothing vigil subscribed to.
    Other,
}

/// The topics vigil listens to.
#[derive(Debug, Clone)]
pub struct Topics {
    /// vigil's topic prefix.
    pub prefix: String,
    /// Home Assistant's status topic, with discovery on.
    pub ha_status: Option<String>,
    /// The filter matching the discovery configs of vigil's node id, with discovery on.
    pub discovery_filter: Option<String>,
}

impl Topics {
    /// The filters to subscribe to, commands first.
    pub fn filters(&self) -> Vec<String> {
        let mut f = vec![
            format!("{}/+/set/enabled", self.prefix),
            format!("{}/+/set/wrong", self.prefix),
        ];
        f.extend(self.ha_status.clone());
        f.extend(self.discovery_filter.clone());
        f
    }

    pub fn route<'a>(&self, topic: &'a str) -> Route<'a> {
        if self.ha_status.as_deref() == Some(topic) {
            return Route::HomeAssistantStatus;
        }
        if let Some(filter) = &self.discovery_filter
            && matches_filter(filter, topic)
        {
            return Route::DiscoveryConfig;
        }
        let Some((camera, command)) = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|t| t.strip_prefix('/'))
            .and_then(|t| t.split_once("/set/"))
        else {
            return Route::Other;
        };
        if camera.is_empty() || camera.contains('/') {
            return Route::Other;
        }
        match command {
            "enabled" => Route::EnableCommand { camera },
            "wrong" => Route::WrongCommand { camera },
            _ => Route::Other,
        }
    }
}

/// Whether `topic` matches the MQTT filter `filter` (`+` one level, `#` the rest).
pub fn matches_filter(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(l) if f == "+" || f == l => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// At most [`SHOWN_CHARS`] characters of untrusted bytes, invalid UTF-8 replaced and control
/// characters escaped, with `…` when cut: safe in a log line and in a JSON reply.
pub fn shown(bytes: &[u8]) -> String {
    // Never decode more than a few characters' worth of a large payload.
    let head = &bytes[..bytes.len().min(SHOWN_CHARS * 4)];
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == SHOWN_CHARS {
            out.push('…');
            return out;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if head.len() < bytes.len() {
        out.push('…');
    }
    out
}

/// The error reply on `<prefix>/errors`: what was rejected (bounded) and why.
pub fn error_reply(topic: &str, payload: &[u8], rejection: &Rejection) -> Vec<u8> {
    let payload_shown = match rejection {
        Rejection::TooLarge { .. } => String::new(),
        _ => shown(payload),
    };
    serde_json::json!({
        "topic": shown(topic.as_bytes()),
        "payload": payload_shown,
        "payload_bytes": payload.len(),
        "error": rejection.to_string(),
    })
    .to_string()
    .into_bytes()
}

/// At most `limit` admitted per `interval`; the others are counted, and the count is handed to
/// the first one admitted in a later interval (so it can say how many were not shown).
#[derive(Debug)]
pub struct RateLimit {
    limit: u32,
    interval: Duration,
    window: Option<Instant>,
    admitted: u32,
    held_back: u64,
}

/// A [`RateLimit`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Show this one; `held_back` were not shown since the last one shown.
    Yes {
        held_back: u64,
    },
    No,
}

impl RateLimit {
    pub fn new(limit: u32, interval: Duration) -> RateLimit {
        RateLimit {
            limit,
            interval,
            window: None,
            admitted: 0,
            held_back: 0,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        let expired = self
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if expired {
            self.window = Some(now);
            self.admitted = 0;
        }
        if self.admitted < self.limit {
            self.admitted += 1;
            Admit::Yes {
                held_back: std::mem::take(&mut self.held_back),
            }
        } else {
            self.held_back += 1;
            Admit::No
        }
    }
}

/// Remembers up to `capacity` keys: true the first time a key is seen, while there is room.
#[derive(Debug)]
pub struct FirstSeen {
    seen: HashSet<String>,
    capacity: usize,
}

impl FirstSeen {
    pub fn new(capacity: usize) -> FirstSeen {
        FirstSeen {
            seen: HashSet::new(),
            capacity,
        }
    }

    /// True when `key` is new and could be remembered.
    pub fn first(&mut self, key: &str) -> bool {
        if self.seen.contains(key) || self.seen.len() >= self.capacity {
            return false;
        }
        self.seen.insert(key.to_string())
    }
}

/// What to do with a retained discovery config seen under vigil's node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigVerdict {
    /// vigil's own (or a deletion): nothing to do.
    Ignore,
    /// Left by an earlier run of this vigil for a camera or label no longer configured: delete.
    Stale,
    /// Another client's: left alone, and said (another vigil on the same node id?).
    Foreign,
}

/// Judges a discovery config under vigil's node id. `ours` is this run's payload for the topic,
/// `at_start` whether the broker handed it over as retained on this run's first subscription
/// (so it was there before this run published anything), `status_topic` this vigil's
/// `<prefix>/status`. Only a config that was there before this run and names this vigil's status
/// topic as its availability is one of this vigil's own, hence stale; anything published while
/// this run is connected, or naming another status topic, belongs to someone else.
pub fn judge_config(
    payload: &[u8],
    ours: Option<&[u8]>,
    at_start: bool,
    status_topic: &str,
) -> ConfigVerdict {
    if payload.is_empty() {
        return ConfigVerdict::Ignore;
    }
    match ours {
        Some(mine) if mine == payload || at_start => ConfigVerdict::Ignore,
        Some(_) => ConfigVerdict::Foreign,
        None if at_start && names_status(payload, status_topic) => ConfigVerdict::Stale,
        None => ConfigVerdict::Foreign,
    }
}

/// Whether a discovery config's availability includes `status_topic`.
fn names_status(payload: &[u8], status_topic: &str) -> bool {
    if payload.len() > MAX_CONFIG_BYTES {
        return false;
    }
    let Ok(config) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return false;
    };
    config["availability"]
        .as_array()
        .is_some_and(|a| a.iter().any(|a| a["topic"] == status_topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(c: &str) -> bool {
        c == "gate"
    }

    #[test]
    fn commands_are_judged_size_first_then_camera_then_payload() {
        let k: &dyn Fn(&str) -> bool = &known;
        assert_eq!(enable_command("gate", b"OFF", 1024, Some(k)), Ok(false));
        assert_eq!(enable_command("gate", b"on", 1024, Some(k)), Ok(true));
        let big = vec![b'O'; 2 << 20];
        let e = enable_command("nosuch", &big, 1024, None).unwrap_err();
        assert_eq!(e.cause(), "too_large");
        assert!(e.to_string().contains("2097152 bytes"), "{e}");
        assert_eq!(
            enable_command("gate", b"ON", 1024, None),
            Err(Rejection::Starting)
        );
        assert_eq!(
            enable_command("gate", b"MAYBE", 1024, Some(k)).unwrap_err(),
            Rejection::BadPayload
        );
        let e = enable_command("nosuch", b"ON", 1024, Some(k)).unwrap_err();
        assert_eq!(e.to_string(), "no camera named \"nosuch\"");
    }

    #[test]
    fn what_is_shown_of_untrusted_bytes_is_short_and_escaped() {
        assert_eq!(shown(b"OFF"), "OFF");
        assert_eq!(shown(b"a\nb\x1b"), "a\\nb\\u{1b}");
        let long = shown(&vec![b'x'; 1 << 20]);
        assert_eq!(long.chars().count(), SHOWN_CHARS + 1);
        assert!(long.ends_with('…'));
        assert_eq!(shown(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn routes_follow_the_subscriptions() {
        let t = Topics {
            prefix: "vigil".into(),
            ha_status: Some("homeassistant/status".into()),
            discovery_filter: Some("homeassistant/+/vigil/+/config".into()),
        };
        assert_eq!(
            t.route("vigil/gate/set/enabled"),
            Route::EnableCommand { camera: "gate" }
        );
        assert_eq!(t.route("vigil//set/enabled"), Route::Other);
        assert_eq!(
            t.route("vigil/gate/set/wrong"),
            Route::WrongCommand { camera: "gate" }
        );
        assert_eq!(t.route("vigil/gate/set/other"), Route::Other);
        assert_eq!(t.route("vigil/a/b/set/wrong"), Route::Other);
        assert_eq!(t.route("vigil/a/b/set/enabled"), Route::Other);
        assert_eq!(t.route("vigilx/a/set/enabled"), Route::Other);
        assert_eq!(t.route("homeassistant/status"), Route::HomeAssistantStatus);
        assert_eq!(
            t.route("homeassistant/sensor/vigil/gate_top/config"),
            Route::DiscoveryConfig
        );
        assert_eq!(t.route("homeassistant/sensor/other/x/config"), Route::Other);
        assert!(matches_filter("a/#", "a/b/c"));
        assert!(!matches_filter("a/+", "a/b/c"));
    }

    #[test]
    fn the_rate_limit_admits_its_limit_per_interval_and_counts_the_rest() {
        let mut r = RateLimit::new(2, Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(r.admit(t), Admit::Yes { held_back: 0 });
        assert_eq!(r.admit(t), Admit::Yes { held_back: 0 });
        for _ in 0..5 {
            assert_eq!(r.admit(t + Duration::from_secs(1)), Admit::No);
        }
        assert_eq!(
            r.admit(t + Duration::from_secs(10)),
            Admit::Yes { held_back: 5 }
        );
        assert_eq!(
            r.admit(t + Duration::from_secs(11)),
            Admit::Yes { held_back: 0 }
        );
        assert_eq!(r.admit(t + Duration::from_secs(11)), Admit::No);
    }

    #[test]
    fn first_seen_is_bounded() {
        let mut f = FirstSeen::new(2);
        assert!(f.first("a"));
        assert!(!f.first("a"));
        assert!(f.first("b"));
        assert!(!f.first("c"), "full: not remembered");
    }

    #[test]
    fn only_configs_of_this_vigil_left_before_this_run_are_stale() {
        let mine =
            br#"{"availability":[{"topic":"vigil/status"},{"topic":"vigil/a/availability"}]}"#;
        let other = br#"{"availability":[{"topic":"other/status"}]}"#;
        let s = "vigil/status";
        assert_eq!(judge_config(b"", None, true, s), ConfigVerdict::Ignore);
        assert_eq!(judge_config(mine, None, true, s), ConfigVerdict::Stale);
        assert_eq!(judge_config(mine, None, false, s), ConfigVerdict::Foreign);
        assert_eq!(judge_config(other, None, true, s), ConfigVerdict::Foreign);
        assert_eq!(
            judge_config(b"garbage", None, true, s),
            ConfigVerdict::Foreign
        );
        assert_eq!(
            judge_config(mine, Some(mine), false, s),
            ConfigVerdict::Ignore
        );
        assert_eq!(
            judge_config(other, Some(mine), true, s),
            ConfigVerdict::Ignore
        );
        assert_eq!(
            judge_config(other, Some(mine), false, s),
            ConfigVerdict::Foreign
        );
    }
}
