//! A burst far past one HTTP/2 connection's streams: 10,000 GetCustomer
//! (40,000 downstream calls) against three `bfb sim` processes answering
//! in 2 s, bulkheads raised. bfb opens more connections per endpoint as
//! streams reach `max_streams_per_connection`, and every call succeeds.
//! (With one connection per downstream the sims' HTTP/2 servers queued or
//! refused the streams.) Alone in its own test binary: it keeps both cores
//! busy for a while (a debug build of three sims and bfb), which would
//! distort the timing-sensitive tests beside it.

mod common;

use std::{collections::BTreeMap, time::Duration};

use bfb::{
    component::Component,
    pb::bfb::{
        customer::v1::{
            GetCustomerRequest, customer_aggregate_service_client::CustomerAggregateServiceClient,
        },
        sim::v1::{Behavior, SetBehaviorRequest, sim_control_client::SimControlClient},
    },
};
use common::{millis, sample};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_ten_thousand_slow_calls_opens_connections_and_all_succeed() {
    let (_sims, addrs, _) = common::sim_replicas(3).await;
    for a in &addrs {
        let mut c = SimControlClient::new(common::channel(*a).await);
        for service in ["profile", "favorites", "reviews", "orders"] {
            c.set_behavior(SetBehaviorRequest {
                service: service.into(),
                behavior: Some(Behavior {
                    latency: millis(2_000),
                    ..Default::default()
                }),
            })
            .await
            .expect("slow");
        }
    }
    let endpoints: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let b = common::start_bfb(([127, 0, 0, 1], 9).into(), |c| {
        for comp in Component::ALL {
            let d = c.downstream_mut(comp).expect("downstream");
            d.endpoint.clear();
            d.endpoints = endpoints.clone();
            d.max_concurrency = 20_000;
            d.timeout = Duration::from_secs(60);
            d.breaker.slow_call = Duration::from_secs(60);
        }
        c.server.max_concurrent_rpcs = 20_000;
        c.deadlines.max = Duration::from_secs(60);
        c.cache.enabled = false;
    })
    .await;
    // 100 connections to bfb, 100 calls on each.
    let mut tasks = Vec::new();
    for conn in 0..100u64 {
        let c = CustomerAggregateServiceClient::new(common::channel(b.addr).await);
        for i in 0..100u64 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                let mut req = tonic::Request::new(GetCustomerRequest {
                    customer_id: format!("c-{}", conn * 100 + i + 1),
                    ..Default::default()
                });
                req.set_timeout(Duration::from_secs(60));
                c.get_customer(req).await.map(|r| r.into_inner())
            }));
        }
    }
    let started = Instant::now();
    let mut failed = BTreeMap::<String, u32>::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(resp) => {
                let status = resp.status.expect("status");
                for (c, s) in status.components {
                    if s.reason != "OK" {
                        *failed.entry(format!("{c}: {}", s.reason)).or_default() += 1;
                    }
                }
            }
            Err(e) => {
                *failed
                    .entry(format!("{:?}: {}", e.code(), e.message()))
                    .or_default() += 1
            }
        }
    }
    eprintln!("10,000 calls took {:?}", started.elapsed());
    assert!(failed.is_empty(), "failures: {failed:?}");
    let text = common::http_get(b.metrics, "/metrics").await;
    let target = endpoints.join(",");
    let conns = sample(
        &text,
        &format!("bfb_endpoint_connections{{target=\"{target}\"}}"),
    );
    assert!(conns > 3.0, "still one connection per endpoint: {conns}");
}
