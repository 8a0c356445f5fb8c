//! The shared Redis tier against a real `redis-server` (installed by `make
//! test`): two bfb instances share warm entries, and killing Redis mid-run
//! fails nothing.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bfb::{
    config::Config,
    pb::bfb::{
        common::v1::DataSource,
        customer::v1::{
            GetCustomerRequest, customer_aggregate_service_client::CustomerAggregateServiceClient,
        },
    },
};
use tokio::process::Child;

/// `redis-server` on a free port, without persistence.
async fn redis() -> (Child, SocketAddr) {
    common::redis::server(&[]).await
}

async fn redis_keys(addr: SocketAddr) -> usize {
    let client = redis::Client::open(format!("redis://{addr}")).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    redis::cmd("DBSIZE")
        .query_async::<usize>(&mut conn)
        .await
        .expect("dbsize")
}

async fn keys_for(addr: SocketAddr, id: &str) -> usize {
    let client = redis::Client::open(format!("redis://{addr}")).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*|{id}|*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    keys.len()
}

async fn flush(addr: SocketAddr) {
    let client = redis::Client::open(format!("redis://{addr}")).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .expect("flushall");
}

/// Waits until the instance behind `client` writes to Redis. bfb connects to
/// Redis in the background, and an answer cached before that stays
/// in-process only, so each attempt uses a fresh id (`c-{base}`, ...).
async fn until_connected(
    client: &CustomerAggregateServiceClient<tonic::transport::Channel>,
    raddr: SocketAddr,
    base: u32,
) {
    let mut n = base;
    eventually("the instance to connect to redis", || {
        n += 1;
        let (mut c, id) = (client.clone(), format!("c-{n}"));
        async move {
            let _ = c.get_customer(get(&id)).await;
            keys_for(raddr, &id).await >= 4
        }
    })
    .await;
}

fn with_redis(addr: SocketAddr) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.cache.enabled = true;
        c.cache.redis_url = Some(format!("redis://{addr}"));
    }
}

fn get(id: &str) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: id.into(),
        ..Default::default()
    }
}

async fn client(addr: SocketAddr) -> CustomerAggregateServiceClient<tonic::transport::Channel> {
    CustomerAggregateServiceClient::new(common::channel(addr).await)
}

/// Waits (bounded) until `f` holds; for effects that happen asynchronously
/// (a background connect, a background write).
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_serves_from_redis_without_calling_downstream() {
    let (_redis, raddr) = redis().await;
    let h = common::start(bfb::sim::SimConfig::default(), with_redis(raddr)).await;
    let second = common::start_bfb(h.sim, with_redis(raddr)).await;
    let mut first = h.customers().await;

    // Until the first instance has connected, its entries stay in-process.
    let mut second_client = client(second.addr).await;
    until_connected(&first, raddr, 1000).await;
    until_connected(&second_client, raddr, 2000).await;
    flush(raddr).await;
    first.get_customer(get("c-31")).await.expect("ok");
    eventually("the write of c-31", || async {
        keys_for(raddr, "c-31").await >= 4
    })
    .await;
    let before = h.calls().await;

    // The second instance has never seen c-31.
    let r = second_client
        .get_customer(get("c-31"))
        .await
        .expect("ok")
        .into_inner();
    let status = r.status.expect("status");
    for c in ["profile", "favorites", "reviews", "orders"] {
        assert_eq!(status.components[c].source, DataSource::Cache as i32, "{c}");
        assert!(status.components[c].age.is_some());
    }
    assert_eq!(
        h.calls().await,
        before,
        "no downstream call for the second instance"
    );
    assert!(r.customer.expect("customer").profile.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_mid_run_fails_nothing() {
    let (mut redis, raddr) = redis().await;
    let h = common::start(bfb::sim::SimConfig::default(), with_redis(raddr)).await;
    let mut c = h.customers().await;
    until_connected(&c, raddr, 1000).await;
    redis.kill().await.expect("kill redis");
    let _ = redis.wait().await;

    // New ids: every lookup misses in-process and would ask Redis.
    let started = Instant::now();
    for i in 0..50 {
        let r = c
            .get_customer(get(&format!("c-{}", 100 + i)))
            .await
            .expect("served without redis");
        assert!(!r.into_inner().status.expect("status").degraded);
    }
    // 50 calls × 4 lookups, each bounded by the 20 ms Redis timeout at worst
    // (far less once its breaker opens): well under what waiting would cost.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // And in-process entries still serve.
    let r = c.get_customer(get("c-100")).await.expect("ok").into_inner();
    assert_eq!(
        r.status.expect("status").components["orders"].source,
        DataSource::Cache as i32
    );

    let text = common::http_get(h.metrics, "/metrics").await;
    let skipped = ["error", "timeout", "breaker_open"]
        .iter()
        .filter_map(|r| {
            text.lines()
                .find(|l| l.starts_with(&format!("bfb_cache_shared_total{{result=\"{r}\"}}")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        })
        .sum::<f64>();
    assert!(skipped > 0.0, "redis failures are counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_drops_an_entity_in_both_tiers_and_on_other_replicas() {
    use bfb::pb::bfb::admin::v1::{InvalidateEntityRequest, cache_admin_client::CacheAdminClient};
    let (_redis, raddr) = redis().await;
    let h = common::start(bfb::sim::SimConfig::default(), with_redis(raddr)).await;
    let other = common::start_bfb(h.sim, with_redis(raddr)).await;
    let (a, mut b) = (h.customers().await, client(other.addr).await);
    until_connected(&a, raddr, 1000).await;
    until_connected(&b, raddr, 2000).await;
    flush(raddr).await;
    a.clone().get_customer(get("c-60")).await.expect("ok");
    eventually("the write of c-60", || async {
        keys_for(raddr, "c-60").await >= 4
    })
    .await;
    b.get_customer(get("c-60")).await.expect("ok");
    let r = b.get_customer(get("c-60")).await.expect("ok").into_inner();
    assert_eq!(
        r.status.expect("status").components["profile"].source,
        DataSource::Cache as i32
    );

    let mut admin = CacheAdminClient::new(common::channel(h.admin).await);
    let bad = admin
        .invalidate_entity(InvalidateEntityRequest {
            entity_id: "c-60".into(),
            components: vec!["nope".into()],
        })
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let done = admin
        .invalidate_entity(InvalidateEntityRequest {
            entity_id: "c-60".into(),
            components: vec![],
        })
        .await
        .expect("invalidated")
        .into_inner();
    assert_eq!(done.local_entries, 4);
    assert_eq!(done.shared_entries, 4);
    assert!(done.broadcast);
    assert_eq!(redis_keys(raddr).await, 0);

    // The other replica drops its in-process entries when the message arrives.
    eventually("the other replica to drop c-60", || {
        let mut b = b.clone();
        async move {
            let r = b.get_customer(get("c-60")).await.expect("ok").into_inner();
            r.status.expect("status").components["profile"].source == DataSource::Live as i32
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_counted_as_timeouts_and_fails_nothing() {
    let (redis, raddr) = redis().await;
    let h = common::start(bfb::sim::SimConfig::default(), with_redis(raddr)).await;
    let mut c = h.customers().await;
    until_connected(&c, raddr, 2000).await;
    let series = |r: &str| format!("bfb_cache_shared_total{{result=\"{r}\"}}");
    let before = h.metrics_text().await;
    let count = |text: &str, r: &str| common::metric(text, &series(r)).unwrap_or(0.0);

    // Stopped, not killed: connections stay open and nothing answers.
    let pid = redis.id().expect("running");
    common::signal(pid, "STOP");
    for i in 0..5 {
        let r = c
            .get_customer(get(&format!("c-{}", 2100 + i)))
            .await
            .expect("served with redis hung");
        assert!(!r.into_inner().status.expect("status").degraded);
    }
    common::signal(pid, "CONT");

    let after = h.metrics_text().await;
    assert!(
        count(&after, "timeout") > count(&before, "timeout"),
        "a hung Redis is a timeout"
    );
    assert_eq!(
        count(&after, "error"),
        count(&before, "error"),
        "and not an error"
    );
}
