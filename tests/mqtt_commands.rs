//! Property suites. Whatever a client of the broker publishes where vigil listens (any bytes of
//! any size up to a few MiB, any camera name, any topic), vigil's judgement of it never panics,
//! never accepts anything but `ON`/`OFF` for a camera it has, names the cause of every rejection,
//! and says back a bounded reply. And whatever happens to the connection, the outbox never holds
//! more than its capacity. The case count is fixed so the suites take seconds.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rumqttc::QoS;
use vigil::publish::incoming::{
    Rejection, Route, SHOWN_CHARS, Topics, enable_command, error_reply, shown,
};
use vigil::publish::outbox::{Kind, Outbox, OverflowPolicy};

const CASES: u32 = 1000;
const MAX_COMMAND_BYTES: usize = 1024;

fn config() -> Config {
    Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs a suite and says how long it took.
fn run<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let started = Instant::now();
    TestRunner::new(config())
        .run(&strategy, test)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: {CASES} cases in {:?}", started.elapsed());
}

fn payloads() -> impl Strategy<Value = Vec<u8>> {
    let words: Vec<Vec<u8>> = ["ON", "OFF", "on", "off", "", "On", " ON", "OFF\n", "ONN"]
        .iter()
        .map(|w| w.as_bytes().to_vec())
        .collect();
    prop_oneof![
        3 => prop::sample::select(words),
        4 => prop::collection::vec(any::<u8>(), 0..64),
        2 => prop::collection::vec(any::<u8>(), 0..16 * 1024),
        1 => (0usize..4 << 20, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
    ]
}

fn camera_names() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just("gate".to_string()),
        2 => "[a-z0-9_-]{1,12}",
        3 => any::<String>(),
        1 => "[a-z/+#]{0,8}",
        1 => (0usize..70_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn topics() -> Topics {
    Topics {
        prefix: "vigil".into(),
        ha_status: Some("homeassistant/status".into()),
        discovery_filter: Some("homeassistant/+/vigil/+/config".into()),
    }
}

/// Safe to log and to echo: bounded, no control characters.
fn is_safe(text: &str) -> bool {
    text.chars().count() <= SHOWN_CHARS * 10 + 1 && !text.chars().any(char::is_control)
}

/// The rejection's text names its cause.
fn names_its_cause(r: &Rejection, camera: &str, payload: &[u8]) -> bool {
    let text = r.to_string();
    match r {
        Rejection::TooLarge { bytes, limit } => {
            *bytes == payload.len()
                && *limit == MAX_COMMAND_BYTES
                && text.contains(&payload.len().to_string())
                && text.contains("mqtt.max_command_bytes")
        }
        Rejection::Starting => text.contains("starting"),
        Rejection::UnknownCamera(name) => {
            camera != "gate" && text.starts_with("no camera named") && is_safe(name)
        }
        Rejection::BadPayload => text.contains("ON or OFF"),
    }
}

/// Checks one command; true when it was accepted.
fn check_command(camera: &str, payload: &[u8], started: bool) -> Result<bool, TestCaseError> {
    let topic = format!("vigil/{camera}/set/enabled");
    let Route::EnableCommand { camera: routed } = topics().route(&topic) else {
        prop_assert!(
            camera.is_empty() || camera.contains('/'),
            "{topic:?} not routed"
        );
        return Ok(false);
    };
    prop_assert_eq!(routed, camera);
    let known = |c: &str| c == "gate";
    let known: Option<&dyn Fn(&str) -> bool> = started.then_some(&known as _);
    match enable_command(camera, payload, MAX_COMMAND_BYTES, known) {
        Ok(enabled) => {
            prop_assert!(started && camera == "gate");
            prop_assert!(
                ["ON", "OFF", "on", "off"]
                    .iter()
                    .any(|w| w.as_bytes() == payload)
            );
            prop_assert_eq!(enabled, payload.eq_ignore_ascii_case(b"on"));
            Ok(true)
        }
        Err(r) => {
            prop_assert!(names_its_cause(&r, camera, payload), "{r}");
            prop_assert_eq!(
                matches!(r, Rejection::TooLarge { .. }),
                payload.len() > MAX_COMMAND_BYTES
            );
            let reply = error_reply(&topic, payload, &r);
            prop_assert!(reply.len() <= 1024, "{} bytes of reply", reply.len());
            let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
            let cause = r.to_string();
            prop_assert_eq!(reply["error"].as_str(), Some(cause.as_str()));
            prop_assert_eq!(reply["payload_bytes"].as_u64(), Some(payload.len() as u64));
            prop_assert!(is_safe(reply["topic"].as_str().unwrap()));
            prop_assert!(is_safe(reply["payload"].as_str().unwrap()));
            Ok(false)
        }
    }
}

#[test]
fn any_command_is_accepted_only_when_valid_and_every_rejection_names_its_cause() {
    let (accepted, over_a_mib) = (AtomicUsize::new(0), AtomicUsize::new(0));
    run(
        "commands",
        (camera_names(), payloads(), any::<bool>()),
        |(camera, payload, started)| {
            if payload.len() > 1 << 20 {
                over_a_mib.fetch_add(1, Relaxed);
            }
            let done = check_command(&camera, &payload, started)?;
            if done {
                accepted.fetch_add(1, Relaxed);
            }
            Ok(())
        },
    );
    eprintln!(
        "commands: {} accepted, {} payloads over 1 MiB",
        accepted.load(Relaxed),
        over_a_mib.load(Relaxed)
    );
}

#[test]
fn any_topic_is_routed_without_panic_and_shown_bounded() {
    let topics = topics();
    run(
        "topics",
        (any::<String>(), prop::collection::vec(any::<u8>(), 0..4096)),
        |(topic, bytes)| {
            let _ = topics.route(&topic);
            prop_assert!(is_safe(&shown(topic.as_bytes())));
            prop_assert!(is_safe(&shown(&bytes)));
            Ok(())
        },
    );
}

/// Something that happens to the outbox.
#[derive(Debug, Clone)]
enum Op {
    Push(u8, bool),
    /// The client takes up to this many queued messages.
    Flush(usize),
    /// rumqttc sends the oldest handed message.
    Sent,
    Acked(u16),
    Disconnected,
    /// A reconnect republishes this many retained topics.
    Republish(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => (0u8..3, any::<bool>()).prop_map(|(k, r)| Op::Push(k, r)),
        2 => (0usize..20).prop_map(Op::Flush),
        2 => Just(Op::Sent),
        2 => (1u16..200).prop_map(Op::Acked),
        1 => Just(Op::Disconnected),
        1 => (0usize..60).prop_map(Op::Republish),
    ];
    prop::collection::vec(op, 0..200)
}

#[test]
fn the_outbox_never_holds_more_than_its_capacity() {
    run(
        "outbox",
        (1usize..40, any::<bool>(), ops()),
        |(capacity, drop_newest, ops)| {
            let policy = if drop_newest {
                OverflowPolicy::DropNewest
            } else {
                OverflowPolicy::DropOldest
            };
            let mut o = Outbox::new(capacity, policy);
            let mut pkid = 0u16;
            for op in ops {
                match op {
                    Op::Push(k, retain) => {
                        let kind = Kind::ALL[k as usize];
                        o.push("t".into(), vec![k], QoS::AtLeastOnce, retain, kind);
                    }
                    Op::Flush(n) => {
                        let mut left = n;
                        o.flush(|_| {
                            left = left.saturating_sub(1);
                            left > 0
                        });
                    }
                    Op::Sent => {
                        pkid += 1;
                        o.on_sent(pkid);
                    }
                    Op::Acked(p) => o.on_acked(p),
                    Op::Disconnected => o.on_disconnected(),
                    Op::Republish(n) => {
                        // A reconnect: what the client had comes back to the queue first.
                        o.on_disconnected();
                        let retained = (0..n)
                            .map(|i| (format!("r{i}"), b"x".to_vec(), QoS::AtLeastOnce))
                            .collect();
                        o.push_front_state(retained);
                    }
                }
                prop_assert!(o.waiting() <= capacity, "{} > {capacity}", o.waiting());
            }
            prop_assert!(o.stats().peak <= capacity);
            Ok(())
        },
    );
}
