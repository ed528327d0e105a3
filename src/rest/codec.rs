//! The Open Inference Protocol's HTTP/REST infer body to the gRPC `ModelInferRequest`, and the
//! `ModelInferResponse` back to an HTTP body, so that both protocols share one request path.
//!
//! A body is a JSON object, optionally followed by Triton's binary tensor data: the request
//! header `Inference-Header-Content-Length` says how many of the body's bytes are JSON, and each
//! input with parameter `binary_data_size` takes that many of the bytes after it, in input
//! order, in the layout of gRPC's `raw_input_contents` (BYTES elements each a 4-byte
//! little-endian length and its bytes). In JSON, an input's `data` is a flat or nested array;
//! BYTES elements are base64 strings, since JSON strings cannot carry arbitrary bytes. An
//! output is sent as binary data when its parameter `binary_data` is true, or, when it says
//! nothing, when the request's parameter `binary_data_output` is true.

use std::collections::HashMap;
use std::fmt;

use base64::Engine;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::clip;
use crate::kserve::tensor::split_length_prefixed;
use crate::pb::inference::infer_parameter::ParameterChoice;
use crate::pb::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::pb::inference::model_metadata_response::TensorMetadata;
use crate::pb::inference::{InferParameter, InferTensorContents, ModelInferRequest};
use crate::pb::inference::{ModelInferResponse, ModelMetadataResponse};

/// The request header that gives the JSON part's length when binary tensor data follows it;
/// the response carries it too when any output is binary.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// An input's or output's byte count in the binary part.
const BINARY_DATA_SIZE: &str = "binary_data_size";
/// An output's request for its data in binary.
const BINARY_DATA: &str = "binary_data";
/// The request's default for outputs that do not say.
const BINARY_DATA_OUTPUT: &str = "binary_data_output";

/// A request the body cannot express; answered 400 with this message.
#[derive(Debug, PartialEq, Eq)]
pub struct BadBody(pub String);

impl fmt::Display for BadBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(message: impl Into<String>) -> BadBody {
    BadBody(message.into())
}

/// A parameter's JSON value: a boolean, an integer, a number or a string.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Parameter {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    String(String),
}

impl From<Parameter> for InferParameter {
    fn from(p: Parameter) -> Self {
        let choice = match p {
            Parameter::Bool(b) => ParameterChoice::BoolParam(b),
            Parameter::Int(i) => ParameterChoice::Int64Param(i),
            Parameter::Uint(u) => ParameterChoice::Uint64Param(u),
            Parameter::Double(d) => ParameterChoice::DoubleParam(d),
            Parameter::String(s) => ParameterChoice::StringParam(s),
        };
        InferParameter {
            parameter_choice: Some(choice),
        }
    }
}

type Parameters = HashMap<String, Parameter>;

#[derive(Debug, Deserialize)]
struct InferRequestJson {
    #[serde(default)]
    id: String,
    #[serde(default)]
    parameters: Parameters,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Debug, Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Parameters,
    data: Option<Data>,
}

#[derive(Debug, Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Parameters,
}

/// An input's `data`, flattened as it is read: numbers (and booleans, as 0 and 1) and strings,
/// at whatever depth of nested arrays. Read without an intermediate `serde_json::Value`, so a
/// body of N elements holds N values, not N values' worth of tree; serde_json's recursion limit
/// bounds the nesting.
#[derive(Debug, Default, PartialEq)]
struct Data {
    numbers: Vec<f32>,
    strings: Vec<String>,
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut data = Data::default();
        Flatten(&mut data).deserialize(deserializer)?;
        Ok(data)
    }
}

struct Flatten<'a>(&'a mut Data);

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of numbers, booleans or strings, flat or nested")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0.numbers.push(f32::from(u8::from(v)));
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.numbers.push(v as f32);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.numbers.push(v as f32);
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.numbers.push(v as f32);
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.strings.push(v.to_owned());
        Ok(())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.0.strings.push(v);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let data = self.0;
        while seq.next_element_seed(Flatten(&mut *data))?.is_some() {}
        Ok(())
    }
}

/// How each output of the response is to be sent.
#[derive(Debug, PartialEq, Eq)]
pub struct OutputForms {
    /// Per requested output, in order; for a request naming none, the one default output.
    binary: Vec<bool>,
}

/// Reads an infer body for `model_name` (and `model_version`, empty for the router's choice).
/// `header_length` is the `Inference-Header-Content-Length` header, if sent.
pub fn read_request(
    body: &[u8],
    header_length: Option<&str>,
    model_name: String,
    model_version: String,
) -> Result<(ModelInferRequest, OutputForms), BadBody> {
    let (json, mut binary) = match header_length {
        None => (body, &[][..]),
        Some(length) => {
            let length: usize = length.trim().parse().map_err(|_| {
                bad(format!(
                    "header {HEADER_LENGTH} must be a byte count, not '{}'",
                    clip(length)
                ))
            })?;
            if length > body.len() {
                return Err(bad(format!(
                    "header {HEADER_LENGTH} is {length} but the body has {} bytes",
                    body.len()
                )));
            }
            body.split_at(length)
        }
    };
    let request: InferRequestJson = serde_json::from_slice(json).map_err(|e| {
        bad(format!(
            "the request body is not a valid infer request: {e}"
        ))
    })?;
    let InferRequestJson {
        id,
        mut parameters,
        inputs,
        outputs,
    } = request;
    let binary_output = match parameters.remove(BINARY_DATA_OUTPUT) {
        None => false,
        Some(Parameter::Bool(b)) => b,
        Some(_) => {
            return Err(bad(format!(
                "parameter '{BINARY_DATA_OUTPUT}' must be a boolean"
            )))
        }
    };

    let mut raw_input_contents = Vec::new();
    let mut tensors = Vec::with_capacity(inputs.len());
    for input in inputs {
        let InputJson {
            name,
            shape,
            datatype,
            mut parameters,
            data,
        } = input;
        let size = parameters.remove(BINARY_DATA_SIZE);
        let contents = match (size, data) {
            (Some(size), None) => {
                let size = match size {
                    Parameter::Int(n) => usize::try_from(n).ok(),
                    Parameter::Uint(n) => usize::try_from(n).ok(),
                    _ => None,
                };
                let size = size.filter(|&n| n <= binary.len()).ok_or_else(|| {
                    bad(format!(
                        "input '{}': parameter '{BINARY_DATA_SIZE}' must be a byte count of at \
                         most the {} binary bytes left in the body",
                        clip(&name),
                        binary.len()
                    ))
                })?;
                let (taken, rest) = binary.split_at(size);
                raw_input_contents.push(taken.to_vec());
                binary = rest;
                None
            }
            (None, Some(data)) => Some(contents(&name, &datatype, data)?),
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "input '{}' has both 'data' and '{BINARY_DATA_SIZE}'; send one",
                    clip(&name)
                )))
            }
            (None, None) => {
                return Err(bad(format!(
                    "input '{}' has neither 'data' nor '{BINARY_DATA_SIZE}'",
                    clip(&name)
                )))
            }
        };
        tensors.push(InferInputTensor {
            name,
            datatype,
            shape,
            parameters: into_grpc(parameters),
            contents,
        });
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the JSON that no input's '{BINARY_DATA_SIZE}' claims",
            binary.len()
        )));
    }
    if !raw_input_contents.is_empty() && raw_input_contents.len() != tensors.len() {
        return Err(bad(format!(
            "send every input as binary data or none: {} of {} are",
            raw_input_contents.len(),
            tensors.len()
        )));
    }

    let mut forms = Vec::with_capacity(outputs.len().max(1));
    let mut requested = Vec::with_capacity(outputs.len());
    for output in outputs {
        let OutputJson {
            name,
            mut parameters,
        } = output;
        forms.push(match parameters.remove(BINARY_DATA) {
            None => binary_output,
            Some(Parameter::Bool(b)) => b,
            Some(_) => {
                return Err(bad(format!(
                    "output '{}': parameter '{BINARY_DATA}' must be a boolean",
                    clip(&name)
                )))
            }
        });
        requested.push(InferRequestedOutputTensor {
            name,
            parameters: into_grpc(parameters),
        });
    }
    if forms.is_empty() {
        forms.push(binary_output);
    }
    let request = ModelInferRequest {
        model_name,
        model_version,
        id,
        parameters: into_grpc(parameters),
        inputs: tensors,
        outputs: requested,
        raw_input_contents,
    };
    Ok((request, OutputForms { binary: forms }))
}

fn into_grpc(parameters: Parameters) -> HashMap<String, InferParameter> {
    parameters.into_iter().map(|(k, v)| (k, v.into())).collect()
}

/// An input's JSON `data` as gRPC contents of its datatype. Datatypes no input takes are
/// left for the shared path to refuse with the inputs it expects.
fn contents(name: &str, datatype: &str, data: Data) -> Result<InferTensorContents, BadBody> {
    let Data { numbers, strings } = data;
    let mut contents = InferTensorContents::default();
    match datatype {
        "BYTES" => {
            if !numbers.is_empty() {
                return Err(bad(format!(
                    "input '{}' is BYTES: its data are base64 strings, not numbers",
                    clip(name)
                )));
            }
            contents.bytes_contents = strings
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .map_err(|e| {
                            bad(format!(
                                "input '{}' element {i} is not base64: {e}",
                                clip(name)
                            ))
                        })
                })
                .collect::<Result<_, _>>()?;
        }
        "FP32" => {
            if !strings.is_empty() {
                return Err(bad(format!(
                    "input '{}' is FP32: its data are numbers, not strings",
                    clip(name)
                )));
            }
            contents.fp32_contents = numbers;
        }
        _ => {}
    }
    Ok(contents)
}

#[derive(Serialize)]
struct InferResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    id: &'a str,
    outputs: Vec<OutputTensorJson<'a>>,
}

#[derive(Serialize)]
struct OutputTensorJson<'a> {
    name: &'a str,
    datatype: &'a str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<OutputData>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutputData {
    Numbers(Vec<f32>),
    Strings(Vec<String>),
}

/// A response body, and the length of its JSON part when binary data follows it.
pub struct ResponseBody {
    pub bytes: Vec<u8>,
    pub header_length: Option<usize>,
}

/// The response in the forms the request asked for.
pub fn write_response(response: &ModelInferResponse, forms: &OutputForms) -> ResponseBody {
    let mut binary = Vec::new();
    let outputs = response
        .outputs
        .iter()
        .zip(&response.raw_output_contents)
        .enumerate()
        .map(|(i, (tensor, raw))| {
            let mut json = OutputTensorJson {
                name: &tensor.name,
                datatype: &tensor.datatype,
                shape: &tensor.shape,
                parameters: None,
                data: None,
            };
            if forms.binary.get(i).copied().unwrap_or(false) {
                json.parameters = Some(BinarySize {
                    binary_data_size: raw.len(),
                });
                binary.extend_from_slice(raw);
            } else if tensor.datatype == "BYTES" {
                // The server's own strings ("score:index:label"): always well formed.
                let strings = split_length_prefixed(raw).unwrap_or_default();
                json.data = Some(OutputData::Strings(
                    strings
                        .into_iter()
                        .map(|s| String::from_utf8_lossy(&s).into_owned())
                        .collect(),
                ));
            } else {
                json.data = Some(OutputData::Numbers(
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ));
            }
            json
        })
        .collect();
    let json = InferResponseJson {
        model_name: &response.model_name,
        model_version: &response.model_version,
        id: &response.id,
        outputs,
    };
    let mut bytes = serde_json::to_vec(&json).expect("plain data serialises");
    let header_length = (!binary.is_empty()).then_some(bytes.len());
    bytes.extend_from_slice(&binary);
    ResponseBody {
        bytes,
        header_length,
    }
}

#[derive(Serialize)]
struct TensorMetadataJson<'a> {
    name: &'a str,
    datatype: &'a str,
    shape: &'a [i64],
}

#[derive(Serialize)]
struct ModelMetadataJson<'a> {
    name: &'a str,
    versions: &'a [String],
    platform: &'a str,
    inputs: Vec<TensorMetadataJson<'a>>,
    outputs: Vec<TensorMetadataJson<'a>>,
}

/// `GET /v2/models/{model}`'s body.
pub fn model_metadata(metadata: &ModelMetadataResponse) -> Vec<u8> {
    fn tensors(list: &[TensorMetadata]) -> Vec<TensorMetadataJson<'_>> {
        list.iter()
            .map(|t| TensorMetadataJson {
                name: &t.name,
                datatype: &t.datatype,
                shape: &t.shape,
            })
            .collect()
    }
    let json = ModelMetadataJson {
        name: &metadata.name,
        versions: &metadata.versions,
        platform: &metadata.platform,
        inputs: tensors(&metadata.inputs),
        outputs: tensors(&metadata.outputs),
    };
    serde_json::to_vec(&json).expect("plain data serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::inference::model_infer_response::InferOutputTensor;

    fn read(body: &str) -> Result<(ModelInferRequest, OutputForms), BadBody> {
        read_request(body.as_bytes(), None, "m".into(), String::new())
    }

    #[test]
    fn nested_and_flat_data_give_the_same_fp32_contents() {
        let flat = r#"{"inputs":[{"name":"input","shape":[1,1,2,2],"datatype":"FP32","data":[1,2.5,3,4]}]}"#;
        let nested = r#"{"inputs":[{"name":"input","shape":[1,1,2,2],"datatype":"FP32","data":[[[[1,2.5],[3,4]]]]}]}"#;
        let (a, forms) = read(flat).unwrap();
        let (b, _) = read(nested).unwrap();
        let values = &a.inputs[0].contents.as_ref().unwrap().fp32_contents;
        assert_eq!(values, &[1., 2.5, 3., 4.]);
        assert_eq!(a.inputs, b.inputs);
        assert_eq!(
            forms,
            OutputForms {
                binary: vec![false]
            }
        );
    }

    #[test]
    fn bytes_data_are_base64_and_binary_data_follows_the_json() {
        let (request, _) = read(
            r#"{"inputs":[{"name":"image","shape":[2],"datatype":"BYTES","data":["aGk=",""]}]}"#,
        )
        .unwrap();
        let contents = request.inputs[0].contents.as_ref().unwrap();
        assert_eq!(contents.bytes_contents, [b"hi".to_vec(), vec![]]);
        let error =
            read(r#"{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":["%%"]}]}"#)
                .unwrap_err();
        assert!(error.0.contains("element 0 is not base64"), "{error}");

        let json = r#"{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}],"outputs":[{"name":"probabilities","parameters":{"classification":2,"binary_data":true}}]}"#;
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(&[2, 0, 0, 0, b'h', b'i']);
        let length = json.len().to_string();
        let (request, forms) = read_request(&body, Some(&length), "m".into(), "v".into()).unwrap();
        assert_eq!(request.raw_input_contents, [vec![2, 0, 0, 0, b'h', b'i']]);
        assert!(request.inputs[0].contents.is_none());
        assert!(request.inputs[0].parameters.is_empty());
        assert_eq!(forms.binary, [true]);
        assert_eq!(
            request.outputs[0].parameters["classification"],
            Parameter::Int(2).into()
        );
        assert!(!request.outputs[0].parameters.contains_key(BINARY_DATA));

        body.push(0);
        let error = read_request(&body, Some(&length), "m".into(), "v".into()).unwrap_err();
        assert!(error.0.contains("1 bytes of binary data"), "{error}");
        let error = read_request(&body, Some("99999"), "m".into(), "v".into()).unwrap_err();
        assert!(error.0.contains("but the body has"), "{error}");
    }

    #[test]
    fn malformed_bodies_are_refused_with_a_reason() {
        for (body, expected) in [
            ("{", "not a valid infer request"),
            (
                r#"{"inputs":[{"name":"input","shape":[1],"datatype":"FP32"}]}"#,
                "neither 'data'",
            ),
            (
                r#"{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":["a"]}]}"#,
                "not strings",
            ),
            (
                r#"{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[{"a":1}]}]}"#,
                "not a valid infer request",
            ),
            (
                r#"{"inputs":[],"parameters":{"binary_data_output":1}}"#,
                "must be a boolean",
            ),
        ] {
            let error = read(body).unwrap_err();
            assert!(error.0.contains(expected), "{body}: {error}");
        }
        // Nesting deeper than serde_json's recursion limit is an error, not a stack overflow.
        let deep = format!(
            r#"{{"inputs":[{{"name":"input","shape":[1],"datatype":"FP32","data":{}1{}}}]}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(read(&deep).unwrap_err().0.contains("recursion limit"));
    }

    #[test]
    fn outputs_are_written_as_json_or_binary_as_asked() {
        let probabilities: Vec<u8> = [0.25f32, 0.75]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let strings = [&[12u8, 0, 0, 0][..], b"0.750000:1:b"].concat();
        let response = ModelInferResponse {
            model_name: "m".into(),
            model_version: "v".into(),
            outputs: vec![
                InferOutputTensor {
                    name: "probabilities".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 2],
                    ..Default::default()
                },
                InferOutputTensor {
                    name: "probabilities".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1, 1],
                    ..Default::default()
                },
            ],
            raw_output_contents: vec![probabilities.clone(), strings],
            ..Default::default()
        };
        let json = write_response(
            &response,
            &OutputForms {
                binary: vec![false, false],
            },
        );
        assert_eq!(json.header_length, None);
        assert_eq!(
            String::from_utf8(json.bytes).unwrap(),
            r#"{"model_name":"m","model_version":"v","outputs":[{"name":"probabilities","datatype":"FP32","shape":[1,2],"data":[0.25,0.75]},{"name":"probabilities","datatype":"BYTES","shape":[1,1],"data":["0.750000:1:b"]}]}"#
        );
        let mixed = write_response(
            &response,
            &OutputForms {
                binary: vec![true, false],
            },
        );
        let length = mixed.header_length.unwrap();
        assert_eq!(mixed.bytes[length..], probabilities[..]);
        let head = std::str::from_utf8(&mixed.bytes[..length]).unwrap();
        assert!(
            head.contains(r#""parameters":{"binary_data_size":8}"#),
            "{head}"
        );
    }
}
