//! Bulkhead: a cap on calls in flight to one downstream. A call over the cap
//! is rejected at once (BULKHEAD_FULL) instead of queueing, so a slow
//! downstream holds at most its own share of bfb and never the others'.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

use crate::{error::Reason, telemetry::metrics::DownstreamMetrics};

use super::{Call, CallFuture, Failed};

/// Adds a [`Bulkhead`] of `max` calls.
#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    permits: Arc<Semaphore>,
    metrics: DownstreamMetrics,
}

impl BulkheadLayer {
    /// At most `max` calls in flight.
    pub fn new(max: usize, metrics: DownstreamMetrics) -> BulkheadLayer {
        BulkheadLayer {
            permits: Arc::new(Semaphore::new(max)),
            metrics,
        }
    }
}

impl BulkheadLayer {
    /// Takes a slot for one call, held until the returned guard is dropped
    /// (however the call ends); over the cap, BULKHEAD_FULL at once.
    pub fn enter(&self) -> Result<impl Drop + Send + use<>, Failed> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.metrics.bulkhead_rejections.inc();
            return Err(Failed::because(Reason::BulkheadFull));
        };
        Ok(InUse::new(permit, &self.metrics))
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;
    fn layer(&self, inner: S) -> Bulkhead<S> {
        Bulkhead {
            inner,
            gate: self.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Bulkhead<S> {
    inner: S,
    gate: BulkheadLayer,
}

impl<S> Bulkhead<S> {
    /// Calls in flight now.
    pub fn in_use(&self, max: usize) -> usize {
        max - self.gate.permits.available_permits()
    }
}

impl<S, M, T> Service<Call<M>> for Bulkhead<S>
where
    S: Service<Call<M>, Response = T, Error = Failed> + Clone + Send + 'static,
    S::Future: Send,
    M: Send + 'static,
    T: Send + 'static,
{
    type Response = T;
    type Error = Failed;
    type Future = CallFuture<T>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<M>) -> Self::Future {
        let slot = self.gate.enter();
        let inner = self.inner.clone();
        Box::pin(async move {
            // Held until the call ends, however it ends (dropped included).
            let _slot = slot?;
            inner.oneshot(call).await
        })
    }
}

/// A bulkhead slot, counted in the in-use gauge while held.
struct InUse {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl InUse {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, metrics: &DownstreamMetrics) -> InUse {
        metrics.bulkhead_in_use.inc();
        InUse {
            _permit: permit,
            gauge: metrics.bulkhead_in_use.clone(),
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Deadlines, deadline::Deadline};
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn call() -> Call<()> {
        let d = Deadline::from_metadata(
            &tonic::metadata::MetadataMap::new(),
            &Deadlines::default(),
            tokio::time::Instant::now(),
        );
        Call::new((), d)
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_over_the_cap_at_once_and_frees_on_completion() {
        let (release, wait) = oneshot::channel::<()>();
        let wait = Arc::new(tokio::sync::Mutex::new(Some(wait)));
        let inner = tower::service_fn(move |_: Call<()>| {
            let wait = wait.clone();
            async move {
                if let Some(w) = wait.lock().await.take() {
                    let _ = w.await;
                }
                Ok::<_, Failed>(())
            }
        });
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new())
            .downstream(crate::component::Component::Orders);
        let svc = BulkheadLayer::new(1, metrics.clone()).layer(inner);
        let first = tokio::spawn(svc.clone().oneshot(call()));
        tokio::task::yield_now().await;
        assert_eq!(svc.in_use(1), 1);
        let rejected = tokio::time::timeout(Duration::from_millis(1), svc.clone().oneshot(call()))
            .await
            .expect("rejects without waiting");
        assert_eq!(rejected, Err(Failed::because(Reason::BulkheadFull)));
        assert_eq!(metrics.bulkhead_rejections.get(), 1);
        assert_eq!(metrics.bulkhead_in_use.get(), 1);
        let _ = release.send(());
        first.await.expect("join").expect("first call succeeds");
        assert_eq!(svc.in_use(1), 0);
        assert_eq!(metrics.bulkhead_in_use.get(), 0);
        assert!(svc.clone().oneshot(call()).await.is_ok());
    }
}
