//! bfb's one request error type and its single mapping to `tonic::Status`.
//!
//! Every failure on the request path becomes an [`Error`]; `From<Error> for
//! Status` is the only place that decides status codes and `google.rpc`
//! details. Messages name components and reason codes, never downstream
//! addresses or downstream error text (those go to the logs).

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::component::Component;

/// `google.rpc.ErrorInfo.domain` of every error bfb sends.
pub const ERROR_DOMAIN: &str = "bfb";

/// Why a component could not be fetched. The codes are stable: callers may
/// match on them (they appear in `ComponentStatus.reason` and in
/// `ErrorInfo.reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The downstream did not answer within its own timeout.
    Timeout,
    /// The caller's deadline ran out while waiting for the downstream.
    DeadlineExceeded,
    /// Too little of the caller's deadline was left to start the call.
    NoBudget,
    /// The downstream could not be reached or said it is unavailable.
    Unavailable,
    /// The downstream failed with an error of its own (INTERNAL, UNKNOWN, ...).
    DownstreamError,
    /// The downstream rejected bfb's request (INVALID_ARGUMENT,
    /// PERMISSION_DENIED, ...): a bug or misconfiguration on bfb's side.
    DownstreamRejected,
    /// The downstream's answer was unusable (e.g. a required field missing).
    BadResponse,
    /// The downstream's circuit breaker is open: it failed recently and is
    /// not called until its open time has passed.
    CircuitOpen,
    /// The downstream's bulkhead is full: too many calls to it in flight.
    BulkheadFull,
    /// The downstream has no data for an entity that exists (its owning
    /// component found it): that component's answer is missing.
    NotFound,
    /// No endpoint of the downstream can take a call: none resolved, or
    /// every one ejected after failing. Fails in microseconds.
    NoEndpoints,
}

impl Reason {
    /// The stable code.
    pub const fn code(self) -> &'static str {
        match self {
            Reason::Timeout => "TIMEOUT",
            Reason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Reason::NoBudget => "NO_BUDGET",
            Reason::Unavailable => "UNAVAILABLE",
            Reason::DownstreamError => "DOWNSTREAM_ERROR",
            Reason::DownstreamRejected => "DOWNSTREAM_REJECTED",
            Reason::BadResponse => "BAD_RESPONSE",
            Reason::CircuitOpen => "CIRCUIT_OPEN",
            Reason::BulkheadFull => "BULKHEAD_FULL",
            Reason::NotFound => "NOT_FOUND",
            Reason::NoEndpoints => "NO_ENDPOINTS",
        }
    }

    /// Every reason.
    pub const ALL: [Reason; 11] = [
        Reason::Timeout,
        Reason::DeadlineExceeded,
        Reason::NoBudget,
        Reason::Unavailable,
        Reason::DownstreamError,
        Reason::DownstreamRejected,
        Reason::BadResponse,
        Reason::CircuitOpen,
        Reason::BulkheadFull,
        Reason::NotFound,
        Reason::NoEndpoints,
    ];

    /// Parses a reason code.
    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Whether the caller's own budget ran out (as opposed to the downstream
    /// failing while time was left).
    pub const fn is_caller_deadline(self) -> bool {
        matches!(self, Reason::DeadlineExceeded | Reason::NoBudget)
    }
}

/// Everything that can fail a bfb RPC.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was called. However many
    /// violations there are, the status carries at most
    /// [`MAX_VIOLATIONS`] of them, each clipped (see [`bounded`]).
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The entity does not exist (a downstream said NOT_FOUND).
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// `customer` or `user`.
        kind: &'static str,
        /// The id the caller sent.
        id: String,
    },
    /// bfb is at its cap of concurrent RPCs; the call was shed at once.
    #[error("bfb is overloaded; retry later")]
    Overloaded {
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// bfb has `server.max_health_watches` health watches open.
    #[error("too many health watches open; retry later")]
    TooManyWatches {
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// The call ran out of time in bfb's own hard limit.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The caller could not be authenticated. Deliberately without detail:
    /// the reason is logged, not told to a possible attacker.
    #[error("unauthenticated")]
    Unauthenticated,
    /// The caller is authenticated but may not do this.
    #[error("{0}")]
    PermissionDenied(Denied),
    /// The consumer is over its request rate.
    #[error("rate limit exceeded; retry later")]
    RateLimited {
        /// When a request will be admitted again.
        retry_after: Duration,
    },
    /// The consumer has its whole concurrency share in flight.
    #[error("too many calls in flight for this consumer; retry later")]
    ConsumerOverloaded {
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// A component the answer cannot do without failed.
    #[error("component {component} failed: {}", reason.code())]
    Component {
        /// The component.
        component: Component,
        /// Why.
        reason: Reason,
    },
}

/// What a caller was denied.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// Its identity is not a configured consumer.
    #[error("caller is not a known consumer")]
    Consumer,
    /// The method (`package.Service/Method`; clipped, it comes from the
    /// request's path).
    #[error("caller may not call {}", clip(.0, 128))]
    Method(String),
    /// A component it asked for.
    #[error("caller may not read component {0}")]
    Component(Component),
}

/// Field violations a status carries at most; more are summed up in one
/// last "and K more" violation.
pub const MAX_VIOLATIONS: usize = 10;
/// Longest field path and description of a violation, in bytes.
const MAX_FIELD: usize = 64;
const MAX_DESCRIPTION: usize = 160;

/// `s` cut to at most `max` bytes on a character boundary, with `…` when
/// cut. Everything bfb echoes from a request goes through this, so an error
/// never grows with the input: grpc-java refuses trailers over 8 KiB and
/// C-core over 16 KiB, and would show the caller RESOURCE_EXHAUSTED instead.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

/// The violations a status carries: the first [`MAX_VIOLATIONS`], clipped,
/// and one more that counts the rest. The whole error (message and details,
/// as sent) stays under 4 KiB for any input.
pub fn bounded(mut violations: Vec<FieldViolation>) -> Vec<FieldViolation> {
    let more = violations.len().saturating_sub(MAX_VIOLATIONS);
    violations.truncate(MAX_VIOLATIONS);
    for v in &mut violations {
        v.field = clip(&v.field, MAX_FIELD).into_owned();
        v.description = clip(&v.description, MAX_DESCRIPTION).into_owned();
    }
    if more > 0 {
        violations.push(FieldViolation::new(
            "request",
            format!("and {more} more problems not listed"),
        ));
    }
    violations
}

/// The message of an invalid request: the first problem and how many more.
fn describe(violations: &[FieldViolation]) -> String {
    let Some(first) = violations.first() else {
        return "no details".into();
    };
    let field = clip(&first.field, MAX_FIELD);
    let description = clip(&first.description, MAX_DESCRIPTION);
    match violations.len() - 1 {
        0 => format!("{field}: {description}"),
        more => format!("{field}: {description} (and {more} more; see BadRequest details)"),
    }
}

/// How long a caller should wait before retrying after a downstream failure.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let message = err.to_string();
        match err {
            Error::InvalidArgument(violations) => Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request(bounded(violations)),
            ),
            Error::NotFound { kind, id } => {
                let mut details = ErrorDetails::with_resource_info(kind, id, "", "");
                details.set_error_info(
                    format!("{}_NOT_FOUND", kind.to_ascii_uppercase()),
                    ERROR_DOMAIN,
                    HashMap::new(),
                );
                Status::with_error_details(Code::NotFound, message, details)
            }
            Error::Overloaded { retry_after } => {
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.set_error_info("OVERLOADED", ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            Error::TooManyWatches { retry_after } => {
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.set_error_info("TOO_MANY_WATCHES", ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            Error::DeadlineExceeded => Status::with_error_details(
                Code::DeadlineExceeded,
                message,
                ErrorDetails::with_error_info("DEADLINE_EXCEEDED", ERROR_DOMAIN, HashMap::new()),
            ),
            Error::Unauthenticated => Status::with_error_details(
                Code::Unauthenticated,
                message,
                ErrorDetails::with_error_info("UNAUTHENTICATED", ERROR_DOMAIN, HashMap::new()),
            ),
            Error::PermissionDenied(denied) => {
                let (reason, metadata) = match denied {
                    Denied::Consumer => ("UNKNOWN_CONSUMER", HashMap::new()),
                    Denied::Method(m) => (
                        "METHOD_NOT_ALLOWED",
                        HashMap::from([("method".to_string(), clip(&m, 128).into_owned())]),
                    ),
                    Denied::Component(c) => (
                        "COMPONENT_NOT_ALLOWED",
                        HashMap::from([("component".to_string(), c.name().to_string())]),
                    ),
                };
                Status::with_error_details(
                    Code::PermissionDenied,
                    message,
                    ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
                )
            }
            Error::RateLimited { retry_after } => {
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.set_error_info("RATE_LIMITED", ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            Error::ConsumerOverloaded { retry_after } => {
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.set_error_info("CONSUMER_CONCURRENCY", ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            Error::Component { component, reason } => {
                let code = match reason {
                    r if r.is_caller_deadline() => Code::DeadlineExceeded,
                    Reason::DownstreamRejected | Reason::BadResponse => Code::Internal,
                    Reason::NotFound => Code::NotFound,
                    _ => Code::Unavailable,
                };
                let mut details = ErrorDetails::with_error_info(
                    reason.code(),
                    ERROR_DOMAIN,
                    HashMap::from([("component".to_string(), component.name().to_string())]),
                );
                if code == Code::Unavailable {
                    details.set_retry_info(Some(RETRY_AFTER));
                }
                Status::with_error_details(code, message, details)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_failures_map_to_codes_with_details() {
        let cases = [
            (Reason::Timeout, Code::Unavailable, true),
            (Reason::Unavailable, Code::Unavailable, true),
            (Reason::DownstreamError, Code::Unavailable, true),
            (Reason::CircuitOpen, Code::Unavailable, true),
            (Reason::BulkheadFull, Code::Unavailable, true),
            (Reason::DeadlineExceeded, Code::DeadlineExceeded, false),
            (Reason::NoBudget, Code::DeadlineExceeded, false),
            (Reason::DownstreamRejected, Code::Internal, false),
            (Reason::NotFound, Code::NotFound, false),
        ];
        for (reason, code, retry) in cases {
            let status = Status::from(Error::Component {
                component: Component::Orders,
                reason,
            });
            assert_eq!(status.code(), code, "{reason:?}");
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(info.reason, reason.code());
            assert_eq!(info.domain, ERROR_DOMAIN);
            assert_eq!(info.metadata["component"], "orders");
            assert_eq!(
                status.get_details_retry_info().is_some(),
                retry,
                "{reason:?}"
            );
            assert!(status.message().contains("orders"));
        }
    }

    #[test]
    fn overload_is_resource_exhausted_with_retry_info() {
        let status = Status::from(Error::Overloaded {
            retry_after: Duration::from_millis(100),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_details_retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(100)));
        assert_eq!(
            status.get_details_error_info().expect("info").reason,
            "OVERLOADED"
        );
    }

    #[test]
    fn denials_name_what_was_denied() {
        let status = Status::from(Error::PermissionDenied(Denied::Component(
            Component::Emails,
        )));
        assert_eq!(status.code(), Code::PermissionDenied);
        let info = status.get_details_error_info().expect("info");
        assert_eq!(info.reason, "COMPONENT_NOT_ALLOWED");
        assert_eq!(info.metadata["component"], "emails");
        assert!(status.message().contains("emails"));
        let status = Status::from(Error::Unauthenticated);
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "unauthenticated");
        let status = Status::from(Error::RateLimited {
            retry_after: Duration::from_millis(250),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.get_details_retry_info().expect("retry").retry_delay,
            Some(Duration::from_millis(250))
        );
    }

    /// The size of the error as it travels: `grpc-message` percent-encoded
    /// (at worst 3 bytes a byte) and the details base64-encoded.
    fn wire_size(status: &Status) -> usize {
        status.message().len() * 3 + status.details().len().div_ceil(3) * 4
    }

    #[test]
    fn errors_stay_small_whatever_the_input() {
        let long = "x".repeat(10_000);
        let many: Vec<FieldViolation> = (0..3_000)
            .map(|i| {
                FieldViolation::new(format!("read_mask.paths[{i}]"), format!("unknown {long:?}"))
            })
            .collect();
        let status = Status::from(Error::InvalidArgument(many));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(wire_size(&status) < 4096, "{} bytes", wire_size(&status));
        let bad = status.get_details_bad_request().expect("bad request");
        assert_eq!(bad.field_violations.len(), MAX_VIOLATIONS + 1);
        assert_eq!(
            bad.field_violations[MAX_VIOLATIONS].description,
            "and 2990 more problems not listed"
        );
        assert!(
            status.message().contains("and 2999 more"),
            "{}",
            status.message()
        );
        let status = Status::from(Error::PermissionDenied(Denied::Method(long.clone())));
        assert!(wire_size(&status) < 4096);
        assert!(clip("héllo", 3).len() <= 3);
        assert_eq!(clip("short", 10), "short");
    }

    #[test]
    fn invalid_argument_carries_field_violations() {
        let status = Status::from(Error::InvalidArgument(vec![FieldViolation::new(
            "customer_id",
            "must not be empty",
        )]));
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().expect("bad request");
        assert_eq!(bad.field_violations[0].field, "customer_id");
    }
}
