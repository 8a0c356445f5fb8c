//! The aggregates over real gRPC: concurrency, deadline propagation, read
//! masks, enrichment, and every error path with its status and details.

mod common;

use std::time::{Duration, Instant};

use bfb::{
    component::Component,
    pb::bfb::{
        activity::v1::{GetUserActivityRequest, TimeWindow},
        common::v1::{Completeness, ComponentState, DataSource},
        customer::v1::GetCustomerRequest,
        sim::v1::Behavior,
    },
    sim::SimConfig,
};
use common::{mask, millis, sim_with_latency, start, with_timeout};
use tonic::Code;
use tonic_types::StatusExt;

fn get(id: &str) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn components_are_fetched_concurrently() {
    let h = start(sim_with_latency(Duration::from_millis(100)), |_| {}).await;
    let mut client = h.customers().await;
    let started = Instant::now();
    let resp = client
        .get_customer(get("c-42"))
        .await
        .expect("ok")
        .into_inner();
    let took = started.elapsed();

    let customer = resp.customer.expect("customer");
    assert!(customer.profile.is_some() && customer.favorites.is_some());
    assert!(customer.reviews.is_some() && customer.orders.is_some());
    let stats = h.stats().await;
    // All four downstream calls were in flight at the same moment.
    assert_eq!(stats.peak_total_in_flight, 4);
    for s in ["profile", "favorites", "reviews", "orders"] {
        assert_eq!(stats.services[s].calls, 1, "{s}");
    }
    // Sequential calls would take at least 400 ms.
    assert!(took < Duration::from_millis(400), "took {took:?}");
}

#[tokio::test]
async fn caller_deadline_bounds_every_downstream_call() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;
    client
        .get_customer(with_timeout(get("c-1"), Duration::from_millis(500)))
        .await
        .expect("ok");
    let stats = h.stats().await;
    for s in ["profile", "favorites", "reviews", "orders"] {
        let seen = stats.services[s]
            .last_grpc_timeout
            .expect("grpc-timeout sent");
        let seen = Duration::try_from(seen).expect("positive");
        // At most what the caller sent, minus bfb's reserve.
        assert!(seen <= Duration::from_millis(497), "{s}: {seen:?}");
        assert!(seen > Duration::from_millis(300), "{s}: {seen:?}");
    }

    // Without a caller deadline, each downstream gets its own timeout
    // (directory has a shorter one in the example config).
    let mut activity = h.activity().await;
    activity
        .get_user_activity(GetUserActivityRequest {
            user_id: "u-7".into(),
            ..Default::default()
        })
        .await
        .expect("ok");
    let stats = h.stats().await;
    let directory =
        Duration::try_from(stats.services["directory"].last_grpc_timeout.expect("sent"))
            .expect("ok");
    assert_eq!(directory, Duration::from_millis(300));
    let calls =
        Duration::try_from(stats.services["calls"].last_grpc_timeout.expect("sent")).expect("ok");
    assert_eq!(calls, Duration::from_secs(1));
}

#[tokio::test]
async fn short_deadline_ends_the_call_and_cancels_downstream_calls() {
    // bfb's own deadline is the short one (the 200 ms cap below a 5 s caller
    // deadline): a tonic client also enforces its own grpc-timeout locally,
    // and under load its timer could beat bfb's answer to the caller.
    let h = start(sim_with_latency(Duration::from_secs(3)), |c| {
        c.deadlines.default = Duration::from_millis(200);
        c.deadlines.max = Duration::from_millis(200);
    })
    .await;
    let mut client = h.customers().await;
    let started = Instant::now();
    let err = client
        .get_customer(with_timeout(get("c-1"), Duration::from_secs(5)))
        .await
        .expect_err("deadline");
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        took >= Duration::from_millis(190),
        "answered early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "answered late: {took:?}"
    );
    let info = err.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "DEADLINE_EXCEEDED");
    assert_eq!(info.metadata["component"], "profile");

    // Every downstream call was cancelled, none ran to its 3 s end.
    h.assert_each_cancelled_once(&["profile", "favorites", "reviews", "orders"])
        .await;
}

#[tokio::test]
async fn too_little_time_fails_fast_without_calling() {
    // A 10 ms deadline minus a 9 ms reserve leaves less than the 2 ms a
    // downstream call needs (set in config, not by a tiny client timeout,
    // which the client would enforce itself).
    let h = start(SimConfig::default(), |c| {
        c.deadlines.default = Duration::from_millis(10);
        c.deadlines.max = Duration::from_millis(10);
        c.deadlines.reserve = Duration::from_millis(9);
    })
    .await;
    let mut client = h.customers().await;
    let err = client
        .get_customer(get("c-1"))
        .await
        .expect_err("no budget");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(
        err.get_details_error_info().expect("info").reason,
        "NO_BUDGET"
    );
    assert!(h.calls().await.values().all(|&n| n == 0));
}

#[tokio::test]
async fn read_mask_calls_only_the_named_components() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;
    let resp = client
        .get_customer(GetCustomerRequest {
            customer_id: "c-7".into(),
            read_mask: mask(&["orders", "profile"]),
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner();
    let calls = h.calls().await;
    assert_eq!((calls["profile"], calls["orders"]), (1, 1));
    assert_eq!((calls["favorites"], calls["reviews"]), (0, 0));
    let c = resp.customer.expect("customer");
    assert!(c.profile.is_some() && c.orders.is_some());
    assert!(c.favorites.is_none() && c.reviews.is_none());
    let status = resp.status.expect("status");
    assert!(!status.degraded);
    assert_eq!(
        status.components["reviews"].state,
        ComponentState::Skipped as i32
    );
    assert_eq!(status.components["orders"].state, ComponentState::Ok as i32);
    assert_eq!(status.components["orders"].source, DataSource::Live as i32);

    let mut activity = h.activity().await;
    activity
        .get_user_activity(GetUserActivityRequest {
            user_id: "u-3".into(),
            read_mask: mask(&["sms"]),
            ..Default::default()
        })
        .await
        .expect("ok");
    let calls = h.calls().await;
    assert_eq!((calls["sms"], calls["calls"], calls["emails"]), (1, 0, 0));
}

#[tokio::test]
async fn activity_is_enriched_with_one_directory_call() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.activity().await;
    let resp = client
        .get_user_activity(GetUserActivityRequest {
            user_id: "u-7".into(),
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner();
    let a = resp.activity.expect("activity");
    let (calls, emails, sms) = (
        a.calls.expect("calls"),
        a.emails.expect("emails"),
        a.sms.expect("sms"),
    );
    let records = calls.records.len() + emails.records.len() + sms.records.len();
    assert!(records > 5, "u-7 should have activity, has {records}");
    assert_eq!(
        h.calls().await["directory"],
        1,
        "one batched lookup for {records} records"
    );
    assert_eq!(a.timeline.len(), records);
    for e in &a.timeline {
        let who = e.counterparty.as_ref().expect("counterparty");
        assert!(!who.display_name.is_empty(), "{} unnamed", who.id);
    }
    let times: Vec<_> = a
        .timeline
        .iter()
        .map(|e| e.time.expect("time").seconds)
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "timeline not newest first"
    );
    let summary = a.summary.expect("summary");
    assert_eq!(summary.call_count as usize, calls.records.len());
    assert_eq!(summary.email_count as usize, emails.records.len());
    assert_eq!(summary.sms_count as usize, sms.records.len());
    let total: i64 = calls
        .records
        .iter()
        .map(|c| c.duration.expect("d").seconds)
        .sum();
    assert_eq!(summary.total_call_duration.expect("d").seconds, total);
    assert_eq!(summary.last_contact_time.expect("t").seconds, times[0]);
    assert!(!resp.status.expect("status").degraded);
}

#[tokio::test]
async fn time_window_limits_activity() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.activity().await;
    let all = client
        .get_user_activity(GetUserActivityRequest {
            user_id: "u-11".into(),
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner()
        .activity
        .expect("activity");
    let cut = all.timeline[all.timeline.len() / 2].time.expect("t");
    let recent = client
        .get_user_activity(GetUserActivityRequest {
            user_id: "u-11".into(),
            window: Some(TimeWindow {
                start_time: Some(cut),
                end_time: None,
            }),
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner()
        .activity
        .expect("activity");
    assert!(!recent.timeline.is_empty() && recent.timeline.len() < all.timeline.len());
    assert!(
        recent
            .timeline
            .iter()
            .all(|e| e.time.expect("t").seconds >= cut.seconds)
    );
}

#[tokio::test]
async fn invalid_requests_get_field_violations_and_call_nothing() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut customers = h.customers().await;
    let cases = [
        (get(""), vec!["customer_id"]),
        (get("c/1"), vec!["customer_id"]),
        (get(&"c".repeat(65)), vec!["customer_id"]),
        (
            GetCustomerRequest {
                customer_id: "".into(),
                read_mask: mask(&["profile", "emails"]),
                completeness: 9,
                ..Default::default()
            },
            vec!["customer_id", "read_mask.paths[1]", "completeness"],
        ),
    ];
    for (req, fields) in cases {
        let err = customers.get_customer(req).await.expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument);
        let bad = err.get_details_bad_request().expect("bad request details");
        let got: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(got, fields);
    }

    let mut activity = h.activity().await;
    let ts = |s| {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        })
    };
    let err = activity
        .get_user_activity(GetUserActivityRequest {
            user_id: "u-1".into(),
            window: Some(TimeWindow {
                start_time: ts(100),
                end_time: ts(50),
            }),
            read_mask: mask(&["orders"]),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    let bad = err.get_details_bad_request().expect("details");
    let got: Vec<_> = bad
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(got, ["window.end_time", "read_mask.paths[0]"]);
    assert!(
        h.calls().await.values().all(|&n| n == 0),
        "nothing may be called"
    );
}

#[tokio::test]
async fn unknown_entities_are_not_found() {
    let h = start(SimConfig::default(), |_| {}).await;
    let err = h
        .customers()
        .await
        .get_customer(get("c-999999"))
        .await
        .expect_err("nf");
    assert_eq!(err.code(), Code::NotFound);
    let info = err.get_details_resource_info().expect("resource info");
    assert_eq!(
        (info.resource_type.as_str(), info.resource_name.as_str()),
        ("customer", "c-999999")
    );
    assert_eq!(
        err.get_details_error_info().expect("info").reason,
        "CUSTOMER_NOT_FOUND"
    );

    let err = h
        .activity()
        .await
        .get_user_activity(GetUserActivityRequest {
            user_id: "u-0".into(),
            ..Default::default()
        })
        .await
        .expect_err("nf");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.get_details_error_info().expect("info").reason,
        "USER_NOT_FOUND"
    );
}

fn failing(code: Code) -> Behavior {
    Behavior {
        error_rate: 1.0,
        error_code: code as i32,
        ..Default::default()
    }
}

/// Nothing a caller sees may carry downstream detail.
fn assert_no_leak(status: &tonic::Status, sim: std::net::SocketAddr) {
    let msg = status.message();
    assert!(!msg.contains("simulated"), "downstream text leaked: {msg}");
    assert!(
        !msg.contains(&sim.to_string()) && !msg.contains("127.0.0.1"),
        "address leaked: {msg}"
    );
}

#[tokio::test]
async fn a_failed_required_component_fails_the_call_with_details() {
    let h = start(SimConfig::default(), |_| {}).await;
    h.set_behavior("profile", failing(Code::Unavailable)).await;
    let err = h
        .customers()
        .await
        .get_customer(get("c-1"))
        .await
        .expect_err("fails");
    assert_eq!(err.code(), Code::Unavailable);
    let info = err.get_details_error_info().expect("info");
    assert_eq!(
        (info.reason.as_str(), info.metadata["component"].as_str()),
        ("UNAVAILABLE", "profile")
    );
    assert_eq!(info.domain, "bfb");
    assert!(err.get_details_retry_info().is_some());
    assert_no_leak(&err, h.sim);
}

#[tokio::test]
async fn optional_components_degrade_under_best_effort_and_fail_under_all() {
    let h = start(SimConfig::default(), |_| {}).await;
    h.set_behavior("orders", failing(Code::Unavailable)).await;
    let mut client = h.customers().await;

    let resp = client
        .get_customer(get("c-1"))
        .await
        .expect("best effort")
        .into_inner();
    let c = resp.customer.expect("customer");
    assert!(c.profile.is_some() && c.reviews.is_some() && c.orders.is_none());
    let status = resp.status.expect("status");
    assert!(status.degraded);
    assert_eq!(
        status.components["orders"].state,
        ComponentState::Error as i32
    );
    assert_eq!(status.components["orders"].reason, "UNAVAILABLE");

    let err = client
        .get_customer(GetCustomerRequest {
            customer_id: "c-1".into(),
            completeness: Completeness::All as i32,
            ..Default::default()
        })
        .await
        .expect_err("all");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.get_details_error_info().expect("info").metadata["component"],
        "orders"
    );
    assert_no_leak(&err, h.sim);
}

#[tokio::test]
async fn downstream_errors_never_pass_through_as_is() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;
    for (code, want, reason) in [
        (Code::InvalidArgument, Code::Internal, "DOWNSTREAM_REJECTED"),
        (
            Code::PermissionDenied,
            Code::Internal,
            "DOWNSTREAM_REJECTED",
        ),
        (Code::Internal, Code::Unavailable, "DOWNSTREAM_ERROR"),
        (Code::ResourceExhausted, Code::Unavailable, "UNAVAILABLE"),
    ] {
        h.set_behavior("profile", failing(code)).await;
        let err = client.get_customer(get("c-1")).await.expect_err("fails");
        assert_eq!(err.code(), want, "{code:?}");
        assert_eq!(err.get_details_error_info().expect("info").reason, reason);
        assert_no_leak(&err, h.sim);
    }
}

#[tokio::test]
async fn a_slow_downstream_times_out_on_its_own_timeout() {
    let h = start(SimConfig::default(), |c| {
        c.downstream_mut(Component::Reviews)
            .expect("reviews")
            .timeout = Duration::from_millis(50);
    })
    .await;
    h.set_behavior(
        "reviews",
        Behavior {
            latency: millis(2000),
            ..Default::default()
        },
    )
    .await;
    let mut client = h.customers().await;
    let started = Instant::now();
    let resp = client
        .get_customer(get("c-1"))
        .await
        .expect("best effort")
        .into_inner();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        resp.status.expect("s").components["reviews"].reason,
        "TIMEOUT"
    );

    let err = client
        .get_customer(GetCustomerRequest {
            customer_id: "c-1".into(),
            completeness: Completeness::All as i32,
            ..Default::default()
        })
        .await
        .expect_err("all");
    // The downstream was slow, the caller still had time: UNAVAILABLE, retryable.
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.get_details_error_info().expect("info").reason,
        "TIMEOUT"
    );
}

#[tokio::test]
async fn an_unreachable_downstream_is_unavailable() {
    // Bind and drop a listener to get a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let h = start(SimConfig::default(), |c| {
        c.downstream_mut(Component::Favorites)
            .expect("favorites")
            .endpoint = format!("http://{dead}");
    })
    .await;
    let mut client = h.customers().await;
    let resp = client
        .get_customer(get("c-1"))
        .await
        .expect("best effort")
        .into_inner();
    assert_eq!(
        resp.status.expect("s").components["favorites"].reason,
        "UNAVAILABLE"
    );
    let err = client
        .get_customer(GetCustomerRequest {
            customer_id: "c-1".into(),
            completeness: Completeness::All as i32,
            ..Default::default()
        })
        .await
        .expect_err("all");
    assert_eq!(err.code(), Code::Unavailable);
    assert_no_leak(&err, h.sim);
    assert!(!err.message().contains(&dead.to_string()));
}

#[tokio::test]
async fn directory_failure_keeps_records_without_names() {
    let h = start(SimConfig::default(), |_| {}).await;
    h.set_behavior("directory", failing(Code::Unavailable))
        .await;
    let mut client = h.activity().await;
    let resp = client
        .get_user_activity(GetUserActivityRequest {
            user_id: "u-7".into(),
            ..Default::default()
        })
        .await
        .expect("directory is optional by default")
        .into_inner();
    let a = resp.activity.expect("activity");
    assert!(!a.timeline.is_empty());
    assert!(a.timeline.iter().all(|e| {
        e.counterparty
            .as_ref()
            .expect("who")
            .display_name
            .is_empty()
    }));
    let status = resp.status.expect("status");
    assert!(status.degraded);
    assert_eq!(
        status.components["directory"].state,
        ComponentState::Error as i32
    );

    let err = client
        .get_user_activity(GetUserActivityRequest {
            user_id: "u-7".into(),
            completeness: Completeness::All as i32,
            ..Default::default()
        })
        .await
        .expect_err("all needs names too");
    assert_eq!(
        err.get_details_error_info().expect("info").metadata["component"],
        "directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_cancelling_cancels_the_downstream_calls() {
    let h = start(sim_with_latency(Duration::from_secs(5)), |_| {}).await;
    let mut client = h.customers().await;
    let call = tokio::spawn(async move { client.get_customer(get("c-1")).await });
    // Wait until all four downstream calls are in flight, then hang up.
    h.wait_for_stats(|s| s.peak_total_in_flight >= 4).await;
    call.abort();
    h.assert_each_cancelled_once(&["profile", "favorites", "reviews", "orders"])
        .await;
}

#[tokio::test]
async fn reflection_v1_lists_the_public_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = ServerReflectionClient::new(common::channel(h.bfb).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let answer = answers.message().await.expect("stream").expect("an answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected answer {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "bfb.customer.v1.CustomerAggregateService",
        "bfb.activity.v1.UserActivityService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
}
