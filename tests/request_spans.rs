//! Request spans must not nest into each other. A span guard held across `.await` stays entered
//! on the runtime thread, so the next request's span takes it as parent; under overload the
//! chain reached thousands of spans and closing it overflowed a runtime thread's stack, killing
//! the server. Its own binary because it installs the process-wide subscriber.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use common::{random_model_dir, trouser_png, TestServer};
use octserve::config::ServeConfig;
use octserve::pb::ClassifyRequest;

const REQUEST_SPANS: [&str; 2] = ["classify", "model_infer"];

/// Counts request spans, and those created inside another request span.
#[derive(Clone, Default)]
struct NestedRequestSpans {
    created: Arc<AtomicUsize>,
    nested: Arc<AtomicUsize>,
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for NestedRequestSpans {
    fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, ctx: Context<'_, S>) {
        if !REQUEST_SPANS.contains(&attrs.metadata().name()) {
            return;
        }
        self.created.fetch_add(1, Ordering::SeqCst);
        let parent = if attrs.is_contextual() {
            ctx.lookup_current()
        } else {
            attrs.parent().and_then(|id| ctx.span(id))
        };
        if parent.is_some_and(|p| REQUEST_SPANS.contains(&p.name())) {
            self.nested.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_sibling_spans_not_a_chain() {
    let spans = NestedRequestSpans::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .unwrap();
    let dir = random_model_dir("toy", &[("vanilla", "resnet20", 0.0, 1.0)], None);
    let server = TestServer::start(ServeConfig::default(), dir.path()).await;
    let image = trouser_png();
    for _ in 0..3 {
        let calls = (0..40).map(|_| {
            let mut client = server.client();
            let request = ClassifyRequest {
                model: "toy".into(),
                image: image.clone(),
                ..Default::default()
            };
            async move { client.classify(request).await.unwrap() }
        });
        futures::future::join_all(calls).await;
    }
    assert_eq!(spans.created.load(Ordering::SeqCst), 120);
    assert_eq!(
        spans.nested.load(Ordering::SeqCst),
        0,
        "request spans nested"
    );
}
