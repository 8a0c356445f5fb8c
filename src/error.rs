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
        }
    }

    /// Every reason.
    pub const ALL: [Reason; 9] = [
        Reason::Timeout,
        Reason::DeadlineExceeded,
        Reason::NoBudget,
        Reason::Unavailable,
        Reason::DownstreamError,
        Reason::DownstreamRejected,
        Reason::BadResponse,
        Reason::CircuitOpen,
        Reason::BulkheadFull,
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
    /// The request is malformed; nothing was called.
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
    /// The method (`package.Service/Method`).
    #[error("caller may not call {0}")]
    Method(String),
    /// A component it asked for.
    #[error("caller may not read component {0}")]
    Component(Component),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
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
                ErrorDetails::with_bad_request(violations),
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
                        HashMap::from([("method".to_string(), m)]),
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
