//! Around every inbound RPC: a server span parented on the caller's W3C
//! trace context, the `x-request-id` (accepted or generated, returned, logged
//! and passed downstream), one log line (info when failed or degraded, debug
//! otherwise), and the RPC metrics. And the carriers that move trace context
//! and request id through gRPC metadata.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Instant,
};

use opentelemetry::propagation::{Extractor, Injector};
use tonic::{
    Code, Response, Status,
    metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue},
};
use tracing::{Instrument, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::metrics::{DegradedLabels, MethodLabels, Metrics, RpcLabels};

/// Metadata key of the request id.
pub const REQUEST_ID: &str = "x-request-id";
/// Longest accepted inbound request id; longer or non-printable ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// Metadata key of the consumer (its configured name) on downstream calls.
pub const CONSUMER: &str = "x-bfb-consumer";
/// Metadata key of the authenticated identity (SPIFFE ID or token subject)
/// on downstream calls.
pub const PRINCIPAL: &str = "x-bfb-principal";

/// What downstream calls made for an RPC carry: its request id and who asked;
/// and where the engine tallies the RPC's aggregates.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// The request id.
    pub request_id: Arc<str>,
    /// The consumer's name.
    pub consumer: Arc<str>,
    /// The authenticated identity.
    pub principal: Arc<str>,
    /// The RPC's `method` label.
    pub method: &'static str,
    /// Degraded components of the RPC's aggregates, for its log line.
    tally: Arc<Tally>,
    /// The request id, consumer and principal as downstream call headers,
    /// made once per RPC rather than once per downstream call (an identity
    /// that is not a valid header value is left out).
    headers: Arc<[Option<MetadataValue<Ascii>>; 3]>,
}

/// The keys of [`RequestContext::headers`], in order.
const IDENTITY_KEYS: [&str; 3] = [REQUEST_ID, CONSUMER, PRINCIPAL];

/// The degraded components of one RPC's aggregates (`component:REASON`),
/// at most [`MAX_TALLY`]: a batch or stream may have many.
#[derive(Debug, Default)]
struct Tally(Mutex<Vec<(&'static str, &'static str)>>);

/// Degraded components the log line of one RPC lists at most.
const MAX_TALLY: usize = 16;

/// Records what one aggregate of the current RPC came to, from the engine's
/// typed outcomes: `fetched` components were asked of downstreams, and
/// `degraded` (component, reason code) were not OK. Batch and stream RPCs
/// record once per entity. Counted in `bfb_fanout_components{method}` and
/// `bfb_degraded_responses_total`, and listed on the RPC's log line.
pub fn record_aggregate(
    metrics: &Metrics,
    fetched: usize,
    degraded: &[(&'static str, &'static str)],
) {
    let method = CURRENT.try_with(|cx| cx.method).unwrap_or("unknown");
    metrics
        .fanout
        .get_or_create(&MethodLabels { method })
        .observe(fetched as f64);
    for &(component, reason) in degraded {
        metrics
            .degraded
            .get_or_create(&DegradedLabels { component, reason })
            .inc();
    }
    if !degraded.is_empty() {
        let _ = CURRENT.try_with(|cx| {
            // Poisoned only by a panic while pushing, which cannot happen.
            if let Ok(mut list) = cx.tally.0.lock() {
                let room = MAX_TALLY.saturating_sub(list.len());
                list.extend(degraded.iter().take(room));
            }
        });
    }
}

tokio::task_local! {
    /// The context of the RPC this task serves (downstream calls run in the
    /// handler's task, so they read it here).
    static CURRENT: RequestContext;
}

impl RequestContext {
    /// The context of the RPC the current task serves, if any.
    pub fn current() -> Option<RequestContext> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `f` in this context (for work spawned on behalf of an RPC, such
    /// as a cache refresh).
    pub async fn scope<F: Future>(self, f: F) -> F::Output {
        CURRENT.scope(self, f).await
    }

    /// Runs `f` in `context`, when there is one. The one way work done for
    /// an RPC outside its task (spawned, or polled by tonic) keeps the RPC's
    /// request id and caller on its downstream calls and its outcomes
    /// counted for the RPC.
    pub async fn within<F: Future>(context: Option<RequestContext>, f: F) -> F::Output {
        match context {
            Some(cx) => cx.scope(f).await,
            None => f.await,
        }
    }

    /// `f`, bound to the current RPC's context wherever it is later run.
    pub fn carry<F: Future>(f: F) -> impl Future<Output = F::Output> {
        RequestContext::within(RequestContext::current(), f)
    }
}

/// Reads W3C trace context from gRPC metadata.
pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes W3C trace context into gRPC metadata.
pub struct MetadataInjector<'a>(pub &'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(k, v);
        }
    }
}

/// Adds the current span's trace context and the current request id to a
/// downstream request's metadata (an allow-list: nothing else is forwarded).
pub fn propagate(span: &tracing::Span, metadata: &mut MetadataMap) {
    // A span no layer built (no trace exporter) has no context to send;
    // skipping it saves the global propagator's lock per call.
    if !span.is_disabled() {
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(metadata));
        });
    }
    let _ = CURRENT.try_with(|cx| {
        for (key, value) in IDENTITY_KEYS.iter().zip(cx.headers.iter()) {
            if let Some(v) = value {
                metadata.insert(*key, v.clone());
            }
        }
    });
}

fn request_id(metadata: &MetadataMap) -> Arc<str> {
    metadata
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map_or_else(new_request_id, Arc::from)
}

/// A random (version 4) UUID from the thread-local RNG: `Uuid::new_v4` reads
/// the OS RNG, a system call per request; request ids need uniqueness, not
/// cryptographic strength.
fn new_request_id() -> Arc<str> {
    let bytes: [u8; 16] = rand::Rng::random(&mut rand::rng());
    let mut text = uuid::Uuid::encode_buffer();
    Arc::from(
        &*uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .hyphenated()
            .encode_lower(&mut text),
    )
}

/// The stable upper-case name of a gRPC code, for labels and logs.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Runs one RPC handler `f` with its span, request id, log line and
/// metrics, on behalf of `consumer` authenticated as `principal`. What the
/// answer's aggregates came to is recorded by the engine as it makes them
/// ([`record_aggregate`]); streams run their work in the RPC's
/// [`RequestContext`] (taken with [`RequestContext::current`]).
///
/// Not an `async fn`: the handler future `f` is moved into its scope before
/// the returned future starts, so that future holds it once (an `async fn`
/// keeps room for its argument beside what it is moved into; the handler
/// is the largest part of the request's future).
pub fn observe<'m, T, F>(
    metrics: &'m Metrics,
    method: &'static str,
    metadata: &MetadataMap,
    (consumer, principal): (&Arc<str>, &Arc<str>),
    f: F,
) -> impl Future<Output = Result<Response<T>, Status>> + use<'m, T, F>
where
    F: Future<Output = Result<Response<T>, Status>>,
{
    let started = Instant::now();
    let request_id = request_id(metadata);
    let span = tracing::info_span!(
        "rpc",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = method,
        request_id = %request_id,
        consumer = %consumer,
        rpc.grpc.status_code = field::Empty,
        degraded = field::Empty,
    );
    // A span no layer built (no trace exporter) has no parent to join;
    // skipping it saves the global propagator's lock per RPC.
    if !span.is_disabled() {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&MetadataExtractor(metadata))
        });
        // Only fails when no OpenTelemetry layer is installed; then there is no trace to join.
        let _ = span.set_parent(parent);
    }

    let header = |v: &str| MetadataValue::try_from(v).ok();
    let context = RequestContext {
        headers: Arc::new([header(&request_id), header(consumer), header(principal)]),
        request_id,
        consumer: consumer.clone(),
        principal: principal.clone(),
        method,
        tally: Arc::default(),
    };
    // Combinators, not an `async` block: a block would keep the handler's
    // future twice (as captured, and as awaited). `finish` runs inside the
    // scope and the span, so it reads both from there rather than keeping
    // copies beside the handler's future.
    let finished = futures::FutureExt::map(f, move |result| match RequestContext::current() {
        Some(cx) => finish(
            result,
            metrics,
            (method, started),
            &tracing::Span::current(),
            &cx,
        ),
        // Cannot happen: the map runs inside the scope.
        None => result,
    });
    CURRENT.scope(context, finished).instrument(span)
}

/// The end of [`observe`]: the RPC's metrics, span fields, log line and the
/// request id on the answer.
fn finish<T>(
    result: Result<Response<T>, Status>,
    metrics: &Metrics,
    (method, started): (&'static str, Instant),
    span: &tracing::Span,
    cx: &RequestContext,
) -> Result<Response<T>, Status> {
    let (tally, request_id, consumer) = (&cx.tally, &*cx.request_id, &*cx.consumer);
    let code = code_name(match &result {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    });
    let elapsed = started.elapsed();
    metrics
        .rpc_duration
        .get_or_create(&RpcLabels { method, code })
        .observe(elapsed.as_secs_f64());
    let degraded_list = tally
        .0
        .lock()
        .map(|list| {
            list.iter()
                .map(|(c, r)| format!("{c}:{r}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    span.record("rpc.grpc.status_code", code);
    if !degraded_list.is_empty() {
        span.record("degraded", degraded_list.as_str());
    }
    // One line per RPC, complete in itself (the log layer does not format
    // spans: see `telemetry::init`): at info when the answer failed or was
    // degraded, at debug when it was whole (every RPC is counted in
    // bfb_rpc_duration_seconds; a line per success cost ~15 % of a
    // GetCustomer's CPU, docs/performance.md). No entity ids or data at
    // info level: method, outcome, timing, ids of the request only.
    let duration_ms = elapsed.as_secs_f64() * 1e3;
    if degraded_list.is_empty() && code == "OK" {
        tracing::debug!(parent: span, method, status = code, duration_ms, request_id, consumer, "rpc");
    } else {
        tracing::info!(
            parent: span,
            method,
            status = code,
            duration_ms,
            degraded = degraded_list.as_str(),
            request_id,
            consumer,
            "rpc"
        );
    }
    // The request id made into a header value once, for downstream calls.
    let id = cx.headers[0].clone();
    match result {
        Ok(mut r) => {
            if let Some(v) = id {
                r.metadata_mut().insert(REQUEST_ID, v);
            }
            Ok(r)
        }
        Err(mut s) => {
            if let Some(v) = id {
                s.metadata_mut().insert(REQUEST_ID, v);
            }
            Err(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_accepted_when_sane_and_generated_otherwise() {
        let mut md = MetadataMap::new();
        md.insert(REQUEST_ID, "abc-123".parse().expect("ascii"));
        assert_eq!(&*request_id(&md), "abc-123");
        md.insert(REQUEST_ID, "x".repeat(200).parse().expect("ascii"));
        assert_ne!(&*request_id(&md), "x".repeat(200));
        let generated = request_id(&MetadataMap::new());
        let uuid = uuid::Uuid::parse_str(&generated).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 4);
        assert_ne!(generated, request_id(&MetadataMap::new()));
    }
}
