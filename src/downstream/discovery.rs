//! Where a downstream's endpoints come from: addresses in config, host
//! names resolved to every A/AAAA address, or SRV names (`dns+srv://NAME`)
//! giving targets and ports — re-resolved every `discovery.refresh`, and
//! early (at most every `discovery.min_interval`) when a connection is
//! refused.
//!
//! DNS answers are never cached by the resolver (hickory-resolver with its
//! cache off): when to ask again is bfb's decision, not a record's TTL.
//! When a name fails to resolve its last good addresses stay; an answer
//! with no records empties them only when it comes twice in a row, so one
//! flapping answer cannot drop every endpoint.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolveHosts, ResolverConfig},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::RData,
};
use tokio::{sync::Notify, time::Instant};

use super::balance::Pool;
use crate::{
    config::{DiscoverySettings, SRV_SCHEME},
    telemetry::metrics::{Metrics, ResolutionLabels},
};

/// One configured endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// An IP address: used as is.
    Static(SocketAddr),
    /// A host name: every A/AAAA address, on `port`.
    Host {
        /// The name.
        name: String,
        /// The configured port.
        port: u16,
    },
    /// An SRV name: every target's addresses, on the target's port.
    Srv {
        /// The name, e.g. `_grpc._tcp.orders.service.consul`.
        name: String,
    },
}

impl Source {
    /// The source of a validated endpoint URI (`None` if it is not one).
    pub fn parse(endpoint: &str) -> Option<Source> {
        let uri: http::Uri = endpoint.parse().ok()?;
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        if uri.scheme_str() == Some(SRV_SCHEME) {
            return Some(Source::Srv { name: host.into() });
        }
        let port = uri.port_u16()?;
        Some(match host.parse::<std::net::IpAddr>() {
            Ok(ip) => Source::Static((ip, port).into()),
            Err(_) => Source::Host {
                name: host.into(),
                port,
            },
        })
    }

    fn name(&self) -> Option<&str> {
        match self {
            Source::Static(_) => None,
            Source::Host { name, .. } | Source::Srv { name } => Some(name),
        }
    }
}

/// What one resolution of a name gave.
enum Answer {
    Addrs(Vec<SocketAddr>),
    /// The name exists with no records, or does not exist.
    Empty,
    /// The query failed or timed out.
    Failed(NetError),
}

/// The DNS resolver every pool shares.
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// The resolver `settings` name, or the system's, with caching off.
    pub fn new(settings: &DiscoverySettings) -> Result<Resolver, String> {
        let mut builder = match settings.resolver_addr() {
            Some(Ok(addr)) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            Some(Err(why)) => return Err(why),
            None => TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?,
        };
        let o = builder.options_mut();
        o.cache_size = 0;
        o.timeout = settings.timeout;
        o.attempts = 1;
        if settings.resolver.is_some() {
            // A configured server answers for every name.
            o.use_hosts_file = ResolveHosts::Never;
        }
        let inner = builder
            .build()
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(Resolver { inner })
    }

    async fn resolve(&self, source: &Source) -> Answer {
        match source {
            Source::Static(addr) => Answer::Addrs(vec![*addr]),
            Source::Host { name, port } => self.host(name, *port).await,
            Source::Srv { name } => {
                let records = match self.inner.srv_lookup(name.as_str()).await {
                    Ok(lookup) => lookup,
                    Err(e) => return failed(e),
                };
                let targets: Vec<(String, u16)> = records
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::SRV(srv) => Some((srv.target.to_ascii(), srv.port)),
                        _ => None,
                    })
                    .collect();
                let answers = futures::future::join_all(
                    targets
                        .iter()
                        .map(|(target, port)| self.host(target, *port)),
                )
                .await;
                let mut addrs = Vec::new();
                for a in answers {
                    match a {
                        Answer::Addrs(found) => addrs.extend(found),
                        Answer::Empty => {}
                        // One target failing fails the name: its last good
                        // set is kept whole rather than shrunk by a glitch.
                        Answer::Failed(e) => return Answer::Failed(e),
                    }
                }
                if addrs.is_empty() {
                    Answer::Empty
                } else {
                    Answer::Addrs(addrs)
                }
            }
        }
    }

    async fn host(&self, name: &str, port: u16) -> Answer {
        match self.inner.lookup_ip(name).await {
            Ok(ips) => {
                let addrs: Vec<SocketAddr> = ips.iter().map(|ip| (ip, port).into()).collect();
                if addrs.is_empty() {
                    Answer::Empty
                } else {
                    Answer::Addrs(addrs)
                }
            }
            Err(e) => failed(e),
        }
    }
}

fn failed(e: NetError) -> Answer {
    if e.is_no_records_found() || e.is_nx_domain() {
        Answer::Empty
    } else {
        Answer::Failed(e)
    }
}

/// One source's last good addresses.
struct Known {
    source: Source,
    addrs: Vec<SocketAddr>,
    /// Empty answers in a row.
    empty: u32,
}

/// Tells callers when a pool's first resolution is done, so a call made
/// at start waits for it (within its deadline) instead of failing with
/// `NO_ENDPOINTS`.
#[derive(Default)]
pub struct FirstResolution {
    done: AtomicBool,
    notify: Notify,
}

impl FirstResolution {
    /// Waits until the first resolution is done.
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        if !self.done.load(Ordering::Acquire) {
            notified.await;
        }
    }

    /// Whether it is done.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub(super) fn set(&self) {
        self.done.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// Fills `pool` from `sources` now if they are all addresses, and starts
/// its maintenance task: re-resolution of names and the closing of idle
/// extra connections. The task ends once the pool is dropped everywhere
/// else.
pub fn start(
    pool: Arc<Pool>,
    sources: Vec<Source>,
    resolver: Option<Arc<Resolver>>,
    settings: DiscoverySettings,
    metrics: Arc<Metrics>,
) {
    let mut known: Vec<Known> = sources
        .into_iter()
        .map(|source| Known {
            addrs: match &source {
                Source::Static(a) => vec![*a],
                _ => Vec::new(),
            },
            source,
            empty: 0,
        })
        .collect();
    let dynamic = known.iter().any(|k| k.source.name().is_some());
    if !dynamic {
        pool.update(&union(&known));
        pool.first.set();
    }
    tokio::spawn(async move {
        let mut last = None::<Instant>;
        loop {
            if dynamic && let Some(r) = &resolver {
                resolve_all(r, &mut known, &metrics).await;
                pool.update(&union(&known));
                pool.first.set();
                last = Some(Instant::now());
            }
            pool.shrink_idle();
            let refresh = tokio::time::sleep(settings.refresh);
            tokio::select! {
                () = refresh => {}
                () = pool.resolve_now.notified(), if dynamic => {
                    if let Some(at) = last {
                        tokio::time::sleep_until(at + settings.min_interval).await;
                    }
                }
            }
            // Only this task holds the pool: every downstream using it is gone.
            if Arc::strong_count(&pool) == 1 {
                return;
            }
        }
    });
}

async fn resolve_all(resolver: &Resolver, known: &mut [Known], metrics: &Metrics) {
    resolver.inner.clear_cache();
    for k in known.iter_mut() {
        let Some(name) = k.source.name() else {
            continue;
        };
        let answer = resolver.resolve(&k.source).await;
        let result = match answer {
            Answer::Addrs(mut addrs) => {
                addrs.sort();
                addrs.dedup();
                k.addrs = addrs;
                k.empty = 0;
                "ok"
            }
            Answer::Empty => {
                k.empty += 1;
                if k.empty >= 2 {
                    k.addrs.clear();
                } else {
                    tracing::warn!(
                        name,
                        "DNS answered no records; keeping the last endpoints until it says so twice"
                    );
                }
                "empty"
            }
            Answer::Failed(e) => {
                tracing::warn!(name, error = %e, "DNS resolution failed; keeping the last good endpoints");
                "error"
            }
        };
        metrics
            .dns_resolutions
            .get_or_create(&ResolutionLabels {
                name: name.to_string(),
                result,
            })
            .inc();
    }
}

fn union(known: &[Known]) -> Vec<SocketAddr> {
    let mut all: Vec<SocketAddr> = known.iter().flat_map(|k| k.addrs.iter().copied()).collect();
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_into_sources() {
        assert_eq!(
            Source::parse("http://10.0.0.1:50061"),
            Some(Source::Static("10.0.0.1:50061".parse().unwrap()))
        );
        assert_eq!(
            Source::parse("https://[::1]:443"),
            Some(Source::Static("[::1]:443".parse().unwrap()))
        );
        assert_eq!(
            Source::parse("http://orders.shop.svc.cluster.local:50061"),
            Some(Source::Host {
                name: "orders.shop.svc.cluster.local".into(),
                port: 50061
            })
        );
        assert_eq!(
            Source::parse("dns+srv://_grpc._tcp.orders.service.consul"),
            Some(Source::Srv {
                name: "_grpc._tcp.orders.service.consul".into()
            })
        );
    }
}
