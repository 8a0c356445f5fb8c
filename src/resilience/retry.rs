//! Retries: only of UNAVAILABLE answers (no response message arrived, so a
//! read is safe to repeat), with full-jitter exponential backoff that must fit
//! in the caller's remaining deadline, at most `max_attempts`, honouring
//! `grpc-retry-pushback-ms`, and only while the retry budget allows.
//!
//! Why a budget and not only max attempts: when a downstream fails every
//! call, "3 attempts" triples its load just when it is least able to take it.
//! tower's `TpsBudget` allows retries of at most `budget_percent` of calls
//! (plus a small floor), so a failing downstream sees about 1.2× the calls it
//! would see without retries. Hedges draw on the same budget.

use std::{
    future::Future,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rand::Rng;
use tower::{
    Layer, Service, ServiceExt,
    retry::budget::{Budget, TpsBudget},
};

use crate::{config::RetrySettings, telemetry::metrics::DownstreamMetrics};

use super::{Call, CallFuture, Failed, Pushback};

/// Adds [`Retry`].
#[derive(Clone, Debug)]
pub struct RetryLayer {
    settings: Arc<RetrySettings>,
    budget: Arc<TpsBudget>,
    metrics: DownstreamMetrics,
}

impl RetryLayer {
    /// Retries per `settings`, drawing on `budget`.
    pub fn new(
        settings: RetrySettings,
        budget: Arc<TpsBudget>,
        metrics: DownstreamMetrics,
    ) -> RetryLayer {
        RetryLayer {
            settings: Arc::new(settings),
            budget,
            metrics,
        }
    }
}

impl RetryLayer {
    /// Runs `attempt` for `call`, and again for each retry the policy
    /// allows (see the module docs); the last attempt's result.
    pub async fn run<M, T, F, Fut>(&self, call: Call<M>, mut attempt: F) -> Result<T, Failed>
    where
        M: Clone,
        F: FnMut(Call<M>) -> Fut,
        Fut: Future<Output = Result<T, Failed>>,
    {
        let (settings, budget) = (&self.settings, &self.budget);
        budget.deposit();
        let mut n = 1;
        loop {
            let this = Call {
                attempt: n,
                ..call.clone()
            };
            let result = attempt(this).await;
            let Err(failed) = &result else {
                return result;
            };
            if !failed.retryable || n >= settings.max_attempts {
                return result;
            }
            let wait = match failed.pushback {
                Pushback::Never => return result,
                Pushback::After(d) => d,
                Pushback::None => backoff(settings, n),
            };
            if !call.deadline.has_time_after(wait) || !budget.withdraw() {
                return result;
            }
            tokio::time::sleep(wait).await;
            self.metrics.retries.inc();
            n += 1;
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: self.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    policy: RetryLayer,
}

/// Full-jitter backoff before retry number `retry` (1-based).
pub fn backoff(settings: &RetrySettings, retry: u32) -> Duration {
    let exp = settings
        .initial_backoff
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16));
    let cap = exp.min(settings.max_backoff);
    cap.mul_f64(rand::rng().random_range(0.0..=1.0))
}

impl<S, M, T> Service<Call<M>> for Retry<S>
where
    S: Service<Call<M>, Response = T, Error = Failed> + Clone + Send + Sync + 'static,
    S::Future: Send,
    M: Clone + Send + 'static,
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
    use crate::{config::Deadlines, deadline::Deadline, error::Reason, resilience::CallError};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn call(timeout: Duration) -> Call<()> {
        let d = Deadline::from_metadata(
            &tonic::metadata::MetadataMap::new(),
            &Deadlines {
                default: timeout,
                ..Deadlines::default()
            },
            tokio::time::Instant::now(),
        );
        Call::new((), d)
    }

    fn unavailable(pushback: Pushback) -> Failed {
        Failed {
            error: CallError::Failed(Reason::Unavailable),
            retryable: true,
            pushback,
        }
    }

    /// A service failing with `err` and counting its calls.
    fn failing(
        err: Failed,
    ) -> (
        impl Service<Call<()>, Response = (), Error = Failed, Future: Send> + Clone + Send + 'static,
        Arc<AtomicU32>,
    ) {
        let n = Arc::new(AtomicU32::new(0));
        let counter = n.clone();
        let svc = tower::service_fn(move |_: Call<()>| {
            counter.fetch_add(1, Ordering::Relaxed);
            async move { Err::<(), _>(err) }
        });
        (svc, n)
    }

    fn layer(percent: f32, floor: u32) -> RetryLayer {
        RetryLayer::new(
            RetrySettings {
                budget_percent: percent,
                budget_min_per_sec: floor,
                ..RetrySettings::default()
            },
            Arc::new(TpsBudget::new(Duration::from_secs(10), floor, percent)),
            Arc::new(crate::telemetry::metrics::Metrics::new())
                .downstream(crate::component::Component::Orders),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_retries_at_a_fifth_of_calls_plus_the_floor() {
        let (inner, n) = failing(unavailable(Pushback::None));
        let svc = layer(0.2, 1).layer(inner);
        for _ in 0..100 {
            assert!(
                svc.clone()
                    .oneshot(call(Duration::from_secs(2)))
                    .await
                    .is_err()
            );
        }
        let calls = n.load(Ordering::Relaxed);
        // 100 calls, 20 % of them retried, plus the floor of 1/s over 10 s.
        assert!(calls > 100, "no retries at all: {calls}");
        assert!(calls <= 100 + 20 + 10, "over budget: {calls}");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_up_to_max_attempts_when_budget_allows() {
        let (inner, n) = failing(unavailable(Pushback::None));
        let svc = layer(1000.0, 100).layer(inner);
        let _ = svc.oneshot(call(Duration::from_secs(2))).await;
        assert_eq!(n.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn only_retryable_failures_are_retried() {
        for err in [
            Failed::because(Reason::DownstreamRejected),
            Failed {
                error: CallError::NotFound,
                retryable: false,
                pushback: Pushback::None,
            },
            unavailable(Pushback::Never),
        ] {
            let (inner, n) = failing(err);
            let _ = layer(1000.0, 100)
                .layer(inner)
                .oneshot(call(Duration::from_secs(2)))
                .await;
            assert_eq!(n.load(Ordering::Relaxed), 1, "{err:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pushback_sets_the_wait_and_must_fit_the_deadline() {
        let (inner, n) = failing(unavailable(Pushback::After(Duration::from_millis(300))));
        let svc = layer(1000.0, 100).layer(inner);
        let started = tokio::time::Instant::now();
        let _ = svc.clone().oneshot(call(Duration::from_secs(2))).await;
        assert_eq!(n.load(Ordering::Relaxed), 3);
        assert_eq!(started.elapsed(), Duration::from_millis(600));

        // With 500 ms of deadline only one 300 ms wait fits.
        let _ = svc.oneshot(call(Duration::from_millis(500))).await;
        assert_eq!(n.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let s = RetrySettings::default();
        for retry in 1..8 {
            let cap = (s.initial_backoff * (1 << (retry - 1))).min(s.max_backoff);
            assert!(backoff(&s, retry) <= cap);
        }
    }
}
