//! Per-endpoint failure accrual (outlier ejection), the way linkerd2-proxy
//! and Envoy do it: after `consecutive_failures` failures in a row an
//! endpoint is ejected for a backoff that doubles with each ejection in a
//! row (jittered, capped), then admits exactly one probation call; its
//! success restores the endpoint, its failure ejects it again for longer.
//!
//! This sits below the downstream's circuit breaker: one bad replica is
//! taken out of the balancer long before the downstream as a whole looks
//! failed. Pure state; the balancer (`downstream::balance`) owns one per
//! endpoint and decides, with [`may_eject`], whether the pool can spare it.
//! Hand-written: tower has no failure accrual, and linkerd's is not a
//! library.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::EjectionSettings;

/// Where an endpoint stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Takes calls.
    Active,
    /// Takes no calls until `until`.
    Ejected {
        /// When the probation call may go.
        until: Instant,
    },
    /// The ejection is over: one probation call may go (`probing` once it
    /// went).
    Probation {
        /// Whether the probation call is in flight.
        probing: bool,
    },
}

/// One endpoint's failure accrual.
#[derive(Clone, Debug)]
pub struct Accrual {
    state: State,
    /// Failures in a row.
    failures: u32,
    /// Ejections in a row (reset by a success).
    ejections: u32,
}

/// What a finished call did to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing the pool needs to count.
    None,
    /// The endpoint was just ejected (it was counted as taking calls).
    Ejected,
    /// The endpoint is back in service after its probation call.
    Restored,
}

impl Default for Accrual {
    fn default() -> Self {
        Accrual {
            state: State::Active,
            failures: 0,
            ejections: 0,
        }
    }
}

impl Accrual {
    /// The current state, with an ejection that ran out by `now` seen as
    /// probation.
    pub fn state(&self, now: Instant) -> State {
        match self.state {
            State::Ejected { until } if now >= until => State::Probation { probing: false },
            s => s,
        }
    }

    /// Whether a call may go now (without taking the probation slot).
    pub fn available(&self, now: Instant) -> bool {
        matches!(
            self.state(now),
            State::Active | State::Probation { probing: false }
        )
    }

    /// Whether the endpoint counts as ejected (also while on probation).
    pub fn is_ejected(&self) -> bool {
        !matches!(self.state, State::Active)
    }

    /// Takes a call now: `false` if the endpoint is ejected or its one
    /// probation call is already in flight.
    pub fn admit(&mut self, now: Instant) -> bool {
        match self.state(now) {
            State::Active => true,
            State::Probation { probing: false } => {
                self.state = State::Probation { probing: true };
                true
            }
            State::Ejected { .. } | State::Probation { probing: true } => false,
        }
    }

    /// A call ended without an outcome (cancelled): a probation slot is
    /// freed for the next call.
    pub fn abandon(&mut self) {
        if let State::Probation { probing: true } = self.state {
            self.state = State::Probation { probing: false };
        }
    }

    /// A call succeeded.
    pub fn success(&mut self) -> Change {
        self.failures = 0;
        self.ejections = 0;
        if self.is_ejected() {
            self.state = State::Active;
            return Change::Restored;
        }
        Change::None
    }

    /// A call failed at `now`. `may_eject` asks the pool whether it can
    /// spare this endpoint (asked only when the failure would eject an
    /// active endpoint); `jitter` in `[0, 1)` shortens the backoff by up to
    /// half.
    pub fn failure(
        &mut self,
        s: &EjectionSettings,
        now: Instant,
        jitter: f64,
        may_eject: impl FnOnce() -> bool,
    ) -> Change {
        match self.state {
            // The probation call failed: eject again, for longer.
            State::Probation { probing: true } => {
                self.eject(s, now, jitter);
                return Change::None;
            }
            // A call sent before the ejection: it says nothing new.
            State::Ejected { .. } | State::Probation { probing: false } => return Change::None,
            State::Active => {}
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures >= s.consecutive_failures && may_eject() {
            self.eject(s, now, jitter);
            return Change::Ejected;
        }
        Change::None
    }

    fn eject(&mut self, s: &EjectionSettings, now: Instant, jitter: f64) {
        let backoff = backoff(s, self.ejections, jitter);
        self.ejections = self.ejections.saturating_add(1);
        self.state = State::Ejected {
            until: now + backoff,
        };
    }
}

/// The length of ejection number `n + 1` in a row: `base × 2ⁿ` up to `max`,
/// less up to half of it by `jitter` (so a fleet's replicas do not all probe
/// at once).
pub fn backoff(s: &EjectionSettings, n: u32, jitter: f64) -> Duration {
    let full = s
        .base
        .saturating_mul(1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX))
        .min(s.max);
    full.mul_f64(1.0 - 0.5 * jitter.clamp(0.0, 1.0))
}

/// Whether one more of `total` endpoints may be ejected with `ejected`
/// already out, under a share of `max_share`: never past the share, and
/// never the last one taking calls.
pub fn may_eject(ejected: usize, total: usize, max_share: f64) -> bool {
    let cap = ((total as f64) * max_share).floor() as usize;
    ejected < cap.min(total.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EjectionSettings {
        EjectionSettings {
            consecutive_failures: 3,
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            max_ejected_share: 0.5,
        }
    }

    fn fail(a: &mut Accrual, n: u32) -> Change {
        let s = settings();
        let mut last = Change::None;
        for _ in 0..n {
            last = a.failure(&s, Instant::now(), 0.0, || true);
        }
        last
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_and_a_success_resets_the_count() {
        let mut a = Accrual::default();
        assert_eq!(fail(&mut a, 2), Change::None);
        assert_eq!(a.success(), Change::None);
        assert_eq!(fail(&mut a, 2), Change::None);
        assert!(a.available(Instant::now()));
        assert_eq!(fail(&mut a, 1), Change::Ejected);
        assert!(!a.available(Instant::now()));
        assert!(!a.admit(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_backoff_exactly_one_probation_call_goes() {
        let mut a = Accrual::default();
        fail(&mut a, 3);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!a.available(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        let now = Instant::now();
        assert!(a.available(now));
        assert!(a.admit(now), "the probation call");
        assert!(!a.admit(now), "a second call while the probe is out");
        a.abandon();
        assert!(a.admit(now), "a cancelled probe frees the slot");
        assert_eq!(a.success(), Change::Restored);
        assert!(a.admit(now) && a.admit(now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probation_doubles_the_backoff_up_to_the_max() {
        let s = settings();
        let mut a = Accrual::default();
        fail(&mut a, 3);
        let mut expected = Duration::from_secs(1);
        for _ in 0..8 {
            tokio::time::advance(expected - Duration::from_millis(1)).await;
            assert!(
                !a.admit(Instant::now()),
                "still ejected before {expected:?}"
            );
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(a.admit(Instant::now()), "probation after {expected:?}");
            // One failure of the probe ejects again: no count of three.
            assert_eq!(a.failure(&s, Instant::now(), 0.0, || false), Change::None);
            expected = (expected * 2).min(s.max);
        }
        assert_eq!(expected, Duration::from_secs(60));
        // A success resets the backoff to the base.
        tokio::time::advance(expected).await;
        assert!(a.admit(Instant::now()));
        assert_eq!(a.success(), Change::Restored);
        fail(&mut a, 3);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(a.available(Instant::now()));
    }

    #[test]
    fn jitter_shortens_by_at_most_half() {
        let s = settings();
        assert_eq!(backoff(&s, 0, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(&s, 0, 0.999_999), Duration::from_nanos(500_000_500));
        assert_eq!(backoff(&s, 3, 0.5), Duration::from_secs(6));
        assert_eq!(backoff(&s, 40, 0.0), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn late_failures_of_calls_sent_before_the_ejection_do_not_lengthen_it() {
        let s = settings();
        let mut a = Accrual::default();
        fail(&mut a, 3);
        // Five more calls that were in flight fail after the ejection.
        for _ in 0..5 {
            assert_eq!(a.failure(&s, Instant::now(), 0.0, || true), Change::None);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(a.admit(Instant::now()), "probation after the first backoff");
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_may_refuse_an_ejection() {
        let s = settings();
        let mut a = Accrual::default();
        for _ in 0..10 {
            assert_eq!(a.failure(&s, Instant::now(), 0.0, || false), Change::None);
        }
        assert!(a.available(Instant::now()));
        // Once the pool can spare it, the next failure ejects.
        assert_eq!(a.failure(&s, Instant::now(), 0.0, || true), Change::Ejected);
    }

    #[test]
    fn the_share_caps_ejections_and_one_endpoint_always_stays() {
        assert!(may_eject(0, 3, 0.5));
        assert!(!may_eject(1, 3, 0.5));
        assert!(may_eject(1, 4, 0.5));
        assert!(!may_eject(2, 4, 0.5));
        assert!(!may_eject(0, 1, 0.5), "a lone endpoint is never ejected");
        assert!(!may_eject(0, 1, 1.0), "not even at share 1.0");
        assert!(may_eject(1, 3, 1.0));
        assert!(!may_eject(2, 3, 1.0), "the last one stays at share 1.0");
        assert!(!may_eject(0, 10, 0.0));
        assert!(!may_eject(0, 0, 1.0));
    }
}
