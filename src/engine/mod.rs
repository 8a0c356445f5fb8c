//! The fan-out engine: one place that turns "this entity, these components,
//! this deadline" into concurrent downstream calls and per-component outcomes.
//!
//! API adapters (`crate::api`) parse and validate requests, call the engine and
//! shape its version-neutral results into their contract. The engine decides
//! what is called, how failures of required and optional components end the
//! call, and nothing about wire formats of bfb's own API.
//!
//! Failure rules: a component the answer needs (a required one, or any under
//! [`Completeness::All`]) fails the whole call at once and cancels the calls
//! still in flight; an optional one is reported as [`Outcome::Failed`] and the
//! rest of the answer is kept.
//!
//! Whether the entity exists is decided by the component that owns it (the
//! profile owns a customer): its NOT_FOUND is the call's NOT_FOUND. Another
//! component's NOT_FOUND, when the owner was asked too, only means that
//! component has nothing for the entity: it fails with reason `NOT_FOUND`
//! like any other failure (reported in its status when optional). When the
//! owner was not asked, or the aggregate has no owner (a user's activity),
//! any component's NOT_FOUND is the entity's.

pub mod activity;
pub mod customer;

use std::{future::Future, sync::Arc};

use futures::{FutureExt, future::Either};

use crate::{
    cache::{Cache, Key, Policy, Source},
    component::{Component, ComponentSet},
    config::Config,
    downstream::{Downstream, Downstreams, EndpointError, Loaders, loader::Loader},
    error::{Error, Reason},
    resilience::CallError,
    telemetry::{metrics::Metrics, rpc::record_aggregate},
};

pub use self::{activity::ActivityParts, customer::CustomerParts};
pub use crate::deadline::Deadline;

/// What one component of an answer came to.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Not requested, so not fetched.
    Skipped,
    /// Fetched (live or from the cache, as the source says).
    Ok(T, Source),
    /// An optional component that could not be fetched.
    Failed(Reason),
}

impl<T> Outcome<T> {
    /// The data, if fetched.
    pub fn ok(self) -> Option<T> {
        match self {
            Outcome::Ok(v, _) => Some(v),
            _ => None,
        }
    }

    /// The data, if fetched, by reference.
    pub fn as_ok(&self) -> Option<&T> {
        match self {
            Outcome::Ok(v, _) => Some(v),
            _ => None,
        }
    }

    /// The outcome without its data, for status reporting.
    pub fn state(&self) -> OutcomeState {
        match self {
            Outcome::Skipped => OutcomeState::Skipped,
            Outcome::Ok(_, source) => OutcomeState::Ok(*source),
            Outcome::Failed(r) => OutcomeState::Failed(*r),
        }
    }
}

/// An [`Outcome`] without its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeState {
    /// Not requested.
    Skipped,
    /// Fetched, from this source.
    Ok(Source),
    /// Failed, optional.
    Failed(Reason),
}

/// What a caller asks of an aggregate, besides which entity.
#[derive(Clone, Copy, Debug)]
pub struct Ask {
    /// The components it gets (read mask, narrowed by authorization).
    pub requested: ComponentSet,
    /// How complete the answer must be.
    pub completeness: Completeness,
    /// How the cache may be used.
    pub policy: Policy,
}

/// How complete an answer the caller accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completeness {
    /// Optional components may fail; required ones may not.
    BestEffort,
    /// Every requested component must be fetched.
    All,
}

/// The shared core behind every API version.
pub struct Engine {
    downstreams: Downstreams,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    deadlines: crate::config::Deadlines,
    customer_required: ComponentSet,
    activity_required: ComponentSet,
    batching: crate::config::BatchSettings,
}

impl Engine {
    /// Builds the engine and its downstream clients from a validated config.
    pub fn new(config: &Config, metrics: &Arc<Metrics>) -> Result<Engine, EndpointError> {
        Ok(Engine {
            downstreams: Downstreams::connect_lazy(config, metrics)?,
            cache: Cache::new(&config.cache, &config.deadlines, metrics.clone()),
            metrics: metrics.clone(),
            deadlines: config.deadlines.clone(),
            customer_required: config.aggregates.customer.required,
            activity_required: config.aggregates.activity.required,
            batching: config.batch.clone(),
        })
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The downstream clients (the admin API lists their endpoints).
    pub fn downstreams(&self) -> &Downstreams {
        &self.downstreams
    }

    /// The component cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Loaders that batch one request's downstream lookups (batch and
    /// streaming RPCs), under that request's `deadline`.
    pub fn loaders(&self, deadline: Deadline) -> Loaders {
        self.downstreams.loaders(deadline, &self.batching)
    }

    /// The batching settings.
    pub fn batching(&self) -> &crate::config::BatchSettings {
        &self.batching
    }

    /// One component of `job`: skipped unless requested; else the
    /// downstream's answer to `message()` (through the cache and the job's
    /// loader), `shape`d, with the failure rules applied ([`fetch`]).
    ///
    /// Not an `async fn` (see [`fetch`]).
    fn part<M, T, R>(
        &self,
        job: &Job<'_>,
        component: Component,
        downstream: (&Downstream<M, T>, LoaderOf<M, T>),
        message: impl FnOnce() -> M,
        shape: impl FnOnce(T) -> Result<R, CallError>,
    ) -> impl Future<Output = Result<Outcome<R>, Error>>
    where
        M: Clone + Send + Sync + 'static,
        T: prost::Message + Default + Send + 'static,
    {
        fetch(
            component,
            job.requested,
            job.needed,
            job.entity,
            move || {
                self.cached(job, component, downstream, message())
                    .map(move |answer| {
                        let (answer, source) = answer?;
                        Ok((shape(answer)?, source))
                    })
            },
        )
    }

    /// One component's downstream answer, through the cache when the
    /// component is cached. Not an `async fn` (see [`fetch`]).
    fn cached<M, T>(
        &self,
        job: &Job<'_>,
        component: Component,
        (downstream, loader_of): (&Downstream<M, T>, LoaderOf<M, T>),
        message: M,
    ) -> impl Future<Output = Result<(T, Source), CallError>>
    where
        M: Clone + Send + Sync + 'static,
        T: prost::Message + Default + Send + 'static,
    {
        // Live data comes from the request's loader (batched with its other
        // lookups) when it has one, else from a single call.
        let (ds, loader) = (downstream.clone(), job.loaders.map(loader_of).cloned());
        let live = move |d: Deadline| match &loader {
            Some(l) => Either::Left(l.load(message.clone())),
            None => {
                let (ds, m) = (ds.clone(), message.clone());
                Either::Right(async move { ds.call(d, m).await })
            }
        };
        if !self.cache.enabled(component) {
            let answer = live(job.deadline);
            return Either::Left(answer.map(|r| r.map(|v| (v, Source::Live))));
        }
        let key = Key {
            component,
            scope: job.scope,
            id: job.entity.id,
            window: job.window,
        };
        let needed = job.needed.contains(component);
        // Boxed: the cache's path (in-process and Redis lookups, coalescing)
        // would otherwise make every component's future, cached or not, as
        // large as its biggest await (`api::customer_v1::future_sizes`).
        Either::Right(Box::pin(self.cache.fetch(
            key,
            job.policy,
            needed,
            job.deadline,
            live,
        )))
    }

    /// Records what one aggregate came to, from its typed outcomes (not from
    /// the answer's wire form): components fetched and those degraded.
    fn record(&self, states: &[(Component, OutcomeState); 4]) {
        let fetched = states
            .iter()
            .filter(|(_, s)| !matches!(s, OutcomeState::Skipped))
            .count();
        let mut degraded = [("", ""); 4];
        let mut n = 0;
        for &(component, state) in states {
            let reason = match state {
                OutcomeState::Failed(r) | OutcomeState::Ok(Source::Fallback { reason: r, .. }) => r,
                _ => continue,
            };
            degraded[n] = (component.name(), reason.code());
            n += 1;
        }
        record_aggregate(&self.metrics, fetched, &degraded[..n]);
    }

    /// The deadline of a call with these headers that arrived at `arrival`
    /// (now, if unknown).
    pub fn deadline(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        arrival: Option<tokio::time::Instant>,
    ) -> Deadline {
        let arrived = arrival.unwrap_or_else(tokio::time::Instant::now);
        Deadline::from_metadata(metadata, &self.deadlines, arrived)
    }
}

/// Which of the requested components the answer cannot do without.
fn needed(
    requested: ComponentSet,
    configured: ComponentSet,
    completeness: Completeness,
) -> ComponentSet {
    match completeness {
        Completeness::All => requested,
        Completeness::BestEffort => configured.intersect(requested),
    }
}

/// Picks a downstream's loader out of a request's [`Loaders`].
type LoaderOf<M, T> = fn(&Loaders) -> &Loader<M, T>;

/// One aggregate request as the engine works on it: which entity, for whom,
/// what is asked and needed, until when, and how lookups are batched.
#[derive(Clone, Copy)]
struct Job<'a> {
    entity: Entity<'a>,
    /// The caller's cache scope.
    scope: &'a str,
    /// The time window (activity), part of cache keys.
    window: Option<(Option<i64>, Option<i64>)>,
    requested: ComponentSet,
    needed: ComponentSet,
    policy: Policy,
    deadline: Deadline,
    /// The request's loaders, when it batches its lookups.
    loaders: Option<&'a Loaders>,
}

/// The entity an aggregate is about.
#[derive(Clone, Copy, Debug)]
struct Entity<'a> {
    /// `customer` or `user`.
    kind: &'static str,
    id: &'a str,
    /// The component whose NOT_FOUND says the entity does not exist.
    owner: Option<Component>,
}

/// Fetches one component if it was requested, applying the failure rules.
/// `Err` ends the whole call (and, inside `try_join!`, cancels its siblings).
///
/// Not an `async fn`: every component of every aggregate in flight is in
/// this future, and an `async fn` would keep `call` and the entity beside
/// the call's own future.
fn fetch<'a, T, C, Fut>(
    component: Component,
    requested: ComponentSet,
    needed: ComponentSet,
    entity: Entity<'a>,
    call: C,
) -> impl Future<Output = Result<Outcome<T>, Error>> + use<'a, T, C, Fut>
where
    C: FnOnce() -> Fut,
    Fut: Future<Output = Result<(T, Source), CallError>>,
{
    if !requested.contains(component) {
        return Either::Left(std::future::ready(Ok(Outcome::Skipped)));
    }
    let speaks_for_entity = entity
        .owner
        .is_none_or(|owner| owner == component || !requested.contains(owner));
    Either::Right(call().map(move |answer| match answer {
        Ok((v, source)) => Ok(Outcome::Ok(v, source)),
        Err(CallError::NotFound) if speaks_for_entity => Err(Error::NotFound {
            kind: entity.kind,
            id: entity.id.to_string(),
        }),
        Err(CallError::NotFound) if needed.contains(component) => Err(Error::Component {
            component,
            reason: Reason::NotFound,
        }),
        Err(CallError::NotFound) => Ok(Outcome::Failed(Reason::NotFound)),
        Err(CallError::Failed(reason)) if needed.contains(component) => {
            Err(Error::Component { component, reason })
        }
        Err(CallError::Failed(reason)) => Ok(Outcome::Failed(reason)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL4: [Component; 4] = Component::CUSTOMER;

    #[test]
    fn completeness_all_needs_every_requested_component() {
        let requested = ComponentSet::of(&[Component::Profile, Component::Orders]);
        let configured = ComponentSet::of(&[Component::Profile, Component::Reviews]);
        assert_eq!(needed(requested, configured, Completeness::All), requested);
        assert_eq!(
            needed(requested, configured, Completeness::BestEffort),
            ComponentSet::of(&[Component::Profile])
        );
        assert_eq!(
            needed(
                ComponentSet::of(&ALL4),
                ComponentSet::EMPTY,
                Completeness::BestEffort
            ),
            ComponentSet::EMPTY
        );
    }

    #[tokio::test]
    async fn fetch_applies_the_failure_rules() {
        let req = ComponentSet::of(&ALL4);
        let needed = ComponentSet::of(&[Component::Profile]);
        let entity = Entity {
            kind: "customer",
            id: "c-1",
            owner: Some(Component::Profile),
        };
        let failing = || async { Err::<(u8, Source), _>(CallError::Failed(Reason::Unavailable)) };

        let skipped = fetch(Component::Calls, req, needed, entity, failing).await;
        assert!(matches!(skipped, Ok(Outcome::Skipped)));

        let optional = fetch(Component::Orders, req, needed, entity, failing).await;
        assert!(matches!(optional, Ok(Outcome::Failed(Reason::Unavailable))));

        let required = fetch(Component::Profile, req, needed, entity, failing).await;
        assert!(matches!(
            required,
            Err(Error::Component {
                component: Component::Profile,
                reason: Reason::Unavailable
            })
        ));

        let not_found = || async { Err::<(u8, Source), _>(CallError::NotFound) };
        let missing = fetch(Component::Profile, req, needed, entity, not_found).await;
        assert!(matches!(
            missing,
            Err(Error::NotFound {
                kind: "customer",
                ..
            })
        ));
        // The profile (owner) was asked: orders' NOT_FOUND is orders' own.
        let empty = fetch(Component::Orders, req, needed, entity, not_found).await;
        assert!(matches!(empty, Ok(Outcome::Failed(Reason::NotFound))));
        let all = fetch(Component::Orders, req, req, entity, not_found).await;
        assert!(matches!(
            all,
            Err(Error::Component {
                component: Component::Orders,
                reason: Reason::NotFound
            })
        ));
        // Without the owner, nothing else tells: the customer is missing.
        let orders_only = ComponentSet::of(&[Component::Orders]);
        let alone = fetch(Component::Orders, orders_only, needed, entity, not_found).await;
        assert!(matches!(alone, Err(Error::NotFound { .. })));

        let ok = fetch(Component::Orders, req, needed, entity, || async {
            Ok((7u8, Source::Live))
        })
        .await;
        assert!(matches!(ok, Ok(Outcome::Ok(7, Source::Live))));
    }
}
