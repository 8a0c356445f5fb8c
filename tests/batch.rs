//! Many entities per call: BatchGetCustomers (v1 and v2) and
//! StreamUserActivity, their per-item outcomes, the batching of their
//! downstream lookups (sim call counts), flow control and the deadline.

mod common;

use std::time::Duration;

use bfb::{
    pb::bfb::{
        activity::v1::{
            StreamUserActivityRequest, UserIds, UserRange, stream_user_activity_request::Users,
        },
        customer::{
            v1::{BatchGetCustomersRequest, GetCustomerRequest},
            v2,
        },
        sim::v1::Behavior,
    },
    sim::SimConfig,
};
use common::{mask, start};
use futures::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

fn ids(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("c-{i}")).collect()
}

fn batch(ids: Vec<String>) -> BatchGetCustomersRequest {
    BatchGetCustomersRequest {
        customer_ids: ids,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_hundred_customers_take_a_handful_of_calls_per_component() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;
    let answer = client
        .batch_get_customers(batch(ids(100)))
        .await
        .expect("served")
        .into_inner();
    assert_eq!(answer.results.len(), 100);
    for (i, r) in answer.results.iter().enumerate() {
        assert_eq!(r.customer_id, format!("c-{}", i + 1), "request order");
        assert!(r.error.is_none(), "{:?}", r.error);
        let c = r.customer.as_ref().expect("customer");
        assert!(c.profile.is_some() && c.orders.is_some());
        assert!(!r.status.as_ref().expect("status").degraded);
    }
    let calls = h.calls().await;
    for component in ["profile", "favorites", "reviews", "orders"] {
        assert!(
            (1..=3).contains(&calls[component]),
            "{component}: {} calls for 100 customers",
            calls[component]
        );
    }
    // The same data as one GetCustomer.
    let single = client
        .get_customer(GetCustomerRequest {
            customer_id: "c-42".into(),
            ..Default::default()
        })
        .await
        .expect("single")
        .into_inner();
    assert_eq!(single.customer, answer.results[41].customer);
}

#[tokio::test]
async fn one_customers_failure_stays_its_own() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;
    let answer = client
        .batch_get_customers(batch(vec![
            "c-1".into(),
            "c-999999999".into(),
            "c-1".into(),
        ]))
        .await
        .expect("the batch is served")
        .into_inner();
    assert!(answer.results[0].customer.is_some());
    assert!(
        answer.results[2].customer.is_some(),
        "duplicates answered twice"
    );
    let missing = &answer.results[1];
    assert!(missing.customer.is_none());
    let error = missing.error.as_ref().expect("its own error");
    assert_eq!(error.code, Code::NotFound as i32);
    let status = tonic::Status::with_details(
        Code::from_i32(error.code),
        error.message.clone(),
        prost::Message::encode_to_vec(error).into(),
    );
    assert_eq!(
        status.get_details_error_info().expect("details").reason,
        "CUSTOMER_NOT_FOUND"
    );

    // An optional component failing degrades each item; the batch succeeds.
    h.set_behavior(
        "orders",
        Behavior {
            error_rate: 1.0,
            error_code: Code::Unavailable as i32,
            ..Default::default()
        },
    )
    .await;
    let answer = client
        .batch_get_customers(batch(ids(5)))
        .await
        .expect("served")
        .into_inner();
    for r in &answer.results {
        let status = r.status.as_ref().expect("status");
        assert!(status.degraded);
        assert_eq!(status.components["orders"].reason, "UNAVAILABLE");
        assert!(
            r.customer
                .as_ref()
                .and_then(|c| c.profile.as_ref())
                .is_some()
        );
    }
}

#[tokio::test]
async fn invalid_batches_are_rejected_before_any_call() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;
    let cases = [
        (vec![], "customer_ids"),
        (ids(101), "customer_ids"),
        (vec!["c-1".into(), "c 2".into()], "customer_ids[1]"),
    ];
    for (ids, field) in cases {
        let status = client
            .batch_get_customers(batch(ids))
            .await
            .expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().expect("violations");
        assert!(
            bad.field_violations.iter().any(|v| v.field == field),
            "{field}: {bad:?}"
        );
    }
    assert!(h.calls().await.values().all(|&n| n == 0));
}

#[tokio::test]
async fn v2_batches_too_and_cached_items_are_not_fetched_again() {
    let h = start(SimConfig::default(), |c| c.cache.enabled = true).await;
    let mut v1 = h.customers().await;
    v1.get_customer(GetCustomerRequest {
        customer_id: "c-3".into(),
        read_mask: mask(&["profile"]),
        ..Default::default()
    })
    .await
    .expect("warm");
    let mut v2 = v2::customer_aggregate_service_client::CustomerAggregateServiceClient::new(
        common::channel(h.bfb).await,
    );
    let answer = v2
        .batch_get_customers(v2::BatchGetCustomersRequest {
            customer_ids: vec!["c-3".into()],
            read_mask: mask(&["profile", "orders"]),
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("served")
        .into_inner();
    let customer = answer.results[0].customer.as_ref().expect("customer");
    assert!(customer.orders.as_ref().expect("orders").items.len() <= 2);
    let calls = h.calls().await;
    assert_eq!(calls["profile"], 1, "c-3's profile came from the cache");
    assert_eq!(calls["orders"], 1);
}

fn range(count: u32) -> StreamUserActivityRequest {
    StreamUserActivityRequest {
        users: Some(Users::UserRange(UserRange {
            prefix: "u-".into(),
            first: 1,
            count,
        })),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_stream_of_a_thousand_users_arrives_in_order_with_batched_calls() {
    let h = start(SimConfig::default(), |c| {
        c.deadlines.default = Duration::from_secs(30)
    })
    .await;
    let mut stream = h
        .activity()
        .await
        .stream_user_activity(range(1000))
        .await
        .expect("stream")
        .into_inner();
    let mut n = 0;
    while let Some(item) = stream.next().await {
        let item = item.expect("item");
        n += 1;
        assert_eq!(item.user_id, format!("u-{n}"));
        assert!(item.error.is_none());
        assert!(item.activity.is_some());
    }
    assert_eq!(n, 1000);
    // 1000 users in chunks of 64: about 16 batches per channel. Names are
    // looked up per counterparty (dozens per user), up to 1000 per batch.
    let calls = h.calls().await;
    for (component, most) in [
        ("calls", 32),
        ("emails", 32),
        ("sms", 32),
        ("directory", 100),
    ] {
        assert!(
            calls[component] <= most,
            "{component}: {} calls for 1000 users",
            calls[component]
        );
    }

    // Explicit ids, one unknown: its own error.
    let items: Vec<_> = h
        .activity()
        .await
        .stream_user_activity(StreamUserActivityRequest {
            users: Some(Users::UserIds(UserIds {
                ids: vec!["u-1".into(), "u-999999999".into()],
            })),
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner()
        .collect()
        .await;
    let items: Vec<_> = items.into_iter().map(|i| i.expect("item")).collect();
    assert!(items[0].error.is_none());
    assert_eq!(
        items[1].error.as_ref().map(|e| e.code),
        Some(Code::NotFound as i32)
    );
}

#[tokio::test]
async fn a_slow_reader_holds_the_stream_back() {
    let h = start(SimConfig::default(), |c| {
        c.deadlines.default = Duration::from_secs(20)
    })
    .await;
    // A reader with HTTP/2's default 64 KiB windows (tonic's are larger).
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.bfb))
        .expect("uri")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect");
    let mut stream =
        bfb::pb::bfb::activity::v1::user_activity_service_client::UserActivityServiceClient::new(
            channel,
        )
        .stream_user_activity(range(10_000))
        .await
        .expect("stream")
        .into_inner();
    stream.next().await.expect("first").expect("ok");
    // Not reading: bfb fills HTTP/2's buffers and then stops fetching. The
    // sim's counters say when: no call in flight and the count unchanged
    // over 20 consecutive readings (bounded). A bfb that kept fetching would
    // reach all 157 batches instead.
    let mut quiet = 0;
    let mut last = u64::MAX;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let batches = loop {
        let stats = h.service_stats("calls").await;
        quiet = if stats.calls == last && stats.in_flight == 0 {
            quiet + 1
        } else {
            0
        };
        last = stats.calls;
        if quiet >= 20 {
            break last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fetching never stopped: {last} batches"
        );
    };
    // All 10,000 users would take at least 10_000 / 64 = 157 batches.
    assert!(
        batches < 60,
        "{batches} batches fetched for a stalled reader"
    );
}

#[tokio::test]
async fn the_deadline_covers_the_whole_stream() {
    let h = start(common::sim_with_latency(Duration::from_millis(20)), |c| {
        c.deadlines.default = Duration::from_millis(300)
    })
    .await;
    let mut stream = h
        .activity()
        .await
        .stream_user_activity(range(10_000))
        .await
        .expect("stream")
        .into_inner();
    let mut delivered = 0;
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => delivered += 1,
            Some(Err(status)) => break status,
            None => panic!("ended without an error after {delivered}"),
        }
    };
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    assert!(delivered < 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_items_of_batches_and_streams_are_counted() {
    let h = start(SimConfig::default(), |_| {}).await;
    let fail = Behavior {
        error_rate: 1.0,
        error_code: Code::Internal as i32,
        ..Default::default()
    };
    h.set_behavior("orders", fail).await;
    h.set_behavior("sms", fail).await;
    let degraded = |text: &str, component: &str| {
        common::sample(
            text,
            &format!(
                "bfb_degraded_responses_total{{component=\"{component}\",reason=\"DOWNSTREAM_ERROR\"}}"
            ),
        )
    };
    let fanned = |text: &str, method: &str| {
        common::sample(
            text,
            &format!("bfb_fanout_components_count{{method=\"{method}\"}}"),
        )
    };
    let before = h.metrics_text().await;

    let answer = h
        .customers()
        .await
        .batch_get_customers(batch(ids(3)))
        .await
        .expect("batch")
        .into_inner();
    assert!(answer.results.iter().all(|r| r.error.is_none()));
    let items: Vec<_> = h
        .activity()
        .await
        .stream_user_activity(range(4))
        .await
        .expect("stream")
        .into_inner()
        .collect()
        .await;
    assert_eq!(items.len(), 4);

    let after = h.metrics_text().await;
    assert_eq!(
        degraded(&after, "orders") - degraded(&before, "orders"),
        3.0,
        "one per batch item"
    );
    assert_eq!(
        degraded(&after, "sms") - degraded(&before, "sms"),
        4.0,
        "one per streamed user"
    );
    assert_eq!(
        fanned(&after, "BatchGetCustomers") - fanned(&before, "BatchGetCustomers"),
        3.0
    );
    assert_eq!(
        fanned(&after, "StreamUserActivity") - fanned(&before, "StreamUserActivity"),
        4.0
    );
}
