//! The component cache: one place that caches downstream answers, per
//! component and key, so different read masks and API versions share
//! entries.
//!
//! - **Tier**: in-process, bounded by the encoded size of its entries
//!   (`moka`). Values are the downstream's answer encoded as protobuf, so a
//!   shared tier can store the same bytes.
//! - **Freshness** is computed from each entry's write time on tokio's clock:
//!   fresh for `ttl` (± jitter); then served at once with one background
//!   refresh for `stale_while_revalidate`; then, up to `stale_ttl` after
//!   `ttl`, kept only as a fallback; then gone. (The two stale windows are
//!   separate, as in HTTP's Cache-Control: with one, every stale entry would
//!   be served by revalidation and stale-if-error could never apply.)
//! - **Coalescing**: concurrent misses for one key make one downstream call
//!   ([`singleflight`]); errors are never cached.
//! - **Stale-while-revalidate**: an entry in that window is served at once
//!   and one background refresh runs.
//! - **Stale-if-error**: when the live call fails (unavailable, timeout,
//!   breaker open, bulkhead full, downstream error), a kept entry is served as
//!   FALLBACK with its age (optional components; required ones only if
//!   `cache.allow_stale_required`).
//! - **Caller control**: `FRESH` bypasses cached reads (no fallback either);
//!   `max_staleness` bounds the age of anything served, fallback included.
//! - **Invalidation**: [`Cache::invalidate`] drops an entity's entries in
//!   both tiers and publishes the invalidation; every replica subscribes and
//!   drops its in-process entries.

mod key;
pub mod shared;
pub mod singleflight;
pub mod topology;

use std::{
    collections::HashSet,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use rand::Rng;
use tokio::time::Instant;

use crate::{
    component::Component,
    config::{CacheSettings, ComponentCache, Deadlines},
    deadline::Deadline,
    error::Reason,
    resilience::CallError,
    telemetry::{
        metrics::{CacheLabels, Metrics},
        rpc::RequestContext,
    },
};

pub use self::key::Key;
use self::{shared::SharedTier, singleflight::SingleFlight};

/// How the caller wants the cache used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Bypass cached reads (the answer is still stored).
    pub fresh: bool,
    /// Serve nothing older than this.
    pub max_staleness: Option<Duration>,
}

/// Where a component's data came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The downstream, during this call.
    Live,
    /// The cache, `age` old (fresh, or stale within `stale_ttl`).
    Cache {
        /// Time since the entry was written.
        age: Duration,
    },
    /// The cache, because the live call failed with `reason`.
    Fallback {
        /// Time since the entry was written.
        age: Duration,
        /// Why the live call failed.
        reason: Reason,
    },
}

/// One cached answer.
#[derive(Clone, Debug)]
struct Entry {
    bytes: Bytes,
    written: Instant,
    ttl: Duration,
    revalidate: Duration,
    stale_ttl: Duration,
}

impl Entry {
    fn age(&self) -> Duration {
        self.written.elapsed()
    }
}

/// The component cache.
pub struct Cache {
    store: moka::future::Cache<String, Entry>,
    settings: [ComponentCache; 8],
    jitter: f64,
    allow_stale_required: bool,
    refresh: Deadlines,
    refresh_timeout: Duration,
    flights: SingleFlight<Result<Bytes, CallError>>,
    refreshing: Mutex<HashSet<String>>,
    shared: Option<SharedTier>,
    metrics: Arc<Metrics>,
}

struct Expiry;

impl moka::Expiry<String, Entry> for Expiry {
    fn expire_after_create(
        &self,
        _: &String,
        e: &Entry,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(e.ttl + e.stale_ttl)
    }
    fn expire_after_update(
        &self,
        _: &String,
        e: &Entry,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(e.ttl + e.stale_ttl)
    }
}

impl Cache {
    /// A cache per `settings`. With `cache.redis_*`, the shared tier
    /// connects in the background and the cache subscribes to invalidations
    /// from other replicas (this needs a tokio runtime).
    pub fn new(
        settings: &CacheSettings,
        deadlines: &Deadlines,
        metrics: Arc<Metrics>,
    ) -> Arc<Cache> {
        let shared = settings
            .redis()
            .map(|topology| SharedTier::start(topology, settings.redis_timeout, metrics.clone()));
        let store = moka::future::Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|k: &String, e: &Entry| {
                u32::try_from(k.len() + e.bytes.len() + 64).unwrap_or(u32::MAX)
            })
            .expire_after(Expiry)
            .build();
        let cache = Arc::new(Cache {
            store,
            settings: Component::ALL.map(|c| settings.component(c)),
            jitter: settings.jitter,
            allow_stale_required: settings.allow_stale_required,
            refresh: deadlines.clone(),
            refresh_timeout: settings.refresh_timeout,
            flights: SingleFlight::default(),
            refreshing: Mutex::new(HashSet::new()),
            shared,
            metrics,
        });
        if let Some(shared) = &cache.shared {
            let weak = Arc::downgrade(&cache);
            shared.subscribe(move |payload| {
                let Some(cache) = weak.upgrade() else { return };
                tokio::spawn(async move {
                    let (id, components) = payload.split_once('|').unwrap_or((&payload, ""));
                    let components: Vec<Component> = components
                        .split(',')
                        .filter_map(Component::from_name)
                        .collect();
                    let dropped = cache.drop_local(id, &components).await;
                    tracing::debug!(dropped, "invalidated by another replica");
                });
            });
        }
        cache
    }

    /// Drops this replica's entries of `id`; returns how many.
    async fn drop_local(&self, id: &str, components: &[Component]) -> u64 {
        let doomed: Vec<Arc<String>> = self
            .store
            .iter()
            .filter(|(k, _)| key::belongs_to(k, id, components))
            .map(|(k, _)| k)
            .collect();
        for k in &doomed {
            self.store.invalidate(k.as_str()).await;
        }
        doomed.len() as u64
    }

    /// Drops every entry of entity `id` (only `components`, if any) here and
    /// in the shared tier, and tells the other replicas. Returns (local
    /// entries, shared entries, broadcast).
    pub async fn invalidate(&self, id: &str, components: &[Component]) -> (u64, u64, bool) {
        let local = self.drop_local(id, components).await;
        let (shared, broadcast) = match &self.shared {
            Some(shared) => {
                let names: Vec<&str> = components.iter().map(|c| c.name()).collect();
                let payload = format!("{id}|{}", names.join(","));
                shared
                    .invalidate(
                        &key::pattern(id),
                        |k| key::belongs_to(k, id, components),
                        &payload,
                    )
                    .await
            }
            None => (0, false),
        };
        (local, shared, broadcast)
    }

    /// Whether `component` is cached.
    pub fn enabled(&self, component: Component) -> bool {
        self.settings[component.index()].enabled
    }

    /// Entries and their weight, after pending evictions ran.
    pub async fn usage(&self) -> (u64, u64) {
        self.store.run_pending_tasks().await;
        (self.store.entry_count(), self.store.weighted_size())
    }

    fn count(&self, component: Component, result: &'static str) -> Counter {
        self.metrics
            .cache_requests
            .get_or_create(&CacheLabels {
                component: component.name(),
                result,
            })
            .clone()
    }

    async fn store(&self, component: Component, key: String, bytes: Bytes) {
        let s = self.settings[component.index()];
        let factor = 1.0 + rand::rng().random_range(-self.jitter..=self.jitter);
        let entry = Entry {
            bytes,
            written: Instant::now(),
            ttl: s.ttl.mul_f64(factor),
            revalidate: s.stale_while_revalidate,
            stale_ttl: s.stale_ttl,
        };
        if let Some(shared) = &self.shared {
            shared.put(key.clone(), &entry);
        }
        self.store.insert(key, entry).await;
    }

    /// The answer of `live` for `key`, through the cache. `live` is called
    /// with the caller's deadline, or with a detached one for a background
    /// refresh. `required` says whether the component is one the answer
    /// cannot do without (stale fallback then needs `allow_stale_required`).
    pub async fn fetch<T, L, Fut>(
        self: &Arc<Self>,
        key: Key<'_>,
        policy: Policy,
        required: bool,
        deadline: Deadline,
        live: L,
    ) -> Result<(T, Source), CallError>
    where
        T: prost::Message + Default + 'static,
        L: Fn(Deadline) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, CallError>> + Send + 'static,
    {
        let component = key.component;
        if !self.enabled(component) {
            return live(deadline).await.map(|v| (v, Source::Live));
        }
        let key = key.render();
        // What the caller may be served at all: not FRESH, within
        // max_staleness, and not past the entry's stale_ttl.
        let cached = if policy.fresh {
            None
        } else {
            let mut found = self.store.get(&key).await;
            if found.is_none()
                && let Some(shared) = &self.shared
                && let Some(e) = shared.get(&key).await
            {
                // Another replica's entry: keep it here too.
                self.store.insert(key.clone(), e.clone()).await;
                found = Some(e);
            }
            found.filter(|e| {
                let age = e.age();
                age < e.ttl + e.stale_ttl && policy.max_staleness.is_none_or(|m| age <= m)
            })
        };
        if let Some(entry) = &cached
            && entry.age() < entry.ttl + entry.revalidate
            && let Ok(value) = T::decode(entry.bytes.clone())
        {
            let age = entry.age();
            if age >= entry.ttl {
                self.count(component, "stale").inc();
                self.revalidate(component, key, live);
            } else {
                self.count(component, "hit").inc();
            }
            return Ok((value, Source::Cache { age }));
        }
        self.count(component, if policy.fresh { "bypass" } else { "miss" })
            .inc();

        // FRESH callers coalesce among themselves only: they asked not to
        // share an answer that may have started before them with others.
        let flight_key = if policy.fresh {
            format!("{key}|fresh")
        } else {
            key.clone()
        };
        // The leader re-checks the in-process tier for a fresh entry (stored
        // since this caller looked, by a flight that finished in between or
        // from another replica through Redis), and stores its own answer
        // before its flight ends: no caller falls between two flights and
        // calls the downstream again.
        let this = self.clone();
        let store_key = key.clone();
        let (result, _leader) = self
            .flights
            .run(&flight_key, || {
                let call = live(deadline);
                async move {
                    if !policy.fresh
                        && let Some(e) = this.store.get(&store_key).await
                        && e.age() < e.ttl
                        && policy.max_staleness.is_none_or(|m| e.age() <= m)
                    {
                        return Ok(e.bytes);
                    }
                    let bytes = call.await.map(|v| Bytes::from(v.encode_to_vec()))?;
                    this.store(component, store_key, bytes.clone()).await;
                    Ok(bytes)
                }
            })
            .await;
        match result {
            Ok(bytes) => {
                let value = T::decode(bytes).map_err(|_| CallError::Failed(Reason::BadResponse))?;
                Ok((value, Source::Live))
            }
            Err(error) => {
                let fallback_ok = !required || self.allow_stale_required;
                let reason = match error {
                    CallError::Failed(r) if fallback_ok && r != Reason::DownstreamRejected => r,
                    _ => return Err(error),
                };
                let Some(entry) = cached else {
                    return Err(error);
                };
                let Ok(value) = T::decode(entry.bytes.clone()) else {
                    return Err(error);
                };
                self.count(component, "fallback").inc();
                Ok((
                    value,
                    Source::Fallback {
                        age: entry.age(),
                        reason,
                    },
                ))
            }
        }
    }

    /// Starts one background refresh of `key` unless one is running.
    fn revalidate<T, L, Fut>(self: &Arc<Self>, component: Component, key: String, live: L)
    where
        T: prost::Message + Default + 'static,
        L: Fn(Deadline) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, CallError>> + Send + 'static,
    {
        if !self
            .refreshing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let cache = self.clone();
        let deadline = Deadline::detached(self.refresh_timeout, &self.refresh);
        // The refresh runs for the caller that found the entry stale: its
        // request id and identity go downstream as on any call.
        let refresh = RequestContext::carry(live(deadline));
        tokio::spawn(async move {
            let fetched = refresh.await;
            if let Ok(v) = fetched {
                cache
                    .store(component, key.clone(), Bytes::from(v.encode_to_vec()))
                    .await;
            }
            cache
                .refreshing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        });
    }
}

#[cfg(test)]
mod tests;
