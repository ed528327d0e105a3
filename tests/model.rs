//! Model-level checks that need no fixtures: pooling semantics and gradients, BatchNorm folding,
//! batch invariance and the analytic cost against the paper and torchvision.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use octserve::model::cost::{CostTracker, FeatureShape, OctShape};
use octserve::model::layers::{add_upsampled, avg_pool2x2, max_pool3x3s2p1, upsample2x_to, Conv2d};
use octserve::model::octconv::{OctConvBn, OctConvConfig};
use octserve::model::{Model, ModelConfig};

fn arch(name: &str) -> octserve::model::Arch {
    name.parse().unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn avg_pool_is_ceil_mode_averaging_only_cells_it_has() {
    let x = Tensor::arange(0f32, 15., &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 3, 5))
        .unwrap();
    // rows [0..5), [5..10), [10..15): windows (0,1,5,6), (2,3,7,8), (4,9), (10,11), (12,13), (14)
    let y = avg_pool2x2(&x).unwrap();
    assert_eq!(y.dims(), &[1, 1, 2, 3]);
    assert_eq!(values(&y), vec![3., 5., 6.5, 10.5, 12.5, 14.]);
}

#[test]
fn upsample_repeats_and_crops_to_the_high_branch() {
    let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 2, 2))
        .unwrap();
    let y = upsample2x_to(&x, 3, 4).unwrap();
    assert_eq!(
        values(&y),
        vec![1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4.]
    );
}

#[test]
fn add_upsampled_equals_the_explicit_upsample_and_add() {
    let dev = &Device::Cpu;
    for (h, w) in [(8, 6), (7, 5), (8, 5)] {
        let high = Tensor::randn(0f32, 1., (2, 3, h, w), dev).unwrap();
        let low = Tensor::randn(0f32, 1., (2, 3, h.div_ceil(2), w.div_ceil(2)), dev).unwrap();
        let fused = add_upsampled(&high, &low).unwrap();
        let explicit = high.add(&upsample2x_to(&low, h, w).unwrap()).unwrap();
        assert_eq!(values(&fused), values(&explicit), "{h}x{w}");
    }
}

#[test]
fn max_pool_matches_a_direct_3x3_stride2_pad1_window_max() {
    let (h, w) = (7, 6);
    let x = Tensor::randn(0f32, 1., (2, 3, h, w), &Device::Cpu).unwrap();
    let y = max_pool3x3s2p1(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3, 4, 3]);
    let xv = values(&x);
    let yv = values(&y);
    for plane in 0..6 {
        for i in 0..4 {
            for j in 0..3 {
                let mut best = f64::MIN;
                for di in 0..3 {
                    for dj in 0..3 {
                        let (r, c) = ((2 * i + di) as isize - 1, (2 * j + dj) as isize - 1);
                        if r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w {
                            best = best.max(xv[plane * h * w + r as usize * w + c as usize]);
                        }
                    }
                }
                assert_eq!(yv[plane * 12 + i * 3 + j], best);
            }
        }
    }
}

/// Checks the gradient of `sum(f(x) * r)` against central differences at every input element.
fn check_gradient(shape: (usize, usize, usize, usize), f: impl Fn(&Tensor) -> Tensor) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f64, 1., shape, &dev).unwrap()).unwrap();
    let out = f(x.as_tensor());
    let r = Tensor::randn(0f64, 1., out.shape(), &dev).unwrap();
    let loss = |t: &Tensor| f(t).mul(&r).unwrap().sum_all().unwrap();
    let grads = loss(x.as_tensor()).backward().unwrap();
    let analytic = values(grads.get(x.as_tensor()).unwrap());
    let base = values(x.as_tensor());
    let eps = 1e-6;
    for i in 0..base.len() {
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, shape, &dev).unwrap();
            loss(&t).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(eps) - at(-eps)) / (2. * eps);
        assert!(
            (numeric - analytic[i]).abs() < 1e-5 * (1. + numeric.abs()),
            "element {i}: finite difference {numeric}, backprop {}",
            analytic[i]
        );
    }
}

#[test]
fn avg_pool_gradient_is_right_on_odd_sizes() {
    check_gradient((1, 2, 5, 3), |x| avg_pool2x2(x).unwrap());
}

#[test]
fn upsample_gradient_accumulates_over_several_uses() {
    // candle's upsample_nearest2d backward overwrites accumulated gradients; ours must sum them.
    check_gradient((1, 2, 3, 2), |x| {
        let once = upsample2x_to(x, 5, 4).unwrap();
        let again = upsample2x_to(&(x * 2.).unwrap(), 5, 4).unwrap();
        once.add(&again).unwrap()
    });
}

#[test]
fn max_pool_gradient_goes_whole_to_the_maximum() {
    check_gradient((1, 2, 5, 6), |x| max_pool3x3s2p1(x).unwrap());
}

#[test]
fn strided_conv_gradient_works_on_odd_non_square_inputs() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let conv = Conv2d::new(vb, 3, 4, 3, 2, 1, 1).unwrap();
    check_gradient((1, 3, 7, 5), |x| {
        candle_core::Module::forward(&conv, x).unwrap()
    });
}

#[test]
fn octave_layer_gradient_matches_finite_differences() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = OctConvConfig::new(4, 6, 3, 0., 0.5).stride(2);
    let split = OctConvBn::new(vb.pp("split"), cfg, true).unwrap();
    let mixed =
        OctConvBn::new(vb.pp("mixed"), OctConvConfig::new(6, 4, 3, 0.5, 0.5), false).unwrap();
    check_gradient((1, 4, 9, 7), |x| {
        let y = mixed
            .forward(&split.forward(&x.clone().into()).unwrap())
            .unwrap();
        let low = y.low.unwrap().sum_all().unwrap();
        y.high.broadcast_add(&low).unwrap()
    });
}

/// A model with random weights and random (non-identity) BatchNorm statistics.
fn random_model(name: &str, alpha: f64, in_channels: usize) -> Model {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let config = ModelConfig {
        alpha,
        in_channels,
        num_classes: 10,
        ..ModelConfig::new(arch(name))
    };
    Model::new(config, vb).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let n = var.elem_count();
        let dev = &Device::Cpu;
        let value = if name.ends_with("running_var") || name.ends_with("bn1.weight") {
            Tensor::rand(0.5f32, 1.5, n, dev)
        } else if name.ends_with("running_mean") || name.contains("bn") && name.ends_with("bias") {
            Tensor::randn(0f32, 0.1, n, dev)
        } else {
            continue;
        };
        var.set(&value.unwrap()).unwrap();
    }
    // Rebuild so the BatchNorms read the new statistics.
    Model::new(
        config,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    values(&a.sub(b).unwrap().abs().unwrap())
        .into_iter()
        .fold(0., f64::max)
}

/// The folded model runs the fast CPU path (NHWC GEMMs, fused epilogues); the unfolded one the
/// plain candle ops. Both must compute the same function, on odd sizes, every branch layout
/// (alpha 0.25 gives 4-channel low branches), bottlenecks with strided projections and batches.
#[test]
fn folded_fast_path_computes_the_same_function_as_the_plain_network() {
    for (name, alpha, size) in [
        ("oct-resnet20", 0.5, 29),
        ("oct-resnet20", 0.75, 28),
        ("resnet20", 0., 28),
        ("oct-resnet26", 0.25, 45),
        ("resnet26", 0., 40),
    ] {
        let channels = if name.ends_with("26") { 3 } else { 1 };
        let model = random_model(name, alpha, channels);
        let x = Tensor::randn(0f32, 1., (2, channels, size, size + 3), &Device::Cpu).unwrap();
        let plain = model.forward(&x).unwrap();
        let folded = model.folded().unwrap();
        assert!(
            folded.profile(&x).unwrap().is_some(),
            "{name}: not on the fast path"
        );
        let folded = folded.forward(&x).unwrap();
        let scale = values(&plain.abs().unwrap()).into_iter().fold(0., f64::max);
        let diff = max_abs_diff(&plain, &folded);
        assert!(
            diff <= 1e-4 * scale.max(1.),
            "{name}: folded differs by {diff} (scale {scale})"
        );
    }
}

/// The ImageNet-size nets at their own input size, one image: every bottleneck shape of
/// resnet50 and oct-resnet50 (stride-2 3x3s, 1x1 projections, the 7x7 stem and max pool, octave
/// branches down to 7x7 and 4x4) on the fast path, against the plain network.
#[test]
fn resnet50s_fast_path_computes_the_plain_network_at_224x224() {
    for (name, alpha) in [("resnet50", 0.), ("oct-resnet50", 0.5)] {
        let model = random_model(name, alpha, 3);
        let x = Tensor::randn(0f32, 1., (1, 3, 224, 224), &Device::Cpu).unwrap();
        let plain = model.forward(&x).unwrap();
        let folded = model.folded().unwrap();
        // Whether a model runs the fast path does not depend on the input's size: a small
        // pass shows it without a second full-size one.
        let small = Tensor::randn(0f32, 1., (1, 3, 32, 32), &Device::Cpu).unwrap();
        assert!(
            folded.profile(&small).unwrap().is_some(),
            "{name}: not on the fast path"
        );
        let fast = folded.forward(&x).unwrap();
        let scale = values(&plain.abs().unwrap()).into_iter().fold(0., f64::max);
        let diff = max_abs_diff(&plain, &fast);
        // Random BatchNorm statistics grow the logits through 50 layers (oct-resnet50's reach
        // ~1e6), so the bound is relative to them: 1e-5, where summation order leaves < 1e-6.
        assert!(
            diff <= 1e-5 * scale.max(1.),
            "{name}: the fast path differs by {diff} (scale {scale})"
        );
    }
}

#[test]
fn an_image_gets_the_same_output_alone_and_in_a_batch_of_eight() {
    let model = random_model("oct-resnet20", 0.5, 1).folded().unwrap();
    let batch = Tensor::randn(0f32, 1., (8, 1, 28, 28), &Device::Cpu).unwrap();
    let together = model.forward(&batch).unwrap();
    for i in [0, 5] {
        let alone = model.forward(&batch.narrow(0, i, 1).unwrap()).unwrap();
        let diff = max_abs_diff(&alone, &together.narrow(0, i, 1).unwrap());
        assert!(diff <= 1e-5, "image {i} differs by {diff}");
    }
}

/// A batch at least as large as the thread pool runs one share of images per thread, shares of
/// unequal size included (5 images on 3 threads); the logits come back in the batch's order.
/// Shares of several images run their 28x28 layers one image at a time and the rest together.
#[test]
fn a_batch_split_over_threads_gives_every_image_its_own_logits() {
    let model = random_model("oct-resnet20", 0.5, 1);
    let folded = model.folded().unwrap();
    let batch = Tensor::randn(0f32, 1., (5, 1, 28, 28), &Device::Cpu).unwrap();
    let plain = model.forward(&batch).unwrap();
    let scale = values(&plain.abs().unwrap()).into_iter().fold(0., f64::max);
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let split = pool.install(|| folded.forward(&batch).unwrap());
        let diff = max_abs_diff(&plain, &split);
        assert!(
            diff <= 1e-4 * scale.max(1.),
            "{threads} threads: differs by {diff} (scale {scale})"
        );
    }
}

/// A pass that runs its early layers image by image reports each layer once, in the order of a
/// single image's pass, with the time of all its images.
#[test]
fn a_batch_profile_names_each_layer_once_in_order() {
    let model = random_model("oct-resnet20", 0.5, 1).folded().unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let names = |batch: usize| {
        let x = Tensor::randn(0f32, 1., (batch, 1, 28, 28), &Device::Cpu).unwrap();
        let times = pool.install(|| model.profile(&x).unwrap().unwrap());
        times.into_iter().map(|(name, _)| name).collect::<Vec<_>>()
    };
    let (alone, batch) = (names(1), names(4));
    assert_eq!(alone, batch);
    assert!(alone.iter().any(|n| n.starts_with("layer1")) && alone.last().unwrap() == "fc");
}

/// Any size, odd and far from square included, gives the classes' logits, and the fast path
/// computes there what the plain network does.
#[test]
fn models_accept_any_input_size() {
    let model = random_model("oct-resnet26", 0.5, 3);
    let folded = model.folded().unwrap();
    for (h, w) in [(28, 28), (33, 47), (64, 31), (17, 90)] {
        let x = Tensor::randn(0f32, 1., (1, 3, h, w), &Device::Cpu).unwrap();
        let plain = model.forward(&x).unwrap();
        assert_eq!(plain.dims(), &[1, 10]);
        assert!(
            folded.profile(&x).unwrap().is_some(),
            "{h}x{w}: not on the fast path"
        );
        let fast = folded.forward(&x).unwrap();
        let scale = values(&plain.abs().unwrap()).into_iter().fold(0., f64::max);
        let diff = max_abs_diff(&plain, &fast);
        assert!(
            diff <= 1e-4 * scale.max(1.),
            "{h}x{w}: the fast path differs by {diff} (scale {scale})"
        );
        assert!(model.cost(h, w).macs > 0);
    }
}

fn inspect(name: &str, alpha: f64) -> octserve::model::CostReport {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let config = ModelConfig {
        alpha,
        ..ModelConfig::new(arch(name))
    };
    Model::new(config, vb).unwrap().cost(224, 224)
}

#[test]
fn resnet50_costs_match_torchvision_and_the_octave_paper() {
    let vanilla = inspect("resnet50", 0.5);
    assert_eq!(vanilla.params, 25_557_032);
    assert!(
        (vanilla.macs as f64 / 4.089e9 - 1.).abs() < 0.01,
        "{}",
        vanilla.macs
    );
    let octave = inspect("oct-resnet50", 0.5);
    assert_eq!(
        octave.params, vanilla.params,
        "OctConv keeps the parameter count"
    );
    assert!(
        (octave.macs as f64 / 2.367e9 - 1.).abs() < 0.01,
        "{}",
        octave.macs
    );
    assert!(octave.activation_bytes < vanilla.activation_bytes);
    assert!(vanilla.peak_activation_bytes < vanilla.activation_bytes);
    // alpha 0 costs what the vanilla twin costs.
    assert_eq!(inspect("oct-resnet50", 0.).macs, vanilla.macs);
}

#[test]
fn octave_layer_reproduces_table1_of_the_paper() {
    let cost = |alpha: f64| {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let layer = OctConvBn::new(vb, OctConvConfig::new(64, 64, 3, alpha, alpha), true).unwrap();
        let high = FeatureShape {
            c: 64 - (64. * alpha) as usize,
            h: 56,
            w: 56,
        };
        let low = (alpha > 0.).then_some(FeatureShape {
            c: (64. * alpha) as usize,
            h: 28,
            w: 28,
        });
        let mut t = CostTracker::default();
        layer.cost(OctShape { high, low }, &mut t);
        let r = t.finish();
        (r.macs as f64, r.activation_bytes as f64)
    };
    let (macs0, mem0) = cost(0.);
    // (alpha, FLOPs %, memory %) from Table 1.
    for (alpha, flops, memory) in [
        (0.125, 82., 91.),
        (0.25, 67., 81.),
        (0.5, 44., 63.),
        (0.75, 30., 44.),
    ] {
        let (macs, mem) = cost(alpha);
        assert_eq!((100. * macs / macs0).round(), flops, "alpha {alpha} FLOPs");
        assert_eq!((100. * mem / mem0).round(), memory, "alpha {alpha} memory");
    }
}

/// The fast path frees each map after its last reader and keeps its scratch per thread, so the
/// peak bytes one pass really allocates (the counting allocator, as `bench` and the server
/// report them) stay within the analytic walk's peak of feature maps, and the octave net keeps
/// at least the savings the walk predicts.
///
/// Bounds: at most 1.02 times the walk's peak (times the batch); the 2% is the pass's own
/// small allocations (logits, pooled vectors, tiles' bookkeeping). At least the walk's
/// largest map times the images that run at once (one per share of a split batch, at most
/// the 2 threads): a pass cannot compute without holding the largest map it produces, and
/// less means allocations went uncounted (a share's peak not credited to the caller). The
/// pass may hold less than the walk's peak: it pools lines as a convolution reads them and
/// runs early layers image by image in a batch, so maps the walk counts are never whole. At
/// 28x28 (what tests/ab.rs serves) none of that happens and the pass holds every map the walk
/// counts but, at most, the input image.
#[test]
fn the_fast_paths_measured_peak_is_the_analytic_one() {
    // Batch 1 is spread over the threads by tiles; batch 2 on two threads runs one image per
    // thread at once, so the pass holds both images' maps; batch 4 runs two images per thread,
    // their 24x24 layers image by image. The 28x28 gray pair is what tests/ab.rs serves.
    let peaks = [
        ("resnet26", 1, 3, 96),
        ("oct-resnet26", 1, 3, 96),
        ("resnet26", 2, 3, 96),
        ("oct-resnet26", 2, 3, 96),
        ("resnet26", 4, 3, 96),
        ("oct-resnet26", 4, 3, 96),
        ("resnet20", 1, 1, 28),
        ("oct-resnet20", 1, 1, 28),
    ];
    let peaks = peaks.map(|(name, batch, channels, size)| {
        let model = random_model(name, 0.5, channels);
        let folded = model.folded().unwrap();
        let cost = model.cost(size, size);
        let analytic = cost.peak_activation_bytes * batch;
        let largest = cost.layers.iter().map(|l| l.output_bytes).max().unwrap();
        let at_once = batch.min(2);
        let image = channels * size * size * 4;
        let x = Tensor::randn(0f32, 1., (batch, channels, size, size), &Device::Cpu).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (_, measured) =
            pool.install(|| octserve::alloc::measure_peak(|| folded.forward(&x).unwrap()));
        assert!(
            measured as f64 <= analytic as f64 * 1.02,
            "{name}: measured peak {measured} B over the analytic {analytic} B"
        );
        assert!(
            measured >= largest * at_once,
            "{name}: measured peak {measured} B under {at_once} x the largest map {largest} B"
        );
        if size == 28 {
            assert!(
                measured + image >= analytic,
                "{name}: measured peak {measured} B under the analytic {analytic} B less the \
                 {image} B image"
            );
        }
        (measured as f64, analytic as f64)
    });
    for [(vanilla, vanilla_walk), (octave, octave_walk)] in peaks.as_chunks::<2>().0 {
        assert!(
            octave / vanilla <= octave_walk / vanilla_walk + 0.01,
            "octave/vanilla measured {:.3} vs analytic {:.3}",
            octave / vanilla,
            octave_walk / vanilla_walk
        );
    }
}
