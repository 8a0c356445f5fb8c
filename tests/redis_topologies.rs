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
use common::redis::{cluster, eventually, query, sentinel_group};
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
    let mut group = sentinel_group().await;
    let (maddr, raddr) = (group.master.1, group.replica.1);
    let urls = group.urls();
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
    group.master.0.start_kill().expect("kill -9 the master");
    group.until_promoted().await;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_spreads_keys_and_survives_a_master_loss() {
    let _one = ONE.lock().await;
    let mut cluster = cluster().await;
    let masters = cluster.masters();
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
    let all: Vec<SocketAddr> = cluster.nodes.iter().map(|(_, a)| *a).collect();
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
    cluster.nodes[1].0.start_kill().expect("kill -9 a master");
    cluster.until_failed_over(masters[0]).await;
    p.until_sharing(n + 1_000).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(load.await.expect("no call failed") > 0);
}
