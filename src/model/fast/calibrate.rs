//! Which GEMM back end runs each convolution: our micro-kernels for narrow outputs, and for
//! wide ones whichever of ours and the gemm crate this CPU runs faster, measured once.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::conv::{conv_sum, Epilogue};
use super::kernel::Kernel;
use super::map::Map;
use super::packed::PackedConv;
use super::term::Term;

/// The back end for a convolution of `c_out` output channels over a map's pixels.
pub fn for_conv(c_out: usize) -> Kernel {
    Kernel::choose(c_out, false, faster_for_wide)
}

/// The back end for a classifier of `classes` outputs over a batch of pooled features.
pub fn for_linear(classes: usize) -> Kernel {
    Kernel::choose(classes, true, faster_for_wide)
}

/// Which of our micro-kernel `ours` and the gemm crate runs wide convolutions faster on this
/// CPU, measured once per process on three of ResNet-50's (a 3x3 at 56x56 and at 14x14, a 1x1
/// at 14x14, one image), the back ends alternating, fastest of five each. Which wins depends on
/// the core, not just on its vector width: on Intel's AVX-512 cores the crate's larger register
/// tiles did, on AMD's Zen 4 ours did, taps read in place.
fn faster_for_wide(ours: Kernel) -> Kernel {
    static FASTER: OnceLock<Kernel> = OnceLock::new();
    *FASTER.get_or_init(|| {
        // (side, input channels, output channels, kernel)
        let shapes = [(56, 64, 64, 3), (14, 256, 256, 3), (14, 256, 1024, 1)];
        let inputs = shapes.map(|(side, c, _, _)| {
            let data = (0..side * side * c).map(|i| (i % 13) as f32 / 13.);
            Map::from_nhwc(data.collect(), 1, side, side, c)
        });
        let packed = |kernel: Kernel| {
            shapes.map(|(_, c_in, c_out, k)| {
                let weight = Tensor::full(0.01f32, (c_out, c_in, k, k), &Device::Cpu)
                    .and_then(|w| PackedConv::new(&w, 1, k / 2, kernel));
                weight.expect("the calibration convolutions are well-formed")
            })
        };
        let time = |convs: &[PackedConv]| {
            let start = Instant::now();
            for (conv, input) in convs.iter().zip(&inputs) {
                conv_sum(&[Term::of(conv, input)], &Epilogue::default());
            }
            start.elapsed()
        };
        let (ours_convs, crate_convs) = (packed(ours), packed(Kernel::Portable));
        let (mut fastest_ours, mut fastest_crate) = (Duration::MAX, Duration::MAX);
        for _ in 0..5 {
            fastest_ours = fastest_ours.min(time(&ours_convs));
            fastest_crate = fastest_crate.min(time(&crate_convs));
        }
        let faster = if fastest_ours <= fastest_crate {
            ours
        } else {
            Kernel::Portable
        };
        tracing::info!(
            ours = ours.name(),
            ours_ms = fastest_ours.as_secs_f64() * 1e3,
            crate_ms = fastest_crate.as_secs_f64() * 1e3,
            chosen = faster.name(),
            "fast path: GEMM back end for wide convolutions"
        );
        faster
    })
}
