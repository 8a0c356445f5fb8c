//! Inbound protection, as one HTTP-level tower layer in front of every bfb
//! service:
//!
//! - **Load shedding**: a global cap on RPCs in flight across all connections.
//!   Over it a call is rejected at once with RESOURCE_EXHAUSTED and
//!   `RetryInfo`, never queued. Health checks are exempt, so an overloaded
//!   replica is not restarted by its liveness probe.
//! - **Hard timeout**: a backstop at `deadlines.max` plus a margin, a real
//!   `tower::timeout`, whose `Elapsed` error is answered as DEADLINE_EXCEEDED
//!   (tonic would report an unknown error type as UNKNOWN/INTERNAL).
//! - **Arrival time**: stamped on every request, the start of its deadline.
//! - **Health watches**: `grpc.health.v1.Health/Watch` streams stay open
//!   for as long as the client likes, so their number is capped over all
//!   listeners (`server.max_health_watches`); the slot is held by the
//!   response body and freed when the stream ends.
//! - **Oversized requests**: tonic rejects a message over
//!   `server.max_request_bytes` with OUT_OF_RANGE; gRPC's convention is
//!   RESOURCE_EXHAUSTED, so that answer is rewritten here (bfb's handlers never
//!   produce OUT_OF_RANGE themselves).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status, body::Body};
use tower::{BoxError, Layer, Service, ServiceExt, timeout::error::Elapsed};

use crate::{error::Error, telemetry::metrics::GaugeGuard};

/// When a call reached bfb (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Arrival(pub tokio::time::Instant);

/// Path prefix of the health service, exempt from shedding.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// The health service's streaming method.
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// Adds [`Inbound`].
#[derive(Clone, Debug)]
pub struct InboundLayer {
    permits: Arc<Semaphore>,
    shed: Counter,
    retry_after: Duration,
    hard_timeout: Duration,
    max_request_bytes: usize,
    /// Open health watches, shared by every listener's layer.
    watches: Arc<Semaphore>,
    watches_open: Gauge,
    /// RPCs holding a permit, over every listener (the HPA's load signal).
    in_flight: Gauge,
}

impl InboundLayer {
    /// At most `max_rpcs` in flight; none longer than `hard_timeout`.
    pub fn new(
        max_rpcs: usize,
        retry_after: Duration,
        hard_timeout: Duration,
        max_request_bytes: usize,
        shed: Counter,
    ) -> InboundLayer {
        InboundLayer {
            permits: Arc::new(Semaphore::new(max_rpcs)),
            shed,
            retry_after,
            hard_timeout,
            max_request_bytes,
            watches: Arc::new(Semaphore::new(max_rpcs)),
            watches_open: Gauge::default(),
            in_flight: Gauge::default(),
        }
    }

    /// RPCs in flight are counted in `gauge`.
    pub fn with_in_flight(self, gauge: Gauge) -> InboundLayer {
        InboundLayer {
            in_flight: gauge,
            ..self
        }
    }

    /// Health watches take their slots from `watches` (shared by every
    /// listener) and are counted in `open`.
    pub fn with_watches(self, watches: Arc<Semaphore>, open: Gauge) -> InboundLayer {
        InboundLayer {
            watches,
            watches_open: open,
            ..self
        }
    }
}

impl<S> Layer<S> for InboundLayer {
    type Service = Inbound<S>;
    fn layer(&self, inner: S) -> Inbound<S> {
        Inbound {
            inner: tower::timeout::Timeout::new(inner, self.hard_timeout),
            layer: self.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Inbound<S> {
    inner: tower::timeout::Timeout<S>,
    layer: InboundLayer,
}

impl<S, B> Service<http::Request<B>> for Inbound<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is decided per call (shed or admit), never by waiting.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // Stamped here, synchronously inside tonic's own grpc-timeout layer
        // (which started its timer a moment ago): handlers measure the
        // caller's deadline from this instant, so bfb's DEADLINE_EXCEEDED
        // always beats tonic's CANCELLED by the configured reserve.
        request
            .extensions_mut()
            .insert(Arrival(tokio::time::Instant::now()));
        let inner = self.inner.clone();
        let path = request.uri().path();
        let watch = if path == HEALTH_WATCH {
            match self.layer.watches.clone().try_acquire_owned() {
                Ok(p) => Some((p, GaugeGuard::new(self.layer.watches_open.clone()))),
                Err(_) => {
                    tracing::debug!("health watch refused: at server.max_health_watches");
                    let refused = Error::TooManyWatches {
                        retry_after: self.layer.retry_after,
                    };
                    return Box::pin(std::future::ready(Ok(Status::from(refused).into_http())));
                }
            }
        } else {
            None
        };
        let exempt = path.starts_with(HEALTH_PREFIX);
        let permit = if exempt {
            None
        } else {
            match self.layer.permits.clone().try_acquire_owned() {
                Ok(p) => Some((p, GaugeGuard::new(self.layer.in_flight.clone()))),
                Err(_) => {
                    let shed = Error::Overloaded {
                        retry_after: self.layer.retry_after,
                    };
                    self.layer.shed.inc();
                    tracing::debug!("load shed: at max_concurrent_rpcs");
                    return Box::pin(std::future::ready(Ok(Status::from(shed).into_http())));
                }
            }
        };
        let max_bytes = self.layer.max_request_bytes;
        Box::pin(async move {
            let _permit = permit;
            match inner.oneshot(request).await {
                Ok(response) if grpc_status(&response) == Some(Code::OutOfRange) => {
                    Ok(Status::resource_exhausted(format!(
                        "request message larger than {max_bytes} bytes"
                    ))
                    .into_http())
                }
                Ok(response) => Ok(match watch {
                    // The slot lives as long as the stream's body.
                    Some(slot) => response.map(|body| Body::new(Holding { body, _slot: slot })),
                    None => response,
                }),
                Err(e) if e.is::<Elapsed>() => {
                    Ok(Status::from(Error::DeadlineExceeded).into_http())
                }
                Err(e) => Err(e),
            }
        })
    }
}

/// A response body that holds a watch slot until the stream ends.
struct Holding {
    body: Body,
    _slot: (OwnedSemaphorePermit, GaugeGuard),
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The `grpc-status` of a trailers-only response, if it has one.
fn grpc_status(response: &http::Response<Body>) -> Option<Code> {
    let v = response.headers().get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(v.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder()
            .uri(path)
            .body(())
            .expect("request")
    }

    fn status_of(response: &http::Response<Body>) -> Code {
        grpc_status(response).expect("grpc-status header")
    }

    #[tokio::test(start_paused = true)]
    async fn a_tower_timeout_is_deadline_exceeded() {
        let slow = tower::service_fn(|_: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, BoxError>(http::Response::new(Body::empty()))
        });
        let svc = InboundLayer::new(
            10,
            Duration::from_millis(100),
            Duration::from_secs(1),
            1024,
            Counter::default(),
        )
        .layer(slow);
        let response = svc
            .oneshot(request(
                "/bfb.customer.v1.CustomerAggregateService/GetCustomer",
            ))
            .await
            .expect("answered");
        assert_eq!(status_of(&response), Code::DeadlineExceeded);
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_cap_is_shed_at_once_but_health_is_not() {
        let slow = tower::service_fn(|_: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, BoxError>(http::Response::new(Body::empty()))
        });
        let svc = InboundLayer::new(
            1,
            Duration::from_millis(100),
            Duration::from_secs(30),
            1024,
            Counter::default(),
        )
        .layer(slow);
        let busy = tokio::spawn(svc.clone().oneshot(request("/x.S/M")));
        tokio::task::yield_now().await;
        let shed = tokio::time::timeout(
            Duration::from_millis(1),
            svc.clone().oneshot(request("/x.S/M")),
        )
        .await
        .expect("immediate")
        .expect("answered");
        assert_eq!(status_of(&shed), Code::ResourceExhausted);
        let health = tokio::time::timeout(
            Duration::from_millis(1),
            svc.clone().oneshot(request("/grpc.health.v1.Health/Check")),
        )
        .await;
        assert!(
            health.is_err(),
            "health is admitted (and so waits for the slow inner service)"
        );
        drop(busy);
    }

    #[tokio::test]
    async fn out_of_range_from_the_decoder_becomes_resource_exhausted() {
        let too_big = tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, BoxError>(
                Status::out_of_range("Error, decoded message length too large").into_http(),
            )
        });
        let svc = InboundLayer::new(
            1,
            Duration::from_millis(100),
            Duration::from_secs(30),
            1024,
            Counter::default(),
        )
        .layer(too_big);
        let response = svc.oneshot(request("/x.S/M")).await.expect("answered");
        assert_eq!(status_of(&response), Code::ResourceExhausted);
    }
}
