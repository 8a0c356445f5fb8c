//! Circuit breaker: closed / open / half-open over a count-based sliding
//! window of recent calls.
//!
//! Written here rather than taken from a crate because bfb needs all of: a
//! count-based window with both a failure rate and a slow-call rate, gRPC
//! outcome classification (NOT_FOUND is healthy, bfb's own rejections do not
//! count), limited half-open probes, and tokio's clock so tests run on paused
//! time. The state machine ([`Breaker`]) is plain data behind a mutex held for
//! a few instructions, never across an await; the layer is a thin gate.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::{FutureExt, future::Either};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::{
    config::BreakerSettings, error::Reason, resilience::CallError,
    telemetry::metrics::DownstreamMetrics,
};

use super::{Call, CallFuture, Failed};

/// The breaker's state, as operators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Calls flow; outcomes are recorded.
    Closed,
    /// Calls are rejected at once with CIRCUIT_OPEN.
    Open,
    /// A few probe calls decide whether to close again.
    HalfOpen,
}

impl State {
    /// Its metric label and `bfb_breaker_state` gauge value.
    pub const fn metric(self) -> (&'static str, i64) {
        match self {
            State::Closed => ("closed", 0),
            State::HalfOpen => ("half_open", 1),
            State::Open => ("open", 2),
        }
    }
}

/// What a finished call says about the downstream's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It answered (an answer such as NOT_FOUND included); maybe slowly.
    Success {
        /// Took at least the slow-call threshold.
        slow: bool,
    },
    /// It is unhealthy: unavailable, timed out, overloaded, internal error.
    Failure,
    /// Says nothing about its health (bfb's own rejection, the caller's
    /// deadline, a cancelled call).
    Ignored,
}

impl Outcome {
    /// Classifies a finished attempt.
    pub fn of<T>(result: &Result<T, Failed>, elapsed: Duration, slow_call: Duration) -> Outcome {
        let slow = elapsed >= slow_call;
        match result {
            Ok(_) => Outcome::Success { slow },
            Err(f) => match f.error {
                CallError::NotFound => Outcome::Success { slow },
                CallError::Failed(r) => match r {
                    Reason::Unavailable | Reason::Timeout | Reason::DownstreamError => {
                        Outcome::Failure
                    }
                    // The downstream answered: it is healthy.
                    Reason::DownstreamRejected | Reason::BadResponse | Reason::NotFound => {
                        Outcome::Success { slow }
                    }
                    Reason::DeadlineExceeded
                    | Reason::NoBudget
                    | Reason::CircuitOpen
                    | Reason::BulkheadFull
                    // The balancer failed it before any endpoint was called.
                    | Reason::NoEndpoints => Outcome::Ignored,
                },
            },
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Closed,
    Open { until: Instant },
    HalfOpen { issued: usize, succeeded: usize },
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    /// Bumped on every transition, so outcomes of calls let through in an
    /// earlier state are not counted in the new one.
    generation: u64,
    /// Recent outcomes in the closed state: (failed, slow).
    window: VecDeque<(bool, bool)>,
    failures: usize,
    slow: usize,
    transitions: u64,
}

/// The breaker state machine of one downstream.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    metrics: Option<DownstreamMetrics>,
}

/// Permission to make one call; reports its outcome once (dropped unreported
/// counts as [`Outcome::Ignored`], so a cancelled probe frees its slot).
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    generation: u64,
    done: bool,
}

impl Permit {
    /// Reports the call's outcome.
    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        self.breaker.record(self.generation, outcome);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.generation, Outcome::Ignored);
        }
    }
}

impl Breaker {
    /// A closed breaker that reports its transitions to `metrics`.
    pub fn with_metrics(settings: BreakerSettings, metrics: DownstreamMetrics) -> Breaker {
        Breaker {
            metrics: Some(metrics),
            ..Breaker::new(settings)
        }
    }

    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Breaker {
        Breaker {
            metrics: None,
            inner: Mutex::new(Inner {
                mode: Mode::Closed,
                generation: 0,
                window: VecDeque::with_capacity(settings.window),
                failures: 0,
                slow: 0,
                transitions: 0,
            }),
            settings,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is plain data, consistent after every statement: a
        // panic elsewhere cannot leave it half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state (an open breaker whose time is up reads HalfOpen).
    pub fn state(&self) -> State {
        match self.lock().mode {
            Mode::Closed => State::Closed,
            Mode::Open { until } if Instant::now() < until => State::Open,
            Mode::Open { .. } | Mode::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// State changes so far.
    pub fn transitions(&self) -> u64 {
        self.lock().transitions
    }

    /// Lets a call through, or refuses it while open.
    pub fn acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut inner = self.lock();
        match inner.mode {
            Mode::Closed => {}
            Mode::Open { until } => {
                if Instant::now() < until {
                    self.reject();
                    return None;
                }
                inner.transition(Mode::HalfOpen {
                    issued: 1,
                    succeeded: 0,
                });
            }
            Mode::HalfOpen { issued, succeeded } => {
                if issued >= self.settings.half_open_probes {
                    self.reject();
                    return None;
                }
                inner.mode = Mode::HalfOpen {
                    issued: issued + 1,
                    succeeded,
                };
            }
        }
        Some(Permit {
            breaker: self.clone(),
            generation: inner.generation,
            done: false,
        })
    }

    fn observe(&self, to: State) {
        if let Some(m) = &self.metrics {
            m.transition(to.metric());
        }
    }

    fn reject(&self) {
        if let Some(m) = &self.metrics {
            m.breaker_rejections.inc();
        }
    }

    fn record(&self, generation: u64, outcome: Outcome) {
        let s = &self.settings;
        let mut inner = self.lock();
        if generation != inner.generation {
            return;
        }
        let open = Mode::Open {
            until: Instant::now() + s.open_for,
        };
        match (inner.mode, outcome) {
            (Mode::Open { .. }, _) | (Mode::Closed, Outcome::Ignored) => {}
            (Mode::Closed, outcome) => {
                let failed = outcome == Outcome::Failure;
                let slow = outcome == Outcome::Success { slow: true };
                inner.window.push_back((failed, slow));
                inner.failures += usize::from(failed);
                inner.slow += usize::from(slow);
                if inner.window.len() > s.window
                    && let Some((f, sl)) = inner.window.pop_front()
                {
                    inner.failures -= usize::from(f);
                    inner.slow -= usize::from(sl);
                }
                let n = inner.window.len();
                if n >= s.min_calls
                    && (inner.failures as f64 >= s.failure_rate * n as f64
                        || inner.slow as f64 >= s.slow_call_rate * n as f64)
                {
                    inner.transition(open);
                    self.observe(State::Open);
                }
            }
            (Mode::HalfOpen { issued, succeeded }, outcome) => match outcome {
                Outcome::Ignored => {
                    inner.mode = Mode::HalfOpen {
                        issued: issued.saturating_sub(1),
                        succeeded,
                    };
                }
                Outcome::Failure => {
                    inner.transition(open);
                    self.observe(State::Open);
                }
                Outcome::Success { slow } if slow && s.slow_call_rate < 1.0 => {
                    inner.transition(open);
                    self.observe(State::Open);
                }
                Outcome::Success { .. } => {
                    if succeeded + 1 >= s.half_open_probes {
                        inner.transition(Mode::Closed);
                        self.observe(State::Closed);
                    } else {
                        inner.mode = Mode::HalfOpen {
                            issued,
                            succeeded: succeeded + 1,
                        };
                    }
                }
            },
        }
    }
}

impl Inner {
    fn transition(&mut self, mode: Mode) {
        self.mode = mode;
        self.generation += 1;
        self.transitions += 1;
        self.window.clear();
        self.failures = 0;
        self.slow = 0;
    }
}

impl Breaker {
    /// Runs `attempt` through the gate: CIRCUIT_OPEN at once while open
    /// (the attempt is dropped unstarted), else its outcome recorded.
    ///
    /// The permit is taken now, as a tower layer's `call` would. Not an
    /// `async fn`: that would hold `attempt` twice (as its argument and as
    /// awaited), doubling every downstream call's future (1.9 KiB each).
    pub fn guard<T>(
        self: &Arc<Self>,
        attempt: impl Future<Output = Result<T, Failed>>,
    ) -> impl Future<Output = Result<T, Failed>> {
        let Some(permit) = self.acquire() else {
            return Either::Left(std::future::ready(Err(Failed::because(
                Reason::CircuitOpen,
            ))));
        };
        let (started, slow_call) = (Instant::now(), self.settings.slow_call);
        Either::Right(attempt.map(move |result| {
            permit.finish(Outcome::of(&result, started.elapsed(), slow_call));
            result
        }))
    }
}

/// Adds a [`CircuitBreaker`] gate in front of a downstream.
#[derive(Clone, Debug)]
pub struct BreakerLayer {
    breaker: Arc<Breaker>,
}

impl BreakerLayer {
    /// Gates calls with `breaker`.
    pub fn new(breaker: Arc<Breaker>) -> BreakerLayer {
        BreakerLayer { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

/// The gate: rejects in microseconds while open, records every outcome.
#[derive(Clone, Debug)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S, M, T> Service<Call<M>> for CircuitBreaker<S>
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
        let (inner, breaker) = (self.inner.clone(), self.breaker.clone());
        Box::pin(async move { breaker.guard(inner.oneshot(call)).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            window: 10,
            min_calls: 5,
            failure_rate: 0.5,
            slow_call_rate: 0.8,
            slow_call: Duration::from_millis(100),
            open_for: Duration::from_secs(5),
            half_open_probes: 2,
        }
    }

    fn run(b: &Arc<Breaker>, outcome: Outcome) -> bool {
        match b.acquire() {
            Some(p) => {
                p.finish(outcome);
                true
            }
            None => false,
        }
    }

    const OK: Outcome = Outcome::Success { slow: false };

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_rate_after_min_calls_then_probes_close_it() {
        let b = Arc::new(Breaker::new(settings()));
        for _ in 0..4 {
            assert!(run(&b, Outcome::Failure));
        }
        // Four failures are below min_calls: still closed.
        assert_eq!(b.state(), State::Closed);
        assert!(run(&b, Outcome::Failure));
        assert_eq!(b.state(), State::Open);
        assert!(!run(&b, OK), "open rejects");

        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(), State::HalfOpen);
        let p1 = b.acquire().expect("probe 1");
        let p2 = b.acquire().expect("probe 2");
        assert!(b.acquire().is_none(), "only two probes");
        p1.finish(OK);
        p2.finish(OK);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.transitions(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens() {
        let b = Arc::new(Breaker::new(settings()));
        for _ in 0..5 {
            run(&b, Outcome::Failure);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(run(&b, Outcome::Failure));
        assert_eq!(b.state(), State::Open);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(b.state(), State::Open, "open_for counts from the reopening");
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_answers_and_ignored_outcomes_do_not_open_it() {
        let b = Arc::new(Breaker::new(settings()));
        for _ in 0..20 {
            run(&b, Outcome::Ignored);
            run(&b, OK);
        }
        for _ in 0..4 {
            run(&b, Outcome::Failure);
        }
        // 4 failures in a window of 10: 40 % < 50 %.
        assert_eq!(b.state(), State::Closed);
        run(&b, Outcome::Failure);
        assert_eq!(b.state(), State::Open, "5 of 10 is 50 %");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_open_it_too() {
        let b = Arc::new(Breaker::new(settings()));
        for _ in 0..8 {
            run(&b, Outcome::Success { slow: true });
        }
        for _ in 0..2 {
            run(&b, OK);
        }
        assert_eq!(b.state(), State::Open, "8 of 10 slow");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_its_slot() {
        let b = Arc::new(Breaker::new(settings()));
        for _ in 0..5 {
            run(&b, Outcome::Failure);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let p1 = b.acquire().expect("probe");
        let p2 = b.acquire().expect("probe");
        drop(p1);
        let p3 = b.acquire().expect("slot freed by the drop");
        p2.finish(OK);
        p3.finish(OK);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn outcomes_are_classified_as_the_issue_says() {
        let t = Duration::from_millis(100);
        let fast = Duration::from_millis(1);
        let err = |r| Err::<(), _>(Failed::because(r));
        assert_eq!(
            Outcome::of(&err(Reason::Unavailable), fast, t),
            Outcome::Failure
        );
        assert_eq!(
            Outcome::of(&err(Reason::Timeout), fast, t),
            Outcome::Failure
        );
        assert_eq!(
            Outcome::of(&err(Reason::DownstreamError), fast, t),
            Outcome::Failure
        );
        assert_eq!(
            Outcome::of(&err(Reason::BulkheadFull), fast, t),
            Outcome::Ignored
        );
        assert_eq!(
            Outcome::of(&err(Reason::DeadlineExceeded), fast, t),
            Outcome::Ignored
        );
        assert_eq!(
            Outcome::of(&err(Reason::DownstreamRejected), fast, t),
            Outcome::Success { slow: false }
        );
        let nf = Err::<(), _>(Failed {
            error: CallError::NotFound,
            ..Failed::because(Reason::Timeout)
        });
        assert_eq!(Outcome::of(&nf, t, t), Outcome::Success { slow: true });
    }
}
