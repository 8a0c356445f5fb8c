//! bfb's public gRPC API: one thin adapter per contract version over the
//! shared [`Engine`](crate::engine::Engine).
//!
//! An adapter validates the request (every problem becomes a field violation
//! before anything is called), hands the engine plain values, and shapes the
//! engine's version-neutral result into its contract's messages.

pub mod activity_v1;
pub mod admin_v1;
pub mod customer_v1;
pub mod customer_v2;

use std::{collections::HashMap, future::Future, sync::Arc};

use futures::future::Either;
use prost_types::Timestamp;
use tonic::{Request, Response, Status};
use tonic_types::FieldViolation;

use crate::{
    auth::Caller,
    cache::{Policy, Source},
    component::{Component, ComponentSet},
    engine::{Ask, Completeness, CustomerParts, Deadline, Engine, OutcomeState},
    error::{Denied, Error},
    inbound::Arrival,
    pb::bfb::common::v1::{
        AggregateStatus, CachePolicy as PbCachePolicy, Completeness as PbCompleteness,
        ComponentState, ComponentStatus, DataSource,
    },
    telemetry::rpc::observe,
};

/// The `method` label of every aggregate RPC (what [`handle`] is given):
/// metrics export each at zero from the start.
pub const METHODS: [&str; 6] = [
    "GetCustomer",
    "BatchGetCustomers",
    "v2.GetCustomer",
    "v2.BatchGetCustomers",
    "GetUserActivity",
    "StreamUserActivity",
];

/// Longest accepted entity id.
pub const MAX_ID_LEN: usize = 64;

/// Checks an entity id: 1 to [`MAX_ID_LEN`] characters of `[A-Za-z0-9._:-]`.
pub fn check_id(field: &str, id: &str, violations: &mut Vec<FieldViolation>) {
    let problem = if id.is_empty() {
        "must not be empty"
    } else if id.len() > MAX_ID_LEN {
        "must be at most 64 characters"
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        "may contain only letters, digits and . _ : -"
    } else {
        return;
    };
    violations.push(FieldViolation::new(field, problem));
}

/// Checks the ids of a batch: 1 to `max`, each a valid id (violations name
/// `field[i]`).
pub fn check_ids(field: &str, ids: &[String], max: usize, violations: &mut Vec<FieldViolation>) {
    if ids.is_empty() {
        violations.push(FieldViolation::new(field, "must name at least one id"));
    } else if ids.len() > max {
        violations.push(FieldViolation::new(
            field,
            format!("at most {max} ids per call; split the batch"),
        ));
    }
    for (i, id) in ids.iter().enumerate().take(max) {
        check_id(&format!("{field}[{i}]"), id, violations);
    }
}

/// What every version's BatchGetCustomers does before shaping: checks the
/// ids and options (adding to `violations`, which may already hold the
/// version's own problems), authorizes the components, and fetches every
/// customer, one result per id.
pub async fn fetch_customers(
    engine: &Engine,
    call: &Rpc,
    ids: &[String],
    read_mask: Option<&prost_types::FieldMask>,
    (completeness, cache): (i32, Option<&PbCachePolicy>),
    mut violations: Vec<FieldViolation>,
) -> Result<Vec<Result<CustomerParts, Error>>, Error> {
    check_ids(
        "customer_ids",
        ids,
        engine.batching().max_ids,
        &mut violations,
    );
    let c = check_options(
        read_mask,
        &Component::CUSTOMER,
        completeness,
        cache,
        &mut violations,
    );
    let ask = c.ask(violations, &call.caller)?;
    Ok(engine
        .customers((call.caller.scope(), ids), ask, call.deadline)
        .await)
}

/// One result per id of a batch, in order: `ok` shapes a fetched customer;
/// `err` carries a failed one's error as a `google.rpc.Status`, exactly as a
/// single call would send it.
pub fn batch_results<R>(
    ids: Vec<String>,
    answers: Vec<Result<CustomerParts, Error>>,
    mut ok: impl FnMut(String, CustomerParts) -> R,
    err: impl Fn(String, tonic_types::pb::Status) -> R,
) -> Vec<R> {
    ids.into_iter()
        .zip(answers)
        .map(|(id, answer)| match answer {
            Ok(parts) => ok(id, parts),
            Err(e) => err(id, rpc_status(e)),
        })
        .collect()
}

/// What every version's GetCustomer does before shaping: checks the id and
/// options (adding to `violations`, which may already hold the version's own
/// problems), authorizes the components, and fetches the customer.
pub async fn fetch_customer(
    engine: &Engine,
    call: &Rpc,
    id: &str,
    read_mask: Option<&prost_types::FieldMask>,
    (completeness, cache): (i32, Option<&PbCachePolicy>),
    mut violations: Vec<FieldViolation>,
) -> Result<CustomerParts, Error> {
    let c = check_common(
        "customer_id",
        id,
        read_mask,
        &Component::CUSTOMER,
        completeness,
        cache,
        &mut violations,
    );
    let ask = c.ask(violations, &call.caller)?;
    engine
        .customer((call.caller.scope(), id), ask, call.deadline, None)
        .await
}

/// An error as a `google.rpc.Status` message, details included: the error of
/// one item of a batch or stream, exactly as a single call would send it.
pub fn rpc_status(error: Error) -> tonic_types::pb::Status {
    let status = Status::from(error);
    prost::Message::decode(status.details()).unwrap_or_else(|_| tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: Vec::new(),
    })
}

/// Reads the `completeness` enum; unknown values are a violation.
pub fn check_completeness(value: i32, violations: &mut Vec<FieldViolation>) -> Completeness {
    match PbCompleteness::try_from(value) {
        Ok(PbCompleteness::All) => Completeness::All,
        Ok(PbCompleteness::Unspecified | PbCompleteness::BestEffort) => Completeness::BestEffort,
        Err(_) => {
            violations.push(FieldViolation::new(
                "completeness",
                format!("unknown value {value}; use COMPLETENESS_BEST_EFFORT or COMPLETENESS_ALL"),
            ));
            Completeness::BestEffort
        }
    }
}

/// What a handler knows about its call besides the request message.
pub struct Rpc {
    /// The caller's deadline.
    pub deadline: Deadline,
    /// Who is calling (from the auth layer).
    pub caller: Arc<Caller>,
}

/// Runs one aggregate RPC: the caller (put there by the auth layer; none
/// means the layer did not run, and the call is refused), its deadline from
/// the arrival stamp and headers, then `handler` inside the per-RPC span, log
/// line and metrics ([`observe`]; the engine records what each aggregate
/// came to).
///
/// Not an `async fn`: the request is taken apart and the handler's future
/// made before it returns, so the RPC's future (memory per call in flight)
/// holds neither the request nor its metadata beside the handler's.
pub fn handle<'e, Req, Resp, H, Fut>(
    engine: &'e Engine,
    method: &'static str,
    request: Request<Req>,
    handler: H,
) -> impl Future<Output = Result<Response<Resp>, Status>> + use<'e, Req, Resp, H, Fut>
where
    H: FnOnce(Req, Rpc) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    debug_assert!(
        METHODS.contains(&method),
        "{method} missing from api::METHODS"
    );
    let (metadata, extensions, req) = request.into_parts();
    let Some(caller) = extensions.get::<Arc<Caller>>().cloned() else {
        tracing::error!(method, "no caller on the request: refused");
        return Either::Left(std::future::ready(Err(Error::Unauthenticated.into())));
    };
    let arrival = extensions.get::<Arrival>().map(|a| a.0);
    let deadline = engine.deadline(&metadata, arrival);
    let who = (&caller.consumer.name, &caller.principal);
    let call = Rpc {
        deadline,
        caller: caller.clone(),
    };
    let answer = handler(req, call);
    Either::Right(observe(engine.metrics(), method, &metadata, who, answer))
}

/// The future of a handler written without `async_trait`'s `async` block,
/// as the generated service traits expect it: that block would keep the
/// request beside the future [`handle`] makes of it (memory per call).
pub type Boxed<'f, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send + 'f>>;

/// The checked fields every aggregate request has, in every version.
pub struct Common {
    /// Components named by the read mask (all when empty).
    pub requested: ComponentSet,
    /// Whether the read mask was empty ("everything the caller may read").
    pub mask_empty: bool,
    /// How complete the answer must be.
    pub completeness: Completeness,
    /// How the cache may be used.
    pub policy: Policy,
}

/// Checks the fields every aggregate request has: the entity id (as
/// `id_field`), the read mask against the aggregate's components,
/// completeness and the cache policy. Problems go to `violations`.
pub fn check_common(
    id_field: &str,
    id: &str,
    read_mask: Option<&prost_types::FieldMask>,
    aggregate: &[Component],
    completeness: i32,
    cache: Option<&PbCachePolicy>,
    violations: &mut Vec<FieldViolation>,
) -> Common {
    check_id(id_field, id, violations);
    check_options(read_mask, aggregate, completeness, cache, violations)
}

/// Checks the fields every aggregate request has besides its ids: the read
/// mask against the aggregate's components, completeness and cache policy.
pub fn check_options(
    read_mask: Option<&prost_types::FieldMask>,
    aggregate: &[Component],
    completeness: i32,
    cache: Option<&PbCachePolicy>,
    violations: &mut Vec<FieldViolation>,
) -> Common {
    let paths = read_mask.map_or(&[][..], |m| &m.paths[..]);
    Common {
        requested: ComponentSet::from_read_mask(paths, aggregate, "read_mask", violations),
        mask_empty: paths.is_empty(),
        completeness: check_completeness(completeness, violations),
        policy: check_cache_policy(cache, violations),
    }
}

impl Common {
    /// What a checked request asks of the engine: INVALID_ARGUMENT with
    /// every violation if there are any, else the authorized components
    /// ([`Common::authorize`]) with completeness and cache policy.
    pub fn ask(&self, violations: Vec<FieldViolation>, caller: &Caller) -> Result<Ask, Error> {
        if !violations.is_empty() {
            return Err(Error::InvalidArgument(violations));
        }
        Ok(Ask {
            requested: self.authorize(caller)?,
            completeness: self.completeness,
            policy: self.policy,
        })
    }

    /// The components of a valid request the caller gets: with an empty read
    /// mask, all it may read; otherwise exactly the requested ones, and
    /// asking for one it may not read is PERMISSION_DENIED naming it.
    pub fn authorize(&self, caller: &Caller) -> Result<ComponentSet, Error> {
        let allowed = caller.components();
        if self.mask_empty {
            return Ok(self.requested.intersect(allowed));
        }
        match Component::ALL
            .into_iter()
            .find(|&c| self.requested.contains(c) && !allowed.contains(c))
        {
            Some(denied) => Err(Error::PermissionDenied(Denied::Component(denied))),
            None => Ok(self.requested),
        }
    }
}

/// Reads the caller's cache policy; a negative or invalid `max_staleness`
/// is a violation.
pub fn check_cache_policy(
    policy: Option<&PbCachePolicy>,
    violations: &mut Vec<FieldViolation>,
) -> Policy {
    let Some(p) = policy else {
        return Policy::default();
    };
    let max_staleness = p
        .max_staleness
        .and_then(|d| match std::time::Duration::try_from(d) {
            Ok(d) => Some(d),
            Err(_) => {
                violations.push(FieldViolation::new(
                    "cache.max_staleness",
                    "must be a non-negative duration",
                ));
                None
            }
        });
    Policy {
        fresh: p.fresh,
        max_staleness,
    }
}

/// Checks that a timestamp is one protobuf allows (years 1 to 9999, nanos in
/// range).
pub fn check_timestamp(field: &str, ts: &Timestamp, violations: &mut Vec<FieldViolation>) {
    const MIN: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if !(MIN..=MAX).contains(&ts.seconds) || !(0..1_000_000_000).contains(&ts.nanos) {
        violations.push(FieldViolation::new(
            field,
            "must be a valid timestamp between years 1 and 9999",
        ));
    }
}

/// Builds the status of an answer from each component's outcome.
pub fn aggregate_status(outcomes: &[(Component, OutcomeState)]) -> AggregateStatus {
    let mut degraded = false;
    let components: HashMap<String, ComponentStatus> = outcomes
        .iter()
        .map(|&(component, outcome)| {
            let (state, reason, source, age) = match outcome {
                OutcomeState::Ok(Source::Live) => {
                    (ComponentState::Ok, "OK", DataSource::Live, None)
                }
                OutcomeState::Ok(Source::Cache { age }) => {
                    (ComponentState::Ok, "OK", DataSource::Cache, Some(age))
                }
                OutcomeState::Ok(Source::Fallback { age, reason }) => {
                    degraded = true;
                    (
                        ComponentState::Fallback,
                        reason.code(),
                        DataSource::Cache,
                        Some(age),
                    )
                }
                OutcomeState::Skipped => (
                    ComponentState::Skipped,
                    "NOT_REQUESTED",
                    DataSource::Unspecified,
                    None,
                ),
                OutcomeState::Failed(reason) => {
                    degraded = true;
                    (
                        ComponentState::Error,
                        reason.code(),
                        DataSource::Unspecified,
                        None,
                    )
                }
            };
            let status = ComponentStatus {
                state: state.into(),
                reason: reason.to_string(),
                source: source.into(),
                age: age.and_then(|a| prost_types::Duration::try_from(a).ok()),
            };
            (component.name().to_string(), status)
        })
        .collect();
    AggregateStatus {
        degraded,
        components,
    }
}

/// Orders timestamps newest first (`None` last).
pub fn newest_first(a: Option<&Timestamp>, b: Option<&Timestamp>) -> std::cmp::Ordering {
    let key = |t: Option<&Timestamp>| t.map(|t| (t.seconds, t.nanos));
    key(b).cmp(&key(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;

    #[test]
    fn ids_are_checked_for_length_and_charset() {
        let mut v = Vec::new();
        for ok in ["c-1", "u-10000", "A.b_c:d-9"] {
            check_id("id", ok, &mut v);
        }
        assert!(v.is_empty());
        for bad in ["", "c 1", "c/1", "ç-1", &"x".repeat(65)] {
            check_id("id", bad, &mut v);
        }
        assert_eq!(v.len(), 5);
    }

    #[test]
    fn status_marks_failed_components_as_degraded() {
        let s = aggregate_status(&[
            (Component::Profile, OutcomeState::Ok(Source::Live)),
            (Component::Orders, OutcomeState::Failed(Reason::Timeout)),
            (Component::Reviews, OutcomeState::Skipped),
        ]);
        assert!(s.degraded);
        assert_eq!(s.components["orders"].reason, "TIMEOUT");
        assert_eq!(s.components["orders"].state, ComponentState::Error as i32);
        assert_eq!(
            s.components["reviews"].state,
            ComponentState::Skipped as i32
        );
        assert_eq!(s.components["profile"].source, DataSource::Live as i32);
        assert!(
            !aggregate_status(&[(Component::Profile, OutcomeState::Ok(Source::Live))]).degraded
        );
        let age = std::time::Duration::from_secs(3);
        let s = aggregate_status(&[
            (
                Component::Favorites,
                OutcomeState::Ok(Source::Cache { age }),
            ),
            (
                Component::Orders,
                OutcomeState::Ok(Source::Fallback {
                    age,
                    reason: Reason::CircuitOpen,
                }),
            ),
        ]);
        assert!(s.degraded, "a fallback is degraded");
        assert_eq!(s.components["favorites"].source, DataSource::Cache as i32);
        assert_eq!(s.components["favorites"].state, ComponentState::Ok as i32);
        assert_eq!(
            s.components["orders"].state,
            ComponentState::Fallback as i32
        );
        assert_eq!(s.components["orders"].reason, "CIRCUIT_OPEN");
        assert_eq!(s.components["orders"].age.map(|a| a.seconds), Some(3));
    }
}
