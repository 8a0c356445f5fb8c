//! What each simulated service does (its [`Behavior`]) and what it has seen
//! (its stats), shared by the services and `SimControl`.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rand::Rng;
use tonic::{Code, Status, metadata::MetadataMap};

use crate::{component::Component, deadline::parse_grpc_timeout};

/// How a simulated service answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Behavior {
    /// Time every call takes.
    pub latency: Duration,
    /// Fraction of calls that take `slow_extra` longer.
    pub slow_fraction: f64,
    /// Extra latency of slow calls.
    pub slow_extra: Duration,
    /// Fraction of calls that fail with `error_code`.
    pub error_rate: f64,
    /// Status code of injected failures.
    pub error_code: Code,
    /// `grpc-retry-pushback-ms` sent with injected failures.
    pub retry_pushback_ms: Option<i64>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            latency: Duration::ZERO,
            slow_fraction: 0.0,
            slow_extra: Duration::ZERO,
            error_rate: 0.0,
            error_code: Code::Unavailable,
            retry_pushback_ms: None,
        }
    }
}

/// One service's counters.
#[derive(Default)]
struct Counters {
    behavior: Mutex<Behavior>,
    calls: AtomicU64,
    cancelled: AtomicU64,
    in_flight: AtomicU64,
    last_timeout: Mutex<Option<Duration>>,
    last_metadata: Mutex<BTreeMap<String, String>>,
}

/// A snapshot of one service's stats.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Calls received.
    pub calls: u64,
    /// Calls dropped by the caller before they were answered.
    pub cancelled: u64,
    /// Calls being handled now.
    pub in_flight: u64,
    /// `grpc-timeout` of the last call.
    pub last_timeout: Option<Duration>,
    /// ASCII metadata of the last call.
    pub last_metadata: BTreeMap<String, String>,
    /// The current behaviour.
    pub behavior: Behavior,
}

/// The state of every simulated service.
pub struct SimState {
    /// Per service, indexed by [`Component::index`].
    services: [Counters; 8],
    /// Behaviour at start, restored by `reset`.
    initial: Behavior,
    total_in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    connections: AtomicU64,
}

impl SimState {
    /// Every service starts with `initial`.
    pub fn new(initial: Behavior) -> SimState {
        let state = SimState {
            services: Default::default(),
            initial,
            total_in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        };
        state.reset();
        state
    }

    /// Restores the start behaviour and zeroes the stats (calls in flight stay counted).
    pub fn reset(&self) {
        for s in &self.services {
            *lock(&s.behavior) = self.initial;
            s.calls.store(0, Ordering::Relaxed);
            s.cancelled.store(0, Ordering::Relaxed);
            *lock(&s.last_timeout) = None;
            lock(&s.last_metadata).clear();
        }
        self.peak_in_flight.store(
            self.total_in_flight.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// Replaces a service's behaviour.
    pub fn set_behavior(&self, service: Component, behavior: Behavior) {
        *lock(&self.services[service.index()].behavior) = behavior;
    }

    /// A snapshot of a service's stats.
    pub fn stats(&self, service: Component) -> Stats {
        let s = &self.services[service.index()];
        Stats {
            calls: s.calls.load(Ordering::Relaxed),
            cancelled: s.cancelled.load(Ordering::Relaxed),
            in_flight: s.in_flight.load(Ordering::Relaxed),
            last_timeout: *lock(&s.last_timeout),
            last_metadata: lock(&s.last_metadata).clone(),
            behavior: *lock(&s.behavior),
        }
    }

    /// Highest number of calls in flight at once, over all services.
    pub fn peak_in_flight(&self) -> u64 {
        self.peak_in_flight.load(Ordering::Relaxed)
    }

    /// Counts an accepted connection.
    pub fn connection_accepted(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// TCP connections accepted since start.
    pub fn connections_accepted(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Handles one call's simulated work: counts it, waits its latency and
    /// maybe fails it. If the caller goes away during the wait, this future is
    /// dropped and the call counts as cancelled.
    pub async fn handle(&self, service: Component, metadata: &MetadataMap) -> Result<(), Status> {
        let s = &self.services[service.index()];
        s.calls.fetch_add(1, Ordering::Relaxed);
        *lock(&s.last_timeout) = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        *lock(&s.last_metadata) = metadata
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        let guard = InFlight::enter(self, s);

        let behavior = *lock(&s.behavior);
        let (delay, fail) = {
            let mut r = rand::rng();
            let slow =
                behavior.slow_fraction > 0.0 && r.random_bool(behavior.slow_fraction.min(1.0));
            let fail = behavior.error_rate > 0.0 && r.random_bool(behavior.error_rate.min(1.0));
            let extra = if slow {
                behavior.slow_extra
            } else {
                Duration::ZERO
            };
            (behavior.latency + extra, fail)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        guard.finish();
        if fail {
            let mut status = Status::new(behavior.error_code, "simulated failure");
            if let Some(ms) = behavior.retry_pushback_ms
                && let Ok(v) = ms.to_string().parse()
            {
                status.metadata_mut().insert("grpc-retry-pushback-ms", v);
            }
            return Err(status);
        }
        Ok(())
    }
}

/// Counts a call in flight; a drop before [`InFlight::finish`] is a cancellation.
struct InFlight<'a> {
    state: &'a SimState,
    counters: &'a Counters,
    finished: bool,
}

impl<'a> InFlight<'a> {
    fn enter(state: &'a SimState, counters: &'a Counters) -> InFlight<'a> {
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        let now = state.total_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        state.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight {
            state,
            counters,
            finished: false,
        }
    }

    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.state.total_in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Locks a mutex, recovering from poisoning (the guarded values are plain data).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dropped_call_counts_as_cancelled() {
        let state = SimState::new(Behavior {
            latency: Duration::from_millis(100),
            ..Behavior::default()
        });
        let md = MetadataMap::new();
        let slow = state.handle(Component::Orders, &md);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), slow)
                .await
                .is_err()
        );
        let s = state.stats(Component::Orders);
        assert_eq!((s.calls, s.cancelled, s.in_flight), (1, 1, 0));
        assert_eq!(state.peak_in_flight(), 1);

        state.handle(Component::Orders, &md).await.expect("answers");
        assert_eq!(state.stats(Component::Orders).cancelled, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_injected_and_timeouts_recorded() {
        let state = SimState::new(Behavior::default());
        state.set_behavior(
            Component::Profile,
            Behavior {
                error_rate: 1.0,
                error_code: Code::Internal,
                ..Behavior::default()
            },
        );
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", "250m".parse().expect("ascii"));
        let err = state
            .handle(Component::Profile, &md)
            .await
            .expect_err("fails");
        assert_eq!(err.code(), Code::Internal);
        let s = state.stats(Component::Profile);
        assert_eq!(s.last_timeout, Some(Duration::from_millis(250)));
        assert_eq!(s.cancelled, 0);
        state.reset();
        assert!(state.handle(Component::Profile, &md).await.is_ok());
    }
}
