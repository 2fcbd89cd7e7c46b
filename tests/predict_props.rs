//! Properties of the predict endpoint, over HTTP to vigil's real server (with a service that
//! only records the images it is handed): whatever the body (JSON of any shape and size,
//! instances of every kind, base64 in every variant, raw bytes, garbage, truncated JSON), the
//! server never panics and answers 200 or a 4xx whose JSON error names the cause; for lists of
//! instances the answer is exactly the one predicted by the first bad instance.
//!
//! Bounded for CI: 1280 cases in all (1536 requests; see `CASES`), under a second on a 2-core
//! machine.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use proptest::prelude::*;
use serde_json::{Value, json};
use vigil::config::HttpConfig;
use vigil::ops::api::{Api, ApiError, EventQuery};
use vigil::ops::http::{HttpServer, HttpSetup, MAX_IMAGE_SIDE, MAX_INSTANCES};

/// Cases per property (the instance lists get twice as many).
const CASES: u32 = 256;
const MAX_PIXELS: u64 = 4_000_000;

/// A service that answers every predict with the sizes of the images it got.
struct Recorder;

impl Api for Recorder {
    fn ready(&self) -> Result<Value, String> {
        Ok(json!({}))
    }
    fn metrics(&self) -> String {
        String::new()
    }
    fn cameras(&self) -> Value {
        json!([])
    }
    fn camera(&self, _: &str) -> Result<Value, ApiError> {
        Err(ApiError::not_found("none"))
    }
    fn events(&self, _: &EventQuery) -> Value {
        json!([])
    }
    fn latest_jpeg(&self, _: &str, _: bool) -> Result<Vec<u8>, ApiError> {
        Err(ApiError::not_found("none"))
    }
    fn event_snapshot(&self, _: &str) -> Result<Vec<u8>, ApiError> {
        Err(ApiError::not_found("none"))
    }
    fn model_status(&self, _: &str, _: Option<&str>) -> Result<Value, ApiError> {
        Ok(json!({}))
    }
    fn predict(
        &self,
        _: &str,
        _: Option<&str>,
        images: Vec<Vec<u8>>,
        _: Instant,
    ) -> Result<Value, ApiError> {
        let sizes: Vec<usize> = images.iter().map(Vec::len).collect();
        Ok(json!({ "predictions": sizes }))
    }
    fn reload(&self) -> Result<Value, ApiError> {
        Err(ApiError::new(422, "invalid_config", "no"))
    }
}

/// One server for every case; it lives as long as the test process.
fn server() -> SocketAddr {
    static SERVER: OnceLock<(Mutex<HttpServer>, SocketAddr)> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let config = HttpConfig {
                listen: "127.0.0.1:0".into(),
                max_body_bytes: 1 << 20,
                max_image_pixels: MAX_PIXELS,
                predict_rate: 1_000_000,
                predict_burst: 1_000_000,
                ..HttpConfig::default()
            };
            let setup = HttpSetup {
                config,
                token: None,
                on_predict: None,
                exits: None,
            };
            let server = HttpServer::start(setup, Arc::new(Recorder)).unwrap();
            let addr = server.local_addr();
            (Mutex::new(server), addr)
        })
        .1
}

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into()
    })
}

/// The answer to a predict request: status, and the JSON body.
fn predict(content_type: Option<&str>, body: &[u8]) -> (u16, Value) {
    let mut req = agent().post(format!("http://{}/v1/models/m:predict", server()));
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    let mut response = req
        .send(body)
        .expect("an answer, never a dropped connection");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("HTTP {status}: the body is not JSON ({e}): {text}"));
    (status, json)
}

/// Every answer: 200 with a prediction per image, or a 4xx with a JSON error naming its cause.
fn check_answer(status: u16, json: &Value) -> Result<(), TestCaseError> {
    if status == 200 {
        let n = json["predictions"].as_array().map_or(0, Vec::len);
        prop_assert!((1..=MAX_INSTANCES).contains(&n), "{json}");
        return Ok(());
    }
    prop_assert!((400..500).contains(&status), "HTTP {status}: {json}");
    let code = json["error"]["code"].as_str().unwrap_or_default();
    let message = json["error"]["message"].as_str().unwrap_or_default();
    prop_assert!(
        ["bad_request", "bad_image", "image_too_large"].contains(&code),
        "HTTP {status}: {json}"
    );
    prop_assert!(message.len() > 10, "HTTP {status}: {json}");
    Ok(())
}

/// A PNG header that claims `w` x `h` (no pixel data: the service here decodes nothing).
fn png(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    v.extend(w.to_be_bytes());
    v.extend(h.to_be_bytes());
    v.extend([8, 2, 0, 0, 0, 0, 0, 0, 0]);
    v
}

/// How an image is written in base64.
#[derive(Debug, Clone, Copy)]
enum Style {
    Standard,
    StandardUnpadded,
    UrlSafe,
    UrlSafeUnpadded,
    /// Standard, broken in lines of 76 (MIME).
    Lines,
}

fn encode(bytes: &[u8], style: Style) -> String {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    match style {
        Style::Standard => STANDARD.encode(bytes),
        Style::StandardUnpadded => STANDARD_NO_PAD.encode(bytes),
        Style::UrlSafe => URL_SAFE.encode(bytes),
        Style::UrlSafeUnpadded => URL_SAFE_NO_PAD.encode(bytes),
        Style::Lines => {
            let text = STANDARD.encode(bytes);
            let lines: Vec<&str> = text
                .as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            lines.join("\n")
        }
    }
}

fn style() -> impl Strategy<Value = Style> {
    prop_oneof![
        Just(Style::Standard),
        Just(Style::StandardUnpadded),
        Just(Style::UrlSafe),
        Just(Style::UrlSafeUnpadded),
        Just(Style::Lines),
    ]
}

/// One instance of a list, and what the server must make of it.
#[derive(Debug, Clone)]
enum Instance {
    /// `{"b64": <PNG header w x h>}`, or `{"<input>": {"b64": ...}}` when `named`.
    Image {
        w: u32,
        h: u32,
        style: Style,
        named: bool,
    },
    /// Not base64 at all.
    BadBase64(String),
    /// Base64 of bytes that are no image.
    NotImage(Vec<u8>),
    /// Not an instance: a number, a list, a string, an object without "b64"...
    Shape(Value),
}

fn instance() -> impl Strategy<Value = Instance> {
    let side = prop_oneof![0u32..4, 1u32..3000, 3000u32..20000];
    prop_oneof![
        6 => (side.clone(), side, style(), any::<bool>())
            .prop_map(|(w, h, style, named)| Instance::Image { w, h, style, named }),
        1 => "[!*%$&@]{1,3}[A-Za-z0-9]{0,12}".prop_map(Instance::BadBase64),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Instance::NotImage),
        1 => prop_oneof![
            any::<i64>().prop_map(|n| json!(n)),
            ".{0,12}".prop_map(|s| json!(s)),
            Just(Value::Null),
            Just(json!([])),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| json!(v)),
            Just(json!({})),
            Just(json!({"a": 1, "b": {"b64": "QQ=="}})),
            Just(json!({"b64s": "QQ=="})),
        ]
        .prop_map(Instance::Shape),
    ]
}

impl Instance {
    fn to_json(&self) -> Value {
        match self {
            Instance::Image { w, h, style, named } => {
                let inner = json!({"b64": encode(&png(*w, *h), *style)});
                if *named {
                    json!({"image_bytes": inner})
                } else {
                    inner
                }
            }
            Instance::BadBase64(text) => json!({"b64": text}),
            Instance::NotImage(bytes) => {
                let mut data = b"nope".to_vec();
                data.extend(bytes);
                json!({"b64": encode(&data, Style::Standard)})
            }
            Instance::Shape(v) => v.clone(),
        }
    }

    /// Refused while the JSON is read (a shape that is no instance)?
    fn is_shape(&self) -> bool {
        matches!(self, Instance::Shape(_))
    }

    /// The status and message part this instance, at `i`, is refused with once decoded; None
    /// when it is a good image.
    fn refusal(&self, i: usize) -> Option<(Vec<u16>, String)> {
        match self {
            Instance::Image { w, h, .. } => {
                let (w, h) = (u64::from(*w), u64::from(*h));
                if w == 0 || h == 0 {
                    Some((vec![400], format!("instance {i}")))
                } else if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || w * h > MAX_PIXELS {
                    Some((vec![413], format!("instance {i} is {w}x{h}")))
                } else {
                    None
                }
            }
            Instance::BadBase64(_) => Some((vec![400], format!("instance {i}: invalid base64"))),
            Instance::NotImage(_) => Some((vec![400, 415], format!("instance {i}"))),
            Instance::Shape(_) => Some((vec![400], format!("instance {i}: expected"))),
        }
    }
}

/// What the server must answer to this list: 200 with `n` predictions, or statuses and a part of
/// the message.
fn expected(list: &[Instance]) -> Result<usize, (Vec<u16>, String)> {
    let parsed = &list[..list.len().min(MAX_INSTANCES)];
    if let Some(i) = parsed.iter().position(Instance::is_shape) {
        return Err(list[i].refusal(i).unwrap());
    }
    if list.is_empty() {
        return Err((vec![400], "the list is empty".into()));
    }
    if list.len() > MAX_INSTANCES {
        return Err((vec![400], format!("at most {MAX_INSTANCES}")));
    }
    match list.iter().enumerate().find_map(|(i, x)| x.refusal(i)) {
        Some(refusal) => Err(refusal),
        None => Ok(list.len()),
    }
}

/// Any JSON, with the keys a predict body knows among random ones.
fn any_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("instances".to_string()),
        Just("inputs".to_string()),
        Just("b64".to_string()),
        Just("signature_name".to_string()),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,16}".prop_map(Value::String),
        (1u32..64, 1u32..64, style()).prop_map(|(w, h, s)| Value::String(encode(&png(w, h), s))),
    ];
    leaf.prop_recursive(5, 96, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES * 2))]

    #[test]
    fn a_list_of_instances_gets_exactly_the_answer_of_its_first_bad_one(
        list in proptest::collection::vec(instance(), 0..80),
        rows in any::<bool>(),
        escape_slashes in any::<bool>(),
    ) {
        let items: Vec<Value> = list.iter().map(Instance::to_json).collect();
        let body = if rows {
            json!({"signature_name": "serving_default", "instances": items})
        } else {
            json!({"inputs": items})
        };
        let mut text = body.to_string();
        if escape_slashes {
            text = text.replace('/', "\\/");
        }
        let (status, answer) = predict(Some("application/json"), text.as_bytes());
        check_answer(status, &answer)?;
        match expected(&list) {
            Ok(n) => {
                prop_assert_eq!(status, 200, "{}", answer);
                prop_assert_eq!(answer["predictions"].as_array().map(Vec::len), Some(n));
            }
            Err((statuses, cause)) => {
                prop_assert!(statuses.contains(&status), "{} {}, expected {:?} {}", status, answer, statuses, cause);
                let message = answer["error"]["message"].as_str().unwrap_or_default();
                prop_assert!(message.contains(&cause), "{} (expected {:?})", message, cause);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn any_json_body_gets_200_or_a_4xx_naming_the_cause(
        value in any_json(),
        wrap in 0..3u8,
    ) {
        let body = match wrap {
            0 => value,
            1 => json!({"instances": value}),
            _ => json!({"inputs": value}),
        };
        let (status, answer) = predict(Some("application/json"), body.to_string().as_bytes());
        check_answer(status, &answer)?;
    }

    #[test]
    fn raw_bodies_of_any_bytes_and_content_type_get_200_or_a_4xx(
        header in prop_oneof![Just(None), (1u32..5000, 1u32..5000).prop_map(Some)],
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        content_type in prop_oneof![
            Just(None),
            Just(Some("image/jpeg")),
            Just(Some("image/png")),
            Just(Some("application/octet-stream")),
            Just(Some("application/json")),
            Just(Some("text/plain")),
            Just(Some("application/x-www-form-urlencoded")),
        ],
    ) {
        let mut body = header.map_or_else(Vec::new, |(w, h)| png(w, h));
        body.extend(bytes);
        let (status, answer) = predict(content_type, &body);
        check_answer(status, &answer)?;
        if let (Some((w, h)), Some("image/png" | "image/jpeg" | "application/octet-stream")) =
            (header, content_type)
        {
            let fits = u64::from(w) * u64::from(h) <= MAX_PIXELS;
            prop_assert_eq!(status, if fits { 200 } else { 413 }, "{}", answer);
        }
    }

    #[test]
    fn garbage_and_truncated_json_get_a_400_naming_the_cause(
        garbage in ".{0,300}",
        images in proptest::collection::vec((1u32..64, 1u32..64, style()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let (status, answer) = predict(Some("application/json"), garbage.as_bytes());
        check_answer(status, &answer)?;
        prop_assert_ne!(status, 200);
        // A good body cut short anywhere is malformed JSON.
        let items: Vec<Value> = images
            .iter()
            .map(|(w, h, style)| json!({"b64": encode(&png(*w, *h), *style)}))
            .collect();
        let whole = json!({"instances": items}).to_string();
        let at = cut.index(whole.len() - 1);
        let (status, answer) = predict(Some("application/json"), &whole.as_bytes()[..at]);
        check_answer(status, &answer)?;
        prop_assert_eq!(status, 400);
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        prop_assert!(message.contains("malformed JSON"), "{}", message);
    }
}

#[test]
fn the_server_is_still_serving_after_the_properties() {
    let r = agent()
        .get(format!("http://{}/healthz", server()))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
}
