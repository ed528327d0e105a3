//! Request validation on arbitrary bytes read as `ModelInferRequest` and `ClassifyRequest`
//! messages: tensor names, datatypes, shapes, raw and typed contents, output parameters, and the
//! image inside a Classify. Each must be accepted consistently or refused with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use octserve::kserve::tensor::{read_inputs, requested_outputs, Images};
use octserve::pb::inference::ModelInferRequest;
use octserve::pb::ClassifyRequest;
use octserve::preprocess::{preprocess, ImageLimits, InputSpec};
use prost::Message;

const MAX_IMAGES: usize = 64;
const CLASSES: usize = 10;

fuzz_target!(|data: &[u8]| {
    let spec = InputSpec {
        channels: 1,
        height: 28,
        width: 28,
        mean: vec![0.5],
        std: vec![0.25],
    };
    if let Ok(request) = ModelInferRequest::decode(data) {
        let _ = requested_outputs(&request.outputs, CLASSES);
        match read_inputs(
            request.inputs,
            request.raw_input_contents,
            &spec,
            MAX_IMAGES,
        ) {
            Ok(Images::Normalised(images)) => {
                assert!((1..=MAX_IMAGES).contains(&images.len()));
                assert!(images.iter().all(|i| i.len() == 28 * 28));
            }
            Ok(Images::Encoded(images)) => assert!((1..=MAX_IMAGES).contains(&images.len())),
            Err(_) => {}
        }
    }
    if let Ok(request) = ClassifyRequest::decode(data) {
        let limits = ImageLimits {
            max_pixels: 4_000_000,
            ..ImageLimits::default()
        };
        let _ = preprocess(&request.image, &spec, &limits);
    }
});
