//! Triton-style dynamic batching for one model variant.
//!
//! Handlers submit [`Job`]s into a bounded queue (full: refused at once). A batching task takes
//! the oldest job and hands a batch to the model worker as soon as the worker is idle, with
//! whatever else is queued by then: a lone request on an idle server never waits for company.
//! While the worker computes, arriving jobs gather into the next batch, which goes when it is
//! full, when the worker turns idle, or when its oldest job has waited `max_queue_delay`; then
//! it waits in a one-batch slot, so the worker starts it the moment it is done with the
//! current one. [`Dispatch::AfterDelay`] also waits for company with the worker idle (Triton's
//! rule with a queue delay set). Jobs whose caller gave up or whose deadline
//! or queue timeout passed are dropped when the batch leaves (answered DEADLINE_EXCEEDED or
//! RESOURCE_EXHAUSTED, never computed). The queue timeout is Triton's
//! `default_timeout_microseconds`: under overload it bounds how long an accepted request can
//! wait, where the queue size alone bounds it only at the capacity the server has when it is
//! not also busy refusing requests.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::config::{BatchingConfig, Dispatch};

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
    /// Jobs submitted and not yet handed to the worker.
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
        // Counted before the send, so that the batcher, which may take the job at once on
        // another thread, never lowers the count below zero.
        self.depth.fetch_add(1, Ordering::AcqRel);
        self.tx.try_send(job).map_err(|e| {
            self.depth.fetch_sub(1, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => InferError::QueueFull {
                    variant: self.variant.clone(),
                    capacity: self.capacity,
                },
                mpsc::error::TrySendError::Closed(_) => InferError::ShuttingDown,
            }
        })
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

    /// Jobs submitted and not yet handed to the model worker (the `octserve_queue_depth` gauge,
    /// read when metrics are scraped).
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }
}

/// Creates the hand-off from a variant's batcher to its model worker: a one-batch slot (the
/// next batch can wait there while the current one computes) and a signal of when the worker
/// is idle, waiting for a batch.
pub fn dispatch_channel() -> (BatchSender, BatchReceiver) {
    let (tx, rx) = mpsc::channel(1);
    let idle = Arc::new(WorkerIdle::default());
    (
        BatchSender {
            tx,
            idle: idle.clone(),
        },
        BatchReceiver { rx, idle },
    )
}

/// Whether the model worker is waiting for a batch, and a wake-up for the batcher when it
/// starts to.
#[derive(Default)]
struct WorkerIdle {
    waiting: AtomicBool,
    changed: Notify,
}

/// The batcher's end of [`dispatch_channel`].
pub struct BatchSender {
    tx: mpsc::Sender<Vec<Job>>,
    idle: Arc<WorkerIdle>,
}

/// The worker's end of [`dispatch_channel`].
pub struct BatchReceiver {
    rx: mpsc::Receiver<Vec<Job>>,
    idle: Arc<WorkerIdle>,
}

impl BatchReceiver {
    /// Waits, idle, for the worker's next batch; `None` once the batcher is gone.
    pub fn next_batch(&mut self) -> Option<Vec<Job>> {
        self.set_waiting(true);
        let batch = self.rx.blocking_recv();
        self.set_waiting(false);
        batch
    }

    /// [`Self::next_batch`] for async callers (tests that stand in for a worker).
    pub async fn next_batch_async(&mut self) -> Option<Vec<Job>> {
        self.set_waiting(true);
        let batch = self.rx.recv().await;
        self.set_waiting(false);
        batch
    }

    fn set_waiting(&self, waiting: bool) {
        self.idle.waiting.store(waiting, Ordering::Release);
        if waiting {
            self.idle.changed.notify_one();
        }
    }
}

/// Creates a variant's queue and the task that forms its batches; batches go to `batches`.
/// The task ends when every [`BatchQueue`] clone is dropped and the queue is drained.
pub fn spawn_batcher(
    variant: &str,
    config: BatchingConfig,
    batches: BatchSender,
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
    batches: BatchSender,
) {
    let max = config.max_batch_size.max(1);
    let when_idle = config.dispatch == Dispatch::WhenIdle;
    while let Some(first) = rx.recv().await {
        let flush_at = first.enqueued + config.max_queue_delay();
        let mut batch = vec![first];
        let open = gather(
            &mut rx,
            &mut batch,
            max,
            flush_at,
            when_idle.then_some(&*batches.idle),
        )
        .await;
        depth.fetch_sub(batch.len(), Ordering::AcqRel);
        let batch = drop_expired(batch);
        if !batch.is_empty() && batches.tx.send(batch).await.is_err() {
            return;
        }
        if !open {
            return;
        }
    }
}

/// Adds queued jobs to `batch` until it is full, `flush_at` passes, or (with `idle`) the
/// worker is waiting for a batch. Returns whether the queue is still open.
async fn gather(
    rx: &mut mpsc::Receiver<Job>,
    batch: &mut Vec<Job>,
    max: usize,
    flush_at: Instant,
    idle: Option<&WorkerIdle>,
) -> bool {
    loop {
        // Jobs already queued join first, so an idle worker gets them all at once.
        while batch.len() < max {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
        let worker_waiting = idle.is_some_and(|i| i.waiting.load(Ordering::Acquire));
        if batch.len() >= max || worker_waiting {
            return true;
        }
        let worker_idles = async {
            match idle {
                Some(idle) => idle.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            job = rx.recv() => match job {
                Some(job) => batch.push(job),
                None => return false,
            },
            // Woken when the worker starts waiting: the loop sees it and dispatches.
            () = worker_idles => {}
            // The worker stayed busy (or the policy waits for company): the batch goes to the
            // slot and waits there for the worker.
            _ = tokio::time::sleep_until(flush_at) => return true,
        }
    }
}

/// Keeps the jobs still worth computing: answers expired ones, forgets abandoned ones.
/// Checked when a batch leaves the queue and again when the worker takes it.
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
