//! Property suites over what a user or a network hands vigil: config text, pipeline templates and
//! camera URLs. Whatever the input, nothing panics, every rejection names its cause, and no
//! credential shows. The case counts are fixed so that the suite runs in seconds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use vigil::config::Config;
use vigil::secrets::{check_rtsp_url, redact_url, scrub, url_secrets};
use vigil::source::gate::Pacer;
use vigil::source::template::render_template;

const CASES: u32 = 10_000;

/// Values of every TOML type, including the troublesome ones.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        prop_oneof![
            Just(0.0f64),
            Just(1e-20),
            Just(-1.0),
            Just(1e300),
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
        ]
        .prop_map(|v| format!("{v:e}")),
        Just("nan".to_string()),
        Just("inf".to_string()),
        any::<bool>().prop_map(|v| v.to_string()),
        "[ -~]{0,12}".prop_map(|s| format!("{:?}", s)),
        prop_oneof![
            Just("0s"),
            Just("1ms"),
            Just("5s"),
            Just("1000000000years"),
            Just("10 parsecs")
        ]
        .prop_map(|d| format!("{d:?}")),
        Just("[1, \"two\", 3.0]".to_string()),
        Just("{ a = 1 }".to_string()),
    ]
}

/// The keys of every section, and some that do not exist.
fn key() -> impl Strategy<Value = (&'static str, &'static str)> {
    prop_oneof![
        Just(("model", "variant")),
        Just(("model", "watch_interval")),
        Just(("inference", "sessions")),
        Just(("inference", "provider")),
        Just(("pipeline", "workers")),
        Just(("pipeline", "max_batch")),
        Just(("pipeline", "max_wait")),
        Just(("pipeline", "camera_queue")),
        Just(("pipeline", "max_frame_age")),
        Just(("pipeline", "log_interval")),
        Just(("decide", "top_k")),
        Just(("decide", "threshold")),
        Just(("events", "hysteresis")),
        Just(("events", "cooldown")),
        Just(("mqtt", "port")),
        Just(("mqtt", "password")),
        Just(("mqtt", "keep_alive")),
        Just(("mqtt", "reconnect_max")),
        Just(("mqtt", "outbox")),
        Just(("http", "listen")),
        Just(("http", "token")),
        Just(("http", "predict_timeout")),
        Just(("snapshots", "quality")),
        Just(("snapshots", "max_age")),
        Just(("cameras.a", "analyze_fps")),
        Just(("cameras.a", "fps")),
        Just(("cameras.a", "width")),
        Just(("cameras.a", "retry_max")),
        Just(("cameras.a", "stall_timeout")),
        Just(("cameras.a", "latency")),
        Just(("cameras.a", "url")),
        Just(("cameras.a", "transport")),
        Just(("bogus", "key")),
        Just(("cameras.a", "bogus")),
    ]
}

fn config_text() -> impl Strategy<Value = String> {
    prop::collection::vec((key(), toml_value()), 0..8).prop_map(|pairs| {
        let mut text = String::from("[cameras.a]\nsource = \"test\"\n");
        for ((section, key), value) in pairs {
            text.push_str(&format!("[{section}]\n{key} = {value}\n"));
        }
        text
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any text: parsed or refused with named problems, never a panic.
    #[test]
    fn any_text_is_parsed_or_refused_with_named_problems(text in "\\PC{0,200}") {
        if let Err(problems) = Config::parse(&text, PathBuf::from(".")) {
            prop_assert!(!problems.is_empty());
            for p in problems {
                prop_assert!(!p.key.is_empty() && !p.message.is_empty(), "{p:?}");
            }
        }
    }

    /// Config-shaped text with any values: every problem names a key; a config that passes
    /// validation can run (the values that used to panic at run time are refused).
    #[test]
    fn any_values_are_validated_or_refused_by_key(text in config_text()) {
        // Sections repeated by the generator are a TOML error: fine, refused with a key too.
        match Config::parse(&text, PathBuf::from(".")) {
            Err(problems) => {
                for p in problems {
                    prop_assert!(!p.key.is_empty() && !p.message.is_empty(), "{p:?}");
                }
            }
            Ok(config) => {
                let problems: Vec<_> = config
                    .validate()
                    .into_iter()
                    .filter(|p| !p.key.starts_with("model"))
                    .collect();
                for p in &problems {
                    prop_assert!(!p.key.is_empty() && !p.message.is_empty(), "{p:?}");
                }
                if problems.is_empty() {
                    for cam in config.cameras.values() {
                        let mut pacer = Pacer::new(cam.analyze_fps);
                        pacer.admit(Some(Duration::from_millis(40)), Instant::now());
                        let doubled = cam.retry_max.checked_mul(2);
                        prop_assert!(doubled.is_some(), "{:?}", cam.retry_max);
                        prop_assert!(Instant::now().checked_add(cam.stall_timeout).is_some());
                    }
                    prop_assert!(config.mqtt.reconnect_max.checked_mul(2).is_some());
                    prop_assert!(Instant::now().checked_add(config.http.predict_timeout).is_some());
                }
            }
        }
    }

    /// Any template and values: rendered, or refused saying why; never a panic.
    #[test]
    fn any_template_is_rendered_or_refused_saying_why(
        text in "[ -~\\n]{0,120}",
        width in any::<u64>(),
    ) {
        match render_template(&text, &[("width", width), ("height", 1), ("fps", 2), ("latency_ms", 3)]) {
            Ok(out) => prop_assert!(!out.contains('{'), "{out}"),
            Err(e) => prop_assert!(
                e.contains("unclosed") || e.contains("unknown placeholder"),
                "{e}"
            ),
        }
    }

    /// Any user name and password, written raw or percent-encoded: the URL is accepted or
    /// refused without quoting the password, and redaction never shows it.
    #[test]
    fn no_password_shows_through_a_url(
        user in "[a-zA-Z0-9._~-]{1,8}",
        password in "[!-~]{4,16}",
        encode in any::<bool>(),
    ) {
        let written = if encode {
            percent_encoding::utf8_percent_encode(&password, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        } else {
            password.clone()
        };
        let url = format!("rtsp://{user}:{written}@cam.example:554/live");
        // A password that is a piece of the rest of the URL cannot be told apart from it.
        prop_assume!(!"rtsp://cam.example:554/live".contains(password.as_str()));
        let shown = redact_url(&url);
        prop_assert!(!shown.contains(&password) && !shown.contains(&written), "{url} -> {shown}");
        if let Err(e) = check_rtsp_url(&url) {
            prop_assert!(!e.contains(&password) && !e.contains(&written), "{e}");
            prop_assert!(e.contains("percent-encode") || e.contains("URL"), "{e}");
        } else if !encode {
            // Accepted as written: no reserved character, and every '%' an escape.
            prop_assert!(!password.contains(['/', '?', '#', '@']), "{url}");
            let escapes_ok = password.match_indices('%').all(|(i, _)| {
                password
                    .get(i + 1..i + 3)
                    .is_some_and(|h| h.chars().all(|c| c.is_ascii_hexdigit()))
            });
            prop_assert!(escapes_ok, "{url}");
        }
        let message = format!("cannot open {url}: {password} refused");
        let secrets = url_secrets(&url);
        let clean = scrub(&message, &secrets.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        prop_assert!(!clean.contains(&password) && !clean.contains(&written), "{clean}");
    }
}
