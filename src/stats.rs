//! Live per-variant statistics behind `ListModels`, `octserve ab` and the savings gauges.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

/// Recent request latencies kept for percentiles.
const LATENCY_WINDOW: usize = 2048;
/// Batches of one size whose per-image compute time the rolling median is taken over.
const TIME_WINDOW: usize = 64;

#[derive(Debug, Default)]
pub struct LiveStats {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default, Clone)]
struct Inner {
    requests: u64,
    latencies_ms: VecDeque<f64>,
    costs: CostsBySize,
    shadow_comparisons: u64,
    shadow_agreements: u64,
    shadow_delta_seconds_sum: f64,
}

/// A copy of one variant's statistics.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Peak bytes per image at the latest batch size (see [`CostsBySize::latest`]).
    pub bytes_per_image: f64,
    /// Requests this variant computed as a shadow, and how many agreed on the top-1 class.
    pub shadow_comparisons: u64,
    pub shadow_agreements: u64,
    /// Mean of (shadow latency - answering variant's latency).
    pub shadow_latency_delta_ms: f64,
}

impl LiveStats {
    pub fn record_request(&self, latency_ms: f64) {
        let mut s = self.inner.lock().unwrap();
        s.requests += 1;
        if s.latencies_ms.len() == LATENCY_WINDOW {
            s.latencies_ms.pop_front();
        }
        s.latencies_ms.push_back(latency_ms);
    }

    pub fn record_batch(&self, size: usize, seconds: f64, peak_bytes: usize) {
        self.inner
            .lock()
            .unwrap()
            .costs
            .record(size, seconds, peak_bytes);
    }

    /// One shadow comparison made with this variant as the shadow.
    pub fn record_shadow(&self, agree: bool, latency_delta_seconds: f64) {
        let mut s = self.inner.lock().unwrap();
        s.shadow_comparisons += 1;
        s.shadow_agreements += u64::from(agree);
        s.shadow_delta_seconds_sum += latency_delta_seconds;
    }

    /// The per-image costs by batch size: what the savings ratios need, without copying and
    /// sorting the latency window as [`Self::snapshot`] does.
    pub fn costs(&self) -> CostsBySize {
        self.inner.lock().unwrap().costs.clone()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let s = self.inner.lock().unwrap().clone();
        let [p50_ms, p99_ms] = percentiles(s.latencies_ms.into_iter().collect(), [0.5, 0.99]);
        StatsSnapshot {
            requests: s.requests,
            p50_ms,
            p99_ms,
            bytes_per_image: s.costs.latest().bytes,
            shadow_comparisons: s.shadow_comparisons,
            shadow_agreements: s.shadow_agreements,
            shadow_latency_delta_ms: 1e3 * s.shadow_delta_seconds_sum
                / s.shadow_comparisons.max(1) as f64,
        }
    }
}

/// What one image cost in the recent batches of one size.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct PerImage {
    /// The latest batch's peak bytes over its size.
    pub bytes: f64,
    /// Compute seconds over the batch size: the median of the recent batches of this size, so
    /// that one batch slowed down by something else on the machine does not sway it.
    pub seconds: f64,
}

/// The recent batches of one size.
#[derive(Debug, Default, Clone)]
struct SizeCosts {
    /// The latest batch's peak bytes over its size.
    bytes: f64,
    /// Per-image compute seconds of the last [`TIME_WINDOW`] batches.
    seconds: VecDeque<f64>,
}

impl SizeCosts {
    fn per_image(&self) -> PerImage {
        PerImage {
            bytes: self.bytes,
            seconds: median(self.seconds.iter().copied().collect()),
        }
    }
}

/// A variant's per-image costs by batch size.
///
/// Per image, a batch's peak memory and time fall as the batch grows (the fast path runs the
/// early layers image by image, and one pass's buffers serve the whole batch), so a variant is
/// compared with its baseline at the same batch size: else one that last ran a lone request
/// would look heavier than one that last ran eight.
#[derive(Debug, Default, Clone)]
pub struct CostsBySize {
    latest_size: usize,
    by_size: BTreeMap<usize, SizeCosts>,
}

impl CostsBySize {
    fn record(&mut self, size: usize, seconds: f64, peak_bytes: usize) {
        let cost = self.by_size.entry(size).or_default();
        if cost.seconds.len() == TIME_WINDOW {
            cost.seconds.pop_front();
        }
        cost.seconds.push_back(seconds / size as f64);
        cost.bytes = peak_bytes as f64 / size as f64;
        self.latest_size = size;
    }

    /// The cost at the latest batch's size; zeros before the first batch.
    pub fn latest(&self) -> PerImage {
        self.by_size
            .get(&self.latest_size)
            .map(SizeCosts::per_image)
            .unwrap_or_default()
    }

    /// `(memory, latency)` savings against the baseline at one batch size: this variant's latest
    /// if the baseline has run it, else the largest both have run; zeros while they share none.
    pub fn savings_against(&self, baseline: &Self) -> (f64, f64) {
        let mut sizes = std::iter::once(&self.latest_size).chain(self.by_size.keys().rev());
        let Some(size) = sizes.find(|size| baseline.by_size.contains_key(size)) else {
            return (0., 0.);
        };
        let (ours, theirs) = (
            self.by_size[size].per_image(),
            baseline.by_size[size].per_image(),
        );
        (
            savings(ours.bytes, theirs.bytes),
            savings(ours.seconds, theirs.seconds),
        )
    }
}

/// Nearest-rank percentiles of `samples`, one for each fraction of `qs`: the smallest sample
/// with at least that fraction of the samples at or below it; zeros for no samples.
///
/// Every latency percentile octserve reports (`ListModels`, `bench`, `loadgen`) comes from
/// here. Not a histogram crate (`hdrhistogram`): the windows here slide (a histogram cannot
/// forget a sample), the reports quote exact samples (a histogram rounds them to its
/// significant digits), and `bench`'s per-pass ratios are floats below 1.
pub fn percentiles<const N: usize>(mut samples: Vec<f64>, qs: [f64; N]) -> [f64; N] {
    samples.sort_by(f64::total_cmp);
    qs.map(|q| match samples.len() {
        0 => 0.,
        n => samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    })
}

/// The median of `samples`, the mean of the middle two for an even count; 0 for none.
/// Unlike the nearest-rank [`percentiles`], it does not lean to the lower middle sample, so
/// two batch times give their midpoint.
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    match samples.len() {
        0 => 0.,
        n if n % 2 == 1 => samples[n / 2],
        n => (samples[n / 2 - 1] + samples[n / 2]) / 2.,
    }
}

/// `1 - value / baseline`, or 0 while either is unknown.
pub fn savings(value: f64, baseline: f64) -> f64 {
    if value > 0. && baseline > 0. {
        1. - value / baseline
    } else {
        0.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(batches: &[(usize, f64, usize)]) -> CostsBySize {
        let mut c = CostsBySize::default();
        for &(size, seconds, bytes) in batches {
            c.record(size, seconds, bytes);
        }
        c
    }

    #[test]
    fn percentiles_are_nearest_rank_samples() {
        let samples: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        assert_eq!(
            percentiles(samples, [0.5, 0.9, 0.99, 1.]),
            [100., 180., 198., 200.]
        );
        assert_eq!(percentiles(vec![7.], [0., 0.5, 1.]), [7.; 3]);
        assert_eq!(percentiles(Vec::new(), [0.5, 0.99]), [0.; 2]);
        assert_eq!(median(vec![4., 1., 3., 2.]), 2.5);
        assert_eq!(median(vec![3., 1., 2.]), 2.);
        assert_eq!(median(Vec::new()), 0.);
    }

    #[test]
    fn savings_compare_the_same_batch_size() {
        // Per image, batches of 8 cost half what lone requests do, in both variants.
        let baseline = costs(&[(1, 0.010, 1000), (8, 0.040, 4000)]);
        let variant = costs(&[(8, 0.024, 3200), (1, 0.006, 800)]);
        // The variant's latest size is 1, which the baseline has run.
        let (memory, latency) = variant.savings_against(&baseline);
        assert!((memory - 0.2).abs() < 1e-12, "{memory}");
        assert!((latency - 0.4).abs() < 1e-12, "{latency}");
        assert_eq!(
            variant.latest(),
            PerImage {
                bytes: 800.,
                seconds: 0.006
            }
        );
    }

    #[test]
    fn without_the_latest_size_the_largest_shared_one_is_used() {
        let baseline = costs(&[(2, 0.010, 1000), (4, 0.016, 2000)]);
        let variant = costs(&[(2, 0.008, 900), (4, 0.008, 1000), (3, 0.010, 900)]);
        let (memory, latency) = variant.savings_against(&baseline);
        assert!((memory - 0.5).abs() < 1e-12, "{memory}");
        assert!((latency - 0.5).abs() < 1e-12, "{latency}");
        // Nothing shared yet: no savings claimed.
        assert_eq!(
            costs(&[(5, 0.01, 100)]).savings_against(&baseline),
            (0., 0.)
        );
    }

    #[test]
    fn time_is_the_median_of_recent_batches_of_a_size_and_memory_is_the_latest() {
        // One batch slowed down 50x by something else on the machine does not move it.
        let c = costs(&[(2, 0.020, 2000), (2, 1.0, 1000), (2, 0.022, 1000)]);
        assert!(
            (c.latest().seconds - 0.011).abs() < 1e-15,
            "{:?}",
            c.latest()
        );
        assert_eq!(c.latest().bytes, 500.);
        // Only the last TIME_WINDOW batches count.
        let mut batches = vec![(1, 5.0, 10); TIME_WINDOW];
        batches.extend(vec![(1, 0.001, 10); TIME_WINDOW / 2 + 1]);
        assert_eq!(costs(&batches).latest().seconds, 0.001);
    }
}
