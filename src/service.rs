//! `octserve.v1.Classifier`: the request path from a gRPC call to a batched prediction.
//!
//! handler -> model/variant lookup (A/B router) -> decode budget -> decode (inline when small,
//! else on the blocking pool) -> bounded queue -> batcher -> model thread -> oneshot reply.
//! Errors are [`ServeError`]s, turned into gRPC statuses in one place.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::batcher::{InferError, Job, Prediction};
use crate::budget::DecodeBudget;
use crate::deadline::deadline;
use crate::error::ServeError;
use crate::pb;
use crate::preprocess::{decode_header, read_header, ImageLimits};
use crate::registry::{Change, IndexEntry, ModelState, Registry, ServedModel};
use crate::stats::savings;
use crate::variant::Variant;
use crate::worker::WorkerHealth;

/// Requests answered concurrently per `ClassifyStream` call.
const STREAM_CONCURRENCY: usize = 32;

/// Images of at most this many pixels are decoded on the handler's own thread: they take
/// microseconds, less than the hop to the blocking pool and back.
const INLINE_DECODE_PIXELS: u64 = 128 * 128;

/// A decode holding at least this much hands its freed memory back to the system afterwards,
/// so that a burst of large images does not leave the process's footprint at its peak.
const RELEASE_AFTER_BYTES: u64 = 8 << 20;

/// What every RPC handler shares: the models (once loaded), limits and the drain state.
pub struct ServingState {
    registry: OnceLock<Arc<Registry>>,
    pub limits: ImageLimits,
    budget: DecodeBudget,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    /// The model workers: a dead one makes the server not ready until it is restarted.
    pub workers: WorkerHealth,
    idle: Notify,
    /// Set once the drain is over: open streams end then.
    closed: watch::Sender<bool>,
}

impl Default for ServingState {
    fn default() -> Self {
        Self::new(ImageLimits::default())
    }
}

/// An encoded image turned into model input, and how long that took.
pub struct Decoded {
    pub input: Vec<f32>,
    pub time: Duration,
}

/// Counts a request as in flight until dropped.
pub struct InFlight<'a>(&'a ServingState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl ServingState {
    pub fn new(limits: ImageLimits) -> Self {
        Self {
            registry: OnceLock::new(),
            budget: DecodeBudget::new(limits.decode_budget_bytes, limits.decode_wait()),
            limits,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            workers: WorkerHealth::default(),
            idle: Notify::new(),
            closed: watch::channel(false).0,
        }
    }

    pub fn set_registry(&self, registry: Arc<Registry>) {
        let _ = self.registry.set(registry);
    }

    pub fn registry(&self) -> Result<&Arc<Registry>, ServeError> {
        self.registry.get().ok_or(ServeError::Loading)
    }

    /// Loads (or reloads) the model called `name` from the repository.
    pub async fn load_model(&self, name: &str) -> Result<Change, ServeError> {
        let name = name.to_string();
        self.off_runtime("model load", move |r| r.load(&name))
            .await?
    }

    /// Unloads the model called `name`.
    pub async fn unload_model(&self, name: &str) -> Result<(), ServeError> {
        let name = name.to_string();
        self.off_runtime("model unload", move |r| r.unload_by_client(&name))
            .await?
    }

    /// The repository index (see [`Registry::index`]), only READY entries when `ready`.
    pub async fn repository_index(&self, ready: bool) -> Result<Vec<IndexEntry>, ServeError> {
        let mut index = self
            .off_runtime("repository index", |r| r.index())
            .await?
            .map_err(|e| ServeError::Internal(format!("reading the repository: {e}")))?;
        if ready {
            index.retain(|e| e.state == ModelState::Ready);
        }
        Ok(index)
    }

    /// Runs `job` on the registry on the blocking pool: it reads manifests and weights, and
    /// waits for a repository change in progress.
    async fn off_runtime<T: Send + 'static>(
        &self,
        what: &str,
        job: impl FnOnce(&Registry) -> T + Send + 'static,
    ) -> Result<T, ServeError> {
        let registry = self.registry()?.clone();
        tokio::task::spawn_blocking(move || job(&registry))
            .await
            .map_err(|e| ServeError::Internal(format!("{what} task: {e}")))
    }

    /// Admits a request unless the server is draining.
    pub fn admit(&self) -> Result<InFlight<'_>, Status> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self);
        if self.draining.load(Ordering::Acquire) {
            return Err(Status::unavailable("the server is shutting down"));
        }
        Ok(guard)
    }

    /// Completes once the drain is over (open streams end then).
    pub async fn closed(&self) {
        let mut closed = self.closed.subscribe();
        let _ = closed.wait_for(|closed| *closed).await;
    }

    /// Sets the queue-depth gauges to the depths right now (called when metrics are scraped,
    /// so the gauge is never stale).
    pub fn publish_queue_depths(&self) {
        let Some(registry) = self.registry.get() else {
            return;
        };
        for model in registry.models() {
            for variant in &model.variants {
                variant.labels.queue_depth(variant.queue.depth());
            }
        }
    }

    /// Refuses new requests from now on, waits (at most `grace`) for accepted ones, then ends
    /// open streams.
    pub async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        let wait_idle = async {
            loop {
                let notified = self.idle.notified();
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(grace, wait_idle).await.is_err() {
            tracing::warn!(
                in_flight = self.in_flight.load(Ordering::Acquire),
                "grace period over; exiting with requests in flight"
            );
        }
        self.closed.send_replace(true);
    }

    /// Whether the models are loaded, every worker is up and the server is not draining.
    pub fn is_ready(&self) -> bool {
        self.registry.get().is_some()
            && self.workers.all_up()
            && !self.draining.load(Ordering::Acquire)
    }

    /// Decodes one encoded image into `model`'s input within the decode budget: refused from
    /// its header alone when it is over a limit, refused when no budget frees up in time.
    pub async fn decode(
        &self,
        model: &ServedModel,
        image: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<Decoded, ServeError> {
        let started = Instant::now();
        let header = read_header(&image, &model.input, &self.limits)?;
        let reservation = self.budget.reserve(header.decode_bytes, deadline).await?;
        let input = if header.pixels() <= INLINE_DECODE_PIXELS {
            decode_header(&image, &header, &model.input)?
        } else {
            let spec = model.input.clone();
            tokio::task::spawn_blocking(move || {
                let input = decode_header(&image, &header, &spec);
                drop(image);
                if header.decode_bytes >= RELEASE_AFTER_BYTES {
                    crate::alloc::release_freed_memory();
                }
                drop(reservation);
                input
            })
            .await
            .map_err(|e| ServeError::InvalidArgument(format!("image decoding failed: {e}")))??
        };
        Ok(Decoded {
            input,
            time: started.elapsed(),
        })
    }

    /// Classifies one decoded input on `variant` of `model`, mirroring it to the shadow variant
    /// when the routing says so.
    pub async fn infer(
        &self,
        model: &ServedModel,
        variant: &Variant,
        input: Vec<f32>,
        deadline: Option<Instant>,
    ) -> Result<Prediction, ServeError> {
        let shadow = model
            .shadow_for(variant)
            .and_then(|s| ShadowRun::submit(s, &input));
        let (job, reply) = Job::new(input, deadline);
        variant.queue.submit(job)?;
        let reply = match deadline {
            Some(d) => tokio::time::timeout_at(d, reply)
                .await
                .map_err(|_| ServeError::DeadlineExceeded)?,
            None => reply.await,
        };
        // Only a worker that died drops a job unanswered.
        let prediction = reply.map_err(|_| InferError::WorkerDied)??;
        // An answer computed after the caller's deadline reaches no one.
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(ServeError::DeadlineExceeded);
        }
        variant.labels.queued(prediction.queue_time.as_secs_f64());
        if let Some(shadow) = shadow {
            shadow.compare(&prediction);
        }
        Ok(prediction)
    }

    /// The whole `Classify` path for one request, with its metrics.
    pub async fn classify(
        &self,
        request: pb::ClassifyRequest,
        deadline: Option<Instant>,
    ) -> Result<pb::ClassifyResponse, ServeError> {
        let started = Instant::now();
        let model = self.registry()?.model(&request.model)?;
        let variant = model.variant(&request.variant, &request.routing_key)?;
        let record = RequestRecord::new(variant, started);
        let result = async {
            variant.queue.ensure_room(1)?;
            let decoded = self.decode(&model, request.image, deadline).await?;
            variant.labels.decoded(decoded.time.as_secs_f64());
            let prediction = self.infer(&model, variant, decoded.input, deadline).await?;
            Ok((prediction, decoded.time))
        }
        .await;
        let (prediction, decode_time) = record.finish(result)?;
        Ok(response(
            &model,
            variant,
            &prediction,
            request.top_k,
            decode_time,
            started.elapsed(),
        ))
    }
}

/// Records one request's status and latency on the variant that answers it, exactly once: when
/// it finishes, or as CANCELLED when it is dropped unfinished (the caller went away and its
/// handler with it).
pub struct RequestRecord<'a> {
    variant: &'a Variant,
    started: Instant,
    finished: bool,
}

impl<'a> RequestRecord<'a> {
    pub fn new(variant: &'a Variant, started: Instant) -> Self {
        Self {
            variant,
            started,
            finished: false,
        }
    }

    pub fn finish<T>(mut self, result: Result<T, ServeError>) -> Result<T, ServeError> {
        self.finished = true;
        let latency = self.started.elapsed().as_secs_f64();
        let code = result
            .as_ref()
            .map_or_else(|e| e.code(), |_| tonic::Code::Ok);
        self.variant.labels.request(code, latency);
        if result.is_ok() {
            self.variant.stats.record_request(latency * 1e3);
        }
        result
    }
}

impl Drop for RequestRecord<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let latency = self.started.elapsed().as_secs_f64();
            self.variant.labels.request(tonic::Code::Cancelled, latency);
        }
    }
}

/// A request mirrored to a shadow variant: computed in the background, compared with the
/// answer, never delaying it.
struct ShadowRun {
    reply: tokio::sync::oneshot::Receiver<Result<Prediction, InferError>>,
    submitted: Instant,
    stats: Arc<crate::stats::LiveStats>,
    labels: crate::metrics::VariantLabels,
}

impl ShadowRun {
    /// Queues a copy of `input` on `shadow`, unless its queue is half full: shadow work is
    /// dropped before it could crowd out requests that variant answers itself.
    fn submit(shadow: &Variant, input: &[f32]) -> Option<Self> {
        if shadow.queue.depth() >= shadow.queue.capacity() / 2 {
            tracing::debug!(variant = %shadow.name, "shadow queue busy; skipping");
            return None;
        }
        let (job, reply) = Job::new(input.to_vec(), None);
        shadow.queue.submit(job).ok()?;
        Some(Self {
            reply,
            submitted: Instant::now(),
            stats: shadow.stats.clone(),
            labels: shadow.labels.clone(),
        })
    }

    /// Waits for the shadow in a background task and records agreement and latency difference.
    fn compare(self, answer: &Prediction) {
        let answered_after = self.submitted.elapsed().as_secs_f64();
        let answer_top1 = argmax(&answer.probabilities);
        tokio::spawn(async move {
            if let Ok(Ok(shadow)) = self.reply.await {
                let delta = self.submitted.elapsed().as_secs_f64() - answered_after;
                let agree = argmax(&shadow.probabilities) == answer_top1;
                self.stats.record_shadow(agree, delta);
                self.labels.shadow(agree, delta);
            }
        });
    }
}

fn argmax(values: &[f32]) -> Option<usize> {
    (0..values.len()).max_by(|&a, &b| values[a].total_cmp(&values[b]))
}

/// The `top_k` most probable classes (0 means 5), best first.
pub fn top_k(probabilities: &[f32], labels: &[String], k: u32) -> Vec<pb::Class> {
    let k = if k == 0 { 5 } else { k as usize };
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]));
    order
        .into_iter()
        .take(k)
        .map(|i| pb::Class {
            label: labels.get(i).cloned().unwrap_or_default(),
            index: i as u32,
            score: probabilities[i],
        })
        .collect()
}

fn response(
    model: &ServedModel,
    variant: &Variant,
    p: &Prediction,
    k: u32,
    decode: Duration,
    total: Duration,
) -> pb::ClassifyResponse {
    pb::ClassifyResponse {
        model: model.name.clone(),
        variant: variant.name.clone(),
        classes: top_k(&p.probabilities, &model.labels, k),
        timing: Some(pb::Timing {
            queue_us: p.queue_time.as_micros() as u64,
            compute_us: p.compute_time.as_micros() as u64,
            total_us: total.as_micros() as u64,
            batch_size: p.batch_size as u32,
            decode_us: decode.as_micros() as u64,
        }),
        status: None,
    }
}

/// The gRPC service over a shared [`ServingState`].
#[derive(Clone)]
pub struct ClassifierService {
    state: Arc<ServingState>,
}

impl ClassifierService {
    pub fn new(state: Arc<ServingState>) -> Self {
        Self { state }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::ClassifyResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::classifier_server::Classifier for ClassifierService {
    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let _in_flight = self.state.admit()?;
        let deadline = deadline(&request);
        let request = request.into_inner();
        let span =
            tracing::info_span!("classify", model = %request.model, variant = %request.variant);
        // Instrumented, not entered: a guard held across `.await` stays entered on the thread
        // and becomes the parent of the next request's span, a chain that grows under load
        // until closing it overflows the stack.
        async {
            let response = self.state.classify(request, deadline).await;
            if let Err(e) = &response {
                tracing::debug!(error = %e, "request failed");
            }
            Ok(Response::new(response?))
        }
        .instrument(span)
        .await
    }

    type ClassifyStreamStream = ResponseStream;

    async fn classify_stream(
        &self,
        request: Request<Streaming<pb::ClassifyRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let deadline = deadline(&request);
        let state = self.state.clone();
        let closed = {
            let state = self.state.clone();
            Box::pin(async move { state.closed().await })
        };
        // Each request gets its own reply, failures included (in `status`), in order. Only
        // the stream itself failing (a malformed message) or the end of the drain ends it.
        let responses = request
            .into_inner()
            .map(move |item| {
                let state = state.clone();
                async move {
                    let item = item?;
                    let reply = match state.admit() {
                        Ok(_in_flight) => state.classify(item, deadline).await,
                        Err(_) => Err(ServeError::ShuttingDown),
                    };
                    Ok(reply.unwrap_or_else(|e| failed_item(&e)))
                }
            })
            .buffered(STREAM_CONCURRENCY)
            .take_until(closed);
        Ok(Response::new(Box::pin(end_on_close(responses))))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let registry = self.state.registry()?;
        let models = registry.models().iter().map(|m| model_info(m)).collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}

/// The replies, then UNAVAILABLE if the drain ended the stream before its client did.
fn end_on_close<S, F>(
    replies: futures::stream::TakeUntil<S, F>,
) -> impl Stream<Item = Result<pb::ClassifyResponse, Status>>
where
    S: Stream<Item = Result<pb::ClassifyResponse, Status>> + Unpin,
    F: std::future::Future + Unpin,
{
    futures::stream::unfold(Some(replies), |replies| async move {
        let mut replies = replies?;
        match replies.next().await {
            Some(reply) => Some((reply, Some(replies))),
            // Only a resolved stop future leaves a result: the client's own end leaves none.
            None if replies.take_result().is_some() => Some((
                Err(Status::unavailable("the server is shutting down")),
                None,
            )),
            None => None,
        }
    })
}

/// A `ClassifyStream` reply for a request that failed.
fn failed_item(error: &ServeError) -> pb::ClassifyResponse {
    pb::ClassifyResponse {
        status: Some(pb::ItemStatus {
            code: error.code() as i32,
            message: error.to_string(),
        }),
        ..Default::default()
    }
}

fn model_info(model: &ServedModel) -> pb::ModelInfo {
    let baseline = model.baseline();
    let base_costs = baseline.stats.costs();
    let routing = &model.routing;
    let variants = model
        .variants
        .iter()
        .map(|v| {
            let s = v.stats.snapshot();
            let (memory_savings, latency_savings) = v.stats.costs().savings_against(&base_costs);
            pb::VariantInfo {
                name: v.name.clone(),
                arch: v.arch.clone(),
                alpha: v.alpha,
                params: v.cost.params as u64,
                macs: v.cost.macs as u64,
                activation_bytes: v.cost.activation_bytes as u64,
                accuracy: v.accuracy.unwrap_or(0.),
                baseline: v.name == model.baseline,
                routing_weight: routing.router.weight(&v.name),
                stats: Some(pb::VariantStats {
                    requests: s.requests,
                    p50_ms: s.p50_ms,
                    p99_ms: s.p99_ms,
                    memory_savings_ratio: memory_savings,
                    compute_savings_ratio: savings(v.cost.macs as f64, baseline.cost.macs as f64),
                    latency_savings_ratio: latency_savings,
                    shadow_comparisons: s.shadow_comparisons,
                    shadow_agreements: s.shadow_agreements,
                    shadow_latency_delta_ms: s.shadow_latency_delta_ms,
                    measured_activation_bytes: s.bytes_per_image as u64,
                }),
            }
        })
        .collect();
    pb::ModelInfo {
        name: model.name.clone(),
        variants,
        labels: model.labels.clone(),
        input_channels: model.input.channels as u32,
        input_height: model.input.height as u32,
        input_width: model.input.width as u32,
        shadow_variant: routing
            .shadow
            .as_ref()
            .map(|s| s.variant.clone())
            .unwrap_or_default(),
        shadow_fraction: routing.shadow.as_ref().map_or(0., |s| s.fraction),
    }
}
