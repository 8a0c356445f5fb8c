//! The caller's deadline and the budget each downstream call gets from it.
//!
//! A call's deadline is the caller's `grpc-timeout` (or the configured default),
//! capped at the configured maximum. Each downstream call then gets
//! `min(its own timeout, time left - reserve)`, sent on as its `grpc-timeout`,
//! so downstream services stop working on answers nobody will read. The
//! reserve also makes bfb answer DEADLINE_EXCEEDED itself, before tonic's own
//! server timer fires (tonic reports that one as CANCELLED).

use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::{config::Deadlines, error::Reason};

/// When an inbound call must be answered.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: Instant,
    reserve: Duration,
    min_call_budget: Duration,
}

/// The time one downstream call may take, and what bounded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Sent as the call's `grpc-timeout` and enforced locally.
    pub timeout: Duration,
    /// True when the caller's deadline (not the downstream's own timeout) set
    /// the budget: running out of it is then DEADLINE_EXCEEDED for the caller.
    pub caller_bound: bool,
}

impl Deadline {
    /// The deadline of a call that arrived `now` with these headers.
    pub fn from_metadata(metadata: &MetadataMap, cfg: &Deadlines, now: Instant) -> Deadline {
        let asked = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(cfg.default);
        Deadline {
            at: now + asked.min(cfg.max),
            reserve: cfg.reserve,
            min_call_budget: cfg.min_call_budget,
        }
    }

    /// A deadline `timeout` from now, for work no caller waits for
    /// (background cache refreshes).
    pub fn detached(timeout: Duration, cfg: &Deadlines) -> Deadline {
        Deadline {
            at: Instant::now() + timeout,
            reserve: cfg.reserve,
            min_call_budget: cfg.min_call_budget,
        }
    }

    /// The instant the answer is due.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Whether a call could still be started after waiting `wait` (retry
    /// backoff, hedge delay).
    pub fn has_time_after(&self, wait: Duration) -> bool {
        let left = self
            .at
            .saturating_duration_since(Instant::now())
            .saturating_sub(self.reserve);
        left >= wait + self.min_call_budget
    }

    /// The budget for a downstream call whose own timeout is `own`, or
    /// [`Reason::NoBudget`] when too little time is left to start it.
    pub fn budget(&self, own: Duration) -> Result<Budget, Reason> {
        let left = self
            .at
            .saturating_duration_since(Instant::now())
            .saturating_sub(self.reserve);
        if left < self.min_call_budget {
            return Err(Reason::NoBudget);
        }
        Ok(if own < left {
            Budget {
                timeout: own,
                caller_bound: false,
            }
        } else {
            Budget {
                timeout: left,
                caller_bound: true,
            }
        })
    }
}

/// Parses a `grpc-timeout` header value: at most 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`), as the gRPC HTTP/2 spec defines it.
/// Hand-written because tonic keeps its parser private; it is ten lines.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Deadlines {
        Deadlines {
            default: Duration::from_secs(2),
            max: Duration::from_secs(10),
            reserve: Duration::from_millis(3),
            min_call_budget: Duration::from_millis(2),
        }
    }

    fn with_timeout(v: &str) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", v.parse().expect("ascii"));
        md
    }

    #[test]
    fn parses_every_unit_and_rejects_garbage() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "12x", "-1m", "1.5S", "١m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_is_own_timeout_or_what_the_caller_has_left() {
        let now = Instant::now();
        let d = Deadline::from_metadata(&with_timeout("100m"), &cfg(), now);
        assert_eq!(
            d.budget(Duration::from_millis(50)),
            Ok(Budget {
                timeout: Duration::from_millis(50),
                caller_bound: false
            })
        );
        assert_eq!(
            d.budget(Duration::from_secs(1)),
            Ok(Budget {
                timeout: Duration::from_millis(97),
                caller_bound: true
            })
        );
        tokio::time::advance(Duration::from_millis(90)).await;
        assert_eq!(
            d.budget(Duration::from_secs(1)),
            Ok(Budget {
                timeout: Duration::from_millis(7),
                caller_bound: true
            })
        );
        tokio::time::advance(Duration::from_millis(6)).await;
        assert_eq!(d.budget(Duration::from_secs(1)), Err(Reason::NoBudget));
    }

    #[tokio::test(start_paused = true)]
    async fn default_applies_without_header_and_max_caps_it() {
        let now = Instant::now();
        let d = Deadline::from_metadata(&MetadataMap::new(), &cfg(), now);
        assert_eq!(d.at() - now, Duration::from_secs(2));
        let d = Deadline::from_metadata(&with_timeout("1H"), &cfg(), now);
        assert_eq!(d.at() - now, Duration::from_secs(10));
        let d = Deadline::from_metadata(&with_timeout("bogus"), &cfg(), now);
        assert_eq!(d.at() - now, Duration::from_secs(2));
    }
}
