//! Prometheus metrics (the `prometheus-client` crate) and the `/metrics`
//! endpoint.
//!
//! Names follow Prometheus conventions: base units (`_seconds`), counters end
//! in `_total` (added by the client), and every label set is bounded: method,
//! component, downstream, gRPC code or reason code. No ids.

use std::{future::Future, net::SocketAddr, sync::Arc};

use axum::{Router, http::header, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{component::Component, error::Reason};

/// Labels of inbound RPC series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `GetCustomer`, ...
    pub method: &'static str,
    /// gRPC code name, e.g. `OK`, `UNAVAILABLE`.
    pub code: &'static str,
}

/// Labels of per-method series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `GetCustomer`, ...
    pub method: &'static str,
}

/// Labels of per-downstream series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DownstreamLabels {
    /// Component name of the downstream (`orders`, ...).
    pub downstream: &'static str,
}

/// Labels of a balancer's series: its target (the configured endpoint).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    /// The configured endpoint(s), e.g. `http://orders.shop.svc:50061`.
    pub target: String,
}

/// Labels of the endpoints-by-state gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointStateLabels {
    /// The configured endpoint(s).
    pub target: String,
    /// `ready`, `connecting` or `ejected`.
    pub state: &'static str,
}

/// Labels of per-endpoint series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The configured endpoint(s).
    pub target: String,
    /// The endpoint's address, `ip:port`.
    pub endpoint: String,
}

/// Labels of DNS resolutions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResolutionLabels {
    /// The name resolved (as configured).
    pub name: String,
    /// `ok`, `empty` (no records) or `error` (failed or timed out).
    pub result: &'static str,
}

/// Labels of downstream attempt outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// Component name of the downstream.
    pub downstream: &'static str,
    /// gRPC code name of the attempt's result (`DEADLINE_EXCEEDED` for a local timeout).
    pub code: &'static str,
}

/// Labels of breaker transitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// Component name of the downstream.
    pub downstream: &'static str,
    /// `closed`, `open` or `half_open`.
    pub to: &'static str,
}

/// Labels of degraded answers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DegradedLabels {
    /// The component that was not OK.
    pub component: &'static str,
    /// Its reason code.
    pub reason: &'static str,
}

/// Labels of cache lookups.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// The component.
    pub component: &'static str,
    /// `hit`, `stale`, `miss`, `bypass` (FRESH) or `fallback` (stale-if-error).
    pub result: &'static str,
}

/// Labels of shared (Redis) tier calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SharedLabels {
    /// `hit`, `miss`, `written`, `error`, `timeout`, `breaker_open`, `unconnected`.
    pub result: &'static str,
}

/// Labels of rejected calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why, e.g. `jwt_expired`, `no_client_certificate`, `method_not_allowed`.
    pub reason: &'static str,
}

/// Labels of per-consumer limits.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// The consumer's configured name.
    pub consumer: String,
    /// `rate` or `concurrency`.
    pub limit: &'static str,
}

/// The label values [`Metrics::init_known`] creates series for, from the
/// layers that own them.
pub struct Known<'a> {
    /// The aggregate RPCs' `method` labels.
    pub methods: &'a [&'static str],
    /// The components the cache serves.
    pub cached: &'a [Component],
    /// Every auth rejection reason.
    pub auth_rejections: &'a [&'static str],
    /// The configured consumers' names.
    pub consumers: Vec<String>,
}

/// Histogram buckets from 100 µs to ~26 s.
#[derive(Clone, Copy)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.0001, 2.0, 19))
    }
}

/// Components per request: 0 to 8.
#[derive(Clone, Copy)]
pub struct FanoutBuckets;

impl MetricConstructor<Histogram> for FanoutBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new((0..=8).map(f64::from))
    }
}

/// Every metric bfb exports.
pub struct Metrics {
    registry: Registry,
    /// Inbound RPC latency by method and code (its `_count` is the RPC count).
    pub rpc_duration: Family<RpcLabels, Histogram, LatencyBuckets>,
    /// Downstream attempt latency by downstream and code.
    pub downstream_duration: Family<AttemptLabels, Histogram, LatencyBuckets>,
    /// Breaker state per downstream: 0 closed, 1 half-open, 2 open.
    pub breaker_state: Family<DownstreamLabels, Gauge>,
    /// Breaker transitions per downstream and target state.
    pub breaker_transitions: Family<TransitionLabels, Counter>,
    /// Calls in flight per downstream (bulkhead slots in use).
    pub bulkhead_in_use: Family<DownstreamLabels, Gauge>,
    /// Calls rejected by a full bulkhead.
    pub bulkhead_rejections: Family<DownstreamLabels, Counter>,
    /// Calls rejected by an open breaker.
    pub breaker_rejections: Family<DownstreamLabels, Counter>,
    /// Retries sent.
    pub retries: Family<DownstreamLabels, Counter>,
    /// Hedged copies sent.
    pub hedges: Family<DownstreamLabels, Counter>,
    /// Inbound calls shed at the global cap.
    pub load_shed: Counter,
    /// Answers with a component not OK, by component and reason.
    pub degraded: Family<DegradedLabels, Counter>,
    /// Components fetched per request.
    pub fanout: Family<MethodLabels, Histogram, FanoutBuckets>,
    /// Cache lookups by component and result.
    pub cache_requests: Family<CacheLabels, Counter>,
    /// Shared (Redis) tier calls by result.
    pub cache_shared: Family<SharedLabels, Counter>,
    /// Calls refused by authentication or authorization, by reason.
    pub auth_rejected: Family<ReasonLabels, Counter>,
    /// Calls refused by a consumer's rate or concurrency limit.
    pub consumer_limited: Family<ConsumerLabels, Counter>,
    /// TLS handshakes dropped, by reason (`shed`, `timeout`, `failed`).
    pub handshakes_dropped: Family<ReasonLabels, Counter>,
    /// TLS handshakes in progress, over all TLS listeners.
    pub handshakes_in_progress: Gauge,
    /// Open `grpc.health.v1.Health/Watch` streams, over all listeners.
    pub health_watches: Gauge,
    /// Inbound RPCs in flight (health checks excepted), over all listeners.
    pub rpcs_in_flight: Gauge,
    /// Endpoints of each balancer by state.
    pub endpoints: Family<EndpointStateLabels, Gauge>,
    /// HTTP/2 connections of each balancer.
    pub endpoint_connections: Family<TargetLabels, Gauge>,
    /// Endpoint ejections.
    pub endpoint_ejections: Family<TargetLabels, Counter>,
    /// Calls sent to each endpoint.
    pub endpoint_calls: Family<EndpointLabels, Counter>,
    /// DNS resolutions of endpoint names by result.
    pub dns_resolutions: Family<ResolutionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every bfb metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            rpc_duration: Family::new_with_constructor(LatencyBuckets),
            downstream_duration: Family::new_with_constructor(LatencyBuckets),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            bulkhead_in_use: Family::default(),
            bulkhead_rejections: Family::default(),
            breaker_rejections: Family::default(),
            retries: Family::default(),
            hedges: Family::default(),
            load_shed: Counter::default(),
            degraded: Family::default(),
            fanout: Family::new_with_constructor(FanoutBuckets),
            cache_requests: Family::default(),
            cache_shared: Family::default(),
            auth_rejected: Family::default(),
            consumer_limited: Family::default(),
            handshakes_dropped: Family::default(),
            handshakes_in_progress: Gauge::default(),
            health_watches: Gauge::default(),
            rpcs_in_flight: Gauge::default(),
            endpoints: Family::default(),
            endpoint_connections: Family::default(),
            endpoint_ejections: Family::default(),
            endpoint_calls: Family::default(),
            dns_resolutions: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "bfb_rpc_duration_seconds",
            "Inbound RPC latency by method and gRPC code",
            m.rpc_duration.clone(),
        );
        r.register(
            "bfb_downstream_duration_seconds",
            "Downstream attempt latency by downstream and gRPC code",
            m.downstream_duration.clone(),
        );
        r.register(
            "bfb_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            m.breaker_state.clone(),
        );
        r.register(
            "bfb_breaker_transitions",
            "Circuit breaker state changes",
            m.breaker_transitions.clone(),
        );
        r.register(
            "bfb_breaker_rejections",
            "Calls rejected by an open circuit breaker",
            m.breaker_rejections.clone(),
        );
        r.register(
            "bfb_bulkhead_in_use",
            "Downstream calls in flight (bulkhead slots in use)",
            m.bulkhead_in_use.clone(),
        );
        r.register(
            "bfb_bulkhead_rejections",
            "Calls rejected by a full bulkhead",
            m.bulkhead_rejections.clone(),
        );
        r.register("bfb_retries", "Downstream retries sent", m.retries.clone());
        r.register(
            "bfb_hedges",
            "Hedged downstream copies sent",
            m.hedges.clone(),
        );
        r.register(
            "bfb_load_shed",
            "Inbound calls rejected at the global concurrency cap",
            m.load_shed.clone(),
        );
        r.register(
            "bfb_degraded_responses",
            "Answers with a component not OK, by component and reason",
            m.degraded.clone(),
        );
        r.register(
            "bfb_fanout_components",
            "Components fetched per request",
            m.fanout.clone(),
        );
        r.register(
            "bfb_cache_requests",
            "Cache lookups by component and result (hit, stale, miss, bypass, fallback)",
            m.cache_requests.clone(),
        );
        r.register(
            "bfb_cache_shared",
            "Shared (Redis) cache tier calls by result",
            m.cache_shared.clone(),
        );
        r.register(
            "bfb_auth_rejected",
            "Calls refused by authentication or authorization, by reason",
            m.auth_rejected.clone(),
        );
        r.register(
            "bfb_consumer_limited",
            "Calls refused by a consumer's rate or concurrency limit",
            m.consumer_limited.clone(),
        );
        r.register(
            "bfb_tls_handshakes_dropped",
            "TLS handshakes dropped: shed at tls.max_handshakes, timed out, or failed",
            m.handshakes_dropped.clone(),
        );
        r.register(
            "bfb_tls_handshakes_in_progress",
            "TLS handshakes in progress",
            m.handshakes_in_progress.clone(),
        );
        r.register(
            "bfb_health_watches",
            "Open health Watch streams (capped by server.max_health_watches)",
            m.health_watches.clone(),
        );
        r.register(
            "bfb_rpcs_in_flight",
            "Inbound RPCs in flight, health checks excepted (capped by server.max_concurrent_rpcs per listener)",
            m.rpcs_in_flight.clone(),
        );
        r.register(
            "bfb_endpoints",
            "Downstream endpoints by balancer and state (ready, connecting, ejected)",
            m.endpoints.clone(),
        );
        r.register(
            "bfb_endpoint_connections",
            "HTTP/2 connections open or opening to a balancer's endpoints",
            m.endpoint_connections.clone(),
        );
        r.register(
            "bfb_endpoint_ejections",
            "Endpoints ejected after consecutive failures",
            m.endpoint_ejections.clone(),
        );
        r.register(
            "bfb_endpoint_calls",
            "Calls sent to each endpoint",
            m.endpoint_calls.clone(),
        );
        r.register(
            "bfb_dns_resolutions",
            "DNS resolutions of endpoint names by result (ok, empty, error)",
            m.dns_resolutions.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Creates every series bfb knows the labels of, at zero, so dashboards
    /// and alerts see 0 rather than nothing before the first event:
    /// per-method RPC counts (code `OK`) and fan-out, per-downstream attempts
    /// (code `OK`) and breaker transitions, degraded answers by component and
    /// reason, cache lookups, Redis tier results, auth rejections, consumer
    /// limits and TLS drops. (Error codes of RPCs and attempts appear with
    /// their first event: every code times every method would be hundreds of
    /// histograms.)
    pub fn init_known(&self, known: &Known<'_>) {
        for &method in known.methods {
            let _ = self
                .rpc_duration
                .get_or_create(&RpcLabels { method, code: "OK" });
            let _ = self.fanout.get_or_create(&MethodLabels { method });
        }
        for c in Component::ALL {
            let downstream = c.name();
            let _ = self.downstream_duration.get_or_create(&AttemptLabels {
                downstream,
                code: "OK",
            });
            for to in ["closed", "half_open", "open"] {
                let _ = self
                    .breaker_transitions
                    .get_or_create(&TransitionLabels { downstream, to });
            }
            for reason in Reason::ALL {
                let _ = self.degraded.get_or_create(&DegradedLabels {
                    component: downstream,
                    reason: reason.code(),
                });
            }
        }
        for c in known.cached {
            for result in ["hit", "stale", "miss", "bypass", "fallback"] {
                let _ = self.cache_requests.get_or_create(&CacheLabels {
                    component: c.name(),
                    result,
                });
            }
        }
        for result in [
            "hit",
            "miss",
            "written",
            "error",
            "timeout",
            "breaker_open",
            "unconnected",
        ] {
            let _ = self.cache_shared.get_or_create(&SharedLabels { result });
        }
        for &reason in known.auth_rejections {
            let _ = self.auth_rejected.get_or_create(&ReasonLabels { reason });
        }
        for consumer in &known.consumers {
            for limit in ["rate", "concurrency"] {
                let _ = self.consumer_limited.get_or_create(&ConsumerLabels {
                    consumer: consumer.clone(),
                    limit,
                });
            }
        }
        for reason in ["shed", "timeout", "failed"] {
            let _ = self
                .handshakes_dropped
                .get_or_create(&ReasonLabels { reason });
        }
    }

    /// The handles the TLS accept loop updates.
    pub fn handshakes(&self) -> HandshakeMetrics {
        HandshakeMetrics {
            dropped: self.handshakes_dropped.clone(),
            in_progress: self.handshakes_in_progress.clone(),
        }
    }

    /// The per-downstream handles a resilience stack updates.
    pub fn downstream(self: &Arc<Self>, c: Component) -> DownstreamMetrics {
        let l = DownstreamLabels {
            downstream: c.name(),
        };
        DownstreamMetrics(Arc::new(DownstreamHandles {
            downstream: c.name(),
            metrics: self.clone(),
            breaker_state: self.breaker_state.get_or_create(&l).clone(),
            breaker_rejections: self.breaker_rejections.get_or_create(&l).clone(),
            bulkhead_in_use: self.bulkhead_in_use.get_or_create(&l).clone(),
            bulkhead_rejections: self.bulkhead_rejections.get_or_create(&l).clone(),
            retries: self.retries.get_or_create(&l).clone(),
            hedges: self.hedges.get_or_create(&l).clone(),
        }))
    }

    /// The exposition in the Prometheus text format (0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        to_prometheus_text(&out)
    }
}

/// Turns `prometheus-client`'s OpenMetrics text into the classic Prometheus
/// text format, which every scraper and `promtool check metrics` read:
/// OpenMetrics names a counter family `x` with samples `x_total`; the classic
/// format names the family `x_total` too. The `# EOF` marker is dropped.
/// Hand-written because the crate only writes OpenMetrics.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + counters.len() * 16);
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// One downstream's metric handles, resolved once (no label lookups per call
/// except for the attempt's code). One `Arc`: layers clone it per call.
#[derive(Clone)]
pub struct DownstreamMetrics(Arc<DownstreamHandles>);

impl std::ops::Deref for DownstreamMetrics {
    type Target = DownstreamHandles;
    fn deref(&self) -> &DownstreamHandles {
        &self.0
    }
}

/// The handles behind [`DownstreamMetrics`].
pub struct DownstreamHandles {
    downstream: &'static str,
    metrics: Arc<Metrics>,
    /// Breaker state gauge.
    pub breaker_state: Gauge,
    /// Open-breaker rejections.
    pub breaker_rejections: Counter,
    /// Bulkhead slots in use.
    pub bulkhead_in_use: Gauge,
    /// Bulkhead rejections.
    pub bulkhead_rejections: Counter,
    /// Retries sent.
    pub retries: Counter,
    /// Hedges sent.
    pub hedges: Counter,
}

impl DownstreamHandles {
    /// Records a finished attempt.
    pub fn attempt(&self, code: &'static str, seconds: f64) {
        self.metrics
            .downstream_duration
            .get_or_create(&AttemptLabels {
                downstream: self.downstream,
                code,
            })
            .observe(seconds);
    }

    /// Records a breaker transition to the state named `name` (`closed`,
    /// `half_open`, `open`) whose gauge value is `value`.
    pub fn transition(&self, (name, value): (&'static str, i64)) {
        self.breaker_state.set(value);
        self.metrics
            .breaker_transitions
            .get_or_create(&TransitionLabels {
                downstream: self.downstream,
                to: name,
            })
            .inc();
    }
}

impl std::fmt::Debug for DownstreamMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DownstreamMetrics")
    }
}

/// What the TLS accept loop counts.
#[derive(Clone)]
pub struct HandshakeMetrics {
    dropped: Family<ReasonLabels, Counter>,
    in_progress: Gauge,
}

impl HandshakeMetrics {
    /// A handshake was dropped for `reason`.
    pub fn dropped(&self, reason: &'static str) {
        self.dropped.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A handshake started; it counts as in progress until the guard drops
    /// (also when its task is aborted).
    pub fn started(&self) -> GaugeGuard {
        GaugeGuard::new(self.in_progress.clone())
    }
}

/// Holds one unit of a gauge: +1 when made, −1 when dropped.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Increments `gauge` until the guard drops.
    pub fn new(gauge: Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves `GET /metrics`, and `GET /ready` (200 while `ready` holds, 503
/// otherwise: readiness for load balancers that check over HTTP/1, such as
/// HAProxy, which cannot send a gRPC health check), on `listener` until
/// `shutdown` completes.
pub async fn serve(
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let readiness = get(move || {
        let serving = ready.load(std::sync::atomic::Ordering::Acquire);
        async move {
            if serving {
                (axum::http::StatusCode::OK, "ready\n")
            } else {
                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
    });
    let app = Router::new().route("/ready", readiness).route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics endpoint serving");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The address of a bound metrics listener, for logs.
pub fn describe(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "off".into(), |a| format!("http://{a}/metrics"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_name_in_help_and_type() {
        let m = Metrics::new();
        m.load_shed.inc();
        m.fanout
            .get_or_create(&MethodLabels {
                method: "GetCustomer",
            })
            .observe(4.0);
        let text = m.encode();
        assert!(text.contains("# HELP bfb_load_shed_total "), "{text}");
        assert!(text.contains("# TYPE bfb_load_shed_total counter"));
        assert!(text.contains("\nbfb_load_shed_total 1\n"));
        assert!(text.contains("# TYPE bfb_fanout_components histogram"));
        assert!(!text.contains("# EOF"));
    }
}
