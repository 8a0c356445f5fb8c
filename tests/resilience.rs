//! Resilience over real gRPC, driven by the sim's run-time fault control:
//! breaker, bulkhead, retry budget and pushback, hedging, a killed downstream
//! process, inbound load shedding, and BEST_EFFORT/ALL × required/optional.

mod common;

use std::time::{Duration, Instant};

use bfb::{
    component::Component,
    pb::bfb::{
        common::v1::{Completeness, ComponentState},
        customer::v1::GetCustomerRequest,
        sim::v1::Behavior,
    },
    sim::SimConfig,
};
use common::{mask, millis, sim_with_latency, start};
use tonic::Code;
use tonic_types::StatusExt;

fn get(id: &str, paths: &[&str], completeness: Completeness) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: id.into(),
        read_mask: mask(paths),
        completeness: completeness as i32,
        ..Default::default()
    }
}

fn failing(code: Code) -> Behavior {
    Behavior {
        error_rate: 1.0,
        error_code: code as i32,
        ..Default::default()
    }
}

fn reason(resp: &bfb::pb::bfb::customer::v1::GetCustomerResponse, component: &str) -> String {
    resp.status.as_ref().expect("status").components[component]
        .reason
        .clone()
}

#[tokio::test]
async fn error_storm_opens_the_breaker_and_probes_close_it() {
    let h = start(SimConfig::default(), |c| {
        let o = c.downstream_mut(Component::Orders).expect("orders");
        o.breaker.window = 10;
        o.breaker.min_calls = 5;
        o.breaker.open_for = Duration::from_millis(300);
        o.breaker.half_open_probes = 2;
        o.retry.max_attempts = 1;
    })
    .await;
    let mut client = h.customers().await;
    h.set_behavior("orders", failing(Code::Unavailable)).await;
    for _ in 0..5 {
        let r = client
            .get_customer(get("c-1", &[], Completeness::BestEffort))
            .await
            .expect("ok")
            .into_inner();
        assert_eq!(reason(&r, "orders"), "UNAVAILABLE");
    }
    let seen = h.service_stats("orders").await.calls;
    assert_eq!(seen, 5);

    // Open: rejected without touching the network.
    for _ in 0..20 {
        let r = client
            .get_customer(get("c-1", &[], Completeness::BestEffort))
            .await
            .expect("ok")
            .into_inner();
        assert_eq!(reason(&r, "orders"), "CIRCUIT_OPEN");
        assert_eq!(reason(&r, "profile"), "OK", "other components unaffected");
    }
    assert_eq!(
        h.service_stats("orders").await.calls,
        seen,
        "no calls while open"
    );
    let err = client
        .get_customer(get("c-1", &["orders"], Completeness::All))
        .await
        .expect_err("all");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.get_details_error_info().expect("info").reason,
        "CIRCUIT_OPEN"
    );
    assert!(err.get_details_retry_info().is_some());

    // The downstream recovers; after open_for, probes close the breaker.
    h.set_behavior("orders", Behavior::default()).await;
    let until = Instant::now() + Duration::from_secs(5);
    let mut ok_in_a_row = 0;
    while ok_in_a_row < 5 {
        assert!(Instant::now() < until, "breaker never closed");
        let r = client
            .get_customer(get("c-1", &["orders"], Completeness::BestEffort))
            .await
            .expect("ok")
            .into_inner();
        if reason(&r, "orders") == "OK" {
            ok_in_a_row += 1;
        } else {
            ok_in_a_row = 0;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(h.service_stats("orders").await.calls >= seen + 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_downstream_saturates_only_its_own_bulkhead() {
    let h = start(SimConfig::default(), |c| {
        let f = c.downstream_mut(Component::Favorites).expect("favorites");
        f.max_concurrency = 2;
        f.timeout = Duration::from_secs(20);
        f.retry.max_attempts = 1;
    })
    .await;
    h.set_behavior(
        "favorites",
        Behavior {
            latency: millis(30_000),
            ..Default::default()
        },
    )
    .await;
    // Two calls hold the favorites bulkhead.
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut c = h.customers().await;
        hogs.push(tokio::spawn(async move {
            c.get_customer(get("c-2", &["favorites"], Completeness::BestEffort))
                .await
        }));
    }
    h.wait_for_stats(|s| s.services["favorites"].in_flight == 2)
        .await;

    let mut client = h.customers().await;
    let started = Instant::now();
    let r = client
        .get_customer(get("c-3", &[], Completeness::BestEffort))
        .await
        .expect("ok")
        .into_inner();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(reason(&r, "favorites"), "BULKHEAD_FULL");
    for c in ["profile", "reviews", "orders"] {
        assert_eq!(reason(&r, c), "OK", "{c}");
    }
    // Calls that do not need favorites keep their latency.
    let started = Instant::now();
    for _ in 0..20 {
        client
            .get_customer(get("c-4", &["profile", "orders"], Completeness::All))
            .await
            .expect("ok");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        h.service_stats("favorites").await.in_flight,
        2,
        "rejected calls never reached it"
    );
    for hog in hogs {
        hog.abort();
    }
}

#[tokio::test]
async fn retries_stay_within_budget_under_a_failing_downstream() {
    // The breaker would stop the storm; keep it closed to see the budget alone.
    let h = start(SimConfig::default(), |c| {
        let b = &mut c
            .downstream_mut(Component::Reviews)
            .expect("reviews")
            .breaker;
        b.window = 1000;
        b.min_calls = 1000;
    })
    .await;
    h.set_behavior("reviews", failing(Code::Unavailable)).await;
    let mut client = h.customers().await;
    let n = 200;
    for _ in 0..n {
        let r = client
            .get_customer(get("c-5", &["reviews"], Completeness::BestEffort))
            .await
            .expect("ok")
            .into_inner();
        assert_eq!(reason(&r, "reviews"), "UNAVAILABLE");
    }
    let calls = h.service_stats("reviews").await.calls;
    // Budget: 20 % of calls plus a floor of 1/s over a 10 s window.
    assert!(calls > n, "retries happened: {calls}");
    assert!(calls <= n + n / 5 + 10, "{calls} calls for {n} requests");
}

#[tokio::test]
async fn only_unavailable_is_retried_and_pushback_is_honoured() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;

    // NOT_FOUND: one call per request.
    for _ in 0..5 {
        let e = client
            .get_customer(get("c-99999", &["orders"], Completeness::All))
            .await
            .expect_err("nf");
        assert_eq!(e.code(), Code::NotFound);
    }
    assert_eq!(h.service_stats("orders").await.calls, 5);

    // INVALID_ARGUMENT from the downstream: one call per request.
    h.set_behavior("favorites", failing(Code::InvalidArgument))
        .await;
    for _ in 0..5 {
        client
            .get_customer(get("c-1", &["favorites"], Completeness::BestEffort))
            .await
            .expect("ok");
    }
    assert_eq!(h.service_stats("favorites").await.calls, 5);

    // Negative pushback: never retried.
    h.set_behavior(
        "profile",
        Behavior {
            retry_pushback_ms: Some(-1),
            ..failing(Code::Unavailable)
        },
    )
    .await;
    for _ in 0..5 {
        client
            .get_customer(get("c-1", &["profile"], Completeness::BestEffort))
            .await
            .expect_err("profile required");
    }
    assert_eq!(h.service_stats("profile").await.calls, 5);

    // Positive pushback: retried, after waiting at least that long.
    h.set_behavior(
        "reviews",
        Behavior {
            retry_pushback_ms: Some(150),
            ..failing(Code::Unavailable)
        },
    )
    .await;
    let started = Instant::now();
    client
        .get_customer(get("c-1", &["reviews"], Completeness::BestEffort))
        .await
        .expect("ok");
    assert_eq!(h.service_stats("reviews").await.calls, 3, "max_attempts");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_sends_a_second_copy_for_slow_calls_and_cancels_the_loser() {
    let h = start(SimConfig::default(), |c| {
        let o = c.downstream_mut(Component::Orders).expect("orders");
        o.hedge.enabled = true;
        o.hedge.min_samples = 20;
        o.retry.budget_percent = 1.0;
        o.timeout = Duration::from_secs(5);
    })
    .await;
    let mut client = h.customers().await;
    h.set_behavior(
        "orders",
        Behavior {
            latency: millis(5),
            ..Default::default()
        },
    )
    .await;
    for _ in 0..40 {
        client
            .get_customer(get("c-1", &["orders"], Completeness::All))
            .await
            .expect("warm up");
    }
    let warm = h.service_stats("orders").await.calls;
    // Now half of the calls take 1 s longer.
    h.set_behavior(
        "orders",
        Behavior {
            latency: millis(5),
            slow_fraction: 0.5,
            slow_extra: millis(1000),
            ..Default::default()
        },
    )
    .await;
    for _ in 0..20 {
        client
            .get_customer(get("c-1", &["orders"], Completeness::All))
            .await
            .expect("ok");
    }
    // The tail-latency effect is measured by `make bench` (docs/performance.md);
    // this test checks the mechanism.
    let stats = h
        .wait_for_stats(|s| s.services["orders"].in_flight == 0)
        .await;
    let sent = stats.services["orders"].calls - warm;
    assert!(sent > 20, "hedges were sent: {sent} calls for 20 requests");
    assert!(
        stats.services["orders"].cancelled > 0,
        "losing copies were cancelled"
    );
}

/// Starts `bfb sim --services orders` as its own process on `addr`.
async fn orders_process(addr: &str) -> (tokio::process::Child, std::net::SocketAddr) {
    common::sim_process(addr, &["--services", "orders"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_downstream_process_degrades_and_recovers() {
    let (mut proc, addr) = orders_process("127.0.0.1:0").await;
    let h = start(SimConfig::default(), |c| {
        let o = c.downstream_mut(Component::Orders).expect("orders");
        o.endpoint = format!("http://{addr}");
        o.breaker.open_for = Duration::from_millis(200);
        o.connect_timeout = Duration::from_millis(200);
    })
    .await;
    // Load in the background while the process dies.
    let load = |h: &common::Harness| {
        let addr = h.bfb;
        tokio::spawn(async move {
            let mut c = bfb::pb::bfb::customer::v1::customer_aggregate_service_client::CustomerAggregateServiceClient::new(
                common::channel(addr).await,
            );
            let mut reasons = Vec::new();
            for _ in 0..50 {
                let r = c
                    .get_customer(get("c-9", &[], Completeness::BestEffort))
                    .await
                    .expect("best effort never fails here");
                let r = r.into_inner();
                assert_eq!(reason(&r, "profile"), "OK");
                reasons.push(reason(&r, "orders"));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reasons
        })
    };
    let tasks: Vec<_> = (0..4).map(|_| load(&h)).collect();
    // Kill it once the load has reached it (its own SimControl tells).
    let mut control = bfb::pb::bfb::sim::v1::sim_control_client::SimControlClient::new(
        common::channel(addr).await,
    );
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = control
            .get_stats(bfb::pb::bfb::sim::v1::GetStatsRequest {})
            .await
            .expect("stats")
            .into_inner();
        if stats.services["orders"].calls >= 8 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the load never reached the orders process"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proc.kill().await.expect("kill");
    let mut seen = std::collections::BTreeSet::new();
    for t in tasks {
        seen.extend(t.await.expect("no panic"));
    }
    assert!(seen.contains("OK"), "{seen:?}");
    assert!(
        seen.iter()
            .any(|r| ["UNAVAILABLE", "CIRCUIT_OPEN", "NO_ENDPOINTS"].contains(&r.as_str())),
        "the kill was noticed: {seen:?}"
    );
    let mut client = h.customers().await;
    let err = client
        .get_customer(get("c-9", &["orders"], Completeness::All))
        .await
        .expect_err("down");
    assert_eq!(err.code(), Code::Unavailable);

    // Started again on the same address: bfb recovers by itself.
    let (_proc, _) = orders_process(&addr.to_string()).await;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client
            .get_customer(get("c-9", &["orders"], Completeness::BestEffort))
            .await
            .expect("ok")
            .into_inner();
        if reason(&r, "orders") == "OK" {
            break;
        }
        assert!(
            Instant::now() < until,
            "never recovered: {}",
            reason(&r, "orders")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_global_cap_calls_are_shed_at_once() {
    let h = start(sim_with_latency(Duration::from_millis(500)), |c| {
        c.server.max_concurrent_rpcs = 4;
    })
    .await;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let addr = h.bfb;
        tasks.push(tokio::spawn(async move {
            let mut c = bfb::pb::bfb::customer::v1::customer_aggregate_service_client::CustomerAggregateServiceClient::new(
                common::channel(addr).await,
            );
            let started = Instant::now();
            let r = c.get_customer(get("c-1", &[], Completeness::BestEffort)).await;
            (r, started.elapsed())
        }));
    }
    // Health answers while bfb is saturated.
    h.wait_for_stats(|s| s.peak_total_in_flight >= 4).await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(common::channel(h.bfb).await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is exempt from shedding");
    assert_eq!(
        status.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        match t.await.expect("join") {
            (Ok(_), _) => ok += 1,
            (Err(e), took) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(e.get_details_retry_info().is_some());
                assert!(took < Duration::from_millis(400), "shed late: {took:?}");
                shed += 1;
            }
        }
    }
    assert_eq!((ok, shed), (4, 8));
}

#[tokio::test]
async fn best_effort_and_all_with_required_and_optional_components() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;
    // (failing component, completeness, expected code or None for success)
    let cases = [
        ("orders", Completeness::BestEffort, None),
        ("orders", Completeness::Unspecified, None),
        ("orders", Completeness::All, Some(Code::Unavailable)),
        ("profile", Completeness::BestEffort, Some(Code::Unavailable)),
        ("profile", Completeness::All, Some(Code::Unavailable)),
    ];
    for (component, completeness, want) in cases {
        h.control()
            .await
            .reset(bfb::pb::bfb::sim::v1::ResetRequest {})
            .await
            .expect("reset");
        h.set_behavior(component, failing(Code::Internal)).await;
        let result = client.get_customer(get("c-1", &[], completeness)).await;
        match (result, want) {
            (Ok(r), None) => {
                let r = r.into_inner();
                let status = r.status.expect("status");
                assert!(status.degraded);
                assert_eq!(
                    status.components[component].state,
                    ComponentState::Error as i32
                );
                assert_eq!(status.components[component].reason, "DOWNSTREAM_ERROR");
                let c = r.customer.expect("customer");
                assert!(c.orders.is_none() && c.profile.is_some() && c.reviews.is_some());
            }
            (Err(e), Some(code)) => {
                assert_eq!(e.code(), code, "{component} {completeness:?}");
                let info = e.get_details_error_info().expect("info");
                assert_eq!(info.metadata["component"], component);
            }
            (other, want) => panic!("{component} {completeness:?}: got {other:?}, want {want:?}"),
        }
    }
    // Nothing failing: not degraded, under either mode.
    h.control()
        .await
        .reset(bfb::pb::bfb::sim::v1::ResetRequest {})
        .await
        .expect("reset");
    for completeness in [Completeness::BestEffort, Completeness::All] {
        let r = client
            .get_customer(get("c-1", &[], completeness))
            .await
            .expect("ok")
            .into_inner();
        assert!(!r.status.expect("status").degraded);
    }
}
