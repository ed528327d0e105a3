//! The CPU inference path: a BatchNorm-folded network compiled once into NHWC GEMMs.
//!
//! candle's CPU conv2d re-lays-out its input and kernel on every call and runs bias, ReLU,
//! residual add, pooling and upsampling as separate passes over NCHW tensors. For the octave
//! nets, whose four small convolutions per layer cost as many of those passes as one big one,
//! that overhead is why they ran slower than their vanilla twins. Here:
//!
//! - weights are laid out once, at load, as GEMM right-hand matrices ([`packed::PackedConv`]);
//! - maps stay NHWC from the stem to the classifier, so 1x1 convolutions are plain GEMMs on
//!   the map and kxk ones build their patch rows tile by tile in cache;
//! - the convolutions feeding one frequency branch accumulate into the same output tile, and
//!   bias, residual add, the upsampled L->H add and ReLU are applied to that tile before it
//!   leaves the cache ([`conv::conv_sum`]);
//! - tiles are spread over the threads, by columns as well when a layer has few pixels and its
//!   GEMM reads the map in place (not copies of it each task would repeat), so batch 1 uses
//!   every core.
//! - a batch runs its large early layers one image at a time, so their maps stay in cache.
//!
//! [`FastNet`] is a candle [`CustomOp1`]: `Model::forward` applies it to the input tensor on
//! the CPU, and runs the plain candle network on other devices and dtypes.

mod band;
mod calibrate;
mod conv;
mod kernel;
mod layer;
pub(crate) mod map;
mod packed;
mod term;
mod threads;
mod tiles;

use std::time::{Duration, Instant};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::alloc::{credit_peak, measure_peak};
use conv::{conv_sum, Epilogue};
use layer::OctMap;
pub use layer::{Branches, ConvWeights, FastLayer};
use map::{global_avg_pool, max_pool3x3s2p1, Map};
use packed::PackedConv;
use term::Term;

/// A residual block: `relu(last(...first(x)) + shortcut(x))`.
#[derive(Clone, Debug)]
pub struct FastBlock {
    pub convs: Vec<FastLayer>,
    pub downsample: Option<FastLayer>,
}

/// Wall time per layer name, in execution order.
pub type LayerTimes = Vec<(String, Duration)>;

/// A whole network on the fast path.
#[derive(Clone, Debug)]
pub struct FastNet {
    stem: FastLayer,
    stem_pool: bool,
    blocks: Vec<FastBlock>,
    fc: PackedConv,
    fc_bias: Vec<f32>,
}

impl FastNet {
    pub fn new(
        stem: FastLayer,
        stem_pool: bool,
        blocks: Vec<FastBlock>,
        fc_weight: &Tensor,
        fc_bias: Option<&Tensor>,
    ) -> Result<Self> {
        Ok(Self {
            stem,
            stem_pool,
            blocks,
            fc: PackedConv::linear(fc_weight, calibrate::for_linear(fc_weight.dim(0)?))?,
            fc_bias: fc_bias
                .map(|b| b.to_vec1())
                .transpose()?
                .unwrap_or_default(),
        })
    }

    /// NHWC input -> `[n, classes]` logits, row-major. Every map is freed as soon as its last
    /// reader is done, so the peak is at most what the cost walk counts (less where the early
    /// layers run image by image).
    pub(crate) fn forward(&self, x: Map) -> Vec<f32> {
        self.run(x, None)
    }

    /// The forward pass with the time each layer took.
    pub(crate) fn profile(&self, x: Map) -> (Vec<f32>, LayerTimes) {
        let mut times = Vec::new();
        let logits = self.run(x, Some(&mut times));
        (logits, times)
    }

    /// Runs the whole pass on workers of the global thread pool: one share of the batch per
    /// thread where the batch is large enough (see [`threads`]), else the whole batch with each
    /// operation spread over the threads, which hand work to each other between layers instead
    /// of waking from sleep for each of them. The maps allocated there are counted as the
    /// caller's (see [`crate::alloc`]); shares run at once, so their peaks add up. Profiling
    /// reports the first share's layers.
    fn run(&self, x: Map, times: Option<&mut LayerTimes>) -> Vec<f32> {
        let Some(shares) = threads::shares(x.n) else {
            let (logits, peak) = rayon::scope(|_| measure_peak(|| self.run_layers(x, times)));
            credit_peak(peak);
            return logits;
        };
        let profiling = times.is_some();
        let outs = threads::shared_out(shares, |images| {
            measure_peak(|| {
                let mut share_times = Vec::new();
                let share = x.images(images);
                let logits = self.run_layers(share, profiling.then_some(&mut share_times));
                (logits, share_times)
            })
        });
        drop(x);
        credit_peak(outs.iter().map(|(_, peak)| peak).sum());
        let mut outs = outs.into_iter().map(|(out, _)| out);
        let (mut logits, first_times) = outs.next().expect("at least two shares");
        if let Some(times) = times {
            *times = first_times;
        }
        outs.for_each(|(share_logits, _)| logits.extend(share_logits));
        logits
    }

    fn run_layers(&self, x: Map, times: Option<&mut LayerTimes>) -> Vec<f32> {
        let mut laps = Laps::new(times);
        let (mut x, done) = self.leading_image_by_image(x, &mut laps);
        for block in &self.blocks[done..] {
            x = self.block(block, x, &mut laps);
        }
        self.head(x, &mut laps)
    }

    /// Runs the stem and the leading blocks whose input has at least [`PER_IMAGE_FROM`] pixels
    /// per image one image at a time, and stacks the results; returns them with the number of
    /// blocks run. One image gives those layers' GEMMs whole tiles of rows, so more images at
    /// once only make maps that outgrow the caches (docs/performance.md).
    fn leading_image_by_image(&self, mut x: Map, laps: &mut Laps<'_>) -> (OctMap, usize) {
        let large = |y: &Map| y.h * y.w >= PER_IMAGE_FROM;
        if x.n == 1 || !large(&x) {
            return (self.stem(x, laps), 0);
        }
        let images = x.n;
        let mut stacked: Option<OctMap> = None;
        let mut done = 0;
        // The last image first, so that each image's input is cut off the end of the map, and
        // freed, as it is read: the vanilla and octave nets alike would otherwise hold the
        // whole input through the early layers.
        for image in (0..images).rev() {
            laps.restart();
            let input = x.images(image..image + 1);
            x.keep_images(image);
            let mut y = self.stem(input, laps);
            done = 0;
            while done < self.blocks.len() && large(&y.high) {
                y = self.block(&self.blocks[done], y, laps);
                done += 1;
            }
            stacked
                .get_or_insert_with(|| y.zeros_for(images))
                .put_image(image, &y);
        }
        laps.resume();
        (stacked.expect("a batch of several images"), done)
    }

    fn stem(&self, x: Map, laps: &mut Laps<'_>) -> OctMap {
        let input = OctMap { high: x, low: None };
        let mut x = self.stem.forward(&input, None);
        drop(input);
        laps.lap(&self.stem.name);
        if self.stem_pool {
            x.high = max_pool3x3s2p1(&x.high);
            laps.lap("maxpool");
        }
        x
    }

    fn block(&self, block: &FastBlock, x: OctMap, laps: &mut Laps<'_>) -> OctMap {
        let (last, chain) = block.convs.split_last().expect("a block has convs");
        let mut y = None;
        for conv in chain {
            y = Some(conv.forward(y.as_ref().unwrap_or(&x), None));
            laps.lap(&conv.name);
        }
        let y = y.expect("residual blocks have at least two convs");
        let shortcut = match &block.downsample {
            Some(d) => {
                let projected = d.forward(&x, None);
                laps.lap(&d.name);
                drop(x);
                projected
            }
            None => x,
        };
        let out = last.forward(&y, Some(&shortcut));
        laps.lap(&last.name);
        out
    }

    fn head(&self, x: OctMap, laps: &mut Laps<'_>) -> Vec<f32> {
        let pooled = global_avg_pool(&x.high);
        let features = Map::from_nhwc(pooled, x.high.n, 1, 1, x.high.c);
        let term = Term::of(&self.fc, &features);
        let epilogue = Epilogue {
            bias: &self.fc_bias,
            ..Epilogue::default()
        };
        let logits = conv_sum(&[term], &epilogue).data;
        laps.lap("fc");
        logits
    }

    pub fn in_channels(&self) -> usize {
        self.stem.in_channels()
    }

    pub fn classes(&self) -> usize {
        self.fc.c_out()
    }
}

/// Blocks whose input has at least this many pixels per image run image by image: as many
/// as the most rows of a GEMM tile.
const PER_IMAGE_FROM: usize = conv::MOST_TILE_ROWS;

/// The wall time of each layer in execution order, summed over the image-by-image runs.
struct Laps<'a> {
    /// Where the times go; `None` when not profiling.
    times: Option<&'a mut LayerTimes>,
    clock: Instant,
    /// The index of the next layer's time.
    next: usize,
}

impl<'a> Laps<'a> {
    fn new(times: Option<&'a mut LayerTimes>) -> Self {
        Self {
            times,
            clock: Instant::now(),
            next: 0,
        }
    }

    fn lap(&mut self, name: &str) {
        let Some(times) = self.times.as_deref_mut() else {
            return;
        };
        let elapsed = self.clock.elapsed();
        match times.get_mut(self.next) {
            Some((_, time)) => *time += elapsed,
            None => times.push((name.to_string(), elapsed)),
        }
        self.next += 1;
        self.clock = Instant::now();
    }

    /// The next laps are the first layers' again (the next image's).
    fn restart(&mut self) {
        self.next = 0;
    }

    /// The next laps are new layers'.
    fn resume(&mut self) {
        self.next = self.times.as_ref().map_or(0, |times| times.len());
    }
}

impl CustomOp1 for FastNet {
    fn name(&self) -> &'static str {
        "octserve-fast-resnet"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.in_channels() {
            candle_core::bail!("the model takes {} channels, got {c}", self.in_channels());
        }
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("the fast path runs f32 inputs only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the fast path needs a contiguous input");
        };
        let logits = self.forward(Map::from_nchw(&data[start..end], n, c, h, w));
        Ok((CpuStorage::F32(logits), Shape::from((n, self.classes()))))
    }
}
