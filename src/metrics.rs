//! Prometheus metrics (names in docs/contract.md; prefix `octserve_`, seconds, bytes).
//!
//! The recorder is process-wide (the `metrics` facade allows one); every server in the process
//! shares it and `/metrics` renders it. Each variant's series are created with zero values when
//! it loads, so a scrape shows them before the first request.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "octserve_requests_total";
pub const REQUEST_DURATION: &str = "octserve_request_duration_seconds";
pub const QUEUE_DURATION: &str = "octserve_queue_duration_seconds";
pub const DECODE_DURATION: &str = "octserve_decode_duration_seconds";
pub const INFERENCE_DURATION: &str = "octserve_inference_duration_seconds";
pub const BATCH_SIZE: &str = "octserve_batch_size";
pub const QUEUE_DEPTH: &str = "octserve_queue_depth";
pub const ACTIVATION_BYTES: &str = "octserve_activation_bytes";
pub const MODEL_MACS: &str = "octserve_model_macs";
pub const MODEL_PARAMS: &str = "octserve_model_params";
pub const MEMORY_SAVINGS: &str = "octserve_memory_savings_ratio";
pub const COMPUTE_SAVINGS: &str = "octserve_compute_savings_ratio";
pub const LATENCY_SAVINGS: &str = "octserve_latency_savings_ratio";
pub const SHADOW_AGREEMENT: &str = "octserve_shadow_agreement_total";
pub const SHADOW_LATENCY_DELTA: &str = "octserve_shadow_latency_delta_seconds";
pub const DEVICE_MEMORY_USED: &str = "octserve_device_memory_used_bytes";
pub const DEVICE_MEMORY_TOTAL: &str = "octserve_device_memory_total_bytes";

/// Installs the recorder once and returns the handle that renders the exposition text.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // 100 us .. 10 s, roughly 2.5x apart.
            let seconds = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ];
            let batch = [1., 2., 4., 8., 16., 32., 64., 128., 256.];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &batch))
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("the metrics recorder is installed once");
            describe();
            handle
        })
        .clone()
}

/// Drains recorded histogram samples into their buckets every few seconds. The exporter otherwise
/// keeps every sample until the next scrape, so a server nobody scrapes would grow without bound.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        every.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    describe_counter!(REQUESTS, "Requests answered, by gRPC status code.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request to reply."
    );
    describe_histogram!(
        QUEUE_DURATION,
        Unit::Seconds,
        "Time a request waited for its batch."
    );
    describe_histogram!(
        DECODE_DURATION,
        Unit::Seconds,
        "Time a request's image took to decode and preprocess, budget wait included."
    );
    describe_histogram!(INFERENCE_DURATION, Unit::Seconds, "Model time per batch.");
    describe_histogram!(BATCH_SIZE, "Images per computed batch.");
    describe_gauge!(QUEUE_DEPTH, "Requests waiting for a batch.");
    describe_gauge!(
        ACTIVATION_BYTES,
        Unit::Bytes,
        "Measured peak forward-pass bytes per image, last batch."
    );
    describe_gauge!(MODEL_MACS, "Analytic multiply-accumulates per image.");
    describe_gauge!(MODEL_PARAMS, "Parameters.");
    describe_gauge!(
        MEMORY_SAVINGS,
        "1 - measured activation bytes / baseline variant's."
    );
    describe_gauge!(COMPUTE_SAVINGS, "1 - MACs / baseline variant's.");
    describe_gauge!(
        LATENCY_SAVINGS,
        "1 - per-image compute time / baseline variant's (rolling)."
    );
    describe_counter!(SHADOW_AGREEMENT, "Shadow comparisons; agree = top-1 match.");
    describe_gauge!(
        SHADOW_LATENCY_DELTA,
        Unit::Seconds,
        "Shadow latency minus the answering variant's, last comparison."
    );
    describe_gauge!(
        DEVICE_MEMORY_USED,
        Unit::Bytes,
        "Accelerator memory in use (like Triton's nv_gpu_memory_used_bytes)."
    );
    describe_gauge!(
        DEVICE_MEMORY_TOTAL,
        Unit::Bytes,
        "Accelerator memory in total."
    );
}

/// Used and total memory of an accelerator, after a batch.
pub fn device_memory(device: &str, info: crate::device::MemoryInfo) {
    let label = [("device", device.to_string())];
    gauge!(DEVICE_MEMORY_USED, &label).set(info.used() as f64);
    gauge!(DEVICE_MEMORY_TOTAL, &label).set(info.total as f64);
}

/// The label pair every series carries.
#[derive(Clone, Debug)]
pub struct VariantLabels {
    pub model: String,
    pub variant: String,
}

impl VariantLabels {
    fn pairs(&self) -> [(&'static str, String); 2] {
        [
            ("model", self.model.clone()),
            ("variant", self.variant.clone()),
        ]
    }

    /// Creates the variant's series with their static values.
    /// Sets a newly built variant's constant gauges and makes its series exist from the start
    /// (counters keep their totals if a variant of this name was served before).
    pub fn register(&self, macs: usize, params: usize) {
        let l = self.pairs();
        gauge!(MODEL_MACS, &l).set(macs as f64);
        gauge!(MODEL_PARAMS, &l).set(params as f64);
        gauge!(QUEUE_DEPTH, &l).set(0.);
        gauge!(ACTIVATION_BYTES, &l).set(0.);
        gauge!(MEMORY_SAVINGS, &l).set(0.);
        gauge!(LATENCY_SAVINGS, &l).set(0.);
        counter!(REQUESTS, &self.with("code", "OK")).increment(0);
        for agree in ["true", "false"] {
            counter!(SHADOW_AGREEMENT, &self.with("agree", agree)).increment(0);
        }
        // Registered now so that the first scrape shows them, empty.
        for name in [
            REQUEST_DURATION,
            QUEUE_DURATION,
            DECODE_DURATION,
            INFERENCE_DURATION,
            BATCH_SIZE,
        ] {
            let _ = histogram!(name, &l);
        }
    }

    /// The model and variant labels plus one more.
    fn with(&self, key: &'static str, value: &str) -> [(&'static str, String); 3] {
        let [model, variant] = self.pairs();
        [model, variant, (key, value.to_string())]
    }

    pub fn request(&self, code: tonic::Code, seconds: f64) {
        counter!(REQUESTS, &self.with("code", code_name(code))).increment(1);
        histogram!(REQUEST_DURATION, &self.pairs()).record(seconds);
    }

    /// A shadow comparison with this variant as the shadow.
    pub fn shadow(&self, agree: bool, latency_delta_seconds: f64) {
        let agree = if agree { "true" } else { "false" };
        counter!(SHADOW_AGREEMENT, &self.with("agree", agree)).increment(1);
        gauge!(SHADOW_LATENCY_DELTA, &self.pairs()).set(latency_delta_seconds);
    }

    pub fn decoded(&self, seconds: f64) {
        histogram!(DECODE_DURATION, &self.pairs()).record(seconds);
    }

    pub fn queued(&self, seconds: f64) {
        histogram!(QUEUE_DURATION, &self.pairs()).record(seconds);
    }

    pub fn batch(&self, size: usize, seconds: f64, bytes_per_image: f64) {
        let l = self.pairs();
        histogram!(INFERENCE_DURATION, &l).record(seconds);
        histogram!(BATCH_SIZE, &l).record(size as f64);
        gauge!(ACTIVATION_BYTES, &l).set(bytes_per_image);
    }

    pub fn queue_depth(&self, depth: usize) {
        gauge!(QUEUE_DEPTH, &self.pairs()).set(depth as f64);
    }

    pub fn compute_savings(&self, ratio: f64) {
        gauge!(COMPUTE_SAVINGS, &self.pairs()).set(ratio);
    }

    pub fn savings(&self, memory: f64, latency: f64) {
        let l = self.pairs();
        gauge!(MEMORY_SAVINGS, &l).set(memory);
        gauge!(LATENCY_SAVINGS, &l).set(latency);
    }
}

/// The canonical gRPC name of a status code, as other gRPC servers label it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Variants no longer served, as (model, variant). The exporter keeps every series it has seen
/// and cannot forget one, so [`render`] leaves these out instead.
static RETIRED: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());

/// Hides a variant's series from now on: it is no longer served.
pub fn retire(labels: &VariantLabels) {
    let key = (labels.model.clone(), labels.variant.clone());
    RETIRED.lock().unwrap().insert(key);
}

/// Shows a variant's series again: a variant of that name is served (again).
pub fn unretire(labels: &VariantLabels) {
    let key = (labels.model.clone(), labels.variant.clone());
    RETIRED.lock().unwrap().remove(&key);
}

/// The exposition text, without the series of retired variants.
pub fn render(handle: &PrometheusHandle) -> String {
    let text = handle.render();
    let retired = RETIRED.lock().unwrap();
    if retired.is_empty() {
        return text;
    }
    // Every variant series starts with these two labels, in this order (see `VariantLabels`).
    let prefixes: Vec<String> = retired
        .iter()
        .map(|(model, variant)| {
            format!(
                "{{model=\"{}\",variant=\"{}\"",
                escape(model),
                escape(variant)
            )
        })
        .collect();
    let is_retired = |line: &str| {
        prefixes.iter().any(|prefix| {
            line.find(prefix.as_str()).is_some_and(|at| {
                matches!(line.as_bytes().get(at + prefix.len()), Some(b',' | b'}'))
            })
        })
    };
    let mut kept = String::with_capacity(text.len());
    for line in text.lines().filter(|line| !is_retired(line)) {
        kept.push_str(line);
        kept.push('\n');
    }
    kept
}

/// A label value as the exposition format writes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_variants_leave_the_exposition_and_come_back_when_served_again() {
        let handle = handle();
        let gone = VariantLabels {
            model: "retire-test".into(),
            variant: "a".into(),
        };
        let kept = VariantLabels {
            model: "retire-test".into(),
            variant: "ab".into(),
        };
        gone.register(10, 1);
        kept.register(20, 2);
        let shown = |text: &str, v: &VariantLabels| {
            text.contains(&format!("model=\"{}\",variant=\"{}\"", v.model, v.variant))
        };
        let text = render(&handle);
        assert!(shown(&text, &gone) && shown(&text, &kept));
        retire(&gone);
        let text = render(&handle);
        assert!(!shown(&text, &gone), "{text}");
        assert!(
            shown(&text, &kept),
            "a variant whose name extends a retired one stays"
        );
        assert!(text.contains("# TYPE octserve_requests_total counter"));
        unretire(&gone);
        assert!(shown(&render(&handle), &gone));
    }
}
