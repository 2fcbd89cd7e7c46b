//! The teach endpoints: heads, their inboxes, labelling, training and version switches, and the
//! operator's "wrong" flags: on an event (its starting picture) or on a camera (its next frames).

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::{
    AppState, PathParams, QueryParams, call, error_response, jpeg_response, json_response,
};
use crate::ops::api::ApiError;

/// The teach routes (the caller adds the token and host checks).
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/heads", get(heads))
        .route("/api/heads/{head}/inbox", get(inbox))
        .route(
            "/api/heads/{head}/inbox/{id}",
            axum::routing::delete(discard),
        )
        .route("/api/heads/{head}/inbox/{id}/image.jpg", get(sample))
        .route("/api/heads/{head}/inbox/{id}/label", post(label))
        .route("/api/heads/{head}/train", get(job).post(train))
        .route(
            "/api/heads/{head}/versions/{version}/activate",
            post(activate),
        )
        .route("/api/cameras/{id}/wrong", post(wrong))
        .route("/api/events/{id}/wrong", post(wrong_event))
}

async fn heads(State(s): State<AppState>) -> Response {
    json_response(call(&s, "heads", |api| Ok(api.heads())).await)
}

async fn inbox(State(s): State<AppState>, PathParams(head): PathParams<String>) -> Response {
    json_response(call(&s, "inbox", move |api| api.head_inbox(&head)).await)
}

async fn sample(
    State(s): State<AppState>,
    PathParams((head, id)): PathParams<(String, String)>,
) -> Response {
    jpeg_response(call(&s, "sample", move |api| api.head_sample(&head, &id)).await)
}

async fn discard(
    State(s): State<AppState>,
    PathParams((head, id)): PathParams<(String, String)>,
) -> Response {
    json_response(call(&s, "discard", move |api| api.label_sample(&head, &id, None)).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelBody {
    label: String,
}

/// `{"label": "<label>"}`: the sample moves into that label's folder of the training set.
async fn label(
    State(s): State<AppState>,
    PathParams((head, id)): PathParams<(String, String)>,
    body: Bytes,
) -> Response {
    let body: LabelBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error_response(&ApiError::bad_request(format!(
                "the body must be {{\"label\": \"<label>\"}}: {e}"
            )));
        }
    };
    json_response(
        call(&s, "label", move |api| {
            api.label_sample(&head, &id, Some(&body.label))
        })
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainQuery {
    #[serde(default)]
    force: bool,
}

/// Starts a training job: 202, then `GET` the same path for its state and report.
async fn train(
    State(s): State<AppState>,
    PathParams(head): PathParams<String>,
    QueryParams(q): QueryParams<TrainQuery>,
) -> Response {
    let force = q.force;
    match call(&s, "train", move |api| api.train_head(&head, force)).await {
        Ok(v) => (StatusCode::ACCEPTED, axum::Json(v)).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn job(State(s): State<AppState>, PathParams(head): PathParams<String>) -> Response {
    json_response(call(&s, "training job", move |api| api.train_status(&head)).await)
}

async fn activate(
    State(s): State<AppState>,
    PathParams((head, version)): PathParams<(String, u32)>,
) -> Response {
    json_response(call(&s, "activate", move |api| api.activate_head(&head, version)).await)
}

async fn wrong(State(s): State<AppState>, PathParams(camera): PathParams<String>) -> Response {
    json_response(call(&s, "flag", move |api| api.flag_wrong(&camera)).await)
}

async fn wrong_event(State(s): State<AppState>, PathParams(event): PathParams<String>) -> Response {
    json_response(call(&s, "flag", move |api| api.flag_event(&event)).await)
}
