//! The serving errors and their one mapping to gRPC status codes, and from those to the HTTP/REST
//! port's statuses.

use tonic::{Code, Status};

use crate::batcher::InferError;
use crate::preprocess::PreprocessError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The served models are not listed: callers find them with ListModels or the KServe
    /// repository index, which an operator can put behind the API key like every RPC.
    #[error(
        "unknown model '{}'; ListModels or the repository index lists the served models",
        clip(name)
    )]
    UnknownModel { name: String },
    #[error("model '{}' has no variant '{}'", clip(model), clip(variant))]
    UnknownVariant { model: String, variant: String },
    #[error("model '{0}' has no variant with a routing weight; name a variant")]
    NoRoutableVariant(String),
    #[error("bad image: {0}")]
    BadImage(#[from] PreprocessError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{}", infer_message(.0))]
    Infer(#[from] InferError),
    #[error("the models are still loading; retry shortly")]
    Loading,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Budget(#[from] crate::budget::BudgetError),
    #[error("the deadline passed before the request was computed")]
    DeadlineExceeded,
    #[error(
        "model control is '{}': the server does not load or unload models on request; \
         start it with --model-control explicit",
        .0
    )]
    ModelControl(crate::repository::ModelControl),
    #[error(
        "model '{}' was not loaded, and is served as it was (if it was): {reason}",
        clip(model)
    )]
    ModelLoad { model: String, reason: String },
    /// A server fault; the cause goes to the log, the client gets a fixed message.
    #[error("internal error; see the server log")]
    Internal(String),
}

impl ServeError {
    pub fn code(&self) -> Code {
        match self {
            Self::UnknownModel { .. } | Self::UnknownVariant { .. } => Code::NotFound,
            Self::NoRoutableVariant(_) | Self::BadImage(_) | Self::InvalidArgument(_) => {
                Code::InvalidArgument
            }
            Self::Loading | Self::ShuttingDown => Code::Unavailable,
            Self::Budget(e) => match e {
                crate::budget::BudgetError::Busy { .. } => Code::ResourceExhausted,
                crate::budget::BudgetError::DeadlineExceeded => Code::DeadlineExceeded,
            },
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::ModelControl(_) | Self::ModelLoad { .. } => Code::FailedPrecondition,
            Self::Internal(_) => Code::Internal,
            Self::Infer(e) => match e {
                InferError::QueueFull { .. } | InferError::QueueTimeout { .. } => {
                    Code::ResourceExhausted
                }
                InferError::DeadlineExceeded => Code::DeadlineExceeded,
                InferError::ShuttingDown => Code::Unavailable,
                InferError::Model(_) | InferError::WorkerDied => Code::Internal,
            },
        }
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        if let ServeError::Internal(cause) = &e {
            tracing::error!(%cause, "internal error");
        }
        Status::new(e.code(), e.to_string())
    }
}

/// The HTTP/REST port's status for a gRPC code, so that both protocols answer a failure alike.
pub fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode;
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// What a client is told of a failed job. A model's failure carries the server's internal error
/// chain, which stays in the server log (the worker logs it where the batch fails).
fn infer_message(e: &InferError) -> String {
    match e {
        InferError::Model(_) => "the model failed on this batch; see the server log".into(),
        e => e.to_string(),
    }
}

/// Longest a client-provided string is echoed in a message, in characters.
const CLIP_CHARS: usize = 64;

/// `s` for an error message: at most [`CLIP_CHARS`] characters, then an ellipsis if it was
/// longer, so that a huge name sent by a client does not come back as a huge message.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(CLIP_CHARS) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_strings_and_cuts_long_ones_on_a_char_boundary() {
        assert_eq!(clip("fashion-mnist"), "fashion-mnist");
        let exact = "a".repeat(CLIP_CHARS);
        assert_eq!(clip(&exact), exact);
        let long = "é".repeat(1 << 20);
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), CLIP_CHARS + 1);
        assert!(clipped.ends_with("é…"), "{clipped}");
    }

    #[test]
    fn not_found_messages_echo_little_and_list_nothing() {
        let name = "m".repeat(1 << 20);
        let status = Status::from(ServeError::UnknownModel { name: name.clone() });
        assert_eq!(status.code(), Code::NotFound);
        assert!(
            status.message().len() < 200,
            "{} bytes",
            status.message().len()
        );
        assert!(
            status
                .message()
                .contains("ListModels or the repository index"),
            "{}",
            status.message()
        );
        let status = Status::from(ServeError::UnknownVariant {
            model: "toy".into(),
            variant: name,
        });
        assert_eq!(status.code(), Code::NotFound);
        assert!(
            status.message().len() < 200,
            "{} bytes",
            status.message().len()
        );
        assert!(status
            .message()
            .starts_with("model 'toy' has no variant 'mmm"));
    }

    #[test]
    fn a_model_failure_reaches_the_client_without_its_internal_chain() {
        let chain = "conv2 forward: shape mismatch in /build/src/model/octave.rs:120".to_string();
        let status = Status::from(ServeError::Infer(InferError::Model(chain)));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(
            status.message(),
            "the model failed on this batch; see the server log"
        );
        let status = Status::from(ServeError::Infer(InferError::WorkerDied));
        assert!(
            status.message().contains("restarted"),
            "{}",
            status.message()
        );
    }
}
