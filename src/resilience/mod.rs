//! The resilience layers every downstream call passes through, one module
//! each. They run, in order and with a comment per step, in
//! [`crate::downstream::stack`].
//!
//! Each module's step is a function over the next step (`BulkheadLayer::enter`,
//! `RetryLayer::run`, `HedgeLayer::run`, `Breaker::guard`, `AttemptLayer::run`),
//! which the flattened stack calls directly; each is also a
//! `tower::Service<Call<M>>` layer over the same function, returning the
//! downstream's response or a [`Failed`], for use and tests as a tower
//! stack. Steps reject with a reason instead of queueing, and never panic.

pub mod attempt;
pub mod breaker;
pub mod bulkhead;
pub mod eject;
pub mod hedge;
pub mod retry;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;

use crate::{deadline::Deadline, error::Reason};

/// How a downstream call failed, as the engine needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The downstream does not know the entity.
    NotFound,
    /// The call failed; the reason says how.
    Failed(Reason),
}

/// One downstream call as it travels down the stack.
#[derive(Clone, Debug)]
pub struct Call<M> {
    /// The request message (cloned for retries and hedges).
    pub message: M,
    /// The caller's deadline; each attempt takes its budget from it.
    pub deadline: Deadline,
    /// 1 for the first attempt, 2 for the first retry, ...
    pub attempt: u32,
    /// Whether this copy is a hedge.
    pub hedge: bool,
    /// The endpoint the call's latest attempt went to, shared by its
    /// retries and hedges so each goes to another one when it can.
    pub tried: Tried,
}

impl<M> Call<M> {
    /// The first attempt of a call.
    pub fn new(message: M, deadline: Deadline) -> Call<M> {
        Call {
            message,
            deadline,
            attempt: 1,
            hedge: false,
            tried: Tried::default(),
        }
    }
}

/// The id of the endpoint a call's latest attempt went to (0: none yet).
/// The attempt layer hands it to the balancer in the request's extensions.
#[derive(Clone, Debug, Default)]
pub struct Tried(Arc<AtomicU64>);

impl Tried {
    /// The endpoint id to avoid, 0 if none.
    pub fn last(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Records the endpoint this attempt goes to.
    pub fn set(&self, endpoint: u64) {
        self.0.store(endpoint, Ordering::Relaxed);
    }
}

/// The balancer had no endpoint to send an attempt to: none resolved, or
/// every one ejected. The attempt fails at once with `NO_ENDPOINTS`.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("no endpoint of the downstream is available")]
pub struct NoEndpoints;

/// What the downstream asked about retrying, in `grpc-retry-pushback-ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushback {
    /// No pushback: retry with the normal backoff.
    None,
    /// Retry no sooner than this.
    After(Duration),
    /// A negative pushback: do not retry.
    Never,
}

/// A failed attempt or call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed {
    /// What the engine sees.
    pub error: CallError,
    /// Whether a retry may help (UNAVAILABLE before any response).
    pub retryable: bool,
    /// The downstream's retry pushback.
    pub pushback: Pushback,
}

impl Failed {
    /// A non-retryable failure for `reason`.
    pub fn because(reason: Reason) -> Failed {
        Failed {
            error: CallError::Failed(reason),
            retryable: false,
            pushback: Pushback::None,
        }
    }

    /// The failure's reason, if it is not NOT_FOUND.
    pub fn reason(&self) -> Option<Reason> {
        match self.error {
            CallError::Failed(r) => Some(r),
            CallError::NotFound => None,
        }
    }
}

/// The boxed future every layer returns.
pub type CallFuture<T> = BoxFuture<'static, Result<T, Failed>>;
