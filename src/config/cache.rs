//! `[cache]`: the component cache and its per-component overrides.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::Problems;
use crate::component::{Component, names};

/// The in-process cache of component results (one downstream answer per
/// component and key). Off unless enabled: whether stale data is acceptable
/// is a per-deployment, per-component decision.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Default for every component.
    pub enabled: bool,
    /// Default time an entry is fresh.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Default time after `ttl` during which an entry is served at once while
    /// one background refresh runs (stale-while-revalidate).
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// Default time after `ttl` during which an entry may still be served
    /// as FALLBACK when the live call fails (stale-if-error); at least
    /// `stale_while_revalidate`.
    #[serde(with = "humantime_serde")]
    pub stale_ttl: Duration,
    /// TTLs vary by up to this fraction (±), so entries written together do
    /// not expire together.
    pub jitter: f64,
    /// Bound on the cache's size: bytes of encoded entries.
    pub max_bytes: u64,
    /// Whether a failed required component may be served stale (FALLBACK).
    pub allow_stale_required: bool,
    /// Time a background refresh may take.
    #[serde(with = "humantime_serde")]
    pub refresh_timeout: Duration,
    /// Shared tier on one Redis server: `redis://host:port`; unset (and no
    /// `redis_sentinel` or `redis_cluster`): in-process only.
    pub redis_url: Option<String>,
    /// Shared tier behind Redis Sentinel: the master's name and the
    /// sentinels; bfb follows failovers.
    pub redis_sentinel: Option<RedisSentinel>,
    /// Shared tier on a Redis Cluster: some of its nodes (`redis://...`);
    /// the rest are discovered.
    pub redis_cluster: Option<Vec<String>>,
    /// Longest a Redis call may take; past it bfb goes on without Redis.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// Per-component overrides, keyed by component name.
    pub components: BTreeMap<String, ComponentCacheSection>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            enabled: false,
            ttl: Duration::from_secs(30),
            stale_while_revalidate: Duration::from_secs(30),
            stale_ttl: Duration::from_secs(300),
            jitter: 0.1,
            max_bytes: 256 * 1024 * 1024,
            allow_stale_required: false,
            refresh_timeout: Duration::from_secs(2),
            redis_url: None,
            redis_sentinel: None,
            redis_cluster: None,
            redis_timeout: Duration::from_millis(20),
            components: BTreeMap::new(),
        }
    }
}

/// `cache.redis_sentinel`: where the sentinels are and which master they
/// watch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSentinel {
    /// The master's name in the sentinels' configuration.
    pub master: String,
    /// Sentinel addresses, `redis://host:26379`.
    pub sentinels: Vec<String>,
}

/// Which Redis the shared tier uses, from `cache.redis_*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTopology {
    /// One server.
    Single(String),
    /// A master found through sentinels.
    Sentinel(RedisSentinel),
    /// A cluster, from some of its nodes.
    Cluster(Vec<String>),
}

impl CacheSettings {
    /// The shared tier's Redis, if one is configured.
    pub fn redis(&self) -> Option<RedisTopology> {
        if let Some(url) = &self.redis_url {
            return Some(RedisTopology::Single(url.clone()));
        }
        if let Some(s) = &self.redis_sentinel {
            return Some(RedisTopology::Sentinel(s.clone()));
        }
        self.redis_cluster.clone().map(RedisTopology::Cluster)
    }
}

/// One component's cache overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentCacheSection {
    /// Overrides `cache.enabled`.
    pub enabled: Option<bool>,
    /// Overrides `cache.ttl`.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Overrides `cache.stale_while_revalidate`.
    #[serde(default, with = "humantime_serde")]
    pub stale_while_revalidate: Option<Duration>,
    /// Overrides `cache.stale_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub stale_ttl: Option<Duration>,
}

/// One component's resolved cache settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComponentCache {
    /// Whether results are cached.
    pub enabled: bool,
    /// Fresh for this long.
    pub ttl: Duration,
    /// Then served at once, refreshed in the background, for this long.
    pub stale_while_revalidate: Duration,
    /// Then (from `ttl`) kept for FALLBACK this long.
    pub stale_ttl: Duration,
}

impl CacheSettings {
    /// A component's settings with the defaults applied. The directory is
    /// never cached: its batched lookups rarely repeat.
    pub fn component(&self, c: Component) -> ComponentCache {
        let o = self.components.get(c.name()).cloned().unwrap_or_default();
        ComponentCache {
            enabled: c != Component::Directory && o.enabled.unwrap_or(self.enabled),
            ttl: o.ttl.unwrap_or(self.ttl),
            stale_while_revalidate: o
                .stale_while_revalidate
                .unwrap_or(self.stale_while_revalidate),
            stale_ttl: o.stale_ttl.unwrap_or(self.stale_ttl),
        }
    }
}

impl CacheSettings {
    /// Adds this section's problems.
    pub(super) fn check(&self, p: &mut Problems) {
        let c = self;
        if !(0.0..0.5).contains(&c.jitter) {
            p.add("cache.jitter", "must be at least 0 and below 0.5, e.g. 0.1");
        }
        if c.max_bytes < 1024 * 1024 {
            p.add("cache.max_bytes", "must be at least 1048576 (1 MiB)");
        }
        p.positive("cache.refresh_timeout", c.refresh_timeout);
        p.positive("cache.redis_timeout", c.redis_timeout);
        let set = [
            c.redis_url.is_some(),
            c.redis_sentinel.is_some(),
            c.redis_cluster.is_some(),
        ];
        if set.iter().filter(|s| **s).count() > 1 {
            p.add(
                "cache.redis_url",
                "set one of redis_url, redis_sentinel and redis_cluster",
            );
        }
        let mut url = |path: String, url: &str| {
            if redis::Client::open(url).is_err() {
                p.add(path, "not a Redis URL; use e.g. \"redis://127.0.0.1:6379\"");
            }
        };
        if let Some(u) = &c.redis_url {
            url("cache.redis_url".into(), u);
        }
        if let Some(s) = &c.redis_sentinel {
            for (i, u) in s.sentinels.iter().enumerate() {
                url(format!("cache.redis_sentinel.sentinels[{i}]"), u);
            }
        }
        if let Some(nodes) = &c.redis_cluster {
            for (i, u) in nodes.iter().enumerate() {
                url(format!("cache.redis_cluster[{i}]"), u);
            }
        }
        if c.redis_sentinel
            .as_ref()
            .is_some_and(|s| s.sentinels.is_empty() || s.master.is_empty())
        {
            p.add(
                "cache.redis_sentinel",
                "needs master and at least one of sentinels",
            );
        }
        if c.redis_cluster.as_ref().is_some_and(Vec::is_empty) {
            p.add("cache.redis_cluster", "needs at least one node");
        }
        for comp in Component::ALL {
            let cc = c.component(comp);
            if cc.stale_while_revalidate > cc.stale_ttl {
                let at = if c.components.contains_key(comp.name()) {
                    format!("cache.components.{comp}.stale_ttl")
                } else {
                    "cache.stale_ttl".to_string()
                };
                p.add(at, "must be at least stale_while_revalidate");
            }
        }
        for name in c.components.keys() {
            match Component::from_name(name) {
                Some(Component::Directory) => p.add(
                    format!("cache.components.{name}"),
                    "the directory is not cached",
                ),
                Some(comp) => p.positive(
                    format!("cache.components.{name}.ttl"),
                    c.component(comp).ttl,
                ),
                None => p.add(
                    format!("cache.components.{name}"),
                    format!(
                        "unknown component; expected one of: {}",
                        names(&Component::DATA)
                    ),
                ),
            }
        }
    }
}
