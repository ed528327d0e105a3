//! Triton's model repository extension on `inference.GRPCInferenceService`: the index of the
//! repository's models, and loading and unloading them live.

use std::collections::HashMap;

use crate::error::{clip, ServeError};
use crate::pb::inference::repository_index_response::ModelIndex;
use crate::pb::inference::ModelRepositoryParameter;
use crate::registry::IndexEntry;

/// octserve serves one repository, which has no name.
pub fn check_repository_name(name: &str) -> Result<(), ServeError> {
    if name.is_empty() {
        return Ok(());
    }
    Err(ServeError::InvalidArgument(format!(
        "unknown repository '{}'; octserve has one repository: leave repository_name empty",
        clip(name)
    )))
}

/// Refuses Triton's load parameters that would hand the server a model: a `config` to use
/// instead of the manifest, or `file:` contents. A load reads the server's own repository only.
pub fn check_load_parameters(
    parameters: &HashMap<String, ModelRepositoryParameter>,
) -> Result<(), ServeError> {
    match parameters
        .keys()
        .find(|k| *k == "config" || k.starts_with("file:"))
    {
        Some(key) => Err(ServeError::InvalidArgument(format!(
            "load parameter '{}' is not supported: models are loaded from the server's \
             repository only",
            clip(key)
        ))),
        None => Ok(()),
    }
}

pub fn model_index(entry: IndexEntry) -> ModelIndex {
    ModelIndex {
        name: entry.name,
        version: entry.version,
        state: entry.state.as_str().into(),
        reason: entry.reason,
    }
}
