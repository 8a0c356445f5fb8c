//! Which Redis the shared tier talks to: one server, the master a set of
//! Sentinels names, or a Cluster. [`Backend`] runs a command on whichever
//! it is, so the tier (`shared.rs`) does not know.
//!
//! - **Single**: the redis crate's `ConnectionManager` (reconnects by itself).
//! - **Sentinel**: a `ConnectionManager` to the current master, swapped when
//!   the sentinels name another one: checked every [`SENTINEL_POLL`], and at
//!   once when a call fails. Invalidations are received from the current
//!   master, resubscribed after a failover.
//! - **Cluster**: the redis crate's async `ClusterConnection` routes each
//!   key to its master and follows slot moves (MOVED, ASK). A call that
//!   fails (a master gone: timeouts, not MOVED) makes a fresh connection
//!   from the configured nodes, at most every [`SENTINEL_POLL`], which reads
//!   the slots anew after a failover. Invalidation
//!   messages use plain PUBLISH, which a cluster broadcasts to every node, so
//!   a subscriber on any one node hears every replica's messages (sharded
//!   pub/sub would need the channel's slot owner and gains nothing for one
//!   low-volume channel). Invalidation SCANs every master.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use redis::{
    AsyncConnectionConfig, Client, Cmd, FromRedisValue, RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    sentinel::Sentinel,
};
use tokio::sync::{Mutex, Notify};

use crate::config::{RedisSentinel, RedisTopology};

/// How often the sentinels are asked who the master is.
const SENTINEL_POLL: Duration = Duration::from_secs(1);

/// A connection to the tier's Redis, whatever its topology. Cheap to clone.
#[derive(Clone)]
pub enum Backend {
    /// One server.
    Single(ConnectionManager, Client),
    /// The master the sentinels name.
    Sentinel(Arc<SentinelMaster>),
    /// A cluster.
    Cluster(Arc<Cluster>),
}

/// A cluster connection, replaced when calls fail.
pub struct Cluster {
    client: ClusterClient,
    nodes: Vec<String>,
    current: ArcSwap<ClusterConnection>,
    /// A call failed: reconnect (reads the slots anew).
    check: Notify,
}

/// The current master of a Sentinel-watched group.
pub struct SentinelMaster {
    sentinel: Mutex<Sentinel>,
    name: String,
    config: ConnectionManagerConfig,
    current: ArcSwap<(String, ConnectionManager)>,
    /// A call failed: ask the sentinels now.
    check: Notify,
}

impl Backend {
    /// Connects to `topology` (one attempt; the caller retries).
    pub async fn connect(
        topology: &RedisTopology,
        config: ConnectionManagerConfig,
        timeout: Duration,
    ) -> RedisResult<Backend> {
        match topology {
            RedisTopology::Single(url) => {
                let client = Client::open(url.as_str())?;
                let conn = client.get_connection_manager_with_config(config).await?;
                Ok(Backend::Single(conn, client))
            }
            RedisTopology::Sentinel(s) => SentinelMaster::connect(s, config)
                .await
                .map(|m| Backend::Sentinel(Arc::new(m))),
            RedisTopology::Cluster(nodes) => {
                let client = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(Duration::from_secs(1))
                    .response_timeout(timeout)
                    .retries(2)
                    .build()?;
                let conn = client.get_async_connection().await?;
                let cluster = Arc::new(Cluster {
                    client,
                    nodes: nodes.clone(),
                    current: ArcSwap::from_pointee(conn),
                    check: Notify::new(),
                });
                cluster.watch();
                Ok(Backend::Cluster(cluster))
            }
        }
    }

    /// Runs `cmd` (a single-key command, or one any node may answer).
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Backend::Single(c, _) => cmd.query_async(&mut c.clone()).await,
            Backend::Sentinel(m) => {
                let mut c = m.current.load().1.clone();
                let result = cmd.query_async(&mut c).await;
                if result.is_err() {
                    m.check.notify_one();
                }
                result
            }
            Backend::Cluster(c) => {
                let mut conn = ClusterConnection::clone(&c.current.load());
                let result = cmd.query_async(&mut conn).await;
                if result.is_err() {
                    c.check.notify_one();
                }
                result
            }
        }
    }

    /// Connections to every master, for SCAN (a cluster spreads keys over
    /// its masters; anything else has one).
    pub async fn masters(&self) -> Vec<ScanTarget> {
        match self {
            Backend::Single(c, _) => vec![ScanTarget::Manager(c.clone())],
            Backend::Sentinel(m) => vec![ScanTarget::Manager(m.current.load().1.clone())],
            Backend::Cluster(c) => {
                let nodes: RedisResult<String> = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut ClusterConnection::clone(&c.current.load()))
                    .await;
                let mut out = Vec::new();
                for addr in nodes.iter().flat_map(|n| cluster_masters(n)) {
                    let Ok(client) = Client::open(format!("redis://{addr}")) else {
                        continue;
                    };
                    if let Ok(conn) = client
                        .get_multiplexed_async_connection_with_config(
                            &AsyncConnectionConfig::new()
                                .set_connection_timeout(Some(Duration::from_secs(1))),
                        )
                        .await
                    {
                        out.push(ScanTarget::Node(conn));
                    }
                }
                out
            }
        }
    }

    /// A client to subscribe to invalidations with, the `attempt`-th choice
    /// (a cluster's nodes are tried in turn).
    pub async fn pubsub_client(&self, attempt: usize) -> Option<Client> {
        match self {
            Backend::Single(_, client) => Some(client.clone()),
            Backend::Sentinel(m) => Client::open(m.current.load().0.as_str()).ok(),
            Backend::Cluster(c) => {
                let node = c.nodes.get(attempt % c.nodes.len().max(1))?;
                Client::open(node.as_str()).ok()
            }
        }
    }
}

/// Where a SCAN runs.
pub enum ScanTarget {
    /// The one server or the current master.
    Manager(ConnectionManager),
    /// One master of a cluster.
    Node(redis::aio::MultiplexedConnection),
}

impl ScanTarget {
    /// Runs `cmd` there.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            ScanTarget::Manager(c) => cmd.query_async(c).await,
            ScanTarget::Node(c) => cmd.query_async(c).await,
        }
    }
}

/// `ip:port` of every master in a `CLUSTER NODES` answer that is not
/// failing.
fn cluster_masters(nodes: &str) -> Vec<String> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let addr = fields.nth(1)?;
            let flags = fields.next()?;
            let is_master = flags.split(',').any(|f| f == "master");
            let failing = flags.split(',').any(|f| f == "fail" || f == "fail?");
            // `ip:port@cport[,hostname]`
            let addr = addr.split(['@', ',']).next()?;
            (is_master && !failing).then(|| addr.to_string())
        })
        .collect()
}

impl Cluster {
    /// Reconnects after failed calls, for as long as the tier lives.
    fn watch(self: &Arc<Self>) {
        let c = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = c.check.notified() => {}
                    () = tokio::time::sleep(SENTINEL_POLL * 10) => {}
                }
                // Only this task holds it: the tier is gone.
                if Arc::strong_count(&c) == 1 {
                    return;
                }
                match c.client.get_async_connection().await {
                    Ok(conn) => c.current.store(Arc::new(conn)),
                    Err(e) => tracing::debug!(error = %e, "cannot reconnect to the redis cluster"),
                }
                // At most one reconnect per interval, however many calls fail.
                tokio::time::sleep(SENTINEL_POLL).await;
            }
        });
    }
}

impl SentinelMaster {
    async fn connect(s: &RedisSentinel, config: ConnectionManagerConfig) -> RedisResult<Self> {
        let mut sentinel = Sentinel::build(s.sentinels.clone())?;
        let (url, conn) = master(&mut sentinel, &s.master, &config).await?;
        let master = SentinelMaster {
            sentinel: Mutex::new(sentinel),
            name: s.master.clone(),
            config,
            current: ArcSwap::from_pointee((url, conn)),
            check: Notify::new(),
        };
        Ok(master)
    }

    /// Follows failovers for as long as the tier lives.
    pub fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(m) = weak.upgrade() else { return };
                tokio::select! {
                    () = tokio::time::sleep(SENTINEL_POLL) => {}
                    () = m.check.notified() => {}
                }
                m.refresh().await;
                // At most one check per poll interval, however many calls fail.
                drop(m);
                tokio::time::sleep(SENTINEL_POLL / 4).await;
            }
        });
    }

    async fn refresh(&self) {
        let mut sentinel = self.sentinel.lock().await;
        let addr = match sentinel
            .async_master_for(&self.name, None)
            .await
            .map(|c| c.get_connection_info().addr().to_string())
        {
            Ok(addr) => addr,
            Err(e) => {
                tracing::debug!(error = %e, "sentinels did not name a master");
                return;
            }
        };
        if self.current.load().0 == url_of(&addr) {
            return;
        }
        match master(&mut sentinel, &self.name, &self.config).await {
            Ok((url, conn)) => {
                tracing::warn!(master = %url, "redis master changed (sentinel failover)");
                self.current.store(Arc::new((url, conn)));
            }
            Err(e) => tracing::debug!(error = %e, "cannot connect to the new redis master"),
        }
    }
}

fn url_of(addr: &str) -> String {
    format!("redis://{addr}")
}

/// The master the sentinels name, and a connection to it.
async fn master(
    sentinel: &mut Sentinel,
    name: &str,
    config: &ConnectionManagerConfig,
) -> RedisResult<(String, ConnectionManager)> {
    let client = sentinel.async_master_for(name, None).await?;
    let url = url_of(&client.get_connection_info().addr().to_string());
    let conn = client
        .get_connection_manager_with_config(config.clone())
        .await?;
    Ok((url, conn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let nodes = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002,host-b master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003 master - 0 1426238318243 3 connected 10923-16383
6ec2 127.0.0.1:30005@40005 master,fail - 1426238316232 1426238316232 5 connected
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
";
        assert_eq!(
            cluster_masters(nodes),
            ["127.0.0.1:30002", "127.0.0.1:30003", "127.0.0.1:30001"]
        );
    }
}
