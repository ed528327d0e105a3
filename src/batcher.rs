//! Triton-style dynamic batching for one model variant.
//!
//! Handlers submit [`Job`]s into a bounded queue (full: refused at once). A batching task takes
//! the oldest job, waits at most `max_queue_delay` from when that job arrived for more (a full
//! batch goes at once), drops jobs whose caller gave up or whose deadline or queue timeout passed
//! (answering DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED without computing them), and hands the
//! batch to the model worker through a one-slot channel, so the next batch forms while the
//! current one computes. The queue timeout is Triton's `default_timeout_microseconds`: under
//! overload it bounds how long an accepted request can wait, where the queue size alone bounds
//! it only at the capacity the server has when it is not also busy refusing requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::BatchingConfig;

/// Class probabilities of one image and how it was served.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub probabilities: Vec<f32>,
    pub queue_time: Duration,
    pub compute_time: Duration,
    pub batch_size: usize,
}

/// Why a job got no prediction.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum InferError {
    #[error("the queue of {variant} is full ({capacity} requests waiting); retry later")]
    QueueFull { variant: String, capacity: usize },
    #[error("the deadline passed while the request waited in the queue")]
    DeadlineExceeded,
    #[error("the request waited longer than {variant}'s queue timeout of {timeout:?}: the server is overloaded; retry later")]
    QueueTimeout { variant: String, timeout: Duration },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the model failed on this batch: {0}")]
    Model(String),
    #[error("the model worker died computing this batch; it is being restarted")]
    WorkerDied,
}

/// One image waiting to be computed.
pub struct Job {
    /// Normalised CHW input.
    pub input: Vec<f32>,
    pub enqueued: Instant,
    /// The caller's deadline (gRPC timeout).
    pub deadline: Option<Instant>,
    /// When the variant's queue timeout runs out, set on submission.
    queue_timeout: Option<(Instant, InferError)>,
    pub reply: oneshot::Sender<Result<Prediction, InferError>>,
}

impl Job {
    pub fn new(
        input: Vec<f32>,
        deadline: Option<Instant>,
    ) -> (Self, oneshot::Receiver<Result<Prediction, InferError>>) {
        let (reply, rx) = oneshot::channel();
        let job = Self {
            input,
            enqueued: Instant::now(),
            deadline,
            queue_timeout: None,
            reply,
        };
        (job, rx)
    }

    /// Why this job must not be computed any more, if it must not.
    fn expired(&self, now: Instant) -> Option<InferError> {
        if self.deadline.is_some_and(|d| d <= now) {
            return Some(InferError::DeadlineExceeded);
        }
        match &self.queue_timeout {
            Some((at, error)) if *at <= now => Some(error.clone()),
            _ => None,
        }
    }
}

/// The submitting side of a variant's queue.
#[derive(Clone)]
pub struct BatchQueue {
    variant: String,
    tx: mpsc::Sender<Job>,
    depth: Arc<AtomicUsize>,
    capacity: usize,
    timeout: Option<Duration>,
}

impl BatchQueue {
    /// Enqueues `job`, or refuses it at once when the queue is full or closed.
    pub fn submit(&self, mut job: Job) -> Result<(), InferError> {
        if let Some(timeout) = self.timeout {
            let error = InferError::QueueTimeout {
                variant: self.variant.clone(),
                timeout,
            };
            job.queue_timeout = Some((job.enqueued + timeout, error));
        }
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => InferError::QueueFull {
                variant: self.variant.clone(),
                capacity: self.capacity,
            },
            mpsc::error::TrySendError::Closed(_) => InferError::ShuttingDown,
        })?;
        self.depth.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Refuses at once when `n` more jobs would not fit, so that a server under overload does
    /// not spend CPU decoding images it is going to refuse anyway.
    pub fn ensure_room(&self, n: usize) -> Result<(), InferError> {
        if self.depth() + n > self.capacity {
            return Err(InferError::QueueFull {
                variant: self.variant.clone(),
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs waiting for a batch.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}

/// Creates a variant's queue and the task that forms its batches; batches go to `batches`.
/// The task ends when every [`BatchQueue`] clone is dropped and the queue is drained.
pub fn spawn_batcher(
    variant: &str,
    config: BatchingConfig,
    batches: mpsc::Sender<Vec<Job>>,
) -> (BatchQueue, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.max_queue_size.max(1));
    let depth = Arc::new(AtomicUsize::new(0));
    let queue = BatchQueue {
        variant: variant.to_string(),
        tx,
        depth: depth.clone(),
        capacity: config.max_queue_size,
        timeout: config.queue_timeout(),
    };
    let task = tokio::spawn(form_batches(rx, depth, config, batches));
    (queue, task)
}

async fn form_batches(
    mut rx: mpsc::Receiver<Job>,
    depth: Arc<AtomicUsize>,
    config: BatchingConfig,
    batches: mpsc::Sender<Vec<Job>>,
) {
    let max = config.max_batch_size.max(1);
    while let Some(first) = rx.recv().await {
        let flush_at = first.enqueued + config.max_queue_delay();
        let mut batch = vec![first];
        while batch.len() < max {
            tokio::select! {
                biased;
                job = rx.recv() => match job {
                    Some(job) => batch.push(job),
                    None => break,
                },
                _ = tokio::time::sleep_until(flush_at) => break,
            }
        }
        depth.fetch_sub(batch.len(), Ordering::Relaxed);
        let batch = drop_expired(batch);
        if !batch.is_empty() && batches.send(batch).await.is_err() {
            return;
        }
    }
}

/// Keeps the jobs still worth computing: answers expired ones, forgets abandoned ones.
/// Checked when a batch forms and again when the worker takes it.
pub fn drop_expired(batch: Vec<Job>) -> Vec<Job> {
    let now = Instant::now();
    batch
        .into_iter()
        .filter_map(|job| {
            if job.reply.is_closed() {
                return None;
            }
            match job.expired(now) {
                Some(error) => {
                    let _ = job.reply.send(Err(error));
                    None
                }
                None => Some(job),
            }
        })
        .collect()
}
