//! The innermost layer: one attempt at the downstream, with the deadline
//! budget as its `grpc-timeout` (enforced here too), and the downstream's
//! status classified into a [`Failed`].

use std::{
    future::Future,
    task::{Context, Poll},
    time::Duration,
};

use futures::{FutureExt, future::Either};
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};
use tower::{Layer, Service, ServiceExt};
use tracing::{Instrument, field};

use crate::{
    component::Component,
    error::Reason,
    resilience::CallError,
    telemetry::{
        metrics::DownstreamMetrics,
        rpc::{code_name, propagate},
    },
};

use super::{Call, CallFuture, Failed, NoEndpoints, Pushback};

/// Adds [`Attempt`] with the downstream's own per-attempt timeout.
#[derive(Clone)]
pub struct AttemptLayer {
    timeout: Duration,
    component: Component,
    rpc: &'static str,
    metrics: DownstreamMetrics,
}

impl AttemptLayer {
    /// Attempts at `component`'s `rpc` take at most `timeout` (and never more
    /// than the deadline allows).
    pub fn new(
        timeout: Duration,
        component: Component,
        rpc: &'static str,
        metrics: DownstreamMetrics,
    ) -> AttemptLayer {
        AttemptLayer {
            timeout,
            component,
            rpc,
            metrics,
        }
    }
}

impl<S> Layer<S> for AttemptLayer {
    type Service = Attempt<S>;
    fn layer(&self, inner: S) -> Attempt<S> {
        Attempt {
            inner,
            layer: self.clone(),
        }
    }
}

/// One attempt over a tonic client call `S`.
#[derive(Clone)]
pub struct Attempt<S> {
    inner: S,
    layer: AttemptLayer,
}

impl<S, M, T> Service<Call<M>> for Attempt<S>
where
    S: Service<Request<M>, Response = Response<T>, Error = Status> + Clone + Send + 'static,
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
        let (inner, layer) = (self.inner.clone(), self.layer.clone());
        Box::pin(async move { layer.run(call, |r| inner.oneshot(r)).await })
    }
}

impl AttemptLayer {
    /// One attempt: `rpc` called with `call`'s message under its budget,
    /// in a client span, its status classified and measured.
    ///
    /// Not an `async fn`, and no `async` block inside: the request is built
    /// and `rpc` called before it returns, and the future is the call under
    /// its timer, its span entered, its outcome mapped by a closure. An
    /// `async` block would keep the call beside the request made of it.
    pub fn run<M, T, F, Fut>(
        &self,
        call: Call<M>,
        rpc: F,
    ) -> impl Future<Output = Result<T, Failed>> + use<'_, M, T, F, Fut>
    where
        F: FnOnce(Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let l = self;
        let span = tracing::info_span!(
            "downstream",
            otel.name = l.rpc,
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.method = l.rpc,
            component = l.component.name(),
            // OTLP has no unsigned integers; u32 would be exported as a string.
            attempt = i64::from(call.attempt),
            hedged = call.hedge,
            budget_ms = field::Empty,
            rpc.grpc.status_code = field::Empty,
            reason = field::Empty,
        );
        let budget = match call.deadline.budget(l.timeout) {
            Ok(budget) => budget,
            Err(r) => {
                span.record("reason", r.code());
                return Either::Left(std::future::ready(Err(Failed::because(r))));
            }
        };
        span.record("budget_ms", budget.timeout.as_secs_f64() * 1e3);
        let mut request = Request::new(call.message);
        request.set_timeout(budget.timeout);
        // The balancer reads it to send a retry or hedge elsewhere.
        request.extensions_mut().insert(call.tried);
        propagate(&span, request.metadata_mut());
        let started = Instant::now();
        let sent = {
            let _entered = span.enter();
            rpc(request)
        };
        let metrics = &l.metrics;
        let answered = tokio::time::timeout(budget.timeout, sent).map(move |answer| {
            let (code, result) = match answer {
                Ok(Ok(response)) => (Code::Ok, Ok(response.into_inner())),
                Ok(Err(status)) => {
                    let spent = Spent {
                        caller_bound: budget.caller_bound,
                        expired: expired(started.elapsed(), budget.timeout),
                    };
                    (status.code(), Err(classify(&status, spent)))
                }
                Err(_elapsed) => (
                    Code::DeadlineExceeded,
                    Err(Failed::because(timeout_reason(budget.caller_bound))),
                ),
            };
            let code = code_name(code);
            metrics.attempt(code, started.elapsed().as_secs_f64());
            // The attempt's span: entered around this poll by `instrument`.
            let span = tracing::Span::current();
            span.record("rpc.grpc.status_code", code);
            if let Err(f) = &result {
                span.record("reason", f.reason().map_or("NOT_FOUND", |r| r.code()));
            }
            result
        });
        Either::Right(answered.instrument(span))
    }
}

/// How the attempt's budget stood when the downstream answered.
#[derive(Clone, Copy, Debug)]
pub struct Spent {
    /// The budget was the caller's remaining deadline (not the downstream's
    /// own timeout).
    pub caller_bound: bool,
    /// The budget had (nearly) run out.
    pub expired: bool,
}

/// Whether an answer after `elapsed` came at the end of a `budget`: at 90 %
/// of it or later. The downstream's server starts its grpc-timeout timer a
/// little after bfb, and answers CANCELLED or DEADLINE_EXCEEDED a little
/// before bfb's own timer fires; an answer well before that is the
/// downstream's own failure, not a timeout.
fn expired(elapsed: Duration, budget: Duration) -> bool {
    elapsed + budget / 10 >= budget
}

fn timeout_reason(caller_bound: bool) -> Reason {
    if caller_bound {
        Reason::DeadlineExceeded
    } else {
        Reason::Timeout
    }
}

/// Maps a downstream's status to what it means for bfb. The downstream's
/// message is logged here and goes no further.
///
/// A status tonic made up on bfb's side (it carries a `source`: a reset,
/// refused or closed connection before any response) is a transport failure:
/// UNAVAILABLE and retryable, whatever code tonic gave it (often UNKNOWN or
/// CANCELLED). A status the downstream sent never has a source.
pub fn classify(status: &Status, spent: Spent) -> Failed {
    tracing::debug!(code = ?status.code(), message = status.message(), "downstream call failed");
    if caused_by::<NoEndpoints>(status) {
        return Failed::because(Reason::NoEndpoints);
    }
    if is_transport_failure(status) {
        return Failed {
            error: CallError::Failed(Reason::Unavailable),
            retryable: true,
            pushback: Pushback::None,
        };
    }
    let reason = match status.code() {
        Code::NotFound => {
            return Failed {
                error: CallError::NotFound,
                retryable: false,
                pushback: Pushback::None,
            };
        }
        // tonic servers answer CANCELLED ("Timeout expired") when the
        // grpc-timeout bfb sent runs out, often just before bfb's own timer.
        Code::DeadlineExceeded | Code::Cancelled if spent.expired => {
            timeout_reason(spent.caller_bound)
        }
        // ... but the same codes with time left are the downstream's own.
        Code::DeadlineExceeded | Code::Cancelled => Reason::DownstreamError,
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted => Reason::Unavailable,
        Code::Internal | Code::Unknown | Code::DataLoss => Reason::DownstreamError,
        Code::Ok
        | Code::InvalidArgument
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Unauthenticated => Reason::DownstreamRejected,
    };
    Failed {
        error: CallError::Failed(reason),
        // A unary UNAVAILABLE carries no response message: safe to retry a read.
        retryable: status.code() == Code::Unavailable,
        pushback: pushback(status),
    }
}

/// Whether tonic made `status` up from a connection failure: it has a
/// source, and that is not tonic's own grpc-timeout timer (`TimeoutExpired`,
/// which it reports as CANCELLED: a timeout, classified by its code).
fn is_transport_failure(status: &Status) -> bool {
    std::error::Error::source(status).is_some() && !caused_by::<tonic::TimeoutExpired>(status)
}

/// Whether `E` is in `status`'s source chain.
fn caused_by<E: std::error::Error + 'static>(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<E>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Reads `grpc-retry-pushback-ms` (gRFC A6): a negative value means "do not
/// retry"; garbage is ignored.
fn pushback(status: &Status) -> Pushback {
    let Some(value) = status.metadata().get("grpc-retry-pushback-ms") else {
        return Pushback::None;
    };
    match value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
    {
        Some(ms) if ms < 0 => Pushback::Never,
        Some(ms) => Pushback::After(Duration::from_millis(ms.unsigned_abs())),
        None => Pushback::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: Spent = Spent {
        caller_bound: false,
        expired: false,
    };

    fn with_pushback(v: &str) -> Status {
        let mut s = Status::unavailable("x");
        s.metadata_mut()
            .insert("grpc-retry-pushback-ms", v.parse().expect("ascii"));
        s
    }

    #[test]
    fn only_unavailable_is_retryable() {
        assert!(classify(&Status::unavailable("x"), FRESH).retryable);
        for s in [
            Status::not_found("x"),
            Status::invalid_argument("x"),
            Status::internal("x"),
            Status::resource_exhausted("x"),
            Status::deadline_exceeded("x"),
        ] {
            assert!(!classify(&s, FRESH).retryable, "{:?}", s.code());
        }
        assert_eq!(
            classify(&Status::not_found("x"), FRESH).error,
            CallError::NotFound
        );
    }

    #[test]
    fn a_transport_failure_is_unavailable_and_retryable_but_an_answered_unknown_is_not() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let transport = Status::from_error(Box::new(io));
        assert_eq!(transport.code(), Code::Unknown, "tonic's own code for it");
        let f = classify(&transport, FRESH);
        assert_eq!(f.reason(), Some(Reason::Unavailable));
        assert!(f.retryable);
        let answered = classify(&Status::unknown("boom"), FRESH);
        assert_eq!(answered.reason(), Some(Reason::DownstreamError));
        assert!(!answered.retryable);
        let timer = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        let ended = Spent {
            caller_bound: false,
            expired: true,
        };
        assert_eq!(
            classify(&timer, ended).reason(),
            Some(Reason::Timeout),
            "tonic's own timer is a timeout"
        );
    }

    #[test]
    fn cancelled_or_deadline_is_a_timeout_only_when_the_budget_ran_out() {
        let ended = Spent {
            caller_bound: false,
            expired: true,
        };
        for s in [Status::cancelled("x"), Status::deadline_exceeded("x")] {
            assert_eq!(classify(&s, ended).reason(), Some(Reason::Timeout));
            assert_eq!(
                classify(&s, FRESH).reason(),
                Some(Reason::DownstreamError),
                "answered with time left"
            );
        }
        let caller = Spent {
            caller_bound: true,
            expired: true,
        };
        assert_eq!(
            classify(&Status::cancelled("x"), caller).reason(),
            Some(Reason::DeadlineExceeded)
        );
        assert!(expired(
            Duration::from_millis(95),
            Duration::from_millis(100)
        ));
        assert!(!expired(
            Duration::from_millis(10),
            Duration::from_millis(100)
        ));
    }

    #[test]
    fn pushback_is_read() {
        assert_eq!(
            classify(&with_pushback("-1"), FRESH).pushback,
            Pushback::Never
        );
        assert_eq!(
            classify(&with_pushback("250"), FRESH).pushback,
            Pushback::After(Duration::from_millis(250))
        );
        assert_eq!(
            classify(&with_pushback("soon"), FRESH).pushback,
            Pushback::None
        );
        assert_eq!(
            classify(&Status::unavailable("x"), FRESH).pushback,
            Pushback::None
        );
    }
}
