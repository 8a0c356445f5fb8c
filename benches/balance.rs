//! `make bench`: what the balancer costs per call.
//!
//! The same unary GetProfile calls, from this process, over:
//!
//! - `channel`: one plain tonic `Channel` to one sim (what bfb did before it
//!   balanced: one connection per downstream);
//! - `balanced-1`: bfb's downstream call (`Unary` over `Balanced`) over a
//!   pool of that one endpoint;
//! - `round-robin-3`: three plain `Channel`s, one per sim, taken in turn
//!   (spreading without any load measure);
//! - `balanced-3`: the same over the three sims (p2c over peak-EWMA).
//!
//! `balanced-1` against `channel` is the cost of the balancer's bookkeeping;
//! `balanced-3` against `round-robin-3` the cost of choosing by load rather
//! than in turn (both pay for spreading calls over three connections: fewer
//! calls per HTTP/2 write, so more syscalls per call).
//!
//! The sims run as separate processes (pinned to core 1 when `taskset`
//! exists), so this process's CPU time is the client's alone. Each round
//! runs every variant for `BENCH_SECS` (default 3) at concurrency 16, in a
//! rotating order; reported per variant over `BENCH_ROUNDS` (default 5)
//! rounds: min / median / max of client CPU µs per call and of calls/s.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bfb::{
    config::{DiscoverySettings, EjectionSettings},
    downstream::{
        balance::{Balanced, Connector, Pool, PoolSettings},
        discovery::{self, Source},
        transport,
        unary::Unary,
    },
    pb::downstream::profile::v1::{
        GetProfileRequest, GetProfileResponse, profile_service_client::ProfileServiceClient,
    },
    telemetry::metrics::Metrics,
};
use tonic::transport::{Channel, Endpoint};

mod common;

use common::{Boxed, start_sim};

#[derive(Clone)]
enum Client {
    Channel(ProfileServiceClient<Channel>),
    RoundRobin(
        Vec<ProfileServiceClient<Channel>>,
        Arc<std::sync::atomic::AtomicUsize>,
    ),
    Balanced(Arc<Unary<GetProfileRequest, GetProfileResponse>>),
}

impl Client {
    async fn call(&mut self, i: u64) -> Result<(), tonic::Status> {
        let req = GetProfileRequest {
            customer_id: format!("c-{}", i % 10_000 + 1),
        };
        match self {
            Client::Channel(c) => c.get_profile(req).await.map(drop),
            Client::RoundRobin(all, next) => {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % all.len();
                all[i].clone().get_profile(req).await.map(drop)
            }
            Client::Balanced(c) => c.call(tonic::Request::new(req)).await.map(drop),
        }
    }
}

fn balanced(addrs: &[SocketAddr], metrics: &Arc<Metrics>) -> Client {
    let connector: Connector = Arc::new(transport::Connector::plain(Duration::from_secs(1)));
    let pool = Arc::new(Pool::new(
        format!("bench-{}", addrs.len()),
        PoolSettings {
            ejection: EjectionSettings::default(),
            max_streams_per_connection: 100,
            max_connections_per_endpoint: None,
        },
        connector,
        metrics,
    ));
    pool.add_bulkhead(100);
    let sources = addrs.iter().map(|a| Source::Static(*a)).collect();
    discovery::start(
        pool.clone(),
        sources,
        None,
        DiscoverySettings::default(),
        metrics.clone(),
    );
    Client::Balanced(Arc::new(Unary::new(
        Balanced::new(pool),
        "/downstream.profile.v1.ProfileService/GetProfile",
        4 << 20,
        None,
    )))
}

/// Closed loop at `concurrency` for `secs`: (client CPU µs per call, calls/s).
async fn run(client: &Client, concurrency: u64, secs: f64) -> Result<(f64, f64), Boxed> {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let cpu = common::cpu_of(std::process::id()).unwrap_or_default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                c.call(w * 1_000_000 + n).await?;
                n += 1;
            }
            Ok::<u64, tonic::Status>(n)
        }));
    }
    let mut calls = 0;
    for t in tasks {
        calls += t.await??;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = (common::cpu_of(std::process::id()).unwrap_or_default() - cpu).as_secs_f64();
    Ok((cpu * 1e6 / calls as f64, calls as f64 / wall))
}

fn spread(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:.1} / {:.1} / {:.1}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Boxed> {
    let secs: f64 = common::env_or("BENCH_SECS", 3.0);
    let rounds: usize = common::env_or("BENCH_ROUNDS", 5);
    let mut sims = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let (child, addr) = start_sim("0ms").await?;
        sims.push(child);
        addrs.push(addr);
    }
    let metrics = Arc::new(Metrics::new());
    let mut channels = Vec::new();
    for a in &addrs {
        let ch = Endpoint::from_shared(format!("http://{a}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        channels.push(ProfileServiceClient::new(ch));
    }
    let variants = [
        ("channel", Client::Channel(channels[0].clone())),
        ("balanced-1", balanced(&addrs[..1], &metrics)),
        (
            "round-robin-3",
            Client::RoundRobin(channels, Arc::default()),
        ),
        ("balanced-3", balanced(&addrs, &metrics)),
    ];
    // Warm every connection.
    for (_, c) in &variants {
        run(c, 16, 0.5).await?;
    }
    let mut cpu = vec![Vec::new(); variants.len()];
    let mut rate = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        for k in 0..variants.len() {
            let i = (round + k) % variants.len();
            let (c, r) = run(&variants[i].1, 16, secs).await?;
            cpu[i].push(c);
            rate[i].push(r);
        }
    }
    println!(
        "balancer cost: GetProfile from this process, concurrency 16, {rounds} rounds of {secs} s, min / median / max"
    );
    println!(
        "{:<14} {:>28} {:>28}",
        "variant", "client CPU µs/call", "calls/s"
    );
    for (i, (name, _)) in variants.iter().enumerate() {
        println!(
            "{:<14} {:>28} {:>28}",
            name,
            spread(cpu[i].clone()),
            spread(rate[i].clone())
        );
    }
    drop(sims);
    Ok(())
}
