//! `make bench` (second part): hedging cuts the tail.
//!
//! One `bfb sim` (every service 1 ms) and two `bfb serve` processes on the
//! same config, one with hedging on for every downstream. The orders service
//! then slows 5 % of its calls by 200 ms, and GetCustomer (all four
//! components) runs at concurrency 1 against each bfb in turn.

mod common;

use bfb::pb::bfb::{
    customer::v1::{
        GetCustomerRequest, customer_aggregate_service_client::CustomerAggregateServiceClient,
    },
    sim::v1::{Behavior, SetBehaviorRequest, sim_control_client::SimControlClient},
};
use common::{Boxed, channel, row, sequential, start_bfb, start_sim};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Boxed> {
    let calls: u64 = common::env_or("BENCH_HEDGE_CALLS", 2000);
    let (_sim, sim) = start_sim("1ms").await?;
    let (_plain, plain) = start_bfb(sim, "plain", |c| c).await?;
    const OFF: &str = "enabled = false\npercentile = 0.95";
    if !bfb::config::EXAMPLE.contains(OFF) {
        return Err("the example config's hedge section changed; update this bench".into());
    }
    let (_hedged, hedged) = start_bfb(sim, "hedged", |c| {
        c.replace(OFF, "enabled = true\npercentile = 0.95")
    })
    .await?;
    let ms = |n: u64| prost_types::Duration::try_from(std::time::Duration::from_millis(n)).ok();
    SimControlClient::new(channel(sim).await?)
        .set_behavior(SetBehaviorRequest {
            service: "orders".into(),
            behavior: Some(Behavior {
                latency: ms(1),
                slow_fraction: 0.05,
                slow_extra: ms(200),
                ..Default::default()
            }),
        })
        .await?;

    println!(
        "hedging bench: orders slows 5 % of calls by 200 ms; every service 1 ms; concurrency 1"
    );
    for (name, addr) in [("without hedging", plain), ("with hedging (p95)", hedged)] {
        let client = CustomerAggregateServiceClient::new(channel(addr).await?);
        let mut call = |i: u64| {
            let mut c = client.clone();
            async move {
                c.get_customer(GetCustomerRequest {
                    customer_id: format!("c-{}", i % 10_000 + 1),
                    ..Default::default()
                })
                .await
                .map(drop)
            }
        };
        // Warm-up: connections, and the latency percentile hedging needs.
        sequential(300, &mut call).await?;
        let h = sequential(calls, &mut call).await?;
        row(name, &h);
    }
    Ok(())
}
