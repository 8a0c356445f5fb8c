//! `[downstream_defaults]` and `[downstreams.NAME]`: one downstream's
//! timeouts, bulkhead, breaker, retries and hedging.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{Problems, check_endpoint};

/// One downstream's settings: `downstream_defaults` with its own section
/// merged over them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamSettings {
    /// `http://host:port` of the service: an IP address is used as is, a
    /// host name is resolved to every address (and re-resolved), a
    /// `dns+srv://NAME` gives targets and ports from SRV records.
    #[serde(default)]
    pub endpoint: String,
    /// Several endpoints instead of one (each as `endpoint`); calls are
    /// spread over all of them.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Longest a single attempt may take.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    /// Longest a TCP connect may take.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub connect_timeout: Duration,
    /// Bulkhead: calls in flight to this downstream at once; more are
    /// rejected at once (BULKHEAD_FULL).
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// The circuit breaker.
    #[serde(default)]
    pub breaker: BreakerSettings,
    /// Retries of UNAVAILABLE answers.
    #[serde(default)]
    pub retry: RetrySettings,
    /// Hedged requests (off by default).
    #[serde(default)]
    pub hedge: HedgeSettings,
    /// TLS to this downstream (needs an `https://` endpoint).
    #[serde(default)]
    pub tls: Option<DownstreamTls>,
    /// Per-endpoint outlier ejection.
    #[serde(default)]
    pub ejection: EjectionSettings,
    /// Calls in flight on one HTTP/2 connection before another connection
    /// to the same endpoint is opened (grpc-go servers allow 100 streams).
    #[serde(default = "default_streams_per_connection")]
    pub max_streams_per_connection: usize,
    /// Connections to one endpoint at most; past that, calls share them
    /// (and wait for the server's stream limit in HTTP/2). Default: enough
    /// for the bulkheads of every downstream sharing the endpoints to fit
    /// on one endpoint, `max_streams_per_connection` per connection.
    #[serde(default)]
    pub max_connections_per_endpoint: Option<usize>,
    /// File holding a static service token sent as `authorization: Bearer
    /// ...` on every call (read at start).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// TLS to one downstream: the CA its certificate must chain to, and bfb's
/// own client certificate when the downstream wants mTLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamTls {
    /// PEM CA bundle of the downstream's certificate.
    pub ca: PathBuf,
    /// Name to verify the downstream's certificate against; default: the
    /// endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// bfb's PEM client certificate chain, for mTLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// bfb's PEM client key, for mTLS.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_max_concurrency() -> usize {
    100
}

fn default_streams_per_connection() -> usize {
    100
}

/// Per-endpoint failure accrual: an endpoint that failed this many times in
/// a row is taken out of the balancer for a backoff, then given one
/// probation call.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EjectionSettings {
    /// Consecutive failures (refused or reset connections, UNAVAILABLE)
    /// that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; doubled for each further ejection in a
    /// row, jittered.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// The longest ejection.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// At most this share of endpoints ejected for failed answers (at least
    /// one always stays). An endpoint that refuses connections is ejected
    /// whatever the share: it cannot take a call anyway.
    pub max_ejected_share: f64,
}

impl Default for EjectionSettings {
    fn default() -> Self {
        EjectionSettings {
            consecutive_failures: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            max_ejected_share: 0.5,
        }
    }
}

/// Circuit breaker over a count-based sliding window of recent calls.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Number of recent calls the rates are computed over.
    pub window: usize,
    /// Calls the window must hold before the breaker may open.
    pub min_calls: usize,
    /// Opens when this fraction of the window failed.
    pub failure_rate: f64,
    /// Opens when this fraction of the window was slower than `slow_call`.
    pub slow_call_rate: f64,
    /// A call that took at least this long is slow.
    #[serde(with = "humantime_serde")]
    pub slow_call: Duration,
    /// How long the breaker stays open before probing.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Calls let through while half-open; all must succeed to close.
    pub half_open_probes: usize,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            window: 50,
            min_calls: 20,
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call: Duration::from_secs(1),
            open_for: Duration::from_secs(5),
            half_open_probes: 3,
        }
    }
}

/// Retries of reads that failed with UNAVAILABLE, under a budget.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Attempts per call, the first included (1 turns retries off).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubled for each further one, with
    /// full jitter.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Upper bound of the backoff.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Retries (and hedges) allowed as a fraction of calls (0.2 = 20 %).
    pub budget_percent: f32,
    /// Retries per second allowed whatever the call rate (the floor).
    pub budget_min_per_sec: u32,
    /// Window the budget is computed over (1 s to 60 s).
    #[serde(with = "humantime_serde")]
    pub budget_ttl: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
            budget_percent: 0.2,
            budget_min_per_sec: 1,
            budget_ttl: Duration::from_secs(10),
        }
    }
}

/// Hedging: a second copy of a slow read, sent after the downstream's
/// observed latency percentile.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HedgeSettings {
    /// Whether to hedge at all.
    pub enabled: bool,
    /// Latency percentile after which the copy is sent (0.95 = p95).
    pub percentile: f64,
    /// Successful calls observed before hedging starts.
    pub min_samples: usize,
    /// Never hedge sooner than this.
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
}

impl Default for HedgeSettings {
    fn default() -> Self {
        HedgeSettings {
            enabled: false,
            percentile: 0.95,
            min_samples: 100,
            min_delay: Duration::from_millis(1),
        }
    }
}

impl DownstreamSettings {
    /// Every configured endpoint (`endpoint`, or each of `endpoints`).
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.endpoint.as_str())
            .filter(|e| !e.is_empty())
            .chain(self.endpoints.iter().map(String::as_str))
    }

    /// Adds this downstream's problems, under `at` (`downstreams.NAME`).
    pub(super) fn check(&self, at: &str, p: &mut Problems) {
        let ds = self;
        let path = |key: &str| format!("{at}.{key}");
        match (ds.endpoint.is_empty(), ds.endpoints.is_empty()) {
            (true, true) => p.add(
                path("endpoint"),
                "missing; this key is required (or endpoints, a list)",
            ),
            (false, false) => p.add(path("endpoints"), "set endpoint or endpoints, not both"),
            _ => {}
        }
        for (i, e) in ds.targets().enumerate() {
            if let Err(why) = check_endpoint(e) {
                let key = if ds.endpoints.is_empty() {
                    path("endpoint")
                } else {
                    path(&format!("endpoints[{i}]"))
                };
                p.add(key, why);
            }
        }
        if ds.max_streams_per_connection == 0 {
            p.add(path("max_streams_per_connection"), "must be at least 1");
        }
        if ds
            .max_connections_per_endpoint
            .is_some_and(|n| !(1..=1000).contains(&n))
        {
            p.add(
                path("max_connections_per_endpoint"),
                "must be between 1 and 1000",
            );
        }
        let e = &ds.ejection;
        if e.consecutive_failures == 0 {
            p.add(path("ejection.consecutive_failures"), "must be at least 1");
        }
        p.positive(path("ejection.base"), e.base);
        if e.max < e.base {
            p.add(path("ejection.max"), "must be at least ejection.base");
        }
        p.fraction(path("ejection.max_ejected_share"), e.max_ejected_share);
        p.positive(path("timeout"), ds.timeout);
        p.positive(path("connect_timeout"), ds.connect_timeout);
        if ds.max_concurrency == 0 {
            p.add(path("max_concurrency"), "must be at least 1");
        }
        let b = &ds.breaker;
        if b.window == 0 || b.min_calls == 0 || b.min_calls > b.window {
            p.add(
                path("breaker.min_calls"),
                "must be between 1 and breaker.window",
            );
        }
        p.fraction(path("breaker.failure_rate"), b.failure_rate);
        p.fraction(path("breaker.slow_call_rate"), b.slow_call_rate);
        p.positive(path("breaker.open_for"), b.open_for);
        if b.half_open_probes == 0 {
            p.add(path("breaker.half_open_probes"), "must be at least 1");
        }
        let r = &ds.retry;
        if !(1..=10).contains(&r.max_attempts) {
            p.add(path("retry.max_attempts"), "must be between 1 and 10");
        }
        if r.max_backoff < r.initial_backoff {
            p.add(
                path("retry.max_backoff"),
                "must be at least retry.initial_backoff",
            );
        }
        // tower's TpsBudget panics outside these ranges; refuse them here.
        if !(0.0..=1000.0).contains(&r.budget_percent) {
            p.add(path("retry.budget_percent"), "must be between 0 and 1000");
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&r.budget_ttl) {
            p.add(path("retry.budget_ttl"), "must be between 1s and 60s");
        }
        if r.budget_min_per_sec > 1_000_000 {
            p.add(path("retry.budget_min_per_sec"), "must be at most 1000000");
        }
        let h = &ds.hedge;
        if !(h.percentile > 0.0 && h.percentile < 1.0) {
            p.add(
                path("hedge.percentile"),
                "must be between 0 and 1, e.g. 0.95",
            );
        }
        if h.min_samples == 0 {
            p.add(path("hedge.min_samples"), "must be at least 1");
        }
        let http = ds.targets().any(|e| e.starts_with("http://"));
        let https = ds.targets().any(|e| e.starts_with("https://"));
        if let Some(tls) = &ds.tls {
            if http {
                p.add(path("endpoint"), "must be https:// when tls is set");
            }
            if tls.cert.is_some() != tls.key.is_some() {
                p.add(path("tls.key"), "cert and key must be set together");
            }
        } else if https {
            p.add(
                path("tls"),
                "an https:// endpoint needs a tls section with its ca",
            );
        }
    }
}
