//! `inference.GRPCInferenceService`: the Open Inference Protocol (KServe v2), served on the same
//! port, batcher, A/B router and metrics as `octserve.v1.Classifier`, so Triton and KServe
//! clients work unchanged.
//!
//! `model_name` is the logical model and `model_version` the variant (empty: the router picks,
//! and the response's `model_version` says which answered). A request of N images is split into
//! N batcher jobs, all on one variant, and reassembled in order.

mod repository;
pub mod tensor;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::deadline::deadline;
use crate::error::ServeError;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::pb::inference::infer_parameter::ParameterChoice;
use crate::pb::inference::*;
use crate::service::{RequestRecord, ServingState};
use tensor::Images;

pub use tensor::{IMAGE, INPUT, PROBABILITIES};

/// Extensions of the protocol this server implements.
const EXTENSIONS: &[&str] = &["classification"];
const PLATFORM: &str = "octserve_candle";
/// Request parameter that pins the router's choice, like `ClassifyRequest.routing_key`.
const ROUTING_KEY: &str = "routing_key";
/// Request parameter (Triton's): how many microseconds the caller waits for its answer. Over
/// HTTP, which has no `grpc-timeout`, the way a client sets a deadline.
const TIMEOUT: &str = "timeout";

/// The KServe v2 service over a shared [`ServingState`].
#[derive(Clone)]
pub struct InferenceService {
    state: Arc<ServingState>,
}

impl InferenceService {
    pub fn new(state: Arc<ServingState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = self.state.is_ready();
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let known = self
            .state
            .registry()
            .ok()
            .and_then(|r| r.model(&request.name).ok());
        let ready = self.state.is_ready()
            && known.is_some_and(|model| {
                request.version.is_empty()
                    || model.variants.iter().any(|v| v.name == request.version)
            });
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let model = self.state.registry()?.model(&request.name)?;
        if !request.version.is_empty() {
            model.variant(&request.version, "")?;
        }
        let (inputs, outputs) = tensor::metadata(&model.input, model.labels.len());
        Ok(Response::new(ModelMetadataResponse {
            name: model.name.clone(),
            versions: model.variants.iter().map(|v| v.name.clone()).collect(),
            platform: PLATFORM.into(),
            inputs,
            outputs,
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let _in_flight = self.state.admit()?;
        let deadline = deadline(&request);
        let request = request.into_inner();
        let span = tracing::info_span!(
            "model_infer",
            model = %request.model_name,
            version = %request.model_version
        );
        async {
            let response = infer(&self.state, request, deadline).await;
            if let Err(e) = &response {
                tracing::debug!(error = %e, "request failed");
            }
            Ok(Response::new(response?))
        }
        .instrument(span)
        .await
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let request = request.into_inner();
        repository::check_repository_name(&request.repository_name)?;
        let index = self.state.repository_index(request.ready).await?;
        let models = index.into_iter().map(repository::model_index).collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let _in_flight = self.state.admit()?;
        let request = request.into_inner();
        repository::check_repository_name(&request.repository_name)?;
        repository::check_load_parameters(&request.parameters)?;
        let change = self.state.load_model(&request.model_name).await?;
        tracing::info!(model = %request.model_name, ?change, "model loaded on request");
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let _in_flight = self.state.admit()?;
        let request = request.into_inner();
        repository::check_repository_name(&request.repository_name)?;
        self.state.unload_model(&request.model_name).await?;
        tracing::info!(model = %request.model_name, "model unloaded on request");
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

/// The deadline a request's [`TIMEOUT`] parameter sets, counted from `from`; `None` without
/// one (or one too far away to represent).
fn timeout_deadline(
    parameters: &HashMap<String, InferParameter>,
    from: Instant,
) -> Result<Option<Instant>, ServeError> {
    let Some(parameter) = parameters.get(TIMEOUT) else {
        return Ok(None);
    };
    let micros = match parameter.parameter_choice {
        Some(ParameterChoice::Int64Param(us)) => u64::try_from(us).ok(),
        Some(ParameterChoice::Uint64Param(us)) => Some(us),
        _ => None,
    };
    let micros = micros.ok_or_else(|| {
        ServeError::InvalidArgument(format!(
            "parameter '{TIMEOUT}' must be a whole number of microseconds, at least 0"
        ))
    })?;
    Ok(from.checked_add(Duration::from_micros(micros)))
}

/// The whole `ModelInfer` path for one request, with its metrics.
async fn infer(
    state: &ServingState,
    request: ModelInferRequest,
    deadline: Option<Instant>,
) -> Result<ModelInferResponse, ServeError> {
    let started = Instant::now();
    let ModelInferRequest {
        model_name,
        model_version,
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
    } = request;
    let served = state.registry()?.model(&model_name)?;
    let model = &*served;
    let routing_key = match parameters
        .get(ROUTING_KEY)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::StringParam(key)) => key.as_str(),
        _ => "",
    };
    let variant = model.variant(&model_version, routing_key)?;
    let record = RequestRecord::new(variant, started);
    let result = async {
        let deadline = match timeout_deadline(&parameters, started)? {
            Some(asked) => Some(deadline.map_or(asked, |d| d.min(asked))),
            None => deadline,
        };
        let outputs = tensor::requested_outputs(&outputs, model.labels.len())?;
        let images = tensor::read_inputs(
            inputs,
            raw_input_contents,
            &model.input,
            variant.queue.capacity(),
        )?;
        let response_bytes = tensor::response_bytes(&outputs, images.len(), &model.labels);
        let limit = state.limits.max_response_bytes;
        if response_bytes > limit {
            return Err(ServeError::InvalidArgument(format!(
                "the response would be about {response_bytes} bytes, over the limit of {limit}; \
                 send fewer images or ask for fewer classes"
            )));
        }
        variant.queue.ensure_room(images.len())?;
        let inputs = match images {
            Images::Normalised(inputs) => inputs,
            Images::Encoded(images) => {
                try_join_all(images.into_iter().enumerate().map(|(i, image)| async move {
                    let decoded = state.decode(model, image, deadline).await;
                    let decoded = decoded.map_err(|e| match e {
                        ServeError::BadImage(e) => ServeError::InvalidArgument(format!(
                            "input '{IMAGE}' element {i}: bad image: {e}"
                        )),
                        e => e,
                    })?;
                    variant.labels.decoded(decoded.time.as_secs_f64());
                    Ok::<_, ServeError>(decoded.input)
                }))
                .await?
            }
        };
        let predictions = try_join_all(
            inputs
                .into_iter()
                .map(|input| state.infer(model, variant, input, deadline)),
        )
        .await?;
        let probabilities: Vec<&[f32]> = predictions.iter().map(|p| &p.probabilities[..]).collect();
        Ok(tensor::write_outputs(
            &outputs,
            &probabilities,
            &model.labels,
        ))
    }
    .await;
    let (outputs, raw_output_contents) = record.finish(result)?;
    Ok(ModelInferResponse {
        model_name: model.name.clone(),
        model_version: variant.name.clone(),
        id,
        parameters: Default::default(),
        outputs,
        raw_output_contents,
    })
}
