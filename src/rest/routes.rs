//! The Open Inference Protocol's HTTP/REST routes, answered by the same [`InferenceService`]
//! as its gRPC form: health, server and model metadata, readiness, and infer.
//!
//! Health (`/v2/health/*`) is open, like gRPC health, so that probes need no secret; every
//! other route takes the API key when one is set. A failure is `{"error": "..."}` with the
//! HTTP status of its gRPC code ([`crate::error::http_status`]).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use tonic::Code;

use super::codec::{self, HEADER_LENGTH};
use super::repository;
use crate::error::http_status;
use crate::kserve::InferenceService;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::pb::inference::*;
use crate::security::ApiKey;
use crate::service::ServingState;

/// Extensions this port implements beyond the gRPC service's.
const HTTP_EXTENSIONS: &[&str] = &["binary_tensor_data"];

/// What a too-large infer body is told.
const INFER_BODY_HINT: &str = " ([limits] max_request_bytes); send fewer images, or binary \
                               tensor data instead of JSON";

/// What every handler shares.
pub struct App {
    pub state: Arc<ServingState>,
    pub inference: InferenceService,
    pub api_key: Option<ApiKey>,
    /// Largest request body, in bytes; a larger one is refused (413) before it is read.
    pub max_body_bytes: usize,
}

type Shared = State<Arc<App>>;

/// The routes. Each guarded route is one `.route` line in `guarded`.
pub fn router(app: Arc<App>) -> Router {
    let guarded = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}", get(model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(version_metadata),
        )
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(version_ready),
        )
        .route("/v2/models/{model}/infer", post(model_infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(version_infer),
        )
        .route("/v2/repository/index", post(repository::index))
        .route("/v2/repository/models/{model}/load", post(repository::load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository::unload),
        )
        .route_layer(middleware::from_fn_with_state(app.clone(), require_api_key));
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        .merge(guarded)
        .fallback(|| async { error(Code::NotFound, "no such route; the routes are under /v2") })
        .with_state(app)
}

/// `{"error": message}` with the status of `code`.
pub fn error(code: Code, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct ErrorJson {
        error: String,
    }
    let body = ErrorJson {
        error: message.into(),
    };
    let mut response = json(serde_json::to_vec(&body).expect("plain data serialises"));
    *response.status_mut() = http_status(code);
    response
}

pub fn from_status(status: tonic::Status) -> Response {
    error(status.code(), status.message())
}

pub fn json(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn require_api_key(State(app): Shared, request: Request, next: Next) -> Response {
    match &app.api_key {
        Some(key) if !key.admits(request.headers()) => error(
            Code::Unauthenticated,
            "missing or wrong API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>'",
        ),
        _ => next.run(request).await,
    }
}

/// Health and readiness answer with the status alone, as the protocol says: 200 for true,
/// 400 for false.
fn truth(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

async fn server_ready(State(app): Shared) -> StatusCode {
    truth(app.state.is_ready())
}

async fn server_metadata(State(app): Shared) -> Response {
    #[derive(Serialize)]
    struct ServerMetadataJson {
        name: String,
        version: String,
        extensions: Vec<String>,
    }
    let request = tonic::Request::new(ServerMetadataRequest {});
    match app.inference.server_metadata(request).await {
        Ok(response) => {
            let metadata = response.into_inner();
            let mut extensions = metadata.extensions;
            extensions.extend(HTTP_EXTENSIONS.iter().map(|e| e.to_string()));
            let body = ServerMetadataJson {
                name: metadata.name,
                version: metadata.version,
                extensions,
            };
            json(serde_json::to_vec(&body).expect("plain data serialises"))
        }
        Err(status) => from_status(status),
    }
}

async fn metadata(app: &App, name: String, version: String) -> Response {
    let request = tonic::Request::new(ModelMetadataRequest { name, version });
    match app.inference.model_metadata(request).await {
        Ok(response) => json(codec::model_metadata(&response.into_inner())),
        Err(status) => from_status(status),
    }
}

async fn model_metadata(State(app): Shared, Path(model): Path<String>) -> Response {
    metadata(&app, model, String::new()).await
}

async fn version_metadata(
    State(app): Shared,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    metadata(&app, model, version).await
}

async fn ready(app: &App, name: String, version: String) -> Response {
    let request = tonic::Request::new(ModelReadyRequest { name, version });
    match app.inference.model_ready(request).await {
        Ok(response) => truth(response.into_inner().ready).into_response(),
        Err(status) => from_status(status),
    }
}

async fn model_ready(State(app): Shared, Path(model): Path<String>) -> Response {
    ready(&app, model, String::new()).await
}

async fn version_ready(
    State(app): Shared,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    ready(&app, model, version).await
}

async fn model_infer(State(app): Shared, Path(model): Path<String>, request: Request) -> Response {
    infer(&app, model, String::new(), request).await
}

async fn version_infer(
    State(app): Shared,
    Path((model, version)): Path<(String, String)>,
    request: Request,
) -> Response {
    infer(&app, model, version, request).await
}

/// Reads the body within the limit, translates it into `ModelInferRequest`, runs the gRPC
/// service's `ModelInfer` and translates its answer. A request arriving during the drain is
/// refused before its body is read; an admitted one counts as in flight while it uploads.
async fn infer(app: &App, model: String, version: String, request: Request) -> Response {
    let _in_flight = match app.state.admit() {
        Ok(in_flight) => in_flight,
        Err(status) => return from_status(status),
    };
    let (parts, body) = request.into_parts();
    let body = match read_body(&parts.headers, body, app.max_body_bytes, INFER_BODY_HINT).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let header_length = match parts.headers.get(HEADER_LENGTH).map(HeaderValue::to_str) {
        None => None,
        Some(Ok(length)) => Some(length),
        Some(Err(_)) => {
            return error(
                Code::InvalidArgument,
                format!("header {HEADER_LENGTH} must be a byte count"),
            )
        }
    };
    let (request, forms) = match codec::read_request(&body, header_length, model, version) {
        Ok(read) => read,
        Err(e) => return error(Code::InvalidArgument, e.0),
    };
    drop(body);
    let response = match app
        .inference
        .model_infer(tonic::Request::new(request))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return from_status(status),
    };
    let body = codec::write_response(&response, &forms);
    match body.header_length {
        None => json(body.bytes),
        Some(length) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    header::HeaderName::from_static(HEADER_LENGTH),
                    length.into(),
                ),
            ],
            body.bytes,
        )
            .into_response(),
    }
}

/// The whole body, refused with 413 as soon as it is known to be over `limit`: from its
/// `Content-Length` before a byte of it is read, or, sent chunked, once `limit` bytes are in.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    hint: &str,
) -> Result<Bytes, Response> {
    let too_large = || {
        error_with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the limit of {limit} bytes{hint}"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => Err(error(
            Code::InvalidArgument,
            format!("reading the request body failed: {e}"),
        )),
    }
}

/// `{"error": message}` with a status no gRPC code has (413).
fn error_with_status(status: StatusCode, message: String) -> Response {
    let mut response = error(Code::InvalidArgument, message);
    *response.status_mut() = status;
    response
}
