//! The dynamic batcher and model worker with a fake model, on tokio's paused clock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use octserve::batcher::{dispatch_channel, spawn_batcher, BatchQueue, InferError, Job, Prediction};
use octserve::config::{BatchingConfig, Dispatch};
use octserve::worker::{spawn_worker, BatchModel, WorkerHealth};

const DELAY: Duration = Duration::from_millis(10);

fn config(max_batch_size: usize, max_queue_size: usize) -> BatchingConfig {
    BatchingConfig {
        max_batch_size,
        max_queue_delay_us: DELAY.as_micros() as u64,
        max_queue_size,
        queue_timeout_us: 0,
        dispatch: Dispatch::WhenIdle,
    }
}

/// Echoes each input as its "probabilities"; panics on an input starting with -1; counts calls.
#[derive(Clone, Default)]
struct Echo {
    calls: Arc<AtomicUsize>,
    images: Arc<AtomicUsize>,
    batch_sizes: Arc<Mutex<Vec<usize>>>,
}

impl BatchModel for Echo {
    fn infer(&mut self, inputs: &[&[f32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.images.fetch_add(inputs.len(), Ordering::SeqCst);
        self.batch_sizes.lock().unwrap().push(inputs.len());
        assert!(inputs.iter().all(|x| x[0] != -1.), "poisoned input");
        Ok(inputs.iter().map(|x| x.to_vec()).collect())
    }
}

fn served(config: BatchingConfig) -> (BatchQueue, Echo) {
    let (tx, rx) = dispatch_channel();
    let (queue, _) = spawn_batcher("test", config, tx);
    let echo = Echo::default();
    spawn_worker("test", echo.clone(), rx, |_| {}, WorkerHealth::default()).unwrap();
    (queue, echo)
}

type Reply = tokio::sync::oneshot::Receiver<Result<Prediction, InferError>>;

fn submit(queue: &BatchQueue, value: f32, deadline: Option<Instant>) -> Reply {
    let (job, reply) = Job::new(vec![value], deadline);
    queue.submit(job).unwrap();
    reply
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_goes_at_once() {
    let (tx, mut rx) = dispatch_channel();
    let (queue, _) = spawn_batcher("test", config(4, 64), tx);
    let start = Instant::now();
    let _replies: Vec<Reply> = (0..4).map(|i| submit(&queue, i as f32, None)).collect();
    let batch = rx.next_batch_async().await.unwrap();
    assert_eq!(batch.len(), 4);
    assert!(
        start.elapsed() < DELAY,
        "a full batch waited {:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn after_delay_a_partial_batch_waits_the_queue_delay_for_company() {
    let (tx, mut rx) = dispatch_channel();
    let after_delay = BatchingConfig {
        dispatch: Dispatch::AfterDelay,
        ..config(4, 64)
    };
    let (queue, _) = spawn_batcher("test", after_delay, tx);
    let start = Instant::now();
    let _replies: Vec<Reply> = (0..2).map(|i| submit(&queue, i as f32, None)).collect();
    let batch = rx.next_batch_async().await.unwrap();
    assert_eq!(batch.len(), 2);
    assert_eq!(start.elapsed(), DELAY);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_at_once() {
    // No worker is ever idle: one batch waits in the batcher, then the queue fills.
    let (tx, _rx) = dispatch_channel();
    let (queue, _) = spawn_batcher("test", config(1, 2), tx);
    let mut outcomes = Vec::new();
    for i in 0..10 {
        let (job, _reply) = Job::new(vec![i as f32], None);
        outcomes.push(queue.submit(job));
        tokio::task::yield_now().await;
    }
    let full = outcomes
        .iter()
        .filter(|o| matches!(o, Err(InferError::QueueFull { capacity: 2, .. })))
        .count();
    assert!(outcomes[0].is_ok() && outcomes[1].is_ok());
    assert!(full >= 6, "{outcomes:?}");
}

#[tokio::test(start_paused = true)]
async fn an_expired_request_is_answered_and_never_computed() {
    // Waiting for company keeps the request queued past its deadline.
    let (queue, echo) = served(BatchingConfig {
        dispatch: Dispatch::AfterDelay,
        ..config(8, 64)
    });
    let expired = submit(&queue, 1., Some(Instant::now() + DELAY / 2));
    let patient = submit(&queue, 2., None);
    assert_eq!(expired.await.unwrap(), Err(InferError::DeadlineExceeded));
    assert_eq!(patient.await.unwrap().unwrap().probabilities, vec![2.]);
    assert_eq!(
        echo.images.load(Ordering::SeqCst),
        1,
        "only the live request is computed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_request_is_skipped() {
    let (queue, echo) = served(config(8, 64));
    drop(submit(&queue, 1., None));
    let kept = submit(&queue, 2., None);
    assert!(kept.await.unwrap().is_ok());
    assert_eq!(echo.images.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn results_go_back_to_their_callers() {
    let (queue, echo) = served(config(8, 1024));
    let mut values: Vec<u32> = (0..200).collect();
    values.reverse();
    values.swap(3, 150);
    let tasks: Vec<_> = values
        .iter()
        .map(|&v| {
            let reply = submit(&queue, v as f32, None);
            tokio::spawn(async move { (v, reply.await.unwrap().unwrap()) })
        })
        .collect();
    for task in tasks {
        let (v, prediction) = task.await.unwrap();
        assert_eq!(prediction.probabilities, vec![v as f32]);
        assert!(prediction.batch_size >= 1);
    }
    let sizes = echo.batch_sizes.lock().unwrap();
    assert_eq!(sizes.iter().sum::<usize>(), 200);
    assert!(sizes.iter().all(|&s| s <= 8));
}

#[tokio::test]
async fn a_panicking_batch_fails_alone_and_the_worker_keeps_serving() {
    let (queue, echo) = served(config(1, 64));
    let poisoned = submit(&queue, -1., None).await.unwrap();
    assert!(
        matches!(poisoned, Err(InferError::Model(ref m)) if m.contains("poisoned")),
        "{poisoned:?}"
    );
    let next = submit(&queue, 5., None).await.unwrap().unwrap();
    assert_eq!(next.probabilities, vec![5.]);
    assert_eq!(echo.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_outwaits_the_queue_timeout_is_refused_and_a_prompt_one_computed() {
    let timeout = DELAY / 2;
    let (queue, echo) = served(BatchingConfig {
        queue_timeout_us: timeout.as_micros() as u64,
        dispatch: Dispatch::AfterDelay,
        ..config(2, 64)
    });
    // Alone, it waits the whole queue delay for a partner: longer than the timeout.
    let late = submit(&queue, 1., None).await.unwrap();
    assert_eq!(
        late,
        Err(InferError::QueueTimeout {
            variant: "test".into(),
            timeout
        })
    );
    // A full batch goes at once, well within the timeout.
    let (a, b) = (submit(&queue, 2., None), submit(&queue, 3., None));
    assert_eq!(a.await.unwrap().unwrap().probabilities, vec![2.]);
    assert_eq!(b.await.unwrap().unwrap().probabilities, vec![3.]);
    assert_eq!(
        echo.images.load(Ordering::SeqCst),
        2,
        "the late one was not computed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lone_request_on_an_idle_worker_goes_at_once() {
    let (tx, mut rx) = dispatch_channel();
    let slow_to_fill = BatchingConfig {
        max_queue_delay_us: 10_000_000,
        ..config(32, 64)
    };
    let (queue, _) = spawn_batcher("test", slow_to_fill, tx);
    let start = Instant::now();
    let _reply = submit(&queue, 1., None);
    let batch = rx.next_batch_async().await.unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO, "the lone request waited");
}

#[tokio::test(start_paused = true)]
async fn requests_arriving_while_a_batch_computes_form_the_next_batch() {
    let (tx, mut rx) = dispatch_channel();
    let (queue, _) = spawn_batcher("test", config(32, 64), tx);
    let _first = submit(&queue, 0., None);
    assert_eq!(rx.next_batch_async().await.unwrap().len(), 1);
    // The worker computes (takes no batch) while five more arrive together.
    let start = Instant::now();
    let _replies: Vec<Reply> = (1..6).map(|i| submit(&queue, i as f32, None)).collect();
    tokio::time::sleep(DELAY / 2).await;
    assert_eq!(
        queue.depth(),
        5,
        "they wait for company while the worker is busy"
    );
    tokio::time::sleep(DELAY).await;
    assert_eq!(
        queue.depth(),
        0,
        "after the queue delay they wait in the slot"
    );
    let batch = rx.next_batch_async().await.unwrap();
    let values: Vec<f32> = batch.iter().map(|j| j.input[0]).collect();
    assert_eq!(values, [1., 2., 3., 4., 5.]);
    assert_eq!(start.elapsed(), DELAY * 3 / 2);
}

#[tokio::test(start_paused = true)]
async fn a_batch_gathering_behind_a_busy_worker_goes_when_the_worker_turns_idle() {
    let (tx, mut rx) = dispatch_channel();
    let slow_to_fill = BatchingConfig {
        max_queue_delay_us: 10_000_000,
        ..config(32, 64)
    };
    let (queue, _) = spawn_batcher("test", slow_to_fill, tx);
    let _first = submit(&queue, 0., None);
    assert_eq!(rx.next_batch_async().await.unwrap().len(), 1);
    let _replies: Vec<Reply> = (1..4).map(|i| submit(&queue, i as f32, None)).collect();
    tokio::time::sleep(DELAY).await;
    let start = Instant::now();
    let batch = rx.next_batch_async().await.unwrap();
    assert_eq!(batch.len(), 3);
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "the idle worker waited for the delay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_depth_counts_waiting_jobs_and_returns_to_zero() {
    let (tx, rx) = dispatch_channel();
    let (queue, _) = spawn_batcher("test", config(8, 4096), tx);
    spawn_worker("test", Echo::default(), rx, |_| {}, WorkerHealth::default()).unwrap();
    let watcher = {
        let queue = queue.clone();
        tokio::spawn(async move {
            for _ in 0..2000 {
                let depth = queue.depth();
                assert!(depth <= 2000, "the depth wrapped: {depth}");
                tokio::task::yield_now().await;
            }
        })
    };
    let submitters: Vec<_> = (0..4)
        .map(|t| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let replies: Vec<Reply> = (0..500)
                    .map(|i| submit(&queue, (t * 1000 + i) as f32, None))
                    .collect();
                for reply in replies {
                    reply.await.unwrap().unwrap();
                }
            })
        })
        .collect();
    for submitter in submitters {
        submitter.await.unwrap();
    }
    watcher.await.unwrap();
    assert_eq!(queue.depth(), 0, "an idle queue reports waiting jobs");
}
