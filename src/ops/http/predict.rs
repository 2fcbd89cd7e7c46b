//! TensorFlow Serving's predict endpoint: the per-client rate limit, the global cap on predicts
//! in progress (`http.max_concurrent_predicts`, 503 beyond), the body read within its limits,
//! and the work (JSON, base64, image headers, then the service's decode and batch) on a
//! blocking thread that stops at the request's deadline.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::http::HeaderValue;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::response::Response;
use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use governor::clock::Clock as _;
use serde_json::Value;

use super::instances::parse_instances;
use super::{AppState, BODY_READ_TIMEOUT, PathParams, Shared, error_response, json_response};
use crate::ops::api::ApiError;

/// Largest width or height accepted by the predict endpoint.
pub const MAX_IMAGE_SIDE: u64 = 16384;

pub(super) async fn model_predict(
    State(s): State<AppState>,
    PathParams(segment): PathParams<String>,
    req: Request,
) -> Response {
    match split_verb(&segment) {
        Ok(name) => predict(s, name.to_string(), None, req).await,
        Err(e) => error_response(&e),
    }
}

pub(super) async fn version_predict(
    State(s): State<AppState>,
    PathParams((name, segment)): PathParams<(String, String)>,
    req: Request,
) -> Response {
    match split_verb(&segment) {
        Ok(version) => predict(s, name, Some(version.to_string()), req).await,
        Err(e) => error_response(&e),
    }
}

/// `efficientnet-lite0:predict` → `efficientnet-lite0`; any other verb is refused.
pub(super) fn split_verb(segment: &str) -> Result<&str, ApiError> {
    match segment.rsplit_once(':') {
        Some((name, "predict")) if !name.is_empty() => Ok(name),
        Some((_, verb)) => Err(ApiError::not_found(format!(
            "unsupported verb :{verb}; this server answers :predict"
        ))),
        None => Err(ApiError::not_found(format!(
            "POST {segment}:predict to get predictions"
        ))),
    }
}

async fn predict(s: AppState, name: String, version: Option<String>, req: Request) -> Response {
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip().to_canonical());
    if let Err(not_until) = s.limiter.check_key(&ip) {
        let wait = not_until.wait_time_from(s.limiter.clock().now());
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        s.count("rate_limited");
        let e = ApiError::new(
            429,
            "rate_limited",
            format!("too many predict requests from {ip}; retry in {secs} s"),
        );
        return with_retry_after(error_response(&e), secs);
    }
    // Taken before the body is read: the bodies in memory are capped too.
    let Ok(permit) = s.predicts.clone().try_acquire_owned() else {
        s.count("busy");
        let e = ApiError::new(
            503,
            "busy",
            format!(
                "{} predict requests are in progress, the most at once \
                 (http.max_concurrent_predicts); retry shortly",
                s.config.max_concurrent_predicts
            ),
        );
        return with_retry_after(error_response(&e), 1);
    };
    let result = predict_request(&s, name, version, req, permit).await;
    s.count(match &result {
        Ok(_) => "ok",
        Err(e) => outcome(e),
    });
    json_response(result)
}

fn with_retry_after(mut response: Response, secs: u64) -> Response {
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs));
    response
}

fn outcome(e: &ApiError) -> &'static str {
    match e.status {
        404 => "not_found",
        413 => "too_large",
        429 => "rate_limited",
        408 | 504 => "timeout",
        400..=499 => "bad_request",
        503 => "busy",
        _ => "error",
    }
}

/// Reads the body, then does the work on a blocking thread that holds `permit` to its end and
/// stops at the deadline (`http.predict_timeout` after the body is in), when the client gets
/// its 504.
async fn predict_request(
    s: &Shared,
    name: String,
    version: Option<String>,
    req: Request,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Value, ApiError> {
    let (content_type, body) = read_body(s.config.max_body_bytes, req).await?;
    let limit = s.config.predict_timeout;
    let deadline = Instant::now() + limit;
    let (api, max_pixels) = (s.api.clone(), s.config.max_image_pixels);
    let work = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let images = images_from_body(content_type.as_deref(), body, max_pixels, deadline)?;
        api.predict(&name, version.as_deref(), images, deadline)
    });
    match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "HTTP request: the predict call failed");
            Err(ApiError::new(500, "internal", "predict failed"))
        }
        Err(_) => Err(timeout(limit)),
    }
}

fn timeout(limit: std::time::Duration) -> ApiError {
    ApiError::new(
        504,
        "timeout",
        format!(
            "no prediction within {} (http.predict_timeout)",
            humantime::format_duration(limit)
        ),
    )
}

/// The body, within `max` bytes, and its content type (lower case).
async fn read_body(max: usize, req: Request) -> Result<(Option<String>, Bytes), ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "body_too_large",
            format!("the request body is over {max} bytes (http.max_body_bytes)"),
        )
    };
    let headers = req.headers();
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match tokio::time::timeout(BODY_READ_TIMEOUT, Bytes::from_request(req, &())).await {
        Ok(Ok(body)) => Ok((content_type, body)),
        Ok(Err(e @ BytesRejection::FailedToBufferBody(_))) if e.status() == 413 => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
        Err(_) => Err(ApiError::new(
            408,
            "request_timeout",
            "the request body took too long to arrive",
        )),
    }
}

/// An image body: `image/*` or `application/octet-stream`.
fn content_type_is_raw(content_type: Option<&str>) -> bool {
    content_type
        .is_some_and(|ct| ct.starts_with("image/") || ct.starts_with("application/octet-stream"))
}

/// The encoded images of a predict body (the body itself, or the `b64` values of its JSON),
/// each checked from its header; gives up once `deadline` has passed.
pub(super) fn images_from_body(
    content_type: Option<&str>,
    body: Bytes,
    max_pixels: u64,
    deadline: Instant,
) -> Result<Vec<Vec<u8>>, ApiError> {
    let json = match content_type {
        _ if content_type_is_raw(content_type) => false,
        Some(ct) if ct.contains("json") => true,
        // curl -d sends application/x-www-form-urlencoded: look at the body.
        _ => body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{'),
    };
    if !json {
        if body.is_empty() {
            return Err(ApiError::bad_request(
                "empty body: send an image, or JSON {\"instances\": [{\"b64\": \"...\"}]}",
            ));
        }
        check_image("the image", &body, max_pixels)?;
        return Ok(vec![Vec::from(body)]);
    }
    let texts = parse_instances(&body)?;
    let mut images = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        if Instant::now() >= deadline {
            return Err(ApiError::new(504, "timeout", "past the request's deadline"));
        }
        let image = decode_base64(text)
            .map_err(|e| ApiError::bad_request(format!("instance {i}: invalid base64: {e}")))?;
        check_image(&format!("instance {i}"), &image, max_pixels)?;
        images.push(image);
    }
    Ok(images)
}

const PADDING_OPTIONAL: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, PADDING_OPTIONAL);
const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, PADDING_OPTIONAL);

/// Standard or URL-safe base64, padded or not; line breaks are ignored.
pub(super) fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let text: Cow<str> = if text.bytes().any(|b| b.is_ascii_whitespace()) {
        Cow::Owned(text.chars().filter(|c| !c.is_ascii_whitespace()).collect())
    } else {
        Cow::Borrowed(text)
    };
    STANDARD
        .decode(text.as_bytes())
        .or_else(|e| URL_SAFE.decode(text.as_bytes()).map_err(|_| e))
}

/// Checks the image's format and dimensions from its header, before anything decodes it.
fn check_image(what: &str, data: &[u8], max_pixels: u64) -> Result<(), ApiError> {
    use imagesize::ImageType;
    let bad = |detail: String| ApiError::new(400, "bad_image", format!("{what}: {detail}"));
    let kind = imagesize::image_type(data)
        .map_err(|_| bad("not an image (JPEG, PNG, BMP, WebP, TIFF or PNM expected)".into()))?;
    if !matches!(
        kind,
        ImageType::Jpeg
            | ImageType::Png
            | ImageType::Bmp
            | ImageType::Webp
            | ImageType::Tiff
            | ImageType::Pnm
            | ImageType::Hdr
    ) {
        return Err(ApiError::new(
            415,
            "bad_image",
            format!(
                "{what}: {kind:?} images are not supported; send JPEG, PNG, BMP, WebP, TIFF or PNM"
            ),
        ));
    }
    let size = imagesize::blob_size(data)
        .map_err(|e| bad(format!("cannot read the image's dimensions ({e})")))?;
    let (w, h) = (size.width as u64, size.height as u64);
    if w == 0 || h == 0 {
        return Err(bad(format!("the image is {w}x{h}")));
    }
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || w.saturating_mul(h) > max_pixels {
        return Err(ApiError::new(
            413,
            "image_too_large",
            format!(
                "{what} is {w}x{h}; the limits are {max_pixels} pixels (http.max_image_pixels) \
                 and {MAX_IMAGE_SIDE} per side"
            ),
        ));
    }
    Ok(())
}
