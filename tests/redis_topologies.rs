//! The shared tier on Redis Sentinel and on Redis Cluster, real processes
//! (`redis-server`, `redis-server --sentinel`, `redis-cli --cluster create`):
//! two bfb instances share entries, invalidations reach the other one, and
//! losing the Redis master in the middle of load fails no call; sharing
//! resumes after the failover.

mod common;

use std::{net::SocketAddr, time::Duration};

use bfb::{
    config::{Config, RedisSentinel},
    pb::bfb::{
        admin::v1::{InvalidateEntityRequest, cache_admin_client::CacheAdminClient},
        common::v1::DataSource,
        customer::v1::{
            GetCustomerRequest, customer_aggregate_service_client::CustomerAggregateServiceClient,
        },
    },
};
use common::redis::{eventually, free_ports, query, server_on};
use tokio::process::Child;
use tonic::transport::Channel;

type Client = CustomerAggregateServiceClient<Channel>;

/// One topology at a time: each runs a handful of Redis processes and two
/// bfb instances under load.
static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn get(id: &str) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: id.into(),
        ..Default::default()
    }
}

/// Keys of customer `id` on the node at `addr`.
async fn keys_for(addr: SocketAddr, id: &str) -> usize {
    query::<Vec<String>>(addr, redis::cmd("KEYS").arg(format!("*|{id}|*")))
        .await
        .map_or(0, |k| k.len())
}

/// Subscribers of the invalidation channel on the node at `addr`.
async fn subscribers(addr: SocketAddr) -> u64 {
    query::<(String, u64)>(
        addr,
        redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(bfb::cache::shared::INVALIDATIONS),
    )
    .await
    .map_or(0, |(_, n)| n)
}

/// Whether `id` comes back whole from bfb's cache (the instance never
/// fetched it itself, so from the shared tier).
async fn from_cache(c: &mut Client, id: &str) -> bool {
    let r = c.get_customer(get(id)).await.expect("call").into_inner();
    let s = r.status.expect("status");
    ["profile", "favorites", "reviews", "orders"]
        .iter()
        .all(|k| s.components[*k].source == DataSource::Cache as i32)
}

/// Sends GetCustomer on both clients until `stop` is set; every call must
/// succeed whole. Returns how many were sent.
fn steady_load(
    clients: [Client; 2],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0u64;
        let [mut a, mut b] = clients;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for c in [&mut a, &mut b] {
                let id = format!("c-{}", 3_000 + n % 500);
                let r = c
                    .get_customer(get(&id))
                    .await
                    .unwrap_or_else(|e| panic!("call {n} failed: {e:?}"))
                    .into_inner();
                assert!(!r.status.expect("status").degraded, "call {n} degraded");
                n += 1;
            }
        }
        n
    })
}

struct Pair {
    a: common::Harness,
    _b: common::Bfb,
    ca: Client,
    cb: Client,
}

async fn pair(tweak: impl Fn(&mut Config) + Clone) -> Pair {
    let t = tweak.clone();
    let a = common::start(bfb::sim::SimConfig::default(), move |c| {
        c.cache.enabled = true;
        t(c);
    })
    .await;
    let b = common::start_bfb(a.sim, move |c| {
        c.cache.enabled = true;
        tweak(c);
    })
    .await;
    let ca = a.customers().await;
    let cb = CustomerAggregateServiceClient::new(common::channel(b.addr).await);
    Pair { a, _b: b, ca, cb }
}

impl Pair {
    /// A fetches a new id (`c-{n}`, `c-{n+1}`, ...) until B gets it from the
    /// shared tier: both are connected and share. B asks for each id once
    /// (a second ask would find its own copy), after A counted its writes.
    async fn until_sharing(&mut self, first: u32) -> u32 {
        let mut n = first;
        let written = "bfb_cache_shared_total{result=\"written\"}";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the two instances never shared an entry: {}",
                self.a
                    .metrics_text()
                    .await
                    .lines()
                    .filter(|l| l.starts_with("bfb_cache_shared_total"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            n += 1;
            let id = format!("c-{n}");
            let before = common::metric(&self.a.metrics_text().await, written).unwrap_or(0.0);
            self.ca.get_customer(get(&id)).await.expect("call");
            let wrote = tokio::time::Instant::now() + Duration::from_secs(2);
            while common::metric(&self.a.metrics_text().await, written).unwrap_or(0.0)
                < before + 4.0
                && tokio::time::Instant::now() < wrote
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if from_cache(&mut self.cb, &id).await {
                return n;
            }
        }
    }

    /// A invalidates `id`; B's copy goes too (B's next answer is live).
    async fn invalidation_reaches_b(&mut self, id: &str) {
        assert!(
            from_cache(&mut self.cb, id).await,
            "B holds {id} before the invalidation"
        );
        let done = CacheAdminClient::new(common::channel(self.a.admin).await)
            .invalidate_entity(InvalidateEntityRequest {
                entity_id: id.into(),
                components: vec![],
            })
            .await
            .expect("invalidate")
            .into_inner();
        assert!(done.shared_entries >= 4, "{done:?}");
        assert!(done.broadcast);
        let (cb, id) = (&self.cb, id.to_string());
        eventually("B to drop its copy", 10, || {
            let (mut cb, id) = (cb.clone(), id.clone());
            async move { !from_cache(&mut cb, &id).await }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_loses_no_call_and_sharing_resumes() {
    let _one = ONE.lock().await;
    let ports = free_ports(5);
    let (master, maddr) = server_on(ports[0], &["--repl-diskless-sync-delay", "0"]).await;
    let (mut master, maddr) = (master, maddr);
    let (_replica, raddr) = server_on(
        ports[1],
        &["--replicaof", "127.0.0.1", &ports[0].to_string()],
    )
    .await;
    eventually("the replica to sync", 30, || async move {
        query::<String>(raddr, redis::cmd("INFO").arg("replication"))
            .await
            .is_ok_and(|i| i.contains("master_link_status:up"))
    })
    .await;
    let dir = std::env::temp_dir().join(format!("bfb-sentinel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut sentinels: Vec<(Child, SocketAddr)> = Vec::new();
    for (i, &port) in ports[2..].iter().enumerate() {
        let conf = dir.join(format!("sentinel-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor bfb 127.0.0.1 {} 2\n\
                 sentinel down-after-milliseconds bfb 1000\n\
                 sentinel failover-timeout bfb 5000\n\
                 sentinel parallel-syncs bfb 1\n",
                maddr.port()
            ),
        )
        .expect("sentinel conf");
        let conf = conf.to_string_lossy().into_owned();
        sentinels.push(server_on(port, &[&conf, "--sentinel"]).await);
    }
    // The sentinels have found the replica (needed for a failover).
    let s0 = sentinels[0].1;
    eventually("the sentinels to see the replica", 30, || async move {
        query::<Vec<redis::Value>>(s0, redis::cmd("SENTINEL").arg("REPLICAS").arg("bfb"))
            .await
            .is_ok_and(|r| !r.is_empty())
    })
    .await;

    let urls: Vec<String> = sentinels
        .iter()
        .map(|(_, a)| format!("redis://{a}"))
        .collect();
    let mut p = pair(move |c: &mut Config| {
        c.cache.redis_sentinel = Some(RedisSentinel {
            master: "bfb".into(),
            sentinels: urls.clone(),
        });
    })
    .await;
    let n = p.until_sharing(100).await;
    let id = format!("c-{n}");
    assert!(keys_for(maddr, &id).await >= 4, "written to the master");
    eventually("both to subscribe on the master", 10, || async move {
        subscribers(maddr).await >= 2
    })
    .await;
    p.invalidation_reaches_b(&id).await;

    // Kill the master under load: no call fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = steady_load([p.ca.clone(), p.cb.clone()], stop.clone());
    master.start_kill().expect("kill -9 the master");
    eventually("the sentinels to promote the replica", 30, || async move {
        query::<Vec<String>>(
            s0,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg("bfb"),
        )
        .await
        .is_ok_and(|a| a.get(1) == Some(&raddr.port().to_string()))
    })
    .await;
    // Sharing resumes on the new master, invalidations too.
    let n = p.until_sharing(n + 1_000).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let calls = load.await.expect("no call failed");
    assert!(calls > 0);
    let id = format!("c-{n}");
    assert!(keys_for(raddr, &id).await >= 4, "written to the new master");
    eventually("both to subscribe on the new master", 10, || async move {
        subscribers(raddr).await >= 2
    })
    .await;
    p.invalidation_reaches_b(&id).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_spreads_keys_and_survives_a_master_loss() {
    let dir = std::env::temp_dir().join(format!("bfb-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let _one = ONE.lock().await;
    let mut nodes: Vec<(Child, SocketAddr)> = Vec::new();
    // Data ports and cluster bus ports (by default port + 10000, which may
    // be taken or past 65535 for a random port).
    let ports = free_ports(12);
    for (port, bus) in ports[..6].iter().zip(&ports[6..]) {
        let conf = dir.join(format!("nodes-{port}.conf"));
        let conf = conf.to_string_lossy().into_owned();
        nodes.push(
            server_on(
                *port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "1000",
                    // Sync replicas at once (Redis waits 5 s by default to
                    // batch them): an unsynced replica never takes over.
                    "--repl-diskless-sync-delay",
                    "0",
                ],
            )
            .await,
        );
    }
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.to_string()).collect();
    let created = tokio::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .await
        .expect("redis-cli (make test installs it)");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    for (_, a) in &nodes {
        let a = *a;
        eventually("the cluster to be ready", 30, || async move {
            query::<String>(a, redis::cmd("CLUSTER").arg("INFO"))
                .await
                .is_ok_and(|i| i.contains("cluster_state:ok"))
        })
        .await;
    }
    // Every replica has synced with its master (else it cannot take over).
    for (_, a) in &nodes {
        let a = *a;
        eventually("the replicas to sync", 30, || async move {
            query::<String>(a, redis::cmd("INFO").arg("replication"))
                .await
                .is_ok_and(|i| i.contains("role:master") || i.contains("master_link_status:up"))
        })
        .await;
    }
    // redis-cli makes the first three masters.
    let masters: Vec<SocketAddr> = nodes[..3].iter().map(|(_, a)| *a).collect();
    let urls: Vec<String> = masters.iter().map(|a| format!("redis://{a}")).collect();
    let mut p = pair(move |c: &mut Config| c.cache.redis_cluster = Some(urls.clone())).await;
    let n = p.until_sharing(100).await;

    // Keys spread over every master.
    for i in 0..30 {
        p.ca.get_customer(get(&format!("c-{}", 500 + i)))
            .await
            .expect("call");
    }
    for m in &masters {
        let m = *m;
        eventually("keys on every master", 10, || async move {
            query::<u64>(m, &redis::cmd("DBSIZE")).await.unwrap_or(0) > 0
        })
        .await;
    }
    // Invalidation finds the entity's keys on whichever masters hold them,
    // and the message reaches B (each subscribes on some node: a cluster
    // broadcasts PUBLISH to all).
    let all: Vec<SocketAddr> = nodes.iter().map(|(_, a)| *a).collect();
    eventually("both to subscribe", 10, || {
        let all = all.clone();
        async move {
            let mut n = 0;
            for a in all {
                n += subscribers(a).await;
            }
            n >= 2
        }
    })
    .await;
    p.invalidation_reaches_b(&format!("c-{n}")).await;

    // Lose the second master under load: no call fails; its replica takes
    // over and sharing resumes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = steady_load([p.ca.clone(), p.cb.clone()], stop.clone());
    nodes[1].0.start_kill().expect("kill -9 a master");
    let survivor = masters[0];
    eventually("the cluster to fail over", 30, || async move {
        query::<String>(survivor, redis::cmd("CLUSTER").arg("INFO"))
            .await
            .is_ok_and(|i| i.contains("cluster_state:ok"))
            && query::<String>(survivor, redis::cmd("CLUSTER").arg("NODES"))
                .await
                .is_ok_and(|n| {
                    n.lines()
                        .filter(|l| l.contains("master") && !l.contains("fail"))
                        .count()
                        == 3
                })
    })
    .await;
    p.until_sharing(n + 1_000).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(load.await.expect("no call failed") > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
