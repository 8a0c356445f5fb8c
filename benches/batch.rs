//! `make bench`: many entities per call.
//!
//! 1. BatchGetCustomers of 100 ids next to 100 GetCustomer calls made
//!    concurrently: latency of the whole set, and downstream calls per
//!    component per set (from the sim's counters);
//! 2. StreamUserActivity over 10,000 users: throughput, and bfb's peak
//!    resident memory (VmHWM) against its resident memory before.
//!
//! bfb and the sim run as separate processes pinned to one core (see
//! benches/common); sim latency 1 ms. `BENCH_SETS` sets the number of sets
//! in part 1 (default 30).

use std::time::Instant;

use bfb::pb::bfb::{
    activity::v1::{
        StreamUserActivityRequest, UserRange, stream_user_activity_request::Users,
        user_activity_service_client::UserActivityServiceClient,
    },
    customer::v1::{
        BatchGetCustomersRequest, GetCustomerRequest,
        customer_aggregate_service_client::CustomerAggregateServiceClient,
    },
    sim::v1::{GetStatsRequest, sim_control_client::SimControlClient},
};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::process::Child;

mod common;

use common::{Boxed, channel, row, start};

const COMPONENTS: [&str; 4] = ["profile", "favorites", "reviews", "orders"];

async fn calls(sim: &mut SimControlClient<tonic::transport::Channel>) -> Result<Vec<u64>, Boxed> {
    let stats = sim.get_stats(GetStatsRequest {}).await?.into_inner();
    Ok(COMPONENTS
        .iter()
        .map(|c| stats.services.get(*c).map_or(0, |s| s.calls))
        .collect())
}

fn per_set(before: &[u64], after: &[u64], sets: u64) -> String {
    COMPONENTS
        .iter()
        .zip(before.iter().zip(after))
        .map(|(c, (b, a))| format!("{c} {:.1}", (a - b) as f64 / sets as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(child: &Child, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::main]
async fn main() -> Result<(), Boxed> {
    let sets: u64 = common::env_or("BENCH_SETS", 30);
    let (_sim, bfb, sim_addr, bfb_addr) = start("1ms").await?;
    let ch = channel(bfb_addr).await?;
    let mut sim = SimControlClient::new(channel(sim_addr).await?);
    let customers = CustomerAggregateServiceClient::new(ch.clone());
    let ids = |set: u64| -> Vec<String> {
        (0..100)
            .map(|i| format!("c-{}", set * 100 + i + 1))
            .collect()
    };

    println!("100 customers, sim latency 1 ms, {sets} sets each:");
    // Warm-up: connections and first-call costs.
    customers
        .clone()
        .batch_get_customers(BatchGetCustomersRequest {
            customer_ids: ids(99),
            ..Default::default()
        })
        .await?;

    let before = calls(&mut sim).await?;
    let mut h = Histogram::<u64>::new(3)?;
    for set in 0..sets {
        let t = Instant::now();
        customers
            .clone()
            .batch_get_customers(BatchGetCustomersRequest {
                customer_ids: ids(set),
                ..Default::default()
            })
            .await?;
        h.record(t.elapsed().as_micros() as u64)?;
    }
    let after = calls(&mut sim).await?;
    row("BatchGetCustomers (100 ids)", &h);
    println!(
        "    downstream calls per set: {}",
        per_set(&before, &after, sets)
    );

    let before = after;
    let mut h = Histogram::<u64>::new(3)?;
    for set in 0..sets {
        let t = Instant::now();
        let all = ids(set).into_iter().map(|id| {
            let mut c = customers.clone();
            async move {
                c.get_customer(GetCustomerRequest {
                    customer_id: id,
                    ..Default::default()
                })
                .await
            }
        });
        for r in futures::future::join_all(all).await {
            r?;
        }
        h.record(t.elapsed().as_micros() as u64)?;
    }
    let after = calls(&mut sim).await?;
    row("100 x GetCustomer, concurrently", &h);
    println!(
        "    downstream calls per set: {}",
        per_set(&before, &after, sets)
    );

    let users = 10_000;
    let (rss_before, peak_before) = (status_kib(&bfb, "VmRSS:"), status_kib(&bfb, "VmHWM:"));
    let t = Instant::now();
    let mut request = tonic::Request::new(StreamUserActivityRequest {
        users: Some(Users::UserRange(UserRange {
            prefix: "u-".into(),
            first: 1,
            count: users,
        })),
        ..Default::default()
    });
    // The deadline covers the whole stream: the configured maximum.
    request.set_timeout(std::time::Duration::from_secs(30));
    let mut stream = UserActivityServiceClient::new(ch)
        .stream_user_activity(request)
        .await?
        .into_inner();
    let mut n = 0u32;
    while let Some(item) = stream.next().await {
        item?;
        n += 1;
    }
    let elapsed = t.elapsed();
    println!(
        "StreamUserActivity over {n} users: {:.2} s, {:.0} users/s\n    bfb resident memory before {} KiB (peak so far {} KiB), peak after {} KiB",
        elapsed.as_secs_f64(),
        f64::from(n) / elapsed.as_secs_f64(),
        rss_before.map_or("?".into(), |v| v.to_string()),
        peak_before.map_or("?".into(), |v| v.to_string()),
        status_kib(&bfb, "VmHWM:").map_or("?".into(), |v| v.to_string()),
    );
    Ok(())
}
