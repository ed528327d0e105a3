//! The image pipeline on arbitrary bytes: decode (every supported format), convert, resize,
//! normalise. It must return an error or a tensor of the right size, never panic or blow up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use octserve::preprocess::{preprocess, ImageLimits, InputSpec};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the model input: gray or RGB, small or large.
    let Some((&choice, image)) = data.split_first() else {
        return;
    };
    let channels = if choice & 1 == 0 { 1 } else { 3 };
    let side = if choice & 2 == 0 { 28 } else { 224 };
    let spec = InputSpec {
        channels,
        height: side,
        width: side,
        mean: vec![0.5; channels],
        std: vec![0.25; channels],
    };
    // A smaller pixel budget than the server's keeps each run fast; the checks are the same.
    let limits = ImageLimits {
        max_pixels: 4_000_000,
        ..ImageLimits::default()
    };
    if let Ok(input) = preprocess(image, &spec, &limits) {
        assert_eq!(input.len(), channels * side * side);
        assert!(input.iter().all(|v| v.is_finite()));
    }
});
