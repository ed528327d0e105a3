//! Triton's model repository extension over HTTP: `POST /v2/repository/index`,
//! `/v2/repository/models/{model}/load` and `/unload`, answered by the same gRPC service calls
//! (so the same model control mode, checks and status codes apply).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tonic::Code;

use super::routes::{error, from_status, json, read_body, App};
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::pb::inference::model_repository_parameter::ParameterChoice;
use crate::pb::inference::*;

/// Repository request bodies are small JSON objects.
const MAX_BODY_BYTES: usize = 64 << 10;

#[derive(Default, Deserialize)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

#[derive(Default, Deserialize)]
struct ChangeRequest {
    #[serde(default)]
    parameters: HashMap<String, serde_json::Value>,
}

#[derive(Serialize)]
struct IndexEntry {
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    version: String,
    state: String,
    reason: String,
}

/// The JSON body, `{}` when empty; a malformed one is a 400.
async fn body<T: Default + serde::de::DeserializeOwned>(request: Request) -> Result<T, Response> {
    let (parts, body) = request.into_parts();
    let bytes = read_body(&parts.headers, body, MAX_BODY_BYTES, "").await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| error(Code::InvalidArgument, format!("malformed JSON body: {e}")))
}

pub async fn index(State(app): State<Arc<App>>, request: Request) -> Response {
    let IndexRequest { ready } = match body(request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let request = tonic::Request::new(RepositoryIndexRequest {
        repository_name: String::new(),
        ready,
    });
    match app.inference.repository_index(request).await {
        Ok(response) => {
            let entries: Vec<IndexEntry> = response
                .into_inner()
                .models
                .into_iter()
                .map(|m| IndexEntry {
                    name: m.name,
                    version: m.version,
                    state: m.state,
                    reason: m.reason,
                })
                .collect();
            json(serde_json::to_vec(&entries).expect("plain data serialises"))
        }
        Err(status) => from_status(status),
    }
}

pub async fn load(app: State<Arc<App>>, Path(model): Path<String>, request: Request) -> Response {
    change(app, model, request, Change::Load).await
}

pub async fn unload(app: State<Arc<App>>, Path(model): Path<String>, request: Request) -> Response {
    change(app, model, request, Change::Unload).await
}

enum Change {
    Load,
    Unload,
}

/// A load or unload call: 200 with an empty body once done, as Triton answers.
async fn change(
    State(app): State<Arc<App>>,
    model: String,
    request: Request,
    change: Change,
) -> Response {
    let parameters = match body::<ChangeRequest>(request).await {
        Ok(body) => grpc_parameters(body.parameters),
        Err(response) => return response,
    };
    let done = match change {
        Change::Load => {
            let request = RepositoryModelLoadRequest {
                repository_name: String::new(),
                model_name: model,
                parameters,
            };
            app.inference
                .repository_model_load(tonic::Request::new(request))
                .await
                .map(drop)
        }
        Change::Unload => {
            let request = RepositoryModelUnloadRequest {
                repository_name: String::new(),
                model_name: model,
                parameters,
            };
            app.inference
                .repository_model_unload(tonic::Request::new(request))
                .await
                .map(drop)
        }
    };
    match done {
        Ok(()) => StatusCode::OK.into_response(),
        Err(status) => from_status(status),
    }
}

/// JSON parameters as the gRPC call's: their names are what the service checks.
fn grpc_parameters(
    parameters: HashMap<String, serde_json::Value>,
) -> HashMap<String, ModelRepositoryParameter> {
    parameters
        .into_iter()
        .map(|(name, value)| {
            let choice = match value {
                serde_json::Value::Bool(b) => ParameterChoice::BoolParam(b),
                serde_json::Value::String(s) => ParameterChoice::StringParam(s),
                other => ParameterChoice::StringParam(other.to_string()),
            };
            let parameter = ModelRepositoryParameter {
                parameter_choice: Some(choice),
            };
            (name, parameter)
        })
        .collect()
}
