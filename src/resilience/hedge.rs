//! Hedging: when an attempt has not answered by the downstream's observed
//! latency percentile (e.g. p95), send one more copy; the first answer wins
//! and the other is cancelled. Off by default, per downstream; each hedge
//! draws on the retry budget, so hedging adds at most that much load.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{Either, select};
use tokio::time::Instant;
use tower::{
    Layer, Service, ServiceExt,
    retry::budget::{Budget, TpsBudget},
};

use crate::{config::HedgeSettings, telemetry::metrics::DownstreamMetrics};

use super::{Call, CallFuture, Failed};

/// How many recent latencies the percentile is computed over.
const SAMPLES: usize = 512;
/// Recompute the percentile every this many samples (amortizes the sort).
const RECOMPUTE_EVERY: u64 = 32;

/// Recent latencies of one downstream and their percentile.
#[derive(Debug)]
pub struct Latencies {
    percentile: f64,
    ring: Mutex<Vec<u64>>,
    seen: AtomicU64,
    /// The percentile in microseconds (0: not known yet).
    threshold_us: AtomicU64,
}

impl Latencies {
    /// Tracks the `percentile` of recent latencies.
    pub fn new(percentile: f64) -> Latencies {
        Latencies {
            percentile,
            ring: Mutex::new(Vec::with_capacity(SAMPLES)),
            seen: AtomicU64::new(0),
            threshold_us: AtomicU64::new(0),
        }
    }

    /// Records one answered call's latency.
    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() < SAMPLES {
            ring.push(us);
        } else {
            ring[(n as usize) % SAMPLES] = us;
        }
        if n % RECOMPUTE_EVERY == RECOMPUTE_EVERY - 1 || n < RECOMPUTE_EVERY {
            let mut sorted = ring.clone();
            drop(ring);
            let i = ((sorted.len() as f64 * self.percentile) as usize).min(sorted.len() - 1);
            let (_, p, _) = sorted.select_nth_unstable(i);
            self.threshold_us.store(*p, Ordering::Relaxed);
        }
    }

    /// Calls recorded so far.
    pub fn count(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    /// The current percentile, once known.
    pub fn threshold(&self) -> Option<Duration> {
        match self.threshold_us.load(Ordering::Relaxed) {
            0 if self.count() == 0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// Adds [`Hedge`].
#[derive(Clone, Debug)]
pub struct HedgeLayer {
    settings: Arc<HedgeSettings>,
    latencies: Arc<Latencies>,
    budget: Arc<TpsBudget>,
    metrics: DownstreamMetrics,
}

impl HedgeLayer {
    /// Hedges per `settings`, drawing on `budget`.
    pub fn new(
        settings: HedgeSettings,
        budget: Arc<TpsBudget>,
        metrics: DownstreamMetrics,
    ) -> HedgeLayer {
        HedgeLayer {
            latencies: Arc::new(Latencies::new(settings.percentile)),
            settings: Arc::new(settings),
            budget,
            metrics,
        }
    }
}

impl HedgeLayer {
    /// Runs `attempt` for `call`; when hedging is on and it has not
    /// answered by the observed percentile, one more copy (see the module
    /// docs). The first success wins; dropping the other cancels it.
    ///
    /// Not an `async fn`: with hedging off (the default) the future is the
    /// attempt's own, not a wrapper keeping the call beside it; with it on,
    /// the hedging state machine is boxed.
    pub fn run<'a, M, T, F, Fut>(
        &'a self,
        call: Call<M>,
        attempt: F,
    ) -> impl Future<Output = Result<T, Failed>> + use<'a, M, T, F, Fut>
    where
        M: Clone + Send + 'a,
        T: Send + 'a,
        F: Fn(Call<M>) -> Fut + Send + 'a,
        Fut: Future<Output = Result<T, Failed>> + Send + 'a,
    {
        if !self.settings.enabled {
            return Either::Left(attempt(call));
        }
        Either::Right(Box::pin(self.hedged(call, attempt)))
    }

    async fn hedged<M, T, F, Fut>(&self, call: Call<M>, attempt: F) -> Result<T, Failed>
    where
        M: Clone,
        F: Fn(Call<M>) -> Fut,
        Fut: Future<Output = Result<T, Failed>>,
    {
        let (settings, latencies) = (&self.settings, &self.latencies);
        let delay = (latencies.count() >= settings.min_samples as u64)
            .then(|| latencies.threshold())
            .flatten()
            .map(|d| d.max(settings.min_delay));
        let first = Box::pin(timed(attempt(call.clone()), latencies));
        let Some(delay) = delay else {
            return first.await;
        };
        let timer = Box::pin(tokio::time::sleep(delay));
        let first = match select(first, timer).await {
            Either::Left((result, _)) => return result,
            Either::Right(((), first)) => first,
        };
        if !call.deadline.has_time_after(Duration::ZERO) || !self.budget.withdraw() {
            return first.await;
        }
        self.metrics.hedges.inc();
        let copy = Call {
            hedge: true,
            ..call
        };
        let second = Box::pin(timed(attempt(copy), latencies));
        // If the first to finish failed, the other may still succeed.
        match select(first, second).await {
            Either::Left((Ok(v), _)) | Either::Right((Ok(v), _)) => Ok(v),
            Either::Left((Err(_), other)) => other.await,
            Either::Right((Err(_), other)) => other.await,
        }
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;
    fn layer(&self, inner: S) -> Hedge<S> {
        Hedge {
            inner,
            policy: self.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Hedge<S> {
    inner: S,
    policy: HedgeLayer,
}

/// Runs one attempt and records its latency if the downstream answered.
async fn timed<T>(
    attempt: impl Future<Output = Result<T, Failed>>,
    latencies: &Latencies,
) -> Result<T, Failed> {
    let started = Instant::now();
    let result = attempt.await;
    if result.is_ok() {
        latencies.record(started.elapsed());
    }
    result
}

impl<S, M, T> Service<Call<M>> for Hedge<S>
where
    S: Service<Call<M>, Response = T, Error = Failed> + Clone + Send + Sync + 'static,
    S::Future: Send,
    M: Clone + Send + Sync + 'static,
    T: Send + 'static,
{
    type Response = T;
    type Error = Failed;
    type Future = CallFuture<T>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<M>) -> Self::Future {
        let (inner, policy) = (self.inner.clone(), self.policy.clone());
        Box::pin(async move { policy.run(call, |c| inner.clone().oneshot(c)).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Deadlines, deadline::Deadline};
    use std::sync::atomic::AtomicU32;

    fn call() -> Call<()> {
        let d = Deadline::from_metadata(
            &tonic::metadata::MetadataMap::new(),
            &Deadlines::default(),
            Instant::now(),
        );
        Call::new((), d)
    }

    fn metrics() -> DownstreamMetrics {
        Arc::new(crate::telemetry::metrics::Metrics::new())
            .downstream(crate::component::Component::Orders)
    }

    #[test]
    fn percentile_of_recent_latencies() {
        let l = Latencies::new(0.95);
        assert_eq!(l.threshold(), None);
        // 128 samples: a recompute point (every 32).
        for i in 1..=128 {
            l.record(Duration::from_millis(i));
        }
        // Index 121 of 128 sorted samples (0.95 * 128 = 121.6).
        assert_eq!(l.threshold(), Some(Duration::from_millis(122)));
        // Beyond the ring's size old samples are replaced.
        for _ in 0..SAMPLES {
            l.record(Duration::from_millis(5));
        }
        assert_eq!(l.threshold(), Some(Duration::from_millis(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_attempt_is_hedged_and_the_fast_copy_wins() {
        // Every odd call is slow (1 s), every even one fast (10 ms).
        let n = Arc::new(AtomicU32::new(0));
        let hedges = Arc::new(AtomicU32::new(0));
        let (calls, hedged) = (n.clone(), hedges.clone());
        let inner = tower::service_fn(move |c: Call<()>| {
            let i = calls.fetch_add(1, Ordering::Relaxed);
            if c.hedge {
                hedged.fetch_add(1, Ordering::Relaxed);
            }
            async move {
                let ms = if i % 2 == 1 { 1000 } else { 10 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, Failed>(ms)
            }
        });
        let settings = HedgeSettings {
            enabled: true,
            min_samples: 4,
            ..HedgeSettings::default()
        };
        let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 100, 1.0));
        let svc = HedgeLayer::new(settings, budget, metrics()).layer(inner);
        // Warm up with fast calls only (call 0 fast; odd calls would be slow,
        // so record four fast latencies by hand).
        for _ in 0..4 {
            svc.policy.latencies.record(Duration::from_millis(10));
        }
        n.store(1, Ordering::Relaxed); // the next call is slow
        let started = Instant::now();
        let answer = svc.clone().oneshot(call()).await.expect("ok");
        assert_eq!(answer, 10, "the hedge's fast answer wins");
        assert_eq!(hedges.load(Ordering::Relaxed), 1);
        // p95 of 10 ms + the copy's 10 ms, not the first attempt's 1 s.
        assert!(
            started.elapsed() <= Duration::from_millis(25),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_or_unwarmed_hedging_sends_one_copy() {
        let n = Arc::new(AtomicU32::new(0));
        let calls = n.clone();
        let inner = tower::service_fn(move |_: Call<()>| {
            calls.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok::<_, Failed>(())
            }
        });
        let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 100, 1.0));
        let on = HedgeSettings {
            enabled: true,
            min_samples: 1000,
            ..HedgeSettings::default()
        };
        HedgeLayer::new(on, budget.clone(), metrics())
            .layer(inner.clone())
            .oneshot(call())
            .await
            .expect("ok");
        HedgeLayer::new(HedgeSettings::default(), budget, metrics())
            .layer(inner)
            .oneshot(call())
            .await
            .expect("ok");
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }
}
