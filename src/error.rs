//! The serving errors and their one mapping to gRPC status codes.

use tonic::{Code, Status};

use crate::batcher::InferError;
use crate::preprocess::PreprocessError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("unknown model '{name}'; this server serves: {known}")]
    UnknownModel { name: String, known: String },
    #[error("model '{model}' has no variant '{variant}'; its variants are: {known}")]
    UnknownVariant {
        model: String,
        variant: String,
        known: String,
    },
    #[error("model '{0}' has no variant with a routing weight; name a variant")]
    NoRoutableVariant(String),
    #[error("bad image: {0}")]
    BadImage(#[from] PreprocessError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Infer(#[from] InferError),
    #[error("the models are still loading; retry shortly")]
    Loading,
    #[error("the deadline passed before the request was computed")]
    DeadlineExceeded,
}

impl ServeError {
    pub fn code(&self) -> Code {
        match self {
            Self::UnknownModel { .. } | Self::UnknownVariant { .. } => Code::NotFound,
            Self::NoRoutableVariant(_) | Self::BadImage(_) | Self::InvalidArgument(_) => {
                Code::InvalidArgument
            }
            Self::Loading => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
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
        Status::new(e.code(), e.to_string())
    }
}
