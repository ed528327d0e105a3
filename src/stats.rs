//! Live per-variant statistics behind `ListModels`, `octserve ab` and the savings gauges.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Recent request latencies kept for percentiles.
const LATENCY_WINDOW: usize = 2048;
/// Weight of the newest batch in the rolling per-image compute time.
const EWMA_WEIGHT: f64 = 0.1;

#[derive(Debug, Default)]
pub struct LiveStats {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default, Clone)]
struct Inner {
    requests: u64,
    latencies_ms: VecDeque<f64>,
    bytes_per_image: f64,
    seconds_per_image: f64,
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
    pub bytes_per_image: f64,
    pub seconds_per_image: f64,
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
        let mut s = self.inner.lock().unwrap();
        let per_image = seconds / size as f64;
        s.seconds_per_image = if s.seconds_per_image == 0. {
            per_image
        } else {
            (1. - EWMA_WEIGHT) * s.seconds_per_image + EWMA_WEIGHT * per_image
        };
        s.bytes_per_image = peak_bytes as f64 / size as f64;
    }

    /// One shadow comparison made with this variant as the shadow.
    pub fn record_shadow(&self, agree: bool, latency_delta_seconds: f64) {
        let mut s = self.inner.lock().unwrap();
        s.shadow_comparisons += 1;
        s.shadow_agreements += u64::from(agree);
        s.shadow_delta_seconds_sum += latency_delta_seconds;
    }

    /// `(bytes, seconds)` per image of the recent batches: what the savings ratios need, without
    /// copying and sorting the latency window as [`Self::snapshot`] does.
    pub fn per_image(&self) -> (f64, f64) {
        let s = self.inner.lock().unwrap();
        (s.bytes_per_image, s.seconds_per_image)
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let s = self.inner.lock().unwrap().clone();
        let mut sorted: Vec<f64> = s.latencies_ms.into_iter().collect();
        sorted.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            if sorted.is_empty() {
                0.
            } else {
                sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
            }
        };
        StatsSnapshot {
            requests: s.requests,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            bytes_per_image: s.bytes_per_image,
            seconds_per_image: s.seconds_per_image,
            shadow_comparisons: s.shadow_comparisons,
            shadow_agreements: s.shadow_agreements,
            shadow_latency_delta_ms: 1e3 * s.shadow_delta_seconds_sum
                / s.shadow_comparisons.max(1) as f64,
        }
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
