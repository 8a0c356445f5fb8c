//! `make bench`: bfb's cost over the floor.
//!
//! Starts `bfb sim` and `bfb serve` as separate processes, both pinned to one
//! core when `taskset` exists (the load generator uses the other), and drives
//! them over loopback with generated tonic clients:
//!
//! 1. concurrency 1, zero sim latency: p50/p99 of a direct call to one sim
//!    service (the floor) next to GetCustomer with all four components;
//! 2. closed-loop load at concurrency 32: throughput and the CPU time the bfb
//!    process spends per GetCustomer (read from /proc);
//! 3. sim latency 10 ms: p50 of the direct call next to GetCustomer.
//!
//! Set `BENCH_SECS` to change the length of each load phase (default 5).

use std::time::{Duration, Instant};

use bfb::pb::{
    bfb::customer::v1::{
        GetCustomerRequest, customer_aggregate_service_client::CustomerAggregateServiceClient,
    },
    downstream::profile::v1::{GetProfileRequest, profile_service_client::ProfileServiceClient},
};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

mod common;

use common::{Boxed, channel, cpu_time, start};

#[derive(Clone)]
enum Target {
    Direct(ProfileServiceClient<Channel>),
    /// GetCustomer with this read mask (empty: all four components).
    Bfb(
        CustomerAggregateServiceClient<Channel>,
        &'static [&'static str],
    ),
}

impl Target {
    async fn call(&mut self, i: u64) -> Result<(), tonic::Status> {
        let id = format!("c-{}", i % 10_000 + 1);
        match self {
            Target::Direct(c) => c
                .get_profile(GetProfileRequest { customer_id: id })
                .await
                .map(drop),
            Target::Bfb(c, paths) => c
                .get_customer(GetCustomerRequest {
                    customer_id: id,
                    read_mask: Some(prost_types::FieldMask {
                        paths: paths.iter().map(|p| p.to_string()).collect(),
                    }),
                    ..Default::default()
                })
                .await
                .map(drop),
        }
    }
}

/// `n` calls one after another; the latency histogram in µs.
async fn sequential(target: &mut Target, n: u64) -> Result<Histogram<u64>, Boxed> {
    let mut h = Histogram::new(3)?;
    for i in 0..n {
        let t = Instant::now();
        target.call(i).await?;
        h.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(h)
}

/// Closed loop at `concurrency` for `secs` over customers c-1..c-`keys`:
/// (calls per second, histogram).
async fn load(
    target: Target,
    concurrency: u64,
    secs: u64,
    keys: u64,
) -> Result<(f64, Histogram<u64>), Boxed> {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut t = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
            let mut i = w * 1_000_000;
            while Instant::now() < end {
                let s = Instant::now();
                t.call(i % keys).await.map_err(|e| e.to_string())?;
                h.record(s.elapsed().as_micros() as u64)
                    .map_err(|e| e.to_string())?;
                i += 1;
            }
            Ok::<_, String>(h)
        }));
    }
    let mut all = Histogram::<u64>::new(3)?;
    for t in tasks {
        all.add(t.await??)?;
    }
    Ok((all.len() as f64 / secs as f64, all))
}

fn row(name: &str, h: &Histogram<u64>) {
    println!(
        "  {name:<34} p50 {:>7} µs   p99 {:>7} µs   ({} calls)",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.len()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Boxed> {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let secs: u64 = common::env_or("BENCH_SECS", 5);
    println!(
        "bfb fan-out bench (sim and bfb pinned to core 1 when taskset exists; client on this thread)"
    );

    let (_sim, bfb, sim_addr, bfb_addr) = start("0ms").await?;
    let mut direct = Target::Direct(ProfileServiceClient::new(channel(sim_addr).await?));
    let bfb_client = CustomerAggregateServiceClient::new(channel(bfb_addr).await?);
    let mut agg = Target::Bfb(bfb_client.clone(), &[]);
    let mut one = Target::Bfb(bfb_client, &["profile"]);
    // Warm up connections and caches.
    sequential(&mut direct, 500).await?;
    sequential(&mut agg, 500).await?;
    sequential(&mut one, 500).await?;

    println!("\n1. concurrency 1, sim latency 0");
    let d = sequential(&mut direct, 5_000).await?;
    let a = sequential(&mut agg, 5_000).await?;
    let o = sequential(&mut one, 5_000).await?;
    row("direct GetProfile (floor)", &d);
    row("bfb GetCustomer (profile only)", &o);
    row("bfb GetCustomer (4 downstreams)", &a);
    println!(
        "  added p50: {} µs",
        a.value_at_quantile(0.5) as i64 - d.value_at_quantile(0.5) as i64
    );

    println!("\n2. load, concurrency 32, {secs} s each, sim latency 0");
    let (rate_d, hd) = load(direct.clone(), 32, secs, 10_000).await?;
    let before = cpu_time(&bfb);
    let (rate_o, _) = load(one.clone(), 32, secs, 10_000).await?;
    let middle = cpu_time(&bfb);
    let (rate_a, ha) = load(agg.clone(), 32, secs, 10_000).await?;
    let after = cpu_time(&bfb);
    println!(
        "  direct GetProfile:   {rate_d:>9.0} calls/s   p99 {:>6} µs",
        hd.value_at_quantile(0.99)
    );
    println!(
        "  bfb GetCustomer:     {rate_a:>9.0} calls/s   p99 {:>6} µs",
        ha.value_at_quantile(0.99)
    );
    let (b, m, a) = (before, middle, after);
    let per = |cpu: Duration, rate: f64| cpu.as_secs_f64() * 1e6 / (rate * secs as f64);
    println!(
        "  bfb process CPU per GetCustomer, 4 components: {:.1} µs",
        per(a.saturating_sub(m), rate_a)
    );
    println!(
        "  bfb process CPU per GetCustomer, profile only: {:.1} µs ({rate_o:.0} calls/s)",
        per(m.saturating_sub(b), rate_o)
    );
    drop(bfb);

    println!("\n2b. cache hits: bfb with [cache] enabled, 100 hot customers, sim latency 0");
    let (_cached_bfb, cached_addr) = common::start_bfb(sim_addr, "cached", |c| {
        c.replace("[cache]\nenabled = false", "[cache]\nenabled = true")
    })
    .await?;
    let hot = CustomerAggregateServiceClient::new(channel(cached_addr).await?);
    let mut hot_one = Target::Bfb(hot.clone(), &[]);
    // Hot set: c-1..c-100 (the load's ids are i % 10000 + 1 with i < 100 here).
    for i in 0..100 {
        hot_one.call(i).await?;
    }
    let mut h = hdrhistogram::Histogram::<u64>::new(3)?;
    for i in 0..5_000u64 {
        let t = Instant::now();
        hot_one.call(i % 100).await?;
        h.record(t.elapsed().as_micros() as u64)?;
    }
    println!(
        "  bfb GetCustomer, all 4 from cache    p50 {:>7} µs   p99 {:>7} µs   (concurrency 1)",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99)
    );
    let (rate_c, hc) = load(Target::Bfb(hot, &[]), 32, secs, 100).await?;
    println!(
        "  bfb GetCustomer, all 4 from cache {rate_c:>9.0} calls/s   p99 {:>6} µs (concurrency 32)",
        hc.value_at_quantile(0.99)
    );

    println!("\n3. concurrency 1, every sim service at 10 ms");
    let (_sim, _bfb, sim_addr, bfb_addr) = start("10ms").await?;
    let mut direct = Target::Direct(ProfileServiceClient::new(channel(sim_addr).await?));
    let mut agg = Target::Bfb(
        CustomerAggregateServiceClient::new(channel(bfb_addr).await?),
        &[],
    );
    sequential(&mut direct, 20).await?;
    sequential(&mut agg, 20).await?;
    let d = sequential(&mut direct, 300).await?;
    let a = sequential(&mut agg, 300).await?;
    row("direct GetProfile (one downstream)", &d);
    row("bfb GetCustomer (4 downstreams)", &a);
    println!(
        "  p50 ratio: {:.3}",
        a.value_at_quantile(0.5) as f64 / d.value_at_quantile(0.5) as f64
    );
    Ok(())
}
