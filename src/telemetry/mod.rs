//! Traces, metrics and logs.
//!
//! - [`init`] installs the `tracing` subscriber: human or JSON log lines, a
//!   `RUST_LOG`-style filter, and, when `telemetry.otlp_endpoint` is set, an
//!   OpenTelemetry layer exporting spans over OTLP/gRPC. Export runs on a
//!   background batch processor: a slow or absent collector never delays or
//!   fails an RPC (spans are dropped when its queue is full).
//! - [`metrics`]: the Prometheus registry and the `/metrics` endpoint.
//! - [`rpc`]: what happens around every inbound RPC: the server span (parented
//!   on the caller's W3C `traceparent`), `x-request-id`, the log line and the
//!   RPC metrics; and the propagation of both onto downstream calls.

pub mod metrics;
pub mod rpc;

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider},
};
use tracing_subscriber::{
    EnvFilter, Layer, filter::FilterExt, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::config::{LogFormat, TelemetrySettings};

/// Handle on installed telemetry; [`Telemetry::shutdown`] flushes spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("otlp exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("logging already initialised: {0}")]
    AlreadySet(String),
}

impl Telemetry {
    /// Exports the spans still queued and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }
}

/// Installs the global subscriber (logs, and traces when configured).
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match std::env::var("BFB_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("human") => LogFormat::Human,
        _ => settings.log_format,
    };
    let logs = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colour only for a person at a terminal; never escape codes in
            // files, pipes and log collectors.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    // Events only: the log layer never sees spans, so a span costs nothing
    // unless traces are exported (formatting every span's fields for logs
    // cost more than the rest of an RPC's telemetry); every line in the
    // request path carries the ids it needs itself (`rpc::observe`).
    .with_filter({
        // The hint keeps tracing's level fast path (without it the combined
        // filter's hint is "any level", and every trace! in h2 and hyper
        // is looked at).
        let hint = filter.max_level_hint();
        let events = tracing_subscriber::filter::filter_fn(|m| m.is_event());
        filter.and(match hint {
            Some(level) => events.with_max_level_hint(level),
            None => events,
        })
    });

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = settings
        .otlp_endpoint
        .as_deref()
        .map(|endpoint| tracer_provider(settings, endpoint))
        .transpose()?;
    // Spans are exported whatever the log filter says.
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("bfb"))
            .with_filter(EnvFilter::new("bfb=info"))
    });
    // One list of filtered layers, not `.with(Option<layer>)`: an absent
    // (`None`) layer declares interest in every callsite, which made every
    // span live without an exporter (docs/performance.md).
    let mut layers = vec![logs.boxed()];
    layers.extend(traces.map(Layer::boxed));
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    Ok(Telemetry { provider })
}

fn tracer_provider(
    settings: &TelemetrySettings,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(settings.export_interval)
                .build(),
        )
        .build();
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attributes(
            settings
                .resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sampling_ratio,
        ))))
        .with_resource(resource)
        .build())
}
