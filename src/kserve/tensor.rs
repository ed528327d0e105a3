//! Open Inference Protocol tensors to octserve inputs, and predictions back to tensors.
//!
//! A model takes one of two inputs: `input`, FP32 `[N, C, H, W]` already normalised, or `image`,
//! BYTES `[N]` encoded images (decoded like `Classify`'s). It gives one output, `probabilities`,
//! FP32 `[N, K]`; with Triton's classification extension (the output's parameter
//! `classification` = k) the same output is BYTES `[N, k]` strings `"score:index:label"`.

use crate::error::{clip, ServeError};
use crate::pb::inference::infer_parameter::ParameterChoice;
use crate::pb::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::pb::inference::model_infer_response::InferOutputTensor;
use crate::pb::inference::model_metadata_response::TensorMetadata;
use crate::preprocess::InputSpec;
use crate::service::top_k;

pub const INPUT: &str = "input";
pub const IMAGE: &str = "image";
pub const PROBABILITIES: &str = "probabilities";
const CLASSIFICATION: &str = "classification";

/// A request's images: model inputs already, or encoded images still to decode.
#[derive(Debug, PartialEq)]
pub enum Images {
    Normalised(Vec<Vec<f32>>),
    Encoded(Vec<Vec<u8>>),
}

impl Images {
    pub fn len(&self) -> usize {
        match self {
            Self::Normalised(images) => images.len(),
            Self::Encoded(images) => images.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One requested output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Probabilities,
    /// The k most probable classes per image, as Triton's classification extension gives them.
    Classification(usize),
}

/// `ModelMetadata`'s inputs and outputs of a model with `spec` input and `classes` classes.
pub fn metadata(spec: &InputSpec, classes: usize) -> (Vec<TensorMetadata>, Vec<TensorMetadata>) {
    let meta = |name: &str, datatype: &str, shape: &[i64]| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    };
    let (c, h, w) = (spec.channels as i64, spec.height as i64, spec.width as i64);
    let inputs = vec![
        meta(INPUT, "FP32", &[-1, c, h, w]),
        meta(IMAGE, "BYTES", &[-1]),
    ];
    let outputs = vec![meta(PROBABILITIES, "FP32", &[-1, classes as i64])];
    (inputs, outputs)
}

/// Reads the request's one input tensor, its data in `contents` or in `raw` (the request's
/// `raw_input_contents`). At most `max_images` images.
pub fn read_inputs(
    inputs: Vec<InferInputTensor>,
    raw: Vec<Vec<u8>>,
    spec: &InputSpec,
    max_images: usize,
) -> Result<Images, ServeError> {
    let [tensor] = <[InferInputTensor; 1]>::try_from(inputs).map_err(|inputs| {
        invalid(format!(
            "expected one input tensor, '{INPUT}' (FP32 [N, C, H, W]) or '{IMAGE}' (BYTES [N]); got {}",
            inputs.len()
        ))
    })?;
    let raw = match <[Vec<u8>; 1]>::try_from(raw) {
        Ok([raw]) => Some(raw),
        Err(raw) if raw.is_empty() => None,
        Err(raw) => {
            return Err(invalid(format!(
                "raw_input_contents has {} entries for 1 input",
                raw.len()
            )))
        }
    };
    if raw.is_some() && tensor.contents.is_some() {
        return Err(invalid(format!(
            "input '{}' has both contents and raw_input_contents; send one",
            clip(&tensor.name)
        )));
    }
    match tensor.name.as_str() {
        INPUT => read_normalised(tensor, raw, spec, max_images),
        IMAGE => read_encoded(tensor, raw, max_images),
        other => Err(invalid(format!(
            "unknown input '{}'; the inputs are '{INPUT}' (FP32 [N, {}, {}, {}], normalised) \
             and '{IMAGE}' (BYTES [N], encoded images)",
            clip(other),
            spec.channels,
            spec.height,
            spec.width
        ))),
    }
}

fn read_normalised(
    tensor: InferInputTensor,
    raw: Option<Vec<u8>>,
    spec: &InputSpec,
    max_images: usize,
) -> Result<Images, ServeError> {
    expect_datatype(&tensor, "FP32")?;
    let shape = &tensor.shape;
    let chw = [spec.channels, spec.height, spec.width].map(|d| d as i64);
    if shape.len() != 4 || shape[1..] != chw {
        return Err(invalid(format!(
            "input '{INPUT}' has shape {shape:?}; this model takes [N, {}, {}, {}]",
            chw[0], chw[1], chw[2]
        )));
    }
    let n = batch_size(shape[0], INPUT, max_images)?;
    let per_image = spec.channels * spec.height * spec.width;
    let elements = n * per_image;
    let values: Vec<f32> = match raw {
        Some(bytes) => {
            if bytes.len() != elements * 4 {
                return Err(invalid(format!(
                    "input '{INPUT}' has {} bytes of raw data; FP32 {shape:?} is {} bytes",
                    bytes.len(),
                    elements * 4
                )));
            }
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        None => {
            let values = tensor.contents.unwrap_or_default().fp32_contents;
            if values.len() != elements {
                return Err(invalid(format!(
                    "input '{INPUT}' has {} values in contents.fp32_contents; FP32 {shape:?} has {elements}",
                    values.len()
                )));
            }
            values
        }
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!(
            "input '{INPUT}' element {i} is {}; values must be finite",
            values[i]
        )));
    }
    Ok(Images::Normalised(
        values
            .chunks_exact(per_image)
            .map(<[f32]>::to_vec)
            .collect(),
    ))
}

fn read_encoded(
    tensor: InferInputTensor,
    raw: Option<Vec<u8>>,
    max_images: usize,
) -> Result<Images, ServeError> {
    expect_datatype(&tensor, "BYTES")?;
    let shape = &tensor.shape;
    if !(shape.len() == 1 || shape.len() == 2 && shape[1] == 1) {
        return Err(invalid(format!(
            "input '{IMAGE}' has shape {shape:?}; it takes [N] (or [N, 1]) encoded images"
        )));
    }
    let n = batch_size(shape[0], IMAGE, max_images)?;
    let images = match raw {
        Some(bytes) => split_length_prefixed(&bytes)?,
        None => tensor.contents.unwrap_or_default().bytes_contents,
    };
    if images.len() != n {
        return Err(invalid(format!(
            "input '{IMAGE}' has {} elements; shape {shape:?} has {n}",
            images.len()
        )));
    }
    Ok(Images::Encoded(images))
}

fn expect_datatype(tensor: &InferInputTensor, datatype: &str) -> Result<(), ServeError> {
    if tensor.datatype == datatype {
        return Ok(());
    }
    Err(invalid(format!(
        "input '{}' must be {datatype}, not '{}'",
        clip(&tensor.name),
        clip(&tensor.datatype)
    )))
}

fn batch_size(n: i64, input: &str, max_images: usize) -> Result<usize, ServeError> {
    match usize::try_from(n) {
        Ok(n) if (1..=max_images).contains(&n) => Ok(n),
        _ => Err(invalid(format!(
            "input '{input}' has batch size {n}; it must be 1 to {max_images} (the queue size)"
        ))),
    }
}

/// Triton's raw BYTES layout: each element is a 4-byte little-endian length, then its bytes.
pub(crate) fn split_length_prefixed(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, ServeError> {
    let mut elements = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(|| {
            invalid(format!(
                "raw BYTES element {} ends inside its 4-byte length",
                elements.len()
            ))
        })?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(invalid(format!(
                "raw BYTES element {} claims {len} bytes but {} remain",
                elements.len(),
                rest.len()
            )));
        }
        let (element, rest) = rest.split_at(len);
        elements.push(element.to_vec());
        bytes = rest;
    }
    Ok(elements)
}

fn join_length_prefixed(elements: impl Iterator<Item = String>) -> Vec<u8> {
    let mut out = Vec::new();
    for element in elements {
        out.extend_from_slice(&(element.len() as u32).to_le_bytes());
        out.extend_from_slice(element.as_bytes());
    }
    out
}

/// The outputs asked for (none named: all of them, i.e. `probabilities`).
pub fn requested_outputs(
    outputs: &[InferRequestedOutputTensor],
    classes: usize,
) -> Result<Vec<Output>, ServeError> {
    if outputs.is_empty() {
        return Ok(vec![Output::Probabilities]);
    }
    outputs
        .iter()
        .enumerate()
        .map(|(i, output)| {
            if output.name != PROBABILITIES {
                return Err(invalid(format!(
                    "unknown output '{}'; the output is '{PROBABILITIES}' (FP32 [N, {classes}], or \
                     BYTES [N, k] \"score:index:label\" with parameter '{CLASSIFICATION}' = k)",
                    clip(&output.name)
                )));
            }
            // Like Triton: each output at most once, so one request cannot multiply its response.
            if outputs[..i].iter().any(|o| o.name == output.name) {
                return Err(invalid(format!(
                    "output '{}' is requested twice",
                    output.name
                )));
            }
            let Some(k) = output.parameters.get(CLASSIFICATION) else {
                return Ok(Output::Probabilities);
            };
            let k = match k.parameter_choice {
                Some(ParameterChoice::Int64Param(k)) => i128::from(k),
                Some(ParameterChoice::Uint64Param(k)) => i128::from(k),
                _ => 0,
            };
            if k < 1 {
                return Err(invalid(format!(
                    "output parameter '{CLASSIFICATION}' must be an integer of at least 1"
                )));
            }
            // Like Triton: asking for more classes than there are gives them all.
            Ok(Output::Classification(k.min(classes as i128) as usize))
        })
        .collect()
}

/// Bytes allowed per output tensor for its name, datatype, shape and protobuf framing.
const TENSOR_OVERHEAD: usize = 64;

/// An upper estimate of the response bytes [`write_outputs`] gives for `outputs` of `n` images
/// of a model with `labels`, to refuse a request whose answer would pass the message size
/// limit before computing it. FP32 probabilities are `n * classes * 4` bytes; each
/// classification string is a 4-byte length then `"score:index:label"`, its score a
/// probability written `0.123456`. Saturates instead of overflowing.
pub fn response_bytes(outputs: &[Output], n: usize, labels: &[String]) -> usize {
    let classes = labels.len();
    let data = |output: &Output| match *output {
        Output::Probabilities => n.saturating_mul(classes).saturating_mul(4),
        Output::Classification(k) => {
            let index_digits = classes.saturating_sub(1).max(1).ilog10() as usize + 1;
            let longest_label = labels.iter().map(String::len).max().unwrap_or(0);
            let string = "0.123456".len() + 1 + index_digits + 1 + longest_label;
            n.saturating_mul(k.min(classes)).saturating_mul(4 + string)
        }
    };
    outputs.iter().fold(0, |total: usize, output| {
        total
            .saturating_add(data(output))
            .saturating_add(TENSOR_OVERHEAD)
    })
}

/// The response's output tensors and their data, which goes in `raw_output_contents` as
/// Triton sends it (tritonclient reads FP32 outputs only from there).
pub fn write_outputs(
    outputs: &[Output],
    probabilities: &[&[f32]],
    labels: &[String],
) -> (Vec<InferOutputTensor>, Vec<Vec<u8>>) {
    let n = probabilities.len() as i64;
    let classes = probabilities.first().map_or(labels.len(), |p| p.len());
    let tensor = |datatype: &str, k: usize| InferOutputTensor {
        name: PROBABILITIES.into(),
        datatype: datatype.into(),
        shape: vec![n, k as i64],
        ..Default::default()
    };
    outputs
        .iter()
        .map(|&output| match output {
            Output::Probabilities => {
                let data = probabilities
                    .iter()
                    .flat_map(|p| p.iter())
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                (tensor("FP32", classes), data)
            }
            Output::Classification(k) => {
                let k = k.min(classes);
                let strings = probabilities.iter().flat_map(|p| {
                    top_k(p, labels, k as u32)
                        .into_iter()
                        .map(|c| format!("{:.6}:{}:{}", c.score, c.index, c.label))
                });
                (tensor("BYTES", k), join_length_prefixed(strings))
            }
        })
        .unzip()
}

fn invalid(message: impl Into<String>) -> ServeError {
    ServeError::InvalidArgument(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::inference::{InferParameter, InferTensorContents};

    fn spec() -> InputSpec {
        InputSpec {
            channels: 1,
            height: 2,
            width: 2,
            mean: vec![0.],
            std: vec![1.],
        }
    }

    fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    fn error(result: Result<Images, ServeError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn fp32_raw_and_typed_contents_give_the_same_images() {
        let values: Vec<f32> = (0..8).map(|i| i as f32 / 2.).collect();
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let from_raw = read_inputs(
            vec![input(INPUT, "FP32", &[2, 1, 2, 2])],
            vec![raw],
            &spec(),
            8,
        )
        .unwrap();
        let mut typed = input(INPUT, "FP32", &[2, 1, 2, 2]);
        typed.contents = Some(InferTensorContents {
            fp32_contents: values.clone(),
            ..Default::default()
        });
        let from_contents = read_inputs(vec![typed], vec![], &spec(), 8).unwrap();
        let expected = Images::Normalised(vec![values[..4].to_vec(), values[4..].to_vec()]);
        assert_eq!(from_raw, expected);
        assert_eq!(from_contents, expected);
    }

    #[test]
    fn raw_bytes_elements_are_split_on_their_length_prefixes() {
        let raw = join_length_prefixed(["ab".to_string(), String::new(), "xyz".into()].into_iter());
        let images = read_inputs(vec![input(IMAGE, "BYTES", &[3])], vec![raw], &spec(), 8);
        let expected = vec![b"ab".to_vec(), vec![], b"xyz".to_vec()];
        assert_eq!(images.unwrap(), Images::Encoded(expected));

        let truncated = vec![5, 0, 0, 0, b'a'];
        let message = error(read_inputs(
            vec![input(IMAGE, "BYTES", &[1])],
            vec![truncated],
            &spec(),
            8,
        ));
        assert!(message.contains("claims 5 bytes but 1 remain"), "{message}");
    }

    #[test]
    fn mismatches_are_refused_with_what_was_expected() {
        type Case = (Vec<InferInputTensor>, Vec<Vec<u8>>, &'static str);
        let cases: Vec<Case> = vec![
            (vec![], vec![], "expected one input tensor"),
            (
                vec![input(INPUT, "FP32", &[1, 3, 2, 2])],
                vec![vec![0; 48]],
                "this model takes [N, 1, 2, 2]",
            ),
            (
                vec![input(INPUT, "INT32", &[1, 1, 2, 2])],
                vec![vec![0; 16]],
                "must be FP32, not 'INT32'",
            ),
            (
                vec![input(INPUT, "FP32", &[1, 1, 2, 2])],
                vec![vec![0; 12]],
                "12 bytes of raw data; FP32 [1, 1, 2, 2] is 16 bytes",
            ),
            (
                vec![input(INPUT, "FP32", &[1, 1, 2, 2])],
                vec![],
                "0 values in contents.fp32_contents",
            ),
            (
                vec![input(INPUT, "FP32", &[9, 1, 2, 2])],
                vec![vec![0; 144]],
                "batch size 9; it must be 1 to 8",
            ),
            (
                vec![input(INPUT, "FP32", &[1, 1, 2, 2])],
                vec![f32::NAN.to_le_bytes().repeat(4)],
                "element 0 is NaN",
            ),
            (
                vec![input(IMAGE, "BYTES", &[2])],
                vec![join_length_prefixed(["a".to_string()].into_iter())],
                "has 1 elements; shape [2] has 2",
            ),
            (
                vec![input("pixels", "FP32", &[1, 1, 2, 2])],
                vec![],
                "unknown input 'pixels'",
            ),
        ];
        for (inputs, raw, expected) in cases {
            let message = error(read_inputs(inputs, raw, &spec(), 8));
            assert!(message.contains(expected), "{message} lacks {expected}");
        }
    }

    fn output(name: &str) -> InferRequestedOutputTensor {
        InferRequestedOutputTensor {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_output_requested_twice_is_refused() {
        assert_eq!(
            requested_outputs(&[output(PROBABILITIES)], 3).unwrap(),
            [Output::Probabilities]
        );
        let message = requested_outputs(&[output(PROBABILITIES), output(PROBABILITIES)], 3)
            .unwrap_err()
            .to_string();
        assert_eq!(message, "output 'probabilities' is requested twice");
        let unknown = requested_outputs(&[output(&"x".repeat(1 << 20))], 3)
            .unwrap_err()
            .to_string();
        assert!(unknown.len() < 400, "{} bytes", unknown.len());
    }

    #[test]
    fn response_bytes_bounds_what_write_outputs_gives() {
        let labels: Vec<String> = (0..11).map(|i| format!("label-{i}")).collect();
        let probabilities: Vec<Vec<f32>> = (0..5)
            .map(|i| (0..11).map(|c| ((i * 11 + c) % 7) as f32 / 7.).collect())
            .collect();
        let rows: Vec<&[f32]> = probabilities.iter().map(Vec::as_slice).collect();
        for outputs in [
            vec![Output::Probabilities],
            vec![Output::Classification(3)],
            vec![Output::Classification(11)],
            vec![Output::Probabilities, Output::Classification(11)],
        ] {
            let (tensors, raw) = write_outputs(&outputs, &rows, &labels);
            let metadata: usize = tensors
                .iter()
                .map(|t| t.name.len() + t.datatype.len() + 10 * t.shape.len() + 16)
                .sum();
            let written = raw.iter().map(Vec::len).sum::<usize>() + metadata;
            let bound = response_bytes(&outputs, rows.len(), &labels);
            assert!(written <= bound, "{outputs:?}: {written} > {bound}");
            assert!(bound <= 2 * written, "{outputs:?}: {bound} is not tight");
        }
        assert_eq!(
            response_bytes(&[Output::Probabilities], 8, &labels),
            8 * 11 * 4 + TENSOR_OVERHEAD
        );
        // "0.123456:10:label-10" is 20 bytes, after its 4-byte length.
        assert_eq!(
            response_bytes(&[Output::Classification(2)], 3, &labels),
            3 * 2 * 24 + TENSOR_OVERHEAD
        );
        assert_eq!(
            response_bytes(&[Output::Probabilities], usize::MAX, &labels),
            usize::MAX
        );
    }

    #[test]
    fn classification_output_gives_the_top_k_as_triton_strings() {
        let classification = |k: i64| InferRequestedOutputTensor {
            name: PROBABILITIES.into(),
            parameters: [(
                CLASSIFICATION.to_string(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(k)),
                },
            )]
            .into(),
        };
        let outputs = requested_outputs(&[classification(2)], 3).unwrap();
        assert_eq!(outputs, [Output::Classification(2)]);
        assert_eq!(
            requested_outputs(&[classification(7)], 3).unwrap(),
            [Output::Classification(3)]
        );
        assert!(requested_outputs(&[classification(0)], 3).is_err());

        let labels = ["a", "b", "c"].map(String::from);
        let probabilities: [&[f32]; 2] = [&[0.1, 0.7, 0.2], &[0.5, 0.25, 0.25]];
        let (tensors, raw) = write_outputs(&outputs, &probabilities, &labels);
        assert_eq!(tensors[0].datatype, "BYTES");
        assert_eq!(tensors[0].shape, [2, 2]);
        let strings: Vec<String> = split_length_prefixed(&raw[0])
            .unwrap()
            .into_iter()
            .map(|s| String::from_utf8(s).unwrap())
            .collect();
        assert_eq!(
            strings[..3],
            ["0.700000:1:b", "0.200000:2:c", "0.500000:0:a"]
        );

        let (tensors, raw) = write_outputs(&[Output::Probabilities], &probabilities, &labels);
        assert_eq!(
            (tensors[0].datatype.as_str(), &tensors[0].shape[..]),
            ("FP32", &[2, 3][..])
        );
        assert_eq!(raw[0][4..8], 0.7f32.to_le_bytes());
    }
}
