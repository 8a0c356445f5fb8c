//! The v2 customer contract served beside v1 from the same engine: exact
//! money that agrees with v1, summaries, page tokens, shared downstream calls
//! across versions, and both versions in health and reflection.

mod common;

use std::time::Duration;

use bfb::{
    pb::bfb::{
        common::v1::DataSource,
        customer::{
            v1::{self, customer_aggregate_service_client::CustomerAggregateServiceClient as V1},
            v2::{
                self, PageRequest,
                customer_aggregate_service_client::CustomerAggregateServiceClient as V2,
            },
        },
    },
    sim::SimConfig,
};
use tonic::Code;
use tonic_types::StatusExt;

fn v2_get(id: &str) -> v2::GetCustomerRequest {
    v2::GetCustomerRequest {
        customer_id: id.into(),
        ..Default::default()
    }
}

/// A customer with more than a page of orders in the simulated data.
async fn busy_customer(client: &mut V2<tonic::transport::Channel>) -> (String, v2::Customer) {
    for n in 1..200 {
        let id = format!("c-{n}");
        let c = client
            .get_customer(v2_get(&id))
            .await
            .expect("ok")
            .into_inner()
            .customer
            .expect("customer");
        if c.orders.as_ref().is_some_and(|o| o.total_count > 12) {
            return (id, c);
        }
    }
    panic!("no customer with more than 12 orders in c-1..c-199");
}

#[tokio::test]
async fn v2_agrees_with_v1_with_exact_money_and_summaries() {
    let h = common::start(SimConfig::default(), |_| {}).await;
    let mut v2c = V2::new(common::channel(h.bfb).await);
    let mut v1c = V1::new(common::channel(h.bfb).await);
    let (id, c2) = busy_customer(&mut v2c).await;
    let c1 = v1c
        .get_customer(v1::GetCustomerRequest {
            customer_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("v1")
        .into_inner()
        .customer
        .expect("customer");

    let (o1, o2) = (c1.orders.expect("v1 orders"), c2.orders.expect("v2 orders"));
    let totals = o1.totals.expect("totals");
    assert_eq!(o2.total_count, totals.count);
    let minor: i64 = o2
        .by_currency
        .iter()
        .map(|c| c.total.as_ref().expect("money").minor_units)
        .sum();
    assert!(
        (minor as f64 / 100.0 - totals.total_spent).abs() < 1e-6,
        "{minor} vs {}",
        totals.total_spent
    );
    assert_eq!(
        o2.by_status.iter().map(|s| s.count).sum::<i32>(),
        o2.total_count
    );

    let (r1, r2) = (
        c1.reviews.expect("v1 reviews"),
        c2.reviews.expect("v2 reviews"),
    );
    let summary = r1.summary.expect("summary");
    assert_eq!(r2.count, summary.count);
    assert_eq!(r2.rating_histogram.len(), 5);
    assert_eq!(r2.rating_histogram.iter().sum::<i32>(), r2.count);
    if r2.count > 0 {
        let weighted: i32 = r2
            .rating_histogram
            .iter()
            .enumerate()
            .map(|(i, n)| (i as i32 + 1) * n)
            .sum();
        assert!((f64::from(weighted) / f64::from(r2.count) - summary.average_rating).abs() < 1e-9);
    }
    assert_eq!(
        c2.profile.expect("profile").display_name,
        c1.profile.expect("profile").display_name
    );
}

#[tokio::test]
async fn page_tokens_walk_every_order_once() {
    let h = common::start(SimConfig::default(), |_| {}).await;
    let mut client = V2::new(common::channel(h.bfb).await);
    let (id, first) = busy_customer(&mut client).await;
    let total = first.orders.expect("orders").total_count;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let req = v2::GetCustomerRequest {
            read_mask: common::mask(&["orders"]),
            orders_page: Some(PageRequest {
                page_size: 5,
                page_token: token.clone(),
            }),
            ..v2_get(&id)
        };
        let o = client
            .get_customer(req)
            .await
            .expect("ok")
            .into_inner()
            .customer
            .expect("c")
            .orders
            .expect("orders");
        assert!(o.items.len() <= 5);
        seen.extend(o.items.into_iter().map(|i| i.order_id));
        if o.next_page_token.is_empty() {
            break;
        }
        token = o.next_page_token;
    }
    assert_eq!(seen.len() as i32, total);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no order twice");

    // A favorites token is not an orders token; sizes are bounded.
    let err = client
        .get_customer(v2::GetCustomerRequest {
            orders_page: Some(PageRequest {
                page_size: 500,
                page_token: "not-a-token".into(),
            }),
            ..v2_get(&id)
        })
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields: Vec<String> = err
        .get_details_bad_request()
        .expect("details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["orders_page.page_size", "orders_page.page_token"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_versions_share_downstream_calls_and_cache_entries() {
    let h = common::start(common::sim_with_latency(Duration::from_millis(50)), |c| {
        c.cache.enabled = true;
    })
    .await;
    let (addr, id) = (h.bfb, "c-88");
    let mut tasks = Vec::new();
    for i in 0..40 {
        tasks.push(tokio::spawn(async move {
            let ch = common::channel(addr).await;
            if i % 2 == 0 {
                V1::new(ch)
                    .get_customer(v1::GetCustomerRequest {
                        customer_id: id.into(),
                        ..Default::default()
                    })
                    .await
                    .map(drop)
            } else {
                V2::new(ch).get_customer(v2_get(id)).await.map(drop)
            }
        }));
    }
    for t in tasks {
        t.await.expect("join").expect("ok");
    }
    let calls = h.calls().await;
    for c in ["profile", "favorites", "reviews", "orders"] {
        assert_eq!(calls[c], 1, "{c}: one call for 20 v1 and 20 v2 requests");
    }
    let r = V2::new(common::channel(addr).await)
        .get_customer(v2_get(id))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(
        r.status.expect("status").components["orders"].source,
        DataSource::Cache as i32
    );
}

#[tokio::test]
async fn v2_is_in_health_and_reflection() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let h = common::start(SimConfig::default(), |_| {}).await;
    let mut health = HealthClient::new(common::channel(h.bfb).await);
    for service in [
        "bfb.customer.v1.CustomerAggregateService",
        "bfb.customer.v2.CustomerAggregateService",
    ] {
        let s = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check");
        assert_eq!(
            s.into_inner().status,
            ServingStatus::Serving as i32,
            "{service}"
        );
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut r = ServerReflectionClient::new(common::channel(h.bfb).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = r
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers
        .message()
        .await
        .expect("stream")
        .expect("answer")
        .message_response
    else {
        panic!("unexpected answer");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "bfb.customer.v2.CustomerAggregateService")
    );
}
