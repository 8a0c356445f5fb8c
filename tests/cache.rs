//! The component cache over real gRPC: coalescing of concurrent cold
//! requests, hits shared across read masks, keys that separate ids and
//! windows, stale-if-error as FALLBACK, and caller control.

mod common;

use std::time::Duration;

use bfb::{
    component::Component,
    config::Config,
    pb::bfb::{
        activity::v1::{GetUserActivityRequest, TimeWindow},
        common::v1::{CachePolicy, Completeness, ComponentState, DataSource},
        customer::v1::{GetCustomerRequest, GetCustomerResponse},
        sim::v1::Behavior,
    },
    sim::SimConfig,
};
use common::{mask, millis, start};
use tonic::Code;

fn cached(c: &mut Config) {
    c.cache.enabled = true;
    c.cache.jitter = 0.0;
}

fn get(id: &str) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: id.into(),
        ..Default::default()
    }
}

fn status(r: &GetCustomerResponse, c: &str) -> bfb::pb::bfb::common::v1::ComponentStatus {
    r.status.as_ref().expect("status").components[c].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_make_one_call_per_component() {
    let h = start(common::sim_with_latency(Duration::from_millis(50)), cached).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let addr = h.bfb;
        tasks.push(tokio::spawn(async move {
            let mut c = bfb::pb::bfb::customer::v1::customer_aggregate_service_client::CustomerAggregateServiceClient::new(
                common::channel(addr).await,
            );
            c.get_customer(get("c-77")).await.map(|r| r.into_inner())
        }));
    }
    let mut names = std::collections::BTreeSet::new();
    for t in tasks {
        let r = t.await.expect("join").expect("ok");
        names.insert(
            r.customer
                .expect("customer")
                .profile
                .expect("profile")
                .display_name,
        );
    }
    assert_eq!(names.len(), 1, "everyone got the same answer");
    let calls = h.calls().await;
    for c in ["profile", "favorites", "reviews", "orders"] {
        assert_eq!(calls[c], 1, "{c}: {calls:?}");
    }

    // The next request is served from the cache, and says so.
    let r = h
        .customers()
        .await
        .get_customer(get("c-77"))
        .await
        .expect("ok")
        .into_inner();
    let s = status(&r, "orders");
    assert_eq!(
        (s.state, s.source),
        (ComponentState::Ok as i32, DataSource::Cache as i32)
    );
    assert!(s.age.is_some());
    assert_eq!(h.calls().await["orders"], 1);
}

#[tokio::test]
async fn entries_are_shared_across_masks_and_separated_by_id_and_window() {
    let h = start(SimConfig::default(), cached).await;
    let mut customers = h.customers().await;
    customers.get_customer(get("c-1")).await.expect("warm");
    // A narrower mask reads the same component entries.
    let r = customers
        .get_customer(GetCustomerRequest {
            read_mask: mask(&["orders"]),
            ..get("c-1")
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(status(&r, "orders").source, DataSource::Cache as i32);
    // Another id never shares them.
    customers.get_customer(get("c-2")).await.expect("ok");
    assert_eq!(h.calls().await["orders"], 2);

    let mut activity = h.activity().await;
    let window = |start: i64| TimeWindow {
        start_time: Some(prost_types::Timestamp {
            seconds: start,
            nanos: 0,
        }),
        end_time: None,
    };
    let req = |w: Option<TimeWindow>| GetUserActivityRequest {
        user_id: "u-5".into(),
        window: w,
        read_mask: mask(&["calls"]),
        ..Default::default()
    };
    activity.get_user_activity(req(None)).await.expect("ok");
    activity.get_user_activity(req(None)).await.expect("ok");
    activity
        .get_user_activity(req(Some(window(1_700_000_000))))
        .await
        .expect("ok");
    activity
        .get_user_activity(req(Some(window(1_700_000_001))))
        .await
        .expect("ok");
    assert_eq!(h.calls().await["calls"], 3, "one per distinct window");
}

#[tokio::test]
async fn a_failing_downstream_is_answered_from_the_cache_as_fallback() {
    let h = start(SimConfig::default(), |c| {
        cached(c);
        // No fresh or revalidation window: every read tries the downstream.
        c.cache.ttl = Duration::from_millis(1);
        c.cache.stale_while_revalidate = Duration::ZERO;
        c.cache.stale_ttl = Duration::from_secs(3600);
        c.downstream_mut(Component::Orders)
            .expect("orders")
            .retry
            .max_attempts = 1;
    })
    .await;
    let mut client = h.customers().await;
    let warm = client
        .get_customer(get("c-3"))
        .await
        .expect("warm")
        .into_inner();
    let orders = warm.customer.expect("customer").orders.expect("orders");
    h.set_behavior(
        "orders",
        Behavior {
            error_rate: 1.0,
            ..Default::default()
        },
    )
    .await;

    let r = client
        .get_customer(get("c-3"))
        .await
        .expect("best effort")
        .into_inner();
    let s = status(&r, "orders");
    assert_eq!(s.state, ComponentState::Fallback as i32);
    assert_eq!(s.reason, "UNAVAILABLE");
    assert_eq!(s.source, DataSource::Cache as i32);
    assert!(s.age.is_some());
    assert!(r.status.as_ref().expect("status").degraded);
    assert_eq!(
        r.customer.expect("customer").orders.expect("stale orders"),
        orders
    );

    // Under ALL every component is required: no stale data unless configured.
    let err = client
        .get_customer(GetCustomerRequest {
            completeness: Completeness::All as i32,
            ..get("c-3")
        })
        .await
        .expect_err("all");
    assert_eq!(err.code(), Code::Unavailable);
}

#[tokio::test]
async fn fresh_and_max_staleness_reach_the_downstream() {
    let h = start(SimConfig::default(), cached).await;
    let mut client = h.customers().await;
    client.get_customer(get("c-4")).await.expect("warm");
    let fresh = CachePolicy {
        fresh: true,
        max_staleness: None,
    };
    let r = client
        .get_customer(GetCustomerRequest {
            cache: Some(fresh),
            ..get("c-4")
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(status(&r, "profile").source, DataSource::Live as i32);
    assert_eq!(h.calls().await["profile"], 2);

    // The entry is older than 0 after any round trip.
    let zero = CachePolicy {
        fresh: false,
        max_staleness: millis(0),
    };
    client
        .get_customer(GetCustomerRequest {
            cache: Some(zero),
            ..get("c-4")
        })
        .await
        .expect("ok");
    assert_eq!(h.calls().await["profile"], 3);

    let bad = CachePolicy {
        fresh: false,
        max_staleness: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
    };
    let err = client
        .get_customer(GetCustomerRequest {
            cache: Some(bad),
            ..get("c-4")
        })
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
}
