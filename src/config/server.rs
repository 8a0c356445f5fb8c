//! `[server]` and `[telemetry]`: inbound limits, lifecycle, and telemetry.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::{Problems, TlsSettings, check_endpoint};

/// Inbound protection. tonic leaves several HTTP/2 limits unset (unlimited);
/// bfb sets every one of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// A plaintext listener serving only `grpc.health.v1.Health`, for
    /// Kubernetes gRPC probes (which cannot speak TLS) when `[tls]` is set.
    pub health_listen: Option<SocketAddr>,
    /// RPCs bfb handles at once, over all connections. Beyond it calls are
    /// rejected at once with RESOURCE_EXHAUSTED and RetryInfo (health checks
    /// are exempt).
    pub max_concurrent_rpcs: usize,
    /// How long a caller should wait before retrying a shed call.
    #[serde(with = "humantime_serde")]
    pub shed_retry_after: Duration,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE, bytes.
    pub max_header_list_size: u32,
    /// Streams a client may open and reset before bfb accepts them, per
    /// connection (the HTTP/2 rapid-reset defence).
    pub max_pending_accept_reset_streams: usize,
    /// Streams bfb may reset because of client errors before it closes the
    /// connection.
    pub max_local_error_reset_streams: usize,
    /// Interval of HTTP/2 keepalive pings to idle clients.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection closes.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Open `grpc.health.v1.Health/Watch` streams over all listeners; more
    /// are answered RESOURCE_EXHAUSTED. (Per connection the streams are also
    /// capped by `max_concurrent_streams`.)
    pub max_health_watches: usize,
    /// Largest request message accepted, bytes; larger ones get RESOURCE_EXHAUSTED.
    pub max_request_bytes: usize,
    /// Largest downstream response message accepted, bytes.
    pub max_downstream_response_bytes: usize,
    /// Close client connections older than this (after a GOAWAY), so
    /// long-lived connections rebalance across replicas.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Time in-flight calls get after a connection's GOAWAY for its age.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
    /// On SIGTERM: readiness turns NOT_SERVING at once, and bfb keeps
    /// serving this long so load balancers stop sending new calls.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Then it stops accepting and gives in-flight calls this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            health_listen: None,
            max_concurrent_rpcs: 1000,
            shed_retry_after: Duration::from_millis(100),
            max_concurrent_streams: 256,
            max_header_list_size: 16 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 256,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_health_watches: 1000,
            max_request_bytes: 64 * 1024,
            max_downstream_response_bytes: 4 * 1024 * 1024,
            max_connection_age: Duration::from_secs(300),
            max_connection_age_grace: Duration::from_secs(30),
            drain_delay: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// Traces, metrics and logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Log line format: `human` or `json` (env `BFB_LOG_FORMAT` overrides).
    pub log_format: LogFormat,
    /// `RUST_LOG`-style filter (env `RUST_LOG` overrides).
    pub log_filter: String,
    /// Address of the Prometheus `/metrics` endpoint; unset: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`; unset: no
    /// trace export.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled (a caller's sampling decision is kept).
    pub sampling_ratio: f64,
    /// `service.name` of exported spans.
    pub service_name: String,
    /// Further resource attributes, e.g. `{ "deployment.environment" = "prod" }`.
    pub resource_attributes: BTreeMap<String, String>,
    /// How often finished spans are exported.
    #[serde(with = "humantime_serde")]
    pub export_interval: Duration,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable text.
    Human,
    /// One JSON object per line.
    Json,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            log_format: LogFormat::Human,
            log_filter: "info".into(),
            metrics_listen: None,
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: "bfb".into(),
            resource_attributes: BTreeMap::new(),
            export_interval: Duration::from_secs(5),
        }
    }
}

impl ServerSettings {
    /// Adds this section's problems (and those of `[tls]`'s limits).
    pub(super) fn check(&self, tls: Option<&TlsSettings>, p: &mut Problems) {
        let s = self;
        if s.max_concurrent_rpcs == 0 {
            p.add("server.max_concurrent_rpcs", "must be at least 1");
        }
        if s.max_concurrent_streams == 0 {
            p.add("server.max_concurrent_streams", "must be at least 1");
        }
        if s.max_request_bytes < 1024 {
            p.add("server.max_request_bytes", "must be at least 1024");
        }
        if s.max_health_watches == 0 {
            p.add("server.max_health_watches", "must be at least 1");
        }
        if let Some(tls) = tls {
            if tls.max_handshakes == 0 {
                p.add("tls.max_handshakes", "must be at least 1");
            }
            if tls.max_pending_connections == 0 {
                p.add("tls.max_pending_connections", "must be at least 1");
            }
            p.positive("tls.handshake_timeout", tls.handshake_timeout);
        }
        p.positive("server.keepalive_interval", s.keepalive_interval);
        p.positive("server.max_connection_age", s.max_connection_age);
        p.positive("server.keepalive_timeout", s.keepalive_timeout);
    }
}

impl TelemetrySettings {
    /// Adds this section's problems.
    pub(super) fn check(&self, p: &mut Problems) {
        let t = self;
        p.fraction("telemetry.sampling_ratio", t.sampling_ratio);
        p.positive("telemetry.export_interval", t.export_interval);
        if let Some(e) = &t.otlp_endpoint
            && let Err(why) = check_endpoint(e)
        {
            p.add("telemetry.otlp_endpoint", why);
        }
        if tracing_subscriber::EnvFilter::try_new(&t.log_filter).is_err() {
            p.add(
                "telemetry.log_filter",
                "not a valid filter, e.g. \"info,bfb=debug\"",
            );
        }
    }
}
