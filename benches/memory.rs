//! `make bench`: memory per in-flight call, and what one aggregate asks of
//! Redis.
//!
//! 1. `bfb sim` answering in 3 s and `bfb serve` (bulkheads and admission
//!    raised, cache off) as processes. bfb's resident memory (VmRSS) idle,
//!    then with N GetCustomer (four downstream calls each) held in flight
//!    (counted at the sim, not guessed with a sleep): (in flight − idle) / N,
//!    the first time N is reached (connections opened, arenas grown) and
//!    again. N = 500 and 2,000 (`BENCH_INFLIGHT` to change the larger one).
//! 2. A bfb with the shared Redis tier (`redis-server` on the machine):
//!    Redis commands per aggregate (INFO commandstats deltas) for cold
//!    customers (every component missed) and for customers warm in Redis
//!    but new to this replica.

use std::{net::SocketAddr, time::Duration};

use bfb::pb::bfb::customer::v1::{
    GetCustomerRequest, customer_aggregate_service_client::CustomerAggregateServiceClient,
};

mod common;

use common::{Boxed, channel, per_call_kib, start_bfb, start_sim};

fn get(i: u64) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: format!("c-{}", i % 10_000 + 1),
        ..Default::default()
    }
}

async fn dbsize(redis: SocketAddr) -> Result<u64, Boxed> {
    let client = redis::Client::open(format!("redis://{redis}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("DBSIZE").query_async(&mut conn).await?)
}

/// Waits (bounded) until Redis holds at least `keys` keys.
async fn until_keys(redis: SocketAddr, keys: u64) -> Result<(), Boxed> {
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while dbsize(redis).await? < keys {
        if tokio::time::Instant::now() > until {
            return Err("writes never reached Redis".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Calls `c` with fresh ids from `first` until an answer reaches Redis:
/// the replica has connected (answers before that stay in-process).
async fn until_connected(
    c: &mut CustomerAggregateServiceClient<tonic::transport::Channel>,
    redis: SocketAddr,
    first: u64,
) -> Result<(), Boxed> {
    for i in first.. {
        let had = dbsize(redis).await?;
        c.get_customer(get(i)).await?;
        if until_keys(redis, had + 4).await.is_ok() {
            return Ok(());
        }
    }
    Ok(())
}

async fn redis_commands(redis: SocketAddr) -> Result<u64, Boxed> {
    let client = redis::Client::open(format!("redis://{redis}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    // cmdstat_get:calls=12,usec=...; the INFO call itself is not counted yet.
    Ok(info
        .lines()
        .filter(|l| !l.starts_with("cmdstat_info") && !l.starts_with("cmdstat_dbsize"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Boxed> {
    let big: u64 = common::env_or("BENCH_INFLIGHT", 2_000);
    let (_sim, sim) = start_sim("3s").await?;
    let (bfb, addr) = start_bfb(sim, "memory", |c| {
        c.replace("max_concurrency = 100", "max_concurrency = 20000")
            .replace("max_concurrent_rpcs = 1000", "max_concurrent_rpcs = 20000")
            .replace("timeout = \"1s\"", "timeout = \"10s\"")
            // Every call is slow on purpose: the breaker must not count it.
            .replace("slow_call = \"1s\"", "slow_call = \"30s\"")
    })
    .await?;
    // Warm the connections and the allocator's arenas first.
    per_call_kib(&bfb, addr, sim, 100).await?;
    println!("memory per in-flight GetCustomer (4 downstream calls each), bfb VmRSS growth:");
    for n in [500, big] {
        // The first time a concurrency is reached, bfb opens connections
        // and the allocator grows its arenas; the second time shows what
        // each call holds.
        let (first, _) = per_call_kib(&bfb, addr, sim, n).await?;
        let (again, _) = per_call_kib(&bfb, addr, sim, n).await?;
        println!(
            "  {n:>5} in flight: first time {first:.1} KiB per call, again {again:.1} KiB per call"
        );
    }
    drop(bfb);

    // Redis commands per aggregate.
    let redis_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let redis: SocketAddr = ([127, 0, 0, 1], redis_port).into();
    let _redis = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            &redis_port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", &std::env::temp_dir().display().to_string()])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    while tokio::net::TcpStream::connect(redis).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_sim2, sim2) = start_sim("0ms").await?;
    let with_redis = |c: String| {
        c.replace("[cache]\nenabled = false", "[cache]\nenabled = true")
            .replace(
                "# redis_url = \"redis://127.0.0.1:6379\"",
                &format!("redis_url = \"redis://{redis}\""),
            )
    };
    let (_a, a) = start_bfb(sim2, "redis-a", with_redis).await?;
    let (_b, b) = start_bfb(sim2, "redis-b", with_redis).await?;
    let mut ca = CustomerAggregateServiceClient::new(channel(a).await?);
    let mut cb = CustomerAggregateServiceClient::new(channel(b).await?);
    until_connected(&mut ca, redis, 5_000).await?;
    until_connected(&mut cb, redis, 6_000).await?;
    let n = 1_000u64;
    let keys = dbsize(redis).await?;
    let before = redis_commands(redis).await?;
    for i in 0..n {
        ca.get_customer(get(i)).await?;
    }
    // Writes are in the background: count once they have all landed.
    until_keys(redis, keys + 4 * n).await?;
    let cold = redis_commands(redis).await? - before;
    let before = redis_commands(redis).await?;
    for i in 0..n {
        cb.get_customer(get(i)).await?;
    }
    let warm = redis_commands(redis).await? - before;
    println!("Redis commands per GetCustomer (4 components), {n} customers:");
    println!(
        "  cold (miss, fetch, write): {:.2}   warm in Redis, new to the replica: {:.2}",
        cold as f64 / n as f64,
        warm as f64 / n as f64
    );
    Ok(())
}
