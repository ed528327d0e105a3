//! Image preprocessing (decode, channel conversion, antialiased resize, normalisation) against
//! an independent computation: Pillow's decoding and numpy's resize and normalisation, written
//! by `python3 tools/reference/make_preprocess_fixtures.py` into tests/fixtures/preprocess/.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use octserve::preprocess::{preprocess, InputSpec};

#[derive(Deserialize)]
struct Case {
    image: String,
    spec: InputSpec,
    /// Allowed difference in u8 steps before normalisation (see the script's docstring).
    tolerance_lsb: f32,
    values: Vec<f32>,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

#[test]
fn preprocessing_matches_the_pillow_and_numpy_reference() {
    let text = std::fs::read_to_string(fixtures_dir().join("expected.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 9);
    for case in &cases {
        let spec = &case.spec;
        let bytes = std::fs::read(fixtures_dir().join(&case.image)).unwrap();
        let ours = preprocess(&bytes, spec, &Default::default()).unwrap();
        let label = format!(
            "{} as {}x{}x{}",
            case.image, spec.channels, spec.height, spec.width
        );
        assert_eq!(ours.len(), case.values.len(), "{label}");
        let plane = spec.height * spec.width;
        let mut worst_lsb = 0f32;
        for (i, (ours, theirs)) in ours.iter().zip(&case.values).enumerate() {
            // Back to u8 steps: the normalised value times 255 std.
            let lsb = (ours - theirs).abs() * 255. * spec.std[i / plane];
            worst_lsb = worst_lsb.max(lsb);
            assert!(
                lsb <= case.tolerance_lsb + 1e-3,
                "{label}: element {i} (channel {}, row {}, column {}) is {ours}, the reference \
                 {theirs}: {lsb:.2} steps apart",
                i / plane,
                i % plane / spec.width,
                i % spec.width
            );
        }
        eprintln!("{label}: at most {worst_lsb:.2} steps from the reference");
    }
}
